//! Daemon lifecycle: worker threads, reconnects, SIGTERM/SIGINT with and without I/O in
//! flight, socket safety, image creation with --size, and refused command lines.

#![allow(clippy::needless_range_loop)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::blk::*;
use common::daemon::{Config, Daemon, describe, test_dir};
use common::raw::{FrontendOpts, RawFrontend};
use common::*;

const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

fn count_workers(names: &[String]) -> usize {
    names
        .iter()
        .filter(|n| n.as_str() == "vring_worker")
        .count()
}

#[test]
fn one_vring_worker_thread_per_queue() {
    for n in [1usize, 3] {
        let d = Daemon::start(Config::default().queues(n as u32));
        let mut fe = RawFrontend::connect(&d.socket);
        for q in 0..n {
            fe.flush(q).assert_ok();
        }
        let (names, ok) = d.wait_threads(Duration::from_secs(5), |t| count_workers(t) == n);
        assert!(
            ok,
            "--queues {n}: expected {n} vring_worker threads, got {names:?}"
        );
        // After a reconnect the old workers are gone: still exactly n.
        drop(fe);
        let mut fe = RawFrontend::connect(&d.socket);
        fe.flush(0).assert_ok();
        let (names, ok) = d.wait_threads(Duration::from_secs(5), |t| count_workers(t) == n);
        assert!(
            ok,
            "after a reconnect: expected {n} workers (old ones joined), got {names:?}"
        );
        drop(fe);
        // And no more than n once the frontend left.
        let (names, ok) = d.wait_threads(Duration::from_secs(5), |t| count_workers(t) <= n);
        assert!(ok, "after disconnect: at most {n} workers, got {names:?}");
    }
}

#[test]
fn second_frontend_resumes_rings_after_disconnect() {
    let d = Daemon::start(Config::default().queues(2));
    let mut fe = RawFrontend::connect(&d.socket);
    let a = pattern(1, 8192);
    let b = pattern(2, 8192);
    for i in 0..5u64 {
        fe.write(0, i * 16, &a).assert_ok();
        fe.write(1, 200 + i * 16, &b).assert_ok();
    }
    let avail: Vec<u16> = fe.queues.iter().map(|q| q.avail_idx).collect();
    let detached = fe.detach().unwrap();
    assert_eq!(
        detached.bases,
        avail.iter().map(|&x| x as u32).collect::<Vec<_>>(),
        "GET_VRING_BASE should return the next avail index"
    );
    // Same memory and rings, restored with SET_VRING_BASE.
    let mut fe = RawFrontend::attach(&d.socket, FrontendOpts::default(), detached).unwrap();
    fe.assert_reads(1, 0, &a);
    fe.assert_reads(0, 200, &b);
    let c = pattern(3, 4096);
    fe.write(1, 500, &c).assert_ok();
    assert_file_range(&d.image, 500 * 512, &c);
    assert!(fe.queues.iter().all(|q| q.bogus_ids.is_empty()));
    // Abrupt disconnect (no GET_VRING_BASE), then a brand-new frontend from index 0.
    drop(fe);
    let mut fe = RawFrontend::connect(&d.socket);
    fe.assert_reads(0, 500, &c);
    let e = pattern(4, 4096);
    fe.write(1, 600, &e).assert_ok();
    assert_file_range(&d.image, 600 * 512, &e);
}

#[test]
fn many_reconnects() {
    let d = Daemon::start(Config::default());
    let mut detached = RawFrontend::connect(&d.socket).detach().unwrap();
    for i in 0..15u64 {
        let mut fe = RawFrontend::attach(&d.socket, FrontendOpts::default(), detached).unwrap();
        let data = pattern(i, 4096);
        fe.write(0, i * 8, &data).assert_ok();
        fe.assert_reads(0, i * 8, &data);
        detached = fe.detach().unwrap();
    }
    for i in 0..15u64 {
        assert_file_range(&d.image, i * 4096, &pattern(i, 4096));
    }
}

#[test]
fn disconnect_with_requests_in_flight() {
    disconnect_with_requests_in_flight_cfg(Config::default());
}

