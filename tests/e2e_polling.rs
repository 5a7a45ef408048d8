//! `--poll-us`: a queue thread keeps polling for a while after a batch. Requests must still be
//! served correctly on every queue, a kick after an idle gap must still wake the thread, and
//! an idle export must stop spinning once the window has passed.

mod common;

use std::time::Duration;

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
