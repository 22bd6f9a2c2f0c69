//! Engines (docs/design.md §4): K workers, each fed by a FIFO `crossbeam-channel` and each with
//! its own TLB. Jobs are TLB flushes, which complete a fence after a modelled device round
//! trip, and device reads; an access queued after a flush is served after that flush has
//! completed.
//!
//! **Timing model.** A flush's round trip starts when it is queued (the doorbell write) and
//! several may be in flight at once, as with a GPU's TLB-invalidation seqnos: a flush queued
//! at `t` completes at `t + latency`. Flushes found waiting together in the queue are
//! coalesced: the device takes them into the oldest one's invalidation, already under way.
//!
//! **Who runs the queue.** Flushes are *issued* (applied to the TLB, in queue order) by
//! whoever holds the engine's lock: the worker thread, or — when the worker is idle — the
//! thread that just queued the flush. Either way the queue is drained strictly in FIFO order
//! under that lock; a read found at the head is handed to the worker. So queuing a flush
//! never needs a cross-CPU wake-up (tens of µs on these VMs), and nobody's wake-up is on the
//! fence's critical path: once its flush is issued, a fence waiter sleeps until the deadline
//! on its own precise timer ([`sys::sleep_until`]). The worker sleeps (parked) when idle and
//! is unparked for reads; it costs no CPU, so K may exceed the number of cores.
//!
//! **Why early issue is safe.** Issuing a flush removes TLB entries; a read that was queued
//! before the flush but is served after it just misses the TLB and walks the page table
//! (which no longer maps the zapped pages). What must never happen is a read queued *after*
//! a flush being served before the flush's round trip ends: the worker waits for every flush
//! issued before a read was queued, and no slot is freed before its fences complete (G2).

use crate::lock;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::client::ClientCore;
use super::counters::{bump, DeviceCounters, Histogram};
use super::pagetable::MirrorIdx;
use super::shadow::SlotRef;
use crate::sys::{self, PAGE_SIZE};

/// Most engines a device may have (fence sets and engine masks are fixed-size).
pub const MAX_ENGINES: usize = 16;

/// What a flush removes from an engine's TLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushScope {
    /// The client's translations of virtual pages `first..=last`.
    Pages {
        /// First virtual page number.
        first: u64,
        /// Last virtual page number (inclusive).
        last: u64,
    },
    /// Every translation of the client.
    All,
}

/// One flush request: a client and what to flush of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushReq {
    /// Client id.
    pub client: u64,
    /// What to flush.
    pub scope: FlushScope,
}

/// What a device read produced.
#[derive(Debug)]
pub enum ReadOutcome {
    /// The bytes.
    Data(Vec<u8>),
    /// Pages with no page-table entry (a device fault); serve them and replay the read.
    Fault(Vec<u64>),
}

/// A device read job.
#[derive(Debug)]
pub struct ReadJob {
    /// Whose address space.
    pub client: Arc<ClientCore>,
    /// First byte.
    pub addr: u64,
    /// Bytes to read.
    pub len: usize,
    /// Where the outcome goes.
    pub reply: Sender<ReadOutcome>,
}

enum Job {
    Flush {
        req: FlushReq,
        seq: u64,
        queued: i64,
    },
    Read(ReadJob),
    Stop,
}

/// The fences a finish waits for: at most one flush sequence per engine, and the earliest
/// time all of them can be complete (latest queue time + latency), until which a waiter
/// simply sleeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fences {
    mask: u32,
    seq: [u64; MAX_ENGINES],
    /// `CLOCK_MONOTONIC` nanoseconds.
    not_before: i64,
}

impl Fences {
    /// Adds engine `engine`'s flush `seq` that cannot complete before `not_before` (ns).
    pub fn add(&mut self, engine: usize, seq: u64, not_before: i64) {
        self.mask |= 1 << engine;
        self.seq[engine] = self.seq[engine].max(seq);
        self.not_before = self.not_before.max(not_before);
    }

