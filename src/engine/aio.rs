//! The linux-aio engine: Linux native AIO (`io_submit`) on an O_DIRECT backing.
//!
//! Each queue thread has one AIO context sized to its queue, so the kernel has room for every
//! operation the engine accepts. Reads, writes (with `RWF_DSYNC` when durable) and flushes
//! (`FDSYNC`) go to the kernel, batched into one `io_submit` per [`IoEngine::commit`]. Linux AIO
//! cannot express discard or write-zeroes: those run on a small thread pool. The kernel
//! (through `IOCB_FLAG_RESFD`) and the pool (through [`ThreadPoolEngine::with_notifier`])
//! signal the same eventfd, so the queue thread keeps a single completion path.
//!
//! Linux AIO keeps no order between operations. That is enough for virtio-blk: a driver only
//! counts on a flush covering the writes that completed before it sent the flush.
//!
//! Without O_DIRECT, `io_submit` performs buffered I/O synchronously and would block the queue
//! thread, so the engine refuses such backings.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::aio_abi::{AioContext, Direction, IoEvent, IocbTable};
use super::{
    Completion, EngineError, EngineKind, EngineParams, IoEngine, IoOp, IoVec, Rejected,
    ThreadPoolEngine,
};
use crate::backing::Backing;

/// Drop waits for the kernel this long at a time, at most [`DROP_WAIT_STEPS`] times.
const DROP_WAIT_STEP: Duration = Duration::from_secs(1);
const DROP_WAIT_STEPS: u32 = 10;

/// Checks that Linux AIO works here: sets up and destroys a one-entry context.
pub fn probe_linux_aio() -> Result<(), String> {
    AioContext::new(1)
        .map(drop)
        .map_err(|e| setup_failure(1, &e))
}

fn setup_failure(nr_events: u32, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no AIO support (io_setup: ENOSYS)".into(),
        Some(libc::EAGAIN) => {
            format!("io_setup({nr_events}) failed: {e} (the system-wide fs.aio-max-nr is used up)")
        }
        _ => format!("io_setup({nr_events}) failed: {e}"),
    }
}

fn unavailable(why: String) -> EngineError {
    EngineError::Unavailable(EngineKind::LinuxAio, why)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write { durable: bool },
    Flush,
}

/// An operation of the AIO side. Its iovecs are in the [`IocbTable`], at the same index.
struct AioOp<T> {
    token: T,
    kind: Kind,
    /// Where the transfer starts.
    offset: u64,
    /// Bytes to transfer.
    total: u64,
    /// Bytes transferred so far (short transfers are continued).
    done: u64,
    /// The first iovec not transferred completely.
    start: usize,
}

/// Where draining the pending queue stopped.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    All,
    /// The kernel is out of resources: retry later.
    Blocked,
}

/// Submits the slots in `pending`, front first, until none is left or the kernel is out of
/// resources.
///
/// `submit` hands its slots to one `io_submit` and returns how many the kernel took: the first
/// `n`. The kernel takes fewer than all when it runs out of resources or when the iocb after
/// the last one taken is invalid; the next call tells which. An error means none was taken:
/// EAGAIN is lack of resources, which leaves everything queued; any other error belongs to the
/// first iocb, which goes to `rejected` with it, and the rest is submitted.
fn drain_pending(
    pending: &mut VecDeque<usize>,
    mut submit: impl FnMut(&[usize]) -> io::Result<usize>,
    rejected: &mut Vec<(usize, io::Error)>,
) -> Drained {
    while !pending.is_empty() {
        match submit(pending.make_contiguous()) {
            // Nothing taken and no error: do not spin on it.
            Ok(0) => return Drained::Blocked,
            Ok(n) => drop(pending.drain(..n.min(pending.len()))),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Drained::Blocked,
            Err(e) => rejected.extend(pending.pop_front().map(|i| (i, e))),
        }
    }
    Drained::All
}

/// Linux native AIO for one queue thread.
pub struct LinuxAioEngine<T: Send + 'static> {
    // Field order is load-bearing: fields drop in order, after `Drop::drop` has waited for the
    // kernel. The context goes first, so that `io_destroy` runs before the iovec arrays in
    // `table` and the tokens in `ops` (which may keep guest memory mapped) are freed.
    ctx: AioContext,
    table: IocbTable,
    /// Operations indexed like `table` (and by `aio_data`).
    ops: Vec<Option<AioOp<T>>>,
    /// Free indices of `ops`.
    free: Vec<usize>,
    /// Prepared slots not yet taken by the kernel, in submission order.
    pending: VecDeque<usize>,
    /// Finished operations not yet reaped.
    ready: Vec<Completion<T>>,
    /// Room for one harvest of events.
    events: Box<[IoEvent]>,
    /// Runs discard and write-zeroes, signalling `notifier`.
    helper: ThreadPoolEngine<T>,
    /// The completion eventfd (the kernel's `aio_resfd`, shared with `helper`).
    notifier: EventFd,
    backing: Arc<Backing>,
    depth: usize,
}

