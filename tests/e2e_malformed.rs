//! Malformed descriptor chains. Each case checks what comes back in the used ring, that
//! nothing reached the disk (or the guest buffers), and that the daemon then still serves a
//! well-formed request on the same queue.

mod common;

use common::blk::*;
use common::daemon::{Config, Daemon};
use common::guest::{OUTSIDE_GPA, Place};
use common::raw::{FrontendOpts, RawFrontend};
use common::virtq::{Desc, Link};
use common::*;

struct Env {
    d: Daemon,
    fe: RawFrontend,
    image_before: Vec<u8>,
}

fn env() -> Env {
    env_with(FrontendOpts::default())
}

fn env_with(opts: FrontendOpts) -> Env {
    let d = Daemon::start(Config::default().queues(2));
    let fe = RawFrontend::connect_with(&d.socket, opts).unwrap();
    let image_before = read_file(&d.image);
    Env {
        d,
        fe,
        image_before,
    }
}

/// Expected result of a malformed chain.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Returned with used length 0; the status byte (if any) untouched.
    UsedZero,
    /// Status IOERR.
    IoErr,
    /// Returned in the used ring; anything but success.
    NotOk,
    /// Only: returned in the used ring (behaviour beyond the contract is printed).
    Returned,
}

impl Env {
    fn hdr(&mut self, type_: u32, sector: u64) -> u64 {
        self.fe.buf_with(&header(type_, 0, sector), Place::A)
    }
    fn data(&mut self, len: u32) -> u64 {
        self.fe.buf_with(&pattern(0xBAD, len as usize), Place::A)
    }
    fn status(&mut self) -> u64 {
        self.fe.buf(1, STATUS_UNTOUCHED, Place::A)
    }

    /// Submit a chain on queue `q`, wait for it, check the expectation.
    #[track_caller]
    fn run(&mut self, q: usize, what: &str, descs: &[Desc], status: Option<u64>, expect: Expect) {
        self.run_keep(q, what, descs, status, expect, &[]);
    }

    /// Like `run`, and also check that the guest buffers `keep` (filled with 0xA5 by the
    /// test) were not written by the device.
    #[track_caller]
    fn run_keep(
        &mut self,
        q: usize,
        what: &str,
        descs: &[Desc],
        status: Option<u64>,
        expect: Expect,
        keep: &[(u64, u32)],
    ) {
        let head = self.fe.add_chain(q, descs);
        self.finish(q, what, head, status, expect, keep);
    }

    #[track_caller]
    fn finish(
        &mut self,
        q: usize,
        what: &str,
        head: u16,
        status: Option<u64>,
        expect: Expect,
        keep: &[(u64, u32)],
    ) {
        self.fe.submit(q, head);
        let used = self.fe.wait_head(q, head);
        let st = status
            .filter(|g| self.fe.mem.is_covered(*g, 1))
            .map(|g| self.fe.mem.read_u8(g));
        eprintln!("{what}: used_len {used}, status {st:?}");
        match expect {
            Expect::UsedZero => {
                assert_eq!(used, 0, "{what}: used len (status {st:?})");
                if let Some(s) = st {
                    assert_eq!(s, STATUS_UNTOUCHED, "{what}: status byte was written");
                }
            }
            Expect::IoErr => assert_eq!(st, Some(S_IOERR), "{what}: status (used len {used})"),
            Expect::NotOk => assert!(
                used == 0 || matches!(st, Some(S_IOERR) | Some(S_UNSUPP)),
                "{what}: expected failure, got used len {used}, status {st:?}"
            ),
            Expect::Returned => {
                // Beyond the contract: only report what happened on disk.
                let now = read_file(&self.d.image);
                if now != self.image_before {
                    eprintln!("{what}: NOTE: the daemon performed I/O for this chain");
                    self.image_before = now;
                }
            }
        }
        for &(g, l) in keep {
            assert!(
                self.fe.mem.read(g, l as usize).iter().all(|&b| b == 0xA5),
                "{what}: the device wrote guest buffer {g:#x}+{l}"
            );
        }
        self.after(q, what);
    }

