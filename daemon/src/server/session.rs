//! One client connection: its identity (SO_PEERCRED, pinned by a pidfd), its protocol state
//! and, once bound, its [`AddressSpace`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use memshadow_proto::AccessPath;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::outbox::Outbox;
use crate::address_space::AddressSpace;
use crate::device::external::ExternalEngine;
use crate::sys;

/// Who is on the other end of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Why a connection's peer could not be identified; the connection is refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// `SO_PEERCRED` failed.
    #[error("cannot read the peer's credentials (SO_PEERCRED)")]
    Credentials(#[source] nix::Error),
    /// `SO_PEERPIDFD` failed: looking the peer up by its pid instead could find another
    /// process that took the number since, so there is no fallback.
    #[error("cannot get the peer's pidfd (SO_PEERPIDFD, Linux 6.5 or newer)")]
    PidFd(#[source] nix::Error),
    /// The peer exited before its connection was accepted.
    #[error("the peer (pid {0}) exited before its connection was accepted")]
    Gone(i32),
}

/// Reads the peer's credentials and the pidfd the kernel took of it at `connect` time. The
/// process is never looked up by its pid number: that number may belong to another process
/// by now.
pub fn peer_of(sock: BorrowedFd<'_>) -> Result<(Peer, OwnedFd), PeerError> {
    let peer = credentials(sock)?;
    Ok((peer, pin(sock, &peer)?))
}

/// The peer's credentials as of `connect` (`SO_PEERCRED`).
pub fn credentials(sock: BorrowedFd<'_>) -> Result<Peer, PeerError> {
    let cred = getsockopt(&sock, PeerCredentials).map_err(PeerError::Credentials)?;
    Ok(Peer {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

/// The pidfd of `peer`, taken by the kernel at `connect`; refused if it has exited since.
pub fn pin(sock: BorrowedFd<'_>, peer: &Peer) -> Result<OwnedFd, PeerError> {
    let pidfd = peer_pidfd(sock).map_err(PeerError::PidFd)?;
    if !sys::pidfd_alive(pidfd.as_fd()) {
        return Err(PeerError::Gone(peer.pid));
    }
    Ok(pidfd)
}

/// `SO_PEERPIDFD` (a test can make it fail, as on a kernel without it).
fn peer_pidfd(sock: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    #[cfg(test)]
    if tests::NO_PEERPIDFD.with(std::cell::Cell::get) {
        return Err(nix::Error::ENOPROTOOPT);
    }
    sys::socket::peer_pidfd(sock)
}

/// What `Hello` settled.
#[derive(Debug, Clone)]
pub struct Hello {
    /// The protocol version chosen.
    pub version: u16,
    /// The client's name.
    pub name: String,
}

/// A bound client's binding.
#[derive(Debug)]
pub struct Binding {
    /// The client as the event source and device see it.
    pub watched: Arc<AddressSpace>,
    /// How its memory is read.
    pub access: AccessPath,
    /// Features its uffd was given.
    pub uffd_features: u64,
}

/// One client connection.
#[derive(Debug)]
pub struct Session {
    /// The daemon's id for it.
    pub id: u64,
    /// Its peer.
    pub peer: Peer,
    /// The peer's pidfd (readable when it exits).
    pub pidfd: OwnedFd,
    /// The connection.
    pub sock: OwnedFd,
    /// Set by `Hello`.
    pub hello: OnceLock<Hello>,
    /// Set by `Bind`.
    pub binding: OnceLock<Binding>,
    /// Serialises `Bind`.
    pub bind_lock: Mutex<()>,
    /// Requests handed to workers and not yet answered.
    pub inflight: AtomicU32,
    /// Trace streams it receives.
    pub streams: AtomicU32,
    /// Set once the session is being closed.
    pub closing: AtomicBool,
    /// Set when its client's address space turned out to be gone: the session ends once
    /// the answer saying so is sent.
    pub gone: AtomicBool,
    /// Answers waiting for room in its socket.
    pub out: Mutex<Outbox>,
    /// When it connected (daemon uptime).
    pub connected: Duration,
    /// When it last sent a request (daemon uptime, ms).
    last_active_ms: AtomicU64,
    /// Set by `EngineAttach`: the session is an external engine.
    pub engine: OnceLock<EngineLink>,
    /// Fds that go with the successful answer to a request (by request id: `EngineAttached`,
    /// `MonitorReady`), until it is sent.
    answer_fds: Mutex<Vec<(u64, Vec<Arc<OwnedFd>>)>>,
}

/// An external engine's session: whose mirror it reads.
#[derive(Debug)]
pub struct EngineLink {
    /// The client it reads, while it lives (an engine does not keep its client's files,
    /// or its address space, after the client is gone).
    pub client: std::sync::Weak<AddressSpace>,
    /// The client's pid.
    pub client_pid: i32,
    /// The mirror's id within the client.
    pub mirror_id: u64,
    /// The engine.
    pub engine: Arc<ExternalEngine>,
}

impl Session {
    /// A new session for `sock`, connected at `now` (daemon uptime), whose answers wait in
    /// `out`.
    pub fn new(
        id: u64,
        peer: Peer,
        pidfd: OwnedFd,
        sock: OwnedFd,
        out: Outbox,
        now: Duration,
    ) -> Session {
        Session {
            id,
            peer,
            pidfd,
            sock,
            hello: OnceLock::new(),
            binding: OnceLock::new(),
            bind_lock: Mutex::new(()),
            inflight: AtomicU32::new(0),
            streams: AtomicU32::new(0),
            closing: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            out: Mutex::new(out),
            connected: now,
            last_active_ms: AtomicU64::new(millis(now)),
            engine: OnceLock::new(),
            answer_fds: Mutex::new(Vec::new()),
        }
    }

    /// Keeps `fds` for the answer to request `rid` (at most one set per request in flight).
    pub fn set_answer_fds(&self, rid: u64, fds: Vec<Arc<OwnedFd>>) {
        let mut a = crate::lock(&self.answer_fds);
        a.retain(|(r, _)| *r != rid);
        a.push((rid, fds));
    }

    /// The fds kept for the answer to request `rid`, once.
    pub fn take_answer_fds(&self, rid: u64) -> Vec<Arc<OwnedFd>> {
        let mut a = crate::lock(&self.answer_fds);
        match a.iter().position(|(r, _)| *r == rid) {
            Some(i) => a.swap_remove(i).1,
            None => Vec::new(),
        }
    }

    /// The bound client, if bound.
    pub fn watched(&self) -> Option<&Arc<AddressSpace>> {
        self.binding.get().map(|b| &b.watched)
    }

    /// The connection.
    pub fn sock(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Notes a request at `now` (daemon uptime).
    pub fn touch(&self, now: Duration) {
        self.last_active_ms.store(millis(now), Ordering::Relaxed);
    }

    /// When it last sent a request (daemon uptime).
    pub fn last_active(&self) -> Duration {
        Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Checks at start-up that this kernel gives a peer's pidfd (`SO_PEERPIDFD`): without it
/// every connection would be refused.
pub fn probe_peer_pidfd() -> Result<(), PeerError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, _b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(PeerError::PidFd)?;
    peer_pidfd(a.as_fd()).map(drop).map_err(PeerError::PidFd)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    use nix::sys::socket::{
        accept4, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
        UnixAddr,
    };

    thread_local! {
        /// Makes `SO_PEERPIDFD` fail on this thread, as on a kernel without it.
        pub(super) static NO_PEERPIDFD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A listening socket and a connection to it made by a child process that has exited
    /// (and been reaped) by the time it is accepted, or by this process if `child` is false.
    fn accepted(child: bool) -> OwnedFd {
        let dir =
            std::env::temp_dir().join(format!("memshadow-peer-{}-{child}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let addr = UnixAddr::new(&path).unwrap();
        let l = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(l.as_raw_fd(), &addr).unwrap();
        listen(&l, Backlog::new(4).unwrap()).unwrap();
        let mut keep = None;
        if child {
            connect_from_a_child_that_exits(&addr);
        } else {
            let c = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            connect(c.as_raw_fd(), &addr).unwrap();
            keep = Some(c);
        }
        let fd = accept4(l.as_raw_fd(), SockFlag::SOCK_CLOEXEC).unwrap();
        std::mem::forget(keep);
        std::fs::remove_dir_all(&dir).unwrap();
        // SAFETY: accept4 returned a new fd that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Forks a child that connects to `addr` and exits at once; reaps it.
    fn connect_from_a_child_that_exits(addr: &UnixAddr) {
        use nix::sys::socket::SockaddrLike;
        // SAFETY: the child makes only async-signal-safe system calls (socket, connect,
        // _exit) before it exits, so forking a multi-threaded test process is sound.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: a plain system call with integer arguments.
            let c = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0) };
            // SAFETY: `addr` points at a valid sockaddr_un of `addr.len()` bytes.
            let r = unsafe { libc::connect(c, addr.as_ptr().cast(), addr.len()) };
            // SAFETY: ends the child without running any destructor of the parent's state.
            unsafe { libc::_exit(i32::from(r != 0)) };
        }
        let mut status = 0;
        // SAFETY: `status` is valid for writes; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        assert_eq!(r, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child could not connect"
        );
    }

    #[test]
    fn a_live_peer_is_identified_by_its_pidfd() {
        let s = accepted(false);
        let (peer, pidfd) = peer_of(s.as_fd()).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        assert!(sys::pidfd_alive(pidfd.as_fd()));
    }

    /// A peer gone before the accept is refused, never looked up again by its pid.
    #[test]
    fn a_peer_that_exited_before_the_accept_is_refused() {
        let s = accepted(true);
        assert!(matches!(peer_of(s.as_fd()), Err(PeerError::Gone(_))));
    }

    /// Without `SO_PEERPIDFD` the connection is refused: the fallback of old was
    /// `pidfd_open(pid)`, which opens whatever process holds that number now.
    #[test]
    fn without_so_peerpidfd_the_peer_is_refused_not_looked_up_by_pid() {
        let s = accepted(false);
        NO_PEERPIDFD.with(|f| f.set(true));
        let r = peer_of(s.as_fd());
        NO_PEERPIDFD.with(|f| f.set(false));
        assert!(matches!(r, Err(PeerError::PidFd(_))), "{r:?}");
    }
}
