//! An unprivileged attacker against a root daemon (docs/threat-model.md): one test per way
//! in that an attack on the daemon found. The attacks run as `nobody` (uid 65534) through
//! the `memshadow-attacker` and `test-client` binaries; the daemon runs as root.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use memshadow_proto::{self as proto, ErrorCode, Request, Response, MIN_VERSION, VERSION};
use memshadow_tests::{binary, fields, needs_root, tool, Daemon, TempDir, TestClient, HANG_GUARD};
use nix::sys::signal::Signal;

const NOBODY: &str = "65534";
/// Another unprivileged user (needs no passwd entry).
const SOMEBODY: &str = "65533";
/// How long 30 sessions that never read may take to end: each used to cost the session
/// loop a 2 s wait (a minute in all); now they end at once.
const NON_READERS_END: Duration = Duration::from_secs(20);

/// True if this process is root; else the test is skipped, saying why.
fn is_root() -> bool {
    needs_root("a root daemon attacked by an unprivileged user")
}

/// The secret keeper: a setuid-root program that maps its secret at the attacker's
/// `SECRET_ADDR`, says `ready` and waits for its stdin to close.
const SECRET_C: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
int main(void) {
    char *p = mmap((void *)0x5ec0000000UL, 16 * 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED) return 2;
    memset(p, 'S', 16 * 4096);
    memcpy(p, "SECRET of root: hunter2", 23);
    if (geteuid() != 0) return 3;
    printf("ready\n");
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {}
    return 0;
}
"#;

/// Builds the setuid-root secret keeper in `dir` (reachable by nobody) with `cc`.
fn secret_keeper(cc: &Path, dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let src = dir.join("secret.c");
    let exe = dir.join("secret");
    std::fs::write(&src, SECRET_C).unwrap();
    let out = Command::new(cc)
        .arg("-O1")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o4755)).unwrap();
    exe
}

/// `memshadow-attacker --uid UID ATTACK SOCKET ARGS...`, with stdin and stdout piped.
fn attacker(uid: &str, attack: &str, socket: &Path, args: &[&str]) -> Child {
    Command::new(binary("memshadow-attacker"))
        .args(["--uid", uid, attack])
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The attacker's one line (its forked child prints it for the exec attacks).
fn verdict(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // Let the exec'd program go; it exits when its stdin closes.
    drop(child.stdin.take());
    child.wait().unwrap();
    line.trim().to_owned()
}

/// Critical: a client binds and attaches the range where a setuid-root program it is about
/// to exec keeps a secret, forks a child that keeps the session, and execs the program. The
/// child's device reads must not return the program's memory: the client's pid now names
/// the setuid program, and the mem fd the client handed over died with the exec.
#[test]
fn a_setuid_program_the_client_execs_is_never_read() {
    if !is_root() {
        return;
    }
    let Some(cc) = tool("cc", "gcc") else {
        return;
    };
    let d = Daemon::start(&[]);
    let dir = TempDir::new("setuid");
    let prog = secret_keeper(&cc, dir.path());
    let mut a = attacker(NOBODY, "exec-read", d.socket(), &[prog.to_str().unwrap()]);
    let v = verdict(&mut a);
    assert!(v.starts_with("refused"), "{v}");
    assert!(!v.contains("SECRET"), "{v}");
    assert!(v.contains("address space is gone"), "{v}");
    // The session ends: its client's address space is gone.
    d.wait_until(
        "the session of the exec'd client to end",
        HANG_GUARD,
        || d.counter("server.gone") > 0,
    );
}

/// The variant: the session binds only after the exec, with the attacker's own uffd and an
/// `O_PATH` fd of the setuid program's `/proc/PID/mem` (opening `O_PATH` needs no
/// permission). The bind is refused.
#[test]
fn an_o_path_mem_fd_of_a_setuid_program_is_refused() {
    if !is_root() {
        return;
    }
    let Some(cc) = tool("cc", "gcc") else {
        return;
    };
    let d = Daemon::start(&[]);
    let dir = TempDir::new("opath");
    let prog = secret_keeper(&cc, dir.path());
    let mut a = attacker(NOBODY, "opath-bind", d.socket(), &[prog.to_str().unwrap()]);
    let v = verdict(&mut a);
    assert!(v.starts_with("refused BadFd"), "{v}");
    assert!(v.contains("O_PATH"), "{v}");
}

/// A peer that exited before the daemon accepted its connection is refused: nothing may be
/// looked up by its pid, which another process may hold by now.
#[test]
fn a_peer_gone_before_the_accept_is_refused() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let refused = d.counter("server.sessions_refused");
    let sessions = d.counter("server.sessions_total");
    d.signal(Signal::SIGSTOP);
    let mut a = attacker(NOBODY, "connect-and-exit", d.socket(), &[]);
    let v = verdict(&mut a);
    d.signal(Signal::SIGCONT);
    assert_eq!(v, "connected");
    // Our status connection comes after the dead peer's in the backlog.
    assert_eq!(d.counter("server.sessions_refused"), refused + 1);
    // Counted: this status connection and the previous one, not the dead peer.
    assert_eq!(d.counter("server.sessions_total"), sessions + 2);
}

