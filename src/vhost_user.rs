//! The vhost-user glue: one [`BlkBackend`] per frontend connection, one worker per virtqueue.
//!
//! Each queue has its own worker state behind its own mutex, taken only by that queue's
//! thread and, when the frontend stops the ring, by the connection thread: no lock on the I/O
//! path is shared between queues.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::Level;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend as _, GuestMemoryMmap,
    GuestMemoryRegion as _,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::blk::SECTOR_SIZE;
use crate::blk::config_space::{self, WCE_OFFSET};
use crate::blk::request::{self, GuestMemory, ParseError, Request, RequestKind};
use crate::engine::{
    self, BufferPages, Completion, EngineParams, IoEngine, IoOp, Rejected, wait_readable,
};
use crate::export::Export;
use crate::guest_log;

/// Guest memory as vhost-user-backend shares it with us.
pub type AtomicGuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Event id of a worker's engine completion eventfd (ids up to `num_queues` are reserved).
fn completion_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

/// A request the engine is working on.
struct InFlight {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    /// Keeps the guest buffers of the operation mapped until it completes.
    mem: Arc<GuestMemory>,
}

/// What every queue worker of one connection shares (read-mostly).
struct DeviceState {
    export: Arc<Export>,
    mem: AtomicGuestMemory,
    event_idx: AtomicBool,
    flush_negotiated: AtomicBool,
}

impl DeviceState {
    /// Writes may complete before they are durable only in writeback mode, and only if the
    /// driver can ask for durability (it negotiated FLUSH).
    fn writeback(&self) -> bool {
        self.export.write_cache.writeback() && self.flush_negotiated.load(Ordering::Relaxed)
    }
}

/// Why a pass over the available ring ended.
enum PassEnd {
    /// No more requests on the ring.
    Drained,
    /// The engine has no room for another request.
    EngineFull,
    /// The ring is not running (never started, or stopped by the frontend).
    Stopped,
}

struct QueueWorker {
    index: usize,
    engine: Box<dyn IoEngine<InFlight>>,
    /// The worker's vring, known from its first event; needed to drain from other threads.
    vring: Option<VringRwLock>,
    /// Reused across passes to avoid an allocation per completion batch.
    completions: Vec<Completion<InFlight>>,
    /// The last pass stopped on a full engine; resume on the next completion.
    throttled: bool,
    /// The daemon is shutting down: take no new requests.
    stopping: bool,
    /// The driver broke the ring (e.g. an avail index beyond its size): take nothing from it
    /// until the frontend stops and restarts it.
    broken: bool,
    /// Current poll window (see [`QueueWorker::adapt_poll_window`]).
    poll_window: Duration,
    /// When this thread last found work, while polling is on: the wait for the next event
    /// (polling, then sleeping) began then.
    idle_since: Option<Instant>,
}

/// The longest a queue thread polls in one go (see [`QueueWorker::poll_for_more`]).
const POLL_SESSION_LIMIT: Duration = Duration::from_millis(2);

/// A queue thread hands what it has popped to the kernel after every this many requests, not
/// once per pass over the ring. A frontend often makes many requests available at once (a
/// whole queue depth when the device completes in batches, as this VM's disk does), and
/// parsing them all before the first reaches the device leaves the device idle meanwhile.
/// Measured through the socket on a written file at QD32 (three rounds each, medians): with
/// one submission per pass 4k random reads ran at 68k IOPS and writes at 78k; submitting
/// every 4 requests, 84k and 102k, for 5-10% more CPU per request; every request, 86k and 96k
/// at 20-30% more CPU; every 8, 81k and 100k.
const SUBMIT_EVERY: usize = 4;

