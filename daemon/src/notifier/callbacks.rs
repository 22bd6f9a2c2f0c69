//! What a notifier implements, and what its callbacks are told (docs/design.md §3 rules 3, 5, 7, 9).
//!
//! A notifier is either [`OnePass`] (one `invalidate` callback) or [`TwoPass`]
//! (`invalidate_start` + `invalidate_finish`). They are separate traits with no default
//! methods, so a two-pass notifier with only one of its halves does not compile — the
//! kernel can only `WARN_ON_ONCE` at run time:
//!
//! ```compile_fail,E0046
//! use memshadow_daemon::notifier::{Invalidate, TwoPass, WouldBlock};
//! struct HalfDone;
//! impl TwoPass for HalfDone {
//!     type Finish = ();
//!     fn invalidate_start(&self, inv: &Invalidate<'_>) -> Result<Option<()>, WouldBlock> {
//!         inv.set_seq();
//!         Ok(Some(()))
//!     }
//!     // no invalidate_finish: error[E0046]: not all trait items implemented
//! }
//! ```

use crate::lock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::range::Range;

/// Why an invalidation happens (rule 9), mirroring the kernel's `mmu_notifier_event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// The range was unmapped: `munmap`, the source of an `mremap`, or an `mmap` over it.
    Unmap,
    /// Page table entries were cleared: `madvise(MADV_DONTNEED/FREE/REMOVE)`.
    Clear,
    /// The protection of a whole VMA changed (`mprotect`).
    ProtectionVma,
    /// The protection of individual pages changed.
    ProtectionPage,
    /// Pages were written (seen by a dirty-tracking back end).
    SoftDirty,
    /// The client is gone; the whole address space is invalidated (rule 8).
    Release,
}

impl Event {
    /// Every event kind, in a stable order (for per-kind counters).
    pub const ALL: [Event; 6] = [
        Event::Unmap,
        Event::Clear,
        Event::ProtectionVma,
        Event::ProtectionPage,
        Event::SoftDirty,
        Event::Release,
    ];

    /// Stable lowercase name, as used in logs, counters and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Unmap => "unmap",
            Event::Clear => "clear",
            Event::ProtectionVma => "protection-vma",
            Event::ProtectionPage => "protection-page",
            Event::SoftDirty => "soft-dirty",
            Event::Release => "release",
        }
    }

    /// Position in [`Event::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Who caused an invalidation (rule 9), so a callback can skip the ones it caused itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner(pub u64);

/// What is invalidated, why, by whom, and whether callbacks may block (rule 7).
#[derive(Clone, Copy, Debug)]
pub struct InvalidateArgs {
    /// The invalidated range.
    pub range: Range,
    /// Why.
    pub event: Event,
    /// Who caused it, if anyone said.
    pub owner: Option<Owner>,
    /// Whether callbacks may block. On a non-blockable range a callback that would have to
    /// block refuses with [`WouldBlock`].
    pub blockable: bool,
}

impl InvalidateArgs {
    /// A blockable invalidation of `range` with no owner.
    pub fn new(range: Range, event: Event) -> Self {
        InvalidateArgs {
            range,
            event,
            owner: None,
            blockable: true,
        }
    }

    /// The same invalidation, on a non-blockable range.
    pub fn non_blockable(mut self) -> Self {
        self.blockable = false;
        self
    }

    /// The same invalidation, caused by `owner`.
    pub fn with_owner(mut self, owner: Owner) -> Self {
        self.owner = Some(owner);
        self
    }
}

/// A callback's refusal to block on a non-blockable range (rule 7).
///
/// It can only be obtained from [`Invalidate::refuse`], which gives one only when the range
/// is non-blockable: on a blockable range a callback *cannot* refuse.
#[derive(Debug, PartialEq, Eq)]
pub struct WouldBlock {
    _proof: (),
}

/// What a callback is told about the invalidation it runs in, and the way it records the
/// invalidation's sequence in its notifier (rule 3).
#[derive(Debug)]
pub struct Invalidate<'a> {
    pub(super) args: &'a InvalidateArgs,
    pub(super) seq: u64,
    pub(super) notifier_seq: &'a AtomicU64,
    pub(super) notifier_range: Range,
    pub(super) notifier_id: u64,
}

impl Invalidate<'_> {
    /// The invalidated range (may extend beyond this notifier's).
    pub fn range(&self) -> Range {
        self.args.range
    }

    /// The part of the invalidated range that this notifier covers.
    pub fn affected(&self) -> Range {
        // Both overlap by construction of the walk.
        self.args
            .range
            .intersection(&self.notifier_range)
            .unwrap_or(self.notifier_range)
    }

    /// This notifier's range.
    pub fn notifier_range(&self) -> Range {
        self.notifier_range
    }

    /// This notifier's id.
    pub fn notifier_id(&self) -> u64 {
        self.notifier_id
    }

    /// Why the range is invalidated.
    pub fn event(&self) -> Event {
        self.args.event
    }

    /// Who caused it.
    pub fn owner(&self) -> Option<Owner> {
        self.args.owner
    }

    /// Whether the callback may block.
    pub fn blockable(&self) -> bool {
        self.args.blockable
    }

    /// The (odd) sequence of this invalidation; every callback of it sees the same value.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Records this invalidation's sequence in the notifier, so that every reader that
    /// began earlier retries (rule 3). Call it under the device lock, before returning
    /// success from `invalidate` or `invalidate_start`.
    pub fn set_seq(&self) {
        self.notifier_seq.store(self.seq, Ordering::Release);
    }

    /// A refusal to block, if the range allows one (non-blockable); `None` on a blockable
    /// range, where the callback must do its work whatever it costs.
    pub fn refuse(&self) -> Option<WouldBlock> {
        (!self.args.blockable).then_some(WouldBlock { _proof: () })
    }
}

