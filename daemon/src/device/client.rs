//! One client of the device: its page table (behind the device lock), its notifiers, its
//! mirrors, the fault path (docs/design.md §3 rule 2, §4) and the access lock that G1 needs.

use crate::lock;
use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::account::Account;
use super::counters::bump;
use super::engine::{Fences, FlushReq, FlushScope, ReadJob, ReadOutcome};
use super::external::{self, EpochPage, ExternalEngine, ExternalError, ExternalFences, SharedPt};
use super::mirror::{Doorbell, ShadowNotifier};
use super::pagetable::{MirrorIdx, PageTable, Pte};
use super::shadow::{Shadow, ShadowError, ShadowPool, SlotRef};
use super::{DeviceError, DeviceShared, InvalidationMode};
use crate::notifier::{
    Callbacks, InvalidateArgs, InvalidateError, Invalidation, NotifierHandle, Observer, Range,
    Subscription, Summary,
};
use crate::source::MemorySource;
use crate::sys::{IOV_MAX, PAGE_SIZE};
use crate::trace::{TraceItem, TraceRecord};

/// Most pages one fault copies with one batch of system calls.
const FAULT_BATCH: usize = IOV_MAX;
/// Most times a device read is replayed after faults before giving up.
const MAX_REPLAYS: u32 = 1000;

/// Per-client counters.
#[derive(Debug, Default)]
pub struct ClientCounters {
    /// Device reads served.
    pub reads: AtomicU64,
    /// Device faults.
    pub faults: AtomicU64,
    /// Invalidations (any kind).
    pub invalidations: AtomicU64,
    /// Shadow pages this client holds.
    pub pages: AtomicU64,
}

/// What the engines, notifiers and faults share of a client.
pub struct ClientCore {
    id: u64,
    /// The device lock of this client and the page table it guards.
    pt: Mutex<PageTable>,
    doorbell: Mutex<Doorbell>,
    source: Arc<dyn MemorySource>,
    quota_pages: AtomicU64,
    /// The share of the client's user, charged beside `counters.pages`.
    account: Arc<Account>,
    counters: ClientCounters,
    /// The client's shadow memory, made at its first fault.
    shadow: OnceLock<Arc<Shadow>>,
    /// The event-read epoch, made when the first external engine attaches.
    epoch: OnceLock<EpochPage>,
    /// The tag its trace records carry (the server sets the client's pid).
    trace_tag: Arc<AtomicU64>,
}

impl std::fmt::Debug for ClientCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCore")
            .field("id", &self.id)
            .field("source", &self.source.kind())
            .finish()
    }
}

impl ClientCore {
    /// The client's device-wide id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The tag its trace records carry.
    pub fn trace_tag(&self) -> u64 {
        self.trace_tag.load(Ordering::Relaxed)
    }

    /// Takes the device lock and returns the page table.
    pub fn pt(&self) -> MutexGuard<'_, PageTable> {
        lock(&self.pt)
    }

    fn doorbell(&self) -> MutexGuard<'_, Doorbell> {
        lock(&self.doorbell)
    }

    pub(super) fn doorbell_add(&self, mask: u32, first: u64, last: u64) -> u64 {
        self.doorbell().add(mask, first, last)
    }

    pub(super) fn doorbell_fences(&self, ticket: u64, dev: &DeviceShared) -> Fences {
        self.doorbell().take_fences(ticket, self.id, dev)
    }

    /// Rings the built-in engines' doorbell and the external engines' deferred ones: once
    /// per tree walk.
    fn ring(&self, dev: &DeviceShared) {
        self.doorbell().ring(self.id, dev);
        self.pt().ring_external();
    }

    /// Per-client counters.
    pub fn counters(&self) -> &ClientCounters {
        &self.counters
    }

    /// The client's shadow memory, if it ever faulted (every slot of the client is in it).
    pub fn shadow(&self) -> Option<&Arc<Shadow>> {
        self.shadow.get()
    }

    /// The client's shadow memory, made from `pool` if it has none yet.
    pub(super) fn shadow_in(&self, pool: &Arc<ShadowPool>) -> Result<&Arc<Shadow>, ShadowError> {
        if let Some(s) = self.shadow.get() {
            return Ok(s);
        }
        let made = pool.shadow()?;
        // Two first faults may race: one shadow wins, the other is dropped unused.
        Ok(self.shadow.get_or_init(|| made))
    }

    /// Returns `n` pages to the client's quota and its user's share.
    pub(super) fn uncharge(&self, n: u64) {
        self.counters.pages.fetch_sub(n, Ordering::Relaxed);
        self.account.uncharge(n);
    }
}

/// An attached range of a client's address space and its notifier.
#[derive(Debug)]
pub struct Mirror {
    id: u64,
    idx: MirrorIdx,
    range: Range,
    handle: NotifierHandle,
    /// Parts of the range the client unmapped (or moved away): never faulted in again, since
    /// whatever gets mapped there later is not watched (G1).
    retired: Mutex<Vec<Range>>,
}

impl Mirror {
    /// True if any page of `r` was retired.
    fn retired_overlaps(&self, r: &Range) -> bool {
        lock(&self.retired).iter().any(|d| d.overlaps(r))
    }
}

/// A mirror out of the client's sets, not torn down yet ([`AccessGuard::unlink`]).
#[derive(Debug)]
pub struct Unlinked {
    mirror: Arc<Mirror>,
    live: Vec<Range>,
}

