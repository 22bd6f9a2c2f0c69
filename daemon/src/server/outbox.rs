//! A session's outgoing messages: sent at once when the socket has room, else queued (up to
//! a bound) and sent by the session loop when the socket becomes writable. No thread ever
//! waits for a client to read: a client whose queue is full has stopped reading its
//! answers, and its session is closed.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;

use memshadow_proto::{self as proto, SocketError};

/// One message to send.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// Message type.
    pub msg_type: u16,
    /// Header flags.
    pub flags: u16,
    /// The request it answers (0: unsolicited).
    pub request_id: u64,
    /// Encoded payload.
    pub payload: Vec<u8>,
    /// The fds it carries (only `EngineAttached` has any), closed once it is sent.
    pub fds: Vec<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// What became of a message handed to [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Sent.
    Sent,
    /// Queued behind others, or because the socket was full; `arm` is true when the queue
    /// was empty before, so the caller must start watching the socket for room.
    Queued {
        /// Start watching for `EPOLLOUT`.
        arm: bool,
    },
    /// The queue is at its bound: the client does not read its answers.
    Full,
    /// The peer is gone, or the socket failed.
    Closed,
}

/// What a [`Outbox::flush`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was sent: stop watching for room.
    Empty,
    /// Some is left; keep watching.
    Pending,
    /// The peer is gone, or the socket failed.
    Closed,
}

/// The queue of one session.
#[derive(Debug)]
pub struct Outbox {
    frames: VecDeque<OutFrame>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

fn send(sock: BorrowedFd<'_>, f: &OutFrame) -> Result<(), SocketError> {
    use std::os::fd::AsFd;
    let fds: Vec<BorrowedFd<'_>> = f.fds.iter().map(|fd| fd.as_fd()).collect();
    proto::send(sock, f.msg_type, f.flags, f.request_id, &f.payload, &fds)
}

impl Outbox {
    /// An empty queue of at most `max_frames` messages and `max_bytes` payload bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> Outbox {
        Outbox {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames: max_frames.max(1),
            max_bytes,
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Sends `f` now if nothing waits and the socket has room, else queues it (in order).
    pub fn push(&mut self, sock: BorrowedFd<'_>, f: OutFrame) -> Pushed {
        if self.frames.is_empty() {
            match send(sock, &f) {
                Ok(()) => return Pushed::Sent,
                Err(SocketError::WouldBlock) => {}
                Err(_) => return Pushed::Closed,
            }
        }
        if self.frames.len() >= self.max_frames || self.bytes + f.payload.len() > self.max_bytes {
            return Pushed::Full;
        }
        let arm = self.frames.is_empty();
        self.bytes += f.payload.len();
        self.frames.push_back(f);
        Pushed::Queued { arm }
    }

    /// Sends `f` only if nothing waits and the socket has room right now; false if it was
    /// dropped (for lossy streams, whose subscribers learn how many they lost).
    pub fn offer(&mut self, sock: BorrowedFd<'_>, f: &OutFrame) -> Result<bool, SocketError> {
        if !self.frames.is_empty() {
            return Ok(false);
        }
        match send(sock, f) {
            Ok(()) => Ok(true),
            Err(SocketError::WouldBlock) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sends what waits, in order, until the socket is full or the queue empty.
    pub fn flush(&mut self, sock: BorrowedFd<'_>) -> Flushed {
        while let Some(f) = self.frames.front() {
            match send(sock, f) {
                Ok(()) => {
                    self.bytes -= f.payload.len();
                    self.frames.pop_front();
                }
                Err(SocketError::WouldBlock) => return Flushed::Pending,
                Err(_) => return Flushed::Closed,
            }
        }
        Flushed::Empty
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::{AsFd, OwnedFd};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap()
    }

    fn frame(id: u64, len: usize) -> OutFrame {
        OutFrame {
            msg_type: 0x8000,
            flags: 0,
            request_id: id,
            payload: vec![7; len],
            fds: Vec::new(),
        }
    }

    /// A reader that stops reading backs up the queue to its bound, never blocking the
    /// sender; once it reads again, everything arrives in order.
    #[test]
    fn a_client_that_stops_reading_fills_the_queue_and_nothing_blocks() {
        let (daemon, client) = pair();
        let mut out = Outbox::new(8, 1 << 20);
        let mut id = 0;
        // Fill the socket itself first.
        loop {
            id += 1;
            match out.push(daemon.as_fd(), frame(id, 4096)) {
                Pushed::Sent => continue,
                Pushed::Queued { arm } => {
                    assert!(arm, "the first queued message arms the watch");
                    break;
                }
                p => panic!("{p:?}"),
            }
        }
        let in_socket = id - 1;
        for _ in 1..8 {
            id += 1;
            assert_eq!(
                out.push(daemon.as_fd(), frame(id, 4096)),
                Pushed::Queued { arm: false }
            );
        }
        assert_eq!(out.push(daemon.as_fd(), frame(id + 1, 4096)), Pushed::Full);
        assert!(!out.offer(daemon.as_fd(), &frame(0, 1)).unwrap());
        // The client reads everything; the session loop flushes as room appears.
        let mut buf = Vec::new();
        let mut next = 1;
        while next <= id {
            match proto::recv(client.as_fd(), &mut buf) {
                Ok(f) => {
                    assert_eq!(f.header.request_id, next, "in order");
                    next += 1;
                }
                Err(SocketError::WouldBlock) => {
                    assert_ne!(out.flush(daemon.as_fd()), Flushed::Closed);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(next > in_socket);
        assert_eq!(out.flush(daemon.as_fd()), Flushed::Empty);
        assert!(out.is_empty());
        drop(client);
        assert_eq!(out.push(daemon.as_fd(), frame(99, 1)), Pushed::Closed);
    }

    #[test]
    fn the_byte_bound_holds_too() {
        let (daemon, _client) = pair();
        let mut out = Outbox::new(1000, 10_000);
        while matches!(out.push(daemon.as_fd(), frame(1, 3000)), Pushed::Sent) {}
        // One queued (3000 bytes); two more fit under 10 000, the fourth does not.
        assert_eq!(out.len(), 1);
        assert!(matches!(
            out.push(daemon.as_fd(), frame(1, 3000)),
            Pushed::Queued { .. }
        ));
        assert!(matches!(
            out.push(daemon.as_fd(), frame(1, 3000)),
            Pushed::Queued { .. }
        ));
        assert_eq!(out.push(daemon.as_fd(), frame(1, 3000)), Pushed::Full);
    }
}
