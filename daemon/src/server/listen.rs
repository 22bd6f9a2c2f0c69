//! The listening socket: its path, refusing to start over a live daemon, replacing a stale
//! socket file, and unlinking the file this daemon created when it stops; or a listening
//! socket handed over by a service manager (socket activation), which it never unlinks.
//!
//! # Creating the socket file without a race
//!
//! The daemon often runs as root, and the socket's directory may be shared with other users
//! (e.g. `/tmp`). So [`Listener::bind`] never operates by path on the final name once the
//! socket could be there, and never follows a symlink an attacker could have put there:
//!
//! 1. The directory is created if missing (mode 0755, the umask can only take bits away),
//!    opened once (`O_PATH`), and every later step works relative to that descriptor, so a
//!    swap of the path above it after this point redirects nothing.
//! 2. The directory must be one only root or the daemon's own uid controls: owned by root
//!    or by the daemon's effective uid ([`ListenError::DirOwner`]: the owner of a directory
//!    can always rename or delete its entries), and not writable by group or others unless
//!    it is sticky ([`ListenError::DirWritable`]: anyone who could write there could replace
//!    the socket later and impersonate the daemon; in a sticky directory like `/tmp` only
//!    an entry's owner may remove or rename it). A POSIX ACL granting write to someone else
//!    shows in the group bits (the ACL mask), so it is refused too.
//! 3. A file already at the name is probed: a live daemon is refused, a stale socket is
//!    unlinked, anything else (a symlink included) is refused.
//! 4. The socket is bound in a fresh private directory (`mkdirat` with a random name, mode
//!    0700, so nobody else can put or swap anything in it) beside the final name, reached
//!    through `/proc/self/fd/N` (a short address whatever the length of the final path;
//!    the daemon needs `/proc` anyway), given its mode 0666 there (access is decided per
//!    request), and made to listen before it has a name anyone can connect to.
//! 5. It gets its final name with `linkat(2)`, which never follows a symlink at the new name
//!    and fails if anything is there (a socket of a daemon started meanwhile is never
//!    replaced), then the private name and directory are removed, on success and on every
//!    failure. A Unix socket stays connectable through its new name: connecting looks up the
//!    inode. The process umask is never touched (it is process-wide, and the daemon is
//!    multi-threaded).
//!
//! Directories above the socket's are trusted as the operator chose them: whoever can
//! replace one of them can replace the socket's directory itself.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, open, openat, AtFlags, FcntlArg, OFlag};
use nix::sys::socket::{
    bind, connect, getsockname, getsockopt, listen, socket, sockopt, AddressFamily, Backlog,
    SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
};
use nix::sys::stat::{fchmodat, fstat, fstatat, mkdirat, FchmodatFlags, FileStat, Mode, SFlag};
use nix::unistd::{geteuid, linkat, unlinkat, UnlinkatFlags};

/// Errors of setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another daemon answers on the path.
    #[error("a daemon is already listening on {0}")]
    Live(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotSocket(PathBuf),
    /// The socket's directory is writable by group or others and not sticky: anyone who can
    /// write there could replace the socket and impersonate the daemon.
    #[error(
        "the socket directory {0} is writable by group or others and not sticky: anyone who \
         can write there could replace the socket; use a directory only root or the daemon's \
         user can write (e.g. mode 0755)"
    )]
    DirWritable(PathBuf),
    /// The socket's directory belongs to a user who is neither root nor the daemon's: its
    /// owner could replace the socket (or the whole directory's contents).
    #[error(
        "the socket directory {dir} is owned by uid {owner}, neither root nor the daemon's uid \
         {euid}: its owner could replace the socket"
    )]
    DirOwner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// The daemon's effective uid.
        euid: u32,
    },
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

/// Identity of the socket file this daemon created (`st_dev`, `st_ino`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64);

impl FileId {
    fn of(st: &FileStat) -> FileId {
        FileId(st.st_dev, st.st_ino)
    }
}

/// A bound, listening `SOCK_SEQPACKET` socket; dropping it unlinks the file it created.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    /// The file this daemon created, unlinked on drop if it is still the one at `path`.
    file: Option<FileId>,
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

