//! `hostile`: a well-behaved client's request latency alone, and again while 100 hostile
//! sessions run against the same daemon (docs/design.md §5 G7: one client must not be able to
//! stall the others). Goal: with the hostile sessions, the well-behaved client's p99 is
//! within 2x of its p99 alone. The goal is reported, never asserted.
//!
//! The well-behaved client (this process, uid 0, its own `memshadow::Client`s): one thread
//! does 64-byte `Mirror::read`s of an attached, populated range; another does `status`
//! calls on a control connection; each sleeps `THINK` between ops. The hostile sessions are
//! child processes (this binary re-executed with `--hostile-child`) that drop to uid/gid
//! 65534 once the daemon is up, one session each:
//! * silent: connect, never send anything;
//! * non-reading: Hello, Bind, Attach, then as many `Read`s as the in-flight quota allows,
//!   never reading the answers (reconnecting when the daemon closes the session);
//! * fd-flooding: connect, send messages carrying 16 fds (`SCM_RIGHTS`), close; again.
//!
//! The daemon runs as root with the client limits of the shipped configuration
//! (permissive, so every hostile session is admitted). Every child and the daemon are killed when this process
//! ends, also on error (and, through `PR_SET_PDEATHSIG`, if it is killed).
//!
//! Run: `cargo build --release -p memshadow-daemon && cargo bench -p memshadow-tests --bench
//! hostile -- --quick` (as root). Prints a table and writes
//! `target/memshadow-bench/hostile.json`; the daemon's log goes to
//! `target/memshadow-bench/hostile-memshadowd.log`. `-- --only non-reading` (or a
//! comma-separated list of kinds) runs just those kinds of the mix, to tell their effects
//! apart.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::fs::File;
use std::io::{IoSlice, Read as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use memshadow::{Client, Control, Mirror};
use memshadow_proto::{self as proto, Header, Request, Response, MAX_READ, MIN_VERSION, VERSION};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn Error>>;

#[path = "bench_daemon.rs"]
mod bench_daemon;
use bench_daemon::{BenchPaths, Daemon};
use memshadow_tests::{percentiles as stats, Percentiles as Stats};

/// The goal: hostile p99 / alone p99.
const GOAL: f64 = 2.0;
/// The attached range, of the well-behaved client and of each non-reading session.
const RANGE: usize = 64 << 10;
/// Bytes of one well-behaved device read.
const READ_LEN: usize = 64;
/// Pause of each well-behaved thread between two ops.
const THINK: Duration = Duration::from_millis(1);
const WARMUP: usize = 50;
/// The hostile mix: 100 sessions.
const MIX: [(Kind, usize); 3] = [
    (Kind::Silent, 34),
    (Kind::NonReading, 33),
    (Kind::FdFlooding, 33),
];
/// Fds attached to each flooding message (the protocol allows `MAX_FDS`).
const FLOOD_FDS: usize = 16;
/// Messages sent on each flooding connection before closing it.
const FLOOD_MSGS: usize = 4;
/// Pause of each flooder between two connections: 33 flooders make ~3300 connections/s,
/// enough to load the session loop without the attackers' own busy loops taking the
/// machine's CPUs (which would measure the scheduler, not the daemon).
const FLOOD_PAUSE: Duration = Duration::from_millis(10);
/// Who the hostile sessions run as.
const HOSTILE_UID: u32 = 65534;
/// Client limits of a permissive deployment: room for every hostile session of the one
/// hostile user (the shipped default `clients_per_uid = 64` would refuse most of them,
/// which makes the attack weaker, not the daemon stronger).
const MAX_CLIENTS: u32 = 1024;
const CLIENTS_PER_UID: u32 = 512;
/// How long the well-behaved ops may take to finish once the hostile sessions are killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The daemon.

/// Starts the daemon under test: root's, `--no-config`, with room for every hostile
/// session, logging at the shipped level to `log`; it dies with the benchmark.
fn start_daemon(bin: &Path, socket: PathBuf, log: &Path) -> Res<Daemon> {
    let log_file = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--no-config")
        .arg("--socket")
        .arg(&socket)
        .args(["--max-clients", &MAX_CLIENTS.to_string()])
        .args(["--clients-per-uid", &CLIENTS_PER_UID.to_string()])
        // The shipped log level: what a deployment would pay for.
        .env("MEMSHADOW_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    // SAFETY: the closure runs in the forked child before exec and makes one prctl
    // system call (async-signal-safe); it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        })
    };
    Daemon::start("hostile", cmd, socket, &format!(" (see {})", log.display()))
}

/// File descriptors the daemon has open.
fn open_fds(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.pid())).map_or(0, |d| d.count())
}

