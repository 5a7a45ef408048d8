//! virtio-blk wire formats: request header, discard/write-zeroes segments, config space.

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Value the harness puts in the status byte before submitting.
pub const STATUS_UNTOUCHED: u8 = 0xFF;

/// VHOST_USER_F_PROTOCOL_FEATURES
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

pub const SECTOR: u64 = 512;
pub const CONFIG_SIZE: usize = 96;

/// Offsets inside struct virtio_blk_config.
pub mod cfg_off {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const ALIGNMENT_OFFSET: usize = 25;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WCE: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

pub fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Parsed virtio_blk_config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    pub raw: Vec<u8>,
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub wce: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

impl BlkConfig {
    pub fn parse(raw: &[u8]) -> BlkConfig {
        assert!(raw.len() >= 60, "config too short: {}", raw.len());
        use cfg_off::*;
        BlkConfig {
            raw: raw.to_vec(),
            capacity: u64_at(raw, CAPACITY),
            size_max: u32_at(raw, SIZE_MAX),
            seg_max: u32_at(raw, SEG_MAX),
            blk_size: u32_at(raw, BLK_SIZE),
            physical_block_exp: raw[PHYSICAL_BLOCK_EXP],
            alignment_offset: raw[ALIGNMENT_OFFSET],
            min_io_size: u16_at(raw, MIN_IO_SIZE),
            opt_io_size: u32_at(raw, OPT_IO_SIZE),
            wce: raw[WCE],
            num_queues: u16_at(raw, NUM_QUEUES),
            max_discard_sectors: u32_at(raw, MAX_DISCARD_SECTORS),
            max_discard_seg: u32_at(raw, MAX_DISCARD_SEG),
            discard_sector_alignment: u32_at(raw, DISCARD_SECTOR_ALIGNMENT),
            max_write_zeroes_sectors: u32_at(raw, MAX_WRITE_ZEROES_SECTORS),
            max_write_zeroes_seg: u32_at(raw, MAX_WRITE_ZEROES_SEG),
            write_zeroes_may_unmap: raw[WRITE_ZEROES_MAY_UNMAP],
        }
    }
}

/// The 16-byte request header.
pub fn header(type_: u32, ioprio: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&type_.to_le_bytes());
    h[4..8].copy_from_slice(&ioprio.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One struct virtio_blk_discard_write_zeroes.
pub fn dwz_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// A virtio-blk request, as streams of bytes: the device-readable stream is
/// `header ++ out_data`, the device-writable stream is `in_len bytes ++ status`.
#[derive(Clone, Debug)]
pub struct BlkReq {
    pub type_: u32,
    pub ioprio: u32,
    pub sector: u64,
    pub out_data: Vec<u8>,
    pub in_len: u32,
}

impl BlkReq {
    pub fn read(sector: u64, len: u32) -> BlkReq {
        BlkReq {
            type_: VIRTIO_BLK_T_IN,
            ioprio: 0,
            sector,
            out_data: Vec::new(),
            in_len: len,
        }
    }
    pub fn write(sector: u64, data: &[u8]) -> BlkReq {
        BlkReq {
            type_: VIRTIO_BLK_T_OUT,
            ioprio: 0,
            sector,
            out_data: data.to_vec(),
            in_len: 0,
        }
    }
    pub fn flush() -> BlkReq {
        BlkReq {
            type_: VIRTIO_BLK_T_FLUSH,
            ioprio: 0,
            sector: 0,
            out_data: Vec::new(),
            in_len: 0,
        }
    }
    pub fn get_id() -> BlkReq {
        BlkReq {
            type_: VIRTIO_BLK_T_GET_ID,
            ioprio: 0,
            sector: 0,
            out_data: Vec::new(),
            in_len: VIRTIO_BLK_ID_BYTES,
        }
    }
    pub fn discard(sector: u64, num_sectors: u32) -> BlkReq {
        BlkReq {
            type_: VIRTIO_BLK_T_DISCARD,
            ioprio: 0,
            sector: 0,
            out_data: dwz_segment(sector, num_sectors, 0).to_vec(),
            in_len: 0,
        }
    }
    pub fn write_zeroes(sector: u64, num_sectors: u32, unmap: bool) -> BlkReq {
        let flags = if unmap {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        BlkReq {
            type_: VIRTIO_BLK_T_WRITE_ZEROES,
            ioprio: 0,
            sector: 0,
            out_data: dwz_segment(sector, num_sectors, flags).to_vec(),
            in_len: 0,
        }
    }
    /// Any request type with no payload.
    pub fn other(type_: u32, sector: u64) -> BlkReq {
        BlkReq {
            type_,
            ioprio: 0,
            sector,
            out_data: Vec::new(),
            in_len: 0,
        }
    }
    pub fn readable_stream(&self) -> Vec<u8> {
        let mut v = header(self.type_, self.ioprio, self.sector).to_vec();
        v.extend_from_slice(&self.out_data);
        v
    }
}

/// How a request is laid out in descriptors.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Descriptor lengths over the device-readable stream (header ++ out_data).
    /// Default: `[16, out_data.len()]` (the latter omitted when empty).
    pub out_split: Option<Vec<u32>>,
    /// Descriptor lengths over the device-writable stream (in data ++ status).
    /// Default: `[in_len, 1]` (the former omitted when 0).
    pub in_split: Option<Vec<u32>>,
    /// Put the whole chain in an indirect table.
    pub indirect: bool,
    /// Index (in chain order: readable pieces first) of the piece that straddles the
    /// boundary between the two memory regions.
    pub span: Option<usize>,
    /// Place all pieces (except a straddling one) in region B instead of A.
    pub in_region_b: bool,
    /// Force piece i to this guest address (e.g. outside guest memory); nothing is written
    /// or read there by the harness if no region covers it.
    pub addr_override: Vec<(usize, u64)>,
    /// Pieces whose WRITE flag is inverted (wrong direction).
    pub flip: Vec<usize>,
}

impl Layout {
    pub fn split_out(mut self, v: &[u32]) -> Layout {
        self.out_split = Some(v.to_vec());
        self
    }
    pub fn split_in(mut self, v: &[u32]) -> Layout {
        self.in_split = Some(v.to_vec());
        self
    }
    pub fn indirect(mut self) -> Layout {
        self.indirect = true;
        self
    }
    pub fn span(mut self, piece: usize) -> Layout {
        self.span = Some(piece);
        self
    }
    pub fn region_b(mut self) -> Layout {
        self.in_region_b = true;
        self
    }
    pub fn at(mut self, piece: usize, gpa: u64) -> Layout {
        self.addr_override.push((piece, gpa));
        self
    }
    pub fn flip(mut self, piece: usize) -> Layout {
        self.flip.push(piece);
        self
    }
}

/// Deterministic pseudo-random bytes (xorshift), so data patterns differ by seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Small deterministic RNG for randomized workloads.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
