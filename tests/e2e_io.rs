//! Data-path end-to-end tests through the raw vhost-user frontend: round trips checked
//! against the backing file, descriptor layouts, indirect tables, buffers spanning memory
//! regions, every request type, out-of-range and misaligned requests, multi-queue.

#![allow(clippy::needless_range_loop)]

mod common;

use std::time::Duration;

use common::blk::*;
use common::daemon::{Config, Daemon};
use common::guest::{OUTSIDE_GPA, REGION_B_BASE, REGION_B_SIZE};
use common::raw::{FrontendOpts, RawFrontend};
use common::*;

const IMG: u64 = 16 << 20;
const CAP: u64 = IMG / 512;

fn start(cfg: Config) -> (Daemon, RawFrontend) {
    let d = Daemon::start(cfg);
    let fe = RawFrontend::connect(&d.socket);
    (d, fe)
}

#[test]
fn reads_match_image_at_various_offsets_and_sizes() {
    let (d, mut fe) = start(Config::default());
    let cases: &[(u64, u32)] = &[
        (0, 512),
        (1, 512),
        (3, 1536),
        (7, 4096),
        (100, 65536),
        (2049, 131072),
        (CAP - 1, 512),
        (CAP - 256, 131072),
        (12345, 1 << 20),
    ];
    for &(sector, len) in cases {
        let expect = read_file_at(&d.image, sector * 512, len as usize);
        fe.assert_reads(0, sector, &expect);
    }
}

#[test]
fn writes_reach_the_file_and_read_back() {
    let (d, mut fe) = start(Config::default());
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (5, 512),
        (9, 3584),
        (64, 4096),
        (1000, 65536),
        (4097, 200 * 1024),
        (CAP - 8, 4096),
        (20000, 1 << 20),
    ];
    for (i, &(sector, len)) in cases.iter().enumerate() {
        let data = pattern(1000 + i as u64, len);
        let before = read_file_at(&d.image, 0, 512);
        let o = fe.write(0, sector, &data);
        o.assert_ok();
        assert_eq!(o.used_len, 1, "used len of a good write");
        assert_file_range(&d.image, sector * 512, &data);
        fe.assert_reads(0, sector, &data);
        if sector != 0 {
            assert_file_range(&d.image, 0, &before);
        }
    }
    // Neighbouring sectors of a small write stay untouched.
    let left = read_file_at(&d.image, 99 * 512, 512);
    let right = read_file_at(&d.image, 101 * 512, 512);
    fe.write(0, 100, &pattern(5, 512)).assert_ok();
    assert_file_range(&d.image, 99 * 512, &left);
    assert_file_range(&d.image, 101 * 512, &right);
    assert_eq!(std::fs::metadata(&d.image).unwrap().len(), IMG);
}

#[test]
fn multi_segment_requests() {
    let (d, mut fe) = start(Config::default());
    // Write in 4 data segments of different sizes.
    let data = pattern(11, 512 + 1024 + 2560 + 4096);
    let o = fe.request_with(
        0,
        &BlkReq::write(300, &data),
        &Layout::default().split_out(&[16, 512, 1024, 2560, 4096]),
    );
    o.assert_ok();
    assert_eq!(o.used_len, 1);
    assert_file_range(&d.image, 300 * 512, &data);
    // Read it back in differently sized segments (not sector-multiples individually).
    let o = fe.request_with(
        0,
        &BlkReq::read(300, data.len() as u32),
        &Layout::default().split_in(&[100, 412, 3000, 1096, 3584, 1]),
    );
    o.assert_ok();
    assert_eq!(o.used_len, data.len() as u32 + 1);
    assert!(o.data == data);
    // Many small segments: 64 x 512.
    let data = pattern(12, 64 * 512);
    let mut split = vec![16];
    split.extend(std::iter::repeat_n(512, 64));
    fe.request_with(
        0,
        &BlkReq::write(5000, &data),
        &Layout::default().split_out(&split),
    )
    .assert_ok();
    assert_file_range(&d.image, 5000 * 512, &data);
    let mut split: Vec<u32> = std::iter::repeat_n(512, 64).collect();
    split.push(1);
    let o = fe.request_with(
        0,
        &BlkReq::read(5000, data.len() as u32),
        &Layout::default().split_in(&split),
    );
    o.assert_ok();
    assert!(o.data == data);
}

