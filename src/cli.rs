//! The command line: clap definitions and their translation into library configuration.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use vublk::attach::{self, AttachSpec};
use vublk::backing::{self, Backing};
use vublk::bench::{self, RwMode, VerifyPhase};
use vublk::blk::default_serial;
use vublk::caps::KernelCaps;
use vublk::engine::EngineKind;
use vublk::export::{Export, ExportConfig};
use vublk::policy::{self, Choice, DirectRequest, EngineRequest, Refusal, Request};
use vublk::probe::{self, ProbeReport};
use vublk::readiness::{self, PidFile};
use vublk::server::{self, Server, SocketConfig};

/// Size of the image the built-in default creates.
const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

/// vublk: a vhost-user-blk server for QEMU and other VMMs.
///
/// Without a subcommand vublk follows QEMU's vhost-user backend program conventions and
/// serves: `vublk --socket-path=PATH --blk-file=IMG [serve options]`, or `--fd=N` for a
/// listening socket it inherits.
#[derive(Debug, Parser)]
#[command(
    name = "vublk",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Print the vhost-user backend capabilities as JSON and exit (other options are ignored).
    #[arg(long)]
    pub print_capabilities: bool,
    /// Serve options, when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
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
    /// Print how to attach an export: the libvirt <disk> element or the QEMU arguments.
    ///
    /// Give it the same options as `serve` (the ones that do not matter here are accepted and
    /// ignored). Nothing is served and no image is created.
    AttachInfo(AttachInfoArgs),
}

/// What `vublk attach-info` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachFormat {
    /// The libvirt <disk type='vhostuser'> element.
    Libvirt,
    /// A minimal complete libvirt domain (shared memfd memory and the disk).
    LibvirtDomain,
    /// QEMU arguments, one per line (for `mapfile -t`).
    Qemu,
}

#[derive(Debug, clap::Args)]
pub struct AttachInfoArgs {
    /// The export, as given to `serve`.
    #[command(flatten)]
    pub export: ServeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = AttachFormat::Libvirt)]
    pub format: AttachFormat,
    /// Guest RAM: the size of the shared memory backend (QEMU) or domain (libvirt-domain).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    /// The disk's device name in the guest, for libvirt.
    #[arg(long, value_name = "DEV", default_value = "vda", value_parser = parse_target_dev)]
    pub target_dev: String,
    /// QEMU id of the chardev; unique per disk of one VM.
    #[arg(long, default_value = "vublk0", value_parser = parse_qemu_id)]
    pub id: String,
    /// Domain name, for --format libvirt-domain.
    #[arg(long, default_value = "vublk-vm")]
    pub name: String,
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
pub enum HugeBounce {
    /// When the backing is opened with O_DIRECT, the kernel has transparent huge pages and
    /// guest RAM is not on hugetlbfs.
    Auto,
    /// Never: transfers always go straight from guest memory.
    Off,
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
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve the listening unix socket inherited as file descriptor N instead of creating one
    /// (its path, if any, is not removed on exit).
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    pub fd: Option<i32>,
    /// Raw image file or block device to serve [default: DATA_DIR/disk.img, 1 GiB].
    #[arg(long, visible_alias = "blk-file", value_name = "IMG")]
    pub file: Option<PathBuf>,
    /// Create the image with this size (space reserved by fallocate) if it does not exist,
    /// e.g. 10G, 512M.
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
    /// After a batch, keep polling the virtqueue and the engine for up to this long (µs)
    /// before sleeping: fewer wake-ups for busy queues, at the cost of a spinning thread (0:
    /// off). The window adapts; where work comes slower than this, nothing spins. The default
    /// is QEMU's for its event loops.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub poll_us: u32,
    /// With O_DIRECT, copy transfers of 16 KiB and more through huge-page buffers (8 MiB per
    /// queue, transparent huge pages) unless guest RAM is on hugetlbfs: devices that pay per
    /// memory segment then see one segment instead of one per 4 KiB page.
    #[arg(long, value_enum, default_value_t = HugeBounce::Auto)]
    pub huge_bounce: HugeBounce,
    #[command(flatten)]
    pub choice: EngineArgs,
    /// Directory for the built-in default's image and socket.
    #[arg(long, default_value = "vublk-data")]
    pub data_dir: PathBuf,
    /// Write vublk's pid here once it serves, and remove it on exit. A pid file naming a live
    /// process is refused; a stale one is replaced.
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
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
    /// Put the I/O buffers in 2 MiB huge pages, like a guest whose RAM is backed by huge
    /// pages (needs free pages in /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    pub hugepages: bool,
    /// Send a flush after every N writes per queue (like fio's fsync=N), as a guest that
    /// wants its writes durable does. Flushes are not I/Os: not in IOPS or latency.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub flush_every: u64,
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
            huge_pages: self.hugepages,
            flush_every: self.flush_every,
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

fn parse_target_dev(s: &str) -> Result<String, String> {
    match s.strip_prefix("vd") {
        Some(rest) if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase()) => {
            Ok(s.into())
        }
        _ => Err(format!(
            "{s:?} is not a virtio disk name such as vda or vdb"
        )),
    }
}

