//! One client's ("mm's") set of interval notifiers and the invalidation machinery over it
//! (docs/design.md §3 rules 1–8).
//!
//! Locking follows `mm/mmu_notifier.c`: one small mutex (the kernel's spinlock) guards the
//! sequence, the active count, the deferred list and the tree *pointer*. A walker bumps the
//! active count, takes a snapshot `Arc` of the tree and walks it without the mutex: the tree
//! is only ever changed while no invalidation is active (changes requested meanwhile are
//! deferred, rule 4), so the snapshot is the live tree and `Arc::make_mut` never copies.
//!
//! The states of the sequence, how a reader and an invalidation interleave, and why the
//! order of their steps makes a stale install impossible are written out in the module
//! docs of [`crate::notifier`].

use crate::lock;
use std::cell::Cell;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::callbacks::{Callbacks, Event, Invalidate, InvalidateArgs, Kind, WouldBlock};
use super::range::Range;
use super::tree::IntervalTree;

/// Errors of notifier insertion and removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotifierError {
    /// The subscription was released (its client is gone); nothing can be added.
    #[error("subscription released")]
    Released,
    /// The notifier was already removed (or released).
    #[error("notifier already removed")]
    AlreadyRemoved,
    /// `remove` was called from inside a notifier callback, where waiting for the
    /// invalidation in progress would deadlock (rule 4).
    #[error("notifier removal from inside a callback")]
    RemoveFromCallback,
}

/// Errors of an invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidateError {
    /// A callback refused to block on a non-blockable range (`EAGAIN`, rule 7). The started
    /// notifiers were finished and the invalidation has already ended: do not end it again.
    #[error("invalidation would block")]
    WouldBlock(Summary),
    /// The subscription was released.
    #[error("subscription released")]
    Released,
    /// `release` was called from inside a notifier callback.
    #[error("release from inside a callback")]
    ReleaseFromCallback,
}

/// What one invalidation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// The sequence callbacks recorded (odd if the invalidation hit a notifier).
    pub seq: u64,
    /// Notifiers whose callback ran and accepted.
    pub hits: u32,
    /// Of those, one-pass notifiers.
    pub one_pass: u32,
    /// Two-pass starts that returned a finish.
    pub started: u32,
    /// Finishes run.
    pub finished: u32,
    /// A callback refused (non-blockable range); the walk stopped there.
    pub refused: bool,
    /// Time of the walk (one-pass callbacks and two-pass starts).
    pub start_time: Duration,
    /// Time of the finish pass.
    pub finish_time: Duration,
}

const PENDING_INSERT: u8 = 0;
const IN_TREE: u8 = 1;
const PENDING_REMOVE: u8 = 2;
const REMOVED: u8 = 3;

/// A notifier as the core stores it.
pub(super) struct Node {
    id: u64,
    range: Range,
    /// The sequence of the last invalidation that touched this notifier (always odd).
    seq: AtomicU64,
    callbacks: Kind,
    /// One of the `PENDING_INSERT`.. constants; written only under the state mutex.
    status: AtomicU8,
}

enum Deferred {
    Insert(Arc<Node>),
    Remove(Arc<Node>),
}

struct State {
    tree: Arc<IntervalTree<Arc<Node>>>,
    /// Even when idle, odd while an invalidation that hit a notifier (or that a deferred
    /// change rides on) is active; moves on only when `active` drops to zero.
    seq: u64,
    /// Invalidations in progress.
    active: u32,
    /// Tree changes requested while `active > 0`, applied in order when it drops to zero.
    deferred: Vec<Deferred>,
    /// Threads waiting on `cond`; `end` wakes only when there is one.
    waiters: u32,
    released: bool,
    /// Finish lists of ended invalidations, kept for reuse so the walk does not allocate.
    pool: Vec<Vec<Pending>>,
}

/// Two-pass notifiers whose start returned a finish, in start order.
struct Pending {
    node: Arc<Node>,
    token: u32,
}

/// What [`Inner::enter`] hands a new invalidation.
struct Entered {
    tree: Arc<IntervalTree<Arc<Node>>>,
    pending: Vec<Pending>,
    seq: u64,
}

