//! The monitor requests (protocol 4, docs/monitors.md): `MonitorSetup`, `Monitor` and
//! `Unmonitor`, on a bound session, about that session's own memory.

use std::sync::Arc;

use memshadow_proto::monitor_abi::{MAX_MONITORS, QUEUE_ENTRIES};
use memshadow_proto::Response;

use super::handler::bound;
use super::session::Session;
use super::wire_error::WireError;

/// `MonitorSetup`: the four shared objects, handed over with the answer to request `rid`.
pub fn setup(s: &Session, rid: u64) -> Result<Response, WireError> {
    let w = bound(s)?;
    let fds = w.monitor_setup()?;
    s.set_answer_fds(rid, fds.into_iter().map(Arc::new).collect());
    tracing::debug!(client = s.id, "monitors set up");
    Ok(Response::MonitorReady {
        slots: MAX_MONITORS,
        queue_entries: QUEUE_ENTRIES,
    })
}

/// `Monitor`: watches a range of the client's memory.
pub fn add(s: &Session, addr: u64, len: u64) -> Result<Response, WireError> {
    let m = bound(s)?.monitor(addr, len)?;
    Ok(Response::Monitored {
        slot: m.slot,
        gen: m.gen,
        addr: m.range.start(),
        len: m.range.len(),
    })
}

/// `Unmonitor`: stops a monitor (waits until no invalidation can still bump it).
pub fn remove(s: &Session, slot: u32, gen: u64) -> Result<Response, WireError> {
    bound(s)?.unmonitor(slot, gen)?;
    Ok(Response::Unmonitored)
}
