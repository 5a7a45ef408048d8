//! End-to-end test harness for the vublk daemon.
//!
//! * `daemon`: spawn/supervise the daemon binary (or qemu-storage-daemon with
//!   `VUBLK_E2E_TARGET=qsd`), stderr captured to a file in the test's temp dir.
//! * `raw`: a VM-less vhost-user frontend (vhost crate) with memfd guest memory, hand-built
//!   split virtqueues and arbitrary descriptor chains (`virtq`, `guest`, `blk`).
//! * `blkio_fe`: libblkio as an independent frontend.
#![allow(dead_code)]

pub mod blk;
pub mod blkio_fe;
pub mod daemon;
pub mod guest;
pub mod raw;
pub mod virtq;
pub mod watchdog;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// Read `len` bytes of a file at `off`.
pub fn read_file_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

/// Whole file contents.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Allocated bytes inside [off, off+len) of a file, from SEEK_DATA/SEEK_HOLE.
pub fn allocated_in_range(path: &Path, off: u64, len: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    let fd = f.as_raw_fd();
    let end = off + len;
    let mut pos = off;
    let mut total = 0;
    while pos < end {
        // SAFETY: lseek on a file descriptor we own.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = (hole as u64).min(end);
        total += hole - data as u64;
        pos = hole;
    }
    total
}

/// Assert a region of the image has the expected contents (with a helpful message).
#[track_caller]
pub fn assert_file_range(path: &Path, off: u64, expect: &[u8]) {
    let got = read_file_at(path, off, expect.len());
    if got != expect {
        let first = got.iter().zip(expect).position(|(a, b)| a != b).unwrap();
        panic!(
            "image {} differs at byte {} (offset {}): got {:#04x}, expected {:#04x}",
            path.display(),
            first,
            off + first as u64,
            got[first],
            expect[first]
        );
    }
}