/// Name of the socket inside the private directory.
const PRIVATE_NAME: &str = "s";
/// Prefix of the private directory's name (then a random suffix).
const PRIVATE_PREFIX: &str = ".memshadowd-bind-";

/// Refuses a socket directory someone other than root or this daemon's uid could change
/// entries of (the module documentation says why).
fn check_dir(dir: &Path, st: &FileStat, euid: u32) -> Result<(), ListenError> {
    let mode = st.st_mode;
    if st.st_uid != 0 && st.st_uid != euid {
        return Err(ListenError::DirOwner {
            dir: dir.to_owned(),
            owner: st.st_uid,
            euid,
        });
    }
    let writable_by_others = mode & (libc::S_IWGRP | libc::S_IWOTH) != 0;
    let sticky = mode & libc::S_ISVTX != 0;
    if writable_by_others && !sticky {
        return Err(ListenError::DirWritable(dir.to_owned()));
    }
    Ok(())
}

/// The private directory the socket is bound in before it gets its name: removed, with the
/// socket's private name, when dropped (on success and on every failure).
struct PrivateDir<'a> {
    parent: &'a OwnedFd,
    name: OsString,
    fd: OwnedFd,
    /// The socket was bound in it (so its private name exists).
    bound: bool,
}

impl<'a> PrivateDir<'a> {
    /// Creates a fresh directory with mode 0700 and a random name in `parent`.
    fn create(parent: &'a OwnedFd, path: &Path) -> Result<PrivateDir<'a>, ListenError> {
        use std::hash::{BuildHasher, RandomState};
        let mut attempt = 0u32;
        let name = loop {
            // Random (per process and per call), so nobody can claim the name first in a
            // shared sticky directory; a name someone holds anyway is skipped.
            let suffix = RandomState::new().hash_one((std::process::id(), attempt));
            let name = OsString::from(format!("{PRIVATE_PREFIX}{suffix:016x}"));
            match mkdirat(parent, name.as_os_str(), Mode::S_IRWXU) {
                Ok(()) => break name,
                Err(nix::Error::EEXIST) if attempt < 16 => attempt += 1,
                Err(e) => return Err(io("create a private directory beside", path)(e)),
            }
        };
        let opened = openat(
            parent,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) => {
                // Ours (the parent is checked, and in a sticky one only its owner, this
                // daemon, can rename or remove the entry), so it is ours to remove.
                let _ = unlinkat(parent, name.as_os_str(), UnlinkatFlags::RemoveDir);
                return Err(io("open the private directory beside", path)(e));
            }
        };
        Ok(PrivateDir {
            parent,
            name,
            fd,
            bound: false,
        })
    }

    /// The address of `PRIVATE_NAME` in this directory, through `/proc/self/fd`: short
    /// whatever the final path's length, and it resolves to exactly this directory.
    fn socket_addr(&self, path: &Path) -> Result<UnixAddr, ListenError> {
        let p = format!("/proc/self/fd/{}/{PRIVATE_NAME}", self.fd.as_raw_fd());
        UnixAddr::new(p.as_str()).map_err(io("address the private socket for", path))
    }
}

impl Drop for PrivateDir<'_> {
    fn drop(&mut self) {
        if self.bound {
            match unlinkat(&self.fd, PRIVATE_NAME, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(nix::Error::ENOENT) => {}
                Err(e) => tracing::warn!(dir = ?self.name, error = %e,
                    "cannot unlink the socket's private name"),
            }
        }
        if let Err(e) = unlinkat(self.parent, self.name.as_os_str(), UnlinkatFlags::RemoveDir) {
            tracing::warn!(dir = ?self.name, error = %e, "cannot remove the private directory");
        }
    }
}

impl Listener {
    /// Binds `path` (creating its directory), with mode 0666 so clients of any uid can
    /// connect (what they may do is checked per request). Refuses a directory that someone
    /// other than root or the daemon's uid could change entries of, a live daemon, and
    /// anything but a stale socket at the name; never operates on the final name by path
    /// once the socket could be there (the module documentation has the steps).
    pub fn bind(path: &Path) -> Result<Listener, ListenError> {
        Listener::bind_with(path, || {})
    }

