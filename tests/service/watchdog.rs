//! Readiness, status and the watchdog, through the test's own `NOTIFY_SOCKET` listener
//! ([`Notify`]): `READY=1` only once the socket accepts, `STATUS=` lines, `WATCHDOG=1` pings
//! that stop when a loop of the daemon is wedged, `STOPPING=1`; and neither an unread notify
//! socket nor a client that never reads its answers stalls the daemon.

use std::time::Duration;

use memshadow_tests::{fields, seqpacket_connect, wait_until, TestClient, HANG_GUARD};
use nix::sys::signal::Signal;

use crate::{service_daemon, Notify};

/// READY=1 arrives only once the socket accepts (a connection made the moment it arrives,
/// with no retry, is served); STATUS= follows clients and shadow bytes; WATCHDOG=1 keeps
/// coming while WATCHDOG_USEC is set; STOPPING=1 on SIGTERM.
#[test]
fn readiness_status_watchdog_and_stopping() {
    let b = service_daemon();
    let mut n = Notify::new(b.dir().path());
    let mut d = b
        .env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "400000")
        .spawn();
    let ready = n.wait_for(&d, 0, "READY=1", |l| l == "READY=1");
    let c = memshadow::Client::connect_control(Some(d.socket()))
        .expect("the socket accepts when READY=1 arrives");
    assert!(c.status().is_ok());
    assert_eq!(ready, 0, "READY=1 is the first notification: {:?}", n.msgs);
    assert!(
        n.msgs[ready]
            .iter()
            .any(|l| l == "STATUS=clients=0 bound=0 shadow_bytes=0 (0.0 MiB)"),
        "{:?}",
        n.msgs[ready]
    );
    // The watchdog keeps being pinged (every 100 ms here).
    d.wait_until("5 watchdog pings", HANG_GUARD, || {
        n.recv_one();
        let pings = n.count_all("WATCHDOG=1");
        if pings >= 5 {
            Ok(())
        } else {
            Err(format!("{pings} pings; messages {:?}", n.msgs))
        }
    });
    // STATUS= follows a bound client's shadow.
    let mut tc = TestClient::start(d.socket());
    tc.expect_ok("map a 16");
    tc.expect_ok("fill a 3");
    tc.expect_ok("attach a");
    assert_eq!(fields(&tc.expect_ok("populate a"))["pages"], "16");
    n.wait_for(&d, ready, "a STATUS= with the bound client", |l| {
        l.starts_with("STATUS=") && l.contains(" bound=1 shadow_bytes=65536 ")
    });
    drop(c);
    d.signal(Signal::SIGTERM);
    n.wait_for(&d, ready, "STOPPING=1", |l| l == "STOPPING=1");
    assert!(d.wait().success(), "{}", d.log_tail(40));
}

/// A service manager that does not read its notifications (the socket queue holds 10
/// datagrams by default) never blocks the uffd-reader loop that pings the watchdog: a
/// client churning `madvise` on a mirrored range keeps going.
#[test]
fn an_unread_notify_socket_never_blocks_the_event_reader() {
    let b = service_daemon();
    let n = Notify::new(b.dir().path());
    // A ping every 5 ms: the unread queue is full within ~50 ms.
    let d = b
        .env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "20000")
        .start();
    let mut c = TestClient::start(d.socket());
    c.expect_ok("map a 4");
    c.expect_ok("attach a");
    c.expect_ok("churn-start a");
    let progress = |c: &mut TestClient| -> u64 {
        fields(&c.expect_ok("churn-progress"))["iterations"]
            .parse()
            .unwrap()
    };
    // Wait until many more pings than the queue holds are due, then see the churn move on.
    std::thread::sleep(Duration::from_millis(500));
    let before = progress(&mut c);
    d.wait_until(
        "the client's madvise calls to go on (stuck: the event reader blocked)",
        HANG_GUARD,
        || progress(&mut c) >= before + 100,
    );
    let r = fields(&c.expect_ok("churn-stop"));
    assert_eq!(r["stuck"], "0");
    assert!(d.try_status().is_some());
    drop(n);
}