struct Inner {
    state: Mutex<State>,
    cond: Condvar,
    next_id: AtomicU64,
    observer: OnceLock<Arc<dyn Observer>>,
}

/// Sees the invalidations of a subscription begin and end, like the kernel's
/// `mmu_notifier` tracepoints: for tracing and statistics, never for coherence. Both calls
/// run outside the subscription's lock, on the invalidating thread (`ended` on the thread
/// that runs the finish pass), and must not block.
pub trait Observer: Send + Sync {
    /// An invalidation is beginning. Returning `None` skips `ended` for it; a mark is handed
    /// back to `ended` (e.g. counter values to take a difference from).
    fn began(&self, args: &InvalidateArgs) -> Option<[u64; 2]>;
    /// It ended (finished, or refused with `EAGAIN` after finishing what started).
    fn ended(&self, args: &InvalidateArgs, summary: &Summary, mark: [u64; 2]);
}

thread_local! {
    /// How many notifier callbacks this thread is inside (to refuse `remove` from one).
    static IN_CALLBACK: Cell<u32> = const { Cell::new(0) };
}

/// Marks the current thread as running notifier callbacks for as long as it lives.
struct CallbackScope;

impl CallbackScope {
    fn enter() -> CallbackScope {
        IN_CALLBACK.with(|c| c.set(c.get() + 1));
        CallbackScope
    }

    fn active() -> bool {
        IN_CALLBACK.with(|c| c.get() > 0)
    }
}

impl Drop for CallbackScope {
    fn drop(&mut self) {
        IN_CALLBACK.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// A client's interval notifiers, their sequence and the invalidations running over them.
///
/// Cheap to clone; clones share the same set.
#[derive(Clone)]
pub struct Subscription {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("Subscription")
            .field("notifiers", &st.tree.len())
            .field("seq", &st.seq)
            .field("active", &st.active)
            .field("deferred", &st.deferred.len())
            .field("released", &st.released)
            .finish()
    }
}

impl Default for Subscription {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Callbacks run outside this mutex, so a poisoned state can only come from a panic in
        // the core itself; the state is still consistent at every unlock point.
        lock(&self.state)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cond
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more invalidation active and hands it the tree to walk (a snapshot that is
    /// the live tree as long as it is active, rule 4), a finish list from the pool, and the
    /// sequence as it is now. Refused once released, except for the release's own.
    fn enter(&self, release: bool) -> Result<Entered, InvalidateError> {
        let mut st = self.lock();
        if st.released && !release {
            return Err(InvalidateError::Released);
        }
        st.active += 1;
        Ok(Entered {
            tree: Arc::clone(&st.tree),
            pending: st.pool.pop().unwrap_or_default(),
            seq: st.seq,
        })
    }

    /// The first notifier hit of a walk makes the sequence odd (rule 1) and returns it. No
    /// tree change and no end can happen while the walk's invalidation is active, so doing
    /// it here rather than with a second lookup under the lock is equivalent: every
    /// concurrent invalidation that hits sees the same odd value.
    fn first_hit(&self) -> u64 {
        let mut st = self.lock();
        st.seq |= 1;
        st.seq
    }

    /// Ends one invalidation, returning its (emptied) finish list for reuse: the last one
    /// to end moves the sequence on, applies the deferred tree changes and wakes the
    /// waiters (rule 2, rule 4).
    fn end(&self, pending: Vec<Pending>) {
        let mut dropped = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            if pending.capacity() > 0 && pending.is_empty() && st.pool.len() < 16 {
                st.pool.push(pending);
            }
            st.active -= 1;
            if st.active > 0 {
                return;
            }
            if st.seq & 1 == 1 {
                st.seq += 1;
            }
            if !st.deferred.is_empty() {
                let tree = Arc::make_mut(&mut st.tree);
                for d in st.deferred.drain(..) {
                    match d {
                        Deferred::Insert(node) => {
                            node.status.store(IN_TREE, Ordering::Relaxed);
                            tree.insert(node.range, node.id, node);
                        }
                        Deferred::Remove(node) => {
                            node.status.store(REMOVED, Ordering::Relaxed);
                            if let Some(n) = tree.remove(node.range, node.id) {
                                dropped.push(n);
                            }
                            dropped.push(node);
                        }
                    }
                }
            }
            if st.waiters > 0 {
                self.cond.notify_all();
            }
        }
        // Notifier callbacks' own state is dropped here, outside the mutex.
        drop(dropped);
    }
}

impl Subscription {
    /// An empty subscription set with an even (idle) sequence.
    pub fn new() -> Self {
        Subscription {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    tree: Arc::new(IntervalTree::new()),
                    seq: 2,
                    active: 0,
                    deferred: Vec::new(),
                    waiters: 0,
                    released: false,
                    pool: Vec::new(),
                }),
                cond: Condvar::new(),
                observer: OnceLock::new(),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Inserts a notifier over `range` (rule 4: deferred while an invalidation is active, in
    /// which case the notifier starts in a state where `read_begin` waits).
    pub fn insert(
        &self,
        range: Range,
        callbacks: Callbacks,
    ) -> Result<NotifierHandle, NotifierError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(Node {
            id,
            range,
            seq: AtomicU64::new(0),
            callbacks: callbacks.0,
            status: AtomicU8::new(PENDING_INSERT),
        });
        let mut guard = self.inner.lock();
        let st = &mut *guard;
        if st.released {
            return Err(NotifierError::Released);
        }
        if st.active > 0 {
            // Make sure the end of the active invalidations moves the sequence on, and have
            // the new notifier's readers wait for it.
            st.seq |= 1;
            node.seq.store(st.seq, Ordering::Release);
            st.deferred.push(Deferred::Insert(Arc::clone(&node)));
        } else {
            // An odd value the subscription's sequence will never take again.
            node.seq.store(st.seq - 1, Ordering::Release);
            node.status.store(IN_TREE, Ordering::Relaxed);
            Arc::make_mut(&mut st.tree).insert(range, id, Arc::clone(&node));
        }
        drop(guard);
        Ok(NotifierHandle {
            inner: Arc::clone(&self.inner),
            node,
        })
    }

