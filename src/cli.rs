//! The command line: clap definitions and their translation into library configuration.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use vublk::backing::{self, Backing};
use vublk::bench::{self, RwMode, VerifyPhase};
use vublk::caps::KernelCaps;
use vublk::engine::EngineKind;
use vublk::export::{Export, ExportConfig};
use vublk::policy::{self, Choice, DirectRequest, EngineRequest, Refusal, Request};
use vublk::probe::{self, ProbeReport};
use vublk::server::{self, SocketConfig};

/// Size of the image the built-in default creates.
const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

/// vublk: a vhost-user-blk server for QEMU and other VMMs.
#[derive(Debug, Parser)]
#[command(name = "vublk", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a raw image or block device on a vhost-user socket.
    ///
    /// Without --file and --socket it serves a built-in default: a directory (--data-dir)
    /// holding a 1 GiB image and the socket, and prints the QEMU arguments that attach it.
    Serve(ServeArgs),
    /// Show what a backing is and which I/O engine vublk would use for it, and why.
    ///
    /// Nothing is served and the backing is not modified. Exits non-zero when the requested
    /// engine or O_DIRECT mode cannot work there.
    Probe(ProbeArgs),
    /// Load-test or verify any vhost-user-blk backend (vublk, qemu-storage-daemon, ...)
    /// without a VM: fio-like workloads through libblkio, results as one line or JSON.
    Bench(BenchArgs),
}

/// How the I/O engine is chosen.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct EngineArgs {
    /// I/O engine; auto picks one from what the backing is (see `vublk probe`).
    #[arg(long, value_enum, default_value_t = EngineRequest::Auto)]
    pub engine: EngineRequest,
    /// Open the backing with O_DIRECT (bypassing the page cache); auto decides from the
    /// backing.
    #[arg(long, value_enum, default_value_t = DirectRequest::Auto)]
    pub direct: DirectRequest,
}

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Image file or block device to examine (it is not modified).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Print one JSON object with the keys "probe", "kernel" and "choice" (or "error").
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub choice: EngineArgs,
    /// Logical block size the export would have [default: the backing's, 512 for files].
    #[arg(long, value_parser = parse_block_size)]
    pub logical_block_size: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WriteCacheMode {
    /// Writes complete when the kernel has them; FLUSH makes them durable.
    Writeback,
    /// Writes complete only once durable.
    Writethrough,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The vhost-user socket to listen on [default: DATA_DIR/vublk.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Raw image file or block device to serve [default: DATA_DIR/disk.img, 1 GiB].
    #[arg(long, value_name = "IMG")]
    pub file: Option<PathBuf>,
    /// Create the image with this size (preallocated) if it does not exist, e.g. 10G, 512M.
    /// An existing image is never resized: a different size is an error.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Export read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Serve a NULL device of this size instead of storage, for measuring the transport:
    /// reads return zeros and writes are discarded. Never use it for data.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with_all = ["file", "size"])]
    pub null: Option<u64>,
    /// Number of virtqueues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Largest virtqueue size the frontend may set (a power of two, 4 to 1024).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Serial number the guest sees (at most 20 characters) [default: derived from the image].
    #[arg(long)]
    pub serial: Option<String>,
    /// Logical block size the guest sees [default: the backing's, 512 for files].
    #[arg(long, value_parser = parse_block_size)]
    pub logical_block_size: Option<u32>,
    /// Initial write-cache mode; the guest may switch it.
    #[arg(long, value_enum, default_value_t = WriteCacheMode::Writeback)]
    pub write_cache: WriteCacheMode,
    /// Permission bits of the socket (octal).
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group owner of the socket (name or number), e.g. the group QEMU runs as.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Most I/O threads per queue (thread-pool engine).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,
    #[command(flatten)]
    pub choice: EngineArgs,
    /// Directory for the built-in default's image and socket.
    #[arg(long, default_value = "vublk-data")]
    pub data_dir: PathBuf,
}

/// Runs longer than this get a progress line when stderr is a terminal.
const PROGRESS_MIN_RUN: Duration = Duration::from_secs(3);

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The backend's vhost-user socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = RwMode::Randread)]
    pub rw: RwMode,
    /// Percentage of reads for --rw randrw.
    #[arg(long, value_name = "PCT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Request size, a multiple of the device's logical block size (e.g. 4k, 128k).
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = bench::parse_bytes)]
    pub bs: u64,
    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub iodepth: u32,
    /// Queues, each driven by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub queues: u32,
    /// Virtqueue size (a power of two; at most what the backend accepts). A request takes
    /// 2 + segments descriptors; requests beyond the ring wait inside libblkio.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Measured time (seconds, or e.g. 500ms, 2m).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = bench::parse_duration)]
    pub runtime: Duration,
    /// Time to run before measuring; excluded from the results.
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = bench::parse_duration)]
    pub ramp: Duration,
    /// Start of the region of the device to use (bytes, e.g. 1G).
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = bench::parse_bytes)]
    pub offset: u64,
    /// Length of the region [default: to the end of the device].
    #[arg(long, value_name = "SIZE", value_parser = bench::parse_bytes)]
    pub size: Option<u64>,
    /// Report this process's CPU time (all threads) per I/O: the backend's PID.
    #[arg(long, value_name = "PID")]
    pub backend_pid: Option<u32>,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
    /// Print a progress line on stderr every second [default: on runs longer than 3 s when
    /// stderr is a terminal].
    #[arg(long)]
    pub progress: bool,
    /// Instead of a timed load, write the region with self-checking sectors (mixed sizes,
    /// multi-segment requests, flushes), read it back and report the first mismatch; exits
    /// non-zero on any mismatch or I/O error.
    #[arg(long)]
    pub verify: bool,
    /// Which verify phase to run (implies --verify): `write` writes and flushes, `read` checks
    /// what a `write` run with the same --seed wrote.
    #[arg(long, value_enum, value_name = "PHASE")]
    pub verify_phase: Option<VerifyPhase>,
    /// Seed of offsets and data (the verify generation) [default: random, reported].
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<u64>,
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a seed (a number, decimal or 0x-hex)"))
}