impl QueueWorker {
    fn process_queue(&mut self, dev: &DeviceState, vring: &VringRwLock) {
        if self.stopping {
            return;
        }
        let event_idx = dev.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx && let Err(e) = vring.disable_notification() {
                guest_log!(
                    Level::Warn,
                    "queue {}: cannot disable notifications: {e}",
                    self.index
                );
            }
            match self.pop_requests(dev, vring) {
                PassEnd::Drained => {}
                PassEnd::EngineFull => {
                    // Backpressure: resume when a completion frees a slot.
                    self.throttled = true;
                    break;
                }
                // The frontend stopped the ring (GET_VRING_BASE): what is still on it
                // belongs to the next owner of the ring.
                PassEnd::Stopped => break,
            }
            // With EVENT_IDX, look again after re-enabling notifications: the driver may have
            // added requests without a kick in between.
            if !event_idx || !matches!(vring.enable_notification(), Ok(true)) {
                break;
            }
        }
        self.commit();
        self.signal(vring);
    }

    fn commit(&mut self) {
        if let Err(e) = self.engine.commit() {
            guest_log!(
                Level::Error,
                "queue {}: submitting I/O failed: {e}",
                self.index
            );
        }
    }

    /// Adapts the poll window (`--poll-us`, at most `max`) to how long this thread waited for
    /// the event now being handled, counted from the last work it found (polling included):
    /// a wait the largest window would have covered grows it, a longer one shrinks it (to
    /// nothing, where work never comes that fast, so a slow disk at QD1 costs no spinning).
    fn adapt_poll_window(&mut self, max: Duration) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        let waited = since.elapsed();
        if waited > max {
            self.poll_window /= 2;
            if self.poll_window < max / 16 {
                self.poll_window = Duration::ZERO;
            }
        } else if waited > self.poll_window {
            self.poll_window = (self.poll_window * 2).clamp(max / 16, max);
        }
    }

    /// Busy-polls the ring and the engine for the current window after the last work found,
    /// so that a queue that stays busy is served without a wake-up per kick. A session never
    /// lasts longer than [`POLL_SESSION_LIMIT`]: a guest that keeps the queue busy must not
    /// keep this worker's lock from a stop (quiesce, drain) that waits for it. Returns when
    /// the last work was found.
    fn poll_for_more(&mut self, dev: &DeviceState, vring: &VringRwLock) -> Instant {
        let window = self.poll_window;
        let start = Instant::now();
        let mut last_work = start;
        let mut deadline = start + window;
        let session_end = start + POLL_SESSION_LIMIT;
        loop {
            let now = Instant::now();
            if self.stopping || self.broken || now >= deadline || now >= session_end {
                return last_work;
            }
            let mut found =
                self.engine.in_flight() > 0 && self.process_completions(dev, vring, true) > 0;
            if !self.throttled && self.avail_pending(dev, vring) {
                self.process_queue(dev, vring);
                found = true;
            }
            if found {
                last_work = Instant::now();
                deadline = last_work + window;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn avail_pending(&self, dev: &DeviceState, vring: &VringRwLock) -> bool {
        let mem = dev.mem.memory();
        let state = vring.get_ref();
        let q = state.get_queue();
        q.ready()
            && q.avail_idx(&*mem, Ordering::Acquire)
                .is_ok_and(|i| i.0 != q.next_avail())
    }

    /// Pops and starts requests while the engine has room and the ring runs.
    fn pop_requests(&mut self, dev: &DeviceState, vring: &VringRwLock) -> PassEnd {
        let mem = dev.mem.memory().into_inner();
        let mut uncommitted = 0;
        while self.engine.free_slots() > 0 {
            if uncommitted == SUBMIT_EVERY {
                // What was popped so far goes to the kernel now: see SUBMIT_EVERY.
                self.commit();
                uncommitted = 0;
            }
            let chain = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                if !queue.ready() || self.broken {
                    return PassEnd::Stopped;
                }
                // Not `pop_descriptor_chain`: it logs every failure itself, unlimited, and
                // its failures (an avail index the guest set beyond the ring, a ring outside
                // guest memory) repeat on every kick.
                match queue.iter(mem.clone()) {
                    Ok(mut avail) => avail.next(),
                    Err(e) => {
                        guest_log!(
                            Level::Warn,
                            "queue {}: cannot read the available ring ({e}); the queue stops until the frontend sets it up again",
                            self.index
                        );
                        self.broken = true;
                        return PassEnd::Stopped;
                    }
                }
            };
            let Some(chain) = chain else {
                return PassEnd::Drained;
            };
            uncommitted += 1;
            let head = chain.head_index();
            match request::parse(chain, &mem, &dev.export.disk) {
                Ok(req) => self.start(dev, vring, head, req),
                Err(ParseError::Rejected { status, error }) => {
                    let level = if error.status() == VIRTIO_BLK_S_IOERR as u8 {
                        Level::Warn
                    } else {
                        Level::Debug
                    };
                    guest_log!(
                        level,
                        "queue {}: request {head} refused: {error}",
                        self.index
                    );
                    request::write_status(&mem, status, error.status());
                    self.add_used(vring, head, 1);
                }
                Err(ParseError::Unanswerable(why)) => {
                    guest_log!(
                        Level::Warn,
                        "queue {}: request {head} returned unanswered: {why}",
                        self.index
                    );
                    self.add_used(vring, head, 0);
                }
            }
        }
        PassEnd::EngineFull
    }

    fn start(&mut self, dev: &DeviceState, vring: &VringRwLock, head: u16, req: Request) {
        let Request {
            kind,
            status,
            used_len,
            mem,
        } = req;
        let token = InFlight {
            head,
            status,
            used_len,
            mem,
        };
        let durable = !dev.writeback();
        let op = match kind {
            RequestKind::Read { sector, bufs } => IoOp::Read {
                offset: sector * SECTOR_SIZE,
                bufs,
            },
            RequestKind::Write { sector, bufs } => IoOp::Write {
                offset: sector * SECTOR_SIZE,
                bufs,
                durable,
            },
            RequestKind::Flush => IoOp::Flush,
            RequestKind::Discard { sector, sectors } => IoOp::Discard {
                offset: sector * SECTOR_SIZE,
                len: u64::from(sectors) * SECTOR_SIZE,
            },
            RequestKind::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => IoOp::WriteZeroes {
                offset: sector * SECTOR_SIZE,
                len: u64::from(sectors) * SECTOR_SIZE,
                unmap,
                durable,
            },
            RequestKind::GetId { dest } => {
                let ok = request::write_serial(&token.mem, &dest, &dev.export.disk.serial);
                let status = if ok {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                self.finish(vring, token, status as u8);
                return;
            }
        };
        if let Err(Rejected { token, error }) = self.engine.submit(op, token) {
            // Room was checked before popping, so this is a real failure, not backpressure.
            guest_log!(
                Level::Error,
                "queue {}: cannot start I/O: {error}",
                self.index
            );
            self.finish(vring, token, VIRTIO_BLK_S_IOERR as u8);
        }
    }

    /// Completes finished I/O; resumes popping if the last pass was throttled and `resume`.
    /// Finishes what the engine completed; returns how many. With nothing finished there is
    /// nothing to signal and no slot to resume on.
    fn process_completions(
        &mut self,
        dev: &DeviceState,
        vring: &VringRwLock,
        resume: bool,
    ) -> usize {
        let mut done = std::mem::take(&mut self.completions);
        self.engine.reap(&mut done);
        let finished = done.len();
        if finished == 0 {
            self.completions = done;
            return 0;
        }
        for c in done.drain(..) {
            let status = match c.result {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(e) => {
                    guest_log!(
                        Level::Error,
                        "queue {}: I/O error on {}: {e}",
                        self.index,
                        dev.export.backing.path().display()
                    );
                    VIRTIO_BLK_S_IOERR
                }
            };
            self.finish(vring, c.token, status as u8);
        }
        self.completions = done;
        if resume && self.throttled {
            self.throttled = false;
            self.process_queue(dev, vring);
        } else {
            self.signal(vring);
        }
        finished
    }

    /// Finishes a request: status byte, then the used ring. Every request ends here, except
    /// unanswerable chains, which have no status byte.
    fn finish(&mut self, vring: &VringRwLock, token: InFlight, status: u8) {
        request::write_status(&token.mem, token.status, status);
        let len = if status == VIRTIO_BLK_S_OK as u8 {
            token.used_len
        } else {
            1
        };
        self.add_used(vring, token.head, len);
    }

    fn add_used(&self, vring: &VringRwLock, head: u16, len: u32) {
        if let Err(e) = vring.add_used(head, len) {
            guest_log!(
                Level::Warn,
                "queue {}: cannot return request {head}: {e}",
                self.index
            );
        }
    }

    fn signal(&self, vring: &VringRwLock) {
        match vring.needs_notification() {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = vring.signal_used_queue() {
                    guest_log!(
                        Level::Warn,
                        "queue {}: cannot notify the guest: {e}",
                        self.index
                    );
                }
            }
        }
    }

    /// Waits until every request this worker started has reached the used ring.
    fn drain(&mut self, dev: &DeviceState) {
        let Some(vring) = self.vring.clone() else {
            return;
        };
        let pending = self.engine.in_flight();
        if pending > 0 {
            log::info!(
                "queue {}: finishing {pending} in-flight requests",
                self.index
            );
        }
        let mut waited_s = 0;
        while self.engine.in_flight() > 0 {
            match wait_readable(self.engine.completion_fd(), 1000) {
                Ok(true) => {
                    self.process_completions(dev, &vring, false);
                }
                Ok(false) => {
                    waited_s += 1;
                    if waited_s % 10 == 0 {
                        log::warn!(
                            "queue {}: still waiting for {} requests after {waited_s} s",
                            self.index,
                            self.engine.in_flight()
                        );
                    }
                }
                Err(e) => {
                    log::error!("queue {}: cannot wait for completions: {e}", self.index);
                    return;
                }
            }
        }
    }
}

/// The device as one vhost-user connection sees it.
pub struct BlkBackend {
    dev: DeviceState,
    workers: Vec<Mutex<QueueWorker>>,
    /// Where guest RAM is in huge pages, for the engines' huge-page bouncing (None: off).
    guest_pages: Option<Arc<BufferPages>>,
}

fn lock(w: &Mutex<QueueWorker>) -> MutexGuard<'_, QueueWorker> {
    // Worker code does not panic on guest input; if it ever did, the state behind the lock is
    // still a valid set of in-flight requests.
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where guest RAM lies in hugetlbfs mappings (a memfd with MFD_HUGETLB, or a file on a
/// hugetlbfs mount), as host address ranges: large guest buffers there are physically
/// contiguous already. Other regions (a frontend's own rings, say) may be in small pages.
fn guest_ram_in_huge_pages(mem: &GuestMemoryMmap<()>) -> Vec<std::ops::Range<usize>> {
    mem.iter()
        .filter(|r| {
            r.file_offset()
                .is_some_and(|f| crate::probe::on_hugetlbfs(f.file()))
        })
        .map(|r| {
            let start = r.as_ptr() as usize;
            start..start.saturating_add(r.size())
        })
        .collect()
}

impl BlkBackend {
    /// Backend state for a new connection to `export`, with fresh guest memory and engines.
    pub fn new(export: Arc<Export>) -> io::Result<Self> {
        let queues = usize::from(export.disk.num_queues);
        let guest_pages = (export.huge_bounce && export.backing.direct())
            .then(|| Arc::new(BufferPages::default()));
        let mut workers = Vec::with_capacity(queues);
        for index in 0..queues {
            let engine = engine::create(
                export.engine,
                export.backing.clone(),
                EngineParams {
                    queue_depth: usize::from(export.disk.queue_size),
                    io_threads: export.io_threads,
                    huge_bounce: guest_pages.clone(),
                },
            )
            .map_err(io::Error::other)?;
            workers.push(Mutex::new(QueueWorker {
                index,
                engine,
                vring: None,
                completions: Vec::new(),
                throttled: false,
                stopping: false,
                broken: false,
                poll_window: export.poll,
                idle_since: None,
            }));
        }
        Ok(BlkBackend {
            dev: DeviceState {
                export,
                mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                event_idx: AtomicBool::new(false),
                flush_negotiated: AtomicBool::new(false),
            },
            workers,
            guest_pages,
        })
    }

    /// The guest memory handle to give to the vhost-user daemon.
    pub fn memory(&self) -> AtomicGuestMemory {
        self.dev.mem.clone()
    }

    /// (worker index, completion eventfd, event id) to register with each worker's epoll.
    pub fn completion_sources(&self) -> Vec<(usize, RawFd, u16)> {
        let id = completion_event(self.workers.len());
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| (i, lock(w).engine.completion_fd(), id))
            .collect()
    }

    /// Stops taking requests and waits until every started one reached the guest.
    pub fn quiesce(&self) {
        for w in &self.workers {
            let mut w = lock(w);
            w.stopping = true;
            w.drain(&self.dev);
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.export.disk.queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.export.disk.virtio_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.dev
            .flush_negotiated
            .store(features & (1 << VIRTIO_BLK_F_FLUSH) != 0, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.dev.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = config_space::render(
            &self.dev.export.disk,
            self.dev.export.write_cache.writeback(),
        );
        config_space::read_window(&config, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset as usize == WCE_OFFSET && buf.len() == 1 {
            let writeback = buf[0] != 0;
            guest_log!(
                Level::Info,
                "guest switched the write cache to {}",
                if writeback {
                    "writeback"
                } else {
                    "writethrough"
                }
            );
            self.dev.export.write_cache.set_writeback(writeback);
        } else {
            // Refusing with an error would end the connection; the field is read-only.
            guest_log!(
                Level::Warn,
                "ignoring a write to read-only config bytes {offset}..+{}",
                buf.len()
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: AtomicGuestMemory) -> io::Result<()> {
        // `dev.mem` is a clone of the same atomic handle; in-flight requests keep their own
        // snapshot of the old map alive.
        if let Some(pages) = &self.guest_pages {
            let huge = guest_ram_in_huge_pages(&mem.memory());
            if huge.is_empty() != pages.huge_ranges_empty() {
                // Rate-limited: a frontend may send memory tables as often as it likes.
                guest_log!(
                    Level::Info,
                    "guest RAM is {}in huge pages: large transfers from there go {}",
                    if huge.is_empty() { "no longer " } else { "" },
                    if huge.is_empty() {
                        "through huge-page bounce buffers"
                    } else {
                        "straight to the backing"
                    }
                );
            }
            pages.set_huge_ranges(huge);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(w) = self.workers.get(queue_index as usize) {
            let mut w = lock(w);
            w.drain(&self.dev);
            // A restarted ring gets a fresh chance.
            w.broken = false;
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: it would end this queue's thread for good.
        let (Some(worker), Some(vring)) = (self.workers.get(thread_id), vrings.first()) else {
            return Ok(());
        };
        let mut w = lock(worker);
        if w.vring.is_none() {
            w.vring = Some(vring.clone());
        }
        if device_event == completion_event(self.workers.len()) {
            w.process_completions(&self.dev, vring, true);
        } else {
            w.process_queue(&self.dev, vring);
        }
        let poll = self.dev.export.poll;
        if !poll.is_zero() {
            w.adapt_poll_window(poll);
            let last_work = w.poll_for_more(&self.dev, vring);
            w.idle_since = Some(last_work);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::Backing;
    use crate::export::ExportConfig;
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const HEADERS: u64 = 0x4000;
    const DATA: u64 = 0x10000;
    const RING: u16 = 64;

    /// An engine that finishes nothing and records how many operations each commit hands on.
    struct CommitRecorder {
        fd: EventFd,
        queued: usize,
        commits: Arc<Mutex<Vec<usize>>>,
        in_flight: usize,
    }

    impl IoEngine<InFlight> for CommitRecorder {
        fn name(&self) -> &'static str {
            "commit-recorder"
        }
        fn free_slots(&self) -> usize {
            usize::from(RING) - self.in_flight
        }
        fn submit(&mut self, _op: IoOp, _token: InFlight) -> Result<(), Rejected<InFlight>> {
            self.queued += 1;
            self.in_flight += 1;
            Ok(())
        }
        fn commit(&mut self) -> Result<(), engine::EngineError> {
            lock_commits(&self.commits).push(std::mem::take(&mut self.queued));
            Ok(())
        }
        fn completion_fd(&self) -> RawFd {
            use std::os::unix::io::AsRawFd;
            self.fd.as_raw_fd()
        }
        fn reap(&mut self, _out: &mut Vec<Completion<InFlight>>) {}
        fn in_flight(&self) -> usize {
            self.in_flight
        }
    }

    fn lock_commits(c: &Mutex<Vec<usize>>) -> MutexGuard<'_, Vec<usize>> {
        c.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn device() -> DeviceState {
        let cfg = ExportConfig {
            path: "null".into(),
            create_size: None,
            read_only: false,
            queues: 1,
            queue_size: RING,
            serial: None,
            logical_block_size: None,
            writeback: true,
            io_threads: 1,
            poll: Duration::ZERO,
            huge_bounce: false,
            engine: engine::EngineKind::Null,
            direct: false,
        };
        let export = Export::with_backing(Backing::null(64 << 20).unwrap(), &cfg).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        DeviceState {
            export: Arc::new(export),
            mem: GuestMemoryAtomic::new(mem),
            event_idx: AtomicBool::new(false),
            flush_negotiated: AtomicBool::new(false),
        }
    }

    /// Puts `n` 4 KiB reads on a split ring in guest memory, as a driver would.
    fn ring_with_reads(dev: &DeviceState, n: u16) -> VringRwLock {
        let mem = dev.mem.memory();
        for i in 0..n {
            let header = HEADERS + u64::from(i) * 16;
            mem.write_obj(0u32, GuestAddress(header)).unwrap(); // VIRTIO_BLK_T_IN
            mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
            mem.write_obj(u64::from(i) * 8, GuestAddress(header + 8))
                .unwrap();
            let descs = [
                (header, 16, 1u16, 3 * i + 1),                    // header, NEXT
                (DATA + u64::from(i) * 4096, 4096, 3, 3 * i + 2), // data, NEXT | WRITE
                (DATA + 0x8_0000 + u64::from(i), 1, 2, 0),        // status, WRITE
            ];
            for (k, (addr, len, flags, next)) in descs.into_iter().enumerate() {
                let at = DESC + (u64::from(3 * i) + k as u64) * 16;
                mem.write_obj(addr, GuestAddress(at)).unwrap();
                mem.write_obj(len as u32, GuestAddress(at + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                mem.write_obj(next, GuestAddress(at + 14)).unwrap();
            }
            mem.write_obj(3 * i, GuestAddress(AVAIL + 4 + u64::from(i) * 2))
                .unwrap();
        }
        mem.write_obj(n, GuestAddress(AVAIL + 2)).unwrap();
        let vring = VringRwLock::new(dev.mem.clone(), 256).unwrap();
        vring.set_queue_size(256);
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// A pass over a ring holding many requests hands them to the kernel in groups of
    /// SUBMIT_EVERY, not all at the end: the device starts on the first while the rest are
    /// parsed.
    #[test]
    fn a_pass_submits_every_few_requests_not_once_at_the_end() {
        let dev = device();
        let vring = ring_with_reads(&dev, 21);
        let commits = Arc::new(Mutex::new(Vec::new()));
        let mut worker = QueueWorker {
            index: 0,
            engine: Box::new(CommitRecorder {
                fd: EventFd::new(EFD_NONBLOCK).unwrap(),
                queued: 0,
                commits: commits.clone(),
                in_flight: 0,
            }),
            vring: None,
            completions: Vec::new(),
            throttled: false,
            stopping: false,
            broken: false,
            poll_window: Duration::ZERO,
            idle_since: None,
        };
        worker.process_queue(&dev, &vring);
        assert_eq!(
            worker.engine.in_flight(),
            21,
            "not every request was started"
        );
        let sizes: Vec<usize> = lock_commits(&commits)
            .iter()
            .copied()
            .filter(|&n| n > 0)
            .collect();
        assert_eq!(sizes, [4, 4, 4, 4, 4, 1], "operations per commit");
    }
}
