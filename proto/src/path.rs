//! Where the daemon listens: the one set of path rules the daemon and every client follow,
//! so that both find the same socket without configuration.

use std::ffi::OsString;
use std::path::PathBuf;

/// The environment variable that names the socket, for the daemon and its clients alike.
pub const SOCKET_ENV: &str = "MEMSHADOW_SOCKET";

/// The system daemon's socket (root; the socket unit's `ListenSequentialPacket=`).
pub const SYSTEM_SOCKET: &str = "/run/memshadow/memshadowd.sock";

/// A user's daemon socket, relative to `$XDG_RUNTIME_DIR`.
pub const USER_SOCKET: &str = "memshadow/memshadowd.sock";

/// The socket path: [`SOCKET_ENV`] if set, else [`SYSTEM_SOCKET`] for root, else
/// [`USER_SOCKET`] under `$XDG_RUNTIME_DIR`; `None` if none applies.
pub fn socket_path() -> Option<PathBuf> {
    socket_path_from(
        std::env::var_os(SOCKET_ENV),
        nix::unistd::geteuid().is_root(),
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}

/// [`socket_path`] as a pure function of its inputs (an empty variable counts as unset).
pub fn socket_path_from(
    env: Option<OsString>,
    root: bool,
    xdg: Option<OsString>,
) -> Option<PathBuf> {
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    if root {
        return Some(SYSTEM_SOCKET.into());
    }
    xdg.filter(|p| !p.is_empty())
        .map(|d| PathBuf::from(d).join(USER_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_rules() {
        let p = |e: Option<&str>, root, x: Option<&str>| {
            socket_path_from(e.map(Into::into), root, x.map(Into::into))
        };
        assert_eq!(p(Some("/tmp/s"), true, Some("/r")), Some("/tmp/s".into()));
        assert_eq!(
            p(Some(""), true, None),
            Some("/run/memshadow/memshadowd.sock".into())
        );
        assert_eq!(
            p(None, false, Some("/run/user/1000")),
            Some("/run/user/1000/memshadow/memshadowd.sock".into())
        );
        assert_eq!(p(None, false, Some("")), None);
        assert_eq!(p(None, false, None), None);
    }
}
