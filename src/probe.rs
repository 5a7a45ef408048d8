//! What an export's backing really is: a block device or a file, the file system under a file,
//! how much of a file has blocks, whether O_DIRECT works and with which alignment, discard,
//! block sizes and whether it can be written.
//!
//! The probe looks at metadata only (statfs, statx, FIEMAP, SEEK_DATA, ioctls, sysfs) and opens
//! the backing read-only; it never writes to the image. The I/O policy ([`crate::policy`])
//! turns the report into an engine choice.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Serialize;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

use crate::backing::{self, BackingKind};

ioctl_io_nr!(BLKROGET, 0x12, 94);
ioctl_iowr_nr!(FS_IOC_FIEMAP, b'f' as u32, 11, FiemapHeader);
ioctl_ior_nr!(FS_IOC_GETFLAGS, b'f' as u32, 1, libc::c_long);

/// FIEMAP extent flags (linux/fiemap.h).
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// Inode flag of a btrfs file that is written in place (linux/fs.h FS_NOCOW_FL).
const FS_NOCOW_FL: libc::c_int = 0x0080_0000;
/// Extents asked for per FIEMAP call.
const FIEMAP_BATCH: usize = 128;

/// Errors probing a backing.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The path could not be opened or queried.
    #[error("cannot probe {path}: {source}")]
    Io {
        /// The backing's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    UnsupportedType(PathBuf),
}

/// Everything the probe found out about a backing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    /// The path probed.
    pub path: PathBuf,
    /// File or block device.
    pub kind: BackingKind,
    /// Size in bytes.
    pub size: u64,
    /// Block devices: "major:minor".
    pub device: Option<String>,
    /// Files: the file system the file lives on.
    pub file_system: Option<FileSystem>,
    /// Files: how much of the file has blocks.
    pub allocation: Option<Allocation>,
    /// Whether O_DIRECT works, and its alignment.
    pub direct_io: DirectIo,
    /// Devices: the logical sector size. Files: the O_DIRECT offset alignment (a fallback
    /// when the kernel does not report it: see [`DirectIo::alignment_source`]), 512 without
    /// O_DIRECT.
    pub logical_block_size: u32,
    /// Devices: the physical sector size. Files: the file system's preferred I/O size.
    pub physical_block_size: u32,
    /// Whether deallocation (punch hole, discard) works.
    pub discard: Discard,
    /// The medium is read-only: a read-only device (BLKROGET) or file system mount.
    pub read_only_media: bool,
    /// This process may open it for writing.
    pub writable: bool,
}

impl ProbeReport {
    /// The logical block size an export of this backing gets when the operator gives none:
    /// the device's sector size (512 or 4096), 512 for files. Matches [`crate::export`].
    pub fn default_export_block_size(&self) -> u32 {
        match self.kind {
            BackingKind::File | BackingKind::Null => 512,
            BackingKind::BlockDevice => self.logical_block_size.clamp(512, 4096),
        }
    }
}

/// A file system, identified by its statfs magic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSystem {
    /// Its name ("ext4" stands for ext2, ext3 and ext4, which share a magic), or
    /// "unknown (0x...)".
    pub name: String,
    /// statfs f_type.
    #[serde(serialize_with = "as_hex")]
    pub magic: u32,
    /// What kind of storage it is.
    pub class: FsClass,
    /// Writes to this file allocate new blocks even where blocks exist (a copy-on-write file
    /// system, and for btrfs a file without the No_COW attribute).
    pub copy_on_write: bool,
}

fn as_hex<S: serde::Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// Kinds of file systems, as far as the choice of an I/O engine is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsClass {
    /// On a local disk.
    Local,
    /// On storage reached over a network or shared between hosts (NFS, CIFS, Ceph, GFS2...).
    Network,
    /// In memory (tmpfs, ramfs, hugetlbfs): the page cache is the storage.
    Memory,
    /// Layered over other file systems (overlay, FUSE): behaviour depends on what is below.
    Stacked,
    /// Not in vublk's table.
    Unknown,
}

