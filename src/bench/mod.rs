//! `vublk bench`: a VM-less load generator and data verifier for any vhost-user-blk backend.
//!
//! It connects to the backend's socket with libblkio's "virtio-blk-vhost-user" driver (the
//! same path a VM's virtio-blk driver would take, without the VM), runs one thread per queue
//! and reports IOPS, bandwidth and completion latency, optionally with the backend's CPU
//! time per I/O. `--verify` writes self-describing sectors and reads them back instead.
//!
//! Modules: [`device`] (the connection), `load` (the timed load), [`verify`] and [`sector`]
//! (the data check), [`hist`] (latency histogram), [`rng`] (offsets and payloads), [`cpu`]
//! (the backend's CPU time).

pub mod cpu;
pub mod device;
pub mod hist;
pub(crate) mod load;
pub mod rng;
pub mod sector;
pub mod verify;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use self::cpu::CpuProbe;
use self::device::DeviceInfo;
use self::hist::Histogram;
use self::sector::Mismatch;

/// A queue that completes nothing for this long is reported as stalled.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The I/O pattern of the timed load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RwMode {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads (each queue streams through its own part of the region).
    Read,
    /// Sequential writes (each queue streams through its own part of the region).
    Write,
    /// Random reads and writes, `--rwmixread` percent reads.
    Randrw,
}

impl RwMode {
    /// Whether offsets advance sequentially.
    pub fn is_sequential(self) -> bool {
        matches!(self, RwMode::Read | RwMode::Write)
    }

    /// Whether the workload writes.
    pub fn writes(self) -> bool {
        !matches!(self, RwMode::Randread | RwMode::Read)
    }

    /// The fio-style name.
    pub fn name(self) -> &'static str {
        match self {
            RwMode::Randread => "randread",
            RwMode::Randwrite => "randwrite",
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::Randrw => "randrw",
        }
    }
}

/// Which part of `--verify` to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyPhase {
    /// Write and flush the region, then stop (read it back later with the same seed).
    Write,
    /// Read back and check a region written earlier with the same seed.
    Read,
    /// Write, flush, read back and check.
    Both,
}

/// Everything `vublk bench` needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// I/O pattern (timed load).
    pub rw: RwMode,
    /// Percentage of reads for [`RwMode::Randrw`].
    pub rwmixread: u8,
    /// Request size in bytes (timed load).
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: usize,
    /// Queues, one thread each.
    pub queues: usize,
    /// Virtqueue size (descriptors; a request takes 2 plus one per data segment).
    pub queue_size: u16,
    /// Measured time.
    pub runtime: Duration,
    /// Time run before measuring.
    pub ramp: Duration,
    /// Start of the region used, in bytes.
    pub offset: u64,
    /// Length of the region (default: to the end of the device).
    pub size: Option<u64>,
    /// Backend process whose CPU time to report.
    pub backend_pid: Option<u32>,
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// Run the data verifier instead of the timed load.
    pub verify: Option<VerifyPhase>,
    /// Seed of offsets and payloads; the verify generation.
    pub seed: Option<u64>,
    /// Buffers in 2 MiB huge pages instead of 4 KiB pages.
    pub huge_pages: bool,
    /// A flush after every this many writes per queue (0: never).
    pub flush_every: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            socket: PathBuf::new(),
            rw: RwMode::Randread,
            rwmixread: 50,
            bs: 4096,
            iodepth: 32,
            queues: 1,
            queue_size: 256,
            runtime: Duration::from_secs(10),
            ramp: Duration::ZERO,
            offset: 0,
            size: None,
            backend_pid: None,
            progress: false,
            verify: None,
            seed: None,
            huge_pages: false,
            flush_every: 0,
        }
    }
}

/// Parse a byte count such as `4k`, `128K`, `1M`, `2GiB` or `4096` (binary units).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4k, 128k, 1M, 4096)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?} in {s:?} (use k, M, G or T)"
            ));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

/// Parse a duration in seconds: `10`, `2.5`, `500ms`, `30s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * scale < 1e9 => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => Err(format!("{s:?} is not a duration (e.g. 10, 2.5, 500ms, 2m)")),
    }
}

/// State shared by the workers and the main thread.
pub(crate) struct Shared {
    ready: Barrier,
    go: Barrier,
    t0: OnceLock<Instant>,
    /// Set by a worker that failed, or on a fatal error: everyone stops issuing.
    pub abort: AtomicBool,
    /// Per-queue progress (completions or bytes), for the progress line.
    pub done: Vec<Padded>,
}

