//! The harness of the integration tests, one of each:
//!
//! * [`wait_until`]: the one way a test waits for something. It polls a condition, and
//!   when a generous limit passes (a guard against a hang, never part of what a test
//!   checks) it panics saying what it waited for and what it saw last.
//!   [`Daemon::wait_until`] adds the daemon's log to that message.
//! * [`Daemon`]: the real `memshadowd` on a socket in a temporary directory, with its
//!   options, environment, an optional wrapper (`strace`, `setpriv`,
//!   `systemd-socket-activate`) and a socket handed over instead; its log is a file, whose
//!   tail every failure shows; killed and cleaned up on drop. [`Daemon::start`] for the
//!   common case, [`Daemon::builder`] for the rest.
//! * [`TestClient`]: a real client process (`test-client`) driven over a pipe.
//! * Skips: a test that cannot run here (not root, a system tool missing) calls
//!   [`needs_root`], [`needs_full_userfaultfd`] or [`tool`], which record it with the reason
//!   in the skip list that `tests/run.sh` prints at the end, and say so on stderr at once.
//!   With `MEMSHADOW_TESTS_REQUIRE_ALL=1` (set by `.ci/run`) a skip is a failure instead.
//!   The daemon's unit tests keep the same list (`daemon/src/test_support.rs`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// =======================================================================================
// Waiting.

/// The limit of every wait that only guards against a hang: far beyond what anything takes
/// on a loaded machine, so that no test depends on timing to pass.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// What a condition of [`wait_until`] returns: `bool`, `Option<T>` (the value waited for),
/// or `Result<T, E>` (an `Err` says what the condition saw, and the last one is shown if
/// the wait gives up).
pub trait Ready {
    /// What the wait returns once the condition holds.
    type Value;
    /// The value, or what was seen instead (if the condition says).
    fn ready(self) -> Result<Self::Value, Option<String>>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Ready for Result<T, E> {
    type Value = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

/// A wait that gave up.
#[derive(Debug, Clone)]
pub struct TimedOut {
    /// How long it waited.
    pub limit: Duration,
    /// What the condition said it saw the last time, if it says.
    pub last: Option<String>,
}

impl Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gave up after {:?}", self.limit)?;
        if let Some(last) = &self.last {
            write!(f, "; last seen: {last}")?;
        }
        Ok(())
    }
}

/// Polls `cond` (at once, then every few milliseconds) until it holds, and returns its
/// value; or, once `limit` has passed, what it saw last.
pub fn try_wait_until<R: Ready>(
    limit: Duration,
    cond: impl FnMut() -> R,
) -> Result<R::Value, TimedOut> {
    let mut pause = Duration::from_millis(1);
    poll_until(limit, cond, move || {
        let p = pause;
        pause = (pause * 2).min(Duration::from_millis(20));
        p
    })
}

/// [`try_wait_until`] with a fixed `pause` between two calls of `cond`:
/// [`Duration::ZERO`] for a condition that blocks by itself for a while (on `poll(2)`, a
/// socket timeout), a longer one for a condition that should not run too often.
pub fn try_wait_until_every<R: Ready>(
    limit: Duration,
    pause: Duration,
    cond: impl FnMut() -> R,
) -> Result<R::Value, TimedOut> {
    poll_until(limit, cond, || pause)
}

/// The one loop that waits: `cond` until it holds or `limit` has passed, `pause()` between.
fn poll_until<R: Ready>(
    limit: Duration,
    mut cond: impl FnMut() -> R,
    mut pause: impl FnMut() -> Duration,
) -> Result<R::Value, TimedOut> {
    let deadline = Deadline::after(limit);
    loop {
        match cond().ready() {
            Ok(v) => return Ok(v),
            Err(last) if deadline.passed() => return Err(TimedOut { limit, last }),
            Err(_) => std::thread::sleep(pause()),
        }
    }
}

/// Polls `cond` until it holds and returns its value; panics after `limit` (a hang guard:
/// use [`HANG_GUARD`] unless the test has a reason) saying that it waited for `what`, and
/// what the condition saw last.
pub fn wait_until<R: Ready>(
    what: impl Display,
    limit: Duration,
    cond: impl FnMut() -> R,
) -> R::Value {
    try_wait_until(limit, cond).unwrap_or_else(|t| panic!("waiting for {what}: {t}"))
}

/// Calls `f` again and again for `window`, or until it returns false: for a test that
/// collects what arrives in a window (e.g. that no watchdog ping comes while a loop is
/// wedged) or does something for a while. The window is part of what such a test checks; a
/// slow machine only makes it see less, never fail wrongly.
pub fn repeat_for(window: Duration, mut f: impl FnMut() -> bool) {
    let end = Deadline::after(window);
    while !end.passed() && f() {}
}

