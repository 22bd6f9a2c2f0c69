//! Grants and external engines on the wire (docs/engines.md): `Grant`, `EngineAttach`,
//! `EngineFault`, and what ends an engine (its session's close, its mirror's detach, its
//! client's exit).
//!
//! A grant is an unguessable 128-bit token (`getrandom`) naming one mirror of one bound
//! session; it is kept only while that session lives and the mirror is attached, and may be
//! used by the granting client's user (or root and the daemon's owner).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::sync::atomic::Ordering::Relaxed;

use memshadow_proto::{EngineInfo, Response};

use super::handler::{bound, privileged, require, Denied};
use super::session::{EngineLink, Session};
use super::wire_error::WireError;
use super::Core;
use crate::address_space::AddressSpace;
use crate::address_space::WatchError;
use crate::device::DeviceError;
use crate::sys::PAGE_SIZE;

/// Most live grants one session may hold.
pub const MAX_GRANTS_PER_SESSION: usize = 64;

/// Refusals of the engine requests.
#[derive(Debug, thiserror::Error)]
pub enum EngineRequestError {
    /// No live grant has that token.
    #[error("no such grant: the token is wrong, revoked (its mirror detached or its client gone), or another user's")]
    NoSuchGrant,
    /// The session already is an engine, or is a bound client.
    #[error("this session is already an engine or a client; an engine needs a session of its own")]
    AlreadyEngine,
    /// `EngineFault` on a session that is not an engine.
    #[error("this session is not an engine (EngineAttach first)")]
    NotEngine,
    /// The engine was evicted or its grant revoked.
    #[error("engine {0} was evicted (it did not acknowledge a flush in time) or its mirror was detached")]
    Evicted(u32),
    /// Too many grants live for this session.
    #[error("too many live grants for this client (at most {MAX_GRANTS_PER_SESSION})")]
    TooManyGrants,
    /// The random source failed.
    #[error("cannot make a token")]
    Random(#[source] std::io::Error),
}

/// A live grant.
#[derive(Debug, Clone, Copy)]
struct Grant {
    session: u64,
    mirror_id: u64,
    uid: u32,
}

/// The live grants, by token.
#[derive(Debug, Default)]
pub struct Grants(Mutex<HashMap<u128, Grant>>);

impl Grants {
    /// Forgets every grant of session `id` (it closed).
    pub fn revoke_session(&self, id: u64) {
        crate::lock(&self.0).retain(|_, g| g.session != id);
    }

