//! memshadow's wire protocol: framing, versioning, limits, typed messages and fd passing.
//!
//! Every message is one `SOCK_SEQPACKET` record: a fixed 24-byte little-endian [`Header`]
//! followed by at most [`MAX_PAYLOAD`] bytes of payload, with at most [`MAX_FDS`] file
//! descriptors attached as `SCM_RIGHTS`. Anything larger is refused, and decoding untrusted
//! bytes never panics and never allocates more than the payload it was given (docs/design.md
//! §5 G7). There is no daemon logic here.

pub mod codec;
pub mod engine_abi;
pub mod header;
pub mod message;
pub mod monitor_abi;
pub mod path;
pub mod socket;
pub mod wire;

pub use header::{
    Header, HeaderError, ENCODING_VERSION, FLAG_MORE, HEADER_LEN, MAGIC, MAX_FDS, MAX_PAYLOAD,
    MIN_VERSION, VERSION,
};
pub use message::{
    AccessPath, AckOutcome, AckReport, AttachPolicy, BindFlags, ClientInfo, DecodeError,
    DirtyBackend, EngineInfo, ErrorCode, EventKind, InvalidateFlags, InvalidationReport, Limits,
    MirrorInfo, Request, Response, SyncReport, ATTACH_PERIOD_SHIFT, ATTACH_POLICY_MASK, MAX_LIST,
    MAX_MESSAGE, MAX_NAME, MAX_PERIOD_MS, MAX_READ, MAX_VALUE, TRACE_ENGINE_ACKS,
};
pub use path::{socket_path, SOCKET_ENV};
pub use socket::{recv, send, Frame, SocketError};

/// An error and its causes on one line (`outer: cause: root cause`): the form of every
/// error text the daemon puts on the wire or in its log, and of what the client library
/// and `memshadowctl` show.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("attach failed")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("register")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn error_chain_joins_every_cause_in_order() {
        let e = Outer(Middle(std::io::Error::other("device busy")));
        assert_eq!(error_chain(&e), "attach failed: register: device busy");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }
}
