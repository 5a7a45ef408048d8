//! One conformance suite for every I/O engine.
//!
//! Each engine configuration listed in the `engines!` invocation below gets a module with one
//! `#[test]` per case, named `engine::conformance::<configuration>::<case>`. Adding an engine
//! is one line there. The engines are built through [`engine::create`], exactly as the daemon
//! builds them.
//!
//! An engine the kernel cannot run fails its tests with the reason, unless
//! `VUBLK_SKIP_UNAVAILABLE_ENGINES` is set. Cases that need root (mounting a tmpfs, attaching
//! a loop device) fail with a message saying so when not run as root.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use tempfile::TempDir;

use super::{Completion, EngineError, EngineKind, EngineParams, IoEngine, IoOp, IoVec};
use crate::backing::{Backing, BackingKind, OpenParams};
use crate::engine;

/// An engine configuration under test.
struct Setup {
    kind: EngineKind,
    /// Open the backing with O_DIRECT: every buffer, offset and length is then 4096-aligned.
    direct: bool,
    /// Copy large O_DIRECT transfers through huge pages (the daemon's default).
    huge_bounce: bool,
}

/// Generates one `#[test]` per case for the configuration `$setup`.
macro_rules! conformance_cases {
    ($setup:expr) => {
        conformance_cases!(@each $setup;
            round_trips_at_many_sizes_and_offsets,
            multi_iovec_round_trips,
            more_iovecs_than_iov_max,
            durable_writes_and_flush,
            discard_deallocates,
            write_zeroes_reads_zero,
            write_zeroes_with_unmap_reads_zero,
            reading_past_the_end_is_an_error,
            backpressure_never_loses_work,
            many_in_flight_complete_with_their_tokens,
            drop_completes_operations_in_flight,
            enospc_reaches_the_caller_and_the_engine_keeps_serving,
            block_device_round_trip_discard_and_write_zeroes,
        );
    };
    (@each $setup:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                super::$case(&$setup);
            }
        )*
    };
}

/// One module of conformance tests per engine configuration.
macro_rules! engines {
    ($($name:ident: $setup:expr),* $(,)?) => {
        $(
            mod $name {
                use super::*;
                conformance_cases!($setup);
            }
        )*
    };
}

engines! {
    threads: Setup { kind: EngineKind::Threads, direct: false, huge_bounce: false },
    threads_direct: Setup { kind: EngineKind::Threads, direct: true, huge_bounce: false },
    uring: Setup { kind: EngineKind::IoUring, direct: false, huge_bounce: false },
    uring_direct: Setup { kind: EngineKind::IoUring, direct: true, huge_bounce: false },
    uring_direct_huge_bounce: Setup { kind: EngineKind::IoUring, direct: true, huge_bounce: true },
    linux_aio: Setup { kind: EngineKind::LinuxAio, direct: true, huge_bounce: false },
    linux_aio_huge_bounce: Setup { kind: EngineKind::LinuxAio, direct: true, huge_bounce: true },
}

/// Set to skip (with a message) the cases of engines the kernel cannot run.
const SKIP_VAR: &str = "VUBLK_SKIP_UNAVAILABLE_ENGINES";
/// Size of the images the cases create.
const DISK: u64 = 8 << 20;
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// The cases.

fn round_trips_at_many_sizes_and_offsets(setup: &Setup) {
    let Some(mut rig) = Rig::new(setup, 16) else {
        return;
    };
    let u = rig.unit as u64;
    let units = DISK / u;
    let sizes = [1, 2, 3, 8, 17, 64, 255, (4 * MIB) as u64 / u + 1];
    for (seed, size) in sizes.into_iter().enumerate() {
        for start in [0, 1, 7, 129, units - size] {
            let (offset, len) = (start * u, (size * u) as usize);
            let data = pattern(seed as u64, offset, len);
            rig.write(offset, &data, false).unwrap();
            assert!(
                rig.read(offset, len).unwrap() == data,
                "read back {len} @ {offset}"
            );
            assert!(
                rig.on_disk(offset, len) == data,
                "file contents {len} @ {offset}"
            );
        }
    }
}

