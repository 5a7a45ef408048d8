//! Which I/O engine and page-cache mode an export gets, and why.
//!
//! [`choose`] is a pure function of what the probe found ([`ProbeReport`]), what the kernel
//! allows ([`KernelCaps`]) and what the operator asked for ([`Request`]). The rules:
//!
//! * Native AIO with O_DIRECT is for storage whose blocks already exist and are written: block
//!   devices, and fully allocated files on local or network file systems that support
//!   O_DIRECT. There the file system has nothing to do on a write.
//! * Everything else gets the thread pool with the page cache: sparse files (a write into a
//!   hole makes the file system allocate, and a native submission would stall the queue
//!   thread meanwhile), files that are mostly fallocated but unwritten (every first write
//!   converts an extent; see `UNWRITTEN_LIMIT_PERCENT`), copy-on-write files (every write
//!   allocates), tmpfs (no O_DIRECT, the page cache is the storage), stacked and unknown file
//!   systems.
//! * "Native" is io_uring where the kernel allows it, else Linux AIO, else the thread pool.
//! * O_DIRECT also needs the export's logical block size to be a multiple of the backing's
//!   O_DIRECT offset alignment; otherwise I/O goes through the page cache.
//! * Overrides are honoured when they can work and refused when they cannot: Linux AIO
//!   without O_DIRECT (it silently degrades to blocking submission), O_DIRECT where it does
//!   not exist, an engine the kernel forbids.

use std::fmt;

use serde::Serialize;

use crate::backing::BackingKind;
use crate::caps::KernelCaps;
use crate::engine::EngineKind;
use crate::probe::{FsClass, ProbeReport};

/// The operator's `--engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EngineRequest {
    /// Let vublk choose from the backing.
    Auto,
    /// io_uring.
    IoUring,
    /// Linux native AIO (needs O_DIRECT).
    LinuxAio,
    /// The thread pool.
    Threads,
}

/// The operator's `--direct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DirectRequest {
    /// O_DIRECT where the backing wants it.
    Auto,
    /// Always O_DIRECT (bypass the page cache).
    On,
    /// Never O_DIRECT (use the page cache).
    Off,
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `--engine`.
    pub engine: EngineRequest,
    /// `--direct`.
    pub direct: DirectRequest,
    /// The logical block size the export will have.
    pub logical_block_size: u32,
}

/// The engine and page-cache mode of an export, and the reasons for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choice {
    /// The engine every queue uses.
    pub engine: EngineKind,
    /// Open the backing with O_DIRECT.
    pub direct: bool,
    /// Why, for humans, in the order the decisions were taken.
    pub reasons: Vec<String>,
}

impl fmt::Display for Choice {
    /// `engine io-uring, O_DIRECT on (reason; reason; ...)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "engine {}, O_DIRECT {} ({})",
            self.engine,
            if self.direct { "on" } else { "off" },
            self.reasons.join("; ")
        )
    }
}

/// An override that cannot work here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Linux AIO without O_DIRECT.
    #[error(
        "--engine linux-aio needs O_DIRECT, but {0}; without O_DIRECT Linux AIO silently \
         degrades to blocking submission (use --engine io-uring or threads)"
    )]
    LinuxAioWithoutDirect(String),
    /// `--direct on` where O_DIRECT cannot work.
    #[error("--direct on cannot work here: {0}")]
    DirectUnsupported(String),
    /// `--engine io-uring` on a kernel that forbids it.
    #[error("--engine io-uring cannot work here: io_uring is unavailable ({0})")]
    IoUringUnavailable(String),
    /// `--engine linux-aio` on a kernel without it.
    #[error("--engine linux-aio cannot work here: Linux AIO is unavailable ({0})")]
    LinuxAioUnavailable(String),
}

