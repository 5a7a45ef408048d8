//! The storage behind an export: a raw image file or a block device, and the synchronous
//! positional operations every engine builds on.
//!
//! Nothing here knows about virtio. Offsets and lengths are bytes; callers have already
//! checked them against [`Backing::size`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

use crate::engine::IoVec;

ioctl_io_nr!(BLKSSZGET, 0x12, 104);
ioctl_io_nr!(BLKPBSZGET, 0x12, 123);
ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
ioctl_io_nr!(BLKDISCARD, 0x12, 119);

/// The kernel refuses more iovecs than this in one preadv/pwritev call.
const IOV_MAX: usize = 1024;
/// Chunk size of the zero-writing fallback for write-zeroes.
const ZERO_CHUNK: usize = 1 << 20;

/// Errors opening or creating a backing.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// The path could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The backing's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The image could not be created.
    #[error("cannot create {path} ({size} bytes): {source}")]
    Create {
        /// The backing's path.
        path: PathBuf,
        /// The size asked for.
        size: u64,
        /// Why.
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    UnsupportedType(PathBuf),
    /// An existing image has another size than `--size` asks for.
    #[error(
        "{path} exists with {actual} bytes but --size asks for {requested}; \
         vublk never resizes an existing image (drop --size or fix the size)"
    )]
    SizeMismatch {
        /// The backing's path.
        path: PathBuf,
        /// Its size on disk.
        actual: u64,
        /// The size asked for.
        requested: u64,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("{0} is in use by another process (it holds a lock on it)")]
    Locked(PathBuf),
    /// A query of the backing failed.
    #[error("cannot query {path}: {source}")]
    Query {
        /// The backing's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// What kind of object the backing is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackingKind {
    /// A regular file holding a raw image.
    File,
    /// A block device.
    BlockDevice,
    /// No storage at all, for measuring the transport: reads return zeros, writes vanish.
    Null,
}

/// How to open a backing.
#[derive(Debug, Clone, Default)]
pub struct OpenParams {
    /// Open read-only.
    pub read_only: bool,
    /// Create a preallocated image of this many bytes when the path does not exist; when it
    /// does, its size must match.
    pub create_size: Option<u64>,
    /// Open with O_DIRECT (bypass the page cache).
    pub direct: bool,
}

/// An open backing.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    kind: BackingKind,
    size: u64,
    read_only: bool,
    direct: bool,
    /// Logical block size of a block device, or 512 for a file.
    native_logical_block: u32,
    /// Physical (or preferred I/O) block size.
    physical_block: u32,
    /// Stable identity (device and inode, or device number) for the default serial.
    identity: (u64, u64),
    /// O_DIRECT alignment of buffer addresses and of offsets/lengths.
    dio_align: DioAlign,
}

/// What O_DIRECT requires of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DioAlign {
    /// Every buffer address must be a multiple of this.
    pub mem: u32,
    /// Offsets and every segment length must be multiples of this.
    pub offset: u32,
}

