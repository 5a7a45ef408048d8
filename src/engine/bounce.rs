//! O_DIRECT needs aligned buffers. Guest buffers almost always are (page-cache pages, aligned
//! user buffers), and those go straight to the kernel; the rare misaligned request is copied
//! through an aligned bounce buffer. This adapter sits in front of any engine, so the engines
//! themselves never deal with alignment.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::os::unix::io::RawFd;
use std::ptr::NonNull;

use super::{Completion, EngineError, IoEngine, IoOp, IoVec, Rejected};
use crate::backing::DioAlign;

/// An aligned heap buffer.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is exclusively owned; nothing about it is tied to a thread.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    fn iovec(&self, len: usize) -> IoVec {
        // SAFETY: the buffer holds at least `len` bytes and lives in the in-flight token of
        // the operation that uses this iovec, so it outlives the I/O.
        unsafe { IoVec::new(self.ptr.as_ptr(), len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The inner engine's token: the caller's token, plus the bounce state of a misaligned read
/// or write.
pub struct Bounced<T> {
    token: T,
    bounce: Option<Bounce>,
}

struct Bounce {
    buf: AlignedBuf,
    /// For reads: where the data goes once it has arrived.
    copy_back: Option<Vec<IoVec>>,
}

/// Bounces misaligned transfers of an O_DIRECT engine.
pub struct BounceAdapter<T> {
    inner: Box<dyn IoEngine<Bounced<T>>>,
    align: DioAlign,
    reaped: Vec<Completion<Bounced<T>>>,
}

impl<T: Send + 'static> BounceAdapter<T> {
    /// Wraps `inner`, whose backing needs `align`.
    pub fn new(inner: Box<dyn IoEngine<Bounced<T>>>, align: DioAlign) -> Self {
        BounceAdapter {
            inner,
            align,
            reaped: Vec::new(),
        }
    }

    fn aligned(&self, bufs: &[IoVec]) -> bool {
        let mem = self.align.mem.max(1) as usize;
        let len = self.align.offset.max(1) as usize;
        bufs.iter()
            .all(|b| (b.0.iov_base as usize).is_multiple_of(mem) && b.len().is_multiple_of(len))
    }

    fn bounce_buffer(&self, total: usize) -> Result<AlignedBuf, EngineError> {
        let align = (self.align.mem as usize).max(4096).next_power_of_two();
        AlignedBuf::new(total, align)
            .ok_or_else(|| EngineError::Io(std::io::Error::from_raw_os_error(libc::ENOMEM)))
    }
}

/// Copies between a contiguous buffer and scattered iovecs.
///
/// # Safety
/// Every iovec must describe valid memory (the `IoVec::new` contract) and `flat` must hold at
/// least the iovecs' total length; the ranges must not overlap `flat`.
unsafe fn copy_scattered(flat: *mut u8, iovs: &[IoVec], to_iovs: bool) {
    let mut at = 0;
    for v in iovs {
        let base = v.0.iov_base.cast::<u8>();
        // SAFETY: guaranteed by the caller: both ranges are valid for `v.len()` bytes and
        // disjoint.
        unsafe {
            if to_iovs {
                std::ptr::copy_nonoverlapping(flat.add(at), base, v.len());
            } else {
                std::ptr::copy_nonoverlapping(base, flat.add(at), v.len());
            }
        }
        at += v.len();
    }
}

impl<T: Send + 'static> IoEngine<T> for BounceAdapter<T> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn free_slots(&self) -> usize {
        self.inner.free_slots()
    }

    fn submit(&mut self, op: IoOp, token: T) -> Result<(), Rejected<T>> {
        let (op, bounce) = match op {
            IoOp::Read { offset, bufs } if !self.aligned(&bufs) => {
                let total = bufs.iter().map(IoVec::len).sum();
                let buf = match self.bounce_buffer(total) {
                    Ok(b) => b,
                    Err(error) => return Err(Rejected { token, error }),
                };
                let op = IoOp::Read {
                    offset,
                    bufs: vec![buf.iovec(total)],
                };
                (
                    op,
                    Some(Bounce {
                        buf,
                        copy_back: Some(bufs),
                    }),
                )
            }
            IoOp::Write {
                offset,
                bufs,
                durable,
            } if !self.aligned(&bufs) => {
                let total = bufs.iter().map(IoVec::len).sum();
                let buf = match self.bounce_buffer(total) {
                    Ok(b) => b,
                    Err(error) => return Err(Rejected { token, error }),
                };
                // SAFETY: `bufs` follow the IoVec contract and `buf` was just allocated with
                // `total` bytes, disjoint from them.
                unsafe { copy_scattered(buf.ptr.as_ptr(), &bufs, false) };
                let op = IoOp::Write {
                    offset,
                    bufs: vec![buf.iovec(total)],
                    durable,
                };
                (
                    op,
                    Some(Bounce {
                        buf,
                        copy_back: None,
                    }),
                )
            }
            op => (op, None),
        };
        self.inner
            .submit(op, Bounced { token, bounce })
            .map_err(|r| Rejected {
                token: r.token.token,
                error: r.error,
            })
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        self.inner.commit()
    }

    fn completion_fd(&self) -> RawFd {
        self.inner.completion_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion<T>>) {
        self.inner.reap(&mut self.reaped);
        for c in self.reaped.drain(..) {
            if let (
                Ok(()),
                Some(Bounce {
                    buf,
                    copy_back: Some(dest),
                }),
            ) = (&c.result, &c.token.bounce)
            {
                // SAFETY: `dest` are the caller's buffers (IoVec contract: still valid, the
                // caller's token is only now handed back) and `buf` holds their total length.
                unsafe { copy_scattered(buf.ptr.as_ptr(), dest, true) };
            }
            out.push(Completion {
                token: c.token.token,
                result: c.result,
            });
        }
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::{Backing, OpenParams};
    use crate::engine::{ThreadPoolEngine, wait_readable};
    use std::sync::Arc;

    fn direct_backing(dir: &tempfile::TempDir) -> Arc<Backing> {
        let path = dir.path().join("d.img");
        Backing::open(
            &path,
            &OpenParams {
                create_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let params = OpenParams {
            direct: true,
            ..Default::default()
        };
        Arc::new(
            Backing::open(&path, &params).expect("O_DIRECT open (the test dir must not be tmpfs)"),
        )
    }

    fn run(engine: &mut dyn IoEngine<u32>, op: IoOp) {
        engine.submit(op, 1).unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            assert!(wait_readable(engine.completion_fd(), 5000).unwrap());
            engine.reap(&mut out);
        }
        out.pop().unwrap().result.unwrap();
    }

    #[test]
    fn misaligned_buffers_are_bounced_aligned_ones_are_not() {
        let dir = crate::engine::direct_io_tempdir();
        let backing = direct_backing(&dir);
        let align = backing.dio_align();
        let inner: Box<dyn IoEngine<Bounced<u32>>> =
            Box::new(ThreadPoolEngine::new(backing.clone(), 2, 8).unwrap());
        let mut engine = BounceAdapter::new(inner, align);

        // A 4 KiB write from a buffer that starts 1 byte into an allocation, split in two
        // iovecs of odd lengths: misaligned in every way O_DIRECT cares about.
        let mut src = vec![0u8; 4097];
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let p = src.as_mut_ptr();
        // SAFETY: both ranges lie inside `src`, which outlives the operation.
        let bufs = unsafe { vec![IoVec::new(p.add(1), 1000), IoVec::new(p.add(1001), 3096)] };
        assert!(!engine.aligned(&bufs));
        run(
            &mut engine,
            IoOp::Write {
                offset: 8192,
                bufs,
                durable: false,
            },
        );

        let mut dst = vec![0u8; 4097];
        let q = dst.as_mut_ptr();
        // SAFETY: as above.
        let bufs = unsafe { vec![IoVec::new(q.add(1), 3000), IoVec::new(q.add(3001), 1096)] };
        run(&mut engine, IoOp::Read { offset: 8192, bufs });
        assert_eq!(&dst[1..], &src[1..]);

        let aligned = AlignedBuf::new(4096, 4096).unwrap();
        assert!(engine.aligned(&[aligned.iovec(4096)]));
    }
}
