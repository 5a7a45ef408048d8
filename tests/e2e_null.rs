//! The null backing: a transport-only device for measurements, served end to end.

mod common;

use std::ffi::OsString;
use std::time::Duration;

use common::blkio_fe::BlkioDev;
use common::daemon::{Daemon, test_dir};

#[test]
fn null_backing_reads_zeros_and_discards_writes() {
    let dir = test_dir();
    let socket = dir.path().join("null.sock");
    let args: Vec<OsString> = ["serve", "--null", "64M", "--queues", "2", "--socket"]
        .iter()
        .map(OsString::from)
        .chain([socket.clone().into_os_string()])
        .collect();
    let mut daemon = Daemon::spawn_args(
        dir.clone(),
        &args,
        socket.clone(),
        dir.path().join("none"),
        "info",
    );
    daemon.wait_ready(Duration::from_secs(10)).unwrap();
    let log = daemon.stderr_text();
    assert!(
        log.contains("NULL device"),
        "the log must say it is not storage:\n{log}"
    );
    assert!(log.contains("engine null") || log.contains("null"), "{log}");

    let mut dev = BlkioDev::open(&socket, 2, false, 1 << 20).unwrap();
    assert_eq!(dev.capacity, 64 << 20);
    dev.write(1, 4096, &[0xab; 8192]).unwrap();
    assert_eq!(
        dev.read(0, 4096, 8192).unwrap(),
        vec![0u8; 8192],
        "reads must return zeros"
    );
    drop(dev);
    assert!(daemon.terminate_and_wait(Duration::from_secs(10)).success());
}

#[test]
fn null_backing_refuses_engine_overrides_and_a_file() {
    let out = std::process::Command::new(common::daemon::vublk_bin())
        .args([
            "serve",
            "--null",
            "64M",
            "--engine",
            "io-uring",
            "--socket",
            "/nonexistent/x.sock",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--null has no storage"));
    let out = std::process::Command::new(common::daemon::vublk_bin())
        .args(["serve", "--null", "64M", "--file", "/nonexistent/img"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}
