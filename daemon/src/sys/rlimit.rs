//! The daemon's open-file limit (`RLIMIT_NOFILE`).
//!
//! Every client holds a few fds in the daemon (its socket, a pidfd, its userfaultfd and
//! memory file while bound), and a message's fds are installed before they can be checked.
//! The usual soft limit (1024) is far below what the service manager allows as the hard
//! limit (`LimitNOFILE=`), so the daemon raises it at start-up. It never uses `select`, for
//! which fds above 1023 would be a problem.

use nix::errno::Errno;

/// The open-file limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit: the fds this process may have open.
    pub soft: u64,
    /// The hard limit: the most the soft limit may be raised to.
    pub hard: u64,
}

/// Why the limit could not be read or raised.
#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    /// `getrlimit` failed.
    #[error("cannot read the open-file limit (RLIMIT_NOFILE)")]
    Get(#[source] Errno),
    /// `setrlimit` failed.
    #[error("cannot raise the open-file limit (RLIMIT_NOFILE) from {soft} to {hard}")]
    Set {
        /// The soft limit, left in force.
        soft: u64,
        /// The hard limit it was to be raised to.
        hard: u64,
        /// Why.
        #[source]
        source: Errno,
    },
}

/// The current open-file limits.
pub fn nofile() -> Result<NofileLimit, RlimitError> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable `rlimit` for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(RlimitError::Get(Errno::last()));
    }
    Ok(NofileLimit {
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// Raises the soft open-file limit to the hard limit; returns the limits then in force
/// (both equal, unless the soft limit was already there).
pub fn raise_nofile() -> Result<NofileLimit, RlimitError> {
    let now = nofile()?;
    if now.soft >= now.hard {
        return Ok(now);
    }
    let r = libc::rlimit {
        rlim_cur: now.hard,
        rlim_max: now.hard,
    };
    // SAFETY: `r` is a valid `rlimit`, only read by the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(RlimitError::Set {
            soft: now.soft,
            hard: now.hard,
            source: Errno::last(),
        });
    }
    nofile()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let before = nofile().expect("read");
        // One below the hard limit, so there is something to raise (harmless to the other
        // tests of this process, which never come near it).
        let r = libc::rlimit {
            rlim_cur: before.hard - 1,
            rlim_max: before.hard,
        };
        // SAFETY: `r` is a valid `rlimit`, only read by the call.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
        assert_eq!(nofile().expect("read").soft, before.hard - 1);
        let l = raise_nofile().expect("raise");
        assert_eq!((l.soft, l.hard), (before.hard, before.hard));
        assert_eq!(nofile().expect("read"), l);
        // Idempotent.
        assert_eq!(raise_nofile().expect("again"), l);
    }
}
