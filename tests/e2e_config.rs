//! Feature negotiation, config space (GET_CONFIG / SET_CONFIG) and read-only exports.

mod common;

use common::blk::*;
use common::daemon::{Config, Daemon};
use common::raw::{FrontendOpts, RawFrontend};
use common::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures as P;

const IMG: u64 = 16 << 20;

fn expected_features(read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | F_PROTOCOL_FEATURES;
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

fn describe_bits(x: u64) -> Vec<u32> {
    (0..64).filter(|b| x & (1u64 << b) != 0).collect()
}

#[test]
fn offered_virtio_and_protocol_features() {
    let d = Daemon::start(Config::default());
    let fe = RawFrontend::connect(&d.socket);
    let want = expected_features(false);
    assert_eq!(
        fe.features,
        want,
        "offered features; missing bits {:?}, extra bits {:?}",
        describe_bits(want & !fe.features),
        describe_bits(fe.features & !want)
    );
    for p in [P::CONFIG, P::MQ, P::CONFIGURE_MEM_SLOTS, P::REPLY_ACK] {
        assert!(
            fe.protocol.contains(p),
            "protocol feature {p:?} missing: {:?}",
            fe.protocol
        );
    }
    assert!(
        !fe.protocol.contains(P::INFLIGHT_SHMFD),
        "INFLIGHT_SHMFD must not be offered"
    );
    assert_eq!(
        fe.acked_protocol,
        P::CONFIG | P::MQ | P::CONFIGURE_MEM_SLOTS | P::REPLY_ACK
    );
}

#[test]
fn config_space_defaults() {
    let d = Daemon::start(Config::default().queues(3));
    let mut fe = RawFrontend::connect(&d.socket);
    let c = fe.config();
    assert_eq!(c.raw.len(), CONFIG_SIZE);
    assert_eq!(c.capacity, IMG / 512, "capacity");
    assert!(c.size_max >= 4096, "size_max {}", c.size_max);
    assert_eq!(c.seg_max, 256 - 2, "seg_max = queue size - 2");
    assert_eq!(c.blk_size, 512, "blk_size");
    assert!(
        c.physical_block_exp <= 7,
        "physical_block_exp {} out of a sane range",
        c.physical_block_exp
    );
    assert!(c.min_io_size >= 1, "min_io_size {}", c.min_io_size);
    assert_eq!(c.wce, 1, "writeback by default");
    assert_eq!(c.num_queues, 3, "num_queues");
    assert!(c.max_discard_sectors > 0, "max_discard_sectors");
    assert_eq!(c.max_discard_seg, 1, "max_discard_seg");
    assert_eq!(
        c.discard_sector_alignment, 1,
        "discard_sector_alignment = lbs/512"
    );
    assert!(c.max_write_zeroes_sectors > 0, "max_write_zeroes_sectors");
    assert_eq!(c.max_write_zeroes_seg, 1, "max_write_zeroes_seg");
    assert_eq!(c.write_zeroes_may_unmap, 1, "write_zeroes_may_unmap");
    assert!(
        c.raw[60..].iter().all(|&b| b == 0),
        "secure-erase/zoned fields should be zero: {:?}",
        &c.raw[60..]
    );
    assert_eq!(fe.queue_num, 3);
}

#[test]
fn config_space_follows_options() {
    let d = Daemon::start(
        Config::default()
            .lbs(4096)
            .queue_size(128)
            .write_cache("writethrough")
            .queues(2),
    );
    let mut fe =
        RawFrontend::connect_with(&d.socket, FrontendOpts::default().queue_size(128)).unwrap();
    let c = fe.config();
    assert_eq!(c.blk_size, 4096);
    assert_eq!(c.capacity, IMG / 512, "capacity stays in 512-byte units");
    assert_eq!(c.seg_max, 126, "seg_max = queue size - 2");
    assert_eq!(c.wce, 0, "writethrough");
    assert_eq!(c.num_queues, 2);
    assert_eq!(
        c.discard_sector_alignment, 8,
        "discard_sector_alignment = 4096/512"
    );
    // The physical block is never smaller than the logical block.
    assert!(c.physical_block_exp <= 4);
    // I/O still works with these settings.
    let data = pattern(3, 4096);
    fe.write(1, 8, &data).assert_ok();
    assert_file_range(&d.image, 8 * 512, &data);
}

#[test]
fn queue_size_limit_is_enforced() {
    let d = Daemon::start(Config::default().queue_size(128));
    // A frontend asking for a bigger ring than --queue-size is refused.
    let r = RawFrontend::connect_with(&d.socket, FrontendOpts::default().queue_size(256));
    assert!(
        r.is_err(),
        "SET_VRING_NUM 256 accepted with --queue-size 128"
    );
    // Smaller rings are fine.
    let mut fe =
        RawFrontend::connect_with(&d.socket, FrontendOpts::default().queue_size(64)).unwrap();
    fe.flush(0).assert_ok();
    drop(fe);
    let d = Daemon::start(Config::default().queue_size(1024));
    let mut fe =
        RawFrontend::connect_with(&d.socket, FrontendOpts::default().queue_size(1024)).unwrap();
    assert_eq!(fe.config().seg_max, 1022);
    fe.flush(0).assert_ok();
}

#[test]
fn get_config_at_odd_offsets_and_sizes() {
    let d = Daemon::start(Config::default().queues(2));
    let mut fe = RawFrontend::connect(&d.socket);
    let full = fe.get_config(0, CONFIG_SIZE as u32).unwrap();
    assert_eq!(full.len(), CONFIG_SIZE);
    let mut padded = full.clone();
    padded.resize(4096, 0);
    let cases: &[(u32, u32)] = &[
        (0, 1),
        (0, 8),
        (1, 3),
        (5, 7),
        (8, 4),
        (20, 4),
        (32, 1),
        (33, 1),
        (34, 2),
        (33, 50),
        (57, 3),
        (60, 36),
        (90, 6),
        (95, 1),
        (95, 2),
        (96, 1),
        (96, 4),
        (100, 16),
        (0, 97),
        (0, 128),
        (0, 256),
        (200, 8),
        (1000, 24),
        (4000, 96),
    ];
    for &(off, size) in cases {
        let got = fe
            .get_config(off, size)
            .unwrap_or_else(|e| panic!("GET_CONFIG({off}, {size}): {e}"));
        assert_eq!(got.len(), size as usize, "GET_CONFIG({off}, {size}) length");
        assert_eq!(
            got,
            padded[off as usize..(off + size) as usize],
            "GET_CONFIG({off}, {size}) contents"
        );
    }
    // The connection still works afterwards.
    fe.flush(0).assert_ok();
}

#[test]
fn set_config_switches_write_cache() {
    let d = Daemon::start(Config::default());
    let mut fe = RawFrontend::connect(&d.socket);
    assert!(fe.acked & bit(VIRTIO_BLK_F_CONFIG_WCE) != 0);
    assert_eq!(fe.config().wce, 1);
    fe.set_config(cfg_off::WCE as u32, &[0]).unwrap();
    assert_eq!(fe.config().wce, 0, "wce after SET_CONFIG 0");
    assert_eq!(fe.get_config(cfg_off::WCE as u32, 1).unwrap(), vec![0]);
    // Writes and flushes work in writethrough mode.
    let data = pattern(9, 8192);
    fe.write(0, 64, &data).assert_ok();
    assert_file_range(&d.image, 64 * 512, &data);
    fe.flush(0).assert_ok();
    fe.set_config(cfg_off::WCE as u32, &[1]).unwrap();
    assert_eq!(fe.config().wce, 1, "wce after SET_CONFIG 1");
    fe.write(0, 80, &data).assert_ok();
    assert_file_range(&d.image, 80 * 512, &data);
    // Other fields are not writable: capacity stays.
    let cap = fe.config().capacity;
    let _ = fe.set_config(cfg_off::CAPACITY as u32, &[1, 0, 0, 0, 0, 0, 0, 0]);
    let c = fe.config();
    assert_eq!(c.capacity, cap, "capacity changed by SET_CONFIG");
    assert_eq!(c.wce, 1);
    // The mode set by one frontend is visible to the next connection's GET_CONFIG
    // (device state), or reset to the configured default: either is fine, but it must be 0 or 1.
    fe.set_config(cfg_off::WCE as u32, &[0]).unwrap();
    drop(fe);
    let mut fe2 = RawFrontend::connect(&d.socket);
    let w = fe2.config().wce;
    assert!(w == 0 || w == 1);
    fe2.flush(0).assert_ok();
}

#[test]
fn writethrough_mode_from_the_command_line() {
    let d = Daemon::start(Config::default().write_cache("writethrough"));
    let mut fe = RawFrontend::connect(&d.socket);
    assert_eq!(fe.config().wce, 0);
    fe.set_config(cfg_off::WCE as u32, &[1]).unwrap();
    assert_eq!(fe.config().wce, 1);
    let data = pattern(10, 4096);
    fe.write(0, 8, &data).assert_ok();
    assert_file_range(&d.image, 8 * 512, &data);
}

#[test]
fn read_only_export() {
    let d = Daemon::start(Config::default().read_only());
    let mut fe = RawFrontend::connect(&d.socket);
    let want = expected_features(true);
    assert_eq!(
        fe.features,
        want,
        "read-only features; missing {:?}, extra {:?}",
        describe_bits(want & !fe.features),
        describe_bits(fe.features & !want)
    );
    assert!(fe.acked & bit(VIRTIO_BLK_F_RO) != 0);
    let before = read_file(&d.image);
    // Reads work.
    fe.assert_reads(0, 0, &before[..8192]);
    // Writes, discards and write-zeroes are refused with IOERR and change nothing.
    let o = fe.write(0, 0, &[0x66; 4096]);
    assert_eq!(o.status, Some(S_IOERR), "write on read-only: {o:?}");
    let o = fe.discard(0, 0, 8);
    assert_eq!(o.status, Some(S_IOERR), "discard on read-only: {o:?}");
    let o = fe.write_zeroes(0, 0, 8, false);
    assert_eq!(o.status, Some(S_IOERR), "write-zeroes on read-only: {o:?}");
    let o = fe.write_zeroes(0, 0, 8, true);
    assert_eq!(
        o.status,
        Some(S_IOERR),
        "write-zeroes+unmap on read-only: {o:?}"
    );
    // Multi-segment and indirect writes too.
    let o = fe.request_with(
        0,
        &BlkReq::write(16, &[0x67; 8192]),
        &Layout::default().indirect().split_out(&[16, 4096, 4096]),
    );
    assert_eq!(
        o.status,
        Some(S_IOERR),
        "indirect write on read-only: {o:?}"
    );
    // Flush and GET_ID are fine.
    fe.flush(0).assert_ok();
    fe.get_id(0).assert_ok();
    assert!(read_file(&d.image) == before, "read-only image changed");
    // The config space: no discard/write-zeroes limits advertised is fine, the
    // feature bits are what matter; capacity is right.
    assert_eq!(fe.config().capacity, IMG / 512);
}

#[test]
fn frontend_without_mq_protocol_feature_gets_one_queue() {
    let d = Daemon::start(Config::default().queues(2));
    let mut fe = RawFrontend::connect_with(
        &d.socket,
        FrontendOpts::default().protocol(P::REPLY_ACK | P::CONFIG),
    )
    .unwrap();
    assert_eq!(fe.queues.len(), 1);
    let data = pattern(4, 4096);
    fe.write(0, 0, &data).assert_ok();
    fe.assert_reads(0, 0, &data);
}

#[test]
fn frontend_acking_few_features() {
    // A minimal driver: no EVENT_IDX, no INDIRECT, no MQ/DISCARD/WRITE_ZEROES/WCE.
    let d = Daemon::start(Config::default());
    let drop = bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_TOPOLOGY);
    let mut fe =
        RawFrontend::connect_with(&d.socket, FrontendOpts::default().drop_features(drop)).unwrap();
    assert_eq!(fe.acked & drop, 0);
    for i in 0..20u64 {
        let data = pattern(i, 2048);
        fe.write(0, i * 4, &data).assert_ok();
        fe.assert_reads(0, i * 4, &data);
    }
    fe.flush(0).assert_ok();
}