#[test]
fn disconnect_with_requests_in_flight_while_polling() {
    disconnect_with_requests_in_flight_cfg(Config::default().arg("--poll-us").arg("1000"));
}

fn disconnect_with_requests_in_flight_cfg(cfg: Config) {
    let mut d = Daemon::start(cfg.queues(2).image_pattern(32 << 20, 5));
    let mut fe = RawFrontend::connect(&d.socket);
    let mut heads = [Vec::new(), Vec::new()];
    for i in 0..60usize {
        let q = i % 2;
        let p = fe.build(
            q,
            &BlkReq::write(i as u64 * 256, &pattern(i as u64, 128 << 10)),
            &Layout::default(),
        );
        heads[q].push(p.head);
    }
    fe.submit_many(0, &heads[0]);
    fe.submit_many(1, &heads[1]);
    drop(fe); // hang up while the daemon is busy with them
    let mut fe = RawFrontend::connect(&d.socket);
    let data = pattern(99, 4096);
    fe.write(1, 20000, &data).assert_ok();
    fe.assert_reads(0, 20000, &data);
    assert!(d.try_wait().is_none(), "daemon exited");
}

#[test]
fn sigterm_with_io_in_flight() {
    sigterm_with_io_in_flight_mode("writeback", Config::default());
}

#[test]
fn sigterm_with_io_in_flight_writethrough() {
    sigterm_with_io_in_flight_mode("writethrough", Config::default());
}

#[test]
fn sigterm_with_io_in_flight_while_polling() {
    let polling = Config::default().arg("--poll-us").arg("1000");
    sigterm_with_io_in_flight_mode("writeback", polling);
}

fn sigterm_with_io_in_flight_mode(mode: &str, cfg: Config) {
    let mut d = Daemon::start(cfg.queues(2).image_pattern(32 << 20, 6).write_cache(mode));
    let before = read_file(&d.image);
    let mut fe = RawFrontend::connect(&d.socket);
    for q in &mut fe.queues {
        q.strict_notify = false;
    }
    let len = 128usize << 10;
    let per_queue = 80usize;
    let mut reqs = Vec::new();
    let mut heads = [Vec::new(), Vec::new()];
    for i in 0..per_queue * 2 {
        let q = i % 2;
        let sector = (i * len / 512) as u64;
        let data = pattern(1000 + i as u64, len);
        let p = fe.build(q, &BlkReq::write(sector, &data), &Layout::default());
        heads[q].push(p.head);
        reqs.push((p, sector, data));
    }
    fe.submit_many(0, &heads[0]);
    fe.submit_many(1, &heads[1]);
    let done_at_signal: u16 = fe
        .queues
        .iter()
        .map(|q| q.used_index(&fe.mem).wrapping_sub(q.last_used))
        .sum();
    d.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let st = d
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("daemon did not exit within {EXIT_TIMEOUT:?} of SIGTERM"));
    let took = t0.elapsed();
    assert!(
        st.success(),
        "exit after SIGTERM: {}\n{}",
        describe(&st),
        d.stderr_excerpt(40, 120)
    );
    assert!(
        std::fs::symlink_metadata(&d.socket).is_err(),
        "socket {} not removed on exit",
        d.socket.display()
    );
    // Whatever reached the used ring must be complete and correct on disk.
    let mut completed = std::collections::HashMap::new();
    for q in 0..2 {
        for (id, len) in fe.queues[q].collect_now(&fe.mem) {
            completed.insert((q, id), len);
        }
    }
    let after = read_file(&d.image);
    for (p, sector, data) in &reqs {
        let off = (*sector * 512) as usize;
        if let Some(&used) = completed.get(&(p.queue, p.head)) {
            let o = fe.outcome(p, used);
            assert_eq!(
                o.status,
                Some(S_OK),
                "completed write at sector {sector}: {o:?}"
            );
            assert_eq!(used, 1);
            assert!(
                after[off..off + data.len()] == data[..],
                "completed write at sector {sector} is not on disk"
            );
        } else {
            // Not completed: every sector holds the old or the new data, nothing else.
            for s in 0..data.len() / 512 {
                let r = off + s * 512..off + s * 512 + 512;
                assert!(
                    after[r.clone()] == before[r.clone()]
                        || after[r.clone()] == data[s * 512..s * 512 + 512],
                    "torn/garbage sector {} of an uncompleted write",
                    *sector + s as u64
                );
            }
        }
    }
    // Outside the written area nothing changed.
    let end = per_queue * 2 * len;
    assert!(
        after[end..] == before[end..],
        "data outside the writes changed"
    );
    eprintln!(
        "SIGTERM ({mode}): {done_at_signal} done when signalled, {} of {} writes completed, exit took {took:?}",
        completed.len(),
        reqs.len()
    );
}