fn multi_iovec_round_trips(setup: &Setup) {
    let Some(mut rig) = Rig::new(setup, 16) else {
        return;
    };
    let u = rig.unit;
    let write_split: Vec<usize> = [1, 3, 1, 8, 2, 1].iter().map(|n| n * u).collect();
    let read_split: Vec<usize> = [2, 2, 5, 7].iter().map(|n| n * u).collect();
    let ones = vec![u; 64];
    for (seed, offset) in [0, 3 * u as u64, DISK - 64 * u as u64]
        .into_iter()
        .enumerate()
    {
        let data = pattern(seed as u64, offset, 16 * u);
        rig.write_split(offset, &data, &write_split, false).unwrap();
        assert!(
            rig.read_split(offset, &read_split).unwrap() == data,
            "@ {offset}"
        );
        assert!(
            rig.on_disk(offset, data.len()) == data,
            "file contents @ {offset}"
        );

        let data = pattern(seed as u64 + 10, offset, 64 * u);
        rig.write_split(offset, &data, &ones, true).unwrap();
        assert!(
            rig.read_split(offset, &ones).unwrap() == data,
            "64 iovecs @ {offset}"
        );
    }
}

fn more_iovecs_than_iov_max(setup: &Setup) {
    let Some(mut rig) = Rig::new(setup, 4) else {
        return;
    };
    // More than the kernel takes in one readv/writev (1024).
    let split = vec![rig.unit; 1500];
    let data = pattern(3, 0, 1500 * rig.unit);
    rig.write_split(0, &data, &split, false).unwrap();
    assert!(rig.read_split(0, &split).unwrap() == data);
    assert!(rig.on_disk(0, data.len()) == data);
}

fn durable_writes_and_flush(setup: &Setup) {
    let Some(mut rig) = Rig::new(setup, 8) else {
        return;
    };
    let data = pattern(4, MIB as u64, 64 * KIB);
    rig.write(MIB as u64, &data, true).unwrap();
    assert!(rig.on_disk(MIB as u64, data.len()) == data);
    // Several flushes at once, then one on its own.
    for id in 0..4 {
        rig.submit(IoOp::Flush, Tok::new(id, Vec::new()));
    }
    for c in rig.reap_all() {
        c.result.unwrap();
    }
    rig.run(IoOp::Flush, Tok::new(9, Vec::new())).0.unwrap();
}

fn discard_deallocates(setup: &Setup) {
    let Some(mut rig) = Rig::new(setup, 8) else {
        return;
    };
    let (offset, len) = (MIB as u64, MIB);
    let u = rig.unit;
    let around = offset - u as u64;
    let data = pattern(5, around, len + 2 * u);
    rig.write(around, &data, false).unwrap();
    rig.run(IoOp::Flush, Tok::new(0, Vec::new())).0.unwrap();
    let before = rig.allocated_bytes();

    let discard = IoOp::Discard {
        offset,
        len: len as u64,
    };
    rig.run(discard, Tok::new(1, Vec::new())).0.unwrap();
    let after = rig.allocated_bytes();
    let back = rig.read(around, data.len()).unwrap();
    assert!(back[..u] == data[..u], "the block before the range changed");
    assert!(
        back[u + len..] == data[u + len..],
        "the block after the range changed"
    );
    if after < before {
        assert!(
            back[u..u + len].iter().all(|&b| b == 0),
            "discarded range not zero"
        );
    } else {
        eprintln!(
            "note: {} did not deallocate (st_blocks {before} -> {after} bytes); the contents \
             of the discarded range were not checked",
            rig.path.display()
        );
    }
    // A range that was never written, and one at the very end.
    let tail = IoOp::Discard {
        offset: DISK - MIB as u64,
        len: MIB as u64,
    };
    rig.run(tail, Tok::new(2, Vec::new())).0.unwrap();
}