impl Unlinked {
    /// The parts of the mirror's range never retired, in address order.
    pub fn live(&self) -> &[Range] {
        &self.live
    }
}

/// What an external engine maps: the fds in `engine_abi` order and the mirror's range.
#[derive(Debug)]
pub struct EngineAttachment {
    /// Epoch page, page table, shadow (read-only), ring (read-write), doorbell.
    pub fds: [std::os::fd::OwnedFd; 5],
    /// The mirror's range.
    pub range: Range,
    /// Bytes of the shadow file.
    pub shadow_bytes: u64,
    /// The engine.
    pub engine: Arc<ExternalEngine>,
}

impl EngineAttachment {
    fn new(
        epoch: Option<&EpochPage>,
        pt: &SharedPt,
        shadow: &Shadow,
        engine: &Arc<ExternalEngine>,
        range: Range,
    ) -> Result<EngineAttachment, ExternalError> {
        let epoch =
            epoch.ok_or_else(|| ExternalError::Create(std::io::ErrorKind::NotFound.into()))?;
        let dup = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned().map_err(ExternalError::Create)
        };
        use std::os::fd::AsFd;
        Ok(EngineAttachment {
            fds: [
                external::read_only(epoch.file())?,
                external::read_only(pt.file())?,
                external::read_only(shadow.file())?,
                dup(engine.ring_file().as_fd())?,
                dup(engine.doorbell())?,
            ],
            range,
            shadow_bytes: shadow.bytes(),
            engine: Arc::clone(engine),
        })
    }
}

/// What callers see of a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorInfo {
    /// The mirror's id within its client.
    pub id: u64,
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The notifier's current sequence.
    pub seq: u64,
    /// The notifier's state (`active`, `pending-insert`, …).
    pub state: &'static str,
    /// Pages present in the shadow.
    pub pages: u64,
}

#[derive(Debug, Default)]
struct Mirrors {
    /// Live mirrors by first address: what faults and attaches look up.
    /// Live mirrors by (first address, id): mirrors of one client may overlap (two
    /// devices, or two libraries, mirroring one buffer), each with its own notifier.
    by_start: BTreeMap<(u64, u64), Arc<Mirror>>,
    /// Mirrors retired entirely, by id, until their detach: out of the way of a new mirror
    /// of whatever the client maps there next (e.g. the target of an mremap), while their
    /// notifier still waits to be removed off the event reader's path.
    dead: BTreeMap<u64, Arc<Mirror>>,
    next: u32,
}

/// A client of the device.
pub struct DeviceClient {
    dev: Arc<DeviceShared>,
    core: Arc<ClientCore>,
    sub: Subscription,
    /// G1: event readers hold it while they read a client's events and run their start
    /// passes; device reads hold it while they queue their jobs.
    access: Mutex<()>,
    mirrors: Mutex<Mirrors>,
}

impl std::fmt::Debug for DeviceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClient")
            .field("id", &self.core.id)
            .field("sub", &self.sub)
            .finish()
    }
}

/// Proof that the holder has the client's access lock (G1); invalidations started through it
/// have queued their flushes before any later device read of the client can be queued.
pub struct AccessGuard<'a> {
    client: &'a DeviceClient,
    _guard: MutexGuard<'a, ()>,
}

impl std::fmt::Debug for AccessGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessGuard")
            .field("client", &self.client.core.id)
            .finish()
    }
}

impl AccessGuard<'_> {
    /// Runs the start pass of an invalidation (and rings the doorbell, so every flush is
    /// queued when this returns); the finish pass runs when the returned handle is finished
    /// or dropped, possibly on another thread.
    pub fn begin_invalidate(&self, args: InvalidateArgs) -> Result<Invalidation, InvalidateError> {
        let c = self.client;
        bump(c.dev.counters.invalidations(args.event), 1);
        bump(&c.core.counters.invalidations, 1);
        let r = c.sub.begin_invalidate(args);
        c.core.ring(&c.dev);
        if matches!(r, Err(InvalidateError::WouldBlock(_))) {
            bump(&c.dev.counters.inv_would_block, 1);
        }
        r
    }

    /// Fences `range`: until [`DeviceClient::unfence`] with the token returned, none of its
    /// pages is installed, and device reads of it go to the client's memory itself. Call it
    /// under this guard before the invalidation of the range, as `retire` is.
    pub fn fence(&self, range: Range) -> u64 {
        let first = range.start() / PAGE_SIZE as u64;
        let last = range.last() / PAGE_SIZE as u64;
        bump(&self.client.dev.counters.fences, 1);
        self.client.core.pt().fence(first, last)
    }

    /// Takes mirror `id` (live or retired entirely) out of the client's sets, for
    /// [`DeviceClient::tear_down`]. Under the access lock no retirement can come between
    /// the parts of its range it reports as never retired ([`Unlinked::live`]: still the
    /// mapping that was attached, whose registration the caller may undo) and the moment it
    /// stops seeing retirements.
    pub fn unlink(&self, id: u64) -> Result<Unlinked, DeviceError> {
        let mut m = self.client.mirrors();
        let live = m.by_start.iter().find(|(_, v)| v.id == id).map(|(k, _)| *k);
        let mirror = match live {
            Some(key) => m.by_start.remove(&key),
            None => m.dead.remove(&id),
        }
        .ok_or(DeviceError::NoSuchMirror(id))?;
        let live = {
            let retired = lock(&mirror.retired);
            subtract(&mirror.range, &retired)
        };
        Ok(Unlinked { mirror, live })
    }

    /// Retires `range` in every mirror it overlaps: those pages are never faulted in again.
    /// Call it before the invalidation of the same range, under this guard, so any fault
    /// that began earlier retries (rule 2) and then sees the retirement. Returns the ids of
    /// mirrors that are now retired entirely: they leave the live set at once (a new
    /// mirror may take their place) and wait for their detach.
    pub fn retire(&self, range: Range) -> Vec<u64> {
        let mut m = self.client.mirrors();
        let mut dead = Vec::new();
        let mut unlink = Vec::new();
        for mirror in m
            .by_start
            .range(..=(range.last(), u64::MAX))
            .map(|(_, v)| v)
        {
            let Some(cut) = mirror.range.intersection(&range) else {
                continue;
            };
            let mut r = lock(&mirror.retired);
            r.push(cut);
            let retired: u64 = r.iter().map(Range::len).sum();
            // Retired pieces may overlap; only the common case (all of it at once) matters.
            if cut == mirror.range || retired >= mirror.range.len() && covers(&r, &mirror.range) {
                dead.push(mirror.id);
                unlink.push((mirror.range.start(), mirror.id));
            }
        }
        for key in unlink {
            if let Some(mirror) = m.by_start.remove(&key) {
                m.dead.insert(mirror.id, mirror);
            }
        }
        dead
    }
}