/// Threads of the daemon whose name starts with `prefix`.
fn threads_named(d: &Daemon, prefix: &str) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", d.pid())) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

// ---------------------------------------------------------------------------------------
// The hostile sessions: child processes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Silent,
    NonReading,
    FdFlooding,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Silent => "silent",
            Kind::NonReading => "non-reading",
            Kind::FdFlooding => "fd-flooding",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [Kind::Silent, Kind::NonReading, Kind::FdFlooding]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// One hostile child and the pipe on which it says `ready`.
#[derive(Debug)]
struct Hostile {
    kind: Kind,
    child: Child,
    stdout: ChildStdout,
    said: Vec<u8>,
    ready: bool,
}

/// Every hostile child; all SIGKILLed and reaped on drop.
#[derive(Debug, Default)]
struct Hostiles(Vec<Hostile>);

impl Hostiles {
    /// Starts `n` children of `kind` (this binary, which drops to [`HOSTILE_UID`] itself).
    fn spawn(&mut self, exe: &Path, socket: &Path, kind: Kind, n: usize) -> Res<()> {
        let me = std::process::id().to_string();
        for _ in 0..n {
            let mut child = Command::new(exe)
                .arg("--hostile-child")
                .arg(kind.name())
                .arg(socket)
                .arg(&me)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("cannot start a {} child: {e}", kind.name()))?;
            let stdout = child.stdout.take().ok_or("child without stdout")?;
            self.0.push(Hostile {
                kind,
                child,
                stdout,
                said: Vec::new(),
                ready: false,
            });
        }
        Ok(())
    }

    /// Waits until every child said `ready`, or `timeout`; returns how many did. A child
    /// that exits is an error.
    fn wait_ready(&mut self, timeout: Duration) -> Res<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let waiting: Vec<usize> = (0..self.0.len()).filter(|&i| !self.0[i].ready).collect();
            if waiting.is_empty() || left.is_zero() {
                return Ok(self.0.len() - waiting.len());
            }
            let mut fds: Vec<PollFd<'_>> = waiting
                .iter()
                .map(|&i| PollFd::new(self.0[i].stdout.as_fd(), PollFlags::POLLIN))
                .collect();
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}").into()),
            }
            let woke: Vec<usize> = waiting
                .iter()
                .zip(&fds)
                .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|(&i, _)| i)
                .collect();
            drop(fds);
            for i in woke {
                let h = &mut self.0[i];
                let mut buf = [0u8; 64];
                let n = h.stdout.read(&mut buf)?;
                if n == 0 {
                    let st = h.child.wait()?;
                    return Err(format!(
                        "a {} hostile child exited during set-up: {st}",
                        h.kind.name()
                    )
                    .into());
                }
                h.said.extend_from_slice(&buf[..n]);
                h.ready = h.said.windows(5).any(|w| w == b"ready");
            }
        }
    }

    /// Children that have exited (they should all still run).
    fn exited(&mut self) -> Vec<String> {
        self.0
            .iter_mut()
            .filter_map(|h| match h.child.try_wait() {
                Ok(Some(st)) => Some(format!("{} ({st})", h.kind.name())),
                _ => None,
            })
            .collect()
    }

    fn kill_all(&mut self) {
        for h in &mut self.0 {
            let _ = h.child.kill();
        }
        for h in &mut self.0 {
            let _ = h.child.wait();
        }
        self.0.clear();
    }
}

