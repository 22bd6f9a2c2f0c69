//! The memshadowd server (docs/design.md §1, §5 G5–G7): accepts clients on a `SOCK_SEQPACKET`
//! socket, checks who they are, answers their requests, binds their userfaultfds to the
//! event source and releases them when they go away.
//!
//! Threads are bounded whatever the number of clients: this session loop (listener, client
//! sockets, pidfds, signals, over one epoll), a fixed worker pool for requests that may block,
//! the event reader and finisher, and the device's engines and reclaimer.

pub mod abuse;
pub mod convert;
pub mod engines;
pub mod handler;
pub mod listen;
pub mod monitors;
pub mod outbox;
pub mod session;
pub mod stream;
pub mod wire_error;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use memshadow_proto::{self as proto, DecodeError, Frame, Request, Response, SocketError};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::SockFlag;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use crate::config::{Config, Limits};
use crate::device::{Account, Device, DeviceError};
use crate::dirty::periodic::Periodic;
use crate::dirty::{DirtyCounters, DirtyError, Selection};
use crate::events::{EventError, EventReader, Hangup, Heartbeat};
use crate::lock;
use crate::sys::{self, PAGE_SIZE};
use crate::workers::{Job, Submitter, Workers};
use abuse::Abuse;
pub use listen::{ListenError, Listener};
use outbox::{Flushed, OutFrame, Outbox, Pushed};
use session::{Peer, PeerError, Session};
use wire_error::WireError;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be set up.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The device could not be created.
    #[error("cannot create the device")]
    Device(#[source] DeviceError),
    /// The event source could not be started.
    #[error(transparent)]
    Events(#[from] EventError),
    /// A thread could not be started.
    #[error("cannot start the worker threads")]
    Spawn(#[source] std::io::Error),
    /// epoll, signalfd or eventfd failed.
    #[error("session loop: {0}")]
    Loop(&'static str, #[source] nix::Error),
    /// The dirty-tracking back end asked for does not work here.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// Clients cannot be told apart from a recycled pid on this kernel.
    #[error("cannot identify clients")]
    Peers(#[source] PeerError),
    /// The worker pool stopped while starting.
    #[error("the worker pool stopped")]
    Stopped,
}

/// Why a connection is refused before it becomes a session (answered with request id 0,
/// which the peer can read before the close).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The peer's user sent too many malformed messages lately ([`abuse`]).
    #[error(
        "this user sent too many malformed messages: its connections are refused for a few \
         seconds"
    )]
    Barred,
    /// The peer could not be identified.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The daemon serves as many clients as it may (for this peer: the last
    /// `reserved_clients` are kept for root and the daemon's user).
    #[error("the daemon serves its maximum of {0} clients")]
    Full(usize),
    /// The peer's (unprivileged) user has as many clients as it may.
    #[error("uid {uid} has its maximum of {max} clients")]
    UserFull {
        /// The user.
        uid: u32,
        /// Its maximum.
        max: u32,
    },
    /// The daemon is out of file descriptors.
    #[error("memshadowd is out of file descriptors; try again later")]
    NoFds,
}

/// A request beyond the session's quota of requests in flight.
#[derive(Debug, thiserror::Error)]
#[error("more than {0} requests in flight")]
pub struct TooManyInFlight(pub u32);

/// A message that could not be received whole, or not decoded.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Receiving failed (header, sizes, fds).
    #[error(transparent)]
    Receive(SocketError),
    /// The payload is not a request.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Dirty tracking as the daemon runs it (docs/design.md §6): what the start-up probe found, the
/// daemon-wide counters, and the one timer of the `periodic` policy.
#[derive(Debug)]
pub struct DirtyState {
    /// The probe's results and the back end chosen.
    pub selection: Selection,
    /// Counters of every client, released ones included.
    pub counters: Arc<DirtyCounters>,
    /// The timer.
    pub periodic: Periodic,
}

/// The signals that stop the daemon cleanly; block them in every thread (before any is
/// started) so the session loop receives them through a signalfd.
pub fn shutdown_signals() -> SigSet {
    let mut s = SigSet::empty();
    s.add(Signal::SIGTERM);
    s.add(Signal::SIGINT);
    s
}

/// Every signal the session loop handles: the [`shutdown_signals`] and `SIGHUP` (reload).
/// Block these in every thread (before any is started).
pub fn handled_signals() -> SigSet {
    let mut s = shutdown_signals();
    s.add(Signal::SIGHUP);
    s
}

/// What the session loop reports to, and asks of, whatever supervises the daemon (a service
/// manager: readiness, status, watchdog, reload). [`Unsupervised`] does nothing.
pub trait Supervisor {
    /// The longest the session loop may sleep between two [`Supervisor::tick`]s (`None`:
    /// only when something happens).
    fn tick_every(&self) -> Option<Duration>;
    /// The socket accepts connections, the engines, workers and event reader run.
    fn ready(&mut self, core: &Core);
    /// Called after every wake-up of the session loop, and at least every `tick_every`.
    fn tick(&mut self, core: &Core);
    /// `SIGHUP`: reload what can change at run time.
    fn reload(&mut self, core: &Core);
    /// Shutdown begins (clients are about to be released).
    fn stopping(&mut self, core: &Core);
}

/// No supervisor (tests, embedding): `SIGHUP` is logged and ignored.
#[derive(Debug, Default)]
pub struct Unsupervised;

impl Supervisor for Unsupervised {
    fn tick_every(&self) -> Option<Duration> {
        None
    }
    fn ready(&mut self, _: &Core) {}
    fn tick(&mut self, _: &Core) {}
    fn reload(&mut self, _: &Core) {
        tracing::info!("SIGHUP: nothing to reload");
    }
    fn stopping(&mut self, _: &Core) {}
}

/// A one-glance summary of the daemon's load (the service `STATUS=` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Sessions connected.
    pub clients: usize,
    /// Of those, bound (mirroring).
    pub bound: usize,
    /// Shadow bytes in use.
    pub shadow_bytes: u64,
}

