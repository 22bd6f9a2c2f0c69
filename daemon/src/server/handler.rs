//! Turns one decoded request of one session into its response: the protocol state machine
//! (Hello → Bind → the rest), the checks of G7 (who may act on whom, ranges, quotas), and
//! the calls into the domain (`AddressSpace`, [`crate::bind`]). Every refusal is a typed error;
//! [`super::wire_error`] gives each its wire code, in one place.
//!
//! [`handle`] reads as the table of contents: [`admit`] (the session's state), then one
//! function per request.

use crate::lock;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use memshadow_proto::{
    AccessPath, AttachPolicy, BindFlags, ClientInfo, EventKind, InvalidateFlags, Limits,
    MirrorInfo, Request, Response, SyncReport, MAX_FDS, MAX_PAYLOAD, MAX_READ, MIN_VERSION,
    TRACE_ENGINE_ACKS, VERSION,
};

use super::convert;
use super::session::{Binding, Hello, Session};
use super::stream::{event_of, report_of, Subscriber};
use super::wire_error::WireError;
use super::Core;
use crate::address_space::{AddressSpace, SyncStats, WatchError};
use crate::bind::{BindRequest, Binder};
use crate::dirty::periodic::MIN_PERIOD;
use crate::dirty::Backend;
use crate::dirty::DirtyPolicy;
use crate::sys::uffd::UffdError;
use crate::sys::{self, PAGE_SIZE};

/// True for requests that may block (memory reads, uffd registration that takes the client's
/// mmap lock, waits for flushes): they run on a worker, the rest inline.
pub fn is_slow(req: &Request) -> bool {
    matches!(
        req,
        Request::Attach { .. }
            | Request::Detach { .. }
            | Request::Read { .. }
            | Request::Populate { .. }
            | Request::Peek { .. }
            | Request::Invalidate { .. }
            | Request::Sync { .. }
            | Request::SyncPid { .. }
            | Request::EngineAttach { .. }
            | Request::EngineFault { .. }
            | Request::EngineWrite { .. }
            | Request::EngineRead { .. }
            | Request::MonitorSetup
            | Request::Monitor { .. }
            | Request::Unmonitor { .. }
    )
}

/// Trace streams one session may receive.
const MAX_STREAMS: u32 = 1;

/// A request refused for the state of the daemon or of the session.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// Anything but `Hello` first.
    #[error("{0} before hello")]
    BeforeHello(&'static str),
    /// A second `Hello`.
    #[error("second hello")]
    SecondHello,
    /// A request about mirrors on a session that is not bound.
    #[error("bind first")]
    NotBound,
    /// A second `Bind`, or a `Bind` of an engine's session.
    #[error("already bound (or an external engine: a session is a client or an engine)")]
    AlreadyBound,
    /// The address space the session bound is gone: the session ends.
    #[error("the client's address space is gone (it exec'd or exited); the session ends")]
    ClientGone,
}

/// `Hello` with no version in common.
#[derive(Debug, thiserror::Error)]
#[error("client speaks {min}..={max}, daemon speaks {MIN_VERSION}..={VERSION}")]
pub struct NoCommonVersion {
    /// The lowest version the client speaks.
    pub min: u16,
    /// The highest.
    pub max: u16,
}

/// What only root and the daemon's owner may do (G7).
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// `ListClients`.
    #[error("listing clients is for root or the daemon's owner")]
    ListClients,
    /// `ListMirrors` of another pid, or of every client.
    #[error("listing another client's mirrors is for root or the daemon's owner")]
    ListMirrors,
    /// `Trace` of every client.
    #[error("tracing every client is for root or the daemon's owner (trace your own pid)")]
    TraceAll,
    /// `Trace` of another pid.
    #[error("tracing pid {0} is for root or the daemon's owner")]
    Trace(i32),
    /// `ListEngines` of every client, or of another client.
    #[error("listing other clients' engines is for root or the daemon's owner")]
    ListEngines,
    /// `Peek`, `Invalidate` or `SyncPid` of (for `Peek`, any) pid.
    #[error("acting on pid {0} is for root or the daemon's owner")]
    ActOn(i32),
}

