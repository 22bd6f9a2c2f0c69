//! `memshadow-run` on real programs of the distribution, not written here (docs/preload.md):
//! a Python interpreter churning large buffers (`tests/programs/buffers.py`) and `sqlite3`
//! with a large page cache under load (`tests/programs/load.sql`). Each runs unchanged (same
//! stdout, same exit status as without memshadow-run, in the same test); at its quiet points
//! the device view of every range attached equals what `/proc/PID/mem` shows; `trace` shows
//! its unmaps and moves; an external engine reads it with the grant the library wrote. And
//! the failure modes: no daemon, the daemon killed mid-run, a tiny quota.

#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use memshadow::{Control, Engine, Error, EventKind, Target, TraceItem};
use memshadow_tests::{binary, tool, Daemon, TempDir};
use nix::sys::signal::Signal;

const PAGE: u64 = 4096;
/// A run that takes longer than this is killed and fails its test.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// What a program run produced.
#[derive(Debug)]
struct Outcome {
    stdout: String,
    stderr: String,
    status: ExitStatus,
}

impl Outcome {
    /// The lines the preload library wrote, each `memshadow-run: COMM[PID]: …`.
    fn library_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("memshadow-run:"))
            .collect()
    }

    /// Same stdout and exit status as `base`, and at most one line of the library's per
    /// process.
    fn assert_unchanged_from(&self, base: &Outcome, what: &str) {
        assert_eq!(
            self.stdout, base.stdout,
            "{what}: the program's output changed; its stderr:\n{}",
            self.stderr
        );
        assert_eq!(
            self.status.code(),
            base.status.code(),
            "{what}: exit status"
        );
        assert_eq!(self.status.signal(), base.status.signal(), "{what}");
        let mut pids: Vec<&str> = self
            .library_lines()
            .iter()
            .filter_map(|l| l.split(['[', ']']).nth(1))
            .collect();
        let n = pids.len();
        pids.sort_unstable();
        pids.dedup();
        assert_eq!(
            pids.len(),
            n,
            "{what}: more than one line from one process:\n{}",
            self.stderr
        );
    }
}

/// How a test continues a program that stopped at a quiet point.
enum Resume {
    /// A line on its stdin.
    Stdin,
    /// A line into this FIFO (the program's own stdin is its input).
    Fifo(PathBuf),
}

/// Runs `cmd`; at each `QUIET n` line of its stdout calls `at_quiet(n, pid)`, then lets it
/// go on. Kills it after [`RUN_LIMIT`] (the test then fails).
fn drive(mut cmd: Command, resume: &Resume, mut at_quiet: impl FnMut(u32, i32)) -> Outcome {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the program");
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(RUN_LIMIT).is_err() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            return true;
        }
        false
    });
    let mut out = String::new();
    for line in stdout.lines() {
        let line = line.expect("read the program's stdout");
        out.push_str(&line);
        out.push('\n');
        if let Some(n) = line.strip_prefix("QUIET ") {
            wait_until_blocked(pid);
            at_quiet(n.parse().unwrap(), pid);
            match resume {
                Resume::Stdin => {
                    let s = stdin.as_mut().unwrap();
                    s.write_all(b"\n").unwrap();
                    s.flush().unwrap();
                }
                Resume::Fifo(p) => std::fs::write(p, "\n").unwrap(),
            }
        }
    }
    drop(stdin);
    let status = child.wait().unwrap();
    let _ = done_tx.send(());
    assert!(
        !watchdog.join().unwrap(),
        "the program ran over {RUN_LIMIT:?} and was killed"
    );
    Outcome {
        stdout: out,
        stderr: err_reader.join().unwrap(),
        status,
    }
}

