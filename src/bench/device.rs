//! The connection to the backend: libblkio's "virtio-blk-vhost-user" driver.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use blkio::{Blkio, Blkioq, MemoryRegion};

/// The libblkio driver name.
pub const DRIVER: &str = "virtio-blk-vhost-user";

/// What the backend told us about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Logical block size: every request's offset and length are multiples of it.
    pub logical_block_size: u64,
    /// Most queues the backend offers.
    pub max_queues: usize,
    /// Most data segments per request.
    pub max_segments: usize,
    /// Largest data segment in bytes (0: no limit).
    pub max_segment_len: u64,
}

impl DeviceInfo {
    /// Largest segment usable for data, a multiple of the logical block size (0: no limit).
    pub fn segment_limit(&self) -> u64 {
        if self.max_segment_len == 0 {
            0
        } else {
            (self.max_segment_len / self.logical_block_size * self.logical_block_size)
                .max(self.logical_block_size)
        }
    }
}

/// Format a libblkio error with its errno (unless the message already names it).
pub fn blkio_err(e: &blkio::Error) -> anyhow::Error {
    let msg = e.message();
    if msg.contains("os error") {
        anyhow!("{msg}")
    } else {
        let errno = std::io::Error::from_raw_os_error(e.errno().raw_os_error());
        anyhow!("{msg} ({errno})")
    }
}

/// A connected (not yet started) device.
pub struct Connected {
    blkio: Blkio,
    /// Its properties.
    pub info: DeviceInfo,
}

/// A started device: its queues and one memory region for all I/O buffers.
pub struct Device {
    /// Kept alive while the queues are used: it owns the vhost-user connection.
    pub blkio: Blkio,
    /// The queues, one per worker.
    pub queues: Vec<Blkioq>,
    /// The buffer region, mapped into the backend.
    pub region: MemoryRegion,
    /// The huge-page memory behind `region`, when it is not libblkio's own. Declared after
    /// `blkio` so it is unmapped only after the connection (and the backend's mapping) is gone.
    _huge: Option<HugePageRegion>,
}

/// Size of the huge pages `--hugepages` uses.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Buffer memory in 2 MiB huge pages (a hugetlbfs memfd, shared so the backend can map it),
/// like a guest whose RAM is backed by huge pages: each buffer is physically contiguous, so
/// the backend's O_DIRECT requests reach the device in few, large segments.
struct HugePageRegion {
    fd: OwnedFd,
    addr: *mut libc::c_void,
    len: usize,
}

impl HugePageRegion {
    fn new(len: usize) -> Result<Self> {
        let len = len.max(1).next_multiple_of(HUGE_PAGE_SIZE);
        // SAFETY: the name is a NUL-terminated literal; the flags are valid for memfd_create.
        let raw = unsafe {
            libc::memfd_create(
                c"vublk-bench-huge".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            )
        };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            bail!("cannot create a huge-page memfd ({e}): the kernel lacks hugetlbfs support");
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let pages = len / HUGE_PAGE_SIZE;
        let short = || {
            anyhow!(
                "--hugepages needs {pages} free huge page(s) of 2 MiB \
                 (as root: echo {pages} > /proc/sys/vm/nr_hugepages; see HugePages_Free in /proc/meminfo)"
            )
        };
        // SAFETY: fd is a valid memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(short().context(std::io::Error::last_os_error()));
        }
        // SAFETY: a new shared mapping of len bytes of our memfd at an address the kernel
        // chooses; it aliases nothing in this process. hugetlbfs reserves the pages here, so a
        // short pool fails now (ENOMEM) instead of with SIGBUS on first touch.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(short().context(std::io::Error::last_os_error()));
        }
        Ok(HugePageRegion { fd, addr, len })
    }

    fn region(&self) -> MemoryRegion {
        MemoryRegion {
            addr: self.addr as usize,
            iova: 0,
            len: self.len,
            fd: self.fd.as_raw_fd(),
            fd_offset: 0,
            flags: 0,
        }
    }
}

