//! Parsing a virtio-blk request: descriptor chain in, typed request or typed error out.
//!
//! The parser does no I/O. It reads the header and payload from guest memory, checks every
//! rule of the virtio spec and of the export (direction, alignment, range, read-only), and
//! turns the data descriptors into host buffers. A request is finished in one place,
//! [`write_status`], whatever its outcome.

use std::sync::Arc;

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestUsize};

use super::{
    DiskGeometry, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SECTORS, SECTOR_SIZE,
    SERIAL_LEN,
};
use crate::engine::IoVec;

/// Guest memory as the device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;

/// Why a request is refused; the guest gets the matching status byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header is shorter than 16 bytes")]
    ShortHeader,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer outside guest memory")]
    BadAddress,
    /// The spec puts all device-readable descriptors before the device-writable ones.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Data flows the wrong way for the request type.
    #[error("data direction does not match request type {0}")]
    WrongDirection(u32),
    /// Unknown or unsupported request type.
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    /// Offset or length is not a multiple of the logical block size.
    #[error("sector {sector} / {len} bytes are not aligned to the logical block size")]
    Misaligned {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The range ends beyond the capacity.
    #[error("sectors {sector}..+{sectors} are beyond the capacity")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
    },
    /// A write, discard or write-zeroes on a read-only export.
    #[error("write to a read-only export")]
    ReadOnly,
    /// A discard or write-zeroes payload of the wrong size or segment count.
    #[error("malformed discard/write-zeroes payload of {0} bytes")]
    BadSegments(usize),
    /// A discard or write-zeroes range larger than advertised.
    #[error("discard/write-zeroes of {0} sectors exceeds the advertised limit")]
    TooLarge(u32),
    /// Flags the device does not implement.
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// GET_ID without a buffer.
    #[error("GET_ID without a device-writable buffer")]
    NoIdBuffer,
    /// More data than a used length can report (4 GiB).
    #[error("{0} bytes of data in one request")]
    DataTooLarge(u64),
}

impl RequestError {
    /// The virtio-blk status byte for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain the parser could not accept.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No status byte can be written: the chain goes back with used length 0.
    Unanswerable(&'static str),
    /// The request is refused with a status byte.
    Rejected {
        /// Where the status byte goes.
        status: GuestAddress,
        /// Why.
        error: RequestError,
    },
}

/// What a valid request asks for.
#[derive(Debug)]
pub enum RequestKind {
    /// Read into `bufs` from `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Destination buffers in guest memory.
        bufs: Vec<IoVec>,
    },
    /// Write `bufs` at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Source buffers in guest memory.
        bufs: Vec<IoVec>,
    },
    /// Make completed writes durable.
    Flush,
    /// Return the serial into `dest` (guest ranges, at most 20 bytes in total).
    GetId {
        /// Destination ranges.
        dest: Vec<(GuestAddress, usize)>,
    },
    /// Deallocate a range.
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u32,
    },
    /// Zero a range.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u32,
        /// May deallocate.
        unmap: bool,
    },
}

/// A validated request.
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Used length on success: bytes written into guest buffers plus the status byte.
    pub used_len: u32,
    /// Keeps the guest memory that `kind`'s buffers point into mapped; must outlive any I/O.
    pub mem: Arc<GuestMemory>,
}

/// Descriptors and ranges of a chain up to this long are parsed without touching the heap
/// (the header, a few data segments and the status: what Linux guests send for 4k–64k I/O).
const INLINE_SEGMENTS: usize = 8;

/// Guest ranges of one request, on the stack for short chains.
type Ranges = SmallVec<[Range; INLINE_SEGMENTS]>;

/// A contiguous guest range from one descriptor (or part of one).
#[derive(Debug, Clone, Copy)]
struct Range {
    addr: GuestAddress,
    len: usize,
}