/// A counter on its own cache line.
#[repr(align(64))]
#[derive(Default)]
pub(crate) struct Padded(pub AtomicU64);

impl Shared {
    fn new(workers: usize) -> Shared {
        Shared {
            ready: Barrier::new(workers + 1),
            go: Barrier::new(workers + 1),
            t0: OnceLock::new(),
            abort: AtomicBool::new(false),
            done: (0..workers).map(|_| Padded::default()).collect(),
        }
    }

    /// Worker side: wait until everyone is ready, return the common start time.
    pub fn wait_start(&self) -> Instant {
        self.ready.wait();
        self.go.wait();
        *self.t0.get().expect("start time set before the go barrier")
    }

    /// Main side: release the workers and return the start time.
    fn start(&self) -> Instant {
        self.ready.wait();
        let t0 = *self.t0.get_or_init(Instant::now);
        self.go.wait();
        t0
    }

    fn total_done(&self) -> u64 {
        self.done.iter().map(|d| d.0.load(Ordering::Relaxed)).sum()
    }
}

/// A failed `do_io`, with the stall case spelled out.
pub(crate) fn io_failure(queue: usize, e: &blkio::Error) -> anyhow::Error {
    if e.errno() == blkio::Errno::TIME {
        anyhow::anyhow!(
            "queue {queue}: no completion within {}s: the backend stalled",
            STALL_TIMEOUT.as_secs()
        )
    } else {
        device::blkio_err(e).context(format!("queue {queue}: waiting for completions"))
    }
}

/// The result of a run.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Report {
    /// A timed load.
    Load(LoadReport),
    /// A verify run.
    Verify(VerifyReport),
}

impl Report {
    /// Why the run failed (I/O errors, data mismatches), if it did.
    pub fn failure(&self) -> Option<String> {
        match self {
            Report::Load(r) => r
                .first_error
                .as_ref()
                .map(|e| format!("{} I/O error(s); first: {e}", r.errors)),
            Report::Verify(r) => r.failure(),
        }
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("reports serialize")
    }

    /// The human-readable summary.
    pub fn human(&self) -> String {
        match self {
            Report::Load(r) => r.human(),
            Report::Verify(r) => r.human(),
        }
    }
}

/// Results of a timed load. Latencies are completion latencies (from queueing a request to
/// seeing its completion) in microseconds, over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub mode: &'static str,
    pub socket: String,
    pub rw: RwMode,
    pub rwmixread: Option<u8>,
    pub bs: u64,
    pub iodepth: usize,
    pub queues: usize,
    pub queue_size: u16,
    /// Whether the buffers were in 2 MiB huge pages.
    pub huge_pages: bool,
    /// A flush after every this many writes per queue (0: never).
    pub flush_every: u64,
    pub offset: u64,
    pub size: u64,
    pub capacity: u64,
    pub logical_block_size: u64,
    pub seed: u64,
    pub ramp_s: f64,
    pub runtime_s: f64,
    /// Successful requests completed in the measured window.
    pub ios: u64,
    pub read_ios: u64,
    pub write_ios: u64,
    /// Flushes completed in the measured window (`flush_every`); not counted as I/Os.
    pub flushes: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub lat_mean_us: f64,
    pub lat_min_us: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p99_9_us: f64,
    pub lat_max_us: f64,
    /// Failed requests over the whole run (ramp included); they never count as I/Os.
    pub errors: u64,
    pub first_error: Option<String>,
    pub backend_pid: Option<u32>,
    /// Backend CPU time (user + system, all threads) during the measured window.
    pub backend_cpu_s: Option<f64>,
    /// That CPU time divided by `ios`.
    pub backend_cpu_us_per_io: Option<f64>,
}

