//! libblkio as an independent frontend: a randomized workload on two queues verified
//! against the backing file, discard/write-zeroes effects, and read-only devices.
//!
//! blkio pre-sets the status byte to OK and hides used.len, so every check here is on data
//! read back and on the file itself.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::blk::{Rng, pattern};
use common::blkio_fe::{BlkioDev, Op, connect_only};
use common::daemon::{Config, Daemon};
use common::*;

const IMG: u64 = 16 << 20;

#[test]
fn blkio_sees_capacity_queues_and_data() {
    let d = Daemon::start(Config::default().queues(2));
    let b = connect_only(&d.socket, false).unwrap();
    assert_eq!(b.get_u64("capacity").unwrap(), IMG);
    assert_eq!(b.get_i32("max-queues").unwrap(), 2);
    assert_eq!(b.get_i32("request-alignment").unwrap(), 512);
    assert!(b.get_u64("max-discard-len").unwrap() > 0);
    assert!(b.get_u64("max-write-zeroes-len").unwrap() > 0);
    drop(b);
    let mut dev = BlkioDev::open(&d.socket, 2, false, 1 << 20).unwrap();
    assert_eq!(dev.capacity, IMG);
    for (q, off, len) in [
        (0usize, 0u64, 4096usize),
        (1, 512, 512),
        (0, IMG - 65536, 65536),
    ] {
        let got = dev.read(q, off, len).unwrap();
        assert!(
            got == read_file_at(&d.image, off, len),
            "read q{q} at {off}"
        );
    }
    let data = pattern(5, 12288);
    dev.write(1, 40960, &data).unwrap();
    assert_file_range(&d.image, 40960, &data);
    assert!(dev.read(0, 40960, data.len()).unwrap() == data);
    dev.run(0, Op::Flush).unwrap();
}

#[test]
fn blkio_read_only_device() {
    let d = Daemon::start(Config::default().read_only());
    // A read-write open is refused because the device reports read-only.
    let r = BlkioDev::open(&d.socket, 1, false, 1 << 16);
    match r {
        Ok(_) => panic!("blkio started read-write on a read-only device"),
        Err(e) => assert_eq!(e.errno(), blkio::Errno::ROFS, "error: {e}"),
    }
    let b = connect_only(&d.socket, true).unwrap();
    assert!(b.get_bool("read-only").unwrap());
    drop(b);
    let mut dev = BlkioDev::open(&d.socket, 1, true, 1 << 16).unwrap();
    let got = dev.read(0, 8192, 8192).unwrap();
    assert!(got == read_file_at(&d.image, 8192, 8192));
    let before = read_file(&d.image);
    assert!(
        dev.write(0, 0, &[1u8; 4096]).is_err(),
        "write on read-only succeeded"
    );
    assert!(read_file(&d.image) == before);
}

