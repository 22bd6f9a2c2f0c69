//! Monitors (protocol 4, docs/monitors.md): "is this buffer still what I registered?" for
//! registration caches, answered from shared memory with no system call.
//!
//! A [`Monitor`] watches a range of this process's memory. The daemon bumps its generation,
//! in a table this process maps read-only, in the start pass of every `munmap`, `mremap`
//! or `madvise(DONTNEED/FREE/REMOVE)` that covers it, and queues an event
//! ([`MonitorEvents`]).
//!
//! **Why a check after an unmapping `free()` returned never says valid.** The daemon makes this
//! process's epoch odd before it reads the process's userfaultfd events, and even again
//! only once the start passes of what it read (the generation bumps) are done. A `munmap`
//! cannot return before the daemon read its event. So a check that starts after the call
//! returned loads the odd epoch (and waits), or an even one stored after the bump: the
//! acquire load of that epoch makes the bump visible to the generation load that follows.
//! That is the whole check: two loads, no system call (the counterpart of
//! `mmu_interval_read_begin` waiting while the subscription's sequence is odd).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use memmap2::MmapRaw;
use memshadow_proto::engine_abi::{EpochPage, ENGINE_ABI_VERSION, EPOCH_MAGIC};
use memshadow_proto::monitor_abi::{
    self as abi, GenHeader, QueueEntry, QueueHeader, MONITOR_ABI_VERSION,
};
use memshadow_proto::{EventKind, Request, Response};

use crate::engine::{check_doorbell, drain, map, wait_odd, EPOCH_BYTES, STUCK_AFTER};
use crate::{unexpected, Error, Inner};

/// The protocol version that brought monitors.
const MONITOR_PROTOCOL: u16 = 4;

/// The shared objects of this session's monitors, mapped once.
#[derive(Debug)]
pub(crate) struct Shared {
    epoch: MmapRaw,
    gens: MmapRaw,
    queue: MmapRaw,
    doorbell: OwnedFd,
    /// The doorbell's open file is `O_NONBLOCK`.
    doorbell_nonblocking: bool,
    /// Serializes consumers of the queue (the tail is one word).
    consumer: Mutex<Consumer>,
    slots: u32,
}

/// What the consumer of the queue remembers.
#[derive(Debug, Default)]
struct Consumer {
    overflows_seen: u64,
}

impl Shared {
    /// Sets up this session's monitors (`MonitorSetup`) and maps what the daemon sent.
    pub(crate) fn open(inner: &Inner) -> Result<Shared, Error> {
        if inner.version < MONITOR_PROTOCOL {
            return Err(Error::Unsupported(format!(
                "monitors need protocol {MONITOR_PROTOCOL}; this daemon speaks {}",
                inner.version
            )));
        }
        let (resp, fds) = inner.call_fds(&Request::MonitorSetup)?;
        let (slots, entries) = match resp {
            Response::MonitorReady {
                slots,
                queue_entries,
            } => (slots, queue_entries),
            r => return Err(unexpected(r)),
        };
        let [epoch, gens, queue, doorbell]: [OwnedFd; abi::MONITOR_FDS] = fds
            .try_into()
            .map_err(|_| Error::Protocol("MonitorReady without its four fds".into()))?;
        if slots != abi::MAX_MONITORS || entries != abi::QUEUE_ENTRIES {
            return Err(Error::Protocol(format!(
                "the daemon's monitor area has {slots} slots and {entries} queue entries; \
                 this library knows {} and {}",
                abi::MAX_MONITORS,
                abi::QUEUE_ENTRIES
            )));
        }
        let doorbell_nonblocking = check_doorbell(&doorbell)?;
        let s = Shared {
            epoch: map(&epoch, "epoch page", EPOCH_BYTES, false)?,
            gens: map(&gens, "generation table", abi::gen_table_bytes(), false)?,
            queue: map(&queue, "monitor queue", abi::queue_bytes(), true)?,
            doorbell,
            doorbell_nonblocking,
            consumer: Mutex::new(Consumer::default()),
            slots,
        };
        s.check_headers()?;
        Ok(s)
    }

    fn check_headers(&self) -> Result<(), Error> {
        let e = self.epoch_page();
        let g = self.gen_header();
        let q = self.queue_header();
        let ok = e.magic == EPOCH_MAGIC
            && e.version == ENGINE_ABI_VERSION
            && g.magic == abi::GEN_MAGIC
            && g.version == MONITOR_ABI_VERSION
            && g.slots == self.slots
            && q.magic == abi::QUEUE_MAGIC
            && q.version == MONITOR_ABI_VERSION
            && q.entries == abi::QUEUE_ENTRIES;
        if !ok {
            return Err(Error::Protocol(
                "the monitor area's headers are not of the monitor ABI this library knows".into(),
            ));
        }
        Ok(())
    }

