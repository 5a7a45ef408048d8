//! `--verify`: write a region with self-describing sectors, flush, read it all back.
//!
//! Each queue writes its own contiguous part of the region, in requests of mixed sizes (one
//! to 32 units of 4 KiB, at most 128 KiB) whose buffers are split into one to four segments
//! placed out of order in memory, with a flush every 32 requests and one at the end. Reads
//! use a different chunking, and each queue reads back the part another queue wrote, so a
//! bug in request splitting, segment handling or per-queue state shows up as a mismatch.

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;

use blkio::{Blkioq, Completion, ReqFlags, iovec};

use super::rng::Rng;
use super::sector::{self, Mismatch, SECTOR};
use super::{Shared, VerifyPhase, io_failure};

/// Largest verify request.
pub const MAX_CHUNK: u64 = 128 << 10;
/// Most segments per verify request (unless the device's segment limit needs more).
pub const MAX_SEGS: usize = 4;
/// Gap left between out-of-order segments in memory.
const GAP: usize = 512;
/// Every this many requests of the write pass is a flush.
const FLUSH_EVERY: u64 = 32;

/// Buffer bytes one verify slot needs.
pub fn slot_stride() -> usize {
    (MAX_CHUNK as usize + MAX_SEGS * GAP).next_multiple_of(4096)
}

/// What one verify worker does.
#[derive(Debug, Clone)]
pub(crate) struct VerifyPlan {
    pub queue: usize,
    pub phase: VerifyPhase,
    pub seed: u64,
    pub depth: usize,
    /// The part this queue writes, and the part it reads back.
    pub write_part: (u64, u64),
    pub read_part: (u64, u64),
    /// Request sizes are multiples of this (4 KiB or the logical block size if larger).
    pub unit: u64,
    /// Largest request.
    pub max_chunk: u64,
    pub seg_limit: u64,
    pub max_segments: usize,
    pub buf_base: usize,
    pub slot_stride: usize,
}

/// What one verify worker saw.
#[derive(Debug, Default)]
pub(crate) struct VerifyResult {
    pub write_requests: u64,
    pub read_requests: u64,
    pub multi_segment_requests: u64,
    pub flushes: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub bad_sectors: u64,
    pub first_mismatch: Option<Mismatch>,
    /// A failure that stopped this worker (e.g. the connection broke).
    pub fatal: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
    Flush,
}

struct Slot {
    kind: Kind,
    off: u64,
    len: u64,
    base: usize,
    /// Segments in device order (their memory order is shuffled).
    iov: Vec<iovec>,
}

/// Split `len` bytes into segments (in device order) placed in a slot buffer at `base`, in
/// reverse memory order with gaps, unless the device needs many small segments.
fn layout(rng: &mut Rng, len: u64, plan: &VerifyPlan, base: usize, iov: &mut Vec<iovec>) {
    let sectors = len / SECTOR as u64;
    let min_segs = match plan.seg_limit {
        0 => 1,
        l => len.div_ceil(l) as usize,
    };
    let mut want = (1 + rng.below(MAX_SEGS as u64)) as usize;
    want = want
        .max(min_segs)
        .min(plan.max_segments)
        .min(sectors as usize);
    // Random cut points, in sectors.
    let mut cuts = [0u64; MAX_SEGS + 1];
    let mut n = 0;
    if want <= MAX_SEGS {
        for _ in 1..want {
            cuts[n] = 1 + rng.below(sectors - 1);
            n += 1;
        }
        cuts[..n].sort_unstable();
    }
    let mut sizes = [0u64; MAX_SEGS];
    let mut nseg = 0;
    let mut prev = 0;
    for &c in cuts[..n].iter().chain(std::iter::once(&sectors)) {
        if c > prev {
            sizes[nseg] = (c - prev) * SECTOR as u64;
            nseg += 1;
            prev = c;
        }
    }
    let fits = plan.seg_limit == 0 || sizes[..nseg].iter().all(|&s| s <= plan.seg_limit);
    iov.clear();
    if want > MAX_SEGS || !fits {
        // Equal, contiguous pieces within the device's limit.
        let piece = len
            .div_ceil(min_segs as u64)
            .next_multiple_of(SECTOR as u64);
        let mut done = 0;
        while done < len {
            let l = piece.min(len - done);
            iov.push(iovec {
                iov_base: (base + done as usize) as *mut libc::c_void,
                iov_len: l as usize,
            });
            done += l;
        }
        return;
    }
    // Memory position of each segment: last segment first, GAP bytes apart.
    let mut pos = [0usize; MAX_SEGS];
    let mut p = 0;
    for i in (0..nseg).rev() {
        pos[i] = p;
        p += sizes[i] as usize + GAP;
    }
    for i in 0..nseg {
        iov.push(iovec {
            iov_base: (base + pos[i]) as *mut libc::c_void,
            iov_len: sizes[i] as usize,
        });
    }
}

