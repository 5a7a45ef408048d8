//! The engine vublk picks for each kind of storage, end to end: `vublk probe --json` must say
//! what the backing is and which engine it gets, then `vublk serve` with default options must
//! log that engine and serve real I/O (written and read back through libblkio, checked against
//! the backing; refused writes on read-only exports through the raw frontend).
//!
//! These tests need root (they mount tmpfs and set up loop devices), `mount`, `umount`,
//! `losetup` and `chattr`; a missing piece fails the test with a message naming it. Images live
//! under CARGO_TARGET_TMPDIR, which must be on a disk file system (not tmpfs).
//!
//! Where the automatic choice is a native engine (written file, loop device, read-only
//! written file), serving needs that engine to be built in.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use common::blk::{S_IOERR, pattern};
use common::blkio_fe::{BlkioDev, Op};
use common::daemon::{Config, Daemon, describe, vublk_bin};
use common::raw::RawFrontend;
use common::{assert_file_range, read_file_at};

const SIZE: u64 = 16 << 20;
const MIB: u64 = 1 << 20;

/// Loop devices are a machine-wide resource: one test at a time sets one up.
static LOOP_DEVICES: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// Storage set-up, with clean-up that runs also when a test fails.

#[track_caller]
fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root to {what}; run the tests as root (euid is {euid})"
    );
}

