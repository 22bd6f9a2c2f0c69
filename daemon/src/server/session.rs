//! One client connection: its identity (SO_PEERCRED, pinned by a pidfd), its protocol state
//! and, once bound, its [`Watched`] client.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex, OnceLock};

use memshadow_proto::AccessPath;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::sys;
use crate::watched::Watched;

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of the peer as of `connect`, free of pid-reuse races.
const SO_PEERPIDFD: libc::c_int = 77;

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

/// Reads the peer's credentials and a pidfd for it.
pub fn peer_of(sock: BorrowedFd<'_>) -> nix::Result<(Peer, OwnedFd)> {
    let cred = getsockopt(&sock, PeerCredentials)?;
    let peer = Peer {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    };
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are valid for writes of the sizes given, for the whole call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &raw mut len,
        )
    };
    let pidfd = if r == 0 && fd >= 0 {
        // SAFETY: the kernel just created `fd` for us.
        unsafe { OwnedFd::from_raw_fd(fd) }
    } else {
        // Older kernels: pidfd_open on the pid (a tiny reuse window remains).
        sys::pidfd_open(peer.pid)?
    };
    Ok((peer, pidfd))
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
    pub watched: Arc<Watched>,
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
    /// Set once the session is being closed.
    pub closing: AtomicBool,
}

impl Session {
    /// A new session for `sock`.
    pub fn new(id: u64, peer: Peer, pidfd: OwnedFd, sock: OwnedFd) -> Session {
        Session {
            id,
            peer,
            pidfd,
            sock,
            hello: OnceLock::new(),
            binding: OnceLock::new(),
            bind_lock: Mutex::new(()),
            inflight: AtomicU32::new(0),
            closing: AtomicBool::new(false),
        }
    }

    /// The bound client, if bound.
    pub fn watched(&self) -> Option<&Arc<Watched>> {
        self.binding.get().map(|b| &b.watched)
    }

    /// The connection.
    pub fn sock(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