impl LoadReport {
    fn human(&self) -> String {
        let mix = match self.rwmixread {
            Some(p) => format!(" rwmixread={p}"),
            None => String::new(),
        };
        let mut s = format!(
            "{}{mix} bs={} iodepth={} queues={}{} runtime={:.1}s: {:.0} IOPS, {:.2} MiB/s, \
             lat µs mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}, errors {}",
            self.rw.name(),
            self.bs,
            self.iodepth,
            self.queues,
            if self.huge_pages { " hugepages" } else { "" },
            self.runtime_s,
            self.iops,
            self.mib_s,
            self.lat_mean_us,
            self.lat_p50_us,
            self.lat_p99_us,
            self.lat_p99_9_us,
            self.lat_max_us,
            self.errors
        );
        if let (Some(cpu), Some(per_io)) = (self.backend_cpu_s, self.backend_cpu_us_per_io) {
            s.push_str(&format!(
                ", backend CPU {per_io:.2} µs/IO ({:.2} CPUs)",
                cpu / self.runtime_s
            ));
        }
        if self.flush_every > 0 {
            s.push_str(&format!(
                ", {} flushes (one per {} writes)",
                self.flushes, self.flush_every
            ));
        }
        if let Some(e) = &self.first_error {
            s.push_str(&format!("\nfirst error: {e}"));
        }
        s
    }
}

/// Results of a verify run.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub mode: &'static str,
    pub socket: String,
    pub phase: VerifyPhase,
    pub seed: u64,
    pub offset: u64,
    pub size: u64,
    pub capacity: u64,
    pub logical_block_size: u64,
    pub iodepth: usize,
    pub queues: usize,
    pub write_requests: u64,
    pub read_requests: u64,
    pub multi_segment_requests: u64,
    pub flushes: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub elapsed_s: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Sectors that did not read back as written.
    pub bad_sectors: u64,
    /// The lowest-offset bad sector.
    pub first_mismatch: Option<Mismatch>,
    /// A failure that stopped the run early.
    pub fatal: Option<String>,
    /// No error, no mismatch, everything covered.
    pub ok: bool,
}

impl VerifyReport {
    fn failure(&self) -> Option<String> {
        if let Some(f) = &self.fatal {
            return Some(format!("verify aborted: {f}"));
        }
        if let Some(m) = &self.first_mismatch {
            return Some(format!(
                "verify failed: {} bad sector(s); first: {m}",
                self.bad_sectors
            ));
        }
        self.first_error
            .as_ref()
            .map(|e| format!("verify failed: {} I/O error(s); first: {e}", self.errors))
    }

    fn human(&self) -> String {
        let phase = match self.phase {
            VerifyPhase::Write => "write",
            VerifyPhase::Read => "read",
            VerifyPhase::Both => "write+read",
        };
        let mut s = format!(
            "verify {phase} seed={:#x} region {}+{} queues={} iodepth={}: {} writes ({} MiB), \
             {} reads ({} MiB), {} multi-segment, {} flushes in {:.2}s; errors {}, bad sectors {}: {}",
            self.seed,
            self.offset,
            self.size,
            self.queues,
            self.iodepth,
            self.write_requests,
            self.bytes_written >> 20,
            self.read_requests,
            self.bytes_read >> 20,
            self.multi_segment_requests,
            self.flushes,
            self.elapsed_s,
            self.errors,
            self.bad_sectors,
            if self.ok { "OK" } else { "FAILED" }
        );
        if let Some(m) = &self.first_mismatch {
            s.push_str(&format!("\nfirst mismatch: {m}"));
        }
        if let Some(e) = &self.first_error {
            s.push_str(&format!("\nfirst error: {e}"));
        }
        if let Some(f) = &self.fatal {
            s.push_str(&format!("\naborted: {f}"));
        }
        s
    }
}

/// The region `[offset, offset + size)` of the device to use, checked against it.
fn region(o: &Options, info: &DeviceInfo) -> Result<(u64, u64)> {
    let lbs = info.logical_block_size;
    if !o.offset.is_multiple_of(lbs) {
        bail!(
            "--offset {} is not a multiple of the device's logical block size ({lbs} bytes)",
            o.offset
        );
    }
    if o.offset >= info.capacity {
        bail!(
            "--offset {} is beyond the device's capacity ({} bytes)",
            o.offset,
            info.capacity
        );
    }
    let size = o.size.unwrap_or(info.capacity - o.offset);
    if size == 0 {
        bail!("--size must not be 0");
    }
    let end = o
        .offset
        .checked_add(size)
        .context("--offset + --size overflows")?;
    if end > info.capacity {
        bail!(
            "the region --offset {} --size {size} ends at {end}, beyond the device's capacity ({} bytes)",
            o.offset,
            info.capacity
        );
    }
    if !size.is_multiple_of(lbs) {
        bail!("--size {size} is not a multiple of the device's logical block size ({lbs} bytes)");
    }
    Ok((o.offset, size))
}

