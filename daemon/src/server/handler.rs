//! Turns one decoded request of one session into its response: the protocol state machine
//! (Hello → Bind → the rest), the checks of G7 (who may read what, handed-over fds, ranges,
//! quotas) and the mapping of typed errors onto wire error codes.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError};

use memshadow_proto::{
    AccessPath, ClientInfo, ErrorCode, Limits, MirrorInfo, Request, Response, MAX_FDS, MAX_PAYLOAD,
    MAX_READ, MIN_VERSION, VERSION,
};

use super::session::{Binding, Hello, Session};
use super::{error_chain, Core};
use crate::config::AccessPolicy;
use crate::device::DeviceError;
use crate::source::{MemFileSource, MemorySource, ProcessVmSource};
use crate::sys::uffd::{features, Uffd, UffdError};
use crate::sys::{self, PAGE_SIZE};
use crate::watched::{WatchError, Watched};

/// True for requests that may block (memory reads, uffd registration that takes the client's
/// mmap lock, waits for flushes): they run on a worker, the rest inline.
pub fn is_slow(req: &Request) -> bool {
    matches!(
        req,
        Request::Attach { .. }
            | Request::Detach { .. }
            | Request::Read { .. }
            | Request::Populate { .. }
    )
}

fn err(code: ErrorCode, msg: impl Into<String>) -> Response {
    Response::error(code, msg)
}

/// Answers `req` for session `s`, which sent `fds` with it.
pub fn handle(core: &Core, s: &Arc<Session>, req: Request, fds: Vec<OwnedFd>) -> Response {
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
    match req {
        Request::Hello { .. } => err(ErrorCode::OutOfOrder, "second hello"),
        Request::Bind { flags } => bind(core, s, flags, fds),
        Request::Status => Response::Counters {
            entries: status(core),
        },
        Request::ClientStats => Response::Counters {
            entries: client_stats(s),
        },
        Request::ListClients => list_clients(core, s),
        Request::Attach { addr, len, flags } => with_bound(s, |w| {
            if flags != 0 {
                return Err(err(
                    ErrorCode::BadMessage,
                    format!("unknown attach flags {flags:#x}"),
                ));
            }
            // The quota in force now (a reload may have lowered it below the bind-time one
            // that `Watched` enforces).
            let max = core.limits().quotas.mirrors;
            if w.len() >= max as usize {
                return Err(err(
                    ErrorCode::QuotaExceeded,
                    format!("mirror quota of {max} ranges reached"),
                ));
            }
            let id = w.attach(addr, len).map_err(watch_err)?;
            tracing::debug!(client = s.id, mirror = id, addr, len, "attached");
            Ok(Response::Attached { mirror_id: id })
        }),
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
        Request::ListMirrors => with_bound(s, |w| {
            let mirrors = w
                .list()
                .into_iter()
                .map(|m| MirrorInfo {
                    id: m.id,
                    addr: m.addr,
                    len: m.len,
                    pages: m.pages,
                })
                .collect();
            Ok(Response::Mirrors { mirrors })
        }),
    }
}

fn with_bound(s: &Session, f: impl FnOnce(&Watched) -> Result<Response, Response>) -> Response {
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

/// Checks that `fd` is the peer's own `/proc/PID/<what>` (G7: a client hands over only
/// access to itself).
fn check_proc_fd(fd: &OwnedFd, pid: i32, what: &str) -> Result<(), Response> {
    let want = format!("/proc/{pid}/{what}");
    match sys::fd_target(fd.as_fd()) {
        Ok(t) if t == want => Ok(()),
        Ok(t) => Err(err(
            ErrorCode::BadFd,
            format!("expected the client's own {want}, got {t}"),
        )),
        Err(e) => Err(err(
            ErrorCode::BadFd,
            format!("cannot inspect the {what} fd: {e}"),
        )),
    }
}

fn bind(core: &Core, s: &Session, flags: u32, fds: Vec<OwnedFd>) -> Response {
    let _g = s.bind_lock.lock().unwrap_or_else(PoisonError::into_inner);
    if s.binding.get().is_some() {
        return err(ErrorCode::OutOfOrder, "already bound");
    }
    if flags != 0 {
        return err(
            ErrorCode::BadMessage,
            format!("unknown bind flags {flags:#x}"),
        );
    }
    match bind_inner(core, s, fds) {
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
                "client bound"
            );
            let w = Arc::clone(&b.watched);
            let _ = s.binding.set(b);
            if let Err(e) = core.events.watch(s.id, w) {
                return err(ErrorCode::Internal, error_chain(&e));
            }
            resp
        }
        Err(r) => r,
    }
}

