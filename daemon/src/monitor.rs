//! Monitors (docs/monitors.md): notifiers with no shadow, for registration caches. Each has
//! a slot in the client's generation table (shared memory the client maps read-only; a
//! page holds 512 generations); every change of the client's address space that covers a
//! monitor bumps its generation and queues an event for the client. This module knows
//! nothing of sockets or the userfaultfd: the address space registers ranges, keeps the
//! index of its monitors, and calls [`MonitorArea::invalidate`] where it applies events.
//!
//! **The guarantee.** Once the client's `munmap` (or `madvise`, `mremap`) returned, every
//! check that starts afterwards says "invalid". The daemon makes the client's epoch odd
//! before it `read()`s the client's events, and even again (release) only after the batch
//! was applied, so after every generation the events cover was bumped (release). The
//! client's call cannot return before that `read()`. A check loads the epoch (acquire) and
//! waits while it is odd: the value it then sees is the odd one or a later even one, whose
//! release store comes after the bump, so the generation it loads next is the bumped one.
//! One word is read, so no second look at the epoch is needed (an external engine's read,
//! which copies many words, makes one: docs/engines.md).
//!
//! **What no user-space monitor can see.** The kernel reports an unmap to the userfaultfd
//! only after the mapping is gone. Between the two, another thread of the client may map
//! the same address and check a monitor of the old mapping: valid, since the unmapping
//! thread's `munmap` has not returned. docs/monitors.md says what a cache can do about it.
//!
//! **Generations.** A slot's generation only grows: a bump on invalidation and one when
//! the monitor is removed, so a handle of a removed monitor never matches the slot's next
//! owner.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use memshadow_proto::monitor_abi::{
    self as abi, GenHeader, QueueEntry, QueueHeader, HEADER_BYTES, MAX_MONITORS, QUEUE_ENTRIES,
};

use crate::device::external::{self, ExternalError, SharedMem};
use crate::lock;
use crate::notifier::{Event, Range};
use crate::sys::doorbell::Doorbell;

/// Errors of making a client's monitor area.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Its shared memory or doorbell could not be made or reopened read-only.
    #[error("cannot make the monitors' shared memory")]
    Create(#[from] ExternalError),
    /// Every slot of the generation table is taken.
    #[error("this client has {MAX_MONITORS} monitors already")]
    TooMany,
    /// The client's user holds as many monitors as a user may.
    #[error(
        "this user's clients hold {} monitors already",
        crate::device::MONITORS_PER_USER
    )]
    UserQuota,
}

/// Daemon-wide counters of monitors (`memshadowctl stats`, `monitors.*`).
#[derive(Debug)]
pub struct MonitorCounters {
    /// Monitors alive, every client's.
    pub live: AtomicU64,
    /// Clients with monitors set up.
    pub clients: AtomicU64,
    /// Generations bumped by invalidations (and by clients let go).
    pub bumps: AtomicU64,
    /// Events queued.
    pub queued: AtomicU64,
    /// Events dropped on a full queue.
    pub overflows: AtomicU64,
}

/// The counters of every client's monitors.
pub static COUNTERS: MonitorCounters = MonitorCounters {
    live: AtomicU64::new(0),
    clients: AtomicU64::new(0),
    bumps: AtomicU64::new(0),
    queued: AtomicU64::new(0),
    overflows: AtomicU64::new(0),
};

