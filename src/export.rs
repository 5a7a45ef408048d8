//! An export: one backing served as one virtio-blk disk, for the life of the process.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backing::{Backing, BackingError, OpenParams};
use crate::blk::{DiskGeometry, SECTOR_SIZE, WriteCache, default_serial, serial_bytes};
use crate::engine::{self, EngineError, EngineKind, EngineParams};

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Image file or block device.
    pub path: PathBuf,
    /// Create a preallocated image of this size when `path` does not exist.
    pub create_size: Option<u64>,
    /// Refuse writes.
    pub read_only: bool,
    /// Number of virtqueues (one worker thread each).
    pub queues: u16,
    /// Largest virtqueue size.
    pub queue_size: u16,
    /// GET_ID answer; derived from the backing when absent.
    pub serial: Option<String>,
    /// 512 or 4096; the backing's own when absent.
    pub logical_block_size: Option<u32>,
    /// Start in writeback mode (the guest may switch).
    pub writeback: bool,
    /// Most I/O threads per queue for the thread-pool engine.
    pub io_threads: usize,
    /// How long a queue thread polls for more work after a batch (zero: not at all).
    pub poll: std::time::Duration,
    /// With O_DIRECT, copy large transfers from guest memory in small pages through huge
    /// pages (see [`crate::engine::huge_arena`]).
    pub huge_bounce: bool,
    /// The engine every queue uses (see [`crate::policy`]).
    pub engine: EngineKind,
    /// Open the backing with O_DIRECT.
    pub direct: bool,
}

/// Errors setting up an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The backing could not be opened.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The logical block size is not one vublk offers.
    #[error("logical block size {0} is not supported (use 512 or 4096)")]
    BlockSize(u32),
    /// The backing cannot address blocks this small.
    #[error("logical block size {requested} is smaller than {path}'s own block size {native}")]
    BlockSizeTooSmall {
        /// The backing's path.
        path: PathBuf,
        /// Asked for.
        requested: u32,
        /// What the device has.
        native: u32,
    },
    /// The image holds not a single logical block.
    #[error("{path} is too small ({size} bytes) to hold one {block}-byte block")]
    TooSmall {
        /// The backing's path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Logical block size.
        block: u32,
    },
    /// The engine cannot run with this backing on this kernel.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The serial is too long or has characters a guest cannot show.
    #[error("serial {0:?} must be at most 20 printable ASCII characters")]
    Serial(String),
}

/// An open export.
#[derive(Debug)]
pub struct Export {
    /// Where the data lives.
    pub backing: Arc<Backing>,
    /// What the guest sees.
    pub disk: DiskGeometry,
    /// The current write-cache mode.
    pub write_cache: WriteCache,
    /// Most I/O threads per queue.
    pub io_threads: usize,
    /// How long a queue thread polls for more work after a batch.
    pub poll: std::time::Duration,
    /// Whether large O_DIRECT transfers may go through huge-page bounce buffers.
    pub huge_bounce: bool,
    /// The engine every queue uses.
    pub engine: EngineKind,
}

impl Export {
    /// Opens the backing and derives the disk the guest will see.
    pub fn open(cfg: &ExportConfig) -> Result<Self, ExportError> {
        Self::check(cfg)?;
        let backing = Backing::open(
            &cfg.path,
            &OpenParams {
                read_only: cfg.read_only,
                create_size: cfg.create_size,
                direct: cfg.direct,
            },
        )?;
        Self::with_backing(backing, cfg)
    }

