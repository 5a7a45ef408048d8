//! The thread-pool engine: positional preadv/pwritev, fdatasync and fallocate on worker
//! threads, through the page cache. Portable, and the right choice for sparse images and file
//! systems without O_DIRECT.
//!
//! Each queue thread has its own small pool, so queues never contend with one another. Pool
//! threads are started on demand, up to a limit, and live as long as the engine.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::{Completion, EngineError, IoEngine, IoOp, Rejected};
use crate::backing::Backing;

/// Runs one operation synchronously on the calling thread.
pub fn execute_sync(backing: &Backing, op: &mut IoOp) -> io::Result<()> {
    match op {
        IoOp::Read { offset, bufs } => backing.read_vectored_at(bufs, *offset),
        IoOp::Write {
            offset,
            bufs,
            durable,
        } => backing.write_vectored_at(bufs, *offset, *durable),
        IoOp::Flush => backing.flush(),
        IoOp::Discard { offset, len } => backing.discard(*offset, *len),
        IoOp::WriteZeroes {
            offset,
            len,
            unmap,
            durable,
        } => {
            backing.write_zeroes(*offset, *len, *unmap)?;
            if *durable { backing.flush() } else { Ok(()) }
        }
    }
}

struct Job<T> {
    op: IoOp,
    token: T,
}

struct PoolState<T> {
    jobs: VecDeque<Job<T>>,
    /// Pool threads waiting for work.
    idle: usize,
    shutdown: bool,
}

struct PoolShared<T> {
    backing: Arc<Backing>,
    state: Mutex<PoolState<T>>,
    work_ready: Condvar,
    done: Mutex<Vec<Completion<T>>>,
    /// Written when `done` goes from empty to non-empty.
    notifier: EventFd,
}

fn lock<U>(m: &Mutex<U>) -> MutexGuard<'_, U> {
    // A pool thread cannot panic while holding these locks (no user code runs under them),
    // so a poisoned lock still guards consistent data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A per-queue thread pool.
pub struct ThreadPoolEngine<T: Send + 'static> {
    shared: Arc<PoolShared<T>>,
    threads: Vec<JoinHandle<()>>,
    max_threads: usize,
    capacity: usize,
    in_flight: usize,
}

impl<T: Send + 'static> ThreadPoolEngine<T> {
    /// A pool of at most `max_threads` threads accepting up to `capacity` operations at once.
    pub fn new(backing: Arc<Backing>, max_threads: usize, capacity: usize) -> io::Result<Self> {
        let notifier = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        Ok(Self::with_notifier(
            backing,
            max_threads,
            capacity,
            notifier,
        ))
    }

    /// Like [`ThreadPoolEngine::new`], but signals completions on `notifier`, an eventfd
    /// shared with another engine (for example a duplicate of that engine's completion fd).
    ///
    /// [`reap`](IoEngine::reap) resets `notifier` before it takes the finished operations, so
    /// an engine sharing it must call `reap` first and collect its own completions afterwards:
    /// whatever finishes after the reset keeps the eventfd readable. `notifier` should be
    /// non-blocking.
    pub fn with_notifier(
        backing: Arc<Backing>,
        max_threads: usize,
        capacity: usize,
        notifier: EventFd,
    ) -> Self {
        ThreadPoolEngine {
            shared: Arc::new(PoolShared {
                backing,
                state: Mutex::new(PoolState {
                    jobs: VecDeque::new(),
                    idle: 0,
                    shutdown: false,
                }),
                work_ready: Condvar::new(),
                done: Mutex::new(Vec::new()),
                notifier,
            }),
            threads: Vec::new(),
            max_threads: max_threads.max(1),
            capacity,
            in_flight: 0,
        }
    }

    fn spawn_thread(&mut self) -> io::Result<()> {
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("vublk-io".into())
            .spawn(move || pool_thread(&shared))?;
        self.threads.push(handle);
        Ok(())
    }
}

fn pool_thread<T>(shared: &PoolShared<T>) {
    loop {
        let mut job = {
            let mut state = lock(&shared.state);
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    break job;
                }
                if state.shutdown {
                    return;
                }
                state.idle += 1;
                state = shared
                    .work_ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.idle -= 1;
            }
        };
        let result = execute_sync(&shared.backing, &mut job.op);
        // The buffers are no longer used once the operation returns; drop them before the
        // token, which may be what keeps their memory mapped.
        drop(job.op);
        let was_empty = {
            let mut done = lock(&shared.done);
            done.push(Completion {
                token: job.token,
                result,
            });
            done.len() == 1
        };
        if was_empty {
            // Cannot fail short of the counter overflowing, which a reader resets.
            let _ = shared.notifier.write(1);
        }
    }
}

