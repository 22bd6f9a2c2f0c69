//! External engines (docs/engines.md): processes that map a client's shadow, its mirror's
//! page table and its event-read epoch read-only, keep their own TLB, and acknowledge TLB
//! flushes themselves through a ring in shared memory.
//!
//! The daemon's side of each shared object lives here: the [`EpochPage`], a mirror's
//! [`SharedPt`], and an engine's flush ring ([`ExternalEngine`]). Layouts are
//! `memshadow_proto::engine_abi`'s.
//!
//! **Ordering, page-table words.** The daemon stores a word (release) only after it copied
//! the page into the slot, so an engine that loads the word (acquire) sees the copy. It
//! clears a word (release) in the start pass, under the device lock, before it queues the
//! flush that tells engines to drop cached translations of that page.
//!
//! **Ordering, flushes (G2).** A slot zapped by a start pass is freed only after every
//! engine that may have cached its translation acknowledged a flush queued after the zap,
//! or was evicted, or went away. An engine acknowledges only between its accesses, so a
//! slot cannot be reused under an access in progress. Waiting is a futex wait on the
//! acknowledgement word (the engine wakes it), bounded by `engine_ack_timeout`; an engine
//! that misses it is evicted: it is no longer waited for, and it may then see stale or
//! reused bytes **of the same client**, never another's (its shadow mapping is that
//! client's only); user space cannot take a mapping away from another process.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use memshadow_proto::engine_abi::{
    self as abi, EpochPage as EpochAbi, PtHeader, RingEntry, RingHeader, HEADER_BYTES, RING_ENTRIES,
};

use crate::sys::doorbell::Doorbell;
use crate::sys::{self, PAGE_SIZE};

/// Errors of making an engine's shared objects.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// A memory file or doorbell could not be made, mapped or reopened read-only.
    #[error("cannot make the engine's shared memory")]
    Create(#[source] std::io::Error),
}

fn create(e: impl Into<std::io::Error>) -> ExternalError {
    ExternalError::Create(e.into())
}

/// A memory file the daemon maps read-write (sealed against resizing, mode 0400).
#[derive(Debug)]
pub(crate) struct SharedMem {
    file: File,
    map: MmapRaw,
}

impl SharedMem {
    /// A new file of `len` bytes, zero-filled, mapped.
    pub(crate) fn new(name: &str, len: u64) -> Result<SharedMem, ExternalError> {
        let file = sys::memfd_sealed(name, len).map_err(create)?;
        let map = MmapOptions::new()
            .len(usize::try_from(len).map_err(|_| create(std::io::ErrorKind::InvalidInput))?)
            .map_raw(&file)
            .map_err(create)?;
        Ok(SharedMem { file, map })
    }

    /// The memory file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Stores a header word (before the memory is handed out).
    pub(crate) fn put32(&self, off: usize, v: u32) {
        self.at::<std::sync::atomic::AtomicU32>(off)
            .store(v, Ordering::Relaxed);
    }

    /// Stores a header word (before the memory is handed out).
    fn put64(&self, off: usize, v: u64) {
        self.at::<AtomicU64>(off).store(v, Ordering::Relaxed);
    }

    /// The object of type `T` at byte `off`.
    pub(crate) fn at<T>(&self, off: usize) -> &T {
        assert!(
            off + std::mem::size_of::<T>() <= self.map.len(),
            "beyond the mapping"
        );
        assert!(off % std::mem::align_of::<T>() == 0, "misaligned");
        let ptr = self.map.as_ptr().wrapping_add(off).cast::<T>();
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as `self`;
        // every `T` used here is made of atomics and plain integers, for which the bytes of
        // a zero-filled file (or any bytes an engine wrote) are a valid value, and which are
        // only accessed atomically where another process may write them.
        unsafe { &*ptr }
    }
}

/// Opens `file` again, read-only: the kernel then refuses a writable shared mapping of the
/// fd handed out (and an `mprotect` that would add write).
pub fn read_only(file: &File) -> Result<OwnedFd, ExternalError> {
    sys::reopen_read_only(file.as_fd()).map_err(create)
}