#[test]
fn legal_descriptor_layouts() {
    let (d, mut fe) = start(Config::default());
    let data = pattern(21, 4096);
    // Header split in two descriptors.
    for cut in [1u32, 7, 8, 15] {
        let sector = 10 + cut as u64 * 16;
        fe.request_with(
            0,
            &BlkReq::write(sector, &data),
            &Layout::default().split_out(&[cut, 16 - cut, 4096]),
        )
        .assert_ok();
        assert_file_range(&d.image, sector * 512, &data);
        let o = fe.request_with(
            0,
            &BlkReq::read(sector, 4096),
            &Layout::default().split_out(&[cut, 16 - cut]),
        );
        o.assert_ok();
        assert!(o.data == data, "read with header split at {cut}");
    }
    // Header and data in one descriptor.
    let data2 = pattern(22, 8192);
    fe.request_with(
        0,
        &BlkReq::write(1000, &data2),
        &Layout::default().split_out(&[16 + 8192]),
    )
    .assert_ok();
    assert_file_range(&d.image, 1000 * 512, &data2);
    // Header + first part of the data in one, the rest in another.
    let data3 = pattern(23, 8192);
    fe.request_with(
        0,
        &BlkReq::write(1100, &data3),
        &Layout::default().split_out(&[16 + 1000, 7192]),
    )
    .assert_ok();
    assert_file_range(&d.image, 1100 * 512, &data3);
    // Data and status in one descriptor.
    let o = fe.request_with(
        0,
        &BlkReq::read(1000, 8192),
        &Layout::default().split_in(&[8192 + 1]),
    );
    o.assert_ok();
    assert_eq!(o.used_len, 8193);
    assert!(o.data == data2);
    // Part of the data, then the rest of the data plus the status.
    let o = fe.request_with(
        0,
        &BlkReq::read(1100, 8192),
        &Layout::default().split_in(&[4000, 4192 + 1]),
    );
    o.assert_ok();
    assert!(o.data == data3);
    // Everything merged at once: header split + data+status merged.
    let o = fe.request_with(
        0,
        &BlkReq::read(1000, 8192),
        &Layout::default().split_out(&[4, 12]).split_in(&[8193]),
    );
    o.assert_ok();
    assert!(o.data == data2);
    // Flush with header split and a separate status.
    let o = fe.request_with(0, &BlkReq::flush(), &Layout::default().split_out(&[8, 8]));
    o.assert_ok();
}

#[test]
fn indirect_descriptors() {
    let (d, mut fe) = start(Config::default());
    assert!(
        fe.acked & bit(VIRTIO_RING_F_INDIRECT_DESC) != 0,
        "INDIRECT_DESC not negotiated"
    );
    let data = pattern(31, 3 * 4096);
    let o = fe.request_with(
        0,
        &BlkReq::write(777, &data),
        &Layout::default()
            .indirect()
            .split_out(&[16, 4096, 4096, 4096]),
    );
    o.assert_ok();
    assert_eq!(o.used_len, 1);
    assert_file_range(&d.image, 777 * 512, &data);
    let o = fe.request_with(
        0,
        &BlkReq::read(777, data.len() as u32),
        &Layout::default().indirect().split_in(&[512, 11776, 1]),
    );
    o.assert_ok();
    assert_eq!(o.used_len, data.len() as u32 + 1);
    assert!(o.data == data);
    // A long indirect chain: 200 segments of 512 bytes (more than fits comfortably in a
    // direct chain of a small queue).
    let data = pattern(32, 200 * 512);
    let mut split = vec![16];
    split.extend(std::iter::repeat_n(512, 200));
    fe.request_with(
        0,
        &BlkReq::write(8000, &data),
        &Layout::default().indirect().split_out(&split),
    )
    .assert_ok();
    assert_file_range(&d.image, 8000 * 512, &data);
    let o = fe.request_with(
        0,
        &BlkReq::get_id(),
        &Layout::default().indirect().split_in(&[20, 1]),
    );
    o.assert_ok();
    // Indirect flush.
    fe.request_with(0, &BlkReq::flush(), &Layout::default().indirect())
        .assert_ok();
}