    /// Checks what can be checked before the backing is touched.
    fn check(cfg: &ExportConfig) -> Result<(), ExportError> {
        let block = cfg.logical_block_size.unwrap_or(0);
        if cfg.logical_block_size.is_some() && block != 512 && block != 4096 {
            return Err(ExportError::BlockSize(block));
        }
        if let Some(s) = &cfg.serial
            && (s.len() > 20 || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        {
            return Err(ExportError::Serial(s.clone()));
        }
        Ok(())
    }

    /// Builds the export around an already open backing (`cfg.path`, `cfg.create_size` and
    /// `cfg.direct` are not used).
    pub fn with_backing(backing: Backing, cfg: &ExportConfig) -> Result<Self, ExportError> {
        Self::check(cfg)?;
        let native = backing.native_logical_block();
        let block = cfg.logical_block_size.unwrap_or(native.clamp(512, 4096));
        if block < native {
            return Err(ExportError::BlockSizeTooSmall {
                path: backing.path().to_path_buf(),
                requested: block,
                native,
            });
        }
        let usable = backing.size() / u64::from(block) * u64::from(block);
        if usable == 0 {
            return Err(ExportError::TooSmall {
                path: backing.path().to_path_buf(),
                size: backing.size(),
                block,
            });
        }
        if usable != backing.size() {
            log::warn!(
                "{}: size {} is not a multiple of {block}; the last {} bytes are not exported",
                backing.path().display(),
                backing.size(),
                backing.size() - usable
            );
        }
        let physical = backing.physical_block().max(block);
        let serial_text = cfg
            .serial
            .clone()
            .unwrap_or_else(|| default_serial(backing.identity()));
        let serial = serial_bytes(&serial_text).ok_or(ExportError::Serial(serial_text))?;
        let backing = Arc::new(backing);
        // Learn now, not at every connection, that the engine cannot run here.
        engine::create::<()>(
            cfg.engine,
            backing.clone(),
            EngineParams {
                queue_depth: usize::from(cfg.queue_size),
                io_threads: cfg.io_threads,
                huge_bounce: None,
            },
        )?;
        let disk = DiskGeometry {
            capacity_sectors: usable / SECTOR_SIZE,
            logical_block_size: block,
            physical_block_exp: (physical / block).trailing_zeros() as u8,
            read_only: cfg.read_only,
            serial,
            num_queues: cfg.queues,
            queue_size: cfg.queue_size,
        };
        Ok(Export {
            backing,
            disk,
            write_cache: WriteCache::new(cfg.writeback),
            io_threads: cfg.io_threads,
            poll: cfg.poll,
            huge_bounce: cfg.huge_bounce,
            engine: cfg.engine,
        })
    }

    /// The serial as text.
    pub fn serial(&self) -> String {
        let s = &self.disk.serial;
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        String::from_utf8_lossy(&s[..end]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &tempfile::TempDir) -> ExportConfig {
        ExportConfig {
            path: dir.path().join("d.img"),
            create_size: Some(1 << 20),
            read_only: false,
            queues: 2,
            queue_size: 128,
            serial: None,
            logical_block_size: None,
            writeback: true,
            io_threads: 4,
            poll: std::time::Duration::ZERO,
            huge_bounce: true,
            engine: EngineKind::Threads,
            direct: false,
        }
    }

    #[test]
    fn derives_geometry_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        let e = Export::open(&config(&dir)).unwrap();
        assert_eq!(e.disk.capacity_sectors, 2048);
        assert_eq!(e.disk.logical_block_size, 512);
        assert!(e.serial().starts_with("vublk-"));
        drop(e);
        let mut cfg = config(&dir);
        cfg.logical_block_size = Some(4096);
        cfg.serial = Some("disk-01".into());
        let e = Export::open(&cfg).unwrap();
        assert_eq!(e.disk.logical_block_size, 4096);
        assert_eq!(e.disk.physical_block_exp, 0);
        assert_eq!(e.serial(), "disk-01");
    }

    #[test]
    fn refuses_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&dir);
        cfg.logical_block_size = Some(1024);
        assert!(matches!(
            Export::open(&cfg),
            Err(ExportError::BlockSize(1024))
        ));
        let mut cfg = config(&dir);
        cfg.serial = Some("x".repeat(21));
        assert!(matches!(Export::open(&cfg), Err(ExportError::Serial(_))));
        let mut cfg = config(&dir);
        cfg.serial = Some("bad\nserial".into());
        assert!(matches!(Export::open(&cfg), Err(ExportError::Serial(_))));
        let mut cfg = config(&dir);
        cfg.create_size = Some(100);
        assert!(matches!(
            Export::open(&cfg),
            Err(ExportError::TooSmall { .. })
        ));
    }
}