fn write_zeroes_reads_zero(setup: &Setup) {
    check_write_zeroes(setup, false, false);
}

fn write_zeroes_with_unmap_reads_zero(setup: &Setup) {
    check_write_zeroes(setup, true, true);
}

fn check_write_zeroes(setup: &Setup, unmap: bool, durable: bool) {
    let Some(mut rig) = Rig::new(setup, 8) else {
        return;
    };
    write_zeroes_in_the_middle(&mut rig, unmap, durable);
}

/// Writes a pattern, zeroes all but its first and last unit, and checks all three parts.
fn write_zeroes_in_the_middle(rig: &mut Rig, unmap: bool, durable: bool) {
    let u = rig.unit;
    let (offset, len) = (2 * MIB as u64, 256 * KIB);
    let around = offset - u as u64;
    let data = pattern(6, around, len + 2 * u);
    rig.write(around, &data, false).unwrap();
    let op = IoOp::WriteZeroes {
        offset,
        len: len as u64,
        unmap,
        durable,
    };
    rig.run(op, Tok::new(0, Vec::new())).0.unwrap();
    for back in [
        rig.read(around, data.len()).unwrap(),
        rig.on_disk(around, data.len()),
    ] {
        assert!(back[..u] == data[..u], "the block before the range changed");
        assert!(
            back[u..u + len].iter().all(|&b| b == 0),
            "range not zero (unmap {unmap})"
        );
        assert!(
            back[u + len..] == data[u + len..],
            "the block after the range changed"
        );
    }
}

fn reading_past_the_end_is_an_error(setup: &Setup) {
    let Some(mut rig) = Rig::new(setup, 8) else {
        return;
    };
    let u = rig.unit;
    for (offset, len) in [(DISK - u as u64, 2 * u), (DISK, u), (DISK + MIB as u64, u)] {
        let result = rig.read(offset, len);
        assert!(
            result.is_err(),
            "read of {len} @ {offset} past the end succeeded"
        );
    }
    // Across the end with several buffers.
    assert!(rig.read_split(DISK - u as u64, &[u, u]).is_err());
    // The engine keeps serving.
    let data = pattern(7, DISK - u as u64, u);
    rig.write(DISK - u as u64, &data, false).unwrap();
    assert!(rig.read(DISK - u as u64, u).unwrap() == data);
}

fn backpressure_never_loses_work(setup: &Setup) {
    const DEPTH: usize = 8;
    const TOTAL: usize = 100;
    let Some(mut rig) = Rig::new(setup, DEPTH) else {
        return;
    };
    let u = rig.unit;
    let source = (4 * MIB) as u64;
    let source_data = pattern(8, source, TOTAL * u);
    rig.write(source, &source_data, false).unwrap();
    assert_eq!(rig.engine.free_slots(), DEPTH);

    // Even ids write unit `id` of the first half, odd ids read unit `id` of the source.
    let op = |id: usize| -> (IoOp, Tok) {
        let offset = (id * u) as u64;
        let mut buf = if id.is_multiple_of(2) {
            AlignedBuf::filled(&pattern(id as u64, offset, u))
        } else {
            AlignedBuf::zeroed(u)
        };
        let bufs = vec![buf.iov()];
        let op = if id.is_multiple_of(2) {
            IoOp::Write {
                offset,
                bufs,
                durable: false,
            }
        } else {
            IoOp::Read {
                offset: source + offset,
                bufs,
            }
        };
        (op, Tok::new(id, vec![buf]))
    };
    let mut seen = [false; TOTAL];
    let (mut next, mut finished, mut refusals) = (0, 0, 0);
    while finished < TOTAL {
        while next < TOTAL && rig.engine.free_slots() > 0 {
            let (op, tok) = op(next);
            rig.submit(op, tok);
            next += 1;
        }
        if next < TOTAL {
            // Full: one more is refused, and its token comes back.
            let (op, tok) = op(next);
            let rejected = rig.engine.submit(op, tok).unwrap_err();
            assert_eq!(rejected.token.id, next);
            assert!(
                matches!(rejected.error, EngineError::Full),
                "{}",
                rejected.error
            );
            refusals += 1;
        }
        rig.engine.commit().unwrap();
        for c in rig.wait() {
            let id = c.token.id;
            c.result.unwrap();
            assert!(!seen[id], "token {id} came back twice");
            seen[id] = true;
            finished += 1;
            if id % 2 == 1 {
                let at = id * u;
                assert!(
                    c.token.bufs[0].as_slice() == &source_data[at..at + u],
                    "read {id}"
                );
            }
        }
    }
    assert!(refusals > 0, "the engine never filled up");
    assert_eq!(rig.engine.free_slots(), DEPTH);
    assert_eq!(rig.engine.in_flight(), 0);
    for id in (0..TOTAL).step_by(2) {
        let offset = (id * u) as u64;
        assert!(
            rig.on_disk(offset, u) == pattern(id as u64, offset, u),
            "write {id}"
        );
    }
}