impl<T: Send + 'static> LinuxAioEngine<T> {
    /// An engine for one queue thread: an AIO context of `params.queue_depth` entries and a
    /// helper pool of up to `params.io_threads` threads. Unavailable unless `backing` was
    /// opened with O_DIRECT and the kernel grants the context.
    pub fn new(backing: Arc<Backing>, params: EngineParams) -> Result<Self, EngineError> {
        if !backing.direct() {
            return Err(unavailable(
                "needs O_DIRECT: without it io_submit blocks".into(),
            ));
        }
        let depth = params.queue_depth.max(1);
        let nr_events = u32::try_from(depth)
            .map_err(|_| unavailable(format!("queue depth {depth} is too large")))?;
        let ctx =
            AioContext::new(nr_events).map_err(|e| unavailable(setup_failure(nr_events, &e)))?;
        let notifier = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let helper = ThreadPoolEngine::with_notifier(
            backing.clone(),
            params.io_threads,
            depth,
            notifier.try_clone()?,
        );
        Ok(LinuxAioEngine {
            ctx,
            table: IocbTable::new(depth, notifier.as_raw_fd()),
            ops: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            pending: VecDeque::with_capacity(depth),
            ready: Vec::new(),
            events: vec![IoEvent::default(); depth].into_boxed_slice(),
            helper,
            notifier,
            backing,
            depth,
        })
    }

    /// Queues a read, write or flush for the next commit.
    fn start(
        &mut self,
        kind: Kind,
        offset: u64,
        bufs: Vec<IoVec>,
        token: T,
    ) -> Result<(), Rejected<T>> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if kind != Kind::Flush {
            let in_range = offset
                .checked_add(total)
                .is_some_and(|end| i64::try_from(end).is_ok());
            if !in_range {
                self.complete_now(token, Err(io::Error::from_raw_os_error(libc::EINVAL)));
                return Ok(());
            }
            if total == 0 {
                self.complete_now(token, Ok(()));
                return Ok(());
            }
        }
        let Some(i) = self.free.pop() else {
            return Err(Rejected {
                token,
                error: EngineError::Full,
            });
        };
        self.ops[i] = Some(AioOp {
            token,
            kind,
            offset,
            total,
            done: 0,
            start: 0,
        });
        self.prepare(i, bufs);
        self.pending.push_back(i);
        Ok(())
    }

    /// Sets up slot `i`'s iocb for what is left of its operation.
    fn prepare(&mut self, i: usize, bufs: Vec<IoVec>) {
        let Some(op) = &self.ops[i] else { return };
        let fd = self.backing.file().as_raw_fd();
        let direction = match op.kind {
            Kind::Flush => return self.table.prepare_fdsync(i, fd),
            Kind::Read => Direction::Read,
            Kind::Write { durable } => Direction::Write {
                rw_flags: if durable { libc::RWF_DSYNC } else { 0 },
            },
        };
        // Fits: `start` checked that the end of the transfer does.
        let offset = (op.offset + op.done) as i64;
        let start = op.start;
        self.table.prepare_rw(i, direction, fd, bufs, start, offset);
    }

    /// Completes an operation that never reached the kernel; `reap` hands it back.
    fn complete_now(&mut self, token: T, result: io::Result<()>) {
        self.ready.push(Completion { token, result });
        self.notify();
    }

    /// Makes the completion eventfd readable, so that the queue thread calls `reap`.
    fn notify(&self) {
        // Cannot fail short of the counter overflowing, which a reader resets.
        let _ = self.notifier.write(1);
    }

    /// Finishes the operation of slot `i` and frees the slot.
    fn finish(&mut self, i: usize, result: io::Result<()>) {
        // The kernel is done with the buffers: drop the iovecs before the token, which may be
        // what keeps their memory mapped.
        drop(self.table.take_bufs(i));
        if let Some(op) = self.ops[i].take() {
            self.ready.push(Completion {
                token: op.token,
                result,
            });
        }
        self.free.push(i);
    }

    /// Hands the pending iocbs to the kernel; rejected ones complete with their error.
    fn submit_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut rejected = Vec::new();
        let (table, ctx) = (&mut self.table, &self.ctx);
        let drained = drain_pending(&mut self.pending, |s| table.submit(ctx, s), &mut rejected);
        let notify = !rejected.is_empty();
        for (i, e) in rejected {
            self.finish(i, Err(e));
        }
        if drained == Drained::Blocked && self.table.in_kernel() == 0 {
            // No kernel completion will come to make the queue thread retry: ask for a reap
            // ourselves. Only a kernel short of memory refuses a context sized to the queue.
            log::debug!("linux-aio: io_submit is out of resources, retrying");
            self.notify();
        } else if notify {
            self.notify();
        }
    }

    /// Moves every event the kernel has into `ready`, continuing short transfers.
    fn harvest(&mut self) {
        loop {
            let n = match self.ctx.get_events(0, &mut self.events) {
                Ok(n) => n,
                Err(e) => {
                    log::error!("linux-aio: io_getevents failed: {e}");
                    return;
                }
            };
            for k in 0..n {
                let event = self.events[k];
                self.on_event(&event);
            }
            if n < self.events.len() {
                return;
            }
        }
    }

    fn on_event(&mut self, event: &IoEvent) {
        let Some(i) = self.table.complete(event) else {
            log::error!(
                "linux-aio: event for no operation in flight (aio_data {})",
                event.data
            );
            return;
        };
        let Some(op) = self.ops[i].as_mut() else {
            // Cannot happen: only slots holding an operation are prepared.
            return;
        };
        let n = match event.result() {
            Err(e) => return self.finish(i, Err(e)),
            Ok(_) if op.kind == Kind::Flush => return self.finish(i, Ok(())),
            Ok(0) => {
                let kind = match op.kind {
                    Kind::Read => io::ErrorKind::UnexpectedEof,
                    _ => io::ErrorKind::WriteZero,
                };
                return self.finish(i, Err(kind.into()));
            }
            Ok(n) => n,
        };
        op.done += n;
        if op.done >= op.total {
            return self.finish(i, Ok(()));
        }
        // A short transfer (or more iovecs than one iocb takes): submit the rest.
        let start = op.start;
        let mut bufs = self.table.take_bufs(i);
        let left = IoVec::advance(&mut bufs[start..], n as usize).len();
        op.start = bufs.len() - left;
        self.prepare(i, bufs);
        self.pending.push_back(i);
    }
}