/// Server-wide counters (per-client ones live with the client).
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Sessions accepted.
    pub sessions: AtomicU64,
    /// Connections refused (limits, unidentifiable peers, no file descriptors).
    pub refused: AtomicU64,
    /// Sessions closed for bad input.
    pub bad_messages: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Of those, errors.
    pub errors: AtomicU64,
    /// Clients released.
    pub released: AtomicU64,
    /// uffd events of clients already released.
    pub events_of_released: AtomicU64,
    /// Sessions closed because their client did not read its answers (its queue was full).
    pub not_reading: AtomicU64,
    /// Sessions closed for saying no `Hello` in time, or for idling.
    pub timed_out: AtomicU64,
    /// Sessions ended because their client's address space went away (exec or exit)
    /// while the session lived on.
    pub gone: AtomicU64,
    /// Messages whose fds the daemon could not take (out of file descriptors).
    pub fds_exhausted: AtomicU64,
}

/// Per user: connections, and the shadow share every client of the user draws from.
#[derive(Debug, Default)]
struct UserEntry {
    sessions: u32,
    account: Option<Arc<Account>>,
}

/// What the session loop, the workers and the event source share.
#[derive(Debug)]
pub struct Core {
    cfg: Config,
    /// The run-time limits (quotas, client counts): `cfg`'s at start, changed by a reload.
    limits: RwLock<Limits>,
    device: Device,
    events: EventReader,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    users: Mutex<HashMap<u32, UserEntry>>,
    jobs: Mutex<Option<Submitter>>,
    /// The session loop's epoll: workers arm `EPOLLOUT` on it for queued answers.
    epoll: Epoll,
    /// Session ids to close, and the eventfd that wakes the session loop for them.
    to_close: Arc<Mutex<Vec<u64>>>,
    wake: Arc<EventFd>,
    next_id: AtomicU64,
    owner: u32,
    socket: PathBuf,
    streams: Arc<stream::Streams>,
    dirty: DirtyState,
    started: Instant,
    stopping: AtomicBool,
    stop_requested: AtomicBool,
    counters: ServerCounters,
    /// Live grants for external engines.
    grants: engines::Grants,
    /// External engine ids.
    engine_ids: crate::device::external::EngineIds,
}

impl Core {
    /// The configuration the daemon started with (a reload changes [`Core::limits`], the
    /// device's flush latency and the log level, not this).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The quotas and client limits in force.
    pub fn limits(&self) -> Limits {
        *self.limits.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts new limits in force (reload): new sessions and requests see them at once, and
    /// every bound client's shadow quota and every user's share change for their next
    /// faults.
    pub fn set_limits(&self, l: Limits) {
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = l;
        self.device
            .set_reserved_bytes(l.quotas.reserved_shadow_bytes);
        for s in self.sessions() {
            if let Some(w) = s.watched() {
                w.device().set_quota_bytes(l.quotas.shadow_bytes);
            }
        }
        for u in lock(&self.users).values() {
            if let Some(a) = &u.account {
                a.set_quota_bytes(l.quotas.shadow_bytes_per_uid);
            }
        }
    }

    /// Clients connected and bound, and shadow bytes in use.
    pub fn summary(&self) -> Summary {
        let sessions = self.sessions();
        Summary {
            clients: sessions.len(),
            bound: sessions
                .iter()
                .filter(|s| s.binding.get().is_some())
                .count(),
            shadow_bytes: self.device.shadow().in_use() * PAGE_SIZE as u64,
        }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Dirty tracking.
    pub fn dirty(&self) -> &DirtyState {
        &self.dirty
    }

    /// Server counters.
    pub fn counters(&self) -> &ServerCounters {
        &self.counters
    }

    /// Clients connected.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// True for root and the daemon's own user: they may look at and act on every client,
    /// and they may use the reserved connections and shadow (G7).
    pub fn privileged(&self, uid: u32) -> bool {
        uid == 0 || uid == self.owner
    }

    /// The shadow share of user `uid`, shared by all its clients.
    fn account(&self, uid: u32) -> Arc<Account> {
        let mut users = lock(&self.users);
        let u = users.entry(uid).or_default();
        let share = self.limits().quotas.shadow_bytes_per_uid;
        let privileged = self.privileged(uid);
        Arc::clone(u.account.get_or_insert_with(|| {
            Arc::new(if privileged {
                Account::privileged()
            } else {
                Account::limited(share)
            })
        }))
    }

    /// Queues `job` for the workers, in the turn of `s`'s user; false once shutting down.
    fn submit(&self, s: &Session, job: Job) -> bool {
        match &*lock(&self.jobs) {
            Some(tx) => {
                tx.submit(s.peer.uid, job);
                true
            }
            None => false,
        }
    }

    /// Asks the session loop to shut down as on SIGTERM (from any thread).
    pub fn request_stop(&self) {
        self.stop_requested.store(true, Relaxed);
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "cannot wake the session loop");
        }
    }