impl FsClass {
    /// A short name for humans.
    pub fn name(self) -> &'static str {
        match self {
            FsClass::Local => "local",
            FsClass::Network => "network",
            FsClass::Memory => "memory",
            FsClass::Stacked => "stacked",
            FsClass::Unknown => "unknown",
        }
    }
}

/// How much of a file has blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Allocation {
    /// Bytes inside the file's size that have blocks, written or not.
    pub allocated_bytes: u64,
    /// Of those, bytes in unwritten extents (preallocated by fallocate, reading as zeros).
    pub unwritten_bytes: u64,
    /// Some of the file has no blocks: writing there makes the file system allocate.
    pub sparse: bool,
    /// How it was measured.
    pub method: AllocationMethod,
}

impl Allocation {
    /// Allocated share of `size` in whole percent, rounded down (100 only when fully
    /// allocated).
    pub fn percent(&self, size: u64) -> u64 {
        if size == 0 {
            return 100;
        }
        share_percent(self.allocated_bytes, size)
    }

    /// Share of `size` in unwritten extents, in whole percent, rounded down.
    pub fn unwritten_percent(&self, size: u64) -> u64 {
        if size == 0 {
            return 0;
        }
        share_percent(self.unwritten_bytes, size)
    }
}

/// `part` of `whole` (not zero) in whole percent, rounded down.
fn share_percent(part: u64, whole: u64) -> u64 {
    (u128::from(part) * 100 / u128::from(whole)) as u64
}

/// How the allocation of a file was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllocationMethod {
    /// The extent map (FS_IOC_FIEMAP), which sees unwritten extents.
    Fiemap,
    /// SEEK_DATA/SEEK_HOLE, where FIEMAP is unsupported (and it counted more than st_blocks).
    SeekData,
    /// st_blocks, where FIEMAP is unsupported (and it counted more than SEEK_DATA).
    StBlocks,
}

/// Whether O_DIRECT works, and its alignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectIo {
    /// O_DIRECT really bypasses a page cache here.
    pub supported: bool,
    /// The kernel accepted an open with O_DIRECT (tmpfs accepts it since Linux 6.6 and
    /// ignores it).
    pub open_accepted: bool,
    /// Why it is unsupported.
    pub reason: Option<String>,
    /// Buffers must start at a multiple of this.
    pub mem_align: u32,
    /// Offsets and lengths must be multiples of this.
    pub offset_align: u32,
    /// Where the two alignments come from.
    pub alignment_source: AlignmentSource,
}

/// Where O_DIRECT alignment figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlignmentSource {
    /// statx STATX_DIOALIGN.
    Statx,
    /// The kernel does not report it: the logical block size (devices), the file system's
    /// block size (local files) or 512 (network files).
    Fallback,
}

/// Whether the backing can deallocate ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discard {
    /// Yes, no, or unknown (null).
    pub supported: Option<bool>,
    /// How that was found.
    pub detail: String,
}

/// Probes the backing at `path` without modifying it.
pub fn probe(path: &Path) -> Result<ProbeReport, ProbeError> {
    let err = |source| ProbeError::Io {
        path: path.into(),
        source,
    };
    // O_NONBLOCK: opening a FIFO must not hang; it is refused below.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    let ft = meta.file_type();
    if ft.is_file() {
        probe_file(path, &file, &meta).map_err(err)
    } else if ft.is_block_device() {
        probe_block_device(path, &file, &meta).map_err(err)
    } else {
        Err(ProbeError::UnsupportedType(path.into()))
    }
}