fn many_in_flight_complete_with_their_tokens(setup: &Setup) {
    const N: usize = 64;
    let Some(mut rig) = Rig::new(setup, N) else {
        return;
    };
    let u = rig.unit;
    // Reads come from the first half, writes go to the second.
    let source = pattern(9, 0, 4 * MIB);
    rig.write(0, &source, false).unwrap();
    let read_at = |id: usize| {
        (
            id * 7 % 64 * u,
            if id.is_multiple_of(4) { 256 * u } else { u },
        )
    };
    let write_at = |id: usize| ((4 * MIB + id * 8 * u) as u64, (id % 8 + 1) * u);
    for id in 0..N {
        let (op, tok) = match id % 8 {
            7 => (IoOp::Flush, Tok::new(id, Vec::new())),
            n if n.is_multiple_of(2) => {
                let (offset, len) = read_at(id);
                let mut buf = AlignedBuf::zeroed(len);
                let op = IoOp::Read {
                    offset: offset as u64,
                    bufs: vec![buf.iov()],
                };
                (op, Tok::new(id, vec![buf]))
            }
            _ => {
                let (offset, len) = write_at(id);
                let mut buf = AlignedBuf::filled(&pattern(id as u64, offset, len));
                let op = IoOp::Write {
                    offset,
                    bufs: vec![buf.iov()],
                    durable: id % 3 == 0,
                };
                (op, Tok::new(id, vec![buf]))
            }
        };
        rig.submit(op, tok);
    }
    assert_eq!(rig.engine.free_slots(), 0);
    assert_eq!(rig.engine.in_flight(), N);
    let done = rig.reap_all();
    let mut ids: Vec<usize> = done.iter().map(|c| c.token.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..N).collect::<Vec<_>>());
    for c in done {
        let id = c.token.id;
        c.result.unwrap_or_else(|e| panic!("operation {id}: {e}"));
        if id % 8 != 7 && id.is_multiple_of(2) {
            let offset = read_at(id).0;
            let buf = c.token.bufs[0].as_slice();
            assert!(buf == &source[offset..offset + buf.len()], "read {id}");
        }
    }
    for id in (0..N).filter(|id| id % 8 != 7 && id % 2 == 1) {
        let (offset, len) = write_at(id);
        assert!(
            rig.on_disk(offset, len) == pattern(id as u64, offset, len),
            "write {id}"
        );
    }
}

