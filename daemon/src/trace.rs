//! The invalidation trace: a bounded, lossy bus of records, one per invalidation of any
//! client's shadow and one per external engine acknowledgement a finish waited for, for
//! `memshadowctl trace`. It knows nothing of sockets; the server drains
//! it. Publishing never blocks (docs/design.md §6: nothing on the invalidation path may wait for
//! a reader), costs one atomic load when nobody listens, and counts what it had to drop.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::device::external::Acked;
use crate::notifier::{Event, Range};

/// Records the bus holds before it starts dropping.
pub const CAPACITY: usize = 8192;

/// One invalidation, as it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// The tag of the device client whose shadow it was (the server sets its pid).
    pub tag: u64,
    /// The kind.
    pub event: Event,
    /// The invalidated range.
    pub range: Range,
    /// Notifiers whose callback ran.
    pub notifiers: u32,
    /// Refused on a non-blockable range (`EAGAIN`).
    pub would_block: bool,
    /// Start pass.
    pub start: Duration,
    /// Finish pass.
    pub finish: Duration,
    /// Flush jobs queued on the engines while it ran (device-wide).
    pub flushes_queued: u64,
    /// Flushes coalesced by the engines while it ran (device-wide).
    pub flushes_coalesced: u64,
}

/// One finish's wait for one external engine's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckRecord {
    /// The tag of the device client whose invalidation it was.
    pub tag: u64,
    /// The engine.
    pub engine: u32,
    /// The engine's process.
    pub engine_pid: i32,
    /// The ring sequence number waited for.
    pub seq: u64,
    /// How long the finish waited.
    pub wait: Duration,
    /// How the wait ended.
    pub outcome: Acked,
}

/// What the bus carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceItem {
    /// An invalidation, as it ended.
    Invalidation(TraceRecord),
    /// An external engine's acknowledgement, as its wait ended.
    Ack(AckRecord),
}

impl TraceItem {
    /// The tag of the client it is about.
    pub fn tag(&self) -> u64 {
        match self {
            TraceItem::Invalidation(r) => r.tag,
            TraceItem::Ack(a) => a.tag,
        }
    }
}

/// The bus. One per device.
#[derive(Debug)]
pub struct TraceHub {
    tx: Sender<TraceItem>,
    rx: Receiver<TraceItem>,
    listeners: AtomicUsize,
    published: AtomicU64,
    dropped: AtomicU64,
}

impl Default for TraceHub {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(CAPACITY);
        TraceHub {
            tx,
            rx,
            listeners: AtomicUsize::new(0),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

impl TraceHub {
    /// True if someone listens (publishers skip building records otherwise).
    pub fn active(&self) -> bool {
        self.listeners.load(Relaxed) > 0
    }

    /// Counts a listener in; records are published while the count is above zero.
    pub fn listen(&self) {
        self.listeners.fetch_add(1, Relaxed);
    }

    /// Counts a listener out.
    pub fn unlisten(&self) {
        let _ = self
            .listeners
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// Publishes `rec` if anyone listens; drops (and counts) it if the bus is full.
    pub fn publish(&self, rec: TraceItem) {
        if !self.active() {
            return;
        }
        match self.tx.try_send(rec) {
            Ok(()) => {
                self.published.fetch_add(1, Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// The receiving end, for the one thread that drains the bus.
    pub fn receiver(&self) -> &Receiver<TraceItem> {
        &self.rx
    }

    /// `trace.*` counters.
    pub fn snapshot(&self) -> [(&'static str, u64); 3] {
        [
            ("trace.listeners", self.listeners.load(Relaxed) as u64),
            ("trace.published", self.published.load(Relaxed)),
            ("trace.dropped", self.dropped.load(Relaxed)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> TraceItem {
        TraceItem::Invalidation(TraceRecord {
            tag: n,
            event: Event::Clear,
            range: Range::new(0x1000, 0x1000).expect("range"),
            notifiers: 1,
            would_block: false,
            start: Duration::from_micros(1),
            finish: Duration::from_micros(50),
            flushes_queued: 2,
            flushes_coalesced: 0,
        })
    }

    #[test]
    fn nothing_is_published_without_listeners() {
        let hub = TraceHub::default();
        hub.publish(rec(1));
        assert!(hub.receiver().try_recv().is_err());
        hub.listen();
        hub.publish(rec(2));
        assert_eq!(hub.receiver().try_recv().map(|r| r.tag()), Ok(2));
        hub.unlisten();
        hub.unlisten();
        assert!(!hub.active());
    }

    #[test]
    fn a_full_bus_drops_and_counts_instead_of_blocking() {
        let hub = TraceHub::default();
        hub.listen();
        for n in 0..CAPACITY as u64 + 10 {
            hub.publish(rec(n));
        }
        let snap = hub.snapshot();
        assert_eq!(snap[1], ("trace.published", CAPACITY as u64));
        assert_eq!(snap[2], ("trace.dropped", 10));
        assert_eq!(hub.receiver().try_recv().map(|r| r.tag()), Ok(0));
    }
}
