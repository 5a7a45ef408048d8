//! A VM-less vhost-user frontend on `vhost::vhost_user::Frontend`: it negotiates like QEMU,
//! shares memfd guest memory, builds split virtqueues by hand and submits arbitrary
//! descriptor chains.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use super::blk::*;
use super::guest::{GuestMem, Place};
use super::virtq::{Desc, VRING_DESC_F_WRITE, VirtQueue, write_indirect_table};
use super::watchdog::Watchdog;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for a vhost-user reply.
pub const MSG_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct FrontendOpts {
    /// Queues to set up; None = all the backend reports (GET_QUEUE_NUM), at most 16.
    pub num_queues: Option<usize>,
    pub queue_size: u16,
    pub event_idx: bool,
    pub indirect: bool,
    /// Send the guest memory with ADD_MEM_REG (CONFIGURE_MEM_SLOTS) instead of SET_MEM_TABLE.
    pub add_mem_reg: bool,
    /// Protocol features to ack (intersected with what the backend offers).
    pub protocol: VhostUserProtocolFeatures,
    /// Virtio feature bits to leave out when acking.
    pub drop_features: u64,
    /// Initial ring index (avail idx, used idx and vring base) of fresh queues, to test
    /// wrap-around of the 16-bit indices.
    pub initial_index: u16,
    /// Send only the first N memory regions at setup (the rest can be added later with
    /// `add_region`); None = all.
    pub initial_regions: Option<usize>,
}

impl Default for FrontendOpts {
    fn default() -> Self {
        FrontendOpts {
            num_queues: None,
            queue_size: 256,
            event_idx: true,
            indirect: true,
            add_mem_reg: false,
            protocol: VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            drop_features: 0,
            initial_index: 0,
            initial_regions: None,
        }
    }
}

impl FrontendOpts {
    pub fn queues(mut self, n: usize) -> Self {
        self.num_queues = Some(n);
        self
    }
    pub fn queue_size(mut self, n: u16) -> Self {
        self.queue_size = n;
        self
    }
    pub fn no_event_idx(mut self) -> Self {
        self.event_idx = false;
        self
    }
    pub fn no_indirect(mut self) -> Self {
        self.indirect = false;
        self
    }
    pub fn initial_index(mut self, i: u16) -> Self {
        self.initial_index = i;
        self
    }
    pub fn initial_regions(mut self, n: usize) -> Self {
        self.initial_regions = Some(n);
        self
    }
    pub fn drop_features(mut self, f: u64) -> Self {
        self.drop_features |= f;
        self
    }
    pub fn protocol(mut self, p: VhostUserProtocolFeatures) -> Self {
        self.protocol = p;
        self
    }
    pub fn add_mem_reg(mut self) -> Self {
        self.add_mem_reg = true;
        self
    }
}

/// A request that was built (and possibly submitted) but not yet completed.
#[derive(Clone, Debug)]
pub struct Pending {
    pub queue: usize,
    pub head: u16,
    /// Device-writable pieces in order (gpa, len); the status byte is the last byte.
    pub writable: Vec<(u64, u32)>,
    pub status_gpa: Option<u64>,
    /// Pieces in chain order (gpa, len, device-writable).
    pub pieces: Vec<(u64, u32, bool)>,
}

/// The result of a completed request.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub used_len: u32,
    /// The status byte (`STATUS_UNTOUCHED` if the device did not write it; None if the
    /// status lies outside guest memory).
    pub status: Option<u8>,
    /// The device-writable payload (without the status byte).
    pub data: Vec<u8>,
}

impl Outcome {
    pub fn status(&self) -> u8 {
        self.status.expect("status outside guest memory")
    }
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.status, Some(S_OK), "request failed: {self:?}");
        self
    }
}

pub struct Detached {
    pub mem: GuestMem,
    pub queues: Vec<VirtQueue>,
    pub bases: Vec<u32>,
}

pub struct RawFrontend {
    pub fe: Frontend,
    pub mem: GuestMem,
    pub queues: Vec<VirtQueue>,
    /// Virtio features offered by the backend.
    pub features: u64,
    /// Virtio features acked.
    pub acked: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub acked_protocol: VhostUserProtocolFeatures,
    pub queue_num: u64,
    pub opts: FrontendOpts,
    pub timeout: Duration,
    /// Bounds every vhost-user message exchange.
    pub dog: Watchdog,
}