impl Drop for Hostiles {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The child side: `--hostile-child KIND SOCKET PARENT_PID`.
fn child_main(args: &[String]) -> Res<()> {
    let [kind, socket, parent] = args else {
        return Err("usage: --hostile-child KIND SOCKET PARENT_PID".into());
    };
    let kind = Kind::parse(kind).ok_or_else(|| format!("unknown kind {kind:?}"))?;
    let parent: i32 = parent.parse()?;
    drop_privileges()?;
    // Die with the benchmark (set after the uid change, which clears it), and do not start
    // if it is already gone.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid().as_raw() != parent {
        return Ok(());
    }
    let socket = Path::new(socket);
    let mut errors = 0u32;
    let mut ready = false;
    loop {
        let r = match kind {
            Kind::Silent => silent_session(socket, &mut ready),
            Kind::NonReading => non_reading_session(socket, &mut ready),
            Kind::FdFlooding => flood_once(socket, &mut ready),
        };
        if let Err(e) = r {
            errors += 1;
            if errors <= 3 {
                eprintln!(
                    "hostile {} (pid {}): {e}; trying again",
                    kind.name(),
                    std::process::id()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if kind == Kind::FdFlooding {
            std::thread::sleep(FLOOD_PAUSE);
        }
    }
}

/// setgroups, setresgid and setresuid to [`HOSTILE_UID`], staying dumpable so the process
/// can open its own `/proc/self/mem` for Bind (as an unprivileged client would).
fn drop_privileges() -> Res<()> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let (uid, gid) = (Uid::from_raw(HOSTILE_UID), Gid::from_raw(HOSTILE_UID));
    setgroups(&[]).map_err(|e| format!("setgroups: {e} (run the benchmark as root)"))?;
    setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    nix::sys::prctl::set_dumpable(true)?;
    Ok(())
}

fn say_ready(ready: &mut bool) {
    if !*ready {
        *ready = true;
        println!("ready");
    }
}

/// Blocks until the daemon closes `sock`.
fn wait_hangup(sock: BorrowedFd<'_>) {
    loop {
        let mut fds = [PollFd::new(sock, PollFlags::empty())];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) if fds[0].revents().is_some_and(|r| !r.is_empty()) => return,
            Err(e) if e != nix::Error::EINTR => return,
            _ => {}
        }
    }
}

/// One lock-step exchange on a raw session (the set-up answers are read; an error answer is
/// an error).
fn call(sock: BorrowedFd<'_>, id: u64, req: &Request, fds: &[BorrowedFd<'_>]) -> Res<Response> {
    proto::send(sock, req.msg_type(), 0, id, &req.encode_payload(), fds)?;
    let mut buf = Vec::new();
    loop {
        let f = proto::recv(sock, &mut buf)?;
        let r = Response::decode(f.header.msg_type, &f.payload, f.fds.len())?;
        if f.header.request_id == id || f.header.request_id == 0 {
            return match r {
                Response::Error { code, message } => {
                    Err(format!("{} answered {code:?}: {message}", req.name()).into())
                }
                r => Ok(r),
            };
        }
    }
}

fn silent_session(socket: &Path, ready: &mut bool) -> Res<()> {
    let sock = memshadow_tests::seqpacket_connect(socket)?;
    say_ready(ready);
    wait_hangup(sock.as_fd());
    Ok(())
}

