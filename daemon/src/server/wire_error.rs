//! Where errors meet the protocol: the one place that gives every error the daemon answers
//! with its wire [`ErrorCode`] (docs/protocol.md, "Error codes").
//!
//! Domain errors (`WatchError`, [`BindError`], …) and the server's own refusals
//! ([`handler`](super::handler)'s and the session loop's) are `thiserror` enums. Each
//! implements [`WireCode`] here; [`WireError`] turns any of them into a code and a message
//! (the error and its causes on one line, [`error_chain`]), and a [`Response::Error`] from
//! that. The handler propagates with `?` and never builds an error answer itself.
//!
//! To add an error code: the variant in `proto` (`ErrorCode`), then the arms below that
//! give it.

use memshadow_proto::{error_chain, ErrorCode, Response, SocketError};

use super::engines::EngineRequestError;
use super::handler::{
    AttachError, Denied, NoCommonVersion, NoSuchClient, ReadError, StateError, TraceError,
};
use super::{MessageError, Refusal, TooManyInFlight};
use crate::address_space::WatchError;
use crate::bind::BindError;
use crate::device::{DeviceError, ShadowError};
use crate::events::EventError;
use crate::monitor::MonitorError;
use crate::sys::maps::MapsError;
use crate::sys::uffd::UffdError;

/// An error as the wire carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    /// Its code.
    pub code: ErrorCode,
    /// The error and its causes, on one line.
    pub message: String,
}

/// The wire code of an error the daemon answers with.
pub trait WireCode: std::error::Error {
    /// The code a client is told.
    fn wire_code(&self) -> ErrorCode;
}

impl<E: WireCode> From<E> for WireError {
    fn from(e: E) -> WireError {
        WireError {
            code: e.wire_code(),
            message: error_chain(&e),
        }
    }
}

impl From<WireError> for Response {
    fn from(e: WireError) -> Response {
        Response::error(e.code, e.message)
    }
}

impl WireCode for StateError {
    fn wire_code(&self) -> ErrorCode {
        match self {
            StateError::ShuttingDown => ErrorCode::ShuttingDown,
            StateError::BeforeHello(_)
            | StateError::SecondHello
            | StateError::NotBound
            | StateError::AlreadyBound => ErrorCode::OutOfOrder,
            StateError::ClientGone => ErrorCode::AccessFailed,
        }
    }
}

impl WireCode for EngineRequestError {
    fn wire_code(&self) -> ErrorCode {
        match self {
            EngineRequestError::NoSuchGrant => ErrorCode::NoSuchGrant,
            EngineRequestError::AlreadyEngine | EngineRequestError::NotEngine => {
                ErrorCode::OutOfOrder
            }
            EngineRequestError::Evicted(_) => ErrorCode::Evicted,
            EngineRequestError::TooManyGrants => ErrorCode::QuotaExceeded,
            EngineRequestError::Random(_) => ErrorCode::Internal,
        }
    }
}

impl WireCode for NoCommonVersion {
    fn wire_code(&self) -> ErrorCode {
        ErrorCode::ProtocolVersion
    }
}

impl WireCode for Denied {
    fn wire_code(&self) -> ErrorCode {
        ErrorCode::PermissionDenied
    }
}

impl WireCode for NoSuchClient {
    fn wire_code(&self) -> ErrorCode {
        ErrorCode::NoSuchClient
    }
}

impl WireCode for ReadError {
    fn wire_code(&self) -> ErrorCode {
        match self {
            ReadError::TooLong(_) => ErrorCode::BadRange,
            ReadError::NotMirrored { .. } => ErrorCode::NotMirrored,
        }
    }
}

impl WireCode for AttachError {
    fn wire_code(&self) -> ErrorCode {
        match self {
            AttachError::MirrorQuota(_) | AttachError::PeriodTooShort { .. } => {
                ErrorCode::QuotaExceeded
            }
            AttachError::OtherSession { .. } => ErrorCode::AlreadyWatched,
        }
    }
}

impl WireCode for TraceError {
    fn wire_code(&self) -> ErrorCode {
        match self {
            TraceError::UnknownEvents(_) => ErrorCode::BadMessage,
            TraceError::TooManyStreams => ErrorCode::QuotaExceeded,
        }
    }
}

/// Every refusal of a bind names a handed-over fd or what it lacks.
impl WireCode for BindError {
    fn wire_code(&self) -> ErrorCode {
        match self {
            BindError::Handover(_)
            | BindError::NoClearRefs
            | BindError::ApiRefused(_)
            | BindError::Api(_) => ErrorCode::BadFd,
        }
    }
}

/// The event reader could not watch a client just bound: the daemon's failure.
impl WireCode for EventError {
    fn wire_code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
}