    /// Asks the session loop to close session `id` (from any thread).
    pub fn request_close(&self, id: u64) {
        lock(&self.to_close).push(id);
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "cannot wake the session loop");
        }
    }

    /// Ends session `s` from any thread, for `why`: nothing more is sent or served, and the
    /// session loop closes it. Counted once, whoever notices first.
    fn end(&self, s: &Session, why: End) {
        if s.closing.swap(true, Relaxed) {
            return;
        }
        if let Some(c) = why.counter(&self.counters) {
            c.fetch_add(1, Relaxed);
        }
        match why {
            End::SocketGone => tracing::debug!(client = s.id, "ending the session: {}", why.text()),
            _ => tracing::warn!(
                client = s.id,
                pid = s.peer.pid,
                uid = s.peer.uid,
                "ending the session: {}",
                why.text()
            ),
        }
        self.request_close(s.id);
    }

    /// Notes that `s`'s client address space is gone (counted once); the session ends once
    /// the answer in hand is sent.
    fn note_gone(&self, s: &Session) {
        if !s.gone.swap(true, Relaxed) {
            self.counters.gone.fetch_add(1, Relaxed);
        }
    }

    /// Refuses connection `sock` for `why`, with one answer (request id 0) that it can read
    /// before the close.
    fn refuse(&self, sock: &OwnedFd, why: Refusal) {
        self.counters.refused.fetch_add(1, Relaxed);
        let r = Response::from(WireError::from(why));
        let _ = proto::send(sock.as_fd(), r.msg_type(), 0, 0, &r.encode_payload(), &[]);
    }

    /// Sends `resp` to request `request_id` of `s` now, or queues it for the session loop to
    /// send when the socket has room. Never waits: a client whose queue is full does not
    /// read its answers, and loses its session.
    fn reply(&self, s: &Session, request_id: u64, resp: Response) {
        self.counters.requests.fetch_add(1, Relaxed);
        if matches!(resp, Response::Error { .. }) {
            self.counters.errors.fetch_add(1, Relaxed);
        }
        // A stream's first answer says more follow; so does every piece of a long list but
        // its last.
        let stream = matches!(resp, Response::TraceStarted);
        // Fds a request left for its answer (an engine's, a monitor area's) go with it.
        let fds = s.take_answer_fds(request_id);
        let pieces = resp.into_pieces();
        let last = pieces.len() - 1;
        let frames = pieces.into_iter().enumerate().map(|(i, piece)| OutFrame {
            msg_type: piece.msg_type(),
            flags: if stream || i < last {
                proto::FLAG_MORE
            } else {
                0
            },
            request_id,
            payload: piece.encode_payload(),
            fds: if i == last { fds.clone() } else { Vec::new() },
        });
        self.send(s, frames);
        if s.gone.load(Relaxed) {
            self.end(s, End::Gone);
        }
    }

    /// Sends or queues the frames of one answer for `s` ([`Core::reply`]), all under one
    /// hold of its queue's lock: the pieces of a long answer go out together, with no other
    /// answer (a worker's, a trace record) between them.
    fn send(&self, s: &Session, frames: impl Iterator<Item = OutFrame>) {
        if s.closing.load(Relaxed) {
            return;
        }
        // The watch for room changes under the queue's lock, so that it always matches
        // the queue: a flush that empties the queue and a send that fills it again cannot
        // leave the last word to the flush (and a queued answer unwatched).
        let mut out = lock(&s.out);
        for f in frames {
            match out.push(s.sock(), f) {
                Pushed::Sent | Pushed::Queued { arm: false } => {}
                Pushed::Queued { arm: true } => self.watch_for_room(s, true),
                Pushed::Full => {
                    drop(out);
                    return self.end(s, End::NotReading);
                }
                Pushed::Closed => {
                    drop(out);
                    return self.end(s, End::SocketGone);
                }
            }
        }
    }

    /// Sends what waits for `s` (the socket has room); stops watching for room once all is
    /// sent.
    fn flush(&self, s: &Session) {
        let mut out = lock(&s.out);
        match out.flush(s.sock()) {
            Flushed::Pending => {}
            Flushed::Empty => self.watch_for_room(s, false),
            Flushed::Closed => {
                drop(out);
                self.request_close(s.id);
            }
        }
    }

    /// Watches `s`'s socket for room (`EPOLLOUT`) or not. Call with its queue locked.
    fn watch_for_room(&self, s: &Session, on: bool) {
        let flags = if on {
            SOCK_EVENTS | EpollFlags::EPOLLOUT
        } else {
            SOCK_EVENTS
        };
        let ev = EpollEvent::new(flags, sock_token(s.id));
        if let Err(e) = self.epoll.modify(s.sock(), &mut { ev }) {
            tracing::debug!(client = s.id, error = %e, "cannot change the watch of the socket");
        }
    }
}

