//! Socket activation: `systemd-socket-activate` starts the daemon on the first connection;
//! a socket that is not `SOCK_SEQPACKET` is refused; a daemon restarted on a socket the test
//! holds (as the socket unit would) serves the clients that reconnect.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use memshadow_tests::{binary, fields, seqpacket_connect, tool, TempDir, TestClient};
use nix::sys::signal::Signal;
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use crate::service_daemon;

/// `systemd-socket-activate --seqpacket` holds the socket and starts the daemon only when
/// the first client connects; the client then attaches and reads. The daemon leaves the
/// socket file to its owner when it stops.
#[test]
fn socket_activation_starts_the_daemon_on_first_connection() {
    let Some(activate) = tool("systemd-socket-activate", "systemd") else {
        return;
    };
    let dir = TempDir::new("activate");
    let sock = dir.path().join("d.sock");
    let mut p = service_daemon()
        .wrapper([
            activate.as_os_str(),
            "--seqpacket".as_ref(),
            "-l".as_ref(),
            sock.as_os_str(),
            "-E".as_ref(),
            "MEMSHADOW_LOG=info".as_ref(),
        ])
        .socket_passed_in(&sock)
        .env("SYSTEMD_LOG_TARGET", "console")
        .spawn();
    p.wait_for_log(&format!("Listening on {}", sock.display()));
    let exe = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe(p.pid()).file_name().unwrap(),
        "systemd-socket-activate",
        "no daemon before the first connection"
    );
    assert!(!p.log().contains("memshadowd listening"));
    let mut c = TestClient::start(&sock);
    assert_eq!(
        exe(p.pid()),
        binary("memshadowd").canonicalize().unwrap(),
        "the first connection started the daemon"
    );
    c.expect_ok("map a 4");
    c.expect_ok("fill a 7");
    c.expect_ok("attach a");
    assert_eq!(fields(&c.expect_ok("read a 0 16384"))["uniform"], "7");
    p.wait_for_log("activated=true");
    p.signal(Signal::SIGTERM);
    assert!(p.wait().success(), "clean exit:\n{}", p.log_tail(40));
    assert!(
        sock.exists(),
        "the socket file belongs to whoever passed the socket; the daemon leaves it"
    );
}

/// A socket that is not `SOCK_SEQPACKET` is refused with one clear line.
#[test]
fn socket_activation_refuses_a_stream_socket() {
    let Some(activate) = tool("systemd-socket-activate", "systemd") else {
        return;
    };
    let dir = TempDir::new("activate-stream");
    let sock = dir.path().join("d.sock");
    let mut p = service_daemon()
        .wrapper([activate.as_os_str(), "-l".as_ref(), sock.as_os_str()])
        .socket_passed_in(&sock)
        .env("SYSTEMD_LOG_TARGET", "console")
        .spawn();
    p.wait_for_log(&format!("Listening on {}", sock.display()));
    let _conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let st = p.wait();
    assert_eq!(st.code(), Some(1), "{}", p.log_tail(40));
    let err = p.log();
    let line = err
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"));
    assert!(
        line.ends_with(
            "cannot start: the socket passed in fd 3 (LISTEN_FDS) is a Stream socket; \
             memshadowd needs SOCK_SEQPACKET (ListenSequentialPacket=)"
        ),
        "{line}"
    );
}

fn seqpacket_listener(path: &Path) -> OwnedFd {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(16).unwrap()).unwrap();
    fd
}

/// Without systemd: the test holds the listening socket (as the socket unit would), kills
/// the daemon, starts a new one on the same socket, and the client reconnects and works.
/// The socket file and its inode never change.
#[test]
fn restart_on_a_held_socket_serves_reconnecting_clients() {
    let dir = TempDir::new("restart");
    let sock = dir.path().join("d.sock");
    let held = seqpacket_listener(&sock);
    let inode = std::fs::metadata(&sock).unwrap().ino();
    let on_held_socket = || {
        service_daemon()
            .env("MEMSHADOW_LOG", "info")
            .listen_fd(held.as_raw_fd(), &sock)
    };
    let mut d1 = on_held_socket().spawn();
    let mut c = TestClient::start(&sock);
    c.expect_ok("map a 4");
    c.expect_ok("fill a 5");
    c.expect_ok("attach a");
    assert_eq!(fields(&c.expect_ok("read a 0 16384"))["uniform"], "5");
    d1.wait_for_log("activated=true");
    d1.signal(Signal::SIGKILL);
    d1.wait();
    let r = c.cmd("read a 0 4096");
    assert!(r.starts_with("err") && r.contains("gone"), "{r}");
    // A client that connects now waits in the held socket's backlog or meets the new
    // daemon; either way it is served.
    let s2 = sock.clone();
    let late = std::thread::spawn(move || TestClient::start(&s2));
    let mut d2 = on_held_socket().spawn();
    c.expect_ok("reconnect");
    c.expect_ok("attach a");
    c.expect_ok("fill a 6");
    assert_eq!(fields(&c.expect_ok("read a 0 16384"))["uniform"], "6");
    let mut late = late.join().unwrap();
    late.expect_ok("map b 2");
    late.expect_ok("attach b");
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), inode);
    drop((c, late));
    d2.signal(Signal::SIGTERM);
    assert!(d2.wait().success(), "{}", d2.log_tail(40));
    assert_eq!(
        std::fs::metadata(&sock).unwrap().ino(),
        inode,
        "a clean stop leaves the held socket's file"
    );
    seqpacket_connect(&sock).expect("the held socket still listens after the daemon stopped");
}