impl<T: Send + 'static> IoEngine<T> for ThreadPoolEngine<T> {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn free_slots(&self) -> usize {
        self.capacity.saturating_sub(self.in_flight)
    }

    fn submit(&mut self, op: IoOp, token: T) -> Result<(), Rejected<T>> {
        if self.in_flight >= self.capacity {
            return Err(Rejected {
                token,
                error: EngineError::Full,
            });
        }
        let need_thread = {
            let mut state = lock(&self.shared.state);
            state.jobs.push_back(Job { op, token });
            state.idle < state.jobs.len() && self.threads.len() < self.max_threads
        };
        if need_thread && let Err(e) = self.spawn_thread() {
            if self.threads.is_empty() {
                // Nobody would ever run the job: take it back.
                let job = lock(&self.shared.state).jobs.pop_back();
                if let Some(job) = job {
                    return Err(Rejected {
                        token: job.token,
                        error: EngineError::Io(e),
                    });
                }
            }
            log::warn!(
                "cannot start another I/O thread, continuing with {}: {e}",
                self.threads.len()
            );
        }
        self.shared.work_ready.notify_one();
        self.in_flight += 1;
        Ok(())
    }

    fn completion_fd(&self) -> RawFd {
        self.shared.notifier.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion<T>>) {
        // Reset the eventfd before taking the list: a completion pushed after this point
        // finds the list empty again and signals anew.
        let _ = self.shared.notifier.read();
        let before = out.len();
        out.append(&mut lock(&self.shared.done));
        self.in_flight -= out.len() - before;
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl<T: Send + 'static> Drop for ThreadPoolEngine<T> {
    fn drop(&mut self) {
        // Queued operations still run: their buffers and tokens are released only afterwards.
        lock(&self.shared.state).shutdown = true;
        self.shared.work_ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::OpenParams;
    use crate::engine::{IoVec, reap_all, wait_readable};

    fn backing(dir: &tempfile::TempDir) -> Arc<Backing> {
        let params = OpenParams {
            create_size: Some(1 << 20),
            ..Default::default()
        };
        Arc::new(Backing::open(&dir.path().join("d.img"), &params).unwrap())
    }

    #[test]
    fn completes_every_operation_with_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = ThreadPoolEngine::new(backing(&dir), 4, 64).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..32u8).map(|i| vec![i; 4096]).collect();
        for (i, buf) in bufs.iter_mut().enumerate() {
            // SAFETY: `bufs` outlives the engine's use of it (we reap everything below).
            let iov = unsafe { IoVec::new(buf.as_mut_ptr(), buf.len()) };
            let op = IoOp::Write {
                offset: i as u64 * 4096,
                bufs: vec![iov],
                durable: i % 2 == 0,
            };
            engine.submit(op, i).unwrap();
        }
        let mut tokens: Vec<usize> = reap_all(&mut engine)
            .into_iter()
            .map(|c| {
                c.result.unwrap();
                c.token
            })
            .collect();
        tokens.sort();
        assert_eq!(tokens, (0..32).collect::<Vec<_>>());

        let mut back = vec![0u8; 4096];
        // SAFETY: `back` outlives the operation.
        let iov = unsafe { IoVec::new(back.as_mut_ptr(), back.len()) };
        engine
            .submit(
                IoOp::Read {
                    offset: 7 * 4096,
                    bufs: vec![iov],
                },
                99,
            )
            .unwrap();
        engine.submit(IoOp::Flush, 100).unwrap();
        let done = reap_all(&mut engine);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert!(back.iter().all(|&b| b == 7));
    }

    #[test]
    fn full_engine_hands_the_token_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = ThreadPoolEngine::new(backing(&dir), 1, 2).unwrap();
        engine.submit(IoOp::Flush, 1).unwrap();
        engine.submit(IoOp::Flush, 2).unwrap();
        assert_eq!(engine.free_slots(), 0);
        let rejected = engine.submit(IoOp::Flush, 3).unwrap_err();
        assert_eq!(rejected.token, 3);
        assert!(matches!(rejected.error, EngineError::Full));
        assert_eq!(reap_all(&mut engine).len(), 2);
        assert_eq!(engine.free_slots(), 2);
    }

    #[test]
    fn signals_a_shared_notifier() {
        let dir = tempfile::tempdir().unwrap();
        let shared = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
        let mut engine =
            ThreadPoolEngine::with_notifier(backing(&dir), 1, 4, shared.try_clone().unwrap());
        engine.submit(IoOp::Flush, 1).unwrap();
        assert!(wait_readable(shared.as_raw_fd(), 5000).unwrap());
        assert_eq!(reap_all(&mut engine)[0].token, 1);
    }

    #[test]
    fn errors_come_back_with_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = ThreadPoolEngine::new(backing(&dir), 2, 8).unwrap();
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` outlives the operation.
        let iov = unsafe { IoVec::new(buf.as_mut_ptr(), buf.len()) };
        // Past the end of the image: the read comes up short, which must be an error.
        engine
            .submit(
                IoOp::Read {
                    offset: (1 << 20) - 512,
                    bufs: vec![iov],
                },
                7,
            )
            .unwrap();
        let done = reap_all(&mut engine);
        assert_eq!(done[0].token, 7);
        assert!(done[0].result.is_err());
    }
}
