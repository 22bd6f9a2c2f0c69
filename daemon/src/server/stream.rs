//! Live trace streams (`memshadowctl trace`): the sessions subscribed to invalidation records
//! and the one thread that feeds them from the device's trace bus. Nothing here may slow an
//! invalidation down (docs/design.md §6): the bus never blocks its publishers, and a subscriber
//! that does not read its socket loses records (counted, and reported with the next record
//! it gets) rather than holding up the daemon.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use memshadow_proto::{
    self as proto, AckOutcome, AckReport, EventKind, InvalidationReport, Response,
};

use super::outbox::OutFrame;
use super::session::Session;
use crate::device::external::Acked;
use crate::lock;
use crate::notifier::Event;
use crate::trace::{AckRecord, TraceHub, TraceItem, TraceRecord};

/// How often the feeder looks for closed subscribers and for a stop request when no record
/// arrives.
const TICK: Duration = Duration::from_millis(200);

/// One subscribed session.
#[derive(Debug)]
pub struct Subscriber {
    /// The session (weak: a closed session must not be kept alive by its stream).
    pub session: Weak<Session>,
    /// The `Trace` request's id; every record carries it.
    pub request_id: u64,
    /// Only records of this pid, if set.
    pub pid: Option<i32>,
    /// Wanted kinds (bit `code - 1`); 0 means all.
    pub events: u32,
    /// Engine acknowledgements wanted too (protocol 3 sessions only: older ones cannot
    /// decode them).
    pub acks: bool,
    /// Records lost since the last one delivered.
    pub dropped: u64,
}

