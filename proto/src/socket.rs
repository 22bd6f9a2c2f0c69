//! Sending and receiving whole messages with fds over a `SOCK_SEQPACKET` socket.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

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
    /// The receiver could not install the fds sent with the message: it is out of file
    /// descriptors (at its `RLIMIT_NOFILE`). Not the sender's fault; the fds that were
    /// installed are closed and the rest discarded, the message is consumed whole, and trying
    /// again later may work. Only the daemon receives fds.
    #[error("memshadowd is out of file descriptors: it could not receive the fds attached to the message")]
    FdsExhausted {
        /// The message's request id, if its header is valid (to answer that request).
        request_id: Option<u64>,
    },
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

/// Bytes of one fd in `SCM_RIGHTS` data (a C `int`).
const FD_LEN: usize = size_of::<libc::c_int>();
/// Bytes of a control-message header; the data follows it directly.
const CMSG_HDR_LEN: usize = size_of::<libc::cmsghdr>();
/// `msg_controllen` handed to the kernel: a header and room for exactly `MAX_FDS + 1` fds,
/// as the kernel counts room (`(msg_controllen - sizeof(struct cmsghdr)) / sizeof(int)`,
/// `scm_max_fds` in `net/core/scm.c`). Not `CMSG_SPACE`: its alignment padding would be room
/// for one more fd. One fd over the limit is enough to tell that the sender attached too
/// many; the kernel discards any further ones without installing them.
const CONTROL_LEN: usize = CMSG_HDR_LEN + (MAX_FDS + 1) * FD_LEN;
/// `SCM_PIDFD` (Linux 6.5+, `include/linux/socket.h`): a control message that carries an fd
/// (a pidfd of the sender) when the receiving socket has `SO_PASSPIDFD` set.
const SCM_PIDFD: libc::c_int = 4;

// The kernel layouts `recv` relies on.
const _: () = assert!(FD_LEN == size_of::<RawFd>() && FD_LEN == 4);
// SAFETY: `CMSG_LEN` is arithmetic on its argument; it touches no memory.
const _: () = assert!(unsafe { libc::CMSG_LEN(0) } as usize == CMSG_HDR_LEN);
const _: () = assert!(align_of::<libc::cmsghdr>() <= align_of::<ControlBuf>());
const _: () = assert!((CONTROL_LEN - CMSG_HDR_LEN) / FD_LEN == MAX_FDS + 1);

/// The control-message buffer: [`CONTROL_LEN`] bytes, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuf([u8; CONTROL_LEN]);