fn drop_completes_operations_in_flight(setup: &Setup) {
    const N: usize = 32;
    let Some(mut rig) = Rig::new(setup, N) else {
        return;
    };
    let len = 64 * KIB;
    let alive = Arc::new(());
    for id in 0..N {
        let offset = (id * len) as u64;
        let mut buf = AlignedBuf::filled(&pattern(id as u64, offset, len));
        let op = IoOp::Write {
            offset,
            bufs: vec![buf.iov()],
            durable: false,
        };
        let mut tok = Tok::new(id, vec![buf]);
        tok.alive = Some(alive.clone());
        rig.submit(op, tok);
        if id == N / 2 {
            // The rest stays submitted but not committed.
            rig.engine.commit().unwrap();
        }
    }
    let Rig {
        engine,
        path,
        _dir: dir,
        ..
    } = rig;
    // Dropping an engine finishes everything submitted to it before releasing the tokens.
    drop(engine);
    assert_eq!(Arc::strong_count(&alive), 1, "tokens outlived the engine");
    let file = File::open(path).unwrap();
    for id in 0..N {
        let offset = (id * len) as u64;
        let mut back = vec![0u8; len];
        file.read_exact_at(&mut back, offset).unwrap();
        assert!(
            back == pattern(id as u64, offset, len),
            "write {id} was lost"
        );
    }
    drop(dir);
}

fn enospc_reaches_the_caller_and_the_engine_keeps_serving(setup: &Setup) {
    let mnt = TmpfsMount::new("size=1m");
    let path = mnt.path().join("sparse.img");
    File::create(&path).unwrap().set_len(DISK).unwrap();
    let Some(mut rig) = Rig::open(setup, &path, 8) else {
        return;
    };
    let first = pattern(10, 0, 256 * KIB);
    rig.write(0, &first, false).unwrap();
    // Twice the whole file system: the write fails part-way with ENOSPC.
    let big = pattern(11, MIB as u64, 2 * MIB);
    let err = rig.write(MIB as u64, &big, false).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // Space that is already allocated still takes writes.
    let again = pattern(12, 0, 128 * KIB);
    rig.write(0, &again, false).unwrap();
    assert!(rig.read(0, again.len()).unwrap() == again);
    rig.run(IoOp::Flush, Tok::new(0, Vec::new())).0.unwrap();
    drop(rig);
}

fn block_device_round_trip_discard_and_write_zeroes(setup: &Setup) {
    let dir = setup.dir();
    let image = dir.path().join("loop.img");
    File::create(&image).unwrap().set_len(DISK).unwrap();
    let dev = LoopDevice::attach(&image);
    let Some(mut rig) = Rig::open(setup, &dev.path, 8) else {
        return;
    };
    assert_eq!(rig.backing.kind(), BackingKind::BlockDevice);
    assert_eq!(rig.backing.size(), DISK);
    let data = pattern(13, MIB as u64, MIB);
    rig.write(MIB as u64, &data, false).unwrap();
    assert!(rig.read(MIB as u64, MIB).unwrap() == data);
    let discard = IoOp::Discard {
        offset: MIB as u64,
        len: MIB as u64,
    };
    rig.run(discard, Tok::new(0, Vec::new())).0.unwrap();
    write_zeroes_in_the_middle(&mut rig, false, false);
    write_zeroes_in_the_middle(&mut rig, true, true);
    rig.run(IoOp::Flush, Tok::new(1, Vec::new())).0.unwrap();
    drop(rig);
}

// ---------------------------------------------------------------------------------------------
// The rig.

/// What the suite hands an engine with each operation: an id, and the buffers the operation
/// uses, which therefore live until the engine hands the token back (as guest memory does).
#[derive(Debug)]
struct Tok {
    id: usize,
    bufs: Vec<AlignedBuf>,
    /// Lets a case count the tokens that still exist.
    alive: Option<Arc<()>>,
}

impl Tok {
    fn new(id: usize, bufs: Vec<AlignedBuf>) -> Self {
        Tok {
            id,
            bufs,
            alive: None,
        }
    }
}

