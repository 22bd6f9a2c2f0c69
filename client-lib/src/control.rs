//! The control API: what `memshadowctl` (and any tool) asks of the daemon — its status,
//! its clients and mirrors, device reads of another client's shadow, injected
//! invalidations and a live trace of invalidations. Requests that touch another client
//! are refused to anyone but root or the daemon's own uid (docs/design.md §5 G7).

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use memshadow_proto::{
    self as proto, AckReport, EngineInfo, EventKind, InvalidateFlags, InvalidationReport, Limits,
    MirrorInfo, Request, Response, FLAG_MORE, MAX_READ,
};

use crate::{sock_err, unexpected, Client, ClientInfo, Error, Inner, SyncReport};

/// The daemon's answer to `status`: settings as text and every counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Name → value (`daemon.version`, `socket`, `device.mode`, `dirty.backend`, …).
    pub info: Vec<(String, String)>,
    /// Name → value, every counter of the daemon.
    pub counters: Vec<(String, u64)>,
}

impl Status {
    /// The info line `name`.
    pub fn info(&self, name: &str) -> Option<&str> {
        self.info
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The counter `name`.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

/// One record of a trace stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// Records lost before this one because the reader was too slow.
    pub dropped: u64,
    /// The invalidation.
    pub report: InvalidationReport,
}

/// One external engine's acknowledgement that a finish waited for (protocol 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckRecord {
    /// Records lost before this one because the reader was too slow.
    pub dropped: u64,
    /// The wait.
    pub ack: AckReport,
}

/// One item of a trace stream: an invalidation, or an external engine's acknowledgement of
/// the flushes one queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceItem {
    /// An invalidation, as it ended.
    Invalidation(TraceRecord),
    /// A finish's wait for one external engine, as it ended.
    Ack(AckRecord),
}

/// A live stream of invalidations ([`Control::trace`]), on a connection of its own: blocking
/// in [`Trace::next_item`] holds up no other request. Ends when the daemon goes away.
#[derive(Debug)]
pub struct Trace {
    inner: Inner,
    id: u64,
}

impl Trace {
    /// The next item; `Err(DaemonGone)` when the daemon closes the stream.
    pub fn next_item(&mut self) -> Result<TraceItem, Error> {
        let mut c = self.inner.lock_conn();
        let crate::Conn { sock, buf, .. } = &mut *c;
        let frame = proto::recv(sock.as_fd(), buf).map_err(sock_err)?;
        let resp = Response::decode(frame.header.msg_type, &frame.payload, frame.fds.len())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let ours = frame.header.request_id == self.id;
        let more = frame.header.flags & FLAG_MORE != 0;
        if ours
            && !more
            && matches!(
                resp,
                Response::TraceEvent { .. } | Response::TraceAck { .. }
            )
        {
            return Err(Error::Protocol("trace record without FLAG_MORE".into()));
        }
        match resp {
            Response::TraceEvent { dropped, report } if ours => {
                Ok(TraceItem::Invalidation(TraceRecord { dropped, report }))
            }
            Response::TraceAck { dropped, ack } if ours => {
                Ok(TraceItem::Ack(AckRecord { dropped, ack }))
            }
            Response::Error { code, message } => Err(Error::from_response(code, message)),
            // The connection is the stream's own: nothing else may arrive on it.
            r => Err(unexpected(r)),
        }
    }

    /// The next invalidation, skipping acknowledgement records (whose count of lost records
    /// is added to the invalidation's); `Err(DaemonGone)` when the daemon closes the stream.
    pub fn next_record(&mut self) -> Result<TraceRecord, Error> {
        let mut lost = 0u64;
        loop {
            match self.next_item()? {
                TraceItem::Invalidation(mut r) => {
                    r.dropped = r.dropped.saturating_add(lost);
                    return Ok(r);
                }
                TraceItem::Ack(a) => lost = lost.saturating_add(a.dropped),
            }
        }
    }
}