fn bind_inner(core: &Core, s: &Session, fds: Vec<OwnedFd>) -> Result<Binding, Response> {
    let mut it = fds.into_iter();
    let (Some(uffd), Some(mem)) = (it.next(), it.next()) else {
        return Err(err(
            ErrorCode::BadFd,
            "bind takes the uffd and /proc/self/mem (and optionally /proc/self/pagemap)",
        ));
    };
    let pagemap = it.next();
    let pid = s.peer.pid;
    check_proc_fd(&mem, pid, "mem")?;
    if let Some(p) = &pagemap {
        check_proc_fd(p, pid, "pagemap")?;
    }
    let uffd = Uffd::from_fd(uffd).map_err(|e| err(ErrorCode::BadFd, error_chain(&e)))?;
    uffd.set_nonblocking()
        .map_err(|e| err(ErrorCode::BadFd, error_chain(&e)))?;
    let wanted = features::EVENT_UNMAP | features::EVENT_REMOVE | features::EVENT_REMAP;
    // Fork events need CAP_SYS_PTRACE; without it, ask for the rest.
    let granted = match uffd.api(wanted | features::EVENT_FORK) {
        Ok(f) => f,
        Err(UffdError::Api(nix::Error::EPERM)) => uffd
            .api(wanted)
            .map_err(|e| err(ErrorCode::BadFd, error_chain(&e)))?,
        Err(e) => {
            return Err(err(
                ErrorCode::BadFd,
                format!("{} (was UFFDIO_API already done on it?)", error_chain(&e)),
            ))
        }
    };
    let (source, access): (Arc<dyn MemorySource>, AccessPath) = match core.cfg.access {
        AccessPolicy::MemFd => (
            Arc::new(MemFileSource::new(File::from(mem))),
            AccessPath::MemFd,
        ),
        policy => {
            // Opening /proc/PID/mem makes the same ptrace-access check as process_vm_readv.
            let permitted =
                File::open(format!("/proc/{pid}/mem")).is_ok() && sys::pidfd_alive(s.pidfd.as_fd());
            if permitted {
                let pidfd = s
                    .pidfd
                    .try_clone()
                    .map_err(|e| err(ErrorCode::Internal, format!("dup pidfd: {e}")))?;
                (
                    Arc::new(ProcessVmSource::pinned(pid, pidfd)),
                    AccessPath::ProcessVm,
                )
            } else if policy == AccessPolicy::ProcessVm {
                return Err(err(
                    ErrorCode::PermissionDenied,
                    "the daemon may not process_vm_readv this client (access = process-vm)",
                ));
            } else {
                (
                    Arc::new(MemFileSource::new(File::from(mem))),
                    AccessPath::MemFd,
                )
            }
        }
    };
    let quotas = core.limits().quotas;
    let device = core.device.client(source, quotas.shadow_bytes);
    let watched = Arc::new(Watched::new(
        uffd,
        device,
        pagemap.map(File::from),
        quotas.mirrors,
    ));
    Ok(Binding {
        watched,
        access,
        uffd_features: granted,
    })
}

fn watch_err(e: WatchError) -> Response {
    let code = match &e {
        WatchError::BadRange { .. } => ErrorCode::BadRange,
        WatchError::Overlap { .. } | WatchError::Device(DeviceError::Overlap { .. }) => {
            ErrorCode::Overlap
        }
        WatchError::TooManyMirrors(_)
        | WatchError::Device(DeviceError::QuotaExceeded { .. } | DeviceError::TooManyMirrors) => {
            ErrorCode::QuotaExceeded
        }
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
        ("server.requests".into(), c.requests.load(Relaxed)),
        ("server.errors".into(), c.errors.load(Relaxed)),
        ("server.released".into(), c.released.load(Relaxed)),
        ("server.threads".into(), thread_count()),
        (
            "events.total".into(),
            live_events + c.events_of_released.load(Relaxed),
        ),
        ("device.engines".into(), core.device.engine_count() as u64),
    ];
    v.extend(core.device.snapshot());
    v
}

fn list_clients(core: &Core, s: &Session) -> Response {
    if s.peer.uid != 0 && s.peer.uid != core.owner {
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
            }
        })
        .collect();
    Response::Clients { clients }
}