#[test]
fn buffers_spanning_two_memory_regions() {
    let (d, mut fe) = start(Config::default());
    let data = pattern(41, 64 * 1024);
    // Data descriptor straddles the region boundary (piece 1 = the data of a write).
    let o = fe.request_with(0, &BlkReq::write(2000, &data), &Layout::default().span(1));
    o.assert_ok();
    assert_file_range(&d.image, 2000 * 512, &data);
    // Read with the data descriptor straddling (piece 1 = read data).
    let o = fe.request_with(
        0,
        &BlkReq::read(2000, data.len() as u32),
        &Layout::default().span(1),
    );
    o.assert_ok();
    assert!(o.data == data);
    // Data + status in one straddling descriptor.
    let o = fe.request_with(
        0,
        &BlkReq::read(2000, 4096),
        &Layout::default().split_in(&[4097]).span(1),
    );
    o.assert_ok();
    assert!(o.data[..] == data[..4096]);
    // Header straddling the boundary.
    let data2 = pattern(42, 4096);
    fe.request_with(0, &BlkReq::write(2500, &data2), &Layout::default().span(0))
        .assert_ok();
    assert_file_range(&d.image, 2500 * 512, &data2);
    // All buffers in the second region.
    let o = fe.request_with(0, &BlkReq::read(2500, 4096), &Layout::default().region_b());
    o.assert_ok();
    assert!(o.data == data2);
    // Indirect table + straddling data.
    let o = fe.request_with(
        0,
        &BlkReq::read(2000, data.len() as u32),
        &Layout::default().indirect().span(1),
    );
    o.assert_ok();
    assert!(o.data == data);
    // Data in region B right up to its end (not beyond).
    let end = REGION_B_BASE + REGION_B_SIZE - 4096;
    let o = fe.request_with(0, &BlkReq::read(2500, 4096), &Layout::default().at(1, end));
    o.assert_ok();
    assert_eq!(fe.mem.read(end, 4096), data2);
}

#[test]
fn memory_sent_with_add_mem_reg() {
    let d = Daemon::start(Config::default());
    let mut fe =
        RawFrontend::connect_with(&d.socket, FrontendOpts::default().add_mem_reg()).unwrap();
    let data = pattern(51, 8192);
    fe.write(0, 40, &data).assert_ok();
    assert_file_range(&d.image, 40 * 512, &data);
    let o = fe.request_with(0, &BlkReq::read(40, 8192), &Layout::default().span(1));
    o.assert_ok();
    assert!(o.data == data);
}

#[test]
fn flush_succeeds() {
    let (_d, mut fe) = start(Config::default());
    fe.write(0, 0, &pattern(1, 4096)).assert_ok();
    let o = fe.flush(0);
    o.assert_ok();
    assert_eq!(o.used_len, 1, "used len of FLUSH");
}

#[test]
fn get_id_returns_configured_serial() {
    let (_d, mut fe) = start(Config::default().serial("disk-serial-42"));
    let o = fe.get_id(0);
    o.assert_ok();
    let mut expect = b"disk-serial-42".to_vec();
    expect.resize(20, 0);
    assert_eq!(o.data, expect);
    assert_eq!(o.used_len, 21, "used len of GET_ID (20 id bytes + status)");

    // A 20-byte serial fills the buffer without a terminator.
    let (_d, mut fe) = start(Config::default().serial("ABCDEFGHIJKLMNOPQRST"));
    let o = fe.get_id(0);
    o.assert_ok();
    assert_eq!(o.data, b"ABCDEFGHIJKLMNOPQRST".to_vec());
}