fn non_reading_session(socket: &Path, ready: &mut bool) -> Res<()> {
    let sock = memshadow_tests::seqpacket_connect(socket)?;
    let s = sock.as_fd();
    let hello = Request::Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        name: "hostile-non-reading".into(),
    };
    let inflight = match call(s, 1, &hello, &[])? {
        Response::HelloAck { limits, .. } => limits.inflight,
        r => return Err(format!("hello answered {r:?}").into()),
    };
    {
        let uffd = memshadow::create_uffd()?;
        let mem = File::open("/proc/self/mem")?;
        // Protocol 2: the maps third, then pagemap.
        let maps = File::open("/proc/self/maps")?;
        let pagemap = File::open("/proc/self/pagemap")?;
        call(
            s,
            2,
            &Request::Bind {
                flags: proto::BindFlags::empty(),
            },
            &[uffd.as_fd(), mem.as_fd(), maps.as_fd(), pagemap.as_fd()],
        )?;
    }
    // A fresh range each session (the last one may still be registered with a uffd the
    // daemon has not released yet); never unmapped, the process is killed at the end.
    let map = map_anon_touched(RANGE)?;
    let mirror_id = match call(
        s,
        3,
        &Request::Attach {
            addr: map as u64,
            len: RANGE as u64,
            policy: proto::AttachPolicy::Default,
        },
        &[],
    )? {
        Response::Attached { mirror_id } => mirror_id,
        r => return Err(format!("attach answered {r:?}").into()),
    };
    let read = Request::Read {
        mirror_id,
        offset: 0,
        len: MAX_READ.min(RANGE) as u32,
    };
    for i in 0..u64::from(inflight) {
        proto::send(s, read.msg_type(), 0, 100 + i, &read.encode_payload(), &[])?;
    }
    say_ready(ready);
    // Never read the answers: the daemon's replies back up in this socket until it gives up.
    wait_hangup(s);
    Ok(())
}

/// A fresh private anonymous mapping of `len` bytes, every page written.
fn map_anon_touched(len: usize) -> Res<*mut u8> {
    let p = memshadow_tests::map_anon(len).map_err(|e| format!("mmap: {e}"))?;
    for off in (0..len).step_by(4096) {
        // SAFETY: `p..p+len` is the live read-write mapping just made; no reference to it
        // exists.
        unsafe { p.wrapping_add(off).write_volatile(1) };
    }
    Ok(p)
}

/// One flooding connection: up to [`FLOOD_MSGS`] Bind frames with [`FLOOD_FDS`] fds each
/// (more than the protocol's `MAX_FDS`, so `proto::send` would refuse them: the frame is
/// built with `memshadow_proto` and sent with a raw `sendmsg`), then close.
fn flood_once(socket: &Path, ready: &mut bool) -> Res<()> {
    let null = File::open("/dev/null")?;
    let fds: Vec<OwnedFd> = (0..FLOOD_FDS)
        .map(|_| null.try_clone().map(OwnedFd::from))
        .collect::<Result<_, _>>()?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let req = Request::Bind {
        flags: proto::BindFlags::empty(),
    };
    let payload = req.encode_payload();
    let sock = memshadow_tests::seqpacket_connect(socket)?;
    for i in 0..FLOOD_MSGS {
        let header = Header {
            version: VERSION,
            msg_type: req.msg_type(),
            flags: 0,
            fd_count: FLOOD_FDS as u16,
            payload_len: payload.len() as u32,
            request_id: i as u64 + 1,
        }
        .encode();
        let iov = [IoSlice::new(&header), IoSlice::new(&payload)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let sent = sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        );
        if sent.is_err() {
            // The daemon closed the connection (or it is full): that is the point.
            break;
        }
    }
    drop(sock);
    say_ready(ready);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The well-behaved client.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Status,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read_64B",
            Op::Status => "status",
        }
    }
}

/// The well-behaved client's connections and range.
struct Polite {
    mirror: Arc<Mirror>,
    control: Control,
    _client: Client,
    map: *mut u8,
}