fn parse_qemu_id(s: &str) -> Result<String, String> {
    let mut bytes = s.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
    if first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        Ok(s.into())
    } else {
        Err(format!(
            "{s:?} is not a QEMU id (a letter, then letters, digits, '-', '.', '_')"
        ))
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s} is not an octal permission mode such as 0660")),
    }
}

/// Parses `args` and runs the command. `--print-capabilities` anywhere before `--` prints
/// the capabilities and ends, whatever else is there (QEMU's backend conventions).
pub fn run_from(args: impl IntoIterator<Item = OsString>) -> Result<()> {
    let args: Vec<OsString> = args.into_iter().collect();
    if wants_capabilities(&args) {
        println!("{}", attach::capabilities());
        return Ok(());
    }
    run(Cli::parse_from(args))
}

fn wants_capabilities(args: &[OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--print-capabilities")
}

pub fn run(cli: Cli) -> Result<()> {
    if cli.print_capabilities {
        println!("{}", attach::capabilities());
        return Ok(());
    }
    match cli.command {
        None => serve(cli.serve, Mode::Backend),
        Some(Command::Serve(args)) => serve(args, Mode::Serve),
        Some(Command::Probe(args)) => probe_cmd(&args),
        Some(Command::Bench(args)) => bench(args),
        Some(Command::AttachInfo(args)) => attach_info(&args),
    }
}

/// How serving was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `vublk serve`: the built-in default fills in what is missing.
    Serve,
    /// No subcommand (how QEMU and libvirt start a backend): socket and image are required.
    Backend,
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

/// Where the export's files are, once the built-in defaults are filled in.
#[derive(Debug)]
struct Resolved {
    /// Image (or the name of the NULL device).
    path: PathBuf,
    /// Create the image with this size if it is missing.
    create_size: Option<u64>,
    /// The socket to create (`None` with `--fd`).
    socket: Option<PathBuf>,
    /// The built-in default is in use (print the QEMU hint).
    builtin: bool,
}

/// Fills in the built-in defaults and refuses what is missing, before anything is created.
fn resolve(args: &ServeArgs, mode: Mode) -> Result<Resolved> {
    if mode == Mode::Backend {
        if args.socket.is_none() && args.fd.is_none() {
            anyhow::bail!(
                "no socket: give --socket-path PATH or --fd N (or a subcommand: vublk --help)"
            );
        }
        if args.file.is_none() && args.null.is_none() {
            anyhow::bail!("no image: give --blk-file IMG (or --null SIZE)");
        }
    }
    let builtin = args.file.is_none() && args.null.is_none();
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("disk.img"));
    let create_size = match (args.size, builtin && !path.exists()) {
        (Some(size), _) => Some(size),
        (None, true) => Some(DEFAULT_IMAGE_SIZE),
        (None, false) => None,
    };
    if args.null.is_none() && create_size.is_none() && !path.exists() {
        anyhow::bail!(
            "{} does not exist; give --size SIZE to create it",
            path.display()
        );
    }
    let socket = match args.fd {
        Some(_) => None,
        None => Some(
            args.socket
                .clone()
                .unwrap_or_else(|| args.data_dir.join("vublk.sock")),
        ),
    };
    Ok(Resolved {
        path,
        create_size,
        socket,
        builtin,
    })
}

