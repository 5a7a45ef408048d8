//! The virtio-blk device model: what the device offers, its configuration space, and how a
//! request is parsed and finished. Nothing here knows about vhost-user or about engines'
//! internals.

use std::sync::atomic::{AtomicBool, Ordering};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub mod config_space;
pub mod request;

/// Bytes per virtio-blk sector; every offset on the wire counts in these.
pub const SECTOR_SIZE: u64 = 512;
/// Length of a serial (GET_ID) in bytes.
pub const SERIAL_LEN: usize = 20;
/// Largest data segment the driver may use.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard in sectors (1 GiB): large enough for mkfs and fstrim, small enough that one
/// request does not hold a pool thread for long.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest write-zeroes in sectors.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// Ranges per discard or write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;

/// The fixed properties of an exported disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size the guest sees (512 or 4096).
    pub logical_block_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// The export refuses writes.
    pub read_only: bool,
    /// GET_ID answer, zero padded.
    pub serial: [u8; SERIAL_LEN],
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Largest virtqueue size.
    pub queue_size: u16,
}

impl DiskGeometry {
    /// Whether discard and write-zeroes are offered (only to writable exports).
    pub fn offers_discard(&self) -> bool {
        !self.read_only
    }

    /// Sectors per logical block.
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.logical_block_size) / SECTOR_SIZE
    }

    /// Data segments per request; the ring also carries the header and the status.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The virtio feature bits the device offers (transport and block features).
    pub fn virtio_features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, &b| acc | (1u64 << b));
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        bits
    }
}

/// The write cache mode, shared by all queues of an export and switchable by the guest.
#[derive(Debug)]
pub struct WriteCache {
    writeback: AtomicBool,
}

impl WriteCache {
    /// A write cache in the given mode.
    pub fn new(writeback: bool) -> Self {
        WriteCache {
            writeback: AtomicBool::new(writeback),
        }
    }

    /// Whether writes may complete before they are durable.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Switches the mode.
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }
}

/// Builds the 20-byte serial from an operator string (at most 20 bytes).
pub fn serial_bytes(serial: &str) -> Option<[u8; SERIAL_LEN]> {
    let src = serial.as_bytes();
    if src.len() > SERIAL_LEN {
        return None;
    }
    let mut out = [0u8; SERIAL_LEN];
    out[..src.len()].copy_from_slice(src);
    Some(out)
}

/// A stable default serial derived from the backing's identity: "vublk-" and 12 hex digits.
pub fn default_serial(identity: (u64, u64)) -> String {
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in identity
        .0
        .to_le_bytes()
        .iter()
        .chain(identity.1.to_le_bytes().iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("vublk-{:012x}", h & 0xffff_ffff_ffff)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn geometry() -> DiskGeometry {
        DiskGeometry {
            capacity_sectors: 2048,
            logical_block_size: 512,
            physical_block_exp: 3,
            read_only: false,
            serial: serial_bytes("test-serial").unwrap(),
            num_queues: 2,
            queue_size: 256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_exports_offer_ro_and_no_discard() {
        let mut g = test_util::geometry();
        let rw = g.virtio_features();
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        g.read_only = true;
        let ro = g.virtio_features();
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            ro & ((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
    }

    #[test]
    fn serials() {
        assert_eq!(&serial_bytes("abc").unwrap()[..4], b"abc\0");
        assert!(serial_bytes("123456789012345678901").is_none());
        assert!(serial_bytes("12345678901234567890").is_some());
        let s = default_serial((2049, 1234));
        assert_eq!(s, default_serial((2049, 1234)));
        assert_ne!(s, default_serial((2049, 1235)));
        assert!(s.starts_with("vublk-") && s.len() <= SERIAL_LEN, "{s}");
    }
}
