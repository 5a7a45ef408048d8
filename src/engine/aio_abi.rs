//! The Linux native AIO ABI (`linux/aio_abi.h`), written by hand on `libc::syscall`: no
//! maintained crate offers it, and libc lacks `io_event`, the command numbers and
//! `IOCB_FLAG_RESFD`.
//!
//! Every `unsafe` block of the linux-aio engine is in this module. [`AioContext::submit`] is
//! the raw, unsafe `io_submit`; [`IocbTable`] is the safe way to use it. The table owns the
//! iocbs and the iovec arrays they point to, at addresses that never move, and neither
//! rewrites an iocb nor gives an iovec array back while the kernel holds its operation. The
//! data buffers themselves are covered by the contract of [`IoVec::new`]: they stay valid until
//! the operation's token has been handed back, which the engine does only after the kernel
//! reported the operation finished.
//!
//! 64-bit Linux only: on 32-bit targets `io_getevents` takes the old 32-bit `timespec`.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::unix::io::RawFd;
use std::time::Duration;

use super::IoVec;

/// `pread`: `aio_buf` is the buffer, `aio_nbytes` its length.
pub const IOCB_CMD_PREAD: u16 = 0;
/// `pwrite`.
pub const IOCB_CMD_PWRITE: u16 = 1;
/// `fsync`: every other field but the file descriptor must be 0.
pub const IOCB_CMD_FSYNC: u16 = 2;
/// `fdatasync`: every other field but the file descriptor must be 0.
pub const IOCB_CMD_FDSYNC: u16 = 3;
/// `preadv`: `aio_buf` is an array of `struct iovec`, `aio_nbytes` their number.
pub const IOCB_CMD_PREADV: u16 = 7;
/// `pwritev`, as [`IOCB_CMD_PREADV`].
pub const IOCB_CMD_PWRITEV: u16 = 8;
/// Signal `aio_resfd`, an eventfd, when the operation completes.
pub const IOCB_FLAG_RESFD: u32 = 1 << 0;
/// `aio_reqprio` holds an I/O priority.
pub const IOCB_FLAG_IOPRIO: u32 = 1 << 1;
/// Most iovecs one PREADV/PWRITEV iocb may carry (the kernel's `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// `struct iocb`: one operation handed to `io_submit`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Iocb {
    /// Returned unchanged in [`IoEvent::data`].
    pub aio_data: u64,
    /// Written by the kernel; must be 0.
    #[cfg(target_endian = "little")]
    pub aio_key: u32,
    /// `RWF_*` flags of a read or write.
    pub aio_rw_flags: i32,
    /// Written by the kernel; must be 0.
    #[cfg(target_endian = "big")]
    pub aio_key: u32,
    /// One of the `IOCB_CMD_*` commands.
    pub aio_lio_opcode: u16,
    /// I/O priority, with [`IOCB_FLAG_IOPRIO`].
    pub aio_reqprio: i16,
    /// The file descriptor.
    pub aio_fildes: u32,
    /// Buffer address, or iovec array address for the vectored commands.
    pub aio_buf: u64,
    /// Buffer length, or number of iovecs for the vectored commands.
    pub aio_nbytes: u64,
    /// File offset.
    pub aio_offset: i64,
    /// Must be 0.
    pub aio_reserved2: u64,
    /// `IOCB_FLAG_*`.
    pub aio_flags: u32,
    /// The eventfd to signal, with [`IOCB_FLAG_RESFD`].
    pub aio_resfd: u32,
}

const _: () = assert!(size_of::<Iocb>() == 64);
const _: () = assert!(offset_of!(Iocb, aio_lio_opcode) == 16);
const _: () = assert!(offset_of!(Iocb, aio_buf) == 24);
const _: () = assert!(offset_of!(Iocb, aio_offset) == 40);
const _: () = assert!(offset_of!(Iocb, aio_resfd) == 60);
// PREADV/PWRITEV hand the kernel an array of IoVec as an array of `struct iovec`.
const _: () = assert!(size_of::<IoVec>() == size_of::<libc::iovec>());

