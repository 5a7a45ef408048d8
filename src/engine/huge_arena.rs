//! Bounce memory in transparent huge pages, for large O_DIRECT transfers.
//!
//! Some devices pay per memory segment of a request rather than per byte. This VM's virtual
//! disk reads 128 KiB O_DIRECT requests from buffers in 4 KiB pages at about half the rate it
//! reads them from 2 MiB pages: every 4 KiB page that is not physically next to the one before
//! is a segment of its own, and guest RAM in 4 KiB pages makes every large request such a
//! scatter list. Copied through a buffer that lies in one huge page, the request is one
//! segment. The copy costs CPU (a few µs per 128 KiB) and saves much more device time.
//!
//! Each queue thread's engine gets one arena, created on its first large transfer, and hands
//! out contiguous runs of slots. When the arena is full a transfer simply goes straight to the
//! kernel from guest memory, as it would without the arena.

use std::ptr::NonNull;
use std::sync::Arc;

use super::IoVec;

/// The x86-64 (and arm64 with 4 KiB pages) transparent huge page size.
pub const HUGE_PAGE: usize = 2 << 20;
/// Bounce memory per queue thread: four huge pages, enough for 64 transfers of 128 KiB.
pub const ARENA_BYTES: usize = 8 << 20;
/// The unit the arena hands out.
pub const SLOT_BYTES: usize = 64 << 10;
const SLOTS: usize = ARENA_BYTES / SLOT_BYTES;
const SLOTS_PER_HUGE_PAGE: usize = HUGE_PAGE / SLOT_BYTES;
const _: () = assert!(SLOTS == u128::BITS as usize);

/// MADV_COLLAPSE (Linux 6.1): make the range huge pages now, or fail saying it could not.
const MADV_COLLAPSE: libc::c_int = 25;

/// An anonymous mapping of [`ARENA_BYTES`] in huge pages. Shared by the arena and by every
/// slot handed out, so that it stays mapped while any transfer into it is in flight, even if
/// the arena goes away first.
#[derive(Debug)]
pub struct HugeMapping {
    /// What mmap returned, and its length: a huge page more than the arena, for alignment.
    mapped: NonNull<u8>,
    mapped_len: usize,
    /// The huge-page-aligned start of the arena inside it.
    start: NonNull<u8>,
}

// SAFETY: the mapping is plain memory; which bytes are used by whom is decided by the arena's
// slot accounting, and a slot's bytes are only touched through that slot.
unsafe impl Send for HugeMapping {}
// SAFETY: as above; the mapping itself is never mutated through a shared reference.
unsafe impl Sync for HugeMapping {}

impl HugeMapping {
    /// Maps the arena and makes sure the kernel backs it with huge pages; the error says why
    /// it could not.
    pub fn new() -> Result<Self, String> {
        let mapped_len = ARENA_BYTES + HUGE_PAGE;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; the
        // result is checked before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(format!(
                "cannot map {} MiB: {}",
                mapped_len >> 20,
                std::io::Error::last_os_error()
            ));
        }
        let mapped = NonNull::new(raw.cast::<u8>()).ok_or("mmap returned a null address")?;
        let skip = (HUGE_PAGE - (raw as usize % HUGE_PAGE)) % HUGE_PAGE;
        // SAFETY: `skip` is less than a huge page, so the arena lies inside the mapping.
        let start = unsafe { mapped.add(skip) };
        let map = HugeMapping {
            mapped,
            mapped_len,
            start,
        };
        let base = map.start.as_ptr().cast::<libc::c_void>();
        // SAFETY: advice on the aligned range inside our own mapping; it changes no contents.
        if unsafe { libc::madvise(base, ARENA_BYTES, libc::MADV_HUGEPAGE) } != 0 {
            return Err(format!(
                "madvise(MADV_HUGEPAGE) failed: {} (transparent huge pages off in this kernel?)",
                std::io::Error::last_os_error()
            ));
        }
        // Fault the pages in now, not on the first transfers (with MADV_HUGEPAGE the fault
        // itself allocates huge pages where it can).
        // SAFETY: the arena lies inside the writable mapping.
        unsafe { std::ptr::write_bytes(map.start.as_ptr(), 0, ARENA_BYTES) };
        // SAFETY: as for MADV_HUGEPAGE. A success means every huge page is in place.
        if unsafe { libc::madvise(base, ARENA_BYTES, MADV_COLLAPSE) } != 0 {
            return Err(format!(
                "the kernel gave no huge pages (madvise(MADV_COLLAPSE): {}; see \
                 /sys/kernel/mm/transparent_hugepage/enabled)",
                std::io::Error::last_os_error()
            ));
        }
        Ok(map)
    }
}

