//! The self-describing sector format of `--verify`, and the CRC-32C that protects it.
//!
//! Every 512-byte sector written by the verifier carries (little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `VUBLKVF1` |
//! | 8..16 | the sector's byte offset on the device |
//! | 16..24 | the seed (generation) of the run that wrote it |
//! | 24..508 | pseudo-random payload derived from seed and offset |
//! | 508..512 | CRC-32C of bytes 0..508 |
//!
//! so a read-back tells apart a corrupted sector (bad checksum), a misdirected one (another
//! offset), a stale one (an older generation) and one never written by the verifier.

use serde::Serialize;

use super::rng::Rng;

/// Bytes per verify sector (the virtio-blk sector).
pub const SECTOR: usize = 512;
/// The magic at the start of every verify sector.
pub const MAGIC: [u8; 8] = *b"VUBLKVF1";
const PAYLOAD: std::ops::Range<usize> = 24..508;
const CRC_AT: usize = 508;

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), slicing-by-8 tables.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
};

/// CRC-32C of `data` (initial value and final xor 0xFFFFFFFF, as in iSCSI and ext4).
pub fn crc32c(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ u32::from(b)) & 0xff) as usize];
    }
    !crc
}

/// Fill `sector` (512 bytes) with the verify content of device offset `offset` for `seed`.
pub fn encode(sector: &mut [u8], offset: u64, seed: u64) {
    assert_eq!(sector.len(), SECTOR);
    sector[0..8].copy_from_slice(&MAGIC);
    sector[8..16].copy_from_slice(&offset.to_le_bytes());
    sector[16..24].copy_from_slice(&seed.to_le_bytes());
    Rng::stream(seed, offset).fill(&mut sector[PAYLOAD]);
    let crc = crc32c(&sector[..CRC_AT]);
    sector[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

/// What is wrong with a sector that differs from the expected content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MismatchKind {
    /// All zeros: never written, or discarded.
    Zeros,
    /// No verify magic: data from somewhere else.
    NotWritten,
    /// The checksum does not match: the sector's bytes were damaged.
    Corrupt,
    /// An intact verify sector, written for another offset (misdirected I/O).
    WrongOffset,
    /// An intact verify sector from another generation (a lost write).
    StaleSeed,
}

impl MismatchKind {
    /// A short human description.
    pub fn describe(self) -> &'static str {
        match self {
            MismatchKind::Zeros => "all zeros (never written, or discarded)",
            MismatchKind::NotWritten => "no verify header (data not written by the verifier)",
            MismatchKind::Corrupt => "checksum mismatch (corrupted data)",
            MismatchKind::WrongOffset => "intact sector written for another offset",
            MismatchKind::StaleSeed => "intact sector from another generation (lost write)",
        }
    }
}

/// A sector that did not read back as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// Device byte offset of the sector.
    pub offset: u64,
    /// Classification.
    pub kind: MismatchKind,
    /// First differing byte within the sector.
    pub byte: usize,
    /// Expected value of that byte.
    pub expected_byte: u8,
    /// Value found.
    pub found_byte: u8,
    /// The offset field found in the sector, when it has a verify header.
    pub found_offset: Option<u64>,
    /// The seed field found in the sector, when it has a verify header.
    pub found_seed: Option<u64>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sector at offset {} ({:#x}): {}; byte {}: expected {:#04x}, found {:#04x}",
            self.offset,
            self.offset,
            self.kind.describe(),
            self.byte,
            self.expected_byte,
            self.found_byte
        )?;
        if let (Some(o), Some(s)) = (self.found_offset, self.found_seed) {
            write!(f, " (found header: offset {o:#x}, seed {s:#x})")?;
        }
        Ok(())
    }
}

