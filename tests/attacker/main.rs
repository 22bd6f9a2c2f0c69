//! `memshadow-attacker`: attacks on memshadowd by an unprivileged user, for the tests of
//! `tests/hostile.rs` (docs/threat-model.md). Each run is one attack; it prints one line
//! saying what it got (`leaked ...`, `refused ...`, ...) and exits.
//!
//! Usage: `memshadow-attacker --uid UID ATTACK SOCKET [ARGS]`:
//! * `exec-read SOCKET PROGRAM`: bind and attach the range where `PROGRAM` (a setuid-root
//!   program that puts a secret at [`SECRET_ADDR`] and prints `ready`) will keep its secret,
//!   fork a child that keeps the session, `exec` the program, and read the range through
//!   the device from the child.
//! * `opath-bind SOCKET PROGRAM`: say hello, fork, `exec` the program; the child binds the
//!   session with its own userfaultfd and an `O_PATH` fd of the program's `/proc/PID/mem`,
//!   attaches the secret's range and reads it.
//! * `connect-and-exit SOCKET`: connect and exit at once (a peer gone before the accept).
//! * `silent SOCKET`: connect, never speak; print `closed` when the daemon hangs up.
//! * `non-reader SOCKET N`: hello, then N status requests whose answers it never reads;
//!   print `closed` when the daemon hangs up.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::Path;

use memshadow_proto::{self as proto, Request, Response, VERSION};

/// Where the setuid test program keeps its secret (and the attacker maps its bait).
pub const SECRET_ADDR: u64 = 0x5e_c000_0000;
/// Bytes of the secret's mapping.
pub const SECRET_LEN: usize = 16 * 4096;

type Res<T> = Result<T, String>;

fn main() {
    // The test may have stopped listening (it kills silent attackers): never panic on it.
    let say = |line: String| {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    match run() {
        Ok(line) => say(line),
        Err(e) => {
            say(format!("error {e}"));
            std::process::exit(1);
        }
    }
}

fn run() -> Res<String> {
    let args: Vec<String> = std::env::args().collect();
    let mut a = args.iter().skip(1).map(String::as_str);
    let mut next = |what: &str| a.next().ok_or(format!("missing {what}"));
    if next("--uid")? != "--uid" {
        return Err("usage: memshadow-attacker --uid UID ATTACK SOCKET [ARGS]".into());
    }
    let uid: u32 = next("uid")?.parse().map_err(|e| format!("uid: {e}"))?;
    let attack = next("attack")?.to_owned();
    let socket = next("socket")?.to_owned();
    become_uid(uid)?;
    let socket = Path::new(&socket);
    match attack.as_str() {
        "exec-read" => exec_read(socket, next("program")?),
        "opath-bind" => opath_bind(socket, next("program")?),
        "connect-and-exit" => connect(socket).map(|_| "connected".into()),
        "silent" => {
            let s = connect(socket)?;
            wait_hangup(&s);
            Ok("closed".into())
        }
        "non-reader" => {
            let n: u64 = next("count")?.parse().map_err(|e| format!("count: {e}"))?;
            non_reader(socket, n)
        }
        other => Err(format!("unknown attack {other}")),
    }
}

/// Drops to `uid` (and the same gid), staying dumpable, like an unprivileged client.
fn become_uid(uid: u32) -> Res<()> {
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).map_err(|e| format!("setgid: {e}"))?;
    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(|e| format!("setuid: {e}"))?;
    nix::sys::prctl::set_dumpable(true).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))
}

fn connect(path: &Path) -> Res<OwnedFd> {
    memshadow_tests::seqpacket_connect(path).map_err(|e| format!("connect: {e}"))
}