/// A point in time a test stops at: the end of a time budget (how long to fuzz, how long
/// to look for a leak). For waiting on a condition, use [`wait_until`].
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// `d` from now.
    pub fn after(d: Duration) -> Deadline {
        Deadline(Instant::now() + d)
    }
    /// The earlier of two.
    pub fn min(self, other: Deadline) -> Deadline {
        Deadline(self.0.min(other.0))
    }
    /// Whether it has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.0
    }
}

// =======================================================================================
// Skips: tests that cannot run here.

/// True if `MEMSHADOW_TESTS_REQUIRE_ALL` is set (not empty, not 0): every test must run,
/// a skip is a failure (`.ci/run` sets it).
pub fn require_all() -> bool {
    std::env::var("MEMSHADOW_TESTS_REQUIRE_ALL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `binary test`, the name of the running test (libtest names its thread after it).
pub fn test_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_ref()
        .and_then(|e| e.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Cargo names test binaries `NAME-HASH`.
    let binary = stem.rsplit_once('-').map_or(stem.as_str(), |(b, _)| b);
    let thread = std::thread::current();
    format!("{binary} {}", thread.name().unwrap_or("?"))
}

/// The directory of the skip list: `MEMSHADOW_SKIP_DIR` (set by `tests/run.sh`), else
/// `memshadow-skips/` in cargo's target directory.
pub fn skip_dir() -> PathBuf {
    std::env::var_os("MEMSHADOW_SKIP_DIR").map_or_else(
        || {
            bin_dir()
                .parent()
                .map_or_else(bin_dir, Path::to_owned)
                .join("memshadow-skips")
        },
        PathBuf::from,
    )
}

/// The running test cannot run here, because `why`: recorded in the skip list and said
/// on stderr at once (not captured by the test runner). Under
/// `MEMSHADOW_TESTS_REQUIRE_ALL=1`, a failure instead. The caller returns after it, or, if
/// only a part of the test cannot run (`why` says which), goes on without that part.
pub fn skip(why: impl Display) {
    let line = format!("{}: {why}", test_name());
    assert!(
        !require_all(),
        "{line} (MEMSHADOW_TESTS_REQUIRE_ALL is set: every test must run)"
    );
    let dir = skip_dir();
    let recorded = std::fs::create_dir_all(&dir).and_then(|()| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.skip", std::process::id())))?;
        f.write_all(format!("{line}\n").as_bytes())
    });
    // Straight to fd 2: the test runner captures only print! and eprint!.
    let _ = writeln!(std::io::stderr(), "SKIPPED {line}");
    if let Err(e) = recorded {
        let _ = writeln!(
            std::io::stderr(),
            "(could not add it to the skip list in {}: {e})",
            dir.display()
        );
    }
}

/// True if this process is root; else records a skip saying the test needs root for
/// `what` (e.g. "runs clients as nobody"), and returns false.
pub fn needs_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip(format!("needs root: {what}"));
    false
}

/// True if this process may create a userfaultfd that also reports faults of the kernel
/// (no `UFFD_USER_MODE_ONLY`), as a client of this user then gets: root, `CAP_SYS_PTRACE`
/// or `vm.unprivileged_userfaultfd = 1`. Else records a skip saying so and returns false.
/// `what` says what the test needs it for.
pub fn needs_full_userfaultfd(what: &str) -> bool {
    // SAFETY: a plain system call; a non-negative result is a new fd, closed right away.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: the fd was just created here and nothing else knows it.
        unsafe { libc::close(fd as RawFd) };
        return true;
    }
    let err = std::io::Error::last_os_error();
    skip(format!(
        "needs root (or vm.unprivileged_userfaultfd = 1): {what}; a userfaultfd without \
         UFFD_USER_MODE_ONLY is refused here ({err})"
    ));
    false
}

/// Where distributions put programs: a plain user's `PATH` often lacks the `sbin`
/// directories (`runuser`, `groupadd`).
pub const SYSTEM_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The system tool `name`, looked up in `PATH` and then in [`SYSTEM_DIRS`]; if it is
/// missing, records a skip naming the Debian `package` that has it, and returns `None`.
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = find_program(name);
    if found.is_none() {
        skip(format!(
            "needs {name}, which is not installed (Debian package {package})"
        ));
    }
    found
}