/// The virtio features this frontend is willing to ack.
pub fn frontend_features(opts: &FrontendOpts) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_RO)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        | F_PROTOCOL_FEATURES;
    if opts.event_idx {
        f |= bit(VIRTIO_RING_F_EVENT_IDX);
    }
    if opts.indirect {
        f |= bit(VIRTIO_RING_F_INDIRECT_DESC);
    }
    f & !opts.drop_features
}

fn region_info(mem: &GuestMem, i: usize) -> VhostUserMemoryRegionInfo {
    let r = &mem.regions[i];
    VhostUserMemoryRegionInfo {
        guest_phys_addr: r.gpa,
        memory_size: r.size,
        userspace_addr: r.host as u64,
        mmap_offset: 0,
        mmap_handle: r.fd(),
    }
}

fn verr(what: &str, e: vhost::Error) -> String {
    format!("{what}: {e:?}")
}

impl RawFrontend {
    /// Connect with default options; panics on failure.
    pub fn connect(socket: &Path) -> RawFrontend {
        Self::connect_with(socket, FrontendOpts::default()).unwrap()
    }

    pub fn connect_with(socket: &Path, opts: FrontendOpts) -> Result<RawFrontend, String> {
        Self::setup(socket, opts, None)
    }

    /// Stop all rings (GET_VRING_BASE) and close the connection, keeping memory and rings.
    pub fn detach(mut self) -> Result<Detached, String> {
        let mut bases = Vec::new();
        for q in 0..self.queues.len() {
            bases.push(self.get_vring_base(q)?);
        }
        Ok(Detached {
            mem: std::mem::take(&mut self.mem),
            queues: std::mem::take(&mut self.queues),
            bases,
        })
    }

    /// Connect again, restoring the rings of a previous connection.
    pub fn attach(socket: &Path, opts: FrontendOpts, d: Detached) -> Result<RawFrontend, String> {
        Self::setup(socket, opts, Some(d))
    }

    fn setup(
        socket: &Path,
        opts: FrontendOpts,
        prev: Option<Detached>,
    ) -> Result<RawFrontend, String> {
        let fe = Frontend::connect(socket, 16).map_err(|e| verr("connect", e))?;
        // A daemon that never replies must fail the test, not hang it.
        let dog = Watchdog::new(fe.as_raw_fd(), MSG_TIMEOUT);
        let r = Self::negotiate(fe, &dog, socket, opts, prev);
        if dog.fired() {
            return Err(format!(
                "no reply from the daemon within {MSG_TIMEOUT:?} during setup ({})",
                r.err().unwrap_or_default()
            ));
        }
        let (fe, mem, queues, features, acked, protocol, acked_protocol, queue_num, opts) = r?;
        Ok(RawFrontend {
            fe,
            mem,
            queues,
            features,
            acked,
            protocol,
            acked_protocol,
            queue_num,
            opts,
            timeout: DEFAULT_TIMEOUT,
            dog,
        })
    }

    #[allow(clippy::type_complexity)]
    fn negotiate(
        mut fe: Frontend,
        dog: &Watchdog,
        _socket: &Path,
        opts: FrontendOpts,
        prev: Option<Detached>,
    ) -> Result<
        (
            Frontend,
            GuestMem,
            Vec<VirtQueue>,
            u64,
            u64,
            VhostUserProtocolFeatures,
            VhostUserProtocolFeatures,
            u64,
            FrontendOpts,
        ),
        String,
    > {
        let _armed = dog.arm();
        fe.set_owner().map_err(|e| verr("SET_OWNER", e))?;
        let features = fe.get_features().map_err(|e| verr("GET_FEATURES", e))?;
        if features & F_PROTOCOL_FEATURES == 0 {
            return Err(format!(
                "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES: {features:#x}"
            ));
        }
        let protocol = fe
            .get_protocol_features()
            .map_err(|e| verr("GET_PROTOCOL_FEATURES", e))?;
        let acked_protocol = protocol & opts.protocol;
        fe.set_protocol_features(acked_protocol)
            .map_err(|e| verr("SET_PROTOCOL_FEATURES", e))?;
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(|e| verr("GET_QUEUE_NUM", e))?
        } else {
            1
        };
        let acked = features & frontend_features(&opts);
        fe.set_features(acked)
            .map_err(|e| verr("SET_FEATURES", e))?;
        let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;