impl Drop for HugeMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; nothing uses it any more (every slot holds a
        // reference to it, so this runs after the last slot is gone).
        unsafe { libc::munmap(self.mapped.as_ptr().cast(), self.mapped_len) };
    }
}

/// A contiguous run of the arena's slots, lent to one transfer.
#[derive(Debug)]
pub struct ArenaSlot {
    map: Arc<HugeMapping>,
    first: usize,
    count: usize,
}

impl ArenaSlot {
    /// The start of the run.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: `first + count` slots lie inside the arena (checked when the run was taken).
        unsafe { self.map.start.as_ptr().add(self.first * SLOT_BYTES) }
    }

    /// Its capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.count * SLOT_BYTES
    }

    /// An iovec over its first `len` bytes.
    pub fn iovec(&self, len: usize) -> IoVec {
        assert!(len <= self.capacity());
        // SAFETY: the run holds at least `len` bytes; it is lent to exactly one operation and
        // keeps the mapping alive, so the memory outlives the I/O.
        unsafe { IoVec::new(self.as_ptr(), len) }
    }

    fn mask(&self) -> u128 {
        run_mask(self.first, self.count)
    }
}

fn run_mask(first: usize, count: usize) -> u128 {
    let ones = if count == SLOTS {
        u128::MAX
    } else {
        (1u128 << count) - 1
    };
    ones << first
}

/// One queue thread's bounce arena.
#[derive(Debug)]
pub struct HugeArena {
    map: Arc<HugeMapping>,
    /// A set bit is a free slot.
    free: u128,
}

impl HugeArena {
    /// A new arena in huge pages, or why there cannot be one.
    pub fn new() -> Result<Self, String> {
        Ok(HugeArena {
            map: Arc::new(HugeMapping::new()?),
            free: u128::MAX,
        })
    }

    /// The largest transfer the arena can ever take.
    pub const fn max_len() -> usize {
        ARENA_BYTES
    }

    /// Lends a run of at least `len` bytes, inside one huge page where it fits in one; None
    /// when no such run is free.
    pub fn take(&mut self, len: usize) -> Option<ArenaSlot> {
        let count = len.div_ceil(SLOT_BYTES).max(1);
        if count > SLOTS {
            return None;
        }
        let within_page = count <= SLOTS_PER_HUGE_PAGE;
        let mut first = 0;
        while first + count <= SLOTS {
            if within_page && first % SLOTS_PER_HUGE_PAGE + count > SLOTS_PER_HUGE_PAGE {
                // The run would straddle two huge pages: start at the next one.
                first = (first / SLOTS_PER_HUGE_PAGE + 1) * SLOTS_PER_HUGE_PAGE;
                continue;
            }
            let mask = run_mask(first, count);
            if self.free & mask == mask {
                self.free &= !mask;
                return Some(ArenaSlot {
                    map: self.map.clone(),
                    first,
                    count,
                });
            }
            // Skip past the lowest used slot inside this candidate run.
            let used = (!self.free & mask).trailing_zeros() as usize;
            first = used + 1;
        }
        None
    }