#[test]
fn default_serial_is_derived_from_image_and_stable() {
    let dir = common::daemon::test_dir();
    let id1 = {
        let d = Daemon::start_in(dir.clone(), Config::default());
        let mut fe = RawFrontend::connect(&d.socket);
        let o = fe.get_id(0);
        o.assert_ok();
        o.data
    };
    let s = String::from_utf8_lossy(&id1)
        .trim_end_matches('\0')
        .to_string();
    assert!(
        s.starts_with("vublk-"),
        "default serial {s:?} should start with vublk-"
    );
    assert!(id1.len() == 20);
    // Same image again: same serial.
    let cfg = Config {
        image: common::daemon::Image::None,
        ..Config::default()
    };
    let d = Daemon::start_in(dir.clone(), cfg);
    let mut fe = RawFrontend::connect(&d.socket);
    let id2 = fe.get_id(0).data;
    assert_eq!(id1, id2, "default serial changed across restarts");
    drop(fe);
    drop(d);
    // A different image: a different serial.
    let d = Daemon::start(Config::default());
    let mut fe = RawFrontend::connect(&d.socket);
    let id3 = fe.get_id(0).data;
    assert_ne!(id1, id3, "two images got the same default serial");
}

#[test]
fn discard_punches_a_hole() {
    let (d, mut fe) = start(Config::default());
    assert!(fe.has_feature(VIRTIO_BLK_F_DISCARD));
    let start_sector = 2048; // 1 MiB
    let n = 2048u32; // 1 MiB
    let off = start_sector * 512;
    let len = n as u64 * 512;
    let before = allocated_in_range(&d.image, off, len);
    assert!(before >= len, "test image should be fully allocated");
    let outside_left = read_file_at(&d.image, off - 512, 512);
    let outside_right = read_file_at(&d.image, off + len, 512);
    let o = fe.discard(0, start_sector, n);
    o.assert_ok();
    assert_eq!(o.used_len, 1);
    assert_file_range(&d.image, off, &vec![0u8; len as usize]);
    fe.assert_reads(0, start_sector, &vec![0u8; len as usize]);
    let after = allocated_in_range(&d.image, off, len);
    assert!(
        after < before,
        "discard did not free blocks: {before} -> {after} allocated bytes in range"
    );
    let blocks_total = allocated_bytes(&d.image);
    assert!(
        blocks_total < IMG,
        "file st_blocks did not shrink: {blocks_total}"
    );
    assert_file_range(&d.image, off - 512, &outside_left);
    assert_file_range(&d.image, off + len, &outside_right);
    assert_eq!(std::fs::metadata(&d.image).unwrap().len(), IMG);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let (d, mut fe) = start(Config::default());
    assert!(fe.has_feature(VIRTIO_BLK_F_WRITE_ZEROES));
    for (i, unmap) in [false, true].into_iter().enumerate() {
        let sector = 4096 + i as u64 * 1024;
        let n = 520u32; // not a multiple of 4 KiB
        let left = read_file_at(&d.image, sector * 512 - 512, 512);
        let right = read_file_at(&d.image, (sector + n as u64) * 512, 512);
        let o = fe.write_zeroes(0, sector, n, unmap);
        o.assert_ok();
        assert_eq!(o.used_len, 1);
        let zeros = vec![0u8; n as usize * 512];
        assert_file_range(&d.image, sector * 512, &zeros);
        fe.assert_reads(0, sector, &zeros);
        assert_file_range(&d.image, sector * 512 - 512, &left);
        assert_file_range(&d.image, (sector + n as u64) * 512, &right);
    }
    assert_eq!(std::fs::metadata(&d.image).unwrap().len(), IMG);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let (d, mut fe) = start(Config::default());
    let before = read_file(&d.image);
    for t in [
        2u32,
        3,
        5,
        6,
        7,
        9,
        10,
        12,
        14,
        15,
        16,
        18,
        24,
        26,
        0x100,
        0x8000_0000,
        u32::MAX,
    ] {
        let o = fe.request(0, &BlkReq::other(t, 0));
        assert_eq!(o.status, Some(S_UNSUPP), "type {t:#x}: {o:?}");
        assert_eq!(o.used_len, 1, "type {t:#x}: used len");
    }
    // With a payload and an in buffer too.
    let mut req = BlkReq::read(0, 512);
    req.type_ = 16;
    let o = fe.request(0, &req);
    assert_eq!(o.status, Some(S_UNSUPP));
    assert!(read_file(&d.image) == before, "image changed");
    fe.assert_reads(0, 0, &before[..4096]);
}