/// A client that sends requests but never reads the answers never makes the session loop
/// wait (which would stall everybody, long enough for the watchdog to kill the daemon): its
/// answers queue up to a bound, and then its session ends, once.
#[test]
fn a_client_that_never_reads_loses_its_session_and_stalls_nobody() {
    use memshadow_proto::{self as proto, Request, Response, VERSION};
    use std::os::fd::AsFd;
    let d = service_daemon().args(["--log-level", "warn"]).start();
    let s = seqpacket_connect(d.socket()).unwrap();
    let hello = Request::Hello {
        min_version: 1,
        max_version: VERSION,
        name: "no-reader".into(),
    };
    proto::send(
        s.as_fd(),
        hello.msg_type(),
        0,
        1,
        &hello.encode_payload(),
        &[],
    )
    .unwrap();
    let f = proto::recv(s.as_fd(), &mut Vec::new()).unwrap();
    assert!(matches!(
        Response::decode(f.header.msg_type, &f.payload, 0).unwrap(),
        Response::HelloAck { .. }
    ));
    // Status requests, answered inline by the session loop, until their answers fill the
    // socket; the sender blocks when the daemon stops reading and ends when it hangs up.
    let sender = std::thread::spawn(move || {
        let st = Request::Status;
        for id in 2..5000u64 {
            if proto::send(s.as_fd(), st.msg_type(), 0, id, &st.encode_payload(), &[]).is_err() {
                break;
            }
        }
    });
    d.wait_for_log("client does not read its answers");
    // The line was logged inside the session loop's batch for that client; a request on a
    // new connection is answered only after that batch, so the count below is final.
    assert!(d.try_status().is_some());
    let gave_up = d.log().matches("client does not read its answers").count();
    assert_eq!(gave_up, 1, "{}", d.log_tail(40));
    sender.join().unwrap();
}

/// When the uffd-reader loop is wedged (test-only hook), the watchdog pings stop for good,
/// while the session loop still answers: the ping comes from the reader loop itself.
#[test]
fn watchdog_pings_stop_when_the_uffd_reader_stalls() {
    let b = service_daemon();
    let mut n = Notify::new(b.dir().path());
    let d = b
        .env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "200000")
        .env("MEMSHADOWD_TEST_STALL", "reader:3")
        .spawn();
    let stalled = n.wait_for(&d, 0, "the stall marker", |l| {
        l == "X_MEMSHADOW_TEST_STALLED=reader"
    });
    assert_eq!(n.count(0..stalled, "WATCHDOG=1"), 3, "{:?}", n.msgs);
    // 2 s = 40 ping periods: a single ping would fail the test.
    n.recv_for(Duration::from_secs(2));
    assert_eq!(
        n.count(stalled..n.msgs.len(), "WATCHDOG=1"),
        0,
        "pings after the reader stalled: {:?}",
        n.msgs
    );
    assert!(d.try_status().is_some(), "the session loop still serves");
    assert!(d.log().contains("test stall hook"));
}

/// When the session loop is wedged, the reader stops pinging too (once the session loop has
/// not turned for half the watchdog period), and says why.
#[test]
fn watchdog_pings_stop_when_the_session_loop_stalls() {
    let b = service_daemon();
    let mut n = Notify::new(b.dir().path());
    let d = b
        .env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "400000")
        .env("MEMSHADOWD_TEST_STALL", "session:3")
        .spawn();
    n.wait_for(&d, 0, "the stall marker", |l| {
        l == "X_MEMSHADOW_TEST_STALLED=session"
    });
    d.wait_for_log("withholding the watchdog ping");
    // The pings stop: a whole second (10 ping periods) passes without one. Were they still
    // sent, every such window would hold some, until the hang guard fails the test.
    wait_until(
        "a whole second without a watchdog ping while the session loop is wedged",
        HANG_GUARD,
        || {
            let from = n.msgs.len();
            n.recv_for(Duration::from_secs(1));
            n.count(from..n.msgs.len(), "WATCHDOG=1") == 0
        },
    );
}