/// A request names a pid that is not a bound client (or no longer is one).
#[derive(Debug, thiserror::Error)]
#[error("pid {0} is not a bound client")]
pub struct NoSuchClient(pub i32);

/// `Read` and `Peek` refusals of their own.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Longer than one answer carries.
    #[error("read of {0} bytes exceeds the limit of {MAX_READ}")]
    TooLong(u32),
    /// `Peek` of an address outside the client's mirrors.
    #[error("{addr:#x} is not in a mirror of pid {pid}")]
    NotMirrored {
        /// The address.
        addr: u64,
        /// The client.
        pid: i32,
    },
}

/// `Attach` refusals of its own (the rest come from [`AddressSpace::attach_with`]).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The mirror quota in force now (a reload may have lowered it below the bind-time one
    /// that `AddressSpace` enforces).
    #[error("mirror quota of {0} ranges reached")]
    MirrorQuota(u32),
    /// A `periodic` policy faster than the daemon allows.
    #[error(
        "a collection period of {} ms is below the daemon's minimum of {} ms",
        .period.as_millis(),
        .min.as_millis()
    )]
    PeriodTooShort {
        /// The period asked for.
        period: Duration,
        /// The daemon's minimum.
        min: Duration,
    },
    /// Another session of the same process watches the range already.
    #[error(
        "range {addr:#x}+{len:#x} is already attached through another memshadow session of \
         this process (pid {pid}); the kernel lets one userfaultfd watch a range, so attach \
         it through that session (clone its Client): mirrors of one session may overlap"
    )]
    OtherSession {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
        /// The process.
        pid: i32,
    },
}

/// `Trace` refusals of its own.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Bits of the event mask that name no event kind.
    #[error("unknown event bits in {0:#x}")]
    UnknownEvents(u32),
    /// The session has its stream already.
    #[error("a session may have {MAX_STREAMS} trace stream; open another connection")]
    TooManyStreams,
}

/// Answers request `rid` of session `s`, `req`, which came with `fds`.
pub fn handle(
    core: &Core,
    s: &Arc<Session>,
    rid: u64,
    req: Request,
    fds: Vec<OwnedFd>,
) -> Response {
    admit(core, s, &req)
        .map_err(WireError::from)
        .and_then(|()| dispatch(core, s, rid, req, fds))
        .unwrap_or_else(Response::from)
}

/// The refusals every request meets first, in this order: the daemon stopping; anything
/// but `Hello` before `Hello`; a session whose client's address space is gone; a second
/// `Hello`.
fn admit(core: &Core, s: &Session, req: &Request) -> Result<(), StateError> {
    if core.stopping.load(Relaxed) {
        return Err(StateError::ShuttingDown);
    }
    let is_hello = matches!(req, Request::Hello { .. });
    if s.hello.get().is_none() {
        return if is_hello {
            Ok(())
        } else {
            Err(StateError::BeforeHello(req.name()))
        };
    }
    if s.watched().is_some_and(|w| !w.alive()) {
        // The client `exec`ed (or exited) and another process speaks for it: nothing of
        // the address space it bound is left to serve (docs/threat-model.md).
        core.note_gone(s);
        return Err(StateError::ClientGone);
    }
    if is_hello {
        return Err(StateError::SecondHello);
    }
    Ok(())
}