/// Clients that send requests and never read the answers lose their sessions without
/// making anyone wait: 30 of them at once, and meanwhile a well-behaved client's requests
/// are answered. (Before, each cost the shared session loop a 2 s wait.)
#[test]
fn clients_that_never_read_lose_their_sessions_and_stall_nobody() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let mut good = TestClient::start(d.socket());
    good.expect_ok("map a 16");
    good.expect_ok("fill a 5");
    good.expect_ok("attach a");
    let t = Instant::now();
    let mut bad: Vec<Child> = (0..30)
        .map(|_| attacker(NOBODY, "non-reader", d.socket(), &["2000"]))
        .collect();
    // The well-behaved client is served throughout.
    for _ in 0..20 {
        assert_eq!(fields(&good.expect_ok("read a 0 65536"))["uniform"], "5");
    }
    for c in &mut bad {
        let v = verdict(c);
        assert!(v.starts_with("closed after"), "{v}");
    }
    let took = t.elapsed();
    eprintln!("30 non-reading sessions ended in {took:?}");
    assert!(
        took < NON_READERS_END,
        "30 non-reading sessions took {took:?} to end (the session loop waited on them)"
    );
    assert!(d.counter("server.not_reading") >= 30);
    assert_eq!(fields(&good.expect_ok("read a 0 65536"))["uniform"], "5");
}

/// One user cannot take the whole shadow, whatever the number of its sessions: every
/// client of a user draws from one share; a second user gets the rest of what others may
/// use ("shadow full", typed); root still has its reserve.
#[test]
fn one_user_cannot_take_the_shadow_and_root_keeps_its_reserve() {
    if !is_root() {
        return;
    }
    // 64 MiB shadow, 16 MiB reserved: 48 MiB for other users, 32 MiB per user.
    let d = Daemon::start(&[
        "--shadow-mib",
        "64",
        "--reserved-shadow-mib",
        "16",
        "--quota-shadow-mib",
        "64",
        "--quota-shadow-mib-per-uid",
        "32",
    ]);
    let populate = |c: &mut TestClient, pages: u32| -> String {
        c.expect_ok(&format!("map m {pages}"));
        c.expect_ok("attach m");
        c.cmd("populate m")
    };
    let mut a1 = TestClient::start_with(d.socket(), &["--uid", NOBODY]);
    assert!(
        populate(&mut a1, 8192).starts_with("ok"),
        "32 MiB fit the share"
    );
    let mut a2 = TestClient::start_with(d.socket(), &["--uid", NOBODY]);
    let r = populate(&mut a2, 16);
    assert!(r.contains("shadow share of this user"), "{r}");
    let mut b = TestClient::start_with(d.socket(), &["--uid", SOMEBODY]);
    let r = populate(&mut b, 8192);
    assert!(r.contains("shadow buffer full"), "{r}");
    let mut root = TestClient::start(d.socket());
    let r = populate(&mut root, 4096);
    assert!(r.starts_with("ok"), "root gets its reserve: {r}");
}