#[test]
fn out_of_range_requests_fail_and_touch_nothing() {
    let (d, mut fe) = start(Config::default());
    let before = read_file(&d.image);
    let cases: Vec<(&str, BlkReq)> = vec![
        ("read at capacity", BlkReq::read(CAP, 512)),
        ("read across the end", BlkReq::read(CAP - 1, 1024)),
        ("read far beyond", BlkReq::read(CAP * 4, 512)),
        (
            "read with overflowing sector",
            BlkReq::read(u64::MAX / 512 + 1, 512),
        ),
        ("read at u64::MAX", BlkReq::read(u64::MAX, 512)),
        ("write at capacity", BlkReq::write(CAP, &[0x11; 512])),
        (
            "write across the end",
            BlkReq::write(CAP - 2, &[0x11; 4096]),
        ),
        (
            "write with overflowing sector",
            BlkReq::write(u64::MAX - 3, &[0x11; 4096]),
        ),
        ("discard across the end", BlkReq::discard(CAP - 8, 16)),
        ("discard beyond", BlkReq::discard(CAP, 8)),
        ("discard overflowing", BlkReq::discard(u64::MAX - 4, 8)),
        (
            "write zeroes across the end",
            BlkReq::write_zeroes(CAP - 8, 16, false),
        ),
        (
            "write zeroes beyond",
            BlkReq::write_zeroes(CAP + 1, 1, true),
        ),
    ];
    for (what, req) in cases {
        let o = fe.request(0, &req);
        assert_eq!(o.status, Some(S_IOERR), "{what}: {o:?}");
        if req.type_ == VIRTIO_BLK_T_IN {
            // Nothing (or nothing but the status) was written to the guest.
            assert!(
                o.used_len == 1 || o.used_len == 0,
                "{what}: used len {}",
                o.used_len
            );
        }
    }
    assert!(
        read_file(&d.image) == before,
        "image changed by refused requests"
    );
    assert_eq!(std::fs::metadata(&d.image).unwrap().len(), IMG);
    fe.assert_reads(0, CAP - 8, &before[(IMG - 4096) as usize..]);
}

#[test]
fn misaligned_lengths_fail_and_touch_nothing() {
    let (d, mut fe) = start(Config::default());
    let before = read_file(&d.image);
    let cases: Vec<(&str, BlkReq)> = vec![
        ("read 100 bytes", BlkReq::read(0, 100)),
        ("read 513 bytes", BlkReq::read(0, 513)),
        ("write 1000 bytes", BlkReq::write(8, &[0x22; 1000])),
        ("write 511 bytes", BlkReq::write(8, &[0x22; 511])),
        ("write 4097 bytes", BlkReq::write(8, &[0x22; 4097])),
    ];
    for (what, req) in cases {
        let o = fe.request(0, &req);
        assert_eq!(o.status, Some(S_IOERR), "{what}: {o:?}");
    }
    assert!(
        read_file(&d.image) == before,
        "image changed by refused requests"
    );
    fe.assert_reads(0, 0, &before[..512]);
}

#[test]
fn logical_block_size_4096() {
    let (d, mut fe) = start(Config::default().lbs(4096));
    let cfg = fe.config();
    assert_eq!(cfg.blk_size, 4096);
    assert_eq!(cfg.capacity, CAP, "capacity is always in 512-byte sectors");
    let before = read_file(&d.image);
    // Whole logical blocks work.
    let data = pattern(61, 8192);
    fe.write(0, 16, &data).assert_ok();
    assert_file_range(&d.image, 16 * 512, &data);
    fe.assert_reads(0, 16, &data);
    // Lengths that are multiples of 512 but not of 4096 are refused.
    let after_good = read_file(&d.image);
    for (what, req) in [
        ("write 512 bytes", BlkReq::write(32, &[0x33; 512])),
        ("write 4608 bytes", BlkReq::write(32, &[0x33; 4608])),
        ("read 512 bytes", BlkReq::read(32, 512)),
        ("read 6144 bytes", BlkReq::read(32, 6144)),
    ] {
        let o = fe.request(0, &req);
        assert_eq!(o.status, Some(S_IOERR), "{what} with lbs 4096: {o:?}");
    }
    assert!(
        read_file(&d.image) == after_good,
        "image changed by refused requests"
    );
    assert!(before.len() == after_good.len());
}

