//! The command line: clap definitions and their translation into library configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use vublk::engine::EngineKind;
use vublk::export::{Export, ExportConfig};
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
    /// Most I/O threads per queue.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,
    /// Directory for the built-in default's image and socket.
    #[arg(long, default_value = "vublk-data")]
    pub data_dir: PathBuf,
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
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let builtin = args.file.is_none();
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
    let export = Export::open(&ExportConfig {
        path: path.clone(),
        create_size,
        read_only: args.read_only,
        queues: args.queues,
        queue_size: args.queue_size,
        serial: args.serial.clone(),
        logical_block_size: args.logical_block_size,
        writeback: args.write_cache == WriteCacheMode::Writeback,
        io_threads: usize::from(args.io_threads),
        engine: EngineKind::Threads,
        direct: false,
    })?;
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
        let Command::Serve(a) = cli.command;
        assert_eq!(a.queues, 4);
        assert!(a.read_only);
        assert!(Cli::try_parse_from(["vublk", "serve", "--queues", "0"]).is_err());
    }

    #[test]
    fn hint_matches_the_export() {
        let h = qemu_hint(Path::new("/nonexistent/x.sock"), 2, 128);
        assert!(h.contains("path=/nonexistent/x.sock"));
        assert!(h.contains("num-queues=2,queue-size=128"));
        assert!(h.contains("share=on"));
    }
}