/// Why the daemon ends a session on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Its answers fill its queue: it does not read them.
    NotReading,
    /// No `Hello` within the handshake timeout.
    NoHello,
    /// Mirrors and streams nothing, and silent for the idle timeout.
    Idle,
    /// Its client's address space is gone (counted when noticed, [`Core::note_gone`]).
    Gone,
    /// Its socket failed (the peer went away).
    SocketGone,
}

impl End {
    fn counter(self, c: &ServerCounters) -> Option<&AtomicU64> {
        match self {
            End::NotReading => Some(&c.not_reading),
            End::NoHello | End::Idle => Some(&c.timed_out),
            End::Gone | End::SocketGone => None,
        }
    }

    fn text(self) -> &'static str {
        match self {
            End::NotReading => "the client does not read its answers",
            End::NoHello => "no hello within the handshake timeout",
            End::Idle => "idle: it mirrors and streams nothing",
            End::Gone => "the client's address space is gone (exec or exit)",
            End::SocketGone => "the client's socket is gone",
        }
    }
}

/// Tokens of the session loop's epoll.
const LISTEN: u64 = u64::MAX;
const SIGNAL: u64 = u64::MAX - 1;
const WAKE: u64 = u64::MAX - 2;
const HOUSEKEEP: u64 = u64::MAX - 3;

/// What the session loop watches a client socket for (plus `EPOLLOUT` while answers wait).
const SOCK_EVENTS: EpollFlags = EpollFlags::EPOLLIN.union(EpollFlags::EPOLLRDHUP);

/// How often the session loop looks for sessions to end (no hello, idle, client gone).
const HOUSEKEEP_EVERY: Duration = Duration::from_secs(1);

/// Answers one session may have waiting for it: one per request in flight, the answers of
/// inline requests read in one turn of the session loop, and a few errors.
fn outbox_for(l: &Limits) -> Outbox {
    let frames = l.quotas.inflight as usize + 2 * READS_PER_TURN + 8;
    Outbox::new(frames, frames * (proto::HEADER_LEN + proto::MAX_PAYLOAD))
}

/// Requests read from one session per wake-up (so one client cannot starve the others).
const READS_PER_TURN: usize = 16;

/// The flags of an accepted connection's fd.
const ACCEPT_FLAGS: SockFlag = SockFlag::SOCK_CLOEXEC.union(SockFlag::SOCK_NONBLOCK);

/// Connections accepted per wake-up of the session loop.
const ACCEPTS_PER_TURN: usize = 16;

fn sock_token(id: u64) -> u64 {
    id << 1
}
fn pidfd_token(id: u64) -> u64 {
    (id << 1) | 1
}

/// The daemon.
#[derive(Debug)]
pub struct Server {
    core: Arc<Core>,
    listener: Option<Listener>,
    workers: Workers,
    housekeep: TimerFd,
    /// Kept free so a connection can still be accepted (and told why it is refused) when
    /// the daemon is out of file descriptors.
    spare_fd: Option<OwnedFd>,
    /// Users flooding the daemon with malformed messages.
    abuse: Abuse,
}

impl Server {
    /// Binds the socket at `path`, creates the device and starts the threads.
    /// Block [`shutdown_signals`] before calling it.
    pub fn new(cfg: Config, path: &Path) -> Result<Server, ServerError> {
        // Before the socket exists: a forced back end that does not work stops the start.
        let selection = Selection::probe(cfg.dirty.tracking)?;
        Server::start_probed(cfg, selection, Listener::bind(path)?, None)
    }

    /// Serves on `listener` (bound here or handed over by a service manager); `heartbeat`
    /// is called from the uffd-reader loop (the watchdog). Block [`handled_signals`] first.
    /// Probes the dirty-tracking back ends first (a forced one that does not work is an
    /// error).
    pub fn start(
        cfg: Config,
        listener: Listener,
        heartbeat: Option<Heartbeat>,
    ) -> Result<Server, ServerError> {
        let selection = Selection::probe(cfg.dirty.tracking)?;
        Server::start_probed(cfg, selection, listener, heartbeat)
    }