/// The request's own work, once [`admit`] let it through.
fn dispatch(
    core: &Core,
    s: &Arc<Session>,
    rid: u64,
    req: Request,
    fds: Vec<OwnedFd>,
) -> Result<Response, WireError> {
    match req {
        Request::Hello {
            min_version,
            max_version,
            name,
        } => Ok(hello(core, s, min_version, max_version, name)?),
        Request::Bind { flags } => bind(core, s, flags, fds),
        Request::Status => Ok(Response::StatusReport {
            info: status_info(core, s),
            counters: status(core),
        }),
        Request::ClientStats => Ok(Response::Counters {
            entries: client_stats(s),
        }),
        Request::ListClients => Ok(list_clients(core, s)?),
        Request::Attach { addr, len, policy } => attach(core, s, addr, len, policy),
        Request::Detach { mirror_id } => detach(core, s, mirror_id),
        Request::Read {
            mirror_id,
            offset,
            len,
        } => read(s, mirror_id, offset, len),
        Request::Populate {
            mirror_id,
            offset,
            len,
        } => populate(s, mirror_id, offset, len),
        Request::ListMirrors { pid } => list_mirrors(core, s, pid),
        Request::Peek { pid, addr, len } => peek(core, s, pid, addr, len),
        Request::Invalidate {
            pid,
            addr,
            len,
            event,
            flags,
        } => invalidate(core, s, pid, (addr, len), event, flags),
        Request::Trace { pid, events } => trace(core, s, rid, pid, events),
        Request::Sync { mirror_id } => sync(s, mirror_id),
        Request::SyncPid { pid } => sync_pid(core, s, pid),
        Request::Grant { mirror_id } => super::engines::grant(core, s, mirror_id),
        Request::EngineAttach {
            token,
            pid,
            mirror_id,
        } => super::engines::attach(core, s, rid, token, pid, mirror_id),
        Request::EngineFault { offset, len } => super::engines::fault(s, offset, len),
        Request::EngineWrite { offset, bytes } => super::engines::write(s, offset, &bytes),
        Request::EngineRead { offset, len } => super::engines::read(s, offset, len),
        Request::ListEngines { pid } => super::engines::list(core, s, pid),
        Request::MonitorSetup => super::monitors::setup(s, rid),
        Request::Monitor { addr, len } => super::monitors::add(s, addr, len),
        Request::Unmonitor { slot, gen } => super::monitors::remove(s, slot, gen),
    }
}

// ---- Hello and Bind ----

fn hello(
    core: &Core,
    s: &Session,
    min: u16,
    max: u16,
    name: String,
) -> Result<Response, NoCommonVersion> {
    let lo = min.max(MIN_VERSION);
    let hi = max.min(VERSION);
    if min > max || lo > hi {
        return Err(NoCommonVersion { min, max });
    }
    let limits = core.limits();
    let q = limits.quotas;
    // The name is for logs and listings: never let a client write control characters there.
    let name = escape_controls(&name);
    tracing::debug!(client = s.id, pid = s.peer.pid, name = %name, version = hi, "hello");
    let _ = s.hello.set(Hello { version: hi, name });
    Ok(Response::HelloAck {
        version: hi,
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        page_size: PAGE_SIZE as u32,
        limits: Limits {
            max_payload: MAX_PAYLOAD as u32,
            max_fds: MAX_FDS as u16,
            max_read: MAX_READ as u32,
            shadow_bytes: q.shadow_bytes,
            mirrors: q.mirrors,
            inflight: q.inflight,
            clients_per_uid: limits.clients_per_uid,
        },
    })
}

/// `text` with control characters written as escapes (`\u{1b}`), so that what a client
/// chose (its name, its process name) cannot forge a log line or drive a terminal.
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let esc = c.is_control().then(|| c.escape_default());
            esc.into_iter()
                .flatten()
                .chain((!c.is_control()).then_some(c))
        })
        .collect()
}

/// `Bind`: the domain builds the client ([`Binder::bind`]); the session keeps it and the
/// event reader starts watching its uffd.
fn bind(
    core: &Core,
    s: &Session,
    flags: BindFlags,
    fds: Vec<OwnedFd>,
) -> Result<Response, WireError> {
    let _g = lock(&s.bind_lock);
    if s.binding.get().is_some() || s.engine.get().is_some() {
        return Err(StateError::AlreadyBound.into());
    }
    let bound = binder(core, s).bind(BindRequest {
        fds,
        pid: s.peer.pid,
        version: s.hello.get().map_or(1, |h| h.version),
        privileged_uffd: flags.contains(BindFlags::UFFD_PRIVILEGED),
    })?;
    log_bound(s, &bound.watched);
    let binding = Binding {
        watched: Arc::clone(&bound.watched),
        access: AccessPath::MemFd,
        uffd_features: bound.uffd_features,
    };
    let resp = Response::Bound {
        access: binding.access,
        uffd_features: binding.uffd_features,
    };
    let _ = s.binding.set(binding);
    core.events.watch(s.id, bound.watched, s.peer.uid)?;
    Ok(resp)
}

