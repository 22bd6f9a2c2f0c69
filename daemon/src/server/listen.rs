//! The listening socket: its path, refusing to start over a live daemon, replacing a stale
//! socket file, and unlinking the file this daemon created when it stops; or a listening
//! socket handed over by a service manager (socket activation), which it never unlinks.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    bind, connect, getsockname, getsockopt, listen, socket, sockopt, AddressFamily, Backlog,
    SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
};
use nix::sys::stat::{fstat, SFlag};

/// Errors of setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another daemon answers on the path.
    #[error("a daemon is already listening on {0}")]
    Live(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotSocket(PathBuf),
    /// A socket handed over by the service manager is not one memshadowd can serve on.
    #[error("the socket passed in fd {fd} (LISTEN_FDS) {why}")]
    Inherited {
        /// The descriptor.
        fd: i32,
        /// What is wrong with it.
        why: String,
    },
    /// A system call failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What failed.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A bound, listening `SOCK_SEQPACKET` socket; dropping it unlinks the file.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    unlink: bool,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> ListenError + 'a {
    move |e| ListenError::Io {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

fn seqpacket(path: &Path) -> Result<OwnedFd, ListenError> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(io("create a socket for", path))
}

impl Listener {
    /// Binds `path` (creating its directory), with mode 0666 so clients of any uid can
    /// connect (what they may do is checked per request).
    pub fn bind(path: &Path) -> Result<Listener, ListenError> {
        let addr = UnixAddr::new(path).map_err(io("address", path))?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ListenError::NotSocket(path.to_owned()))
            }
            Ok(_) => {
                let probe = socket(
                    AddressFamily::Unix,
                    SockType::SeqPacket,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .map_err(io("probe", path))?;
                match connect(probe.as_raw_fd(), &addr) {
                    Ok(()) => return Err(ListenError::Live(path.to_owned())),
                    Err(nix::Error::ECONNREFUSED | nix::Error::ENOENT) => {
                        tracing::info!(path = %path.display(), "replacing a stale socket");
                        match std::fs::remove_file(path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(ListenError::Io {
                                    op: "remove the stale socket",
                                    path: path.to_owned(),
                                    source: e,
                                })
                            }
                        }
                    }
                    Err(e) => return Err(io("probe", path)(e)),
                }
            }
            Err(_) => {}
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ListenError::Io {
                op: "create the directory of",
                path: path.to_owned(),
                source,
            })?;
        }
        let fd = seqpacket(path)?;
        bind(fd.as_raw_fd(), &addr).map_err(io("bind", path))?;
        let listener = Listener {
            fd,
            path: path.to_owned(),
            unlink: true,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(
            |source| ListenError::Io {
                op: "chmod",
                path: path.to_owned(),
                source,
            },
        )?;
        listen(&listener.fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
            .map_err(io("listen on", path))?;
        Ok(listener)
    }

    /// Adopts a listening socket handed over by a service manager (`LISTEN_FDS`) or by
    /// whoever keeps it across restarts: checks that it is a listening `AF_UNIX`
    /// `SOCK_SEQPACKET` socket and makes it non-blocking. Its file belongs to whoever created
    /// it (e.g. the `.socket` unit), so it is never unlinked here.
    pub fn adopt(fd: OwnedFd) -> Result<Listener, ListenError> {
        let raw = fd.as_raw_fd();
        let bad = |why: String| ListenError::Inherited { fd: raw, why };
        let st = fstat(&fd).map_err(|e| bad(format!("cannot be inspected: {e}")))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
            return Err(bad("is not a socket".into()));
        }
        let addr: SockaddrStorage =
            getsockname(raw).map_err(|e| bad(format!("has no address: {e}")))?;
        match addr.family() {
            Some(AddressFamily::Unix) => {}
            other => {
                return Err(bad(format!(
                "is not a Unix socket (family {other:?}); use ListenSequentialPacket= with a path"
            )))
            }
        }
        let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| bad(format!("SO_TYPE: {e}")))?;
        if ty != SockType::SeqPacket {
            return Err(bad(format!(
                "is a {ty:?} socket; memshadowd needs SOCK_SEQPACKET (ListenSequentialPacket=)"
            )));
        }
        if !getsockopt(&fd, sockopt::AcceptConn).map_err(|e| bad(format!("SO_ACCEPTCONN: {e}")))? {
            return Err(bad("is not listening".into()));
        }
        let path = match addr.as_unix_addr() {
            Some(u) => match (u.path(), u.as_abstract()) {
                (Some(p), _) => p.to_owned(),
                (None, Some(name)) => PathBuf::from(format!("@{}", String::from_utf8_lossy(name))),
                (None, None) => PathBuf::from("(unnamed)"),
            },
            None => PathBuf::from("(unnamed)"),
        };
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(|e| bad(format!("F_GETFL: {e}")))?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(|e| bad(format!("cannot be made non-blocking: {e}")))?;
        Ok(Listener {
            fd,
            path,
            unlink: false,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True if this daemon created the socket file (and unlinks it when it stops).
    pub fn owns_file(&self) -> bool {
        self.unlink
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.unlink {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot unlink the socket");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_live_socket_and_replaces_a_stale_one() {
        let dir = std::env::temp_dir().join(format!("memshadow-listen-{}", std::process::id()));
        let path = dir.join("sub/d.sock");
        let l = Listener::bind(&path).expect("bind");
        assert!(matches!(Listener::bind(&path), Err(ListenError::Live(_))));
        // A stale file: leave the socket file behind without a listener.
        let mut l = l;
        l.unlink = false;
        drop(l);
        assert!(path.exists());
        let l = Listener::bind(&path).expect("replaces the stale socket");
        drop(l);
        assert!(!path.exists(), "the socket is unlinked on drop");
        std::fs::write(&path, b"x").expect("write");
        assert!(matches!(
            Listener::bind(&path),
            Err(ListenError::NotSocket(_))
        ));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn adopts_only_listening_seqpacket_unix_sockets() {
        let dir = std::env::temp_dir().join(format!("memshadow-adopt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("a.sock");
        let addr = UnixAddr::new(&path).expect("addr");
        let mk = |ty: SockType| {
            socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None).expect("socket")
        };
        // Bound but not listening.
        let s = mk(SockType::SeqPacket);
        bind(s.as_raw_fd(), &addr).expect("bind");
        let e = Listener::adopt(s.try_clone().expect("dup"))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("is not listening"), "{e}");
        listen(&s, Backlog::new(4).expect("backlog")).expect("listen");
        let l = Listener::adopt(s).expect("adopt");
        assert_eq!(l.path(), path);
        assert!(!l.owns_file());
        let fl = fcntl(l.as_fd(), FcntlArg::F_GETFL).expect("getfl");
        assert!(OFlag::from_bits_truncate(fl).contains(OFlag::O_NONBLOCK));
        drop(l);
        assert!(
            path.exists(),
            "an adopted socket's file is left to its owner"
        );
        std::fs::remove_file(&path).expect("rm");
        // A stream socket.
        let s = mk(SockType::Stream);
        bind(s.as_raw_fd(), &addr).expect("bind");
        listen(&s, Backlog::new(4).expect("backlog")).expect("listen");
        let e = Listener::adopt(s).unwrap_err().to_string();
        assert!(
            e.contains("is a Stream socket; memshadowd needs SOCK_SEQPACKET"),
            "{e}"
        );
        // Not a socket at all.
        let f: OwnedFd = std::fs::File::open("/dev/null").expect("open").into();
        let e = Listener::adopt(f).unwrap_err().to_string();
        assert!(e.ends_with("is not a socket"), "{e}");
        // An internet socket.
        let s = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("inet socket");
        let e = Listener::adopt(s).unwrap_err().to_string();
        assert!(e.contains("is not a Unix socket"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
