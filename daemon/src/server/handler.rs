//! Turns one decoded request of one session into its response: the protocol state machine
//! (Hello → Bind → the rest), the checks of G7 (who may read what, handed-over fds, ranges,
//! quotas) and the mapping of typed errors onto wire error codes.

use crate::lock;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use memshadow_proto::{
    AccessPath, AttachPolicy, BindFlags, ClientInfo, ErrorCode, EventKind, InvalidateFlags, Limits,
    MirrorInfo, Request, Response, SyncReport, MAX_FDS, MAX_PAYLOAD, MAX_READ, MIN_VERSION,
    VERSION,
};

use super::convert;
use super::session::{Binding, Hello, Session};
use super::stream::{event_of, report_of, Subscriber};
use super::{error_chain, Core};
use crate::address_space::{AddressSpace, SyncStats, WatchError};
use crate::device::{DeviceError, ShadowError};
use crate::dirty::periodic::MIN_PERIOD;
use crate::dirty::uffd_wp::ArmingSource;
use crate::dirty::{Backend, ClientDirty, DirtyPolicy};
use crate::handover::Handover;
use crate::source::{MemFileSource, MemorySource};
use crate::sys::maps::Maps;
use crate::sys::uffd::{features, UffdError};
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
    )
}

/// Root and the daemon's own uid may look at and act on every client (G7).
fn privileged(core: &Core, s: &Session) -> bool {
    core.privileged(s.peer.uid)
}

/// Trace streams one session may receive.
const MAX_STREAMS: u32 = 1;

fn err(code: ErrorCode, msg: impl Into<String>) -> Response {
    Response::error(code, msg)
}