/// Check options against the device; returns the region.
fn check(o: &Options, info: &DeviceInfo) -> Result<(u64, u64)> {
    let lbs = info.logical_block_size;
    if o.queues == 0 || o.iodepth == 0 {
        bail!("--queues and --iodepth must be at least 1");
    }
    if o.queues > info.max_queues {
        bail!(
            "--queues {}: the backend offers {} queue(s)",
            o.queues,
            info.max_queues
        );
    }
    if o.rwmixread > 100 {
        bail!("--rwmixread must be 0 to 100");
    }
    let max_transfer = match info.segment_limit() {
        0 => u64::MAX,
        l => l.saturating_mul(info.max_segments as u64),
    };
    if o.verify.is_none() {
        if o.bs == 0 || !o.bs.is_multiple_of(lbs) {
            bail!(
                "--bs {} is not a multiple of the device's logical block size ({lbs} bytes)",
                o.bs
            );
        }
        if o.bs > max_transfer {
            bail!(
                "--bs {} is larger than the device's largest request ({max_transfer} bytes)",
                o.bs
            );
        }
    } else if max_transfer < lbs.max(4096) {
        bail!("the device's largest request ({max_transfer} bytes) is too small to verify");
    }
    let (offset, size) = region(o, info)?;
    if o.verify.is_none() && size < o.bs {
        bail!(
            "the region ({size} bytes) is smaller than one --bs {} block",
            o.bs
        );
    }
    if o.runtime.is_zero() && o.verify.is_none() {
        bail!("--runtime must be more than 0");
    }
    Ok((offset, size))
}

fn default_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rng::mix64(t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32))
}

/// Connect, run the load or the verifier, and report. I/O errors and mismatches are part
/// of the report ([`Report::failure`]); setup problems are errors.
pub fn run(o: &Options) -> Result<Report> {
    if o.verify == Some(VerifyPhase::Read) && o.seed.is_none() {
        bail!("--verify-phase read needs --seed: the seed the write phase printed");
    }
    if o.flush_every > 0 && (o.verify.is_some() || !o.rw.writes()) {
        bail!("--flush-every needs a timed load that writes (--rw randwrite, write or randrw)");
    }
    let probe = o.backend_pid.map(CpuProbe::new).transpose()?;
    let writes = match o.verify {
        Some(VerifyPhase::Read) => false,
        Some(_) => true,
        None => o.rw.writes(),
    };
    let conn = device::connect(&o.socket, !writes)?;
    let info = conn.info;
    let (offset, size) = check(o, &info)?;
    let seed = o.seed.unwrap_or_else(default_seed);
    let stride = match o.verify {
        Some(_) => verify::slot_stride(),
        None => (o.bs as usize).next_multiple_of(4096),
    };
    let per_queue = stride
        .checked_mul(o.iodepth)
        .context("--iodepth too large")?;
    let region_len = per_queue
        .checked_mul(o.queues)
        .context("--iodepth × --queues too large")?;
    let mut dev = conn.start(o.queues, o.queue_size, region_len, o.huge_pages)?;
    let base = dev.region.addr;
    let ctx = Ctx {
        o,
        info,
        offset,
        size,
        seed,
        stride,
        base,
        per_queue,
    };
    match o.verify {
        Some(phase) => run_verify(&ctx, &mut dev.queues, phase).map(Report::Verify),
        None => run_load(&ctx, &mut dev.queues, probe.as_ref()).map(Report::Load),
    }
}

struct Ctx<'a> {
    o: &'a Options,
    info: DeviceInfo,
    offset: u64,
    size: u64,
    seed: u64,
    stride: usize,
    base: usize,
    per_queue: usize,
}

/// A progress line on stderr, when enabled.
fn progress_line(o: &Options, elapsed: Duration, total: Duration, what: &str) {
    if o.progress {
        eprintln!(
            "bench: {:>4.0}s/{:.0}s {what}",
            elapsed.as_secs_f64(),
            total.as_secs_f64()
        );
    }
}

