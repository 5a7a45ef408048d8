//! The virtio-blk configuration space (`struct virtio_blk_config`, little-endian).

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::virtio_blk_config;

use super::{
    DiskGeometry, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SECTORS, SIZE_MAX,
};

/// Size of the configuration structure this device fills in.
pub const CONFIG_LEN: usize = size_of::<virtio_blk_config>();
/// Offset of the one field a driver may write: the write-cache mode.
pub const WCE_OFFSET: usize = offset_of!(virtio_blk_config, wce);

macro_rules! put {
    ($buf:expr, $field:ident, $value:expr) => {{
        let bytes = $value.to_le_bytes();
        let at = offset_of!(virtio_blk_config, $field);
        $buf[at..at + bytes.len()].copy_from_slice(&bytes);
    }};
}

/// Renders the configuration space for the given disk and write-cache mode.
pub fn render(disk: &DiskGeometry, writeback: bool) -> [u8; CONFIG_LEN] {
    let mut b = [0u8; CONFIG_LEN];
    put!(b, capacity, disk.capacity_sectors);
    put!(b, size_max, SIZE_MAX);
    put!(b, seg_max, disk.seg_max());
    put!(b, blk_size, disk.logical_block_size);
    put!(b, physical_block_exp, disk.physical_block_exp);
    put!(b, alignment_offset, 0u8);
    put!(b, min_io_size, 1u16);
    put!(b, opt_io_size, 0u32);
    put!(b, wce, u8::from(writeback));
    put!(b, num_queues, disk.num_queues);
    if disk.offers_discard() {
        put!(b, max_discard_sectors, MAX_DISCARD_SECTORS);
        put!(b, max_discard_seg, MAX_DISCARD_SEGMENTS);
        put!(b, discard_sector_alignment, disk.sectors_per_block() as u32);
        put!(b, max_write_zeroes_sectors, MAX_WRITE_ZEROES_SECTORS);
        put!(b, max_write_zeroes_seg, MAX_DISCARD_SEGMENTS);
        put!(b, write_zeroes_may_unmap, 1u8);
    }
    b
}

/// Exactly `size` bytes of `config` from `offset`; bytes past the structure read as zero.
pub fn read_window(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = offset as usize;
    if start < config.len() {
        let n = (config.len() - start).min(out.len());
        out[..n].copy_from_slice(&config[start..start + n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::test_util::geometry;

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn layout_matches_the_virtio_spec() {
        assert_eq!(CONFIG_LEN, 96);
        assert_eq!(WCE_OFFSET, 32);
        let g = geometry();
        let c = render(&g, true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(le32(&c, 8), SIZE_MAX);
        assert_eq!(le32(&c, 12), 254);
        assert_eq!(le32(&c, 20), 512);
        assert_eq!(c[24], 3);
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 1);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2);
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 40), 1);
        assert_eq!(le32(&c, 44), 1);
        assert_eq!(le32(&c, 48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(le32(&c, 52), 1);
        assert_eq!(c[56], 1);
        assert!(c[57..].iter().all(|&x| x == 0));
        assert_eq!(render(&g, false)[32], 0);
    }

    #[test]
    fn read_only_has_no_discard_limits() {
        let mut g = geometry();
        g.read_only = true;
        g.logical_block_size = 4096;
        let c = render(&g, false);
        assert_eq!(le32(&c, 20), 4096);
        assert!(c[36..60].iter().all(|&x| x == 0));
    }

    #[test]
    fn windows_are_exact_at_any_offset() {
        let c = render(&geometry(), true);
        assert_eq!(read_window(&c, 0, 96), c.to_vec());
        assert_eq!(read_window(&c, 20, 4), c[20..24].to_vec());
        assert_eq!(
            read_window(&c, 90, 10),
            [&c[90..96], &[0u8; 4][..]].concat()
        );
        assert_eq!(read_window(&c, 200, 3), vec![0u8; 3]);
        assert_eq!(read_window(&c, 5, 0), Vec::<u8>::new());
    }
}