/// Parses one descriptor chain against the export's geometry.
///
/// `descs` is the chain as the queue yields it (indirect tables already followed). The
/// returned request holds a reference to `mem`, so its buffers stay valid while it lives.
pub fn parse(
    descs: impl IntoIterator<Item = Descriptor>,
    mem: &Arc<GuestMemory>,
    disk: &DiskGeometry,
) -> Result<Request, ParseError> {
    let descs: SmallVec<[Descriptor; INLINE_SEGMENTS]> = descs.into_iter().collect();
    let last = descs
        .last()
        .ok_or(ParseError::Unanswerable("empty chain"))?;
    if last.has_next() {
        // The queue stopped following the chain: a loop, an overlong chain or a bad indirect
        // table. Nothing in it can be trusted, including where the status would go.
        return Err(ParseError::Unanswerable("chain is truncated or malformed"));
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::Unanswerable("no device-writable status byte"));
    }
    let status = last
        .addr()
        .checked_add(GuestUsize::from(last.len() - 1))
        .filter(|a| mem.check_range(*a, 1))
        .ok_or(ParseError::Unanswerable("status byte outside guest memory"))?;
    let reject = |error| ParseError::Rejected { status, error };

    let split = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    if descs[split..].iter().any(|d| !d.is_write_only()) {
        return Err(reject(RequestError::ReadableAfterWritable));
    }
    let readable: Ranges = descs[..split].iter().map(range_of).collect();
    // The used length is a u32 counting the writable bytes plus the status byte; the data of
    // a request (descriptors may repeat one buffer) must fit it.
    let writable_len: u64 = descs[split..].iter().map(|d| u64::from(d.len())).sum();
    if writable_len > u64::from(u32::MAX) {
        return Err(reject(RequestError::DataTooLarge(writable_len)));
    }
    let mut writable: Ranges = descs[split..].iter().map(range_of).collect();
    // The status byte is not data.
    if let Some(w) = writable.last_mut() {
        w.len -= 1;
    }
    writable.retain(|r| r.len > 0);

    let (header, payload) =
        split_at(&readable, HEADER_LEN).ok_or(reject(RequestError::ShortHeader))?;
    let mut hdr = [0u8; HEADER_LEN];
    read_ranges(mem, &header, &mut hdr).map_err(|()| reject(RequestError::BadAddress))?;
    let req_type = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());

    let kind = match req_type {
        VIRTIO_BLK_T_IN => {
            if !payload.is_empty() {
                return Err(reject(RequestError::WrongDirection(req_type)));
            }
            check_range(disk, sector, total_len(&writable)).map_err(reject)?;
            RequestKind::Read {
                sector,
                bufs: host_buffers(mem, &writable)
                    .map_err(|()| reject(RequestError::BadAddress))?,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if !writable.is_empty() {
                return Err(reject(RequestError::WrongDirection(req_type)));
            }
            if disk.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            check_range(disk, sector, total_len(&payload)).map_err(reject)?;
            RequestKind::Write {
                sector,
                bufs: host_buffers(mem, &payload).map_err(|()| reject(RequestError::BadAddress))?,
            }
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            let (dest, _) = split_at(&writable, SERIAL_LEN.min(total_len(&writable) as usize))
                .unwrap_or_default();
            if dest.is_empty() {
                return Err(reject(RequestError::NoIdBuffer));
            }
            if !dest.iter().all(|r| mem.check_range(r.addr, r.len)) {
                return Err(reject(RequestError::BadAddress));
            }
            RequestKind::GetId {
                dest: dest.iter().map(|r| (r.addr, r.len)).collect(),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            if !writable.is_empty() {
                return Err(reject(RequestError::WrongDirection(req_type)));
            }
            parse_range_request(req_type, &payload, mem, disk).map_err(reject)?
        }
        other => return Err(reject(RequestError::UnsupportedType(other))),
    };
    let used_len = match &kind {
        RequestKind::Read { .. } => total_len(&writable) as u32 + 1,
        RequestKind::GetId { dest } => dest.iter().map(|d| d.1).sum::<usize>() as u32 + 1,
        _ => 1,
    };
    Ok(Request {
        kind,
        status,
        used_len,
        mem: mem.clone(),
    })
}

fn parse_range_request(
    req_type: u32,
    payload: &[Range],
    mem: &GuestMemory,
    disk: &DiskGeometry,
) -> Result<RequestKind, RequestError> {
    let len = total_len(payload) as usize;
    if len == 0
        || !len.is_multiple_of(SEGMENT_LEN)
        || len / SEGMENT_LEN > MAX_DISCARD_SEGMENTS as usize
    {
        return Err(RequestError::BadSegments(len));
    }
    let mut seg = [0u8; SEGMENT_LEN];
    read_ranges(mem, payload, &mut seg).map_err(|()| RequestError::BadAddress)?;
    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
    let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
    let (allowed_flags, max) = if req_type == VIRTIO_BLK_T_DISCARD {
        // The spec: a discard with the unmap flag set gets UNSUPP.
        (0, MAX_DISCARD_SECTORS)
    } else {
        (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, MAX_WRITE_ZEROES_SECTORS)
    };
    if flags & !allowed_flags != 0 {
        return Err(RequestError::UnsupportedFlags(flags));
    }
    if sectors > max {
        return Err(RequestError::TooLarge(sectors));
    }
    check_range(disk, sector, u64::from(sectors) * SECTOR_SIZE)?;
    Ok(if req_type == VIRTIO_BLK_T_DISCARD {
        RequestKind::Discard { sector, sectors }
    } else {
        RequestKind::WriteZeroes {
            sector,
            sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        }
    })
}

/// Checks alignment to the logical block size and that the range lies within the disk.
fn check_range(disk: &DiskGeometry, sector: u64, len: u64) -> Result<(), RequestError> {
    let block = u64::from(disk.logical_block_size);
    if !len.is_multiple_of(block) || !sector.is_multiple_of(disk.sectors_per_block()) {
        return Err(RequestError::Misaligned { sector, len });
    }
    let sectors = len / SECTOR_SIZE;
    match sector.checked_add(sectors) {
        Some(end) if end <= disk.capacity_sectors => Ok(()),
        _ => Err(RequestError::OutOfRange { sector, sectors }),
    }
}

fn range_of(d: &Descriptor) -> Range {
    Range {
        addr: d.addr(),
        len: d.len() as usize,
    }
}

fn total_len(ranges: &[Range]) -> u64 {
    ranges.iter().map(|r| r.len as u64).sum()
}

/// Splits `ranges` after `n` bytes; `None` if they hold fewer, or the split point wraps.
fn split_at(ranges: &[Range], mut n: usize) -> Option<(Ranges, Ranges)> {
    let mut head = Ranges::new();
    let mut tail = Ranges::new();
    for r in ranges {
        if n == 0 {
            tail.push(*r);
        } else if r.len <= n {
            head.push(*r);
            n -= r.len;
        } else {
            head.push(Range {
                addr: r.addr,
                len: n,
            });
            // A range that wraps around the address space is not in guest memory anyway.
            tail.push(Range {
                addr: r.addr.checked_add(n as u64)?,
                len: r.len - n,
            });
            n = 0;
        }
    }
    (n == 0).then_some((head, tail))
}

fn read_ranges(mem: &GuestMemory, ranges: &[Range], out: &mut [u8]) -> Result<(), ()> {
    let mut at = 0;
    for r in ranges {
        let n = r.len.min(out.len() - at);
        mem.read_slice(&mut out[at..at + n], r.addr)
            .map_err(|_| ())?;
        at += n;
    }
    Ok(())
}

/// Translates guest ranges to host buffers; a range may span several memory regions.
fn host_buffers(mem: &GuestMemory, ranges: &[Range]) -> Result<Vec<IoVec>, ()> {
    let mut bufs = Vec::with_capacity(ranges.len());
    for r in ranges {
        for slice in GuestMemoryBackend::get_slices(mem, r.addr, r.len) {
            let slice = slice.map_err(|_| ())?;
            // SAFETY: the slice lies inside a region of `mem`. The request that carries these
            // buffers holds an Arc of `mem`, and hands it to the in-flight token, so the
            // mapping outlives the I/O. Guest memory may change under the I/O; that is the
            // guest's own race and cannot harm the host.
            bufs.push(unsafe { IoVec::new(slice.ptr_guard_mut().as_ptr(), slice.len()) });
        }
    }
    Ok(bufs)
}

/// Writes the serial into a GET_ID request's buffers.
pub fn write_serial(
    mem: &GuestMemory,
    dest: &[(GuestAddress, usize)],
    serial: &[u8; SERIAL_LEN],
) -> bool {
    let mut at = 0;
    for &(addr, len) in dest {
        if mem.write_slice(&serial[at..at + len], addr).is_err() {
            return false;
        }
        at += len;
    }
    true
}

/// Finishes a request: writes its status byte. The one place a status reaches the guest.
pub fn write_status(mem: &GuestMemory, status: GuestAddress, value: u8) {
    // The parser checked that the byte lies in guest memory; a failure here means the memory
    // map changed under us, and there is nowhere else to report it.
    let _ = mem.write_obj(value, status);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::test_util::geometry;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const R: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
    const LAST_W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    fn memory() -> Arc<GuestMemory> {
        // Two regions with a gap between them: [0, 64K) and [128K, 192K).
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10000),
                (GuestAddress(0x20000), 0x10000),
            ])
            .unwrap(),
        )
    }

    fn header(mem: &GuestMemory, t: u32, sector: u64) {
        mem.write_obj(t.to_le(), GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn status_desc() -> Descriptor {
        d(STATUS, 1, LAST_W)
    }

    fn rejected(r: Result<Request, ParseError>) -> RequestError {
        match r {
            Err(ParseError::Rejected { status, error }) => {
                assert_eq!(status, GuestAddress(STATUS));
                error
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn read_with_split_header_and_data_sharing_the_status_descriptor() {
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 8);
        let chain = [
            d(HDR, 10, R),
            d(HDR + 10, 6, R),
            d(DATA, 1024, W),
            d(DATA + 1024, 513, LAST_W),
        ];
        let req = parse(chain, &mem, &geometry()).unwrap();
        assert_eq!(req.status, GuestAddress(DATA + 1024 + 512));
        assert_eq!(req.used_len, 1537);
        match req.kind {
            RequestKind::Read { sector, bufs } => {
                assert_eq!(sector, 8);
                assert_eq!(
                    bufs.iter().map(IoVec::len).collect::<Vec<_>>(),
                    vec![1024, 512]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write_with_header_and_data_in_one_descriptor() {
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        // Header and 512 bytes of data in one readable descriptor.
        let req = parse([d(HDR, 16 + 512, R), status_desc()], &mem, &geometry()).unwrap();
        assert_eq!(req.used_len, 1);
        assert!(
            matches!(req.kind, RequestKind::Write { sector: 0, ref bufs } if bufs.len() == 1 && bufs[0].len() == 512)
        );
    }

    #[test]
    fn a_buffer_spanning_two_regions_is_refused_across_the_gap_but_split_inside_memory() {
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // 0xf000..0x11000 crosses the end of region 0 into the gap.
        let err = rejected(parse(
            [d(HDR, 16, R), d(0xf000, 0x2000, W), status_desc()],
            &mem,
            &geometry(),
        ));
        assert_eq!(err, RequestError::BadAddress);
    }

    #[test]
    fn wrong_directions() {
        let mem = memory();
        let g = geometry();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 512, R), status_desc()],
                &mem,
                &g
            )),
            RequestError::WrongDirection(0)
        );
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 512, W), status_desc()],
                &mem,
                &g
            )),
            RequestError::WrongDirection(1)
        );
        assert_eq!(
            rejected(parse(
                [d(DATA, 512, W), d(HDR, 16, R), status_desc()],
                &mem,
                &g
            )),
            RequestError::ReadableAfterWritable
        );
    }

    #[test]
    fn short_header_and_unknown_type() {
        let mem = memory();
        let g = geometry();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rejected(parse([d(HDR, 15, R), status_desc()], &mem, &g)),
            RequestError::ShortHeader
        );
        header(&mem, 77, 0);
        let e = rejected(parse([d(HDR, 16, R), status_desc()], &mem, &g));
        assert_eq!(e, RequestError::UnsupportedType(77));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn range_and_alignment() {
        let mem = memory();
        let mut g = geometry();
        header(&mem, VIRTIO_BLK_T_IN, 2047);
        assert!(parse([d(HDR, 16, R), d(DATA, 512, W), status_desc()], &mem, &g).is_ok());
        assert_eq!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 1024, W), status_desc()],
                &mem,
                &g
            )),
            RequestError::OutOfRange {
                sector: 2047,
                sectors: 2
            }
        );
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX);
        assert!(matches!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 512, W), status_desc()],
                &mem,
                &g
            )),
            RequestError::OutOfRange { .. }
        ));
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert!(matches!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 100, W), status_desc()],
                &mem,
                &g
            )),
            RequestError::Misaligned { .. }
        ));
        g.logical_block_size = 4096;
        header(&mem, VIRTIO_BLK_T_IN, 1);
        assert!(matches!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 4096, W), status_desc()],
                &mem,
                &g
            )),
            RequestError::Misaligned { .. }
        ));
        header(&mem, VIRTIO_BLK_T_IN, 8);
        assert!(matches!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 512, W), status_desc()],
                &mem,
                &g
            )),
            RequestError::Misaligned { .. }
        ));
        assert!(parse([d(HDR, 16, R), d(DATA, 4096, W), status_desc()], &mem, &g).is_ok());
    }

    #[test]
    fn read_only_refuses_writes_but_serves_reads_and_flushes() {
        let mem = memory();
        let mut g = geometry();
        g.read_only = true;
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            header(&mem, t, 0);
            assert_eq!(
                rejected(parse(
                    [d(HDR, 16, R), d(DATA, 512, R), status_desc()],
                    &mem,
                    &g
                )),
                RequestError::ReadOnly
            );
        }
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert!(matches!(
            parse([d(HDR, 16, R), status_desc()], &mem, &g)
                .unwrap()
                .kind,
            RequestKind::Flush
        ));
    }

    #[test]
    fn unanswerable_chains() {
        let mem = memory();
        let g = geometry();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let cases: Vec<Vec<Descriptor>> = vec![
            vec![],
            vec![d(HDR, 16, R)],                         // no writable status
            vec![d(HDR, 16, R), d(STATUS, 0, LAST_W)],   // empty status
            vec![d(HDR, 16, R), d(0x18000, 1, LAST_W)],  // status in the gap
            vec![d(HDR, 16, R), d(u64::MAX, 2, LAST_W)], // status address overflows
            vec![d(HDR, 16, R), d(STATUS, 1, W)],        // truncated chain
        ];
        for chain in cases {
            assert!(
                matches!(
                    parse(chain.clone(), &mem, &g),
                    Err(ParseError::Unanswerable(_))
                ),
                "{chain:?}"
            );
        }
    }

    #[test]
    fn get_id_takes_at_most_twenty_bytes() {
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse(
            [
                d(HDR, 16, R),
                d(DATA, 12, W),
                d(DATA + 100, 64, W),
                status_desc(),
            ],
            &mem,
            &geometry(),
        )
        .unwrap();
        assert_eq!(req.used_len, 21);
        let RequestKind::GetId { dest } = req.kind else {
            panic!()
        };
        assert_eq!(
            dest,
            vec![(GuestAddress(DATA), 12), (GuestAddress(DATA + 100), 8)]
        );
        assert!(write_serial(&mem, &dest, &geometry().serial));
        let mut got = [0u8; 12];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got[..11], b"test-serial");
        assert_eq!(
            rejected(parse([d(HDR, 16, R), status_desc()], &mem, &geometry())),
            RequestError::NoIdBuffer
        );
    }

    fn segment(mem: &GuestMemory, sector: u64, sectors: u32, flags: u32) {
        mem.write_obj(sector.to_le(), GuestAddress(DATA)).unwrap();
        mem.write_obj(sectors.to_le(), GuestAddress(DATA + 8))
            .unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(DATA + 12))
            .unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mem = memory();
        let g = geometry();
        let chain = || [d(HDR, 16, R), d(DATA, 16, R), status_desc()];
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert!(matches!(
            parse(chain(), &mem, &g).unwrap().kind,
            RequestKind::WriteZeroes {
                sector: 8,
                sectors: 16,
                unmap: true
            }
        ));
        segment(&mem, 8, 16, 0x4);
        assert_eq!(
            rejected(parse(chain(), &mem, &g)),
            RequestError::UnsupportedFlags(4)
        );

        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, 0, 2048, 0);
        assert!(matches!(
            parse(chain(), &mem, &g).unwrap().kind,
            RequestKind::Discard {
                sector: 0,
                sectors: 2048
            }
        ));
        segment(&mem, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            rejected(parse(chain(), &mem, &g)).status(),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        segment(&mem, 2040, 16, 0);
        assert!(matches!(
            rejected(parse(chain(), &mem, &g)),
            RequestError::OutOfRange { .. }
        ));
        segment(&mem, 0, MAX_DISCARD_SECTORS + 1, 0);
        assert!(matches!(
            rejected(parse(chain(), &mem, &g)),
            RequestError::TooLarge(_)
        ));
        assert_eq!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 32, R), status_desc()],
                &mem,
                &g
            )),
            RequestError::BadSegments(32)
        );
        assert_eq!(
            rejected(parse(
                [d(HDR, 16, R), d(DATA, 15, R), status_desc()],
                &mem,
                &g
            )),
            RequestError::BadSegments(15)
        );
    }

    #[test]
    fn used_length_overflow_is_refused() {
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // The same 2 GiB "buffer" twice: more than a u32 used length can report.
        let big = d(0x20000, 1 << 31, W);
        let err = rejected(parse(
            [d(HDR, 16, R), big, big, status_desc()],
            &mem,
            &geometry(),
        ));
        assert_eq!(err, RequestError::DataTooLarge((1 << 32) + 1));
    }

    /// Whatever a guest puts in a chain, the parser neither panics nor accepts a request that
    /// reaches outside the disk or guest memory.
    #[test]
    fn random_chains_are_refused_or_stay_inside_the_disk_and_guest_memory() {
        use crate::bench::rng::Rng;
        use vm_memory::GuestMemoryRegion;
        let mem = memory();
        let regions: Vec<(usize, usize)> = mem
            .iter()
            .map(|r| (r.as_ptr() as usize, r.len() as usize))
            .collect();
        let inside_memory = |b: &IoVec| {
            let start = b.as_ptr() as usize;
            regions
                .iter()
                .any(|&(base, len)| start >= base && start + b.len() <= base + len)
        };
        let mut rng = Rng::new(0x0dd_c4a1);
        let pick = |rng: &mut Rng, v: &[u64]| v[rng.below(v.len() as u64) as usize];
        let types = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            77,
            u32::MAX,
        ];
        let (mut accepted, mut rejected_n) = (0, 0);
        for _ in 0..50_000 {
            let mut g = geometry();
            g.read_only = rng.below(4) == 0;
            if rng.below(3) == 0 {
                g.logical_block_size = 4096;
            }
            let cap = g.capacity_sectors;
            let sectors = [
                0,
                1,
                7,
                8,
                cap - 8,
                cap - 1,
                cap,
                cap + 1,
                u64::MAX - 7,
                u64::MAX,
            ];
            let t = types[rng.below(types.len() as u64) as usize];
            header(&mem, t, pick(&mut rng, &sectors));
            // A discard/write-zeroes segment at DATA.
            mem.write_obj(pick(&mut rng, &sectors), GuestAddress(DATA))
                .unwrap();
            let counts = [0, 1, 8, 2040, 2048, u64::from(u32::MAX)];
            mem.write_obj(pick(&mut rng, &counts) as u32, GuestAddress(DATA + 8))
                .unwrap();
            mem.write_obj(rng.below(4) as u32, GuestAddress(DATA + 12))
                .unwrap();
            let addrs = [
                HDR,
                DATA,
                STATUS,
                0xfff0,
                0xffff,
                0x10000,
                0x20000,
                0x2fff0,
                0x30000,
                u64::MAX - 15,
                rng.below(0x40000),
            ];
            let lens = [
                0,
                1,
                15,
                16,
                32,
                511,
                512,
                513,
                4096,
                0x10000,
                u64::from(u32::MAX),
            ];
            // A well-formed chain for the type, then a few random mutations.
            let data_flags = if t == VIRTIO_BLK_T_IN || t == VIRTIO_BLK_T_GET_ID {
                W
            } else {
                R
            };
            let mut chain = vec![d(HDR, 16, R)];
            if t != VIRTIO_BLK_T_FLUSH {
                let len = if data_flags == R && t != VIRTIO_BLK_T_OUT {
                    16
                } else {
                    4096
                };
                chain.push(d(DATA, len, data_flags));
            }
            chain.push(status_desc());
            for _ in 0..rng.below(3) {
                let i = rng.below(chain.len() as u64) as usize;
                match rng.below(5) {
                    0 => chain[i] = d(pick(&mut rng, &addrs), chain[i].len(), chain[i].flags()),
                    1 => {
                        let len = pick(&mut rng, &lens) as u32;
                        chain[i] = d(chain[i].addr().0, len, chain[i].flags());
                    }
                    2 => {
                        let flags = chain[i].flags() ^ (VRING_DESC_F_WRITE as u16);
                        chain[i] = d(chain[i].addr().0, chain[i].len(), flags);
                    }
                    3 => {
                        let len = pick(&mut rng, &lens) as u32;
                        let flags = if rng.below(2) == 0 { R } else { W };
                        chain.insert(i, d(pick(&mut rng, &addrs), len, flags));
                    }
                    _ => {
                        chain.remove(i);
                    }
                }
            }
            if let Some(last) = chain.last_mut()
                && rng.below(8) != 0
            {
                *last = d(
                    last.addr().0,
                    last.len(),
                    last.flags() & !(VRING_DESC_F_NEXT as u16),
                );
            }
            match parse(chain, &mem, &g) {
                Ok(req) => {
                    accepted += 1;
                    assert!(mem.check_range(req.status, 1));
                    let within = |sector: u64, bytes: u64| {
                        sector.checked_mul(512).and_then(|s| s.checked_add(bytes))
                            <= Some(cap * 512)
                    };
                    match &req.kind {
                        RequestKind::Read { sector, bufs }
                        | RequestKind::Write { sector, bufs } => {
                            let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
                            assert!(within(*sector, bytes), "{req:?}");
                            assert_eq!(bytes % u64::from(g.logical_block_size), 0);
                            assert!(bufs.iter().all(inside_memory), "{req:?}");
                            if g.read_only {
                                assert!(matches!(req.kind, RequestKind::Read { .. }));
                            }
                        }
                        RequestKind::Discard { sector, sectors }
                        | RequestKind::WriteZeroes {
                            sector, sectors, ..
                        } => {
                            assert!(!g.read_only);
                            assert!(within(*sector, u64::from(*sectors) * 512), "{req:?}");
                        }
                        RequestKind::GetId { dest } => {
                            assert!(dest.iter().map(|d| d.1).sum::<usize>() <= SERIAL_LEN);
                            assert!(dest.iter().all(|&(a, l)| mem.check_range(a, l)));
                        }
                        RequestKind::Flush => {}
                    }
                }
                Err(ParseError::Rejected { status, .. }) => {
                    rejected_n += 1;
                    assert!(mem.check_range(status, 1));
                }
                Err(ParseError::Unanswerable(_)) => {}
            }
        }
        // The generator reaches both outcomes often enough to mean something.
        assert!(
            accepted > 500 && rejected_n > 5000,
            "{accepted} / {rejected_n}"
        );
    }
}
