//! The memshadowd server (DESIGN.md §1, §5 G5–G7): accepts clients on a `SOCK_SEQPACKET`
//! socket, checks who they are, answers their requests, binds their userfaultfds to the
//! event source and releases them when they go away.
//!
//! Threads are bounded whatever the number of clients: this session loop (listener, client
//! sockets, pidfds, signals, over one epoll), a fixed worker pool for requests that may block,
//! the event reader and finisher, and the device's engines and reclaimer.

pub mod handler;
pub mod listen;
pub mod session;
pub mod stream;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use memshadow_proto::{self as proto, ErrorCode, Frame, Request, Response, SocketError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{accept4, SockFlag};

use crate::config::{Config, Limits};
use crate::device::{Device, DeviceError};
use crate::dirty::periodic::Periodic;
use crate::dirty::{DirtyCounters, DirtyError, Selection};
use crate::events::{EventError, EventReader, Heartbeat};
use crate::lock;
use crate::sys::PAGE_SIZE;
use crate::workers::{Job, Workers};
pub use listen::{ListenError, Listener};
use session::{peer_of, Session};

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
}

/// Dirty tracking as the daemon runs it (DESIGN.md §6): what the start-up probe found, the
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
    /// Connections refused (limits).
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
    per_uid: Mutex<HashMap<u32, u32>>,
    jobs: Mutex<Option<Sender<Job>>>,
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
    /// every bound client's shadow quota changes for its next faults.
    pub fn set_limits(&self, l: Limits) {
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = l;
        for s in self.sessions() {
            if let Some(w) = s.watched() {
                w.device().set_quota_bytes(l.quotas.shadow_bytes);
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

    fn submit(&self, job: Job) -> bool {
        match &*lock(&self.jobs) {
            Some(tx) => tx.send(job).is_ok(),
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

    /// Sends `resp` to request `request_id` of `s`, waiting up to the send timeout for room;
    /// a client that does not read its answers loses its session, and is not waited for
    /// again (the session loop would otherwise stall once per queued request, long enough
    /// for the service watchdog to fire).
    fn reply(&self, s: &Session, request_id: u64, resp: &Response) {
        if s.closing.load(Relaxed) {
            return;
        }
        self.counters.requests.fetch_add(1, Relaxed);
        if matches!(resp, Response::Error { .. }) {
            self.counters.errors.fetch_add(1, Relaxed);
        }
        let payload = resp.encode_payload();
        let deadline = Instant::now() + self.cfg.send_timeout;
        // A stream's first answer says more follow.
        let flags = match resp {
            Response::TraceStarted => proto::FLAG_MORE,
            _ => 0,
        };
        loop {
            match proto::send(s.sock(), resp.msg_type(), flags, request_id, &payload, &[]) {
                Ok(()) => return,
                Err(SocketError::WouldBlock) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                    let mut fds = [PollFd::new(s.sock(), PollFlags::POLLOUT)];
                    if left.is_zero() || matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(0)) {
                        tracing::warn!(
                            client = s.id,
                            "client does not read its answers; closing the session"
                        );
                        break;
                    }
                }
                Err(SocketError::Closed) => break,
                Err(e) => {
                    tracing::debug!(client = s.id, error = %e, "cannot answer");
                    break;
                }
            }
        }
        s.closing.store(true, Relaxed);
        self.request_close(s.id);
    }
}

/// Tokens of the session loop's epoll.
const LISTEN: u64 = u64::MAX;
const SIGNAL: u64 = u64::MAX - 1;
const WAKE: u64 = u64::MAX - 2;

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
    epoll: Epoll,
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
        let device = Device::new(&cfg.device).map_err(ServerError::Device)?;
        let workers = Workers::start("worker", cfg.workers).map_err(ServerError::Spawn)?;
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| ServerError::Loop("eventfd", e))?,
        );
        let to_close: Arc<Mutex<Vec<u64>>> = Arc::default();
        let hangup = {
            let (to_close, wake) = (Arc::clone(&to_close), Arc::clone(&wake));
            Box::new(move |id| {
                lock(&to_close).push(id);
                let _ = wake.write(1);
            })
        };
        let events = EventReader::start_with(workers.sender(), hangup, heartbeat)?;
        let periodic = Periodic::start(workers.sender()).map_err(ServerError::Spawn)?;
        let streams =
            stream::Streams::start(Arc::clone(device.trace())).map_err(ServerError::Spawn)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| ServerError::Loop("epoll", e))?;
        epoll
            .add(
                listener.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, LISTEN),
            )
            .map_err(|e| ServerError::Loop("epoll_ctl", e))?;
        epoll
            .add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))
            .map_err(|e| ServerError::Loop("epoll_ctl", e))?;
        tracing::info!(
            socket = %listener.path().display(),
            activated = !listener.owns_file(),
            engines = device.engine_count(),
            mode = device.mode().as_str(),
            flush_latency_us = device.flush_latency().as_micros() as u64,
            dirty = selection.chosen().map_or("off", |b| b.as_str()),
            "memshadowd listening"
        );
        Ok(Server {
            core: Arc::new(Core {
                jobs: Mutex::new(Some(workers.sender())),
                limits: RwLock::new(cfg.limits()),
                cfg,
                device,
                events,
                sessions: Mutex::default(),
                per_uid: Mutex::default(),
                to_close,
                wake,
                next_id: AtomicU64::new(1),
                owner: nix::unistd::geteuid().as_raw(),
                socket: listener.path().to_owned(),
                streams,
                dirty: DirtyState {
                    selection,
                    counters: Arc::default(),
                    periodic,
                },
                started: Instant::now(),
                stopping: AtomicBool::new(false),
                stop_requested: AtomicBool::new(false),
                counters: ServerCounters::default(),
            }),
            listener: Some(listener),
            workers,
            epoll,
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
        self.epoll
            .add(sfd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL))
            .map_err(|e| ServerError::Loop("epoll_ctl", e))?;
        let mut events = vec![EpollEvent::empty(); 256];
        let mut buf = Vec::new();
        let timeout = sup
            .tick_every()
            .and_then(|d| EpollTimeout::try_from(d).ok())
            .unwrap_or(EpollTimeout::NONE);
        sup.ready(&self.core);
        'serve: loop {
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => 0,
                Err(e) => return Err(ServerError::Loop("epoll_wait", e)),
            };
            sup.tick(&self.core);
            for ev in &events[..n] {
                match ev.data() {
                    SIGNAL => {
                        while let Ok(Some(si)) = sfd.read_signal() {
                            if si.ssi_signo == Signal::SIGHUP as u32 {
                                sup.reload(&self.core);
                                continue;
                            }
                            tracing::info!(signal = si.ssi_signo, "shutting down");
                            sup.stopping(&self.core);
                            break 'serve;
                        }
                    }
                    LISTEN => self.accept_all(),
                    WAKE => {
                        let _ = self.core.wake.read();
                        let ids = std::mem::take(&mut *lock(&self.core.to_close));
                        for id in ids {
                            self.close(id, "closed by the daemon");
                        }
                        if self.core.stop_requested.load(Relaxed) {
                            tracing::info!("stop requested");
                            sup.stopping(&self.core);
                            break 'serve;
                        }
                    }
                    t => {
                        let id = t >> 1;
                        if t & 1 == 1 {
                            self.close(id, "client process exited");
                        } else {
                            self.serve_socket(id, ev.events(), &mut buf);
                        }
                    }
                }
            }
        }
        self.shutdown();
        Ok(())
    }

    fn accept_all(&mut self) {
        let Some(l) = &self.listener else { return };
        loop {
            let fd = match accept4(
                l.as_fd().as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(nix::Error::EAGAIN) => return,
                Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            // SAFETY: accept4 returned a new fd that nothing else owns.
            let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let (peer, pidfd) = match peer_of(sock.as_fd()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot identify a peer; connection dropped");
                    continue;
                }
            };
            let refusal = {
                let limits = self.core.limits();
                let sessions = lock(&self.core.sessions);
                let per_uid = lock(&self.core.per_uid);
                if sessions.len() >= limits.max_clients as usize {
                    Some(format!(
                        "the daemon serves its maximum of {} clients",
                        limits.max_clients
                    ))
                } else if per_uid.get(&peer.uid).copied().unwrap_or(0) >= limits.clients_per_uid {
                    Some(format!(
                        "uid {} has its maximum of {} clients",
                        peer.uid, limits.clients_per_uid
                    ))
                } else {
                    None
                }
            };
            if let Some(why) = refusal {
                self.core.counters.refused.fetch_add(1, Relaxed);
                tracing::warn!(pid = peer.pid, uid = peer.uid, reason = %why, "client refused");
                let r = Response::error(ErrorCode::TooManyClients, why);
                let _ = proto::send(sock.as_fd(), r.msg_type(), 0, 0, &r.encode_payload(), &[]);
                continue;
            }
            let id = self.core.next_id.fetch_add(1, Relaxed);
            let s = Arc::new(Session::new(id, peer, pidfd, sock));
            let added = self
                .epoll
                .add(
                    s.sock(),
                    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, sock_token(id)),
                )
                .and_then(|()| {
                    self.epoll.add(
                        s.pidfd.as_fd(),
                        EpollEvent::new(EpollFlags::EPOLLIN, pidfd_token(id)),
                    )
                });
            if let Err(e) = added {
                tracing::error!(error = %e, "epoll_ctl failed; connection dropped");
                let _ = self.epoll.delete(s.sock());
                continue;
            }
            *lock(&self.core.per_uid).entry(peer.uid).or_default() += 1;
            lock(&self.core.sessions).insert(id, s);
            self.core.counters.sessions.fetch_add(1, Relaxed);
            tracing::debug!(
                client = id,
                pid = peer.pid,
                uid = peer.uid,
                "client connected"
            );
        }
    }

    fn serve_socket(&mut self, id: u64, ev: EpollFlags, buf: &mut Vec<u8>) {
        let Some(s) = lock(&self.core.sessions).get(&id).cloned() else {
            return;
        };
        // Read what is queued (bounded per wakeup so one client cannot starve the others).
        for _ in 0..16 {
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
                    self.core.counters.bad_messages.fetch_add(1, Relaxed);
                    tracing::warn!(client = id, error = %e, "bad message; closing the session");
                    let r = Response::error(ErrorCode::BadMessage, error_chain(&e));
                    let _ = proto::send(s.sock(), r.msg_type(), 0, 0, &r.encode_payload(), &[]);
                    self.close(id, "bad message");
                    return;
                }
            }
        }
        if ev.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            self.close(id, "connection hung up");
        }
    }

    /// Decodes and answers (or hands to a worker) one request; false if the session closed.
    fn dispatch(&mut self, s: &Arc<Session>, frame: Frame) -> bool {
        let Frame {
            header,
            payload,
            fds,
        } = frame;
        let rid = header.request_id;
        let req = match Request::decode(header.msg_type, &payload, fds.len()) {
            Ok(r) => r,
            Err(e) => {
                self.core.counters.bad_messages.fetch_add(1, Relaxed);
                tracing::warn!(client = s.id, error = %e, "malformed request; closing the session");
                self.core.reply(
                    s,
                    rid,
                    &Response::error(ErrorCode::BadMessage, error_chain(&e)),
                );
                self.close(s.id, "malformed request");
                return false;
            }
        };
        if !handler::is_slow(&req) {
            let resp = handler::handle(&self.core, s, rid, req, fds);
            self.core.reply(s, rid, &resp);
            return true;
        }
        let limit = self.core.limits().quotas.inflight;
        if s.inflight.fetch_add(1, Relaxed) >= limit {
            s.inflight.fetch_sub(1, Relaxed);
            let r = Response::error(
                ErrorCode::QuotaExceeded,
                format!("more than {limit} requests in flight"),
            );
            self.core.reply(s, rid, &r);
            return true;
        }
        let (core, s2) = (Arc::clone(&self.core), Arc::clone(s));
        let job: Job = Box::new(move || {
            let resp = handler::handle(&core, &s2, rid, req, fds);
            core.reply(&s2, rid, &resp);
            s2.inflight.fetch_sub(1, Relaxed);
        });
        if !self.core.submit(job) {
            s.inflight.fetch_sub(1, Relaxed);
            self.core.reply(
                s,
                rid,
                &Response::error(ErrorCode::ShuttingDown, "the daemon is shutting down"),
            );
        }
        true
    }

    /// Closes session `id`: no more requests, and its client is released off this thread.
    fn close(&mut self, id: u64, why: &str) {
        let Some(s) = lock(&self.core.sessions).remove(&id) else {
            return;
        };
        s.closing.store(true, Relaxed);
        let _ = self.epoll.delete(s.sock());
        let _ = self.epoll.delete(s.pidfd.as_fd());
        if let Some(n) = lock(&self.core.per_uid).get_mut(&s.peer.uid) {
            *n = n.saturating_sub(1);
        }
        tracing::debug!(
            client = id,
            pid = s.peer.pid,
            reason = why,
            "session closed"
        );
        if s.binding.get().is_some() {
            let core = Arc::clone(&self.core);
            let s2 = Arc::clone(&s);
            if !self.core.submit(Box::new(move || core.release(&s2))) {
                self.core.release(&s);
            }
        }
    }

    fn shutdown(&mut self) {
        self.core.stopping.store(true, Relaxed);
        // Stop accepting and unlink the socket first.
        if let Some(l) = self.listener.take() {
            let _ = self.epoll.delete(l.as_fd());
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
        // The reader and the timer hold job senders: stop them, then let queued jobs finish.
        self.core.events.stop();
        self.core.dirty.periodic.stop();
        lock(&self.core.jobs).take();
        self.workers.join();
        self.core.streams.stop();
        self.core.device.shutdown();
        tracing::info!(clients_released = n, "memshadowd stopped");
    }
}

impl Core {
    /// Releases a closed session's client (rule 8, G5) and stops reading its uffd.
    fn release(&self, s: &Session) {
        let Some(b) = s.binding.get() else { return };
        if let Err(e) = b.watched.release() {
            tracing::warn!(client = s.id, error = %e, "release failed");
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

    fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests;

pub use memshadow_proto::error_chain;