    fn epoch_page(&self) -> &EpochPage {
        // SAFETY: `epoch` maps EPOCH_BYTES (>= 64) bytes of a file at least that long, page
        // aligned, so an `EpochPage` (64 bytes, align 64) is at its start; any bits are a
        // valid `EpochPage`; the mapping lives as long as `self`; the daemon changes only
        // `epoch`, atomically.
        unsafe { &*self.epoch.as_ptr().cast::<EpochPage>() }
    }

    fn gen_header(&self) -> &GenHeader {
        // SAFETY: `gens` maps gen_table_bytes() >= 64 bytes, page aligned: a `GenHeader`
        // (64 bytes, align 64, plain integers written before the fd was sent) is at its start.
        unsafe { &*self.gens.as_ptr().cast::<GenHeader>() }
    }

    fn generation(&self, slot: u32) -> &AtomicU64 {
        let i = slot.min(self.slots.saturating_sub(1)) as usize;
        let p = self
            .gens
            .as_ptr()
            .wrapping_add(abi::HEADER_BYTES + i * 8)
            .cast::<AtomicU64>();
        // SAFETY: `gens` maps HEADER_BYTES + 8 * MAX_MONITORS bytes, page aligned, and
        // `i < slots == MAX_MONITORS` (checked at open), so `p` is an aligned word inside
        // the mapping, which lives as long as `self`; any bits are a valid `AtomicU64`, and
        // the daemon writes it only atomically.
        unsafe { &*p }
    }

    fn queue_header(&self) -> &QueueHeader {
        // SAFETY: `queue` maps queue_bytes() >= 64 bytes, page aligned: a `QueueHeader`
        // (64 bytes, align 64; atomics and integers, valid for any bits) is at its start.
        unsafe { &*self.queue.as_ptr().cast::<QueueHeader>() }
    }

    fn entry(&self, seq: u64) -> &QueueEntry {
        let i = (seq % u64::from(abi::QUEUE_ENTRIES)) as usize;
        let p = self
            .queue
            .as_ptr()
            .wrapping_add(abi::HEADER_BYTES + i * std::mem::size_of::<QueueEntry>())
            .cast::<QueueEntry>();
        // SAFETY: `queue` maps HEADER_BYTES + QUEUE_ENTRIES entries (40 bytes, align 8),
        // page aligned, and `i < QUEUE_ENTRIES`; an entry is atomics only, valid for any bits.
        unsafe { &*p }
    }

    /// The generation of `slot` as of now: waits while the epoch is odd (an event of this
    /// process is being read and its start passes have not run yet). `None` if the epoch
    /// stays odd for `STUCK_AFTER` (the daemon seems stuck): no answer can be trusted.
    fn current(&self, slot: u32) -> Option<u64> {
        self.settled()
            .then(|| self.generation(slot).load(Ordering::Acquire))
    }

    /// Waits while the epoch is odd; false if it stays odd for `STUCK_AFTER`. After it
    /// returns true, every bump and queued event of a change that returned before the call
    /// began is visible (the acquire load of the even epoch).
    fn settled(&self) -> bool {
        let (mut spins, mut odd_since) = (0, None);
        loop {
            if self.epoch_page().epoch.load(Ordering::Acquire) & 1 == 0 {
                return true;
            }
            if wait_odd(&mut spins, &mut odd_since, STUCK_AFTER).is_err() {
                return false;
            }
        }
    }
}

/// A watched range of this process's memory ([`crate::Client::monitor`]). Valid until the
/// range is unmapped, moved or discarded; once invalid it stays invalid (make a new one).
/// Dropping it stops it.
#[derive(Debug)]
pub struct Monitor {
    shared: Arc<Shared>,
    inner: Arc<Inner>,
    slot: u32,
    gen: u64,
    addr: u64,
    len: u64,
    removed: bool,
}

impl Monitor {
    pub(crate) fn new(
        inner: &Arc<Inner>,
        shared: &Arc<Shared>,
        ptr: *const u8,
        len: usize,
    ) -> Result<Monitor, Error> {
        let r = inner.call(
            &Request::Monitor {
                addr: ptr as u64,
                len: len as u64,
            },
            &[],
        )?;
        match r {
            Response::Monitored {
                slot,
                gen,
                addr,
                len,
            } if slot < shared.slots => Ok(Monitor {
                shared: Arc::clone(shared),
                inner: Arc::clone(inner),
                slot,
                gen,
                addr,
                len,
                removed: false,
            }),
            r => Err(unexpected(r)),
        }
    }

    /// True while nothing unmapped, moved or discarded any of the range. No system call:
    /// two loads from shared memory (see the module's documentation for why a check that
    /// starts after `munmap` or `free` returned says `false`).
    pub fn is_valid(&self) -> bool {
        self.shared.current(self.slot) == Some(self.gen)
    }

    /// Begins a use of the range, like `mmu_interval_read_begin`: returns the sequence to
    /// hand to [`Monitor::read_retry`] after the use.
    pub fn read_begin(&self) -> u64 {
        self.shared.current(self.slot).unwrap_or(u64::MAX)
    }