#[test]
fn multi_queue_write_on_one_read_on_other() {
    let (d, mut fe) = start(Config::default().queues(2));
    assert_eq!(fe.queue_num, 2);
    assert_eq!(fe.queues.len(), 2);
    let data = pattern(71, 16384);
    fe.write(1, 600, &data).assert_ok();
    assert_file_range(&d.image, 600 * 512, &data);
    fe.assert_reads(0, 600, &data);
    let data2 = pattern(72, 4096);
    fe.write(0, 700, &data2).assert_ok();
    fe.assert_reads(1, 700, &data2);
    fe.flush(1).assert_ok();
    fe.get_id(1).assert_ok();
}

#[test]
fn both_queues_busy_at_once() {
    let (d, mut fe) = start(Config::default().queues(2).image_pattern(32 << 20, 3));
    let per_queue = 40usize;
    let len = 64 * 1024usize;
    let mut pend = Vec::new();
    let mut heads: [Vec<u16>; 2] = [Vec::new(), Vec::new()];
    for i in 0..per_queue {
        for q in 0..2 {
            let idx = i * 2 + q;
            let sector = (idx * len / 512) as u64;
            let data = pattern(100 + idx as u64, len);
            let p = fe.build(q, &BlkReq::write(sector, &data), &Layout::default());
            heads[q].push(p.head);
            pend.push((p, sector, data));
        }
    }
    // Publish all at once on both queues, so both workers are busy together.
    fe.submit_many(0, &heads[0].clone());
    fe.submit_many(1, &heads[1].clone());
    for q in 0..2 {
        let t = fe.timeout;
        let (done, others) = fe.queues[q]
            .wait_heads(&fe.mem, &heads[q], t)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(others.is_empty());
        for (p, _, _) in pend.iter().filter(|(p, _, _)| p.queue == q) {
            let o = fe.outcome(p, done[&p.head]);
            o.assert_ok();
            assert_eq!(o.used_len, 1);
        }
    }
    for (_, sector, data) in &pend {
        assert_file_range(&d.image, sector * 512, data);
    }
    fe.mem.reset_alloc();
    // Now reads on both queues at once, cross-checked.
    let mut rp = Vec::new();
    let mut heads: [Vec<u16>; 2] = [Vec::new(), Vec::new()];
    for (i, (_, sector, data)) in pend.iter().enumerate() {
        let q = (i + 1) % 2; // read on the other queue than the write
        let p = fe.build(
            q,
            &BlkReq::read(*sector, data.len() as u32),
            &Layout::default(),
        );
        heads[q].push(p.head);
        rp.push((p, data.clone()));
    }
    fe.submit_many(0, &heads[0].clone());
    fe.submit_many(1, &heads[1].clone());
    for q in 0..2 {
        let t = fe.timeout;
        let (done, _) = fe.queues[q]
            .wait_heads(&fe.mem, &heads[q], t)
            .unwrap_or_else(|e| panic!("{e}"));
        for (p, data) in rp.iter().filter(|(p, _)| p.queue == q) {
            let o = fe.outcome(p, done[&p.head]);
            o.assert_ok();
            assert!(o.data == *data);
        }
    }
    assert_eq!(
        fe.queues[0].missed_notifications + fe.queues[1].missed_notifications,
        0
    );
}

#[test]
fn four_queues_each_served() {
    let (d, mut fe) = start(Config::default().queues(4));
    assert_eq!(fe.queue_num, 4);
    for q in 0..4 {
        let data = pattern(80 + q as u64, 4096);
        fe.write(q, 100 * q as u64, &data).assert_ok();
        assert_file_range(&d.image, 100 * 512 * q as u64, &data);
        fe.assert_reads((q + 1) % 4, 100 * q as u64, &data);
    }
}