    /// Nothing on disk changed and the queue still works.
    #[track_caller]
    fn after(&mut self, q: usize, what: &str) {
        assert!(
            read_file(&self.d.image) == self.image_before,
            "{what}: image changed"
        );
        assert!(
            self.d.try_wait().is_none(),
            "{what}: daemon exited: {:?}",
            self.d.try_wait()
        );
        let expect = self.image_before[4096..8192].to_vec();
        self.fe.assert_reads(q, 8, &expect);
        let data = pattern(0x600D, 4096);
        self.fe.write(q, 16, &data).assert_ok();
        assert_file_range(&self.d.image, 16 * 512, &data);
        // Put the original content back so the image comparison stays valid.
        let orig = self.image_before[16 * 512..16 * 512 + 4096].to_vec();
        self.fe.write(q, 16, &orig).assert_ok();
        self.fe.mem_reset_if_idle();
    }
}

#[test]
fn write_without_any_writable_descriptor() {
    let mut e = env();
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(512);
    e.run(
        1,
        "OUT hdr+data, no status",
        &[Desc::r(h, 16), Desc::r(d, 512)],
        None,
        Expect::UsedZero,
    );
    let h = e.hdr(VIRTIO_BLK_T_FLUSH, 0);
    e.run(
        1,
        "FLUSH header only",
        &[Desc::r(h, 16)],
        None,
        Expect::UsedZero,
    );
    let h = e.hdr(VIRTIO_BLK_T_IN, 0);
    e.run(
        1,
        "IN header only",
        &[Desc::r(h, 16)],
        None,
        Expect::UsedZero,
    );
}

#[test]
fn zero_length_status_descriptor() {
    let mut e = env();
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(512);
    let s = e.status();
    e.run(
        0,
        "OUT with 0-byte status",
        &[Desc::r(h, 16), Desc::r(d, 512), Desc::w(s, 0)],
        Some(s),
        Expect::UsedZero,
    );
    let h = e.hdr(VIRTIO_BLK_T_FLUSH, 0);
    let s = e.status();
    e.run(
        0,
        "FLUSH with 0-byte status",
        &[Desc::r(h, 16), Desc::w(s, 0)],
        Some(s),
        Expect::UsedZero,
    );
}

#[test]
fn read_only_status_descriptor() {
    let mut e = env();
    // Read: data writable, status device-readable.
    let h = e.hdr(VIRTIO_BLK_T_IN, 8);
    let d = e.fe.buf(4096, 0xA5, Place::A);
    let s = e.status();
    e.run_keep(
        0,
        "IN with read-only status",
        &[Desc::r(h, 16), Desc::w(d, 4096), Desc::r(s, 1)],
        Some(s),
        Expect::UsedZero,
        &[(d, 4096)],
    );
    // Write with the status device-readable.
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(4096);
    let s = e.status();
    e.run(
        0,
        "OUT with read-only status",
        &[Desc::r(h, 16), Desc::r(d, 4096), Desc::r(s, 1)],
        Some(s),
        Expect::UsedZero,
    );
}

#[test]
fn status_outside_guest_memory() {
    let mut e = env();
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(4096);
    e.run(
        0,
        "OUT with status outside memory",
        &[Desc::r(h, 16), Desc::r(d, 4096), Desc::w(OUTSIDE_GPA, 1)],
        None,
        Expect::UsedZero,
    );
    let h = e.hdr(VIRTIO_BLK_T_IN, 8);
    let d = e.fe.buf(4096, 0xA5, Place::A);
    e.run_keep(
        0,
        "IN with status outside memory",
        &[
            Desc::r(h, 16),
            Desc::w(d, 4096),
            Desc::w(OUTSIDE_GPA + 4096, 1),
        ],
        None,
        Expect::UsedZero,
        &[(d, 4096)],
    );
    // Data and status in one descriptor that runs off the end of guest memory.
    let h = e.hdr(VIRTIO_BLK_T_IN, 8);
    let end = common::guest::REGION_B_BASE + common::guest::REGION_B_SIZE;
    e.run(
        0,
        "IN with data+status running off memory",
        &[Desc::r(h, 16), Desc::w(end - 512, 513)],
        None,
        Expect::UsedZero,
    );
    let h = e.hdr(VIRTIO_BLK_T_FLUSH, 0);
    e.run(
        0,
        "FLUSH with status outside memory",
        &[Desc::r(h, 16), Desc::w(OUTSIDE_GPA, 1)],
        None,
        Expect::UsedZero,
    );
}