/// Test hook: `MEMSHADOW_TEST_NO_EPOCH=1` (read once) leaves every epoch even, so that
/// tests can show what the epoch closes (docs/testing.md). On unless set.
fn epoch_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MEMSHADOW_TEST_NO_EPOCH").is_none_or(|v| v != "1"))
}

/// Publishes every invalidation of one client on the device's trace bus (only while
/// someone listens).
struct Tracer {
    tag: Arc<AtomicU64>,
    dev: Arc<DeviceShared>,
}

/// The device's flush counters (queued, coalesced), to take a difference from.
fn flush_mark(dev: &DeviceShared) -> [u64; 2] {
    let c = &dev.counters;
    [
        c.flushes_queued.load(Ordering::Relaxed),
        c.flushes_coalesced.load(Ordering::Relaxed),
    ]
}

/// The trace record of an invalidation that ended with `summary`, begun at `mark`.
fn trace_record(
    tag: u64,
    dev: &DeviceShared,
    args: &InvalidateArgs,
    summary: &Summary,
    mark: [u64; 2],
) -> TraceRecord {
    let now = flush_mark(dev);
    TraceRecord {
        tag,
        event: args.event,
        range: args.range,
        notifiers: summary.hits,
        would_block: summary.refused,
        start: summary.start_time,
        finish: summary.finish_time,
        flushes_queued: now[0].wrapping_sub(mark[0]),
        flushes_coalesced: now[1].wrapping_sub(mark[1]),
    }
}

impl Observer for Tracer {
    fn began(&self, _args: &InvalidateArgs) -> Option<[u64; 2]> {
        self.dev.trace.active().then(|| flush_mark(&self.dev))
    }

    fn ended(&self, args: &InvalidateArgs, summary: &Summary, mark: [u64; 2]) {
        let tag = self.tag.load(Ordering::Relaxed);
        self.dev.trace.publish(TraceItem::Invalidation(trace_record(
            tag, &self.dev, args, summary, mark,
        )));
    }
}

/// True if the union of `parts` covers `whole`.
/// `whole` without `parts`, in address order.
fn subtract(whole: &Range, parts: &[Range]) -> Vec<Range> {
    let mut sorted: Vec<Range> = parts.iter().filter_map(|p| p.intersection(whole)).collect();
    sorted.sort_by_key(Range::start);
    let mut left = Vec::new();
    let mut next = whole.start();
    for p in sorted {
        if p.start() > next {
            left.extend(Range::from_bounds(next, p.start()).ok());
        }
        next = next.max(p.last() + 1);
    }
    if next <= whole.last() {
        left.extend(Range::from_bounds(next, whole.last() + 1).ok());
    }
    left
}

fn covers(parts: &[Range], whole: &Range) -> bool {
    let mut sorted: Vec<Range> = parts.to_vec();
    sorted.sort_by_key(Range::start);
    let mut next = whole.start();
    for p in sorted {
        if p.start() > next {
            return false;
        }
        if p.last() >= whole.last() {
            return true;
        }
        next = next.max(p.last() + 1);
    }
    false
}

impl DeviceClient {
    pub(super) fn new(
        dev: Arc<DeviceShared>,
        id: u64,
        source: Arc<dyn MemorySource>,
        quota_bytes: u64,
        account: Arc<Account>,
    ) -> Self {
        let sub = Subscription::new();
        let trace_tag = Arc::new(AtomicU64::new(0));
        sub.set_observer(Arc::new(Tracer {
            tag: Arc::clone(&trace_tag),
            dev: Arc::clone(&dev),
        }));
        DeviceClient {
            core: Arc::new(ClientCore {
                id,
                pt: Mutex::new(PageTable::default()),
                doorbell: Mutex::new(Doorbell::default()),
                source,
                quota_pages: AtomicU64::new(quota_bytes / PAGE_SIZE as u64),
                account,
                counters: ClientCounters::default(),
                shadow: OnceLock::new(),
                epoch: OnceLock::new(),
                trace_tag,
            }),
            dev,
            sub,
            access: Mutex::new(()),
            mirrors: Mutex::new(Mirrors::default()),
        }
    }