/// An engine over a backing, with helpers that run operations to completion.
struct Rig {
    engine: Box<dyn IoEngine<Tok>>,
    backing: Arc<Backing>,
    path: PathBuf,
    /// Granularity of offsets, lengths and buffers: 4096 with O_DIRECT, else 512.
    unit: usize,
    _dir: Option<TempDir>,
}

impl Rig {
    /// An engine of `setup` over a fresh preallocated image of [`DISK`] bytes.
    fn new(setup: &Setup, depth: usize) -> Option<Rig> {
        let dir = setup.dir();
        let path = dir.path().join("disk.img");
        let params = OpenParams {
            create_size: Some(DISK),
            direct: setup.direct,
            ..Default::default()
        };
        let backing = Backing::open(&path, &params).unwrap();
        let mut rig = Rig::with_backing(setup, backing, depth)?;
        rig._dir = Some(dir);
        Some(rig)
    }

    /// An engine of `setup` over the existing file or block device at `path`.
    fn open(setup: &Setup, path: &Path, depth: usize) -> Option<Rig> {
        let params = OpenParams {
            direct: setup.direct,
            ..Default::default()
        };
        let backing = Backing::open(path, &params)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        Rig::with_backing(setup, backing, depth)
    }

    fn with_backing(setup: &Setup, backing: Backing, depth: usize) -> Option<Rig> {
        let backing = Arc::new(backing);
        let params = EngineParams {
            queue_depth: depth,
            io_threads: 4,
            huge_bounce: setup
                .huge_bounce
                .then(|| Arc::new(super::BufferPages::default())),
        };
        let engine = match engine::create(setup.kind, backing.clone(), params) {
            Ok(engine) => engine,
            Err(EngineError::Unavailable(kind, why)) if std::env::var_os(SKIP_VAR).is_some() => {
                eprintln!("SKIPPED: the {kind} engine is unavailable: {why}");
                return None;
            }
            Err(e) => panic!(
                "cannot create the {} engine: {e} (set {SKIP_VAR}=1 to skip engines this \
                 kernel cannot run)",
                setup.kind
            ),
        };
        assert_eq!(engine.name(), setup.kind.name());
        Some(Rig {
            engine,
            path: backing.path().into(),
            backing,
            unit: if setup.direct { 4096 } else { 512 },
            _dir: None,
        })
    }

    fn submit(&mut self, op: IoOp, tok: Tok) {
        if let Err(rejected) = self.engine.submit(op, tok) {
            panic!(
                "operation {} refused: {}",
                rejected.token.id, rejected.error
            );
        }
    }

    /// Waits for the completion eventfd and reaps once (which may find nothing).
    fn wait(&mut self) -> Vec<Completion<Tok>> {
        let ready = engine::wait_readable(self.engine.completion_fd(), 10_000).unwrap();
        assert!(ready, "no completion within 10 s");
        let mut out = Vec::new();
        self.engine.reap(&mut out);
        out
    }

    /// Commits, then reaps until nothing is in flight.
    fn reap_all(&mut self) -> Vec<Completion<Tok>> {
        self.engine.commit().unwrap();
        let mut out = Vec::new();
        while self.engine.in_flight() > 0 {
            out.append(&mut self.wait());
        }
        out
    }

    /// Runs one operation to completion: its result and its token.
    fn run(&mut self, op: IoOp, tok: Tok) -> (io::Result<()>, Tok) {
        self.submit(op, tok);
        let mut done = self.reap_all();
        assert_eq!(done.len(), 1);
        let c = done.pop().unwrap();
        (c.result, c.token)
    }

    fn write(&mut self, offset: u64, data: &[u8], durable: bool) -> io::Result<()> {
        self.write_split(offset, data, &[data.len()], durable)
    }

