//! Harness of the integration tests: starts the real `memshadowd` binary on a socket in a
//! temporary directory, and real client processes (`test-client`) driven over a pipe; both
//! are killed and cleaned up on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A bare `SOCK_SEQPACKET` connection to the daemon socket at `path` (for tests that
/// speak the protocol by hand, or only check that something listens).
pub fn seqpacket_connect(path: &Path) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let s = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(s.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(s)
}

/// `target/<profile>/`, where cargo put the binaries of the workspace.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_owned()
}

/// Path of a workspace binary, with a clear message if it was not built.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first (the README's test command does)",
        p.display()
    );
    p
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "memshadow-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `memshadowd`.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    /// Starts the daemon with extra `args` and waits until it accepts connections.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = TempDir::new("e2e");
        let socket = dir.path().join("d.sock");
        let child = Command::new(binary("memshadowd"))
            // Never pick up an installed /etc/memshadow/memshadowd.toml.
            .arg("--no-config")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env(
                "MEMSHADOW_LOG",
                std::env::var("MEMSHADOW_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .expect("spawn memshadowd");
        let d = Daemon {
            child: Some(child),
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while memshadow::Client::connect_control(Some(&d.socket)).is_err() {
            assert!(
                Instant::now() < deadline,
                "memshadowd did not start listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The daemon's counters.
    pub fn status(&self) -> HashMap<String, u64> {
        let c = memshadow::Client::connect_control(Some(&self.socket)).expect("control connection");
        c.status().expect("status").counters.into_iter().collect()
    }

    /// One counter.
    pub fn counter(&self, name: &str) -> u64 {
        *self
            .status()
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// A field of `/proc/PID/status` in kB (e.g. `VmRSS`).
    pub fn proc_status_kb(&self, field: &str) -> u64 {
        let s =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read status");
        s.lines()
            .find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }

    /// Threads of the daemon.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid())).map_or(0, |d| d.count())
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// Waits for the daemon to exit and returns its exit code (`None` if killed by a signal).
    pub fn wait(&mut self) -> Option<i32> {
        self.child
            .take()
            .map(|mut c| c.wait().expect("wait"))
            .and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// A `test-client` process, driven one command line at a time.
#[derive(Debug)]
pub struct TestClient {
    child: Option<Child>,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl TestClient {
    /// Starts a client connected to `socket`.
    pub fn start(socket: &Path) -> TestClient {
        let mut cmd = Command::new(binary("test-client"));
        cmd.arg(socket);
        TestClient::start_command(cmd)
    }

    /// Starts a client connected to `socket`, with extra arguments (e.g. `--uid 65534`).
    pub fn start_with(socket: &Path, args: &[&str]) -> TestClient {
        let mut cmd = Command::new(binary("test-client"));
        cmd.arg(socket).args(args);
        TestClient::start_command(cmd)
    }

    /// Starts a client from `cmd` (`test-client SOCKET`, possibly behind a wrapper that
    /// changes its uid).
    pub fn start_command(mut cmd: Command) -> TestClient {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn test-client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut c = TestClient {
            child: Some(child),
            stdin,
            stdout,
        };
        c.expect_ok("ping");
        c
    }

    /// Sends a command and returns its answer line (`ok ...` or `err ...`).
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to test-client");
        self.stdin.flush().expect("flush");
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .expect("read from test-client");
        assert!(!answer.is_empty(), "test-client died during {line:?}");
        answer.trim_end().to_owned()
    }

    /// Sends a command that must succeed; returns what follows `ok`.
    pub fn expect_ok(&mut self, line: &str) -> String {
        let a = self.cmd(line);
        match a.strip_prefix("ok") {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("{line:?} failed: {a}"),
        }
    }

    /// The client's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// SIGKILLs the client and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses `key=value` words of an answer.
pub fn fields(answer: &str) -> HashMap<String, String> {
    answer
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
