//! A fake daemon on a socketpair, for the library's and the C ABI's unit tests: it speaks
//! the real protocol (`memshadow-proto`) and answers what a test tells it to, so the
//! client side can be checked without a `memshadowd`.

#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;

use memshadow_proto::{self as proto, AccessPath, ErrorCode, Limits, Request, Response, VERSION};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// What the fake daemon calls `daemon_version`.
pub const FAKE_VERSION: &str = "fake-1.2";

/// Two connected `SOCK_SEQPACKET` sockets: a client's end and a daemon's.
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

/// Starts the fake daemon; returns the client's end of the socket and the daemon's thread,
/// which ends when the client hangs up (and panics, failing the test, if the client sends
/// something undecodable). Long lists are answered in pieces, as the daemon does. The fds a request brought are closed before it is answered.
///
/// `Hello` is answered with `limits`. Every other request goes to `answer` with the fds
/// that came with it; `None` gives the default answer: `Bound` (memfd access, no uffd
/// features) to a `Bind`, an `Internal` error to anything else.
pub fn spawn(
    limits: Limits,
    mut answer: impl FnMut(&Request, &[OwnedFd]) -> Option<Response> + Send + 'static,
) -> (OwnedFd, JoinHandle<()>) {
    spawn_with_fds(limits, move |req, fds| {
        answer(req, fds).map(|r| (r, Vec::new()))
    })
}

/// [`spawn`], whose `answer` may also give fds to send with the answer (with its last
/// piece), as `EngineAttached` brings them.
pub fn spawn_with_fds(
    limits: Limits,
    mut answer: impl FnMut(&Request, &[OwnedFd]) -> Option<(Response, Vec<OwnedFd>)> + Send + 'static,
) -> (OwnedFd, JoinHandle<()>) {
    let (client, daemon) = seqpacket_pair();
    let thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        while let Ok(f) = proto::recv(daemon.as_fd(), &mut buf) {
            let req = Request::decode(f.header.msg_type, &f.payload, f.fds.len()).unwrap();
            let fds = f.fds;
            let (resp, answer_fds) = match req {
                Request::Hello { .. } => (
                    Response::HelloAck {
                        version: VERSION,
                        daemon_version: FAKE_VERSION.into(),
                        page_size: 4096,
                        limits,
                    },
                    Vec::new(),
                ),
                ref r => answer(r, &fds).unwrap_or_else(|| {
                    let resp = match r {
                        Request::Bind { .. } => Response::Bound {
                            access: AccessPath::MemFd,
                            uffd_features: 0,
                        },
                        _ => Response::error(ErrorCode::Internal, "unexpected request"),
                    };
                    (resp, Vec::new())
                }),
            };
            // Like the daemon, close what was passed before answering: the client may count
            // its uffds as soon as it has the answer.
            drop(fds);
            // Like the daemon, a long list goes out in pieces, all but the last FLAG_MORE.
            let pieces = resp.into_pieces();
            let last = pieces.len() - 1;
            for (i, piece) in pieces.into_iter().enumerate() {
                let flags = if i < last { proto::FLAG_MORE } else { 0 };
                let with: Vec<_> = if i == last {
                    answer_fds.iter().map(AsFd::as_fd).collect()
                } else {
                    Vec::new()
                };
                let sent = proto::send(
                    daemon.as_fd(),
                    piece.msg_type(),
                    flags,
                    f.header.request_id,
                    &piece.encode_payload(),
                    &with,
                );
                if sent.is_err() {
                    return;
                }
            }
        }
    });
    (client, thread)
}