impl BenchArgs {
    fn options(&self, stderr_is_tty: bool) -> bench::Options {
        let verify = match (self.verify, self.verify_phase) {
            (_, Some(p)) => Some(p),
            (true, None) => Some(VerifyPhase::Both),
            (false, None) => None,
        };
        let long_run = self.ramp + self.runtime > PROGRESS_MIN_RUN;
        bench::Options {
            socket: self.socket.clone(),
            rw: self.rw,
            rwmixread: self.rwmixread,
            bs: self.bs,
            iodepth: self.iodepth as usize,
            queues: self.queues as usize,
            queue_size: self.queue_size,
            runtime: self.runtime,
            ramp: self.ramp,
            offset: self.offset,
            size: self.size,
            backend_pid: self.backend_pid,
            progress: self.progress || (stderr_is_tty && (long_run || verify.is_some())),
            verify,
            seed: self.seed,
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 10G, 512M, 1048576)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(format!("unknown size unit {unit:?} (use K, M, G or T)")),
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s} is too large"))?;
    if bytes == 0 || !bytes.is_multiple_of(4096) {
        return Err(format!("{s} must be a non-zero multiple of 4096 bytes"));
    }
    Ok(bytes)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if (4..=1024).contains(&n) && n.is_power_of_two() => Ok(n),
        _ => Err(format!("{s} is not a power of two between 4 and 1024")),
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("{s} is not supported (use 512 or 4096)")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s} is not an octal permission mode such as 0660")),
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Probe(args) => probe_cmd(&args),
        Command::Bench(args) => bench(args),
    }
}

