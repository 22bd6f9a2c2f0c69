//! The shadow notifier: the device's interval notifier over one mirrored range (docs/design.md §4),
//! and the doorbell that batches its flushes within one tree walk.
//!
//! * two-pass (`TwoPass`): **start** zaps the range's PTEs under the device lock, queues a TLB
//!   flush on every engine that may cache them and returns the fences; **finish** waits for
//!   them and frees the slots (G2: a slot is freed only after every engine that could hold a
//!   translation to it completed a flush queued after its PTE was zapped);
//! * two-pass batched: start records the flush in the client's doorbell instead; the walk's
//!   caller rings it once (one flush job per engine for all the notifiers hit);
//! * one-pass (`OnePass`): the baseline, flush and wait inside `invalidate`.
//!
//! The slots zapped by a start are parked in the notifier (in vectors reused from one
//! invalidation to the next) until their finish frees them; the finish token itself is a small
//! `Copy` value, so a steady state allocates nothing per notifier per invalidation.

use crate::lock;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::client::ClientCore;
use super::counters::bump;
use super::engine::{Fences, FlushReq, FlushScope, MAX_ENGINES};
use super::external::{self, ExternalFences};
use super::pagetable::MirrorIdx;
use super::shadow::SlotRef;
use super::DeviceShared;
use crate::notifier::{Invalidate, OnePass, Range, TwoPass, WouldBlock};
use crate::sys::PAGE_SIZE;

/// How an invalidation of a mirror waits for its flushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishFences {
    /// Fences of flushes the start queued itself.
    Direct(Fences),
    /// The doorbell ticket whose ring queued the flushes.
    Ticket(u64),
}

/// What a shadow notifier's finish needs: the fences and the parked slots' batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowFinish {
    fences: FinishFences,
    batch: u64,
}

#[derive(Default)]
struct Batches {
    /// Parked slots of started invalidations, with the external engines' fences.
    live: VecDeque<(u64, Vec<SlotRef>, ExternalFences)>,
    spare: Vec<Vec<SlotRef>>,
    next: u64,
}

/// The device's notifier over one mirror.
pub struct ShadowNotifier {
    dev: Arc<DeviceShared>,
    client: Arc<ClientCore>,
    mirror: MirrorIdx,
    range: Range,
    batched: bool,
    batches: Mutex<Batches>,
}

impl std::fmt::Debug for ShadowNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowNotifier")
            .field("client", &self.client.id())
            .field("mirror", &self.mirror)
            .field("range", &self.range)
            .finish()
    }
}

impl ShadowNotifier {
    /// The notifier of mirror `mirror` (over `range`) of `client`.
    pub(super) fn new(
        dev: Arc<DeviceShared>,
        client: Arc<ClientCore>,
        mirror: MirrorIdx,
        range: Range,
        batched: bool,
    ) -> Self {
        ShadowNotifier {
            dev,
            client,
            mirror,
            range,
            batched,
            batches: Mutex::new(Batches::default()),
        }
    }

    fn batches(&self) -> std::sync::MutexGuard<'_, Batches> {
        lock(&self.batches)
    }

    /// Zaps the affected pages under the device lock (recording the sequence first, rule 3)
    /// and, if anything was mapped, queues or records the flush while still holding it.
    /// Returns `None` if nothing is left to finish.
    fn start(&self, inv: &Invalidate<'_>) -> Option<ShadowFinish> {
        let t = Instant::now();
        let a = inv.affected();
        let first = a.start() / PAGE_SIZE as u64;
        let last = a.last() / PAGE_SIZE as u64;
        let whole = a == self.range;
        let mut slots = self.batches().spare.pop().unwrap_or_default();
        let mut ext = ExternalFences::new();
        let finish = {
            let mut pt = self.client.pt();
            inv.set_seq();
            let n = pt.zap(first, last, self.mirror, &mut slots);
            bump(&self.dev.counters.ptes_zapped, n as u64);
            let mask = if n == 0 {
                0
            } else {
                let caller = inv.owner().and_then(external::engine_of);
                pt.flush_external(first, last, caller, self.batched, &mut ext);
                pt.engine_mask(self.mirror, whole)
            };
            if n == 0 || (mask == 0 && ext.is_empty()) {
                // Nothing mapped, or mapped but never cached: no TLB can hold a translation
                // to these slots, so they can go at once.
                None
            } else if mask == 0 {
                Some(FinishFences::Direct(Fences::default()))
            } else if self.batched {
                let ticket = self.client.doorbell_add(mask, first, last);
                Some(FinishFences::Ticket(ticket))
            } else {
                let mut fences = Fences::default();
                let req = FlushReq {
                    client: self.client.id(),
                    scope: FlushScope::Pages { first, last },
                };
                self.dev.engines.flush_mask(mask, req, &mut fences);
                Some(FinishFences::Direct(fences))
            }
        };
        bump(&self.dev.counters.notifier_starts, 1);
        let out = match finish {
            None => {
                self.dev.free_slots(&self.client, &slots);
                slots.clear();
                self.batches().spare.push(slots);
                None
            }
            Some(fences) => {
                let mut b = self.batches();
                let batch = b.next;
                b.next += 1;
                b.live.push_back((batch, slots, ext));
                Some(ShadowFinish { fences, batch })
            }
        };
        bump(&self.dev.counters.start_ns, t.elapsed().as_nanos() as u64);
        out
    }

    fn finish(&self, f: ShadowFinish) {
        let t = Instant::now();
        let fences = match f.fences {
            FinishFences::Direct(fences) => fences,
            FinishFences::Ticket(ticket) => self.client.doorbell_fences(ticket, &self.dev),
        };
        self.dev.engines.wait(&fences);
        let parked = {
            let mut b = self.batches();
            let pos = b.live.iter().position(|(id, _, _)| *id == f.batch);
            pos.and_then(|p| b.live.remove(p))
        };
        match parked {
            Some((_, mut slots, ext)) => {
                self.dev.wait_external(&self.client, &ext);
                self.dev.free_slots(&self.client, &slots);
                slots.clear();
                self.batches().spare.push(slots);
            }
            None => tracing::error!(batch = f.batch, "shadow finish without its batch"),
        }
        bump(&self.dev.counters.notifier_finishes, 1);
        bump(&self.dev.counters.finish_ns, t.elapsed().as_nanos() as u64);
    }
}

