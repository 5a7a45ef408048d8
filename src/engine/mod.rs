//! I/O engines: how an export's operations reach the kernel.
//!
//! Engines know nothing of virtio. Each queue thread owns one engine. It submits [`IoOp`]s
//! together with a token of its choosing; the engine owns the token while the operation is in
//! flight and hands it back in a [`Completion`], whether the operation succeeded or failed.
//! Every engine signals finished work on one eventfd per queue thread, so a queue thread has a
//! single completion path whatever the engine.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::backing::{Backing, BackingKind};

pub mod aio;
pub mod aio_abi;
pub mod bounce;
#[cfg(test)]
mod conformance;
pub mod huge_arena;
pub mod null;
pub mod threads;
pub mod uring;

pub use aio::{LinuxAioEngine, probe_linux_aio};
pub use bounce::BounceAdapter;
pub use null::NullEngine;
pub use threads::ThreadPoolEngine;
pub use uring::{UringEngine, probe_io_uring};

/// The engines vublk has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// A per-queue thread pool doing preadv/pwritev (page cache or O_DIRECT).
    Threads,
    /// One io_uring per queue thread.
    IoUring,
    /// Linux native AIO (io_submit), O_DIRECT only.
    LinuxAio,
    /// No I/O at all, for a null backing: reads return zeros, writes are dropped.
    Null,
}

impl EngineKind {
    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Threads => "threads",
            EngineKind::IoUring => "io-uring",
            EngineKind::LinuxAio => "linux-aio",
            EngineKind::Null => "null",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Sizing of one queue thread's engine.
#[derive(Debug, Clone, Default)]
pub struct EngineParams {
    /// Most operations in flight (the virtqueue size: a ring never holds more requests).
    pub queue_depth: usize,
    /// Most pool threads (thread-pool engine, and helper paths of the others).
    pub io_threads: usize,
    /// On an O_DIRECT backing, copy large transfers through huge pages unless these buffers
    /// are in huge pages already (see [`huge_arena`]). None: never.
    pub huge_bounce: Option<Arc<BufferPages>>,
}

/// Which of a submitter's buffers lie in huge pages: address ranges set by whoever knows how
/// that memory is backed (for vublk, the vhost-user glue, from the guest's memory regions) and
/// read by the queue threads' engines. It changes only when the memory map does.
#[derive(Debug, Default)]
pub struct BufferPages {
    /// Whether `huge` holds anything: the common answer without taking the lock.
    any_huge: AtomicBool,
    huge: RwLock<Vec<std::ops::Range<usize>>>,
}

impl BufferPages {
    /// Records the address ranges that are in huge pages (all others are not).
    pub fn set_huge_ranges(&self, ranges: Vec<std::ops::Range<usize>>) {
        let any = !ranges.is_empty();
        *self.huge.write().unwrap_or_else(PoisonError::into_inner) = ranges;
        self.any_huge.store(any, Ordering::Release);
    }

    /// Whether no range is in huge pages.
    pub fn huge_ranges_empty(&self) -> bool {
        !self.any_huge.load(Ordering::Acquire)
    }

    /// Whether every one of `bufs` lies in huge pages.
    pub fn all_huge(&self, bufs: &[IoVec]) -> bool {
        if !self.any_huge.load(Ordering::Acquire) {
            return false;
        }
        let ranges = self.huge.read().unwrap_or_else(PoisonError::into_inner);
        bufs.iter().all(|b| {
            let start = b.0.iov_base as usize;
            ranges
                .iter()
                .any(|r| r.start <= start && start.saturating_add(b.len()) <= r.end)
        })
    }
}

/// Creates the engine of `kind` for one queue thread. On an O_DIRECT backing the engine sits
/// behind a [`BounceAdapter`], so misaligned guest buffers still work (and large transfers go
/// through huge pages where `params.huge_bounce` asks for it).
pub fn create<T: Send + 'static>(
    kind: EngineKind,
    backing: Arc<Backing>,
    params: EngineParams,
) -> Result<Box<dyn IoEngine<T>>, EngineError> {
    if backing.direct() {
        let align = backing.dio_align();
        let huge_pages = params.huge_bounce.clone();
        let inner = create_unaligned::<bounce::Bounced<T>>(kind, backing, params)?;
        Ok(Box::new(BounceAdapter::new(inner, align, huge_pages)))
    } else {
        create_unaligned(kind, backing, params)
    }
}

fn create_unaligned<T: Send + 'static>(
    kind: EngineKind,
    backing: Arc<Backing>,
    params: EngineParams,
) -> Result<Box<dyn IoEngine<T>>, EngineError> {
    if backing.kind() == BackingKind::Null && kind != EngineKind::Null {
        return Err(EngineError::Unavailable(
            kind,
            "a null backing has no storage".into(),
        ));
    }
    match kind {
        EngineKind::Threads => Ok(Box::new(ThreadPoolEngine::new(
            backing,
            params.io_threads,
            params.queue_depth,
        )?)),
        EngineKind::LinuxAio => Ok(Box::new(LinuxAioEngine::new(backing, params)?)),
        EngineKind::IoUring => Ok(Box::new(UringEngine::new(backing, params)?)),
        EngineKind::Null => Ok(Box::new(NullEngine::new(&backing, params)?)),
    }
}

