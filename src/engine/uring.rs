//! The io_uring engine: one ring per queue thread.
//!
//! [`submit`](IoEngine::submit) only queues a submission entry; [`commit`](IoEngine::commit)
//! hands the whole batch to the kernel with one `io_uring_enter`. Each operation lives in a
//! slot of a fixed-size slab until its last completion has been reaped, and the slot index is
//! the entry's `user_data`: the slab owns the [`IoOp`] (the iovec array the kernel reads) and
//! the token (which keeps the memory the iovecs describe alive).
//!
//! An operation may take several trips through the ring: the rest of a short transfer,
//! write-zeroes falling back from punch-hole to zero-range, the datasync of a durable
//! write-zeroes. What io_uring cannot do (discard on a block device, writing zero buffers where
//! fallocate is unsupported) runs the shared synchronous code on a small helper pool that
//! signals the ring's own eventfd, so the queue thread still has one completion fd.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{IoUring, Probe, opcode, squeue, types};
use log::Level;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::{
    Completion, EngineError, EngineKind, EngineParams, IoEngine, IoOp, IoVec, Rejected,
    ThreadPoolEngine, wait_readable,
};
use crate::backing::{Backing, BackingKind, is_unsupported};
use crate::guest_log;

/// The kernel refuses more iovecs than this in one readv/writev; longer lists go in pieces.
const IOV_MAX: usize = 1024;
/// How often one step may come back with EAGAIN or EINTR before that counts as its result.
const MAX_RETRIES: u8 = 8;
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// The opcodes the engine submits, with their names for error messages.
const OPCODES: [(u8, &str); 4] = [
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
];

/// Checks that io_uring can be used here: creates a tiny ring and probes the opcodes the
/// engine needs. On failure, says why in words fit for a log line.
pub fn probe_io_uring() -> Result<(), String> {
    let ring = IoUring::new(2).map_err(|e| ring_refused(&e).unwrap_or_else(|| e.to_string()))?;
    check_opcodes(&ring)
}

/// Why the kernel refused to create a ring, if that means io_uring is not usable at all
/// (rather than a transient failure such as ENOMEM).
fn ring_refused(e: &io::Error) -> Option<String> {
    match e.raw_os_error()? {
        libc::ENOSYS => Some("the kernel has no io_uring support (ENOSYS)".into()),
        libc::EPERM | libc::EACCES => {
            let cause = match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
                Ok(v) if v.trim() != "0" => format!("kernel.io_uring_disabled is {}", v.trim()),
                _ => "a seccomp filter or security module forbids it".into(),
            };
            Some(format!("io_uring is not permitted ({e}): {cause}"))
        }
        _ => None,
    }
}

fn check_opcodes(ring: &IoUring) -> Result<(), String> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("the kernel's io_uring cannot report its opcodes (too old?): {e}"))?;
    let missing: Vec<&str> = OPCODES
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the kernel's io_uring lacks {}",
            missing.join(", ")
        ))
    }
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// On the ring: the operation itself (for a transfer, what is left of it).
    Ring,
    /// On the ring: write-zeroes as fallocate with this mode.
    Zero(i32),
    /// On the ring: the datasync that makes a write-zeroes durable.
    Sync,
    /// On the helper pool.
    Helper,
}

/// What to do with an operation after one of its steps completed.
enum Next {
    /// Queue its (new) step on the ring.
    Ring,
    /// Hand it to the helper pool.
    Helper,
    /// It is finished.
    Done(io::Result<()>),
}

/// An operation in flight.
struct Slot<T> {
    op: IoOp,
    token: T,
    step: Step,
    /// Index of the first buffer of a transfer that is not completely done.
    first_buf: usize,
    /// EAGAIN/EINTR results of the current step so far.
    retries: u8,
}