        let (mem, mut queues, bases) = match prev {
            Some(d) => (d.mem, d.queues, Some(d.bases)),
            None => {
                let mem = GuestMem::new();
                let n = opts.num_queues.unwrap_or(queue_num.min(16) as usize).max(1);
                let qs: Vec<VirtQueue> = (0..n)
                    .map(|i| {
                        let mut q = VirtQueue::new(&mem, i, opts.queue_size, event_idx);
                        q.set_initial_index(&mem, opts.initial_index);
                        q
                    })
                    .collect();
                let bases = vec![opts.initial_index as u32; n];
                (mem, qs, Some(bases))
            }
        };

        let regions: Vec<VhostUserMemoryRegionInfo> = (0..mem.regions.len())
            .take(opts.initial_regions.unwrap_or(usize::MAX))
            .map(|i| region_info(&mem, i))
            .collect();
        if opts.add_mem_reg {
            for r in &regions {
                fe.add_mem_region(r).map_err(|e| verr("ADD_MEM_REG", e))?;
            }
        } else {
            fe.set_mem_table(&regions)
                .map_err(|e| verr("SET_MEM_TABLE", e))?;
        }

        for (i, q) in queues.iter_mut().enumerate() {
            q.event_idx = event_idx;
            q.force_kick = true;
            fe.set_vring_num(i, q.size)
                .map_err(|e| verr("SET_VRING_NUM", e))?;
            let base = bases.as_ref().map(|b| b[i] as u16).unwrap_or(0);
            fe.set_vring_base(i, base)
                .map_err(|e| verr("SET_VRING_BASE", e))?;
            let cfg = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: mem.host_addr(q.desc),
                used_ring_addr: mem.host_addr(q.used),
                avail_ring_addr: mem.host_addr(q.avail),
                log_addr: None,
            };
            fe.set_vring_addr(i, &cfg)
                .map_err(|e| verr("SET_VRING_ADDR", e))?;
            fe.set_vring_kick(i, &q.kick)
                .map_err(|e| verr("SET_VRING_KICK", e))?;
            fe.set_vring_call(i, &q.call)
                .map_err(|e| verr("SET_VRING_CALL", e))?;
        }
        for i in 0..queues.len() {
            fe.set_vring_enable(i, true)
                .map_err(|e| verr("SET_VRING_ENABLE", e))?;
        }
        Ok((
            fe,
            mem,
            queues,
            features,
            acked,
            protocol,
            acked_protocol,
            queue_num,
            opts,
        ))
    }

    /// Run one vhost-user exchange under the watchdog.
    pub fn msg<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, String> {
        let _armed = self.dog.arm();
        let r = f(&mut self.fe);
        match r {
            Ok(v) => Ok(v),
            Err(e) if self.dog.fired() => Err(format!(
                "{what}: no reply from the daemon within {:?} ({e:?})",
                self.dog.timeout()
            )),
            Err(e) => Err(verr(what, e)),
        }
    }

    /// ADD_MEM_REG for region `i` of the guest memory.
    pub fn add_region(&mut self, i: usize) -> Result<(), String> {
        let r = region_info(&self.mem, i);
        self.msg("ADD_MEM_REG", |fe| fe.add_mem_region(&r).map(|_| ()))
    }

    /// REM_MEM_REG for region `i` of the guest memory.
    pub fn remove_region(&mut self, i: usize) -> Result<(), String> {
        let r = region_info(&self.mem, i);
        self.msg("REM_MEM_REG", |fe| fe.remove_mem_region(&r))
    }

    /// SET_MEM_TABLE with the given regions of the guest memory.
    pub fn set_mem_table(&mut self, which: &[usize]) -> Result<(), String> {
        let regions: Vec<VhostUserMemoryRegionInfo> =
            which.iter().map(|&i| region_info(&self.mem, i)).collect();
        self.msg("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions).map(|_| ()))
    }

    pub fn has_feature(&self, b: u32) -> bool {
        self.features & bit(b) != 0
    }

    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, String> {
        let buf = vec![0u8; size as usize];
        self.msg("GET_CONFIG", |fe| {
            fe.get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)
                .map(|(_, data)| data)
        })
    }

    pub fn config(&mut self) -> BlkConfig {
        BlkConfig::parse(&self.get_config(0, CONFIG_SIZE as u32).unwrap())
    }

    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        self.msg("SET_CONFIG", |fe| {
            fe.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })
    }

    pub fn get_vring_base(&mut self, q: usize) -> Result<u32, String> {
        self.msg("GET_VRING_BASE", |fe| fe.get_vring_base(q))
    }

    // ---- descriptor chains -------------------------------------------------------------

    /// Allocate a guest buffer holding `data`.
    pub fn buf_with(&mut self, data: &[u8], place: Place) -> u64 {
        let g = self.mem.alloc(data.len().max(1) as u64, 8, place);
        self.mem.write(g, data);
        g
    }

    /// Allocate a guest buffer of `len` bytes filled with `fill`.
    pub fn buf(&mut self, len: u32, fill: u8, place: Place) -> u64 {
        let g = self.mem.alloc(len.max(1) as u64, 8, place);
        self.mem.fill(g, len as usize, fill);
        g
    }

    /// Write an arbitrary chain on queue `q` (not yet submitted); returns the head.
    pub fn add_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        self.queues[q].add_chain(&self.mem, descs)
    }

    /// Write an indirect table; returns (gpa, len) for `Desc::indirect`.
    pub fn indirect_table(&mut self, descs: &[Desc]) -> (u64, u32) {
        write_indirect_table(&mut self.mem, descs)
    }

    pub fn submit(&mut self, q: usize, head: u16) {
        self.queues[q].submit(&self.mem, head);
    }

    pub fn submit_many(&mut self, q: usize, heads: &[u16]) {
        self.queues[q].publish(&self.mem, heads);
    }

    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Vec<(u16, u32)> {
        self.queues[q].wait_used(&self.mem, timeout)
    }

    /// Wait for one head; returns its used length. Panics on timeout.
    #[track_caller]
    pub fn wait_head(&mut self, q: usize, head: u16) -> u32 {
        let t = self.timeout;
        let (done, others) = self.queues[q]
            .wait_heads(&self.mem, &[head], t)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(others.is_empty(), "unexpected completions {others:?}");
        done[&head]
    }

    /// Build the descriptors for a virtio-blk request in the given layout.
    pub fn build(&mut self, q: usize, req: &BlkReq, layout: &Layout) -> Pending {
        let readable = req.readable_stream();
        let out_split = layout.out_split.clone().unwrap_or_else(|| {
            let mut v = vec![16];
            if !req.out_data.is_empty() {
                v.push(req.out_data.len() as u32);
            }
            v
        });
        let in_split = layout.in_split.clone().unwrap_or_else(|| {
            let mut v = Vec::new();
            if req.in_len > 0 {
                v.push(req.in_len);
            }
            v.push(1);
            v
        });
        assert_eq!(
            out_split.iter().map(|&x| x as usize).sum::<usize>(),
            readable.len(),
            "out_split must cover header + out data"
        );
        assert_eq!(
            in_split.iter().map(|&x| x as u64).sum::<u64>(),
            req.in_len as u64 + 1,
            "in_split must cover in data + status"
        );
        let place = if layout.in_region_b {
            Place::B
        } else {
            Place::A
        };
        let mut pieces: Vec<(u64, u32, bool)> = Vec::new();
        let mut off = 0usize;
        let covered = |mem: &GuestMem, g: u64| mem.regions.iter().any(|r| r.contains(g));
        for (i, &len) in out_split.iter().enumerate() {
            let idx = pieces.len();
            let data = &readable[off..off + len as usize];
            off += len as usize;
            let gpa = match layout.addr_override.iter().find(|(p, _)| *p == idx) {
                Some(&(_, g)) => {
                    self.mem.write_lenient(g, data);
                    g
                }
                None => {
                    let p = if layout.span == Some(idx) {
                        Place::Span
                    } else if i == 0 {
                        Place::A
                    } else {
                        place
                    };
                    let g = self.mem.alloc(len.max(2) as u64, 8, p);
                    self.mem.write(g, data);
                    g
                }
            };
            pieces.push((gpa, len, false));
        }
        let mut writable = Vec::new();
        for &len in &in_split {
            let idx = pieces.len();
            let gpa = match layout.addr_override.iter().find(|(p, _)| *p == idx) {
                Some(&(_, g)) => g,
                None => {
                    let p = if layout.span == Some(idx) {
                        Place::Span
                    } else {
                        place
                    };
                    self.mem.alloc(len.max(2) as u64, 8, p)
                }
            };
            pieces.push((gpa, len, true));
            writable.push((gpa, len));
        }
        // Status byte = last byte of the writable stream.
        let status_gpa = writable
            .iter()
            .rev()
            .find(|(_, l)| *l > 0)
            .map(|(g, l)| g + *l as u64 - 1)
            .filter(|g| covered(&self.mem, *g));
        if let Some(g) = status_gpa {
            self.mem.write(g, &[STATUS_UNTOUCHED]);
        }
        let descs: Vec<Desc> = pieces
            .iter()
            .enumerate()
            .map(|(i, &(g, l, w))| {
                let w = w ^ layout.flip.contains(&i);
                if w { Desc::w(g, l) } else { Desc::r(g, l) }
            })
            .collect();
        let head = if layout.indirect {
            let (tg, tl) = self.indirect_table(&descs);
            self.add_chain(q, &[Desc::indirect(tg, tl)])
        } else {
            self.add_chain(q, &descs)
        };
        Pending {
            queue: q,
            head,
            writable,
            status_gpa,
            pieces,
        }
    }

    /// Read back the status byte and device-writable data of a completed request.
    pub fn outcome(&self, p: &Pending, used_len: u32) -> Outcome {
        let mut data = Vec::new();
        for &(g, l) in &p.writable {
            data.extend(self.mem.read_lenient(g, l as usize));
        }
        data.pop();
        Outcome {
            used_len,
            status: p.status_gpa.map(|g| self.mem.read_u8(g)),
            data,
        }
    }

    /// Build, submit and wait for one request.
    #[track_caller]
    pub fn request_with(&mut self, q: usize, req: &BlkReq, layout: &Layout) -> Outcome {
        let p = self.build(q, req, layout);
        self.submit(q, p.head);
        let used = self.wait_head(q, p.head);
        assert_eq!(
            self.queues[q].missed_notifications, 0,
            "queue {q}: a completion was not signalled on the call eventfd"
        );
        let o = self.outcome(&p, used);
        self.mem_reset_if_idle();
        o
    }

    /// Reclaim guest memory when nothing is outstanding on any queue.
    pub fn mem_reset_if_idle(&mut self) {
        if self.queues.iter().all(|q| q.outstanding() == 0) {
            self.mem.reset_alloc();
        }
    }

    #[track_caller]
    pub fn request(&mut self, q: usize, req: &BlkReq) -> Outcome {
        self.request_with(q, req, &Layout::default())
    }

    #[track_caller]
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> Outcome {
        self.request(q, &BlkReq::read(sector, len))
    }

    #[track_caller]
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> Outcome {
        self.request(q, &BlkReq::write(sector, data))
    }

    #[track_caller]
    pub fn flush(&mut self, q: usize) -> Outcome {
        self.request(q, &BlkReq::flush())
    }

    #[track_caller]
    pub fn get_id(&mut self, q: usize) -> Outcome {
        self.request(q, &BlkReq::get_id())
    }

    #[track_caller]
    pub fn discard(&mut self, q: usize, sector: u64, num_sectors: u32) -> Outcome {
        self.request(q, &BlkReq::discard(sector, num_sectors))
    }

    #[track_caller]
    pub fn write_zeroes(
        &mut self,
        q: usize,
        sector: u64,
        num_sectors: u32,
        unmap: bool,
    ) -> Outcome {
        self.request(q, &BlkReq::write_zeroes(sector, num_sectors, unmap))
    }

    /// A well-formed read of `len` bytes on queue `q` must succeed and return `expect`.
    #[track_caller]
    pub fn assert_reads(&mut self, q: usize, sector: u64, expect: &[u8]) {
        let o = self.read(q, sector, expect.len() as u32);
        assert_eq!(o.status, Some(S_OK), "read failed: used_len {}", o.used_len);
        assert_eq!(
            o.used_len,
            expect.len() as u32 + 1,
            "used len of a good read"
        );
        assert!(o.data == expect, "read data differs at sector {sector}");
    }
}

/// True if the descriptor flags say device-writable.
pub fn is_write(flags: u16) -> bool {
    flags & VRING_DESC_F_WRITE != 0
}