impl<T: Send + 'static> IoEngine<T> for LinuxAioEngine<T> {
    fn name(&self) -> &'static str {
        EngineKind::LinuxAio.name()
    }

    fn free_slots(&self) -> usize {
        self.depth.saturating_sub(self.in_flight())
    }

    fn submit(&mut self, op: IoOp, token: T) -> Result<(), Rejected<T>> {
        if self.free_slots() == 0 {
            return Err(Rejected {
                token,
                error: EngineError::Full,
            });
        }
        match op {
            IoOp::Read { offset, bufs } => self.start(Kind::Read, offset, bufs, token),
            IoOp::Write {
                offset,
                bufs,
                durable,
            } => self.start(Kind::Write { durable }, offset, bufs, token),
            IoOp::Flush => self.start(Kind::Flush, 0, Vec::new(), token),
            op @ (IoOp::Discard { .. } | IoOp::WriteZeroes { .. }) => self.helper.submit(op, token),
        }
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        self.submit_pending();
        Ok(())
    }

    fn completion_fd(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion<T>>) {
        // The helper's reap is this call's one read of the shared eventfd: it resets it, then
        // takes the pool's completions. The kernel's events are harvested afterwards, so an
        // operation finishing after the reset leaves the eventfd readable for the next reap.
        self.helper.reap(out);
        self.harvest();
        // Continuations of short transfers, and iocbs the kernel had no room for.
        self.submit_pending();
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        (self.depth - self.free.len()) + self.helper.in_flight() + self.ready.len()
    }
}

