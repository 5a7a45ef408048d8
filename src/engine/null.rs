//! The null engine: completes every operation at once without touching storage. Reads return
//! zeros, writes vanish. It measures the transport (vhost-user, virtqueues, the queue
//! thread) without any storage cost, like qemu-storage-daemon's `null-co` driver.

use std::os::unix::io::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use super::{Completion, EngineError, EngineKind, EngineParams, IoEngine, IoOp, Rejected};
use crate::backing::{Backing, BackingKind};

/// Completes operations without I/O.
pub struct NullEngine<T> {
    done: Vec<Completion<T>>,
    capacity: usize,
    notifier: EventFd,
}

impl<T> NullEngine<T> {
    /// A null engine; only a null backing may be served by it.
    pub fn new(backing: &Backing, params: EngineParams) -> Result<Self, EngineError> {
        if backing.kind() != BackingKind::Null {
            return Err(EngineError::Unavailable(
                EngineKind::Null,
                "the null engine only serves a null backing".into(),
            ));
        }
        Ok(NullEngine {
            done: Vec::with_capacity(params.queue_depth),
            capacity: params.queue_depth,
            notifier: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }
}

impl<T: Send + 'static> IoEngine<T> for NullEngine<T> {
    fn name(&self) -> &'static str {
        "null"
    }

    fn free_slots(&self) -> usize {
        self.capacity.saturating_sub(self.done.len())
    }

    fn submit(&mut self, op: IoOp, token: T) -> Result<(), Rejected<T>> {
        if self.done.len() >= self.capacity {
            return Err(Rejected {
                token,
                error: EngineError::Full,
            });
        }
        if let IoOp::Read { bufs, .. } = &op {
            for b in bufs {
                // SAFETY: by the IoVec contract the buffer is valid and writable until this
                // operation completes, which is later than this write.
                unsafe { std::ptr::write_bytes(b.0.iov_base.cast::<u8>(), 0, b.len()) };
            }
        }
        self.done.push(Completion {
            token,
            result: Ok(()),
        });
        Ok(())
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        // One wakeup per batch, like a real engine's completion path.
        if !self.done.is_empty() {
            self.notifier.write(1).map_err(EngineError::Io)?;
        }
        Ok(())
    }

    fn completion_fd(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion<T>>) {
        let _ = self.notifier.read();
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

impl<T> std::fmt::Debug for NullEngine<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NullEngine")
            .field("in_flight", &self.done.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{IoVec, create};
    use std::sync::Arc;

    #[test]
    fn reads_zeros_and_completes_everything() {
        let backing = Arc::new(Backing::null(1 << 30).unwrap());
        let params = EngineParams {
            queue_depth: 4,
            io_threads: 1,
            huge_bounce: None,
        };
        let mut engine = create::<u32>(EngineKind::Null, backing.clone(), params.clone()).unwrap();
        let mut buf = vec![0xffu8; 4096];
        // SAFETY: `buf` outlives the operation, which completes within this test.
        let iov = unsafe { IoVec::new(buf.as_mut_ptr(), buf.len()) };
        engine
            .submit(
                IoOp::Read {
                    offset: 0,
                    bufs: vec![iov],
                },
                1,
            )
            .unwrap();
        engine.submit(IoOp::Flush, 2).unwrap();
        engine.commit().unwrap();
        assert!(crate::engine::wait_readable(engine.completion_fd(), 1000).unwrap());
        let mut out = Vec::new();
        engine.reap(&mut out);
        assert_eq!(out.iter().map(|c| c.token).collect::<Vec<_>>(), vec![1, 2]);
        assert!(buf.iter().all(|&b| b == 0));
        assert!(matches!(
            create::<u32>(EngineKind::IoUring, backing, params),
            Err(EngineError::Unavailable(..))
        ));
    }
}