#[test]
fn back_to_back_requests_with_and_without_event_idx() {
    let d = Daemon::start(Config::default());
    for opts in [
        FrontendOpts::default(),
        FrontendOpts::default().no_event_idx(),
    ] {
        let with_idx = opts.event_idx;
        let mut fe = RawFrontend::connect_with(&d.socket, opts).unwrap();
        assert_eq!(fe.acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0, with_idx);
        for i in 0..60u64 {
            let data = pattern(i, 4096);
            fe.write(0, i * 8, &data).assert_ok();
            fe.assert_reads(0, i * 8, &data);
        }
        assert_eq!(fe.queues[0].missed_notifications, 0);
        assert!(fe.queues[0].bogus_ids.is_empty());
        fe.detach().unwrap();
    }
}

#[test]
fn batches_fill_the_queue() {
    // Queue of 64 entries, 3 descriptors per request: 21 requests fill it.
    let d = Daemon::start(Config::default());
    for opts in [
        FrontendOpts::default().queue_size(64),
        FrontendOpts::default().queue_size(64).no_event_idx(),
    ] {
        let mut fe = RawFrontend::connect_with(&d.socket, opts).unwrap();
        for round in 0..6u64 {
            let mut pend = Vec::new();
            let mut heads = Vec::new();
            while fe.queues[0].free_slots() >= 3 {
                let i = pend.len() as u64;
                let sector = round * 1000 + i * 8;
                let data = pattern(round * 100 + i, 4096);
                let p = fe.build(0, &BlkReq::write(sector, &data), &Layout::default());
                heads.push(p.head);
                pend.push((p, sector, data));
            }
            assert_eq!(pend.len(), 21);
            fe.submit_many(0, &heads);
            let t = fe.timeout;
            let (done, _) = fe.queues[0]
                .wait_heads(&fe.mem, &heads, t)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            for (p, sector, data) in &pend {
                fe.outcome(p, done[&p.head]).assert_ok();
                assert_file_range(&d.image, sector * 512, data);
            }
            fe.mem.reset_alloc();
        }
        assert_eq!(fe.queues[0].missed_notifications, 0);
        fe.detach().unwrap();
    }
}

#[test]
fn ring_indices_wrap_around() {
    let d = Daemon::start(Config::default());
    for opts in [
        FrontendOpts::default().queue_size(16).initial_index(65530),
        FrontendOpts::default()
            .queue_size(16)
            .initial_index(65500)
            .no_event_idx(),
    ] {
        let mut fe = RawFrontend::connect_with(&d.socket, opts).unwrap();
        for i in 0..50u64 {
            let data = pattern(500 + i, 1024);
            fe.write(0, i * 2, &data).assert_ok();
            assert_file_range(&d.image, i * 1024, &data);
        }
        // A few batches crossing the wrap as well.
        for i in 0..10u64 {
            let data = pattern(600 + i, 512);
            fe.assert_reads(0, i * 2, &read_file_at(&d.image, i * 1024, 512));
            fe.write(0, 200 + i, &data).assert_ok();
        }
        assert_eq!(fe.queues[0].missed_notifications, 0);
        assert!(fe.queues[0].bogus_ids.is_empty());
        fe.detach().unwrap();
    }
}

#[test]
fn data_outside_guest_memory_fails() {
    let (d, mut fe) = start(Config::default());
    let before = read_file(&d.image);
    // Write whose data lies outside every region.
    let o = fe.request_with(
        0,
        &BlkReq::write(10, &[0x44; 4096]),
        &Layout::default().at(1, OUTSIDE_GPA),
    );
    assert_eq!(o.status, Some(S_IOERR), "write from outside memory: {o:?}");
    // Read into memory outside every region.
    let o = fe.request_with(
        0,
        &BlkReq::read(10, 4096),
        &Layout::default().at(1, OUTSIDE_GPA),
    );
    assert_eq!(o.status, Some(S_IOERR), "read into outside memory: {o:?}");
    // Data running off the end of region B into unmapped space.
    let tail = REGION_B_BASE + REGION_B_SIZE - 1024;
    let o = fe.request_with(
        0,
        &BlkReq::write(20, &[0x55; 4096]),
        &Layout::default().at(1, tail),
    );
    assert_eq!(o.status, Some(S_IOERR), "write running off region B: {o:?}");
    let o = fe.request_with(0, &BlkReq::read(20, 4096), &Layout::default().at(1, tail));
    assert_eq!(o.status, Some(S_IOERR), "read running off region B: {o:?}");
    assert!(read_file(&d.image) == before, "image changed");
    // Still serving on the same queue.
    fe.assert_reads(0, 10, &before[10 * 512..10 * 512 + 4096]);
    let _ = Duration::ZERO;
}