fn serve(args: ServeArgs, mode: Mode) -> Result<()> {
    let r = resolve(&args, mode)?;
    // Fail on a bad descriptor or a live pid file before any image is created.
    let inherited = args.fd.map(server::listener_from_fd).transpose()?;
    let pidfile = args.pidfile.as_deref().map(PidFile::claim).transpose()?;
    // Only the built-in default's files live in the data directory.
    if r.builtin || (args.socket.is_none() && args.fd.is_none()) {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    }
    let export_config = |engine, direct| ExportConfig {
        path: r.path.clone(),
        create_size: r.create_size,
        read_only: args.read_only,
        queues: args.queues,
        queue_size: args.queue_size,
        serial: args.serial.clone(),
        logical_block_size: args.logical_block_size,
        writeback: args.write_cache == WriteCacheMode::Writeback,
        io_threads: usize::from(args.io_threads),
        poll: std::time::Duration::from_micros(u64::from(args.poll_us)),
        huge_bounce: args.huge_bounce == HugeBounce::Auto,
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
        open_export(&args, &r.path, r.create_size, export_config)?
    };
    let listener = match inherited {
        Some(l) => l,
        None => server::bind_socket(&SocketConfig {
            path: r.socket.clone().expect("a socket path without --fd"),
            mode: args.socket_mode,
            group: args.socket_group.clone(),
        })?,
    };
    serve_export(&args, export, listener, &r, pidfile)
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

fn serve_export(
    args: &ServeArgs,
    export: Export,
    listener: UnixListener,
    r: &Resolved,
    mut pidfile: Option<PidFile>,
) -> Result<()> {
    let path = export.backing.path().to_path_buf();
    let on = match (&r.socket, args.fd) {
        (Some(s), _) => s.display().to_string(),
        (None, fd) => match listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        {
            Some(p) => format!("{} (fd {})", p.display(), fd.unwrap_or(-1)),
            None => format!("fd {}", fd.unwrap_or(-1)),
        },
    };
    log::info!(
        "serving {} ({} bytes, {} queue(s) of up to {}, {}-byte blocks, serial {}, {}{}) on {on}",
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
    );
    let hint = match (&r.socket, r.builtin) {
        (Some(socket), true) => Some(qemu_hint(&AttachSpec {
            socket: std::fs::canonicalize(socket).unwrap_or_else(|_| socket.clone()),
            queues: export.disk.num_queues,
            queue_size: export.disk.queue_size,
            serial: Some(export.serial()),
            read_only: export.disk.read_only,
            memory: DEFAULT_GUEST_MEMORY,
            target_dev: "vda".into(),
            id: "vublk0".into(),
        })),
        _ => None,
    };
    let status = format!("serving {} on {on}", path.display());
    let server = Server::prepare(Arc::new(export), listener, r.socket.as_deref())?;
    // The socket accepts connections from here on (they wait in its backlog).
    if let Some(p) = &mut pidfile {
        p.write()?;
        log::info!("wrote pid file {}", p.path().display());
    }
    match readiness::notify_service_manager(&format!("READY=1\nSTATUS={status}")) {
        Ok(true) => log::info!("notified the service manager: ready"),
        Ok(false) => {}
        Err(e) => log::warn!("{e}"),
    }
    if let Some(h) = hint {
        println!("{h}");
    }
    server.run()?;
    drop(pidfile);
    Ok(())
}

/// Guest RAM the QEMU arguments assume unless told otherwise (`attach-info --memory`).
const DEFAULT_GUEST_MEMORY: u64 = 1 << 30;

/// What the built-in default prints once it serves: the QEMU arguments that attach it.
fn qemu_hint(spec: &AttachSpec) -> String {
    format!(
        "vublk is ready. Attach it to QEMU with (size= is the guest's RAM, as -m):\n  {}",
        attach::qemu_command_lines(spec)
    )
}

/// The attach description of the export `args.export` describes, without opening it.
fn attach_spec(args: &AttachInfoArgs) -> Result<AttachSpec> {
    let e = &args.export;
    if e.fd.is_some() && e.socket.is_none() {
        anyhow::bail!(
            "attach-info needs the socket's path: give --socket-path PATH (the path of the \
             socket passed as --fd) instead of --fd"
        );
    }
    let socket = e
        .socket
        .clone()
        .unwrap_or_else(|| e.data_dir.join("vublk.sock"));
    let socket = std::path::absolute(&socket)
        .with_context(|| format!("cannot make {} absolute", socket.display()))?;
    let serial = match (&e.serial, e.null, &e.file) {
        (Some(s), _, _) => Some(s.clone()),
        (None, Some(_), _) => Some(default_serial((0, 0))),
        (None, None, file) => {
            let path = file.clone().unwrap_or_else(|| e.data_dir.join("disk.img"));
            std::fs::metadata(&path)
                .ok()
                .map(|m| default_serial(backing::identity_of(&m)))
        }
    };
    Ok(AttachSpec {
        socket,
        queues: e.queues,
        queue_size: e.queue_size,
        serial,
        read_only: e.read_only,
        memory: args.memory,
        target_dev: args.target_dev.clone(),
        id: args.id.clone(),
    })
}

fn attach_info(args: &AttachInfoArgs) -> Result<()> {
    let spec = attach_spec(args)?;
    match args.format {
        AttachFormat::Libvirt => print!("{}", attach::libvirt_disk(&spec, 0)),
        AttachFormat::LibvirtDomain => print!("{}", attach::libvirt_domain(&spec, &args.name)),
        AttachFormat::Qemu => {
            for a in attach::qemu_args(&spec) {
                println!("{a}");
            }
        }
    }
    Ok(())
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
        let Some(Command::Serve(a)) = cli.command else {
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
        let Some(Command::Serve(a)) = cli.command else {
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
        let Some(Command::Probe(a)) = cli.command else {
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
        let h = qemu_hint(&AttachSpec {
            socket: "/nonexistent/x.sock".into(),
            queues: 2,
            queue_size: 128,
            serial: None,
            read_only: false,
            memory: DEFAULT_GUEST_MEMORY,
            target_dev: "vda".into(),
            id: "vublk0".into(),
        });
        assert!(h.contains("path=/nonexistent/x.sock"));
        assert!(h.contains("num-queues=2,queue-size=128"));
        assert!(h.contains("share=on"));
    }

    #[test]
    fn backend_conventions_without_a_subcommand() {
        let cli = Cli::try_parse_from([
            "vublk",
            "--socket-path=/run/vublk/a.sock",
            "--blk-file=/img",
            "--read-only",
            "--queues",
            "2",
            "--pidfile",
            "/run/vublk/a.pid",
        ])
        .unwrap();
        assert!(cli.command.is_none() && !cli.print_capabilities);
        assert_eq!(
            cli.serve.socket.as_deref(),
            Some(Path::new("/run/vublk/a.sock"))
        );
        assert_eq!(cli.serve.file.as_deref(), Some(Path::new("/img")));
        assert!(cli.serve.read_only);
        assert_eq!(cli.serve.queues, 2);
        assert_eq!(
            cli.serve.pidfile.as_deref(),
            Some(Path::new("/run/vublk/a.pid"))
        );
        let cli = Cli::try_parse_from(["vublk", "--fd=3", "--file", "/img"]).unwrap();
        assert_eq!(cli.serve.fd, Some(3));
        // --socket and --socket-path are one option, and --fd excludes it.
        assert!(Cli::try_parse_from(["vublk", "--fd", "3", "--socket-path", "/s"]).is_err());
        assert!(Cli::try_parse_from(["vublk", "serve", "--fd", "3", "--socket", "/s"]).is_err());
        assert!(Cli::try_parse_from(["vublk", "--socket", "/s", "--socket-path", "/t"]).is_err());
        // Top-level serve options and a subcommand do not mix.
        assert!(Cli::try_parse_from(["vublk", "--socket-path", "/s", "serve"]).is_err());
        let cli = Cli::try_parse_from(["vublk", "serve", "--socket-path", "/s", "--fd", "4"]);
        assert!(cli.is_err());
        let cli = Cli::try_parse_from(["vublk", "serve", "--blk-file", "/f", "--fd", "4"]).unwrap();
        let Some(Command::Serve(a)) = cli.command else {
            panic!("not serve")
        };
        assert_eq!((a.fd, a.file.as_deref()), (Some(4), Some(Path::new("/f"))));
    }

    #[test]
    fn backend_mode_refuses_what_is_missing() {
        let args = |a: &[&str]| {
            let mut v = vec!["vublk"];
            v.extend_from_slice(a);
            Cli::try_parse_from(v).unwrap().serve
        };
        let e = resolve(&args(&["--blk-file", "/f"]), Mode::Backend).unwrap_err();
        assert!(
            e.to_string().contains("--socket-path PATH or --fd N"),
            "{e}"
        );
        let e = resolve(&args(&["--socket-path", "/s"]), Mode::Backend).unwrap_err();
        assert!(e.to_string().contains("--blk-file"), "{e}");
        let missing = "/nonexistent/vublk-test.img";
        let e = resolve(&args(&["--fd", "3", "--blk-file", missing]), Mode::Backend).unwrap_err();
        assert!(e.to_string().contains("does not exist; give --size"), "{e}");
        let r = resolve(
            &args(&["--fd", "3", "--blk-file", missing, "--size", "1G"]),
            Mode::Backend,
        )
        .unwrap();
        assert_eq!(
            (r.socket, r.create_size, r.builtin),
            (None, Some(1 << 30), false)
        );
        // `serve` keeps its built-in default.
        let r = resolve(&args(&["--data-dir", "/nonexistent/d"]), Mode::Serve).unwrap();
        assert!(r.builtin);
        assert_eq!(
            r.socket.as_deref(),
            Some(Path::new("/nonexistent/d/vublk.sock"))
        );
        assert_eq!(r.create_size, Some(DEFAULT_IMAGE_SIZE));
    }

    #[test]
    fn print_capabilities_ignores_everything_else() {
        let a = |v: &[&str]| wants_capabilities(&v.iter().map(OsString::from).collect::<Vec<_>>());
        assert!(a(&["vublk", "--print-capabilities"]));
        assert!(a(&[
            "vublk",
            "--socket-path=/x",
            "--bogus",
            "--print-capabilities"
        ]));
        assert!(!a(&["vublk", "--socket-path=/x"]));
        assert!(!a(&["vublk", "bench", "--", "--print-capabilities"]));
        assert!(!a(&["--print-capabilities"]), "argv[0] is the program");
    }

    fn attach_args(a: &[&str]) -> Result<AttachInfoArgs, clap::Error> {
        let cli = Cli::try_parse_from(["vublk", "attach-info"].iter().chain(a))?;
        match cli.command {
            Some(Command::AttachInfo(x)) => Ok(x),
            _ => panic!("not attach-info"),
        }
    }

    #[test]
    fn attach_info_takes_the_serve_options() {
        let a = attach_args(&[
            "--socket-path",
            "/run/vublk/vm1.sock",
            "--file",
            "/nonexistent/vm1.img",
            "--size",
            "20G",
            "--queues",
            "4",
            "--queue-size",
            "512",
            "--serial",
            "vm1-disk0",
            "--read-only",
            "--socket-group",
            "kvm",
            "--socket-mode",
            "0660",
            "--pidfile",
            "/run/vublk/vm1.pid",
            "--engine",
            "threads",
            "--format",
            "qemu",
            "--memory",
            "4G",
            "--target-dev",
            "vdb",
            "--id",
            "disk1",
        ])
        .unwrap();
        assert_eq!(a.format, AttachFormat::Qemu);
        let s = attach_spec(&a).unwrap();
        assert_eq!(s.socket, Path::new("/run/vublk/vm1.sock"));
        assert_eq!((s.queues, s.queue_size, s.read_only), (4, 512, true));
        assert_eq!(s.serial.as_deref(), Some("vm1-disk0"));
        assert_eq!(
            (s.memory, s.target_dev.as_str(), s.id.as_str()),
            (4 << 30, "vdb", "disk1")
        );
        let d = attach_args(&["--socket", "rel.sock"]).unwrap();
        assert_eq!(d.format, AttachFormat::Libvirt);
        let s = attach_spec(&d).unwrap();
        assert!(s.socket.is_absolute() && s.socket.ends_with("rel.sock"));
        assert_eq!((s.memory, s.target_dev.as_str()), (1 << 30, "vda"));
        // The default serial of an image that does not exist yet is unknown.
        let d = attach_args(&["--socket", "/s", "--file", "/nonexistent/x.img"]).unwrap();
        assert_eq!(attach_spec(&d).unwrap().serial, None);
        let d = attach_args(&["--socket", "/s", "--null", "1G"]).unwrap();
        assert_eq!(
            attach_spec(&d).unwrap().serial,
            Some(default_serial((0, 0)))
        );
        let e = attach_spec(&attach_args(&["--fd", "3"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("--socket-path"), "{e}");
        for bad in [
            &["--target-dev", "sda"][..],
            &["--target-dev", "vd"],
            &["--id", "0x"],
            &["--id", "a,b"],
            &["--format", "xml"],
            &["--memory", "1000"],
        ] {
            assert!(attach_args(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn bench_args(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let cli = Cli::try_parse_from(["vublk", "bench"].iter().chain(args))?;
        match cli.command {
            Some(Command::Bench(b)) => Ok(b),
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