    /// True if there is nothing to wait for.
    pub fn is_empty(&self) -> bool {
        self.mask == 0
    }

    /// Number of engines waited for.
    pub fn len(&self) -> u32 {
        self.mask.count_ones()
    }
}

/// A bounded cache of (client, virtual page) → slot, evicting the oldest entry when full,
/// indexed per client so a range flush costs O(log n + hits).
struct Tlb {
    clients: HashMap<u64, BTreeMap<u64, TlbEntry>>,
    order: VecDeque<(u64, u64)>,
    len: usize,
    cap: usize,
}

#[derive(Clone, Copy)]
struct TlbEntry {
    slot: SlotRef,
    mirror: MirrorIdx,
}

impl Tlb {
    fn new(cap: usize) -> Tlb {
        Tlb {
            clients: HashMap::new(),
            order: VecDeque::with_capacity(cap),
            len: 0,
            cap: cap.max(1),
        }
    }

    fn get(&self, client: u64, vpn: u64) -> Option<TlbEntry> {
        self.clients.get(&client)?.get(&vpn).copied()
    }

    fn remove(&mut self, client: u64, vpn: u64) -> bool {
        let Some(m) = self.clients.get_mut(&client) else {
            return false;
        };
        let hit = m.remove(&vpn).is_some();
        if hit {
            self.len -= 1;
            if m.is_empty() {
                self.clients.remove(&client);
            }
        }
        hit
    }

    fn insert(&mut self, client: u64, vpn: u64, e: TlbEntry) {
        while self.len >= self.cap {
            match self.order.pop_front() {
                Some((c, v)) => {
                    self.remove(c, v);
                }
                None => break,
            }
        }
        if self
            .clients
            .entry(client)
            .or_default()
            .insert(vpn, e)
            .is_none()
        {
            self.len += 1;
            self.order.push_back((client, vpn));
        }
        if self.order.len() > 2 * self.cap {
            // Keys of flushed entries linger in `order`; drop them now and then.
            let clients = &self.clients;
            self.order
                .retain(|(c, v)| clients.get(c).is_some_and(|m| m.contains_key(v)));
        }
    }

    fn flush(&mut self, req: &FlushReq) {
        match req.scope {
            FlushScope::All => {
                if let Some(m) = self.clients.remove(&req.client) {
                    self.len -= m.len();
                }
            }
            FlushScope::Pages { first, last } => {
                let Some(m) = self.clients.get_mut(&req.client) else {
                    return;
                };
                let keys: Vec<u64> = m.range(first..=last).map(|(k, _)| *k).collect();
                for k in keys {
                    m.remove(&k);
                    self.len -= 1;
                }
                if m.is_empty() {
                    self.clients.remove(&req.client);
                }
            }
        }
    }
}

/// What the engine lock guards: the TLB, the flushes issued and in flight, and a read taken
/// from the queue by a submitting thread for the worker.
struct EngineState {
    tlb: Tlb,
    /// Highest flush sequence issued.
    issued: u64,
    /// Issued batches still in flight: (last sequence, deadline ns).
    inflight: VecDeque<(u64, i64)>,
    /// A job a submitting thread took from the head of the queue but must leave to the
    /// worker (a read): the worker takes it before anything else in the channel.
    handed: Option<Job>,
    /// Threads waiting for a flush to be issued.
    waiters: u32,
    /// Scratch for coalescing.
    batch: Vec<FlushReq>,
}

/// One engine, as submitters and its worker see it.
struct Engine {
    id: usize,
    tx: Sender<Job>,
    rx: Receiver<Job>,
    state: Mutex<EngineState>,
    issued_cv: Condvar,
    /// Last flush sequence handed out; held while queuing so sequences follow FIFO order.
    submit: Mutex<u64>,
    latency_ns: Arc<AtomicU64>,
    counters: Arc<DeviceCounters>,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

/// What [`Engines::snapshot`] tells of a built-in engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinEngine {
    /// Flush sequence numbers handed out (flushes queued).
    pub queued: u64,
    /// Flushes issued (applied to its TLB).
    pub issued: u64,
    /// Translations in its TLB.
    pub tlb_entries: u64,
}