#[test]
fn header_too_short_or_unreadable() {
    let mut e = env();
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let s = e.status();
    e.run(
        0,
        "8-byte header",
        &[Desc::r(h, 8), Desc::w(s, 1)],
        Some(s),
        Expect::NotOk,
    );
    let s = e.status();
    e.run(
        0,
        "header outside memory",
        &[Desc::r(OUTSIDE_GPA, 16), Desc::w(s, 1)],
        Some(s),
        Expect::NotOk,
    );
    // A write whose header is outside memory but whose data is fine: must not write.
    let d = e.data(4096);
    let s = e.status();
    e.run(
        0,
        "OUT with header outside memory",
        &[Desc::r(OUTSIDE_GPA, 16), Desc::r(d, 4096), Desc::w(s, 1)],
        Some(s),
        Expect::NotOk,
    );
    // Device-writable header.
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(4096);
    let s = e.status();
    e.run(
        0,
        "device-writable header",
        &[Desc::w(h, 16), Desc::w(d, 4096), Desc::w(s, 1)],
        Some(s),
        Expect::NotOk,
    );
    // Zero-length header descriptor followed by nothing readable.
    let s = e.status();
    e.run(
        0,
        "0-byte header",
        &[Desc::r(h, 0), Desc::w(s, 1)],
        Some(s),
        Expect::NotOk,
    );
}

#[test]
fn wrong_data_direction() {
    let mut e = env();
    // IN whose data buffer is device-readable.
    let h = e.hdr(VIRTIO_BLK_T_IN, 8);
    let d = e.fe.buf(4096, 0xA5, Place::A);
    let s = e.status();
    e.run_keep(
        0,
        "IN with device-readable data",
        &[Desc::r(h, 16), Desc::r(d, 4096), Desc::w(s, 1)],
        Some(s),
        Expect::IoErr,
        &[(d, 4096)],
    );
    // OUT whose data buffer is device-writable.
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(4096);
    let s = e.status();
    e.run(
        0,
        "OUT with device-writable data",
        &[Desc::r(h, 16), Desc::w(d, 4096), Desc::w(s, 1)],
        Some(s),
        Expect::IoErr,
    );
    // Through the layout helper too (flip the data piece).
    let o = e.fe.request_with(
        0,
        &BlkReq::write(0, &[0x77; 4096]),
        &Layout::default().flip(1),
    );
    assert_eq!(o.status, Some(S_IOERR), "OUT (flipped data): {o:?}");
    let o =
        e.fe.request_with(0, &BlkReq::read(0, 4096), &Layout::default().flip(1));
    assert_eq!(o.status, Some(S_IOERR), "IN (flipped data): {o:?}");
    e.after(0, "flipped data");
    // Discard whose segment is device-writable.
    let h = e.hdr(VIRTIO_BLK_T_DISCARD, 0);
    let seg = e.fe.buf_with(&dwz_segment(0, 8, 0), Place::A);
    let s = e.status();
    e.run(
        0,
        "DISCARD with device-writable segment",
        &[Desc::r(h, 16), Desc::w(seg, 16), Desc::w(s, 1)],
        Some(s),
        Expect::IoErr,
    );
}

#[test]
fn readable_descriptor_after_writable() {
    let mut e = env();
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d1 = e.data(512);
    let x = e.fe.buf(512, 0xA5, Place::A);
    let d2 = e.data(512);
    let s = e.status();
    e.run(
        0,
        "OUT with writable desc between data",
        &[
            Desc::r(h, 16),
            Desc::r(d1, 512),
            Desc::w(x, 512),
            Desc::r(d2, 512),
            Desc::w(s, 1),
        ],
        Some(s),
        Expect::NotOk,
    );
    let h = e.hdr(VIRTIO_BLK_T_IN, 8);
    let d1 = e.fe.buf(512, 0xA5, Place::A);
    let r = e.data(512);
    let d2 = e.fe.buf(512, 0xA5, Place::A);
    let s = e.status();
    e.run(
        0,
        "IN with readable desc between data",
        &[
            Desc::r(h, 16),
            Desc::w(d1, 512),
            Desc::r(r, 512),
            Desc::w(d2, 512),
            Desc::w(s, 1),
        ],
        Some(s),
        Expect::NotOk,
    );
}