fn probe_file(path: &Path, file: &File, meta: &std::fs::Metadata) -> io::Result<ProbeReport> {
    let size = meta.len();
    let (magic, read_only_media) = fs_magic_and_read_only(file)?;
    let known = known_file_system(magic);
    let copy_on_write = match known.cow {
        Cow::Never => false,
        Cow::Always => true,
        Cow::UnlessNoCowAttr => !has_nocow_attr(file),
    };
    let fs = FileSystem {
        name: known
            .name
            .map_or_else(|| format!("unknown ({magic:#x})"), str::to_owned),
        magic,
        class: known.class,
        copy_on_write,
    };
    let blksize = u32::try_from(meta.blksize()).unwrap_or(u32::MAX);
    let fallback_align = match fs.class {
        // NFS and CIFS take O_DIRECT at any alignment; st_blksize there is the transfer size.
        FsClass::Network => 512,
        _ => blksize.clamp(512, 4096),
    };
    let direct_io = probe_direct_io(path, file, Some(&fs), fallback_align);
    let discard = match known.punch_hole {
        Some(yes) => Discard {
            supported: Some(yes),
            detail: format!(
                "{} {} punch hole",
                fs.name,
                if yes { "supports" } else { "does not support" }
            ),
        },
        None => Discard {
            supported: None,
            detail: format!("punch-hole support on {} depends on what is below", fs.name),
        },
    };
    Ok(ProbeReport {
        path: path.into(),
        kind: BackingKind::File,
        size,
        device: None,
        allocation: Some(measure_allocation(file, size, meta)),
        logical_block_size: if direct_io.supported {
            direct_io.offset_align.max(1)
        } else {
            512
        },
        physical_block_size: blksize.clamp(512, 65536).next_power_of_two(),
        file_system: Some(fs),
        direct_io,
        discard,
        read_only_media,
        writable: !read_only_media && may_write(path),
    })
}

fn probe_block_device(
    path: &Path,
    file: &File,
    meta: &std::fs::Metadata,
) -> io::Result<ProbeReport> {
    let size = backing::block_device_size(file)?;
    let (logical, physical) = backing::block_device_block_sizes(file)?;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer, which points to `ro`.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET(), &mut ro) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let read_only_media = ro != 0;
    Ok(ProbeReport {
        path: path.into(),
        kind: BackingKind::BlockDevice,
        size,
        device: Some(format!("{major}:{minor}")),
        file_system: None,
        allocation: None,
        direct_io: probe_direct_io(path, file, None, logical),
        logical_block_size: logical,
        physical_block_size: physical,
        discard: device_discard(major, minor),
        read_only_media,
        writable: !read_only_media && may_write(path),
    })
}

/// Copy-on-write behaviour of a file system.
#[derive(Debug, Clone, Copy)]
enum Cow {
    Never,
    Always,
    UnlessNoCowAttr,
}

/// What vublk knows about a file system magic.
#[derive(Debug, Clone, Copy)]
struct KnownFs {
    name: Option<&'static str>,
    class: FsClass,
    cow: Cow,
    /// Whether FALLOC_FL_PUNCH_HOLE works; None when it depends on the layer below or the
    /// server.
    punch_hole: Option<bool>,
}

