//! An unprivileged attacker against external engines (docs/engines.md,
//! docs/threat-model.md): grants of other users, attaches by pid, revoked grants, the
//! read-only shared memory, an engine that scribbles over its ring or never acknowledges,
//! hostile engine requests, and the bound on grants. The daemon runs as root; the
//! attackers run as `nobody` (uid 65534), as `test-client` processes or as *helpers*: this
//! test binary re-run as `helper_process` with [`ROLE`] set (see [`helper_main`]), which
//! speak the protocol by hand or run a [`memshadow::Engine`].
//!
//! No test depends on timing to pass: every wait is [`wait_until`] (or a helper's answer)
//! with a hang guard far beyond what it takes; the two short sleeps only give a request a
//! head start, which makes the bug a test looks for likelier to show, never a pass.
//!

#![allow(clippy::unwrap_used)]
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use memshadow_proto::engine_abi::{self as abi, ENGINE_FDS};
use memshadow_proto::{self as proto, Request, Response, FLAG_MORE, VERSION};
use memshadow_tests::{
    fields, needs_root, seqpacket_connect, stop_process as stop, try_wait_until_every, wait_until,
    Daemon, TestClient, HANG_GUARD,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

const P: u64 = 4096;
const NOBODY: u32 = 65534;
/// Another unprivileged user (needs no passwd entry).
const SOMEBODY: u32 = 65533;
const NOBODY_ARGS: &[&str] = &["--uid", "65534"];
/// The role of a helper process (unset: `helper_process` does nothing).
const ROLE: &str = "MEMSHADOW_ENGINE_HOSTILE_ROLE";
const SOCKET_ENV: &str = "MEMSHADOW_ENGINE_HOSTILE_SOCKET";
const TOKEN_ENV: &str = "MEMSHADOW_ENGINE_HOSTILE_TOKEN";

fn is_root() -> bool {
    needs_root("a root daemon attacked by unprivileged engines")
}

// =======================================================================================
// The protocol by hand.

/// A session spoken by hand (a blocking socket, with a receive timeout as a hang guard).
struct Raw {
    sock: OwnedFd,
    buf: Vec<u8>,
    id: u64,
}

impl Raw {
    /// Connects and says hello, asking for every version this crate speaks.
    fn connect(socket: &Path) -> Result<Raw, String> {
        let sock = seqpacket_connect(socket).map_err(|e| format!("connect: {e}"))?;
        let guard = nix::sys::time::TimeVal::new(HANG_GUARD.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &guard)
            .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
        let mut r = Raw {
            sock,
            buf: Vec::new(),
            id: 0,
        };
        let hello = Request::Hello {
            min_version: 1,
            max_version: VERSION,
            name: "engine-hostile".into(),
        };
        match r.call(&hello)?.0 {
            Response::HelloAck {
                version: VERSION, ..
            } => Ok(r),
            other => Err(format!("hello: {other:?}")),
        }
    }

    /// Sends `req` with `fds`; returns its request id.
    fn send(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<u64, String> {
        self.id += 1;
        proto::send(
            self.sock.as_fd(),
            req.msg_type(),
            0,
            self.id,
            &req.encode_payload(),
            fds,
        )
        .map_err(|e| format!("send {}: {e}", req.name()))?;
        Ok(self.id)
    }

    /// The answer to request `id` (pieces put together), with the fds it carried.
    fn answer(&mut self, id: u64) -> Result<(Response, Vec<OwnedFd>), String> {
        let mut whole: Option<Response> = None;
        let mut fds = Vec::new();
        loop {
            let f = proto::recv(self.sock.as_fd(), &mut self.buf)
                .map_err(|e| format!("waiting for the answer to request {id}: {e}"))?;
            let r = Response::decode(f.header.msg_type, &f.payload, f.fds.len())
                .map_err(|e| format!("undecodable answer {:#06x}: {e}", f.header.msg_type))?;
            if f.header.request_id != id {
                return Err(format!(
                    "answer {r:?} to request {}, waiting for {id}",
                    f.header.request_id
                ));
            }
            fds.extend(f.fds);
            let more = f.header.flags & FLAG_MORE != 0;
            whole = Some(match whole {
                None => r,
                Some(mut w) => {
                    if !w.absorb(r) {
                        return Err("pieces of different answers".into());
                    }
                    w
                }
            });
            if !more {
                return Ok((whole.unwrap(), fds));
            }
        }
    }

    fn call(&mut self, req: &Request) -> Result<(Response, Vec<OwnedFd>), String> {
        let id = self.send(req, &[])?;
        self.answer(id)
    }
}

/// `err CODE message` for an error answer.
fn err_line(r: &Response) -> Option<String> {
    match r {
        Response::Error { code, message } => Some(format!("err {code:?} {message}")),
        _ => None,
    }
}

/// The access mode of `fd` (`ro`, `wo`, `rw`).
fn access_mode(fd: BorrowedFd<'_>) -> String {
    match nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL) {
        Ok(fl) => match fl & libc::O_ACCMODE {
            libc::O_RDONLY => "ro".into(),
            libc::O_WRONLY => "wo".into(),
            _ => "rw".into(),
        },
        Err(e) => format!("{e}"),
    }
}

/// `mmap` of the first `len` bytes of `fd`, shared, with `prot`: the mapping or the errno.
fn map(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int) -> Result<Mapping, Errno> {
    // SAFETY: a new shared mapping of a file we hold, at an address the kernel chooses;
    // nothing refers to that memory yet.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(Errno::last())
    } else {
        Ok(Mapping { ptr: p, len })
    }
}

