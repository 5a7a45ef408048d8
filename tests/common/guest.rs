//! Guest memory for the raw frontend: memfd-backed regions shared with the daemon.
//!
//! The default layout has two regions that are contiguous in guest-physical address space
//! but are separate mappings (and separate memfds), so a buffer can straddle the boundary:
//!
//! ```text
//! region A: [0, REGION_A_SIZE)                     rings, headers, most buffers
//! region B: [REGION_A_SIZE, REGION_A_SIZE + REGION_B_SIZE)
//! OUTSIDE_GPA: an address covered by no region
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of the first region (guest-physical base 0).
pub const REGION_A_SIZE: u64 = 64 << 20;
/// Size of the second region (placed right after region A).
pub const REGION_B_SIZE: u64 = 16 << 20;
/// Guest-physical base of region B.
pub const REGION_B_BASE: u64 = REGION_A_SIZE;
/// A guest-physical address that no region covers.
pub const OUTSIDE_GPA: u64 = 0x4000_0000;

/// Area at the start of region A reserved for the virtqueues (128 KiB per queue).
pub const QUEUE_AREA_SIZE: u64 = 0x2_0000;
pub const MAX_QUEUES: u64 = 16;
const A_ALLOC_START: u64 = QUEUE_AREA_SIZE * MAX_QUEUES;
/// Half-width of the window around the A/B boundary used for straddling buffers.
const SPAN_WINDOW: u64 = 1 << 20;
const A_ALLOC_END: u64 = REGION_A_SIZE - SPAN_WINDOW;
const B_ALLOC_START: u64 = REGION_B_BASE + SPAN_WINDOW;
const B_ALLOC_END: u64 = REGION_B_BASE + REGION_B_SIZE;

/// Where a buffer is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Region A (the default).
    A,
    /// Region B.
    B,
    /// Across the A/B boundary (roughly half in each). Only one straddling buffer can be live
    /// at a time: every call returns a buffer around the same boundary.
    Span,
}

/// One memfd-backed region mapped into this process.
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    pub host: *mut u8,
    fd: OwnedFd,
}

impl Region {
    fn new(gpa: u64, size: u64, name: &str) -> Region {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on a memfd we own.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: mapping a fresh shared memfd of `size` bytes; the result is checked.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            host,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Region {
            gpa,
            size,
            host: host as *mut u8,
            fd,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.gpa + self.size
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.size as usize) };
    }
}

/// The guest memory: regions plus a simple bump allocator.
pub struct GuestMem {
    pub regions: Vec<Region>,
    next_a: u64,
    next_b: u64,
}

// SAFETY: the raw pointers refer to shared mappings owned by the struct for its lifetime;
// all accesses go through bounds-checked methods.
unsafe impl Send for GuestMem {}

impl Default for GuestMem {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestMem {
    /// The standard two-region layout.
    pub fn new() -> GuestMem {
        GuestMem {
            regions: vec![
                Region::new(0, REGION_A_SIZE, "vublk-test-a"),
                Region::new(REGION_B_BASE, REGION_B_SIZE, "vublk-test-b"),
            ],
            next_a: A_ALLOC_START,
            next_b: B_ALLOC_START,
        }
    }

    /// Frontend (host) virtual address of a guest address.
    pub fn host_addr(&self, gpa: u64) -> u64 {
        let r = self
            .regions
            .iter()
            .find(|r| r.contains(gpa))
            .unwrap_or_else(|| panic!("gpa {gpa:#x} not in guest memory"));
        r.host as u64 + (gpa - r.gpa)
    }

    /// Pointer to `len` bytes at `gpa` inside a single region.
    fn ptr(&self, gpa: u64, len: u64) -> *mut u8 {
        let r = self
            .regions
            .iter()
            .find(|r| r.contains(gpa))
            .unwrap_or_else(|| panic!("gpa {gpa:#x} not in guest memory"));
        assert!(
            gpa + len <= r.gpa + r.size,
            "access {gpa:#x}+{len} crosses a region end"
        );
        // SAFETY: gpa lies within the region, so the offset stays inside the mapping.
        unsafe { r.host.add((gpa - r.gpa) as usize) }
    }

