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
use memshadow_proto::{self as proto, EventKind, InvalidationReport, Response};

use super::outbox::OutFrame;
use super::session::Session;
use crate::lock;
use crate::notifier::Event;
use crate::trace::{TraceHub, TraceRecord};

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

    /// Sends `rec` to every subscriber that wants it (and drops closed subscribers).
    fn deliver(&self, rec: Option<&TraceRecord>) {
        let report = rec.map(report_of);
        let hub = &self.hub;
        lock(&self.subs).retain_mut(|sub| {
            let Some(s) = sub.session.upgrade().filter(|s| !s.closing.load(Relaxed)) else {
                hub.unlisten();
                return false;
            };
            let Some(report) = report else { return true };
            if sub.pid.is_some_and(|p| p != report.pid)
                || (sub.events != 0 && sub.events & (1 << (report.event.code() - 1)) == 0)
            {
                return true;
            }
            let resp = Response::TraceEvent {
                dropped: sub.dropped,
                report,
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
}