    /// True if the use begun at `seq` must be redone, like `mmu_interval_read_retry`: the
    /// range changed since, or the monitor was already invalid.
    pub fn read_retry(&self, seq: u64) -> bool {
        seq != self.gen || self.shared.current(self.slot) != Some(seq)
    }

    /// The watched range: first byte and length (rounded out to pages).
    pub fn range(&self) -> (u64, u64) {
        (self.addr, self.len)
    }

    /// The monitor's slot (what its events name).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The generation it was made with.
    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// Stops the monitor (as dropping it does, but with the daemon's answer).
    pub fn remove(mut self) -> Result<(), Error> {
        self.removed = true;
        self.unmonitor()
    }

    fn unmonitor(&self) -> Result<(), Error> {
        match self.inner.call(
            &Request::Unmonitor {
                slot: self.slot,
                gen: self.gen,
            },
            &[],
        )? {
            Response::Unmonitored => Ok(()),
            r => Err(unexpected(r)),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.unmonitor();
        }
    }
}

/// One event of the queue: monitor `slot` was invalidated (it now has generation `gen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonitorEvent {
    /// The monitor's slot ([`Monitor::slot`]).
    pub slot: u32,
    /// Its generation now.
    pub gen: u64,
    /// Why (`Unmap`, `Clear`, …); `None` for a kind this library does not know.
    pub kind: Option<EventKind>,
    /// The invalidated part of the monitor: first byte.
    pub start: u64,
    /// One past its last byte.
    pub end: u64,
}

/// What [`MonitorEvents::drain`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// Events appended.
    pub events: usize,
    /// Events were lost because the queue was full: re-check every monitor
    /// ([`Monitor::is_valid`]).
    pub overflowed: bool,
}

/// The event queue of this session's monitors ([`crate::Client::monitor_events`]): an
/// doorbell to poll, and the events to drain when it is readable.
#[derive(Debug, Clone)]
pub struct MonitorEvents {
    shared: Arc<Shared>,
}

impl MonitorEvents {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        MonitorEvents {
            shared: Arc::clone(shared),
        }
    }

    /// The doorbell, a pipe's read end: readable when events may wait (for `poll`/`epoll`).
    /// Do not read it; [`MonitorEvents::drain`] does.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.doorbell.as_fd()
    }

    /// Appends the waiting events to `out`, those of every change that returned before the
    /// call among them (it waits, as a check does, while the daemon applies a batch of this
    /// process's events); never waits for anything else.
    pub fn drain(&self, out: &mut Vec<MonitorEvent>) -> Drained {
        let s = &self.shared;
        s.settled();
        let mut c = s.consumer.lock().unwrap_or_else(PoisonError::into_inner);
        // Empty the doorbell first: an event queued after this is rung anew.
        drain(s.doorbell.as_fd(), s.doorbell_nonblocking);
        let h = s.queue_header();
        let mut got = Drained::default();
        let mut tail = h.tail.load(Ordering::Relaxed);
        loop {
            let head = h.head.load(Ordering::SeqCst);
            if head <= tail || head - tail > u64::from(abi::QUEUE_ENTRIES) {
                if head < tail || head - tail > u64::from(abi::QUEUE_ENTRIES) {
                    // Not a state the daemon makes: start over from its head.
                    got.overflowed = true;
                    tail = head;
                    h.tail.store(tail, Ordering::SeqCst);
                }
                break;
            }
            for seq in tail + 1..=head {
                let e = s.entry(seq);
                if e.seq.load(Ordering::Acquire) != seq {
                    got.overflowed = true;
                    continue;
                }
                out.push(MonitorEvent {
                    slot: e.slot.load(Ordering::Relaxed),
                    gen: e.gen.load(Ordering::Relaxed),
                    kind: u8::try_from(e.kind.load(Ordering::Relaxed))
                        .ok()
                        .and_then(EventKind::from_code),
                    start: e.start.load(Ordering::Relaxed),
                    end: e.end.load(Ordering::Relaxed),
                });
                got.events += 1;
            }
            tail = head;
            // Store the tail, then look at the head again: the daemon stores the head and
            // then looks at the tail, so either it rings or this loop sees its entry.
            h.tail.store(tail, Ordering::SeqCst);
        }
        let overflows = h.overflows.load(Ordering::Acquire);
        if overflows != c.overflows_seen {
            c.overflows_seen = overflows;
            got.overflowed = true;
        }
        got
    }

    /// Waits up to `timeout` for the doorbell (poll); true if it rang.
    pub fn wait(&self, timeout: Duration) -> Result<bool, Error> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => Ok(n > 0),
            Err(nix::Error::EINTR) => Ok(false),
            Err(e) => Err(Error::Socket(memshadow_proto::SocketError::Io(e))),
        }
    }
}