/// What a client of `s`'s user is built with, under the quotas in force now.
fn binder<'a>(core: &'a Core, s: &Session) -> Binder<'a> {
    let quotas = core.limits().quotas;
    Binder {
        device: &core.device,
        dirty: &core.dirty.selection,
        dirty_counters: &core.dirty.counters,
        shadow_quota: quotas.shadow_bytes,
        mirrors_quota: quotas.mirrors,
        account: core.account(s.peer.uid),
    }
}

fn log_bound(s: &Session, w: &AddressSpace) {
    if let Err(why) = w.dirty().backend() {
        tracing::debug!(client = s.id, pid = s.peer.pid, reason = %why, "client without dirty tracking");
    }
    tracing::info!(
        client = s.id,
        pid = s.peer.pid,
        uid = s.peer.uid,
        access = AccessPath::MemFd.as_str(),
        dirty = w.dirty().backend().map_or("off", Backend::as_str),
        "client bound"
    );
}

// ---- Requests of a bound client about its own mirrors ----

/// The session's bound client.
pub(super) fn bound(s: &Session) -> Result<&Arc<AddressSpace>, StateError> {
    s.watched().ok_or(StateError::NotBound)
}

/// `Attach`, with its collection policy ([`attach_policy`]).
fn attach(
    core: &Core,
    s: &Session,
    addr: u64,
    len: u64,
    requested: AttachPolicy,
) -> Result<Response, WireError> {
    let w = bound(s)?;
    let max = core.limits().quotas.mirrors;
    if w.len() >= max as usize {
        return Err(AttachError::MirrorQuota(max).into());
    }
    let policy = attach_policy(core, w, requested)?;
    w.set_attach_quota(core.limits().quotas.attached_bytes);
    let id = w
        .attach_with(addr, len, policy)
        .map_err(|e| attach_refusal(core, s, addr, len, e))?;
    if let DirtyPolicy::Periodic(period) = policy {
        let target: Arc<dyn crate::dirty::periodic::PeriodicTarget> = Arc::clone(w) as _;
        core.dirty
            .periodic
            .add(Arc::downgrade(&target), id, period, s.peer.uid);
    }
    tracing::debug!(client = s.id, mirror = id, addr, len, policy = %policy, "attached");
    Ok(Response::Attached { mirror_id: id })
}

/// The flags' choice of policy, else the daemon's default (which falls back to `manual`
/// for a client without dirty tracking; an explicit policy other than `manual` is refused
/// to such a client, by `AddressSpace`).
fn attach_policy(
    core: &Core,
    w: &AddressSpace,
    requested: AttachPolicy,
) -> Result<DirtyPolicy, AttachError> {
    let policy = if requested == AttachPolicy::Default && w.dirty().backend().is_err() {
        DirtyPolicy::Manual
    } else {
        convert::attach_policy(requested, core.cfg.dirty.policy)
    };
    match policy {
        DirtyPolicy::Periodic(period) if period < MIN_PERIOD => Err(AttachError::PeriodTooShort {
            period,
            min: MIN_PERIOD,
        }),
        p => Ok(p),
    }
}

/// An attach the kernel refused because another uffd watches the range is named as such
/// when that uffd is another session of the same process.
fn attach_refusal(core: &Core, s: &Session, addr: u64, len: u64, e: WatchError) -> WireError {
    match e {
        WatchError::Uffd(UffdError::Busy { .. }) if another_session_of(core, s) => {
            AttachError::OtherSession {
                addr,
                len,
                pid: s.peer.pid,
            }
            .into()
        }
        e => e.into(),
    }
}

/// True if the peer of `s` has another bound session (with another userfaultfd of the same
/// address space).
fn another_session_of(core: &Core, s: &Session) -> bool {
    core.sessions()
        .iter()
        .any(|o| o.id != s.id && o.peer.pid == s.peer.pid && o.watched().is_some())
}