/// A mapping made by [`map`], unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, accessed only through atomics (or by the
// kernel); it may be used from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The `i`-th 64-bit word.
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!((i + 1) * 8 <= self.len, "word {i} beyond the mapping");
        let p = self.ptr.cast::<AtomicU64>().wrapping_add(i);
        // SAFETY: in bounds (checked), 8-byte aligned (the mapping is page aligned), valid for
        // any bits, and only ever accessed atomically here; the mapping outlives the borrow.
        unsafe { &*p }
    }

    /// `mprotect` of the whole mapping.
    fn protect(&self, prot: libc::c_int) -> Result<(), Errno> {
        // SAFETY: changes the protection of our own mapping only.
        let r = unsafe { libc::mprotect(self.ptr, self.len, prot) };
        if r == 0 {
            Ok(())
        } else {
            Err(Errno::last())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Wakes the waiters on the futex of `word`'s low half (the daemon waiting for an ack).
fn futex_wake(word: &AtomicU64) {
    // SAFETY: FUTEX_WAKE only uses the address (a live, aligned word of a shared mapping)
    // as a key; it reads and writes no memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr().cast::<u32>(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// What an `EngineAttach` by hand gave.
struct RawEngine {
    engine_id: u32,
    len: u64,
    shadow_bytes: u64,
    /// Epoch page, page table, shadow, ring, doorbell.
    fds: Vec<OwnedFd>,
}

/// `EngineAttach` on `raw`: the engine, or the error line.
fn engine_attach(raw: &mut Raw, token: u128, pid: i32, mirror: u64) -> Result<RawEngine, String> {
    let (r, fds) = raw.call(&Request::EngineAttach {
        token,
        pid,
        mirror_id: mirror,
    })?;
    match r {
        Response::EngineAttached {
            engine_id,
            len,
            shadow_bytes,
            ..
        } => {
            if fds.len() != ENGINE_FDS {
                return Err(format!("EngineAttached with {} fds", fds.len()));
            }
            Ok(RawEngine {
                engine_id,
                len,
                shadow_bytes,
                fds,
            })
        }
        r => Err(err_line(&r).unwrap_or_else(|| format!("answered {r:?}"))),
    }
}

// =======================================================================================
// Helper processes: this test binary, re-run as `helper_process` with a role.

/// A helper process as the test drives it: one command line in, one `@@` line out.
struct Helper {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    /// Its first line (`ready ...`).
    ready: String,
}

impl Helper {
    /// Starts a helper playing `role` as `uid` against daemon `d` (`token`: the grant an
    /// `honest` engine attaches with).
    fn start(d: &Daemon, role: &str, uid: u32, token: u128) -> Helper {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "helper_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(ROLE, role)
        .env(SOCKET_ENV, d.socket())
        .env(TOKEN_ENV, format!("{token:x}"))
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        if uid != 0 {
            // std drops the supplementary groups when root sets a uid.
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().expect("spawn a helper");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut h = Helper {
            child,
            stdin,
            out,
            ready: String::new(),
        };
        h.ready = h.line();
        h
    }

    /// A helper speaking the protocol by hand, as `uid`.
    fn raw(d: &Daemon, uid: u32) -> Helper {
        let h = Helper::start(d, "raw", uid, 0);
        assert!(h.ready.starts_with("ready"), "{}", h.ready);
        h
    }

    /// An honest, responsive engine (a `memshadow::Engine` that acknowledges every flush as
    /// soon as its doorbell rings), as `uid`.
    fn honest(d: &Daemon, uid: u32, token: u128) -> Helper {
        let h = Helper::start(d, "honest", uid, token);
        assert!(h.ready.starts_with("ready"), "{}", h.ready);
        h
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next `@@` line, within the hang guard.
    fn line(&mut self) -> String {
        let out = &mut self.out;
        // `None`: no `@@` line yet (each try waits in poll(2) for up to 100 ms).
        let line = || -> Option<Result<String, String>> {
            if !out.buffer().contains(&b'\n') {
                let mut p = [PollFd::new(out.get_ref().as_fd(), PollFlags::POLLIN)];
                if poll(&mut p, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
                    return None;
                }
            }
            let mut l = String::new();
            match out.read_line(&mut l) {
                Ok(0) => Some(Err("the helper exited".into())),
                Ok(_) => l.strip_prefix("@@").map(|l| Ok(l.trim_end().to_owned())),
                Err(e) => Some(Err(e.to_string())),
            }
        };
        match try_wait_until_every(HANG_GUARD, Duration::ZERO, line) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => panic!("helper: {e}"),
            Err(t) => panic!("helper: no answer: {t}"),
        }
    }

    /// Sends a command without waiting for its answer ([`Helper::line`] reads it).
    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to the helper");
        self.stdin.flush().expect("flush");
    }

    /// Sends a command; its answer line.
    fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.line()
    }

    /// A command that must succeed: its answer (which must not be an `err`).
    fn ok(&mut self, line: &str) -> String {
        let a = self.cmd(line);
        assert!(!a.starts_with("err"), "{line:?} failed: {a}");
        a
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGCONT,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Says `line` to the test.
fn say(line: &str) {
    println!("@@{line}");
    let _ = std::io::stdout().flush();
}

/// Not a test: the entry point of the helper processes (does nothing unless [`ROLE`] is
/// set).
#[test]
fn helper_process() {
    if let Ok(role) = std::env::var(ROLE) {
        helper_main(&role);
    }
}

/// A helper: `raw` ([`raw_main`]) or `honest` ([`honest_main`]).
fn helper_main(role: &str) {
    let socket = PathBuf::from(std::env::var_os(SOCKET_ENV).unwrap());
    let token = u128::from_str_radix(&std::env::var(TOKEN_ENV).unwrap(), 16).unwrap();
    // Our own stdin, unbuffered by std (the honest engine polls it).
    let input = BufReader::new(std::fs::File::from(
        std::io::stdin().as_fd().try_clone_to_owned().unwrap(),
    ));
    match role {
        "raw" => raw_main(&socket, input),
        "honest" => honest_main(&socket, token, input),
        r => say(&format!("err unknown role {r}")),
    }
}

/// A scribbler: a thread writing garbage all over an engine's ring.
struct Scribbler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

/// The state of a `raw` helper.
struct RawState {
    raw: Raw,
    engine: Option<RawEngine>,
    ring: Option<Arc<Mapping>>,
    scribbler: Option<Scribbler>,
    /// Requests sent without waiting (`fault-nowait`).
    pending: Vec<u64>,
    /// Memory of this process it attached as a client (`attach-own`).
    own: Vec<Mapping>,
}

/// The `raw` helper: speaks the protocol by hand, one command per line:
///
/// * `attach TOKEN PID MIRROR` (token in hex, 0 to attach by pid) → `attached engine=ID
///   modes=...` (the access modes of the five fds) or `err CODE ...`;
/// * `list PID` → `engines n=N clients=PID,...` (external engines); `grant MIRROR` →
///   `granted`;
/// * `fault OFF LEN` → `populated pages=N`; `fault-nowait OFF LEN` (answered by `collect`);
/// * `write OFF LEN BYTE` → `written len=N`;
/// * `bind` → `bound` (uffd, `/proc/self/mem`, `/proc/self/maps`, `/proc/self/pagemap`);
///   `attach-own PAGES` → `mirror id=ID` (fresh memory of this process, as a client);
/// * `mmap-write`, `reopen` → what the kernel let this engine do with its read-only fds;
/// * `scribble-start`, `scribble-stop` → garbage all over the ring, from a thread;
/// * `ring` → `head=H ack=A evicted=E`.
fn raw_main(socket: &Path, mut input: BufReader<std::fs::File>) {
    let raw = match Raw::connect(socket) {
        Ok(r) => r,
        Err(e) => return say(&format!("err {e}")),
    };
    say(&format!("ready pid={}", std::process::id()));
    let mut st = RawState {
        raw,
        engine: None,
        ring: None,
        scribbler: None,
        pending: Vec::new(),
        own: Vec::new(),
    };
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let answer = raw_command(&mut st, &w).unwrap_or_else(|e| {
            if e.starts_with("err ") {
                e
            } else {
                format!("err {e}")
            }
        });
        say(&answer);
    }
}

fn raw_command(st: &mut RawState, w: &[&str]) -> Result<String, String> {
    let num = |i: usize| -> Result<u64, String> {
        let s = w.get(i).ok_or(format!("missing argument {i}"))?;
        match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => s.parse(),
        }
        .map_err(|e| format!("{s}: {e}"))
    };
    let answer = |st: &mut RawState, req: Request| -> Result<Response, String> {
        let (r, fds) = st.raw.call(&req)?;
        if !fds.is_empty() {
            return Err(format!("{} answered with {} fds", req.name(), fds.len()));
        }
        match err_line(&r) {
            Some(e) => Err(e),
            None => Ok(r),
        }
    };
    match w.first().copied().unwrap_or("") {
        "attach" => {
            let token =
                u128::from_str_radix(w.get(1).ok_or("token")?, 16).map_err(|e| e.to_string())?;
            let pid = w
                .get(2)
                .ok_or("pid")?
                .parse::<i32>()
                .map_err(|e| e.to_string())?;
            let e = engine_attach(&mut st.raw, token, pid, num(3)?)?;
            let modes: Vec<String> = e.fds.iter().map(|f| access_mode(f.as_fd())).collect();
            let line = format!(
                "attached engine={} len={} modes={}",
                e.engine_id,
                e.len,
                modes.join(",")
            );
            let ring = map(
                e.fds[3].as_fd(),
                abi::ring_bytes(),
                libc::PROT_READ | libc::PROT_WRITE,
            )
            .map_err(|e| format!("mmap of the ring: {e}"))?;
            st.ring = Some(Arc::new(ring));
            st.engine = Some(e);
            Ok(line)
        }
        "list" => {
            let pid = w
                .get(1)
                .ok_or("pid")?
                .parse::<i32>()
                .map_err(|e| e.to_string())?;
            match answer(st, Request::ListEngines { pid })? {
                Response::Engines { engines } => {
                    // The daemon's built-in engines (no client) are listed to anyone.
                    let external: Vec<_> =
                        engines.iter().filter(|e| e.state != "built-in").collect();
                    let c: Vec<String> =
                        external.iter().map(|e| e.client_pid.to_string()).collect();
                    Ok(format!(
                        "engines n={} clients={}",
                        external.len(),
                        c.join(",")
                    ))
                }
                r => Err(format!("answered {r:?}")),
            }
        }
        "grant" => match answer(st, Request::Grant { mirror_id: num(1)? })? {
            Response::Granted { token } => Ok(format!("granted token={token:x}")),
            r => Err(format!("answered {r:?}")),
        },
        "fault" => match answer(
            st,
            Request::EngineFault {
                offset: num(1)?,
                len: num(2)?,
            },
        )? {
            Response::Populated { pages } => Ok(format!("populated pages={pages}")),
            r => Err(format!("answered {r:?}")),
        },
        "fault-nowait" => {
            let req = Request::EngineFault {
                offset: num(1)?,
                len: num(2)?,
            };
            let id = st.raw.send(&req, &[])?;
            st.pending.push(id);
            Ok(format!("sent id={id}"))
        }
        "collect" => {
            let mut v = Vec::new();
            for id in std::mem::take(&mut st.pending) {
                let (r, _) = st.raw.answer(id)?;
                v.push(err_line(&r).unwrap_or_else(|| format!("{r:?}")));
            }
            Ok(format!("collected {}", v.join("; ")))
        }
        "write" => {
            let bytes = vec![num(3)? as u8; num(2)? as usize];
            match answer(
                st,
                Request::EngineWrite {
                    offset: num(1)?,
                    bytes,
                },
            )? {
                Response::Written { len } => Ok(format!("written len={len}")),
                r => Err(format!("answered {r:?}")),
            }
        }
        "bind" => {
            let open = |p: &str, write: bool| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(p)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("{p}: {e}"))
            };
            let fds = [
                memshadow::create_uffd().map_err(|e| e.to_string())?,
                open("/proc/self/mem", false)?,
                open("/proc/self/maps", false)?,
                open("/proc/self/pagemap", false)?,
            ];
            let b: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            let req = Request::Bind {
                flags: proto::BindFlags::empty(),
            };
            let id = st.raw.send(&req, &b)?;
            match st.raw.answer(id)?.0 {
                Response::Bound { .. } => Ok("bound".into()),
                r => Err(err_line(&r).unwrap_or_else(|| format!("answered {r:?}"))),
            }
        }
        "attach-own" => {
            let len = (num(1)? * P) as usize;
            let p = memshadow_tests::map_anon(len)
                .map_err(|e| format!("mmap: {e}"))?
                .cast::<libc::c_void>();
            let m = Mapping { ptr: p, len };
            let req = Request::Attach {
                addr: p as u64,
                len: len as u64,
                policy: proto::AttachPolicy::Default,
            };
            st.own.push(m);
            match answer(st, req)? {
                Response::Attached { mirror_id } => Ok(format!("mirror id={mirror_id}")),
                r => Err(format!("answered {r:?}")),
            }
        }
        "mmap-write" => {
            let e = st.engine.as_ref().ok_or("not attached")?;
            let v: Vec<String> = e.fds[..3]
                .iter()
                .map(
                    |f| match map(f.as_fd(), P as usize, libc::PROT_READ | libc::PROT_WRITE) {
                        Ok(_) => "mapped".to_owned(),
                        Err(e) => format!("{e:?}"),
                    },
                )
                .collect();
            Ok(format!("mmap-write {}", v.join(",")))
        }
        "reopen" => reopen(st),
        "scribble-start" => {
            let ring = Arc::clone(st.ring.as_ref().ok_or("not attached")?);
            let doorbell = st.engine.as_ref().ok_or("not attached")?.fds[4]
                .try_clone()
                .map_err(|e| e.to_string())?;
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = Arc::clone(&stop);
            let thread = std::thread::spawn(move || scribble(&ring, &doorbell, &s2));
            st.scribbler = Some(Scribbler { stop, thread });
            Ok("scribbling".into())
        }
        "scribble-stop" => {
            let s = st.scribbler.take().ok_or("not scribbling")?;
            s.stop.store(true, Ordering::Relaxed);
            let rounds = s.thread.join().map_err(|_| "the scribbler panicked")?;
            Ok(format!("scribbled rounds={rounds}"))
        }
        "ack" => {
            // Acknowledges everything queued (an engine holding no translation may).
            let r = st.ring.as_ref().ok_or("not attached")?;
            let head = r.word(std::mem::offset_of!(abi::RingHeader, head) / 8);
            let ack = r.word(std::mem::offset_of!(abi::RingHeader, ack) / 8);
            let h = head.load(Ordering::Acquire);
            ack.store(h, Ordering::Release);
            futex_wake(ack);
            Ok(format!("acked {h}"))
        }
        "ring" => {
            let r = st.ring.as_ref().ok_or("not attached")?;
            let at = |off: usize| r.word(off / 8).load(Ordering::Acquire);
            Ok(format!(
                "head={} ack={} evicted={}",
                at(std::mem::offset_of!(abi::RingHeader, head)),
                at(std::mem::offset_of!(abi::RingHeader, ack)),
                at(std::mem::offset_of!(abi::RingHeader, evicted)),
            ))
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

/// Garbage all over `ring` until `stop`: acks far ahead, acks going backwards, every word
/// (headers, entries, magic) overwritten, futex wakes and a doorbell rung to saturation.
/// Returns the rounds done.
fn scribble(ring: &Mapping, doorbell: &OwnedFd, stop: &AtomicBool) -> u64 {
    let words = abi::ring_bytes() / 8;
    let ack = ring.word(std::mem::offset_of!(abi::RingHeader, ack) / 8);
    let head = ring.word(std::mem::offset_of!(abi::RingHeader, head) / 8);
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut rounds = 0u64;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let h = head.load(Ordering::Acquire);
        let v = match x % 8 {
            0 => u64::MAX,
            1 => 0,
            2 => h.wrapping_sub(1),
            3 => h.wrapping_add(1 << 40),
            4 => 1 << 63,
            5 => x,
            6 => h,
            _ => ack.load(Ordering::Relaxed).wrapping_sub(x % 5),
        };
        ack.store(v, Ordering::Release);
        futex_wake(ack);
        for k in 0..8u64 {
            let i = ((x >> (k * 8)) as usize) % words;
            ring.word(i)
                .store(x.rotate_left(k as u32 * 7), Ordering::Relaxed);
        }
        if rounds % 64 == 0 {
            // A doorbell rung to saturation: the daemon's own writes then fail (EAGAIN).
            let _ = nix::unistd::write(doorbell, &(u64::MAX - 1).to_ne_bytes());
        }
        rounds += 1;
        std::thread::yield_now();
    }
    rounds
}

/// Tries to get write access to the three read-only fds by opening them again through
/// `/proc/self/fd` (a magic link reopens the file itself, checked against its mode, not the
/// access of the fd): `reopen epoch=E pt=E shadow=E`, each `EACCES`-like or `opened`.
/// With the shadow opened for writing, writes `0xee` over the page of the mirror's first
/// page (its slot from the page table) and says `wrote=1`.
fn reopen(st: &mut RawState) -> Result<String, String> {
    let e = st.engine.as_ref().ok_or("not attached")?;
    let mut out = Vec::new();
    let mut writable: Vec<Option<std::fs::File>> = Vec::new();
    for (name, fd) in ["epoch", "pt", "shadow"].iter().zip(&e.fds) {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => {
                out.push(format!("{name}=opened"));
                writable.push(Some(f));
            }
            Err(err) => {
                out.push(format!(
                    "{name}={:?}",
                    Errno::from_raw(err.raw_os_error().unwrap_or(0))
                ));
                writable.push(None);
            }
        }
    }
    if let Some(shadow) = &writable[2] {
        let pt = map(
            e.fds[1].as_fd(),
            (abi::pt_bytes(1)) as usize,
            libc::PROT_READ,
        )
        .map_err(|e| format!("mmap of the page table: {e}"))?;
        let word = pt.word(abi::HEADER_BYTES / 8).load(Ordering::Acquire);
        if word & abi::PTE_VALID != 0 {
            let slot = u64::from(abi::pte_slot(word));
            if slot * P < e.shadow_bytes {
                let n = nix::sys::uio::pwrite(shadow, &[0xee; P as usize], (slot * P) as i64)
                    .map_err(|e| format!("pwrite of the shadow: {e}"))?;
                out.push(format!("wrote={}", u8::from(n == P as usize)));
            }
        }
    }
    Ok(format!("reopen {}", out.join(" ")))
}

/// The `honest` helper: a [`memshadow::Engine`] attached with the token it was given, which
/// polls its doorbell whenever it is not busy (so it acknowledges every flush at once), and
/// answers `read OFF LEN` (`uniform=B`, `mixed first=B at=I`, or `err ...`), `poll`.
fn honest_main(socket: &Path, token: u128, mut input: BufReader<std::fs::File>) {
    let mut e = match memshadow::Engine::attach(Some(socket), token) {
        Ok(e) => e,
        Err(err) => return say(&format!("err {err}")),
    };
    say(&format!("ready engine={}", e.engine_id()));
    let mut line = String::new();
    loop {
        if input.buffer().is_empty() {
            let (stdin_ready, bell) = {
                let mut p = [
                    PollFd::new(input.get_ref().as_fd(), PollFlags::POLLIN),
                    PollFd::new(e.fd(), PollFlags::POLLIN),
                ];
                if poll(&mut p, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
                    (false, false)
                } else {
                    let r = |i: usize| p[i].revents().is_some_and(|r| !r.is_empty());
                    (r(0), r(1))
                }
            };
            if bell {
                // An evicted engine's poll fails; its next read says so.
                let _ = e.poll();
            }
            if !stdin_ready {
                continue;
            }
        }
        line.clear();
        if input.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let a = match w.first().copied() {
            Some("read") => {
                let mut buf = vec![0u8; num(2) as usize];
                match e.read(num(1), &mut buf) {
                    Ok(()) => match buf.iter().position(|b| *b != buf[0]) {
                        None => format!("uniform={}", buf.first().copied().unwrap_or(0)),
                        Some(i) => format!("mixed first={} at={i} there={}", buf[0], buf[i]),
                    },
                    Err(err) => format!("err {err}"),
                }
            }
            Some("poll") => match e.poll() {
                Ok(()) => "polled".into(),
                Err(err) => format!("err {err}"),
            },
            _ => format!("err unknown command {line:?}"),
        };
        say(&a);
    }
}

// =======================================================================================
// Clients.

/// A client as `args` says (e.g. [`NOBODY_ARGS`]) with map `m` of `pages` pages filled with
/// `byte`, attached, and a grant for it; and the mirror's id.
fn client_with_grant(d: &Daemon, args: &[&str], pages: u64, byte: u8) -> (TestClient, u128, u64) {
    let mut c = TestClient::start_with(d.socket(), args);
    c.expect_ok(&format!("map m {pages}"));
    c.expect_ok(&format!("fill m {byte}"));
    let id = fields(&c.expect_ok("attach m"))["id"].parse().unwrap();
    let t = grant(&mut c, "m");
    (c, t, id)
}

fn grant(c: &mut TestClient, map: &str) -> u128 {
    let f = fields(&c.expect_ok(&format!("grant {map}")));
    u128::from_str_radix(&f["token"], 16).unwrap()
}

fn uniform(answer: &str) -> String {
    fields(answer)
        .get("uniform")
        .cloned()
        .unwrap_or_else(|| answer.to_owned())
}

/// Runs `line` on client `c` on a thread, so that a client stuck behind a daemon that waits
/// forever fails the test (after the hang guard) instead of hanging it.
fn guarded(c: TestClient, line: &str) -> (TestClient, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    let l = line.to_owned();
    std::thread::spawn(move || {
        let mut c = c;
        let a = c.cmd(&l);
        let _ = tx.send((c, a));
    });
    rx.recv_timeout(HANG_GUARD)
        .unwrap_or_else(|_| panic!("{line:?} of the client did not finish within {HANG_GUARD:?}"))
}

fn kill(pid: i32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// Flushes queued to engine `id` so far (asked by root; 0 if it is not listed).
fn engine_flushes(d: &Daemon, id: u32) -> u64 {
    let ctl = memshadow::Client::connect_control(Some(d.socket())).unwrap();
    let list = ctl.engines(memshadow::Target::All).unwrap();
    list.iter()
        .find(|e| e.id == id && e.state != "built-in")
        .map_or(0, |e| e.flushes)
}

/// What the daemon's engine list (asked by root) says of engine `id`'s state.
fn engine_state(d: &Daemon, id: u32) -> Option<String> {
    let ctl = memshadow::Client::connect_control(Some(d.socket())).unwrap();
    let list = ctl.engines(memshadow::Target::All).unwrap();
    list.iter()
        .find(|e| e.id == id && e.state != "built-in")
        .map(|e| e.state.clone())
}

// =======================================================================================
// The tests.

/// (d) The epoch page, the page table and the shadow come read-only: a writable shared
/// mapping of them is refused (`EACCES`), so is an `mprotect` adding write to a read-only
/// one, and none of the five files can be truncated or grown (read-only fds, or seals).
#[test]
fn the_read_only_fds_cannot_be_mapped_writable_nor_resized() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let (mut c, token, _) = client_with_grant(&d, NOBODY_ARGS, 4, 7);
    c.expect_ok("populate m");
    let mut raw = Raw::connect(d.socket()).unwrap();
    let e = engine_attach(&mut raw, token, 0, 0).unwrap();
    let modes: Vec<String> = e.fds.iter().map(|f| access_mode(f.as_fd())).collect();
    assert_eq!(modes[..3], ["ro", "ro", "ro"], "{modes:?}");
    let sizes = [
        P as usize,
        abi::pt_bytes(e.len / P) as usize,
        e.shadow_bytes as usize,
    ];
    for (i, name) in ["epoch page", "page table", "shadow"].iter().enumerate() {
        let fd = e.fds[i].as_fd();
        let w = map(fd, sizes[i], libc::PROT_READ | libc::PROT_WRITE);
        assert_eq!(
            w.err(),
            Some(Errno::EACCES),
            "a writable mapping of the {name}"
        );
        let r = map(fd, sizes[i], libc::PROT_READ)
            .unwrap_or_else(|e| panic!("a read-only mapping of the {name}: {e}"));
        assert_eq!(
            r.protect(libc::PROT_READ | libc::PROT_WRITE),
            Err(Errno::EACCES),
            "mprotect adding write to the {name}"
        );
        // A private writable mapping is allowed (copy on write) but never reaches the file:
        // that is the engine's own memory.
        assert!(
            nix::unistd::write(fd, &[1]).is_err(),
            "write(2) to the {name}"
        );
    }
    for (i, name) in ["epoch page", "page table", "shadow", "ring", "doorbell"]
        .iter()
        .enumerate()
    {
        let fd = e.fds[i].as_fd();
        for len in [0i64, 1 << 40] {
            assert!(
                nix::unistd::ftruncate(fd, len).is_err(),
                "ftruncate of the {name} to {len}"
            );
        }
    }
    // The ring (read-write) keeps its size by seals the engine cannot remove.
    let seals = nix::fcntl::fcntl(e.fds[3].as_fd(), nix::fcntl::FcntlArg::F_GET_SEALS).unwrap();
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & want, want, "the ring's seals: {seals:#x}");
    // The client's bytes are still its own.
    assert_eq!(uniform(&c.expect_ok("read m 0 16384")), "7");
}