/// Looks a statfs magic up (linux/magic.h and the file systems' own sources).
fn known_file_system(magic: u32) -> KnownFs {
    use Cow::*;
    use FsClass::*;
    let (name, class, cow, punch_hole) = match magic {
        0xef53 => ("ext4", Local, Never, Some(true)),
        0x5846_5342 => ("xfs", Local, Never, Some(true)),
        0x9123_683e => ("btrfs", Local, UnlessNoCowAttr, Some(true)),
        0x2fc1_2fc1 => ("zfs", Local, Always, Some(true)),
        0xca45_1a4e => ("bcachefs", Local, Always, Some(true)),
        0xf2f5_2010 => ("f2fs", Local, Never, Some(true)),
        0x5265_4973 => ("reiserfs", Local, Never, Some(false)),
        0x3434 => ("nilfs2", Local, Always, Some(false)),
        0x4d44 => ("vfat", Local, Never, Some(false)),
        0x2011_bab0 => ("exfat", Local, Never, Some(false)),
        0x7366_746e => ("ntfs3", Local, Never, None),
        0x7361_7366 | 0x7371_7368 => ("squashfs", Local, Never, Some(false)),
        0xe0f5_e1e2 => ("erofs", Local, Never, Some(false)),
        0x9660 => ("iso9660", Local, Never, Some(false)),
        0x1501_3346 => ("udf", Local, Never, Some(false)),
        0x6969 => ("nfs", Network, Never, None),
        0xff53_4d42 => ("cifs", Network, Never, None),
        0xfe53_4d42 => ("smb2", Network, Never, None),
        0x00c3_6400 => ("ceph", Network, Never, Some(true)),
        0x0116_1970 => ("gfs2", Network, Never, Some(true)),
        0x7461_636f => ("ocfs2", Network, Never, Some(true)),
        0x0bd0_0bd0 => ("lustre", Network, Never, None),
        0x0102_1997 => ("9p", Network, Never, None),
        0x0102_1994 => ("tmpfs", Memory, Never, Some(true)),
        0x8584_58f6 => ("ramfs", Memory, Never, Some(false)),
        HUGETLBFS_MAGIC => ("hugetlbfs", Memory, Never, Some(true)),
        0x794c_7630 => ("overlay", Stacked, Never, None),
        0x6573_5546 => ("fuse", Stacked, Never, None),
        _ => {
            return KnownFs {
                name: None,
                class: Unknown,
                cow: Never,
                punch_hole: None,
            };
        }
    };
    KnownFs {
        name: Some(name),
        class,
        cow,
        punch_hole,
    }
}

/// Whether `file` lives on hugetlbfs (a memfd made with MFD_HUGETLB does too).
pub fn on_hugetlbfs(file: &File) -> bool {
    fs_magic(file).is_ok_and(|magic| magic == HUGETLBFS_MAGIC)
}

const HUGETLBFS_MAGIC: u32 = 0x9584_58f6;

/// statfs f_type.
fn fs_magic(file: &File) -> io::Result<u32> {
    let mut sfs = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs fills the statfs the pointer points to; the fd is ours.
    if unsafe { libc::fstatfs(file.as_raw_fd(), sfs.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded and initialized it (and all-zero is valid anyway).
    let sfs = unsafe { sfs.assume_init() };
    // f_type is a signed word on most targets; the magics are 32-bit.
    Ok((sfs.f_type as u64 & 0xffff_ffff) as u32)
}

/// statfs f_type and the read-only flag of the mount (statvfs ST_RDONLY).
fn fs_magic_and_read_only(file: &File) -> io::Result<(u32, bool)> {
    let magic = fs_magic(file)?;
    let mut svfs = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: fstatvfs fills the statvfs the pointer points to; the fd is ours.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), svfs.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatvfs succeeded and initialized it.
    let svfs = unsafe { svfs.assume_init() };
    Ok((magic, svfs.f_flag & libc::ST_RDONLY != 0))
}

/// Whether a btrfs file carries the No_COW attribute (chattr +C).
fn has_nocow_attr(file: &File) -> bool {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer (the long in the request
    // number is historical), which points to `flags`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_GETFLAGS(), &mut flags) };
    ret == 0 && flags & FS_NOCOW_FL != 0
}

/// Whether this process may open `path` for writing (effective ids; root included, which
/// the permission bits do not stop but an immutable attribute does).
fn may_write(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) == 0 }
}

