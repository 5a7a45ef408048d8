//! Driver side of a split virtqueue, built by hand in guest memory.
//!
//! Layout inside the queue's 128 KiB area (see `GuestMem::queue_area`):
//! descriptor table at +0, available ring at +0x4000, used ring at +0x5000.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::guest::{GuestMem, Place};

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

pub const MAX_QUEUE_SIZE: u16 = 1024;
const AVAIL_OFF: u64 = 0x4000;
const USED_OFF: u64 = 0x5000;

/// How a descriptor links to the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// NEXT to the following descriptor of the same list; no NEXT on the last one.
    Auto,
    /// Set NEXT and point at this index (table slot, or index in an indirect table).
    To(u16),
    /// No NEXT flag, even if more descriptors follow in the list.
    End,
}

/// A descriptor as a test describes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// WRITE / INDIRECT (NEXT is governed by `link`, but may also be set here explicitly).
    pub flags: u16,
    pub link: Link,
}

impl Desc {
    /// Device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            link: Link::Auto,
        }
    }
    /// Device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE,
            link: Link::Auto,
        }
    }
    /// Descriptor pointing at an indirect table.
    pub fn indirect(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VRING_DESC_F_INDIRECT,
            link: Link::Auto,
        }
    }
    pub fn with_flags(mut self, flags: u16) -> Desc {
        self.flags |= flags;
        self
    }
    pub fn link(mut self, link: Link) -> Desc {
        self.link = link;
        self
    }
}

/// Encode a list of descriptors whose indices are `slots[i]`.
fn encode(descs: &[Desc], slots: &[u16]) -> Vec<(u16, [u8; 16])> {
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (flags, next) = match d.link {
                Link::Auto if i + 1 < descs.len() => (d.flags | VRING_DESC_F_NEXT, slots[i + 1]),
                Link::Auto | Link::End => (d.flags, 0),
                Link::To(n) => (d.flags | VRING_DESC_F_NEXT, n),
            };
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&d.addr.to_le_bytes());
            b[8..12].copy_from_slice(&d.len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            (slots[i], b)
        })
        .collect()
}

/// Write an indirect descriptor table into fresh guest memory; returns (gpa, byte length).
pub fn write_indirect_table(mem: &mut GuestMem, descs: &[Desc]) -> (u64, u32) {
    let len = descs.len() as u64 * 16;
    let gpa = mem.alloc(len.max(16), 16, Place::A);
    let slots: Vec<u16> = (0..descs.len() as u16).collect();
    for (i, b) in encode(descs, &slots) {
        mem.write(gpa + i as u64 * 16, &b);
    }
    (gpa, len as u32)
}

/// Used lengths of the awaited heads, and other completions seen meanwhile.
pub type HeadsDone = (HashMap<u16, u32>, Vec<(u16, u32)>);

pub struct VirtQueue {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    pub event_idx: bool,
    /// Check that completions are signalled on the call eventfd.
    pub strict_notify: bool,
    free: VecDeque<u16>,
    chains: HashMap<u16, Vec<u16>>,
    /// Shadow of avail->idx.
    pub avail_idx: u16,
    /// Next used index we have not consumed yet.
    pub last_used: u16,
    /// Kick the next submission regardless of avail_event (used after a (re)connect).
    pub force_kick: bool,
    /// Completions seen in the used ring that were never signalled.
    pub missed_notifications: u32,
    /// Used entries whose id was not an outstanding head.
    pub bogus_ids: Vec<u32>,
    pub kicks: u64,
    /// Never kick (to leave requests on the ring unnoticed).
    pub suppress_kick: bool,
}

impl VirtQueue {
    pub fn new(mem: &GuestMem, index: usize, size: u16, event_idx: bool) -> VirtQueue {
        assert!(size.is_power_of_two() && size <= MAX_QUEUE_SIZE);
        let base = GuestMem::queue_area(index);
        // Zero the whole ring area.
        mem.fill(base, super::guest::QUEUE_AREA_SIZE as usize, 0);
        VirtQueue {
            index,
            size,
            desc: base,
            avail: base + AVAIL_OFF,
            used: base + USED_OFF,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            event_idx,
            strict_notify: true,
            free: (0..size).collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            force_kick: true,
            missed_notifications: 0,
            bogus_ids: Vec::new(),
            kicks: 0,
            suppress_kick: false,
        }
    }

    /// Start the ring at index `i` (avail idx, used idx and our shadows); the frontend
    /// must pass the same value in SET_VRING_BASE.
    pub fn set_initial_index(&mut self, mem: &GuestMem, i: u16) {
        self.avail_idx = i;
        self.last_used = i;
        mem.write_u16(self.avail + 2, i);
        mem.write_u16(self.used + 2, i);
    }

    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    pub fn outstanding(&self) -> usize {
        self.chains.len()
    }

    /// Reserve `n` descriptor table slots (for hand-linked chains).
    pub fn alloc_slots(&mut self, n: usize) -> Vec<u16> {
        assert!(
            n <= self.free.len(),
            "queue {}: {} descriptors wanted, {} free",
            self.index,
            n,
            self.free.len()
        );
        (0..n).map(|_| self.free.pop_front().unwrap()).collect()
    }

