//! A flood of messages carrying too many fds: the daemon keeps none of them, and clients can
//! still connect and bind afterwards (the "fd leak to permanent lock-out" finding: each such
//! message used to leave 6 fds open in the daemon until it reached its `RLIMIT_NOFILE`).
//!
//! The daemon starts with a soft fd limit of 1024 (at most its hard limit), to see it raise
//! its own.

#![allow(clippy::unwrap_used)]

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use memshadow_proto::{self as proto, ErrorCode, Header, Request, Response, MAX_FDS, VERSION};
use memshadow_tests::{nofile_of, seqpacket_connect, Daemon, TestClient, HANG_GUARD};
use nix::sys::socket::{sendmsg, setsockopt, sockopt, ControlMessage, MsgFlags};
use nix::sys::time::TimeVal;

/// Connections in the flood; each sends one message and goes.
const CONNECTIONS: usize = 320;
/// Connections open at once.
const BATCH: usize = 32;
/// Fds attached to each message (the finding's attack).
const FDS_PER_MESSAGE: usize = 16;
/// Room the daemon gets above its baseline: plenty for `BATCH` sessions, far less than the
/// 6 fds per message the old receive path leaked (`CONNECTIONS` × 6).
const HEADROOM: u64 = 512;
/// The daemon's fd count may stay this far above its baseline (a control connection of the
/// harness still closing, a worker's transient fd).
const MARGIN: usize = 8;

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Sets `RLIMIT_NOFILE` of process `pid` to `soft`/`hard`.
fn set_nofile(pid: i32, soft: u64, hard: u64) {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `r` is a valid `rlimit`, only read; no old limit is asked for (null).
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &r, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// A Hello from a client that attached `FDS_PER_MESSAGE` fds to it.
fn send_hello_with_fds(s: &OwnedFd, request_id: u64, fd: &impl AsRawFd) {
    let hello = Request::Hello {
        min_version: 1,
        max_version: VERSION,
        name: "flood".into(),
    };
    let payload = hello.encode_payload();
    let header = Header {
        version: VERSION,
        msg_type: hello.msg_type(),
        flags: 0,
        fd_count: FDS_PER_MESSAGE as u16,
        payload_len: payload.len() as u32,
        request_id,
    }
    .encode();
    let fds = [fd.as_raw_fd(); FDS_PER_MESSAGE];
    sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(&header), IoSlice::new(&payload)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .unwrap();
}

#[test]
fn a_flood_of_surplus_fds_leaks_nothing_and_locks_nobody_out() {
    // The daemon raises its soft fd limit to the hard one at start-up.
    let (_, hard) = nofile_of("self");
    // The flood's hundreds of "bad message" warnings are expected: unless asked for a log
    // level, the daemon logs only errors.
    let quiet = std::env::var_os("MEMSHADOW_LOG").is_none();
    let d = Daemon::builder()
        .args(if quiet {
            &["--log-level", "error"][..]
        } else {
            &[]
        })
        .nofile_soft(1024)
        .start();
    assert_eq!(
        nofile_of(&d.pid().to_string()),
        (hard, hard),
        "the daemon raised its soft limit"
    );

    // Cap it near its baseline, so a leak locks clients out within the test, as it did in
    // production at LimitNOFILE.
    let baseline = open_fds(d.pid());
    let cap = baseline as u64 + HEADROOM;
    set_nofile(d.pid(), cap, cap);

    let null = std::fs::File::open("/dev/null").unwrap();
    let mut buf = Vec::new();
    let mut sent = 0;
    while sent < CONNECTIONS {
        let batch: Vec<OwnedFd> = (0..BATCH)
            .map(|_| {
                let s = seqpacket_connect(d.socket()).unwrap();
                // A daemon that stopped accepting fails the test rather than hanging it.
                setsockopt(&s, sockopt::ReceiveTimeout, &TimeVal::new(20, 0)).unwrap();
                s
            })
            .collect();
        for (i, s) in batch.iter().enumerate() {
            send_hello_with_fds(s, (sent + i + 1) as u64, &null);
        }
        for (i, s) in batch.iter().enumerate() {
            let n = sent + i;
            let f = match proto::recv(s.as_fd(), &mut buf) {
                Ok(f) => f,
                Err(e) => panic!(
                    "connection {n}: no answer ({e}); daemon fds {} (baseline {baseline}, cap {cap})",
                    open_fds(d.pid())
                ),
            };
            let r = Response::decode(f.header.msg_type, &f.payload, f.fds.len()).unwrap();
            match r {
                Response::Error {
                    code: ErrorCode::BadMessage,
                    message,
                } => assert!(
                    message.contains(&format!("more than {MAX_FDS} fds")),
                    "connection {n}: {message}"
                ),
                r => panic!("connection {n}: {r:?}"),
            }
        }
        sent += BATCH;
        drop(batch);
    }

    // Every session is closed and every fd the flood brought is gone.
    d.wait_until(
        format!(
            "the daemon's fds to come back to {baseline} (+{MARGIN}) after {CONNECTIONS} \
             messages with {FDS_PER_MESSAGE} fds each"
        ),
        HANG_GUARD,
        || {
            let n = open_fds(d.pid());
            if n <= baseline + MARGIN {
                Ok(())
            } else {
                Err(format!("{n} fds"))
            }
        },
    );

    // And a client still connects, binds and attaches.
    let mut c = TestClient::start(d.socket());
    c.expect_ok("map a 4");
    c.expect_ok("fill a 5");
    c.expect_ok("attach a");
    assert_eq!(c.expect_ok("read a 0 4096"), "uniform=5");
}