/// Waits until the program that printed a quiet point is really there: its first thread
/// blocked in the `read` of its stdin (Python) or the `wait4` of its shell (sqlite3's
/// `.shell`), every other thread asleep. Between the line and the block, the program still
/// runs (and writes its memory).
fn wait_until_blocked(pid: i32) {
    let blocked = [libc::SYS_read, libc::SYS_wait4, libc::SYS_waitid];
    memshadow_tests::wait_until(
        format!("program {pid} to block at its quiet point"),
        memshadow_tests::HANG_GUARD,
        || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            for t in tasks.flatten() {
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                let state = stat.rsplit(')').next()?.split_whitespace().next()?;
                if state != "S" {
                    return None;
                }
                if t.file_name().to_str()? == pid.to_string() {
                    let call = std::fs::read_to_string(t.path().join("syscall")).ok()?;
                    let nr: i64 = call.split_whitespace().next()?.parse().ok()?;
                    if !blocked.contains(&nr) {
                        return None;
                    }
                }
            }
            Some(())
        },
    );
}

/// `argv` run under memshadow-run with `options`, against the daemon at `socket`.
fn under_run(socket: &Path, options: &[&str], argv: &[OsString]) -> Command {
    let mut c = Command::new(binary("memshadow-run"));
    c.arg("--socket")
        .arg(socket)
        .args(options)
        .arg("--")
        .args(argv);
    c
}

fn plain(argv: &[OsString]) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// The Python interpreter itself (not a shim script in front of it), or a skip.
fn python() -> Option<PathBuf> {
    tool("python3", "python3")?;
    let (exe, _version) = memshadow_tests::python3()
        .unwrap()
        .expect("python3 was found above");
    Some(exe)
}

/// One run of a workload: its command line, how it is resumed, its environment.
struct Workload {
    argv: Vec<OsString>,
    resume: Resume,
    env: Vec<(&'static str, OsString)>,
    /// Keeps the run's files (database, FIFO) until the run is over.
    _dir: Option<TempDir>,
}

impl Workload {
    fn python() -> Option<Workload> {
        Some(Workload {
            argv: vec![python()?.into(), program("buffers.py").into()],
            resume: Resume::Stdin,
            env: Vec::new(),
            _dir: None,
        })
    }

    /// sqlite3 on a new database of its own, quiet points through a FIFO.
    fn sqlite() -> Option<Workload> {
        let sqlite = tool("sqlite3", "sqlite3")?;
        let dir = TempDir::new("preload-sqlite");
        let fifo = dir.path().join("quiet");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let script = format!(".read {}", program("load.sql").display());
        Some(Workload {
            argv: vec![sqlite.into(), dir.path().join("db").into(), script.into()],
            resume: Resume::Fifo(fifo.clone()),
            env: vec![("QUIET_FIFO", fifo.into())],
            _dir: Some(dir),
        })
    }