/// Check a sector read from device offset `offset` against what `seed` wrote there.
pub fn check(found: &[u8], offset: u64, seed: u64) -> Result<(), Mismatch> {
    assert_eq!(found.len(), SECTOR);
    let mut expected = [0u8; SECTOR];
    encode(&mut expected, offset, seed);
    if found == expected {
        return Ok(());
    }
    let byte = found
        .iter()
        .zip(&expected)
        .position(|(a, b)| a != b)
        .unwrap();
    let u64_at = |i: usize| u64::from_le_bytes(found[i..i + 8].try_into().unwrap());
    let (found_offset, found_seed) = (u64_at(8), u64_at(16));
    let crc_ok = crc32c(&found[..CRC_AT]).to_le_bytes() == found[CRC_AT..];
    let has_magic = found[..8] == MAGIC;
    let kind = if found.iter().all(|&b| b == 0) {
        MismatchKind::Zeros
    } else if !has_magic {
        MismatchKind::NotWritten
    } else if !crc_ok {
        MismatchKind::Corrupt
    } else if found_offset != offset {
        MismatchKind::WrongOffset
    } else if found_seed != seed {
        MismatchKind::StaleSeed
    } else {
        // Intact header and checksum, yet different: only a CRC collision gets here.
        MismatchKind::Corrupt
    };
    Err(Mismatch {
        offset,
        kind,
        byte,
        expected_byte: expected[byte],
        found_byte: found[byte],
        found_offset: has_magic.then_some(found_offset),
        found_seed: has_magic.then_some(found_seed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        // The slicing path and the byte path agree on every length.
        let data: Vec<u8> = (0..100u8).collect();
        for n in 0..data.len() {
            let mut crc = !0u32;
            for &b in &data[..n] {
                crc = (crc >> 8) ^ CRC_TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize];
            }
            assert_eq!(crc32c(&data[..n]), !crc, "length {n}");
        }
    }

    fn sector(offset: u64, seed: u64) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        encode(&mut s, offset, seed);
        s
    }

    #[test]
    fn round_trip() {
        for (off, seed) in [(0, 1), (512, 1), (1 << 40, u64::MAX)] {
            assert_eq!(check(&sector(off, seed), off, seed), Ok(()));
        }
        // Neighbouring sectors and generations differ in payload, not only in the header.
        assert_ne!(sector(0, 1)[PAYLOAD], sector(512, 1)[PAYLOAD]);
        assert_ne!(sector(0, 1)[PAYLOAD], sector(0, 2)[PAYLOAD]);
    }

    #[test]
    fn detects_a_flipped_byte_anywhere() {
        let good = sector(4096, 7);
        for i in [0, 9, 17, 24, 300, 507, 508, 511] {
            let mut s = good;
            s[i] ^= 0x10;
            let m = check(&s, 4096, 7).unwrap_err();
            assert_eq!(m.byte, i);
            assert_eq!((m.expected_byte, m.found_byte), (good[i], good[i] ^ 0x10));
            let want = if i < 8 {
                MismatchKind::NotWritten
            } else {
                MismatchKind::Corrupt
            };
            assert_eq!(m.kind, want, "byte {i}");
        }
    }

    #[test]
    fn detects_a_wrong_offset() {
        let m = check(&sector(8192, 7), 4096, 7).unwrap_err();
        assert_eq!(m.kind, MismatchKind::WrongOffset);
        assert_eq!(m.found_offset, Some(8192));
        assert_eq!(m.byte, 9); // 8192 vs 4096 differ in the second byte of the offset field
    }

    #[test]
    fn detects_a_stale_seed() {
        let m = check(&sector(4096, 6), 4096, 7).unwrap_err();
        assert_eq!(m.kind, MismatchKind::StaleSeed);
        assert_eq!((m.found_offset, m.found_seed), (Some(4096), Some(6)));
        assert!(m.to_string().contains("another generation"), "{m}");
    }

    #[test]
    fn detects_zeros_and_foreign_data() {
        assert_eq!(
            check(&[0u8; SECTOR], 0, 1).unwrap_err().kind,
            MismatchKind::Zeros
        );
        let m = check(&[0xa5u8; SECTOR], 0, 1).unwrap_err();
        assert_eq!(
            (m.kind, m.byte, m.found_offset),
            (MismatchKind::NotWritten, 0, None)
        );
    }
}