/// Fixed-size storage for in-flight operations; an index stays valid until removed.
struct Slab<T> {
    slots: Vec<Option<Slot<T>>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new(capacity: usize) -> Self {
        Slab {
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
        }
    }

    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn free_slots(&self) -> usize {
        self.free.len()
    }

    fn insert(&mut self, slot: Slot<T>) -> Result<usize, Slot<T>> {
        match self.free.pop() {
            Some(index) => {
                self.slots[index] = Some(slot);
                Ok(index)
            }
            None => Err(slot),
        }
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut Slot<T>> {
        self.slots.get_mut(index)?.as_mut()
    }

    fn remove(&mut self, index: usize) -> Option<Slot<T>> {
        let slot = self.slots.get_mut(index)?.take()?;
        self.free.push(index);
        Some(slot)
    }
}

/// An io_uring for one queue thread.
pub struct UringEngine<T: Send + 'static> {
    // Drop order: `Drop` waits until every operation has completed, so by the time the fields
    // go, the kernel holds no pointer into `slab` or into the memory its tokens keep alive. If
    // that wait fails, `Drop` leaks the slab rather than free what the kernel may still use.
    ring: IoUring,
    slab: Slab<T>,
    /// Slots whose next step found the submission queue full; queued on the next commit/reap.
    pending: VecDeque<usize>,
    /// Entries the kernel has taken whose completion has not been reaped yet.
    in_kernel: usize,
    /// Runs what io_uring cannot do, signalling a duplicate of `eventfd`; tokens are slots.
    helper: ThreadPoolEngine<usize>,
    /// Reused buffers for one reap pass.
    helper_done: Vec<Completion<usize>>,
    cqes: Vec<(u64, i32)>,
    backing: Arc<Backing>,
    /// Registered with the ring: the kernel signals it for every completion.
    eventfd: EventFd,
}