/// (d) Opening a read-only fd again through `/proc/self/fd/N` checks the file's mode, not
/// the fd's access: an unprivileged engine must not get write access to the epoch page, the
/// page table or its client's shadow that way (and so cannot corrupt what the client and
/// the client's other engines read).
#[test]
fn the_read_only_fds_cannot_be_reopened_writable() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let (mut c, token, _) = client_with_grant(&d, NOBODY_ARGS, 4, 7);
    c.expect_ok("populate m");
    let mut h = Helper::raw(&d, NOBODY);
    h.ok(&format!("attach {token:x} 0 0"));
    let w = h.ok("mmap-write");
    assert_eq!(w, "mmap-write EACCES,EACCES,EACCES");
    let r = h.ok("reopen");
    let read = uniform(&c.expect_ok("read m 0 16384"));
    assert!(
        !r.contains("opened") && read == "7",
        "an engine of uid {NOBODY} opened its read-only fds for writing: {r}; the client \
         now reads {read} where it wrote 7"
    );
}

/// An engine session is an engine only: it cannot `Bind` and become a client too (nor is
/// it a client for `Grant`), nor attach a second time.
#[test]
fn an_engine_session_stays_an_engine() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let (_c, token, _) = client_with_grant(&d, NOBODY_ARGS, 4, 7);
    let mut h = Helper::raw(&d, NOBODY);
    h.ok(&format!("attach {token:x} 0 0"));
    assert!(h
        .cmd(&format!("attach {token:x} 0 0"))
        .starts_with("err OutOfOrder"));
    assert!(h.cmd("grant 1").starts_with("err OutOfOrder"));
    let b = h.cmd("bind");
    assert!(
        b.starts_with("err OutOfOrder"),
        "an engine session bound: {b}"
    );
}