impl<T: Send + 'static> Drop for LinuxAioEngine<T> {
    /// Waits for the operations the kernel holds before their memory goes away.
    ///
    /// Until an operation's event arrives the kernel may still write into its buffers, which
    /// the tokens can be what keeps mapped (guest memory). `io_destroy` waits for in-flight
    /// operations too, but without a bound and uninterruptibly; waiting here bounds the wait
    /// and lets the tokens be dropped after their operation. If the kernel does not finish in
    /// time (a hung device), the context, the iovec arrays and the tokens are leaked rather
    /// than freed under the kernel's feet. Queued operations are submitted first; the helper pool
    /// finishes its own before its threads exit.
    fn drop(&mut self) {
        // Like every engine, finish what was submitted, including what was not committed yet.
        if let Err(e) = self.commit() {
            log::error!("linux-aio: submitting queued operations while closing failed: {e}");
        }
        let mut done = Vec::new();
        let mut steps = 0;
        while self.in_flight() > 0 && steps < DROP_WAIT_STEPS {
            steps += 1;
            let wait_ms = DROP_WAIT_STEP.as_millis().try_into().unwrap_or(i32::MAX);
            if let Err(e) = super::wait_readable(self.completion_fd(), wait_ms) {
                log::error!("linux-aio: waiting for completions while closing failed: {e}");
                break;
            }
            self.reap(&mut done);
            done.clear();
        }
        if self.table.in_kernel() > 0 {
            log::error!(
                "linux-aio: closing with {} operations still in the kernel; leaking their memory",
                self.table.in_kernel()
            );
            self.ctx.leak();
            std::mem::forget(std::mem::take(&mut self.ops));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;
    use std::ptr::NonNull;

    use super::*;
    use crate::backing::OpenParams;
    use crate::engine::aio_abi::IOV_MAX;
    use crate::engine::{self, reap_all, wait_readable};

    const MIB: u64 = 1 << 20;
    const IMAGE: u64 = 8 * MIB;
    const BLOCK: usize = 4096;

    /// A zeroed buffer aligned for O_DIRECT.
    struct AlignedBuf {
        ptr: NonNull<u8>,
        len: usize,
    }

    impl AlignedBuf {
        fn new(len: usize) -> Self {
            let layout = Layout::from_size_align(len, BLOCK).unwrap();
            assert!(len > 0);
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            let ptr = NonNull::new(ptr).unwrap_or_else(|| handle_alloc_error(layout));
            AlignedBuf { ptr, len }
        }

        fn with(data: &[u8]) -> Self {
            let mut buf = Self::new(data.len());
            buf.bytes_mut().copy_from_slice(data);
            buf
        }

        fn bytes(&self) -> &[u8] {
            // SAFETY: `len` initialized bytes (zeroed at allocation) owned by `self`.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }

        fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as in `bytes`, borrowed mutably.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }

        /// Iovecs covering the buffer in pieces of `sizes` bytes (the rest in one last piece).
        fn iovs(&mut self, sizes: &[usize]) -> Vec<IoVec> {
            let mut iovs = Vec::new();
            let mut at = 0;
            for &n in sizes.iter().chain(std::iter::once(&usize::MAX)) {
                let n = n.min(self.len - at);
                if n == 0 {
                    break;
                }
                // SAFETY: inside the buffer; every test reaps (or drops the engine, which
                // waits) before the buffer is dropped.
                iovs.push(unsafe { IoVec::new(self.ptr.as_ptr().add(at), n) });
                at += n;
            }
            iovs
        }
    }

    impl Drop for AlignedBuf {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align(self.len, BLOCK).unwrap(),
                )
            }
        }
    }

    /// Bytes that differ per `seed` and per sector.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seed as u8).wrapping_mul(31) ^ (i / 512) as u8 ^ (i as u8).rotate_left(3))
            .collect()
    }

    /// An O_DIRECT image of `size` bytes. /tmp may be tmpfs, which may refuse O_DIRECT, so
    /// directories on disk come first.
    fn direct_backing(size: u64) -> (tempfile::TempDir, Arc<Backing>) {
        let candidates = [
            PathBuf::from("/var/tmp"),
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
            std::env::temp_dir(),
        ];
        for dir in candidates {
            let Ok(tmp) = tempfile::tempdir_in(&dir) else {
                continue;
            };
            let params = OpenParams {
                create_size: Some(size),
                direct: true,
                ..Default::default()
            };
            if let Ok(b) = Backing::open(&tmp.path().join("d.img"), &params) {
                return (tmp, Arc::new(b));
            }
        }
        panic!("no directory that supports O_DIRECT");
    }

    fn params(queue_depth: usize) -> EngineParams {
        EngineParams {
            queue_depth,
            io_threads: 2,
            huge_bounce: None,
        }
    }

    fn new_engine(backing: &Arc<Backing>, depth: usize) -> LinuxAioEngine<u64> {
        LinuxAioEngine::new(backing.clone(), params(depth)).unwrap()
    }

    /// Submits everything, commits once, and returns the results by token.
    fn run(
        engine: &mut LinuxAioEngine<u64>,
        ops: Vec<(IoOp, u64)>,
    ) -> HashMap<u64, io::Result<()>> {
        let n = ops.len();
        for (op, token) in ops {
            engine.submit(op, token).unwrap();
        }
        engine.commit().unwrap();
        let done: HashMap<_, _> = reap_all(engine)
            .into_iter()
            .map(|c| (c.token, c.result))
            .collect();
        assert_eq!(done.len(), n, "a token came back twice or not at all");
        done
    }

    fn file_bytes(backing: &Backing, offset: u64, len: usize) -> Vec<u8> {
        // Through the page cache, independently of the engine.
        let file = std::fs::File::open(backing.path()).unwrap();
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn round_trips_at_many_sizes_and_offsets() {
        let (_dir, backing) = direct_backing(IMAGE);
        let mut engine = new_engine(&backing, 32);
        // (offset, length, iovec sizes)
        let cases: &[(u64, usize, &[usize])] = &[
            (0, BLOCK, &[]),
            (4096, 2 * BLOCK, &[]),
            (12288, 3 * BLOCK, &[BLOCK, BLOCK]),
            (65536, 12 * BLOCK, &[BLOCK, 3 * BLOCK, 2 * BLOCK, 5 * BLOCK]),
            (MIB, MIB as usize, &[]),
            (3 * MIB, 64 * BLOCK, &[BLOCK; 63]),
            (5 * MIB + 8192, 5 * BLOCK, &[2 * BLOCK]),
            (IMAGE - BLOCK as u64, BLOCK, &[]),
        ];
        let mut sources: Vec<AlignedBuf> = cases
            .iter()
            .enumerate()
            .map(|(k, &(_, len, _))| AlignedBuf::with(&pattern(k as u64, len)))
            .collect();
        let writes = cases
            .iter()
            .zip(&mut sources)
            .enumerate()
            .map(|(k, (&(offset, _, sizes), buf))| {
                let op = IoOp::Write {
                    offset,
                    bufs: buf.iovs(sizes),
                    durable: false,
                };
                (op, k as u64)
            })
            .collect();
        assert!(run(&mut engine, writes).values().all(|r| r.is_ok()));

        // Read back through other iovec splits.
        let mut backs: Vec<AlignedBuf> = cases.iter().map(|c| AlignedBuf::new(c.1)).collect();
        let reads = cases
            .iter()
            .zip(&mut backs)
            .enumerate()
            .map(|(k, (&(offset, _, sizes), buf))| {
                let sizes: Vec<usize> = sizes.iter().rev().copied().collect();
                let op = IoOp::Read {
                    offset,
                    bufs: buf.iovs(&sizes),
                };
                (op, k as u64)
            })
            .collect();
        assert!(run(&mut engine, reads).values().all(|r| r.is_ok()));
        for (k, &(offset, len, _)) in cases.iter().enumerate() {
            let expected = pattern(k as u64, len);
            assert!(backs[k].bytes() == expected, "case {k} read back wrong");
            assert!(
                file_bytes(&backing, offset, len) == expected,
                "case {k} on disk wrong"
            );
        }
        assert_eq!(engine.in_flight(), 0);
        assert_eq!(engine.free_slots(), 32);
    }

    #[test]
    fn more_iovecs_than_one_iocb_takes_are_continued() {
        let (_dir, backing) = direct_backing(IMAGE);
        let mut engine = new_engine(&backing, 4);
        let count = IOV_MAX + 77;
        let len = count * BLOCK;
        let mut src = AlignedBuf::with(&pattern(9, len));
        let write = IoOp::Write {
            offset: 0,
            bufs: src.iovs(&vec![BLOCK; count]),
            durable: false,
        };
        assert!(run(&mut engine, vec![(write, 1)])[&1].is_ok());
        let mut back = AlignedBuf::new(len);
        let read = IoOp::Read {
            offset: 0,
            bufs: back.iovs(&vec![BLOCK; count]),
        };
        assert!(run(&mut engine, vec![(read, 2)])[&2].is_ok());
        assert!(back.bytes() == src.bytes());
    }

    #[test]
    fn durable_writes_and_flushes() {
        let (_dir, backing) = direct_backing(IMAGE);
        let mut engine = new_engine(&backing, 8);
        let mut a = AlignedBuf::with(&pattern(1, 2 * BLOCK));
        let mut b = AlignedBuf::with(&pattern(2, BLOCK));
        let ops = vec![
            (
                IoOp::Write {
                    offset: 0,
                    bufs: a.iovs(&[BLOCK]),
                    durable: true,
                },
                1,
            ),
            (
                IoOp::Write {
                    offset: MIB,
                    bufs: b.iovs(&[]),
                    durable: false,
                },
                2,
            ),
            (IoOp::Flush, 3),
        ];
        let done = run(&mut engine, ops);
        assert!(done.values().all(|r| r.is_ok()), "{done:?}");
        // A flush alone, after the writes completed.
        assert!(run(&mut engine, vec![(IoOp::Flush, 4)])[&4].is_ok());
        assert!(file_bytes(&backing, 0, 2 * BLOCK) == a.bytes());
        assert!(file_bytes(&backing, MIB, BLOCK) == b.bytes());
    }

    #[test]
    fn discard_and_write_zeroes_complete_on_the_same_eventfd() {
        let (_dir, backing) = direct_backing(IMAGE);
        let mut engine = new_engine(&backing, 8);
        let len = 16 * BLOCK;
        let mut src = AlignedBuf::with(&pattern(3, len));
        let write = IoOp::Write {
            offset: 0,
            bufs: src.iovs(&[]),
            durable: false,
        };
        assert!(run(&mut engine, vec![(write, 0)])[&0].is_ok());

        // Helper and kernel operations in one batch, reaped only through the eventfd.
        let mut back = AlignedBuf::new(BLOCK);
        let ops = vec![
            (
                IoOp::WriteZeroes {
                    offset: 0,
                    len: 4 * BLOCK as u64,
                    unmap: false,
                    durable: true,
                },
                1,
            ),
            (
                IoOp::Discard {
                    offset: 8 * BLOCK as u64,
                    len: 4 * BLOCK as u64,
                },
                2,
            ),
            (
                IoOp::WriteZeroes {
                    offset: 12 * BLOCK as u64,
                    len: 2 * BLOCK as u64,
                    unmap: true,
                    durable: false,
                },
                3,
            ),
            (
                IoOp::Read {
                    offset: 5 * BLOCK as u64,
                    bufs: back.iovs(&[]),
                },
                4,
            ),
        ];
        let done = run(&mut engine, ops);
        assert!(done.values().all(|r| r.is_ok()), "{done:?}");
        assert!(back.bytes() == &src.bytes()[5 * BLOCK..6 * BLOCK]);

        let disk = file_bytes(&backing, 0, len);
        let zeroed = |k: usize| (0..4).contains(&k) || (8..14).contains(&k);
        for k in 0..16 {
            let block = &disk[k * BLOCK..(k + 1) * BLOCK];
            if zeroed(k) {
                assert!(block.iter().all(|&x| x == 0), "block {k} not zeroed");
            } else {
                assert!(
                    block == &src.bytes()[k * BLOCK..(k + 1) * BLOCK],
                    "block {k}"
                );
            }
        }
    }

    #[test]
    fn tokens_follow_their_operations() {
        let (_dir, backing) = direct_backing(IMAGE);
        let mut engine = new_engine(&backing, 64);
        // Sizes from 1 MiB down to 4 KiB, so small ones tend to finish first.
        let sizes: Vec<usize> = (0..24).map(|k| BLOCK << (8 - k % 9)).collect();
        let offsets: Vec<u64> = sizes
            .iter()
            .scan(0u64, |at, &n| {
                let o = *at;
                *at += n as u64;
                Some(o)
            })
            .collect();
        let mut srcs: Vec<AlignedBuf> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| AlignedBuf::with(&pattern(k as u64 + 100, n)))
            .collect();
        let writes = srcs
            .iter_mut()
            .zip(&offsets)
            .enumerate()
            .map(|(k, (buf, &offset))| {
                let op = IoOp::Write {
                    offset,
                    bufs: buf.iovs(&[]),
                    durable: false,
                };
                (op, k as u64)
            })
            .collect();
        assert!(run(&mut engine, writes).values().all(|r| r.is_ok()));

        let mut backs: Vec<AlignedBuf> = sizes.iter().map(|&n| AlignedBuf::new(n)).collect();
        for (k, (buf, &offset)) in backs.iter_mut().zip(&offsets).enumerate().rev() {
            let op = IoOp::Read {
                offset,
                bufs: buf.iovs(&[]),
            };
            engine.submit(op, k as u64).unwrap();
        }
        engine.submit(IoOp::Flush, 1000).unwrap();
        engine.commit().unwrap();
        let order: Vec<u64> = reap_all(&mut engine)
            .into_iter()
            .map(|c| {
                c.result.unwrap();
                c.token
            })
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        let mut expected: Vec<u64> = (0..24).collect();
        expected.push(1000);
        assert_eq!(sorted, expected);
        for (k, back) in backs.iter().enumerate() {
            assert!(
                back.bytes() == srcs[k].bytes(),
                "token {k} got another read's data"
            );
        }
    }

    #[test]
    fn a_full_engine_refuses_then_resumes() {
        let (_dir, backing) = direct_backing(IMAGE);
        let depth = 4;
        let mut engine = new_engine(&backing, depth);
        let total = 64u64;
        let mut bufs: Vec<AlignedBuf> = (0..total)
            .map(|k| AlignedBuf::with(&pattern(k, BLOCK)))
            .collect();
        let mut next = 0u64;
        let mut refused = 0;
        let mut done = Vec::new();
        while done.len() < total as usize {
            while next < total {
                let op = match next % 4 {
                    3 => IoOp::Discard {
                        offset: IMAGE - MIB,
                        len: BLOCK as u64,
                    },
                    _ => IoOp::Write {
                        offset: next * BLOCK as u64,
                        bufs: bufs[next as usize].iovs(&[]),
                        durable: next.is_multiple_of(2),
                    },
                };
                if engine.free_slots() == 0 {
                    let rejected = engine.submit(op, next).unwrap_err();
                    assert_eq!(rejected.token, next);
                    assert!(matches!(rejected.error, EngineError::Full));
                    refused += 1;
                    break;
                }
                engine.submit(op, next).unwrap();
                next += 1;
            }
            engine.commit().unwrap();
            assert!(wait_readable(engine.completion_fd(), 5000).unwrap());
            let before = done.len();
            engine.reap(&mut done);
            assert_eq!(engine.free_slots(), depth - engine.in_flight());
            assert!(done.len() >= before);
        }
        assert!(refused > 0, "the engine never filled up");
        let mut tokens: Vec<u64> = done
            .into_iter()
            .map(|c| {
                c.result.unwrap();
                c.token
            })
            .collect();
        tokens.sort();
        assert_eq!(tokens, (0..total).collect::<Vec<_>>());
        assert_eq!(engine.free_slots(), depth);
        for k in (0..total).filter(|k| k % 4 != 3) {
            let disk = file_bytes(&backing, k * BLOCK as u64, BLOCK);
            assert!(disk == bufs[k as usize].bytes(), "write {k}");
        }
    }

    fn fake_submit(script: Vec<io::Result<usize>>) -> impl FnMut(&[usize]) -> io::Result<usize> {
        let mut script = script.into_iter();
        move |_| script.next().expect("more io_submit calls than scripted")
    }

    fn errno(e: i32) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(e))
    }

    #[test]
    fn partial_submission_bookkeeping() {
        // 2 taken, then the third is invalid, then the rest are taken.
        let mut pending: VecDeque<usize> = (10..15).collect();
        let mut rejected = Vec::new();
        let script = vec![Ok(2), errno(libc::EINVAL), Ok(2)];
        let drained = drain_pending(&mut pending, fake_submit(script), &mut rejected);
        assert_eq!(drained, Drained::All);
        assert!(pending.is_empty());
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].0, 12);
        assert_eq!(rejected[0].1.raw_os_error(), Some(libc::EINVAL));

        // Out of resources after one: the rest stays queued, in order.
        let mut pending: VecDeque<usize> = (0..4).collect();
        let mut rejected = Vec::new();
        let script = vec![Ok(1), errno(libc::EAGAIN)];
        let drained = drain_pending(&mut pending, fake_submit(script), &mut rejected);
        assert_eq!(drained, Drained::Blocked);
        assert_eq!(pending, [1, 2, 3]);
        assert!(rejected.is_empty());

        // Nothing taken without an error: stop rather than spin.
        let drained = drain_pending(&mut pending, fake_submit(vec![Ok(0)]), &mut rejected);
        assert_eq!(drained, Drained::Blocked);
        assert_eq!(pending.len(), 3);

        // The first of every call invalid: each one fails alone.
        let script = vec![errno(libc::EBADF), errno(libc::EBADF), errno(libc::EBADF)];
        let drained = drain_pending(&mut pending, fake_submit(script), &mut rejected);
        assert_eq!(drained, Drained::All);
        let failed: Vec<usize> = rejected.iter().map(|r| r.0).collect();
        assert_eq!(failed, [1, 2, 3]);
    }

    #[test]
    fn an_invalid_iocb_fails_alone_in_the_kernel() {
        // Drives the bookkeeping against the real io_submit: an iocb with a bad file
        // descriptor first (the whole call fails) and in the middle (a partial submission).
        let (_dir, backing) = direct_backing(MIB);
        let ctx = AioContext::new(8).unwrap();
        let efd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
        let fd = backing.file().as_raw_fd();
        let mut table = IocbTable::new(8, efd.as_raw_fd());
        for i in 0..5 {
            let target = if i == 0 || i == 3 { -1 } else { fd };
            table.prepare_fdsync(i, target);
        }
        let mut pending: VecDeque<usize> = (0..5).collect();
        let mut rejected = Vec::new();
        let drained = drain_pending(&mut pending, |s| table.submit(&ctx, s), &mut rejected);
        assert_eq!(drained, Drained::All);
        let failed: Vec<(usize, Option<i32>)> = rejected
            .iter()
            .map(|(i, e)| (*i, e.raw_os_error()))
            .collect();
        assert_eq!(failed, [(0, Some(libc::EBADF)), (3, Some(libc::EBADF))]);
        assert_eq!(table.in_kernel(), 3);
        let mut events = [IoEvent::default(); 8];
        let mut finished = Vec::new();
        while table.in_kernel() > 0 {
            let n = ctx
                .wait_events(1, &mut events, Duration::from_secs(5))
                .unwrap();
            assert!(n > 0, "no event within 5 s");
            for ev in &events[..n] {
                ev.result().unwrap();
                finished.push(table.complete(ev).unwrap());
            }
        }
        finished.sort();
        assert_eq!(finished, [1, 2, 4]);
        assert!(efd.read().unwrap() >= 1, "the eventfd was not signalled");
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let (_dir, backing) = direct_backing(MIB);
        let mut engine = new_engine(&backing, 4);
        let mut straddling = AlignedBuf::new(2 * BLOCK);
        let mut beyond = AlignedBuf::new(BLOCK);
        let ops = vec![
            (
                IoOp::Read {
                    offset: MIB - BLOCK as u64,
                    bufs: straddling.iovs(&[]),
                },
                1,
            ),
            (
                IoOp::Read {
                    offset: MIB,
                    bufs: beyond.iovs(&[]),
                },
                2,
            ),
        ];
        let done = run(&mut engine, ops);
        for token in [1, 2] {
            let err = done[&token].as_ref().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "token {token}");
        }
    }

    #[test]
    fn empty_and_out_of_range_operations_complete_at_once() {
        let (_dir, backing) = direct_backing(MIB);
        let mut engine = new_engine(&backing, 4);
        let mut buf = AlignedBuf::new(BLOCK);
        let ops = vec![
            (
                IoOp::Read {
                    offset: 0,
                    bufs: Vec::new(),
                },
                1,
            ),
            (
                IoOp::Write {
                    offset: u64::MAX - 100,
                    bufs: buf.iovs(&[]),
                    durable: false,
                },
                2,
            ),
        ];
        let done = run(&mut engine, ops);
        assert!(done[&1].is_ok());
        let err = done[&2].as_ref().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn refuses_a_backing_without_o_direct() {
        let dir = tempfile::tempdir().unwrap();
        let params_open = OpenParams {
            create_size: Some(MIB),
            ..Default::default()
        };
        let backing = Arc::new(Backing::open(&dir.path().join("d.img"), &params_open).unwrap());
        let Err(err) = engine::create::<u64>(EngineKind::LinuxAio, backing, params(8)) else {
            panic!("the linux-aio engine accepted a buffered backing");
        };
        match err {
            EngineError::Unavailable(EngineKind::LinuxAio, why) => {
                assert_eq!(why, "needs O_DIRECT: without it io_submit blocks");
            }
            other => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn create_builds_it_and_the_probe_passes() {
        probe_linux_aio().unwrap();
        let (_dir, backing) = direct_backing(MIB);
        let engine = engine::create::<u64>(EngineKind::LinuxAio, backing, params(16)).unwrap();
        assert_eq!(engine.name(), "linux-aio");
        assert_eq!(engine.free_slots(), 16);
        assert_eq!(engine.in_flight(), 0);
    }

    #[test]
    fn drop_waits_for_operations_in_flight() {
        let (_dir, backing) = direct_backing(IMAGE);
        let n = 6;
        let len = MIB as usize;
        let mut srcs: Vec<AlignedBuf> = (0..n)
            .map(|k| AlignedBuf::with(&pattern(k + 50, len)))
            .collect();
        let mut backs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::new(len)).collect();
        // Known data under the reads.
        let head = pattern(77, len);
        std::fs::OpenOptions::new()
            .write(true)
            .open(backing.path())
            .unwrap()
            .write_all_at(&head, 7 * MIB)
            .unwrap();
        let mut engine = new_engine(&backing, 16);
        for (k, src) in srcs.iter_mut().enumerate() {
            let op = IoOp::Write {
                offset: k as u64 * MIB,
                bufs: src.iovs(&[BLOCK; 8]),
                durable: k.is_multiple_of(2),
            };
            engine.submit(op, k as u64).unwrap();
        }
        for (k, back) in backs.iter_mut().enumerate() {
            let op = IoOp::Read {
                offset: 7 * MIB,
                bufs: back.iovs(&[]),
            };
            engine.submit(op, 100 + k as u64).unwrap();
        }
        engine.submit(IoOp::Flush, 200).unwrap();
        engine.commit().unwrap();
        assert!(engine.in_flight() > 0);
        drop(engine);
        // Everything finished before drop returned: the reads filled their buffers and the
        // writes are on disk.
        for back in &backs {
            assert!(back.bytes() == head);
        }
        for (k, src) in srcs.iter().enumerate() {
            assert!(file_bytes(&backing, k as u64 * MIB, len) == src.bytes());
        }
    }
}