#[test]
fn guest_memory_changes_at_runtime() {
    let d = Daemon::start(Config::default());
    // Start with region A only (via ADD_MEM_REG).
    let mut fe = RawFrontend::connect_with(
        &d.socket,
        FrontendOpts::default().add_mem_reg().initial_regions(1),
    )
    .unwrap();
    let data = pattern(91, 8192);
    fe.write(0, 64, &data).assert_ok();
    // Region B is not known to the daemon yet: a buffer there is outside guest memory.
    let before = read_file(&d.image);
    let in_b = fe.mem.alloc(8192, 8, common::guest::Place::B);
    let o = fe.request_with(
        0,
        &BlkReq::write(64, &[0x99; 4096]),
        &Layout::default().at(1, in_b),
    );
    assert_eq!(
        o.status,
        Some(S_IOERR),
        "write from unknown region B: {o:?}"
    );
    assert!(read_file(&d.image) == before);
    // Hot-add region B, then use it, including a buffer straddling A and B.
    fe.add_region(1).unwrap();
    let o = fe.request_with(0, &BlkReq::read(64, 8192), &Layout::default().region_b());
    o.assert_ok();
    assert!(o.data == data);
    let o = fe.request_with(0, &BlkReq::read(64, 8192), &Layout::default().span(1));
    o.assert_ok();
    assert!(o.data == data);
    // Remove it again: region B buffers fail, region A still works.
    fe.remove_region(1).unwrap();
    let in_b = fe.mem.alloc(8192, 8, common::guest::Place::B);
    let o = fe.request_with(0, &BlkReq::read(64, 4096), &Layout::default().at(1, in_b));
    assert_eq!(o.status, Some(S_IOERR), "read into removed region B: {o:?}");
    fe.assert_reads(0, 64, &data);
    // A full SET_MEM_TABLE replacing the table with both regions.
    fe.set_mem_table(&[0, 1]).unwrap();
    let o = fe.request_with(0, &BlkReq::read(64, 8192), &Layout::default().span(1));
    o.assert_ok();
    assert!(o.data == data);
}

#[test]
fn maximum_segment_count_and_size() {
    let (d, mut fe) = start(Config::default());
    let cfg = fe.config();
    let seg_max = cfg.seg_max as usize;
    assert_eq!(seg_max, 254);
    // Direct chain using every descriptor of the 256-entry ring: header + 254 segments + status.
    let data = pattern(95, seg_max * 512);
    let mut split = vec![16];
    split.extend(std::iter::repeat_n(512, seg_max));
    fe.request_with(
        0,
        &BlkReq::write(3000, &data),
        &Layout::default().split_out(&split),
    )
    .assert_ok();
    assert_file_range(&d.image, 3000 * 512, &data);
    let mut split: Vec<u32> = std::iter::repeat_n(512, seg_max).collect();
    split.push(1);
    let o = fe.request_with(
        0,
        &BlkReq::read(3000, data.len() as u32),
        &Layout::default().split_in(&split),
    );
    o.assert_ok();
    assert!(o.data == data);
    // The same through an indirect table.
    let o = fe.request_with(
        0,
        &BlkReq::read(3000, data.len() as u32),
        &Layout::default().indirect().split_in(&split),
    );
    o.assert_ok();
    assert!(o.data == data);
    // One segment of size_max bytes (capped at 4 MiB for the test's memory).
    let seg = cfg.size_max.min(4 << 20) / 512 * 512;
    let data = pattern(96, seg as usize);
    fe.write(0, 100, &data).assert_ok();
    assert_file_range(&d.image, 100 * 512, &data);
    fe.assert_reads(0, 100, &data);
}