/// The event-read epoch of one client (docs/engines.md). The event reader makes it odd
/// before it reads the client's userfaultfd, and even again once the start passes of
/// every event read have cleared their page-table words and queued their flushes.
///
/// Why this gives G1 to an engine that never queues behind the event reader: a client's
/// `munmap` (or `madvise`, `mremap`) cannot return before the daemon read its event, and
/// the odd store comes before that `read()`. So an engine access that begins after the
/// client's call returned loads either the odd value (and waits) or a later even one, whose
/// release store comes after the words were cleared and the flushes queued: its acquire
/// load sees both, and its own TLB is flushed by the ring before it translates. An access
/// that began earlier and sees the epoch change under it retries.
#[derive(Debug)]
pub struct EpochPage {
    mem: SharedMem,
}

impl EpochPage {
    /// A fresh page, even (zero).
    pub fn new() -> Result<EpochPage, ExternalError> {
        let mem = SharedMem::new("memshadow-epoch", PAGE_SIZE as u64)?;
        mem.put32(0, abi::EPOCH_MAGIC);
        mem.put32(4, abi::ENGINE_ABI_VERSION);
        Ok(EpochPage { mem })
    }

    fn header(&self) -> &EpochAbi {
        self.mem.at(0)
    }

    /// Makes the epoch odd: call before reading the client's events.
    pub fn begin_read(&self) {
        self.header().epoch.fetch_add(1, Ordering::SeqCst);
        // The odd value must be visible before the read() that lets the client go on.
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Makes the epoch even: call once the start passes of the events read are done.
    pub fn end_read(&self) {
        self.header().epoch.fetch_add(1, Ordering::Release);
    }

    /// The current value (tests).
    pub fn value(&self) -> u64 {
        self.header().epoch.load(Ordering::Acquire)
    }

    /// The page's memory file.
    pub fn file(&self) -> &File {
        self.mem.file()
    }
}

/// A mirror's page table as engines see it: one word per page of the mirror, mirroring the
/// daemon's page-table entries for those pages (whichever mirror of the client installed
/// them), written only under the client's device lock.
#[derive(Debug)]
pub struct SharedPt {
    mem: SharedMem,
    first_vpn: u64,
    pages: u64,
}

impl SharedPt {
    /// The table of the mirror over `addr..addr+len` (page aligned), all words clear.
    pub fn new(addr: u64, len: u64) -> Result<SharedPt, ExternalError> {
        let pages = len / PAGE_SIZE as u64;
        let mem = SharedMem::new("memshadow-pt", abi::pt_bytes(pages))?;
        mem.put32(std::mem::offset_of!(PtHeader, magic), abi::PT_MAGIC);
        mem.put32(
            std::mem::offset_of!(PtHeader, version),
            abi::ENGINE_ABI_VERSION,
        );
        mem.put64(std::mem::offset_of!(PtHeader, addr), addr);
        mem.put64(std::mem::offset_of!(PtHeader, pages), pages);
        mem.put64(std::mem::offset_of!(PtHeader, page_size), PAGE_SIZE as u64);
        Ok(SharedPt {
            mem,
            first_vpn: addr / PAGE_SIZE as u64,
            pages,
        })
    }

    fn word(&self, vpn: u64) -> Option<&AtomicU64> {
        let i = vpn.checked_sub(self.first_vpn)?;
        (i < self.pages).then(|| self.mem.at(HEADER_BYTES + i as usize * 8))
    }

    /// Publishes page `vpn` in `slot` (its copy is complete).
    pub fn set(&self, vpn: u64, slot: u32, gen: u32) {
        if let Some(w) = self.word(vpn) {
            w.store(abi::pte_word(slot, gen), Ordering::Release);
        }
    }

    /// Clears page `vpn`.
    pub fn clear(&self, vpn: u64) {
        if let Some(w) = self.word(vpn) {
            w.store(0, Ordering::Release);
        }
    }

    /// The raw word of `vpn` (tests).
    pub fn get(&self, vpn: u64) -> Option<u64> {
        self.word(vpn).map(|w| w.load(Ordering::Acquire))
    }

    /// The table's memory file.
    pub fn file(&self) -> &File {
        &self.mem.file
    }