/// The sectors of a slot's buffer with their device offsets, in device order.
fn for_each_sector(slot: &Slot, mut f: impl FnMut(&mut [u8], u64)) {
    let mut off = slot.off;
    for v in &slot.iov {
        // SAFETY: every segment lies within this slot's part of the mapped buffer region,
        // which only this worker touches, and no request using it is in flight.
        let seg = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
        for s in seg.chunks_exact_mut(SECTOR) {
            f(s, off);
            off += SECTOR as u64;
        }
    }
}

struct Worker<'a> {
    q: &'a mut Blkioq,
    plan: &'a VerifyPlan,
    shared: &'a Shared,
    slots: Vec<Slot>,
    free: Vec<usize>,
    comps: Vec<MaybeUninit<Completion>>,
    res: VerifyResult,
    bytes_done: u64,
}

impl Worker<'_> {
    fn submit(&mut self, idx: usize) {
        let s = &mut self.slots[idx];
        let (p, n) = (s.iov.as_ptr(), s.iov.len() as u32);
        match s.kind {
            Kind::Write => self.q.writev(s.off, p, n, idx, ReqFlags::empty()),
            Kind::Read => self.q.readv(s.off, p, n, idx, ReqFlags::empty()),
            Kind::Flush => self.q.flush(idx, ReqFlags::empty()),
        }
    }

    /// Wait for at least one completion and handle all that arrived.
    fn reap(&mut self) -> bool {
        let mut timeout = super::STALL_TIMEOUT;
        let n = match self.q.do_io(&mut self.comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) => {
                self.res.fatal = Some(format!("{:#}", io_failure(self.plan.queue, &e)));
                self.shared.abort.store(true, Ordering::Relaxed);
                return false;
            }
        };
        for i in 0..n {
            // SAFETY: do_io initialized the first n completions.
            let c = unsafe { self.comps[i].assume_init_ref() };
            let (idx, ret) = (c.user_data, c.ret);
            self.complete(idx, ret);
            self.free.push(idx);
        }
        self.shared.done[self.plan.queue]
            .0
            .store(self.bytes_done, Ordering::Relaxed);
        true
    }

    fn complete(&mut self, idx: usize, ret: i32) {
        let s = &self.slots[idx];
        if ret != 0 {
            self.res.errors += 1;
            if self.res.first_error.is_none() {
                let what = match s.kind {
                    Kind::Write => format!("write of {} bytes at offset {}", s.len, s.off),
                    Kind::Read => format!("read of {} bytes at offset {}", s.len, s.off),
                    Kind::Flush => "flush".to_string(),
                };
                let err = std::io::Error::from_raw_os_error(-ret);
                self.res.first_error =
                    Some(format!("queue {}: {what} failed: {err}", self.plan.queue));
            }
            return;
        }
        self.bytes_done += s.len;
        if s.kind != Kind::Read {
            return;
        }
        let (seed, res) = (self.plan.seed, &mut self.res);
        for_each_sector(s, |data, off| {
            if let Err(m) = sector::check(data, off, seed) {
                res.bad_sectors += 1;
                if res.first_mismatch.is_none_or(|f| m.offset < f.offset) {
                    res.first_mismatch = Some(m);
                }
            }
        });
    }

    /// One pass over `part`: write (with periodic flushes) or read and check.
    fn pass(&mut self, kind: Kind, part: (u64, u64), rng: &mut Rng) -> bool {
        let (mut cursor, end) = part;
        let mut nreq = 0u64;
        let mut inflight = 0usize;
        loop {
            while cursor < end && !self.shared.abort.load(Ordering::Relaxed) {
                let Some(idx) = self.free.pop() else { break };
                nreq += 1;
                let s = &mut self.slots[idx];
                if kind == Kind::Write && nreq.is_multiple_of(FLUSH_EVERY) {
                    s.kind = Kind::Flush;
                    s.len = 0;
                    s.iov.clear();
                    self.res.flushes += 1;
                } else {
                    let units = 1 + rng.below(self.plan.max_chunk / self.plan.unit);
                    let len = (units * self.plan.unit).min(end - cursor);
                    s.kind = kind;
                    s.off = cursor;
                    s.len = len;
                    layout(rng, len, self.plan, s.base, &mut s.iov);
                    cursor += len;
                    if s.iov.len() > 1 {
                        self.res.multi_segment_requests += 1;
                    }
                    let seed = self.plan.seed;
                    if kind == Kind::Write {
                        for_each_sector(s, |data, off| sector::encode(data, off, seed));
                        self.res.write_requests += 1;
                        self.res.bytes_written += len;
                    } else {
                        for_each_sector(s, |data, _| data.fill(0xa5));
                        self.res.read_requests += 1;
                        self.res.bytes_read += len;
                    }
                }
                self.submit(idx);
                inflight += 1;
            }
            if inflight == 0 {
                return true;
            }
            let before = self.free.len();
            if !self.reap() {
                return false;
            }
            inflight -= self.free.len() - before;
        }
    }

    fn flush(&mut self) -> bool {
        let idx = self.free.pop().expect("a free slot after a pass");
        let s = &mut self.slots[idx];
        s.kind = Kind::Flush;
        s.len = 0;
        s.iov.clear();
        self.res.flushes += 1;
        self.submit(idx);
        while self.free.len() < self.slots.len() {
            if !self.reap() {
                return false;
            }
        }
        true
    }
}