    /// Write descriptors into the given table slots (slot i gets descs[i]); `Link::Auto`
    /// links to slots[i + 1]. The chain is registered under head `slots[0]`, and its slots
    /// are freed when that head comes back in the used ring.
    pub fn write_chain(&mut self, mem: &GuestMem, slots: Vec<u16>, descs: &[Desc]) -> u16 {
        assert_eq!(slots.len(), descs.len());
        assert!(!slots.is_empty());
        for (i, b) in encode(descs, &slots) {
            mem.write(self.desc + i as u64 * 16, &b);
        }
        let head = slots[0];
        self.chains.insert(head, slots);
        head
    }

    /// Allocate slots and write a chain; returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMem, descs: &[Desc]) -> u16 {
        let slots = self.alloc_slots(descs.len());
        self.write_chain(mem, slots, descs)
    }

    fn avail_event_gpa(&self) -> u64 {
        self.used + 4 + 8 * self.size as u64
    }

    fn used_event_gpa(&self) -> u64 {
        self.avail + 4 + 2 * self.size as u64
    }

    /// Put heads on the available ring and notify the device (honouring EVENT_IDX).
    pub fn publish(&mut self, mem: &GuestMem, heads: &[u16]) {
        let old = self.avail_idx;
        for h in heads {
            let slot = self.avail_idx % self.size;
            mem.write_u16(self.avail + 4 + 2 * slot as u64, *h);
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        fence(Ordering::SeqCst);
        mem.write_u16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        let kick = if self.event_idx && !self.force_kick {
            let ev = mem.read_u16(self.avail_event_gpa());
            // vring_need_event(event, new, old)
            self.avail_idx.wrapping_sub(ev).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
        } else {
            true
        };
        if kick && !self.suppress_kick {
            self.kick.write(1).unwrap();
            self.kicks += 1;
            self.force_kick = false;
        }
    }

    pub fn submit(&mut self, mem: &GuestMem, head: u16) {
        self.publish(mem, &[head]);
    }

    fn used_idx(&self, mem: &GuestMem) -> u16 {
        let v = mem.read_u16(self.used + 2);
        fence(Ordering::Acquire);
        v
    }

    /// Consume whatever is in the used ring now, without waiting or notifications.
    pub fn collect_now(&mut self, mem: &GuestMem) -> Vec<(u16, u32)> {
        self.collect(mem)
    }

    fn collect(&mut self, mem: &GuestMem) -> Vec<(u16, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = (self.last_used % self.size) as u64;
            let id = mem.read_u32(self.used + 4 + 8 * slot);
            let len = mem.read_u32(self.used + 4 + 8 * slot + 4);
            self.last_used = self.last_used.wrapping_add(1);
            match u16::try_from(id).ok().and_then(|h| self.chains.remove(&h)) {
                Some(slots) => self.free.extend(slots),
                None => self.bogus_ids.push(id),
            }
            out.push((id as u16, len));
        }
        out
    }

    fn drain_call(&self) -> bool {
        self.call.read().is_ok()
    }

    fn poll_call(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd array of length 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        r > 0 && pfd.revents & libc::POLLIN != 0
    }

    /// Wait (bounded) until at least one used entry is available; returns all available
    /// (id, len) pairs, or an empty vector on timeout.
    pub fn wait_used(&mut self, mem: &GuestMem, timeout: Duration) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.event_idx {
                mem.write_u16(self.used_event_gpa(), self.last_used);
                fence(Ordering::SeqCst);
            }
            // Entries already there when we (re)armed need no notification.
            let got = self.collect(mem);
            if !got.is_empty() {
                self.drain_call();
                return got;
            }
            // Nothing pending: a completion from now on must be signalled.
            loop {
                let now = Instant::now();
                if now >= deadline {
                    // Give a late signal a short grace period, then look at the ring.
                    let signalled = self.poll_call(Duration::from_millis(200));
                    let got = self.collect(mem);
                    if !got.is_empty() && !signalled && self.strict_notify {
                        self.missed_notifications += 1;
                    }
                    self.drain_call();
                    return got;
                }
                if self.poll_call(deadline - now) {
                    self.drain_call();
                    break;
                }
            }
        }
    }

    /// Wait until all `heads` are back in the used ring; returns their used lengths.
    /// Completions of other heads seen meanwhile are returned in `others`.
    pub fn wait_heads(
        &mut self,
        mem: &GuestMem,
        heads: &[u16],
        timeout: Duration,
    ) -> Result<HeadsDone, String> {
        let deadline = Instant::now() + timeout;
        let mut done = HashMap::new();
        let mut others = Vec::new();
        while heads.iter().any(|h| !done.contains_key(h)) {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<u16> = heads
                    .iter()
                    .copied()
                    .filter(|h| !done.contains_key(h))
                    .collect();
                return Err(format!(
                    "queue {}: heads {:?} not completed within {:?} (used idx {}, avail idx {}, missed notifications {})",
                    self.index,
                    missing,
                    timeout,
                    self.used_idx(mem),
                    self.avail_idx,
                    self.missed_notifications
                ));
            }
            for (id, len) in self.wait_used(mem, deadline - now) {
                if heads.contains(&id) && !done.contains_key(&id) {
                    done.insert(id, len);
                } else {
                    others.push((id, len));
                }
            }
        }
        Ok((done, others))
    }

    /// Read avail_event as written by the device (EVENT_IDX).
    pub fn avail_event(&self, mem: &GuestMem) -> u16 {
        mem.read_u16(self.avail_event_gpa())
    }

    pub fn used_index(&self, mem: &GuestMem) -> u16 {
        self.used_idx(mem)
    }
}