/// Chooses the engine and page-cache mode for an export; see the module documentation.
pub fn choose(
    probe: &ProbeReport,
    kernel: &KernelCaps,
    request: &Request,
) -> Result<Choice, Refusal> {
    let direct_ok = direct_possible(probe, request.logical_block_size);
    let storage = storage_verdict(probe, &direct_ok);
    let mut reasons = storage.reasons;

    let direct = match (request.direct, request.engine) {
        (DirectRequest::Off, EngineRequest::LinuxAio) => {
            return Err(Refusal::LinuxAioWithoutDirect(
                "--direct off turns it off".into(),
            ));
        }
        (DirectRequest::On, _) => {
            direct_ok.map_err(Refusal::DirectUnsupported)?;
            reasons.push("O_DIRECT on by request".into());
            true
        }
        (DirectRequest::Off, _) => {
            reasons.push("O_DIRECT off by request".into());
            false
        }
        (DirectRequest::Auto, EngineRequest::LinuxAio) => {
            direct_ok.map_err(Refusal::LinuxAioWithoutDirect)?;
            if !storage.native {
                reasons.push("O_DIRECT on because linux-aio needs it".into());
            }
            true
        }
        (DirectRequest::Auto, _) => storage.native,
    };

    let engine = match request.engine {
        EngineRequest::Auto if storage.native && direct => native_engine(kernel, &mut reasons),
        EngineRequest::Auto => {
            reasons.push(
                if direct {
                    "the thread pool, with O_DIRECT"
                } else {
                    "the thread pool, with the page cache"
                }
                .into(),
            );
            EngineKind::Threads
        }
        EngineRequest::IoUring => {
            kernel
                .io_uring
                .clone()
                .map_err(Refusal::IoUringUnavailable)?;
            reasons.push("engine io-uring by request".into());
            EngineKind::IoUring
        }
        EngineRequest::LinuxAio => {
            kernel
                .linux_aio
                .clone()
                .map_err(Refusal::LinuxAioUnavailable)?;
            reasons.push("engine linux-aio by request".into());
            EngineKind::LinuxAio
        }
        EngineRequest::Threads => {
            reasons.push("engine threads by request".into());
            EngineKind::Threads
        }
    };
    Ok(Choice {
        engine,
        direct,
        reasons,
    })
}

/// What the storage itself calls for.
struct Verdict {
    /// Native AIO with O_DIRECT.
    native: bool,
    reasons: Vec<String>,
}

/// Ok with the alignment when O_DIRECT can serve an export of `block`-byte blocks, else why
/// not.
fn direct_possible(probe: &ProbeReport, block: u32) -> Result<u32, String> {
    let d = &probe.direct_io;
    if !d.supported {
        return Err(d
            .reason
            .clone()
            .unwrap_or_else(|| "O_DIRECT is unsupported here".into()));
    }
    let align = d.offset_align.max(1);
    if !block.is_multiple_of(align) {
        return Err(format!(
            "the logical block size {block} is not a multiple of the O_DIRECT alignment \
             {align} (--logical-block-size {} would fit)",
            if align <= 4096 { 4096 } else { align }
        ));
    }
    Ok(align)
}