impl Iterator for Trace {
    type Item = Result<TraceRecord, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_record() {
            Err(Error::DaemonGone) => None,
            r => Some(r),
        }
    }
}

/// The bit of `kind` in a [`Control::trace`] event mask.
pub fn event_bit(kind: EventKind) -> u32 {
    1 << (kind.code() - 1)
}

/// Whose mirrors ([`Control::list_mirrors`]) or invalidations ([`Control::trace`]) a
/// request is about. On the wire `Me` and `All` are the protocol's pids 0 and -1 (mirrors)
/// or this process's pid and 0 (trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// This session's mirrors (so only on a bound session: [`Client::control`]); this
    /// process's invalidations.
    Me,
    /// The client with this pid (positive; another client's only for root or the daemon's
    /// owner).
    Pid(i32),
    /// Every client the caller may see (root and the daemon's owner: every client).
    All,
}

impl Target {
    fn pid(p: i32) -> Result<i32, Error> {
        if p > 0 {
            Ok(p)
        } else {
            Err(Error::NoSuchClient(format!("no client has pid {p}")))
        }
    }

    /// The `pid` of `ListMirrors`.
    pub(crate) fn mirrors_pid(self) -> Result<i32, Error> {
        match self {
            Target::Me => Ok(0),
            Target::Pid(p) => Target::pid(p),
            Target::All => Ok(-1),
        }
    }

    /// The `pid` of `Trace`.
    pub(crate) fn trace_pid(self) -> Result<i32, Error> {
        match self {
            Target::Me => Ok(std::process::id() as i32),
            Target::Pid(p) => Target::pid(p),
            Target::All => Ok(0),
        }
    }
}

/// A control session: the daemon's status, its clients and mirrors, device reads of another
/// client's shadow, injected invalidations and live traces. From [`Control::connect`] (a
/// session of its own, which mirrors nothing) or [`Client::control`] (on a client's
/// session). Cheap to clone; usable from many threads.
#[derive(Debug, Clone)]
pub struct Control {
    pub(crate) inner: Arc<Inner>,
}

impl Control {
    /// Opens a control session at the socket [`crate::socket_path`] finds.
    pub fn connect() -> Result<Control, Error> {
        Client::builder().connect_control()
    }

    /// Opens a control session with the daemon at `path`.
    pub fn connect_to(path: &Path) -> Result<Control, Error> {
        Client::builder().socket(path).connect_control()
    }

    /// The protocol version of the session.
    pub fn protocol_version(&self) -> u16 {
        self.inner.version
    }

    /// The daemon's version.
    pub fn daemon_version(&self) -> &str {
        &self.inner.daemon_version
    }

    /// The daemon's page size.
    pub fn page_size(&self) -> usize {
        self.inner.page_size as usize
    }

    /// The daemon's limits and this session's quotas.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// The daemon's settings and counters.
    pub fn status(&self) -> Result<Status, Error> {
        match self.inner.call(&Request::Status, &[])? {
            Response::StatusReport { info, counters } => Ok(Status { info, counters }),
            r => Err(unexpected(r)),
        }
    }

    /// Every connected client (root or the daemon's owner only).
    pub fn list_clients(&self) -> Result<Vec<ClientInfo>, Error> {
        match self.inner.call(&Request::ListClients, &[])? {
            Response::Clients { clients } => Ok(clients),
            r => Err(unexpected(r)),
        }
    }

    /// The mirrors of `target`: this session's (`Me`), one client's, or every client's;
    /// another client's only for root or the daemon's owner.
    pub fn list_mirrors(&self, target: Target) -> Result<Vec<MirrorInfo>, Error> {
        let pid = target.mirrors_pid()?;
        match self.inner.call(&Request::ListMirrors { pid }, &[])? {
            Response::Mirrors { mirrors } => Ok(mirrors),
            r => Err(unexpected(r)),
        }
    }