impl Backing {
    /// Opens `path`, creating a preallocated image first when asked to.
    pub fn open(path: &Path, params: &OpenParams) -> Result<Self, BackingError> {
        if let Some(size) = params.create_size {
            create_image_if_missing(path, size)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!params.read_only)
            .custom_flags(libc::O_CLOEXEC | if params.direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|source| BackingError::Open {
                path: path.into(),
                source,
            })?;
        let query = |source| BackingError::Query {
            path: path.into(),
            source,
        };
        let meta = file.metadata().map_err(query)?;
        let ft = meta.file_type();
        let (kind, size, native_logical_block, physical_block, identity) = if ft.is_file() {
            let physical = meta.blksize().clamp(512, 65536) as u32;
            (
                BackingKind::File,
                meta.len(),
                512,
                physical.next_power_of_two(),
                identity_of(&meta),
            )
        } else if ft.is_block_device() {
            let size = block_device_size(&file).map_err(query)?;
            let (logical, physical) = block_device_block_sizes(&file).map_err(query)?;
            (
                BackingKind::BlockDevice,
                size,
                logical,
                physical,
                identity_of(&meta),
            )
        } else {
            return Err(BackingError::UnsupportedType(path.into()));
        };
        if let Some(requested) = params.create_size
            && requested != size
        {
            return Err(BackingError::SizeMismatch {
                path: path.into(),
                actual: size,
                requested,
            });
        }
        // Without a statx answer: the device's sector, or for files the file system block.
        let fallback = match kind {
            BackingKind::File | BackingKind::Null => physical_block,
            BackingKind::BlockDevice => native_logical_block,
        };
        let (mem, offset) = crate::probe::dio_alignment(&file).unwrap_or((fallback, fallback));
        let dio_align = DioAlign {
            mem,
            offset: offset.max(1),
        };
        lock(&file, params.read_only).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => BackingError::Locked(path.into()),
            _ => query(e),
        })?;
        Ok(Backing {
            file,
            path: path.into(),
            kind,
            size,
            read_only: params.read_only,
            direct: params.direct,
            native_logical_block,
            physical_block,
            identity,
            dio_align,
        })
    }

    /// What O_DIRECT transfers on this backing must be aligned to.
    pub fn dio_align(&self) -> DioAlign {
        self.dio_align
    }

    /// A null backing of `size` bytes: no storage behind it. Only the null engine serves it.
    pub fn null(size: u64) -> io::Result<Self> {
        Ok(Backing {
            // Never read or written: the null engine does not touch the backing.
            file: File::open("/dev/null")?,
            path: PathBuf::from("null"),
            kind: BackingKind::Null,
            size,
            read_only: false,
            direct: false,
            native_logical_block: 512,
            physical_block: 4096,
            identity: (0, 0),
            dio_align: DioAlign { mem: 1, offset: 1 },
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether it was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether it was opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The open file, for engines that submit to the kernel themselves.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The smallest block the backing itself can address (512 for files).
    pub fn native_logical_block(&self) -> u32 {
        self.native_logical_block
    }

    /// Physical block size (a power of two, at least 512).
    pub fn physical_block(&self) -> u32 {
        self.physical_block
    }

    /// A stable identity of the backing: see [`identity_of`].
    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }

    /// Reads exactly the bytes `iovs` describe from `offset`. Short reads are continued; end of
    /// file before the buffers are full is an error.
    pub fn read_vectored_at(&self, iovs: &mut [IoVec], offset: u64) -> io::Result<()> {
        self.transfer(iovs, offset, |fd, iov, cnt, off| {
            // SAFETY: the iovecs describe memory the caller keeps valid and writable for the
            // duration of the call (the contract of `IoVec::new`); `cnt` is their number.
            unsafe { libc::preadv(fd, iov, cnt, off) }
        })
    }

    /// Writes exactly the bytes `iovs` describe at `offset`; with `durable`, the data is on
    /// stable storage when this returns.
    pub fn write_vectored_at(
        &self,
        iovs: &mut [IoVec],
        offset: u64,
        durable: bool,
    ) -> io::Result<()> {
        let flags = if durable { libc::RWF_DSYNC } else { 0 };
        self.transfer(iovs, offset, |fd, iov, cnt, off| {
            // SAFETY: as in `read_vectored_at`; the memory is only read.
            unsafe { libc::pwritev2(fd, iov, cnt, off, flags) }
        })
    }

    fn transfer(
        &self,
        mut iovs: &mut [IoVec],
        mut offset: u64,
        op: impl Fn(libc::c_int, *const libc::iovec, libc::c_int, libc::off_t) -> isize,
    ) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        while !iovs.is_empty() {
            let cnt = iovs.len().min(IOV_MAX);
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let ret = op(fd, iovs.as_ptr().cast(), cnt as libc::c_int, off);
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ret == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            offset += ret as u64;
            iovs = IoVec::advance(iovs, ret as usize);
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Tells the storage that a range is no longer needed. Discard is a hint: where the
    /// storage cannot deallocate, this succeeds without doing anything.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let result = match self.kind {
            BackingKind::Null => Ok(()),
            BackingKind::File => self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            BackingKind::BlockDevice => {
                let range = [offset, len];
                // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which
                // points to `range` for the duration of the call.
                let ret =
                    unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD(), range.as_ptr()) };
                if ret < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
        };
        match result {
            Err(e) if is_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes a range read as zeros; with `unmap` the storage may deallocate it.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        // On a file a punched hole reads as zeros; on a block device fallocate's punch-hole
        // mode is a zero-out that may unmap, so both kinds take the same path.
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if is_unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if is_unsupported(&e) => self.write_zero_buffers(offset, len),
            other => other,
        }
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let storage = aligned_zeros(ZERO_CHUNK.min(len as usize), self.dio_align.mem as usize);
        let zeros = storage.as_ref();
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            std::os::unix::fs::FileExt::write_all_at(&self.file, &zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// `len` zero bytes starting at a multiple of `align`.
struct AlignedZeros {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for AlignedZeros {
    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl AsMut<[u8]> for AlignedZeros {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn aligned_zeros(len: usize, align: usize) -> AlignedZeros {
    let align = align.max(1);
    let storage = vec![0u8; len + align];
    let start = storage.as_ptr().align_offset(align);
    AlignedZeros {
        storage,
        start,
        len,
    }
}

pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Creates a fully allocated image of `size` bytes when nothing exists at `path`; returns
/// whether it did. An existing path is left alone, whatever its size: [`Backing::open`] with
/// `create_size` refuses a size mismatch, it never resizes.
pub fn create_image_if_missing(path: &Path, size: u64) -> Result<bool, BackingError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_image(path, size).map(|()| true),
        Err(source) => Err(BackingError::Open {
            path: path.into(),
            source,
        }),
        Ok(_) => Ok(false),
    }
}

/// Creates a fully allocated image of `size` bytes; a partly created file is removed again.
fn create_image(path: &Path, size: u64) -> Result<(), BackingError> {
    let err = |source| BackingError::Create {
        path: path.into(),
        size,
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    let result = preallocate(&mut file, size);
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(())
}

fn preallocate(file: &mut File, size: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a file descriptor we own.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if ret == 0 {
        return file.sync_all();
    }
    let e = io::Error::last_os_error();
    if !is_unsupported(&e) {
        return Err(e);
    }
    // File systems without fallocate (tmpfs has it; some FUSE ones do not): write zeros.
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(ZERO_CHUNK as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

fn lock(file: &File, shared: bool) -> io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: plain syscall on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Size in bytes of a block device (BLKGETSIZE64).
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64(), &mut size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

/// Logical and physical block size of a block device (BLKSSZGET, BLKPBSZGET).
pub(crate) fn block_device_block_sizes(file: &File) -> io::Result<(u32, u32)> {
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to `logical`.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET(), &mut logical) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, which points to `physical`.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKPBSZGET(), &mut physical) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let logical = (logical as u32).max(512);
    Ok((logical, physical.max(logical)))
}

/// The identity an image or device has as a backing (the default serial derives from it):
/// (device, inode) of a file, (rdev, 0) of a block device.
pub fn identity_of(meta: &std::fs::Metadata) -> (u64, u64) {
    if meta.file_type().is_block_device() {
        (meta.rdev(), 0)
    } else {
        (meta.dev(), meta.ino())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn iov(buf: &mut [u8]) -> IoVec {
        // SAFETY: the buffers outlive every use of the iovec in these tests.
        unsafe { IoVec::new(buf.as_mut_ptr(), buf.len()) }
    }

    #[test]
    fn creates_a_preallocated_image_and_never_resizes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let params = OpenParams {
            create_size: Some(4 << 20),
            ..Default::default()
        };
        let b = Backing::open(&path, &params).unwrap();
        assert_eq!(b.size(), 4 << 20);
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.blocks() * 512 >= 4 << 20, "image is not preallocated");
        drop(b);
        let err = Backing::open(
            &path,
            &OpenParams {
                create_size: Some(8 << 20),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, BackingError::SizeMismatch { actual, .. } if actual == 4 << 20),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
    }

    #[test]
    fn create_if_missing_creates_once_and_leaves_existing_images_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        assert!(create_image_if_missing(&path, 1 << 20).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        std::fs::write(&path, b"keep").unwrap();
        assert!(!create_image_if_missing(&path, 2 << 20).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let params = OpenParams {
            create_size: Some(1 << 20),
            ..Default::default()
        };
        let _first = Backing::open(&path, &params).unwrap();
        let err = Backing::open(&path, &OpenParams::default()).unwrap_err();
        assert!(matches!(err, BackingError::Locked(_)), "{err}");
    }

    #[test]
    fn rejects_what_is_not_a_file_or_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let err = Backing::open(
            dir.path(),
            &OpenParams {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, BackingError::UnsupportedType(_)), "{err}");
    }

    #[test]
    fn vectored_io_discard_and_write_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let b = Backing::open(
            &path,
            &OpenParams {
                create_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let mut a = vec![0xaau8; 4096];
        let mut c = vec![0xccu8; 512];
        b.write_vectored_at(&mut [iov(&mut a), iov(&mut c)], 8192, false)
            .unwrap();
        let mut back = vec![0u8; 4608];
        b.read_vectored_at(&mut [iov(&mut back)], 8192).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 0xaa) && back[4096..].iter().all(|&x| x == 0xcc));

        b.write_zeroes(8192, 4096, false).unwrap();
        let mut z = vec![1u8; 4096];
        b.file.read_exact_at(&mut z, 8192).unwrap();
        assert!(z.iter().all(|&x| x == 0));

        b.write_vectored_at(&mut [iov(&mut a)], 0, true).unwrap();
        b.discard(0, 4096).unwrap();
        b.flush().unwrap();

        let mut past_end = vec![0u8; 1024];
        let err = b
            .read_vectored_at(&mut [iov(&mut past_end)], (1 << 20) - 512)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