/// `struct io_event`: one finished operation.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IoEvent {
    /// The iocb's `aio_data`.
    pub data: u64,
    /// The iocb's user address.
    pub obj: u64,
    /// Bytes transferred, or a negated errno.
    pub res: i64,
    /// Secondary result (unused by the commands here).
    pub res2: i64,
}

const _: () = assert!(size_of::<IoEvent>() == 32);

impl IoEvent {
    /// The outcome: bytes transferred (0 for the sync commands), or the error.
    pub fn result(&self) -> io::Result<u64> {
        if self.res < 0 {
            let errno = i32::try_from(-self.res).unwrap_or(libc::EIO);
            Err(io::Error::from_raw_os_error(errno))
        } else {
            Ok(self.res as u64)
        }
    }
}

fn check(ret: libc::c_long) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// An AIO context (`aio_context_t`), destroyed on drop.
#[derive(Debug)]
pub struct AioContext {
    id: libc::c_ulong,
    /// Drop leaves the context alone (see [`AioContext::leak`]).
    leaked: bool,
}

impl AioContext {
    /// `io_setup`: a context for at least `nr_events` operations in flight.
    pub fn new(nr_events: u32) -> io::Result<Self> {
        let mut id: libc::c_ulong = 0;
        // SAFETY: io_setup writes one aio_context_t (an unsigned long) through the pointer,
        // which points to `id`, zeroed as the kernel requires.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                libc::c_long::from(nr_events),
                &raw mut id,
            )
        };
        check(ret)?;
        Ok(AioContext { id, leaked: false })
    }

    /// `io_submit`: hands `iocbs` to the kernel in order and returns how many it took: the
    /// first `n`. Fewer than all is normal (out of resources, or the iocb after the last one
    /// taken is invalid); an error means the first iocb was not taken (EAGAIN: out of
    /// resources; anything else: that iocb is invalid).
    ///
    /// # Safety
    /// Every pointer must point to an [`Iocb`] that nothing else accesses during the call. The
    /// kernel reads what each iocb describes at submission (a PREADV/PWRITEV iovec array) and
    /// accesses the buffers, for reading or writing, until the operation's event has been
    /// harvested: they must stay valid, and free of conflicting accesses, until then.
    pub unsafe fn submit(&self, iocbs: &mut [*mut Iocb]) -> io::Result<usize> {
        // SAFETY: the array is valid for `iocbs.len()` pointers; the caller vouches for what
        // they point to.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.id,
                iocbs.len() as libc::c_long,
                iocbs.as_mut_ptr(),
            )
        };
        check(ret)
    }

    /// `io_getevents` without waiting: moves up to `out.len()` finished operations into `out`
    /// and returns their number. With a zero timeout `min` does not make the call wait; it
    /// is passed on for symmetry with [`AioContext::wait_events`].
    pub fn get_events(&self, min: usize, out: &mut [IoEvent]) -> io::Result<usize> {
        self.getevents(min, out, Duration::ZERO)
    }

    /// `io_getevents` waiting up to `timeout` for at least `min` (at most `out.len()`)
    /// finished operations; returns how many it moved into `out`, possibly fewer than `min`
    /// if the time ran out.
    pub fn wait_events(
        &self,
        min: usize,
        out: &mut [IoEvent],
        timeout: Duration,
    ) -> io::Result<usize> {
        self.getevents(min, out, timeout)
    }

    fn getevents(&self, min: usize, out: &mut [IoEvent], timeout: Duration) -> io::Result<usize> {
        let timeout = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let max = out.len().min(libc::c_long::MAX as usize);
        loop {
            // SAFETY: the kernel writes at most `max` io_events to `out`, which has room for
            // them, and reads one timespec from `timeout`; both outlive the call.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.id,
                    min.min(max) as libc::c_long,
                    max as libc::c_long,
                    out.as_mut_ptr(),
                    &raw const timeout,
                )
            };
            match check(ret) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Makes drop leave the context in place: for when operations may still be in flight and
    /// `io_destroy`, which waits for them, could block for good. The context and its ring
    /// stay until the process exits.
    pub fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for AioContext {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        // SAFETY: plain syscall on the context we own; no memory is passed. It waits for the
        // operations still in flight, if any.
        let ret = unsafe { libc::syscall(libc::SYS_io_destroy, self.id) };
        if let Err(e) = check(ret) {
            log::warn!("io_destroy failed: {e}");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Not prepared; an iovec array may still be parked here until taken.
    Idle,
    /// Prepared, not submitted.
    Prepared,
    /// Taken by the kernel; its event has not been harvested.
    InKernel,
}

/// Which way a vectored transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// PREADV.
    Read,
    /// PWRITEV with these `RWF_*` flags.
    Write {
        /// For example `RWF_DSYNC`.
        rw_flags: i32,
    },
}