impl Drop for HugePageRegion {
    fn drop(&mut self) {
        // SAFETY: addr/len is the mapping created in new(); nothing uses it any more (the
        // Device that held the queues and the connection has dropped them first).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Connect to the vhost-user socket at `socket`. `read_only` makes libblkio accept read-only
/// exports (and refuse writes).
pub fn connect(socket: &Path, read_only: bool) -> Result<Connected> {
    match std::fs::metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "socket {} does not exist (is the backend running?)",
                socket.display()
            )
        }
        Err(e) => bail!("socket {}: {e}", socket.display()),
        Ok(m) if !m.file_type().is_socket() => {
            bail!("{} is not a unix socket", socket.display())
        }
        Ok(_) => {}
    }
    let path = socket
        .to_str()
        .with_context(|| format!("socket path {} is not UTF-8", socket.display()))?;
    let ctx = || format!("vhost-user backend at {}", socket.display());
    let mut b = Blkio::new(DRIVER)
        .map_err(|e| blkio_err(&e))
        .with_context(ctx)?;
    b.set_str("path", path)
        .map_err(|e| blkio_err(&e))
        .with_context(ctx)?;
    b.set_bool("read-only", read_only)
        .map_err(|e| blkio_err(&e))
        .with_context(ctx)?;
    b.connect().map_err(|e| blkio_err(&e)).with_context(|| {
        format!(
            "cannot connect to the vhost-user backend at {}",
            socket.display()
        )
    })?;
    let get = |name: &str| -> Result<u64> {
        let v = match name {
            "capacity" => b.get_u64(name),
            _ => b.get_i32(name).map(|v| v.max(0) as u64),
        };
        v.map_err(|e| blkio_err(&e))
            .with_context(|| format!("cannot read the device's {name}"))
    };
    let info = DeviceInfo {
        capacity: get("capacity")?,
        logical_block_size: get("request-alignment")?.max(512),
        max_queues: get("max-queues")?.max(1) as usize,
        max_segments: get("max-segments")?.max(1) as usize,
        max_segment_len: get("max-segment-len")?,
    };
    Ok(Connected { blkio: b, info })
}

impl Connected {
    /// Start `num_queues` queues of `queue_size` descriptors and map a buffer region of at
    /// least `region_len` bytes, in 2 MiB huge pages when `huge_pages` is set.
    pub fn start(
        mut self,
        num_queues: usize,
        queue_size: u16,
        region_len: usize,
        huge_pages: bool,
    ) -> Result<Device> {
        let b = &mut self.blkio;
        b.set_i32("num-queues", num_queues as i32)
            .map_err(|e| blkio_err(&e))?;
        b.set_i32("queue-size", i32::from(queue_size))
            .map_err(|e| blkio_err(&e))
            .with_context(|| format!("queue size {queue_size}"))?;
        let out = b.start().map_err(|e| {
            if e.errno() == blkio::Errno::ROFS {
                anyhow!("the device is read-only and this workload writes")
            } else {
                blkio_err(&e).context(format!(
                    "the backend refused to start {num_queues} queue(s) of {queue_size} descriptors"
                ))
            }
        })?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(|e| blkio_err(&e))?
            .max(4096) as usize;
        let (region, huge) = if huge_pages {
            let huge = HugePageRegion::new(region_len)?;
            (huge.region(), Some(huge))
        } else {
            let len = region_len.max(1).next_multiple_of(align);
            let region = b
                .alloc_mem_region(len)
                .map_err(|e| blkio_err(&e))
                .with_context(|| format!("cannot allocate a {len}-byte buffer region"))?;
            (region, None)
        };
        b.map_mem_region(&region)
            .map_err(|e| blkio_err(&e))
            .context("the backend refused the buffer memory region")?;
        Ok(Device {
            blkio: self.blkio,
            queues: out.queues,
            region,
            _huge: huge,
        })
    }
}