#[track_caller]
fn run(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("this test needs to run {what}, which cannot be started: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        describe(&out.status),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A fresh directory on the disk file system of the build tree.
fn disk_dir() -> Arc<TempDir> {
    Arc::new(
        tempfile::Builder::new()
            .prefix("vublk-engine-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir in CARGO_TARGET_TMPDIR"),
    )
}

fn fallocate(path: &Path, len: u64) {
    let f = File::create(path).unwrap();
    // SAFETY: plain syscall on a file descriptor we own.
    let ret = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    assert_eq!(ret, 0, "fallocate: {}", std::io::Error::last_os_error());
}

fn truncated(path: &Path, len: u64) -> File {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    f
}

/// A tmpfs mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount() -> Self {
        require_root("mount a tmpfs");
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m,mode=0700", "vublk-e2e"])
            .arg(dir.path()));
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// A loop device over a backing file, detached when dropped.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Self {
        require_root("set up a loop device");
        let dev = run(Command::new("losetup").args(["--find", "--show"]).arg(file));
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDevice { dev: dev.into() }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// chattr +i for the life of the guard: not even root may write the file.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Self {
        require_root("make a file immutable");
        run(Command::new("chattr").arg("+i").arg(path));
        Immutable(path.into())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

// ---------------------------------------------------------------------------------------------
// vublk probe

struct Probe {
    out: Output,
    json: Value,
}

impl Probe {
    fn run(path: &Path, extra: &[&str]) -> Probe {
        let out = Command::new(vublk_bin())
            .args(["probe", "--json"])
            .args(extra)
            .arg(path)
            .output()
            .expect("run vublk probe");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "vublk probe --json printed no JSON ({e}): {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        Probe { out, json }
    }

    #[track_caller]
    fn ok(path: &Path) -> Probe {
        let p = Probe::run(path, &[]);
        assert!(p.out.status.success(), "vublk probe failed: {}", p.json);
        p
    }

    fn probe(&self) -> &Value {
        &self.json["probe"]
    }

    fn engine(&self) -> &str {
        self.json["choice"]["engine"].as_str().unwrap_or("<none>")
    }

    fn direct(&self) -> bool {
        self.json["choice"]["direct"] == true
    }

    #[track_caller]
    fn assert_reason(&self, text: &str) {
        let reasons = self.json["choice"]["reasons"].as_array().expect("reasons");
        assert!(
            reasons
                .iter()
                .any(|r| r.as_str().is_some_and(|r| r.contains(text))),
            "no reason contains {text:?}: {}",
            self.json["choice"]
        );
    }

    /// What the kernel section says "native" is on this machine.
    fn native_engine(&self) -> &'static str {
        let k = &self.json["kernel"];
        if k["io_uring"]["available"] == true {
            "io-uring"
        } else if k["linux_aio"]["available"] == true {
            "linux-aio"
        } else {
            "threads"
        }
    }

    /// The file system must be a disk one that writes in place, such as ext4 or xfs, for a
    /// test that is about files on disk.
    #[track_caller]
    fn assert_disk_file_system(&self) {
        let fs = &self.probe()["file_system"];
        assert!(
            (fs["class"] == "local" || fs["class"] == "network") && fs["copy_on_write"] == false,
            "CARGO_TARGET_TMPDIR ({}) is on {} ({}{}); this test needs a disk file system \
             that writes in place, such as ext4 or xfs",
            env!("CARGO_TARGET_TMPDIR"),
            fs["name"],
            fs["class"],
            if fs["copy_on_write"] == true {
                ", copy-on-write"
            } else {
                ""
            }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// vublk serve

fn serve_config(image: &Path, read_only: bool) -> Config {
    Config {
        image: common::daemon::Image::None,
        image_name: image.to_str().unwrap().into(),
        read_only,
        rust_log: "info".into(),
        ..Config::default()
    }
}

/// Starts `vublk serve` with default engine options and checks the one line that names the
/// engine.
#[track_caller]
fn serve(dir: Arc<TempDir>, image: &Path, read_only: bool, engine: &str, direct: bool) -> Daemon {
    let d = Daemon::start_in(dir, serve_config(image, read_only));
    let line = format!(
        "{}: engine {engine}, O_DIRECT {} (",
        image.display(),
        if direct { "on" } else { "off" }
    );
    let log = d.stderr_text();
    assert!(
        log.lines().filter(|l| l.contains(": engine ")).count() == 1 && log.contains(&line),
        "the daemon log has no single line {line:?}:\n{log}"
    );
    d
}

/// Writes through the socket, flushes, reads back, and checks the bytes in `verify` (the image
/// or, for a loop device, its backing file).
fn write_read_verify(d: &Daemon, verify: &Path, seed: u64) {
    let mut dev = BlkioDev::open(&d.socket, 1, false, 1 << 20).expect("libblkio connects");
    assert_eq!(dev.capacity, SIZE);
    for (off, len) in [
        (0u64, 4096usize),
        (MIB + 512, 64 << 10),
        (SIZE - MIB, 1 << 20),
    ] {
        let data = pattern(seed + off, len);
        dev.write(0, off, &data)
            .unwrap_or_else(|e| panic!("write at {off}: {e:?}"));
        dev.run(0, Op::Flush).expect("flush");
        let back = dev.read(0, off, len).expect("read");
        assert!(back == data, "read back differs at {off}");
        assert_file_range(verify, off, &data);
    }
}

/// Reads match the image; a write is refused by the daemon itself (raw frontend, so the
/// request really reaches it) and the image is unchanged.
fn read_only_io(d: &Daemon, image: &Path) {
    let mut fe = RawFrontend::connect(&d.socket);
    let before = read_file_at(image, MIB, 4096);
    fe.assert_reads(0, MIB / 512, &before);
    let o = fe.write(0, MIB / 512, &pattern(99, 4096));
    assert_eq!(
        o.status,
        Some(S_IOERR),
        "a write to a read-only export: {o:?}"
    );
    assert_file_range(image, MIB, &before);
}

#[track_caller]
fn serve_refused(dir: Arc<TempDir>, cfg: Config, message: &str) {
    let mut d = Daemon::spawn_cfg(dir, &cfg);
    let st = d
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("vublk serve kept running:\n{}", d.stderr_text()));
    assert!(!st.success(), "vublk serve exited 0:\n{}", d.stderr_text());
    assert!(
        d.stderr_text().contains(message),
        "vublk serve ({}) did not say {message:?}:\n{}",
        describe(&st),
        d.stderr_text()
    );
}

// ---------------------------------------------------------------------------------------------
// One test per kind of storage.

#[test]
fn written_file_gets_the_native_engine_with_o_direct() {
    let dir = disk_dir();
    let image = dir.path().join("written.img");
    std::fs::write(&image, pattern(8, SIZE as usize)).unwrap();
    File::open(&image).unwrap().sync_all().unwrap();
    let p = Probe::ok(&image);
    p.assert_disk_file_system();
    assert_eq!(p.probe()["kind"], "file");
    assert_eq!(p.probe()["allocation"]["sparse"], false, "{}", p.json);
    assert_eq!(p.probe()["allocation"]["allocated_bytes"], SIZE);
    assert_eq!(p.probe()["allocation"]["unwritten_bytes"], 0, "{}", p.json);
    assert_eq!(p.probe()["direct_io"]["supported"], true, "{}", p.json);
    assert_eq!(p.engine(), p.native_engine(), "{}", p.json);
    assert!(p.direct());
    p.assert_reason("is fully allocated and written");

    let d = serve(dir, &image, false, p.native_engine(), true);
    write_read_verify(&d, &image, 1);
}

/// fallocate without writing leaves unwritten extents (on ext4, xfs): not sparse, but every
/// first write converts an extent, so the page cache serves it (see policy.rs).
#[test]
fn fallocated_unwritten_file_gets_threads_with_the_page_cache() {
    let dir = disk_dir();
    let image = dir.path().join("fallocated.img");
    fallocate(&image, SIZE);
    let p = Probe::ok(&image);
    p.assert_disk_file_system();
    let alloc = &p.probe()["allocation"];
    assert_eq!(alloc["sparse"], false, "{}", p.json);
    assert_eq!(alloc["allocated_bytes"], SIZE);
    assert_eq!(
        alloc["unwritten_bytes"], SIZE,
        "the test directory's file system must keep fallocated extents unwritten (ext4, xfs): {}",
        p.json
    );
    assert_eq!((p.engine(), p.direct()), ("threads", false), "{}", p.json);
    p.assert_reason("file is fallocated but 100% unwritten");

    let d = serve(dir, &image, false, "threads", false);
    write_read_verify(&d, &image, 9);
}

#[test]
fn sparse_file_gets_threads_with_the_page_cache() {
    let dir = disk_dir();
    let image = dir.path().join("sparse.img");
    truncated(&image, SIZE);
    let p = Probe::ok(&image);
    p.assert_disk_file_system();
    assert_eq!(p.probe()["allocation"]["sparse"], true, "{}", p.json);
    assert_eq!(p.probe()["allocation"]["allocated_bytes"], 0);
    assert_eq!((p.engine(), p.direct()), ("threads", false), "{}", p.json);
    p.assert_reason("file is sparse: 0% allocated; native AIO would block on allocation");

    let d = serve(dir, &image, false, "threads", false);
    write_read_verify(&d, &image, 2);
}

#[test]
fn partly_written_file_is_sparse_and_gets_threads() {
    let dir = disk_dir();
    let image = dir.path().join("partly.img");
    let f = truncated(&image, SIZE);
    f.write_all_at(&pattern(3, 2 << 20), 4 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let p = Probe::ok(&image);
    p.assert_disk_file_system();
    let alloc = &p.probe()["allocation"];
    assert_eq!(alloc["sparse"], true, "{}", p.json);
    assert_eq!(alloc["allocated_bytes"], 2 << 20, "{}", p.json);
    assert_eq!((p.engine(), p.direct()), ("threads", false), "{}", p.json);
    p.assert_reason("file is sparse: 12% allocated");

    let d = serve(dir, &image, false, "threads", false);
    assert_file_range(&image, 4 << 20, &pattern(3, 2 << 20));
    write_read_verify(&d, &image, 3);
}

#[test]
fn tmpfs_file_gets_threads_without_o_direct() {
    let mnt = Tmpfs::mount();
    let image = mnt.dir.path().join("tmpfs.img");
    fallocate(&image, SIZE);
    let p = Probe::ok(&image);
    assert_eq!(p.probe()["file_system"]["name"], "tmpfs", "{}", p.json);
    assert_eq!(p.probe()["direct_io"]["supported"], false, "{}", p.json);
    assert_eq!((p.engine(), p.direct()), ("threads", false), "{}", p.json);
    p.assert_reason("tmpfs has no O_DIRECT");

    let d = serve(disk_dir(), &image, false, "threads", false);
    write_read_verify(&d, &image, 4);
}

#[test]
fn loop_block_device_gets_the_native_engine_with_o_direct() {
    let _serial = LOOP_DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = disk_dir();
    let backing = dir.path().join("loop-backing.img");
    fallocate(&backing, SIZE);
    let lo = LoopDevice::attach(&backing);
    let p = Probe::ok(&lo.dev);
    assert_eq!(p.probe()["kind"], "block-device", "{}", p.json);
    assert!(p.probe()["device"].as_str().unwrap().starts_with("7:"));
    assert_eq!(p.probe()["size"], SIZE);
    assert_eq!(p.probe()["logical_block_size"], 512);
    assert_eq!(p.probe()["direct_io"]["supported"], true);
    assert_eq!(p.probe()["discard"]["supported"], true, "{}", p.json);
    assert_eq!(p.probe()["read_only_media"], false);
    assert_eq!(p.engine(), p.native_engine(), "{}", p.json);
    assert!(p.direct());
    p.assert_reason("block device");

    let d = serve(dir, &lo.dev, false, p.native_engine(), true);
    write_read_verify(&d, &backing, 5);
}

/// A fully written file that not even root may write: the probe says so, serving it without
/// --read-only is refused with a hint, and with --read-only the daemon refuses writes itself.
#[test]
fn read_only_file_is_served_read_only() {
    let dir = disk_dir();
    let image = dir.path().join("read-only.img");
    std::fs::write(&image, pattern(6, SIZE as usize)).unwrap();
    let _immutable = Immutable::set(&image);
    let p = Probe::ok(&image);
    p.assert_disk_file_system();
    assert_eq!(p.probe()["writable"], false, "{}", p.json);
    assert_eq!(p.probe()["read_only_media"], false);
    assert_eq!(p.probe()["allocation"]["sparse"], false);
    assert_eq!(p.engine(), p.native_engine(), "{}", p.json);

    serve_refused(
        dir.clone(),
        serve_config(&image, false),
        "is not writable (permission denied); serve it with --read-only",
    );
    // The test keeps the last reference to `dir`: it must outlive the immutable flag.
    let d = serve(dir.clone(), &image, true, p.native_engine(), true);
    read_only_io(&d, &image);
}

/// The same with the thread pool forced, which serves whatever engines are built in.
#[test]
fn read_only_file_with_threads_forced() {
    let dir = disk_dir();
    let image = dir.path().join("read-only.img");
    std::fs::write(&image, pattern(7, SIZE as usize)).unwrap();
    let _immutable = Immutable::set(&image);
    let mut cfg = serve_config(&image, true);
    cfg.extra_args = vec![
        "--engine".into(),
        "threads".into(),
        "--direct".into(),
        "off".into(),
    ];
    // The test keeps the last reference to `dir`: it must outlive the immutable flag.
    let d = Daemon::start_in(dir.clone(), cfg);
    assert!(
        d.stderr_text().contains(": engine threads, O_DIRECT off ("),
        "{}",
        d.stderr_text()
    );
    read_only_io(&d, &image);
}

// ---------------------------------------------------------------------------------------------
// Overrides that cannot work are refused, by probe and by serve.

#[test]
fn linux_aio_without_o_direct_is_refused() {
    let dir = disk_dir();
    let image = dir.path().join("any.img");
    fallocate(&image, SIZE);
    let args = ["--engine", "linux-aio", "--direct", "off"];
    let p = Probe::run(&image, &args);
    assert!(!p.out.status.success(), "probe accepted it: {}", p.json);
    let msg = "--engine linux-aio needs O_DIRECT, but --direct off turns it off";
    assert!(
        p.json["error"].as_str().unwrap_or("").starts_with(msg),
        "{}",
        p.json
    );
    assert!(p.json.get("choice").is_none());
    assert!(String::from_utf8_lossy(&p.out.stderr).contains(msg));

    let mut cfg = serve_config(&image, false);
    cfg.extra_args = args.iter().map(|s| s.to_string()).collect();
    serve_refused(dir, cfg, msg);
}

#[test]
fn o_direct_on_tmpfs_is_refused() {
    let mnt = Tmpfs::mount();
    let image = mnt.dir.path().join("tmpfs.img");
    fallocate(&image, SIZE);
    for args in [
        &["--direct", "on"][..],
        &["--engine", "threads", "--direct", "on"],
    ] {
        let p = Probe::run(&image, args);
        assert!(
            !p.out.status.success(),
            "probe accepted {args:?}: {}",
            p.json
        );
        let msg = "--direct on cannot work here: tmpfs has no O_DIRECT";
        assert!(
            p.json["error"].as_str().unwrap_or("").starts_with(msg),
            "{}",
            p.json
        );
        let mut cfg = serve_config(&image, false);
        cfg.extra_args = args.iter().map(|s| s.to_string()).collect();
        serve_refused(disk_dir(), cfg, msg);
    }
    let p = Probe::run(&image, &["--engine", "linux-aio"]);
    assert!(!p.out.status.success());
    assert!(
        p.json["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("--engine linux-aio needs O_DIRECT, but tmpfs has no O_DIRECT"),
        "{}",
        p.json
    );
}

#[test]
fn probe_of_a_missing_path_fails_with_a_json_error() {
    let dir = disk_dir();
    let p = Probe::run(&dir.path().join("missing.img"), &[]);
    assert!(!p.out.status.success());
    assert!(
        p.json["error"]
            .as_str()
            .unwrap_or("")
            .contains("No such file or directory"),
        "{}",
        p.json
    );
}