/// Iocbs at stable addresses, indexed by `aio_data`, with the iovec arrays they point to.
///
/// A slot is prepared, submitted, completed with its event and then prepared again (to
/// continue a short transfer) or emptied. The table refuses to rewrite a slot, or to give its
/// iovecs back, while the kernel holds its operation, and leaks the iovec arrays of such
/// operations if dropped with them.
#[derive(Debug)]
pub struct IocbTable {
    /// Boxed slices never reallocate: the addresses handed to io_submit stay put.
    iocbs: Box<[Iocb]>,
    iovecs: Box<[Vec<IoVec>]>,
    state: Box<[SlotState]>,
    in_kernel: usize,
    /// The eventfd every operation signals on completion.
    resfd: RawFd,
}

impl IocbTable {
    /// A table of `len` slots whose operations signal the eventfd `resfd` on completion.
    pub fn new(len: usize, resfd: RawFd) -> Self {
        IocbTable {
            iocbs: vec![Iocb::default(); len].into_boxed_slice(),
            iovecs: (0..len).map(|_| Vec::new()).collect(),
            state: vec![SlotState::Idle; len].into_boxed_slice(),
            in_kernel: 0,
            resfd,
        }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.iocbs.len()
    }

    /// Whether the table has no slots.
    pub fn is_empty(&self) -> bool {
        self.iocbs.is_empty()
    }

    /// Operations the kernel holds (submitted, event not harvested).
    pub fn in_kernel(&self) -> usize {
        self.in_kernel
    }

    /// Prepares slot `i` for a vectored transfer of `bufs[start..]`, at most [`IOV_MAX`] of
    /// them, at `offset` of `fd`. The table keeps `bufs` until [`IocbTable::take_bufs`].
    ///
    /// # Panics
    /// If the kernel holds slot `i`'s operation, or `start > bufs.len()`.
    pub fn prepare_rw(
        &mut self,
        i: usize,
        direction: Direction,
        fd: RawFd,
        bufs: Vec<IoVec>,
        start: usize,
        offset: i64,
    ) {
        self.check_not_in_kernel(i);
        let rest = &bufs[start..];
        let (opcode, rw_flags) = match direction {
            Direction::Read => (IOCB_CMD_PREADV, 0),
            Direction::Write { rw_flags } => (IOCB_CMD_PWRITEV, rw_flags),
        };
        self.iocbs[i] = Iocb {
            aio_data: i as u64,
            aio_rw_flags: rw_flags,
            aio_lio_opcode: opcode,
            aio_fildes: fd as u32,
            aio_buf: rest.as_ptr() as u64,
            aio_nbytes: rest.len().min(IOV_MAX) as u64,
            aio_offset: offset,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.resfd as u32,
            ..Iocb::default()
        };
        // Moving the Vec moves its header, not the array `aio_buf` points into.
        self.iovecs[i] = bufs;
        self.state[i] = SlotState::Prepared;
    }

    /// Prepares slot `i` for an fdatasync of `fd`.
    ///
    /// # Panics
    /// If the kernel holds slot `i`'s operation.
    pub fn prepare_fdsync(&mut self, i: usize, fd: RawFd) {
        self.check_not_in_kernel(i);
        // Buffer, length, offset and rw_flags must all be 0, or io_submit fails with EINVAL.
        self.iocbs[i] = Iocb {
            aio_data: i as u64,
            aio_lio_opcode: IOCB_CMD_FDSYNC,
            aio_fildes: fd as u32,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.resfd as u32,
            ..Iocb::default()
        };
        self.iovecs[i] = Vec::new();
        self.state[i] = SlotState::Prepared;
    }