    /// External engines (protocol 3): of every client ([`Target::All`], root or the
    /// daemon's owner), or of one client ([`Target::Pid`]: that client itself may ask).
    pub fn engines(&self, target: Target) -> Result<Vec<EngineInfo>, Error> {
        let pid = match target {
            Target::All => 0,
            Target::Pid(p) => Target::pid(p)?,
            Target::Me => std::process::id() as i32,
        };
        match self.inner.call(&Request::ListEngines { pid }, &[])? {
            Response::Engines { engines } => Ok(engines),
            r => Err(unexpected(r)),
        }
    }

    /// A device read of `len` bytes of client `pid`'s shadow at its address `addr` (root or
    /// the daemon's owner only). Pages not yet mirrored are faulted in.
    pub fn peek(&self, pid: i32, addr: u64, len: u64) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while (out.len() as u64) < len {
            let n = (len - out.len() as u64).min(MAX_READ as u64) as u32;
            let at = addr
                .checked_add(out.len() as u64)
                .ok_or_else(|| Error::BadRange(format!("{addr:#x}+{len:#x} overflows")))?;
            match self.inner.call(
                &Request::Peek {
                    pid,
                    addr: at,
                    len: n,
                },
                &[],
            )? {
                Response::Data { bytes } if bytes.len() == n as usize => out.extend(bytes),
                Response::Data { bytes } => {
                    return Err(Error::Protocol(format!(
                        "asked {n} bytes, got {}",
                        bytes.len()
                    )))
                }
                r => return Err(unexpected(r)),
            }
        }
        Ok(out)
    }

    /// Injects an invalidation of `addr..addr+len` of client `pid`'s shadow, reported as
    /// `event`; a non-blocking one may be refused with `EAGAIN` (`would_block` in the report).
    pub fn invalidate(
        &self,
        pid: i32,
        addr: u64,
        len: u64,
        event: EventKind,
        non_blocking: bool,
    ) -> Result<InvalidationReport, Error> {
        let req = Request::Invalidate {
            pid,
            addr,
            len,
            event,
            flags: if non_blocking {
                InvalidateFlags::NON_BLOCKING
            } else {
                InvalidateFlags::empty()
            },
        };
        match self.inner.call(&req, &[])? {
            Response::Invalidated { report } => Ok(report),
            r => Err(unexpected(r)),
        }
    }

    /// Collects the pages client `pid` wrote in every one of its mirrors and invalidates
    /// them (root, the daemon's owner, or that client itself): `memshadowctl sync --pid`.
    pub fn sync_pid(&self, pid: i32) -> Result<SyncReport, Error> {
        crate::sync_call(&self.inner, Request::SyncPid { pid })
    }

    /// Subscribes to a live stream of the invalidations of `target` whose kind is in
    /// `events` (bits of [`event_bit`]; 0: all), and of the acknowledgements of external
    /// engines that their finishes waited for (with a mask of 0, or with
    /// [`TRACE_ENGINE_ACKS`](crate::TRACE_ENGINE_ACKS) in it; [`Trace::next_item`] returns
    /// them, [`Trace::next_record`] skips them). The stream has a connection of its own,
    /// opened at the path this session was opened on, so waiting for records holds up no
    /// other request of this session (`Error::Unsupported` for a session opened on a socket
    /// handed over without a path: [`crate::Builder::socket_fd`]).
    pub fn trace(&self, target: Target, events: u32) -> Result<Trace, Error> {
        let pid = target.trace_pid()?;
        let path = self.inner.path.clone().ok_or_else(|| {
            Error::Unsupported(
                "a trace needs a connection of its own, and this session has no socket path \
                 to open one at"
                    .into(),
            )
        })?;
        let sock = crate::connect_socket(&path)?;
        let inner = crate::open_session(sock, Some(path), self.inner.name.clone(), None)?;
        let (resp, id) = inner.call_with_id(&Request::Trace { pid, events }, &[])?;
        match resp {
            Response::TraceStarted => Ok(Trace { inner, id }),
            r => Err(unexpected(r)),
        }
    }
}