#[test]
fn blkio_discard_and_write_zeroes() {
    let d = Daemon::start(Config::default());
    let mut dev = BlkioDev::open(&d.socket, 1, false, 1 << 20).unwrap();
    let off = 4u64 << 20;
    let len = 1u64 << 20;
    let alloc_before = allocated_in_range(&d.image, off, len);
    dev.run(0, Op::Discard { off, len }).unwrap();
    assert_file_range(&d.image, off, &vec![0u8; len as usize]);
    assert!(
        dev.read(0, off, len as usize)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    let alloc_after = allocated_in_range(&d.image, off, len);
    assert!(
        alloc_after < alloc_before,
        "discard freed nothing: {alloc_before} -> {alloc_after}"
    );

    for (i, unmap) in [false, true].into_iter().enumerate() {
        let off = (8u64 << 20) + i as u64 * (1 << 20);
        let left = read_file_at(&d.image, off - 512, 512);
        dev.run(
            0,
            Op::WriteZeroes {
                off,
                len: 300 * 512,
                unmap,
            },
        )
        .unwrap();
        assert_file_range(&d.image, off, &vec![0u8; 300 * 512]);
        assert_file_range(&d.image, off - 512, &left);
        assert_file_range(
            &d.image,
            off + 300 * 512,
            &read_file_at(&d.image, off + 300 * 512, 512),
        );
        assert!(dev.read(0, off, 300 * 512).unwrap().iter().all(|&b| b == 0));
    }
    assert_eq!(std::fs::metadata(&d.image).unwrap().len(), IMG);
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    op: Op,
    seed: u64,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn range(op: &Op) -> Option<(u64, u64)> {
    match *op {
        Op::Read { off, len, .. } | Op::Write { off, len, .. } => Some((off, len as u64)),
        Op::Discard { off, len } | Op::WriteZeroes { off, len, .. } => Some((off, len)),
        Op::Flush => None,
    }
}

#[test]
fn blkio_randomized_workload_on_two_queues() {
    let d = Daemon::start(Config::default().queues(2));
    const SLOT: usize = 256 << 10;
    const SLOTS_PER_Q: usize = 8;
    let mut dev = BlkioDev::open(&d.socket, 2, false, 2 * SLOTS_PER_Q * SLOT).unwrap();
    let mut model = read_file(&d.image);
    let mut rng = Rng::new(0x5151);
    let mut inflight: HashMap<usize, InFlight> = HashMap::new(); // key = user_data = buffer slot
    let mut free: Vec<Vec<usize>> = (0..2)
        .map(|q| (0..SLOTS_PER_Q).map(|s| q * SLOTS_PER_Q + s).collect())
        .collect();
    let total_ops = 1500;
    let mut submitted = 0;
    let mut completed = 0;
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed < total_ops {
        assert!(Instant::now() < deadline, "workload did not finish in time");
        // Fill both queues with non-overlapping random operations.
        for (q, free_q) in free.iter_mut().enumerate() {
            while submitted < total_ops && !free_q.is_empty() {
                let kind = rng.below(100);
                let off = rng.below(IMG / 512 - 1) * 512;
                let max_len = (IMG - off).min(SLOT as u64);
                let len = (1 + rng.below(max_len / 512)) * 512;
                let op = match kind {
                    0..=39 => Op::Write {
                        off,
                        buf: 0,
                        len: len as usize,
                    },
                    40..=79 => Op::Read {
                        off,
                        buf: 0,
                        len: len as usize,
                    },
                    80..=84 => Op::Flush,
                    85..=92 => {
                        let off = off / 4096 * 4096;
                        Op::Discard {
                            off,
                            len: len.next_multiple_of(4096).min(IMG - off),
                        }
                    }
                    _ => Op::WriteZeroes {
                        off,
                        len,
                        unmap: kind.is_multiple_of(2),
                    },
                };
                if let Some(r) = range(&op)
                    && inflight
                        .values()
                        .any(|f| range(&f.op).is_some_and(|o| overlaps(o, r)))
                {
                    continue;
                }
                let slot = free_q.pop().unwrap();
                let op = match op {
                    Op::Write { off, len, .. } => Op::Write {
                        off,
                        buf: slot * SLOT,
                        len,
                    },
                    Op::Read { off, len, .. } => Op::Read {
                        off,
                        buf: slot * SLOT,
                        len,
                    },
                    o => o,
                };
                let seed = rng.next_u64();
                match op {
                    Op::Write { buf, len, .. } => dev.buf_write(buf, &pattern(seed, len)),
                    Op::Read { buf, len, .. } => dev.buf_fill(buf, len, 0xA5),
                    _ => {}
                }
                dev.enqueue(q, op, slot);
                inflight.insert(slot, InFlight { op, seed });
                submitted += 1;
            }
        }
        // Collect: non-blocking on both, then block on whichever has work.
        let mut done = Vec::new();
        for q in 0..2 {
            done.extend(dev.poll(q, 0, Duration::ZERO).unwrap());
        }
        if done.is_empty() {
            let q = if free[0].len() < SLOTS_PER_Q { 0 } else { 1 };
            done.extend(dev.poll(q, 1, Duration::from_secs(10)).unwrap());
        }
        for c in done {
            let f = inflight.remove(&c.user_data).expect("unknown completion");
            assert_eq!(c.ret, 0, "{:?} failed: {} ({})", f.op, c.ret, c.msg);
            match f.op {
                Op::Write { off, buf, len } => {
                    let data = dev.buf_read(buf, len);
                    assert!(data == pattern(f.seed, len));
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    *counts.entry("write").or_default() += 1;
                }
                Op::Read { off, buf, len } => {
                    let got = dev.buf_read(buf, len);
                    if got[..] != model[off as usize..off as usize + len] {
                        let first = got
                            .iter()
                            .zip(&model[off as usize..])
                            .position(|(a, b)| a != b)
                            .unwrap();
                        panic!("read at {off}+{len} differs from the model at +{first}");
                    }
                    *counts.entry("read").or_default() += 1;
                }
                Op::Discard { off, len } | Op::WriteZeroes { off, len, .. } => {
                    model[off as usize..(off + len) as usize].fill(0);
                    *counts.entry("zero").or_default() += 1;
                }
                Op::Flush => *counts.entry("flush").or_default() += 1,
            }
            let q = c.user_data / SLOTS_PER_Q;
            free[q].push(c.user_data);
            completed += 1;
        }
    }
    eprintln!("blkio workload: {counts:?}");
    // The file matches the model, and so does a full read through queue 1.
    let file = read_file(&d.image);
    if file != model {
        let first = file.iter().zip(&model).position(|(a, b)| a != b).unwrap();
        panic!("image differs from the model at byte {first}");
    }
    for chunk in 0..(IMG as usize / SLOT) {
        let got = dev.read(1, (chunk * SLOT) as u64, SLOT).unwrap();
        assert!(
            got[..] == model[chunk * SLOT..(chunk + 1) * SLOT],
            "final read chunk {chunk}"
        );
    }
    assert_eq!(file.len() as u64, IMG);
}