    /// Virtual pages `first..=last` the table covers.
    pub fn vpns(&self) -> (u64, u64) {
        (self.first_vpn, self.first_vpn + self.pages - 1)
    }
}

/// Counters of one external engine.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Flush requests queued (range requests and flush-alls).
    pub flushes: AtomicU64,
    /// Flush-all requests queued because the ring was full.
    pub overflows: AtomicU64,
    /// Acknowledgements waited for.
    pub acks: AtomicU64,
    /// Sum of acknowledgement waits, ns.
    pub ack_wait_ns: AtomicU64,
    /// Device faults served.
    pub faults: AtomicU64,
    /// Device writes made.
    pub writes: AtomicU64,
}

/// How an acknowledgement wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// The engine acknowledged.
    Yes,
    /// The engine is gone or evicted: nothing to wait for.
    Gone,
    /// It did not acknowledge in time and is now evicted.
    Evicted,
}

/// One external engine, as the daemon sees it: its ring, doorbell and state.
#[derive(Debug)]
pub struct ExternalEngine {
    id: u32,
    pid: i32,
    /// The client virtual pages of its mirror.
    vpns: (u64, u64),
    ring: SharedMem,
    doorbell: Doorbell,
    /// Last sequence number queued (the ring's `head`, kept here too).
    seq: AtomicU64,
    /// Requests queued whose doorbell is not rung yet ([`ExternalEngine::push`] deferred).
    unrung: AtomicBool,
    gone: AtomicBool,
    counters: EngineCounters,
    /// Acknowledgement latencies, µs, for p50/p99 (bounded ring of samples).
    samples: std::sync::Mutex<Vec<u32>>,
    sample_at: AtomicUsize,
}

/// Samples of acknowledgement latency kept per engine.
const SAMPLES: usize = 1024;

impl ExternalEngine {
    /// A new engine `id` of process `pid` over a mirror's virtual pages `vpns`.
    pub fn new(id: u32, pid: i32, vpns: (u64, u64)) -> Result<Self, ExternalError> {
        let ring = SharedMem::new("memshadow-ring", abi::ring_bytes() as u64)?;
        ring.put32(std::mem::offset_of!(RingHeader, magic), abi::RING_MAGIC);
        ring.put32(
            std::mem::offset_of!(RingHeader, version),
            abi::ENGINE_ABI_VERSION,
        );
        ring.put32(std::mem::offset_of!(RingHeader, entries), RING_ENTRIES);
        ring.put32(std::mem::offset_of!(RingHeader, engine_id), id);
        let doorbell = Doorbell::new().map_err(create)?;
        Ok(ExternalEngine {
            id,
            pid,
            vpns,
            ring,
            doorbell,
            seq: AtomicU64::new(0),
            unrung: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            counters: EngineCounters::default(),
            samples: std::sync::Mutex::new(Vec::with_capacity(SAMPLES)),
            sample_at: AtomicUsize::new(0),
        })
    }

    fn header(&self) -> &RingHeader {
        self.ring.at(0)
    }

    fn entry(&self, seq: u64) -> &RingEntry {
        let i = (seq % u64::from(RING_ENTRIES)) as usize;
        self.ring
            .at(HEADER_BYTES + i * std::mem::size_of::<RingEntry>())
    }

    /// The engine's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The engine's process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Its counters.
    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    /// The ring's memory file (handed out read-write: the engine writes its `ack`).
    pub fn ring_file(&self) -> &File {
        &self.ring.file
    }

