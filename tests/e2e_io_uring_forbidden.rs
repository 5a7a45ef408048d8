//! vublk where the kernel forbids io_uring, as container runtimes' seccomp profiles do: the
//! daemon runs under a seccomp filter that fails `io_uring_setup` with EPERM (per process, so
//! the rest of the machine and the other tests keep io_uring). `auto` must fall back to
//! linux-aio, say so, and serve; an explicit `--engine io-uring` must fail at startup with
//! the reason.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use common::blk::pattern;
use common::blkio_fe::BlkioDev;
use common::daemon::{Config, Daemon, test_dir, vublk_bin};
use common::read_file_at;

const SIZE: u64 = 8 << 20;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// A seccomp program: io_uring_setup fails with EPERM, every other system call is allowed.
fn no_io_uring_filter() -> Vec<libc::sock_filter> {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // Offsets in struct seccomp_data: nr at 0, arch at 4.
    vec![
        stmt(load, 4),
        jeq(AUDIT_ARCH, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(load, 0),
        jeq(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Makes the command's process run under [`no_io_uring_filter`].
fn forbid_io_uring(cmd: &mut Command) {
    // Built before fork: the pre-exec hook must not allocate. It gets the program's address
    // as a plain number (raw pointers are not Send).
    let filter: &'static [libc::sock_filter] = no_io_uring_filter().leak();
    let (addr, len) = (filter.as_ptr() as usize, filter.len() as u16);
    // SAFETY: the hook only calls prctl (async-signal-safe) with a program that lives for the
    // rest of the test process (leaked above) and that the kernel only reads; errors come back
    // through io::Error.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len,
                filter: addr as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A written image (auto would choose io_uring on it) in a fresh directory.
fn written_image() -> (std::sync::Arc<tempfile::TempDir>, std::path::PathBuf) {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, pattern(7, SIZE as usize)).unwrap();
    (dir, img)
}

fn probe_without_io_uring(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(vublk_bin());
    cmd.arg("probe").args(args);
    forbid_io_uring(&mut cmd);
    cmd.output().unwrap()
}

#[test]
fn the_filter_really_forbids_io_uring_and_nothing_else() {
    // Without the filter the same kernel offers io_uring: otherwise this test shows nothing.
    let (_dir, img) = written_image();
    let free = Command::new(vublk_bin())
        .args(["probe", "--json"])
        .arg(&img)
        .output()
        .unwrap();
    let free: Value = serde_json::from_slice(&free.stdout).unwrap();
    assert_eq!(
        free["kernel"]["io_uring"]["available"], true,
        "io_uring must be available outside the filter for this test to mean anything: {free}"
    );
    assert_eq!(free["choice"]["engine"], "io-uring", "{free}");

    let out = probe_without_io_uring(&["--json", img.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kernel"]["io_uring"]["available"], false, "{v}");
    let why = v["kernel"]["io_uring"]["reason"].as_str().unwrap();
    assert!(why.contains("not permitted"), "{why}");
    assert_eq!(v["kernel"]["linux_aio"]["available"], true, "{v}");
}

#[test]
fn auto_falls_back_to_linux_aio_and_says_why() {
    let (_dir, img) = written_image();
    let out = probe_without_io_uring(&["--json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["choice"]["engine"], "linux-aio", "{v}");
    assert_eq!(v["choice"]["direct"], true, "{v}");
    let reasons = v["choice"]["reasons"].to_string();
    assert!(
        reasons.contains("io_uring unavailable") && reasons.contains("using linux-aio"),
        "{reasons}"
    );
}

#[test]
fn explicit_io_uring_is_refused_by_probe_and_at_startup() {
    let (_dir, img) = written_image();
    let out = probe_without_io_uring(&["--engine", "io-uring", img.to_str().unwrap()]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--engine io-uring cannot work here: io_uring is unavailable"),
        "{err}"
    );

    let cfg = Config::default()
        .image_pattern(SIZE, 7)
        .arg("--engine")
        .arg("io-uring");
    let mut d = Daemon::spawn_cfg_with(test_dir(), &cfg, forbid_io_uring);
    let st = d
        .wait_exit(Duration::from_secs(10))
        .expect("vublk serve --engine io-uring must exit when io_uring is forbidden");
    assert!(!st.success());
    let log = d.stderr_text();
    assert!(
        log.contains("--engine io-uring cannot work here") && log.contains("not permitted"),
        "{log}"
    );
    assert!(
        !d.socket.exists(),
        "a refused export must not leave a socket"
    );
}

#[test]
fn auto_serves_through_linux_aio_without_io_uring() {
    let cfg = Config::default().image_pattern(SIZE, 9);
    let mut d = Daemon::spawn_cfg_with(test_dir(), &cfg, forbid_io_uring);
    d.wait_ready(Duration::from_secs(10)).unwrap();
    let log = d.stderr_text();
    assert!(
        log.contains("engine linux-aio, O_DIRECT on") && log.contains("io_uring unavailable"),
        "{log}"
    );

    let mut dev = BlkioDev::open(&d.socket, 1, false, 1 << 20).unwrap();
    let data = pattern(11, 64 << 10);
    dev.write(0, 3 << 20, &data).unwrap();
    assert_eq!(dev.read(0, 3 << 20, data.len()).unwrap(), data);
    assert_eq!(read_file_at(&d.image, 3 << 20, data.len()), data);
    drop(dev);
    assert!(d.terminate_and_wait(Duration::from_secs(10)).success());
}
