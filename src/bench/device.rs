//! The connection to the backend: libblkio's "virtio-blk-vhost-user" driver.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use blkio::{Blkio, Blkioq, MemoryRegion};

/// The libblkio driver name.
pub const DRIVER: &str = "virtio-blk-vhost-user";

/// What the backend told us about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Logical block size: every request's offset and length are multiples of it.
    pub logical_block_size: u64,
    /// Most queues the backend offers.
    pub max_queues: usize,
    /// Most data segments per request.
    pub max_segments: usize,
    /// Largest data segment in bytes (0: no limit).
    pub max_segment_len: u64,
}

impl DeviceInfo {
    /// Largest segment usable for data, a multiple of the logical block size (0: no limit).
    pub fn segment_limit(&self) -> u64 {
        if self.max_segment_len == 0 {
            0
        } else {
            (self.max_segment_len / self.logical_block_size * self.logical_block_size)
                .max(self.logical_block_size)
        }
    }
}

/// Format a libblkio error with its errno (unless the message already names it).
pub fn blkio_err(e: &blkio::Error) -> anyhow::Error {
    let msg = e.message();
    if msg.contains("os error") {
        anyhow!("{msg}")
    } else {
        let errno = std::io::Error::from_raw_os_error(e.errno().raw_os_error());
        anyhow!("{msg} ({errno})")
    }
}

/// A connected (not yet started) device.
pub struct Connected {
    blkio: Blkio,
    /// Its properties.
    pub info: DeviceInfo,
}

/// A started device: its queues and one memory region for all I/O buffers.
pub struct Device {
    /// Kept alive while the queues are used: it owns the vhost-user connection.
    pub blkio: Blkio,
    /// The queues, one per worker.
    pub queues: Vec<Blkioq>,
    /// The buffer region, mapped into the backend.
    pub region: MemoryRegion,
}

/// Connect to the vhost-user socket at `socket`. `read_only` makes libblkio accept read-only
/// exports (and refuse writes).
pub fn connect(socket: &Path, read_only: bool) -> Result<Connected> {
    match std::fs::metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "socket {} does not exist (is the backend running?)",
                socket.display()
            )
        }
        Err(e) => bail!("socket {}: {e}", socket.display()),
        Ok(m) if !m.file_type().is_socket() => {
            bail!("{} is not a unix socket", socket.display())
        }
        Ok(_) => {}
    }
    let path = socket
        .to_str()
        .with_context(|| format!("socket path {} is not UTF-8", socket.display()))?;
    let ctx = || format!("vhost-user backend at {}", socket.display());
    let mut b = Blkio::new(DRIVER)
        .map_err(|e| blkio_err(&e))
        .with_context(ctx)?;
    b.set_str("path", path)
        .map_err(|e| blkio_err(&e))
        .with_context(ctx)?;
    b.set_bool("read-only", read_only)
        .map_err(|e| blkio_err(&e))
        .with_context(ctx)?;
    b.connect().map_err(|e| blkio_err(&e)).with_context(|| {
        format!(
            "cannot connect to the vhost-user backend at {}",
            socket.display()
        )
    })?;
    let get = |name: &str| -> Result<u64> {
        let v = match name {
            "capacity" => b.get_u64(name),
            _ => b.get_i32(name).map(|v| v.max(0) as u64),
        };
        v.map_err(|e| blkio_err(&e))
            .with_context(|| format!("cannot read the device's {name}"))
    };
    let info = DeviceInfo {
        capacity: get("capacity")?,
        logical_block_size: get("request-alignment")?.max(512),
        max_queues: get("max-queues")?.max(1) as usize,
        max_segments: get("max-segments")?.max(1) as usize,
        max_segment_len: get("max-segment-len")?,
    };
    Ok(Connected { blkio: b, info })
}

impl Connected {
    /// Start `num_queues` queues of `queue_size` descriptors and map a buffer region of at
    /// least `region_len` bytes.
    pub fn start(
        mut self,
        num_queues: usize,
        queue_size: u16,
        region_len: usize,
    ) -> Result<Device> {
        let b = &mut self.blkio;
        b.set_i32("num-queues", num_queues as i32)
            .map_err(|e| blkio_err(&e))?;
        b.set_i32("queue-size", i32::from(queue_size))
            .map_err(|e| blkio_err(&e))
            .with_context(|| format!("queue size {queue_size}"))?;
        let out = b.start().map_err(|e| {
            if e.errno() == blkio::Errno::ROFS {
                anyhow!("the device is read-only and this workload writes")
            } else {
                blkio_err(&e).context(format!(
                    "the backend refused to start {num_queues} queue(s) of {queue_size} descriptors"
                ))
            }
        })?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(|e| blkio_err(&e))?
            .max(4096) as usize;
        let len = region_len.max(1).next_multiple_of(align);
        let region = b
            .alloc_mem_region(len)
            .map_err(|e| blkio_err(&e))
            .with_context(|| format!("cannot allocate a {len}-byte buffer region"))?;
        b.map_mem_region(&region)
            .map_err(|e| blkio_err(&e))
            .context("the backend refused the buffer memory region")?;
        Ok(Device {
            blkio: self.blkio,
            queues: out.queues,
            region,
        })
    }
}