fn detach(core: &Core, s: &Session, mirror_id: u64) -> Result<Response, WireError> {
    core.grants.revoke_mirror(s.id, mirror_id);
    bound(s)?.detach(mirror_id)?;
    Ok(Response::Detached)
}

fn read(s: &Session, mirror_id: u64, offset: u64, len: u32) -> Result<Response, WireError> {
    let w = bound(s)?;
    let bytes = w.read(mirror_id, offset, read_len(len)?)?;
    Ok(Response::Data { bytes })
}

/// The length of a device read, at most what one answer carries.
pub(super) fn read_len(len: u32) -> Result<usize, ReadError> {
    match len as usize {
        n if n > MAX_READ => Err(ReadError::TooLong(len)),
        n => Ok(n),
    }
}

fn populate(s: &Session, mirror_id: u64, offset: u64, len: u64) -> Result<Response, WireError> {
    let pages = bound(s)?.populate(mirror_id, offset, len)?;
    Ok(Response::Populated { pages })
}

fn sync(s: &Session, mirror_id: u64) -> Result<Response, WireError> {
    let id = (mirror_id != 0).then_some(mirror_id);
    let done = bound(s)?.sync(id)?;
    Ok(synced(&done))
}

fn synced(d: &SyncStats) -> Response {
    Response::Synced {
        report: SyncReport {
            backend: d.backend.into(),
            mirrors: d.mirrors,
            pages_scanned: d.collected.pages_scanned,
            pages_dirty: d.collected.pages_dirty,
            regions: d.collected.regions,
            scan_ns: d.collected.scan_ns,
            invalidate_ns: d.invalidate_ns,
        },
    }
}

// ---- Requests about a client named by its pid (G7) ----

/// Root and the daemon's own uid may look at and act on every client (G7).
pub(super) fn privileged(core: &Core, s: &Session) -> bool {
    core.privileged(s.peer.uid)
}

/// `Err(denied)` unless `allowed`.
pub(super) fn require(allowed: bool, denied: Denied) -> Result<(), Denied> {
    if allowed {
        Ok(())
    } else {
        Err(denied)
    }
}

/// True while `c` serves a client: bound, not closing, its process and the address space
/// it bound alive.
fn serves(c: &Session) -> bool {
    !c.closing.load(Relaxed)
        && c.watched().is_some_and(|w| w.alive())
        && sys::pidfd_alive(c.pidfd.as_fd())
}

/// A session that serves the client with pid `pid`.
pub(super) fn bound_client(core: &Core, pid: i32) -> Result<Arc<Session>, NoSuchClient> {
    core.sessions()
        .into_iter()
        .find(|c| c.peer.pid == pid && serves(c))
        .ok_or(NoSuchClient(pid))
}

/// Runs `op` on the bound client with pid `pid`. If it fails because that client went away
/// meanwhile (it exited, its session closed), the answer is that there is no such client,
/// whatever `op` met on the way (a mirror gone, say).
fn on_client(
    core: &Core,
    pid: i32,
    op: impl FnOnce(&AddressSpace) -> Result<Response, WireError>,
) -> Result<Response, WireError> {
    let c = bound_client(core, pid)?;
    let w = c.watched().ok_or(NoSuchClient(pid))?;
    op(w).map_err(|e| {
        if core.stopping.load(Relaxed) || serves(&c) {
            e
        } else {
            NoSuchClient(pid).into()
        }
    })
}

/// `ListMirrors`: this session's (pid 0), one client's, or every client's (-1).
fn list_mirrors(core: &Core, s: &Session, pid: i32) -> Result<Response, WireError> {
    if pid == 0 {
        return Ok(Response::Mirrors {
            mirrors: mirror_infos(s.peer.pid, bound(s)?),
        });
    }
    require(
        privileged(core, s) || pid == s.peer.pid,
        Denied::ListMirrors,
    )?;
    if pid != -1 {
        bound_client(core, pid)?;
    }
    let mut mirrors: Vec<MirrorInfo> = core
        .sessions()
        .iter()
        .filter(|c| pid == -1 || c.peer.pid == pid)
        .filter_map(|c| c.watched().map(|w| mirror_infos(c.peer.pid, w)))
        .flatten()
        .collect();
    mirrors.sort_by_key(|m| (m.pid, m.addr));
    Ok(Response::Mirrors { mirrors })
}