    /// Split [gpa, gpa+len) into per-region pieces (panics on a hole).
    fn pieces(&self, gpa: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cur = gpa;
        let end = gpa + len;
        while cur < end {
            let r = self
                .regions
                .iter()
                .find(|r| r.contains(cur))
                .unwrap_or_else(|| panic!("gpa {cur:#x} not in guest memory"));
            let n = (r.gpa + r.size).min(end) - cur;
            out.push((cur, n));
            cur += n;
        }
        out
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let mut off = 0usize;
        for (g, n) in self.pieces(gpa, data.len() as u64) {
            let p = self.ptr(g, n);
            // SAFETY: p points to n valid bytes of the shared mapping; data[off..off+n] exists.
            unsafe { std::ptr::copy_nonoverlapping(data[off..].as_ptr(), p, n as usize) };
            off += n as usize;
        }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut off = 0usize;
        for (g, n) in self.pieces(gpa, len as u64) {
            let p = self.ptr(g, n);
            // SAFETY: p points to n valid bytes of the shared mapping; out has room for them.
            unsafe { std::ptr::copy_nonoverlapping(p, out[off..].as_mut_ptr(), n as usize) };
            off += n as usize;
        }
        out
    }

    /// Like `write`, but silently skips bytes no region covers.
    pub fn write_lenient(&self, gpa: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let g = gpa + i as u64;
            if self.regions.iter().any(|r| r.contains(g)) {
                self.write(g, &[*b]);
            }
        }
    }

    /// Like `read`, but bytes no region covers read as zero.
    pub fn read_lenient(&self, gpa: u64, len: usize) -> Vec<u8> {
        if self.is_covered(gpa, len as u64) {
            return self.read(gpa, len);
        }
        (0..len as u64)
            .map(|i| {
                let g = gpa + i;
                if self.regions.iter().any(|r| r.contains(g)) {
                    self.read_u8(g)
                } else {
                    0
                }
            })
            .collect()
    }

    /// True if every byte of [gpa, gpa+len) is in some region.
    pub fn is_covered(&self, gpa: u64, len: u64) -> bool {
        let mut cur = gpa;
        let end = gpa + len;
        while cur < end {
            match self.regions.iter().find(|r| r.contains(cur)) {
                Some(r) => cur = r.gpa + r.size,
                None => return false,
            }
        }
        true
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.write(gpa, &vec![byte; len]);
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        assert_eq!(gpa % 2, 0);
        let p = self.ptr(gpa, 2) as *mut u16;
        // SAFETY: aligned, in bounds (checked by ptr()).
        unsafe { std::ptr::write_volatile(p, v.to_le()) };
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        assert_eq!(gpa % 2, 0);
        let p = self.ptr(gpa, 2) as *const u16;
        // SAFETY: aligned, in bounds (checked by ptr()).
        u16::from_le(unsafe { std::ptr::read_volatile(p) })
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        assert_eq!(gpa % 4, 0);
        let p = self.ptr(gpa, 4) as *const u32;
        // SAFETY: aligned, in bounds (checked by ptr()).
        u32::from_le(unsafe { std::ptr::read_volatile(p) })
    }

    pub fn read_u8(&self, gpa: u64) -> u8 {
        let p = self.ptr(gpa, 1);
        // SAFETY: in bounds (checked by ptr()).
        unsafe { std::ptr::read_volatile(p) }
    }

    /// Allocate `len` bytes (aligned to `align`) in the given place. Never freed until
    /// `reset_alloc`. Fresh buffers are filled with 0xA5 so stale data is recognizable.
    pub fn alloc(&mut self, len: u64, align: u64, place: Place) -> u64 {
        let align = align.max(1);
        let gpa = match place {
            Place::A => {
                let g = self.next_a.next_multiple_of(align);
                assert!(
                    g + len <= A_ALLOC_END,
                    "guest memory region A exhausted; call reset_alloc()"
                );
                self.next_a = g + len;
                g
            }
            Place::B => {
                let g = self.next_b.next_multiple_of(align);
                assert!(
                    g + len <= B_ALLOC_END,
                    "guest memory region B exhausted; call reset_alloc()"
                );
                self.next_b = g + len;
                g
            }
            Place::Span => {
                assert!(len >= 2, "a straddling buffer needs at least 2 bytes");
                assert!(len <= 2 * SPAN_WINDOW);
                // Put the boundary in the middle, at an odd-ish position if len allows.
                REGION_B_BASE - len / 2
            }
        };
        self.fill(gpa, len as usize, 0xA5);
        gpa
    }

    pub fn reset_alloc(&mut self) {
        self.next_a = A_ALLOC_START;
        self.next_b = B_ALLOC_START;
    }

    /// Guest-physical address of the ring area of queue `q`.
    pub fn queue_area(q: usize) -> u64 {
        assert!((q as u64) < MAX_QUEUES);
        q as u64 * QUEUE_AREA_SIZE
    }
}