/// What [`Engine::drain`] stopped at.
enum Drained {
    /// The queue is empty.
    Empty,
    /// A read (or stop) is next; it was left for the worker.
    Handed,
    /// The channel is closed.
    Closed,
}

impl Engine {
    fn lock(&self) -> MutexGuard<'_, EngineState> {
        lock(&self.state)
    }

    fn unpark(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Issues every flush at the head of the queue, in order, coalescing those found
    /// together, until the queue is empty or a non-flush job is next (left in `handed`).
    fn drain(&self, st: &mut EngineState) -> Drained {
        if st.handed.is_some() {
            return Drained::Handed;
        }
        let mut oldest = None;
        let mut last = 0;
        st.batch.clear();
        let outcome = loop {
            match self.rx.try_recv() {
                Ok(Job::Flush { req, seq, queued }) => {
                    st.batch.push(req);
                    oldest.get_or_insert(queued);
                    last = seq;
                }
                Ok(other) => {
                    st.handed = Some(other);
                    break Drained::Handed;
                }
                Err(TryRecvError::Empty) => break Drained::Empty,
                Err(TryRecvError::Disconnected) => break Drained::Closed,
            }
        };
        if let Some(queued) = oldest {
            let batch = std::mem::take(&mut st.batch);
            for req in &batch {
                st.tlb.flush(req);
            }
            bump(&self.counters.flushes_coalesced, batch.len() as u64 - 1);
            bump(&self.counters.flushes_executed, 1);
            st.batch = batch;
            let deadline = queued.saturating_add(self.latency_ns.load(Ordering::Relaxed) as i64);
            st.issued = last;
            st.inflight.push_back((last, deadline));
            if st.waiters > 0 {
                self.issued_cv.notify_all();
            }
        }
        self.retire(st);
        outcome
    }

    /// Forgets batches whose round trip has ended.
    fn retire(&self, st: &mut EngineState) {
        let now = sys::timespec_ns(&sys::monotonic_now());
        while st.inflight.front().is_some_and(|b| b.1 <= now) {
            st.inflight.pop_front();
        }
    }

    /// The deadline of flush `seq` once it is issued (`None` if already complete), waiting
    /// for the issue if the flush still sits behind a read.
    fn issued_deadline(&self, seq: u64) -> Option<i64> {
        let mut st = self.lock();
        if st.issued < seq {
            // Help: the worker may be parked with flushes queued behind nothing.
            let _ = self.drain(&mut st);
        }
        while st.issued < seq {
            st.waiters += 1;
            self.unpark();
            st = self
                .issued_cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
            st.waiters -= 1;
        }
        st.inflight
            .iter()
            .find(|(last, _)| *last >= seq)
            .map(|(_, d)| *d)
    }

    /// The worker thread.
    fn run(self: Arc<Self>) {
        if let Err(e) = sys::lower_timer_slack() {
            tracing::warn!(engine = self.id, error = %e, "cannot lower timer slack; reads after flushes will wait longer");
        }
        loop {
            let job = {
                let mut st = self.lock();
                match self.drain(&mut st) {
                    Drained::Closed => return,
                    Drained::Empty => None,
                    Drained::Handed => st.handed.take(),
                }
            };
            match job {
                None => {
                    // Idle. A submitter that queued a flush has issued it itself (or will be
                    // helped by the fence waiter); reads unpark us. Check once more for a job
                    // queued between our drain and now, then sleep.
                    if self.rx.is_empty() {
                        std::thread::park();
                    }
                }
                Some(Job::Read(r)) => {
                    // FIFO: wait for the round trips of every flush issued before the read.
                    let until = self.lock().inflight.back().map(|b| b.1);
                    if let Some(d) = until {
                        sys::sleep_until_coarse(&sys::ns_timespec(d));
                    }
                    self.read(r);
                }
                Some(Job::Stop) => return,
                Some(Job::Flush { .. }) => unreachable!("drain issues flushes itself"),
            }
        }
    }

    /// The translation of page `vpn` of `client`: from the TLB, else from the client's page
    /// table (under its device lock), which it then caches in the TLB and marks as cached
    /// by this engine; `None` if the page has no entry (a device fault).
    fn translate(
        &self,
        st: &mut EngineState,
        client: &Arc<ClientCore>,
        vpn: u64,
    ) -> Option<TlbEntry> {
        let id = client.id();
        if let Some(e) = st.tlb.get(id, vpn) {
            bump(&self.counters.tlb_hits, 1);
            return Some(e);
        }
        bump(&self.counters.tlb_misses, 1);
        let mut pt = client.pt();
        let pte = pt.get(vpn)?;
        pt.mark_cached(pte.mirror, self.id);
        drop(pt);
        let e = TlbEntry {
            slot: pte.slot,
            mirror: pte.mirror,
        };
        st.tlb.insert(id, vpn, e);
        Some(e)
    }

    /// Copies `dst.len()` bytes from `offset` of the slot that translation `e` names, under
    /// this engine's lock, after checking that the slot still holds the allocation
    /// translated to (G2; a reuse is counted and logged).
    fn copy_slot(&self, client: &ClientCore, e: TlbEntry, offset: usize, dst: &mut [u8]) {
        let Some(shadow) = client.shadow() else {
            // A translation names a slot, and a slot exists only in a client's shadow.
            tracing::error!(
                engine = self.id,
                client = client.id(),
                "translation of a client with no shadow"
            );
            return;
        };
        if shadow.generation(e.slot.slot) != e.slot.gen {
            bump(&self.counters.g2_violations, 1);
            tracing::error!(
                engine = self.id,
                slot = e.slot.slot,
                mirror = e.mirror,
                "slot reused under a live translation (G2)"
            );
        }
        // SAFETY: the slot is reachable through our TLB, under our engine lock (the caller
        // holds it): a flush removing it cannot be issued meanwhile, and its slot is freed
        // only after such a flush completes (G2), so nobody writes it while we copy.
        unsafe { shadow.copy_out(e.slot.slot, offset, dst) };
    }

    /// Serves a device read: TLB, then page table (device lock), else a fault listing every
    /// missing page of the read.
    fn read(&self, job: ReadJob) {
        let mut out = vec![0u8; job.len];
        let mut missing = Vec::new();
        let mut done = 0usize;
        let mut addr = job.addr;
        let mut st = self.lock();
        while done < job.len {
            let vpn = addr / PAGE_SIZE as u64;
            let in_page = (addr % PAGE_SIZE as u64) as usize;
            let n = (PAGE_SIZE - in_page).min(job.len - done);
            match self.translate(&mut st, &job.client, vpn) {
                Some(e) if missing.is_empty() => {
                    self.copy_slot(&job.client, e, in_page, &mut out[done..done + n]);
                }
                Some(_) => {}
                None => missing.push(vpn),
            }
            done += n;
            addr += n as u64;
        }
        drop(st);
        let outcome = if missing.is_empty() {
            bump(&self.counters.reads, 1);
            bump(&self.counters.read_bytes, job.len as u64);
            ReadOutcome::Data(out)
        } else {
            bump(&self.counters.faults, 1);
            ReadOutcome::Fault(missing)
        };
        // The reader may have given up (client gone): nothing to do then.
        let _ = job.reply.send(outcome);
    }
}