    /// The client's device-wide id.
    pub fn id(&self) -> u64 {
        self.core.id
    }

    /// Per-client counters.
    pub fn counters(&self) -> &ClientCounters {
        &self.core.counters
    }

    /// Lifts the fences `tokens` ([`AccessGuard::fence`]) in one pass; `timed_out` of them
    /// were lifted without their change seen made (counted apart).
    pub fn unfence_all(&self, tokens: &std::collections::HashSet<u64>, timed_out: u64) {
        self.core.pt().unfence_all(tokens);
        let c = &self.dev.counters;
        bump(&c.fences_timed_out, timed_out);
        bump(&c.fences_lifted, tokens.len() as u64 - timed_out);
    }

    /// Runs `(first, last)` (inclusive virtual page numbers) of the pages of
    /// `range` that are in the shadow now.
    pub fn mirrored_runs(&self, range: Range) -> Vec<(u64, u64)> {
        let first = range.start() / PAGE_SIZE as u64;
        let last = range.last() / PAGE_SIZE as u64;
        let pt = self.core.pt();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (vpn, _) in pt.entries_in(first, last) {
            match runs.last_mut() {
                Some(r) if r.1 + 1 == vpn => r.1 = vpn,
                _ => runs.push((vpn, vpn)),
            }
        }
        runs
    }

    /// Where the client's pages are read from.
    pub fn source(&self) -> &dyn MemorySource {
        self.core.source.as_ref()
    }

    /// False once the address space the client's memory is read from is gone for good (it
    /// exited or `exec`ed): nothing of it can be mirrored any more.
    pub fn source_alive(&self) -> bool {
        self.core.source.alive()
    }

    /// Sets the tag its trace records carry (the server uses the client's pid).
    pub fn set_trace_tag(&self, tag: u64) {
        self.core.trace_tag.store(tag, Ordering::Relaxed);
    }

    /// The client's notifier set.
    pub fn subscription(&self) -> &Subscription {
        &self.sub
    }

    /// Changes the client's shadow quota (bytes); applies to future faults.
    pub fn set_quota_bytes(&self, bytes: u64) {
        self.core
            .quota_pages
            .store(bytes / PAGE_SIZE as u64, Ordering::Relaxed);
    }

    /// Tests: whether the access lock is free right now.
    #[cfg(test)]
    pub(crate) fn access_is_free(&self) -> bool {
        self.access.try_lock().is_ok()
    }

