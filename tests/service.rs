//! memshadowd as a service (docs/design.md §7), with the tools a machine without systemd
//! as PID 1 has: the units pass `systemd-analyze verify`; socket activation through
//! `systemd-socket-activate`; readiness, status and the watchdog through a `NOTIFY_SOCKET`
//! listener of the test's own; a restart on a socket the test holds; the configuration file,
//! flags, `SIGHUP` reload and `--print-config`; the unit's capabilities and system-call filter
//! checked against what the daemon really does; journald detection; the install script.
//!
//! Tests that need `systemd-analyze`, `systemd-socket-activate`, `strace`, `setpriv` or
//! `groupadd` say so loudly and pass if one is missing, unless
//! `MEMSHADOW_REQUIRE_SYSTEM_TOOLS=1` (set by `.ci/run`, which installs them) makes that a
//! failure.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memshadow_tests::{binary, fields, seqpacket_connect, TempDir, TestClient};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use nix::unistd::Pid;

/// Generous deadline of every wait (never reached when things work).
const DEADLINE: Duration = Duration::from_secs(30);

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A system tool, or `None` (after saying so loudly) if it is missing and not required.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("MEMSHADOW_REQUIRE_SYSTEM_TOOLS").is_none(),
            "{name} is required (MEMSHADOW_REQUIRE_SYSTEM_TOOLS is set): install the Debian \
             package {package}"
        );
        eprintln!(
            "\n*** SKIPPED: {name} is not installed (Debian package {package}); this test did \
             not run ***\n"
        );
    }
    found
}

/// True if this process is root (some tests change uids and capability sets).
fn is_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("\n*** SKIPPED: {test} needs root; it did not run ***\n");
    }
    root
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(root().join("systemd").join(name)).unwrap()
}

/// Values of `Key=` lines of a unit (every occurrence, words split).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// A process whose stderr is collected; SIGKILLed and reaped on drop.
struct Proc {
    child: Option<Child>,
    err: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Proc {
    fn spawn(cmd: Command) -> Proc {
        Proc::spawn_with(cmd, false)
    }

    /// Spawns `cmd` with stderr on a pipe; with `journal_stream`, `JOURNAL_STREAM` names that
    /// pipe (as systemd names the journal stream it connects stderr to).
    fn spawn_with(mut cmd: Command, journal_stream: bool) -> Proc {
        let (r, w) = nix::unistd::pipe().unwrap();
        if journal_stream {
            let st = nix::sys::stat::fstat(&w).unwrap();
            cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(w))
            .spawn()
            .expect("spawn");
        // The child has its copy; ours went with `cmd`.
        drop(cmd);
        let err: Arc<Mutex<String>> = Arc::default();
        let sink = Arc::clone(&err);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(std::fs::File::from(r)).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc {
            child: Some(child),
            err,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle`.
    fn wait_for_stderr(&self, needle: &str) {
        let t = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                t.elapsed() < DEADLINE,
                "stderr never showed {needle:?}; it has:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit (and its stderr to be read to the end).
    fn wait(&mut self) -> ExitStatus {
        let c = self.child.as_mut().unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < DEADLINE,
                "process did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        self.child = None;
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// The daemon binary with a clean service environment (none of the variables a service
/// manager sets, no log override) and no configuration file unless `args` name one.
fn memshadowd(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("memshadowd"));
    cmd.args(args);
    for v in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "JOURNAL_STREAM",
        "MEMSHADOW_LOG",
        "MEMSHADOW_SOCKET",
        "MEMSHADOWD_TEST_STALL",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// Waits until the daemon at `sock` answers a status request.
fn wait_serving(sock: &Path) {
    let t = Instant::now();
    while status(sock).is_none() {
        assert!(t.elapsed() < DEADLINE, "memshadowd did not start serving");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The daemon's counters, if it answers.
fn status(sock: &Path) -> Option<std::collections::HashMap<String, u64>> {
    let c = memshadow::Client::connect_control(Some(sock)).ok()?;
    Some(c.status().ok()?.counters.into_iter().collect())
}

/// The test's own service-manager end of `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message received, each as its lines.
    msgs: Vec<Vec<String>>,
}

impl Notify {
    fn new(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Notify {
            sock,
            path,
            msgs: Vec::new(),
        }
    }

    /// Receives for `d`.
    fn recv_for(&mut self, d: Duration) {
        let t = Instant::now();
        let mut buf = vec![0u8; 65536];
        while t.elapsed() < d {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]);
                self.msgs.push(
                    m.lines()
                        .filter(|l| !l.is_empty())
                        .map(Into::into)
                        .collect(),
                );
            }
        }
    }

    /// Receives until a message (from index `from` on) has a line for which `pred` holds;
    /// returns its index.
    fn wait_for(&mut self, from: usize, what: &str, pred: impl Fn(&str) -> bool) -> usize {
        let t = Instant::now();
        loop {
            if let Some(i) = (from..self.msgs.len()).find(|i| self.msgs[*i].iter().any(|l| pred(l)))
            {
                return i;
            }
            assert!(
                t.elapsed() < DEADLINE,
                "no {what} from the daemon; got {:?}",
                self.msgs
            );
            self.recv_for(Duration::from_millis(50));
        }
    }

    /// Messages in `range` with the line `line`.
    fn count(&self, range: std::ops::Range<usize>, line: &str) -> usize {
        self.msgs[range]
            .iter()
            .filter(|m| m.iter().any(|l| l == line))
            .count()
    }
}