#[test]
fn sigterm_and_sigint_exit_cleanly() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // Idle daemon.
        let mut d = Daemon::start(Config::default());
        d.signal(sig);
        let st = d.wait_exit(EXIT_TIMEOUT).expect("no exit after signal");
        assert!(st.success(), "signal {sig}, idle: {}", describe(&st));
        assert!(
            std::fs::symlink_metadata(&d.socket).is_err(),
            "socket left behind"
        );
        // With a connected frontend that did some I/O.
        let mut d = Daemon::start(Config::default().queues(2));
        let mut fe = RawFrontend::connect(&d.socket);
        let data = pattern(7, 4096);
        fe.write(1, 0, &data).assert_ok();
        d.signal(sig);
        let st = d.wait_exit(EXIT_TIMEOUT).expect("no exit after signal");
        assert!(
            st.success(),
            "signal {sig}, connected: {}\n{}",
            describe(&st),
            d.stderr_excerpt(40, 120)
        );
        assert!(
            std::fs::symlink_metadata(&d.socket).is_err(),
            "socket left behind"
        );
        assert_file_range(&d.image, 0, &data);
        drop(fe);
    }
}

#[test]
fn socket_mode_defaults_to_0600() {
    let d = Daemon::start(Config::default());
    let m = std::fs::symlink_metadata(&d.socket).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o7777, 0o600, "socket mode");
}

/// Poll (briefly) until the socket has the given mode and gid. The daemon sets them right
/// after bind(), so a connectable socket may for a moment still have the old ones.
fn wait_socket_attrs(path: &std::path::Path, mode: u32, gid: Option<u32>) -> (u32, u32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let m = std::fs::symlink_metadata(path).unwrap();
        let got = (m.permissions().mode() & 0o7777, m.gid());
        if (got.0 == mode && gid.is_none_or(|g| g == got.1)) || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn socket_mode_and_group_options() {
    let d = Daemon::start(Config::default().socket_mode("0660"));
    let (mode, _) = wait_socket_attrs(&d.socket, 0o660, None);
    assert_eq!(mode, 0o660, "--socket-mode 0660");
    drop(d);
    // Group by name (gid 1 is "daemon" on Debian).
    let group = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] != "0").then(|| (f[0].to_string(), f[2].parse::<u32>().unwrap()))
        });
    if let Some((name, gid)) = group {
        let mut cfg = Config::default().socket_mode("0660");
        cfg.socket_group = Some(name.clone());
        let d = Daemon::start(cfg);
        let (mode, got_gid) = wait_socket_attrs(&d.socket, 0o660, Some(gid));
        assert_eq!(got_gid, gid, "--socket-group {name}");
        assert_eq!(mode, 0o660);
        let mut fe = RawFrontend::connect(&d.socket);
        fe.flush(0).assert_ok();
    }
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = test_dir();
    let sock = dir.path().join("vhost.sock");
    {
        let _l = UnixListener::bind(&sock).unwrap();
    } // closed: the file stays, nobody listens
    assert!(
        std::fs::symlink_metadata(&sock)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let d = Daemon::start_in(dir.clone(), Config::default());
    let mut fe = RawFrontend::connect(&d.socket);
    fe.flush(0).assert_ok();
}

