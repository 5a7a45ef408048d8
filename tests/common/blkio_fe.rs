//! libblkio ("virtio-blk-vhost-user" driver) as a second, independent frontend.
//!
//! Notes: blkio sets the status byte to OK before submitting and hides used.len, so tests
//! must check data and on-disk effects, not only the returned status. It cannot send
//! GET_ID or malformed chains, cannot write config space, and refuses writes to a
//! read-only device by itself. Buffers must live in blkio-allocated memory regions.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub const DRIVER: &str = "virtio-blk-vhost-user";
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct BlkioDev {
    pub b: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

/// An operation on a range of the device; buffers are offsets into the memory region.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Read { off: u64, buf: usize, len: usize },
    Write { off: u64, buf: usize, len: usize },
    Flush,
    Discard { off: u64, len: u64 },
    WriteZeroes { off: u64, len: u64, unmap: bool },
}

#[derive(Debug)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
    pub msg: String,
}

pub fn connect_only(socket: &Path, read_only: bool) -> Result<Blkio, blkio::Error> {
    let mut b = Blkio::new(DRIVER)?;
    b.set_str("path", socket.to_str().unwrap())?;
    b.set_bool("read-only", read_only)?;
    b.connect()?;
    Ok(b)
}

impl BlkioDev {
    /// Connect, start with `num_queues` queues and map a `buf_len`-byte buffer region.
    pub fn open(
        socket: &Path,
        num_queues: i32,
        read_only: bool,
        buf_len: usize,
    ) -> Result<BlkioDev, blkio::Error> {
        let mut b = connect_only(socket, read_only)?;
        b.set_i32("num-queues", num_queues)?;
        let capacity = b.get_u64("capacity")?;
        let out = b.start()?;
        let align = b.get_u64("mem-region-alignment")? as usize;
        let len = buf_len.next_multiple_of(align.max(4096));
        let region = b.alloc_mem_region(len)?;
        b.map_mem_region(&region)?;
        Ok(BlkioDev {
            b,
            queues: out.queues,
            region,
            capacity,
        })
    }

    pub fn buf_write(&mut self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.region.len);
        // SAFETY: the region is a live mapping of region.len bytes owned by self.b.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.region.addr as *mut u8).add(off),
                data.len(),
            )
        };
    }

    pub fn buf_read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.region.len);
        let mut v = vec![0u8; len];
        // SAFETY: the region is a live mapping of region.len bytes owned by self.b.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.region.addr as *const u8).add(off),
                v.as_mut_ptr(),
                len,
            )
        };
        v
    }

    pub fn buf_fill(&mut self, off: usize, len: usize, byte: u8) {
        self.buf_write(off, &vec![byte; len]);
    }

    /// Enqueue an operation (not yet submitted to the device).
    pub fn enqueue(&mut self, q: usize, op: Op, user_data: usize) {
        let base = self.region.addr as *mut u8;
        let queue = &mut self.queues[q];
        match op {
            Op::Read { off, buf, len } => {
                assert!(buf + len <= self.region.len);
                // SAFETY: buf..buf+len lies within the mapped region.
                let p = unsafe { base.add(buf) };
                queue.read(off, p, len, user_data, ReqFlags::empty())
            }
            Op::Write { off, buf, len } => {
                assert!(buf + len <= self.region.len);
                // SAFETY: buf..buf+len lies within the mapped region.
                let p = unsafe { base.add(buf) };
                queue.write(off, p, len, user_data, ReqFlags::empty())
            }
            Op::Flush => queue.flush(user_data, ReqFlags::empty()),
            Op::Discard { off, len } => queue.discard(off, len, user_data, ReqFlags::empty()),
            Op::WriteZeroes { off, len, unmap } => {
                let flags = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                queue.write_zeroes(off, len, user_data, flags)
            }
        }
    }

    /// Submit queued requests and collect completions; waits (bounded) for at least `min`.
    pub fn poll(&mut self, q: usize, min: usize, timeout: Duration) -> Result<Vec<Done>, String> {
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..64).map(|_| MaybeUninit::uninit()).collect();
        let mut t = timeout;
        let n = self.queues[q]
            .do_io(&mut comps, min, Some(&mut t), None)
            .map_err(|e| format!("do_io on queue {q}: {e} ({:?})", e.errno()))?;
        Ok(comps[..n]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialized the first n completions.
                let c = unsafe { c.assume_init_read() };
                let msg = if c.error_msg.is_null() {
                    String::new()
                } else {
                    // SAFETY: blkio gives a NUL-terminated static string when non-null.
                    unsafe { CStr::from_ptr(c.error_msg) }
                        .to_string_lossy()
                        .into_owned()
                };
                Done {
                    user_data: c.user_data,
                    ret: c.ret,
                    msg,
                }
            })
            .collect())
    }

    /// Run one operation synchronously; Ok(()) on success, Err((ret, msg)) otherwise.
    pub fn run(&mut self, q: usize, op: Op) -> Result<(), (i32, String)> {
        self.enqueue(q, op, 0x5eed);
        let done = self
            .poll(q, 1, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done.len(), 1, "expected exactly one completion: {done:?}");
        let d = &done[0];
        if d.ret == 0 {
            Ok(())
        } else {
            Err((d.ret, d.msg.clone()))
        }
    }

    /// Read `len` bytes at `off` through queue `q` (using the buffer at region offset 0).
    pub fn read(&mut self, q: usize, off: u64, len: usize) -> Result<Vec<u8>, (i32, String)> {
        self.buf_fill(0, len, 0xA5);
        self.run(q, Op::Read { off, buf: 0, len })?;
        Ok(self.buf_read(0, len))
    }

    /// Write `data` at `off` through queue `q` (using the buffer at region offset 0).
    pub fn write(&mut self, q: usize, off: u64, data: &[u8]) -> Result<(), (i32, String)> {
        self.buf_write(0, data);
        self.run(
            q,
            Op::Write {
                off,
                buf: 0,
                len: data.len(),
            },
        )
    }
}