    fn start_probed(
        cfg: Config,
        selection: Selection,
        listener: Listener,
        heartbeat: Option<Heartbeat>,
    ) -> Result<Server, ServerError> {
        session::probe_peer_pidfd().map_err(ServerError::Peers)?;
        let device = Device::new(&cfg.device).map_err(ServerError::Device)?;
        device.set_reserved_bytes(cfg.limits.quotas.reserved_shadow_bytes);
        let workers = Workers::start("worker", cfg.workers).map_err(ServerError::Spawn)?;
        let submitter = || workers.submitter().ok_or(ServerError::Stopped);
        let fds = LoopFds::new(&listener)?;
        let to_close: Arc<Mutex<Vec<u64>>> = Arc::default();
        let hangup = close_on_hangup(&to_close, &fds.wake);
        let events = EventReader::start_with(submitter()?, hangup, heartbeat)?;
        let dirty = DirtyState {
            selection,
            counters: Arc::default(),
            periodic: Periodic::start(submitter()?).map_err(ServerError::Spawn)?,
        };
        let streams =
            stream::Streams::start(Arc::clone(device.trace())).map_err(ServerError::Spawn)?;
        log_listening(&listener, &device, &dirty.selection);
        let core = Core {
            jobs: Mutex::new(Some(submitter()?)),
            limits: RwLock::new(cfg.limits()),
            cfg,
            device,
            events,
            sessions: Mutex::default(),
            users: Mutex::default(),
            epoll: fds.epoll,
            to_close,
            wake: fds.wake,
            next_id: AtomicU64::new(1),
            owner: nix::unistd::geteuid().as_raw(),
            socket: listener.path().to_owned(),
            streams,
            dirty,
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            counters: ServerCounters::default(),
            grants: engines::Grants::default(),
            engine_ids: Default::default(),
        };
        Ok(Server {
            core: Arc::new(core),
            listener: Some(listener),
            workers,
            housekeep: fds.housekeep,
            spare_fd: spare_fd(),
            abuse: Abuse::default(),
        })
    }

    /// The shared core (tests).
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The socket path.
    pub fn path(&self) -> Option<PathBuf> {
        self.listener.as_ref().map(|l| l.path().to_owned())
    }

    /// Serves until SIGTERM or SIGINT, then stops accepting, releases every client (finish
    /// passes included), unlinks the socket and returns.
    pub fn run(self) -> Result<(), ServerError> {
        self.run_with(&mut Unsupervised)
    }

