//! `vublk bench` end to end: the real daemon on a temporary image, the bench binary as a
//! separate process talking to it through the socket (libblkio), results read as JSON.

mod common;

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::daemon::{Config, Daemon, vublk_bin};

const IMG: u64 = 32 << 20;
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

fn daemon(cfg: Config) -> Daemon {
    let mut cfg = cfg.image_pattern(IMG, 3);
    cfg.rust_log = "info".into();
    Daemon::start(cfg)
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "bench did not print one JSON object ({e})\nstdout: {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Run `vublk bench --socket SOCKET ARGS...` to completion (bounded).
fn bench(socket: &Path, args: &[&str]) -> Run {
    let out_dir = tempfile::tempdir().unwrap();
    let (out, err) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut argv: Vec<OsString> = vec!["bench".into(), "--socket".into(), socket.into()];
    argv.extend(args.iter().map(OsString::from));
    let mut child = Command::new(vublk_bin())
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BENCH_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vublk {argv:?} did not finish within {BENCH_TIMEOUT:?}; stderr: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        ok: status.success(),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("field {k} missing or not a number in {v}"))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("field {k} missing or not an integer in {v}"))
}

/// The checks every successful timed run must pass.
fn assert_sane_load(r: &Run, rw: &str) -> Value {
    assert!(
        r.ok,
        "bench failed\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    let v = r.json();
    assert_eq!(v["mode"], "load");
    assert_eq!(v["rw"], rw);
    assert_eq!(u(&v, "queues"), 2);
    assert_eq!(u(&v, "errors"), 0, "{v}");
    assert!(v["first_error"].is_null());
    let ios = u(&v, "ios");
    assert!(ios > 0 && f(&v, "iops") > 0.0, "{v}");
    assert_eq!(u(&v, "read_ios") + u(&v, "write_ios"), ios);
    assert_eq!(u(&v, "bytes"), ios * 4096);
    assert!(f(&v, "mib_s") > 0.0);
    let lat: Vec<f64> = [
        "lat_min_us",
        "lat_p50_us",
        "lat_p99_us",
        "lat_p99_9_us",
        "lat_max_us",
    ]
    .iter()
    .map(|k| f(&v, k))
    .collect();
    assert!(lat[0] > 0.0, "{v}");
    assert!(
        lat.windows(2).all(|w| w[0] <= w[1]),
        "latencies out of order: {v}"
    );
    let mean = f(&v, "lat_mean_us");
    assert!(mean >= lat[0] && mean <= lat[4], "{v}");
    // Under a second with iodepth 8: a sane completion latency is far below that.
    assert!(lat[1] < 1e6, "{v}");
    assert_eq!(u(&v, "capacity"), IMG);
    assert_eq!(u(&v, "size"), IMG);
    v
}

#[test]
fn randread_and_randwrite_report_iops_and_latency() {
    let d = daemon(Config::default().queues(2));
    let pid = d.pid().to_string();
    for rw in ["randread", "randwrite"] {
        let r = bench(
            &d.socket,
            &[
                "--json",
                "--rw",
                rw,
                "--queues",
                "2",
                "--iodepth",
                "8",
                "--runtime",
                "1",
                "--ramp",
                "0.2",
                "--backend-pid",
                &pid,
            ],
        );
        let v = assert_sane_load(&r, rw);
        let (reads, writes) = (u(&v, "read_ios"), u(&v, "write_ios"));
        if rw == "randread" {
            assert_eq!(writes, 0);
        } else {
            assert_eq!(reads, 0);
        }
        assert!(f(&v, "backend_cpu_s") >= 0.0, "{v}");
        assert!(f(&v, "backend_cpu_us_per_io") >= 0.0, "{v}");
        assert_eq!(u(&v, "backend_pid"), d.pid() as u64);
    }
}

#[test]
fn sequential_mixed_and_human_output() {
    let d = daemon(Config::default().queues(2));
    let r = bench(
        &d.socket,
        &[
            "--json",
            "--rw",
            "randrw",
            "--rwmixread",
            "70",
            "--queues",
            "2",
            "--iodepth",
            "4",
            "--runtime",
            "0.5",
            "--offset",
            "1M",
            "--size",
            "8M",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let v = r.json();
    assert!(u(&v, "read_ios") > 0 && u(&v, "write_ios") > 0, "{v}");
    assert_eq!((u(&v, "offset"), u(&v, "size")), (1 << 20, 8 << 20));
    assert_eq!(u(&v, "rwmixread"), 70);
    let r = bench(
        &d.socket,
        &["--rw", "read", "--bs", "128k", "--runtime", "0.5"],
    );
    assert!(r.ok, "{}", r.stderr);
    let line = r.stdout.trim();
    assert!(
        line.starts_with("read ") && line.contains(" IOPS, ") && line.contains("p99.9"),
        "{line}"
    );
    assert!(line.contains("errors 0"), "{line}");
}

/// --flush-every N: one flush per N writes on each queue, reported, not counted as I/O.
#[test]
fn flush_every_sends_flushes_between_writes() {
    let d = daemon(Config::default().queues(2));
    let r = bench(
        &d.socket,
        &[
            "--json",
            "--rw",
            "randwrite",
            "--queues",
            "2",
            "--iodepth",
            "8",
            "--runtime",
            "0.5",
            "--flush-every",
            "4",
        ],
    );
    let v = assert_sane_load(&r, "randwrite");
    let (writes, flushes) = (u(&v, "write_ios"), u(&v, "flushes"));
    assert_eq!(u(&v, "flush_every"), 4);
    // The window cuts a few flushes or writes off at either end.
    assert!(
        flushes * 4 >= writes * 9 / 10 && flushes * 4 <= writes * 11 / 10 + 64,
        "{flushes} flushes for {writes} writes: {v}"
    );
    let plain = bench(
        &d.socket,
        &[
            "--json",
            "--rw",
            "randwrite",
            "--queues",
            "2",
            "--runtime",
            "0.2",
        ],
    );
    assert_eq!(u(&assert_sane_load(&plain, "randwrite"), "flushes"), 0);
    let r = bench(&d.socket, &["--rw", "randread", "--flush-every", "4"]);
    assert!(
        !r.ok
            && r.stderr
                .contains("--flush-every needs a timed load that writes"),
        "{}",
        r.stderr
    );
}

/// The checks every successful verify run over the whole image must pass.
fn assert_verified(r: &Run) -> Value {
    assert!(
        r.ok,
        "verify failed\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    let v = r.json();
    assert_eq!(v["mode"], "verify");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!((u(&v, "errors"), u(&v, "bad_sectors")), (0, 0));
    assert_eq!(u(&v, "bytes_written"), IMG);
    assert_eq!(u(&v, "bytes_read"), IMG);
    v
}

#[test]
fn verify_passes_on_a_healthy_daemon() {
    let d = daemon(Config::default().queues(2));
    let r = bench(
        &d.socket,
        &["--verify", "--json", "--queues", "2", "--iodepth", "16"],
    );
    let v = assert_verified(&r);
    assert!(u(&v, "multi_segment_requests") > 0, "{v}");
    assert!(u(&v, "flushes") >= 2, "{v}");
    // The whole image now holds verify sectors.
    let img = common::read_file(&d.image);
    for off in [0usize, 512, IMG as usize / 2, IMG as usize - 512] {
        assert_eq!(&img[off..off + 8], b"VUBLKVF1");
        assert_eq!(&img[off + 8..off + 16], &(off as u64).to_le_bytes());
    }
}

#[test]
fn verify_detects_a_corrupted_byte_in_the_image() {
    let d = daemon(Config::default().queues(2).write_cache("writethrough"));
    let region = ["--offset", "1M", "--size", "4M"];
    let w = bench(
        &d.socket,
        &[
            &[
                "--verify-phase",
                "write",
                "--seed",
                "1234",
                "--json",
                "--queues",
                "2",
            ],
            &region[..],
        ]
        .concat(),
    );
    assert!(w.ok, "write phase failed: {}", w.stderr);
    assert_eq!(w.json()["ok"], true);
    // Unchanged data reads back fine, through either queue count.
    let r = bench(
        &d.socket,
        &[&["--verify-phase", "read", "--seed", "1234"], &region[..]].concat(),
    );
    assert!(r.ok, "clean read phase failed: {}{}", r.stdout, r.stderr);

    // Flip one byte in the middle of a sector, behind the daemon's back.
    let victim: u64 = (1 << 20) + 3 * 65536 + 4096 + 300;
    let img = OpenOptions::new()
        .write(true)
        .read(true)
        .open(&d.image)
        .unwrap();
    let mut b = [0u8];
    img.read_exact_at(&mut b, victim).unwrap();
    img.write_all_at(&[b[0] ^ 0x01], victim).unwrap();
    img.sync_all().unwrap();

    let r = bench(
        &d.socket,
        &[
            &[
                "--verify-phase",
                "read",
                "--seed",
                "1234",
                "--json",
                "--queues",
                "2",
            ],
            &region[..],
        ]
        .concat(),
    );
    assert!(!r.ok, "corruption not detected: {}", r.stdout);
    let v = r.json();
    assert_eq!(v["ok"], false);
    assert_eq!(u(&v, "bad_sectors"), 1, "{v}");
    let m = &v["first_mismatch"];
    assert_eq!(u(m, "offset"), victim / 512 * 512, "{v}");
    assert_eq!(m["kind"], "corrupt");
    assert_eq!(u(m, "byte"), victim % 512);
    assert_eq!(u(m, "found_byte"), u64::from(b[0] ^ 0x01));
    assert_eq!(u(m, "expected_byte"), u64::from(b[0]));
    assert!(
        r.stderr.contains("verify failed: 1 bad sector"),
        "{}",
        r.stderr
    );

    // Another generation's data is stale; data never written by the verifier is foreign.
    let r = bench(
        &d.socket,
        &[
            &["--verify-phase", "read", "--seed", "99", "--json"],
            &region[..],
        ]
        .concat(),
    );
    assert!(!r.ok);
    let v = r.json();
    assert_eq!(u(&v, "bad_sectors"), 4 << 20 >> 9);
    assert_eq!(v["first_mismatch"]["kind"], "stale-seed", "{v}");
    assert_eq!(u(&v["first_mismatch"], "offset"), 1 << 20);
    let r = bench(
        &d.socket,
        &[
            "--verify-phase",
            "read",
            "--seed",
            "1234",
            "--json",
            "--size",
            "1M",
        ],
    );
    assert!(!r.ok);
    assert_eq!(r.json()["first_mismatch"]["kind"], "not-written");
}

#[test]
fn io_errors_fail_the_run() {
    let d = daemon(Config::default());
    // Shrink the image under the daemon: reads past the new end fail.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d.image)
        .unwrap()
        .set_len(IMG / 2)
        .unwrap();
    let r = bench(&d.socket, &["--json", "--runtime", "0.3", "--iodepth", "4"]);
    assert!(!r.ok, "errors did not fail the run: {}", r.stdout);
    let v = r.json();
    assert!(u(&v, "errors") > 0, "{v}");
    assert!(
        v["first_error"]
            .as_str()
            .unwrap()
            .contains("read of 4096 bytes"),
        "{v}"
    );
    assert!(r.stderr.contains("I/O error(s)"), "{}", r.stderr);
    let r = bench(
        &d.socket,
        &["--verify-phase", "read", "--seed", "1", "--json"],
    );
    assert!(!r.ok);
    let v = r.json();
    assert!(u(&v, "errors") > 0 && v["ok"] == false, "{v}");
}

#[test]
fn setup_errors_are_clear() {
    let d = daemon(Config::default());
    let missing = d.dir.path().join("nope.sock");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--bs", "1000"],
            "not a multiple of the device's logical block size (512 bytes)",
        ),
        (
            vec!["--offset", "30M", "--size", "4M"],
            "beyond the device's capacity",
        ),
        (vec!["--offset", "32M"], "beyond the device's capacity"),
        (vec!["--queues", "2"], "the backend offers 1 queue(s)"),
        (vec!["--verify-phase", "read"], "needs --seed"),
    ];
    for (args, want) in cases {
        let r = bench(&d.socket, &[&args[..], &["--runtime", "0.2"]].concat());
        assert!(!r.ok, "{args:?} succeeded");
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
    }
    let r = bench(&missing, &["--runtime", "0.2"]);
    assert!(!r.ok && r.stderr.contains("does not exist"), "{}", r.stderr);
    let r = bench(&d.image, &["--runtime", "0.2"]);
    assert!(
        !r.ok && r.stderr.contains("is not a unix socket"),
        "{}",
        r.stderr
    );
    // The daemon is still fine after all that.
    let r = bench(&d.socket, &["--json", "--runtime", "0.2", "--iodepth", "2"]);
    assert!(r.ok, "{}", r.stderr);
}

/// vm.nr_hugepages, set for one test and put back afterwards.
struct HugePagePool {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn meminfo(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/meminfo"))
}

impl HugePagePool {
    fn take() -> Self {
        let before = std::fs::read_to_string(NR_HUGEPAGES)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        HugePagePool { before }
    }

    /// Makes exactly `free` huge pages free (pages others use stay theirs).
    fn set_free(&self, free: u64) {
        let used = meminfo("HugePages_Total:") - meminfo("HugePages_Free:");
        std::fs::write(NR_HUGEPAGES, (used + free).to_string())
            .unwrap_or_else(|e| panic!("this test sets {NR_HUGEPAGES} and needs root for it: {e}"));
        assert_eq!(
            meminfo("HugePages_Free:"),
            free,
            "the kernel could not provide {free} free huge pages of 2 MiB"
        );
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

/// --hugepages: buffers in 2 MiB pages carry real I/O (load and verify), and without free
/// huge pages the run fails up front, saying how many it needs and how to get them.
#[test]
fn hugepage_buffers_carry_io_and_a_short_pool_is_a_clear_error() {
    let d = daemon(Config::default().queues(2));
    let pool = HugePagePool::take();
    pool.set_free(0);
    let r = bench(
        &d.socket,
        &[
            "--hugepages",
            "--rw",
            "read",
            "--bs",
            "128k",
            "--iodepth",
            "4",
            "--runtime",
            "0.2",
        ],
    );
    assert!(!r.ok, "ran without huge pages: {}", r.stdout);
    assert!(
        r.stderr
            .contains("--hugepages needs 1 free huge page(s) of 2 MiB")
            && r.stderr.contains("/proc/sys/vm/nr_hugepages"),
        "{}",
        r.stderr
    );

    pool.set_free(16);
    let r = bench(
        &d.socket,
        &[
            "--json",
            "--hugepages",
            "--queues",
            "2",
            "--rw",
            "randrw",
            "--iodepth",
            "8",
            "--runtime",
            "0.5",
        ],
    );
    let v = assert_sane_load(&r, "randrw");
    assert_eq!(v["huge_pages"], true, "{v}");
    let r = bench(
        &d.socket,
        &[
            "--verify",
            "--json",
            "--hugepages",
            "--queues",
            "2",
            "--iodepth",
            "16",
        ],
    );
    assert_verified(&r);
    // Nothing of the bench's is left in the pool.
    assert_eq!(meminfo("HugePages_Free:"), 16);
    // The daemon saw guest RAM on hugetlbfs and sent large transfers straight.
    let log = d.stderr_text();
    assert!(
        log.contains(
            "guest RAM is in huge pages: large transfers from there go straight to the backing"
        ),
        "{log}"
    );
    assert!(!log.contains("huge-page bounce buffers for large"), "{log}");
}

/// Large transfers from buffers in 4 KiB pages go through the huge-page bounce buffers of
/// every O_DIRECT engine, and the data arrives intact: the verify run writes and reads back
/// the whole image in mixed sizes up to 128 KiB, many of them multi-segment.
#[test]
fn verify_passes_through_the_huge_page_bounce_buffers() {
    for engine in ["io-uring", "linux-aio", "threads"] {
        let d = daemon(
            Config::default()
                .queues(2)
                .arg("--engine")
                .arg(engine)
                .arg("--direct")
                .arg("on"),
        );
        let r = bench(
            &d.socket,
            &["--verify", "--json", "--queues", "2", "--iodepth", "16"],
        );
        assert_verified(&r);
        let log = d.stderr_text();
        assert!(
            log.contains("8 MiB of huge-page bounce buffers for large O_DIRECT transfers"),
            "{engine}: no bounce buffers\n{log}"
        );
        assert!(!log.contains("guest RAM is in huge pages"), "{log}");

        // With --huge-bounce off nothing is bounced, and the data is just as intact.
        let d = daemon(
            Config::default()
                .arg("--engine")
                .arg(engine)
                .arg("--direct")
                .arg("on")
                .arg("--huge-bounce")
                .arg("off"),
        );
        assert_verified(&bench(&d.socket, &["--verify", "--json"]));
        let log = d.stderr_text();
        assert!(!log.contains("huge-page bounce buffers"), "{engine}: {log}");
    }
}
