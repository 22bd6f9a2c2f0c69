//! The listening socket: its path, refusing to start over a live daemon, replacing a stale
//! socket file, and unlinking the file this daemon created when it stops.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

/// Errors of setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another daemon answers on the path.
    #[error("a daemon is already listening on {0}")]
    Live(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotSocket(PathBuf),
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

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
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
}