/// A device fault of an engine never holds up the daemon's other clients: a fault on a
/// mirror whose invalidation waits for another (stopped) engine's acknowledgement waits on
/// a worker, not on the session loop, so a `status` of anybody is answered meanwhile (before
/// the stopped engine is evicted).
#[test]
fn an_engine_fault_never_stalls_the_session_loop() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&["--engine-ack-timeout-ms", "20000"]);
    let (mut c, token, _) = client_with_grant(&d, NOBODY_ARGS, 16, 7);
    // The engine to be stopped reads (and so caches) every page but the first.
    let mut stopped = Helper::honest(&d, NOBODY, token);
    assert_eq!(uniform(&stopped.ok(&format!("read {P} {}", 15 * P))), "7");
    let mut faulter = Helper::raw(&d, NOBODY);
    faulter.ok(&format!("attach {token:x} 0 0"));
    stop(stopped.pid());
    // A change of the mirror: its invalidation's finish waits for the stopped engine (20 s
    // at most); the client's madvise returns at once. The faulter caches nothing: it
    // acknowledges its flush.
    c.expect_ok(&format!("madvise-range m {} {}", 8 * P, 8 * P));
    wait_until("the flush to reach the faulter", HANG_GUARD, || {
        fields(&faulter.ok("ring"))["head"] == "1"
    });
    faulter.ok("ack");
    // A fault of page 0 meets that invalidation (a fault waits for it to end).
    faulter.ok(&format!("fault-nowait 0 {P}"));
    // Give the session loop the fault first (this only makes a stall likelier to show).
    std::thread::sleep(Duration::from_millis(300));
    let evicted = d.status()["device.engine_evictions"];
    kill(stopped.pid(), Signal::SIGCONT);
    assert_eq!(
        evicted, 0,
        "another client's status was answered only once the stopped engine was evicted: \
         the engine's fault held the session loop meanwhile"
    );
    let a = faulter.ok("collect");
    assert!(a.contains("Populated"), "{a}");
}