    /// Invalidates `args.range`: one-pass callbacks and two-pass starts in start-address
    /// order, then the finishes in start order, then the end (rules 5–7).
    pub fn invalidate(&self, args: InvalidateArgs) -> Result<Summary, InvalidateError> {
        Ok(self.begin_invalidate(args)?.finish())
    }

    /// Runs the start pass of an invalidation and returns the invalidation, still in
    /// progress (sequence odd): its finish pass runs when [`Invalidation::finish`] is called
    /// or the handle is dropped, possibly on another thread.
    ///
    /// On a refusal the finish pass has already run for every start that succeeded and the
    /// invalidation has ended (rule 7).
    pub fn begin_invalidate(&self, args: InvalidateArgs) -> Result<Invalidation, InvalidateError> {
        self.begin(args, false)
    }

    /// Installs the subscription's observer; only the first one sticks (returns false
    /// if one was already set).
    pub fn set_observer(&self, observer: Arc<dyn Observer>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Begins an invalidation (`release`: the one of [`Subscription::release`], allowed
    /// after the release flag is set): counts it active, runs the start pass over a snapshot
    /// of the tree, and returns it with the finish pass still to run, or refused (rule 7)
    /// after finishing what started.
    fn begin(&self, args: InvalidateArgs, release: bool) -> Result<Invalidation, InvalidateError> {
        let t0 = Instant::now();
        let Entered { tree, pending, seq } = self.inner.enter(release)?;
        let mut inv = Invalidation::open(Arc::clone(&self.inner), args, pending);
        let (seq, refused) = inv.walk(&tree, seq);
        drop(tree);
        inv.summary.seq = seq;
        inv.summary.start_time = t0.elapsed();
        inv.span.record("seq", seq);
        if refused {
            inv.summary.refused = true;
            return Err(InvalidateError::WouldBlock(inv.finish()));
        }
        Ok(inv)
    }

    /// Releases the subscription (rule 8): waits for invalidations in flight, invalidates
    /// the whole address space with [`Event::Release`] through the same one/two-pass
    /// dispatch, then removes every notifier. Afterwards inserts and invalidations are
    /// refused.
    pub fn release(&self) -> Result<Summary, InvalidateError> {
        if CallbackScope::active() {
            return Err(InvalidateError::ReleaseFromCallback);
        }
        {
            let mut st = self.inner.lock();
            if st.released {
                return Err(InvalidateError::Released);
            }
            st.released = true;
            st.waiters += 1;
            while st.active > 0 {
                st = self.inner.wait(st);
            }
            st.waiters -= 1;
        }
        let summary = self
            .begin(InvalidateArgs::new(Range::FULL, Event::Release), true)?
            .finish();
        let nodes = {
            let mut guard = self.inner.lock();
            let st = &mut *guard;
            let nodes = Arc::make_mut(&mut st.tree).drain();
            for n in &nodes {
                n.status.store(REMOVED, Ordering::Relaxed);
            }
            nodes
        };
        drop(nodes);
        Ok(summary)
    }

    /// The subscription's current sequence (even when idle).
    pub fn seq(&self) -> u64 {
        self.inner.lock().seq
    }

    /// Invalidations in progress.
    pub fn active(&self) -> u32 {
        self.inner.lock().active
    }

    /// Notifiers in the tree (not counting deferred inserts).
    pub fn len(&self) -> usize {
        self.inner.lock().tree.len()
    }

    /// True if no notifier is in the tree.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once `release` has run.
    pub fn is_released(&self) -> bool {
        self.inner.lock().released
    }

    /// Calls `f` with the range and id of every notifier in the tree, in start order.
    pub fn for_each_notifier(&self, mut f: impl FnMut(Range, u64)) {
        let tree = Arc::clone(&self.inner.lock().tree);
        tree.for_each(|r, n| f(r, n.id));
    }
}

/// Runs `node`'s one-pass callback or two-pass start for `ctx`, counting it in `summary`
/// and queuing a two-pass finish in `pending`; checks that an accepting callback recorded
/// the sequence (rule 3).
fn call_start(
    node: &Arc<Node>,
    ctx: &Invalidate<'_>,
    summary: &mut Summary,
    pending: &mut Vec<Pending>,
) -> Result<(), WouldBlock> {
    match &node.callbacks {
        Kind::OnePass(cb) => {
            cb.invalidate(ctx)?;
            summary.one_pass += 1;
        }
        Kind::TwoPass(cb) => {
            if let Some(token) = cb.start(ctx)? {
                summary.started += 1;
                pending.push(Pending {
                    node: Arc::clone(node),
                    token,
                });
            }
        }
    }
    summary.hits += 1;
    let recorded = node.seq.load(Ordering::Acquire);
    if recorded != ctx.seq {
        tracing::error!(
            notifier = node.id,
            seq = ctx.seq,
            recorded,
            "callback did not set_seq"
        );
        debug_assert_eq!(
            recorded, ctx.seq,
            "notifier callback must call set_seq (rule 3)"
        );
    }
    Ok(())
}

/// An invalidation whose start pass has run and whose finish pass has not: the
/// subscription's sequence stays odd and `read_begin` of the notifiers it hit waits until it
/// (and every other concurrent invalidation) has ended.
///
/// Dropping it runs the finish pass, so a finish can never be lost (G3).
pub struct Invalidation {
    inner: Arc<Inner>,
    pending: Vec<Pending>,
    summary: Summary,
    span: tracing::Span,
    ended: bool,
    args: InvalidateArgs,
    mark: Option<[u64; 2]>,
}

impl std::fmt::Debug for Invalidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidation")
            .field("summary", &self.summary)
            .field("pending", &self.pending.len())
            .field("ended", &self.ended)
            .finish()
    }
}

/// Ends the invalidation even if a finish callback panics, so the subscription can never be
/// left with an active count that does not drop.
struct EndGuard<'a> {
    inner: &'a Inner,
    pending: Vec<Pending>,
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        self.pending.clear();
        self.inner.end(std::mem::take(&mut self.pending));
    }
}