    fn command(&self, run: Option<(&Path, &[&str])>) -> Command {
        let mut c = match run {
            Some((socket, options)) => under_run(socket, options, &self.argv),
            None => plain(&self.argv),
        };
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs it (under memshadow-run with `run`), calling `at_quiet` at its quiet points.
    fn drive(&self, run: Option<(&Path, &[&str])>, at_quiet: impl FnMut(u32, i32)) -> Outcome {
        drive(self.command(run), &self.resume, at_quiet)
    }
}

fn program(name: &str) -> PathBuf {
    memshadow_tests::repo_root()
        .join("tests/programs")
        .join(name)
}

/// Syncs client `pid`, then compares the device view of every range it has attached with
/// its memory, page by page where a piece of a mirror is gone. Returns the bytes compared.
fn device_matches_memory(ctl: &Control, pid: i32) -> u64 {
    ctl.sync_pid(pid).expect("sync the program's written pages");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut compared = 0;
    for m in ctl.list_mirrors(Target::Pid(pid)).unwrap() {
        if m.state.starts_with("gone") {
            continue;
        }
        let mut at = m.addr;
        while at < m.addr + m.len {
            let n = (m.addr + m.len - at).min(1 << 20);
            compared += compare(ctl, &mem, pid, at, n, m.id);
            at += n;
        }
    }
    compared
}

/// Compares `n` bytes at `at`; a piece the device or the memory refuses is compared page
/// by page: a page the program unmapped may be refused by both, never by one alone.
fn compare(ctl: &Control, mem: &std::fs::File, pid: i32, at: u64, n: u64, id: u64) -> u64 {
    let mut buf = vec![0u8; n as usize];
    let from_mem = mem.read_exact_at(&mut buf, at);
    match (ctl.peek(pid, at, n), from_mem) {
        (Ok(dev), Ok(())) => {
            if dev != buf {
                let off = dev.iter().zip(&buf).position(|(a, b)| a != b).unwrap();
                let differ = dev.iter().zip(&buf).filter(|(a, b)| a != b).count();
                panic!(
                    "mirror {id}: the device's byte at {:#x} is {:#x}, the program's {:#x} \
                     ({differ} bytes of {n} at {at:#x} differ)\nmirrors: {:#?}\nmaps:\n{}",
                    at + off as u64,
                    dev[off],
                    buf[off],
                    ctl.list_mirrors(Target::Pid(pid)),
                    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
                );
            }
            n
        }
        _ if n > PAGE => (0..n / PAGE)
            .map(|p| compare(ctl, mem, pid, at + p * PAGE, PAGE, id))
            .sum(),
        (Err(Error::NotMirrored(_)), Err(_)) => 0,
        // A page that stopped being the mirrored mapping (it was unmapped, something else
        // is there now): the device refuses it, whatever the memory holds.
        (Err(Error::NotMirrored(_)), Ok(())) => 0,
        (dev, mem) => panic!("mirror {id} at {at:#x}: device {dev:?}, memory {mem:?}"),
    }
}

/// The `addr NAME HEX LEN` lines a program wrote on stderr.
fn addresses(stderr: &str, name: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("addr "))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name)).then(|| f.next())?
        })
        .map(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).unwrap())
        .collect()
}

/// A grant line the library wrote: `token=HEX pid=P mirror=ID addr=0x… len=N`.
#[derive(Debug)]
struct Grant {
    token: u128,
    pid: i32,
    addr: u64,
    len: u64,
}

fn grants(file: &Path) -> Vec<Grant> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f = memshadow_tests::fields(l);
            Grant {
                token: u128::from_str_radix(&f["token"], 16).unwrap(),
                pid: f["pid"].parse().unwrap(),
                addr: u64::from_str_radix(f["addr"].trim_start_matches("0x"), 16).unwrap(),
                len: f["len"].parse().unwrap(),
            }
        })
        .collect()
}

/// Reads every trace record of `pid` on a thread of its own until its `Release`.
fn trace_until_release(d: &Daemon, pid: i32) -> mpsc::Receiver<Vec<(EventKind, u64, u64)>> {
    let ctl = Control::connect_to(d.socket()).unwrap();
    let mut trace = ctl.trace(Target::Pid(pid), 0).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while let Ok(item) = trace.next_item() {
            if let TraceItem::Invalidation(r) = item {
                let r = r.report;
                seen.push((r.event, r.start, r.end));
                if r.event == EventKind::Release {
                    break;
                }
            }
        }
        let _ = tx.send(seen);
    });
    rx
}