/// Receives one message into `buf` (grown to hold the largest legal message plus one byte),
/// checking its size, fds and header. Received fds are owned and close-on-exec
/// (`MSG_CMSG_CLOEXEC`); on any error they are closed: every fd the kernel installed is
/// owned before anything is checked, however the control data was truncated.
///
/// The kernel installs at most `MAX_FDS + 1` of the fds sent (the buffer has room for no
/// more) and discards the rest. Fewer installed than that while it reports truncation
/// (`MSG_CTRUNC`) means it could not install one (`scm_detach_fds` stops at the first
/// failure: this process is at its `RLIMIT_NOFILE`): [`SocketError::FdsExhausted`], not the
/// sender's fault, unlike [`SocketError::TooManyFds`].
///
/// `sock` must not have `SO_PASSCRED`, `SO_PASSSEC` or `SO_PASSPIDFD` set (memshadow sets
/// none): their control messages would take the fds' room. A pidfd that arrives anyway is
/// closed.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut Vec<u8>) -> Result<Frame, SocketError> {
    buf.resize(HEADER_LEN + MAX_PAYLOAD + 1, 0);
    let mut control = ControlBuf([0; CONTROL_LEN]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let (bytes, msg) = loop {
        // SAFETY: `msghdr` is plain data (pointers, integers and, on some libcs, padding),
        // for which all zeroes is a valid value: no name, no iovecs, no control buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = CONTROL_LEN as _;
        // SAFETY: `msg` points at one iovec covering all of `buf` and at `control`, of which
        // it offers `CONTROL_LEN` bytes; both live, unaliased, across the call. The kernel
        // writes no more than those lengths.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match usize::try_from(n) {
            Ok(n) => break (n, msg),
            Err(_) => match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => return Err(SocketError::WouldBlock),
                Errno::ECONNRESET => return Err(SocketError::Closed),
                e => return Err(SocketError::Io(e)),
            },
        }
    };
    let fds = take_fds(&msg, &control);
    let truncated_data = msg.msg_flags & libc::MSG_TRUNC != 0;
    let truncated_control = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if bytes == 0 && fds.is_empty() && !truncated_control {
        return Err(SocketError::Closed);
    }
    if truncated_data || bytes > HEADER_LEN + MAX_PAYLOAD {
        return Err(SocketError::Oversized);
    }
    if fds.len() > MAX_FDS {
        return Err(SocketError::TooManyFds);
    }
    if truncated_control {
        return Err(SocketError::FdsExhausted {
            request_id: Header::decode(&buf[..bytes]).ok().map(|h| h.request_id),
        });
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

/// Takes ownership of every fd the kernel installed for the message `msg` received into
/// `control`; returns those of `SCM_RIGHTS` in order (others, such as a pidfd, are closed).
fn take_fds(msg: &libc::msghdr, control: &ControlBuf) -> Vec<OwnedFd> {
    let base = control.0.as_ptr() as usize;
    // What the kernel wrote (it sets `msg_controllen` to that), never past what it was offered.
    // (`size_t` with glibc, `socklen_t` with musl.)
    #[allow(clippy::unnecessary_cast)]
    let used = (msg.msg_controllen as usize).min(CONTROL_LEN);
    let mut fds = Vec::with_capacity(MAX_FDS + 1);
    // SAFETY: `msg` is a valid `msghdr` whose `msg_control`/`msg_controllen` describe (part
    // of) `control`; `CMSG_FIRSTHDR` only reads those two fields.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `CMSG_FIRSTHDR`/`CMSG_NXTHDR` return either null or a pointer into
        // `control` (aligned for `cmsghdr`, see `ControlBuf`) with a whole header before the
        // end of `msg_controllen`; the buffer is initialised.
        let hdr = unsafe { cmsg.read() };
        // SAFETY: `cmsg` points at a header within `control`; `CMSG_DATA` is arithmetic on it.
        let data = unsafe { libc::CMSG_DATA(cmsg) } as usize - base;
        let start = cmsg as usize - base;
        // The kernel writes `cmsg_len` = `CMSG_LEN(fds)`; never trust it past the buffer.
        let end = start.saturating_add(hdr.cmsg_len as usize).min(used);
        let carries_fds = hdr.cmsg_level == libc::SOL_SOCKET
            && (hdr.cmsg_type == libc::SCM_RIGHTS || hdr.cmsg_type == SCM_PIDFD);
        if carries_fds && data <= end {
            let owned = control.0[data..end]
                .chunks_exact(FD_LEN)
                .filter_map(|b| b.try_into().ok().map(RawFd::from_ne_bytes))
                .filter(|&fd| fd >= 0)
                // SAFETY: the kernel just installed `fd` in our table for this message and
                // wrote its number here; nothing else knows it, so this is its only owner.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
            if hdr.cmsg_type == libc::SCM_RIGHTS {
                fds.extend(owned);
            } else {
                owned.for_each(drop);
            }
        }
        // SAFETY: `msg` describes `control` and `cmsg` is a header within it (as above);
        // `CMSG_NXTHDR` returns null rather than a header that would not fit.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::collections::BTreeSet;
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

    /// Set in a re-executed test binary to the name of the one test it runs for real.
    const CHILD_ENV: &str = "MEMSHADOW_PROTO_SOCKET_TEST_CHILD";

    /// Runs `body` as the test `name` in a process of its own: this test binary re-executed
    /// to run only that test, one at a time. Other tests open and close fds in parallel
    /// threads of this process, so only a process of its own can say that the fd table holds
    /// exactly what it held before.
    fn in_own_process(name: &str, body: fn()) {
        if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
            body();
            return;
        }
        let module = module_path!().split_once("::").expect("crate::module").1;
        let out = std::process::Command::new(std::env::current_exe().expect("current_exe"))
            .args([&format!("{module}::{name}"), "--exact", "--test-threads=1"])
            .env(CHILD_ENV, name)
            .output()
            .expect("re-run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{name} in its own process: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The fds open in this process (including, each time, the one that reads the list: the
    /// same number as long as the table is the same).
    fn open_fds() -> BTreeSet<RawFd> {
        std::fs::read_dir("/proc/self/fd")
            .expect("read /proc/self/fd")
            .map(|e| {
                let name = e.expect("entry").file_name();
                name.to_str().expect("utf-8").parse().expect("fd number")
            })
            .collect()
    }

    /// Sends a raw message with any number of fds (`send` refuses more than `MAX_FDS`).
    fn send_raw(sock: &OwnedFd, request_id: u64, fds: &[RawFd]) {
        let h = Header {
            version: ENCODING_VERSION,
            msg_type: 2,
            flags: 0,
            fd_count: fds.len() as u16,
            payload_len: 0,
            request_id,
        }
        .encode();
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&h)],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
    }

    fn nofile() -> libc::rlimit {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `r` is a valid, writable `rlimit`.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
        assert_eq!(rc, 0, "getrlimit: {}", Errno::last());
        r
    }

    fn set_nofile(r: libc::rlimit) {
        // SAFETY: `r` is a valid `rlimit`, only read.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
        assert_eq!(rc, 0, "setrlimit: {}", Errno::last());
    }

    /// The session carries a legal message with fds afterwards.
    fn session_still_works(a: &OwnedFd, b: &OwnedFd, buf: &mut Vec<u8>) {
        let null = std::fs::File::open("/dev/null").expect("open");
        send(a.as_fd(), 8, 0, 3, b"ok", &[null.as_fd(); MAX_FDS]).expect("send");
        let frame = recv(b.as_fd(), buf).expect("recv after the refusal");
        assert_eq!(
            (frame.header.request_id, &frame.payload[..]),
            (3, &b"ok"[..])
        );
        assert_eq!(frame.fds.len(), MAX_FDS);
    }

    /// (a) However many fds a message carries, `recv` leaves none of them open in the
    /// receiver: the surplus is never installed, and what was installed is closed with the
    /// refusal (nix's parser gave up on the truncated control data and leaked 6 a message).
    #[test]
    fn surplus_fds_are_refused_and_none_stays_open() {
        in_own_process("surplus_fds_are_refused_and_none_stays_open", || {
            let (a, b) = pair();
            let null = std::fs::File::open("/dev/null").expect("open");
            let mut buf = Vec::new();
            // One over, the finding's 16, and the kernel's most (SCM_MAX_FD).
            for count in [MAX_FDS + 1, MAX_FDS + 2, 16, 253] {
                let before = open_fds();
                send_raw(&a, 1, &vec![null.as_raw_fd(); count]);
                let r = recv(b.as_fd(), &mut buf);
                assert!(
                    matches!(r, Err(SocketError::TooManyFds)),
                    "{count} fds: {r:?}"
                );
                assert_eq!(open_fds(), before, "fds left open after {count} were sent");
                session_still_works(&a, &b, &mut buf);
                assert_eq!(open_fds(), before);
            }
        });
    }

    /// (b) A receiver at its fd limit reports that, not the sender's fds, and closes the fds
    /// it did install: the kernel installs fds until one fails (EMFILE) and flags the control
    /// data as truncated.
    #[test]
    fn fds_the_receiver_cannot_install_are_exhaustion_and_none_stays_open() {
        in_own_process(
            "fds_the_receiver_cannot_install_are_exhaustion_and_none_stays_open",
            || {
                let (a, b) = pair();
                let null = std::fs::File::open("/dev/null").expect("open");
                let mut buf = Vec::new();
                let limits = nofile();
                // None of the 3 legal fds fits, or the first 2 do and the third does not.
                for installable in [0usize, 2] {
                    let before = open_fds();
                    // The installable+1 lowest free numbers: below the last of them, exactly
                    // `installable` are free, where the kernel installs the first fds.
                    let free: Vec<OwnedFd> = (0..=installable)
                        .map(|_| nix::unistd::dup(&null).expect("dup"))
                        .collect();
                    let cap = free.last().expect("one").as_raw_fd();
                    drop(free);
                    send(a.as_fd(), 2, 0, 42, b"x", &[null.as_fd(); 3]).expect("send");
                    set_nofile(libc::rlimit {
                        rlim_cur: cap as libc::rlim_t,
                        rlim_max: limits.rlim_max,
                    });
                    let r = recv(b.as_fd(), &mut buf);
                    set_nofile(limits);
                    assert!(
                        matches!(
                            r,
                            Err(SocketError::FdsExhausted {
                                request_id: Some(42)
                            })
                        ),
                        "{installable} installable: {r:?}"
                    );
                    assert_eq!(open_fds(), before, "{installable} installable");
                    session_still_works(&a, &b, &mut buf);
                    assert_eq!(open_fds(), before);
                }
                let e = SocketError::FdsExhausted { request_id: None };
                assert!(e.to_string().contains("out of file descriptors"), "{e}");
            },
        );
    }
}