/// A notifier that invalidates in one callback: it must be done — translations gone and no
/// longer in use — when `invalidate` returns.
pub trait OnePass: Send + Sync + 'static {
    /// Invalidates the notifier's part of `inv.range()`, calling `inv.set_seq()` under the
    /// device lock. May refuse only on a non-blockable range.
    fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock>;
}

/// A notifier that invalidates in two passes: `invalidate_start` begins the work (zap,
/// queue flushes) and returns what `invalidate_finish` needs to complete it (wait, free).
///
/// The core runs every start of a walk before any finish, and the finishes after the walk in
/// start order (rule 6). A start that has nothing to wait for returns `Ok(None)`: it acted
/// as a full invalidation and gets no finish.
pub trait TwoPass: Send + Sync + 'static {
    /// State carried from start to finish (e.g. the fences to wait for). The core keeps it in
    /// a per-notifier slab reused across invalidations, so a steady state allocates nothing.
    type Finish: Send + 'static;

    /// Begins invalidating the notifier's part of `inv.range()`, calling `inv.set_seq()`
    /// under the device lock. May refuse only on a non-blockable range.
    fn invalidate_start(&self, inv: &Invalidate<'_>) -> Result<Option<Self::Finish>, WouldBlock>;

    /// Completes what `invalidate_start` began. Takes no range and no sequence, and cannot
    /// fail.
    fn invalidate_finish(&self, finish: Self::Finish);
}

/// Type-erased two-pass notifier: the finish state is parked in the adapter's slab and the
/// walk carries only its index.
pub(super) trait ErasedTwoPass: Send + Sync {
    fn start(&self, inv: &Invalidate<'_>) -> Result<Option<u32>, WouldBlock>;
    fn finish(&self, token: u32);
}

/// A reusable slab of finish states: `Vec` slots and a free list, grown to the largest
/// number of invalidations of one notifier that were ever in flight at once.
struct TokenSlab<F> {
    slots: Vec<Option<F>>,
    free: Vec<u32>,
}

struct TwoPassAdapter<T: TwoPass> {
    inner: Arc<T>,
    slab: Mutex<TokenSlab<T::Finish>>,
}

impl<T: TwoPass> ErasedTwoPass for TwoPassAdapter<T> {
    fn start(&self, inv: &Invalidate<'_>) -> Result<Option<u32>, WouldBlock> {
        let Some(finish) = self.inner.invalidate_start(inv)? else {
            return Ok(None);
        };
        let mut slab = lock(&self.slab);
        let idx = match slab.free.pop() {
            Some(idx) => {
                slab.slots[idx as usize] = Some(finish);
                idx
            }
            None => {
                slab.slots.push(Some(finish));
                u32::try_from(slab.slots.len() - 1).expect("finish slab exceeds u32 indices")
            }
        };
        Ok(Some(idx))
    }

    fn finish(&self, token: u32) {
        let finish = {
            let mut slab = lock(&self.slab);
            let f = slab.slots.get_mut(token as usize).and_then(Option::take);
            if f.is_some() {
                slab.free.push(token);
            }
            f
        };
        match finish {
            Some(f) => self.inner.invalidate_finish(f),
            None => tracing::error!(token, "finish token missing: core bookkeeping bug"),
        }
    }
}

/// The callbacks of a notifier, as inserted into a subscription.
#[derive(Clone)]
pub struct Callbacks(pub(super) Kind);

#[derive(Clone)]
pub(super) enum Kind {
    OnePass(Arc<dyn OnePass>),
    TwoPass(Arc<dyn ErasedTwoPass>),
}

impl Callbacks {
    /// A one-pass notifier.
    pub fn one_pass<T: OnePass>(notifier: Arc<T>) -> Self {
        Callbacks(Kind::OnePass(notifier))
    }

    /// A two-pass notifier.
    pub fn two_pass<T: TwoPass>(notifier: Arc<T>) -> Self {
        Callbacks(Kind::TwoPass(Arc::new(TwoPassAdapter {
            inner: notifier,
            slab: Mutex::new(TokenSlab {
                slots: Vec::new(),
                free: Vec::new(),
            }),
        })))
    }

    /// True for a two-pass notifier.
    pub fn is_two_pass(&self) -> bool {
        matches!(self.0, Kind::TwoPass(_))
    }
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_two_pass() {
            "Callbacks::TwoPass"
        } else {
            "Callbacks::OnePass"
        })
    }
}