impl Polite {
    fn connect(socket: &Path) -> Res<Polite> {
        let client = Client::connect_to(socket)?;
        let map = map_anon_touched(RANGE)?;
        // SAFETY: `map` is our live mapping of RANGE bytes; no reference points into it.
        unsafe { map.write_volatile(7) };
        let mirror = client.attach(map, RANGE)?;
        mirror.populate(0, RANGE as u64)?;
        let control = Client::connect_control(Some(socket))?;
        Ok(Polite {
            mirror: Arc::new(mirror),
            control,
            _client: client,
            map,
        })
    }

    /// One op, timed, in µs.
    fn one(mirror: &Mirror, control: &Control, op: Op) -> Res<f64> {
        let t = Instant::now();
        match op {
            Op::Read => {
                let mut buf = [0u8; READ_LEN];
                mirror.read(0, &mut buf)?;
                let us = t.elapsed().as_secs_f64() * 1e6;
                if buf[0] != 7 {
                    return Err(format!("device read returned {} instead of 7", buf[0]).into());
                }
                Ok(us)
            }
            Op::Status => {
                control.status()?;
                Ok(t.elapsed().as_secs_f64() * 1e6)
            }
        }
    }

    fn warm_up(&self) -> Res<()> {
        for _ in 0..WARMUP {
            Polite::one(&self.mirror, &self.control, Op::Read)?;
            Polite::one(&self.mirror, &self.control, Op::Status)?;
        }
        Ok(())
    }

    /// Starts one thread per op, each looping until `stop`; they send their samples
    /// (start, µs) on the returned channel.
    fn start(&self, stop: &Arc<AtomicBool>) -> Res<mpsc::Receiver<(Op, Res2<Vec<Sample>>)>> {
        let (tx, rx) = mpsc::channel();
        for op in [Op::Read, Op::Status] {
            let (mirror, control, stop, tx) = (
                Arc::clone(&self.mirror),
                self.control.clone(),
                Arc::clone(stop),
                tx.clone(),
            );
            std::thread::Builder::new()
                .name(format!("polite-{}", op.name()))
                .spawn(move || {
                    let mut v = Vec::new();
                    let r = loop {
                        if stop.load(Ordering::Relaxed) {
                            break Ok(v);
                        }
                        let start = Instant::now();
                        match Polite::one(&mirror, &control, op) {
                            Ok(us) => v.push(Sample { start, us }),
                            Err(e) => break Err(e.to_string()),
                        }
                        std::thread::sleep(THINK);
                    };
                    let _ = tx.send((op, r));
                })?;
        }
        Ok(rx)
    }
}

impl Drop for Polite {
    fn drop(&mut self) {
        // SAFETY: `map` is the RANGE-byte mapping `connect` made; the mirror detaches on
        // its own (the daemon follows the unmap), and nothing uses the mapping afterwards.
        let _ = unsafe { libc::munmap(self.map.cast(), RANGE) };
    }
}

/// A thread's result, with its error as text (sendable).
type Res2<T> = Result<T, String>;

#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Instant,
    us: f64,
}

/// One op's samples of one phase.
#[derive(Debug, Clone, Copy)]
struct Measured {
    stats: Stats,
    n: usize,
    /// Ops still running when the phase ended, counted at their time so far (a lower bound).
    censored: usize,
}

/// Waits for both threads' samples; an op still running at `t_stop` counts at
/// `t_stop - start` (censored), ops started after it are dropped.
fn collect(
    rx: &mpsc::Receiver<(Op, Res2<Vec<Sample>>)>,
    t_stop: Instant,
) -> Res<[(Op, Measured); 2]> {
    let mut read = None;
    let mut status = None;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while read.is_none() || status.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (op, r) = rx.recv_timeout(left).map_err(|_| {
            format!(
                "the well-behaved client's ops did not finish within {} s after the phase \
                 ended",
                DRAIN_TIMEOUT.as_secs()
            )
        })?;
        let samples = r.map_err(|e| format!("well-behaved {}: {e}", op.name()))?;
        let mut censored = 0;
        let mut v = Vec::with_capacity(samples.len());
        for s in samples {
            if s.start >= t_stop {
                continue;
            }
            let cap = t_stop.duration_since(s.start).as_secs_f64() * 1e6;
            if s.us > cap {
                censored += 1;
                v.push(cap);
            } else {
                v.push(s.us);
            }
        }
        let m = Measured {
            n: v.len(),
            stats: stats(v),
            censored,
        };
        match op {
            Op::Read => read = Some(m),
            Op::Status => status = Some(m),
        }
    }
    Ok([
        (Op::Read, read.ok_or("no read samples")?),
        (Op::Status, status.ok_or("no status samples")?),
    ])
}