    /// [`Server::run`], reporting to `sup` (readiness, ticks, `SIGHUP` reloads, stopping).
    pub fn run_with(mut self, sup: &mut dyn Supervisor) -> Result<(), ServerError> {
        let sfd = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        )
        .map_err(|e| ServerError::Loop("signalfd", e))?;
        self.core
            .epoll
            .add(sfd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL))
            .map_err(|e| ServerError::Loop("epoll_ctl", e))?;
        let mut events = vec![EpollEvent::empty(); 256];
        let mut buf = Vec::new();
        let timeout = sup
            .tick_every()
            .and_then(|d| EpollTimeout::try_from(d).ok())
            .unwrap_or(EpollTimeout::NONE);
        sup.ready(&self.core);
        loop {
            let n = match self.core.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => 0,
                Err(e) => return Err(ServerError::Loop("epoll_wait", e)),
            };
            sup.tick(&self.core);
            if events[..n]
                .iter()
                .any(|ev| self.serve_event(ev, &sfd, &mut buf, sup))
            {
                break;
            }
        }
        self.shutdown();
        Ok(())
    }

    /// Handles one readiness event of the session loop; true when the daemon must stop.
    fn serve_event(
        &mut self,
        ev: &EpollEvent,
        sfd: &SignalFd,
        buf: &mut Vec<u8>,
        sup: &mut dyn Supervisor,
    ) -> bool {
        match ev.data() {
            SIGNAL => {
                while let Ok(Some(si)) = sfd.read_signal() {
                    if si.ssi_signo == Signal::SIGHUP as u32 {
                        sup.reload(&self.core);
                        continue;
                    }
                    tracing::info!(signal = si.ssi_signo, "shutting down");
                    sup.stopping(&self.core);
                    return true;
                }
            }
            LISTEN => self.accept_some(),
            HOUSEKEEP => {
                let _ = self.housekeep.wait();
                self.housekeep();
            }
            WAKE => {
                let _ = self.core.wake.read();
                let ids = std::mem::take(&mut *lock(&self.core.to_close));
                for id in ids {
                    self.close(id, "closed by the daemon");
                }
                if self.core.stop_requested.load(Relaxed) {
                    tracing::info!("stop requested");
                    sup.stopping(&self.core);
                    return true;
                }
            }
            t if t & 1 == 1 => self.close(t >> 1, "client process exited"),
            t => self.serve_socket(t >> 1, ev.events(), buf),
        }
        false
    }

    /// Accepts waiting connections, at most [`ACCEPTS_PER_TURN`] per wake-up: the rest
    /// wait for the next turn of the loop, after the sessions' requests (a flood of
    /// connections must not starve the clients already served).
    fn accept_some(&mut self) {
        let Some(l) = &self.listener else { return };
        let listen_fd = l.as_fd().as_raw_fd();
        for _ in 0..ACCEPTS_PER_TURN {
            let sock = match sys::socket::accept(listen_fd, ACCEPT_FLAGS) {
                Ok(sock) => sock,
                Err(nix::Error::EAGAIN) => return,
                Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => continue,
                Err(e @ (nix::Error::EMFILE | nix::Error::ENFILE)) => {
                    self.refuse_for_lack_of_fds(listen_fd, e);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            self.admit(sock);
        }
    }

    /// Out of file descriptors: gives up the spare one to accept the next connection, tells
    /// it why it is refused, and takes the spare again (else the listener would stay
    /// readable and the loop spin).
    fn refuse_for_lack_of_fds(&mut self, listen_fd: RawFd, e: nix::Error) {
        tracing::warn!(error = %e, "out of file descriptors: refusing a connection (raise LimitNOFILE, or lower max_clients)");
        drop(self.spare_fd.take());
        if let Ok(sock) = sys::socket::accept(listen_fd, ACCEPT_FLAGS) {
            self.core.refuse(&sock, Refusal::NoFds);
        } else {
            self.core.counters.refused.fetch_add(1, Relaxed);
        }
        self.spare_fd = spare_fd();
    }

    /// Identifies the peer of a new connection and admits it as a session, or refuses it
    /// with an answer it can read.
    fn admit(&mut self, sock: OwnedFd) {
        match self.identify(&sock) {
            Ok((peer, pidfd)) => self.add_session(sock, peer, pidfd),
            Err(why) => {
                if let Refusal::Peer(e) = &why {
                    tracing::warn!(error = %error_chain(e), "connection refused");
                }
                self.core.refuse(&sock, why);
            }
        }
    }

    /// The peer of a new connection, pinned by its pidfd, if it may be served: not barred
    /// for a flood of malformed messages (checked before any other work), still alive, and
    /// within the limits.
    fn identify(&self, sock: &OwnedFd) -> Result<(Peer, OwnedFd), Refusal> {
        let core = &self.core;
        let peer = session::credentials(sock.as_fd())?;
        let privileged = core.privileged(peer.uid);
        if self.abuse.barred(peer.uid, Instant::now()) && !privileged {
            return Err(Refusal::Barred);
        }
        let pidfd = session::pin(sock.as_fd(), &peer)?;
        self.check_limits(&peer, privileged).map_err(|why| {
            tracing::warn!(pid = peer.pid, uid = peer.uid, reason = %why, "client refused");
            why
        })?;
        Ok((peer, pidfd))
    }

    /// Makes a session of an admitted connection and watches its socket and pidfd.
    fn add_session(&mut self, sock: OwnedFd, peer: Peer, pidfd: OwnedFd) {
        let core = &self.core;
        let id = core.next_id.fetch_add(1, Relaxed);
        let out = outbox_for(&core.limits());
        let s = Arc::new(Session::new(id, peer, pidfd, sock, out, core.uptime()));
        let added = core
            .epoll
            .add(s.sock(), EpollEvent::new(SOCK_EVENTS, sock_token(id)))
            .and_then(|()| {
                core.epoll.add(
                    s.pidfd.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, pidfd_token(id)),
                )
            });
        if let Err(e) = added {
            tracing::error!(error = %e, "epoll_ctl failed; connection dropped");
            let _ = core.epoll.delete(s.sock());
            return;
        }
        lock(&core.users).entry(peer.uid).or_default().sessions += 1;
        lock(&core.sessions).insert(id, s);
        core.counters.sessions.fetch_add(1, Relaxed);
        tracing::debug!(
            client = id,
            pid = peer.pid,
            uid = peer.uid,
            "client connected"
        );
    }

    /// Refuses a new connection of `peer` if it may not be served: the daemon is full (the
    /// last `reserved_clients` connections are kept for root and the daemon's user), or
    /// its (unprivileged) user has its maximum.
    fn check_limits(&self, peer: &Peer, privileged: bool) -> Result<(), Refusal> {
        let l = self.core.limits();
        let sessions = lock(&self.core.sessions).len();
        let of_user = lock(&self.core.users)
            .get(&peer.uid)
            .map_or(0, |u| u.sessions);
        let open_to_all = l.max_clients.saturating_sub(l.reserved_clients) as usize;
        if sessions >= l.max_clients as usize || (!privileged && sessions >= open_to_all) {
            let max = if privileged {
                l.max_clients as usize
            } else {
                open_to_all
            };
            return Err(Refusal::Full(max));
        }
        if !privileged && of_user >= l.clients_per_uid {
            return Err(Refusal::UserFull {
                uid: peer.uid,
                max: l.clients_per_uid,
            });
        }
        Ok(())
    }

    fn serve_socket(&mut self, id: u64, ev: EpollFlags, buf: &mut Vec<u8>) {
        let Some(s) = lock(&self.core.sessions).get(&id).cloned() else {
            return;
        };
        if ev.contains(EpollFlags::EPOLLOUT) {
            self.core.flush(&s);
        }
        // Read what is queued (bounded per wakeup so one client cannot starve the others).
        for _ in 0..READS_PER_TURN {
            if s.closing.load(Relaxed) {
                return;
            }
            match proto::recv(s.sock(), buf) {
                Ok(frame) => {
                    if !self.dispatch(&s, frame) {
                        return;
                    }
                }
                Err(SocketError::WouldBlock) => break,
                Err(SocketError::Closed) => {
                    self.close(id, "client closed the connection");
                    return;
                }
                Err(e) => {
                    if !self.refuse_message(&s, e) {
                        return;
                    }
                }
            }
        }
        if ev.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            self.close(id, "connection hung up");
        }
    }

    /// A message that could not be received whole. If the daemon could not take its fds
    /// (out of file descriptors: not the client's fault), the request is answered so and
    /// the session goes on; anything else ends the session, after one answer saying why
    /// (best effort).
    fn refuse_message(&mut self, s: &Session, e: SocketError) -> bool {
        let SocketError::FdsExhausted { request_id } = e else {
            self.malformed(s, 0, MessageError::Receive(e));
            return false;
        };
        self.core.counters.fds_exhausted.fetch_add(1, Relaxed);
        let why = WireError::from(MessageError::Receive(e));
        tracing::warn!(client = s.id, "{}", why.message);
        self.core.reply(s, request_id.unwrap_or(0), why.into());
        if request_id.is_some() {
            return true;
        }
        self.close(s.id, "out of file descriptors");
        false
    }

    /// Answers a malformed message of `s` (request `rid`, 0 if unknown) and closes the
    /// session; logs it unless its user sent too many lately, and bars that user's new
    /// connections for a while if it keeps on ([`abuse`]).
    fn malformed(&mut self, s: &Session, rid: u64, e: MessageError) {
        self.core.counters.bad_messages.fetch_add(1, Relaxed);
        let why = WireError::from(e);
        let noted = self.abuse.bad_message(s.peer.uid, Instant::now());
        if noted.log {
            tracing::warn!(client = s.id, uid = s.peer.uid, error = %why.message, "malformed message; closing the session");
        }
        if noted.barred_now && !self.core.privileged(s.peer.uid) {
            tracing::warn!(
                uid = s.peer.uid,
                "{} malformed messages within {:?}: refusing this user's connections for {:?}",
                abuse::BAR_AFTER,
                abuse::WINDOW,
                2 * abuse::WINDOW
            );
        }
        self.core.reply(s, rid, why.into());
        self.close(s.id, "malformed message");
    }

    /// Decodes one request and answers it, or hands it to a worker; false if the session
    /// closed.
    fn dispatch(&mut self, s: &Arc<Session>, frame: Frame) -> bool {
        let Frame {
            header,
            payload,
            fds,
        } = frame;
        let rid = header.request_id;
        s.touch(self.core.uptime());
        let req = match Request::decode(header.msg_type, &payload, fds.len()) {
            Ok(r) => r,
            Err(e) => {
                self.malformed(s, rid, e.into());
                return false;
            }
        };
        if handler::is_slow(&req) {
            self.submit_request(s, rid, req, fds);
        } else {
            let resp = handler::handle(&self.core, s, rid, req, fds);
            self.core.reply(s, rid, resp);
        }
        true
    }

    /// Hands a request that may block to the workers, within the session's quota of
    /// requests in flight.
    fn submit_request(&mut self, s: &Arc<Session>, rid: u64, req: Request, fds: Vec<OwnedFd>) {
        let limit = self.core.limits().quotas.inflight;
        if s.inflight.fetch_add(1, Relaxed) >= limit {
            s.inflight.fetch_sub(1, Relaxed);
            let why = WireError::from(TooManyInFlight(limit));
            self.core.reply(s, rid, why.into());
            return;
        }
        let (core, s2) = (Arc::clone(&self.core), Arc::clone(s));
        let job: Job = Box::new(move || {
            let resp = handler::handle(&core, &s2, rid, req, fds);
            // Out of flight before the client can see the answer and send the next one.
            s2.inflight.fetch_sub(1, Relaxed);
            core.reply(&s2, rid, resp);
        });
        if !self.core.submit(s, job) {
            s.inflight.fetch_sub(1, Relaxed);
            let why = WireError::from(handler::StateError::ShuttingDown);
            self.core.reply(s, rid, why.into());
        }
    }

    /// Ends the sessions that must end: no `Hello` within the handshake timeout; mirroring
    /// and streaming nothing, and no live external engine (an evicted one is idle), for the
    /// idle timeout; a client whose address space is gone
    /// (it `exec`ed or exited while another process kept the session open).
    fn housekeep(&mut self) {
        for (uid, n) in self.abuse.sweep(Instant::now()) {
            tracing::warn!(uid, "{n} more malformed messages of this user not logged");
        }
        let l = self.core.limits();
        let now = self.core.uptime();
        for s in self.core.sessions() {
            if s.hello.get().is_none() && now.saturating_sub(s.connected) > l.handshake_timeout {
                self.core.end(&s, End::NoHello);
            } else if let Some(w) = s.watched() {
                if !w.alive() {
                    self.core.note_gone(&s);
                    self.core.end(&s, End::Gone);
                }
            } else if s.streams.load(Relaxed) == 0
                && s.engine.get().is_none_or(|l| l.engine.is_gone())
                && now.saturating_sub(s.last_active()) > l.idle_timeout
            {
                self.core.end(&s, End::Idle);
            }
        }
    }

    /// Closes session `id`: no more requests, and its client is released off this thread.
    fn close(&mut self, id: u64, why: &str) {
        let Some(s) = lock(&self.core.sessions).remove(&id) else {
            return;
        };
        s.closing.store(true, Relaxed);
        // What is queued goes out if the socket has room (an error saying why, say).
        let _ = lock(&s.out).flush(s.sock());
        let _ = self.core.epoll.delete(s.sock());
        let _ = self.core.epoll.delete(s.pidfd.as_fd());
        {
            let mut users = lock(&self.core.users);
            if let Some(u) = users.get_mut(&s.peer.uid) {
                u.sessions = u.sessions.saturating_sub(1);
                if u.sessions == 0 {
                    users.remove(&s.peer.uid);
                }
            }
        }
        tracing::debug!(
            client = id,
            pid = s.peer.pid,
            reason = why,
            "session closed"
        );
        engines::session_closed(&self.core, &s);
        if let Some(w) = s.watched() {
            w.cancel();
            let core = Arc::clone(&self.core);
            let s2 = Arc::clone(&s);
            if !self.core.submit(&s, Box::new(move || core.release(&s2))) {
                self.core.release(&s);
            }
        }
    }

    fn shutdown(&mut self) {
        self.core.stopping.store(true, Relaxed);
        // Stop accepting and unlink the socket first.
        if let Some(l) = self.listener.take() {
            let _ = self.core.epoll.delete(l.as_fd());
            drop(l);
        }
        // Release every client here, with the event reader still running so their blocked
        // calls are answered until their uffds are closed.
        let sessions: Vec<Arc<Session>> =
            lock(&self.core.sessions).drain().map(|(_, s)| s).collect();
        let n = sessions.len();
        for s in &sessions {
            s.closing.store(true, Relaxed);
            self.core.release(s);
        }
        // The reader and the timer hold job submitters: stop them, then let queued jobs
        // finish.
        self.core.events.stop();
        self.core.dirty.periodic.stop();
        lock(&self.core.jobs).take();
        self.workers.join();
        self.core.streams.stop();
        self.core.device.shutdown();
        tracing::info!(clients_released = n, "memshadowd stopped");
    }
}