    /// Writes `data` from buffers of the lengths in `split`.
    fn write_split(
        &mut self,
        offset: u64,
        data: &[u8],
        split: &[usize],
        durable: bool,
    ) -> io::Result<()> {
        let mut at = 0;
        let mut bufs: Vec<AlignedBuf> = split
            .iter()
            .map(|&n| {
                at += n;
                AlignedBuf::filled(&data[at - n..at])
            })
            .collect();
        assert_eq!(at, data.len());
        let op = IoOp::Write {
            offset,
            bufs: bufs.iter_mut().map(AlignedBuf::iov).collect(),
            durable,
        };
        self.run(op, Tok::new(0, bufs)).0
    }

    fn read(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.read_split(offset, &[len])
    }

    /// Reads into buffers of the lengths in `split`; returns their contents concatenated.
    fn read_split(&mut self, offset: u64, split: &[usize]) -> io::Result<Vec<u8>> {
        let mut bufs: Vec<AlignedBuf> = split.iter().map(|&n| AlignedBuf::zeroed(n)).collect();
        let op = IoOp::Read {
            offset,
            bufs: bufs.iter_mut().map(AlignedBuf::iov).collect(),
        };
        let (result, tok) = self.run(op, Tok::new(0, bufs));
        result?;
        Ok(tok
            .bufs
            .iter()
            .flat_map(|b| b.as_slice())
            .copied()
            .collect())
    }

    /// The backing's bytes as another reader sees them.
    fn on_disk(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    /// Bytes the backing file occupies on its file system.
    fn allocated_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().blocks() * 512
    }
}

impl Setup {
    /// A scratch directory for this configuration's images.
    fn dir(&self) -> TempDir {
        if self.direct {
            tempfile::tempdir_in(direct_capable_dir()).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        }
    }
}

/// A directory whose file system takes O_DIRECT (tmpfs did not before Linux 6.6).
fn direct_capable_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let candidates = [
            std::env::temp_dir(),
            PathBuf::from("/var/tmp"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        ];
        candidates
            .iter()
            .find(|dir| supports_direct(dir))
            .unwrap_or_else(|| panic!("none of {candidates:?} supports O_DIRECT"))
            .clone()
    })
}

fn supports_direct(dir: &Path) -> bool {
    let Ok(scratch) = tempfile::tempdir_in(dir) else {
        return false;
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(scratch.path().join("probe"));
    file.is_ok_and(|f| f.write_at(AlignedBuf::zeroed(4096).as_slice(), 0).is_ok())
}

/// Bytes that depend on their absolute position and on `seed`, so that a misplaced or
/// stale block never compares equal.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|p| (p.wrapping_mul(0x9e37_79b9) >> 7 ^ p >> 9 ^ seed.wrapping_mul(0x45)) as u8)
        .collect()
}

/// A zero-initialized heap buffer aligned to 4096 bytes, as O_DIRECT wants.
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), 4096).unwrap()
    }

    fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn filled(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid and initialized for `len` bytes. The suite reads a buffer only
        // before its operation is submitted or after its token came back, so no engine writes
        // to it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as an iovec. The suite moves every buffer into the token of the operation
    /// that uses it, so the buffer lives until the engine hands that token back.
    fn iov(&mut self) -> IoVec {
        // SAFETY: the allocation does not move when the AlignedBuf does, and it lives until
        // the token that owns it is handed back (see above), which is the contract of
        // `IoVec::new`.
        unsafe { IoVec::new(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this very layout, and freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test {what} and needs root: run it as root");
}

fn run_command(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A small tmpfs mounted on a scratch directory, unmounted again on drop.
struct TmpfsMount {
    dir: TempDir,
}

impl TmpfsMount {
    fn new(options: &str) -> Self {
        require_root("mounts a tmpfs");
        let dir = tempfile::tempdir().unwrap();
        run_command(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", options, "tmpfs"])
                .arg(dir.path()),
        );
        TmpfsMount { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy: detach it so that it goes away once the last user does.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// A loop device over a file, detached again on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Self {
        require_root("attaches a loop device");
        let dev = run_command(Command::new("losetup").args(["-f", "--show"]).arg(file));
        LoopDevice { path: dev.into() }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
