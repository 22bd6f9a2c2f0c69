//! libmemshadow: the client library of memshadowd (docs/design.md §1).
//!
//! [`Client::connect`] opens a session, creates this process's userfaultfd and hands it to
//! the daemon with the fds it needs to read this process's memory, then **closes its own
//! copies** (G6: if the daemon dies, the kernel releases every blocked `munmap`/`madvise`).
//! [`Client::attach`] mirrors a range; [`Mirror::read`] is a device read served by the
//! daemon's engines from the shadow. Writes to mirrored memory reach the shadow when the
//! daemon collects them (dirty tracking): on [`Mirror::sync`], or as the [`Policy`] given
//! to [`Client::attach_with`] says. The C ABI over this API is the `memshadow-capi`
//! crate (`libmemshadow.so`), and `memshadowctl` the `memshadow-ctl` crate.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use memshadow::Client;
//!
//! let client = Client::connect()?;                  // MEMSHADOW_SOCKET or the default path
//! let buf = memmap2::MmapMut::map_anon(1 << 20)?;
//! let mirror = client.attach_mmap(&buf)?;            // or client.attach(ptr, len)
//! let mut out = [0u8; 64];
//! mirror.read(4096, &mut out)?;                      // a device read, served from the shadow
//! println!("{:?}", client.stats()?);                 // this session's counters
//! mirror.detach()?;                                  // or drop it
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use control::{event_bit, AckRecord, Control, Status, Target, Trace, TraceItem, TraceRecord};
use memshadow_proto::{
    self as proto, AttachPolicy, BindFlags, Request, Response, SocketError, MAX_READ, MIN_VERSION,
    VERSION,
};
pub use memshadow_proto::{
    error_chain, AccessPath, AckOutcome, AckReport, ClientInfo, DirtyBackend, EngineInfo,
    ErrorCode, EventKind, InvalidationReport, Limits, MirrorInfo, SyncReport, TRACE_ENGINE_ACKS,
};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

mod control;
mod discover;
pub mod engine;
pub mod monitor;
pub mod run;

pub use engine::{Engine, EngineStats};
pub use monitor::{Drained, Monitor, MonitorEvent, MonitorEvents};

