//! Sending and receiving whole messages with fds over a `SOCK_SEQPACKET` socket.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::header::{Header, HeaderError, ENCODING_VERSION, HEADER_LEN, MAX_FDS, MAX_PAYLOAD};

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// Non-blocking socket with nothing to read (or no room to write).
    #[error("operation would block")]
    WouldBlock,
    /// The message was longer than the protocol allows (it was truncated on receipt).
    #[error("message longer than {} bytes", HEADER_LEN + MAX_PAYLOAD)]
    Oversized,
    /// More fds than [`MAX_FDS`] were attached (the surplus was discarded by the kernel).
    #[error("more than {MAX_FDS} fds attached")]
    TooManyFds,
    /// A bad header.
    #[error("bad header")]
    Header(#[from] HeaderError),
    /// The header's fd count disagrees with the fds that arrived.
    #[error("header announces {said} fds, {got} arrived")]
    FdMismatch {
        /// Announced.
        said: u16,
        /// Received.
        got: usize,
    },
    /// A payload too large to send.
    #[error("payload of {0} bytes is too large to send")]
    TooLarge(usize),
    /// The socket call failed.
    #[error("socket error")]
    Io(#[source] Errno),
}

/// A received message: its checked header, payload and the fds that came with it
/// (owned, close-on-exec; dropped fds are closed).
#[derive(Debug)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The payload.
    pub payload: Vec<u8>,
    /// The fds, in the order they were sent.
    pub fds: Vec<OwnedFd>,
}

/// Sends one message of `msg_type` with `payload` and `fds`; `MSG_NOSIGNAL`, so a closed
/// peer is an error ([`SocketError::Closed`]), not a `SIGPIPE`.
pub fn send(
    sock: BorrowedFd<'_>,
    msg_type: u16,
    flags: u16,
    request_id: u64,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), SocketError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(SocketError::TooLarge(payload.len()));
    }
    if fds.len() > MAX_FDS {
        return Err(SocketError::TooManyFds);
    }
    let header = Header {
        version: ENCODING_VERSION,
        msg_type,
        flags,
        fd_count: fds.len() as u16,
        payload_len: payload.len() as u32,
        request_id,
    }
    .encode();
    let iov = [IoSlice::new(&header), IoSlice::new(payload)];
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                return Err(SocketError::Closed)
            }
            Err(Errno::EAGAIN) => return Err(SocketError::WouldBlock),
            Err(e) => return Err(SocketError::Io(e)),
        }
    }
}

/// Receives one message into `buf` (grown to hold the largest legal message plus one byte),
/// checking its size, fds and header. Received fds are owned and close-on-exec
/// (`MSG_CMSG_CLOEXEC`); on any error they are closed.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut Vec<u8>) -> Result<Frame, SocketError> {
    buf.resize(HEADER_LEN + MAX_PAYLOAD + 1, 0);
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS + 1]);
    let (bytes, flags, fds) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for fd in raw {
                                // SAFETY: the kernel just installed `fd` in our table for this
                                // message; nothing else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                }
                break (msg.bytes, msg.flags, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(SocketError::WouldBlock),
            Err(Errno::ECONNRESET) => return Err(SocketError::Closed),
            Err(e) => return Err(SocketError::Io(e)),
        }
    };
    if bytes == 0 && fds.is_empty() {
        return Err(SocketError::Closed);
    }
    if flags.contains(MsgFlags::MSG_TRUNC) || bytes > HEADER_LEN + MAX_PAYLOAD {
        return Err(SocketError::Oversized);
    }
    if flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > MAX_FDS {
        return Err(SocketError::TooManyFds);
    }
    let header = Header::decode(&buf[..bytes])?;
    if usize::from(header.fd_count) != fds.len() {
        return Err(SocketError::FdMismatch {
            said: header.fd_count,
            got: fds.len(),
        });
    }
    Ok(Frame {
        header,
        payload: buf[HEADER_LEN..bytes].to_vec(),
        fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn a_message_and_its_fds_arrive_whole() {
        let (a, b) = pair();
        let f = std::fs::File::open("/dev/null").expect("open");
        send(a.as_fd(), 2, 0, 77, b"abc", &[f.as_fd(), f.as_fd()]).expect("send");
        let mut buf = Vec::new();
        let frame = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(frame.header.request_id, 77);
        assert_eq!(frame.header.msg_type, 2);
        assert_eq!(frame.payload, b"abc");
        assert_eq!(frame.fds.len(), 2);
        drop(a);
        assert!(matches!(
            recv(b.as_fd(), &mut buf),
            Err(SocketError::Closed)
        ));
    }

    #[test]
    fn oversized_and_lying_messages_are_refused() {
        let (a, b) = pair();
        let mut buf = Vec::new();
        // A raw record larger than any legal message.
        let big = vec![0u8; HEADER_LEN + MAX_PAYLOAD + 100];
        nix::sys::socket::send(a.as_raw_fd(), &big, MsgFlags::empty()).expect("send big");
        assert!(matches!(
            recv(b.as_fd(), &mut buf),
            Err(SocketError::Oversized)
        ));
        // Garbage.
        nix::sys::socket::send(a.as_raw_fd(), b"hello", MsgFlags::empty()).expect("send");
        assert!(matches!(
            recv(b.as_fd(), &mut buf),
            Err(SocketError::Header(HeaderError::Short(5)))
        ));
        // A header that announces an fd that is not there.
        let h = Header {
            version: ENCODING_VERSION,
            msg_type: 2,
            flags: 0,
            fd_count: 1,
            payload_len: 0,
            request_id: 1,
        };
        nix::sys::socket::send(a.as_raw_fd(), &h.encode(), MsgFlags::empty()).expect("send");
        assert!(matches!(
            recv(b.as_fd(), &mut buf),
            Err(SocketError::FdMismatch { said: 1, got: 0 })
        ));
        // Too many fds: the kernel truncates the control data, we refuse the message.
        let f = std::fs::File::open("/dev/null").expect("open");
        let raw = [f.as_raw_fd(); MAX_FDS + 3];
        let hb = h.encode();
        let iov = [IoSlice::new(&hb)];
        sendmsg::<()>(
            a.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert!(matches!(
            recv(b.as_fd(), &mut buf),
            Err(SocketError::TooManyFds)
        ));
        // The session still works afterwards.
        send(a.as_fd(), 8, 0, 2, &[], &[]).expect("send");
        assert_eq!(recv(b.as_fd(), &mut buf).expect("recv").header.msg_type, 8);
        assert!(matches!(
            send(a.as_fd(), 8, 0, 2, &vec![0; MAX_PAYLOAD + 1], &[]),
            Err(SocketError::TooLarge(_))
        ));
    }
}