#[test]
fn live_socket_is_not_taken_over() {
    let dir = test_dir();
    let first = Daemon::start_in(dir.clone(), Config::default());
    let cfg2 = Config {
        image_name: "other.img".into(),
        ..Config::default()
    };
    let mut second = Daemon::spawn_cfg(dir.clone(), &cfg2);
    let st = second
        .wait_exit(EXIT_TIMEOUT)
        .expect("second daemon on a live socket did not exit");
    assert!(
        !st.success(),
        "second daemon should fail, got {}",
        describe(&st)
    );
    let err = second.stderr_text();
    assert!(
        err.contains(&*first.socket.to_string_lossy()),
        "error should name the socket path; stderr:\n{err}"
    );
    // The first daemon still owns and serves the socket.
    let mut fe = RawFrontend::connect(&first.socket);
    let expect = read_file_at(&first.image, 0, 4096);
    fe.assert_reads(0, 0, &expect);
}

#[test]
fn non_socket_path_is_never_removed() {
    let dir = test_dir();
    let sock = dir.path().join("vhost.sock");
    std::fs::write(&sock, b"precious data").unwrap();
    let mut d = Daemon::spawn_cfg(dir.clone(), &Config::default());
    let st = d.wait_exit(EXIT_TIMEOUT).expect("daemon did not exit");
    assert!(
        !st.success(),
        "should refuse a non-socket path, got {}",
        describe(&st)
    );
    assert_eq!(
        std::fs::read(&sock).unwrap(),
        b"precious data",
        "file was touched"
    );
    let err = d.stderr_text();
    assert!(
        err.contains(&*sock.to_string_lossy()),
        "error should name the path:\n{err}"
    );
    // A directory at the socket path is not removed either.
    let dir2 = test_dir();
    let sock2 = dir2.path().join("vhost.sock");
    std::fs::create_dir(&sock2).unwrap();
    std::fs::write(sock2.join("inside"), b"x").unwrap();
    let mut d = Daemon::spawn_cfg(dir2.clone(), &Config::default());
    let st = d.wait_exit(EXIT_TIMEOUT).expect("daemon did not exit");
    assert!(
        !st.success(),
        "should refuse a directory path, got {}",
        describe(&st)
    );
    assert!(sock2.join("inside").exists(), "directory was touched");
}

#[test]
fn size_creates_a_preallocated_image() {
    let d = Daemon::start(Config::default().no_image().size("64M"));
    let m = std::fs::metadata(&d.image).expect("image not created");
    assert_eq!(m.len(), 64 << 20, "created image size");
    assert!(
        m.blocks() * 512 >= 64 << 20,
        "image not preallocated: {} bytes allocated",
        m.blocks() * 512
    );
    let mut fe = RawFrontend::connect(&d.socket);
    assert_eq!(fe.config().capacity, (64 << 20) / 512);
    fe.assert_reads(0, 0, &[0u8; 4096]);
    fe.assert_reads(0, (64 << 20) / 512 - 8, &[0u8; 4096]);
    let data = pattern(8, 4096);
    fe.write(0, 1000, &data).assert_ok();
    assert_file_range(&d.image, 1000 * 512, &data);
}

#[test]
fn size_matching_an_existing_image_keeps_it() {
    let d = Daemon::start(Config::default().size("16M"));
    assert_eq!(
        read_file(&d.image),
        pattern(1, 16 << 20),
        "existing image was modified"
    );
    let mut fe = RawFrontend::connect(&d.socket);
    fe.assert_reads(0, 8, &pattern(1, 16 << 20)[4096..8192]);
}

#[test]
fn size_mismatch_is_refused() {
    for size in ["32M", "8M"] {
        let dir = test_dir();
        let mut d = Daemon::spawn_cfg(dir.clone(), &Config::default().size(size));
        let st = d.wait_exit(EXIT_TIMEOUT).expect("daemon did not exit");
        assert!(
            !st.success(),
            "--size {size} on a 16M image: {}",
            describe(&st)
        );
        let err = d.stderr_text();
        assert!(
            err.contains(&*d.image.to_string_lossy()),
            "error should name the image path:\n{err}"
        );
        let m = std::fs::metadata(&d.image).unwrap();
        assert_eq!(m.len(), 16 << 20, "image was resized");
        assert!(
            read_file(&d.image) == pattern(1, 16 << 20),
            "image content changed"
        );
    }
}