fn bench(args: BenchArgs) -> Result<()> {
    let report = bench::run(&args.options(std::io::stderr().is_terminal()))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{}", report.human());
    }
    match report.failure() {
        Some(f) => Err(anyhow::anyhow!(f)),
        None => Ok(()),
    }
}

/// What the probe found, what the kernel allows, and the policy's verdict.
struct Decision {
    report: ProbeReport,
    kernel: KernelCaps,
    logical_block_size: u32,
    choice: Result<Choice, Refusal>,
}

fn decide(path: &Path, args: EngineArgs, logical_block_size: Option<u32>) -> Result<Decision> {
    let report = probe::probe(path)?;
    let kernel = KernelCaps::detect();
    let logical_block_size =
        logical_block_size.unwrap_or_else(|| report.default_export_block_size());
    let choice = policy::choose(
        &report,
        &kernel,
        &Request {
            engine: args.engine,
            direct: args.direct,
            logical_block_size,
        },
    );
    Ok(Decision {
        report,
        kernel,
        logical_block_size,
        choice,
    })
}

fn probe_cmd(args: &ProbeArgs) -> Result<()> {
    let d = match decide(&args.path, args.choice, args.logical_block_size) {
        Ok(d) => d,
        Err(e) if args.json => {
            println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if args.json {
        let mut out = serde_json::json!({
            "probe": d.report,
            "kernel": d.kernel,
            "logical_block_size": d.logical_block_size,
        });
        match &d.choice {
            Ok(c) => out["choice"] = serde_json::json!(c),
            Err(e) => out["error"] = serde_json::json!(e.to_string()),
        }
        println!("{out}");
    } else {
        println!("{}\n{}", d.report, d.kernel);
        match &d.choice {
            Ok(c) => {
                println!(
                    "choice for {}-byte blocks: engine {}, O_DIRECT {}",
                    d.logical_block_size,
                    c.engine,
                    if c.direct { "on" } else { "off" }
                );
                for r in &c.reasons {
                    println!("  - {r}");
                }
            }
            Err(e) => println!(
                "choice for {}-byte blocks: refused: {e}",
                d.logical_block_size
            ),
        }
    }
    d.choice.map(drop).map_err(Into::into)
}

fn serve(args: ServeArgs) -> Result<()> {
    let builtin = args.file.is_none() && args.null.is_none();
    if args.file.is_none() || args.socket.is_none() {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    }
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("disk.img"));
    let create_size = match (args.size, builtin && !path.exists()) {
        (Some(size), _) => Some(size),
        (None, true) => Some(DEFAULT_IMAGE_SIZE),
        (None, false) => None,
    };
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.data_dir.join("vublk.sock"));
    let export_config = |engine, direct| ExportConfig {
        path: path.clone(),
        create_size,
        read_only: args.read_only,
        queues: args.queues,
        queue_size: args.queue_size,
        serial: args.serial.clone(),
        logical_block_size: args.logical_block_size,
        writeback: args.write_cache == WriteCacheMode::Writeback,
        io_threads: usize::from(args.io_threads),
        engine,
        direct,
    };
    let export = if let Some(size) = args.null {
        if args.choice.engine != EngineRequest::Auto || args.choice.direct != DirectRequest::Auto {
            anyhow::bail!("--null has no storage: --engine and --direct do not apply");
        }
        log::warn!("serving a NULL device: reads return zeros, writes are discarded");
        Export::with_backing(
            Backing::null(size)?,
            &export_config(EngineKind::Null, false),
        )?
    } else {
        open_export(&args, &path, create_size, export_config)?
    };
    serve_export(&args, export, socket, builtin)
}