/// One scatter-gather element: a pointer and a length, as the kernel's `struct iovec`.
#[repr(transparent)]
#[derive(Debug)]
pub struct IoVec(libc::iovec);

// SAFETY: an IoVec is a plain address range; whoever builds one promises (see `IoVec::new`)
// that the memory stays valid until the operation using it has completed, whatever thread
// performs it.
unsafe impl Send for IoVec {}

impl IoVec {
    /// Describes `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The range must stay mapped, and must not be used in ways that conflict with the
    /// operation's reads or writes, until every operation that carries this IoVec has
    /// completed (its token has been handed back).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoVec(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.iov_len
    }

    /// Start of the range.
    pub fn as_ptr(&self) -> *mut u8 {
        self.0.iov_base.cast()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }

    /// Drops the first `n` bytes of `iovs`, returning what is left.
    pub fn advance(iovs: &mut [IoVec], mut n: usize) -> &mut [IoVec] {
        let mut skip = 0;
        while skip < iovs.len() && n >= iovs[skip].len() {
            n -= iovs[skip].len();
            skip += 1;
        }
        let rest = &mut iovs[skip..];
        if let Some(first) = rest.first_mut() {
            // Stays inside the element: n < first.len() here.
            first.0.iov_base = first.0.iov_base.wrapping_byte_add(n);
            first.0.iov_len -= n;
        }
        rest
    }
}

/// An operation on the export, in bytes.
#[derive(Debug)]
pub enum IoOp {
    /// Fill `bufs` from `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination buffers.
        bufs: Vec<IoVec>,
    },
    /// Write `bufs` at `offset`; `durable` asks for the data to be on stable storage at
    /// completion (write-through).
    Write {
        /// Byte offset.
        offset: u64,
        /// Source buffers.
        bufs: Vec<IoVec>,
        /// Complete only once stable.
        durable: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocation hint for a range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make a range read as zeros, deallocating it if `unmap` allows.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The storage may deallocate the range.
        unmap: bool,
        /// Complete only once stable.
        durable: bool,
    },
}

/// A finished operation: the submitter's token and the outcome.
#[derive(Debug)]
pub struct Completion<T> {
    /// What the submitter handed in with the operation.
    pub token: T,
    /// The outcome; transfers are complete on `Ok` (never short).
    pub result: io::Result<()>,
}

/// Errors of the engine layer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine has no free slot; the caller must wait for a completion. Not an I/O error.
    #[error("the engine is full")]
    Full,
    /// The engine could not be set up or failed as a whole.
    #[error("I/O engine failure: {0}")]
    Io(#[from] io::Error),
    /// The engine cannot run here (kernel, configuration or backing), and why.
    #[error("the {0} engine is unavailable: {1}")]
    Unavailable(EngineKind, String),
}

/// A refused submission: the token goes back to the caller with the reason.
#[derive(Debug)]
pub struct Rejected<T> {
    /// The token that was submitted.
    pub token: T,
    /// Why it was refused.
    pub error: EngineError,
}

/// The interface every engine offers its queue thread.
///
/// Dropping an engine first finishes every operation submitted to it, committed or not, and
/// only then drops their tokens; the conformance suite holds every engine to this.
pub trait IoEngine<T>: Send {
    /// A short name for logs ("threads", "io-uring", ...).
    fn name(&self) -> &'static str;

    /// How many more operations can be submitted before the engine is full.
    fn free_slots(&self) -> usize;

    /// Starts an operation. On refusal the token comes back.
    fn submit(&mut self, op: IoOp, token: T) -> Result<(), Rejected<T>>;

    /// Pushes submissions made since the last call to the kernel (engines that batch).
    fn commit(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// The eventfd that becomes readable when completions are waiting.
    fn completion_fd(&self) -> RawFd;

    /// Moves every finished operation into `out`.
    fn reap(&mut self, out: &mut Vec<Completion<T>>);

    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
}

/// Blocks until `fd` is readable or `timeout_ms` passes.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    match ret {
        r if r < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Reaps until nothing is in flight, waiting (at most 5 s per round) on the completion eventfd.
#[cfg(test)]
pub(crate) fn reap_all<T>(engine: &mut (impl IoEngine<T> + ?Sized)) -> Vec<Completion<T>> {
    let mut out = Vec::new();
    while engine.in_flight() > 0 {
        assert!(
            wait_readable(engine.completion_fd(), 5000).unwrap(),
            "no completion within 5 s"
        );
        engine.reap(&mut out);
    }
    out
}

/// A temporary directory on a file system with O_DIRECT (a tmpfs /tmp has none).
#[cfg(test)]
pub(crate) fn direct_io_tempdir() -> tempfile::TempDir {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_whole_and_partial_elements() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        // SAFETY: the arrays outlive the iovecs.
        let mut iovs = unsafe { [IoVec::new(a.as_mut_ptr(), 8), IoVec::new(b.as_mut_ptr(), 8)] };
        let rest = IoVec::advance(&mut iovs, 11);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].len(), 5);
        assert_eq!(rest[0].0.iov_base as usize, b.as_ptr() as usize + 3);
        assert!(IoVec::advance(rest, 5).is_empty());
    }
}