fn run_load(
    c: &Ctx<'_>,
    queues: &mut [blkio::Blkioq],
    probe: Option<&CpuProbe>,
) -> Result<LoadReport> {
    let o = c.o;
    let n = queues.len();
    let blocks = c.size / o.bs;
    let per = blocks / n as u64;
    let ramp_ns = o.ramp.as_nanos() as u64;
    let end_ns = ramp_ns + o.runtime.as_nanos() as u64;
    let plans: Vec<load::LoadPlan> = (0..n)
        .map(|i| {
            let (seq_start, seq_end) = if per == 0 {
                (c.offset, c.offset + blocks * o.bs)
            } else if i + 1 == n {
                (c.offset + i as u64 * per * o.bs, c.offset + blocks * o.bs)
            } else {
                (
                    c.offset + i as u64 * per * o.bs,
                    c.offset + (i as u64 + 1) * per * o.bs,
                )
            };
            load::LoadPlan {
                queue: i,
                rw: o.rw,
                rwmixread: o.rwmixread,
                bs: o.bs,
                depth: o.iodepth,
                start: c.offset,
                blocks,
                seq_start,
                seq_end,
                seg_limit: c.info.segment_limit(),
                buf_base: c.base + i * c.per_queue,
                slot_stride: c.stride,
                ramp_ns,
                end_ns,
                seed: c.seed,
                flush_every: o.flush_every,
            }
        })
        .collect();
    let shared = Shared::new(n);
    let total = o.ramp + o.runtime;
    let (results, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(&plans)
            .enumerate()
            .map(|(i, (q, plan))| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("bench-q{i}"))
                    .spawn_scoped(s, move || load::run(q, plan, shared))
                    .expect("spawn a bench thread")
            })
            .collect();
        let t0 = shared.start();
        let ramp_end = t0 + o.ramp;
        let end = ramp_end + o.runtime;
        let sample = || probe.and_then(|p| p.ticks().ok());
        let mut cpu_start = if o.ramp.is_zero() { sample() } else { None };
        let mut cpu_end = None;
        let mut ramped = o.ramp.is_zero();
        let mut next_tick = t0 + Duration::from_secs(1);
        let mut last = (t0, 0u64);
        loop {
            let now = Instant::now();
            if !ramped && now >= ramp_end {
                cpu_start = sample();
                ramped = true;
            }
            if now >= end {
                cpu_end = sample();
                break;
            }
            if shared.abort.load(Ordering::Relaxed) {
                break;
            }
            if now >= next_tick {
                let done = shared.total_done();
                let dt = now.duration_since(last.0).as_secs_f64();
                let iops = (done - last.1) as f64 / dt;
                let what = format!(
                    "{}{:.0} IOPS, {:.1} MiB/s",
                    if ramped { "" } else { "(ramp) " },
                    iops,
                    iops * o.bs as f64 / (1 << 20) as f64
                );
                progress_line(o, now - t0, total, &what);
                last = (now, done);
                next_tick += Duration::from_secs(1);
            }
            let wake = [next_tick, end, if ramped { end } else { ramp_end }]
                .into_iter()
                .min()
                .unwrap();
            std::thread::sleep(
                wake.saturating_duration_since(now)
                    .min(Duration::from_millis(100)),
            );
        }
        let results: Vec<Result<load::LoadResult>> = handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect();
        (results, (cpu_start, cpu_end))
    });
    let mut hist = Histogram::new();
    let (mut reads, mut writes, mut flushes, mut errors, mut first_error) = (0, 0, 0, 0, None);
    for r in results {
        let r = r?;
        hist.merge(&r.hist);
        reads += r.read_ios;
        writes += r.write_ios;
        flushes += r.flushes;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let ios = reads + writes;
    let secs = o.runtime.as_secs_f64();
    let us = |ns: f64| ns / 1000.0;
    let backend_cpu_s = match (probe, cpu) {
        (Some(p), (Some(a), Some(b))) => Some(p.seconds(b.saturating_sub(a))),
        _ => None,
    };
    Ok(LoadReport {
        mode: "load",
        socket: o.socket.display().to_string(),
        rw: o.rw,
        rwmixread: (o.rw == RwMode::Randrw).then_some(o.rwmixread),
        bs: o.bs,
        iodepth: o.iodepth,
        queues: n,
        queue_size: o.queue_size,
        huge_pages: o.huge_pages,
        flush_every: o.flush_every,
        offset: c.offset,
        size: c.size,
        capacity: c.info.capacity,
        logical_block_size: c.info.logical_block_size,
        seed: c.seed,
        ramp_s: o.ramp.as_secs_f64(),
        runtime_s: secs,
        ios,
        read_ios: reads,
        write_ios: writes,
        flushes,
        bytes: ios * o.bs,
        iops: ios as f64 / secs,
        mib_s: (ios * o.bs) as f64 / secs / (1 << 20) as f64,
        lat_mean_us: us(hist.mean()),
        lat_min_us: us(hist.min() as f64),
        lat_p50_us: us(hist.quantile(0.5)),
        lat_p99_us: us(hist.quantile(0.99)),
        lat_p99_9_us: us(hist.quantile(0.999)),
        lat_max_us: us(hist.max() as f64),
        errors,
        first_error,
        backend_pid: o.backend_pid,
        backend_cpu_s,
        backend_cpu_us_per_io: backend_cpu_s
            .filter(|_| ios > 0)
            .map(|s| s * 1e6 / ios as f64),
    })
}