    /// The doorbell.
    pub fn doorbell(&self) -> BorrowedFd<'_> {
        self.doorbell.reader()
    }

    /// True if the engine may cache translations of virtual pages `first..=last`.
    pub fn overlaps(&self, first: u64, last: u64) -> bool {
        self.vpns.0 <= last && first <= self.vpns.1
    }

    /// True once it was evicted or went away.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// True if it was evicted (rather than having gone by itself).
    pub fn is_evicted(&self) -> bool {
        self.header().evicted.load(Ordering::Acquire) != 0
    }

    /// Last sequence number it acknowledged.
    pub fn acked(&self) -> u64 {
        self.header().ack.load(Ordering::Acquire)
    }

    /// Translations the engine says its TLB holds (its own word: informational only).
    pub fn tlb_entries(&self) -> u64 {
        self.header().tlb.load(Ordering::Relaxed)
    }

    /// Requests queued and not acknowledged.
    pub fn depth(&self) -> u64 {
        self.seq
            .load(Ordering::Acquire)
            .saturating_sub(self.acked())
    }

    /// Queues a flush of virtual pages `first..=last` and rings the doorbell (or, with
    /// `defer`, leaves that to [`ExternalEngine::ring`], once per tree walk, as the built-in
    /// engines' doorbell batching does); never blocks.
    /// A full ring (the engine has not acknowledged the request `RING_ENTRIES` back) turns
    /// into one "flush everything of this client" request. Call under the client's device
    /// lock (which orders the sequence numbers). Returns the sequence number to wait for.
    pub fn push(&self, first: u64, last: u64, defer: bool) -> u64 {
        let seq = self.seq.load(Ordering::Relaxed) + 1;
        let h = self.header();
        if seq - self.acked().min(seq) >= u64::from(RING_ENTRIES) {
            h.flush_all.store(seq, Ordering::Release);
            self.counters.overflows.fetch_add(1, Ordering::Relaxed);
        } else {
            self.entry(seq).write(seq, first, last);
        }
        self.seq.store(seq, Ordering::Release);
        h.head.store(seq, Ordering::Release);
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        if defer {
            self.unrung.store(true, Ordering::Relaxed);
        } else {
            self.ring_now();
        }
        seq
    }

    /// Rings the doorbell if requests were queued with it deferred.
    pub fn ring(&self) {
        if self.unrung.swap(false, Ordering::Relaxed) {
            self.ring_now();
        }
    }

    fn ring_now(&self) {
        // Never blocks (sys::doorbell); the engine reads the ring, not the bytes.
        self.doorbell.ring();
    }

    /// Waits until the engine acknowledged `seq`, it is gone, or `timeout` passed (then it
    /// is evicted). Sleeps on the acknowledgement word's futex; never spins.
    pub fn wait(&self, seq: u64, timeout: Duration) -> Acked {
        let t = Instant::now();
        let deadline = t + timeout;
        let ack = &self.header().ack;
        let out = loop {
            if self.is_gone() {
                break Acked::Gone;
            }
            let a = ack.load(Ordering::Acquire);
            if a >= seq {
                break Acked::Yes;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.evict();
                break Acked::Evicted;
            }
            // Wakes on the engine's FUTEX_WAKE, on `gone` (which wakes it too), or on time.
            sys::futex_wait_shared(ack, a as u32, left);
        };
        self.record(t.elapsed());
        out
    }

    fn record(&self, d: Duration) {
        self.counters.acks.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counters.ack_wait_ns.fetch_add(ns, Ordering::Relaxed);
        let us = u32::try_from(ns / 1000).unwrap_or(u32::MAX);
        let i = self.sample_at.fetch_add(1, Ordering::Relaxed) % SAMPLES;
        let mut s = crate::lock(&self.samples);
        if s.len() < SAMPLES {
            s.push(us);
        } else {
            s[i] = us;
        }
    }

    /// Acknowledgement latency percentiles `(p50, p99)` in µs over the recent samples.
    pub fn ack_latency_us(&self) -> (u32, u32) {
        let mut s = crate::lock(&self.samples).clone();
        if s.is_empty() {
            return (0, 0);
        }
        s.sort_unstable();
        // Nearest rank: the smallest sample with at least q% of the samples at or below it.
        let at = |q: usize| s[(s.len() * q).div_ceil(100).max(1) - 1];
        (at(50), at(99))
    }

    /// Evicts the engine: no flush waits for it any more, and its library sees `evicted`.
    pub fn evict(&self) {
        self.header().evicted.store(1, Ordering::Release);
        self.leave();
    }

    /// The engine went away (its session closed): it counts as having acknowledged
    /// everything.
    pub fn leave(&self) {
        self.gone.store(true, Ordering::Release);
        // Wake any finish waiting on it.
        sys::futex_wake_shared(&self.header().ack);
        self.doorbell.ring();
    }
}

/// Owners of invalidations caused by an engine's own request carry this bit.
const ENGINE_OWNER: u64 = 1 << 63;

/// The owner of an invalidation that engine `id`'s own request (a device write) caused.
pub fn owner(id: u32) -> crate::notifier::Owner {
    crate::notifier::Owner(ENGINE_OWNER | u64::from(id))
}