/// An honest engine (the library's) whose device fault meets invalidations of its client is
/// not evicted: the fault waits for an invalidation of the mirror to end, whose finish may
/// wait for this very engine, so the library acknowledges flushes while its fault is served
/// (docs/engines.md, "Faults never wait for the engine itself"); an engine that did not
/// (blocked in its request) was evicted after `engine_ack_timeout_ms`.
///
/// Made deterministic with a second, stopped engine that holds invalidation X of the mirror
/// open, so that the honest engine's fault of a missing page waits; invalidation Y then
/// queues a flush for the honest engine while its fault waits; then the stopped engine runs
/// again and acknowledges both.
#[test]
fn an_engine_faulting_while_its_client_changes_its_mapping_is_not_evicted() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&["--engine-ack-timeout-ms", "10000"]);
    let (mut c, token, _) = client_with_grant(&d, NOBODY_ARGS, 16, 7);
    let mut holder = Helper::honest(&d, NOBODY, token);
    let holder_id: u32 = fields(&holder.ready)["engine"].parse().unwrap();
    assert_eq!(
        uniform(&holder.ok(&format!("read {} {}", 8 * P, 8 * P))),
        "7"
    );
    let mut e = Helper::honest(&d, NOBODY, token);
    let id: u32 = fields(&e.ready)["engine"].parse().unwrap();
    let queued = |n: u64| {
        d.wait_until(format!("flush {n} to be queued"), HANG_GUARD, || {
            engine_flushes(&d, holder_id) >= n
        });
    };
    stop(holder.pid());
    // X: its finish waits for the stopped engine.
    c.expect_ok(&format!("madvise-range m {} {}", 8 * P, 4 * P));
    queued(1);
    // The honest engine reads page 0 (never in the shadow): its fault waits for X to end.
    e.send(&format!("read 0 {P}"));
    // Let the fault reach the daemon first (this only makes the bug likelier to show).
    std::thread::sleep(Duration::from_millis(300));
    // Y: a flush for both engines, while the fault waits.
    c.expect_ok(&format!("madvise-range m {} {}", 12 * P, 4 * P));
    queued(2);
    kill(holder.pid(), Signal::SIGCONT);
    let a = e.line();
    assert_eq!(
        uniform(&a),
        "7",
        "an engine whose fault met an invalidation: {a} ({:?})",
        engine_state(&d, id)
    );
    assert_eq!(d.counter("device.engine_evictions"), 0);
}