/// FIEMAP where the file system has it. Elsewhere SEEK_DATA and st_blocks, the larger of the
/// two: each can only under-count (SEEK_DATA shows preallocated ranges as holes on tmpfs, and
/// compression shrinks st_blocks on ZFS and btrfs).
fn measure_allocation(file: &File, size: u64, meta: &std::fs::Metadata) -> Allocation {
    let (allocated_bytes, unwritten_bytes, method) = match allocation_by_fiemap(file, size) {
        Ok((a, u)) => (a, u, AllocationMethod::Fiemap),
        Err(_) => {
            let blocks = meta.blocks().saturating_mul(512).min(size);
            match allocation_by_seek(file, size) {
                Ok(a) if a >= blocks => (a, 0, AllocationMethod::SeekData),
                _ => (blocks, 0, AllocationMethod::StBlocks),
            }
        }
    };
    Allocation {
        allocated_bytes,
        unwritten_bytes,
        sparse: allocated_bytes < size,
        method,
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// struct fiemap followed by room for its extents, as FS_IOC_FIEMAP expects.
#[repr(C)]
struct FiemapRequest {
    header: FiemapHeader,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// (allocated bytes, unwritten bytes) inside `[0, size)`, from the extent map. Delayed
/// allocations (written, not yet flushed) count as allocated: their blocks are reserved.
fn allocation_by_fiemap(file: &File, size: u64) -> io::Result<(u64, u64)> {
    let mut req = Box::new(FiemapRequest {
        header: FiemapHeader::default(),
        extents: [FiemapExtent::default(); FIEMAP_BATCH],
    });
    let (mut pos, mut allocated, mut unwritten) = (0u64, 0u64, 0u64);
    while pos < size {
        req.header = FiemapHeader {
            fm_start: pos,
            fm_length: size - pos,
            fm_extent_count: FIEMAP_BATCH as u32,
            ..FiemapHeader::default()
        };
        // SAFETY: the pointer is to a struct fiemap header followed by `fm_extent_count`
        // extent slots; the kernel writes at most that many, and `req` outlives the call.
        let ret = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FS_IOC_FIEMAP(),
                std::ptr::from_mut::<FiemapRequest>(&mut req),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (req.header.fm_mapped_extents as usize).min(FIEMAP_BATCH);
        let before = pos;
        let mut last = n == 0;
        for e in &req.extents[..n] {
            let start = e.fe_logical.max(pos);
            let end = e.fe_logical.saturating_add(e.fe_length).min(size);
            if end > start {
                allocated += end - start;
                if e.fe_flags & FIEMAP_EXTENT_UNWRITTEN != 0 {
                    unwritten += end - start;
                }
                pos = end;
            }
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last || pos == before {
            break;
        }
    }
    Ok((allocated, unwritten))
}

/// Bytes inside `[0, size)` that SEEK_DATA reports as data.
fn allocation_by_seek(file: &File, size: u64) -> io::Result<u64> {
    let fd = file.as_raw_fd();
    let (mut pos, mut total) = (0u64, 0u64);
    while pos < size {
        let at =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on a file descriptor we own; it moves only our own file offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if hole <= data {
            break;
        }
        total += hole - data;
        pos = hole;
    }
    Ok(total)
}

/// What statx says about O_DIRECT on a file.
enum StatxDio {
    /// Older kernel or a file system that does not report it.
    NotReported,
    /// The file system cannot do O_DIRECT on this file.
    Unsupported,
    /// (memory alignment, offset alignment).
    Aligned(u32, u32),
}

fn statx_dio(file: &File) -> StatxDio {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx with AT_EMPTY_PATH and an empty NUL-terminated path queries our fd and
    // fills the statx the pointer points to.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if ret != 0 {
        return StatxDio::NotReported;
    }
    // SAFETY: statx succeeded; the buffer was zeroed before, so every field is initialized.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        StatxDio::NotReported
    } else if stx.stx_dio_offset_align == 0 {
        StatxDio::Unsupported
    } else {
        StatxDio::Aligned(stx.stx_dio_mem_align, stx.stx_dio_offset_align)
    }
}

/// (memory, offset) alignment of O_DIRECT transfers on `file`, when the kernel reports it.
pub(crate) fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    match statx_dio(file) {
        StatxDio::Aligned(mem, offset) => Some((mem.max(1), offset)),
        StatxDio::NotReported | StatxDio::Unsupported => None,
    }
}

/// Tries an O_DIRECT open (read-only, so nothing can change) and asks statx for alignment.
fn probe_direct_io(
    path: &Path,
    file: &File,
    fs: Option<&FileSystem>,
    fallback_align: u32,
) -> DirectIo {
    let open = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path);
    let open_accepted = open.is_ok();
    let (mem_align, offset_align, alignment_source, statx_unsupported) = match statx_dio(file) {
        StatxDio::Aligned(mem, off) => (mem.max(1), off, AlignmentSource::Statx, false),
        StatxDio::NotReported => (
            fallback_align,
            fallback_align,
            AlignmentSource::Fallback,
            false,
        ),
        StatxDio::Unsupported => (
            fallback_align,
            fallback_align,
            AlignmentSource::Fallback,
            true,
        ),
    };
    let memory_fs = fs.filter(|fs| fs.class == FsClass::Memory);
    let reason = match (&open, memory_fs) {
        (Ok(_), Some(fs)) => Some(format!(
            "{} has no O_DIRECT (it accepts the flag, but files live in the page cache)",
            fs.name
        )),
        (Err(_), Some(fs)) => Some(format!("{} has no O_DIRECT", fs.name)),
        (Err(e), None) if e.raw_os_error() == Some(libc::EINVAL) => Some(match fs {
            Some(fs) => format!("{} refuses O_DIRECT on this file", fs.name),
            None => "the device refuses O_DIRECT".to_owned(),
        }),
        (Err(e), None) => Some(format!("an O_DIRECT open fails: {e}")),
        (Ok(_), None) if statx_unsupported => {
            Some("the kernel reports no O_DIRECT support for this file (statx)".to_owned())
        }
        (Ok(_), None) => None,
    };
    DirectIo {
        supported: reason.is_none(),
        open_accepted,
        reason,
        mem_align,
        offset_align,
        alignment_source,
    }
}