impl Invalidation {
    /// An invalidation of `args` just counted active, with the finish list `pending`: its
    /// span, and the observer told it began.
    fn open(inner: Arc<Inner>, args: InvalidateArgs, pending: Vec<Pending>) -> Invalidation {
        let span = tracing::debug_span!(
            "invalidate",
            start = args.range.start(),
            last = args.range.last(),
            event = args.event.as_str(),
            seq = tracing::field::Empty,
        );
        let mark = inner.observer.get().and_then(|o| o.began(&args));
        Invalidation {
            inner,
            pending,
            summary: Summary::default(),
            span,
            ended: false,
            args,
            mark,
        }
    }

    /// The start pass: calls every notifier of `tree` that overlaps the range, in start
    /// order, with the sequence (made odd at the first hit). Returns the sequence the
    /// callbacks saw (`seq`, unchanged, if none was hit) and whether one refused, which
    /// stops the walk (rule 7).
    fn walk(&mut self, tree: &IntervalTree<Arc<Node>>, mut seq: u64) -> (u64, bool) {
        let _enter = self.span.enter();
        let _scope = CallbackScope::enter();
        let mut first = true;
        let refused = tree
            .for_each_overlap(self.args.range, |node| {
                if first {
                    first = false;
                    seq = self.inner.first_hit();
                }
                let ctx = Invalidate {
                    args: &self.args,
                    seq,
                    notifier_seq: &node.seq,
                    notifier_range: node.range,
                    notifier_id: node.id,
                };
                match call_start(node, &ctx, &mut self.summary, &mut self.pending) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            })
            .is_break();
        (seq, refused)
    }