/// (a) A grant is its client's user's: another unprivileged user presenting it is told
/// `NoSuchGrant`, exactly as for a wrong token (so it learns nothing of whether it exists),
/// whether the grant is root's or another unprivileged user's. The grant's own user, and
/// root, may use it.
#[test]
fn another_users_grant_is_no_grant() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let (_root_client, root_token, _) = client_with_grant(&d, &[], 4, 7);
    let (_nobody_client, nobody_token, _) = client_with_grant(&d, NOBODY_ARGS, 4, 8);
    let attach = |uid: u32, token: u128| {
        let mut h = Helper::raw(&d, uid);
        h.cmd(&format!("attach {token:x} 0 0"))
    };
    let wrong = attach(NOBODY, root_token ^ 1);
    assert!(
        wrong.starts_with("err NoSuchGrant"),
        "a wrong token: {wrong}"
    );
    for (uid, token, whose) in [
        (NOBODY, root_token, "root's"),
        (SOMEBODY, nobody_token, "nobody's"),
    ] {
        let a = attach(uid, token);
        assert_eq!(a, wrong, "uid {uid} presenting {whose} grant");
    }
    // The tokens are good: nobody's for nobody, both for root.
    let mut own = Helper::honest(&d, NOBODY, nobody_token);
    assert_eq!(uniform(&own.ok("read 0 4096")), "8");
    for t in [root_token, nobody_token] {
        let mut raw = Raw::connect(d.socket()).unwrap();
        engine_attach(&mut raw, t, 0, 0).unwrap();
    }
}