    /// Forgets the grants of mirror `mirror_id` of session `id` (it was detached).
    pub fn revoke_mirror(&self, id: u64, mirror_id: u64) {
        crate::lock(&self.0).retain(|_, g| !(g.session == id && g.mirror_id == mirror_id));
    }
}

fn token() -> Result<u128, EngineRequestError> {
    let mut b = [0u8; 16];
    getrandom_fill(&mut b).map_err(EngineRequestError::Random)?;
    Ok(u128::from_le_bytes(b).max(1))
}

fn getrandom_fill(b: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}

/// `Grant`: a token for one of this session's mirrors.
pub fn grant(core: &Core, s: &Session, mirror_id: u64) -> Result<Response, WireError> {
    let w = bound(s)?;
    // Only mirrors still mirroring something (not unmapped, not detached) are granted.
    let live: Vec<u64> = w
        .list()
        .iter()
        .filter(|m| m.dev.is_some())
        .map(|m| m.id)
        .collect();
    if !live.contains(&mirror_id) {
        return Err(WatchError::Device(DeviceError::NoSuchMirror(mirror_id)).into());
    }
    let mut g = crate::lock(&core.grants.0);
    // Grants of this session's mirrors that are gone (unmapped, detached) lapse here.
    g.retain(|_, x| x.session != s.id || live.contains(&x.mirror_id));
    if g.values().filter(|x| x.session == s.id).count() >= MAX_GRANTS_PER_SESSION {
        return Err(EngineRequestError::TooManyGrants.into());
    }
    let t = token()?;
    g.insert(
        t,
        Grant {
            session: s.id,
            mirror_id,
            uid: s.peer.uid,
        },
    );
    Ok(Response::Granted { token: t })
}

/// `EngineAttach` (request `rid`): makes `s` an engine of a mirror named by a grant, or
/// (privileged) by pid; the engine's fds go with the answer.
pub fn attach(
    core: &Core,
    s: &Session,
    rid: u64,
    token: u128,
    pid: i32,
    mirror_id: u64,
) -> Result<Response, WireError> {
    // The bind lock orders this against a Bind of the same session: a session is a
    // client or an engine, never both.
    let _g = crate::lock(&s.bind_lock);
    if s.engine.get().is_some() || s.watched().is_some() {
        return Err(EngineRequestError::AlreadyEngine.into());
    }
    let (client, mirror_id) = if token == 0 {
        require(privileged(core, s), Denied::ActOn(pid))?;
        (session_with_mirror(core, pid, mirror_id)?, mirror_id)
    } else {
        let g = crate::lock(&core.grants.0).get(&token).copied();
        let g = g
            .filter(|g| g.uid == s.peer.uid || privileged(core, s))
            .ok_or(EngineRequestError::NoSuchGrant)?;
        let c = core
            .session(g.session)
            .filter(|c| c.watched().is_some())
            .ok_or(EngineRequestError::NoSuchGrant)?;
        (c, g.mirror_id)
    };
    let w = Arc::clone(client.watched().ok_or(EngineRequestError::NoSuchGrant)?);
    let id = core.engine_ids.next();
    let a = w.attach_engine(mirror_id, id, s.peer.pid)?;
    let link = EngineLink {
        client: Arc::downgrade(&w),
        client_pid: client.peer.pid,
        mirror_id,
        engine: Arc::clone(&a.engine),
    };
    if s.engine.set(link).is_err() {
        w.device().detach_engine(id);
        return Err(EngineRequestError::AlreadyEngine.into());
    }
    s.set_answer_fds(rid, a.fds.into_iter().map(Arc::new).collect());
    tracing::info!(
        engine = id,
        pid = s.peer.pid,
        client = client.peer.pid,
        mirror = mirror_id,
        "external engine attached"
    );
    Ok(Response::EngineAttached {
        engine_id: id,
        mirror_id,
        addr: a.range.start(),
        len: a.range.len(),
        shadow_bytes: a.shadow_bytes,
        page_size: PAGE_SIZE as u32,
    })
}

/// The bound session of process `pid` that has mirror `mirror_id` (mirror ids are per
/// session, and a process may have more than one), or its first bound session (which then
/// answers that it has no such mirror).
fn session_with_mirror(core: &Core, pid: i32, mirror_id: u64) -> Result<Arc<Session>, WireError> {
    let first = super::handler::bound_client(core, pid)?;
    let has = |c: &Session| {
        c.watched().is_some_and(|w| {
            w.list()
                .iter()
                .any(|m| m.id == mirror_id && m.dev.is_some())
        })
    };
    Ok(core
        .sessions()
        .into_iter()
        .find(|c| c.peer.pid == pid && has(c))
        .unwrap_or(first))
}

/// `EngineFault`: faults a run of the engine's mirror into the shadow.
pub fn fault(s: &Session, offset: u64, len: u64) -> Result<Response, WireError> {
    let (l, client) = live_engine(s)?;
    l.engine.counters().faults.fetch_add(1, Relaxed);
    let pages = client.engine_fault(l.mirror_id, offset, len)?;
    Ok(Response::Populated { pages })
}

/// `EngineRead`: bytes of the engine's mirror over the session (pages the shadow cannot
/// hold yet), as a client's own `Read` is served.
pub fn read(s: &Session, offset: u64, len: u32) -> Result<Response, WireError> {
    let (l, client) = live_engine(s)?;
    let len = super::handler::read_len(len)?;
    let bytes = client.read(l.mirror_id, offset, len)?;
    Ok(Response::Data { bytes })
}

/// `EngineWrite`: a device write into the engine's client's memory.
pub fn write(s: &Session, offset: u64, bytes: &[u8]) -> Result<Response, WireError> {
    let (l, client) = live_engine(s)?;
    let n = client.device_write(l.mirror_id, offset, bytes, l.engine.id())?;
    l.engine.counters().writes.fetch_add(1, Relaxed);
    Ok(Response::Written { len: n as u32 })
}

/// `ListEngines`: every engine (privileged), or those of client `pid` (privileged, or
/// that client itself).
pub fn list(core: &Core, s: &Session, pid: i32) -> Result<Response, WireError> {
    require(
        privileged(core, s) || (pid != 0 && pid == s.peer.pid),
        Denied::ListEngines,
    )?;
    // Every engine: the built-in ones first (they serve every client), then the external
    // ones; one client's: its external engines.
    let mut engines: Vec<EngineInfo> = if pid == 0 {
        let b = core.device().builtin_engines();
        b.iter()
            .enumerate()
            .map(|(i, b)| builtin_info(i, b))
            .collect()
    } else {
        Vec::new()
    };
    engines.extend(
        core.sessions()
            .iter()
            .filter_map(|x| x.engine.get())
            .filter(|l| pid == 0 || l.client_pid == pid)
            .map(engine_info),
    );
    Ok(Response::Engines { engines })
}

/// A built-in engine as `ListEngines` shows it: the daemon's pid, no client, no mirror, and
/// the id of its index.
fn builtin_info(index: usize, b: &crate::device::BuiltinEngine) -> EngineInfo {
    EngineInfo {
        id: index as u32,
        pid: std::process::id() as i32,
        flushes: b.queued,
        depth: b.queued.saturating_sub(b.issued),
        tlb_entries: b.tlb_entries,
        state: "built-in".into(),
        ..EngineInfo::default()
    }
}

fn engine_info(l: &EngineLink) -> EngineInfo {
    let e = &l.engine;
    let c = e.counters();
    let (p50, p99) = e.ack_latency_us();
    let state = if e.is_evicted() {
        "evicted"
    } else if e.is_gone() {
        "gone"
    } else {
        "attached"
    };
    EngineInfo {
        id: e.id(),
        pid: e.pid(),
        client_pid: l.client_pid,
        mirror_id: l.mirror_id,
        flushes: c.flushes.load(Relaxed),
        depth: e.depth(),
        tlb_entries: e.tlb_entries(),
        acks: c.acks.load(Relaxed),
        ack_p50_us: p50,
        ack_p99_us: p99,
        overflows: c.overflows.load(Relaxed),
        faults: c.faults.load(Relaxed),
        writes: c.writes.load(Relaxed),
        state: state.into(),
    }
}

/// The engine of session `s` and its client, unless it was evicted or its client is gone.
fn live_engine(s: &Session) -> Result<(&EngineLink, Arc<AddressSpace>), EngineRequestError> {
    let l = s.engine.get().ok_or(EngineRequestError::NotEngine)?;
    let evicted = EngineRequestError::Evicted(l.engine.id());
    if l.engine.is_gone() {
        return Err(evicted);
    }
    let client = l.client.upgrade().ok_or(evicted)?;
    Ok((l, client))
}

/// The session closed: if it was an engine, it counts as having acknowledged everything.
pub fn session_closed(core: &Core, s: &Session) {
    core.grants.revoke_session(s.id);
    if let Some(l) = s.engine.get() {
        if let Some(client) = l.client.upgrade() {
            client.device().detach_engine(l.engine.id());
        }
        tracing::info!(
            engine = l.engine.id(),
            pid = s.peer.pid,
            "external engine detached"
        );
    }
}