impl<T: Send + 'static> UringEngine<T> {
    /// A ring for up to `params.queue_depth` operations in flight on `backing`.
    pub fn new(backing: Arc<Backing>, params: EngineParams) -> Result<Self, EngineError> {
        let capacity = params.queue_depth.max(1);
        let entries = u32::try_from(capacity)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "queue depth too large"))?;
        // Every slot has at most one entry queued or in the kernel, so a submission queue of
        // `capacity` entries (the kernel rounds up to a power of two) never overflows, nor does
        // the completion queue, which is twice as large. No SINGLE_ISSUER: the connection
        // thread may drain a queue's engine (stop_vring) while its queue thread is parked.
        let ring = IoUring::new(entries).map_err(|e| match ring_refused(&e) {
            Some(why) => EngineError::Unavailable(EngineKind::IoUring, why),
            None => EngineError::Io(e),
        })?;
        check_opcodes(&ring).map_err(|why| EngineError::Unavailable(EngineKind::IoUring, why))?;
        let eventfd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let helper = ThreadPoolEngine::with_notifier(
            backing.clone(),
            params.io_threads,
            capacity,
            eventfd.try_clone()?,
        );
        Ok(UringEngine {
            ring,
            slab: Slab::new(capacity),
            pending: VecDeque::new(),
            in_kernel: 0,
            helper,
            helper_done: Vec::new(),
            cqes: Vec::new(),
            backing,
            eventfd,
        })
    }

    /// Where a new operation starts.
    fn first_step(&self, op: &IoOp) -> Step {
        match op {
            IoOp::Discard { .. } if self.backing.kind() == BackingKind::BlockDevice => {
                // io_uring has no plain discard; BLKDISCARD is a blocking ioctl.
                Step::Helper
            }
            IoOp::WriteZeroes { unmap: true, .. } => Step::Zero(PUNCH_HOLE),
            IoOp::WriteZeroes { unmap: false, .. } => Step::Zero(ZERO_RANGE),
            _ => Step::Ring,
        }
    }

    /// Starts the current step of slot `index`; an error finishes the operation.
    fn dispatch(&mut self, index: usize, next: Next, out: &mut Vec<Completion<T>>) {
        match next {
            Next::Ring => self.queue(index),
            Next::Helper => {
                if let Err(e) = self.start_helper(index) {
                    self.finish(index, Err(e), out);
                }
            }
            Next::Done(result) => self.finish(index, result, out),
        }
    }

    /// Queues the entry for the current step of slot `index` (or parks it if the queue is full).
    fn queue(&mut self, index: usize) {
        if !self.pending.is_empty() || !self.push(index) {
            self.pending.push_back(index);
        }
    }

    /// Pushes the entry for slot `index` onto the submission queue; false if it is full.
    fn push(&mut self, index: usize) -> bool {
        let fd = types::Fd(self.backing.file().as_raw_fd());
        let Some(slot) = self.slab.get_mut(index) else {
            return true;
        };
        let entry = build_entry(fd, slot).user_data(index as u64);
        // SAFETY: the entry points at (a) the iovec array of the slot's `IoOp`, a Vec that is
        // never resized while the slot lives and whose heap buffer therefore stays put even if
        // the slot moves, (b) the memory those iovecs describe, which the submitter promised
        // (`IoVec::new`) to keep valid until the token is handed back, and (c) the backing's
        // fd, kept open by `self.backing`. The slot is removed, and the token handed back, only
        // after this entry's completion has been reaped, and `Drop` waits for every completion.
        unsafe { self.ring.submission().push(&entry) }.is_ok()
    }

    fn start_helper(&mut self, index: usize) -> io::Result<()> {
        let Some(slot) = self.slab.get_mut(index) else {
            return Ok(());
        };
        slot.step = Step::Helper;
        let op = match slot.op {
            IoOp::Discard { offset, len } => IoOp::Discard { offset, len },
            // Only reached when fallocate cannot zero: the sync path writes zero buffers.
            IoOp::WriteZeroes {
                offset,
                len,
                durable,
                ..
            } => IoOp::WriteZeroes {
                offset,
                len,
                unmap: false,
                durable,
            },
            _ => return Err(io::Error::other("no helper path for this operation")),
        };
        self.helper
            .submit(op, index)
            .map_err(|rejected| match rejected.error {
                EngineError::Io(e) => e,
                other => io::Error::other(other),
            })
    }

    fn finish(&mut self, index: usize, result: io::Result<()>, out: &mut Vec<Completion<T>>) {
        if let Some(slot) = self.slab.remove(index) {
            // The kernel is done with the buffers: drop them before the token, which may be
            // what keeps their memory mapped.
            drop(slot.op);
            out.push(Completion {
                token: slot.token,
                result,
            });
        }
    }

    /// Decides what follows the completion of slot `index`'s current step with result `res`.
    fn advance(&mut self, index: usize, res: i32) -> Next {
        let Some(slot) = self.slab.get_mut(index) else {
            guest_log!(Level::Error, "io_uring completion for unknown slot {index}");
            return Next::Done(Ok(()));
        };
        if res < 0 {
            return after_error(slot, -res);
        }
        slot.retries = 0;
        match (&mut slot.op, slot.step) {
            (IoOp::Read { offset, bufs }, _) => {
                after_transfer(offset, bufs, &mut slot.first_buf, res as usize, true)
            }
            (IoOp::Write { offset, bufs, .. }, _) => {
                after_transfer(offset, bufs, &mut slot.first_buf, res as usize, false)
            }
            (IoOp::WriteZeroes { durable: true, .. }, Step::Zero(_)) => {
                slot.step = Step::Sync;
                Next::Ring
            }
            _ => Next::Done(Ok(())),
        }
    }

    /// Queues parked entries, then submits everything queued with one syscall.
    fn flush(&mut self) -> io::Result<()> {
        while let Some(&index) = self.pending.front() {
            if !self.push(index) {
                break;
            }
            self.pending.pop_front();
        }
        let result = loop {
            if self.ring.submission().is_empty() {
                break Ok(());
            }
            match self.ring.submit() {
                Ok(n) => {
                    // Each entry taken yields exactly one completion (no links, no multishot).
                    self.in_kernel += n;
                    break Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Out of resources for now: the entries stay queued for the next try.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        let stuck = !self.pending.is_empty() || !self.ring.submission().is_empty();
        if result.is_ok() && stuck && self.in_kernel == 0 && self.helper.in_flight() == 0 {
            // No completion is coming that would trigger the next try: signal one ourselves.
            let _ = self.eventfd.write(1);
        }
        result
    }
}

/// The submission entry for the current step of `slot`.
fn build_entry(fd: types::Fd, slot: &Slot<impl Sized>) -> squeue::Entry {
    let datasync = || {
        opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
    };
    match &slot.op {
        IoOp::Read { offset, bufs } => {
            let (ptr, count) = iovec_window(&bufs[slot.first_buf..]);
            opcode::Readv::new(fd, ptr, count).offset(*offset).build()
        }
        IoOp::Write {
            offset,
            bufs,
            durable,
        } => {
            let (ptr, count) = iovec_window(&bufs[slot.first_buf..]);
            let flags = if *durable { libc::RWF_DSYNC } else { 0 };
            opcode::Writev::new(fd, ptr, count)
                .offset(*offset)
                .rw_flags(flags)
                .build()
        }
        IoOp::Flush => datasync(),
        IoOp::Discard { offset, len } => opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(PUNCH_HOLE)
            .build(),
        IoOp::WriteZeroes { offset, len, .. } => match slot.step {
            Step::Zero(mode) => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(mode)
                .build(),
            _ => datasync(),
        },
    }
}

/// Pointer and count of at most [`IOV_MAX`] iovecs: the kernel's view of `bufs`.
fn iovec_window(bufs: &[IoVec]) -> (*const libc::iovec, u32) {
    // IoVec is a transparent wrapper of libc::iovec; IOV_MAX fits in u32.
    (bufs.as_ptr().cast(), bufs.len().min(IOV_MAX) as u32)
}

/// The next move after `n` bytes of a transfer completed.
fn after_transfer(
    offset: &mut u64,
    bufs: &mut [IoVec],
    first_buf: &mut usize,
    n: usize,
    read: bool,
) -> Next {
    let left = IoVec::advance(&mut bufs[*first_buf..], n).len();
    *first_buf = bufs.len() - left;
    *offset += n as u64;
    if left == 0 {
        Next::Done(Ok(()))
    } else if n == 0 {
        let kind = if read {
            io::ErrorKind::UnexpectedEof
        } else {
            io::ErrorKind::WriteZero
        };
        Next::Done(Err(kind.into()))
    } else {
        // Short: go again for the rest.
        Next::Ring
    }
}

/// The next move after the current step of `slot` failed with `errno`.
fn after_error(slot: &mut Slot<impl Sized>, errno: i32) -> Next {
    if matches!(errno, libc::EAGAIN | libc::EINTR) && slot.retries < MAX_RETRIES {
        slot.retries += 1;
        return Next::Ring;
    }
    let err = io::Error::from_raw_os_error(errno);
    if !is_unsupported(&err) {
        return Next::Done(Err(err));
    }
    match (&slot.op, slot.step) {
        // Discard is a hint: where the storage cannot deallocate, do nothing.
        (IoOp::Discard { .. }, _) => Next::Done(Ok(())),
        (IoOp::WriteZeroes { .. }, Step::Zero(PUNCH_HOLE)) => {
            slot.step = Step::Zero(ZERO_RANGE);
            Next::Ring
        }
        (IoOp::WriteZeroes { .. }, Step::Zero(_)) => Next::Helper,
        _ => Next::Done(Err(err)),
    }
}

impl<T: Send + 'static> IoEngine<T> for UringEngine<T> {
    fn name(&self) -> &'static str {
        "io-uring"
    }

    fn free_slots(&self) -> usize {
        self.slab.free_slots()
    }

    fn submit(&mut self, op: IoOp, token: T) -> Result<(), Rejected<T>> {
        let step = self.first_step(&op);
        let slot = Slot {
            op,
            token,
            step,
            first_buf: 0,
            retries: 0,
        };
        let index = self.slab.insert(slot).map_err(|slot| Rejected {
            token: slot.token,
            error: EngineError::Full,
        })?;
        if step != Step::Helper {
            self.queue(index);
            return Ok(());
        }
        match self.start_helper(index) {
            Ok(()) => Ok(()),
            Err(e) => {
                let slot = self.slab.remove(index).expect("the slot was just inserted");
                Err(Rejected {
                    token: slot.token,
                    error: EngineError::Io(e),
                })
            }
        }
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        Ok(self.flush()?)
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion<T>>) {
        // Order matters: the helper's reap resets the shared eventfd before taking its own
        // completions, and the completion queue is drained only after that, so anything that
        // completes in between signals the eventfd again.
        let mut helper_done = std::mem::take(&mut self.helper_done);
        self.helper.reap(&mut helper_done);
        for c in helper_done.drain(..) {
            self.finish(c.token, c.result, out);
        }
        self.helper_done = helper_done;

        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        self.in_kernel = self.in_kernel.saturating_sub(cqes.len());
        for (user_data, res) in cqes.drain(..) {
            let index = user_data as usize;
            let next = self.advance(index, res);
            self.dispatch(index, next, out);
        }
        self.cqes = cqes;

        // Follow-up steps (short transfers, fallbacks) go to the kernel now, not at the next
        // commit, which may be far away.
        if let Err(e) = self.flush() {
            guest_log!(Level::Error, "io_uring submission failed: {e}");
        }
    }

    fn in_flight(&self) -> usize {
        self.slab.len()
    }
}