    /// Takes the client's access lock (G1).
    pub fn lock_access(&self) -> AccessGuard<'_> {
        AccessGuard {
            client: self,
            _guard: lock(&self.access),
        }
    }

    /// Invalidates `args.range` like [`DeviceClient::invalidate`] and returns the record a
    /// trace would show of it; a non-blockable refusal (`EAGAIN`) is a record with
    /// `would_block` set, not an error.
    pub fn invalidate_recorded(
        &self,
        args: InvalidateArgs,
    ) -> Result<TraceRecord, InvalidateError> {
        let mark = flush_mark(&self.dev);
        // Bound first: a guard made in the `match` scrutinee would live through the arms,
        // holding the access lock (and every client's munmap) through the finish's wait.
        let started = self.lock_access().begin_invalidate(args);
        let summary = match started {
            Ok(inv) => inv.finish(),
            Err(InvalidateError::WouldBlock(summary)) => summary,
            Err(e) => return Err(e),
        };
        let tag = self.core.trace_tag();
        Ok(trace_record(tag, &self.dev, &args, &summary, mark))
    }

    /// Invalidates `args.range` completely (start pass under the access lock, finish after).
    pub fn invalidate(&self, args: InvalidateArgs) -> Result<Summary, InvalidateError> {
        let inv = self.lock_access().begin_invalidate(args)?;
        Ok(inv.finish())
    }

    fn mirrors(&self) -> MutexGuard<'_, Mirrors> {
        lock(&self.mirrors)
    }

    /// Mirrors `addr..addr+len` (page aligned; it may overlap other mirrors of the client)
    /// and returns the new mirror's id.
    pub fn attach(&self, addr: u64, len: u64) -> Result<u64, DeviceError> {
        if addr % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE as u64 != 0 {
            return Err(DeviceError::Unaligned { addr, len });
        }
        let range = Range::new(addr, len)?;
        let mut m = self.mirrors();
        let idx = m.next;
        m.next = m.next.checked_add(1).ok_or(DeviceError::TooManyMirrors)?;
        self.core.pt().add_mirror(idx);
        let notifier = Arc::new(ShadowNotifier::new(
            Arc::clone(&self.dev),
            Arc::clone(&self.core),
            idx,
            range,
            self.dev.mode == InvalidationMode::TwoPassBatched,
        ));
        let callbacks = match self.dev.mode {
            InvalidationMode::OnePass => Callbacks::one_pass(notifier),
            InvalidationMode::TwoPass | InvalidationMode::TwoPassBatched => {
                Callbacks::two_pass(notifier)
            }
        };
        let handle = match self.sub.insert(range, callbacks) {
            Ok(h) => h,
            Err(e) => {
                self.core.pt().remove_mirror(idx);
                return Err(e.into());
            }
        };
        let id = u64::from(idx) + 1;
        m.by_start.insert(
            (addr, id),
            Arc::new(Mirror {
                id,
                idx,
                range,
                handle,
                retired: Mutex::new(Vec::new()),
            }),
        );
        Ok(id)
    }

    /// Stops mirroring mirror `id`: no callback of it runs after this returns, its pages are
    /// flushed from every engine that may cache them and freed. Returns the parts of its
    /// range never retired (see [`AccessGuard::unlink`]).
    pub fn detach(&self, id: u64) -> Result<Vec<Range>, DeviceError> {
        let unlinked = self.lock_access().unlink(id)?;
        Ok(self.tear_down(unlinked))
    }

    /// Ends a mirror taken out by [`AccessGuard::unlink`]: removes its notifier, which waits
    /// for the invalidations that may still call it (rule 4), then zaps, flushes and frees
    /// its pages. Not under the access lock: those invalidations may need it to end.
    /// Returns [`Unlinked::live`].
    pub fn tear_down(&self, unlinked: Unlinked) -> Vec<Range> {
        let Unlinked { mirror, live } = unlinked;
        if let Err(e) = mirror.handle.remove() {
            tracing::debug!(mirror = mirror.id, error = %e, "notifier already gone");
        }
        self.zap_mirror_pages(mirror.idx, mirror.range);
        live
    }

    /// Zaps what is left of a mirror's pages, flushes every engine that may cache them,
    /// waits, and frees the slots.
    fn zap_mirror_pages(&self, idx: MirrorIdx, range: Range) {
        let mut slots = Vec::new();
        let mut fences = Fences::default();
        let mut ext = ExternalFences::new();
        {
            let mut pt = self.core.pt();
            let first = range.start() / PAGE_SIZE as u64;
            let last = range.last() / PAGE_SIZE as u64;
            // The mirror's own engines lose their grant with it (revoked: told so, as if
            // evicted); others that may cache its pages are flushed.
            for e in pt.remove_external(|_, m| m == idx) {
                e.evict();
            }
            pt.zap(first, last, idx, &mut slots);
            pt.flush_external(first, last, None, false, &mut ext);
            let mask = pt.remove_mirror(idx);
            if mask != 0 {
                let req = FlushReq {
                    client: self.core.id,
                    scope: FlushScope::Pages { first, last },
                };
                self.dev.engines.flush_mask(mask, req, &mut fences);
            }
        }
        self.dev.engines.wait(&fences);
        self.dev.wait_external(&self.core, &ext);
        self.dev.free_slots(&self.core, &slots);
    }

    /// A live mirror containing `addr` that was not retired there (with overlapping
    /// mirrors, any of them: every invalidation of the address reaches each one's notifier,
    /// and a page is zapped by the notifier of the mirror that installed it).
    fn mirror_at(&self, addr: u64) -> Option<Arc<Mirror>> {
        let m = self.mirrors();
        let page = Range::new(addr - addr % PAGE_SIZE as u64, PAGE_SIZE as u64).ok()?;
        m.by_start
            .range(..=(addr, u64::MAX))
            .rev()
            .map(|(_, v)| v)
            .find(|v| v.range.contains(addr) && !v.retired_overlaps(&page))
            .map(Arc::clone)
    }

    /// The client's mirrors, in address order, with their pages as of every event read
    /// before the call (taken under the access lock, G1, like a read).
    pub fn mirror_list(&self) -> Vec<MirrorInfo> {
        let _g = self.lock_access();
        let mirrors: Vec<Arc<Mirror>> = self.mirrors().by_start.values().cloned().collect();
        let pt = self.core.pt();
        mirrors
            .iter()
            .map(|m| MirrorInfo {
                id: m.id,
                addr: m.range.start(),
                len: m.range.len(),
                seq: m.handle.seq(),
                state: m.handle.state(),
                pages: pt.mirror_pages(m.idx),
            })
            .collect()
    }

    /// Number of mirrors.
    pub fn mirror_count(&self) -> usize {
        self.mirrors().by_start.len()
    }

    /// A device read of `len` bytes at `addr` on the next engine (round robin).
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        let engine = self.dev.next_engine();
        self.read_on(engine, addr, len)
    }

    /// A device read on engine `engine`: queued under the access lock (G1), served by the
    /// engine from its TLB or the page table; pages it finds missing are faulted in (rule 2)
    /// and the read replayed.
    pub fn read_on(&self, engine: usize, addr: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        Range::new(addr, len as u64)?;
        let first = addr / PAGE_SIZE as u64;
        let last = (addr + len as u64 - 1) / PAGE_SIZE as u64;
        for _ in 0..MAX_REPLAYS {
            let (tx, rx) = crossbeam_channel::bounded(1);
            {
                let _g = self.lock_access();
                if self.core.pt().fenced(first, last) {
                    return self.read_fenced(addr, len);
                }
                let job = ReadJob {
                    client: Arc::clone(&self.core),
                    addr,
                    len,
                    reply: tx,
                };
                self.dev
                    .engines
                    .read(engine, job)
                    .map_err(|_| DeviceError::Stopped)?;
            }
            match rx.recv().map_err(|_| DeviceError::Stopped)? {
                ReadOutcome::Data(v) => {
                    bump(&self.core.counters.reads, 1);
                    return Ok(v);
                }
                ReadOutcome::Fault(pages) => self.service_fault(&pages)?,
            }
        }
        Err(DeviceError::FaultStorm { addr })
    }

    /// Why a read of the client's memory stopped at `addr`: that page is not readable (the
    /// source says so when asked for it alone), or not mapped.
    fn why_short(&self, addr: u64) -> DeviceError {
        let mut page = vec![0u8; PAGE_SIZE];
        match self
            .core
            .source
            .read_uncached(addr, &mut [IoSliceMut::new(&mut page)])
        {
            Err(e) => e.into(),
            Ok(_) => DeviceError::NotMapped { addr },
        }
    }

    /// A device read of a range with fenced pages, under the access lock (the caller's):
    /// served straight from the client's memory, nothing installed.
    ///
    /// A fence covers pages the kernel announced it will change (`MADV_DONTNEED`,
    /// `MADV_REMOVE`: the event comes *before* the zap, and the client's call is let go as
    /// soon as the event is read) and may not have changed yet. Bytes read there now may be
    /// the old ones, so they must never be installed: a copy in the shadow would outlive the
    /// zap. A read of the client's memory itself, though, is right for any device read
    /// issued after the client's call returned, because the kernel zaps before it returns.
    /// Holding the access lock keeps every mapping change whose event was read after this
    /// read began from happening under it (the client waits for that read).
    fn read_fenced(&self, addr: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        let page = PAGE_SIZE as u64;
        let start = addr - addr % page;
        let end = (addr + len as u64).next_multiple_of(page);
        let whole = Range::from_bounds(start, end)?;
        let mut at = start;
        while at < end {
            let m = self
                .mirror_at(at)
                .ok_or(DeviceError::NotMirrored { addr: at })?;
            let cut = m
                .range
                .intersection(&whole)
                .ok_or(DeviceError::NotMirrored { addr: at })?;
            if m.retired_overlaps(&cut) {
                return Err(DeviceError::NotMirrored { addr: at });
            }
            at = cut.last() + 1;
        }
        let mut buf = vec![0u8; (end - start) as usize];
        let got = self
            .core
            .source
            .read_uncached(start, &mut [IoSliceMut::new(&mut buf)])?;
        let off = (addr - start) as usize;
        if got < off + len {
            return Err(self.why_short(start + (got as u64 / page) * page));
        }
        bump(&self.core.counters.reads, 1);
        bump(&self.dev.counters.fenced_reads, 1);
        buf.truncate(off + len);
        buf.drain(..off);
        Ok(buf)
    }

    /// The account of the client's user (shadow pages, monitors).
    pub fn account(&self) -> &Arc<Account> {
        &self.core.account
    }

    /// The client's epoch page, opened anew read-only for a consumer outside the daemon
    /// (made here if no engine made it yet, under the access lock so that no event batch
    /// is half read when it comes into being).
    pub fn share_epoch(&self) -> Result<std::os::fd::OwnedFd, ExternalError> {
        external::read_only(self.ensure_epoch()?.file())
    }

    /// The client's epoch page, made if no engine or monitor made it yet (under the access
    /// lock, so that no event batch is half read when it comes into being).
    pub fn ensure_epoch(&self) -> Result<&EpochPage, ExternalError> {
        if let Some(e) = self.core.epoch.get() {
            return Ok(e);
        }
        let _g = self.lock_access();
        if self.core.epoch.get().is_none() {
            let _ = self.core.epoch.set(EpochPage::new()?);
        }
        self.core
            .epoch
            .get()
            .ok_or_else(|| ExternalError::Create(std::io::ErrorKind::NotFound.into()))
    }

    /// Makes the client's epoch odd before its events are read (no-op without engines or
    /// monitors).
    pub fn begin_event_read(&self) {
        if let Some(e) = self.core.epoch.get().filter(|_| epoch_on()) {
            e.begin_read();
        }
    }

    /// Makes the epoch even once the start passes of the events read are done.
    pub fn end_event_read(&self) {
        if let Some(e) = self.core.epoch.get().filter(|_| epoch_on()) {
            e.end_read();
        }
    }

    /// Attaches external engine `id` of process `pid` to mirror `mirror_id`: makes the
    /// client's epoch, shadow and the engine's page table and ring, all under the access
    /// lock (so no event batch is half read) and the device lock (so the table starts equal
    /// to the entries). Returns what the engine maps.
    pub fn attach_engine(
        &self,
        mirror_id: u64,
        id: u32,
        pid: i32,
    ) -> Result<EngineAttachment, DeviceError> {
        let g = self.lock_access();
        let mirror = self
            .mirrors()
            .by_start
            .values()
            .find(|m| m.id == mirror_id)
            .cloned()
            .ok_or(DeviceError::NoSuchMirror(mirror_id))?;
        let r = mirror.range;
        if self.core.pt().external_engines().count() >= super::MAX_EXTERNAL_ENGINES {
            return Err(DeviceError::TooManyEngines);
        }
        let made = (|| -> Result<_, ExternalError> {
            if self.core.epoch.get().is_none() {
                let _ = self.core.epoch.set(EpochPage::new()?);
            }
            let pt = Arc::new(SharedPt::new(r.start(), r.len())?);
            let engine = Arc::new(ExternalEngine::new(id, pid, pt.vpns())?);
            Ok((pt, engine))
        })();
        let (pt, engine) = made?;
        let shadow = self.core.shadow_in(&self.dev.pool)?;
        let a = EngineAttachment::new(self.core.epoch.get(), &pt, shadow, &engine, r)?;
        self.core
            .pt()
            .add_external(Arc::clone(&engine), pt, mirror.idx);
        drop(g);
        Ok(a)
    }

    /// Detaches an external engine (its session ended): it counts as having acknowledged
    /// everything from now on.
    pub fn detach_engine(&self, id: u32) {
        for e in self.core.pt().remove_external(|e, _| e.id() == id) {
            e.leave();
        }
    }

    /// True if the client has an external engine (its finishes may wait for one).
    pub fn has_external_engines(&self) -> bool {
        self.core.pt().external_engines().next().is_some()
    }

    /// A device (DMA) write of `bytes` at client address `addr`, which must lie in one
    /// mirror: written into the client's memory (where its mappings are writable), then the
    /// pages written are invalidated (event `SoftDirty`, as written pages are), so that no
    /// engine and no later fault keeps the old bytes. Returns the bytes written.
    pub fn device_write(&self, addr: u64, bytes: &[u8], engine: u32) -> Result<usize, DeviceError> {
        if bytes.is_empty() {
            return Ok(0);
        }
        let len = bytes.len() as u64;
        let range = Range::new(addr, len.max(1))?;
        if !self
            .mirrors()
            .by_start
            .values()
            .any(|m| m.range.contains(range.start()) && m.range.contains(range.last()))
        {
            return Err(DeviceError::NotMirrored { addr });
        }
        let n = self.core.source.write_bytes(addr, bytes)?;
        let first = addr - addr % PAGE_SIZE as u64;
        let end = (addr + n as u64).next_multiple_of(PAGE_SIZE as u64);
        if n > 0 {
            let pages = Range::new(first, end - first)?;
            let args = InvalidateArgs::new(pages, crate::notifier::Event::SoftDirty)
                .with_owner(external::owner(engine));
            self.invalidate(args)?;
        }
        Ok(n)
    }

    /// Faults in every page of `addr..addr+len` that is not yet in the shadow, without a
    /// device read (prefetch; also the mirror-bandwidth benchmark's path).
    ///
    /// G1: the page table is looked at under the access lock, like a read is queued, so an
    /// invalidation whose event was read before this was called has zapped its pages first
    /// (the client's munmap or madvise returns once the event is *read*, before its start
    /// pass). The lock is not held across the fault, which may wait for the event reader.
    pub fn populate(&self, addr: u64, len: u64) -> Result<(), DeviceError> {
        let r = Range::new(addr, len)?;
        let first = r.start() / PAGE_SIZE as u64;
        let last = r.last() / PAGE_SIZE as u64;
        let mut missing = Vec::new();
        let mut vpn = first;
        while vpn <= last {
            missing.clear();
            {
                // A bounded look per hold: the event reader waits for this lock.
                let _g = self.lock_access();
                let pt = self.core.pt();
                let stop = vpn.saturating_add((FAULT_BATCH * 16) as u64);
                while vpn <= last && vpn < stop {
                    // A fenced page is not installed now; a read of it is served anyway.
                    if pt.get(vpn).is_none() && !pt.fenced(vpn, vpn) {
                        missing.push(vpn);
                    }
                    vpn += 1;
                }
            }
            self.service_fault(&missing)?;
        }
        Ok(())
    }

    /// Serves a device fault on the (sorted) virtual pages `vpns`, in runs of contiguous
    /// pages of one mirror.
    fn service_fault(&self, vpns: &[u64]) -> Result<(), DeviceError> {
        let mut i = 0;
        while i < vpns.len() {
            let addr = vpns[i] * PAGE_SIZE as u64;
            let mirror = self
                .mirror_at(addr)
                .ok_or(DeviceError::NotMirrored { addr })?;
            let mirror_last_vpn = mirror.range.last() / PAGE_SIZE as u64;
            let mut j = i + 1;
            while j < vpns.len()
                && vpns[j] == vpns[j - 1] + 1
                && vpns[j] <= mirror_last_vpn
                && j - i < FAULT_BATCH
            {
                j += 1;
            }
            self.fault_run(&mirror, vpns[i], j - i)?;
            i = j;
        }
        Ok(())
    }

    /// Rule 2: `read_begin` → copy without locks → device lock → `read_retry` → install or
    /// start over.
    fn fault_run(&self, mirror: &Mirror, first_vpn: u64, n: usize) -> Result<(), DeviceError> {
        // A device fault per missing run (a read's, or a populate's), however many tries.
        bump(&self.core.counters.faults, 1);
        let addr = first_vpn * PAGE_SIZE as u64;
        let mut slots: Vec<SlotRef> = Vec::with_capacity(n);
        let run = Range::new(addr, (n * PAGE_SIZE) as u64)?;
        loop {
            let seq = mirror.handle.read_begin();
            if mirror.retired_overlaps(&run) {
                return Err(DeviceError::NotMirrored { addr });
            }
            self.alloc_run(n, &mut slots)?;
            let copied = self.copy_run(addr, &slots)?;
            let Some(unused) = self.install_run(mirror, seq, first_vpn, &slots, copied) else {
                bump(&self.dev.counters.fault_retries, 1);
                self.dev.free_slots(&self.core, &slots);
                slots.clear();
                continue;
            };
            let installed = n - unused.len();
            bump(&self.dev.counters.pages_mirrored, installed as u64);
            bump(
                &self.dev.counters.bytes_mirrored,
                (installed * PAGE_SIZE) as u64,
            );
            self.dev.free_slots(&self.core, &unused);
            if copied < n {
                return Err(self.why_short(addr + (copied * PAGE_SIZE) as u64));
            }
            return Ok(());
        }
    }

    /// Charges `n` pages and allocates their slots into `slots`, leaving the reserve to
    /// root and the daemon's user.
    fn alloc_run(&self, n: usize, slots: &mut Vec<SlotRef>) -> Result<(), DeviceError> {
        self.reserve_pages(n as u64)?;
        let keep = if self.core.account.privileged_user() {
            0
        } else {
            self.dev.reserved_slots.load(Ordering::Relaxed)
        };
        let allocated = self
            .core
            .shadow_in(&self.dev.pool)
            .and_then(|s| s.alloc_keeping(n, keep, slots));
        if let Err(e) = allocated {
            self.core.uncharge(n as u64);
            return Err(e.into());
        }
        Ok(())
    }

    /// Copies the client's pages from `addr` into the fresh `slots`, with no lock held;
    /// returns how many whole pages came (the slots are freed on an error).
    fn copy_run(&self, addr: u64, slots: &[SlotRef]) -> Result<usize, DeviceError> {
        let Some(shadow) = self.core.shadow() else {
            return Ok(0); // no slots were ever allocated, so `slots` is empty
        };
        let copied = {
            let mut iov: Vec<IoSliceMut<'_>> = slots
                .iter()
                // SAFETY: these slots were just allocated to us and are in no page table
                // yet, so this is the only reference to their memory.
                .map(|s| IoSliceMut::new(unsafe { shadow.slot_mut(s.slot) }))
                .collect();
            self.core.source.read_pages(addr, &mut iov)
        };
        match copied {
            Ok(c) => Ok(c / PAGE_SIZE),
            Err(e) => {
                self.dev.free_slots(&self.core, slots);
                Err(e.into())
            }
        }
    }

    /// Under the device lock: `None` if an invalidation touched the mirror since the
    /// `read_begin` that returned `seq` (the copy must be dropped), else installs the first
    /// `copied` slots from `first_vpn` and returns the slots not installed (not copied, or
    /// the page already had an entry).
    fn install_run(
        &self,
        mirror: &Mirror,
        seq: u64,
        first_vpn: u64,
        slots: &[SlotRef],
        copied: usize,
    ) -> Option<Vec<SlotRef>> {
        let mut pt = self.core.pt();
        if mirror.handle.read_retry(seq) {
            return None;
        }
        let mut unused = Vec::new();
        for (k, s) in slots.iter().enumerate() {
            let pte = Pte {
                slot: *s,
                mirror: mirror.idx,
            };
            if k >= copied || !pt.install(first_vpn + k as u64, pte) {
                unused.push(*s);
            }
        }
        Some(unused)
    }

    /// Charges `n` pages to the client's quota, then to its user's share.
    fn reserve_pages(&self, n: u64) -> Result<(), DeviceError> {
        let quota = self.core.quota_pages.load(Ordering::Relaxed);
        let c = &self.core.counters.pages;
        let mut cur = c.load(Ordering::Relaxed);
        loop {
            if cur + n > quota {
                return Err(DeviceError::QuotaExceeded {
                    quota_bytes: quota * PAGE_SIZE as u64,
                });
            }
            match c.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        if let Err(over) = self.core.account.charge(n) {
            c.fetch_sub(n, Ordering::Relaxed);
            return Err(DeviceError::UserQuotaExceeded {
                quota_bytes: over.quota_bytes,
            });
        }
        Ok(())
    }

    /// Releases the client (rule 8, G5): invalidates everything with event `Release` through
    /// the notifiers, then frees whatever a racing fault may have left and every mirror.
    pub fn release(&self) -> Result<Summary, DeviceError> {
        bump(&self.dev.counters.inv_release, 1);
        let summary = self.sub.release()?;
        let (live, dead) = {
            let mut m = self.mirrors();
            (std::mem::take(&mut m.by_start), std::mem::take(&mut m.dead))
        };
        for m in live.values().chain(dead.values()) {
            self.zap_mirror_pages(m.idx, m.range);
        }
        self.core.pt().shrink();
        Ok(summary)
    }

    /// The page table's entries (tests and equivalence checks).
    pub fn page_table_entries(&self) -> Vec<(u64, Pte)> {
        self.core.pt().entries().collect()
    }

    /// Page-table entries present.
    pub fn page_table_len(&self) -> usize {
        self.core.pt().len()
    }
}

impl Drop for DeviceClient {
    fn drop(&mut self) {
        if !self.sub.is_released() {
            if let Err(e) = self.release() {
                tracing::warn!(client = self.core.id, error = %e, "release on drop failed");
            }
        }
    }
}