/// The interpreter behind `python3` (its `sys.executable`: no shim script of a version
/// manager in between) and its version; `Ok(None)` if there is no `python3`, `Err` if it
/// does not say.
pub fn python3() -> Result<Option<(PathBuf, String)>, String> {
    let Some(python) = find_program("python3") else {
        return Ok(None);
    };
    let out = Command::new(&python)
        .args([
            "-c",
            "import sys; print(sys.executable); print(sys.version.split()[0])",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    match (out.status.success(), lines.next(), lines.next()) {
        (true, Some(exe), Some(version)) if !exe.is_empty() => {
            Ok(Some((PathBuf::from(exe), version.to_owned())))
        }
        _ => Err(format!(
            "{} -c 'import sys; print(sys.executable)' printed {text:?} ({}); {}",
            python.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// `name` in `PATH` or [`SYSTEM_DIRS`], without recording anything.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `PATH` with [`SYSTEM_DIRS`] after it, for scripts run by a test that look programs up
/// themselves (as `systemd/install.sh` does `groupadd`).
pub fn path_with_system_dirs() -> OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .collect();
    std::env::join_paths(dirs).unwrap_or(path)
}

// =======================================================================================
// Files and binaries.

/// The median and 99th percentile of some samples, and how many there were.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Samples.
    pub n: usize,
}

/// Nearest-rank percentiles of `v` (NaN for no samples): the benchmarks' statistics.
pub fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    };
    Percentiles {
        p50: at(50.0),
        p99: at(99.0),
        n: v.len(),
    }
}

/// A fresh private anonymous read-write mapping of `len` bytes (the benchmarks' and tests'
/// buffers); the caller unmaps it.
pub fn map_anon(len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing; it aliases
    // nothing of the caller's.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

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

/// A `cargo` command for a build of its own inside a test, with the variables cargo set for
/// the test process (which describe the outer build, not this one) removed.
pub fn cargo_command() -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let outer = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || k == "CARGO_PRIMARY_PACKAGE"
            || k == "CARGO_TARGET_TMPDIR";
        if outer {
            cargo.env_remove(&*k);
        }
    }
    cargo
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

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
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
    /// Writes `text` to the file `name` in it; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGSTOPs process `pid` and waits until every thread of it is stopped (a signal is
/// delivered asynchronously: a thread may still run a moment after `kill` returns).
pub fn stop_process(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    );
    let state = |stat: String| -> Option<char> { stat.rsplit_once(") ")?.1.chars().next() };
    wait_until(format!("process {pid} to stop"), HANG_GUARD, || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.filter_map(Result::ok).all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(state)
                .is_some_and(|c| c == 'T' || c == 't')
        })
    });
}

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .is_some_and(|st| st != 'Z' && st != 'X')
}

/// The children of process `pid` (of each of its threads).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// `(soft, hard)` "Max open files" of process `pid` (`/proc/PID`, e.g. `self`).
pub fn nofile_of(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let w: Vec<&str> = line.split_whitespace().collect();
    let n = |s: &str| {
        if s == "unlimited" {
            u64::MAX
        } else {
            s.parse().expect("a number")
        }
    };
    (n(w[3]), n(w[4]))
}

// =======================================================================================
// The daemon.

/// Environment variables of a service manager, and the test hooks: removed from every
/// daemon's environment, so that only what a test sets is there.
const SERVICE_ENV: [&str; 10] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "JOURNAL_STREAM",
    "MEMSHADOW_SOCKET",
    "MEMSHADOWD_TEST_STALL",
    "MEMSHADOW_FUZZ_WORKER",
];

/// `memshadowd ARGS` with none of the variables a service manager sets (a test sets those
/// it wants), for a run that ends by itself (`--print-config`, a refused configuration).
/// `MEMSHADOW_LOG` passes through unless the caller removes it.
pub fn daemon_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("memshadowd"));
    cmd.args(args);
    for v in SERVICE_ENV {
        cmd.env_remove(v);
    }
    cmd
}

/// How to start a [`Daemon`]: made by [`Daemon::builder`], run by
/// [`DaemonBuilder::start`] (waits until it serves) or [`DaemonBuilder::spawn`].
#[derive(Debug)]
pub struct DaemonBuilder {
    dir: TempDir,
    socket: PathBuf,
    pass_socket: bool,
    wrapper: Vec<OsString>,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    journal_stream: bool,
    listen_fd: Option<RawFd>,
    nofile_soft: Option<u64>,
}