fn open_export(
    args: &ServeArgs,
    path: &Path,
    create_size: Option<u64>,
    export_config: impl Fn(EngineKind, bool) -> ExportConfig,
) -> Result<Export> {
    // The engine is chosen from what the image is, so it must exist first.
    if let Some(size) = create_size {
        backing::create_image_if_missing(path, size)?;
    }
    let decision = decide(path, args.choice, args.logical_block_size)?;
    if !args.read_only && !decision.report.writable {
        anyhow::bail!(
            "{} is not writable ({}); serve it with --read-only",
            path.display(),
            if decision.report.read_only_media {
                "read-only media"
            } else {
                "permission denied"
            }
        );
    }
    let choice = decision.choice?;
    log::info!("{}: {choice}", path.display());
    Ok(Export::open(&export_config(choice.engine, choice.direct))?)
}

fn serve_export(args: &ServeArgs, export: Export, socket: PathBuf, builtin: bool) -> Result<()> {
    let path = export.backing.path().to_path_buf();
    let listener = server::bind_socket(&SocketConfig {
        path: socket.clone(),
        mode: args.socket_mode,
        group: args.socket_group.clone(),
    })?;
    log::info!(
        "serving {} ({} bytes, {} queue(s) of up to {}, {}-byte blocks, serial {}, {}{}) on {}",
        path.display(),
        export.disk.capacity_sectors * 512,
        export.disk.num_queues,
        export.disk.queue_size,
        export.disk.logical_block_size,
        export.serial(),
        if export.write_cache.writeback() {
            "writeback"
        } else {
            "writethrough"
        },
        if export.disk.read_only {
            ", read-only"
        } else {
            ""
        },
        socket.display()
    );
    let queues = export.disk.num_queues;
    let queue_size = export.disk.queue_size;
    let ready = || {
        if builtin {
            println!("{}", qemu_hint(&socket, queues, queue_size));
        }
    };
    server::serve(Arc::new(export), listener, &socket, ready)?;
    Ok(())
}