fn mirror_infos(pid: i32, w: &AddressSpace) -> Vec<MirrorInfo> {
    w.list()
        .into_iter()
        .map(|m| MirrorInfo {
            id: m.id,
            addr: m.addr,
            len: m.len,
            pages: m.pages,
            pid,
            seq: m.seq,
            state: m.state(),
        })
        .collect()
}

/// `Peek`: a device read of another client's shadow, at its address.
fn peek(core: &Core, s: &Session, pid: i32, addr: u64, len: u32) -> Result<Response, WireError> {
    require(privileged(core, s), Denied::ActOn(pid))?;
    on_client(core, pid, |w| {
        let len = read_len(len)?;
        let m = w.find(addr).ok_or(ReadError::NotMirrored { addr, pid })?;
        let bytes = w.read(m.id, addr - m.addr, len)?;
        Ok(Response::Data { bytes })
    })
}

/// `Invalidate`: an invalidation of `addr..addr+len` injected into a client's shadow.
fn invalidate(
    core: &Core,
    s: &Session,
    pid: i32,
    (addr, len): (u64, u64),
    event: EventKind,
    flags: InvalidateFlags,
) -> Result<Response, WireError> {
    require(privileged(core, s) || pid == s.peer.pid, Denied::ActOn(pid))?;
    on_client(core, pid, |w| {
        let blockable = !flags.contains(InvalidateFlags::NON_BLOCKING);
        let done = w.inject(addr, len, event_of(event), blockable)?;
        tracing::info!(
            pid,
            start = done.range.start(),
            len = done.range.len(),
            event = event.as_str(),
            by = s.peer.pid,
            would_block = done.would_block,
            "injected invalidation"
        );
        Ok(Response::Invalidated {
            report: report_of(&done),
        })
    })
}

/// `SyncPid`: collects the written pages of every mirror of a client.
fn sync_pid(core: &Core, s: &Session, pid: i32) -> Result<Response, WireError> {
    require(privileged(core, s) || pid == s.peer.pid, Denied::ActOn(pid))?;
    on_client(core, pid, |w| {
        let done = w.sync(None)?;
        tracing::debug!(
            pid,
            by = s.peer.pid,
            pages_dirty = done.collected.pages_dirty,
            "sync of a client"
        );
        Ok(synced(&done))
    })
}

/// `Trace`: a stream of the invalidations of one client, or of every client.
fn trace(
    core: &Core,
    s: &Arc<Session>,
    rid: u64,
    pid: i32,
    events: u32,
) -> Result<Response, WireError> {
    let pid = trace_target(core, s, pid)?;
    // Acknowledgement records are protocol 3: an older session can neither ask for nor
    // decode them.
    let v3 = s.hello.get().is_some_and(|h| h.version >= 3);
    let known = ((1u32 << EventKind::ALL.len()) - 1) | if v3 { TRACE_ENGINE_ACKS } else { 0 };
    if events & !known != 0 {
        return Err(TraceError::UnknownEvents(events).into());
    }
    let acks = v3 && (events == 0 || events & TRACE_ENGINE_ACKS != 0);
    if s.streams.fetch_add(1, Relaxed) >= MAX_STREAMS {
        s.streams.fetch_sub(1, Relaxed);
        return Err(TraceError::TooManyStreams.into());
    }
    core.streams.add(Subscriber {
        session: Arc::downgrade(s),
        request_id: rid,
        pid,
        events,
        acks,
        dropped: 0,
    });
    tracing::debug!(client = s.id, ?pid, events, "trace stream started");
    Ok(Response::TraceStarted)
}

