//! What a client hands over when it binds, checked before the daemon uses any of it
//! (docs/threat-model.md).
//!
//! In order: its userfaultfd (created in its own address space, `UFFDIO_API` not done yet),
//! its `/proc/self/mem` opened for reading, then (protocol 2) its `/proc/self/maps`, then
//! optionally its `/proc/self/pagemap` (for reading) and `/proc/self/clear_refs` (for
//! writing). A protocol 1 client hands over uffd, mem and optionally pagemap. The `mem` file
//! is the daemon's only way into the client's memory; it must still lead to a live address
//! space when it arrives (a file opened before the client `exec`ed leads nowhere). The
//! `maps` file tells which addresses are mapped and readable (attach, faults, sync).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use crate::sys::procfd::{self, Access, ProcFdError};
use crate::sys::uffd::{Uffd, UffdError};

/// The fds of a bind, checked.
#[derive(Debug)]
pub struct Handover {
    /// The client's userfaultfd (non-blocking).
    pub uffd: Uffd,
    /// Its `/proc/self/mem`.
    pub mem: File,
    /// Its `/proc/self/maps` (protocol 2).
    pub maps: Option<File>,
    /// Its `/proc/self/pagemap`, if handed over.
    pub pagemap: Option<File>,
    /// Its `/proc/self/clear_refs`, if handed over.
    pub clear_refs: Option<File>,
}

/// Why a bind's fds were refused.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Fewer fds than the protocol version needs.
    #[error(
        "bind takes the userfaultfd, /proc/self/mem and (protocol 2) /proc/self/maps, then \
         optionally /proc/self/pagemap and /proc/self/clear_refs"
    )]
    Missing,
    /// A `/proc/self/...` fd is not what it must be.
    #[error(transparent)]
    ProcFd(#[from] ProcFdError),
    /// The `mem` file leads to an address space that no longer exists.
    #[error(
        "the /proc/self/mem handed over leads to an address space that is gone (was it \
         opened before an exec?)"
    )]
    Gone,
    /// The first fd is not a usable userfaultfd.
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

impl Handover {
    /// Checks `fds`, handed over by the process `pid` (the peer of the session) speaking
    /// protocol `version`.
    pub fn check(fds: Vec<OwnedFd>, pid: i32, version: u16) -> Result<Handover, HandoverError> {
        let mut it = fds.into_iter();
        let (Some(uffd), Some(mem)) = (it.next(), it.next()) else {
            return Err(HandoverError::Missing);
        };
        // The way into the client's memory first: whatever else is wrong, a bad one is
        // named as such.
        procfd::check(mem.as_fd(), pid, "mem", Access::Read)?;
        let maps = if version >= 2 {
            Some(it.next().ok_or(HandoverError::Missing)?)
        } else {
            None
        };
        let (pagemap, clear_refs) = (it.next(), it.next());
        for (fd, what, access) in [
            (&maps, "maps", Access::Read),
            (&pagemap, "pagemap", Access::Read),
            (&clear_refs, "clear_refs", Access::Write),
        ] {
            if let Some(fd) = fd {
                procfd::check(fd.as_fd(), pid, what, access)?;
            }
        }
        if !procfd::mem_alive(mem.as_fd()) {
            return Err(HandoverError::Gone);
        }
        let uffd = Uffd::from_fd(uffd)?;
        uffd.set_nonblocking()?;
        Ok(Handover {
            uffd,
            mem: File::from(mem),
            maps: maps.map(File::from),
            pagemap: pagemap.map(File::from),
            clear_refs: clear_refs.map(File::from),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn me() -> i32 {
        std::process::id() as i32
    }

    fn uffd() -> OwnedFd {
        let (u, _) = Uffd::create().unwrap();
        u.as_fd().try_clone_to_owned().unwrap()
    }

    fn proc(name: &str) -> OwnedFd {
        File::open(format!("/proc/self/{name}")).unwrap().into()
    }

    #[test]
    fn takes_a_uffd_and_own_proc_files() {
        let h = Handover::check(vec![uffd(), proc("mem"), proc("pagemap")], me(), 1).unwrap();
        assert!(h.pagemap.is_some() && h.clear_refs.is_none() && h.maps.is_none());
        let h = Handover::check(
            vec![uffd(), proc("mem"), proc("maps"), proc("pagemap")],
            me(),
            2,
        )
        .unwrap();
        assert!(h.pagemap.is_some() && h.maps.is_some());
        // Protocol 2 wants maps in third place.
        let e = Handover::check(vec![uffd(), proc("mem"), proc("pagemap")], me(), 2).unwrap_err();
        assert!(matches!(e, HandoverError::ProcFd(_)), "{e}");
        assert!(matches!(
            Handover::check(vec![uffd(), proc("mem")], me(), 2),
            Err(HandoverError::Missing)
        ));
    }

    #[test]
    fn refuses_missing_swapped_and_foreign_fds() {
        assert!(matches!(
            Handover::check(vec![uffd()], me(), 1),
            Err(HandoverError::Missing)
        ));
        // mem and uffd swapped: the second fd is no mem file.
        let e = Handover::check(vec![proc("mem"), uffd()], me(), 1).unwrap_err();
        assert!(matches!(e, HandoverError::ProcFd(_)), "{e}");
        // A mem file where the uffd belongs.
        let e = Handover::check(vec![proc("mem"), proc("mem")], me(), 1).unwrap_err();
        assert!(
            matches!(e, HandoverError::Uffd(UffdError::NotUffd(_))),
            "{e}"
        );
        // pagemap in the place of clear_refs: wrong file and mode.
        let e = Handover::check(
            vec![uffd(), proc("mem"), proc("pagemap"), proc("pagemap")],
            me(),
            1,
        )
        .unwrap_err();
        assert!(matches!(e, HandoverError::ProcFd(_)), "{e}");
        // Another pid's files.
        let e = Handover::check(vec![uffd(), proc("mem")], 1, 1).unwrap_err();
        assert!(
            matches!(e, HandoverError::ProcFd(ProcFdError::NotOwn { .. })),
            "{e}"
        );
    }
}