    /// Takes a run back. A run from another arena is only dropped.
    pub fn give_back(&mut self, slot: ArenaSlot) {
        if Arc::ptr_eq(&slot.map, &self.map) {
            debug_assert_eq!(self.free & slot.mask(), 0, "a run given back twice");
            self.free |= slot.mask();
        }
    }

    /// Slots lent out.
    pub fn slots_in_use(&self) -> usize {
        SLOTS - self.free.count_ones() as usize
    }
}

/// Whether `ptr` lies in a huge page, from /proc/self/smaps (for tests).
#[cfg(test)]
pub(crate) fn in_huge_page(ptr: *const u8) -> bool {
    let addr = ptr as usize;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = (lo..hi).contains(&addr);
        } else if inside && let Some(kb) = line.strip_prefix("AnonHugePages:") {
            let kb: usize = kb.trim().trim_end_matches(" kB").trim().parse().unwrap();
            return kb >= ARENA_BYTES >> 10;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena() -> HugeArena {
        HugeArena::new().unwrap_or_else(|why| {
            panic!("no huge-page arena on this machine ({why}); vublk's tests need THP")
        })
    }

    #[test]
    fn the_arena_lies_in_huge_pages() {
        let mut a = arena();
        let slot = a.take(128 << 10).unwrap();
        assert_eq!(slot.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(
            in_huge_page(slot.as_ptr()),
            "the arena is not in huge pages"
        );
    }

    #[test]
    fn runs_are_disjoint_stay_inside_a_huge_page_and_come_back() {
        let mut a = arena();
        // 3 slots each: 10 fit in a 32-slot huge page, the 11th starts the next page.
        let runs: Vec<_> = (0..40).map_while(|_| a.take(3 * SLOT_BYTES)).collect();
        assert_eq!(runs.len(), 40);
        let mut seen = 0u128;
        for r in &runs {
            assert_eq!(seen & r.mask(), 0, "runs overlap");
            seen |= r.mask();
            assert_eq!(
                r.first / SLOTS_PER_HUGE_PAGE,
                (r.first + r.count - 1) / SLOTS_PER_HUGE_PAGE,
                "run at {} straddles a huge page",
                r.first
            );
        }
        assert_eq!(runs[10].first, SLOTS_PER_HUGE_PAGE);
        // 4 pages × 10 runs: full for this size; two slots per page are left.
        assert!(a.take(3 * SLOT_BYTES).is_none());
        assert_eq!(a.slots_in_use(), 120);
        assert!(a.take(SLOT_BYTES).is_some());
        for r in runs {
            a.give_back(r);
        }
        assert_eq!(a.slots_in_use(), 1);
    }

    #[test]
    fn sizes_round_up_and_the_largest_takes_everything() {
        let mut a = arena();
        assert_eq!(a.take(1).unwrap().capacity(), SLOT_BYTES);
        let mut b = arena();
        let all = b.take(HugeArena::max_len()).unwrap();
        assert_eq!(all.capacity(), ARENA_BYTES);
        assert!(b.take(1).is_none());
        assert!(b.take(HugeArena::max_len() + 1).is_none());
        b.give_back(all);
        assert_eq!(b.slots_in_use(), 0);
        // A run of another arena does not free anything here.
        let foreign = a.take(SLOT_BYTES).unwrap();
        let mine = b.take(ARENA_BYTES).unwrap();
        b.give_back(foreign);
        assert!(b.take(1).is_none());
        b.give_back(mine);
    }

    #[test]
    fn a_slot_keeps_the_memory_mapped_after_the_arena_is_gone() {
        let mut a = arena();
        let slot = a.take(SLOT_BYTES).unwrap();
        drop(a);
        // SAFETY: the slot's bytes are its own and still mapped.
        unsafe { std::ptr::write_bytes(slot.as_ptr(), 7, SLOT_BYTES) };
        // SAFETY: as above.
        assert_eq!(unsafe { *slot.as_ptr().add(SLOT_BYTES - 1) }, 7);
    }
}