fn storage_verdict(probe: &ProbeReport, direct_ok: &Result<u32, String>) -> Verdict {
    let mut reasons = Vec::new();
    let wants_native = match (probe.kind, &probe.file_system, &probe.allocation) {
        (BackingKind::BlockDevice, _, _) => {
            reasons.push("block device".to_owned());
            true
        }
        (BackingKind::Null, _, _) => {
            reasons.push("null backing: there is no storage to choose an engine for".to_owned());
            false
        }
        (BackingKind::File, Some(fs), alloc) => match fs.class {
            FsClass::Memory => {
                // The O_DIRECT reason ("tmpfs has no O_DIRECT ...") says it all.
                if direct_ok.is_ok() {
                    reasons.push(format!("{} keeps files in memory", fs.name));
                }
                false
            }
            FsClass::Stacked => {
                reasons.push(format!(
                    "file on {}, a stacked file system: how it allocates depends on what is \
                     below",
                    fs.name
                ));
                false
            }
            FsClass::Unknown => {
                reasons.push(format!(
                    "file on an unknown file system ({:#x}): native AIO is used only where it \
                     is known not to block",
                    fs.magic
                ));
                false
            }
            FsClass::Local | FsClass::Network => match alloc {
                Some(a) if a.sparse => {
                    reasons.push(format!(
                        "file is sparse: {} allocated; native AIO would block on allocation",
                        percent_text(a.percent(probe.size), a.allocated_bytes)
                    ));
                    false
                }
                _ if fs.copy_on_write => {
                    reasons.push(format!(
                        "file on {} is copy-on-write: every write allocates; native AIO \
                         would block on allocation",
                        fs.name
                    ));
                    false
                }
                Some(a) => {
                    let unwritten = a.unwritten_percent(probe.size);
                    let shown = percent_text(unwritten, a.unwritten_bytes);
                    let native = unwritten < UNWRITTEN_LIMIT_PERCENT;
                    reasons.push(if !native {
                        format!(
                            "file is fallocated but {shown} unwritten: every first write there \
                             converts an extent, which O_DIRECT pays per request"
                        )
                    } else if a.unwritten_bytes == 0 {
                        format!("file on {} is fully allocated and written", fs.name)
                    } else {
                        format!(
                            "file on {} is fully allocated, {shown} unwritten (under \
                             {UNWRITTEN_LIMIT_PERCENT}%)",
                            fs.name
                        )
                    });
                    native
                }
                None => {
                    reasons.push("file of unknown allocation".into());
                    false
                }
            },
        },
        (BackingKind::File, None, _) => {
            reasons.push("file on an unidentified file system".into());
            false
        }
    };
    let native = match (wants_native, direct_ok) {
        (true, Ok(_)) => true,
        (true, Err(why)) => {
            reasons.push(format!("{why}: using the page cache"));
            false
        }
        (false, Err(why)) if !reasons.iter().any(|r| r.contains("O_DIRECT")) => {
            reasons.push(why.clone());
            false
        }
        (false, _) => false,
    };
    Verdict { native, reasons }
}

/// Files with at least this share (in percent) of their size in unwritten extents
/// (fallocated, never written) get the page cache. Writing into an unwritten extent makes the
/// file system convert it, a journalled metadata update: with O_DIRECT every such write waits
/// for its own, while writeback converts many at once. Measured on ext4 over 30 s (README):
/// 4k random writes into a wholly unwritten file ran at 0.51× the page cache's rate at QD1
/// and 0.77× at QD32. The loss falls with the share of writes that land in unwritten ranges,
/// so under a tenth of the file it stays within about 5%.
const UNWRITTEN_LIMIT_PERCENT: u64 = 10;

fn percent_text(percent: u64, bytes: u64) -> String {
    if percent == 0 && bytes > 0 {
        "<1%".into()
    } else {
        format!("{percent}%")
    }
}