/// The device's engines.
pub struct Engines {
    engines: Vec<Arc<Engine>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    latency_ns: Arc<AtomicU64>,
    counters: Arc<DeviceCounters>,
    /// Achieved fence round trips: from queuing the last flush of a fence set to the
    /// waiter's return.
    observed: Histogram,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("count", &self.engines.len())
            .field("latency_ns", &self.latency_ns.load(Ordering::Relaxed))
            .finish()
    }
}

/// Errors starting engines.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Engine count outside `1..=MAX_ENGINES`.
    #[error("bad engine count {0} (1..={MAX_ENGINES})")]
    BadCount(usize),
    /// The worker thread could not be started.
    #[error("cannot start engine thread")]
    Spawn(#[source] std::io::Error),
}

thread_local! {
    static SLACK_LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Lowers the calling thread's timer slack the first time it waits for a fence, so its sleep
/// until the deadline is precise.
fn lower_timer_slack_once() {
    SLACK_LOWERED.with(|done| {
        if !done.get() {
            if let Err(e) = sys::lower_timer_slack() {
                tracing::debug!(error = %e, "cannot lower timer slack");
            }
            done.set(true);
        }
    });
}

impl Engines {
    /// Starts `count` engines whose flushes take `latency_ns`, with TLBs of `tlb_entries`.
    pub fn start(
        count: usize,
        latency_ns: u64,
        tlb_entries: usize,
        counters: Arc<DeviceCounters>,
    ) -> Result<Engines, EngineError> {
        if count == 0 || count > MAX_ENGINES {
            return Err(EngineError::BadCount(count));
        }
        let latency = Arc::new(AtomicU64::new(latency_ns));
        let mut engines = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for id in 0..count {
            let (tx, rx) = crossbeam_channel::unbounded();
            let engine = Arc::new(Engine {
                id,
                tx,
                rx,
                state: Mutex::new(EngineState {
                    tlb: Tlb::new(tlb_entries),
                    issued: 0,
                    inflight: VecDeque::new(),
                    handed: None,
                    waiters: 0,
                    batch: Vec::new(),
                }),
                issued_cv: Condvar::new(),
                submit: Mutex::new(0),
                latency_ns: Arc::clone(&latency),
                counters: Arc::clone(&counters),
                thread: std::sync::OnceLock::new(),
            });
            let worker = Arc::clone(&engine);
            let t = std::thread::Builder::new()
                .name(format!("engine-{id}"))
                .spawn(move || worker.run())
                .map_err(EngineError::Spawn)?;
            let _ = engine.thread.set(t.thread().clone());
            engines.push(engine);
            threads.push(t);
        }
        Ok(Engines {
            engines,
            threads: Mutex::new(threads),
            latency_ns: latency,
            counters,
            observed: Histogram::default(),
        })
    }

    /// Number of engines.
    pub fn count(&self) -> usize {
        self.engines.len()
    }

    /// Modelled flush round trip in nanoseconds.
    pub fn latency_ns(&self) -> u64 {
        self.latency_ns.load(Ordering::Relaxed)
    }

    /// Changes the modelled flush round trip (takes effect at the next flush).
    pub fn set_latency_ns(&self, ns: u64) {
        self.latency_ns.store(ns, Ordering::Relaxed);
    }

    /// Queues a flush on `engine` and adds its fence to `fences`; the round trip's clock
    /// starts now. If the engine is idle the flush is issued on this thread at once (see the
    /// module docs); no thread is woken.
    pub fn flush(&self, engine: usize, req: FlushReq, fences: &mut Fences) {
        let e = &self.engines[engine];
        let latency = self.latency_ns.load(Ordering::Relaxed) as i64;
        let queued = sys::timespec_ns(&sys::monotonic_now());
        let seq = {
            let mut next = lock(&e.submit);
            *next += 1;
            let seq = *next;
            if e.tx.send(Job::Flush { req, seq, queued }).is_err() {
                // The engine is gone (shutdown): nothing can hold translations any more.
                let mut st = e.lock();
                st.issued = st.issued.max(seq);
                e.issued_cv.notify_all();
            }
            seq
        };
        if let Ok(mut st) = e.state.try_lock() {
            if let Drained::Handed = e.drain(&mut st) {
                // A read is next: the worker must serve it (and issue what follows).
                e.unpark();
            }
        }
        fences.add(engine, seq, queued.saturating_add(latency));
        bump(&self.counters.flushes_queued, 1);
    }

    /// Queues `req` on every engine in `mask`, adding the fences to `fences`.
    pub fn flush_mask(&self, mask: u32, req: FlushReq, fences: &mut Fences) {
        for engine in 0..self.engines.len() {
            if mask & (1 << engine) != 0 {
                self.flush(engine, req, fences);
            }
        }
    }

    /// Waits until every fence in `fences` has completed: sleeps (precisely, on this
    /// thread's own timer) until they can first be complete, then makes sure each flush was
    /// issued and its batch's round trip is over.
    pub fn wait(&self, fences: &Fences) {
        if fences.is_empty() {
            return;
        }
        lower_timer_slack_once();
        sys::sleep_until(&sys::ns_timespec(fences.not_before));
        for (i, e) in self.engines.iter().enumerate() {
            if fences.mask & (1 << i) != 0 {
                if let Some(d) = e.issued_deadline(fences.seq[i]) {
                    sys::sleep_until(&sys::ns_timespec(d));
                }
            }
        }
        let queued = fences.not_before - self.latency_ns.load(Ordering::Relaxed) as i64;
        let now = sys::timespec_ns(&sys::monotonic_now());
        self.observed
            .record(u64::try_from(now - queued).unwrap_or(0));
        bump(&self.counters.fences_waited, u64::from(fences.len()));
    }

    /// Per built-in engine: flushes queued, flushes issued, translations in its TLB.
    pub fn snapshot(&self) -> Vec<BuiltinEngine> {
        self.engines
            .iter()
            .map(|e| {
                let queued = *lock(&e.submit);
                let st = e.lock();
                BuiltinEngine {
                    queued,
                    issued: st.issued,
                    tlb_entries: st.tlb.len as u64,
                }
            })
            .collect()
    }

    /// Queues a device read on `engine` and wakes its worker.
    pub fn read(&self, engine: usize, job: ReadJob) -> Result<(), ReadJob> {
        let e = &self.engines[engine % self.engines.len()];
        e.tx.send(Job::Read(job))
            .map_err(|e| match e.into_inner() {
                Job::Read(j) => j,
                _ => unreachable!("sent a read"),
            })?;
        e.unpark();
        Ok(())
    }

    /// Achieved fence round trips, as their waiters saw them.
    pub fn latency_histogram(&self) -> &Histogram {
        &self.observed
    }

    /// Stops the engine threads (after the jobs already queued) and waits for them.
    pub fn shutdown(&self) {
        for e in &self.engines {
            let _ = e.tx.send(Job::Stop);
            e.unpark();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("an engine thread panicked");
            }
        }
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(slot: u32) -> TlbEntry {
        TlbEntry {
            slot: SlotRef { slot, gen: 1 },
            mirror: 0,
        }
    }

    #[test]
    fn tlb_evicts_oldest_and_flushes_ranges() {
        let mut t = Tlb::new(3);
        for v in 0..4 {
            t.insert(1, v, e(v as u32));
        }
        assert!(t.get(1, 0).is_none(), "oldest evicted");
        assert_eq!(t.len, 3);
        t.insert(2, 2, e(9));
        t.flush(&FlushReq {
            client: 1,
            scope: FlushScope::Pages {
                first: 2,
                last: 100,
            },
        });
        assert!(t.get(1, 2).is_none() && t.get(1, 3).is_none());
        assert!(t.get(2, 2).is_some(), "other client untouched");
        t.flush(&FlushReq {
            client: 2,
            scope: FlushScope::All,
        });
        assert!(t.get(2, 2).is_none());
        assert_eq!(t.len, 0);
    }

    #[test]
    fn fences_keep_the_latest_sequence_per_engine() {
        let mut f = Fences::default();
        assert!(f.is_empty());
        f.add(3, 5, 10);
        f.add(3, 2, 30);
        f.add(0, 1, 20);
        assert_eq!(f.len(), 2);
        assert_eq!(f.seq[3], 5);
        assert_eq!(f.not_before, 30);
    }
}