impl<T: Send + 'static> Drop for UringEngine<T> {
    fn drop(&mut self) {
        // The kernel may still read or write the buffers of in-flight operations, and closing
        // the ring does not wait for them: complete everything first. The tokens of finished
        // operations are dropped as they come back, after their buffers.
        let mut done = Vec::new();
        let mut waited_s = 0;
        while self.slab.len() > 0 {
            let waited = self
                .flush()
                .and_then(|()| wait_readable(self.eventfd.as_raw_fd(), 1000));
            match waited {
                Ok(ready) => {
                    // Reap on a timeout too: a lost wakeup must not hang the drop.
                    self.reap(&mut done);
                    done.clear();
                    if !ready {
                        waited_s += 1;
                        if waited_s % 10 == 0 {
                            log::warn!(
                                "io_uring engine: still waiting for {} operations after \
                                 {waited_s} s",
                                self.slab.len()
                            );
                        }
                    }
                }
                Err(e) => {
                    log::error!(
                        "io_uring engine: cannot wait for {} operations ({e}); leaking their \
                         buffers",
                        self.slab.len()
                    );
                    std::mem::forget(std::mem::take(&mut self.slab.slots));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_uring_is_usable_here() {
        // The conformance suite runs this engine; if the kernel refuses io_uring, say why.
        probe_io_uring().unwrap();
    }

    #[test]
    fn helper_work_completes_through_the_ring_eventfd() {
        // Block-device discard and the zero-writing fallback run on the helper pool; force that
        // path on a file and check that it signals, and that reaping resets, the ring's fd.
        let dir = tempfile::tempdir().unwrap();
        let params = crate::backing::OpenParams {
            create_size: Some(1 << 20),
            ..Default::default()
        };
        let backing = Arc::new(Backing::open(&dir.path().join("d.img"), &params).unwrap());
        std::os::unix::fs::FileExt::write_all_at(backing.file(), &[0xee; 8192], 0).unwrap();
        let params = EngineParams {
            queue_depth: 4,
            io_threads: 1,
            huge_bounce: None,
        };
        let mut engine = UringEngine::new(backing.clone(), params).unwrap();
        let op = IoOp::WriteZeroes {
            offset: 0,
            len: 4096,
            unmap: false,
            durable: true,
        };
        let slot = Slot {
            op,
            token: 7,
            step: Step::Helper,
            first_buf: 0,
            retries: 0,
        };
        let index = engine.slab.insert(slot).ok().unwrap();
        engine.start_helper(index).unwrap();
        assert_eq!(engine.in_flight(), 1);
        assert!(wait_readable(engine.completion_fd(), 5000).unwrap());
        let mut out = Vec::new();
        engine.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].token, 7);
        assert!(out[0].result.is_ok());
        assert_eq!(engine.in_flight(), 0);
        assert!(
            !wait_readable(engine.completion_fd(), 0).unwrap(),
            "eventfd not reset"
        );
        let mut back = [0xffu8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(backing.file(), &mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0) && back[4096..].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn refusals_name_their_cause() {
        let enosys = ring_refused(&io::Error::from_raw_os_error(libc::ENOSYS)).unwrap();
        assert!(enosys.contains("no io_uring"), "{enosys}");
        let eperm = ring_refused(&io::Error::from_raw_os_error(libc::EPERM)).unwrap();
        assert!(eperm.contains("not permitted"), "{eperm}");
        assert!(ring_refused(&io::Error::from_raw_os_error(libc::ENOMEM)).is_none());
    }

    #[test]
    fn a_transfer_goes_again_until_done_and_fails_on_no_progress() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        // SAFETY: the arrays outlive the iovecs; no I/O happens.
        let mut bufs =
            unsafe { vec![IoVec::new(a.as_mut_ptr(), 8), IoVec::new(b.as_mut_ptr(), 8)] };
        let (mut offset, mut first) = (100, 0);
        assert!(matches!(
            after_transfer(&mut offset, &mut bufs, &mut first, 11, true),
            Next::Ring
        ));
        assert_eq!((offset, first, bufs[1].len()), (111, 1, 5));
        let Next::Done(Err(e)) = after_transfer(&mut offset, &mut bufs, &mut first, 0, true) else {
            panic!("a zero-byte read before the end must fail");
        };
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(matches!(
            after_transfer(&mut offset, &mut bufs, &mut first, 5, true),
            Next::Done(Ok(()))
        ));
        assert_eq!(offset, 116);
    }

    #[test]
    fn write_zeroes_falls_back_and_discard_ignores_unsupported() {
        let slot = |op, step| Slot {
            op,
            token: (),
            step,
            first_buf: 0,
            retries: 0,
        };
        let wz = || IoOp::WriteZeroes {
            offset: 0,
            len: 4096,
            unmap: true,
            durable: false,
        };
        let mut s = slot(wz(), Step::Zero(PUNCH_HOLE));
        assert!(matches!(after_error(&mut s, libc::EOPNOTSUPP), Next::Ring));
        assert_eq!(s.step, Step::Zero(ZERO_RANGE));
        assert!(matches!(
            after_error(&mut s, libc::EOPNOTSUPP),
            Next::Helper
        ));
        let mut s = slot(wz(), Step::Zero(ZERO_RANGE));
        assert!(matches!(after_error(&mut s, libc::EIO), Next::Done(Err(_))));

        let mut d = slot(IoOp::Discard { offset: 0, len: 1 }, Step::Ring);
        assert!(matches!(
            after_error(&mut d, libc::EOPNOTSUPP),
            Next::Done(Ok(()))
        ));
        for _ in 0..MAX_RETRIES {
            assert!(matches!(after_error(&mut d, libc::EAGAIN), Next::Ring));
        }
        assert!(matches!(
            after_error(&mut d, libc::EAGAIN),
            Next::Done(Err(_))
        ));
    }
}