    /// What the start pass did so far.
    pub fn summary(&self) -> Summary {
        self.summary
    }

    /// Runs the finish pass (in start order) and ends the invalidation.
    pub fn finish(mut self) -> Summary {
        self.complete()
    }

    fn complete(&mut self) -> Summary {
        if self.ended {
            return self.summary;
        }
        self.ended = true;
        let inner = Arc::clone(&self.inner);
        let mut end = EndGuard {
            inner: &inner,
            pending: std::mem::take(&mut self.pending),
        };
        let _enter = self.span.enter();
        if !end.pending.is_empty() {
            let t = Instant::now();
            let _scope = CallbackScope::enter();
            for p in end.pending.drain(..) {
                if let Kind::TwoPass(cb) = &p.node.callbacks {
                    cb.finish(p.token);
                }
                self.summary.finished += 1;
            }
            self.summary.finish_time = t.elapsed();
        }
        drop(end);
        tracing::debug!(
            hits = self.summary.hits,
            started = self.summary.started,
            refused = self.summary.refused,
            start_ns = u64::try_from(self.summary.start_time.as_nanos()).unwrap_or(u64::MAX),
            finish_ns = u64::try_from(self.summary.finish_time.as_nanos()).unwrap_or(u64::MAX),
            "invalidation ended"
        );
        if let (Some(o), Some(mark)) = (self.inner.observer.get(), self.mark) {
            o.ended(&self.args, &self.summary, mark);
        }
        self.summary
    }
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        self.complete();
    }
}

/// A handle on one inserted notifier: the reader side of rule 2 and its removal.
pub struct NotifierHandle {
    inner: Arc<Inner>,
    node: Arc<Node>,
}

impl std::fmt::Debug for NotifierHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifierHandle")
            .field("id", &self.node.id)
            .field("range", &self.node.range)
            .field("seq", &self.node.seq.load(Ordering::Relaxed))
            .field("state", &self.state())
            .finish()
    }
}

impl NotifierHandle {
    /// The notifier's id, unique within its subscription.
    pub fn id(&self) -> u64 {
        self.node.id
    }

    /// The notifier's range.
    pub fn range(&self) -> Range {
        self.node.range
    }

    /// The sequence of the last invalidation that touched the notifier.
    pub fn seq(&self) -> u64 {
        self.node.seq.load(Ordering::Acquire)
    }