/// (b) Attaching by pid (token 0) is for root and the daemon's user: an unprivileged user
/// is refused, for another user's client and for its own user's alike; so is listing the
/// engines of every client or of another client. Its own client's engines it may list.
#[test]
fn nobody_may_not_attach_by_pid_nor_list_other_clients_engines() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let (root_client, _, root_mirror) = client_with_grant(&d, &[], 4, 7);
    let (nobody_client, nobody_token, nobody_mirror) = client_with_grant(&d, NOBODY_ARGS, 4, 8);
    // An engine of each client (root attaches by pid; nobody's by its grant).
    let mut raw = Raw::connect(d.socket()).unwrap();
    engine_attach(&mut raw, 0, root_client.pid(), root_mirror).unwrap();
    let mut own = Helper::raw(&d, NOBODY);
    own.ok(&format!("attach {nobody_token:x} 0 0"));
    let mut h = Helper::raw(&d, NOBODY);
    for (pid, mirror) in [
        (root_client.pid(), root_mirror),
        (nobody_client.pid(), nobody_mirror),
        (h.pid(), 1),
        (0, 1),
        (-1, 1),
        (i32::MIN, u64::MAX),
    ] {
        let a = h.cmd(&format!("attach 0 {pid} {mirror}"));
        assert!(
            a.starts_with("err PermissionDenied"),
            "attach to pid {pid}: {a}"
        );
    }
    for pid in [0, -1, root_client.pid(), nobody_client.pid(), own.pid()] {
        let a = h.cmd(&format!("list {pid}"));
        assert!(a.starts_with("err PermissionDenied"), "list {pid}: {a}");
    }
    // Its own pid: allowed, and it has no engine (it is no client).
    assert_eq!(h.ok(&format!("list {}", h.pid())), "engines n=0 clients=");
    // Now it becomes a client with an engine of its own: that one, and only that, it sees.
    h.ok("bind");
    let m = fields(&h.ok("attach-own 4"))["id"].clone();
    let t = fields(&h.ok(&format!("grant {m}")))["token"].clone();
    let mut mine = Helper::raw(&d, NOBODY);
    mine.ok(&format!("attach {t} 0 0"));
    assert_eq!(
        h.ok(&format!("list {}", h.pid())),
        format!("engines n=1 clients={}", h.pid())
    );
    // Root sees all three.
    let ctl = memshadow::Client::connect_control(Some(d.socket())).unwrap();
    let all = ctl.engines(memshadow::Target::All).unwrap();
    assert_eq!(all.iter().filter(|e| e.state != "built-in").count(), 3);
}

/// (c) A grant dies with its mirror and with its client: once the client detached the
/// mirror, or exited, the token is refused (`NoSuchGrant`) and the engines attached with it
/// are evicted. A grant of the mirror attached again works (the refusal is the
/// revocation's), and the old token stays dead.
#[test]
fn a_revoked_grant_is_no_grant() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let (mut c, t1, _) = client_with_grant(&d, NOBODY_ARGS, 8, 3);
    let mut e = Helper::honest(&d, NOBODY, t1);
    assert_eq!(uniform(&e.ok(&format!("read 0 {}", 8 * P))), "3");
    c.expect_ok("detach m");
    let mut h = Helper::raw(&d, NOBODY);
    let a = h.cmd(&format!("attach {t1:x} 0 0"));
    assert!(
        a.starts_with("err NoSuchGrant"),
        "the grant of a detached mirror: {a}"
    );
    let r = e.cmd("read 0 64");
    assert!(
        r.contains("evicted"),
        "an engine of a detached mirror read: {r}"
    );
    c.expect_ok("attach m");
    let t2 = grant(&mut c, "m");
    let a = h.cmd(&format!("attach {t1:x} 0 0"));
    assert!(
        a.starts_with("err NoSuchGrant"),
        "the old grant, re-attached: {a}"
    );
    h.ok(&format!("attach {t2:x} 0 0"));
    h.ok(&format!("fault 0 {P}"));
    // The client exits: its grants die with it, its engines are evicted.
    let t3 = grant(&mut c, "m");
    c.kill();
    wait_until(
        "the exited client's engine to be evicted",
        HANG_GUARD,
        || h.cmd(&format!("fault 0 {P}")).starts_with("err Evicted"),
    );
    let mut late = Helper::raw(&d, NOBODY);
    let a = late.cmd(&format!("attach {t3:x} 0 0"));
    assert!(
        a.starts_with("err NoSuchGrant"),
        "the grant of an exited client: {a}"
    );
}

/// (e) An engine that scribbles over its ring — acknowledgements far ahead and going
/// backwards, every entry and header word overwritten, its doorbell saturated — harms
/// nobody else: after every change of the client, the client's other (honest) engine and
/// the client's own reads return the client's bytes; another client is untouched; the
/// honest engine is never evicted; the daemon counts no G2 violation and keeps answering.
#[test]
fn a_scribbling_engine_harms_nobody_else() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&["--engine-ack-timeout-ms", "10000"]);
    let (c, token, _) = client_with_grant(&d, NOBODY_ARGS, 32, 1);
    let (mut other, _, _) = client_with_grant(&d, &["--uid", "65533"], 8, 0x55);
    let mut honest = Helper::honest(&d, NOBODY, token);
    let honest_id: u32 = fields(&honest.ready)["engine"].parse().unwrap();
    let mut bad = Helper::raw(&d, NOBODY);
    bad.ok(&format!("attach {token:x} 0 0"));
    bad.ok(&format!("fault 0 {}", 32 * P));
    bad.ok("scribble-start");
    let mut c = c;
    for round in 0..24u64 {
        let byte = round as u8 + 2;
        let want = if round % 3 == 2 {
            let (c2, a) = guarded(c, "madvise m dontneed");
            c = c2;
            assert!(a.starts_with("ok"), "{a}");
            0
        } else {
            c.expect_ok(&format!("fill m {byte}"));
            let (c2, a) = guarded(c, "sync m");
            c = c2;
            assert!(a.starts_with("ok"), "sync: {a}");
            byte
        };
        let h = honest.ok(&format!("read 0 {}", 32 * P));
        assert_eq!(
            uniform(&h),
            want.to_string(),
            "round {round}: the honest engine read"
        );
        for off in [0, 24 * P] {
            let (c2, a) = guarded(c, &format!("read m {off} {}", 8 * P));
            c = c2;
            assert_eq!(
                uniform(&a),
                want.to_string(),
                "round {round}: the client read"
            );
        }
    }
    let rounds = bad.ok("scribble-stop");
    assert_ne!(rounds, "scribbled rounds=0");
    assert_eq!(
        uniform(&other.expect_ok(&format!("read m 0 {}", 8 * P))),
        "85"
    );
    assert_eq!(d.counter("device.g2_violations"), 0);
    assert_eq!(engine_state(&d, honest_id).as_deref(), Some("attached"));
}