/// The unit files pass `systemd-analyze verify` with no output at all. It exits 0 even on
/// unknown keys, so any output fails; it also insists that `ExecStart=` exists, so the
/// check runs on copies pointing at the built daemon (the only line changed). Controls show
/// that the same check does report a misspelt key and a missing binary.
#[test]
fn units_pass_systemd_analyze_verify_with_no_output() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let dir = TempDir::new("units");
    let exec = "ExecStart=/usr/local/bin/memshadowd";
    let service = unit("memshadowd.service");
    assert_eq!(
        service.lines().filter(|l| *l == exec).count(),
        1,
        "the service has one `{exec}` line (install.sh rewrites it)"
    );
    let built = format!("ExecStart={}", binary("memshadowd").display());
    let verify = |service_text: &str| -> (bool, String) {
        std::fs::write(dir.path().join("memshadowd.service"), service_text).unwrap();
        std::fs::write(
            dir.path().join("memshadowd.socket"),
            unit("memshadowd.socket"),
        )
        .unwrap();
        let out = Command::new(&analyze)
            .arg("verify")
            .arg("--man=no")
            .arg(dir.path().join("memshadowd.socket"))
            .arg(dir.path().join("memshadowd.service"))
            .env("SYSTEMD_LOG_TARGET", "console")
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = verify(&service.replace(exec, &built));
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify must print nothing; it printed:\n{text}"
    );
    let misspelt = service
        .replace(exec, &built)
        .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes");
    let (_, text) = verify(&misspelt);
    assert!(
        text.contains("NoNewPrivilege"),
        "control: a misspelt key must be reported:\n{text}"
    );
    let (_, text) = verify(&service);
    assert!(
        text.contains("/usr/local/bin/memshadowd"),
        "control: a missing ExecStart binary must be reported:\n{text}"
    );
}

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
    let mut cmd = Command::new(activate);
    cmd.arg("--seqpacket")
        .arg("-l")
        .arg(&sock)
        .arg("-E")
        .arg("MEMSHADOW_LOG=info")
        .arg(binary("memshadowd"))
        .arg("--no-config")
        .env("SYSTEMD_LOG_TARGET", "console");
    let mut p = Proc::spawn(cmd);
    p.wait_for_stderr(&format!("Listening on {}", sock.display()));
    let exe = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe(p.pid()).file_name().unwrap(),
        "systemd-socket-activate",
        "no daemon before the first connection"
    );
    assert!(!p.stderr().contains("memshadowd listening"));
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
    p.wait_for_stderr("activated=true");
    p.signal(Signal::SIGTERM);
    assert!(p.wait().success(), "clean exit:\n{}", p.stderr());
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
    let mut cmd = Command::new(activate);
    cmd.arg("-l")
        .arg(&sock)
        .arg(binary("memshadowd"))
        .arg("--no-config")
        .env("SYSTEMD_LOG_TARGET", "console");
    let mut p = Proc::spawn(cmd);
    p.wait_for_stderr(&format!("Listening on {}", sock.display()));
    let _conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let st = p.wait();
    assert_eq!(st.code(), Some(1), "{}", p.stderr());
    let err = p.stderr();
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

/// READY=1 arrives only once the socket accepts (a connection made the moment it arrives,
/// with no retry, is served); STATUS= follows clients and shadow bytes; WATCHDOG=1 keeps
/// coming while WATCHDOG_USEC is set; STOPPING=1 on SIGTERM.
#[test]
fn readiness_status_watchdog_and_stopping() {
    let dir = TempDir::new("ready");
    let mut n = Notify::new(dir.path());
    let sock = dir.path().join("d.sock");
    let mut cmd = memshadowd(&["--no-config", "--socket", sock.to_str().unwrap()]);
    cmd.env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "400000");
    let mut p = Proc::spawn(cmd);
    let ready = n.wait_for(0, "READY=1", |l| l == "READY=1");
    let c = memshadow::Client::connect_control(Some(&sock))
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
    let t = Instant::now();
    while n.count(0..n.msgs.len(), "WATCHDOG=1") < 5 {
        assert!(
            t.elapsed() < DEADLINE,
            "watchdog pings stopped: {:?}",
            n.msgs
        );
        n.recv_for(Duration::from_millis(100));
    }
    // STATUS= follows a bound client's shadow.
    let mut tc = TestClient::start(&sock);
    tc.expect_ok("map a 16");
    tc.expect_ok("fill a 3");
    tc.expect_ok("attach a");
    assert_eq!(fields(&tc.expect_ok("populate a"))["pages"], "16");
    n.wait_for(ready, "a STATUS= with the bound client", |l| {
        l.starts_with("STATUS=") && l.contains(" bound=1 shadow_bytes=65536 ")
    });
    drop(c);
    p.signal(Signal::SIGTERM);
    n.wait_for(ready, "STOPPING=1", |l| l == "STOPPING=1");
    assert!(p.wait().success(), "{}", p.stderr());
}

