//! Engines (DESIGN.md §4): K worker threads, each fed by a FIFO `crossbeam-channel` and each
//! with its own TLB. Jobs are TLB flushes (which complete a fence after a modelled device
//! round trip) and device reads; an access queued after a flush is served after it.
//!
//! Consecutive flushes waiting on one engine are coalesced into one round trip. The round trip
//! is an absolute-deadline `clock_nanosleep` with the thread's timer slack lowered, so it
//! costs no CPU (K may exceed the number of cores) and lands within a few µs of its target.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nix::sys::time::{TimeSpec, TimeValLike};

use super::client::ClientCore;
use super::counters::{bump, DeviceCounters, Histogram};
use super::pagetable::MirrorIdx;
use super::shadow::{Shadow, SlotRef};
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
    Flush { req: FlushReq, seq: u64 },
    Read(ReadJob),
    Stop,
}

/// Completed-flush sequence of one engine, and a way to wait for it.
#[derive(Debug, Default)]
struct FenceState {
    completed: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
    waiters: AtomicU32,
}

impl FenceState {
    fn wait(&self, seq: u64) {
        if self.completed.load(Ordering::Acquire) >= seq {
            return;
        }
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        while self.completed.load(Ordering::SeqCst) < seq {
            g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    fn complete(&self, seq: u64) {
        self.completed.store(seq, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.cv.notify_all();
        }
    }
}

/// The fences a finish waits for: at most one flush sequence per engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fences {
    mask: u32,
    seq: [u64; MAX_ENGINES],
}

impl Fences {
    /// Adds engine `engine`'s flush `seq` (keeping the later one if already present).
    pub fn add(&mut self, engine: usize, seq: u64) {
        self.mask |= 1 << engine;
        self.seq[engine] = self.seq[engine].max(seq);
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

/// The submitting side of one engine.
#[derive(Debug)]
struct EngineHandle {
    tx: Sender<Job>,
    /// Last flush sequence handed out; held while queuing so sequences follow FIFO order.
    submit: Mutex<u64>,
    fence: FenceState,
    /// Achieved flush round trips.
    latency: Histogram,
}

/// The device's engines.
pub struct Engines {
    engines: Vec<Arc<EngineHandle>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    latency_ns: Arc<AtomicU64>,
    counters: Arc<DeviceCounters>,
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

impl Engines {
    /// Starts `count` engines whose flushes take `latency_ns`, with TLBs of `tlb_entries`.
    pub fn start(
        count: usize,
        latency_ns: u64,
        tlb_entries: usize,
        shadow: Arc<Shadow>,
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
            let handle = Arc::new(EngineHandle {
                tx,
                submit: Mutex::new(0),
                fence: FenceState::default(),
                latency: Histogram::default(),
            });
            let worker = Worker {
                id,
                rx,
                tlb: Tlb::new(tlb_entries.max(1)),
                handle: Arc::clone(&handle),
                shadow: Arc::clone(&shadow),
                counters: Arc::clone(&counters),
                latency_ns: Arc::clone(&latency),
                batch: Vec::new(),
            };
            let t = std::thread::Builder::new()
                .name(format!("engine-{id}"))
                .spawn(move || worker.run())
                .map_err(EngineError::Spawn)?;
            engines.push(handle);
            threads.push(t);
        }
        Ok(Engines {
            engines,
            threads: Mutex::new(threads),
            latency_ns: latency,
            counters,
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

    /// Queues a flush on `engine`; returns the fence sequence that completes with it.
    pub fn flush(&self, engine: usize, req: FlushReq) -> u64 {
        let e = &self.engines[engine];
        let mut next = e.submit.lock().unwrap_or_else(PoisonError::into_inner);
        *next += 1;
        let seq = *next;
        if e.tx.send(Job::Flush { req, seq }).is_err() {
            // The engine is gone (shutdown): nothing can hold translations any more.
            e.fence.complete(seq);
        }
        bump(&self.counters.flushes_queued, 1);
        seq
    }

    /// Queues `req` on every engine in `mask`, adding the fences to `fences`.
    pub fn flush_mask(&self, mask: u32, req: FlushReq, fences: &mut Fences) {
        for engine in 0..self.engines.len() {
            if mask & (1 << engine) != 0 {
                fences.add(engine, self.flush(engine, req));
            }
        }
    }

    /// Waits until every fence in `fences` has completed.
    pub fn wait(&self, fences: &Fences) {
        for engine in 0..self.engines.len() {
            if fences.mask & (1 << engine) != 0 {
                self.engines[engine].fence.wait(fences.seq[engine]);
            }
        }
        bump(&self.counters.fences_waited, u64::from(fences.len()));
    }

    /// Queues a device read on `engine`.
    pub fn read(&self, engine: usize, job: ReadJob) -> Result<(), ReadJob> {
        self.engines[engine % self.engines.len()]
            .tx
            .send(Job::Read(job))
            .map_err(|e| match e.into_inner() {
                Job::Read(j) => j,
                _ => unreachable!("sent a read"),
            })
    }

    /// Achieved flush round trips of every engine, merged.
    pub fn latency_histogram(&self) -> Histogram {
        let h = Histogram::default();
        for e in &self.engines {
            h.merge_from(&e.latency);
        }
        h
    }

    /// Stops the engine threads (after the jobs already queued) and waits for them.
    pub fn shutdown(&self) {
        for e in &self.engines {
            let _ = e.tx.send(Job::Stop);
        }
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
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

#[derive(Clone, Copy)]
struct TlbEntry {
    slot: SlotRef,
    mirror: MirrorIdx,
}

/// A bounded cache of (client, virtual page) → slot, evicting the oldest entry when full.
struct Tlb {
    map: HashMap<(u64, u64), TlbEntry>,
    order: VecDeque<(u64, u64)>,
    cap: usize,
}

impl Tlb {
    fn new(cap: usize) -> Tlb {
        Tlb {
            map: HashMap::with_capacity(cap),
            order: VecDeque::with_capacity(cap),
            cap,
        }
    }

    fn get(&self, client: u64, vpn: u64) -> Option<TlbEntry> {
        self.map.get(&(client, vpn)).copied()
    }

    fn insert(&mut self, client: u64, vpn: u64, e: TlbEntry) {
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
        if self.map.insert((client, vpn), e).is_none() {
            self.order.push_back((client, vpn));
        }
        if self.order.len() > 2 * self.cap {
            // Keys of flushed entries linger in `order`; drop them now and then.
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }

    fn flush(&mut self, req: &FlushReq) {
        match req.scope {
            FlushScope::All => self.map.retain(|&(c, _), _| c != req.client),
            FlushScope::Pages { first, last } => {
                let span = last.saturating_sub(first).saturating_add(1);
                if span <= 8 {
                    for vpn in first..=last {
                        self.map.remove(&(req.client, vpn));
                    }
                } else {
                    self.map
                        .retain(|&(c, v), _| c != req.client || v < first || v > last);
                }
            }
        }
    }
}

struct Worker {
    id: usize,
    rx: Receiver<Job>,
    tlb: Tlb,
    handle: Arc<EngineHandle>,
    shadow: Arc<Shadow>,
    counters: Arc<DeviceCounters>,
    latency_ns: Arc<AtomicU64>,
    batch: Vec<FlushReq>,
}

impl Worker {
    fn run(mut self) {
        if let Err(e) = sys::lower_timer_slack() {
            tracing::warn!(engine = self.id, error = %e, "cannot lower timer slack; flush latency will overshoot");
        }
        let mut next: Option<Job> = None;
        loop {
            let job = match next.take() {
                Some(j) => j,
                None => match self.rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
            };
            match job {
                Job::Flush { req, seq } => next = self.flush(req, seq),
                Job::Read(r) => self.read(r),
                Job::Stop => return,
            }
        }
    }

    /// Performs a flush and every flush queued right behind it, as one round trip.
    fn flush(&mut self, first: FlushReq, seq: u64) -> Option<Job> {
        let start = sys::monotonic_now();
        self.batch.clear();
        self.batch.push(first);
        let mut last = seq;
        let mut following = None;
        loop {
            match self.rx.try_recv() {
                Ok(Job::Flush { req, seq }) => {
                    self.batch.push(req);
                    last = seq;
                }
                Ok(other) => {
                    following = Some(other);
                    break;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        for req in &self.batch {
            self.tlb.flush(req);
        }
        bump(
            &self.counters.flushes_coalesced,
            self.batch.len() as u64 - 1,
        );
        bump(&self.counters.flushes_executed, 1);
        let ns = self.latency_ns.load(Ordering::Relaxed);
        if ns > 0 {
            let deadline = start + TimeSpec::from_duration(std::time::Duration::from_nanos(ns));
            sys::sleep_until(&deadline);
        }
        let took = sys::monotonic_now() - start;
        let took_ns = u64::try_from(took.num_nanoseconds()).unwrap_or(0);
        self.handle.latency.record(took_ns);
        self.handle.fence.complete(last);
        following
    }

    /// Serves a device read: TLB, then page table (device lock), else a fault listing every
    /// missing page of the read.
    fn read(&mut self, job: ReadJob) {
        let client = job.client.id();
        let mut out = vec![0u8; job.len];
        let mut missing = Vec::new();
        let mut done = 0usize;
        let mut addr = job.addr;
        while done < job.len {
            let vpn = addr / PAGE_SIZE as u64;
            let in_page = (addr % PAGE_SIZE as u64) as usize;
            let n = (PAGE_SIZE - in_page).min(job.len - done);
            let entry = match self.tlb.get(client, vpn) {
                Some(e) => {
                    bump(&self.counters.tlb_hits, 1);
                    Some(e)
                }
                None => {
                    bump(&self.counters.tlb_misses, 1);
                    let mut pt = job.client.pt();
                    match pt.get(vpn) {
                        Some(pte) => {
                            pt.mark_cached(pte.mirror, self.id);
                            drop(pt);
                            let e = TlbEntry {
                                slot: pte.slot,
                                mirror: pte.mirror,
                            };
                            self.tlb.insert(client, vpn, e);
                            Some(e)
                        }
                        None => None,
                    }
                }
            };
            match entry {
                Some(e) if missing.is_empty() => {
                    // G2 self-check: the slot must still hold the allocation we translated to.
                    if self.shadow.generation(e.slot.slot) != e.slot.gen {
                        bump(&self.counters.g2_violations, 1);
                        tracing::error!(
                            engine = self.id,
                            slot = e.slot.slot,
                            mirror = e.mirror,
                            "slot reused under a live translation (G2)"
                        );
                    }
                    // SAFETY: the slot is reachable through our TLB, so it cannot be freed (and
                    // rewritten) before this engine runs a flush queued after its PTE was
                    // zapped, which is behind this job in our FIFO (G2).
                    unsafe {
                        self.shadow
                            .copy_out(e.slot.slot, in_page, &mut out[done..done + n])
                    };
                }
                Some(_) => {}
                None => missing.push(vpn),
            }
            done += n;
            addr += n as u64;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlb_evicts_oldest_and_flushes_ranges() {
        let mut t = Tlb::new(3);
        let e = |slot| TlbEntry {
            slot: SlotRef { slot, gen: 1 },
            mirror: 0,
        };
        for v in 0..4 {
            t.insert(1, v, e(v as u32));
        }
        assert!(t.get(1, 0).is_none(), "oldest evicted");
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
    }

    #[test]
    fn fences_keep_the_latest_sequence_per_engine() {
        let mut f = Fences::default();
        assert!(f.is_empty());
        f.add(3, 5);
        f.add(3, 2);
        f.add(0, 1);
        assert_eq!(f.len(), 2);
        assert_eq!(f.seq[3], 5);
    }
}
