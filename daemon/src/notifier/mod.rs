//! The notifier core: per-client interval notifiers with one-pass and two-pass invalidation,
//! after the kernel's `mmu_interval_notifier` (docs/design.md §3).
//!
//! It knows nothing of uffd, sockets or engines: event sources call
//! [`Subscription::invalidate`] (or [`Subscription::begin_invalidate`] to keep the finish
//! pass off their path) with a range and an [`Event`]; consumers such as the device model
//! implement [`OnePass`] or [`TwoPass`] and read with the [`NotifierHandle::read_begin`] /
//! [`NotifierHandle::read_retry`] pattern:
//!
//! ```text
//! seq = handle.read_begin()          // waits while an invalidation covers the notifier
//! copy pages without locks
//! lock device
//! if handle.read_retry(seq) { unlock; start over }
//! install translations
//! unlock device
//! ```
//!
//! # The invariants
//!
//! This is a retry protocol, like a seqlock with many writers at once: an invalidation never
//! waits for a reader's copy, and a reader that raced an invalidation notices and starts
//! over. What follows is what
//! makes it correct; the rule numbers are those of docs/design.md §3.
//!
//! **Two sequences.** A [`Subscription`] (one per client, rule 1) keeps one sequence, `seq`,
//! and a count of the invalidations in progress, `active`, both under its state mutex. Each
//! notifier keeps its own sequence, `notifier_seq`, the value of the last invalidation that
//! touched it.
//!
//! **States of `seq`.**
//!
//! * *Even*: no invalidation that hit a notifier is in progress (idle). Readers pass
//!   straight through `read_begin`.
//! * *Odd*: one invalidation or more is in progress, and at least one of them hit a
//!   notifier (or a tree change waits on them, rule 4). The first hit of a walk makes it odd
//!   (`seq |= 1`); every invalidation that hits while it is odd sees the same odd value, and
//!   each callback records that value in its notifier (`set_seq`, rule 3) under the device
//!   lock before it returns.
//! * *Odd to even*: only when `active` drops to zero, that is when the *last* concurrent
//!   invalidation ends, `seq` moves to the next even value; the deferred inserts and removes
//!   are applied then, and the readers waiting in `read_begin` are woken (rules 2, 4).
//!
//! `notifier_seq` is always odd. It equals `seq` exactly while an invalidation that touched
//! the notifier is still in progress (or while the notifier's deferred insert waits): that is
//! the test `read_begin` makes. A notifier inserted while idle starts at `seq - 1`, an odd
//! value `seq` never takes again, so its first reader does not wait; one inserted while
//! invalidations run starts at the current odd `seq`, so its readers wait for them.
//!
//! **A reader and an invalidation, interleaved.** The reader is a device fault of the pages
//! of notifier N; the invalidation covers N. Time runs down; each row is one step of one
//! side.
//!
//! ```text
//!  reader (device fault)                  | invalidation of a range covering N
//! ----------------------------------------+------------------------------------------------
//!  s = read_begin(N)                      |
//!    N.seq != seq: returns N.seq at once  |
//!  copy the client's pages (no lock)      |
//!                                         | active += 1; first hit: seq |= 1   (seq = S, odd)
//!                                         | N's start: device lock, zap N's entries,
//!                                         |   set_seq: N.seq = S, unlock
//!  device lock                            |
//!  read_retry(N, s): N.seq = S != s       |
//!    -> unlock, drop the copy, start over |
//!  s = read_begin(N)                      |
//!    N.seq == seq == S: waits             |
//!                                         | (finish pass: wait for flushes, free slots)
//!                                         | active -= 1; last one: seq = S + 1, wake readers
//!    returns S                            |
//!  copy again (the new contents)          |
//!  device lock, read_retry(N, S) = false  |
//!  install, unlock                        |
//! ```
//!
//! The other orders end well too:
//!
//! * The reader takes the device lock and installs *before* N's start takes it: the start
//!   then zaps what was installed, and the flush it queues covers it.
//! * `read_begin` runs while the invalidation is in progress but has not reached N yet:
//!   `N.seq` still holds an older value, so `read_begin` returns at once; N's start will
//!   either find the entries installed and zap them, or set `N.seq` before the reader's
//!   `read_retry`, which then says retry (the row above).
//! * `read_begin` runs after N's start: `N.seq == seq`, and it waits for the end.
//!
//! **The ordering argument.** Every step that matters happens under one of two locks, so
//! each pair of them is ordered one way or the other:
//!
//! 1. `set_seq` (inside a callback) and `read_retry` + install (in the reader) both run under
//!    the *device lock*. So either the install comes first, and the callback, which zaps
//!    under the same lock, removes it; or `set_seq` comes first, and `read_retry` sees the
//!    new value and refuses the install. An install can never land after the zap of an
//!    invalidation that covered it without seeing that invalidation's sequence.
//! 2. `read_begin`, the bump of `active` with the first `seq |= 1`, and the end of an
//!    invalidation all run under the subscription's *state mutex*, and `end` is the only
//!    place `seq` leaves an odd value. A reader that waits in `read_begin` therefore returns
//!    only after every invalidation that was in progress when it looked has ended: its
//!    finish pass is done (rule 6), so no flush of it is still in flight when the reader
//!    installs.
//! 3. Making `seq` odd at the first hit of a walk, rather than when the walk begins, is
//!    equivalent: `active` is already counted, so `seq` cannot turn even and the tree cannot
//!    change (rule 4) until this walk ends; every concurrent walk that hits sees the same
//!    odd value.
//!
//! The copy itself runs under no lock, so the reader may copy bytes that are being changed:
//! that is harmless, because a copy taken across an invalidation that covers it fails its
//! `read_retry`. What the core cannot see is a change of the client's memory with no
//! invalidation behind it; keeping those from the shadow is the event sources' job
//! (docs/design.md §4, §5 G1).
//!
//! [`NotifierHandle::check_retry`] reads `N.seq` without the device lock: a hint to give up
//! early, never a licence to install. The atomic orderings (`set_seq` stores with
//! `Release`, `read_retry` loads with `Acquire`) matter only for such lock-free looks; the
//! locks above carry the argument.

mod callbacks;
mod range;
mod subscription;
mod tree;

pub use callbacks::{
    Callbacks, Event, Invalidate, InvalidateArgs, OnePass, Owner, TwoPass, WouldBlock,
};
pub use range::{Range, RangeError};
pub use subscription::{
    InvalidateError, Invalidation, NotifierError, NotifierHandle, Observer, Subscription, Summary,
};
/// The interval tree of the notifiers, for other indexes of ranges (the monitors').
pub(crate) use tree::IntervalTree;

#[cfg(test)]
mod tests;