    /// Empties slot `i`, giving back the iovecs it held.
    ///
    /// # Panics
    /// If the kernel holds slot `i`'s operation.
    pub fn take_bufs(&mut self, i: usize) -> Vec<IoVec> {
        self.check_not_in_kernel(i);
        self.state[i] = SlotState::Idle;
        std::mem::take(&mut self.iovecs[i])
    }

    fn check_not_in_kernel(&self, i: usize) {
        assert!(
            self.state[i] != SlotState::InKernel,
            "iocb slot {i} is still in the kernel"
        );
    }

    /// Submits the prepared slots `slots`, in order, with one `io_submit`; returns how many
    /// the kernel took (the first `n`), with [`AioContext::submit`]'s meaning. EINVAL without
    /// a system call if a slot is out of range, not prepared, or listed twice.
    pub fn submit(&mut self, ctx: &AioContext, slots: &[usize]) -> io::Result<usize> {
        let mut ptrs = Vec::with_capacity(slots.len());
        let base = self.iocbs.as_mut_ptr();
        for (k, &i) in slots.iter().enumerate() {
            if self.state.get(i) != Some(&SlotState::Prepared) {
                // Undo the marks made so far (a repeated slot finds its own mark).
                for &j in &slots[..k] {
                    self.state[j] = SlotState::Prepared;
                }
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            // Marked now so that a repeated index fails the check above.
            self.state[i] = SlotState::InKernel;
            ptrs.push(base.wrapping_add(i));
        }
        // SAFETY: every pointer is `base + i` for a distinct in-range `i`, so a valid iocb of
        // the boxed slice, which nothing else touches while `self` is borrowed mutably. Each
        // was set up by `prepare_*`: a PREADV/PWRITEV iocb points into the iovec array held in
        // `self.iovecs[i]`, which stays put and is not handed back while the operation is in
        // the kernel (the `InKernel` state, kept until `complete`); the buffers those iovecs
        // describe stay valid until the operation's token is handed back, after its event, by
        // the contract of `IoVec::new`.
        let result = unsafe { ctx.submit(&mut ptrs) };
        let taken = *result.as_ref().unwrap_or(&0);
        for &i in &slots[taken.min(slots.len())..] {
            self.state[i] = SlotState::Prepared;
        }
        self.in_kernel += taken;
        result
    }

    /// Records the event of a finished operation and returns its slot, or None if the event
    /// matches no operation the kernel holds.
    pub fn complete(&mut self, event: &IoEvent) -> Option<usize> {
        let i = usize::try_from(event.data).ok()?;
        if self.state.get(i) != Some(&SlotState::InKernel) {
            return None;
        }
        self.state[i] = SlotState::Idle;
        self.in_kernel -= 1;
        Some(i)
    }
}

impl Drop for IocbTable {
    fn drop(&mut self) {
        // Only if the engine gave up waiting for the kernel: it may still read these arrays.
        for (i, state) in self.state.iter().enumerate() {
            if *state == SlotState::InKernel {
                std::mem::forget(std::mem::take(&mut self.iovecs[i]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_setup_and_an_empty_harvest() {
        let ctx = AioContext::new(4).unwrap();
        let mut events = [IoEvent::default(); 4];
        assert_eq!(ctx.get_events(0, &mut events).unwrap(), 0);
        let n = ctx
            .wait_events(1, &mut events, Duration::from_millis(1))
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn table_refuses_unprepared_and_repeated_slots_without_a_syscall() {
        let ctx = AioContext::new(4).unwrap();
        let mut table = IocbTable::new(4, -1);
        let err = table.submit(&ctx, &[0]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        table.prepare_fdsync(1, 0);
        let err = table.submit(&ctx, &[1, 1]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let err = table.submit(&ctx, &[1, 9]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(table.in_kernel(), 0);
        // Still prepared: taking its (empty) iovecs back is allowed.
        assert!(table.take_bufs(1).is_empty());
    }

    #[test]
    fn io_event_results() {
        let ok = IoEvent {
            res: 4096,
            ..Default::default()
        };
        assert_eq!(ok.result().unwrap(), 4096);
        let err = IoEvent {
            res: -i64::from(libc::EIO),
            ..Default::default()
        };
        assert_eq!(err.result().unwrap_err().raw_os_error(), Some(libc::EIO));
    }
}