impl WireCode for WatchError {
    fn wire_code(&self) -> ErrorCode {
        match self {
            WatchError::BadRange { .. } | WatchError::Hole { .. } | WatchError::DiskFile { .. } => {
                ErrorCode::BadRange
            }
            WatchError::Maps(MapsError::Gone) => ErrorCode::AccessFailed,
            WatchError::Maps(_) => ErrorCode::Internal,
            WatchError::TooManyMirrors(_) | WatchError::TooMuchAttached { .. } => {
                ErrorCode::QuotaExceeded
            }
            WatchError::NoSuchMirror(_) => ErrorCode::NoSuchMirror,
            WatchError::NotMirrored(_) => ErrorCode::NotMirrored,
            WatchError::Uffd(e) => uffd_code(e),
            WatchError::Device(e) => device_code(e),
            WatchError::Released => ErrorCode::ShuttingDown,
            WatchError::Busy | WatchError::Dirty(_) => ErrorCode::Internal,
            WatchError::NotTracked(_) => ErrorCode::Unsupported,
            WatchError::Monitor(MonitorError::TooMany | MonitorError::UserQuota) => {
                ErrorCode::QuotaExceeded
            }
            WatchError::Monitor(MonitorError::Create(_)) => ErrorCode::OutOfResources,
            WatchError::NoSuchMonitor { .. } => ErrorCode::NoSuchMirror,
        }
    }
}

fn uffd_code(e: &UffdError) -> ErrorCode {
    match e {
        UffdError::Busy { .. } => ErrorCode::AlreadyWatched,
        UffdError::Invalid { .. } => ErrorCode::BadRange,
        UffdError::NotUffd(_) | UffdError::Fcntl(_) | UffdError::Api(_) | UffdError::Op { .. } => {
            ErrorCode::Internal
        }
    }
}

fn device_code(e: &DeviceError) -> ErrorCode {
    match e {
        DeviceError::QuotaExceeded { .. }
        | DeviceError::UserQuotaExceeded { .. }
        | DeviceError::TooManyMirrors
        | DeviceError::TooManyEngines => ErrorCode::QuotaExceeded,
        DeviceError::Shadow(ShadowError::Full { .. }) => ErrorCode::ShadowFull,
        DeviceError::NoSuchMirror(_) => ErrorCode::NoSuchMirror,
        DeviceError::NotMirrored { .. } | DeviceError::NotMapped { .. } => ErrorCode::NotMirrored,
        DeviceError::Unaligned { .. } | DeviceError::Range(_) => ErrorCode::BadRange,
        DeviceError::Source(_) => ErrorCode::AccessFailed,
        DeviceError::Stopped => ErrorCode::ShuttingDown,
        DeviceError::External(_) => ErrorCode::OutOfResources,
        DeviceError::Shadow(_)
        | DeviceError::Engine(_)
        | DeviceError::Notifier(_)
        | DeviceError::Invalidate(_)
        | DeviceError::FaultStorm { .. } => ErrorCode::Internal,
    }
}

impl WireCode for Refusal {
    fn wire_code(&self) -> ErrorCode {
        match self {
            Refusal::Barred | Refusal::Full(_) | Refusal::UserFull { .. } => {
                ErrorCode::TooManyClients
            }
            Refusal::Peer(_) => ErrorCode::PermissionDenied,
            Refusal::NoFds => ErrorCode::OutOfResources,
        }
    }
}

impl WireCode for TooManyInFlight {
    fn wire_code(&self) -> ErrorCode {
        ErrorCode::QuotaExceeded
    }
}

/// A message that could not be received or decoded is malformed, unless the daemon could
/// not take its fds (it is out of file descriptors: not the client's fault).
impl WireCode for MessageError {
    fn wire_code(&self) -> ErrorCode {
        match self {
            MessageError::Receive(SocketError::FdsExhausted { .. }) => ErrorCode::OutOfResources,
            MessageError::Receive(_) | MessageError::Decode(_) => ErrorCode::BadMessage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(e: impl Into<WireError>) -> (ErrorCode, String) {
        let w = e.into();
        (w.code, w.message)
    }

    #[test]
    fn a_pid_that_is_not_a_bound_client_is_no_such_client() {
        assert_eq!(
            wire(NoSuchClient(42)),
            (
                ErrorCode::NoSuchClient,
                "pid 42 is not a bound client".into()
            )
        );
    }

    #[test]
    fn the_message_is_the_error_and_its_causes_on_one_line() {
        let e = BindError::Api(UffdError::Api(nix::Error::EINVAL));
        assert_eq!(
            wire(e),
            (
                ErrorCode::BadFd,
                "UFFDIO_API failed: EINVAL: Invalid argument".into()
            )
        );
        assert_eq!(
            wire(BindError::ApiRefused(nix::Error::EINVAL)).1,
            "UFFDIO_API failed: EINVAL: Invalid argument (was UFFDIO_API already done on it?)"
        );
    }

    #[test]
    fn a_response_carries_the_code_and_the_message() {
        let r = Response::from(WireError::from(StateError::NotBound));
        assert_eq!(r, Response::error(ErrorCode::OutOfOrder, "bind first"));
    }

    #[test]
    fn watch_errors_keep_their_codes() {
        for (e, code) in [
            (WatchError::NoSuchMirror(3), ErrorCode::NoSuchMirror),
            (WatchError::Released, ErrorCode::ShuttingDown),
            (
                WatchError::Uffd(UffdError::Busy { addr: 0, len: 1 }),
                ErrorCode::AlreadyWatched,
            ),
            (
                WatchError::Device(DeviceError::Stopped),
                ErrorCode::ShuttingDown,
            ),
        ] {
            assert_eq!(WireError::from(e).code, code);
        }
    }
}