/// What the session loop waits on besides the client sockets, pidfds and the signalfd:
/// one epoll over the listener, a wake-up eventfd and the housekeeping timer.
#[derive(Debug)]
struct LoopFds {
    epoll: Epoll,
    wake: Arc<EventFd>,
    housekeep: TimerFd,
}

impl LoopFds {
    fn new(listener: &Listener) -> Result<LoopFds, ServerError> {
        let loop_err = |what| move |e| ServerError::Loop(what, e);
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(loop_err("eventfd"))?,
        );
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(loop_err("epoll"))?;
        let housekeep = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
        )
        .map_err(loop_err("timerfd"))?;
        housekeep
            .set(
                Expiration::Interval(TimeSpec::from_duration(HOUSEKEEP_EVERY)),
                TimerSetTimeFlags::empty(),
            )
            .map_err(loop_err("timerfd_settime"))?;
        for (fd, token) in [
            (listener.as_fd(), LISTEN),
            (wake.as_fd(), WAKE),
            (housekeep.as_fd(), HOUSEKEEP),
        ] {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                .map_err(loop_err("epoll_ctl"))?;
        }
        Ok(LoopFds {
            epoll,
            wake,
            housekeep,
        })
    }
}

/// What the event reader calls when a client's uffd hangs up: the session loop is asked
/// to close that session.
fn close_on_hangup(to_close: &Arc<Mutex<Vec<u64>>>, wake: &Arc<EventFd>) -> Hangup {
    let (to_close, wake) = (Arc::clone(to_close), Arc::clone(wake));
    Box::new(move |id| {
        lock(&to_close).push(id);
        let _ = wake.write(1);
    })
}