/// Run one queue's verify passes. `between` is called by every worker after its write pass
/// (a barrier, so reads start once all writes are flushed).
pub(crate) fn run(
    q: &mut Blkioq,
    plan: &VerifyPlan,
    shared: &Shared,
    between: impl FnOnce(),
) -> VerifyResult {
    let depth = plan.depth;
    let cap = MAX_SEGS.max(match plan.seg_limit {
        0 => 1,
        l => plan.max_chunk.div_ceil(l) as usize,
    });
    let slots = (0..depth)
        .map(|i| Slot {
            kind: Kind::Read,
            off: 0,
            len: 0,
            base: plan.buf_base + i * plan.slot_stride,
            iov: Vec::with_capacity(cap),
        })
        .collect();
    let mut w = Worker {
        q,
        plan,
        shared,
        slots,
        free: (0..depth).rev().collect(),
        comps: (0..depth).map(|_| MaybeUninit::uninit()).collect(),
        res: VerifyResult::default(),
        bytes_done: 0,
    };
    shared.wait_start();
    let stream = 2 * plan.queue as u64;
    let mut ok = true;
    if plan.phase != VerifyPhase::Read {
        let mut rng = Rng::stream(plan.seed ^ 0x5752_4954_4521, stream);
        ok = w.pass(Kind::Write, plan.write_part, &mut rng) && w.flush();
    }
    between();
    if ok && plan.phase != VerifyPhase::Write && !shared.abort.load(Ordering::Relaxed) {
        let mut rng = Rng::stream(plan.seed ^ 0x5245_4144_2121, stream + 1);
        w.pass(Kind::Read, plan.read_part, &mut rng);
    }
    w.res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seg_limit: u64, max_segments: usize) -> VerifyPlan {
        VerifyPlan {
            queue: 0,
            phase: VerifyPhase::Both,
            seed: 1,
            depth: 1,
            write_part: (0, 0),
            read_part: (0, 0),
            unit: 4096,
            max_chunk: MAX_CHUNK,
            seg_limit,
            max_segments,
            buf_base: 0x10_0000,
            slot_stride: slot_stride(),
        }
    }

    #[test]
    fn layouts_cover_the_request_within_the_slot() {
        let mut rng = Rng::new(5);
        let mut iov = Vec::new();
        let mut seen_segs = [false; MAX_SEGS + 1];
        for (seg_limit, max_segments) in [(0, 126), (1 << 20, 254), (8192, 254), (0, 1), (0, 2)] {
            let p = plan(seg_limit, max_segments);
            for _ in 0..2000 {
                let len = 4096 * (1 + rng.below(32));
                layout(&mut rng, len, &p, p.buf_base, &mut iov);
                assert_eq!(iov.iter().map(|v| v.iov_len as u64).sum::<u64>(), len);
                assert!(iov.len() <= max_segments);
                for v in &iov {
                    let a = v.iov_base as usize;
                    assert!(v.iov_len > 0 && v.iov_len.is_multiple_of(SECTOR));
                    assert!(a.is_multiple_of(SECTOR));
                    assert!(a >= p.buf_base && a + v.iov_len <= p.buf_base + p.slot_stride);
                    assert!(seg_limit == 0 || v.iov_len as u64 <= seg_limit);
                }
                // Segments never overlap in memory.
                let mut r: Vec<_> = iov
                    .iter()
                    .map(|v| (v.iov_base as usize, v.iov_len))
                    .collect();
                r.sort_unstable();
                assert!(r.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
                if seg_limit == 0 && max_segments >= MAX_SEGS {
                    seen_segs[iov.len()] = true;
                }
            }
        }
        assert!(
            seen_segs[1..].iter().all(|&s| s),
            "1 to 4 segments all used"
        );
    }
}
