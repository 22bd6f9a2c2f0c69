//! The socket calls of the server that hand back a new fd: `accept4` and `SO_PEERPIDFD`,
//! each returning an [`OwnedFd`] so the fd cannot leak or be closed twice.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::SockFlag;

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of the peer as of `connect`, free of pid-reuse races.
const SO_PEERPIDFD: libc::c_int = 77;

/// Accepts a connection on the listening socket `listener` (a raw fd, as `accept4` takes
/// it: the caller keeps the listener borrowed elsewhere), with `flags` on the new fd.
pub fn accept(listener: RawFd, flags: SockFlag) -> nix::Result<OwnedFd> {
    let fd = nix::sys::socket::accept4(listener, flags)?;
    // SAFETY: accept4 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pidfd the kernel took of `sock`'s peer when it connected (`SO_PEERPIDFD`).
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
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
    if r != 0 {
        return Err(nix::Error::last());
    }
    if fd < 0 {
        return Err(nix::Error::EBADF);
    }
    // SAFETY: the kernel just created `fd` for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
