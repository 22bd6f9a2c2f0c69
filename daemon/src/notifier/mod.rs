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

#[cfg(test)]
mod tests;