    /// [`Listener::bind`], calling `before_link` right before the socket gets its final
    /// name (the tests put an attacker's file there).
    fn bind_with(path: &Path, before_link: impl FnOnce()) -> Result<Listener, ListenError> {
        let addr = UnixAddr::new(path).map_err(io("address", path))?;
        // The name is the path's last component as written: `/`, `x/..`, `x/.` and `x/`
        // name a directory (`Path::file_name` would make `x` of the last two).
        let name = match path.file_name() {
            Some(name) if path.as_os_str().as_bytes().ends_with(name.as_bytes()) => name,
            _ => return Err(ListenError::NotSocket(path.to_owned())),
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| ListenError::Io {
                op: "create the directory of",
                path: path.to_owned(),
                source,
            })?;
        let dirfd = open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("open the directory of", path))?;
        let st = fstat(&dirfd).map_err(io("inspect the directory of", path))?;
        check_dir(dir, &st, geteuid().as_raw())?;
        Listener::clear_name(&dirfd, name, path, &addr)?;

        let mut private = PrivateDir::create(&dirfd, path)?;
        let fd = seqpacket(path)?;
        bind(fd.as_raw_fd(), &private.socket_addr(path)?).map_err(io("bind", path))?;
        private.bound = true;
        // In a 0700 directory of this daemon's: nothing else can be at the name.
        fchmodat(
            &private.fd,
            PRIVATE_NAME,
            Mode::from_bits_truncate(0o666),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(io("chmod the new socket for", path))?;
        let id = fstatat(&private.fd, PRIVATE_NAME, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(io("inspect the new socket for", path))?;
        // Listening before the name exists: a client that connects the moment it appears
        // waits in the backlog, and another daemon's probe never takes it for stale.
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
            .map_err(io("listen on", path))?;
        before_link();
        linkat(&private.fd, PRIVATE_NAME, &dirfd, name, AtFlags::empty())
            .map_err(io("link the new socket to", path))?;
        drop(private);
        Ok(Listener {
            fd,
            path: path.to_owned(),
            file: Some(FileId::of(&id)),
        })
    }

    /// Makes way for the socket at `name` in `dirfd`: nothing there, or a stale socket
    /// (unlinked); a live daemon or anything but a socket is refused.
    fn clear_name(
        dirfd: &OwnedFd,
        name: &OsStr,
        path: &Path,
        addr: &UnixAddr,
    ) -> Result<(), ListenError> {
        let st = match fstatat(dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(nix::Error::ENOENT) => return Ok(()),
            Err(e) => return Err(io("inspect", path)(e)),
        };
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
            return Err(ListenError::NotSocket(path.to_owned()));
        }
        let probe = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(io("probe", path))?;
        match connect(probe.as_raw_fd(), addr) {
            Ok(()) => Err(ListenError::Live(path.to_owned())),
            Err(nix::Error::ECONNREFUSED | nix::Error::ENOENT) => {
                tracing::info!(path = %path.display(), "replacing a stale socket");
                match unlinkat(dirfd, name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
                    Err(e) => Err(io("remove the stale socket", path)(e)),
                }
            }
            Err(e) => Err(io("probe", path)(e)),
        }
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
            file: None,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True if this daemon created the socket file (and unlinks it when it stops).
    pub fn owns_file(&self) -> bool {
        self.file.is_some()
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let Some(id) = self.file else { return };
        // Only the file this daemon created: if someone replaced it (another daemon's
        // socket, say), it is theirs.
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if FileId(m.dev(), m.ino()) == id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot unlink the socket");
                }
            }
            Ok(_) => tracing::warn!(path = %self.path.display(),
                "the socket file was replaced by another; leaving it"),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot unlink the socket")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// A fresh directory for one test, mode 0755 whatever the umask.
    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("memshadow-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        chmod(&dir, 0o755);
        dir
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    /// The names in `dir`, sorted (a leftover private directory would show here).
    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn connect_to(path: &Path) -> nix::Result<OwnedFd> {
        let s = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(s.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(s)
    }

    /// A listening socket bound at `path` by hand (another daemon's).
    fn other_listener(path: &Path) -> OwnedFd {
        let s = seqpacket(path).expect("socket");
        bind(s.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("bind");
        listen(&s, Backlog::new(4).expect("backlog")).expect("listen");
        s
    }

    #[test]
    fn refuses_a_live_socket_and_replaces_a_stale_one() {
        let dir = scratch("listen");
        let sub = dir.join("sub");
        let path = sub.join("d.sock");
        let l = Listener::bind(&path).expect("bind");
        assert_eq!(
            mode_of(&sub) & 0o022,
            0,
            "a created directory is writable by its owner only, whatever the umask"
        );
        assert!(matches!(Listener::bind(&path), Err(ListenError::Live(_))));
        // A stale file: leave the socket file behind without a listener.
        let mut l = l;
        l.file = None;
        drop(l);
        assert!(path.exists());
        let l = Listener::bind(&path).expect("replaces the stale socket");
        assert_eq!(entries(&sub), ["d.sock"]);
        drop(l);
        assert!(!path.exists(), "the socket is unlinked on drop");
        std::fs::write(&path, b"x").expect("write");
        assert!(matches!(
            Listener::bind(&path),
            Err(ListenError::NotSocket(_))
        ));
        std::fs::remove_file(&path).expect("rm");
        // A path that names a directory, whatever its last component says.
        for p in ["sub/.", "sub/", "sub/..", "sub/x.sock/."] {
            assert!(
                matches!(Listener::bind(&dir.join(p)), Err(ListenError::NotSocket(_))),
                "{p}"
            );
        }
        assert!(entries(&sub).is_empty() && entries(&dir) == ["sub"]);
        // A symlink, even to a stale socket, is in the way too; nothing is left behind.
        let mut stale = Listener::bind(&dir.join("stale.sock")).expect("bind");
        stale.file = None;
        drop(stale);
        std::os::unix::fs::symlink(dir.join("stale.sock"), &path).expect("symlink");
        assert!(matches!(
            Listener::bind(&path),
            Err(ListenError::NotSocket(_))
        ));
        assert!(
            dir.join("stale.sock").exists(),
            "the symlink's target is untouched"
        );
        assert_eq!(entries(&sub), ["d.sock"]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_socket_is_created_0666_and_nothing_else_is_left() {
        let dir = scratch("listen-mode");
        let path = dir.join("d.sock");
        let l = Listener::bind(&path).expect("bind");
        let m = std::fs::symlink_metadata(&path).expect("stat");
        assert!(m.file_type().is_socket());
        assert_eq!(mode_of(&path), 0o666);
        assert_eq!(entries(&dir), ["d.sock"], "no private directory is left");
        connect_to(&path).expect("connectable through its final name");
        drop(l);
        assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn refuses_a_directory_writable_by_others_unless_sticky() {
        let dir = scratch("listen-writable");
        let path = dir.join("d.sock");
        for mode in [0o777, 0o775, 0o757, 0o730, 0o703] {
            chmod(&dir, mode);
            match Listener::bind(&path) {
                Err(ListenError::DirWritable(d)) => assert_eq!(d, dir),
                other => panic!("mode {mode:o}: {other:?}"),
            }
            assert!(entries(&dir).is_empty(), "{mode:o}: {:?}", entries(&dir));
        }
        // A stale socket there is not touched either.
        chmod(&dir, 0o755);
        let mut stale = Listener::bind(&path).expect("bind");
        stale.file = None;
        drop(stale);
        chmod(&dir, 0o777);
        assert!(matches!(
            Listener::bind(&path),
            Err(ListenError::DirWritable(_))
        ));
        assert_eq!(entries(&dir), ["d.sock"]);
        std::fs::remove_file(&path).expect("rm");
        // Sticky (like /tmp): only an entry's owner may remove or rename it.
        for mode in [0o1777, 0o1770] {
            chmod(&dir, mode);
            let l = Listener::bind(&path).expect("a sticky directory is fine");
            assert_eq!(mode_of(&path), 0o666);
            assert_eq!(entries(&dir), ["d.sock"]);
            drop(l);
        }
        let e = ListenError::DirWritable(dir.clone()).to_string();
        assert!(
            e.contains("writable by group or others and not sticky"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn refuses_a_directory_owned_by_another_user() {
        let euid = geteuid().as_raw();
        if euid != 0 {
            eprintln!("skipped: only root can make a directory of another user's");
            return;
        }
        let dir = scratch("listen-owner");
        let path = dir.join("d.sock");
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
        match Listener::bind(&path) {
            Err(ListenError::DirOwner {
                dir: d,
                owner: 65534,
                euid: 0,
            }) => assert_eq!(d, dir),
            other => panic!("{other:?}"),
        }
        assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));
        // Root's own directory is fine.
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).expect("chown");
        drop(Listener::bind(&path).expect("bind"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// What an attacker who could write in the directory would do between the probe and the
    /// socket getting its name: put a symlink there. It is neither followed (the target
    /// keeps its mode) nor replaced, the bind fails, and no private directory is left.
    #[test]
    fn a_symlink_put_at_the_name_while_binding_is_never_followed() {
        let dir = scratch("listen-race");
        let path = dir.join("d.sock");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"secret").expect("write");
        chmod(&victim, 0o600);
        let r = Listener::bind_with(&path, || {
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        });
        assert_eq!(mode_of(&victim), 0o600, "the symlink's target was chmodded");
        assert_eq!(std::fs::read(&victim).expect("read"), b"secret");
        match r {
            Err(ListenError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists => {}
            other => panic!("{other:?}"),
        }
        assert!(std::fs::symlink_metadata(&path)
            .expect("stat")
            .file_type()
            .is_symlink());
        assert_eq!(entries(&dir), ["d.sock", "victim"]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// A daemon that got the name first while this one was binding keeps it.
    #[test]
    fn a_socket_that_appears_while_binding_is_never_replaced() {
        let dir = scratch("listen-race2");
        let path = dir.join("d.sock");
        let mut other = None;
        let r = Listener::bind_with(&path, || {
            // (Nothing to remove here; a daemon that took this one's socket for stale would.)
            let _ = std::fs::remove_file(&path);
            other = Some(other_listener(&path));
        });
        assert!(r.is_err(), "{r:?}");
        let ino = std::fs::symlink_metadata(&path).expect("stat").ino();
        let other = other.expect("the other daemon's socket");
        let bound: SockaddrStorage = getsockname(other.as_raw_fd()).expect("getsockname");
        assert_eq!(bound.as_unix_addr().and_then(|u| u.path()), Some(&*path));
        connect_to(&path).expect("the other daemon still answers at the name");
        assert_eq!(entries(&dir), ["d.sock"]);
        drop(other);
        assert_eq!(std::fs::symlink_metadata(&path).expect("stat").ino(), ino);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// The private name is bound through /proc/self/fd, so a final path as long as an
    /// address may be works (a private directory spelt out beside it would not fit).
    #[test]
    fn a_path_as_long_as_an_address_allows_binds() {
        let dir = scratch("listen-long");
        let prefix = dir.as_os_str().len() + 1;
        let Some(n) = 107usize.checked_sub(prefix).filter(|n| *n > 0) else {
            eprintln!("skipped: the temporary directory's path is too long");
            return;
        };
        let path = dir.join("x".repeat(n));
        assert_eq!(path.as_os_str().len(), 107);
        let l = Listener::bind(&path).expect("bind");
        connect_to(&path).expect("connect");
        drop(l);
        assert!(entries(&dir).is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn drop_unlinks_only_the_socket_it_created() {
        let dir = scratch("listen-drop");
        let path = dir.join("d.sock");
        let l = Listener::bind(&path).expect("bind");
        // Someone replaced the file (e.g. removed it and started another daemon).
        std::fs::remove_file(&path).expect("rm");
        let other = other_listener(&path);
        drop(l);
        connect_to(&path).expect("the other socket was left alone");
        drop(other);
        std::fs::remove_file(&path).expect("rm");
        // Gone already: nothing to do, no panic.
        let l = Listener::bind(&path).expect("bind");
        std::fs::remove_file(&path).expect("rm");
        drop(l);
        assert!(entries(&dir).is_empty());
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