/// Discard support of a block device from sysfs (partitions share their disk's queue).
fn device_discard(major: u32, minor: u32) -> Discard {
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let own = dev.join("queue/discard_max_bytes");
    let file = if own.exists() {
        own
    } else {
        dev.join("../queue/discard_max_bytes")
    };
    match std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        Some(0) => Discard {
            supported: Some(false),
            detail: "the device does not discard (queue/discard_max_bytes is 0)".into(),
        },
        Some(n) => Discard {
            supported: Some(true),
            detail: format!("the device discards up to {n} bytes at once"),
        },
        None => Discard {
            supported: None,
            detail: format!("cannot read {}", file.display()),
        },
    }
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.path.display())?;
        match self.kind {
            BackingKind::BlockDevice => writeln!(
                f,
                "  kind:             block device {}, {}",
                self.device.as_deref().unwrap_or("?"),
                mib(self.size)
            )?,
            BackingKind::File => {
                writeln!(f, "  kind:             regular file, {}", mib(self.size))?
            }
            BackingKind::Null => writeln!(f, "  kind:             null (no storage)")?,
        }
        if let Some(fs) = &self.file_system {
            writeln!(
                f,
                "  file system:      {} ({}, magic {:#x}{})",
                fs.name,
                fs.class.name(),
                fs.magic,
                if fs.copy_on_write {
                    ", copy-on-write"
                } else {
                    ""
                }
            )?;
        }
        if let Some(a) = &self.allocation {
            let state = if a.sparse {
                "sparse"
            } else {
                "fully allocated"
            };
            writeln!(
                f,
                "  allocation:       {state}: {} of {} ({}%), {} unwritten (by {})",
                mib(a.allocated_bytes),
                mib(self.size),
                a.percent(self.size),
                mib(a.unwritten_bytes),
                match a.method {
                    AllocationMethod::Fiemap => "FIEMAP",
                    AllocationMethod::SeekData => "SEEK_DATA",
                    AllocationMethod::StBlocks => "st_blocks",
                }
            )?;
        }
        let d = &self.direct_io;
        match &d.reason {
            None => write!(f, "  O_DIRECT:         supported")?,
            Some(r) => write!(f, "  O_DIRECT:         unsupported: {r}")?,
        }
        writeln!(
            f,
            "; alignment: memory {}, offset {} ({})",
            d.mem_align,
            d.offset_align,
            match d.alignment_source {
                AlignmentSource::Statx => "statx",
                AlignmentSource::Fallback => "fallback",
            }
        )?;
        writeln!(
            f,
            "  block sizes:      logical {}, physical {}",
            self.logical_block_size, self.physical_block_size
        )?;
        let discard = match self.discard.supported {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        };
        writeln!(f, "  discard:          {discard} ({})", self.discard.detail)?;
        writeln!(f, "  read-only media:  {}", yes_no(self.read_only_media))?;
        write!(f, "  writable by us:   {}", yes_no(self.writable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    fn fallocate(path: &Path, len: u64) {
        let f = File::create(path).unwrap();
        // SAFETY: plain syscall on a file descriptor we own.
        let ret = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
        assert_eq!(ret, 0, "fallocate: {}", io::Error::last_os_error());
    }

    /// Fingerprint that changes if the probe wrote to the file or its metadata.
    fn fingerprint(path: &Path) -> (Vec<u8>, i64, i64, u64) {
        let m = std::fs::metadata(path).unwrap();
        (
            std::fs::read(path).unwrap(),
            m.mtime_nsec(),
            m.ctime_nsec(),
            m.size(),
        )
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(FS_IOC_FIEMAP(), 0xc020_660b);
        assert_eq!(BLKROGET(), 0x125e);
        assert_eq!(std::mem::size_of::<FiemapHeader>(), 32);
        assert_eq!(std::mem::size_of::<FiemapExtent>(), 56);
    }

    #[test]
    fn fallocated_file_is_fully_allocated_not_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        fallocate(&path, 8 << 20);
        let before = fingerprint(&path);
        let r = probe(&path).unwrap();
        assert_eq!(fingerprint(&path), before, "the probe modified the image");
        assert_eq!(r.kind, BackingKind::File);
        assert_eq!(r.size, 8 << 20);
        let a = r.allocation.unwrap();
        assert!(!a.sparse, "{r:#?}");
        assert_eq!(a.allocated_bytes, 8 << 20);
        assert_eq!(a.percent(r.size), 100);
        let fs = r.file_system.as_ref().unwrap();
        if a.method == AllocationMethod::Fiemap && fs.name == "ext4" {
            assert_eq!(
                a.unwritten_bytes,
                8 << 20,
                "ext4 preallocates unwritten extents"
            );
        }
        assert!(r.writable && !r.read_only_media);
    }

    #[test]
    fn truncated_file_is_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        File::create(&path).unwrap().set_len(8 << 20).unwrap();
        let before = fingerprint(&path);
        let r = probe(&path).unwrap();
        assert_eq!(fingerprint(&path), before, "the probe modified the image");
        let a = r.allocation.unwrap();
        assert!(a.sparse, "{r:#?}");
        assert_eq!(a.allocated_bytes, 0);
        assert_eq!(a.percent(r.size), 0);
    }

    #[test]
    fn partly_written_file_is_sparse_with_its_allocated_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        let f = File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&vec![0x5a; 2 << 20], 4 << 20).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let r = probe(&path).unwrap();
        let a = r.allocation.unwrap();
        assert!(a.sparse, "{r:#?}");
        assert_eq!(a.allocated_bytes, 2 << 20, "{r:#?}");
        assert_eq!(a.unwritten_bytes, 0);
        assert_eq!(a.percent(r.size), 12);
    }

    #[test]
    fn o_direct_and_alignment_on_a_disk_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        fallocate(&path, 1 << 20);
        let r = probe(&path).unwrap();
        let fs = r.file_system.as_ref().unwrap();
        if fs.class == FsClass::Local {
            assert!(r.direct_io.supported, "{r:#?}");
            assert!(r.direct_io.open_accepted);
            assert!(r.direct_io.offset_align.is_power_of_two());
            assert_eq!(r.logical_block_size, r.direct_io.offset_align);
        }
        assert!(r.physical_block_size >= 512 && r.physical_block_size.is_power_of_two());
        assert_eq!(r.default_export_block_size(), 512);
    }

    #[test]
    fn file_on_tmpfs_has_no_o_direct() {
        let mnt = TmpfsMount::new();
        let path = mnt.dir.path().join("m.img");
        fallocate(&path, 4 << 20);
        let r = probe(&path).unwrap();
        let fs = r.file_system.as_ref().unwrap();
        assert_eq!(fs.name, "tmpfs");
        assert_eq!(fs.class, FsClass::Memory);
        assert!(!r.direct_io.supported, "{r:#?}");
        assert_eq!(r.logical_block_size, 512);
        assert!(
            r.direct_io
                .reason
                .as_deref()
                .unwrap()
                .starts_with("tmpfs has no O_DIRECT"),
            "{r:#?}"
        );
        assert!(!r.allocation.unwrap().sparse, "{r:#?}");
        assert_eq!(r.discard.supported, Some(true));
    }

    #[test]
    fn file_on_a_read_only_mount_is_read_only_media_and_not_writable() {
        let mnt = TmpfsMount::new();
        let path = mnt.dir.path().join("ro.img");
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        mnt.remount_read_only();
        let r = probe(&path).unwrap();
        assert!(r.read_only_media, "{r:#?}");
        assert!(!r.writable, "{r:#?}");
    }

    #[test]
    fn read_only_file_is_not_writable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.img");
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&path, perms).unwrap();
        // Root ignores permission bits; an immutable attribute stops everyone.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let _guard = Immutable::set(&path);
            let r = probe(&path).unwrap();
            assert!(!r.writable && !r.read_only_media, "{r:#?}");
        } else {
            let r = probe(&path).unwrap();
            assert!(!r.writable && !r.read_only_media, "{r:#?}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_file_or_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let err = probe(dir.path()).unwrap_err();
        assert!(matches!(err, ProbeError::UnsupportedType(_)), "{err}");
        let err = probe(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, ProbeError::Io { .. }), "{err}");
    }

    #[test]
    fn magic_table() {
        assert_eq!(known_file_system(0xef53).name, Some("ext4"));
        assert_eq!(known_file_system(0x0102_1994).class, FsClass::Memory);
        assert!(matches!(
            known_file_system(0x9123_683e).cow,
            Cow::UnlessNoCowAttr
        ));
        assert_eq!(known_file_system(0x6969).class, FsClass::Network);
        assert_eq!(known_file_system(0x1234).class, FsClass::Unknown);
    }

    fn run(cmd: &mut Command) {
        let what = format!("{cmd:?}");
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("this test needs to run {what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed ({}): {}; this test needs root",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A tmpfs mounted on a fresh directory for one test, unmounted when dropped (also when
    /// the test fails).
    struct TmpfsMount {
        dir: tempfile::TempDir,
    }

    impl TmpfsMount {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            run(Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64m,mode=0700", "vublk-test"])
                .arg(dir.path()));
            TmpfsMount { dir }
        }

        fn remount_read_only(&self) {
            run(Command::new("mount")
                .args(["-o", "remount,ro"])
                .arg(self.dir.path()));
        }
    }

    impl Drop for TmpfsMount {
        fn drop(&mut self) {
            let ok = Command::new("umount")
                .arg(self.dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.dir.path())
                    .status();
            }
        }
    }

    /// chattr +i for the life of the guard.
    struct Immutable(PathBuf);

    impl Immutable {
        fn set(path: &Path) -> Self {
            run(Command::new("chattr").arg("+i").arg(path));
            Immutable(path.into())
        }
    }

    impl Drop for Immutable {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
}