/// Split `[offset, offset + size)` into `n` contiguous parts aligned to `align`.
fn split(offset: u64, size: u64, n: usize, align: u64) -> Vec<(u64, u64)> {
    let per = size / align / n as u64 * align;
    (0..n as u64)
        .map(|i| {
            let start = offset + i * per;
            let end = if i + 1 == n as u64 {
                offset + size
            } else {
                start + per
            };
            (start, end)
        })
        .collect()
}

fn run_verify(
    c: &Ctx<'_>,
    queues: &mut [blkio::Blkioq],
    phase: VerifyPhase,
) -> Result<VerifyReport> {
    let o = c.o;
    let n = queues.len();
    let lbs = c.info.logical_block_size;
    let unit = lbs.max(4096);
    let seg_limit = c.info.segment_limit();
    let max_transfer = match seg_limit {
        0 => u64::MAX,
        l => l.saturating_mul(c.info.max_segments as u64),
    };
    let max_chunk = (verify::MAX_CHUNK.min(max_transfer) / unit * unit).max(unit);
    let parts = split(c.offset, c.size, n, lbs);
    let plans: Vec<verify::VerifyPlan> = (0..n)
        .map(|i| verify::VerifyPlan {
            queue: i,
            phase,
            seed: c.seed,
            depth: o.iodepth,
            write_part: parts[i],
            // Read back what another queue wrote.
            read_part: parts[(i + 1) % n],
            unit,
            max_chunk,
            seg_limit,
            max_segments: c.info.max_segments,
            buf_base: c.base + i * c.per_queue,
            slot_stride: c.stride,
        })
        .collect();
    let shared = Shared::new(n);
    let between = Barrier::new(n);
    let phases = if phase == VerifyPhase::Both { 2 } else { 1 };
    let total_bytes = c.size * phases;
    let started = Instant::now();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(&plans)
            .enumerate()
            .map(|(i, (q, plan))| {
                let (shared, between) = (&shared, &between);
                std::thread::Builder::new()
                    .name(format!("verify-q{i}"))
                    .spawn_scoped(s, move || {
                        verify::run(q, plan, shared, || {
                            between.wait();
                        })
                    })
                    .expect("spawn a verify thread")
            })
            .collect();
        let t0 = shared.start();
        let mut next_tick = t0 + Duration::from_secs(1);
        while !handles.iter().all(|h| h.is_finished()) {
            let now = Instant::now();
            if now >= next_tick {
                let pct = shared.total_done() as f64 * 100.0 / total_bytes as f64;
                if o.progress {
                    eprintln!(
                        "bench: {:>4.0}s verify {pct:.0}% of {} MiB",
                        (now - t0).as_secs_f64(),
                        total_bytes >> 20
                    );
                }
                next_tick += Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("verify thread panicked"))
            .collect::<Vec<_>>()
    });
    let mut r = VerifyReport {
        mode: "verify",
        socket: o.socket.display().to_string(),
        phase,
        seed: c.seed,
        offset: c.offset,
        size: c.size,
        capacity: c.info.capacity,
        logical_block_size: lbs,
        iodepth: o.iodepth,
        queues: n,
        write_requests: 0,
        read_requests: 0,
        multi_segment_requests: 0,
        flushes: 0,
        bytes_written: 0,
        bytes_read: 0,
        elapsed_s: started.elapsed().as_secs_f64(),
        errors: 0,
        first_error: None,
        bad_sectors: 0,
        first_mismatch: None,
        fatal: None,
        ok: false,
    };
    for q in results {
        r.write_requests += q.write_requests;
        r.read_requests += q.read_requests;
        r.multi_segment_requests += q.multi_segment_requests;
        r.flushes += q.flushes;
        r.bytes_written += q.bytes_written;
        r.bytes_read += q.bytes_read;
        r.errors += q.errors;
        r.bad_sectors += q.bad_sectors;
        r.first_error = r.first_error.or(q.first_error);
        r.fatal = r.fatal.or(q.fatal);
        if let Some(m) = q.first_mismatch
            && r.first_mismatch.is_none_or(|f| m.offset < f.offset)
        {
            r.first_mismatch = Some(m);
        }
    }
    let want_written = if phase == VerifyPhase::Read {
        0
    } else {
        c.size
    };
    let want_read = if phase == VerifyPhase::Write {
        0
    } else {
        c.size
    };
    r.ok = r.errors == 0
        && r.bad_sectors == 0
        && r.fatal.is_none()
        && r.bytes_written == want_written
        && r.bytes_read == want_read;
    if !r.ok && r.fatal.is_none() && r.errors == 0 && r.bad_sectors == 0 {
        r.fatal = Some("the region was not fully covered".into());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo {
            capacity: 64 << 20,
            logical_block_size: 512,
            max_queues: 4,
            max_segments: 254,
            max_segment_len: 1 << 20,
        }
    }

    fn opts() -> Options {
        Options {
            socket: "/s".into(),
            ..Options::default()
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("4k"), Ok(4096));
        assert_eq!(parse_bytes("128K"), Ok(128 << 10));
        assert_eq!(parse_bytes("1M"), Ok(1 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(parse_bytes("k").is_err());
        assert!(parse_bytes("4x").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("inf").is_err());
    }

    #[test]
    fn checks_against_the_device() {
        let i = info();
        assert_eq!(check(&opts(), &i).unwrap(), (0, 64 << 20));
        let err = |o: Options| check(&o, &i).unwrap_err().to_string();
        let e = err(Options { bs: 1000, ..opts() });
        assert!(
            e.contains("not a multiple of the device's logical block size (512"),
            "{e}"
        );
        let e = err(Options {
            offset: 60 << 20,
            size: Some(8 << 20),
            ..opts()
        });
        assert!(e.contains("beyond the device's capacity"), "{e}");
        let e = err(Options {
            offset: 64 << 20,
            ..opts()
        });
        assert!(e.contains("beyond the device's capacity"), "{e}");
        let e = err(Options {
            offset: 100,
            ..opts()
        });
        assert!(e.contains("--offset 100 is not a multiple"), "{e}");
        let e = err(Options {
            queues: 5,
            ..opts()
        });
        assert!(e.contains("offers 4 queue(s)"), "{e}");
        let e = err(Options {
            bs: 512 << 20,
            ..opts()
        });
        assert!(e.contains("largest request"), "{e}");
        let e = err(Options {
            size: Some(2048),
            ..opts()
        });
        assert!(e.contains("smaller than one --bs"), "{e}");
        // Verify ignores --bs but needs lbs-aligned regions.
        let v = Options {
            verify: Some(VerifyPhase::Both),
            bs: 1000,
            offset: 4096,
            size: Some(1 << 20),
            ..opts()
        };
        assert_eq!(check(&v, &i).unwrap(), (4096, 1 << 20));
        let e = err(Options {
            size: Some(1000),
            ..v
        });
        assert!(e.contains("--size 1000 is not a multiple"), "{e}");
    }

    #[test]
    fn split_covers_the_region() {
        assert_eq!(split(0, 4096, 1, 512), vec![(0, 4096)]);
        assert_eq!(split(512, 4096, 2, 512), vec![(512, 2560), (2560, 4608)]);
        assert_eq!(split(0, 1536, 2, 512), vec![(0, 512), (512, 1536)]);
        assert_eq!(split(0, 512, 2, 512), vec![(0, 0), (0, 512)]);
    }

    #[test]
    fn modes() {
        assert!(RwMode::Read.is_sequential() && RwMode::Write.is_sequential());
        assert!(!RwMode::Randrw.is_sequential());
        assert!(RwMode::Randrw.writes() && RwMode::Randwrite.writes() && RwMode::Write.writes());
        assert!(!RwMode::Randread.writes() && !RwMode::Read.writes());
    }
}