    /// Where the notifier is: `"pending-insert"`, `"active"`, `"pending-remove"` or
    /// `"removed"`.
    pub fn state(&self) -> &'static str {
        match self.node.status.load(Ordering::Relaxed) {
            PENDING_INSERT => "pending-insert",
            IN_TREE => "active",
            PENDING_REMOVE => "pending-remove",
            _ => "removed",
        }
    }

    /// Begins a read of the mirrored range (rule 2): returns the sequence to check with
    /// [`read_retry`](Self::read_retry), first waiting, if an invalidation that covers this
    /// notifier is in progress, until every concurrent invalidation has ended.
    pub fn read_begin(&self) -> u64 {
        let mut st = self.inner.lock();
        let seq = self.node.seq.load(Ordering::Acquire);
        // The notifier's sequence is always odd; it equals the subscription's only while an
        // invalidation that touched it (or a deferred insert of it) is in progress.
        if seq == st.seq {
            st.waiters += 1;
            while st.seq == seq {
                st = self.inner.wait(st);
            }
            st.waiters -= 1;
        }
        seq
    }

    /// Like [`read_begin`](Self::read_begin) but returns `None` instead of waiting.
    pub fn try_read_begin(&self) -> Option<u64> {
        let st = self.inner.lock();
        let seq = self.node.seq.load(Ordering::Acquire);
        (seq != st.seq).then_some(seq)
    }

    /// True if an invalidation touched the notifier since the `read_begin` that returned
    /// `seq`. Authoritative when called under the device lock that callbacks take around
    /// `set_seq` (rule 2).
    pub fn read_retry(&self, seq: u64) -> bool {
        self.node.seq.load(Ordering::Acquire) != seq
    }

    /// A lock-free hint that a read begun at `seq` will have to retry; a `false` proves
    /// nothing until [`read_retry`](Self::read_retry) confirms it under the device lock.
    pub fn check_retry(&self, seq: u64) -> bool {
        self.node.seq.load(Ordering::Relaxed) != seq
    }

    /// Removes the notifier (rule 4). If invalidations are in progress the removal is
    /// deferred and this waits until none of them can still call the notifier: after it
    /// returns, the notifier's callbacks never run again. Must not be called from a
    /// callback.
    pub fn remove(&self) -> Result<(), NotifierError> {
        if CallbackScope::active() {
            return Err(NotifierError::RemoveFromCallback);
        }
        let mut guard = self.inner.lock();
        let st = &mut *guard;
        match self.node.status.load(Ordering::Relaxed) {
            PENDING_INSERT => {
                // Never reached the tree, so no callback of it ever ran.
                let id = self.node.id;
                st.deferred
                    .retain(|d| !matches!(d, Deferred::Insert(n) if n.id == id));
                self.node.status.store(REMOVED, Ordering::Relaxed);
                Ok(())
            }
            IN_TREE if st.active == 0 => {
                self.node.status.store(REMOVED, Ordering::Relaxed);
                let removed = Arc::make_mut(&mut st.tree).remove(self.node.range, self.node.id);
                drop(guard);
                drop(removed);
                Ok(())
            }
            IN_TREE => {
                st.seq |= 1;
                let wait_for = st.seq;
                self.node.status.store(PENDING_REMOVE, Ordering::Relaxed);
                st.deferred.push(Deferred::Remove(Arc::clone(&self.node)));
                self.wait_seq_change(guard, wait_for);
                Ok(())
            }
            PENDING_REMOVE => {
                // Another thread is removing it; still honour "no callback after return".
                let wait_for = st.seq;
                self.wait_seq_change(guard, wait_for);
                Err(NotifierError::AlreadyRemoved)
            }
            _ => Err(NotifierError::AlreadyRemoved),
        }
    }

    fn wait_seq_change(&self, mut st: MutexGuard<'_, State>, seq: u64) {
        st.waiters += 1;
        while st.seq == seq {
            st = self.inner.wait(st);
        }
        st.waiters -= 1;
    }
}