/// (f) An engine that never acknowledges (it is stopped) is evicted after
/// `--engine-ack-timeout-ms`, and told so once it runs again; the client's own requests
/// work meanwhile and afterwards and return its bytes; later changes do not wait for the
/// evicted engine, and a new engine may attach.
#[test]
fn a_stopped_engine_is_evicted_and_the_client_goes_on() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&["--engine-ack-timeout-ms", "300"]);
    let (c, token, _) = client_with_grant(&d, NOBODY_ARGS, 16, 4);
    let mut e = Helper::honest(&d, NOBODY, token);
    let id: u32 = fields(&e.ready)["engine"].parse().unwrap();
    assert_eq!(uniform(&e.ok(&format!("read 0 {}", 16 * P))), "4");
    stop(e.pid());
    let mut c = c;
    for line in ["fill m 9", "sync m"] {
        let (c2, a) = guarded(c, line);
        c = c2;
        assert!(a.starts_with("ok"), "{line}: {a}");
    }
    let (c2, a) = guarded(c, &format!("read m 0 {}", 8 * P));
    c = c2;
    assert_eq!(uniform(&a), "9");
    d.wait_until("the stopped engine to be evicted", HANG_GUARD, || {
        d.counter("device.engine_evictions") >= 1
    });
    assert_eq!(engine_state(&d, id).as_deref(), Some("evicted"));
    kill(e.pid(), Signal::SIGCONT);
    let r = e.cmd("read 0 64");
    assert!(r.contains("evicted"), "an evicted engine read: {r}");
    // A new engine attaches (the grant lives on) and reads the client's bytes; the next
    // change waits for it only.
    let mut e2 = Helper::honest(&d, NOBODY, token);
    assert_eq!(uniform(&e2.ok(&format!("read 0 {}", 16 * P))), "9");
    let (c2, a) = guarded(c, "madvise m dontneed");
    c = c2;
    assert!(a.starts_with("ok"), "{a}");
    assert_eq!(uniform(&e2.ok(&format!("read 0 {}", 16 * P))), "0");
    let (_c, a) = guarded(c, &format!("read m 0 {}", 8 * P));
    assert_eq!(uniform(&a), "0");
}

/// (g) Grants are bounded per session: 64 live ones, the next refused (`QuotaExceeded`);
/// a detach revokes its mirror's grants and so makes room; another session of the same
/// user has its own 64.
#[test]
fn grants_are_bounded_per_session() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let mut c = TestClient::start_with(d.socket(), NOBODY_ARGS);
    for m in ["a", "b"] {
        c.expect_ok(&format!("map {m} 1"));
        c.expect_ok(&format!("attach {m}"));
    }
    let mut tokens = std::collections::HashSet::new();
    for i in 0..64 {
        tokens.insert(grant(&mut c, ["a", "b"][i % 2]));
    }
    assert_eq!(tokens.len(), 64, "the tokens differ");
    assert!(!tokens.contains(&0));
    let r = c.cmd("grant a");
    assert!(r.contains("too many live grants"), "the 65th grant: {r}");
    // Another session of the same user has its own.
    let (_c2, _, _) = client_with_grant(&d, NOBODY_ARGS, 1, 1);
    // Detaching b revokes its 32 grants: 32 more, then no more.
    c.expect_ok("detach b");
    for _ in 0..32 {
        grant(&mut c, "a");
    }
    let r = c.cmd("grant a");
    assert!(r.contains("too many live grants"), "{r}");
    // The refused grant made no token: every live one still attaches.
    let t = *tokens.iter().next().unwrap();
    let mut h = Helper::raw(&d, NOBODY);
    let a = h.cmd(&format!("attach {t:x} 0 0"));
    assert!(
        a.starts_with("attached") || a.starts_with("err NoSuchGrant"),
        "{a}"
    );
}

/// Engine requests in the wrong state, or with hostile fields, are refused one by one; the
/// engine's session and the daemon go on, and a legal fault and write still work.
#[test]
fn hostile_engine_requests_are_refused() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let (mut c, token, _) = client_with_grant(&d, &["--uid", "65534", "--device-writes"], 4, 7);
    let mut h = Helper::raw(&d, NOBODY);
    for cmd in [
        format!("fault 0 {P}"),
        "write 0 16 1".into(),
        "grant 1".into(),
    ] {
        let a = h.cmd(&cmd);
        assert!(
            a.starts_with("err OutOfOrder"),
            "{cmd} before attaching: {a}"
        );
    }
    h.ok(&format!("attach {token:x} 0 0"));
    let len = 4 * P;
    for (off, n) in [
        (u64::MAX, 1),
        (0, u64::MAX),
        (len, 1),
        (len - 1, 2),
        (u64::MAX - P + 1, P),
        (1 << 63, 1 << 63),
    ] {
        let a = h.cmd(&format!("fault {off} {n}"));
        assert!(a.starts_with("err BadRange"), "fault {off:#x}+{n:#x}: {a}");
    }
    for (off, n) in [(u64::MAX, 1), (len - 1, 2), (len, 1), (u64::MAX - 15, 16)] {
        let a = h.cmd(&format!("write {off} {n} 1"));
        assert!(a.starts_with("err BadRange"), "write {off:#x}+{n:#x}: {a}");
    }
    assert_eq!(h.ok(&format!("fault 0 {len}")), "populated pages=4");
    assert_eq!(h.ok("write 100 16 9"), "written len=16");
    assert_eq!(fields(&c.expect_ok("byte m 100"))["byte"], "9");
    assert_eq!(fields(&c.expect_ok("byte m 116"))["byte"], "7");
    assert!(d.try_status().is_some());
}

/// An engine that outlives its client (evicted, its session still open) keeps nothing of
/// the client in the daemon: no userfaultfd, no `/proc` file of the client, no shadow or
/// epoch memory file (engine sessions are never closed for idling, so whatever one keeps
/// alive, its user keeps for as long as it likes).
#[test]
fn an_engine_outliving_its_client_keeps_nothing_of_it() {
    if !is_root() {
        return;
    }
    let d = Daemon::start(&[]);
    let targets = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|t| t.to_string_lossy().into_owned())
            .collect()
    };
    let (mut c, token, _) = client_with_grant(&d, NOBODY_ARGS, 4, 7);
    let pid = c.pid();
    let mut h = Helper::raw(&d, NOBODY);
    h.ok(&format!("attach {token:x} 0 0"));
    h.ok(&format!("fault 0 {}", 4 * P));
    let client_files = |t: &String| {
        t.contains("userfaultfd")
            || t.contains(&format!("/proc/{pid}/"))
            || t.contains("memshadow-shadow")
            || t.contains("memshadow-epoch")
    };
    assert!(targets().iter().any(client_files), "{:?}", targets());
    c.kill();
    wait_until("the engine to be evicted", HANG_GUARD, || {
        h.cmd(&format!("fault 0 {P}")).starts_with("err Evicted")
    });
    d.wait_until("the client's files to be closed", HANG_GUARD, || {
        let left: Vec<String> = targets().into_iter().filter(client_files).collect();
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    });
}