/// `monitors.*` counters.
pub fn snapshot() -> [(&'static str, u64); 5] {
    let c = &COUNTERS;
    [
        ("monitors.live", c.live.load(Ordering::Relaxed)),
        ("monitors.clients", c.clients.load(Ordering::Relaxed)),
        ("monitors.bumps", c.bumps.load(Ordering::Relaxed)),
        ("monitors.events_queued", c.queued.load(Ordering::Relaxed)),
        ("monitors.overflows", c.overflows.load(Ordering::Relaxed)),
    ]
}

/// Which slots are free: never-used ones above `next`, and those given back.
#[derive(Debug, Default)]
struct Slots {
    next: u32,
    free: Vec<u32>,
    live: u32,
}

/// One client's generation table, event queue and doorbell.
#[derive(Debug)]
pub struct MonitorArea {
    gens: SharedMem,
    queue: SharedMem,
    doorbell: Doorbell,
    slots: Mutex<Slots>,
    /// The queue's head, the daemon's own copy (the shared one is the client's to
    /// scribble on, and is only ever written from this); held while an entry is written.
    head: Mutex<u64>,
}

fn create(e: impl Into<std::io::Error>) -> MonitorError {
    MonitorError::Create(ExternalError::Create(e.into()))
}

impl MonitorArea {
    /// A fresh area: every generation 0, the queue empty.
    pub fn new() -> Result<MonitorArea, MonitorError> {
        let gens = SharedMem::new("memshadow-monitors", abi::gen_table_bytes() as u64)?;
        gens.put32(std::mem::offset_of!(GenHeader, magic), abi::GEN_MAGIC);
        let version = abi::MONITOR_ABI_VERSION;
        gens.put32(std::mem::offset_of!(GenHeader, version), version);
        gens.put32(std::mem::offset_of!(GenHeader, slots), MAX_MONITORS);
        let queue = SharedMem::new("memshadow-monitor-queue", abi::queue_bytes() as u64)?;
        queue.put32(std::mem::offset_of!(QueueHeader, magic), abi::QUEUE_MAGIC);
        queue.put32(std::mem::offset_of!(QueueHeader, version), version);
        queue.put32(std::mem::offset_of!(QueueHeader, entries), QUEUE_ENTRIES);
        let doorbell = Doorbell::new().map_err(create)?;
        COUNTERS.clients.fetch_add(1, Ordering::Relaxed);
        Ok(MonitorArea {
            gens,
            queue,
            doorbell,
            slots: Mutex::new(Slots::default()),
            head: Mutex::new(0),
        })
    }

    /// What the client maps: the generation table opened anew read-only, the queue and
    /// the doorbell (the epoch page, the first of the four, is the device client's).
    pub fn share(&self) -> Result<[OwnedFd; 3], MonitorError> {
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(create);
        Ok([
            external::read_only(self.gens.file())?,
            dup(self.queue.file().as_fd())?,
            dup(self.doorbell.reader())?,
        ])
    }

    fn gen(&self, slot: u32) -> &AtomicU64 {
        self.gens.at(HEADER_BYTES + slot as usize * 8)
    }

    fn header(&self) -> &QueueHeader {
        self.queue.at(0)
    }

    fn entry(&self, seq: u64) -> &QueueEntry {
        let i = (seq % u64::from(QUEUE_ENTRIES)) as usize;
        self.queue
            .at(HEADER_BYTES + i * std::mem::size_of::<QueueEntry>())
    }

    /// Takes a free slot: `(slot, its generation now)`.
    pub fn alloc(&self) -> Result<(u32, u64), MonitorError> {
        let mut s = lock(&self.slots);
        let slot = match s.free.pop() {
            Some(slot) => slot,
            None if s.next < MAX_MONITORS => {
                s.next += 1;
                s.next - 1
            }
            None => return Err(MonitorError::TooMany),
        };
        s.live += 1;
        COUNTERS.live.fetch_add(1, Ordering::Relaxed);
        Ok((slot, self.gen(slot).load(Ordering::Acquire)))
    }

    /// Gives `slot` back once no callback of its monitor can run any more: its generation
    /// moves on first, so the old handle never matches the slot's next owner.
    pub fn release(&self, slot: u32) {
        self.gen(slot).fetch_add(1, Ordering::Release);
        let mut s = lock(&self.slots);
        if s.live > 0 {
            s.live -= 1;
            COUNTERS.live.fetch_sub(1, Ordering::Relaxed);
        }
        s.free.push(slot);
    }

    /// Monitors alive.
    #[cfg(test)]
    fn live(&self) -> u32 {
        lock(&self.slots).live
    }

    /// The generation of `slot` now.
    pub fn generation(&self, slot: u32) -> u64 {
        self.gen(slot).load(Ordering::Acquire)
    }

    /// Invalidates monitors: bumps each one's generation, then queues its event (`range`,
    /// the part of it that changed, for `event`). One queue lock for them all, and no more
    /// writing once the queue is full (the rest are counted as overflows): an event that
    /// covers many monitors costs one atomic add each. Dirty-tracking reports leave monitors
    /// alone (the pages stay the same pages); callers pass address-space changes only.
    pub fn invalidate(&self, monitors: impl IntoIterator<Item = (u32, Range)>, event: Event) {
        let mut head = lock(&self.head);
        let mut rang = false;
        for (slot, range) in monitors {
            let gen = self.gen(slot).fetch_add(1, Ordering::Release) + 1;
            COUNTERS.bumps.fetch_add(1, Ordering::Relaxed);
            rang |= self.push(&mut head, slot, gen, event, range);
        }
        if rang {
            self.doorbell.ring();
        }
    }

    /// Queues an event, or counts an overflow if the client has not consumed room for it;
    /// true if the doorbell must ring (the reader had caught up before this entry). The
    /// reader stores its tail and then loads the head (both SeqCst), as this stores the
    /// head and then loads the tail: one of the two sees the other, so no event is left
    /// without a wake.
    fn push(&self, head: &mut u64, slot: u32, gen: u64, event: Event, range: Range) -> bool {
        let h = self.header();
        // The tail is the client's to write: any value is possible, none is trusted beyond
        // deciding whether there is room.
        let tail = h.tail.load(Ordering::SeqCst);
        if tail > *head || *head - tail >= u64::from(QUEUE_ENTRIES) {
            h.overflows.fetch_add(1, Ordering::Release);
            COUNTERS.overflows.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let seq = *head + 1;
        let e = self.entry(seq);
        e.gen.store(gen, Ordering::Relaxed);
        e.start.store(range.start(), Ordering::Relaxed);
        e.end.store(range.start() + range.len(), Ordering::Relaxed);
        e.slot.store(slot, Ordering::Relaxed);
        e.kind.store(kind_code(event), Ordering::Relaxed);
        e.seq.store(seq, Ordering::Release);
        h.head.store(seq, Ordering::SeqCst);
        *head = seq;
        COUNTERS.queued.fetch_add(1, Ordering::Relaxed);
        h.tail.load(Ordering::SeqCst) == seq - 1
    }
}

/// The monitors of a client that is gone are not counted any more.
impl Drop for MonitorArea {
    fn drop(&mut self) {
        let live = lock(&self.slots).live;
        COUNTERS.live.fetch_sub(u64::from(live), Ordering::Relaxed);
        COUNTERS.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The queue's code of an event kind: the wire's `EventKind` code (1 unmap, 2 clear, …),
/// which is the position in [`Event::ALL`] plus one.
pub fn kind_code(e: Event) -> u32 {
    e.index() as u32 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, len: u64) -> Range {
        Range::new(start, len).expect("range")
    }

    #[test]
    fn an_invalidation_bumps_the_generation_and_queues_an_event() {
        let area = MonitorArea::new().expect("area");
        let (slot, gen) = area.alloc().expect("slot");
        area.invalidate([(slot, range(0x11000, 0x3000))], Event::Unmap);
        assert_eq!(area.generation(slot), gen + 1);
        let hd = area.header();
        assert_eq!(hd.head.load(Ordering::Acquire), 1);
        let e = area.entry(1);
        assert_eq!(e.seq.load(Ordering::Acquire), 1);
        assert_eq!(e.slot.load(Ordering::Relaxed), slot);
        assert_eq!(e.gen.load(Ordering::Relaxed), gen + 1);
        assert_eq!(e.start.load(Ordering::Relaxed), 0x11000);
        assert_eq!(e.end.load(Ordering::Relaxed), 0x14000);
        assert_eq!(e.kind.load(Ordering::Relaxed), 1, "unmap");
        area.release(slot);
        assert_eq!(area.generation(slot), gen + 2, "removal moves it on too");
        let (again, g2) = area.alloc().expect("slot");
        assert_eq!((again, g2), (slot, gen + 2), "reused, newer generation");
    }

    #[test]
    fn a_full_queue_counts_overflows_and_a_lying_tail_is_not_trusted() {
        let area = MonitorArea::new().expect("area");
        let r = range(0x1000, 0x1000);
        area.invalidate((0..QUEUE_ENTRIES + 3).map(|_| (0, r)), Event::Clear);
        let h = area.header();
        assert_eq!(h.head.load(Ordering::Acquire), u64::from(QUEUE_ENTRIES));
        assert_eq!(h.overflows.load(Ordering::Acquire), 3);
        // The client consumes everything: room again, and the doorbell rings.
        h.tail.store(u64::from(QUEUE_ENTRIES), Ordering::SeqCst);
        area.doorbell.drain();
        area.invalidate([(0, r)], Event::Clear);
        assert_eq!(h.head.load(Ordering::Acquire), u64::from(QUEUE_ENTRIES) + 1);
        assert_eq!(area.doorbell.drain(), 1, "rung once");
        // A tail beyond the head is garbage: nothing is written. A head scribbled by the
        // client is not the daemon's: the next entry goes where the daemon's head says.
        h.tail.store(u64::MAX, Ordering::SeqCst);
        h.head.store(u64::MAX, Ordering::SeqCst);
        area.invalidate([(0, r)], Event::Clear);
        assert_eq!(h.overflows.load(Ordering::Acquire), 4);
        h.tail.store(u64::from(QUEUE_ENTRIES) + 1, Ordering::SeqCst);
        area.invalidate([(0, r)], Event::Clear);
        assert_eq!(h.head.load(Ordering::Acquire), u64::from(QUEUE_ENTRIES) + 2);
        assert_eq!(area.generation(0), u64::from(QUEUE_ENTRIES) + 6);
    }

    #[test]
    fn queue_kinds_are_the_wire_codes() {
        for e in Event::ALL {
            let wire = crate::server::stream::event_kind(e).code();
            assert_eq!(kind_code(e), u32::from(wire), "{e:?}");
        }
    }

    #[test]
    fn slots_are_bounded() {
        let area = MonitorArea::new().expect("area");
        for _ in 0..MAX_MONITORS {
            area.alloc().expect("slot");
        }
        assert!(matches!(area.alloc(), Err(MonitorError::TooMany)));
        area.release(7);
        assert_eq!(area.alloc().expect("slot").0, 7);
        assert_eq!(area.live(), MAX_MONITORS);
    }
}
