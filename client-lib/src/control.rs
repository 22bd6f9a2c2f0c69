//! The control API: what `memshadowctl` (and any tool) asks of the daemon — its status,
//! its clients and mirrors, device reads of another client's shadow, injected
//! invalidations and a live trace of invalidations. Requests that touch another client
//! are refused to anyone but root or the daemon's own uid (DESIGN.md §5 G7).

use std::os::fd::AsFd;
use std::sync::Arc;

use memshadow_proto::{
    self as proto, EventKind, InvalidateFlags, InvalidationReport, MirrorInfo, Request, Response,
    FLAG_MORE, MAX_READ,
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

/// A live stream of invalidations ([`Client::trace`]). Blocks in [`Trace::next_record`]
/// until the daemon reports one; ends when the daemon goes away.
#[derive(Debug)]
pub struct Trace {
    inner: Arc<Inner>,
    id: u64,
}

impl Trace {
    /// The next record; `Err(DaemonGone)` when the daemon closes the stream.
    pub fn next_record(&mut self) -> Result<TraceRecord, Error> {
        let mut c = self.inner.lock_conn();
        loop {
            let crate::Conn { sock, buf, .. } = &mut *c;
            let frame = proto::recv(sock.as_fd(), buf).map_err(sock_err)?;
            let resp = Response::decode(frame.header.msg_type, &frame.payload, frame.fds.len())
                .map_err(|e| Error::Protocol(e.to_string()))?;
            match resp {
                Response::TraceEvent { dropped, report } if frame.header.request_id == self.id => {
                    if frame.header.flags & FLAG_MORE == 0 {
                        return Err(Error::Protocol("trace record without FLAG_MORE".into()));
                    }
                    return Ok(TraceRecord { dropped, report });
                }
                Response::Error { code, message } => {
                    return Err(Error::from_response(code, message))
                }
                // Answers to requests of other clones of the client are not ours.
                _ => continue,
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

/// The bit of `kind` in a [`Client::trace`] event mask.
pub fn event_bit(kind: EventKind) -> u32 {
    1 << (kind.code() - 1)
}

impl Client {
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

    /// This session's mirrors.
    pub fn list_mirrors(&self) -> Result<Vec<MirrorInfo>, Error> {
        self.list_mirrors_of(0)
    }

    /// Mirrors of the client with pid `pid` (0: this session, -1: every client); another
    /// client's only for root or the daemon's owner.
    pub fn list_mirrors_of(&self, pid: i32) -> Result<Vec<MirrorInfo>, Error> {
        match self.inner.call(&Request::ListMirrors { pid }, &[])? {
            Response::Mirrors { mirrors } => Ok(mirrors),
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

    /// Subscribes to a live stream of invalidations of client `pid` (0: every client this
    /// caller may see) whose kind is in `events` (bits of [`event_bit`]; 0: all). Use a
    /// client of its own for it: answers to other requests on the same connection are
    /// interleaved with the stream.
    pub fn trace(&self, pid: i32, events: u32) -> Result<Trace, Error> {
        let (resp, id) = self
            .inner
            .call_with_id(&Request::Trace { pid, events }, &[])?;
        match resp {
            Response::TraceStarted => Ok(Trace {
                inner: Arc::clone(&self.inner),
                id,
            }),
            r => Err(unexpected(r)),
        }
    }
}