impl DaemonBuilder {
    /// The daemon's directory (its socket, its log; a test may put files there).
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// Where the daemon will listen.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// More `memshadowd` arguments. `--no-config` comes first unless they name
    /// `--config` (or `--no-config`); `--socket` follows unless the socket is passed in.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable of the daemon.
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env
            .push((k.as_ref().to_owned(), Some(v.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable of the daemon (e.g. `MEMSHADOW_LOG`, which passes
    /// through from the test's environment otherwise).
    pub fn env_remove(mut self, k: impl AsRef<OsStr>) -> Self {
        self.env.push((k.as_ref().to_owned(), None));
        self
    }

    /// Runs the daemon under `argv` (`strace -f -o FILE`, `setpriv ...`,
    /// `systemd-socket-activate ...`): `argv`, then the daemon binary and its arguments.
    /// [`Daemon::pid`] is then the wrapper's pid.
    pub fn wrapper<S: AsRef<OsStr>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.wrapper = argv.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// The listening socket is made by someone else (socket activation) at `path`: no
    /// `--socket` argument; [`Daemon::socket`] is `path`.
    pub fn socket_passed_in(mut self, path: &Path) -> Self {
        self.socket = path.to_owned();
        self.pass_socket = false;
        self
    }

    /// Hands the listening socket `fd` over the way systemd does: as fd 3, with
    /// `LISTEN_FDS=1` and `LISTEN_PID` the daemon's pid (a `sh` sets it and execs the
    /// daemon). `path` is where that socket is bound.
    pub fn listen_fd(mut self, fd: RawFd, path: &Path) -> Self {
        self.listen_fd = Some(fd);
        self.socket_passed_in(path)
    }

    /// Sets `JOURNAL_STREAM` to the daemon's stderr (its log file), as systemd does when
    /// it connects stderr to the journal.
    pub fn journal_stream(mut self) -> Self {
        self.journal_stream = true;
        self
    }

    /// Starts the daemon with this soft open-file limit (the hard one stays).
    pub fn nofile_soft(mut self, soft: u64) -> Self {
        self.nofile_soft = Some(soft);
        self
    }

    /// Starts the daemon and waits until it answers a status request (panics, with its
    /// log, if it exits first or never does).
    pub fn start(self) -> Daemon {
        let d = self.spawn();
        d.wait_until("memshadowd to serve its socket", HANG_GUARD, || {
            if !alive(d.pid()) {
                d.fail("memshadowd exited before it served its socket");
            }
            d.try_status().is_some()
        });
        d
    }

    /// Starts the daemon without waiting for it.
    pub fn spawn(self) -> Daemon {
        let log = self.dir.path().join("memshadowd.log");
        let file = std::fs::File::create(&log).expect("create the daemon's log");
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest);
                c
            }
            None => match self.listen_fd {
                Some(_) => {
                    let mut c = Command::new("sh");
                    c.arg("-c")
                        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#);
                    c
                }
                None => Command::new(binary("memshadowd")),
            },
        };
        if !self.wrapper.is_empty() || self.listen_fd.is_some() {
            cmd.arg(binary("memshadowd"));
        }
        let named = |a: &str| self.args.iter().any(|x| x == a);
        if !named("--config") && !named("--no-config") {
            cmd.arg("--no-config");
        }
        if self.pass_socket {
            cmd.arg("--socket").arg(&self.socket);
        }
        cmd.args(&self.args);
        for v in SERVICE_ENV {
            cmd.env_remove(v);
        }
        if self.journal_stream {
            let st = nix::sys::stat::fstat(&file).expect("fstat the log");
            cmd.env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino));
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(fd) = self.listen_fd {
            cmd.env("LISTEN_FDS", "1");
            // SAFETY: the hook runs between fork and exec and only calls dup2 and fcntl,
            // which are async-signal-safe and allocate nothing.
            unsafe { cmd.pre_exec(move || hand_over_fd3(fd)) };
        }
        if let Some(soft) = self.nofile_soft {
            // SAFETY: the hook runs between fork and exec and only calls getrlimit and
            // setrlimit, which are async-signal-safe and allocate nothing.
            unsafe { cmd.pre_exec(move || set_soft_nofile(soft)) };
        }
        let stderr = file.try_clone().expect("dup the log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stderr)
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn memshadowd ({cmd:?}): {e}"));
        Daemon {
            pid: child.id() as i32,
            child: Some(child),
            socket: self.socket,
            log,
            log_shown: AtomicBool::new(false),
            dir: self.dir,
        }
    }
}

/// Makes `fd` this process's fd 3, inherited across exec (between fork and exec).
fn hand_over_fd3(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: dup2 on descriptors this process owns.
    if unsafe { libc::dup2(fd, 3) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // dup2(3, 3) would keep FD_CLOEXEC: clear it either way.
    // SAFETY: fcntl on fd 3, which the dup2 above made ours.
    if unsafe { libc::fcntl(3, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the soft open-file limit, keeping the hard one (between fork and exec).
fn set_soft_nofile(soft: u64) -> std::io::Result<()> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    r.rlim_cur = soft.min(r.rlim_max);
    // SAFETY: `r` is a valid rlimit, only read.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A running `memshadowd` (or the wrapper it runs under), SIGKILLed on drop; its log (stdout
/// and stderr) is a file in its directory, shown when a test fails.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pid: i32,
    socket: PathBuf,
    log: PathBuf,
    /// A panic showed the log already (drop need not).
    log_shown: AtomicBool,
    dir: TempDir,
}

impl Daemon {
    /// Starts the daemon with extra `args` and waits until it serves.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::builder().args(args).start()
    }

    /// A daemon to configure: its own temporary directory, the socket `d.sock` in it.
    pub fn builder() -> DaemonBuilder {
        let dir = TempDir::new("daemon");
        DaemonBuilder {
            socket: dir.path().join("d.sock"),
            dir,
            pass_socket: true,
            wrapper: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            journal_stream: false,
            listen_fd: None,
            nofile_soft: None,
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// The pid of the process started (the daemon's, or its wrapper's).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the log, with a heading.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- memshadowd (pid {}), the last {} of {} lines of {} ---\n{}",
            self.pid,
            lines.len() - from,
            lines.len(),
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// Panics with `msg` and the log's tail.
    pub fn fail(&self, msg: &str) -> ! {
        let state = if alive(self.pid) { "running" } else { "exited" };
        self.log_shown.store(true, Ordering::Relaxed);
        panic!("{msg} (memshadowd {state})\n{}", self.log_tail(40))
    }

    /// [`wait_until`], with the daemon's log in the message if it gives up.
    pub fn wait_until<R: Ready>(
        &self,
        what: impl Display,
        limit: Duration,
        cond: impl FnMut() -> R,
    ) -> R::Value {
        try_wait_until(limit, cond)
            .unwrap_or_else(|t| self.fail(&format!("waiting for {what}: {t}")))
    }

    /// Waits until every fence the daemon put up was lifted (reads of a fenced range are
    /// served from the client's memory and install nothing, so a test of what the shadow
    /// keeps must wait for them).
    pub fn wait_fences_lifted(&self) {
        self.wait_until("every fence to be lifted", HANG_GUARD, || {
            let st = self.status();
            let (up, lifted, timed_out) = (
                st["device.fences"],
                st["device.fences_lifted"],
                st["device.fences_timed_out"],
            );
            if up == lifted + timed_out {
                Ok(())
            } else {
                Err(format!(
                    "fences {up}, lifted {lifted}, timed out {timed_out}"
                ))
            }
        });
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        self.wait_until(format!("{needle:?} in the log"), HANG_GUARD, || {
            self.log().contains(needle)
        });
    }

    /// The daemon's counters, if it answers a status request.
    pub fn try_status(&self) -> Option<HashMap<String, u64>> {
        let c = memshadow::Client::connect_control(Some(&self.socket)).ok()?;
        Some(c.status().ok()?.counters.into_iter().collect())
    }

    /// The daemon's counters.
    pub fn status(&self) -> HashMap<String, u64> {
        self.try_status()
            .unwrap_or_else(|| self.fail("memshadowd does not answer a status request"))
    }

    /// The daemon's settings and what it chose (`info` of a status request).
    pub fn info(&self) -> HashMap<String, String> {
        let c = memshadow::Client::connect_control(Some(&self.socket))
            .unwrap_or_else(|e| self.fail(&format!("control connection: {e}")));
        let s = c
            .status()
            .unwrap_or_else(|e| self.fail(&format!("status: {e}")));
        s.info.into_iter().collect()
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

    /// Waits for the process to exit (a hang guard panics, with the log).
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| self.fail("memshadowd was waited for already"));
        match try_wait_until(HANG_GUARD, || child.try_wait().ok().flatten()) {
            Ok(st) => st,
            Err(t) => {
                self.child = Some(child);
                self.fail(&format!("waiting for memshadowd to exit: {t}"))
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Under a wrapper the daemon is its child: that goes first.
            for child in children(self.pid) {
                let _ = kill(Pid::from_raw(child), Signal::SIGCONT);
                let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = c.wait();
        }
        if std::thread::panicking() && !self.log_shown.load(Ordering::Relaxed) {
            eprintln!("{}", self.log_tail(40));
        }
    }
}

// =======================================================================================
// Clients.

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