#[test]
fn next_index_out_of_range() {
    let mut e = env();
    let qsize = e.fe.queues[0].size;
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(4096);
    let s = e.status();
    e.run(
        0,
        "OUT, status NEXT -> out of range",
        &[
            Desc::r(h, 16),
            Desc::r(d, 4096),
            Desc::w(s, 1).link(Link::To(qsize + 7)),
        ],
        Some(s),
        Expect::Returned,
    );
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    e.run(
        0,
        "header NEXT -> out of range",
        &[Desc::r(h, 16).link(Link::To(u16::MAX))],
        None,
        Expect::Returned,
    );
}

#[test]
fn descriptor_loop() {
    let mut e = env();
    let h = e.hdr(VIRTIO_BLK_T_IN, 8);
    let d = e.fe.buf(512, 0xA5, Place::A);
    let slots = e.fe.queues[0].alloc_slots(2);
    let descs = [
        Desc::r(h, 16).link(Link::To(slots[1])),
        Desc::w(d, 512).link(Link::To(slots[0])),
    ];
    let head = e.fe.queues[0].write_chain(&e.fe.mem, slots, &descs);
    e.finish(0, "two-descriptor loop", head, None, Expect::Returned, &[]);
    // A self loop.
    let h = e.hdr(VIRTIO_BLK_T_FLUSH, 0);
    let slots = e.fe.queues[0].alloc_slots(1);
    let descs = [Desc::r(h, 16).link(Link::To(slots[0]))];
    let head = e.fe.queues[0].write_chain(&e.fe.mem, slots, &descs);
    e.finish(0, "self loop", head, None, Expect::Returned, &[]);
}

#[test]
fn bad_indirect_tables() {
    let mut e = env();
    assert!(e.fe.acked & bit(VIRTIO_RING_F_INDIRECT_DESC) != 0);
    // Nested indirect.
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(512);
    let s = e.status();
    let (inner, inner_len) =
        e.fe.indirect_table(&[Desc::r(h, 16), Desc::r(d, 512), Desc::w(s, 1)]);
    let (outer, outer_len) = e.fe.indirect_table(&[Desc::indirect(inner, inner_len)]);
    e.run(
        0,
        "nested indirect",
        &[Desc::indirect(outer, outer_len)],
        Some(s),
        Expect::Returned,
    );
    // Table length not a multiple of 16.
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(512);
    let s = e.status();
    let (t, _) =
        e.fe.indirect_table(&[Desc::r(h, 16), Desc::r(d, 512), Desc::w(s, 1)]);
    e.run(
        0,
        "indirect table of 40 bytes",
        &[Desc::indirect(t, 40)],
        Some(s),
        Expect::Returned,
    );
    // Zero-length table.
    e.run(
        0,
        "indirect table of 0 bytes",
        &[Desc::indirect(t, 0)],
        None,
        Expect::Returned,
    );
    // Table outside guest memory.
    e.run(
        0,
        "indirect table outside memory",
        &[Desc::indirect(OUTSIDE_GPA, 48)],
        None,
        Expect::Returned,
    );
    // INDIRECT together with NEXT (forbidden for drivers).
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(512);
    let s = e.status();
    let (t, tl) =
        e.fe.indirect_table(&[Desc::r(h, 16), Desc::r(d, 512), Desc::w(s, 1)]);
    let s2 = e.status();
    e.run(
        0,
        "INDIRECT with NEXT",
        &[Desc::indirect(t, tl), Desc::w(s2, 1)],
        Some(s2),
        Expect::Returned,
    );
    // Indirect table whose own descriptors link out of the table.
    let h = e.hdr(VIRTIO_BLK_T_OUT, 0);
    let d = e.data(512);
    let s = e.status();
    let (t, tl) = e.fe.indirect_table(&[
        Desc::r(h, 16),
        Desc::r(d, 512).link(Link::To(9)),
        Desc::w(s, 1),
    ]);
    e.run(
        0,
        "indirect next out of table",
        &[Desc::indirect(t, tl)],
        Some(s),
        Expect::Returned,
    );
    // An INDIRECT flag set on a descriptor that also carries WRITE and NEXT.
    let h = e.hdr(VIRTIO_BLK_T_FLUSH, 0);
    let s = e.status();
    let (t, tl) = e.fe.indirect_table(&[Desc::r(h, 16), Desc::w(s, 1)]);
    e.run(
        0,
        "indirect flags INDIRECT|WRITE",
        &[Desc::indirect(t, tl).with_flags(common::virtq::VRING_DESC_F_WRITE)],
        Some(s),
        Expect::Returned,
    );
}