/// The QEMU arguments that attach an export (guest RAM must be shared with the daemon).
fn qemu_hint(socket: &Path, queues: u16, queue_size: u16) -> String {
    let socket = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    format!(
        "vublk is ready. Attach it to QEMU with:\n  \
         -object memory-backend-memfd,id=mem,size=<guest RAM>,share=on -machine memory-backend=mem \\\n  \
         -chardev socket,id=vublk0,path={},reconnect-ms=1000 \\\n  \
         -device vhost-user-blk-pci,chardev=vublk0,num-queues={queues},queue-size={}",
        socket.display(),
        queue_size.min(1024)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("8KiB"), Ok(8192));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1000").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn queue_sizes_modes_and_blocks() {
        assert_eq!(parse_queue_size("256"), Ok(256));
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("2048").is_err());
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("999").is_err());
        assert_eq!(parse_block_size("4096"), Ok(4096));
        assert!(parse_block_size("1024").is_err());
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "vublk",
            "serve",
            "--socket",
            "/s",
            "--file",
            "/f",
            "--queues",
            "4",
            "--read-only",
        ])
        .unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(a.queues, 4);
        assert!(a.read_only);
        assert_eq!(a.choice.engine, EngineRequest::Auto);
        assert_eq!(a.choice.direct, DirectRequest::Auto);
        assert!(Cli::try_parse_from(["vublk", "serve", "--queues", "0"]).is_err());
    }

    #[test]
    fn engine_and_direct_options() {
        let cli =
            Cli::try_parse_from(["vublk", "serve", "--engine", "linux-aio", "--direct", "on"])
                .unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(a.choice.engine, EngineRequest::LinuxAio);
        assert_eq!(a.choice.direct, DirectRequest::On);
        let cli = Cli::try_parse_from([
            "vublk",
            "probe",
            "/dev/x",
            "--json",
            "--engine",
            "io-uring",
            "--logical-block-size",
            "4096",
        ])
        .unwrap();
        let Command::Probe(a) = cli.command else {
            panic!("not probe")
        };
        assert!(a.json);
        assert_eq!(a.choice.engine, EngineRequest::IoUring);
        assert_eq!(a.logical_block_size, Some(4096));
        assert!(Cli::try_parse_from(["vublk", "serve", "--engine", "aio"]).is_err());
        assert!(Cli::try_parse_from(["vublk", "serve", "--direct", "yes"]).is_err());
        assert!(Cli::try_parse_from(["vublk", "probe"]).is_err());
    }

    #[test]
    fn hint_matches_the_export() {
        let h = qemu_hint(Path::new("/nonexistent/x.sock"), 2, 128);
        assert!(h.contains("path=/nonexistent/x.sock"));
        assert!(h.contains("num-queues=2,queue-size=128"));
        assert!(h.contains("share=on"));
    }

    fn bench_args(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let cli = Cli::try_parse_from(["vublk", "bench"].iter().chain(args))?;
        match cli.command {
            Command::Bench(b) => Ok(b),
            _ => panic!("not bench"),
        }
    }

    #[test]
    fn bench_defaults() {
        let b = bench_args(&["--socket", "/s"]).unwrap();
        let o = b.options(false);
        assert_eq!(o.socket, PathBuf::from("/s"));
        assert_eq!(o.rw, RwMode::Randread);
        assert_eq!(
            (o.bs, o.iodepth, o.queues, o.queue_size),
            (4096, 32, 1, 256)
        );
        assert_eq!(
            (o.runtime, o.ramp),
            (Duration::from_secs(10), Duration::ZERO)
        );
        assert_eq!((o.offset, o.size, o.rwmixread), (0, None, 50));
        assert!(!o.progress && o.verify.is_none() && o.seed.is_none() && !b.json);
        // A terminal gets progress on long runs only.
        assert!(o.progress || b.options(true).progress);
        let short = bench_args(&["--socket", "/s", "--runtime", "1"]).unwrap();
        assert!(!short.options(true).progress);
        assert!(
            bench_args(&["--rw", "read"]).is_err(),
            "--socket is required"
        );
    }

    #[test]
    fn bench_options() {
        let b = bench_args(&[
            "--socket",
            "/s",
            "--rw",
            "randrw",
            "--rwmixread",
            "70",
            "--bs",
            "128k",
            "--iodepth",
            "64",
            "--queues",
            "4",
            "--runtime",
            "2.5",
            "--ramp",
            "500ms",
            "--offset",
            "1M",
            "--size",
            "1G",
            "--backend-pid",
            "42",
            "--json",
            "--progress",
            "--seed",
            "0x10",
        ])
        .unwrap();
        let o = b.options(false);
        assert_eq!((o.rw, o.rwmixread, o.bs), (RwMode::Randrw, 70, 128 << 10));
        assert_eq!((o.iodepth, o.queues), (64, 4));
        assert_eq!(o.runtime, Duration::from_millis(2500));
        assert_eq!(o.ramp, Duration::from_millis(500));
        assert_eq!((o.offset, o.size), (1 << 20, Some(1 << 30)));
        assert_eq!((o.backend_pid, o.seed), (Some(42), Some(16)));
        assert!(b.json && o.progress);
        for bad in [
            &["--rw", "randomread"][..],
            &["--rwmixread", "101"],
            &["--bs", "4q"],
            &["--iodepth", "0"],
            &["--queues", "0"],
            &["--queue-size", "100"],
            &["--runtime", "x"],
            &["--seed", "0xzz"],
            &["--verify-phase", "check"],
        ] {
            let mut a = vec!["--socket", "/s"];
            a.extend_from_slice(bad);
            assert!(bench_args(&a).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bench_verify_flags() {
        let v = |a: &[&str]| {
            let mut args = vec!["--socket", "/s"];
            args.extend_from_slice(a);
            bench_args(&args).unwrap().options(false).verify
        };
        assert_eq!(v(&[]), None);
        assert_eq!(v(&["--verify"]), Some(VerifyPhase::Both));
        assert_eq!(v(&["--verify-phase", "write"]), Some(VerifyPhase::Write));
        assert_eq!(
            v(&["--verify", "--verify-phase", "read"]),
            Some(VerifyPhase::Read)
        );
    }
}
