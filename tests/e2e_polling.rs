//! `--poll-us`: a queue thread keeps polling for a while after a batch. Requests must still be
//! served correctly on every queue, a kick after an idle gap must still wake the thread, and
//! an idle export must stop spinning once the window has passed.

mod common;

use std::time::{Duration, Instant};

use common::blk::pattern;
use common::blkio_fe::BlkioDev;
use common::daemon::{Config, Daemon};
use common::read_file_at;
use vublk::bench::cpu::CpuProbe;

#[test]
fn polling_queues_serve_wake_after_idle_and_stop_spinning() {
    let cfg = Config::default()
        .image_pattern(8 << 20, 3)
        .queues(2)
        .arg("--poll-us")
        .arg("1000");
    let mut d = Daemon::start(cfg);
    let mut dev = BlkioDev::open(&d.socket, 2, false, 1 << 20).unwrap();
    for round in 0..3u64 {
        for q in 0..2 {
            let off = (round * 2 + q as u64) << 20;
            let data = pattern(round * 10 + q as u64, 64 << 10);
            dev.write(q, off, &data).unwrap();
            assert_eq!(dev.read(q, off, data.len()).unwrap(), data);
            assert_eq!(read_file_at(&d.image, off, data.len()), data);
        }
        // Idle for much longer than the poll window: the next request needs a real kick.
        std::thread::sleep(Duration::from_millis(300));
    }

    // Idle: after the window the queue threads sleep. A thread that kept spinning would burn
    // a whole second (typically 100 ticks) per queue here.
    std::thread::sleep(Duration::from_millis(100));
    let cpu = CpuProbe::new(d.pid()).unwrap();
    let before = cpu.ticks().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu.ticks().unwrap() - before;
    assert!(used <= 10, "an idle export used {used} ticks of CPU in 1 s");
    drop(dev);
    assert!(d.terminate_and_wait(Duration::from_secs(10)).success());
}

/// Requests that come slower than the largest window must not keep the thread spinning: the
/// wait for each is counted from the last work found, polling included, so the window shrinks
/// to nothing. (Counting only the sleep after a full window made waits between one and two
/// windows look short, and the thread spun the whole window for every request.)
#[test]
fn requests_slower_than_the_window_stop_the_polling() {
    let cfg = Config::default()
        .image_pattern(8 << 20, 4)
        .arg("--poll-us")
        .arg("200");
    let mut d = Daemon::start(cfg);
    let mut dev = BlkioDev::open(&d.socket, 1, false, 1 << 20).unwrap();
    let image = d.image.clone();
    // One 4k read every 300 µs, beyond the 200 µs window but within twice it. Paced by
    // spinning: a sleep overshoots by more than the window.
    let period = Duration::from_micros(300);
    let mut next = Instant::now();
    let mut paced = |dev: &mut BlkioDev, i: u64| {
        let off = (i % 64) * 4096;
        assert_eq!(
            dev.read(0, off, 4096).unwrap(),
            read_file_at(&image, off, 4096)
        );
        next += period;
        while Instant::now() < next {
            std::hint::spin_loop();
        }
    };
    for i in 0..500 {
        paced(&mut dev, i);
    }
    let cpu = CpuProbe::new(d.pid()).unwrap();
    let before = cpu.ticks().unwrap();
    let start = Instant::now();
    let mut served = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        paced(&mut dev, served);
        served += 1;
    }
    let used = cpu.ticks().unwrap() - before;
    let elapsed_ticks = start.elapsed().as_secs_f64() * 100.0;
    // Spinning the window for each request would take two thirds of the time.
    assert!(
        (used as f64) < 0.3 * elapsed_ticks,
        "{served} slow requests kept the daemon busy for {used} of {elapsed_ticks:.0} ticks"
    );
    drop(dev);
    assert!(d.terminate_and_wait(Duration::from_secs(10)).success());
}

#[test]
fn poll_us_is_bounded() {
    let out = std::process::Command::new(common::daemon::vublk_bin())
        .args([
            "serve",
            "--poll-us",
            "5000",
            "--socket",
            "x.sock",
            "--file",
            "x.img",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--poll-us") && err.contains("5000"), "{err}");
}