fn log_listening(listener: &Listener, device: &Device, selection: &Selection) {
    tracing::info!(
        socket = %listener.path().display(),
        activated = !listener.owns_file(),
        engines = device.engine_count(),
        mode = device.mode().as_str(),
        flush_latency_us = device.flush_latency().as_micros() as u64,
        dirty = selection.chosen().map_or("off", |b| b.as_str()),
        "memshadowd listening"
    );
}

/// An fd kept in reserve for [`Server::refuse_for_lack_of_fds`].
fn spare_fd() -> Option<OwnedFd> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
        .ok()
        .map(OwnedFd::from)
}

impl Core {
    /// Releases a closed session's client (rule 8, G5) and stops reading its uffd.
    fn release(&self, s: &Session) {
        let Some(b) = s.binding.get() else { return };
        if let Err(e) = b.watched.release() {
            tracing::warn!(client = s.id, error = %error_chain(&e), "release failed");
        }
        self.events.unwatch(s.id);
        self.counters.released.fetch_add(1, Relaxed);
        self.counters
            .events_of_released
            .fetch_add(b.watched.counters().total(), Relaxed);
        tracing::debug!(client = s.id, "client released");
    }

    /// Every session (for status and listing).
    fn sessions(&self) -> Vec<Arc<Session>> {
        lock(&self.sessions).values().cloned().collect()
    }

    /// Session `id`, if open.
    fn session(&self, id: u64) -> Option<Arc<Session>> {
        lock(&self.sessions).get(&id).cloned()
    }

    /// Time since the daemon started (the clock of session time stamps).
    fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests;

pub use memshadow_proto::error_chain;