/// Whose invalidations a `Trace` of `pid` streams: every client's (pid 0, privileged), or
/// those of the bound client `pid` (its own, or privileged).
fn trace_target(core: &Core, s: &Session, pid: i32) -> Result<Option<i32>, WireError> {
    if pid == 0 {
        require(privileged(core, s), Denied::TraceAll)?;
        return Ok(None);
    }
    require(pid == s.peer.pid || privileged(core, s), Denied::Trace(pid))?;
    bound_client(core, pid)?;
    Ok(Some(pid))
}

// ---- Status and listings ----

fn client_stats(s: &Session) -> Vec<(String, u64)> {
    let mut v = vec![(
        "client.inflight".to_owned(),
        u64::from(s.inflight.load(Relaxed)),
    )];
    if let Some(w) = s.watched() {
        let d = w.device().counters();
        let e = w.counters();
        let list = w.list();
        v.extend([
            ("client.mirrors".to_owned(), list.len() as u64),
            (
                "client.shadow_bytes".to_owned(),
                d.pages.load(Relaxed) * PAGE_SIZE as u64,
            ),
            ("client.reads".to_owned(), d.reads.load(Relaxed)),
            ("client.faults".to_owned(), d.faults.load(Relaxed)),
            (
                "client.invalidations".to_owned(),
                d.invalidations.load(Relaxed),
            ),
            ("events.unmap".to_owned(), e.unmap.load(Relaxed)),
            ("events.remove".to_owned(), e.remove.load(Relaxed)),
            ("events.remap".to_owned(), e.remap.load(Relaxed)),
            ("events.fork".to_owned(), e.fork.load(Relaxed)),
            ("events.faults".to_owned(), e.faults.load(Relaxed)),
            ("events.batches".to_owned(), e.batches.load(Relaxed)),
        ]);
        let backend = w.dirty().backend().map_or("off", Backend::as_str);
        v.push((format!("dirty.backend.{backend}"), 1));
        v.extend(w.dirty().counters().snapshot("dirty."));
    }
    v
}

/// Threads of this process (the scale test checks it stays flat).
fn thread_count() -> u64 {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count() as u64)
}

fn status(core: &Core) -> Vec<(String, u64)> {
    let c = &core.counters;
    let sessions = core.sessions();
    let live_events: u64 = sessions
        .iter()
        .filter_map(|s| s.watched())
        .map(|w| w.counters().total())
        .sum();
    let bound = sessions
        .iter()
        .filter(|s| s.binding.get().is_some())
        .count();
    let mut v: Vec<(String, u64)> = vec![
        ("server.uptime_ms".into(), core.uptime().as_millis() as u64),
        ("server.clients".into(), sessions.len() as u64),
        ("server.clients_bound".into(), bound as u64),
        ("server.clients_watched".into(), core.events.len() as u64),
        ("server.sessions_total".into(), c.sessions.load(Relaxed)),
        ("server.sessions_refused".into(), c.refused.load(Relaxed)),
        ("server.bad_messages".into(), c.bad_messages.load(Relaxed)),
        ("server.not_reading".into(), c.not_reading.load(Relaxed)),
        ("server.timed_out".into(), c.timed_out.load(Relaxed)),
        ("server.gone".into(), c.gone.load(Relaxed)),
        ("server.fds_exhausted".into(), c.fds_exhausted.load(Relaxed)),
        ("server.requests".into(), c.requests.load(Relaxed)),
        ("server.errors".into(), c.errors.load(Relaxed)),
        ("server.released".into(), c.released.load(Relaxed)),
        ("server.threads".into(), thread_count()),
        (
            "events.total".into(),
            live_events + c.events_of_released.load(Relaxed),
        ),
        ("device.engines".into(), core.device.engine_count() as u64),
        ("trace.streams".into(), core.streams.len() as u64),
    ];
    v.extend(
        core.device
            .trace()
            .snapshot()
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n)),
    );
    v.extend(core.device.snapshot());
    v.extend(
        crate::monitor::snapshot()
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n)),
    );
    v.extend(core.dirty.counters.snapshot("dirty."));
    v
}