impl TwoPass for ShadowNotifier {
    type Finish = ShadowFinish;

    fn invalidate_start(&self, inv: &Invalidate<'_>) -> Result<Option<ShadowFinish>, WouldBlock> {
        // Starting never blocks: it takes the device lock (held only briefly by engines and
        // faults, never across a wait) and queues work.
        Ok(self.start(inv))
    }

    fn invalidate_finish(&self, finish: ShadowFinish) {
        self.finish(finish);
    }
}

impl OnePass for ShadowNotifier {
    fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
        // Waiting for the flush blocks: refuse on a non-blockable range if there is one to
        // wait for. Checking costs a zap we would have to undo, so refuse up front whenever
        // something of the range is mapped.
        if !inv.blockable() {
            let a = inv.affected();
            let mapped = {
                let pt = self.client.pt();
                (a.start() / PAGE_SIZE as u64..=a.last() / PAGE_SIZE as u64)
                    .any(|v| pt.get(v).is_some())
            };
            if mapped {
                if let Some(no) = inv.refuse() {
                    return Err(no);
                }
            }
        }
        if let Some(f) = self.start(inv) {
            self.finish(f);
        }
        Ok(())
    }
}

/// Flush requests recorded during one tree walk, one per engine at most.
#[derive(Debug, Default)]
pub(super) struct Doorbell {
    /// The ticket currently collecting requests.
    open: u64,
    /// Notifier starts recorded under the open ticket.
    open_refs: u32,
    /// Per engine: union of the pages to flush and how many requests it covers.
    pending: [Option<(u64, u64, u32)>; MAX_ENGINES],
    /// Rung tickets still referenced by a finish: (ticket, fences, finishes left).
    rung: VecDeque<(u64, Fences, u32)>,
}

impl Doorbell {
    /// Records a flush of pages `first..=last` on the engines of `mask`; returns the ticket.
    pub(super) fn add(&mut self, mask: u32, first: u64, last: u64) -> u64 {
        for (e, p) in self.pending.iter_mut().enumerate() {
            if mask & (1 << e) != 0 {
                *p = Some(match *p {
                    None => (first, last, 1),
                    Some((f, l, n)) => (f.min(first), l.max(last), n + 1),
                });
            }
        }
        self.open_refs += 1;
        self.open
    }

    /// Queues one flush per engine for everything recorded under the open ticket and opens
    /// the next one.
    pub(super) fn ring(&mut self, client: u64, dev: &DeviceShared) {
        if self.open_refs == 0 {
            return;
        }
        let mut fences = Fences::default();
        for e in 0..self.pending.len() {
            if let Some((first, last, n)) = self.pending[e].take() {
                let scope = if n as usize > dev.batch_threshold {
                    bump(&dev.counters.flushes_all, 1);
                    FlushScope::All
                } else {
                    FlushScope::Pages { first, last }
                };
                bump(&dev.counters.flushes_batched, u64::from(n - 1));
                dev.engines
                    .flush(e, FlushReq { client, scope }, &mut fences);
            }
        }
        self.rung.push_back((self.open, fences, self.open_refs));
        self.open += 1;
        self.open_refs = 0;
    }

    /// The fences of `ticket` (ringing it first if it is still open), dropping one reference.
    pub(super) fn take_fences(&mut self, ticket: u64, client: u64, dev: &DeviceShared) -> Fences {
        if ticket == self.open {
            self.ring(client, dev);
        }
        let Some(pos) = self.rung.iter().position(|(t, _, _)| *t == ticket) else {
            tracing::error!(ticket, "doorbell ticket not found");
            return Fences::default();
        };
        let fences = self.rung[pos].1;
        self.rung[pos].2 -= 1;
        if self.rung[pos].2 == 0 {
            self.rung.remove(pos);
        }
        fences
    }
}