#[test]
fn invalid_command_lines_are_refused() {
    let cases: Vec<(&str, Config)> = vec![
        ("missing image without --size", Config::default().no_image()),
        (
            "serial of 21 bytes",
            Config::default().serial("ABCDEFGHIJKLMNOPQRSTU"),
        ),
        ("queue size 2048", Config::default().queue_size(2048)),
        (
            "queue size not a power of two",
            Config::default().queue_size(100),
        ),
        ("logical block size 1024", Config::default().lbs(1024)),
        ("queues 0", Config::default().queues(0)),
        (
            "bad write-cache mode",
            Config::default().write_cache("sometimes"),
        ),
        ("bad socket mode", Config::default().socket_mode("abc")),
    ];
    for (what, cfg) in cases {
        let dir = test_dir();
        let mut d = Daemon::spawn_cfg(dir.clone(), &cfg);
        let st = d
            .wait_exit(EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("{what}: daemon did not exit"));
        assert!(
            !st.success(),
            "{what}: expected failure, got {}",
            describe(&st)
        );
        assert!(
            std::fs::symlink_metadata(&d.socket).is_err(),
            "{what}: socket left behind"
        );
    }
}

#[test]
fn reconnect_with_requests_in_flight_resumes_from_base() {
    let d = Daemon::start(Config::default().queues(2).image_pattern(32 << 20, 9));
    let mut fe = RawFrontend::connect(&d.socket);
    let len = 128usize << 10;
    let mut reqs = Vec::new();
    let mut heads = [Vec::new(), Vec::new()];
    for i in 0..120usize {
        let q = i % 2;
        let sector = (i * len / 512) as u64;
        let data = pattern(3000 + i as u64, len);
        let p = fe.build(q, &BlkReq::write(sector, &data), &Layout::default());
        heads[q].push(p.head);
        reqs.push((p, sector, data));
    }
    let start_idx: Vec<u16> = fe.queues.iter().map(|q| q.avail_idx).collect();
    // Queue 0: made available without a kick, so the daemon most likely has not seen them
    // when the ring is stopped; queue 1: kicked.
    fe.queues[0].suppress_kick = true;
    fe.submit_many(0, &heads[0]);
    fe.submit_many(1, &heads[1]);
    // Stop the rings right away: GET_VRING_BASE must return only after every request the
    // daemon took off the ring is in the used ring.
    let mut det = fe.detach().unwrap();
    let mut done = std::collections::HashMap::new();
    for q in 0..2 {
        let base = det.bases[q] as u16;
        let popped = base.wrapping_sub(start_idx[q]);
        let used_now = det.queues[q]
            .used_index(&det.mem)
            .wrapping_sub(start_idx[q]);
        assert_eq!(
            used_now, popped,
            "queue {q}: after GET_VRING_BASE {base} the used ring has {used_now} of {popped} popped requests"
        );
        for (id, l) in det.queues[q].collect_now(&det.mem) {
            done.insert((q, id), l);
        }
        eprintln!(
            "queue {q}: {popped} of {} requests popped before the ring stopped",
            heads[q].len()
        );
    }
    // Reconnect from the bases: the rest is processed by the new connection.
    let mut fe = RawFrontend::attach(&d.socket, FrontendOpts::default(), {
        for q in &mut det.queues {
            q.force_kick = true;
            q.suppress_kick = false;
        }
        det
    })
    .unwrap();
    for q in 0..2 {
        fe.queues[q].kick.write(1).unwrap();
        let pending: Vec<u16> = heads[q]
            .iter()
            .copied()
            .filter(|h| !done.contains_key(&(q, *h)))
            .collect();
        let t = fe.timeout;
        let (got, others) = fe.queues[q]
            .wait_heads(&fe.mem, &pending, t)
            .unwrap_or_else(|e| panic!("after reconnect: {e}"));
        assert!(others.is_empty(), "requests completed twice: {others:?}");
        for (h, l) in got {
            done.insert((q, h), l);
        }
    }
    for (p, sector, data) in &reqs {
        let used = done[&(p.queue, p.head)];
        let o = fe.outcome(p, used);
        assert_eq!(o.status, Some(S_OK), "write at sector {sector}");
        assert_file_range(&d.image, sector * 512, data);
    }
}