/// The subscribers and their feeder thread.
#[derive(Debug)]
pub struct Streams {
    hub: Arc<TraceHub>,
    subs: Mutex<Vec<Subscriber>>,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The wire kind of a notifier event.
pub fn event_kind(e: Event) -> EventKind {
    match e {
        Event::Unmap => EventKind::Unmap,
        Event::Clear => EventKind::Clear,
        Event::ProtectionVma => EventKind::ProtectionVma,
        Event::ProtectionPage => EventKind::ProtectionPage,
        Event::SoftDirty => EventKind::SoftDirty,
        Event::Release => EventKind::Release,
    }
}

/// The notifier event of a wire kind.
pub fn event_of(k: EventKind) -> Event {
    match k {
        EventKind::Unmap => Event::Unmap,
        EventKind::Clear => Event::Clear,
        EventKind::ProtectionVma => Event::ProtectionVma,
        EventKind::ProtectionPage => Event::ProtectionPage,
        EventKind::SoftDirty => Event::SoftDirty,
        EventKind::Release => Event::Release,
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The wire form of a trace record.
pub fn report_of(r: &TraceRecord) -> InvalidationReport {
    InvalidationReport {
        pid: i32::try_from(r.tag).unwrap_or(0),
        event: event_kind(r.event),
        start: r.range.start(),
        end: r.range.start().saturating_add(r.range.len()),
        notifiers: r.notifiers,
        would_block: r.would_block,
        start_ns: nanos(r.start),
        finish_ns: nanos(r.finish),
        flushes_queued: r.flushes_queued,
        flushes_coalesced: r.flushes_coalesced,
    }
}

/// The wire form of an acknowledgement record.
pub fn ack_report_of(a: &AckRecord) -> AckReport {
    AckReport {
        pid: i32::try_from(a.tag).unwrap_or(0),
        engine_id: a.engine,
        engine_pid: a.engine_pid,
        seq: a.seq,
        wait_ns: nanos(a.wait),
        outcome: match a.outcome {
            Acked::Yes => AckOutcome::Acknowledged,
            Acked::Gone => AckOutcome::Gone,
            Acked::Evicted => AckOutcome::Evicted,
        },
    }
}

/// What subscriber `sub` is sent of `item`, if it wants it.
fn response_for(sub: &Subscriber, item: &TraceItem) -> Option<Response> {
    match item {
        TraceItem::Invalidation(r) => {
            let report = report_of(r);
            let kind = 1 << (report.event.code() - 1);
            let wanted = sub.events == 0 || sub.events & kind != 0;
            (wanted && sub.pid.is_none_or(|p| p == report.pid)).then_some(Response::TraceEvent {
                dropped: sub.dropped,
                report,
            })
        }
        TraceItem::Ack(a) => {
            let ack = ack_report_of(a);
            (sub.acks && sub.pid.is_none_or(|p| p == ack.pid)).then_some(Response::TraceAck {
                dropped: sub.dropped,
                ack,
            })
        }
    }
}

impl Streams {
    /// Starts the feeder of `hub`'s records.
    pub fn start(hub: Arc<TraceHub>) -> std::io::Result<Arc<Streams>> {
        let streams = Arc::new(Streams {
            hub,
            subs: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let feeder = Arc::clone(&streams);
        let t = std::thread::Builder::new()
            .name("trace-stream".into())
            .spawn(move || feeder.run())?;
        *lock(&streams.thread) = Some(t);
        Ok(streams)
    }

    /// Subscribes a session; records flow from now on.
    pub fn add(&self, sub: Subscriber) {
        lock(&self.subs).push(sub);
        self.hub.listen();
    }

    /// Subscribers now.
    pub fn len(&self) -> usize {
        lock(&self.subs).len()
    }

    /// True if nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops the feeder and drops every subscriber.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        for _ in lock(&self.subs).drain(..) {
            self.hub.unlisten();
        }
    }

    fn run(&self) {
        let rx = self.hub.receiver().clone();
        while !self.stop.load(Relaxed) {
            match rx.recv_timeout(TICK) {
                Ok(rec) => self.deliver(Some(&rec)),
                Err(RecvTimeoutError::Timeout) => self.deliver(None),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Sends `item` to every subscriber that wants it (and drops closed subscribers).
    fn deliver(&self, item: Option<&TraceItem>) {
        let hub = &self.hub;
        lock(&self.subs).retain_mut(|sub| {
            let Some(s) = sub.session.upgrade().filter(|s| !s.closing.load(Relaxed)) else {
                hub.unlisten();
                return false;
            };
            let Some(resp) = item.and_then(|i| response_for(sub, i)) else {
                return true;
            };
            let frame = OutFrame {
                msg_type: resp.msg_type(),
                flags: proto::FLAG_MORE,
                request_id: sub.request_id,
                payload: resp.encode_payload(),
                fds: Vec::new(),
            };
            // Lossy: a record goes out only if nothing waits before it and the socket has
            // room now; the subscriber learns how many it lost with the next one.
            let offered = lock(&s.out).offer(s.sock(), &frame);
            match offered {
                Ok(true) => {
                    sub.dropped = 0;
                    true
                }
                Ok(false) => {
                    sub.dropped += 1;
                    true
                }
                Err(e) => {
                    tracing::debug!(client = s.id, error = %e, "trace stream ended");
                    s.streams.fetch_sub(1, Relaxed);
                    hub.unlisten();
                    false
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_map_both_ways() {
        for k in EventKind::ALL {
            assert_eq!(event_kind(event_of(k)), k);
        }
        for e in Event::ALL {
            assert_eq!(event_of(event_kind(e)), e);
        }
    }

    fn sub(pid: Option<i32>, events: u32, acks: bool) -> Subscriber {
        Subscriber {
            session: Weak::new(),
            request_id: 1,
            pid,
            events,
            acks,
            dropped: 3,
        }
    }

    fn unmap_of(tag: u64) -> TraceItem {
        TraceItem::Invalidation(TraceRecord {
            tag,
            event: Event::Unmap,
            range: crate::notifier::Range::new(0x1000, 0x1000).expect("range"),
            notifiers: 1,
            would_block: false,
            start: Duration::from_micros(1),
            finish: Duration::from_micros(2),
            flushes_queued: 0,
            flushes_coalesced: 0,
        })
    }

    fn ack_of(tag: u64, outcome: Acked) -> TraceItem {
        TraceItem::Ack(AckRecord {
            tag,
            engine: 17,
            engine_pid: 99,
            seq: 4,
            wait: Duration::from_micros(250),
            outcome,
        })
    }

    #[test]
    fn acknowledgements_go_only_to_subscribers_that_take_them() {
        let ack = ack_of(42, Acked::Evicted);
        match response_for(&sub(None, 0, true), &ack) {
            Some(Response::TraceAck { dropped, ack }) => {
                assert_eq!(dropped, 3);
                assert_eq!((ack.pid, ack.engine_id, ack.engine_pid), (42, 17, 99));
                assert_eq!((ack.seq, ack.wait_ns), (4, 250_000));
                assert_eq!(ack.outcome, AckOutcome::Evicted);
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(response_for(&sub(None, 0, false), &ack), None, "not asked");
        assert_eq!(
            response_for(&sub(Some(7), 0, true), &ack),
            None,
            "other pid"
        );
        assert!(response_for(&sub(Some(42), 0, true), &ack).is_some());
    }

    #[test]
    fn an_acknowledgements_only_mask_streams_no_invalidations() {
        let unmap = unmap_of(42);
        assert!(response_for(&sub(None, 0, true), &unmap).is_some());
        assert_eq!(
            response_for(&sub(None, proto::TRACE_ENGINE_ACKS, true), &unmap),
            None
        );
        let unmap_bit = 1 << (EventKind::Unmap.code() - 1);
        assert!(response_for(&sub(None, unmap_bit, false), &unmap).is_some());
        assert_eq!(response_for(&sub(Some(7), unmap_bit, false), &unmap), None);
    }
}