/// Sends `req` as request `id` with `fds` and returns the answer to it.
fn call(s: &OwnedFd, id: u64, req: &Request, fds: &[std::os::fd::BorrowedFd<'_>]) -> Res<Response> {
    proto::send(s.as_fd(), req.msg_type(), 0, id, &req.encode_payload(), fds)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    loop {
        let f = proto::recv(s.as_fd(), &mut buf).map_err(|e| format!("recv: {e}"))?;
        let r = Response::decode(f.header.msg_type, &f.payload, f.fds.len())
            .map_err(|e| format!("decode: {e}"))?;
        if f.header.request_id == id || f.header.request_id == 0 {
            return Ok(r);
        }
    }
}

fn hello(s: &OwnedFd) -> Res<()> {
    let h = Request::Hello {
        min_version: 1,
        max_version: VERSION,
        name: "attacker".into(),
    };
    match call(s, 1, &h, &[])? {
        Response::HelloAck { .. } => Ok(()),
        r => Err(format!("hello: {r:?}")),
    }
}

/// Maps the bait at [`SECRET_ADDR`] (so that attaching it succeeds before the exec).
fn map_bait() -> Res<()> {
    // SAFETY: a fixed mapping at an address nothing of ours uses (NOREPLACE refuses if it
    // is taken); the program we exec maps its secret there too.
    let p = unsafe {
        libc::mmap(
            SECRET_ADDR as *mut libc::c_void,
            SECRET_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as u64 != SECRET_ADDR {
        return Err(format!("mmap bait: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the mapping just made, writable, SECRET_LEN bytes.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), b'A', SECRET_LEN) };
    Ok(())
}

/// A pipe for the exec'd program's `ready`.
fn pipe() -> Res<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))
}

/// Forks. The parent (the session's peer) execs `program` with its stdout on `w`; the child
/// returns (with `r`, to wait for the program's `ready`) and goes on with the attack.
fn fork_and_exec(program: &str) -> Res<BufReader<std::fs::File>> {
    let (r, w) = pipe()?;
    let prog = std::ffi::CString::new(program).map_err(|e| e.to_string())?;
    // SAFETY: the child below only reads a pipe and speaks on sockets it already holds
    // before it exits; this process has no other threads.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(r);
            nix::unistd::dup2_stdout(&w).map_err(|e| format!("dup2: {e}"))?;
            let argv = [prog.as_c_str()];
            let e = nix::unistd::execv(&prog, &argv).unwrap_err();
            Err(format!("exec {program}: {e}"))
        }
        nix::unistd::ForkResult::Child => {
            drop(w);
            let mut rd = BufReader::new(std::fs::File::from(r));
            let mut line = String::new();
            rd.read_line(&mut line).map_err(|e| format!("ready: {e}"))?;
            if line.trim() != "ready" {
                return Err(format!("the program said {line:?}, not ready"));
            }
            Ok(rd)
        }
    }
}

/// What a device read of the secret's range came to.
fn verdict(read: Result<Vec<u8>, String>) -> String {
    match read {
        Ok(bytes) if bytes.windows(6).any(|w| w == b"SECRET") => {
            format!(
                "leaked {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(32)])
            )
        }
        Ok(bytes) => format!("read {} bytes, no secret", bytes.len()),
        Err(e) => format!("refused {e}"),
    }
}

fn exec_read(socket: &Path, program: &str) -> Res<String> {
    map_bait()?;
    let client = memshadow::Client::connect_to(socket).map_err(|e| format!("connect: {e}"))?;
    let mirror = client
        .attach(SECRET_ADDR as *const u8, SECRET_LEN)
        .map_err(|e| format!("attach: {e}"))?;
    let _ready = fork_and_exec(program)?;
    let mut out = [0u8; 64];
    let read = mirror
        .read(0, &mut out)
        .map(|()| out.to_vec())
        .map_err(|e| e.to_string());
    std::mem::forget(mirror);
    Ok(verdict(read))
}

fn opath_bind(socket: &Path, program: &str) -> Res<String> {
    // The child's own mm needs the range to register it with its own uffd.
    map_bait()?;
    let s = connect(socket)?;
    hello(&s)?;
    let _ready = fork_and_exec(program)?;
    let parent = nix::unistd::getppid();
    let path = std::ffi::CString::new(format!("/proc/{parent}/mem")).map_err(|e| e.to_string())?;
    // SAFETY: `path` is a valid C string for the duration of the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open O_PATH: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd that nothing else owns.
    let mem = unsafe { OwnedFd::from_raw_fd(fd) };
    let uffd = memshadow::create_uffd().map_err(|e| format!("uffd: {e}"))?;
    match call(
        &s,
        2,
        &Request::Bind {
            flags: proto::BindFlags::empty(),
        },
        &[uffd.as_fd(), mem.as_fd()],
    )? {
        Response::Bound { .. } => {}
        Response::Error { code, message } => return Ok(format!("refused {code:?}: {message}")),
        r => return Err(format!("bind: {r:?}")),
    }
    let attach = Request::Attach {
        addr: SECRET_ADDR,
        len: SECRET_LEN as u64,
        policy: proto::AttachPolicy::Default,
    };
    let id = match call(&s, 3, &attach, &[])? {
        Response::Attached { mirror_id } => mirror_id,
        Response::Error { code, message } => return Ok(format!("refused {code:?}: {message}")),
        r => return Err(format!("attach: {r:?}")),
    };
    let read = Request::Read {
        mirror_id: id,
        offset: 0,
        len: 64,
    };
    let got = match call(&s, 4, &read, &[])? {
        Response::Data { bytes } => Ok(bytes),
        Response::Error { code, message } => Err(format!("{code:?}: {message}")),
        r => return Err(format!("read: {r:?}")),
    };
    Ok(verdict(got))
}

/// Blocks until the daemon closes `s` (or sends something).
fn wait_hangup(s: &OwnedFd) {
    let mut fds = [nix::poll::PollFd::new(
        s.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
}

fn non_reader(socket: &Path, n: u64) -> Res<String> {
    let s = connect(socket)?;
    hello(&s)?;
    nix::fcntl::fcntl(
        &s,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| format!("fcntl: {e}"))?;
    let st = Request::Status;
    let mut sent = 0;
    for id in 2..2 + n {
        match proto::send(s.as_fd(), st.msg_type(), 0, id, &st.encode_payload(), &[]) {
            Ok(()) => sent += 1,
            // The daemon stopped reading, or hung up: either way, stop sending.
            Err(_) => break,
        }
    }
    // Never read an answer; wait until the daemon gives up on this session (POLLRDHUP
    // comes with the hang-up, whatever is still queued unread).
    let rdhup = nix::poll::PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [nix::poll::PollFd::new(s.as_fd(), rdhup)];
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
    Ok(format!("closed after {sent} requests"))
}
