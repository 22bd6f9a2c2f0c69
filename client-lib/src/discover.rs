//! Where the daemon is, and why a connection to it was refused.
//!
//! **Discovery** (every client: this library, the C ABI over it, `memshadowctl`, the demo):
//!
//! 1. `$MEMSHADOW_SOCKET`, if set and not empty;
//! 2. the system daemon's socket, `/run/memshadow/memshadowd.sock`, if something is there
//!    (whoever the caller is: a member of the socket's group reaches the system daemon with
//!    no setting at all);
//! 3. the per-user socket, `$XDG_RUNTIME_DIR/memshadow/memshadowd.sock`, if something is
//!    there;
//! 4. nothing found: where a daemon this user starts without `--socket` would listen (the
//!    daemon's own rule, [`memshadow_proto::path::socket_path_from`]: the system socket for
//!    root, else the per-user one), so the error names the path that was missing;
//!    [`crate::Error::NoSocketPath`] if there is none (not root, no `XDG_RUNTIME_DIR`).
//!
//! The daemon itself does not discover: it *creates* its socket, by the rule of step 4.
//!
//! **Refusals**: a `connect` that fails with `EACCES` or `EPERM` becomes
//! [`crate::Error::ConnectDenied`], whose hint looks at the socket (owner, group, mode) and at
//! this process's groups and says what would let it in: usually, which group to join.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use memshadow_proto::path::{socket_path_from, SOCKET_ENV, SYSTEM_SOCKET, USER_SOCKET};

/// What discovery looks at, so that tests can give it any environment and file system.
pub(crate) struct Lookup<'a> {
    /// `$MEMSHADOW_SOCKET`.
    pub env: Option<OsString>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg: Option<OsString>,
    /// Whether the caller is root (only for the fallback of step 4).
    pub root: bool,
    /// Whether something is at a path.
    pub exists: &'a dyn Fn(&Path) -> bool,
}

impl Lookup<'_> {
    /// This process's environment and file system.
    pub fn here() -> Lookup<'static> {
        Lookup {
            env: std::env::var_os(SOCKET_ENV),
            xdg: std::env::var_os("XDG_RUNTIME_DIR"),
            root: nix::unistd::geteuid().is_root(),
            exists: &something_at,
        }
    }

    /// The socket to connect to (module documentation); `None` when no path applies.
    pub fn discover(&self) -> Option<PathBuf> {
        if let Some(p) = self.env.as_ref().filter(|p| !p.is_empty()) {
            return Some(p.into());
        }
        let system = Path::new(SYSTEM_SOCKET);
        if (self.exists)(system) {
            return Some(system.to_owned());
        }
        if let Some(xdg) = self.xdg.as_ref().filter(|p| !p.is_empty()) {
            let user = Path::new(xdg).join(USER_SOCKET);
            if (self.exists)(&user) {
                return Some(user);
            }
        }
        socket_path_from(None, self.root, self.xdg.clone())
    }
}

/// Whether anything is at `p`: a file of any kind, or something this process may not look
/// at (a directory on the way it cannot search; connecting then says why).
fn something_at(p: &Path) -> bool {
    match std::fs::symlink_metadata(p) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ENAMETOOLONG)
        ),
    }
}

/// Who owns the socket and who may write to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketFacts {
    /// Owner's name (or uid).
    pub owner: String,
    /// Group's name, if the group has one.
    pub group: Option<String>,
    /// The group's id.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
    /// The user names /etc/group lists as members of the group.
    pub members: Vec<String>,
}

/// Who this process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The user's name (or uid).
    pub name: String,
    /// Whether the socket's group is one of this process's groups.
    pub in_group: bool,
}

