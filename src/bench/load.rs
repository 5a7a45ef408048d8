//! The timed load: one worker per queue keeps `iodepth` requests in flight.
//!
//! The hot loop allocates nothing and takes no lock: a fixed ring of `iodepth` slots (the
//! slot index is the request's user data), iovec arrays built once, offsets from a local
//! PRNG, one clock read per batch of completions, and a relaxed store of a per-queue counter
//! for the progress line.

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Result;
use blkio::{Blkioq, Completion, ReqFlags, iovec};

use super::hist::Histogram;
use super::rng::Rng;
use super::{RwMode, Shared, io_failure};

/// What one load worker does.
#[derive(Debug, Clone)]
pub(crate) struct LoadPlan {
    pub queue: usize,
    pub rw: RwMode,
    pub rwmixread: u8,
    pub bs: u64,
    pub depth: usize,
    /// Random offsets: `start + k * bs` for k in `0..blocks`.
    pub start: u64,
    pub blocks: u64,
    /// Sequential offsets cycle through `[seq_start, seq_end)`.
    pub seq_start: u64,
    pub seq_end: u64,
    /// Largest data segment (0: no limit).
    pub seg_limit: u64,
    /// Address of this worker's buffers and the distance between slots.
    pub buf_base: usize,
    pub slot_stride: usize,
    pub ramp_ns: u64,
    pub end_ns: u64,
    pub seed: u64,
    /// A flush after every this many writes submitted on this queue (0: never), like fio's
    /// `fsync=N`: what a guest that wants its writes durable sends.
    pub flush_every: u64,
}

/// What one load worker measured.
#[derive(Debug)]
pub(crate) struct LoadResult {
    pub hist: Histogram,
    pub read_ios: u64,
    pub write_ios: u64,
    /// Flushes completed in the measured window (not I/Os: neither counted nor timed there).
    pub flushes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotOp {
    Read,
    Write,
    Flush,
}

struct Slot {
    off: u64,
    start_ns: u64,
    op: SlotOp,
    iov: Vec<iovec>,
}

/// Run one queue's load until `plan.end_ns` (or an abort), then drain.
pub(crate) fn run(q: &mut Blkioq, plan: &LoadPlan, shared: &Shared) -> Result<LoadResult> {
    let depth = plan.depth;
    let mut rng = Rng::stream(plan.seed, plan.queue as u64);
    let mut slots: Vec<Slot> = (0..depth)
        .map(|i| {
            let base = plan.buf_base + i * plan.slot_stride;
            let seg = if plan.seg_limit == 0 {
                plan.bs
            } else {
                plan.seg_limit.min(plan.bs)
            };
            let mut iov = Vec::new();
            let mut done = 0;
            while done < plan.bs {
                let len = seg.min(plan.bs - done);
                iov.push(iovec {
                    iov_base: (base + done as usize) as *mut libc::c_void,
                    iov_len: len as usize,
                });
                done += len;
            }
            // SAFETY: the slot's bytes lie within this worker's part of the mapped region,
            // which no one else touches.
            let buf = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, plan.bs as usize) };
            rng.fill(buf);
            Slot {
                off: 0,
                start_ns: 0,
                op: SlotOp::Read,
                iov,
            }
        })
        .collect();
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut cursor = plan.seq_start;
    let mut writes_since_flush = 0u64;
    let mut next = |rng: &mut Rng| -> (u64, SlotOp) {
        if plan.flush_every > 0 && writes_since_flush >= plan.flush_every {
            writes_since_flush = 0;
            return (0, SlotOp::Flush);
        }
        let write = match plan.rw {
            RwMode::Randread | RwMode::Read => false,
            RwMode::Randwrite | RwMode::Write => true,
            RwMode::Randrw => !rng.percent(plan.rwmixread),
        };
        let off = if plan.rw.is_sequential() {
            let off = cursor;
            cursor += plan.bs;
            if cursor + plan.bs > plan.seq_end {
                cursor = plan.seq_start;
            }
            off
        } else {
            plan.start + rng.below(plan.blocks) * plan.bs
        };
        if write {
            writes_since_flush += 1;
            (off, SlotOp::Write)
        } else {
            (off, SlotOp::Read)
        }
    };
    let submit = |q: &mut Blkioq, slot: &mut Slot, idx: usize, off: u64, op: SlotOp, now: u64| {
        slot.off = off;
        slot.op = op;
        slot.start_ns = now;
        let (p, n) = (slot.iov.as_ptr(), slot.iov.len() as u32);
        match op {
            SlotOp::Write => q.writev(off, p, n, idx, ReqFlags::empty()),
            SlotOp::Read => q.readv(off, p, n, idx, ReqFlags::empty()),
            SlotOp::Flush => q.flush(idx, ReqFlags::empty()),
        }
    };

    let t0 = shared.wait_start();
    let mut result = LoadResult {
        hist: Histogram::new(),
        read_ios: 0,
        write_ios: 0,
        flushes: 0,
        errors: 0,
        first_error: None,
    };
    for (idx, slot) in slots.iter_mut().enumerate() {
        let (off, op) = next(&mut rng);
        submit(q, slot, idx, off, op, 0);
    }
    let mut inflight = depth;
    let mut completed = 0u64;
    while inflight > 0 {
        let mut timeout = super::STALL_TIMEOUT;
        let n = q
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .map_err(|e| {
                shared.abort.store(true, Ordering::Relaxed);
                io_failure(plan.queue, &e)
            })?;
        let now = Instant::now().saturating_duration_since(t0).as_nanos() as u64;
        let stop = now >= plan.end_ns || shared.abort.load(Ordering::Relaxed);
        let counting = now >= plan.ramp_ns && now < plan.end_ns;
        for c in &comps[..n] {
            // SAFETY: do_io initialized the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let idx = c.user_data;
            let slot = &mut slots[idx];
            inflight -= 1;
            completed += 1;
            if c.ret != 0 {
                result.errors += 1;
                if result.first_error.is_none() {
                    result.first_error = Some(describe_error(plan.queue, slot, plan.bs, c.ret));
                }
            } else if counting {
                match slot.op {
                    SlotOp::Flush => result.flushes += 1,
                    SlotOp::Write => {
                        result.hist.record(now - slot.start_ns);
                        result.write_ios += 1;
                    }
                    SlotOp::Read => {
                        result.hist.record(now - slot.start_ns);
                        result.read_ios += 1;
                    }
                }
            }
            if !stop {
                let (off, op) = next(&mut rng);
                submit(q, slot, idx, off, op, now);
                inflight += 1;
            }
        }
        shared.done[plan.queue]
            .0
            .store(completed, Ordering::Relaxed);
    }
    Ok(result)
}

fn describe_error(queue: usize, slot: &Slot, bs: u64, ret: i32) -> String {
    let err = std::io::Error::from_raw_os_error(-ret);
    let what = match slot.op {
        SlotOp::Flush => return format!("queue {queue}: flush failed: {err}"),
        SlotOp::Write => "write",
        SlotOp::Read => "read",
    };
    format!(
        "queue {queue}: {what} of {bs} bytes at offset {} failed: {err}",
        slot.off
    )
}