/// Connections that never say hello are closed after the handshake timeout, and the last
/// connections are kept for root: a user that fills every other slot cannot lock root out,
/// and its next connection is told why it is refused (not "daemon gone").
#[test]
fn silent_connections_time_out_and_root_keeps_its_connections() {
    if !is_root() {
        return;
    }
    let Some(setpriv) = tool("setpriv", "util-linux") else {
        return;
    };
    let d = Daemon::start(&[
        "--max-clients",
        "12",
        "--reserved-clients",
        "4",
        "--clients-per-uid",
        "100",
        "--handshake-timeout-ms",
        "60000",
    ]);
    // One control connection of root, kept: the only connection besides the attackers'.
    let root = memshadow::Client::connect_control(Some(d.socket())).unwrap();
    let clients = || {
        let st = root.status().unwrap();
        st.counters
            .iter()
            .find(|(k, _)| k == "server.clients")
            .map_or(0, |(_, v)| *v as usize)
    };
    d.wait_until("the harness's connections to leave", HANG_GUARD, || {
        clients() == 1
    });
    // Silent connections of nobody, one at a time, until the daemon refuses one (it
    // answers and hangs up, so the attacker exits): every slot open to all is taken.
    let mut silent: Vec<Child> = Vec::new();
    loop {
        assert!(silent.len() <= 12, "the daemon never refused a connection");
        let mut c = attacker(NOBODY, "silent", d.socket(), &[]);
        let refused = d.wait_until(
            "a silent connection to be served or refused",
            HANG_GUARD,
            || {
                if c.try_wait().unwrap().is_some() {
                    Some(true)
                } else if clients() == silent.len() + 2 {
                    Some(false)
                } else {
                    None
                }
            },
        );
        if refused {
            break;
        }
        silent.push(c);
    }
    assert_eq!(silent.len(), 7, "8 slots open to all, one of them root's");
    let ctl = |uid: Option<&str>| {
        let mut c = Command::new(&setpriv);
        if let Some(u) = uid {
            c.args(["--reuid", u, "--regid", u, "--clear-groups"]);
        }
        c.arg(binary("memshadowctl"))
            .arg("--socket")
            .arg(d.socket())
            .arg("status")
            .output()
            .unwrap()
    };
    let o = ctl(Some(NOBODY));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("too many clients"), "{err}");
    assert!(!err.contains("gone"), "{err}");
    let o = ctl(None);
    assert!(
        o.status.success(),
        "root is locked out: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for mut c in silent {
        let _ = c.kill();
        let _ = c.wait();
    }
    // A short handshake timeout closes a silent connection.
    let d = Daemon::start(&["--handshake-timeout-ms", "200"]);
    let mut s = attacker(NOBODY, "silent", d.socket(), &[]);
    assert_eq!(verdict(&mut s), "closed");
    assert!(d.counter("server.timed_out") >= 1);
}

/// Work per request is bounded: attaching more address space than the quota, collecting
/// more often than the minimum period, and a second trace stream on one session are
/// refused at once.
#[test]
fn unbounded_work_is_refused() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&["--quota-attached-mib", "64"]);
    let mut c = TestClient::start_with(d.socket(), &["--uid", NOBODY]);
    c.expect_ok("map big 32768");
    let r = c.cmd("attach big");
    assert!(
        r.contains("quota of 67108864 bytes of attached address space"),
        "{r}"
    );
    c.expect_ok("map small 16");
    let r = c.cmd("attach-policy small periodic=1");
    assert!(r.contains("below the daemon's minimum of 10 ms"), "{r}");
    c.expect_ok("attach-policy small periodic=10");
    // The library gives each trace a connection of its own, so the second stream on one
    // session is asked for by hand.
    let s = memshadow_tests::seqpacket_connect(d.socket()).unwrap();
    let mut buf = Vec::new();
    let mut ask = |id: u64, req: Request| {
        proto::send(s.as_fd(), req.msg_type(), 0, id, &req.encode_payload(), &[]).unwrap();
        let f = proto::recv(s.as_fd(), &mut buf).unwrap();
        assert_eq!(f.header.request_id, id);
        Response::decode(f.header.msg_type, &f.payload, f.fds.len()).unwrap()
    };
    let hello = ask(
        1,
        Request::Hello {
            min_version: MIN_VERSION,
            max_version: VERSION,
            name: "tracer".into(),
        },
    );
    assert!(matches!(hello, Response::HelloAck { .. }), "{hello:?}");
    let trace = Request::Trace { pid: 0, events: 0 };
    assert_eq!(ask(2, trace.clone()), Response::TraceStarted);
    let second = ask(3, trace);
    assert!(
        matches!(
            second,
            Response::Error {
                code: ErrorCode::QuotaExceeded,
                ..
            }
        ),
        "{second:?}"
    );
}