/// What to tell a caller whose `connect` to `path` was refused (`EACCES`/`EPERM`), from what
/// can be seen of the socket and of this process.
pub(crate) fn denied_hint(path: &Path) -> String {
    use nix::unistd::{getegid, geteuid, getgroups, Gid, Group, Uid, User};
    let st = match nix::sys::stat::stat(path) {
        Ok(st) => st,
        Err(e) => {
            return format!(
                "this user cannot look at the socket ({e}): a directory on the way to it is not \
                 searchable; ask an administrator"
            )
        }
    };
    let name_of = |uid: Uid| {
        User::from_uid(uid)
            .ok()
            .flatten()
            .map_or_else(|| format!("uid {uid}"), |u| u.name)
    };
    let gid = Gid::from_raw(st.st_gid);
    let group = Group::from_gid(gid).ok().flatten();
    let facts = SocketFacts {
        owner: name_of(Uid::from_raw(st.st_uid)),
        group: group.as_ref().map(|g| g.name.clone()),
        gid: st.st_gid,
        mode: st.st_mode & 0o7777,
        members: group.map(|g| g.mem).unwrap_or_default(),
    };
    let caller = Caller {
        name: name_of(geteuid()),
        in_group: getegid() == gid || getgroups().is_ok_and(|g| g.contains(&gid)),
    };
    explain_denied(&facts, &caller)
}