// ---------------------------------------------------------------------------------------
// Output.

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

fn fmt_us(s: Stats) -> String {
    format!("{:.1} / {:.1}", s.p50, s.p99)
}

struct Row {
    op: Op,
    alone: Measured,
    hostile: Measured,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.hostile.stats.p99 / self.alone.stats.p99
    }
    fn met(&self) -> Option<bool> {
        let r = self.ratio();
        r.is_finite().then_some(r <= GOAL)
    }
    fn json(&self, setting: &Value) -> Value {
        json!({
            "op": self.op.name(),
            "alone_p50_us": num(self.alone.stats.p50),
            "alone_p99_us": num(self.alone.stats.p99),
            "hostile_p50_us": num(self.hostile.stats.p50),
            "hostile_p99_us": num(self.hostile.stats.p99),
            "ratio_p99": num(self.ratio()),
            "goal": GOAL,
            "met": self.met(),
            "alone_samples": self.alone.n,
            "hostile_samples": self.hostile.n,
            "hostile_censored": self.hostile.censored,
            "setting": setting,
        })
    }
}

/// A few daemon counters (through a control connection of its own).
fn counters(c: &Control) -> Res<std::collections::HashMap<String, u64>> {
    Ok(c.status()?.counters.into_iter().collect())
}

// ---------------------------------------------------------------------------------------

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--hostile-child") {
        if let Err(e) = child_main(&args[2..]) {
            eprintln!("hostile child: {e}");
            std::process::exit(2);
        }
        return Ok(());
    }
    let mut quick = false;
    // `--only KIND[,KIND]`: just those kinds of the mix (to tell their effects apart).
    let mut only: Option<Vec<Kind>> = None;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--bench" => {}
            "--only" => {
                let list = it.next().ok_or("--only takes KIND[,KIND...]")?;
                let kinds = list
                    .split(',')
                    .map(|k| Kind::parse(k).ok_or_else(|| format!("--only: unknown kind {k:?}")))
                    .collect::<Result<Vec<_>, _>>()?;
                only = Some(kinds);
            }
            other => eprintln!("hostile: ignoring argument {other:?}"),
        }
    }
    let mix: Vec<(Kind, usize)> = MIX
        .into_iter()
        .filter(|(k, _)| only.as_ref().is_none_or(|o| o.contains(k)))
        .collect();
    let total: usize = mix.iter().map(|(_, n)| n).sum();
    let mix_text = mix
        .iter()
        .map(|(k, n)| format!("{n} {}", k.name()))
        .collect::<Vec<_>>()
        .join(" + ");
    let (alone_for, hostile_for, setup_max) = if quick {
        (
            Duration::from_secs(2),
            Duration::from_secs(3),
            // Only a bound on waiting (setting up takes ~0.3 s); a loaded machine may be slow.
            Duration::from_secs(15),
        )
    } else {
        (
            Duration::from_secs(10),
            Duration::from_secs(15),
            Duration::from_secs(15),
        )
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "\n*** SKIPPED: the hostile benchmark needs root (the daemon runs as root, the \
             hostile sessions drop to uid {HOSTILE_UID}); it did not run ***\n"
        );
        return Ok(());
    }

    let exe = std::env::current_exe()?;
    let BenchPaths {
        target,
        daemon: daemon_bin,
        ..
    } = BenchPaths::locate("cargo build --release -p memshadow-daemon")?;
    let out_dir = target.join("memshadow-bench");
    std::fs::create_dir_all(&out_dir)?;
    let log = out_dir.join("hostile-memshadowd.log");
    let dir = memshadow_tests::TempDir::new("hostile");
    let daemon = start_daemon(&daemon_bin, dir.path().join("d.sock"), &log)?;

    let setting = format!(
        "memshadowd as root, --max-clients {MAX_CLIENTS} --clients-per-uid {CLIENTS_PER_UID} \
         (permissive: all hostile sessions admitted), other settings default; well-behaved client uid 0; \
         hostile: {mix_text} sessions as uid {HOSTILE_UID}{}",
        if only.is_some() { " (--only)" } else { "" }
    );
    eprintln!("hostile: {setting}");
    let polite = Polite::connect(&daemon.socket)?;
    let snap = Client::connect_control(Some(&daemon.socket))?;
    let quota = polite.control.limits().inflight;
    let info = snap.status()?;
    for (key, want) in [
        ("limit.max_clients", MAX_CLIENTS),
        ("limit.clients_per_uid", CLIENTS_PER_UID),
    ] {
        if info.info(key) != Some(want.to_string().as_str()) {
            return Err(format!(
                "memshadowd reports {key} = {:?}, not {want}",
                info.info(key)
            )
            .into());
        }
    }
    let workers = threads_named(&daemon, "worker-");
    eprintln!(
        "hostile: well-behaved ops every {} ms for {} s alone, then {} s with the hostile \
         sessions; in-flight quota {quota}, {workers} worker threads",
        THINK.as_millis(),
        alone_for.as_secs(),
        hostile_for.as_secs(),
    );
    polite.warm_up()?;

    // Alone.
    let stop = Arc::new(AtomicBool::new(false));
    let rx = polite.start(&stop)?;
    std::thread::sleep(alone_for);
    let t_stop = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let alone = collect(&rx, t_stop)?;

    // With the hostile sessions.
    let mut hostiles = Hostiles::default();
    let before = counters(&snap)?;
    let fds_before = open_fds(&daemon);
    let t_spawn = Instant::now();
    for &(kind, n) in &mix {
        hostiles.spawn(&exe, &daemon.socket, kind, n)?;
    }
    let ready = hostiles.wait_ready(setup_max)?;
    let setup = t_spawn.elapsed();
    eprintln!(
        "hostile: {ready} of {} hostile sessions set up after {:.1} s; measuring",
        total,
        setup.as_secs_f64()
    );
    // A hostile session that never got set up (refused at Bind, say) is an attack that was
    // not made: the numbers would flatter the daemon.
    if ready < total {
        return Err(format!(
            "only {ready} of {total} hostile sessions were set up (their errors are above): \
             the measurement would not be of the load it claims"
        )
        .into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let t_start = Instant::now();
    let rx = polite.start(&stop)?;
    std::thread::sleep(hostile_for);
    let t_stop = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let during = counters(&snap);
    let fds_during = open_fds(&daemon);
    let exited = hostiles.exited();
    hostiles.kill_all();
    let with = collect(&rx, t_stop)?;
    let after = counters(&snap)?;
    let fds_after = open_fds(&daemon);
    let during = during?;
    let phase = t_stop.duration_since(t_start).as_secs_f64();
    let d = |k: &str| {
        let at = |m: &std::collections::HashMap<String, u64>| m.get(k).copied().unwrap_or(0);
        at(&after).saturating_sub(at(&before))
    };
    let spent = t_stop.duration_since(t_spawn).as_secs_f64();
    eprintln!(
        "hostile: during the attack the daemon had {} clients ({} bound); over {:.1} s it \
         accepted {} sessions ({:.0}/s), refused {}, closed {} for bad messages",
        during.get("server.clients").copied().unwrap_or(0),
        during.get("server.clients_bound").copied().unwrap_or(0),
        spent,
        d("server.sessions_total"),
        d("server.sessions_total") as f64 / spent,
        d("server.sessions_refused"),
        d("server.bad_messages"),
    );
    if !exited.is_empty() {
        eprintln!(
            "hostile: warning: {} hostile children exited during the run: {}",
            exited.len(),
            exited.join(", ")
        );
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let unread_closes = log_text.matches("does not read its answers").count();
    let emfile = log_text.matches("EMFILE").count();
    eprintln!(
        "hostile: daemon fds: {fds_before} before the attack, {fds_during} at its end, \
         {fds_after} after the hostile processes were killed"
    );
    eprintln!(
        "hostile: daemon log {}: {} lines, {unread_closes} sessions closed for not reading \
         their answers, {emfile} EMFILE errors",
        log.display(),
        log_text.lines().count(),
    );

    let rows: Vec<Row> = alone
        .iter()
        .zip(&with)
        .map(|(&(op, a), &(_, h))| Row {
            op,
            alone: a,
            hostile: h,
        })
        .collect();

    // Table.
    println!("{setting}");
    println!(
        "{:<10} {:>20} {:>22} {:>10} {:>5} {:>4} {:>15} {:>9}",
        "op", "alone_us", "hostile_us", "ratio_p99", "goal", "met", "n alone/hostile", "censored"
    );
    println!(
        "{:<10} {:>20} {:>22} {:>10} {:>5} {:>4} {:>15} {:>9}",
        "", "p50 / p99", "p50 / p99", "", "", "", "", ""
    );
    for r in &rows {
        println!(
            "{:<10} {:>20} {:>22} {:>10.2} {:>5} {:>4} {:>15} {:>9}",
            r.op.name(),
            fmt_us(r.alone.stats),
            fmt_us(r.hostile.stats),
            r.ratio(),
            format!("<={GOAL}"),
            r.met().map_or("-", |m| if m { "yes" } else { "no" }),
            format!("{}/{}", r.alone.n, r.hostile.n),
            r.hostile.censored,
        );
    }
    let all_met = rows.iter().all(|r| r.met() == Some(true));
    println!(
        "goal (hostile p99 <= {GOAL}x alone p99): {}",
        if all_met { "met" } else { "NOT met" }
    );
    if rows.iter().any(|r| r.hostile.censored > 0) {
        println!(
            "(censored: ops still waiting when the {:.0} s phase ended, counted at their wait \
             so far; the real p99 is at least what is shown)",
            phase
        );
    }

    let setting_json = json!({
        "daemon": "memshadowd as root, shipped client limits, other settings default",
        "max_clients": MAX_CLIENTS,
        "clients_per_uid": CLIENTS_PER_UID,
        "workers": workers,
        "inflight_quota": quota,
        "hostile_uid": HOSTILE_UID,
        "hostile_sessions": mix
            .iter()
            .map(|(k, n)| (k.name().to_owned(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
        "only": only.is_some(),
        "flood_fds": FLOOD_FDS,
        "flood_pause_ms": FLOOD_PAUSE.as_millis() as u64,
        "hostile_ready": ready,
        "sessions_accepted": d("server.sessions_total"),
        "sessions_refused": d("server.sessions_refused"),
        "bad_messages": d("server.bad_messages"),
        "unread_answer_closes": unread_closes,
        "emfile_errors": emfile,
        "daemon_fds_before": fds_before,
        "daemon_fds_during": fds_during,
        "daemon_fds_after": fds_after,
        "setup_s": num(setup.as_secs_f64()),
        "think_ms": THINK.as_millis() as u64,
        "alone_s": alone_for.as_secs(),
        "hostile_s": num(phase),
        "quick": quick,
    });
    let out = out_dir.join("hostile.json");
    let json_rows: Vec<Value> = rows.iter().map(|r| r.json(&setting_json)).collect();
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&Value::Array(json_rows))?,
    )?;
    eprintln!("hostile: wrote {}", out.display());
    drop(polite);
    drop(daemon);
    Ok(())
}