/// `UFFD_USER_MODE_ONLY`: lets an unprivileged process create a uffd (user faults only).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Errors of the client library. New kinds may be added in a minor release: match with a
/// wildcard arm. [`Error::raw_os_error`] is the errno behind an error, if any.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No socket path could be worked out: `MEMSHADOW_SOCKET` is not set, nothing is at
    /// the system socket, and the caller is not root and has no `XDG_RUNTIME_DIR`.
    #[error(
        "no memshadowd socket: nothing at /run/memshadow/memshadowd.sock, and neither \
         MEMSHADOW_SOCKET nor XDG_RUNTIME_DIR is set"
    )]
    NoSocketPath,
    /// The daemon's socket could not be reached.
    #[error("cannot connect to memshadowd at {path}")]
    Connect {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The daemon's socket refused this user (`EACCES` or `EPERM` from `connect`). The hint
    /// says why and what would let it in, usually which group to join; the errno is in
    /// [`Error::raw_os_error`].
    #[error("permission denied connecting to memshadowd at {path}: {hint}")]
    ConnectDenied {
        /// The path.
        path: PathBuf,
        /// What the socket's owner, group and mode, and this process's groups, say.
        hint: String,
        /// `EACCES` or `EPERM`.
        errno: nix::Error,
    },
    /// The daemon went away (or is shutting down).
    #[error("memshadowd is gone")]
    DaemonGone,
    /// No protocol version in common.
    #[error("no common protocol version: {0}")]
    ProtocolVersion(String),
    /// The process is not dumpable, so it cannot open its own `/proc/self/mem` (e.g. after
    /// a setuid); the daemon would have no way to read its memory.
    #[error("this process is not dumpable (after setuid?): cannot open /proc/self/mem")]
    NotDumpable(#[source] std::io::Error),
    /// A userfaultfd could not be created.
    #[error("cannot create a userfaultfd")]
    Uffd(#[source] std::io::Error),
    /// Opening `/proc/self/...` failed.
    #[error("cannot open {0}")]
    Proc(&'static str, #[source] std::io::Error),
    /// The address is not (or no longer) mirrored.
    #[error("not mirrored: {0}")]
    NotMirrored(String),
    /// No such mirror.
    #[error("no such mirror: {0}")]
    NoSuchMirror(String),
    /// No bound client with that pid.
    #[error("no such client: {0}")]
    NoSuchClient(String),
    /// The daemon cannot do it here (e.g. no dirty tracking for this client).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A quota of this client would be exceeded.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The daemon's shadow buffer has no room left for this client: the other clients hold
    /// the rest (not this client's own quota).
    #[error("shadow buffer full: {0}")]
    ShadowFull(String),
    /// The daemon ran out of a system resource (file descriptors, memory); trying again
    /// later may work.
    #[error("memshadowd is out of resources: {0}")]
    OutOfResources(String),
    /// Another userfaultfd already watches the range (`EBUSY`).
    #[error("range already watched by another userfaultfd: {0}")]
    AlreadyWatched(String),
    /// A bogus range.
    #[error("bad range: {0}")]
    BadRange(String),
    /// Overlaps an attached range.
    #[error("overlaps an attached range: {0}")]
    Overlap(String),
    /// The daemon has too many clients.
    #[error("too many clients: {0}")]
    TooManyClients(String),
    /// Not allowed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The daemon says the exchange broke the protocol, or answered something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An argument the library refuses before asking the daemon (a session name longer
    /// than the protocol carries, say).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No grant with that token: wrong, revoked (the mirror was detached or its client
    /// exited), or given to another user ([`Engine::attach`]).
    #[error("no such grant: {0}")]
    NoSuchGrant(String),
    /// This engine was evicted: it did not acknowledge a flush in time, so the daemon no
    /// longer waits for it ([`Engine`]).
    #[error("engine evicted: {0}")]
    Evicted(String),
    /// Any other refusal.
    #[error("memshadowd refused ({code:?}): {message}")]
    Daemon {
        /// The code.
        code: ErrorCode,
        /// The message.
        message: String,
    },
    /// A socket error.
    #[error("socket error")]
    Socket(#[source] SocketError),
}

impl Error {
    /// The errno of the failed system call behind this error (`ENOENT` or `ECONNREFUSED`
    /// for a [`Error::Connect`], `EPERM` for a [`Error::Uffd`], ...), found by walking its
    /// causes; `None` when there is none (a refusal of the daemon, a broken protocol).
    pub fn raw_os_error(&self) -> Option<i32> {
        if let Error::ConnectDenied { errno, .. } = self {
            return Some(*errno as i32);
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(n) = e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
            {
                return Some(n);
            }
            if let Some(&errno) = e.downcast_ref::<nix::errno::Errno>() {
                return (errno as i32 != 0).then_some(errno as i32);
            }
            cause = e.source();
        }
        None
    }

    fn from_response(code: ErrorCode, message: String) -> Error {
        match code {
            ErrorCode::NotMirrored => Error::NotMirrored(message),
            ErrorCode::NoSuchMirror => Error::NoSuchMirror(message),
            ErrorCode::NoSuchClient => Error::NoSuchClient(message),
            ErrorCode::Unsupported => Error::Unsupported(message),
            ErrorCode::QuotaExceeded => Error::QuotaExceeded(message),
            ErrorCode::ShadowFull => Error::ShadowFull(message),
            ErrorCode::OutOfResources => Error::OutOfResources(message),
            ErrorCode::AlreadyWatched => Error::AlreadyWatched(message),
            ErrorCode::BadRange => Error::BadRange(message),
            ErrorCode::Overlap => Error::Overlap(message),
            ErrorCode::TooManyClients => Error::TooManyClients(message),
            ErrorCode::PermissionDenied => Error::PermissionDenied(message),
            ErrorCode::ProtocolVersion => Error::ProtocolVersion(message),
            ErrorCode::OutOfOrder | ErrorCode::BadMessage | ErrorCode::BadFd => {
                Error::Protocol(message)
            }
            ErrorCode::ShuttingDown => Error::DaemonGone,
            ErrorCode::NoSuchGrant => Error::NoSuchGrant(message),
            ErrorCode::Evicted => Error::Evicted(message),
            code => Error::Daemon { code, message },
        }
    }
}

fn sock_err(e: SocketError) -> Error {
    match e {
        SocketError::Closed => Error::DaemonGone,
        SocketError::Io(nix::Error::ECONNRESET | nix::Error::EPIPE | nix::Error::ENOTCONN) => {
            Error::DaemonGone
        }
        e => Error::Socket(e),
    }
}

/// The daemon's socket, as every client finds it: `$MEMSHADOW_SOCKET` if set, else
/// `/run/memshadow/memshadowd.sock` if something is there (for every user: a member of the
/// socket's group reaches the system daemon with no setting), else
/// `$XDG_RUNTIME_DIR/memshadow/memshadowd.sock` if something is there; with nothing found,
/// the path a daemon this user started without `--socket` would listen at (the system
/// socket for root, else the per-user one), or [`Error::NoSocketPath`].
pub fn socket_path() -> Result<PathBuf, Error> {
    discover::Lookup::here()
        .discover()
        .ok_or(Error::NoSocketPath)
}

/// Creates this process's userfaultfd (non-blocking, close-on-exec), falling back to
/// `UFFD_USER_MODE_ONLY` when the process may not create a full one. `UFFDIO_API` is left
/// to the daemon.
pub fn create_uffd() -> Result<OwnedFd, Error> {
    create_uffd_kind().map(|(fd, _)| fd)
}

/// [`create_uffd`], also saying whether the uffd is a full one (created without
/// `UFFD_USER_MODE_ONLY`: the kernel's own accesses to write-protected pages wait for the
/// daemon rather than fail), which the daemon needs to know to track writes with
/// write-protect faults.
fn create_uffd_kind() -> Result<(OwnedFd, bool), Error> {
    match create_uffd_with(0) {
        Ok(fd) => Ok((fd, true)),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => create_uffd_with(UFFD_USER_MODE_ONLY)
            .map(|fd| (fd, false))
            .map_err(Error::Uffd),
        Err(e) => Err(Error::Uffd(e)),
    }
}

/// When the daemon collects the pages this process writes in an attached range, so device
/// reads return the new bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Only on [`Mirror::sync`] (or [`Client::sync`]).
    Manual,
    /// As `Manual`, but nothing is tracked until the first sync, which invalidates the whole
    /// range (later ones, what was written since the one before): this process's first
    /// writes to the range cost it no write-protect fault. For ranges synced seldom, or never
    /// (protocol 4; `memshadow-run`'s default).
    Lazy,
    /// Before every device read of the range (the pages read are collected first).
    Strict,
    /// On a timer of the daemon, with this period (10 ms, the daemon's minimum, to about
    /// 4.6 h).
    Periodic(Duration),
}

impl Policy {
    fn wire(self) -> AttachPolicy {
        match self {
            Policy::Manual => AttachPolicy::Manual,
            Policy::Lazy => AttachPolicy::Lazy,
            Policy::Strict => AttachPolicy::Strict,
            Policy::Periodic(d) => AttachPolicy::Periodic {
                period_ms: u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1),
            },
        }
    }
}

fn create_uffd_with(extra: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain system call with integer flags; on success it returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | extra,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[derive(Debug)]
struct Conn {
    sock: OwnedFd,
    next_id: u64,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Inner {
    conn: Mutex<Conn>,
    version: u16,
    daemon_version: String,
    page_size: u32,
    limits: Limits,
    bound: Option<(AccessPath, u64)>,
    /// The socket path the session was opened on (`None`: a socket handed over), where a
    /// trace opens a connection of its own.
    path: Option<PathBuf>,
    /// The name this session gave the daemon.
    name: String,
    /// The shared objects of this session's monitors, once set up.
    monitors: std::sync::OnceLock<Arc<monitor::Shared>>,
}

impl Inner {
    /// One lock-step exchange. An answer that brings fds is refused ([`Error::Protocol`]) and
    /// its fds closed: only [`Inner::call_fds`] takes them.
    fn call(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Response, Error> {
        self.call_with_id(req, fds).map(|(r, _)| r)
    }

    /// One lock-step exchange whose answer may bring fds (`EngineAttached`): returns them
    /// with it, in the order they were sent. How many a message type may carry is checked by
    /// its decoding; the caller checks what they are.
    fn call_fds(&self, req: &Request) -> Result<(Response, Vec<OwnedFd>), Error> {
        let mut c = self.lock_conn();
        let id = c.send(req, &[])?;
        let Conn { sock, buf, .. } = &mut *c;
        receive_answer_fds(sock.as_fd(), buf, id)
    }

    fn lock_conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One lock-step exchange; also returns the request id it used.
    fn call_with_id(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, u64), Error> {
        let mut c = self.lock_conn();
        let id = c.send(req, fds)?;
        let Conn { sock, buf, .. } = &mut *c;
        receive_answer(sock.as_fd(), buf, id).map(|r| (r, id))
    }
}

impl Inner {
    /// A lock-step exchange that, while the answer has not come, calls `serve` whenever
    /// `other` is readable (an engine acknowledging flushes while its fault is served:
    /// the fault may wait for an invalidation that waits for that engine).
    pub(crate) fn call_serving(
        &self,
        req: &Request,
        other: BorrowedFd<'_>,
        mut serve: impl FnMut() -> Result<(), Error>,
    ) -> Result<Response, Error> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut c = self.lock_conn();
        let id = c.send(req, &[])?;
        loop {
            let mut fds = [
                PollFd::new(c.sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(other, PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(sock_err(SocketError::Io(e))),
            }
            let answered = fds[0].revents().is_some_and(|r| !r.is_empty());
            let rang = fds[1].revents().is_some_and(|r| !r.is_empty());
            if rang {
                serve()?;
            }
            if answered {
                break;
            }
        }
        let Conn { sock, buf, .. } = &mut *c;
        receive_answer(sock.as_fd(), buf, id)
    }
}

impl Conn {
    /// Sends `req` with `fds` under a new request id, which it returns.
    fn send(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<u64, Error> {
        self.next_id += 1;
        let id = self.next_id;
        let sent = proto::send(
            self.sock.as_fd(),
            req.msg_type(),
            0,
            id,
            &req.encode_payload(),
            fds,
        );
        match sent {
            Ok(()) => Ok(id),
            // A daemon that refused the connection (too many clients, say) sent why before
            // it closed: that answer is still there to read, and says more than "gone".
            Err(e) => Err(refusal(self.sock.as_fd(), &mut self.buf).unwrap_or_else(|| sock_err(e))),
        }
    }
}

/// Receives the answer to request `id` on `sock`: a long list comes in pieces, every one
/// but the last with `FLAG_MORE`, put back together here; a trace's first answer is sent
/// with `FLAG_MORE` too, and is returned at once (it starts a stream). Answers to other
/// requests (whose callers gave up on them) are skipped; an unsolicited error (request id
/// 0) ends the session. An answer with fds is refused (they are closed): see
/// [`receive_answer_fds`].
fn receive_answer(sock: BorrowedFd<'_>, buf: &mut Vec<u8>, id: u64) -> Result<Response, Error> {
    let (resp, fds) = receive_answer_fds(sock, buf, id)?;
    if !fds.is_empty() {
        // Dropping them closes them.
        return Err(Error::Protocol(format!(
            "{} unexpected fds with answer {resp:?}",
            fds.len()
        )));
    }
    Ok(resp)
}

/// [`receive_answer`], also returning the fds that came with the answer. Only a whole answer
/// (one message) may bring fds: a piece of a list with fds is refused. Fds of skipped answers
/// and of refused messages are closed.
fn receive_answer_fds(
    sock: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    id: u64,
) -> Result<(Response, Vec<OwnedFd>), Error> {
    let mut partial: Option<Response> = None;
    let mut pieces = 0usize;
    let mut skipped = 0usize;
    loop {
        let frame = match proto::recv(sock, buf) {
            Ok(f) => f,
            // A refusal may still wait behind the reset that the daemon's close caused.
            Err(e) => return Err(refusal(sock, buf).unwrap_or_else(|| sock_err(e))),
        };
        let resp = Response::decode(frame.header.msg_type, &frame.payload, frame.fds.len())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        match (frame.header.request_id, resp) {
            (_, Response::Error { code, message }) if frame.header.request_id == id => {
                return Err(Error::from_response(code, message))
            }
            (0, Response::Error { code, message }) => {
                return Err(Error::from_response(code, message))
            }
            (rid, r) if rid == id => {
                let whole = match partial.take() {
                    None => r,
                    Some(mut first) => {
                        pieces += 1;
                        if pieces > MAX_PIECES || !first.absorb(r) {
                            return Err(Error::Protocol(
                                "a list answer in pieces that do not fit together".into(),
                            ));
                        }
                        first
                    }
                };
                let more = frame.header.flags & proto::FLAG_MORE != 0;
                if !more || matches!(whole, Response::TraceStarted) {
                    if pieces > 0 && !frame.fds.is_empty() {
                        return Err(Error::Protocol("fds with a piece of a list answer".into()));
                    }
                    return Ok((whole, frame.fds));
                }
                if !frame.fds.is_empty() {
                    return Err(Error::Protocol("fds with a piece of a list answer".into()));
                }
                partial = Some(whole);
            }
            _ => {
                // An answer to an earlier request whose wait gave up; a daemon that sends
                // nothing else must not hold the caller for good.
                skipped += 1;
                if skipped > MAX_SKIPPED {
                    return Err(Error::Protocol(format!(
                        "more than {MAX_SKIPPED} answers to no request waiting"
                    )));
                }
            }
        }
    }
}

/// Most pieces one answer may come in (each at most one message, 64 KiB): a daemon's lists
/// are bounded by its own limits (clients, mirrors, counters), far below this.
const MAX_PIECES: usize = 4096;

/// Most answers to other requests skipped while waiting for one.
const MAX_SKIPPED: usize = 1024;

/// The error the daemon left on a connection it closed, if any (read without waiting).
fn refusal(sock: BorrowedFd<'_>, buf: &mut Vec<u8>) -> Option<Error> {
    let mut fds = [nix::poll::PollFd::new(sock, nix::poll::PollFlags::POLLIN)];
    if !matches!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
        Ok(1)
    ) {
        return None;
    }
    let frame = proto::recv(sock, buf).ok()?;
    match Response::decode(frame.header.msg_type, &frame.payload, frame.fds.len()).ok()? {
        Response::Error { code, message } => Some(Error::from_response(code, message)),
        _ => None,
    }
}

fn unexpected(r: Response) -> Error {
    Error::Protocol(format!("unexpected answer {r:?}"))
}

/// How to open a session with memshadowd: where, under which name, and whether as a client
/// that mirrors its memory ([`Builder::connect`]) or as a control session
/// ([`Builder::connect_control`]).
///
/// ```no_run
/// # fn main() -> Result<(), memshadow::Error> {
/// let client = memshadow::Client::builder()
///     .socket("/run/memshadow/memshadowd.sock") // default: MEMSHADOW_SOCKET or the path rules
///     .name("my-emulator")                      // default: this process's comm
///     .connect()?;
/// let control = client.control();               // control requests on the same session
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
#[must_use]
pub struct Builder {
    path: Option<PathBuf>,
    sock: Option<OwnedFd>,
    name: Option<String>,
    device_writes: bool,
    timeout: Option<Duration>,
    own_daemon_only: bool,
}

impl Builder {
    /// Connects to the daemon listening at `path` (default: [`socket_path`]).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Builder {
        self.path = Some(path.into());
        self
    }

    /// Uses `sock`, a `SOCK_SEQPACKET` Unix socket already connected to the daemon (one a
    /// parent process handed over, say), instead of connecting. A trace needs a connection
    /// of its own: it opens one at the path given with [`Builder::socket`], and is refused
    /// (`Error::Unsupported`) without one.
    pub fn socket_fd(mut self, sock: OwnedFd) -> Builder {
        self.sock = Some(sock);
        self
    }

    /// The name the session gives the daemon, for its logs (default: this process's
    /// `comm`). A name longer than [`proto::MAX_NAME`] bytes is refused when connecting
    /// ([`Error::InvalidArgument`]) rather than cut.
    pub fn name(mut self, name: impl Into<String>) -> Builder {
        self.name = Some(name.into());
        self
    }

    /// Lets external engines this process grants write its memory (device writes,
    /// [`Engine::write`]), where its own mappings are writable: the `/proc/self/mem` it
    /// hands over is then opened for writing too. Off by default.
    pub fn device_writes(mut self, allow: bool) -> Builder {
        self.device_writes = allow;
        self
    }

    /// Gives up on the daemon when one message cannot be sent, or its answer has not come,
    /// within `limit` (the socket's send and receive timeouts): the call fails with a
    /// socket error, and the session is not to be used again (a late answer would be taken
    /// for the next). Default: no limit. An attach may legitimately take the daemon up to
    /// 2 s (it waits for changes of this process's mappings to be applied).
    pub fn timeout(mut self, limit: Duration) -> Builder {
        self.timeout = Some(limit);
        self
    }

    /// Hands this process over only to a daemon of root or of this process's user, by the
    /// credentials of whoever listens on the socket (checked before anything is sent;
    /// `Error::PermissionDenied` otherwise). Off by default: a daemon run by another user
    /// may serve this one on purpose. The preload library of `memshadow-run` turns it on,
    /// since the socket it is given comes from an environment it did not choose.
    pub fn own_daemon_only(mut self, yes: bool) -> Builder {
        self.own_daemon_only = yes;
        self
    }

    /// Opens the session and binds this process: creates its userfaultfd and hands it to
    /// the daemon with the fds it needs to read this process's memory, keeping no copy.
    pub fn connect(self) -> Result<Client, Error> {
        Ok(Client {
            inner: Arc::new(self.open(true)?),
        })
    }

    /// Opens a control session: nothing of this process is mirrored (status, lists, peeks,
    /// injected invalidations and traces; `memshadowctl`).
    pub fn connect_control(self) -> Result<Control, Error> {
        Ok(Control {
            inner: Arc::new(self.open(false)?),
        })
    }

    fn open(self, bind: bool) -> Result<Inner, Error> {
        let name = self.name.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/self/comm")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        });
        if name.len() > proto::MAX_NAME {
            return Err(Error::InvalidArgument(format!(
                "a session name is at most {} bytes; this one is {}",
                proto::MAX_NAME,
                name.len()
            )));
        }
        let (sock, path) = match (self.sock, self.path) {
            (Some(sock), path) => (sock, path),
            (None, Some(path)) => (connect_socket(&path)?, Some(path)),
            (None, None) => {
                let path = socket_path()?;
                (connect_socket(&path)?, Some(path))
            }
        };
        let shown = || {
            path.clone()
                .unwrap_or_else(|| PathBuf::from("the given socket"))
        };
        if let Some(limit) = self.timeout {
            limit_waits(&sock, limit).map_err(|source| Error::Connect {
                path: shown(),
                source,
            })?;
        }
        if self.own_daemon_only {
            check_own_daemon(&sock, &shown())?;
        }
        let binding = bind.then_some(Binding {
            device_writes: self.device_writes,
        });
        open_session(sock, path, name, binding)
    }
}

/// Sets `sock`'s send and receive timeouts to `limit`.
fn limit_waits(sock: &OwnedFd, limit: Duration) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let limit = nix::sys::time::TimeVal::new(
        i64::try_from(limit.as_secs()).unwrap_or(i64::MAX),
        i64::from(limit.subsec_micros()),
    );
    setsockopt(sock, sockopt::ReceiveTimeout, &limit)?;
    setsockopt(sock, sockopt::SendTimeout, &limit)
}

/// Refuses a socket whose listener is neither root nor this process's user.
fn check_own_daemon(sock: &OwnedFd, path: &Path) -> Result<(), Error> {
    use nix::sys::socket::{getsockopt, sockopt};
    let peer = getsockopt(sock, sockopt::PeerCredentials).map_err(|source| Error::Connect {
        path: path.to_owned(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() == 0 || peer.uid() == me {
        return Ok(());
    }
    Err(Error::PermissionDenied(format!(
        "{} is served by uid {}, neither root nor this user ({me}): not handing it this \
         process's memory",
        path.display(),
        peer.uid()
    )))
}

/// A new connection to the daemon at `path`.
fn connect_socket(path: &Path) -> Result<OwnedFd, Error> {
    let cerr = |source| Error::Connect {
        path: path.to_owned(),
        source,
    };
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(cerr)?;
    let addr = UnixAddr::new(path).map_err(cerr)?;
    connect(sock.as_raw_fd(), &addr).map_err(|e| match e {
        nix::Error::EACCES | nix::Error::EPERM => Error::ConnectDenied {
            path: path.to_owned(),
            hint: discover::denied_hint(path),
            errno: e,
        },
        e => cerr(e),
    })?;
    Ok(sock)
}

/// How a session binds this process.
#[derive(Debug, Clone, Copy)]
struct Binding {
    /// Hand over `/proc/self/mem` for writing too.
    device_writes: bool,
}

/// The handshake on `sock` and, with `bind`, the bind of this process.
fn open_session(
    sock: OwnedFd,
    path: Option<PathBuf>,
    name: String,
    bind: Option<Binding>,
) -> Result<Inner, Error> {
    let mut inner = Inner {
        conn: Mutex::new(Conn {
            sock,
            next_id: 0,
            buf: Vec::new(),
        }),
        version: 0,
        daemon_version: String::new(),
        page_size: 0,
        limits: Limits::default(),
        bound: None,
        path,
        name,
        monitors: std::sync::OnceLock::new(),
    };
    let hello = Request::Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        name: inner.name.clone(),
    };
    match inner.call(&hello, &[])? {
        Response::HelloAck {
            version,
            daemon_version,
            page_size,
            limits,
        } => {
            inner.version = version;
            inner.daemon_version = daemon_version;
            inner.page_size = page_size;
            inner.limits = limits;
        }
        r => return Err(unexpected(r)),
    }
    if let Some(b) = bind {
        inner.bound = Some(bind_this_process(&inner, b.device_writes)?);
    }
    Ok(inner)
}

/// Hands the daemon this process's userfaultfd, with the files it needs to read this
/// process's memory (mem, maps) and to track writes (pagemap, clear_refs), keeping no copy
/// (G6); returns what the daemon bound.
fn bind_this_process(inner: &Inner, writes: bool) -> Result<(AccessPath, u64), Error> {
    let (uffd, privileged) = create_uffd_kind()?;
    let mem = if writes {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .map_err(|e| Error::Proc("/proc/self/mem", e))?
    } else {
        open_proc("/proc/self/mem")?
    };
    // Protocol 2: the maps, third (which addresses are mapped, and readable).
    let maps = if inner.version >= 2 {
        Some(open_proc("/proc/self/maps")?)
    } else {
        None
    };
    // For dirty tracking, if the daemon uses it: pagemap for reading, clear_refs
    // (soft-dirty) for writing; in this order, and clear_refs only after pagemap.
    let pagemap = open_proc("/proc/self/pagemap").ok();
    let clear_refs = pagemap
        .as_ref()
        .filter(|_| inner.version >= 2)
        .and_then(|_| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/self/clear_refs")
                .ok()
        });
    let mut fds = vec![uffd.as_fd(), mem.as_fd()];
    fds.extend(maps.as_ref().map(AsFd::as_fd));
    fds.extend(pagemap.as_ref().map(AsFd::as_fd));
    fds.extend(clear_refs.as_ref().map(AsFd::as_fd));
    let flags = if privileged {
        BindFlags::UFFD_PRIVILEGED
    } else {
        BindFlags::empty()
    };
    let sent = inner.call(&Request::Bind { flags }, &fds);
    // G6: keep no copy of the uffd (nor the rest) once the daemon has it.
    drop(fds);
    drop((uffd, mem, maps, pagemap, clear_refs));
    match sent? {
        Response::Bound {
            access,
            uffd_features,
        } => Ok((access, uffd_features)),
        r => Err(unexpected(r)),
    }
}

/// A session with memshadowd that mirrors this process's memory. Cheap to clone; usable
/// from many threads (requests are serialised on the one connection). Its control requests
/// (status, other clients) are on [`Client::control`].
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// How to open a session, when the defaults of [`Client::connect`] do not fit.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Connects to the daemon at the socket [`socket_path`] finds and binds this process.
    pub fn connect() -> Result<Client, Error> {
        Client::builder().connect()
    }

    /// Connects to the daemon at `path` and binds this process.
    pub fn connect_to(path: &Path) -> Result<Client, Error> {
        Client::builder().socket(path).connect()
    }

    /// Opens a control session (nothing is mirrored) at `path`, or at the socket
    /// [`socket_path`] finds:
    /// the same as [`Control::connect_to`] and [`Control::connect`].
    pub fn connect_control(path: Option<&Path>) -> Result<Control, Error> {
        match path {
            Some(p) => Control::connect_to(p),
            None => Control::connect(),
        }
    }

    /// Control requests (status, lists, traces, ...) on this session's connection.
    pub fn control(&self) -> Control {
        Control {
            inner: Arc::clone(&self.inner),
        }
    }

    /// The number of the session's socket. A process that forks without `exec` holds the
    /// parent's session in its child too; the child must close its copy (and say nothing on
    /// it: the session is the parent's). The preload library does that in its `fork` handler.
    pub fn session_fd(&self) -> std::os::fd::RawFd {
        self.inner.lock_conn().sock.as_raw_fd()
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

    /// The daemon's limits and this client's quotas.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// How the daemon reads this process's memory.
    pub fn access_path(&self) -> Option<AccessPath> {
        self.inner.bound.map(|b| b.0)
    }

    /// The userfaultfd features the daemon obtained.
    pub fn uffd_features(&self) -> u64 {
        self.inner.bound.map_or(0, |b| b.1)
    }

    /// Mirrors `len` bytes at `ptr` (page aligned) of this process, with the daemon's
    /// default collection policy (`--dirty-policy`, `manual` unless configured). Safe: the
    /// daemon only reads the range, and follows it when it is unmapped, moved or discarded.
    pub fn attach(&self, ptr: *const u8, len: usize) -> Result<Mirror, Error> {
        self.attach_flags(ptr, len, AttachPolicy::Default)
    }

    /// [`Client::attach`] with the collection policy `policy` for the pages this process
    /// writes in the range. A policy other than `Manual` is refused (`ErrorCode::Unsupported`)
    /// if the daemon has no dirty tracking for this process.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let client = memshadow::Client::connect()?;
    /// # let mut buf = memmap2::MmapMut::map_anon(1 << 20)?;
    /// # let mut out = [0u8; 64];
    /// let mirror = client.attach_with(buf.as_ptr(), buf.len(), memshadow::Policy::Manual)?;
    /// buf[4096] = 7;                      // a write after the page was mirrored
    /// let r = mirror.sync()?;             // r.pages_dirty == 1, r.backend == PagemapScan
    /// mirror.read(4096, &mut out[..1])?;  // 7
    /// # Ok(())
    /// # }
    /// ```
    pub fn attach_with(&self, ptr: *const u8, len: usize, policy: Policy) -> Result<Mirror, Error> {
        self.attach_flags(ptr, len, policy.wire())
    }

    fn attach_flags(
        &self,
        ptr: *const u8,
        len: usize,
        policy: AttachPolicy,
    ) -> Result<Mirror, Error> {
        let page = self.page_size().max(1);
        let addr = ptr as u64;
        if len == 0 || addr % page as u64 != 0 || len % page != 0 {
            return Err(Error::BadRange(format!(
                "{addr:#x}+{len:#x} is empty or not page aligned"
            )));
        }
        match self.inner.call(
            &Request::Attach {
                addr,
                len: len as u64,
                policy,
            },
            &[],
        )? {
            Response::Attached { mirror_id } => Ok(Mirror {
                inner: Arc::clone(&self.inner),
                id: mirror_id,
                addr,
                len: len as u64,
                detached: AtomicBool::new(false),
            }),
            r => Err(unexpected(r)),
        }
    }

    /// Watches `ptr..ptr+len` (rounded out to pages) of this process's memory: the
    /// [`Monitor`] says, with no system call, whether it was unmapped, moved or discarded
    /// since (protocol 4). Made with no shadow: cheap enough for many thousands.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let buf = vec![0u8; 1 << 20];
    /// let client = memshadow::Client::connect()?;
    /// let m = client.monitor(buf.as_ptr(), buf.len())?;   // one round trip
    /// // ... register buf with the NIC ...
    /// if !m.is_valid() { /* drop the registration, register again */ }
    /// # Ok(())
    /// # }
    /// ```
    pub fn monitor(&self, ptr: *const u8, len: usize) -> Result<Monitor, Error> {
        let shared = self.monitor_shared()?;
        Monitor::new(&self.inner, &shared, ptr, len)
    }

    /// The event queue of this session's monitors: what went away, for a cache to drop.
    pub fn monitor_events(&self) -> Result<MonitorEvents, Error> {
        Ok(MonitorEvents::new(&self.monitor_shared()?))
    }

    fn monitor_shared(&self) -> Result<Arc<monitor::Shared>, Error> {
        if let Some(s) = self.inner.monitors.get() {
            return Ok(Arc::clone(s));
        }
        let s = Arc::new(monitor::Shared::open(&self.inner)?);
        // Two threads may set up at once: both get the same objects; one mapping is kept.
        Ok(Arc::clone(self.inner.monitors.get_or_init(|| s)))
    }

    /// Mirrors a whole memory map.
    pub fn attach_mmap(&self, map: &memmap2::MmapMut) -> Result<Mirror, Error> {
        self.attach(map.as_ptr(), map.len())
    }

    /// This session's counters.
    pub fn stats(&self) -> Result<Vec<(String, u64)>, Error> {
        match self.inner.call(&Request::ClientStats, &[])? {
            Response::Counters { entries } => Ok(entries),
            r => Err(unexpected(r)),
        }
    }

    /// This session's mirrors.
    pub fn list_mirrors(&self) -> Result<Vec<MirrorInfo>, Error> {
        self.control().list_mirrors(Target::Me)
    }

    /// Collects the pages this process wrote in every mirror of this session and
    /// invalidates them in the shadow: device reads issued after this returns see every
    /// write made before it was called. `ErrorCode::Unsupported` if the daemon has no dirty
    /// tracking for this process (why, in the message).
    pub fn sync(&self) -> Result<SyncReport, Error> {
        sync_call(&self.inner, Request::Sync { mirror_id: 0 })
    }
}

fn sync_call(inner: &Inner, req: Request) -> Result<SyncReport, Error> {
    match inner.call(&req, &[])? {
        Response::Synced { report } => Ok(report),
        r => Err(unexpected(r)),
    }
}

fn open_proc(path: &'static str) -> Result<File, Error> {
    File::open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => Error::NotDumpable(e),
        _ => Error::Proc(path, e),
    })
}

/// An attached range. Dropping it detaches it (best effort).
#[derive(Debug)]
pub struct Mirror {
    inner: Arc<Inner>,
    id: u64,
    addr: u64,
    len: u64,
    detached: AtomicBool,
}

impl Mirror {
    /// The mirror's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The address it was attached at (the daemon follows `mremap`; offsets stay valid).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if empty (never: attach refuses empty ranges).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), Error> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::BadRange(format!(
                "{offset:#x}+{len:#x} is outside the mirror of {:#x} bytes",
                self.len
            ))),
        }
    }

    /// A device read of `buf.len()` bytes at `offset`, served by the daemon's engines from
    /// the shadow (faulting pages in as needed).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check(offset, buf.len() as u64)?;
        let chunk = MAX_READ.min(self.inner.limits.max_read.max(1) as usize);
        if buf.len() > chunk {
            // One device fault per missing run of the whole read, as a device would take,
            // rather than one per message-sized piece. A failure here shows again, precisely,
            // in the read of the piece it concerns.
            let _ = self.populate(offset, buf.len() as u64);
        }
        let mut done = 0;
        while done < buf.len() {
            let n = chunk.min(buf.len() - done);
            let req = Request::Read {
                mirror_id: self.id,
                offset: offset + done as u64,
                len: n as u32,
            };
            match self.inner.call(&req, &[])? {
                Response::Data { bytes } if bytes.len() == n => {
                    buf[done..done + n].copy_from_slice(&bytes)
                }
                Response::Data { bytes } => {
                    return Err(Error::Protocol(format!(
                        "asked {n} bytes, got {}",
                        bytes.len()
                    )))
                }
                r => return Err(unexpected(r)),
            }
            done += n;
        }
        Ok(())
    }

    /// Faults `offset..offset+len` into the shadow without reading it; returns the pages
    /// the mirror then has in the shadow.
    pub fn populate(&self, offset: u64, len: u64) -> Result<u64, Error> {
        self.check(offset, len)?;
        match self.inner.call(
            &Request::Populate {
                mirror_id: self.id,
                offset,
                len,
            },
            &[],
        )? {
            Response::Populated { pages } => Ok(pages),
            r => Err(unexpected(r)),
        }
    }

    /// Collects the pages this process wrote in this mirror and invalidates them in the
    /// shadow, so device reads issued after this returns see every write made before it was
    /// called (see [`Client::sync`]).
    pub fn sync(&self) -> Result<SyncReport, Error> {
        sync_call(&self.inner, Request::Sync { mirror_id: self.id })
    }

    /// A grant for an external engine to attach to this mirror (protocol 3): an unguessable
    /// token (never 0) to hand to the engine by any means, which it passes to
    /// [`Engine::attach`]. Detaching the mirror, or this process's exit, revokes it.
    /// `Error::Unsupported` if the daemon does not speak protocol 3.
    pub fn grant(&self) -> Result<u128, Error> {
        engine::need_engines(&self.inner)?;
        match self
            .inner
            .call(&Request::Grant { mirror_id: self.id }, &[])?
        {
            Response::Granted { token } if token != 0 => Ok(token),
            Response::Granted { .. } => Err(Error::Protocol("a grant of token 0".into())),
            r => Err(unexpected(r)),
        }
    }

    /// Stops mirroring. Dropping the mirror detaches it too, ignoring errors.
    pub fn detach(self) -> Result<(), Error> {
        self.detach_shared()
    }

    /// Stops mirroring a mirror that is shared (in an `Arc`, or behind a C handle): later
    /// reads fail with `Error::NoSuchMirror`, and detaching again is a no-op.
    pub fn detach_shared(&self) -> Result<(), Error> {
        if self.detached.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        match self
            .inner
            .call(&Request::Detach { mirror_id: self.id }, &[])?
        {
            Response::Detached => Ok(()),
            r => Err(unexpected(r)),
        }
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.detach_shared();
    }
}

// Each handle may be shared between threads (Client, Mirror, Control) or handed to one
// (Trace); a change that loses this fails to compile here.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Client>();
    send_sync::<Mirror>();
    send_sync::<Control>();
    send_sync::<Trace>();
    send_sync::<Builder>();
    send_sync::<Error>();
    // An engine is handed to one thread at a time (its TLB is its own).
    const fn send<T: Send>() {}
    send::<Engine>();
};

#[cfg(test)]
mod fake_daemon;
#[cfg(test)]
mod tests;