#[test]
fn python_runs_unchanged_and_its_device_view_matches_its_memory() {
    let Some(w) = Workload::python() else { return };
    let base = w.drive(None, |_, _| {});
    assert_eq!(
        base.status.code(),
        Some(3),
        "the workload itself: {}",
        base.stderr
    );

    let d = Daemon::start(&[]);
    let dir = TempDir::new("preload-python");
    let grant_file = dir.path().join("grants");
    let ctl = Control::connect_to(d.socket()).unwrap();
    let mut trace = None;
    let mut compared = Vec::new();
    let mut listed = String::new();
    let mut engine_read = 0;
    let opts = [
        "--include",
        "all",
        "--grant-file",
        grant_file.to_str().unwrap(),
    ];
    let run = w.drive(Some((d.socket(), &opts)), |n, pid| {
        if n == 0 {
            trace = Some(trace_until_release(&d, pid));
        }
        compared.push(device_matches_memory(&ctl, pid));
        if n == 1 {
            listed = ctl_output(&d, &["mirrors", "--pid", &pid.to_string()]);
            engine_read = engine_reads_what_the_program_holds(&d, &grant_file, pid);
        }
    });
    run.assert_unchanged_from(&base, "python under memshadow-run");
    assert!(run.library_lines().is_empty(), "{}", run.stderr);
    // Every quiet point compared something: the buffers were attached.
    assert!(
        compared.iter().all(|&c| c >= 8 << 20),
        "bytes compared per quiet point: {compared:?}"
    );
    assert!(listed.contains("active"), "memshadowctl mirrors:\n{listed}");
    assert!(engine_read >= PAGE, "the engine read {engine_read} bytes");

    // trace: the 16 MiB mapping's move (mremap) unmapped its old place; freed buffers too.
    let seen = trace
        .unwrap()
        .recv_timeout(Duration::from_secs(60))
        .unwrap();
    let maps = addresses(&run.stderr, "mmap");
    assert_eq!(maps.len(), 2, "{}", run.stderr);
    let moved = seen
        .iter()
        .any(|&(k, s, e)| k == EventKind::Unmap && s <= maps[0] && maps[0] < e);
    assert!(
        moved || maps[0] == maps[1],
        "no unmap of {:#x} in {seen:?}",
        maps[0]
    );
    let unmaps = seen.iter().filter(|(k, ..)| *k == EventKind::Unmap).count();
    assert!(unmaps >= 4, "{unmaps} unmaps traced: {seen:?}");

    // fork: the child attached nothing; exec: the new interpreter did.
    let g = grants(&grant_file);
    let forked: i32 = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("forked "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        g.iter().all(|g| g.pid != forked),
        "the forked child attached: {g:?}"
    );
    let main = g.first().unwrap().pid;
    assert!(
        g.iter().any(|g| g.pid != main && g.len >= 12 << 20),
        "the exec'ed interpreter's 12 MiB buffer was not attached: {g:?}"
    );
}