/// io_uring, else Linux AIO, else the thread pool (all with O_DIRECT).
fn native_engine(kernel: &KernelCaps, reasons: &mut Vec<String>) -> EngineKind {
    match (&kernel.io_uring, &kernel.linux_aio) {
        (Ok(()), _) => {
            reasons.push("io_uring is available".into());
            EngineKind::IoUring
        }
        (Err(uring), Ok(())) => {
            reasons.push(format!("io_uring unavailable ({uring}); using linux-aio"));
            EngineKind::LinuxAio
        }
        (Err(uring), Err(aio)) => {
            reasons.push(format!(
                "io_uring unavailable ({uring}) and linux-aio unavailable ({aio}); using the \
                 thread pool"
            ));
            EngineKind::Threads
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{
        AlignmentSource, Allocation, AllocationMethod, DirectIo, Discard, FileSystem,
    };

    const MIB: u64 = 1 << 20;

    fn direct_io(align: u32) -> DirectIo {
        DirectIo {
            supported: true,
            open_accepted: true,
            reason: None,
            mem_align: 4,
            offset_align: align,
            alignment_source: AlignmentSource::Statx,
        }
    }

    fn block_device() -> ProbeReport {
        ProbeReport {
            path: "/dev/loop0".into(),
            kind: BackingKind::BlockDevice,
            size: 64 * MIB,
            device: Some("7:0".into()),
            file_system: None,
            allocation: None,
            direct_io: direct_io(512),
            logical_block_size: 512,
            physical_block_size: 512,
            discard: Discard {
                supported: Some(true),
                detail: String::new(),
            },
            read_only_media: false,
            writable: true,
        }
    }

    fn file_on(name: &str, magic: u32, class: FsClass) -> ProbeReport {
        ProbeReport {
            path: "/img".into(),
            kind: BackingKind::File,
            size: 100 * MIB,
            device: None,
            file_system: Some(FileSystem {
                name: name.into(),
                magic,
                class,
                copy_on_write: false,
            }),
            allocation: Some(Allocation {
                allocated_bytes: 100 * MIB,
                unwritten_bytes: 0,
                sparse: false,
                method: AllocationMethod::Fiemap,
            }),
            direct_io: direct_io(512),
            logical_block_size: 512,
            physical_block_size: 4096,
            discard: Discard {
                supported: Some(true),
                detail: String::new(),
            },
            read_only_media: false,
            writable: true,
        }
    }

    fn ext4() -> ProbeReport {
        file_on("ext4", 0xef53, FsClass::Local)
    }

    fn sparse(mut r: ProbeReport, allocated: u64) -> ProbeReport {
        r.allocation = Some(Allocation {
            allocated_bytes: allocated,
            unwritten_bytes: 0,
            sparse: true,
            method: AllocationMethod::Fiemap,
        });
        r
    }

    fn unwritten(mut r: ProbeReport, unwritten: u64) -> ProbeReport {
        r.allocation.as_mut().unwrap().unwritten_bytes = unwritten;
        r
    }

    fn cow(mut r: ProbeReport) -> ProbeReport {
        r.file_system.as_mut().unwrap().copy_on_write = true;
        r
    }

    fn no_direct(mut r: ProbeReport, reason: &str) -> ProbeReport {
        r.direct_io.supported = false;
        r.direct_io.reason = Some(reason.into());
        r
    }

    fn aligned(mut r: ProbeReport, align: u32) -> ProbeReport {
        r.direct_io.offset_align = align;
        r
    }

    fn tmpfs() -> ProbeReport {
        no_direct(
            file_on("tmpfs", 0x0102_1994, FsClass::Memory),
            "tmpfs has no O_DIRECT (it accepts the flag, but files live in the page cache)",
        )
    }

    fn caps(uring: bool, aio: bool) -> KernelCaps {
        KernelCaps {
            io_uring: if uring {
                Ok(())
            } else {
                Err("kernel.io_uring_disabled=2".into())
            },
            linux_aio: if aio {
                Ok(())
            } else {
                Err("the kernel has no Linux AIO (ENOSYS)".into())
            },
            huge_pages: Ok(()),
        }
    }

    fn req(engine: EngineRequest, direct: DirectRequest) -> Request {
        Request {
            engine,
            direct,
            logical_block_size: 512,
        }
    }

    fn auto() -> Request {
        req(EngineRequest::Auto, DirectRequest::Auto)
    }

    #[track_caller]
    fn pick(p: &ProbeReport, k: &KernelCaps, r: Request) -> Choice {
        choose(p, k, &r).unwrap_or_else(|e| panic!("refused: {e}"))
    }

    #[track_caller]
    fn assert_reason(c: &Choice, text: &str) {
        assert!(
            c.reasons.iter().any(|r| r.contains(text)),
            "no reason contains {text:?}: {c}"
        );
    }

    #[test]
    fn block_device_gets_io_uring_with_o_direct() {
        let c = pick(&block_device(), &caps(true, true), auto());
        assert_eq!((c.engine, c.direct), (EngineKind::IoUring, true));
        assert_eq!(c.reasons, ["block device", "io_uring is available"]);
        assert_eq!(
            c.to_string(),
            "engine io-uring, O_DIRECT on (block device; io_uring is available)"
        );
    }

    #[test]
    fn native_falls_back_to_linux_aio_then_threads() {
        let c = pick(&block_device(), &caps(false, true), auto());
        assert_eq!((c.engine, c.direct), (EngineKind::LinuxAio, true));
        assert_reason(
            &c,
            "io_uring unavailable (kernel.io_uring_disabled=2); using linux-aio",
        );
        let c = pick(&block_device(), &caps(false, false), auto());
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, true));
        assert_reason(
            &c,
            "linux-aio unavailable (the kernel has no Linux AIO (ENOSYS))",
        );
    }

    #[test]
    fn fully_allocated_file_on_local_or_network_fs_goes_native() {
        let c = pick(&ext4(), &caps(true, true), auto());
        assert_eq!((c.engine, c.direct), (EngineKind::IoUring, true));
        assert_reason(&c, "file on ext4 is fully allocated and written");
        for p in [
            file_on("xfs", 0x5846_5342, FsClass::Local),
            file_on("nfs", 0x6969, FsClass::Network),
        ] {
            let c = pick(&p, &caps(false, true), auto());
            assert_eq!((c.engine, c.direct), (EngineKind::LinuxAio, true), "{c}");
        }
    }

    #[test]
    fn fallocated_unwritten_file_gets_threads_with_the_page_cache() {
        let c = pick(&unwritten(ext4(), 100 * MIB), &caps(true, true), auto());
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false), "{c}");
        assert_eq!(
            c.reasons[0],
            "file is fallocated but 100% unwritten: every first write there converts an \
             extent, which O_DIRECT pays per request"
        );
        // At the limit the page cache still wins; just below it native AIO does.
        let c = pick(&unwritten(ext4(), 10 * MIB), &caps(true, true), auto());
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false), "{c}");
        assert_reason(&c, "fallocated but 10% unwritten");
        let c = pick(
            &unwritten(ext4(), 10 * MIB - 4096),
            &caps(true, true),
            auto(),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::IoUring, true), "{c}");
        assert_reason(
            &c,
            "file on ext4 is fully allocated, 9% unwritten (under 10%)",
        );
        let c = pick(&unwritten(ext4(), 4096), &caps(true, true), auto());
        assert_reason(
            &c,
            "file on ext4 is fully allocated, <1% unwritten (under 10%)",
        );
        // Overrides still work on such a file.
        let forced = req(EngineRequest::IoUring, DirectRequest::On);
        let c = pick(&unwritten(ext4(), 100 * MIB), &caps(true, true), forced);
        assert_eq!((c.engine, c.direct), (EngineKind::IoUring, true), "{c}");
    }

    #[test]
    fn sparse_file_gets_threads_with_the_page_cache() {
        let c = pick(&sparse(ext4(), 12 * MIB), &caps(true, true), auto());
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false));
        assert_eq!(
            c.reasons[0],
            "file is sparse: 12% allocated; native AIO would block on allocation"
        );
        let c = pick(&sparse(ext4(), 4096), &caps(true, true), auto());
        assert_reason(&c, "file is sparse: <1% allocated");
        let c = pick(&sparse(ext4(), 0), &caps(true, true), auto());
        assert_reason(&c, "file is sparse: 0% allocated");
    }

    #[test]
    fn tmpfs_gets_threads_with_the_page_cache() {
        let c = pick(&tmpfs(), &caps(true, true), auto());
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false));
        assert!(c.reasons[0].starts_with("tmpfs has no O_DIRECT"), "{c}");
    }

    #[test]
    fn no_o_direct_unknown_stacked_and_cow_get_threads() {
        let k = caps(true, true);
        let c = pick(
            &no_direct(ext4(), "ext4 refuses O_DIRECT on this file"),
            &k,
            auto(),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false));
        assert_reason(
            &c,
            "ext4 refuses O_DIRECT on this file: using the page cache",
        );
        let c = pick(
            &file_on("unknown (0x12345678)", 0x1234_5678, FsClass::Unknown),
            &k,
            auto(),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false));
        assert_reason(&c, "unknown file system (0x12345678)");
        for name in ["overlay", "fuse"] {
            let c = pick(&file_on(name, 1, FsClass::Stacked), &k, auto());
            assert_eq!((c.engine, c.direct), (EngineKind::Threads, false));
            assert_reason(&c, "stacked file system");
        }
        let btrfs = file_on("btrfs", 0x9123_683e, FsClass::Local);
        let c = pick(&cow(btrfs.clone()), &k, auto());
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false));
        assert_reason(&c, "file on btrfs is copy-on-write");
        let c = pick(&btrfs, &k, auto());
        assert_eq!(
            (c.engine, c.direct),
            (EngineKind::IoUring, true),
            "nodatacow"
        );
    }

    #[test]
    fn o_direct_needs_the_block_size_to_fit_the_alignment() {
        let k = caps(true, true);
        let p = aligned(ext4(), 4096);
        let c = pick(&p, &k, auto());
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false));
        assert_reason(
            &c,
            "the logical block size 512 is not a multiple of the O_DIRECT alignment 4096",
        );
        let c = pick(
            &p,
            &k,
            Request {
                logical_block_size: 4096,
                ..auto()
            },
        );
        assert_eq!((c.engine, c.direct), (EngineKind::IoUring, true));
        let e = choose(&p, &k, &req(EngineRequest::Auto, DirectRequest::On)).unwrap_err();
        assert!(matches!(e, Refusal::DirectUnsupported(_)), "{e}");
        assert!(e.to_string().contains("--logical-block-size 4096"), "{e}");
    }

    #[test]
    fn refused_overrides_say_why() {
        let k = caps(true, true);
        for p in [block_device(), ext4(), sparse(ext4(), 0), tmpfs()] {
            let e = choose(&p, &k, &req(EngineRequest::LinuxAio, DirectRequest::Off)).unwrap_err();
            assert_eq!(
                e.to_string(),
                "--engine linux-aio needs O_DIRECT, but --direct off turns it off; without \
                 O_DIRECT Linux AIO silently degrades to blocking submission (use --engine \
                 io-uring or threads)"
            );
        }
        let e = choose(
            &tmpfs(),
            &k,
            &req(EngineRequest::LinuxAio, DirectRequest::Auto),
        )
        .unwrap_err();
        assert!(matches!(e, Refusal::LinuxAioWithoutDirect(_)), "{e}");
        assert!(e.to_string().contains("tmpfs has no O_DIRECT"), "{e}");
        for engine in [
            EngineRequest::Auto,
            EngineRequest::Threads,
            EngineRequest::IoUring,
        ] {
            let e = choose(&tmpfs(), &k, &req(engine, DirectRequest::On)).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("--direct on cannot work here: tmpfs has no O_DIRECT"),
                "{e}"
            );
        }
        let e = choose(
            &block_device(),
            &caps(false, true),
            &req(EngineRequest::IoUring, DirectRequest::Auto),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--engine io-uring cannot work here: io_uring is unavailable \
             (kernel.io_uring_disabled=2)"
        );
        let e = choose(
            &block_device(),
            &caps(true, false),
            &req(EngineRequest::LinuxAio, DirectRequest::Auto),
        )
        .unwrap_err();
        assert!(matches!(e, Refusal::LinuxAioUnavailable(_)), "{e}");
    }

    #[test]
    fn workable_overrides_are_honoured() {
        let k = caps(true, true);
        let c = pick(&ext4(), &k, req(EngineRequest::Threads, DirectRequest::On));
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, true));
        assert_reason(&c, "engine threads by request");
        let c = pick(
            &block_device(),
            &k,
            req(EngineRequest::IoUring, DirectRequest::Auto),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::IoUring, true));
        let c = pick(
            &sparse(ext4(), MIB),
            &k,
            req(EngineRequest::IoUring, DirectRequest::Auto),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::IoUring, false));
        let c = pick(
            &sparse(ext4(), MIB),
            &k,
            req(EngineRequest::LinuxAio, DirectRequest::Auto),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::LinuxAio, true));
        assert_reason(&c, "O_DIRECT on because linux-aio needs it");
        let c = pick(
            &block_device(),
            &k,
            req(EngineRequest::Auto, DirectRequest::Off),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, false));
        assert_reason(&c, "the thread pool, with the page cache");
        let c = pick(
            &sparse(ext4(), MIB),
            &k,
            req(EngineRequest::Auto, DirectRequest::On),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::Threads, true));
        assert_reason(&c, "the thread pool, with O_DIRECT");
        let c = pick(
            &tmpfs(),
            &k,
            req(EngineRequest::IoUring, DirectRequest::Off),
        );
        assert_eq!((c.engine, c.direct), (EngineKind::IoUring, false));
    }

    /// Every storage kind, kernel, request and block size: the choice keeps the invariants,
    /// and it is refused exactly when an override cannot work.
    #[test]
    fn exhaustive_invariants() {
        let storages = [
            block_device(),
            aligned(block_device(), 4096),
            ext4(),
            aligned(ext4(), 4096),
            sparse(ext4(), 12 * MIB),
            unwritten(ext4(), 100 * MIB),
            unwritten(ext4(), MIB),
            cow(file_on("btrfs", 0x9123_683e, FsClass::Local)),
            file_on("nfs", 0x6969, FsClass::Network),
            file_on("overlay", 0x794c_7630, FsClass::Stacked),
            file_on("unknown (0x1)", 1, FsClass::Unknown),
            no_direct(ext4(), "ext4 refuses O_DIRECT on this file"),
            tmpfs(),
        ];
        let engines = [
            EngineRequest::Auto,
            EngineRequest::IoUring,
            EngineRequest::LinuxAio,
            EngineRequest::Threads,
        ];
        let directs = [DirectRequest::Auto, DirectRequest::On, DirectRequest::Off];
        let mut cases = 0;
        for p in &storages {
            for k in [
                caps(true, true),
                caps(false, true),
                caps(true, false),
                caps(false, false),
            ] {
                for engine in engines {
                    for direct in directs {
                        for block in [512, 4096] {
                            let r = Request {
                                engine,
                                direct,
                                logical_block_size: block,
                            };
                            check_case(p, &k, &r);
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 13 * 4 * 4 * 3 * 2);
    }

    fn check_case(p: &ProbeReport, k: &KernelCaps, r: &Request) {
        let can_direct = p.direct_io.supported
            && r.logical_block_size
                .is_multiple_of(p.direct_io.offset_align);
        let fs_ok = p.file_system.as_ref().is_none_or(|fs| {
            matches!(fs.class, FsClass::Local | FsClass::Network) && !fs.copy_on_write
        });
        let written = p.allocation.is_none_or(|a| {
            !a.sparse && a.unwritten_bytes * 100 < p.size * UNWRITTEN_LIMIT_PERCENT
        });
        let good_storage = fs_ok && written && can_direct;
        let refused = (r.engine == EngineRequest::LinuxAio
            && (r.direct == DirectRequest::Off || !can_direct || k.linux_aio.is_err()))
            || (r.direct == DirectRequest::On && !can_direct)
            || (r.engine == EngineRequest::IoUring && k.io_uring.is_err());
        let ctx = format!(
            "{} {r:?} {k:?}",
            p.file_system.as_ref().map_or("bdev", |f| &f.name)
        );
        let c = match choose(p, k, r) {
            Err(e) => {
                assert!(refused, "refused unexpectedly ({e}): {ctx}");
                assert!(e.to_string().starts_with("--"), "{e}");
                return;
            }
            Ok(c) => {
                assert!(!refused, "accepted unexpectedly ({c}): {ctx}");
                c
            }
        };
        assert!(!c.reasons.is_empty(), "{ctx}");
        assert!(
            !c.direct || can_direct,
            "O_DIRECT where it cannot work: {c} {ctx}"
        );
        assert!(c.engine != EngineKind::LinuxAio || c.direct, "{c} {ctx}");
        assert!(
            c.engine != EngineKind::IoUring || k.io_uring.is_ok(),
            "{c} {ctx}"
        );
        assert!(
            c.engine != EngineKind::LinuxAio || k.linux_aio.is_ok(),
            "{c} {ctx}"
        );
        match r.direct {
            DirectRequest::On => assert!(c.direct, "{ctx}"),
            DirectRequest::Off => assert!(!c.direct, "{ctx}"),
            DirectRequest::Auto if r.engine == EngineRequest::LinuxAio => assert!(c.direct),
            DirectRequest::Auto => assert_eq!(c.direct, good_storage, "{c} {ctx}"),
        }
        let native = if k.io_uring.is_ok() {
            EngineKind::IoUring
        } else if k.linux_aio.is_ok() {
            EngineKind::LinuxAio
        } else {
            EngineKind::Threads
        };
        let expected = match r.engine {
            EngineRequest::Auto if good_storage && c.direct => native,
            EngineRequest::Auto => EngineKind::Threads,
            EngineRequest::IoUring => EngineKind::IoUring,
            EngineRequest::LinuxAio => EngineKind::LinuxAio,
            EngineRequest::Threads => EngineKind::Threads,
        };
        assert_eq!(c.engine, expected, "{c} {ctx}");
    }
}