/// A service manager that does not read its notifications (the socket queue holds 10
/// datagrams by default) never blocks the uffd-reader loop that pings the watchdog: a
/// client churning `madvise` on a mirrored range keeps going.
#[test]
fn an_unread_notify_socket_never_blocks_the_event_reader() {
    let dir = TempDir::new("notify-full");
    let n = Notify::new(dir.path());
    let sock = dir.path().join("d.sock");
    let mut cmd = memshadowd(&["--no-config", "--socket", sock.to_str().unwrap()]);
    // A ping every 5 ms: the unread queue is full within ~50 ms.
    cmd.env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "20000");
    let p = Proc::spawn(cmd);
    wait_serving(&sock);
    let mut c = TestClient::start(&sock);
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
    let t = Instant::now();
    while progress(&mut c) < before + 100 {
        assert!(
            t.elapsed() < DEADLINE,
            "client madvise calls are stuck: the event reader blocked\n{}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = fields(&c.expect_ok("churn-stop"));
    assert_eq!(r["stuck"], "0");
    assert!(status(&sock).is_some());
    drop(n);
}

/// A client that sends requests but never reads the answers never makes the session loop
/// wait (which would stall everybody, long enough for the watchdog to kill the daemon): its
/// answers queue up to a bound, and then its session ends, once.
#[test]
fn a_client_that_never_reads_loses_its_session_and_stalls_nobody() {
    use memshadow_proto::{self as proto, Request, Response, VERSION};
    use std::os::fd::AsFd;
    let dir = TempDir::new("no-reader");
    let sock = dir.path().join("d.sock");
    let p = Proc::spawn(memshadowd(&[
        "--no-config",
        "--log-level",
        "warn",
        "--socket",
        sock.to_str().unwrap(),
    ]));
    wait_serving(&sock);
    let s = seqpacket_connect(&sock).unwrap();
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
    p.wait_for_stderr("client does not read its answers");
    // The line was logged inside the session loop's batch for that client; a request on a
    // new connection is answered only after that batch, so the count below is final.
    assert!(status(&sock).is_some());
    let gave_up = p
        .stderr()
        .matches("client does not read its answers")
        .count();
    assert_eq!(gave_up, 1, "{}", p.stderr());
    sender.join().unwrap();
}

/// When the uffd-reader loop is wedged (test-only hook), the watchdog pings stop for good,
/// while the session loop still answers: the ping comes from the reader loop itself.
#[test]
fn watchdog_pings_stop_when_the_uffd_reader_stalls() {
    let dir = TempDir::new("stall-reader");
    let mut n = Notify::new(dir.path());
    let sock = dir.path().join("d.sock");
    let mut cmd = memshadowd(&["--no-config", "--socket", sock.to_str().unwrap()]);
    cmd.env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "200000")
        .env("MEMSHADOWD_TEST_STALL", "reader:3");
    let p = Proc::spawn(cmd);
    let stalled = n.wait_for(0, "the stall marker", |l| {
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
    assert!(status(&sock).is_some(), "the session loop still serves");
    assert!(p.stderr().contains("test stall hook"));
}

/// When the session loop is wedged, the reader stops pinging too (once the session loop has
/// not turned for half the watchdog period), and says why.
#[test]
fn watchdog_pings_stop_when_the_session_loop_stalls() {
    let dir = TempDir::new("stall-session");
    let mut n = Notify::new(dir.path());
    let sock = dir.path().join("d.sock");
    let mut cmd = memshadowd(&["--no-config", "--socket", sock.to_str().unwrap()]);
    cmd.env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "400000")
        .env("MEMSHADOWD_TEST_STALL", "session:3");
    let p = Proc::spawn(cmd);
    n.wait_for(0, "the stall marker", |l| {
        l == "X_MEMSHADOW_TEST_STALLED=session"
    });
    p.wait_for_stderr("withholding the watchdog ping");
    // The pings stop: a whole second (10 ping periods) passes without one. Were they still
    // sent, every such window would hold some, until the deadline fails the test.
    let t = Instant::now();
    loop {
        let from = n.msgs.len();
        n.recv_for(Duration::from_secs(1));
        if n.count(from..n.msgs.len(), "WATCHDOG=1") == 0 {
            break;
        }
        assert!(
            t.elapsed() < DEADLINE,
            "pings go on while the session loop is wedged: {:?}",
            n.msgs
        );
    }
}

/// Runs `cmd` with `fd` as its fd 3 (LISTEN_FDS=1, LISTEN_PID = its own pid, set by the
/// `sh` that execs it): what systemd does, done by hand.
fn with_listen_fd(fd: i32) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
        .arg(binary("memshadowd"))
        .arg("--no-config");
    for v in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "JOURNAL_STREAM",
        "MEMSHADOWD_TEST_STALL",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("LISTEN_FDS", "1").env("MEMSHADOW_LOG", "info");
    let hand_over = move || -> std::io::Result<()> {
        // SAFETY: dup2 on descriptors this process owns; async-signal-safe, no allocation.
        let r = unsafe { libc::dup2(fd, 3) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // dup2(3, 3) would keep FD_CLOEXEC: clear it either way.
        // SAFETY: fcntl on fd 3, which the dup2 above made ours; async-signal-safe.
        let r = unsafe { libc::fcntl(3, libc::F_SETFD, 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and only calls dup2 and fcntl.
    unsafe { cmd.pre_exec(hand_over) };
    cmd
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
    let mut d1 = Proc::spawn(with_listen_fd(held.as_raw_fd()));
    let mut c = TestClient::start(&sock);
    c.expect_ok("map a 4");
    c.expect_ok("fill a 5");
    c.expect_ok("attach a");
    assert_eq!(fields(&c.expect_ok("read a 0 16384"))["uniform"], "5");
    d1.wait_for_stderr("activated=true");
    d1.signal(Signal::SIGKILL);
    d1.wait();
    let r = c.cmd("read a 0 4096");
    assert!(r.starts_with("err") && r.contains("gone"), "{r}");
    // A client that connects now waits in the held socket's backlog or meets the new
    // daemon; either way it is served.
    let s2 = sock.clone();
    let late = std::thread::spawn(move || TestClient::start(&s2));
    let mut d2 = Proc::spawn(with_listen_fd(held.as_raw_fd()));
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
    assert!(d2.wait().success(), "{}", d2.stderr());
    assert_eq!(
        std::fs::metadata(&sock).unwrap().ino(),
        inode,
        "a clean stop leaves the held socket's file"
    );
    seqpacket_connect(&sock).expect("the held socket still listens after the daemon stopped");
}

fn write_file(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = memshadowd(args);
    cmd.arg("--print-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "--print-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The configuration body of `--print-config` (without the leading comments).
fn body(printed: &str) -> String {
    printed
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Built-in defaults < file < MEMSHADOW_LOG < flags, shown by `--print-config` and obeyed
/// by a running daemon (flush latency from the file, mirror quota from the flag).
#[test]
fn file_and_flags_precedence() {
    let dir = TempDir::new("precedence");
    let file = write_file(
        &dir,
        "m.toml",
        "workers = 3\nlog_level = \"warn\"\n[device]\nflush_latency_us = 77\n\
         [quotas]\nmirrors = 3\ninflight = 5\n",
    );
    let f = file.to_str().unwrap();
    let out = print_config(&["--config", f, "--quota-mirrors", "2"], &[]);
    assert!(out.contains(&format!("built-in defaults < {f} < MEMSHADOW_LOG < flags")));
    for line in [
        "workers = 3",
        "flush_latency_us = 77",
        "mirrors = 2",
        "inflight = 5",
        "engines = 2",
        "log_level = \"warn\"",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in\n{out}");
    }
    let out = print_config(&["--config", f], &[("MEMSHADOW_LOG", "debug")]);
    assert!(out.contains("log_level = \"debug\""), "{out}");
    let out = print_config(
        &["--config", f, "--log-level", "error"],
        &[("MEMSHADOW_LOG", "debug")],
    );
    assert!(out.contains("log_level = \"error\""), "{out}");

    let sock = dir.path().join("d.sock");
    let p = Proc::spawn(memshadowd(&[
        "--config",
        f,
        "--quota-mirrors",
        "2",
        "--socket",
        sock.to_str().unwrap(),
    ]));
    wait_serving(&sock);
    assert_eq!(
        status(&sock).unwrap()["engine.flush_latency_target_ns"],
        77_000
    );
    let mut c = TestClient::start(&sock);
    let l = fields(&c.expect_ok("limits"));
    assert_eq!((l["mirrors"].as_str(), l["inflight"].as_str()), ("2", "5"));
    for m in ["a", "b", "c"] {
        c.expect_ok(&format!("map {m} 1"));
    }
    c.expect_ok("attach a");
    c.expect_ok("attach b");
    let r = c.cmd("attach c");
    assert!(r.starts_with("err quota exceeded"), "{r}");
    drop(p);
}

/// Configuration mistakes stop the daemon with one line naming the key and the file.
#[test]
fn configuration_errors_name_the_key_and_the_file() {
    let dir = TempDir::new("config-errors");
    let sock = dir.path().join("d.sock");
    let run = |args: &[&str]| -> String {
        let mut all = args.to_vec();
        all.extend(["--socket", sock.to_str().unwrap()]);
        let out = memshadowd(&all).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!sock.exists(), "nothing started");
        err.trim_end().to_owned()
    };
    let f = write_file(
        &dir,
        "unknown.toml",
        "workers = 2\n[quotas]\nmirrors = 3\nmirorrs = 4\n",
    );
    let e = run(&["--config", f.to_str().unwrap()]);
    assert!(
        e.contains(&format!(
            "ERROR memshadowd: {} line 4: unknown key `quotas.mirorrs` (expected one of",
            f.display()
        )),
        "{e}"
    );
    let f = write_file(&dir, "value.toml", "[device]\nmode = \"three-pass\"\n");
    let e = run(&["--config", f.to_str().unwrap()]);
    assert!(
        e.ends_with(&format!(
            "{}: bad value for `device.mode`: \"three-pass\" is not one of one-pass, \
             two-pass, two-pass-batched",
            f.display()
        )),
        "{e}"
    );
    let f = write_file(&dir, "type.toml", "[device]\nengines = \"two\"\n");
    let e = run(&["--config", f.to_str().unwrap()]);
    assert!(
        e.contains(&format!(
            "{} line 2: bad value for `device.engines`: invalid type",
            f.display()
        )),
        "{e}"
    );
    let missing = dir.path().join("missing.toml");
    let e = run(&["--config", missing.to_str().unwrap()]);
    assert!(
        e.contains(&format!(
            "cannot read the configuration file {}",
            missing.display()
        )),
        "{e}"
    );
    let e = run(&["--no-config", "--dirty-policy", "sometimes"]);
    assert!(
        e.ends_with("command line: bad value for --dirty-policy: \"sometimes\" is not one of manual, strict, periodic=MS (MS >= 1)"),
        "{e}"
    );
}

/// `--print-config` reads back to the same configuration, and the shipped example file is
/// exactly the built-in defaults (so its comments cannot drift from the code).
#[test]
fn print_config_round_trips_and_the_example_is_the_defaults() {
    let dir = TempDir::new("print-config");
    let f = write_file(
        &dir,
        "m.toml",
        "socket = \"/tmp/x/y.sock\"\n[dirty]\npolicy = \"periodic=40\"\n[device]\nmode = \"one-pass\"\n",
    );
    let first = print_config(&["--config", f.to_str().unwrap(), "--engines", "5"], &[]);
    let again_file = write_file(&dir, "again.toml", &first);
    let again = print_config(&["--config", again_file.to_str().unwrap()], &[]);
    assert_eq!(body(&first), body(&again));
    for line in [
        "socket = \"/tmp/x/y.sock\"",
        "policy = \"periodic=40\"",
        "mode = \"one-pass\"",
        "engines = 5",
    ] {
        assert!(first.lines().any(|l| l == line), "{line:?} in\n{first}");
    }
    let example = root().join("systemd/memshadowd.toml");
    let env = [("MEMSHADOW_SOCKET", "/x.sock")];
    assert_eq!(
        body(&print_config(
            &["--config", example.to_str().unwrap()],
            &env
        )),
        body(&print_config(&["--no-config"], &env)),
        "systemd/memshadowd.toml must show the built-in defaults"
    );
}

/// SIGHUP: RELOADING=1 (with MONOTONIC_USEC) then READY=1; a lowered mirror quota refuses
/// the next attach of an already bound client; the log level and the flush latency change;
/// changed keys that need a restart are named and not applied; a bad file is reported
/// (key and file) and the running configuration stays.
#[test]
fn sighup_reloads_quotas_log_level_and_flush_latency() {
    let dir = TempDir::new("reload");
    let mut n = Notify::new(dir.path());
    let sock = dir.path().join("d.sock");
    let conf = |mirrors: u32, level: &str, latency: u32, engines: u32| {
        format!(
            "log_level = \"{level}\"\n[device]\nengines = {engines}\nflush_latency_us = {latency}\n\
             [quotas]\nmirrors = {mirrors}\n"
        )
    };
    let f = write_file(&dir, "m.toml", &conf(4, "warn", 50, 2));
    let mut cmd = memshadowd(&[
        "--config",
        f.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ]);
    cmd.env("NOTIFY_SOCKET", &n.path);
    let p = Proc::spawn(cmd);
    let ready = n.wait_for(0, "READY=1", |l| l == "READY=1");
    let mut c = TestClient::start(&sock);
    for m in ["a", "b", "c"] {
        c.expect_ok(&format!("map {m} 1"));
    }
    c.expect_ok("attach a");
    c.expect_ok("attach b");
    assert!(
        !p.stderr().contains("client connected"),
        "no debug lines at log_level = warn"
    );

    std::fs::write(&f, conf(2, "debug", 120, 3)).unwrap();
    p.signal(Signal::SIGHUP);
    let reloading = n.wait_for(ready + 1, "RELOADING=1", |l| l == "RELOADING=1");
    assert!(
        n.msgs[reloading]
            .iter()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{:?}",
        n.msgs[reloading]
    );
    let ready2 = n.wait_for(reloading + 1, "READY=1 after the reload", |l| {
        l == "READY=1"
    });
    let r = c.cmd("attach c");
    assert!(
        r.starts_with("err quota exceeded: mirror quota of 2 ranges reached"),
        "{r}"
    );
    assert_eq!(
        status(&sock).unwrap()["engine.flush_latency_target_ns"],
        120_000
    );
    let err = p.stderr();
    let applied = err
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        applied.contains("log_level, device.flush_latency_us, quotas.mirrors"),
        "{applied}"
    );
    let refused = err
        .lines()
        .find(|l| l.contains("not applied"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        refused.contains("keys=device.engines") && refused.contains(f.to_str().unwrap()),
        "{refused}"
    );
    // The new log level is in force: a new client's debug line appears.
    let _c2 = TestClient::start(&sock);
    p.wait_for_stderr("client connected");

    // A bad file: reported, and nothing changes.
    std::fs::write(&f, "[quotas]\nmirrors = 9\nbogus = 1\n").unwrap();
    p.signal(Signal::SIGHUP);
    let rl = n.wait_for(ready2 + 1, "RELOADING=1", |l| l == "RELOADING=1");
    n.wait_for(rl + 1, "READY=1", |l| l == "READY=1");
    p.wait_for_stderr("reload failed, the running configuration stays");
    assert!(p.stderr().contains(&format!(
        "{} line 3: unknown key `quotas.bogus`",
        f.display()
    )));
    let r = c.cmd("attach c");
    assert!(r.starts_with("err quota exceeded"), "{r}");
}

/// `JOURNAL_STREAM` naming stderr selects the journal; where no journal socket exists the
/// daemon says so and logs to stderr. A `JOURNAL_STREAM` naming another file is ignored.
#[test]
fn journald_is_chosen_when_journal_stream_names_stderr() {
    let dir = TempDir::new("journal");
    let mut n = Notify::new(dir.path());
    let sock = dir.path().join("d.sock");
    let mut cmd = memshadowd(&["--no-config", "--socket", sock.to_str().unwrap()]);
    cmd.env("NOTIFY_SOCKET", &n.path);
    let p = Proc::spawn_with(cmd, true);
    n.wait_for(0, "READY=1", |l| l == "READY=1");
    if Path::new("/run/systemd/journal/socket").exists() {
        // Events went to the journal, none to stderr.
        assert!(
            !p.stderr().contains("memshadowd listening"),
            "{}",
            p.stderr()
        );
    } else {
        p.wait_for_stderr("the journal socket cannot be used; logging to stderr");
        p.wait_for_stderr("memshadowd listening");
    }
    drop(p);

    let sock2 = dir.path().join("d2.sock");
    let mut cmd = memshadowd(&["--no-config", "--socket", sock2.to_str().unwrap()]);
    cmd.env("JOURNAL_STREAM", "0:0");
    let p = Proc::spawn(cmd);
    p.wait_for_stderr("memshadowd listening");
    assert!(
        !p.stderr().contains("journal socket cannot be used"),
        "{}",
        p.stderr()
    );
}

/// Capability numbers of the names the unit may use.
fn cap_bit(name: &str) -> u32 {
    match name {
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        other => panic!("add {other} to cap_bit"),
    }
}

/// The unit's `CapabilityBoundingSet=` is what the daemon needs, no less (and the kept
/// capability does what the unit's comment says): the daemon runs as root limited to it and
/// serves a client of another uid through the mem fd that client handed over, and sees its
/// fork; with no capability at all it still serves the client, but gets no fork events (the
/// child just is not mirrored).
#[test]
fn unit_capabilities_are_what_the_daemon_uses() {
    if !is_root("unit_capabilities_are_what_the_daemon_uses") {
        return;
    }
    let Some(setpriv) = tool("setpriv", "util-linux") else {
        return;
    };
    let caps = unit_values(&unit("memshadowd.service"), "CapabilityBoundingSet");
    assert_eq!(caps, ["CAP_SYS_PTRACE"]);
    let run = |caps: &[&str]| -> (String, String) {
        let dir = TempDir::new("caps");
        let sock = dir.path().join("d.sock");
        let bounding = std::iter::once("-all".to_owned())
            .chain(
                caps.iter()
                    .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase())),
            )
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(&setpriv);
        cmd.args([
            "--bounding-set",
            &bounding,
            "--inh-caps",
            "-all",
            "--no-new-privs",
        ])
        .arg(binary("memshadowd"))
        .args(["--no-config", "--socket", sock.to_str().unwrap()])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS");
        let p = Proc::spawn(cmd);
        wait_serving(&sock);
        let st = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        let eff = st
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        let want = caps.iter().map(|c| 1u64 << cap_bit(c)).sum::<u64>();
        assert_eq!(eff, want, "the daemon runs with exactly {caps:?}");
        let mut client = Command::new(&setpriv);
        client
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(binary("test-client"))
            .arg(&sock);
        let mut c = TestClient::start_command(client);
        let answer = fields(&c.expect_ok("access"));
        let access = answer["access"].clone();
        // The features the daemon enabled: EVENT_FORK (1 << 1) only with CAP_SYS_PTRACE.
        let features =
            u64::from_str_radix(answer["features"].trim_start_matches("0x"), 16).unwrap();
        let fork_enabled = features & (1 << 1) != 0;
        c.expect_ok("map a 4");
        c.expect_ok("fill a 9");
        c.expect_ok("attach a");
        assert_eq!(fields(&c.expect_ok("read a 0 16384"))["uniform"], "9");
        c.expect_ok("fork");
        c.expect_ok("munmap a");
        // munmap returns once the daemon has read the event; its counters follow right
        // after, so wait for them rather than race them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let stats = loop {
            let stats = fields(&c.expect_ok("stats"));
            if stats["events.unmap"] == "1" || std::time::Instant::now() > deadline {
                break stats;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(stats["events.unmap"], "1", "{stats:?}");
        assert_eq!(
            fork_enabled,
            stats["events.fork"] == "1",
            "features {features:#x} vs {stats:?}"
        );
        (access, stats["events.fork"].clone())
    };
    assert_eq!(run(&["CAP_SYS_PTRACE"]), ("mem-fd".into(), "1".into()));
    assert_eq!(
        run(&[]),
        ("mem-fd".into(), "0".into()),
        "without CAP_SYS_PTRACE no fork events"
    );
}

/// Every system call of a syscall-filter group, expanded by systemd-analyze.
fn expand_group(analyze: &Path, group: &str, out: &mut BTreeSet<String>) {
    let o = Command::new(analyze)
        .args(["syscall-filter", group])
        .output()
        .unwrap();
    assert!(o.status.success(), "systemd-analyze syscall-filter {group}");
    for l in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
        let w = l.trim();
        if w.is_empty() || w.starts_with('#') {
            continue;
        }
        if w.starts_with('@') {
            expand_group(analyze, w, out);
        } else {
            out.insert(w.to_owned());
        }
    }
}

/// The daemon's system calls, seen by strace over a run that binds clients, mirrors, reads,
/// sees munmap/madvise/mremap events, pings the watchdog, reloads and
/// stops, all fit the unit's `SystemCallFilter=`; its sockets are `AF_UNIX` only
/// (`RestrictAddressFamilies=`); it locks no memory (no `LimitMEMLOCK=` needed) and never
/// maps memory writable and executable or makes it executable (`MemoryDenyWriteExecute=`).
#[test]
fn daemon_system_calls_fit_the_unit_filter() {
    let (Some(strace), Some(analyze)) =
        (tool("strace", "strace"), tool("systemd-analyze", "systemd"))
    else {
        return;
    };
    let filter = unit_values(&unit("memshadowd.service"), "SystemCallFilter");
    let mut allowed = BTreeSet::new();
    for w in &filter {
        assert!(!w.starts_with('~'), "this check handles allow-lists only");
        if w.starts_with('@') {
            expand_group(&analyze, w, &mut allowed);
        } else {
            allowed.insert(w.clone());
        }
    }
    assert!(allowed.len() > 100, "{allowed:?}");
    let families = unit_values(&unit("memshadowd.service"), "RestrictAddressFamilies");
    assert_eq!(families, ["AF_UNIX"]);
    {
        let dir = TempDir::new("strace");
        let mut n = Notify::new(dir.path());
        let sock = dir.path().join("d.sock");
        let trace = dir.path().join("trace");
        let mut cmd = Command::new(&strace);
        cmd.args(["-f", "-qq", "-o"])
            .arg(&trace)
            .arg(binary("memshadowd"))
            .args(["--no-config", "--log-level", "debug"])
            .arg("--socket")
            .arg(&sock)
            .env("NOTIFY_SOCKET", &n.path)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("LISTEN_FDS")
            .env_remove("JOURNAL_STREAM");
        let mut p = Proc::spawn(cmd);
        let ready = n.wait_for(0, "READY=1", |l| l == "READY=1");
        let daemon = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", p.pid()))
            .unwrap()
            .split_whitespace()
            .next()
            .map(|s| s.parse::<i32>().unwrap())
            .unwrap();
        let mut c = TestClient::start(&sock);
        assert_eq!(fields(&c.expect_ok("access"))["access"], "mem-fd");
        for kind in ["munmap", "dontneed", "remove", "mremap"] {
            c.expect_ok(&format!("g1 {kind} 3"));
        }
        c.expect_ok("map a 8");
        c.expect_ok("fill a 1");
        c.expect_ok("attach a");
        c.expect_ok("populate a");
        c.expect_ok("read a 0 32768");
        c.expect_ok("stats");
        let ctl = memshadow::Client::connect_control(Some(&sock)).unwrap();
        ctl.status().unwrap();
        ctl.list_clients().unwrap();
        while n.count(0..n.msgs.len(), "WATCHDOG=1") < 2 {
            n.recv_for(Duration::from_millis(50));
        }
        kill(Pid::from_raw(daemon), Signal::SIGHUP).unwrap();
        let rl = n.wait_for(ready + 1, "RELOADING=1", |l| l == "RELOADING=1");
        n.wait_for(rl + 1, "READY=1", |l| l == "READY=1");
        drop((c, ctl));
        kill(Pid::from_raw(daemon), Signal::SIGTERM).unwrap();
        assert!(p.wait().success(), "{}", p.stderr());

        let text = std::fs::read_to_string(&trace).unwrap();
        let mut seen = BTreeSet::new();
        for line in text.lines() {
            let rest = line
                .split_once(' ')
                .map_or("", |(_, r)| r.trim_start())
                .trim_start_matches("<... ");
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let follows = rest[name.len()..].chars().next();
            if !name.is_empty() && matches!(follows, Some('(') | Some(' ')) {
                seen.insert(name.clone());
            }
            if rest.starts_with("socket(") {
                assert!(rest.starts_with("socket(AF_UNIX"), "{line}");
            }
            if rest.starts_with("mprotect(") || rest.starts_with("pkey_mprotect(") {
                assert!(!rest.contains("PROT_EXEC"), "{line}");
            }
            if rest.starts_with("mmap(") {
                assert!(
                    !(rest.contains("PROT_WRITE") && rest.contains("PROT_EXEC")),
                    "{line}"
                );
            }
        }
        assert!(seen.contains("epoll_wait") || seen.contains("epoll_pwait"));
        assert!(
            seen.contains("ioctl") && seen.contains("accept4"),
            "{seen:?}"
        );
        assert!(!seen.contains("process_vm_readv"), "{seen:?}");
        for lock in ["mlock", "mlock2", "mlockall"] {
            assert!(!seen.contains(lock), "the daemon calls {lock}");
        }
        let outside: Vec<_> = seen.difference(&allowed).collect();
        assert!(
            outside.is_empty(),
            "system calls outside the unit's SystemCallFilter: {outside:?}"
        );
    }
}

/// The install script stages binaries, units (ExecStart rewritten), the example config
/// (never overwriting an existing one), the header, pkg-config file and libraries when they
/// exist (the shared one as `libmemshadow.so.X.Y.Z` with the links `libmemshadow.so.X` and
/// `libmemshadow.so`), and the memshadow group, all under a DESTDIR; on this tree, what is
/// not built yet is skipped with a message.
#[test]
fn install_script_stages_everything_under_destdir() {
    let script = root().join("systemd/install.sh");
    let run = |args: &[&str]| -> String {
        let out = Command::new("bash")
            .arg(&script)
            .args(args)
            .env_remove("DESTDIR")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "install.sh {args:?} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let bins = binary("memshadowd").parent().unwrap().to_owned();
    let have_groupadd = tool("groupadd", "passwd").is_some();

    // 1. This tree, into a staging root with its own /etc/group.
    let stage = TempDir::new("install");
    let d = stage.path();
    std::fs::create_dir_all(d.join("etc")).unwrap();
    std::fs::write(d.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(d.join("etc/gshadow"), "root:*::\n").unwrap();
    let out = run(&[
        "--destdir",
        d.to_str().unwrap(),
        "--from",
        bins.to_str().unwrap(),
        "--no-build",
    ]);
    let bin = d.join("usr/local/bin/memshadowd");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(binary("memshadowd")).unwrap()
    );
    assert_eq!(std::fs::metadata(&bin).unwrap().mode() & 0o777, 0o755);
    let units = d.join("usr/local/lib/systemd/system");
    assert_eq!(
        std::fs::read_to_string(units.join("memshadowd.service")).unwrap(),
        unit("memshadowd.service"),
        "prefix /usr/local: ExecStart stays /usr/local/bin/memshadowd"
    );
    assert_eq!(
        std::fs::read_to_string(units.join("memshadowd.socket")).unwrap(),
        unit("memshadowd.socket")
    );
    let conf = d.join("etc/memshadow/memshadowd.toml");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        unit("memshadowd.toml")
    );
    let check = memshadowd(&["--config", conf.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    assert!(check.status.success(), "the installed config is valid");
    let version = env!("CARGO_PKG_VERSION");
    let major = env!("CARGO_PKG_VERSION_MAJOR");
    let real = format!("libmemshadow.so.{version}");
    let soname = format!("libmemshadow.so.{major}");
    for (artifact, path) in [
        ("memshadowctl", "usr/local/bin/memshadowctl"),
        ("libmemshadow.so", "usr/local/lib/libmemshadow.so"),
        ("libmemshadow.so", &format!("usr/local/lib/{real}")),
        ("libmemshadow.so", &format!("usr/local/lib/{soname}")),
        ("libmemshadow.a", "usr/local/lib/libmemshadow.a"),
    ] {
        let built = bins.join(artifact).exists();
        assert_eq!(d.join(path).exists(), built, "{artifact}");
        if !built {
            assert!(
                out.contains(&format!("skipped {artifact}: not built")),
                "{out}"
            );
        }
    }
    if bins.join("libmemshadow.so").exists() {
        let lib = d.join("usr/local/lib");
        assert_eq!(
            std::fs::read(lib.join(&real)).unwrap(),
            std::fs::read(bins.join("libmemshadow.so")).unwrap()
        );
        assert_eq!(
            std::fs::read_link(lib.join(&soname)).unwrap(),
            Path::new(&real)
        );
        assert_eq!(
            std::fs::read_link(lib.join("libmemshadow.so")).unwrap(),
            Path::new(&soname)
        );
        assert!(
            out.contains("next (on the target machine): ldconfig"),
            "{out}"
        );
    }
    for (src, path, name) in [
        (
            "client-lib/include/memshadow.h",
            "usr/local/include/memshadow.h",
            "memshadow.h",
        ),
        (
            "client-lib/memshadow.pc.in",
            "usr/local/lib/pkgconfig/memshadow.pc",
            "memshadow.pc",
        ),
    ] {
        let present = root().join(src).exists();
        assert_eq!(d.join(path).exists(), present, "{name}");
        if !present {
            assert!(out.contains(&format!("skipped {name}: ")), "{out}");
        }
    }
    if have_groupadd {
        let groups = std::fs::read_to_string(d.join("etc/group")).unwrap();
        assert!(
            groups.lines().any(|l| l.starts_with("memshadow:x:")),
            "{groups}"
        );
    }
    // Again, over an edited configuration: kept.
    std::fs::write(&conf, "workers = 7\n").unwrap();
    let out = run(&[
        "--destdir",
        d.to_str().unwrap(),
        "--from",
        bins.to_str().unwrap(),
        "--no-build",
    ]);
    assert!(out.contains("kept "), "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "workers = 7\n");
    assert_eq!(
        std::fs::read_to_string(d.join("etc/memshadow/memshadowd.toml.example")).unwrap(),
        unit("memshadowd.toml")
    );
    if have_groupadd {
        assert!(out.contains("group memshadow exists"), "{out}");
    }

    // 2. A tree where the C ABI artifacts exist (as the capi work adds them), prefix /usr.
    let src = TempDir::new("install-src");
    let s = src.path();
    std::fs::create_dir_all(s.join("systemd")).unwrap();
    std::fs::create_dir_all(s.join("client-lib/include")).unwrap();
    for f in ["memshadowd.service", "memshadowd.socket", "memshadowd.toml"] {
        std::fs::write(s.join("systemd").join(f), unit(f)).unwrap();
    }
    std::fs::write(
        s.join("Cargo.toml"),
        "[workspace.package]\nversion = \"9.8.7\"\n",
    )
    .unwrap();
    std::fs::write(s.join("client-lib/include/memshadow.h"), "/* header */\n").unwrap();
    std::fs::write(
        s.join("client-lib/memshadow.pc.in"),
        "prefix=@PREFIX@\nlibdir=@LIBDIR@\nincludedir=@INCLUDEDIR@\nVersion: @VERSION@\n",
    )
    .unwrap();
    let from = TempDir::new("install-bins");
    let fb = from.path();
    std::fs::copy(binary("memshadowd"), fb.join("memshadowd")).unwrap();
    std::fs::copy(binary("test-client"), fb.join("memshadowctl")).unwrap();
    std::fs::write(fb.join("libmemshadow.so"), "so").unwrap();
    std::fs::write(fb.join("libmemshadow.a"), "a").unwrap();
    let stage2 = TempDir::new("install2");
    let d = stage2.path();
    let out = run(&[
        "--srcdir",
        s.to_str().unwrap(),
        "--destdir",
        d.to_str().unwrap(),
        "--from",
        fb.to_str().unwrap(),
        "--prefix",
        "/usr",
        "--no-build",
        "--no-group",
    ]);
    for p in [
        "usr/bin/memshadowd",
        "usr/bin/memshadowctl",
        "usr/lib/libmemshadow.so.9.8.7",
        "usr/lib/libmemshadow.a",
        "usr/include/memshadow.h",
        "etc/memshadow/memshadowd.toml",
    ] {
        assert!(d.join(p).is_file(), "{p} missing:\n{out}");
    }
    // The major version of 9.8.7 names the SONAME link (the stand-in library is no ELF
    // file, so its SONAME is not checked).
    for (link, to) in [
        ("usr/lib/libmemshadow.so.9", "libmemshadow.so.9.8.7"),
        ("usr/lib/libmemshadow.so", "libmemshadow.so.9"),
    ] {
        assert_eq!(std::fs::read_link(d.join(link)).unwrap(), Path::new(to));
    }
    assert_eq!(
        std::fs::read(d.join("usr/lib/libmemshadow.so")).unwrap(),
        b"so"
    );

    // The real library (SONAME libmemshadow.so.0) does not pass for version 9.8.7.
    if bins.join("libmemshadow.so").exists() && tool("readelf", "binutils").is_some() {
        std::fs::copy(bins.join("libmemshadow.so"), fb.join("libmemshadow.so")).unwrap();
        let stage3 = TempDir::new("install3");
        let o = Command::new("bash")
            .arg(&script)
            .args(["--srcdir", s.to_str().unwrap(), "--destdir"])
            .arg(stage3.path())
            .args(["--from", fb.to_str().unwrap(), "--no-build", "--no-group"])
            .env_remove("DESTDIR")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "installed a library of another major version"
        );
        assert!(
            err.contains("has the SONAME libmemshadow.so.0, not libmemshadow.so.9"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(d.join("usr/lib/pkgconfig/memshadow.pc")).unwrap(),
        "prefix=/usr\nlibdir=/usr/lib\nincludedir=/usr/include\nVersion: 9.8.7\n"
    );
    let service =
        std::fs::read_to_string(d.join("usr/lib/systemd/system/memshadowd.service")).unwrap();
    assert!(
        service
            .lines()
            .any(|l| l == "ExecStart=/usr/bin/memshadowd"),
        "ExecStart follows the prefix"
    );
    assert!(out.contains("skipped group memshadow: --no-group"), "{out}");
    assert!(!d.join("etc/group").exists());
}