/// The engine whose request caused an invalidation of `owner`, if one did.
pub fn engine_of(owner: crate::notifier::Owner) -> Option<u32> {
    (owner.0 & ENGINE_OWNER != 0).then_some(owner.0 as u32)
}

/// External engine ids, unique in the daemon's run, above the built-in engines' (which are
/// their index, below [`super::MAX_ENGINES`]).
#[derive(Debug, Default)]
pub struct EngineIds(AtomicU64);

impl EngineIds {
    /// The next id.
    pub fn next(&self) -> u32 {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        u32::try_from(super::MAX_ENGINES as u64 + n).unwrap_or(u32::MAX)
    }
}

/// What a started invalidation must wait for on external engines: a few (engine, sequence)
/// pairs, taken under the device lock.
pub type ExternalFences = Vec<(Arc<ExternalEngine>, u64)>;

/// Waits for every fence, each bounded by `timeout`, and tells `seen` how each wait ended
/// and how long it took; returns how many engines were evicted.
pub fn wait_all(
    fences: &ExternalFences,
    timeout: Duration,
    mut seen: impl FnMut(&ExternalEngine, u64, Acked, Duration),
) -> usize {
    let mut evicted = 0;
    for (e, seq) in fences {
        let t = Instant::now();
        let outcome = e.wait(*seq, timeout);
        if outcome == Acked::Evicted {
            tracing::warn!(
                engine = e.id(),
                pid = e.pid(),
                seq,
                timeout_ms = timeout.as_millis() as u64,
                "external engine did not acknowledge a flush in time; evicted"
            );
            evicted += 1;
        }
        seen(e, *seq, outcome, t.elapsed());
    }
    evicted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_turns_into_flush_all_when_full_and_waits_end() {
        let e = ExternalEngine::new(1, 0, (10, 20)).expect("engine");
        for i in 0..u64::from(RING_ENTRIES) - 1 {
            assert_eq!(e.push(10, 11, false), i + 1);
        }
        assert_eq!(e.header().flush_all.load(Ordering::Relaxed), 0);
        let s = e.push(12, 12, false);
        assert_eq!(
            e.header().flush_all.load(Ordering::Relaxed),
            s,
            "full: flush all"
        );
        assert_eq!(e.counters().overflows.load(Ordering::Relaxed), 1);
        assert_eq!(e.depth(), s);
        e.header().ack.store(s, Ordering::Release);
        assert_eq!(e.wait(s, Duration::from_secs(5)), Acked::Yes);
        let next = e.push(13, 13, false);
        assert_eq!(e.entry(next).read(next), Some((13, 13)));
        assert_eq!(e.wait(next, Duration::from_millis(20)), Acked::Evicted);
        assert!(e.is_evicted() && e.is_gone());
        assert_eq!(e.wait(next + 1, Duration::from_secs(5)), Acked::Gone);
    }

    #[test]
    fn a_waiter_wakes_when_the_engine_acknowledges_from_another_thread() {
        let e = Arc::new(ExternalEngine::new(2, 0, (0, 0)).expect("engine"));
        let s = e.push(0, 0, false);
        let acker = Arc::clone(&e);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            acker.header().ack.store(s, Ordering::Release);
            sys::futex_wake_shared(&acker.header().ack);
        });
        assert_eq!(e.wait(s, Duration::from_secs(30)), Acked::Yes);
        t.join().expect("acker");
    }

    #[test]
    fn page_table_words_and_the_epoch() {
        let pt = SharedPt::new(0x10000, 4 * PAGE_SIZE as u64).expect("pt");
        let vpn = 0x10000 / PAGE_SIZE as u64;
        pt.set(vpn + 1, 7, 3);
        assert_eq!(pt.get(vpn + 1), Some(abi::pte_word(7, 3)));
        assert_eq!(pt.get(vpn + 4), None, "beyond the mirror");
        pt.clear(vpn + 1);
        assert_eq!(pt.get(vpn + 1), Some(0));
        let ep = EpochPage::new().expect("epoch");
        ep.begin_read();
        assert_eq!(ep.value() % 2, 1);
        ep.end_read();
        assert_eq!(ep.value(), 2);
    }
}