/// [`denied_hint`] as a pure function of what it found.
pub(crate) fn explain_denied(s: &SocketFacts, me: &Caller) -> String {
    let group = s
        .group
        .clone()
        .unwrap_or_else(|| format!("with gid {} (it has no name here)", s.gid));
    let what = format!(
        "the socket (owner {}, group {group}, mode {:04o})",
        s.owner, s.mode
    );
    if s.mode & 0o002 != 0 {
        return format!(
            "{what} is open to every user, so a directory on the way to it or a security module \
             refuses {}",
            me.name
        );
    }
    if s.mode & 0o020 == 0 {
        return format!(
            "{what} admits only its owner: run as {} (or root), or ask an administrator to open it \
             to a group (the memshadowd.socket unit sets SocketMode=0660, SocketGroup=memshadow)",
            s.owner
        );
    }
    if me.in_group {
        return format!(
            "{what} admits group {group}, and this process is in it, so a directory on the way to \
             it or a security module refuses {}",
            me.name
        );
    }
    let Some(g) = &s.group else {
        return format!(
            "{what} admits only the members of a group with no name on this machine: ask an \
             administrator"
        );
    };
    if s.members.iter().any(|m| m == &me.name) {
        return format!(
            "{what} admits the members of group {g}; {} is one, but this session started before \
             joining it: log in again (or run `newgrp {g}`)",
            me.name
        );
    }
    format!(
        "{what} admits the members of group {g}, and {} is not one: join it (as root: `usermod \
         -aG {g} {}`, then log in again)",
        me.name, me.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const SYSTEM: &str = "/run/memshadow/memshadowd.sock";
    const USER: &str = "/run/user/1000/memshadow/memshadowd.sock";

    /// Discovery with `env`, `xdg`, `root` and the files in `present`.
    fn find(env: Option<&str>, xdg: Option<&str>, root: bool, present: &[&str]) -> Option<String> {
        let present: BTreeSet<PathBuf> = present.iter().map(PathBuf::from).collect();
        let exists = move |p: &Path| present.contains(p);
        Lookup {
            env: env.map(Into::into),
            xdg: xdg.map(Into::into),
            root,
            exists: &exists,
        }
        .discover()
        .map(|p| p.display().to_string())
    }

    #[test]
    fn memshadow_socket_comes_first_whatever_exists() {
        for root in [false, true] {
            assert_eq!(
                find(
                    Some("/tmp/s"),
                    Some("/run/user/1000"),
                    root,
                    &[SYSTEM, USER]
                ),
                Some("/tmp/s".into())
            );
            assert_eq!(find(Some("/tmp/s"), None, root, &[]), Some("/tmp/s".into()));
        }
    }

    #[test]
    fn an_empty_memshadow_socket_counts_as_unset() {
        assert_eq!(
            find(Some(""), Some("/run/user/1000"), false, &[SYSTEM]),
            Some(SYSTEM.into())
        );
    }

    #[test]
    fn the_system_socket_comes_next_for_every_user_when_it_exists() {
        for root in [false, true] {
            assert_eq!(
                find(None, Some("/run/user/1000"), root, &[SYSTEM, USER]),
                Some(SYSTEM.into()),
                "root {root}"
            );
            assert_eq!(find(None, None, root, &[SYSTEM]), Some(SYSTEM.into()));
        }
    }

    #[test]
    fn then_the_per_user_socket() {
        for root in [false, true] {
            assert_eq!(
                find(None, Some("/run/user/1000"), root, &[USER]),
                Some(USER.into()),
                "root {root}"
            );
        }
        // An empty XDG_RUNTIME_DIR counts as unset.
        assert_eq!(find(None, Some(""), false, &[USER]), None);
    }

    #[test]
    fn with_nothing_there_the_path_the_users_own_daemon_would_take() {
        assert_eq!(
            find(None, Some("/run/user/1000"), false, &[]),
            Some(USER.into())
        );
        assert_eq!(
            find(None, Some("/run/user/0"), true, &[]),
            Some(SYSTEM.into())
        );
        assert_eq!(find(None, None, true, &[]), Some(SYSTEM.into()));
        assert_eq!(find(None, None, false, &[]), None);
    }

    fn facts(mode: u32, group: Option<&str>, members: &[&str]) -> SocketFacts {
        SocketFacts {
            owner: "root".into(),
            group: group.map(Into::into),
            gid: 998,
            mode,
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    fn alice(in_group: bool) -> Caller {
        Caller {
            name: "alice".into(),
            in_group,
        }
    }

    #[test]
    fn a_user_outside_the_sockets_group_is_told_to_join_it() {
        let h = explain_denied(&facts(0o660, Some("memshadow"), &["bob"]), &alice(false));
        assert_eq!(
            h,
            "the socket (owner root, group memshadow, mode 0660) admits the members of group \
             memshadow, and alice is not one: join it (as root: `usermod -aG memshadow alice`, \
             then log in again)"
        );
    }

    #[test]
    fn a_member_whose_session_predates_joining_is_told_to_log_in_again() {
        let h = explain_denied(&facts(0o660, Some("memshadow"), &["alice"]), &alice(false));
        assert!(
            h.contains("alice is one, but this session started before joining it"),
            "{h}"
        );
        assert!(h.contains("newgrp memshadow"), "{h}");
    }

    #[test]
    fn other_refusals_say_what_else_is_in_the_way() {
        let h = explain_denied(&facts(0o660, Some("memshadow"), &[]), &alice(true));
        assert!(h.contains("this process is in it"), "{h}");
        let h = explain_denied(&facts(0o600, Some("root"), &[]), &alice(false));
        assert!(h.contains("admits only its owner: run as root"), "{h}");
        let h = explain_denied(&facts(0o666, Some("root"), &[]), &alice(false));
        assert!(h.contains("open to every user"), "{h}");
        let h = explain_denied(&facts(0o660, None, &[]), &alice(false));
        assert!(
            h.contains("group with gid 998 (it has no name here)"),
            "{h}"
        );
        assert!(h.contains("a group with no name on this machine"), "{h}");
    }

    /// As root, `connect` is never refused, but the hint is worked out from the real socket
    /// the same way: here for a socket of root's own group, mode 0660.
    #[test]
    fn the_hint_reads_the_sockets_owner_group_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("memshadow-hint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
            .unwrap_or_else(|e| panic!("{e}"));
        let h = denied_hint(&path);
        assert!(h.contains("mode 0660"), "{h}");
        assert!(
            h.contains("admits group") || h.contains("admits the members"),
            "{h}"
        );
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
        let h = denied_hint(&dir.join("gone.sock"));
        assert!(h.contains("cannot look at the socket"), "{h}");
    }
}