/// `memshadowctl ARGS` against the daemon, which must succeed; its stdout.
fn ctl_output(d: &Daemon, args: &[&str]) -> String {
    let out = Command::new(binary("memshadowctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "memshadowctl {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// An external engine, in this process, attaches with a grant the library wrote for
/// `pid` and reads the whole mirror: the bytes equal the program's. Returns bytes read.
fn engine_reads_what_the_program_holds(d: &Daemon, grant_file: &Path, pid: i32) -> u64 {
    let ctl = Control::connect_to(d.socket()).unwrap();
    let live: Vec<(u64, u64)> = ctl
        .list_mirrors(Target::Pid(pid))
        .unwrap()
        .iter()
        .filter(|m| m.state.starts_with("active"))
        .map(|m| (m.addr, m.len))
        .collect();
    let grant = grants(grant_file)
        .into_iter()
        .find(|g| g.pid == pid && live.contains(&(g.addr, g.len)))
        .expect("a grant of a live mirror");
    let mut engine = Engine::attach(Some(d.socket()), grant.token).unwrap();
    let mut dev = vec![0u8; grant.len as usize];
    engine.read(0, &mut dev).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; grant.len as usize];
    mem.read_exact_at(&mut buf, grant.addr).unwrap();
    assert!(
        dev == buf,
        "the engine's read differs from the program's memory"
    );
    grant.len
}

#[test]
fn sqlite_under_load_runs_unchanged_with_its_cache_mirrored() {
    let Some(w) = Workload::sqlite() else { return };
    let base = w.drive(None, |_, _| {});
    assert_eq!(base.status.code(), Some(4), "the workload itself: {base:?}");
    let d = Daemon::start(&[]);
    let ctl = Control::connect_to(d.socket()).unwrap();
    let mut compared = Vec::new();
    let w = Workload::sqlite().unwrap();
    let run = w.drive(Some((d.socket(), &["--include", "all"])), |_, pid| {
        compared.push(device_matches_memory(&ctl, pid));
    });
    run.assert_unchanged_from(&base, "sqlite3 under memshadow-run");
    assert!(run.library_lines().is_empty(), "{}", run.stderr);
    assert_eq!(compared.len(), 3);
    // The page cache (the heap) is mirrored: tens of MiB by the first quiet point.
    assert!(
        compared.iter().all(|&c| c >= 32 << 20),
        "bytes compared: {compared:?}"
    );
}

/// What goes wrong in a failure-mode run.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// No daemon at the socket.
    Absent,
    /// The daemon is SIGKILLed at the first quiet point after the first.
    KilledMidRun,
    /// A quota of two mirrors and 8 MiB attached.
    TinyQuota,
}

/// Runs the workload `make` gives, without memshadow-run and then with it under `failure`:
/// same output, same status, one line at most from the library per process.
fn runs_unchanged_when(failure: Failure, make: fn() -> Option<Workload>) {
    let Some(w) = make() else { return };
    let base = w.drive(None, |_, _| {});
    let dir = TempDir::new("preload-failure");
    let absent = dir.path().join("absent.sock");
    let d = match failure {
        Failure::Absent => None,
        Failure::KilledMidRun => Some(Daemon::start(&[])),
        Failure::TinyQuota => Some(Daemon::start(&[
            "--quota-mirrors",
            "2",
            "--quota-attached-mib",
            "8",
        ])),
    };
    let socket = d.as_ref().map_or(absent.as_path(), |d| d.socket());
    let w = make().unwrap();
    let run = w.drive(Some((socket, &["--include", "all"])), |n, _| {
        if let (Failure::KilledMidRun, 1, Some(d)) = (failure, n, &d) {
            d.signal(Signal::SIGKILL);
        }
    });
    run.assert_unchanged_from(&base, &format!("{failure:?}"));
    let lines = run.library_lines();
    let said = match failure {
        Failure::Absent => "not mirrored",
        Failure::KilledMidRun => "went away",
        Failure::TinyQuota => "quota",
    };
    assert!(
        lines.iter().any(|l| l.contains(said)),
        "{failure:?}: the library did not say {said:?}:\n{}",
        run.stderr
    );
}

#[test]
fn python_runs_unchanged_without_a_daemon() {
    runs_unchanged_when(Failure::Absent, Workload::python);
}

#[test]
fn python_runs_unchanged_when_the_daemon_is_killed_mid_run() {
    runs_unchanged_when(Failure::KilledMidRun, Workload::python);
}

#[test]
fn python_runs_unchanged_with_a_tiny_quota() {
    runs_unchanged_when(Failure::TinyQuota, Workload::python);
}

#[test]
fn sqlite_runs_unchanged_without_a_daemon() {
    runs_unchanged_when(Failure::Absent, Workload::sqlite);
}

#[test]
fn sqlite_runs_unchanged_when_the_daemon_is_killed_mid_run() {
    runs_unchanged_when(Failure::KilledMidRun, Workload::sqlite);
}

#[test]
fn sqlite_runs_unchanged_with_a_tiny_quota() {
    runs_unchanged_when(Failure::TinyQuota, Workload::sqlite);
}

/// The README's example: `client-lib/examples/run-python.sh` runs a Python program under
/// memshadow-run with a daemon of its own, and shows its mirror, a device read of what it
/// wrote, and its unmaps in the trace.
#[test]
fn the_readme_example_runs_python_and_watches_it() {
    if python().is_none() {
        return;
    }
    let script = memshadow_tests::repo_root().join("client-lib/examples/run-python.sh");
    let out = Command::new(script)
        .env("MEMSHADOW_BIN", memshadow_tests::bin_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let pid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no pid line:\n{stdout}"));
    let mirror_of_pid = |l: &str| {
        l.split_whitespace().next() == Some(pid) && l.contains("36.0 MiB") && l.contains("active")
    };
    assert!(
        stdout.lines().any(mirror_of_pid),
        "no 36 MiB mirror of {pid}:\n{stdout}"
    );
    assert!(
        stdout.contains("|hello deviceshad|"),
        "the device read:\n{stdout}"
    );
    let traced = &stdout[stdout.find("== memshadowctl trace").unwrap()..];
    assert_eq!(
        traced
            .lines()
            .filter(|l| l.contains(&format!(" {pid} unmap ")))
            .count(),
        2,
        "{traced}"
    );
}

/// A program that closes every descriptor it did not open and gets the library's socket's
/// number back for a socket of its own: the library notices (device and inode) and stops,
/// rather than write its requests into the program's socket and wait there for an answer.
#[test]
fn a_program_that_reuses_the_librarys_descriptor_keeps_it_to_itself() {
    let Some(py) = python() else { return };
    let code = "import mmap, os, socket\n\
                os.closerange(3, 4096)\n\
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n\
                m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE)\n\
                m.write(b'x' * (4 << 20))\n\
                b.setblocking(False)\n\
                try:\n    print('the program read', b.recv(65536))\n\
                except BlockingIOError:\n    print('nothing arrived')\n";
    let d = Daemon::start(&[]);
    let argv: Vec<OsString> = vec![py.into(), "-c".into(), code.into()];
    let run = drive(under_run(d.socket(), &[], &argv), &Resume::Stdin, |_, _| {});
    assert_eq!(run.stdout, "nothing arrived\n", "{run:?}");
    assert!(run.status.success(), "{run:?}");
    let lines = run.library_lines();
    assert!(
        lines.len() == 1 && lines[0].contains("closed memshadow's connection"),
        "{lines:?}"
    );
}

/// A daemon that stops answering (SIGSTOP) holds the program's next attach only until the
/// library's answer limit (10 s); the library then turns off and the program runs on.
#[test]
fn a_stopped_daemon_holds_the_program_only_until_the_answer_limit() {
    let Some(py) = python() else { return };
    let code = "import mmap\n\
                print('QUIET 0', flush=True); input()\n\
                m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE)\n\
                m.write(b'y' * (4 << 20))\n\
                n = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE)\n\
                print('mapped', m[:2], n[:2])\n\
                print('QUIET 1', flush=True); input()\n";
    let d = Daemon::start(&[]);
    let argv: Vec<OsString> = vec![py.into(), "-c".into(), code.into()];
    let started = std::time::Instant::now();
    let mut waited = Duration::ZERO;
    let run = drive(
        under_run(d.socket(), &[], &argv),
        &Resume::Stdin,
        |n, _| match n {
            0 => d.signal(Signal::SIGSTOP),
            _ => {
                waited = started.elapsed();
                d.signal(Signal::SIGCONT);
            }
        },
    );
    assert!(run.status.success(), "{run:?}");
    assert!(run.stdout.contains("mapped b'yy' b'\\x00\\x00'"), "{run:?}");
    let lines = run.library_lines();
    assert!(
        lines.len() == 1 && lines[0].contains("stopped answering"),
        "{lines:?}"
    );
    // One attach waited out the limit; the second was never tried.
    assert!(waited < Duration::from_secs(60), "{waited:?}");
}

/// The C program `tests/programs/awkward.c`, built with the system's compiler.
fn awkward() -> Option<PathBuf> {
    let cc = tool("cc", "gcc")?;
    let out = memshadow_tests::bin_dir().join("awkward");
    let status = Command::new(cc)
        .args(["-O1", "-pthread", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(program("awkward.c"))
        .status()
        .unwrap();
    assert!(status.success(), "cc tests/programs/awkward.c");
    Some(out)
}

/// Runs `awkward ARGS` alone and under memshadow-run (each with a directory of its own):
/// same output and status; returns the two directories' files, by name.
fn awkward_both_ways(args: &[&str]) -> Vec<(String, String, String)> {
    let Some(bin) = awkward() else {
        return Vec::new();
    };
    let d = Daemon::start(&[]);
    let dirs = [TempDir::new("awkward-alone"), TempDir::new("awkward-run")];
    let argv = |dir: &TempDir| -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![bin.clone().into()];
        v.extend(
            args.iter()
                .map(|a| a.replace("DIR", dir.path().to_str().unwrap()).into()),
        );
        v
    };
    let alone = drive(plain(&argv(&dirs[0])), &Resume::Stdin, |_, _| {});
    let run = drive(
        under_run(d.socket(), &[], &argv(&dirs[1])),
        &Resume::Stdin,
        |_, _| {},
    );
    assert_eq!(run.stdout, alone.stdout, "{args:?}: {run:?}");
    assert_eq!(run.status.code(), alone.status.code(), "{args:?}: {run:?}");
    assert_eq!(
        run.status.signal(),
        alone.status.signal(),
        "{args:?}: {run:?}"
    );
    let mut names: Vec<String> = std::fs::read_dir(dirs[0].path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let read = |d: &TempDir| std::fs::read_to_string(d.path().join(&n)).unwrap_or_default();
            (read(&dirs[0]), read(&dirs[1]), n)
        })
        .collect()
}

/// A thread cancelled before it calls `malloc` of 4 MiB: the library's requests are
/// cancellation points, but the cancel still lands at the program's own next one.
#[test]
fn a_cancelled_thread_is_cancelled_where_it_would_be_without_the_library() {
    awkward_both_ways(&["cancel"]);
}

/// A program that closes every descriptor and opens its own files as 0, 1 and 2: the
/// library (whose socket went with the rest) writes nothing into the program's files.
#[test]
fn a_program_that_reopens_its_stdio_gets_nothing_of_the_librarys_in_its_files() {
    for (alone, run, name) in awkward_both_ways(&["stdio", "DIR"]) {
        assert_eq!(run, alone, "{name}");
    }
}

/// A program that closes descriptors 3 and up and opens its log as 3 (the library's old
/// number), then forks: the fork handler leaves the program's log open in the child.
#[test]
fn the_fork_handler_closes_only_the_librarys_descriptors() {
    let files = awkward_both_ways(&["forkfd", "DIR"]);
    for (alone, run, name) in &files {
        assert_eq!(run, alone, "{name}");
    }
    assert!(
        files
            .iter()
            .any(|(_, run, n)| n == "log" && run == "child\nparent\n"),
        "{files:?}"
    );
}

/// A socket another user listens on (named by `--socket` or the environment) gets nothing
/// of a program's memory: the library reads the listener's credentials before it binds,
/// and accepts only root or the program's own user.
#[test]
fn a_socket_of_another_user_gets_nothing() {
    if !memshadow_tests::needs_root("listens as nobody") {
        return;
    }
    let (Some(py), Some(setpriv)) = (python(), tool("setpriv", "util-linux")) else {
        return;
    };
    let dir = TempDir::new("preload-foreign");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let sock = dir.path().join("foreign.sock");
    // A listener as nobody that counts what it is sent: messages and descriptors.
    let listener = "import socket, sys\n\
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n\
                    s.bind(sys.argv[1]); s.listen(1)\n\
                    print('listening', flush=True)\n\
                    c, _ = s.accept(); msgs = fds = 0\n\
                    while True:\n\
                    \x20   m, anc, _, _ = c.recvmsg(65536, socket.CMSG_SPACE(64))\n\
                    \x20   if not m: break\n\
                    \x20   msgs += 1; fds += sum(len(d) // 4 for _, _, d in anc)\n\
                    print('messages', msgs, 'fds', fds, flush=True)\n";
    let mut nobody = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&py)
        .args(["-c", listener])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(nobody.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "listening\n");
    let argv: Vec<OsString> = vec![py.into(), "-c".into(), "print('ran')".into()];
    let run = drive(under_run(&sock, &[], &argv), &Resume::Stdin, |_, _| {});
    assert_eq!(run.stdout, "ran\n", "{run:?}");
    assert!(run.status.success(), "{run:?}");
    let lines = run.library_lines();
    assert!(
        lines.len() == 1 && lines[0].contains("served by uid 65534"),
        "{lines:?}"
    );
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line, "messages 0 fds 0\n",
        "the listener was sent something"
    );
    assert!(nobody.wait().unwrap().success());
}