#[test]
fn bad_discard_and_write_zeroes_payloads() {
    let mut e = env();
    // Two segments although max_discard_seg is 1.
    let mut payload = dwz_segment(0, 8, 0).to_vec();
    payload.extend_from_slice(&dwz_segment(64, 8, 0));
    let mut req = BlkReq::discard(0, 8);
    req.out_data = payload.clone();
    let o = e.fe.request(0, &req);
    assert!(
        matches!(o.status, Some(S_IOERR) | Some(S_UNSUPP)),
        "DISCARD with 2 segments: {o:?}"
    );
    let mut req = BlkReq::write_zeroes(0, 8, false);
    req.out_data = payload;
    let o = e.fe.request(0, &req);
    assert!(
        matches!(o.status, Some(S_IOERR) | Some(S_UNSUPP)),
        "WRITE_ZEROES with 2 segments: {o:?}"
    );
    // Short payload (8 bytes).
    let mut req = BlkReq::discard(0, 8);
    req.out_data.truncate(8);
    let o = e.fe.request(0, &req);
    assert_eq!(
        o.status,
        Some(S_IOERR),
        "DISCARD with an 8-byte payload: {o:?}"
    );
    // No payload at all.
    let mut req = BlkReq::write_zeroes(0, 8, false);
    req.out_data.clear();
    let o = e.fe.request(0, &req);
    assert_eq!(
        o.status,
        Some(S_IOERR),
        "WRITE_ZEROES without payload: {o:?}"
    );
    // Discard segment pointing outside the disk.
    let o = e.fe.discard(0, 1 << 40, 8);
    assert_eq!(o.status, Some(S_IOERR), "DISCARD beyond the disk: {o:?}");
    e.after(0, "bad discard payloads");
}

#[test]
fn avail_index_beyond_the_ring_stops_only_that_queue() {
    let mut e = env();
    // The driver claims more new requests than the ring holds, and keeps kicking.
    let q = &e.fe.queues[0];
    let bogus = q.avail_idx.wrapping_add(q.size + 1);
    e.fe.mem.write_u16(q.avail + 2, bogus);
    for _ in 0..2000 {
        e.fe.queues[0].kick.write(1).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The other queue serves as before.
    e.after(1, "bogus avail index on queue 0");
    // The daemon still answers the frontend: stopping the broken ring completes.
    let mut det = e.fe.detach().unwrap();
    let log = e.d.stderr_text();
    let lines = log.lines().count();
    assert!(
        lines < 60,
        "a broken ring flooded the log ({lines} lines):\n{}",
        e.d.stderr_excerpt(20, 20)
    );
    assert!(
        log.contains("cannot read the available ring"),
        "the broken ring was not reported:\n{}",
        e.d.stderr_excerpt(20, 20)
    );
    // Set up again from the base the daemon reported, the queue works again.
    let base = det.bases[0] as u16;
    det.queues[0].avail_idx = base;
    det.mem.write_u16(det.queues[0].avail + 2, base);
    for q in &mut det.queues {
        q.force_kick = true;
    }
    e.fe = RawFrontend::attach(&e.d.socket, FrontendOpts::default(), det).unwrap();
    e.after(0, "queue 0 after it was set up again");
}