/// Settings and identity, as text.
fn status_info(core: &Core, s: &Session) -> Vec<(String, String)> {
    let cfg = &core.cfg;
    let dev = &core.device;
    let limits = core.limits();
    let q = limits.quotas;
    let version = s.hello.get().map_or(VERSION, |h| h.version);
    let pairs: Vec<(&str, String)> = vec![
        ("daemon.version", env!("CARGO_PKG_VERSION").into()),
        ("daemon.pid", std::process::id().to_string()),
        ("daemon.uid", core.owner.to_string()),
        ("protocol.version", version.to_string()),
        ("protocol.supported", format!("{MIN_VERSION}..={VERSION}")),
        ("socket", core.socket.display().to_string()),
        ("device.engines", dev.engine_count().to_string()),
        (
            "device.flush_latency_us",
            dev.flush_latency().as_micros().to_string(),
        ),
        ("device.mode", dev.mode().as_str().into()),
        (
            "device.shadow_mib",
            (cfg.device.shadow_capacity >> 20).to_string(),
        ),
        ("access.path", "mem-fd".into()),
        ("dirty.policy", cfg.dirty.policy.to_string()),
        ("quota.shadow_bytes", q.shadow_bytes.to_string()),
        ("quota.mirrors", q.mirrors.to_string()),
        ("quota.inflight", q.inflight.to_string()),
        ("limit.clients_per_uid", limits.clients_per_uid.to_string()),
        ("limit.max_clients", limits.max_clients.to_string()),
    ];
    let mut v: Vec<(String, String)> = pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    // `dirty.backend`, `dirty.requested`, `dirty.refused.<name>`: the probe's findings.
    v.extend(core.dirty.selection.status_lines());
    v.extend(session_kinds(core));
    v
}

/// Who the connections are (the counter `server.clients` counts them all): bound clients
/// (they mirror their memory), sessions that stream a trace, other control sessions (the
/// one asking included), and connections that have not said hello yet.
fn session_kinds(core: &Core) -> Vec<(String, String)> {
    let (mut bound, mut tracing, mut control, mut handshake) = (0u32, 0u32, 0u32, 0u32);
    for c in core.sessions() {
        if c.binding.get().is_some() {
            bound += 1;
        } else if c.hello.get().is_none() {
            handshake += 1;
        } else if c.streams.load(Relaxed) > 0 {
            tracing += 1;
        } else {
            control += 1;
        }
    }
    [
        ("sessions.bound", bound),
        ("sessions.tracing", tracing),
        ("sessions.control", control),
        ("sessions.handshake", handshake),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n.to_string()))
    .collect()
}

/// The command name of session `c`'s process, or "" if it is gone (its pid may be reused,
/// so the name read counts only if the pidfd says the process still lives). Sent as it is:
/// whoever shows it escapes it (`memshadowctl` does).
fn comm_of(c: &Session) -> String {
    let name = std::fs::read_to_string(format!("/proc/{}/comm", c.peer.pid)).unwrap_or_default();
    if sys::pidfd_alive(c.pidfd.as_fd()) {
        name.trim_end_matches('\n').to_owned()
    } else {
        String::new()
    }
}

fn list_clients(core: &Core, s: &Session) -> Result<Response, Denied> {
    require(privileged(core, s), Denied::ListClients)?;
    let clients = core
        .sessions()
        .iter()
        .map(|c| {
            let w = c.watched();
            ClientInfo {
                id: c.id,
                pid: c.peer.pid,
                uid: c.peer.uid,
                bound: w.is_some(),
                mirrors: w.map_or(0, |w| w.len() as u32),
                shadow_bytes: w.map_or(0, |w| {
                    w.device().counters().pages.load(Relaxed) * PAGE_SIZE as u64
                }),
                events: w.map_or(0, |w| w.counters().total()),
                comm: comm_of(c),
                faults: w.map_or(0, |w| w.device().counters().faults.load(Relaxed)),
                invalidations: w.map_or(0, |w| w.device().counters().invalidations.load(Relaxed)),
            }
        })
        .collect();
    Ok(Response::Clients { clients })
}
