//! Socket activation: the listening socket a service manager (or whoever keeps it across
//! restarts) hands over in `LISTEN_FDS`/`LISTEN_PID` (sd_listen_fds(3)).
//!
//! The environment protocol is read by the `sd-notify` crate (it checks `LISTEN_PID`
//! against this process and sets `FD_CLOEXEC`); the check that the descriptor is a listening
//! `AF_UNIX` `SOCK_SEQPACKET` socket is [`Listener::adopt`]'s (`listenfd` was not used: it
//! accepts a missing `LISTEN_PID` and does not check that the socket listens).

use std::os::fd::{FromRawFd, OwnedFd};

use crate::server::{ListenError, Listener};

/// Errors of socket activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` or `LISTEN_PID` is malformed.
    #[error("bad socket-activation environment (LISTEN_FDS/LISTEN_PID)")]
    Env(#[source] std::io::Error),
    /// More than one socket was passed.
    #[error("{0} sockets were passed (LISTEN_FDS={0}); memshadowd serves exactly one")]
    TooMany(usize),
    /// The socket is not one memshadowd can serve on.
    #[error(transparent)]
    Socket(#[from] ListenError),
}

/// The listening socket passed to this process, if any: `Ok(None)` without `LISTEN_FDS`
/// (or when `LISTEN_PID` names another process). Call once, before any thread starts.
pub fn inherited_listener() -> Result<Option<Listener>, ActivationError> {
    let fds: Vec<i32> = sd_notify::listen_fds()
        .map_err(ActivationError::Env)?
        .collect();
    match fds.as_slice() {
        [] => Ok(None),
        [fd] => {
            // SAFETY: the service manager passed this descriptor to this process
            // (LISTEN_PID matched); nothing else in the process owns it, and this runs once.
            let fd = unsafe { OwnedFd::from_raw_fd(*fd) };
            Ok(Some(Listener::adopt(fd)?))
        }
        more => Err(ActivationError::TooMany(more.len())),
    }
}