/// Answers request `rid` of session `s`, `req`, which came with `fds`.
pub fn handle(
    core: &Core,
    s: &Arc<Session>,
    rid: u64,
    req: Request,
    fds: Vec<OwnedFd>,
) -> Response {
    if core.stopping.load(Relaxed) {
        return err(ErrorCode::ShuttingDown, "the daemon is shutting down");
    }
    let Some(hello) = s.hello.get() else {
        return match req {
            Request::Hello {
                min_version,
                max_version,
                name,
            } => hello(core, s, min_version, max_version, name),
            other => err(
                ErrorCode::OutOfOrder,
                format!("{} before hello", other.name()),
            ),
        };
    };
    let _ = hello;
    if let Some(w) = s.watched() {
        if !w.alive() {
            // The client `exec`ed (or exited) and another process speaks for it: nothing of
            // the address space it bound is left to serve (docs/threat-model.md).
            core.note_gone(s);
            return err(
                ErrorCode::AccessFailed,
                "the client's address space is gone (it exec'd or exited); the session ends",
            );
        }
    }
    match req {
        Request::Hello { .. } => err(ErrorCode::OutOfOrder, "second hello"),
        Request::Bind { flags } => bind(core, s, flags, fds),
        Request::Status => Response::StatusReport {
            info: status_info(core, s),
            counters: status(core),
        },
        Request::ClientStats => Response::Counters {
            entries: client_stats(s),
        },
        Request::ListClients => list_clients(core, s),
        Request::Attach { addr, len, policy } => attach(core, s, addr, len, policy),
        Request::Detach { mirror_id } => with_bound(s, |w| {
            w.detach(mirror_id).map_err(watch_err)?;
            Ok(Response::Detached)
        }),
        Request::Read {
            mirror_id,
            offset,
            len,
        } => with_bound(s, |w| {
            if len as usize > MAX_READ {
                return Err(err(
                    ErrorCode::BadRange,
                    format!("read of {len} bytes exceeds the limit of {MAX_READ}"),
                ));
            }
            let bytes = w.read(mirror_id, offset, len as usize).map_err(watch_err)?;
            Ok(Response::Data { bytes })
        }),
        Request::Populate {
            mirror_id,
            offset,
            len,
        } => with_bound(s, |w| {
            let pages = w.populate(mirror_id, offset, len).map_err(watch_err)?;
            Ok(Response::Populated { pages })
        }),
        Request::ListMirrors { pid: 0 } => with_bound(s, |w| {
            Ok(Response::Mirrors {
                mirrors: mirror_infos(s.peer.pid, w),
            })
        }),
        Request::ListMirrors { pid } => list_mirrors(core, s, pid),
        Request::Peek { pid, addr, len } => peek(core, s, pid, addr, len),
        Request::Invalidate {
            pid,
            addr,
            len,
            event,
            flags,
        } => invalidate(core, s, pid, addr, len, event, flags),
        Request::Trace { pid, events } => trace(core, s, rid, pid, events),
        Request::Sync { mirror_id } => with_bound(s, |w| {
            let id = (mirror_id != 0).then_some(mirror_id);
            let done = w.sync(id).map_err(watch_err)?;
            Ok(synced(&done))
        }),
        Request::SyncPid { pid } => {
            let c = match target(core, s, pid, true) {
                Ok(c) => c,
                Err(r) => return r,
            };
            with_bound(&c, |w| {
                let done = w.sync(None).map_err(watch_err)?;
                tracing::debug!(
                    pid,
                    by = s.peer.pid,
                    pages_dirty = done.collected.pages_dirty,
                    "sync of a client"
                );
                Ok(synced(&done))
            })
        }
    }
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

/// `Attach`, with its collection policy: the flags' choice, else the daemon's default (which
/// falls back to `manual` for a client without dirty tracking; an explicit policy other than
/// `manual` is refused to such a client).
fn attach(core: &Core, s: &Session, addr: u64, len: u64, requested: AttachPolicy) -> Response {
    let Some(b) = s.binding.get() else {
        return err(ErrorCode::OutOfOrder, "bind first");
    };
    let w = &b.watched;
    // The quota in force now (a reload may have lowered it below the bind-time one that
    // `AddressSpace` enforces).
    let max = core.limits().quotas.mirrors;
    if w.len() >= max as usize {
        return err(
            ErrorCode::QuotaExceeded,
            format!("mirror quota of {max} ranges reached"),
        );
    }
    let mut policy = convert::attach_policy(requested, core.cfg.dirty.policy);
    if requested == AttachPolicy::Default && w.dirty().backend().is_err() {
        policy = DirtyPolicy::Manual;
    }
    if let DirtyPolicy::Periodic(p) = policy {
        if p < MIN_PERIOD {
            return err(
                ErrorCode::QuotaExceeded,
                format!(
                    "a collection period of {} ms is below the daemon's minimum of {} ms",
                    p.as_millis(),
                    MIN_PERIOD.as_millis()
                ),
            );
        }
    }
    w.set_attach_quota(core.limits().quotas.attached_bytes);
    let id = match w.attach_with(addr, len, policy) {
        Ok(id) => id,
        Err(WatchError::Uffd(UffdError::Busy { .. })) if another_session_of(core, s) => {
            return err(
                ErrorCode::AlreadyWatched,
                format!(
                    "range {addr:#x}+{len:#x} is already attached through another memshadow \
                     session of this process (pid {}); the kernel lets one userfaultfd watch \
                     a range, so attach it through that session (clone its Client): mirrors \
                     of one session may overlap",
                    s.peer.pid
                ),
            )
        }
        Err(e) => return watch_err(e),
    };
    if let DirtyPolicy::Periodic(period) = policy {
        let target: Arc<dyn crate::dirty::periodic::PeriodicTarget> = Arc::clone(w) as _;
        core.dirty
            .periodic
            .add(Arc::downgrade(&target), id, period, s.peer.uid);
    }
    tracing::debug!(client = s.id, mirror = id, addr, len, policy = %policy, "attached");
    Response::Attached { mirror_id: id }
}

/// True if the peer of `s` has another bound session (with another userfaultfd of the same
/// address space).
fn another_session_of(core: &Core, s: &Session) -> bool {
    core.sessions()
        .iter()
        .any(|o| o.id != s.id && o.peer.pid == s.peer.pid && o.watched().is_some())
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

/// The bound client with pid `pid`, for a request that acts on another client: refused to
/// anyone but root, the daemon's owner, or (if `self_ok`) that client itself.
fn target(core: &Core, s: &Session, pid: i32, self_ok: bool) -> Result<Arc<Session>, Response> {
    let allowed = privileged(core, s) || (self_ok && pid == s.peer.pid);
    if !allowed {
        return Err(err(
            ErrorCode::PermissionDenied,
            format!("acting on pid {pid} is for root or the daemon's owner"),
        ));
    }
    core.sessions()
        .into_iter()
        .find(|c| c.peer.pid == pid && c.watched().is_some())
        .ok_or_else(|| {
            err(
                ErrorCode::NoSuchClient,
                format!("no bound client with pid {pid}"),
            )
        })
}

fn list_mirrors(core: &Core, s: &Session, pid: i32) -> Response {
    if !privileged(core, s) && pid != s.peer.pid {
        return err(
            ErrorCode::PermissionDenied,
            "listing another client's mirrors is for root or the daemon's owner",
        );
    }
    let mut mirrors: Vec<MirrorInfo> = core
        .sessions()
        .iter()
        .filter(|c| pid == -1 || c.peer.pid == pid)
        .filter_map(|c| c.watched().map(|w| mirror_infos(c.peer.pid, w)))
        .flatten()
        .collect();
    mirrors.sort_by_key(|m| (m.pid, m.addr));
    Response::Mirrors { mirrors }
}

fn peek(core: &Core, s: &Session, pid: i32, addr: u64, len: u32) -> Response {
    let c = match target(core, s, pid, false) {
        Ok(c) => c,
        Err(r) => return r,
    };
    with_bound(&c, |w| {
        if len as usize > MAX_READ {
            return Err(err(
                ErrorCode::BadRange,
                format!("read of {len} bytes exceeds the limit of {MAX_READ}"),
            ));
        }
        let m = w.find(addr).ok_or_else(|| {
            err(
                ErrorCode::NotMirrored,
                format!("{addr:#x} is not in a mirror of pid {pid}"),
            )
        })?;
        let bytes = w
            .read(m.id, addr - m.addr, len as usize)
            .map_err(watch_err)?;
        Ok(Response::Data { bytes })
    })
}

#[allow(clippy::too_many_arguments)]
fn invalidate(
    core: &Core,
    s: &Session,
    pid: i32,
    addr: u64,
    len: u64,
    event: EventKind,
    flags: InvalidateFlags,
) -> Response {
    let c = match target(core, s, pid, true) {
        Ok(c) => c,
        Err(r) => return r,
    };
    with_bound(&c, |w| {
        let blockable = !flags.contains(InvalidateFlags::NON_BLOCKING);
        let done = w
            .inject(addr, len, event_of(event), blockable)
            .map_err(watch_err)?;
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

fn trace(core: &Core, s: &Arc<Session>, rid: u64, pid: i32, events: u32) -> Response {
    let pid = match pid {
        0 if privileged(core, s) => None,
        0 => {
            return err(
                ErrorCode::PermissionDenied,
                "tracing every client is for root or the daemon's owner (trace your own pid)",
            )
        }
        p if p == s.peer.pid || privileged(core, s) => Some(p),
        p => {
            return err(
                ErrorCode::PermissionDenied,
                format!("tracing pid {p} is for root or the daemon's owner"),
            )
        }
    };
    if events >> EventKind::ALL.len() != 0 {
        return err(
            ErrorCode::BadMessage,
            format!("unknown event bits in {events:#x}"),
        );
    }
    if s.streams.fetch_add(1, Relaxed) >= MAX_STREAMS {
        s.streams.fetch_sub(1, Relaxed);
        return err(
            ErrorCode::QuotaExceeded,
            format!("a session may have {MAX_STREAMS} trace stream; open another connection"),
        );
    }
    core.streams.add(Subscriber {
        session: Arc::downgrade(s),
        request_id: rid,
        pid,
        events,
        dropped: 0,
    });
    tracing::debug!(client = s.id, ?pid, events, "trace stream started");
    Response::TraceStarted
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

fn with_bound(
    s: &Session,
    f: impl FnOnce(&AddressSpace) -> Result<Response, Response>,
) -> Response {
    match s.watched() {
        None => err(ErrorCode::OutOfOrder, "bind first"),
        Some(w) => f(w).unwrap_or_else(|e| e),
    }
}

fn hello(core: &Core, s: &Session, min: u16, max: u16, name: String) -> Response {
    let lo = min.max(MIN_VERSION);
    let hi = max.min(VERSION);
    if min > max || lo > hi {
        return err(
            ErrorCode::ProtocolVersion,
            format!("client speaks {min}..={max}, daemon speaks {MIN_VERSION}..={VERSION}"),
        );
    }
    let limits = core.limits();
    let q = limits.quotas;
    // The name is for logs and listings: never let a client write control characters there.
    let name = escape_controls(&name);
    let _ = s.hello.set(Hello {
        version: hi,
        name: name.clone(),
    });
    tracing::debug!(client = s.id, pid = s.peer.pid, name = %name, version = hi, "hello");
    Response::HelloAck {
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
    }
}

fn bind(core: &Core, s: &Session, flags: BindFlags, fds: Vec<OwnedFd>) -> Response {
    let _g = lock(&s.bind_lock);
    if s.binding.get().is_some() {
        return err(ErrorCode::OutOfOrder, "already bound");
    }
    match bind_inner(core, s, flags.contains(BindFlags::UFFD_PRIVILEGED), fds) {
        Ok(b) => {
            let resp = Response::Bound {
                access: b.access,
                uffd_features: b.uffd_features,
            };
            tracing::info!(
                client = s.id,
                pid = s.peer.pid,
                uid = s.peer.uid,
                access = b.access.as_str(),
                dirty = b.watched.dirty().backend().map_or("off", Backend::as_str),
                "client bound"
            );
            let w = Arc::clone(&b.watched);
            let _ = s.binding.set(b);
            if let Err(e) = core.events.watch(s.id, w, s.peer.uid) {
                return err(ErrorCode::Internal, error_chain(&e));
            }
            resp
        }
        Err(r) => r,
    }
}

fn bind_inner(
    core: &Core,
    s: &Session,
    privileged_uffd: bool,
    fds: Vec<OwnedFd>,
) -> Result<Binding, Response> {
    let pid = s.peer.pid;
    let version = s.hello.get().map_or(1, |h| h.version);
    let Handover {
        uffd,
        mem,
        maps,
        pagemap,
        clear_refs,
    } = Handover::check(fds, pid, version).map_err(|e| err(ErrorCode::BadFd, error_chain(&e)))?;
    let maps = maps.map(|f| Arc::new(Maps::new(f)));
    // The dirty back end decides features of the uffd (WP_ASYNC or not), so it is chosen now.
    let backend = core
        .dirty
        .selection
        .for_client(pagemap.is_some(), privileged_uffd);
    let clear_refs = match (&backend, clear_refs) {
        (Ok(Backend::SoftDirty), Some(f)) => Some(f),
        (Ok(Backend::SoftDirty), None) => {
            return Err(err(
                ErrorCode::BadFd,
                "the soft-dirty back end needs the client's /proc/self/clear_refs (the last fd of Bind)",
            ))
        }
        _ => None,
    };
    if let Err(why) = &backend {
        tracing::debug!(client = s.id, pid, reason = %why, "client without dirty tracking");
    }
    let dirty_features = backend.as_ref().map_or(0, |b| b.uffd_features());
    let wanted =
        features::EVENT_UNMAP | features::EVENT_REMOVE | features::EVENT_REMAP | dirty_features;
    // Fork events need CAP_SYS_PTRACE; without it, ask for the rest. UFFDIO_API answers
    // with every feature the kernel offers; what is enabled is what was asked for.
    let granted = match uffd.api(wanted | features::EVENT_FORK) {
        Ok(f) => f & (wanted | features::EVENT_FORK),
        Err(UffdError::Api(nix::Error::EPERM)) => {
            uffd.api(wanted)
                .map_err(|e| err(ErrorCode::BadFd, error_chain(&e)))?
                & wanted
        }
        Err(e) => {
            return Err(err(
                ErrorCode::BadFd,
                format!("{} (was UFFDIO_API already done on it?)", error_chain(&e)),
            ))
        }
    };
    // The one way into the client's memory: the file it opened itself (docs/threat-model.md).
    let source: Arc<dyn MemorySource> = Arc::new(MemFileSource::new(mem, maps.clone()));
    let dirty = Arc::new(ClientDirty::new(
        backend,
        clear_refs,
        Arc::clone(&core.dirty.counters),
    ));
    let uffd = Arc::new(std::sync::Mutex::new(Some(uffd)));
    let source: Arc<dyn MemorySource> = if dirty.is(Backend::UffdWp) {
        Arc::new(ArmingSource::new(
            source,
            Arc::clone(&uffd),
            Arc::clone(&dirty),
        ))
    } else {
        source
    };
    let quotas = core.limits().quotas;
    let device = core
        .device
        .client_of(source, quotas.shadow_bytes, core.account(s.peer.uid));
    device.set_trace_tag(u64::try_from(s.peer.pid).unwrap_or(0));
    let watched = Arc::new(
        AddressSpace::with_dirty(uffd, device, pagemap, quotas.mirrors, dirty).with_maps(maps),
    );
    Ok(Binding {
        watched,
        access: AccessPath::MemFd,
        uffd_features: granted,
    })
}

fn watch_err(e: WatchError) -> Response {
    let code = match &e {
        WatchError::BadRange { .. } | WatchError::Hole { .. } | WatchError::DiskFile { .. } => {
            ErrorCode::BadRange
        }
        WatchError::Maps(crate::sys::maps::MapsError::Gone) => ErrorCode::AccessFailed,
        WatchError::Maps(_) => ErrorCode::Internal,
        WatchError::TooManyMirrors(_)
        | WatchError::TooMuchAttached { .. }
        | WatchError::Device(
            DeviceError::QuotaExceeded { .. }
            | DeviceError::UserQuotaExceeded { .. }
            | DeviceError::TooManyMirrors,
        ) => ErrorCode::QuotaExceeded,
        WatchError::Device(DeviceError::Shadow(ShadowError::Full { .. })) => ErrorCode::ShadowFull,
        WatchError::NoSuchMirror(_) | WatchError::Device(DeviceError::NoSuchMirror(_)) => {
            ErrorCode::NoSuchMirror
        }
        WatchError::NotMirrored(_)
        | WatchError::Device(DeviceError::NotMirrored { .. } | DeviceError::NotMapped { .. }) => {
            ErrorCode::NotMirrored
        }
        WatchError::Uffd(UffdError::Busy { .. }) => ErrorCode::AlreadyWatched,
        WatchError::Uffd(UffdError::Invalid { .. })
        | WatchError::Device(DeviceError::Unaligned { .. } | DeviceError::Range(_)) => {
            ErrorCode::BadRange
        }
        WatchError::Device(DeviceError::Source(_)) => ErrorCode::AccessFailed,
        WatchError::Released | WatchError::Device(DeviceError::Stopped) => ErrorCode::ShuttingDown,
        WatchError::Busy => ErrorCode::Internal,
        WatchError::NotTracked(_) => ErrorCode::Unsupported,
        WatchError::Dirty(_) => ErrorCode::Internal,
        WatchError::Uffd(_) | WatchError::Device(_) => ErrorCode::Internal,
    };
    err(code, error_chain(&e))
}

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
    // Who the connections are (the counter `server.clients` counts them all): bound clients
    // (they mirror their memory), sessions that stream a trace, other control sessions (the
    // one asking included), and connections that have not said hello yet.
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
    for (k, n) in [
        ("sessions.bound", bound),
        ("sessions.tracing", tracing),
        ("sessions.control", control),
        ("sessions.handshake", handshake),
    ] {
        v.push((k.to_owned(), n.to_string()));
    }
    v
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

fn list_clients(core: &Core, s: &Session) -> Response {
    if !privileged(core, s) {
        return err(
            ErrorCode::PermissionDenied,
            "listing clients is for root or the daemon's owner",
        );
    }
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
    Response::Clients { clients }
}
