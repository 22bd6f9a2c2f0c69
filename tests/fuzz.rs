//! Handler fuzzing against a real `memshadowd`: for a bounded time, many sessions send
//! generated frame sequences (valid and invalid requests, in every protocol state, with
//! right and wrong fds), half of them as an unprivileged user, and the daemon is checked
//! throughout and afterwards.
//!
//! How it runs. The test starts the daemon, then worker processes (this test binary re-run
//! as `fuzz_worker_process`: two as root, two as uid/gid 65534, one as the *bystander*
//! 65533), and feeds each worker one *script* at a time: a sequence of frames and socket
//! actions over one to three connections, in the text format of
//! `tests/fuzz-corpus/README.md`. Scripts are mutated from the corpus in
//! `tests/fuzz-corpus/` or generated from scratch, by a xorshift PRNG seeded from
//! `MEMSHADOW_FUZZ_SEED` (printed); script `k` of worker `w` depends only on the seed, `w`,
//! `k` and the corpus — except whether it runs `clean` (see below); replay files say so.
//!
//! The abuse bar. The daemon refuses, for 2 s, the new connections of a user whose
//! connections sent more than 32 malformed messages within a second (never root nor its
//! own user). Unprivileged workers would meet it most of the time, so the scripts of such
//! a user may send [`MALFORMED_BUDGET`] malformed frames per second between them: a script
//! that would send more runs `clean` (its malformed frames are not sent), and the corpus's
//! first, unmutated pass waits for room instead. A worker that meets the bar anyway (the
//! corpus's `34-abuse-bar.msf` does) waits until a hello of its user is answered again
//! (bounded: the bar must lift). The bystander only ever runs clean scripts. A refusal is a
//! close with a reason wherever a connection meets it; the bar refusing root, the daemon's
//! user or the bystander is a finding. The summary's `fuzz bar:` lines say how much of each
//! user's scripts and time it took.
//!
//! Checked in every session (by the worker): every request gets an answer or a close
//! within a deadline; every answer is a well-formed frame without fds, of the type its
//! request calls for, and carries a request id that was sent; malformed frames are answered
//! `BadMessage` and close the session, and a healthy session is never closed without a
//! reason (a refusal right after `accept`, or the handshake timeout); nothing but
//! `Hello` succeeds before `Hello`, nothing that needs `Bind` before `Bind`; `Bind` accepts
//! only the client's own `/proc/PID/mem`, opened for reading (and pagemap); an unprivileged
//! client never gets another client's clients, mirrors, bytes, invalidations, syncs or
//! trace; a device read returns exactly the client's own bytes, and only for a mirror it
//! attached and has not detached.
//!
//! External engines (protocol 3): scripts grant their mirrors, attach engines with their
//! own grants, other workers' (published in a shared directory, [`TokenBook`]), earlier
//! scripts' (revoked), random tokens and by pid; engines fault, write (only the bytes their
//! client holds, so the read checks stay exact), list engines and scribble over their
//! rings. Checked: `EngineAttached` comes only to a session neither bound nor an engine,
//! with exactly five fds (three read-only and not mappable for writing, the ring
//! read-write, a pipe's read end; every received fd is closed), never for a token no grant handed
//! out or one revoked by a detach, and for an unprivileged session never by pid nor with
//! another user's grant; an engine's session never binds; the engine requests of a session
//! that is no engine are refused `OutOfOrder`; faults and writes stay inside the engine's
//! mirror; an unprivileged session lists no other client's engines.
//!
//! Checked by the test, periodically and at the end: the daemon is alive and answers
//! `status`; once every session has closed, its fd and thread counts come back to their
//! baseline, `shadow.slots_in_use` to 0 and `server.clients` to the one asking; and a
//! well-behaved `TestClient` can still connect, attach and read.
//!
//! Environment:
//! - `MEMSHADOW_FUZZ_SECS`: fuzzing time (default 20).
//! - `MEMSHADOW_FUZZ_SEED`: the seed (default: from the clock; always printed).
//! - `MEMSHADOW_FUZZ_SESSIONS`: stop after this many scripts (default: no limit).
//! - `MEMSHADOW_FUZZ_REPLAY`: run only this script file (e.g. one written under
//!   `target/memshadow-fuzz/` by a failing run) against a fresh daemon, then check.
//! - `MEMSHADOW_FUZZ_ENABLE`: comma-separated generators (and checks) of [`KNOWN_BUGS`] to
//!   switch on (or `all`); they are off by default while the daemon fixes land.
//! - `MEMSHADOW_FUZZ_HANDSHAKE_SECS`: how long a silent connection may live (default 10).
//! - `MEMSHADOW_FUZZ_DAEMON_ARGS`: more `memshadowd` arguments (e.g. `--mode one-pass`).
//!
//! An input that breaks an invariant is written to `target/memshadow-fuzz/` and its path
//! printed; the test fails at the end with the list.

#![allow(clippy::unwrap_used)]
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use memshadow_proto::engine_abi::{self as abi, ENGINE_FDS};
use memshadow_proto::{
    self as proto, ErrorCode, Header, Request, Response, SocketError, FLAG_MORE, HEADER_LEN,
    MAX_FDS, MAX_PAYLOAD, MAX_READ,
};
use memshadow_tests::{
    alive, bin_dir, fields, repeat_for, try_wait_until, try_wait_until_every, wait_until, Daemon,
    Deadline, TestClient, HANG_GUARD,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};

const P: u64 = 4096;
/// Generators of bugs known on main and being fixed: off unless `MEMSHADOW_FUZZ_ENABLE`
/// names them. Remove a name here once its fix has landed. (Fixed so far: `fd-overflow`,
/// `never-read` and `silent`, and the check `engine-reopen` (an unprivileged engine cannot
/// open the read-only fds of `EngineAttached` again for writing through `/proc/self/fd/N`:
/// the daemon's memory files are mode 0400), all on by default.)
const KNOWN_BUGS: &[(&str, &str)] = &[];
/// Every generator name [`KNOWN_BUGS`] may list (a fixed one is simply always on).
const SWITCHABLE: &[&str] = &["fd-overflow", "never-read", "silent", "engine-reopen"];

/// How long one answer (or close) may take.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// How long a worker may take for one whole script.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(60);
/// How long the daemon may take to come back to its baseline once every session closed.
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);
/// How long a `status` of the daemon may take before it counts as unresponsive.
const STATUS_DEADLINE: Duration = Duration::from_secs(10);
/// A session loop that answers a `status` slower than this while a client does not read
/// is stalled by that client (only checked by the `never-read` generator).
const STALL_LIMIT: Duration = Duration::from_millis(1000);
/// Most requests a session has unanswered before it reads (three device reads' answers
/// fit the daemon's socket buffer).
const MAX_PIPELINE: usize = 3;
/// Of the generated or mutated scripts with a `silent` step, those that keep it, %.
const SILENT_KEEP_PCT: u64 = 1;
/// Guard pages (`PROT_NONE`) before and after the scratch area of a script, and its pages.
const GUARD_PAGES: u64 = 32;
const RW_PAGES: u64 = 32;
/// Time between the test's checks of the daemon (each ends with all sessions closed).
const EPOCH: Duration = Duration::from_millis(2500);
/// Workers per user.
const WORKERS_PER_USER: usize = 2;
const NOBODY: u32 = 65534;
/// An unprivileged user whose worker only runs `clean` scripts: it never sends a malformed
/// frame, so the abuse bar must never refuse it, however much `NOBODY` floods.
const BYSTANDER: u32 = 65533;
/// Malformed frames an unprivileged user may have sent within the last [`BAR_WINDOW`]
/// (counted as its scripts end) before its next scripts run `clean`: under the bar's
/// threshold (32), so that the bar is met now and then (when scripts full of malformed
/// frames run at once, and by the corpus's `34-abuse-bar.msf`), not most of the time.
const MALFORMED_BUDGET: u64 = 24;
/// The bar's counting window.
const BAR_WINDOW: Duration = Duration::from_secs(1);
/// The abuse bar (`daemon/src/server/abuse.rs`): a user whose connections send more than
/// 32 malformed messages within a second has its new connections refused for 2 s, each
/// told so right after `accept` (request id 0, `TooManyClients`, this message) and closed.
/// Never root, nor the daemon's own user.
const BAR_MESSAGE: &str = "this user sent too many malformed messages";
/// How long a worker that met the abuse bar may wait for it to lift (it lasts 2 s).
const BAR_LIFT_DEADLINE: Duration = Duration::from_secs(30);
/// The daemon's default handshake timeout: a connection that has not said hello this long
/// after it connected may be closed without a word ([`handshake_ms`] reads the one the
/// daemon is given).
const DAEMON_HANDSHAKE: Duration = Duration::from_secs(5);

/// The request types by name (checked against the protocol crate below).
const TYPES: &[(&str, u16)] = &[
    ("hello", 0x0001),
    ("bind", 0x0002),
    ("attach", 0x0003),
    ("detach", 0x0004),
    ("read", 0x0005),
    ("populate", 0x0006),
    ("stats", 0x0007),
    ("status", 0x0008),
    ("clients", 0x0009),
    ("mirrors", 0x000a),
    ("peek", 0x0010),
    ("invalidate", 0x0011),
    ("trace", 0x0012),
    ("sync", 0x0020),
    ("syncpid", 0x0021),
    ("grant", 0x0030),
    ("engine-attach", 0x0031),
    ("engine-fault", 0x0032),
    ("engine-write", 0x0033),
    ("engines", 0x0034),
    ("engine-read", 0x0035),
    ("monitor-setup", 0x0040),
    ("monitor", 0x0041),
    ("unmonitor", 0x0042),
];
const TRACE_EVENT: u16 = 0x8013;
/// Stream records of engine acknowledgements (protocol 3).
const TRACE_ACK: u16 = 0x8014;
/// The answer to `MonitorSetup`, with its fds (protocol 4).
const MONITOR_READY: u16 = 0x8040;
/// `EngineAttached`: the one answer that carries fds (exactly [`ENGINE_FDS`]).
const ENGINE_ATTACHED: u16 = 0x8031;
/// Tokens of its grants a worker publishes for the others (the newest ones).
const PUBLISHED_TOKENS: usize = 16;
/// How long an external engine may take to acknowledge a flush: the fuzzer's engines never
/// do, so every change of a mirror of theirs waits this long for each (then evicts it).
const ENGINE_ACK_TIMEOUT_MS: &str = "200";

// =======================================================================================
// The PRNG.

/// xorshift64* — small, self-contained, good enough to drive a fuzzer.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so nearby seeds diverge at once (and 0 is not stuck).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi_incl: u64) -> u64 {
        lo + self.below(hi_incl - lo + 1)
    }
    /// True with probability `pct` %.
    fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize].clone()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// =======================================================================================
// Scripts: the model, its text form (tests/fuzz-corpus/README.md), parsing and printing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum User {
    Root,
    Nobody,
    /// [`BYSTANDER`].
    Bystander,
    Any,
}

impl User {
    /// As scripts and the summary name it.
    fn name(self) -> &'static str {
        match self {
            User::Root => "root",
            User::Nobody => "nobody",
            User::Bystander => "bystander",
            User::Any => "any",
        }
    }

    /// True if a script written for `self` may run as `worker`.
    fn runs_as(self, worker: User) -> bool {
        self == User::Any || self == worker || (self == User::Nobody && worker == User::Bystander)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// The session's own process.
    Me,
    Daemon,
    /// The test process (root, never a client).
    Parent,
    /// Another worker (a client, maybe bound, maybe of the other user).
    Other,
    /// A child of the worker (never a client).
    Sibling,
}

const WHO: &[(&str, Who)] = &[
    ("me", Who::Me),
    ("daemon", Who::Daemon),
    ("parent", Who::Parent),
    ("other", Who::Other),
    ("sibling", Who::Sibling),
];

/// One piece of a payload template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Hex(Vec<u8>),
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    I32(i32),
    /// A u16 length and the bytes.
    Str(Vec<u8>),
    /// `.1` repeated `.0` times.
    Rep(u32, Vec<u8>),
    /// u64: the script's scratch area + offset.
    Addr(i64),
    /// i32: a pid.
    Pid(Who),
    /// u64: the id of the k-th mirror this connection attached (k + 1 if none).
    Mirror(u8),
    /// u128 (two u64, low first): a grant's token, from where [`Grants`] says.
    Token(Grants, u8),
    /// An `EngineWrite` payload: u64 offset into the engine's mirror, then `n` bytes (u32
    /// length first) that its client holds there already, so that the write changes
    /// nothing; when the worker cannot know them (the engine's client is another process,
    /// or the range is not its scratch memory), no bytes.
    Write(u64, u32),
}

/// Where a [`Tok::Token`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grants {
    /// The k-th grant this script's connections got (a random token if there is none).
    Own,
    /// A grant another worker published (maybe of another user, maybe revoked since).
    Other,
    /// A grant of an earlier script of this worker (revoked: its sessions closed).
    Old,
}

const GRANTS: &[(&str, Grants)] = &[
    ("own", Grants::Own),
    ("other", Grants::Other),
    ("old", Grants::Old),
];

/// A file descriptor to attach to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fd {
    /// A fresh userfaultfd of this process.
    Uffd,
    /// One on which `UFFDIO_API` was already done.
    UffdApi,
    /// One created by another (live) process, the worker's sibling.
    UffdForeign,
    /// One whose creator has exited.
    UffdDead,
    /// `/proc/self/mem`, read-write.
    Mem,
    /// `/proc/self/mem`, read-only.
    MemRo,
    /// `/proc/self/mem`, `O_PATH`.
    MemOpath,
    /// `/proc/self/pagemap`.
    Pagemap,
    /// `/proc/self/maps` (`Bind`'s third fd from protocol 2 on).
    Maps,
    /// `/proc/self/task/TID/mem` (the same memory under another name).
    TaskMem,
    /// `O_PATH` of the test process's (root's) `/proc/PID/mem`.
    ParentMem,
    /// `O_PATH` of the daemon's own `/proc/PID/mem`.
    DaemonMem,
    /// Read-only `/proc/PID/mem` of the worker's sibling (same user, readable).
    SiblingMem,
    /// `O_PATH` of the test process's pagemap.
    ParentPagemap,
    Null,
    Pipe,
    Sock,
    /// The session's own socket.
    SelfSock,
    Memfd,
    Event,
    Dir,
}

const FDS: &[(&str, Fd)] = &[
    ("uffd", Fd::Uffd),
    ("uffd-api", Fd::UffdApi),
    ("uffd-foreign", Fd::UffdForeign),
    ("uffd-dead", Fd::UffdDead),
    ("mem", Fd::Mem),
    ("mem-ro", Fd::MemRo),
    ("mem-opath", Fd::MemOpath),
    ("pagemap", Fd::Pagemap),
    ("maps", Fd::Maps),
    ("task-mem", Fd::TaskMem),
    ("parent-mem", Fd::ParentMem),
    ("daemon-mem", Fd::DaemonMem),
    ("sibling-mem", Fd::SiblingMem),
    ("parent-pagemap", Fd::ParentPagemap),
    ("null", Fd::Null),
    ("pipe", Fd::Pipe),
    ("sock", Fd::Sock),
    ("self", Fd::SelfSock),
    ("memfd", Fd::Memfd),
    ("eventfd", Fd::Event),
    ("dir", Fd::Dir),
];

/// A change to a whole rendered record (header and payload), applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mut {
    Flip(usize, u8),
    Set(usize, Vec<u8>),
    Trunc(usize),
    Ext(Vec<u8>),
    Ins(usize, Vec<u8>),
    Del(usize, usize),
}

impl Mut {
    fn apply(&self, b: &mut Vec<u8>) {
        match self {
            Mut::Flip(at, bit) if *at < b.len() => b[*at] ^= 1 << (bit % 8),
            Mut::Set(at, x) => {
                for (i, v) in x.iter().enumerate() {
                    if at + i < b.len() {
                        b[at + i] = *v;
                    }
                }
            }
            Mut::Trunc(n) => b.truncate(*n),
            Mut::Ext(x) => b.extend_from_slice(x),
            Mut::Ins(at, x) => {
                let i = (*at).min(b.len());
                b.splice(i..i, x.iter().copied());
            }
            Mut::Del(at, n) if *at < b.len() => {
                let end = (at + n).min(b.len());
                b.drain(*at..end);
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Wait for the answers to everything sent on the connection.
    Wait,
    /// Go on at once (pipelining).
    NoWait,
    /// Close the connection right after sending (mid-request).
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Send {
    conn: u8,
    /// The tokens are the whole record; no header is generated.
    raw: bool,
    ty: u16,
    ver: Option<u16>,
    flags: Option<u16>,
    hdrfds: Option<u16>,
    len: Option<u32>,
    magic: Option<u32>,
    id: Option<u64>,
    fds: Vec<Fd>,
    payload: Vec<Tok>,
    muts: Vec<Mut>,
    mode: Mode,
}

impl Send {
    fn new(conn: u8, ty: u16, payload: Vec<Tok>) -> Send {
        Send {
            conn,
            raw: false,
            ty,
            ver: None,
            flags: None,
            hdrfds: None,
            len: None,
            magic: None,
            id: None,
            fds: Vec::new(),
            payload,
            muts: Vec::new(),
            mode: Mode::Wait,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Send(Send),
    /// Wait for every answer pending on the connection.
    Wait(u8),
    /// Close the connection (a later step on it connects again).
    Close(u8),
    /// `shutdown(SHUT_WR)`: the daemon sees the end of the stream.
    Shutdown(u8),
    /// Known bug `never-read`: flood requests, never read, expect to be closed.
    NoRead(u8),
    /// Known bug `silent`: connect, say nothing, expect to be closed.
    Silent(u8),
    /// A child process of the client binds, attaches and exits with requests in flight.
    Exit(u8),
    /// An engine connection writes garbage all over its flush ring (a no-op elsewhere).
    Scribble(u8),
}

impl Step {
    fn conn(&self) -> u8 {
        match self {
            Step::Send(s) => s.conn,
            Step::Wait(c) | Step::Close(c) | Step::Shutdown(c) | Step::NoRead(c) => *c,
            Step::Silent(c) | Step::Exit(c) | Step::Scribble(c) => *c,
        }
    }
    fn set_conn(&mut self, n: u8) {
        match self {
            Step::Send(s) => s.conn = n,
            Step::Wait(c) | Step::Close(c) | Step::Shutdown(c) | Step::NoRead(c) => *c = n,
            Step::Silent(c) | Step::Exit(c) | Step::Scribble(c) => *c = n,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Script {
    user: User,
    /// Frames the daemon would find malformed are not sent (so its user is never barred).
    clean: bool,
    /// Known-bug generators this script exercises (skipped unless enabled).
    needs: Vec<String>,
    /// Extra daemon arguments (honoured when replaying the file).
    daemon: Vec<String>,
    steps: Vec<Step>,
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("bad hex {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

fn num(s: &str) -> Result<i128, String> {
    let (neg, t) = match s.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, s),
    };
    let v = match t.strip_prefix("0x") {
        Some(h) => i128::from_str_radix(h, 16),
        None => t.parse::<i128>(),
    }
    .map_err(|e| format!("bad number {s:?}: {e}"))?;
    Ok(if neg { -v } else { v })
}

fn num_as<T: TryFrom<i128>>(s: &str) -> Result<T, String> {
    T::try_from(num(s)?).map_err(|_| format!("{s} is out of range"))
}

fn type_name(ty: u16) -> String {
    TYPES
        .iter()
        .find(|(_, t)| *t == ty)
        .map_or_else(|| format!("{ty:#06x}"), |(n, _)| (*n).to_owned())
}

fn fd_name(f: Fd) -> &'static str {
    FDS.iter().find(|(_, x)| *x == f).map_or("?", |(n, _)| n)
}

impl Tok {
    fn print(&self) -> String {
        match self {
            Tok::Hex(b) => hex(b),
            Tok::U8(v) => format!("u8:{v}"),
            Tok::U16(v) => format!("u16:{v}"),
            Tok::U32(v) => format!("u32:{v:#x}"),
            Tok::U64(v) => format!("u64:{v:#x}"),
            Tok::I32(v) => format!("i32:{v}"),
            Tok::Str(b) => match std::str::from_utf8(b) {
                Ok(s) if s.bytes().all(|c| c.is_ascii_graphic() && c != b'#') => {
                    format!("str:{s}")
                }
                _ => format!("strhex:{}", hex(b)),
            },
            Tok::Rep(n, b) => format!("rep:{n}:{}", hex(b)),
            Tok::Addr(o) if *o < 0 => format!("addr:-{:#x}", o.unsigned_abs()),
            Tok::Addr(o) => format!("addr:{o:#x}"),
            Tok::Pid(w) => format!(
                "pid:{}",
                WHO.iter().find(|(_, x)| x == w).map_or("?", |(n, _)| n)
            ),
            Tok::Mirror(k) => format!("mirror:{k}"),
            Tok::Token(g, k) => format!(
                "token:{}:{k}",
                GRANTS.iter().find(|(_, x)| x == g).map_or("?", |(n, _)| n)
            ),
            Tok::Write(off, n) => format!("write:{off:#x}:{n}"),
        }
    }

    fn parse(w: &str) -> Result<Tok, String> {
        let Some((kind, v)) = w.split_once(':') else {
            return unhex(w).map(Tok::Hex);
        };
        Ok(match kind {
            "u8" => Tok::U8(num_as(v)?),
            "u16" => Tok::U16(num_as(v)?),
            "u32" => Tok::U32(num_as(v)?),
            "u64" => Tok::U64(num_as(v)?),
            "i32" => Tok::I32(num_as(v)?),
            "str" => Tok::Str(v.as_bytes().to_vec()),
            "strhex" => Tok::Str(unhex(v)?),
            "rep" => {
                let (n, b) = v.split_once(':').ok_or("rep:N:HEX")?;
                Tok::Rep(num_as(n)?, unhex(b)?)
            }
            "addr" => Tok::Addr(num_as(v)?),
            "pid" => Tok::Pid(
                WHO.iter()
                    .find(|(n, _)| *n == v)
                    .map(|(_, w)| *w)
                    .ok_or(format!("unknown pid:{v}"))?,
            ),
            "mirror" => Tok::Mirror(num_as(v)?),
            "token" => {
                let (g, k) = v.split_once(':').ok_or("token:own|other|old:K")?;
                Tok::Token(
                    GRANTS
                        .iter()
                        .find(|(n, _)| *n == g)
                        .map(|(_, x)| *x)
                        .ok_or(format!("unknown token:{g}"))?,
                    num_as(k)?,
                )
            }
            "write" => {
                let (off, n) = v.split_once(':').ok_or("write:OFF:N")?;
                Tok::Write(num_as(off)?, num_as(n)?)
            }
            _ => return Err(format!("unknown token {w:?}")),
        })
    }
}

impl Mut {
    fn print(&self) -> String {
        match self {
            Mut::Flip(a, b) => format!("flip:{a}:{b}"),
            Mut::Set(a, x) => format!("set:{a}:{}", hex(x)),
            Mut::Trunc(n) => format!("trunc:{n}"),
            Mut::Ext(x) => format!("ext:{}", hex(x)),
            Mut::Ins(a, x) => format!("ins:{a}:{}", hex(x)),
            Mut::Del(a, n) => format!("del:{a}:{n}"),
        }
    }

    fn parse(w: &str) -> Result<Mut, String> {
        let mut it = w.split(':');
        let op = it.next().unwrap_or("");
        let mut arg = || it.next().ok_or(format!("{w}: missing argument"));
        Ok(match op {
            "flip" => Mut::Flip(num_as(arg()?)?, num_as(arg()?)?),
            "set" => Mut::Set(num_as(arg()?)?, unhex(arg()?)?),
            "trunc" => Mut::Trunc(num_as(arg()?)?),
            "ext" => Mut::Ext(unhex(arg()?)?),
            "ins" => Mut::Ins(num_as(arg()?)?, unhex(arg()?)?),
            "del" => Mut::Del(num_as(arg()?)?, num_as(arg()?)?),
            _ => return Err(format!("unknown mutation {w:?}")),
        })
    }
}

impl Script {
    fn print(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "as {}", self.user.name());
        if self.clean {
            out.push_str("clean\n");
        }
        for n in &self.needs {
            let _ = writeln!(out, "needs {n}");
        }
        if !self.daemon.is_empty() {
            let _ = writeln!(out, "daemon {}", self.daemon.join(" "));
        }
        for s in &self.steps {
            let c = s.conn();
            if c != 0 {
                let _ = write!(out, "@{c} ");
            }
            match s {
                Step::Wait(_) => out.push_str("wait"),
                Step::Close(_) => out.push_str("close"),
                Step::Shutdown(_) => out.push_str("shutdown"),
                Step::NoRead(_) => out.push_str("noread"),
                Step::Silent(_) => out.push_str("silent"),
                Step::Exit(_) => out.push_str("exit"),
                Step::Scribble(_) => out.push_str("scribble"),
                Step::Send(f) => {
                    if f.raw {
                        out.push_str("raw");
                    } else {
                        let _ = write!(out, "send {}", type_name(f.ty));
                    }
                    let opt = |out: &mut String, k: &str, v: Option<String>| {
                        if let Some(v) = v {
                            let _ = write!(out, " {k}={v}");
                        }
                    };
                    opt(&mut out, "ver", f.ver.map(|v| v.to_string()));
                    opt(&mut out, "flags", f.flags.map(|v| format!("{v:#x}")));
                    opt(&mut out, "hdrfds", f.hdrfds.map(|v| v.to_string()));
                    opt(&mut out, "len", f.len.map(|v| v.to_string()));
                    opt(&mut out, "magic", f.magic.map(|v| format!("{v:#x}")));
                    opt(&mut out, "id", f.id.map(|v| v.to_string()));
                    if !f.fds.is_empty() {
                        let names: Vec<&str> = f.fds.iter().map(|x| fd_name(*x)).collect();
                        let _ = write!(out, " fds={}", names.join(","));
                    }
                    if !f.muts.is_empty() {
                        let m: Vec<String> = f.muts.iter().map(Mut::print).collect();
                        let _ = write!(out, " mut={}", m.join(","));
                    }
                    match f.mode {
                        Mode::Wait => {}
                        Mode::NoWait => out.push_str(" nowait"),
                        Mode::Close => out.push_str(" close"),
                    }
                    if !f.payload.is_empty() {
                        out.push_str(" :");
                        for t in &f.payload {
                            out.push(' ');
                            out.push_str(&t.print());
                        }
                    }
                }
            }
            out.push('\n');
        }
        out
    }

    fn parse(text: &str) -> Result<Script, String> {
        let mut s = Script {
            user: User::Any,
            clean: false,
            needs: Vec::new(),
            daemon: Vec::new(),
            steps: Vec::new(),
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.split_once('#').map_or(line, |(a, _)| a).trim();
            if line.is_empty() {
                continue;
            }
            s.parse_line(line)
                .map_err(|e| format!("line {}: {e}: {line}", i + 1))?;
        }
        Ok(s)
    }

    fn parse_line(&mut self, line: &str) -> Result<(), String> {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let mut conn = 0u8;
        if let Some(c) = words[0].strip_prefix('@') {
            conn = num_as(c)?;
            if conn > 3 {
                return Err("at most 4 connections (@0..@3)".into());
            }
            words.remove(0);
        }
        let kw = *words.first().ok_or("empty step")?;
        let rest = &words[1..];
        match kw {
            "as" => {
                self.user = match rest.first().copied() {
                    Some("root") => User::Root,
                    Some("nobody") => User::Nobody,
                    Some("bystander") => User::Bystander,
                    Some("any") => User::Any,
                    _ => return Err("as root|nobody|bystander|any".into()),
                }
            }
            "clean" => self.clean = true,
            "needs" => self.needs.extend(rest.iter().map(|w| (*w).to_owned())),
            "daemon" => self.daemon.extend(rest.iter().map(|w| (*w).to_owned())),
            "wait" => self.steps.push(Step::Wait(conn)),
            "close" => self.steps.push(Step::Close(conn)),
            "shutdown" => self.steps.push(Step::Shutdown(conn)),
            "noread" => self.steps.push(Step::NoRead(conn)),
            "silent" => self.steps.push(Step::Silent(conn)),
            "exit" => self.steps.push(Step::Exit(conn)),
            "scribble" => self.steps.push(Step::Scribble(conn)),
            "send" | "raw" => {
                let mut f = Send::new(conn, 0, Vec::new());
                let mut opts = rest;
                if kw == "raw" {
                    f.raw = true;
                } else {
                    let t = *rest.first().ok_or("send TYPE")?;
                    f.ty = match TYPES.iter().find(|(n, _)| *n == t) {
                        Some((_, ty)) => *ty,
                        None => num_as(t)?,
                    };
                    opts = &rest[1..];
                }
                let split = opts.iter().position(|w| *w == ":").unwrap_or(opts.len());
                for o in &opts[..split] {
                    match o.split_once('=') {
                        Some(("ver", v)) => f.ver = Some(num_as(v)?),
                        Some(("flags", v)) => f.flags = Some(num_as(v)?),
                        Some(("hdrfds", v)) => f.hdrfds = Some(num_as(v)?),
                        Some(("len", v)) => f.len = Some(num_as(v)?),
                        Some(("magic", v)) => f.magic = Some(num_as(v)?),
                        Some(("id", v)) => f.id = Some(num_as(v)?),
                        Some(("fds", v)) => {
                            for n in v.split(',') {
                                let fd = FDS
                                    .iter()
                                    .find(|(x, _)| *x == n)
                                    .ok_or(format!("unknown fd kind {n}"))?;
                                f.fds.push(fd.1);
                            }
                        }
                        Some(("mut", v)) => {
                            for m in v.split(',') {
                                f.muts.push(Mut::parse(m)?);
                            }
                        }
                        None if *o == "nowait" => f.mode = Mode::NoWait,
                        None if *o == "close" => f.mode = Mode::Close,
                        _ => return Err(format!("unknown option {o}")),
                    }
                }
                for w in opts.iter().skip(split + 1) {
                    f.payload.push(Tok::parse(w)?);
                }
                self.steps.push(Step::Send(f));
            }
            _ => return Err(format!("unknown step {kw}")),
        }
        Ok(())
    }

    /// The frames of the script that carry more fds than the daemon reads whole (the
    /// `fd-overflow` generator).
    fn max_fds(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Send(f) => f.fds.len(),
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// The known-bug generators the script uses, by what it contains.
    fn uses(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.max_fds() > 6 {
            v.push("fd-overflow");
        }
        if self.steps.iter().any(|s| matches!(s, Step::NoRead(_))) {
            v.push("never-read");
        }
        if self.steps.iter().any(|s| matches!(s, Step::Silent(_))) {
            v.push("silent");
        }
        v
    }
}

// =======================================================================================
// The generator: scripts from scratch, and mutations of corpus scripts.

/// Which known-bug generators are switched on.
#[derive(Debug, Clone, Default)]
struct Enabled(Vec<String>);

impl Enabled {
    fn from_env() -> Enabled {
        let want = std::env::var("MEMSHADOW_FUZZ_ENABLE").unwrap_or_default();
        let mut on: Vec<String> = SWITCHABLE
            .iter()
            .filter(|g| !KNOWN_BUGS.iter().any(|(k, _)| k == *g))
            .map(|g| (*g).to_owned())
            .collect();
        for w in want.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if w == "all" {
                on.extend(SWITCHABLE.iter().map(|g| (*g).to_owned()));
            } else {
                assert!(
                    SWITCHABLE.contains(&w),
                    "MEMSHADOW_FUZZ_ENABLE: unknown generator {w} (known: {SWITCHABLE:?})"
                );
                on.push(w.to_owned());
            }
        }
        on.sort();
        on.dedup();
        Enabled(on)
    }
    fn on(&self, g: &str) -> bool {
        self.0.iter().any(|x| x == g)
    }
    fn allows(&self, s: &Script) -> bool {
        s.needs.iter().all(|n| self.on(n)) && s.uses().iter().all(|n| self.on(n))
    }
}

fn ty(name: &str) -> u16 {
    TYPES.iter().find(|(n, _)| *n == name).unwrap().1
}

/// Values worth trying for a field of `width` bytes.
fn extreme(rng: &mut Rng, width: usize) -> u64 {
    let all = [
        0u64,
        1,
        2,
        P - 1,
        P,
        P + 1,
        0x7f,
        0x80,
        0xff,
        0x100,
        0x7fff,
        0xffff,
        0x1_0000,
        MAX_READ as u64,
        MAX_READ as u64 + 1,
        MAX_PAYLOAD as u64,
        MAX_PAYLOAD as u64 + 1,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        1 << 40,
        1 << 47,
        1 << 56,
        0x7fff_ffff_ffff_ffff,
        0x8000_0000_0000_0000,
        u64::MAX - P + 1,
        u64::MAX,
    ];
    let v = if rng.pct(80) {
        rng.pick(&all)
    } else {
        rng.next()
    };
    if width >= 8 {
        v
    } else {
        v & ((1u64 << (8 * width)) - 1)
    }
}

fn gen_pid(rng: &mut Rng) -> Tok {
    match rng.below(10) {
        0..=3 => Tok::Pid(Who::Me),
        4 => Tok::Pid(Who::Other),
        5 => Tok::Pid(Who::Daemon),
        6 => Tok::Pid(Who::Parent),
        7 => Tok::Pid(Who::Sibling),
        8 => Tok::I32(rng.pick(&[0, -1, 1, i32::MAX, i32::MIN])),
        _ => Tok::I32(rng.next() as i32),
    }
}

fn gen_addr(rng: &mut Rng) -> Tok {
    let page = rng.range(0, RW_PAGES) as i64 * P as i64;
    match rng.below(12) {
        0..=6 => Tok::Addr(page),
        7 => Tok::Addr(page + rng.range(1, P - 1) as i64),
        8 => Tok::Addr(-(rng.range(1, GUARD_PAGES) as i64) * P as i64),
        9 => Tok::Addr(((RW_PAGES + rng.range(0, GUARD_PAGES - 1)) * P) as i64),
        _ => Tok::U64(rng.pick(&[
            0,
            0x1000,
            0x1_0000,
            0x0000_8000_0000_0000,
            0x00ff_ffff_ffff_f000,
            1 << 56,
            0xffff_8000_0000_0000,
            u64::MAX - P + 1,
            u64::MAX,
        ])),
    }
}

fn gen_len(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=5 => rng.range(1, 8) * P,
        6 => RW_PAGES * P,
        7 => rng.range(1, 3 * P),
        _ => extreme(rng, 8),
    }
}

fn gen_mirror(rng: &mut Rng) -> Tok {
    if rng.pct(80) {
        Tok::Mirror(rng.below(3) as u8)
    } else {
        Tok::U64(extreme(rng, 8))
    }
}

/// A random valid-looking string of `n` bytes, sometimes not UTF-8.
fn gen_name(rng: &mut Rng) -> Tok {
    let n = match rng.below(6) {
        0 => 0,
        1 => 64,
        2 => 65,
        3 => rng.range(66, 300) as usize,
        _ => rng.range(1, 16) as usize,
    };
    if rng.pct(10) {
        return Tok::Str(rng.bytes(n));
    }
    Tok::Str(
        (0..n)
            .map(|_| b"abcdefghijklmnopqrstuvwxyz-_."[rng.below(29) as usize])
            .collect(),
    )
}

fn gen_fd(rng: &mut Rng) -> Fd {
    rng.pick(FDS).1
}

/// The fds of a `Bind`: usually right, often wrong in one way.
fn gen_bind_fds(rng: &mut Rng, enabled: &Enabled) -> Vec<Fd> {
    let mut fds = vec![Fd::Uffd, Fd::Mem];
    if rng.pct(50) {
        fds.push(Fd::Pagemap);
    }
    if rng.pct(45) {
        match rng.below(5) {
            0 => fds[0] = gen_fd(rng),
            1 => fds[1] = gen_fd(rng),
            2 => {
                let i = rng.below(fds.len() as u64) as usize;
                fds.remove(i);
            }
            3 => {
                let n = rng.range(0, 6) as usize;
                fds = (0..n).map(|_| gen_fd(rng)).collect();
            }
            _ => {
                let n = if enabled.on("fd-overflow") && rng.pct(50) {
                    rng.range(7, 16)
                } else {
                    rng.range(4, 6)
                };
                while fds.len() < n as usize {
                    fds.push(gen_fd(rng));
                }
            }
        }
    }
    fds
}

/// A frame of request type `name`, with plausible (sometimes extreme) fields.
fn gen_request(rng: &mut Rng, conn: u8, name: &str, enabled: &Enabled) -> Send {
    let t = ty(name);
    let payload = match name {
        "hello" => {
            let (lo, hi) = if rng.pct(85) {
                (1, 1)
            } else {
                (extreme(rng, 2) as u16, extreme(rng, 2) as u16)
            };
            vec![Tok::U16(lo), Tok::U16(hi), gen_name(rng)]
        }
        "bind" => vec![Tok::U32(if rng.pct(85) {
            rng.below(2) as u32
        } else {
            extreme(rng, 4) as u32
        })],
        "attach" => {
            let flags = match rng.below(8) {
                0..=3 => 0,
                4 => 1,
                5 => 2,
                6 => 3 | ((rng.range(1, 500) as u32) << 8),
                _ => extreme(rng, 4) as u32,
            };
            vec![gen_addr(rng), Tok::U64(gen_len(rng)), Tok::U32(flags)]
        }
        "detach" | "sync" => vec![gen_mirror(rng)],
        "read" => vec![
            gen_mirror(rng),
            Tok::U64(if rng.pct(80) {
                rng.below(8) * P + rng.pick(&[0, 0, 1, P - 8])
            } else {
                extreme(rng, 8)
            }),
            Tok::U32(if rng.pct(80) {
                rng.range(1, 2 * P) as u32
            } else {
                extreme(rng, 4) as u32
            }),
        ],
        "populate" => vec![
            gen_mirror(rng),
            Tok::U64(if rng.pct(80) {
                rng.below(4) * P
            } else {
                extreme(rng, 8)
            }),
            Tok::U64(gen_len(rng)),
        ],
        "mirrors" | "syncpid" => vec![gen_pid(rng)],
        "peek" => vec![
            gen_pid(rng),
            gen_addr(rng),
            Tok::U32(rng.range(1, 2 * P) as u32),
        ],
        "invalidate" => vec![
            gen_pid(rng),
            gen_addr(rng),
            Tok::U64(gen_len(rng)),
            Tok::U8(if rng.pct(85) {
                rng.range(1, 6) as u8
            } else {
                extreme(rng, 1) as u8
            }),
            Tok::U8(if rng.pct(85) {
                rng.below(2) as u8
            } else {
                extreme(rng, 1) as u8
            }),
        ],
        "trace" => vec![
            gen_pid(rng),
            Tok::U32(match rng.below(10) {
                0..=6 => rng.below(64) as u32,
                // Engine acknowledgement records too (protocol 3).
                7 => proto::TRACE_ENGINE_ACKS | rng.below(64) as u32,
                _ => extreme(rng, 4) as u32,
            }),
        ],
        "grant" => vec![gen_mirror(rng)],
        "monitor" => vec![gen_addr(rng), Tok::U64(gen_len(rng))],
        "unmonitor" => vec![
            Tok::U32(if rng.pct(80) {
                rng.below(4) as u32
            } else {
                extreme(rng, 4) as u32
            }),
            Tok::U64(if rng.pct(80) {
                rng.below(4)
            } else {
                extreme(rng, 8)
            }),
        ],
        "engine-attach" => {
            let token = match rng.below(10) {
                0..=3 => Tok::Token(Grants::Own, rng.below(3) as u8),
                4 | 5 => Tok::Token(Grants::Other, rng.below(16) as u8),
                6 => Tok::Token(Grants::Old, rng.below(16) as u8),
                7 => Tok::Hex(rng.bytes(16)),
                _ => Tok::Hex(vec![0; 16]),
            };
            // Token 0 attaches by pid and mirror id; the others carry them too, ignored.
            let by_pid = token == Tok::Hex(vec![0; 16]);
            let (pid, mirror) = if by_pid || rng.pct(20) {
                (gen_pid(rng), gen_mirror(rng))
            } else {
                (Tok::I32(0), Tok::U64(0))
            };
            vec![token, pid, mirror]
        }
        "engine-fault" => vec![Tok::U64(gen_engine_offset(rng)), Tok::U64(gen_len(rng))],
        "engine-write" => {
            if rng.pct(85) {
                let n = rng.pick(&[0, 1, 8, 16, P as u32 - 1, P as u32, P as u32 + 1]);
                vec![Tok::Write(gen_engine_offset(rng), n)]
            } else {
                // No bytes, anywhere.
                vec![Tok::U64(extreme(rng, 8)), Tok::U32(0)]
            }
        }
        "engines" => vec![gen_pid(rng)],
        "engine-read" => vec![
            Tok::U64(gen_engine_offset(rng)),
            Tok::U32(if rng.pct(80) {
                rng.range(1, 2 * P) as u32
            } else {
                extreme(rng, 4) as u32
            }),
        ],
        _ => Vec::new(),
    };
    let mut f = Send::new(conn, t, payload);
    if name == "bind" {
        f.fds = gen_bind_fds(rng, enabled);
    }
    f
}

/// An offset into an engine's mirror: mostly inside a small one, sometimes extreme.
fn gen_engine_offset(rng: &mut Rng) -> u64 {
    if rng.pct(80) {
        rng.below(8) * P + rng.pick(&[0, 0, 1, P - 8])
    } else {
        extreme(rng, 8)
    }
}

/// A frame that is wrong as a whole: garbage, an unknown type, a response type, an
/// oversized or empty record.
fn gen_garbage(rng: &mut Rng, conn: u8) -> Send {
    match rng.below(7) {
        0 => {
            let n = rng.range(0, 64) as usize;
            let mut f = Send::new(conn, 0, vec![Tok::Hex(rng.bytes(n))]);
            f.raw = true;
            if n == 0 {
                f.payload.clear();
            }
            f
        }
        1 => Send::new(
            conn,
            rng.pick(&[
                0x0000, 0x000b, 0x000f, 0x0013, 0x0022, 0x0036, 0x0fff, 0x7fff,
            ]),
            Vec::new(),
        ),
        2 => Send::new(
            conn,
            rng.pick(&[0x8001, 0x8005, 0x8013, 0x8031, 0x80ff, 0x8000, 0xffff]),
            {
                let n = rng.range(1, 16) as usize;
                vec![Tok::Hex(rng.bytes(n))]
            },
        ),
        3 => Send::new(
            conn,
            rng.pick(&TYPES.iter().map(|t| t.1).collect::<Vec<_>>()),
            vec![Tok::Rep(
                rng.pick(&[MAX_PAYLOAD as u32 - 24, MAX_PAYLOAD as u32, 70_000]),
                vec![rng.next() as u8],
            )],
        ),
        4 => Send::new(conn, rng.next() as u16, vec![Tok::Hex(rng.bytes(8))]),
        5 => {
            // Too many fds for any type (5 or 6: still read whole by the daemon).
            let mut f = Send::new(conn, ty("status"), Vec::new());
            f.fds = (0..rng.range(5, 6)).map(|_| Fd::Null).collect();
            f.hdrfds = Some(4);
            f
        }
        _ => {
            let mut f = Send::new(conn, ty("status"), Vec::new());
            f.fds = vec![gen_fd(rng)];
            f
        }
    }
}

/// Changes a frame: header fields, the record's bytes, its fds, its type.
fn mutate_frame(rng: &mut Rng, f: &mut Send, enabled: &Enabled) {
    // The rendered record's length, roughly (addresses and pids are 8 and 4 bytes).
    let plen: usize = f
        .payload
        .iter()
        .map(|t| match t {
            Tok::Hex(b) => b.len(),
            Tok::U8(_) => 1,
            Tok::U16(_) => 2,
            Tok::U32(_) | Tok::I32(_) | Tok::Pid(_) => 4,
            Tok::U64(_) | Tok::Addr(_) | Tok::Mirror(_) => 8,
            Tok::Str(b) => 2 + b.len(),
            Tok::Rep(n, b) => *n as usize * b.len(),
            Tok::Token(..) => 16,
            Tok::Write(_, n) => 12 + *n as usize,
        })
        .sum();
    let len = if f.raw { plen } else { HEADER_LEN + plen };
    for _ in 0..rng.range(1, 3) {
        match rng.below(14) {
            0 => f.hdrfds = Some(rng.pick(&[0, 1, 2, 3, 4, 5, 0xffff])),
            1 => f.ver = Some(rng.pick(&[0, 2, 0xffff])),
            2 => f.flags = Some(rng.pick(&[FLAG_MORE, 2, 0x8000, 0xffff])),
            3 => {
                f.len = Some(rng.pick(&[
                    0,
                    plen as u32 + 1,
                    (plen as u32).saturating_sub(1),
                    MAX_PAYLOAD as u32 + 1,
                    u32::MAX,
                ]))
            }
            4 => f.magic = Some(rng.pick(&[0, u32::from_le_bytes(*b"MSHE"), u32::MAX])),
            5 => f.id = Some(rng.pick(&[0, 1, u64::MAX])),
            6 => f.muts.push(Mut::Flip(
                rng.below(len as u64) as usize,
                rng.below(8) as u8,
            )),
            7 => {
                let w = rng.pick(&[1usize, 2, 4, 8]);
                // Length and count fields sit right after the header; so do most others.
                let at = if rng.pct(50) && len > HEADER_LEN {
                    rng.range(HEADER_LEN as u64, len as u64 - 1) as usize
                } else {
                    rng.below(len as u64 + 1) as usize
                };
                let v = extreme(rng, w).to_le_bytes()[..w].to_vec();
                f.muts.push(Mut::Set(at, v));
            }
            8 => f.muts.push(Mut::Trunc(rng.pick(&[
                0,
                1,
                23,
                24,
                25,
                len.saturating_sub(1),
            ]))),
            9 => {
                let n = rng.pick(&[1, 2, 8, 64]);
                f.muts.push(Mut::Ext(rng.bytes(n)));
            }
            10 => {
                let at = rng.below(len as u64 + 1) as usize;
                let n = rng.range(1, 8) as usize;
                f.muts.push(Mut::Ins(at, rng.bytes(n)));
            }
            11 => f.muts.push(Mut::Del(
                rng.below(len as u64 + 1) as usize,
                rng.range(1, 8) as usize,
            )),
            12 => {
                let max = if enabled.on("fd-overflow") && rng.pct(30) {
                    16
                } else {
                    6
                };
                if rng.pct(50) && !f.fds.is_empty() {
                    let i = rng.below(f.fds.len() as u64) as usize;
                    f.fds[i] = gen_fd(rng);
                } else if f.fds.len() < max {
                    f.fds.push(gen_fd(rng));
                }
            }
            _ => {
                if !f.raw {
                    f.ty = if rng.pct(70) {
                        rng.pick(TYPES).1
                    } else {
                        rng.next() as u16
                    };
                }
            }
        }
    }
}

/// A frame for connection `c` in the generator's idea of its state.
fn gen_frame(rng: &mut Rng, c: u8, st: &mut GenConn, enabled: &Enabled) -> Send {
    let mut f = if !st.hello && rng.pct(85) {
        st.hello = true;
        gen_request(rng, c, "hello", enabled)
    } else if st.hello && !st.bind && !st.engine && rng.pct(65) {
        // A second connection of a script often becomes an engine (of the first one's
        // mirror, with its grant), now and then the first one too.
        if rng.pct(if c > 0 { 60 } else { 10 }) {
            st.engine = true;
            gen_request(rng, c, "engine-attach", enabled)
        } else {
            st.bind = true;
            gen_request(rng, c, "bind", enabled)
        }
    } else if rng.pct(8) {
        gen_garbage(rng, c)
    } else if st.engine {
        let names = [
            "engine-fault",
            "engine-fault",
            "engine-fault",
            "engine-write",
            "engine-write",
            "engine-read",
            "engine-read",
            "engines",
            "engine-attach",
            "grant",
            "bind",
            "stats",
            "status",
            "read",
        ];
        let name = rng.pick(&names);
        gen_request(rng, c, name, enabled)
    } else {
        let names = [
            "attach",
            "attach",
            "attach",
            "read",
            "read",
            "read",
            "detach",
            "populate",
            "stats",
            "status",
            "clients",
            "mirrors",
            "peek",
            "invalidate",
            "trace",
            "sync",
            "syncpid",
            "hello",
            "bind",
            "grant",
            "grant",
            "engines",
            "engine-attach",
            "engine-fault",
            "engine-write",
            "engine-read",
            "monitor-setup",
            "monitor",
            "monitor",
            "unmonitor",
        ];
        let name = rng.pick(&names);
        gen_request(rng, c, name, enabled)
    };
    if rng.pct(20) {
        mutate_frame(rng, &mut f, enabled);
    }
    f.mode = match rng.below(100) {
        0..=2 => Mode::Close,
        3..=14 if st.nowait < MAX_PIPELINE as u32 => Mode::NoWait,
        _ => Mode::Wait,
    };
    match f.mode {
        Mode::NoWait => st.nowait += 1,
        Mode::Wait => st.nowait = 0,
        Mode::Close => *st = GenConn::default(),
    }
    f
}

/// The generator's idea of a connection's state.
#[derive(Debug, Clone, Default)]
struct GenConn {
    hello: bool,
    bind: bool,
    engine: bool,
    nowait: u32,
}

/// A script from scratch: a walk through the protocol over one to three connections.
fn gen_script(rng: &mut Rng, user: User, enabled: &Enabled) -> Script {
    let conns = if rng.pct(80) {
        1
    } else {
        rng.range(2, 3) as u8
    };
    let mut st = vec![GenConn::default(); conns as usize];
    let mut steps = Vec::new();
    for _ in 0..rng.range(1, 24) {
        let c = rng.below(u64::from(conns)) as u8;
        let r = rng.below(100);
        let step = match r {
            0 if enabled.on("silent") => Step::Silent(c),
            1 if enabled.on("never-read") && st[c as usize].hello => Step::NoRead(c),
            2 => {
                st[c as usize] = GenConn::default();
                Step::Close(c)
            }
            3 => {
                st[c as usize] = GenConn::default();
                Step::Shutdown(c)
            }
            4 => {
                st[c as usize].nowait = 0;
                Step::Wait(c)
            }
            5 => Step::Exit(c),
            6 if st[c as usize].engine => Step::Scribble(c),
            _ => Step::Send(gen_frame(rng, c, &mut st[c as usize], enabled)),
        };
        let stop = matches!(step, Step::NoRead(_) | Step::Silent(_));
        steps.push(step);
        if stop {
            break;
        }
    }
    Script {
        user,
        clean: false,
        needs: Vec::new(),
        daemon: Vec::new(),
        steps,
    }
}

/// Mutates a corpus script: steps inserted, deleted, duplicated, swapped, moved to another
/// connection, spliced from another script; frames mutated; numbers set to extremes.
fn mutate_script(rng: &mut Rng, s: &mut Script, corpus: &[Script], enabled: &Enabled) {
    for _ in 0..rng.range(1, 4) {
        let n = s.steps.len() as u64;
        match rng.below(9) {
            0 => {
                let at = rng.below(n + 1) as usize;
                let c = rng.below(2) as u8;
                let mut st = GenConn {
                    hello: true,
                    bind: rng.pct(50),
                    engine: false,
                    nowait: 0,
                };
                let f = gen_frame(rng, c, &mut st, enabled);
                s.steps.insert(at, Step::Send(f));
            }
            1 if n > 1 => {
                s.steps.remove(rng.below(n) as usize);
            }
            2 if n > 0 => {
                let i = rng.below(n) as usize;
                let st = s.steps[i].clone();
                s.steps.insert(i, st);
            }
            3 if n > 1 => {
                let i = rng.below(n - 1) as usize;
                s.steps.swap(i, i + 1);
            }
            4 if n > 0 => {
                let i = rng.below(n) as usize;
                s.steps[i].set_conn(rng.below(3) as u8);
            }
            5 if !corpus.is_empty() => {
                let other = rng.pick(corpus);
                if !other.steps.is_empty() && enabled.allows(&other) {
                    let from = rng.below(other.steps.len() as u64) as usize;
                    let take = rng.range(1, 6) as usize;
                    let at = rng.below(n + 1) as usize;
                    let part: Vec<Step> =
                        other.steps.iter().skip(from).take(take).cloned().collect();
                    s.steps.splice(at..at, part);
                }
            }
            6 | 7 if n > 0 => {
                let i = rng.below(n) as usize;
                if let Step::Send(f) = &mut s.steps[i] {
                    mutate_frame(rng, f, enabled);
                }
            }
            _ if n > 0 => {
                let i = rng.below(n) as usize;
                if let Step::Send(f) = &mut s.steps[i] {
                    if !f.payload.is_empty() {
                        let j = rng.below(f.payload.len() as u64) as usize;
                        f.payload[j] = match &f.payload[j] {
                            Tok::U8(_) => Tok::U8(extreme(rng, 1) as u8),
                            Tok::U16(_) => Tok::U16(extreme(rng, 2) as u16),
                            Tok::U32(_) => Tok::U32(extreme(rng, 4) as u32),
                            Tok::I32(_) | Tok::Pid(_) => gen_pid(rng),
                            Tok::U64(_) | Tok::Mirror(_) => Tok::U64(extreme(rng, 8)),
                            Tok::Addr(_) => gen_addr(rng),
                            Tok::Str(_) => gen_name(rng),
                            Tok::Token(..) => match rng.below(3) {
                                0 => Tok::Hex(rng.bytes(16)),
                                1 => Tok::Hex(vec![0; 16]),
                                _ => Tok::Token(rng.pick(GRANTS).1, rng.below(16) as u8),
                            },
                            Tok::Write(_, n) => Tok::Write(extreme(rng, 8), *n),
                            t => t.clone(),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    s.steps.truncate(40);
}

/// The corpus scripts `user` runs.
fn corpus_for<'a>(user: User, corpus: &'a [Script], en: &Enabled) -> Vec<&'a Script> {
    corpus
        .iter()
        .filter(|s| en.allows(s) && s.user.runs_as(user))
        .collect()
}

/// Script `k` of worker `w`: a function of the seed, `w`, `k` and the corpus only.
fn script_for(seed: u64, w: usize, k: u64, user: User, corpus: &[Script], en: &Enabled) -> Script {
    let mut rng = Rng::new(seed ^ ((w as u64) << 48) ^ k.wrapping_mul(0x9e37_79b9));
    let usable = corpus_for(user, corpus, en);
    // Every worker first runs the corpus scripts of its user once, unmutated.
    if (k as usize) < usable.len() {
        let mut s = usable[k as usize].clone();
        s.user = user;
        s.clean |= user == User::Bystander;
        return s;
    }
    let mut s = if !usable.is_empty() && rng.pct(40) {
        let mut s = (*rng.pick(&usable)).clone();
        mutate_script(&mut rng, &mut s, corpus, en);
        s
    } else {
        gen_script(&mut rng, user, en)
    };
    s.user = user;
    // Keep switched-off generators out of mutated scripts.
    if !en.on("fd-overflow") {
        for st in &mut s.steps {
            if let Step::Send(f) = st {
                f.fds.truncate(6);
            }
        }
    }
    if !en.on("never-read") {
        s.steps.retain(|st| !matches!(st, Step::NoRead(_)));
    }
    // A `silent` step waits for the daemon's handshake timeout and its next housekeeping
    // tick, a second or two against a few ms for any other step: only now and then a script
    // keeps one, else they take most of the fuzzing time.
    let silent = s.steps.iter().any(|st| matches!(st, Step::Silent(_)));
    if !en.on("silent") || (silent && !rng.pct(SILENT_KEEP_PCT)) {
        s.steps.retain(|st| !matches!(st, Step::Silent(_)));
    }
    s.needs.retain(|n| en.on(n));
    s.clean |= user == User::Bystander;
    s
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus")
}

fn load_corpus() -> Vec<(String, Script)> {
    let mut v: Vec<(String, Script)> = std::fs::read_dir(corpus_dir())
        .expect("tests/fuzz-corpus")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "msf"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let s = Script::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), s)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

// =======================================================================================
// The worker: runs scripts as one client process.

/// What a worker knows about its surroundings.
#[derive(Debug)]
struct Ctx {
    socket: PathBuf,
    me: i32,
    uid: u32,
    /// Root or the daemon's own user: never barred, whatever it sends.
    privileged: bool,
    /// The [`BYSTANDER`]: sends no malformed frame, so never barred.
    bystander: bool,
    /// The script running is `clean`: frames the daemon would find malformed are skipped.
    clean: bool,
    /// How long the daemon waits for a hello before it closes a connection.
    daemon_handshake: Duration,
    daemon: i32,
    parent: i32,
    other: i32,
    salt: u8,
    /// A child that hands out userfaultfds it creates (foreign uffds), and its socket.
    sibling: i32,
    sibling_sock: OwnedFd,
    /// The grants this worker got and saw (interior mutability: steps only borrow `Ctx`).
    tokens: Mutex<TokenBook>,
    /// Where the workers publish their grants for one another (`tokens-PID` files).
    token_dir: Option<PathBuf>,
    /// The known-bug generators and checks switched on.
    enabled: Enabled,
}

/// The grant tokens a worker knows of.
#[derive(Debug, Default)]
struct TokenBook {
    /// Grants of the running script's connections.
    own: Vec<OwnGrant>,
    /// Tokens of this worker's earlier scripts (revoked, or about to be: their sessions
    /// closed), newest last.
    old: VecDeque<u128>,
    /// Tokens other workers published: token → the uid of the client that got it.
    seen: BTreeMap<u128, u32>,
    /// Grants of this worker's holder session (live through an epoch, see [`Holder`]).
    held: Vec<u128>,
}

/// A grant of one of the running script's connections.
#[derive(Debug, Clone, Copy)]
struct OwnGrant {
    token: u128,
    /// The connection's [`Conn::serial`].
    conn: u64,
    mirror: u64,
    /// Its mirror was detached (the `Detached` answer came): revoked for sure.
    revoked: bool,
}

/// Who got a grant, as far as this worker knows.
#[derive(Debug, Clone, Copy)]
enum TokenOwner {
    /// One of the running script's connections, for that mirror; revoked or not.
    Script(u64, bool),
    /// An earlier script of this worker.
    Earlier,
    /// This worker's holder session.
    Held,
    /// Another worker, of that uid.
    Worker(u32),
}

impl TokenBook {
    fn owner(&self, token: u128) -> Option<TokenOwner> {
        if let Some(g) = self.own.iter().find(|g| g.token == token) {
            return Some(TokenOwner::Script(g.mirror, g.revoked));
        }
        if self.old.contains(&token) {
            return Some(TokenOwner::Earlier);
        }
        if self.held.contains(&token) {
            return Some(TokenOwner::Held);
        }
        self.seen.get(&token).map(|uid| TokenOwner::Worker(*uid))
    }
}

/// An engine a connection became (`EngineAttached`).
#[derive(Debug, Clone, Copy)]
struct EngineView {
    /// The client address of the mirror's first byte, and its length.
    addr: u64,
    len: u64,
    /// The mirror is this process's own (so the worker knows the bytes it holds).
    own: bool,
}

/// A shared mapping of an engine's flush ring (for `scribble`), unmapped on drop.
#[derive(Debug)]
struct Ring(*mut libc::c_void);

impl Ring {
    fn map(fd: BorrowedFd<'_>) -> Option<Ring> {
        // SAFETY: a new shared mapping of the ring file the daemon handed over, at an
        // address the kernel chooses; nothing refers to that memory yet.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                abi::ring_bytes(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(Ring(p))
    }

    /// Word `i` of the ring (any of them: the engine owns this memory as much as the
    /// daemon does).
    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        let i = i % (abi::ring_bytes() / 8);
        let p = self
            .0
            .cast::<std::sync::atomic::AtomicU64>()
            .wrapping_add(i);
        // SAFETY: in bounds (reduced above) and aligned (the mapping is page aligned) for as
        // long as `self` lives; any bits are a valid value, and it is only accessed
        // atomically (the daemon, in another process, does the same).
        unsafe { &*p }
    }

    /// Garbage all over the ring: every word once, then the acknowledgement far ahead,
    /// then going back, with a futex wake each time.
    fn scribble(&self, mut x: u64) {
        let ack = std::mem::offset_of!(abi::RingHeader, ack) / 8;
        for i in 0..abi::ring_bytes() / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.word(i).store(x, std::sync::atomic::Ordering::Relaxed);
        }
        for v in [u64::MAX, 0, x] {
            self.word(ack)
                .store(v, std::sync::atomic::Ordering::Release);
            // SAFETY: FUTEX_WAKE only uses the address (a live, aligned word of a shared
            // mapping) as a key; it reads and writes no memory.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.word(ack).as_ptr().cast::<u32>(),
                    libc::FUTEX_WAKE,
                    i32::MAX,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<u32>(),
                    0u32,
                );
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping; nothing refers to it any more.
        unsafe { libc::munmap(self.0, abi::ring_bytes()) };
    }
}

/// The byte the scratch area holds at offset `i`.
fn pattern(salt: u8, i: u64) -> u8 {
    ((i / P) as u8).wrapping_mul(31) ^ (i as u8) ^ salt
}

/// The script's memory: `GUARD | RW | GUARD` pages, the RW part filled with [`pattern`].
struct Scratch {
    base: *mut libc::c_void,
    rw: u64,
}

impl Scratch {
    fn new(salt: u8) -> Scratch {
        let total = (2 * GUARD_PAGES + RW_PAGES) * P;
        // SAFETY: a fresh anonymous reservation chosen by the kernel; nothing refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap scratch");
        let rw = base as u64 + GUARD_PAGES * P;
        // SAFETY: changes the protection of the middle of our own reservation.
        let r = unsafe {
            libc::mprotect(
                rw as *mut libc::c_void,
                (RW_PAGES * P) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        assert_eq!(r, 0, "mprotect scratch");
        // SAFETY: the RW part of our own reservation, readable and writable (just set).
        let mem = unsafe { std::slice::from_raw_parts_mut(rw as *mut u8, (RW_PAGES * P) as usize) };
        for (i, b) in mem.iter_mut().enumerate() {
            *b = pattern(salt, i as u64);
        }
        Scratch { base, rw }
    }

    /// True if `addr..addr+len` lies in the RW part.
    fn holds(&self, addr: u64, len: u64) -> bool {
        addr >= self.rw
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.rw + RW_PAGES * P)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let total = (2 * GUARD_PAGES + RW_PAGES) * P;
        // SAFETY: unmaps our own reservation; nothing refers to it any more.
        unsafe { libc::munmap(self.base, total as usize) };
    }
}

/// A request sent and not yet answered.
#[derive(Debug)]
struct Pending {
    rid: u64,
    /// What the daemon decodes from the frame (`None`: it is malformed).
    req: Option<Request>,
    fds: Vec<Fd>,
    desc: String,
}

/// One connection of a script.
#[derive(Debug, Default)]
struct Conn {
    sock: Option<OwnedFd>,
    next_id: u64,
    pending: VecDeque<Pending>,
    /// Mirrors attached and not detached: id, addr, len.
    mirrors: Vec<(u64, u64, u64)>,
    /// Ids of mirrors detached (ids are never reused).
    /// Mirrors detached: (mirror id, the request id of the detach).
    gone: Vec<(u64, u64)>,
    /// Of those, the ones detached before their `Attached` answer came.
    detached_early: Vec<u64>,
    traces: Vec<u64>,
    hello: bool,
    /// The protocol version `Hello` settled.
    version: u16,
    bound: bool,
    /// Something was sent that makes the daemon close the session.
    doomed: bool,
    /// When it connected.
    opened: Option<Instant>,
    /// Frames received on it (a refusal can only be the first).
    frames: u64,
    /// Answers that came in pieces so far, by request id (a list answer too long for one
    /// message: every piece but the last has `FLAG_MORE`).
    pieces: Vec<(u64, Response)>,
    buf: Vec<u8>,
    /// The engine this connection became (`EngineAttached`), and its ring.
    engine: Option<EngineView>,
    ring: Option<Ring>,
    /// Unique in the worker's run (grants name the connection that got them).
    serial: u64,
}

/// What a script did, and what it found.
#[derive(Debug, Default)]
struct Outcome {
    sent: u64,
    replies: u64,
    events: u64,
    closes: u64,
    errors: BTreeMap<u16, u64>,
    /// Successful answers by kind.
    ok: BTreeMap<String, u64>,
    foreign_uffd_bound: u64,
    /// Frames sent that the daemon finds malformed.
    malformed: u64,
    /// Such frames not sent (the script is `clean`).
    skipped: u64,
    /// Connections made.
    connects: u64,
    /// Of those, refused with a reason (the abuse bar, limits) right after `accept`.
    refused: u64,
    /// Of those, refused by the abuse bar.
    barred: u64,
    /// Time spent waiting for the bar to lift after meeting it, ms.
    bar_wait_ms: u64,
    violations: Vec<String>,
}

impl Outcome {
    fn encode(&self) -> String {
        let errs: Vec<String> = self
            .errors
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect();
        let ok: Vec<String> = self.ok.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        format!(
            "sent={} replies={} events={} closes={} foreign={} malformed={} skipped={} \
             connects={} refused={} \
             barred={} barwait={} ok={} errs={} viol={}",
            self.sent,
            self.replies,
            self.events,
            self.closes,
            self.foreign_uffd_bound,
            self.malformed,
            self.skipped,
            self.connects,
            self.refused,
            self.barred,
            self.bar_wait_ms,
            if ok.is_empty() {
                "-".into()
            } else {
                ok.join(",")
            },
            if errs.is_empty() {
                "-".into()
            } else {
                errs.join(",")
            },
            if self.violations.is_empty() {
                "-".into()
            } else {
                hex(self.violations.join("\n").as_bytes())
            }
        )
    }

    fn decode(line: &str) -> Outcome {
        let f = fields(line);
        let n = |k: &str| f.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut o = Outcome {
            sent: n("sent"),
            replies: n("replies"),
            events: n("events"),
            closes: n("closes"),
            foreign_uffd_bound: n("foreign"),
            malformed: n("malformed"),
            skipped: n("skipped"),
            connects: n("connects"),
            refused: n("refused"),
            barred: n("barred"),
            bar_wait_ms: n("barwait"),
            ..Outcome::default()
        };
        if let Some(e) = f.get("errs").filter(|e| *e != "-") {
            for p in e.split(',') {
                if let Some((c, k)) = p.split_once(':') {
                    o.errors
                        .insert(c.parse().unwrap_or(0), k.parse().unwrap_or(0));
                }
            }
        }
        if let Some(e) = f.get("ok").filter(|e| *e != "-") {
            for p in e.split(',') {
                if let Some((c, k)) = p.split_once(':') {
                    o.ok.insert(c.to_owned(), k.parse().unwrap_or(0));
                }
            }
        }
        if let Some(v) = f.get("viol").filter(|v| *v != "-") {
            let text = String::from_utf8_lossy(&unhex(v).unwrap_or_default()).into_owned();
            o.violations = text.lines().map(str::to_owned).collect();
        }
        o
    }
}

/// A non-blocking `SOCK_SEQPACKET` connection, retried while the backlog is full.
fn connect(path: &Path) -> Result<OwnedFd, String> {
    let addr = UnixAddr::new(path).map_err(|e| e.to_string())?;
    // `None`: the backlog is full, try again.
    let attempt = || -> Option<Result<OwnedFd, String>> {
        let s = match nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        ) {
            Ok(s) => s,
            Err(e) => return Some(Err(format!("socket: {e}"))),
        };
        match nix::sys::socket::connect(s.as_raw_fd(), &addr) {
            Ok(()) => Some(Ok(s)),
            Err(Errno::EAGAIN | Errno::EINTR) => None,
            Err(e) => Some(Err(format!("connect: {e}"))),
        }
    };
    try_wait_until(ANSWER_DEADLINE, attempt)
        .map_err(|t| format!("connect: the daemon's backlog stayed full: {t}"))?
}

/// Opens `path` with `flags`, or `/dev/null` if that is not allowed.
fn open_or_null(path: &str, flags: libc::c_int) -> OwnedFd {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: a plain open of a NUL-terminated path; a non-negative result is a new fd.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        return unsafe { OwnedFd::from_raw_fd(fd) };
    }
    std::fs::File::open("/dev/null").unwrap().into()
}

fn new_uffd() -> OwnedFd {
    memshadow::create_uffd().expect("userfaultfd")
}

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;

/// A uffd created by a child of the worker that exits at once.
fn dead_uffd() -> OwnedFd {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    // SAFETY: the child only creates a uffd, sends it and calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let u = new_uffd();
        let raw = [u.as_raw_fd()];
        let _ = sendmsg::<()>(
            b.as_raw_fd(),
            &[std::io::IoSlice::new(b"u")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        );
        // SAFETY: ends the child without running anything of the parent's.
        unsafe { libc::_exit(0) };
    }
    let fd = recv_fd(a.as_fd());
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    fd.unwrap_or_else(|| std::fs::File::open("/dev/null").unwrap().into())
}

fn recv_fd(sock: BorrowedFd<'_>) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just installed this fd for us; nothing else owns it.
                return Some(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    None
}

/// Starts the sibling: a child that, for every byte it reads, creates a uffd and sends
/// it back, until its socket closes.
fn start_sibling() -> (i32, OwnedFd) {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    // SAFETY: the child only creates uffds, sends them over its socket and calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        drop(a);
        // SAFETY: asks for SIGKILL when the worker dies; integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let mut byte = [0u8; 1];
        while let Ok(n) = nix::sys::socket::recv(b.as_raw_fd(), &mut byte, MsgFlags::empty()) {
            if n == 0 {
                break;
            }
            let u = new_uffd();
            let raw = [u.as_raw_fd()];
            let _ = sendmsg::<()>(
                b.as_raw_fd(),
                &[std::io::IoSlice::new(b"u")],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::empty(),
                None,
            );
        }
        // SAFETY: ends the child without running anything of the parent's.
        unsafe { libc::_exit(0) };
    }
    drop(b);
    (pid, a)
}

impl Ctx {
    /// Opens one fd of kind `k` for a frame on `sock`.
    fn make_fd(&self, k: Fd, sock: BorrowedFd<'_>) -> OwnedFd {
        let null = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
        match k {
            Fd::Uffd => new_uffd(),
            Fd::UffdApi => {
                let u = new_uffd();
                let mut api = [0xaau64, 0, 0];
                // SAFETY: UFFDIO_API on our own uffd, with a valid `struct uffdio_api`.
                unsafe { libc::ioctl(u.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) };
                u
            }
            Fd::UffdForeign => {
                let _ =
                    nix::sys::socket::send(self.sibling_sock.as_raw_fd(), b"u", MsgFlags::empty());
                recv_fd(self.sibling_sock.as_fd()).unwrap_or_else(null)
            }
            Fd::UffdDead => dead_uffd(),
            Fd::Mem => open_or_null("/proc/self/mem", libc::O_RDWR),
            Fd::MemRo => open_or_null("/proc/self/mem", libc::O_RDONLY),
            Fd::MemOpath => open_or_null("/proc/self/mem", libc::O_PATH),
            Fd::Pagemap => open_or_null("/proc/self/pagemap", libc::O_RDONLY),
            Fd::Maps => open_or_null("/proc/self/maps", libc::O_RDONLY),
            Fd::TaskMem => open_or_null(
                &format!("/proc/self/task/{}/mem", nix::unistd::gettid()),
                libc::O_RDONLY,
            ),
            Fd::ParentMem => open_or_null(&format!("/proc/{}/mem", self.parent), libc::O_PATH),
            Fd::DaemonMem => open_or_null(&format!("/proc/{}/mem", self.daemon), libc::O_PATH),
            Fd::SiblingMem => open_or_null(&format!("/proc/{}/mem", self.sibling), libc::O_RDONLY),
            Fd::ParentPagemap => {
                open_or_null(&format!("/proc/{}/pagemap", self.parent), libc::O_PATH)
            }
            Fd::Null => null(),
            Fd::Pipe => nix::unistd::pipe().unwrap().0,
            Fd::Sock => {
                socketpair(
                    AddressFamily::Unix,
                    SockType::Stream,
                    None,
                    SockFlag::SOCK_CLOEXEC,
                )
                .unwrap()
                .0
            }
            Fd::SelfSock => sock.try_clone_to_owned().unwrap_or_else(|_| null()),
            Fd::Memfd => {
                nix::sys::memfd::memfd_create("fuzz", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                    .unwrap()
            }
            Fd::Event => nix::sys::eventfd::EventFd::new().unwrap().into(),
            Fd::Dir => open_or_null("/proc/self", libc::O_RDONLY | libc::O_DIRECTORY),
        }
    }

    fn pid(&self, w: Who) -> i32 {
        match w {
            Who::Me => self.me,
            Who::Daemon => self.daemon,
            Who::Parent => self.parent,
            Who::Other => self.other,
            Who::Sibling => self.sibling,
        }
    }

    /// A new script begins: the grants of the last one are old (their sessions closed).
    fn new_script(&self) {
        let mut b = self.tokens.lock().unwrap();
        let own = std::mem::take(&mut b.own);
        b.old.extend(own.into_iter().map(|g| g.token));
        while b.old.len() > PUBLISHED_TOKENS {
            b.old.pop_front();
        }
    }

    /// Records a grant of mirror `mirror` of connection `conn` (its serial), and publishes
    /// this worker's newest tokens (`tokens-PID` in the token directory: `TOKEN UID` lines).
    fn granted(&self, token: u128, conn: u64, mirror: u64) {
        let mut b = self.tokens.lock().unwrap();
        b.own.push(OwnGrant {
            token,
            conn,
            mirror,
            revoked: false,
        });
        self.publish(&b);
    }

    /// Publishes this worker's holder grants and newest other tokens.
    fn publish(&self, b: &TokenBook) {
        let Some(dir) = &self.token_dir else {
            return;
        };
        let all: Vec<u128> = b
            .old
            .iter()
            .copied()
            .chain(b.own.iter().map(|g| g.token))
            .collect();
        let from = all.len().saturating_sub(PUBLISHED_TOKENS);
        let text: String = b
            .held
            .iter()
            .chain(&all[from..])
            .map(|t| format!("{t:032x} {}\n", self.uid))
            .collect();
        let tmp = dir.join(format!(".tokens-{}", self.me));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(format!("tokens-{}", self.me)));
        }
    }

    /// Mirror `mirror` of connection `conn` was detached: its grants are revoked.
    fn detached(&self, conn: u64, mirror: u64) {
        let mut b = self.tokens.lock().unwrap();
        for g in b.own.iter_mut() {
            if g.conn == conn && g.mirror == mirror {
                g.revoked = true;
            }
        }
    }

    /// The tokens other workers published, with their users (and notes them as seen).
    fn others_tokens(&self, b: &mut TokenBook) -> Vec<u128> {
        let Some(dir) = &self.token_dir else {
            return Vec::new();
        };
        let mine = format!("tokens-{}", self.me);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().is_some_and(|n| {
                            let n = n.to_string_lossy();
                            n.starts_with("tokens-") && n != mine
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let mut v = Vec::new();
        for f in files {
            for line in std::fs::read_to_string(f).unwrap_or_default().lines() {
                let mut w = line.split_whitespace();
                let (Some(t), Some(u)) = (w.next(), w.next()) else {
                    continue;
                };
                if let (Ok(t), Ok(u)) = (u128::from_str_radix(t, 16), u.parse::<u32>()) {
                    b.seen.insert(t, u);
                    v.push(t);
                }
            }
        }
        v
    }

    /// The `k`-th token of `g` (a token no grant handed out if there is none).
    fn token(&self, g: Grants, k: u8) -> u128 {
        let mut b = self.tokens.lock().unwrap();
        let v: Vec<u128> = match g {
            Grants::Own => b.own.iter().map(|g| g.token).collect(),
            Grants::Old => b.old.iter().copied().collect(),
            Grants::Other => self.others_tokens(&mut b),
        };
        if v.is_empty() {
            u128::from_le_bytes([0x5a ^ k; 16])
        } else {
            v[usize::from(k) % v.len()]
        }
    }
}

/// The `n` bytes at offset `off` of engine `e`'s mirror as its client holds them, if this
/// worker knows them: the mirror is this process's and the range lies in the scratch
/// memory (else none: a device write of them then writes nothing).
fn known_bytes(ctx: &Ctx, scratch: &Scratch, e: Option<&EngineView>, off: u64, n: u32) -> Vec<u8> {
    let n = u64::from(n);
    let Some(e) = e.filter(|e| e.own) else {
        return Vec::new();
    };
    let Some(start) = e.addr.checked_add(off) else {
        return Vec::new();
    };
    if off.checked_add(n).is_none_or(|end| end > e.len) || !scratch.holds(start, n) {
        return Vec::new();
    }
    (0..n)
        .map(|i| pattern(ctx.salt, start - scratch.rw + i))
        .collect()
}

/// The fds of an `EngineAttached`: the epoch page, page table and shadow read-only (a
/// writable shared mapping of them refused), the ring read-write, the doorbell a pipe's read
/// end (an eventfd would let the engine make the daemon's ring block).
/// With `engine-reopen` on, an unprivileged engine must not be able to open the read-only
/// ones again for writing through `/proc/self/fd`.
fn check_engine_fds(ctx: &Ctx, fds: &[OwnedFd]) -> Result<(), String> {
    let names = ["epoch page", "page table", "shadow", "ring", "doorbell"];
    for (i, f) in fds.iter().enumerate() {
        let fl = nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| format!("F_GETFL of the {}: {e}", names[i]))?;
        let want = match i {
            0..=2 => libc::O_RDONLY,
            3 => libc::O_RDWR,
            _ => fl & libc::O_ACCMODE,
        };
        if fl & libc::O_ACCMODE != want {
            return Err(format!(
                "the {} came with access mode {:#o}, not {want:#o}",
                names[i],
                fl & libc::O_ACCMODE
            ));
        }
        if i < 3 {
            // SAFETY: asks for a new shared mapping of a file we hold; if the kernel grants
            // it (the finding), it is unmapped at once and nothing touches it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    P as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                // SAFETY: unmaps the mapping just made; nothing refers to it.
                unsafe { libc::munmap(p, P as usize) };
                return Err(format!("the {} could be mapped writable", names[i]));
            }
            if ctx.enabled.on("engine-reopen") && !ctx.privileged {
                let path = format!("/proc/self/fd/{}", f.as_raw_fd());
                if std::fs::OpenOptions::new().write(true).open(path).is_ok() {
                    return Err(format!(
                        "uid {} opened the read-only {} again for writing (/proc/self/fd)",
                        ctx.uid, names[i]
                    ));
                }
            }
        }
    }
    let bell = std::fs::read_link(format!("/proc/self/fd/{}", fds[4].as_raw_fd()))
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default();
    let flags = nix::fcntl::fcntl(&fds[4], nix::fcntl::FcntlArg::F_GETFL).unwrap_or(-1);
    if !bell.starts_with("pipe:[") || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(format!(
            "the doorbell is {bell:?} (flags {flags:#x}), not a pipe's read end"
        ));
    }
    Ok(())
}

/// Runs one script; everything it opened is closed when it returns.
fn run_script(ctx: &Ctx, s: &Script, handshake: Duration) -> Outcome {
    ctx.new_script();
    let scratch = Scratch::new(ctx.salt);
    let mut conns: Vec<Conn> = (0..4).map(|_| Conn::default()).collect();
    let mut out = Outcome::default();
    for (i, step) in s.steps.iter().enumerate() {
        let c = step.conn() as usize;
        if let Err(v) = run_step(ctx, &scratch, &mut conns[c], step, handshake, &mut out) {
            out.violations
                .push(format!("step {} ({}): {v}", i + 1, step_desc(step)));
            break;
        }
    }
    // Every answer still due, then close.
    if out.violations.is_empty() {
        for (c, conn) in conns.iter_mut().enumerate() {
            if let Err(v) = drain(ctx, &scratch, conn, &mut out) {
                out.violations.push(format!("end of script, @{c}: {v}"));
                break;
            }
        }
    }
    drop(conns);
    if out.barred > 0 && out.violations.is_empty() {
        wait_out_bar(ctx, &scratch, &mut out);
    }
    drop(scratch);
    out
}

/// After a script met the abuse bar: waits until this user's connections are served again
/// (a hello answered), trying every 100 ms, rather than run scripts that would only be
/// refused. The bar lasts 2 s and the workers of the user stop flooding while they wait,
/// so it must lift well within [`BAR_LIFT_DEADLINE`].
fn wait_out_bar(ctx: &Ctx, scratch: &Scratch, out: &mut Outcome) {
    let t = Instant::now();
    let hello = Script::parse("send hello : u16:1 u16:1 str:after-the-bar").map(|s| s.steps);
    let Ok([hello]) = hello.as_deref() else {
        out.violations
            .push(format!("the hello script does not parse: {hello:?}"));
        return;
    };
    // `None`: still refused.
    let served = || -> Option<Result<(), String>> {
        let mut probe = Conn::default();
        let mut o = Outcome::default();
        if let Err(e) = run_step(ctx, scratch, &mut probe, hello, Duration::ZERO, &mut o) {
            return Some(Err(format!("while waiting for the abuse bar to lift: {e}")));
        }
        (probe.hello && o.refused == 0).then_some(Ok(()))
    };
    match try_wait_until_every(BAR_LIFT_DEADLINE, Duration::from_millis(100), served) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.violations.push(e),
        Err(_) => out.violations.push(format!(
            "uid {} was still refused {BAR_LIFT_DEADLINE:?} after it met the abuse bar \
             (which lasts 2 s): the bar does not lift",
            ctx.uid
        )),
    }
    out.bar_wait_ms += t.elapsed().as_millis() as u64;
}

fn step_desc(step: &Step) -> String {
    Script {
        user: User::Any,
        clean: false,
        needs: Vec::new(),
        daemon: Vec::new(),
        steps: vec![step.clone()],
    }
    .print()
    .lines()
    .nth(1)
    .unwrap_or("")
    .chars()
    .take(160)
    .collect()
}

fn ensure_connected(ctx: &Ctx, conn: &mut Conn, out: &mut Outcome) -> Result<(), String> {
    if conn.sock.is_none() {
        *conn = Conn::open(connect(&ctx.socket)?);
        out.connects += 1;
    }
    Ok(())
}

impl Conn {
    /// A connection just made.
    fn open(sock: OwnedFd) -> Conn {
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Conn {
            sock: Some(sock),
            next_id: 1,
            opened: Some(Instant::now()),
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..Conn::default()
        }
    }
}

fn run_step(
    ctx: &Ctx,
    scratch: &Scratch,
    conn: &mut Conn,
    step: &Step,
    handshake: Duration,
    out: &mut Outcome,
) -> Result<(), String> {
    match step {
        Step::Wait(_) => drain(ctx, scratch, conn, out),
        Step::Close(_) => {
            *conn = Conn::default();
            Ok(())
        }
        Step::Shutdown(_) => {
            if let Some(sock) = &conn.sock {
                let _ =
                    nix::sys::socket::shutdown(sock.as_raw_fd(), nix::sys::socket::Shutdown::Write);
                conn.doomed = true;
                drain(ctx, scratch, conn, out)?;
            }
            Ok(())
        }
        Step::Silent(_) => {
            let mut silent = Conn::open(connect(&ctx.socket)?);
            out.connects += 1;
            if !wait_hangup(silent.sock.as_ref().unwrap().as_fd(), handshake) {
                return Err(format!(
                    "a connection that never said hello was still open after {handshake:?} \
                     (no handshake timeout)"
                ));
            }
            // Closed without a word (the handshake timeout), or refused at once.
            closed(ctx, scratch, &mut silent, out)
        }
        Step::NoRead(_) => no_read(ctx, scratch, conn, handshake, out),
        Step::Exit(_) => exiting_client(ctx, scratch, out),
        Step::Scribble(_) => {
            if let Some(r) = &conn.ring {
                r.scribble((u64::from(ctx.salt) << 32) ^ conn.frames ^ 0x9e37_79b9);
            }
            Ok(())
        }
        Step::Send(f) => {
            // A client that keeps more answers unread than its socket holds is one that
            // does not read (the `never-read` generator): read them first.
            if conn.pending.len() >= MAX_PIPELINE {
                drain(ctx, scratch, conn, out)?;
            }
            ensure_connected(ctx, conn, out)?;
            send_frame(ctx, scratch, conn, f, out)?;
            match f.mode {
                Mode::Wait => drain(ctx, scratch, conn, out),
                Mode::NoWait => Ok(()),
                Mode::Close => {
                    *conn = Conn::default();
                    Ok(())
                }
            }
        }
    }
}

/// How the child of [`exiting_client`] ends: its requests in flight, refused by the abuse
/// bar, refused otherwise (limits), or something went wrong (its message in its pipe).
const EXIT_IN_FLIGHT: i32 = 0;
const EXIT_FAILED: i32 = 1;
const EXIT_BARRED: i32 = 2;
const EXIT_REFUSED: i32 = 3;

/// A child of the client (sharing its memory layout) binds, attaches its copy of the
/// scratch area, sends a populate and a read and exits without waiting: the daemon must
/// release it (checked at rest). The child must be gone within the answer deadline.
fn exiting_client(ctx: &Ctx, scratch: &Scratch, out: &mut Outcome) -> Result<(), String> {
    let (why_r, why_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the child only runs `exiting_child`, which ends in `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(why_r);
        exiting_child(ctx, scratch, why_w);
    }
    drop(why_w);
    let pid = nix::unistd::Pid::from_raw(pid);
    // `None`: still running.
    let exited = || -> Option<Result<i32, String>> {
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => None,
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => Some(Ok(code)),
            Ok(st) => Some(Err(format!("the exiting client ended with {st:?}"))),
            Err(e) => Some(Err(format!("waitpid: {e}"))),
        }
    };
    let Ok(code) = try_wait_until(ANSWER_DEADLINE, exited) else {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(format!(
            "a client process did not get through hello, bind and attach within \
             {ANSWER_DEADLINE:?}"
        ));
    };
    let code = code?;
    out.connects += 1;
    match code {
        EXIT_IN_FLIGHT => {
            out.sent += 5;
            out.closes += 1;
            Ok(())
        }
        EXIT_BARRED => note_refusal(ctx, Refused::Bar, BAR_MESSAGE, out),
        EXIT_REFUSED => note_refusal(ctx, Refused::Limit, "", out),
        code => {
            let mut why = [0u8; 4096];
            let n = nix::unistd::read(&why_r, &mut why).unwrap_or(0);
            Err(format!(
                "the exiting client ended with exit code {code}: {}",
                String::from_utf8_lossy(&why[..n])
            ))
        }
    }
}

/// The child of [`exiting_client`]: one connection through the steps of any script (so
/// checked the same way), the last two without waiting for their answers; then it exits
/// with one of the `EXIT_` codes, its message (if it failed) written to `why`.
fn exiting_child(ctx: &Ctx, scratch: &Scratch, why: OwnedFd) -> ! {
    let script = "send hello : u16:1 u16:1 str:exiting\n\
                  send bind fds=uffd,mem-ro,pagemap : u32:0\n\
                  send attach : addr:0 u64:0x8000 u32:0\n\
                  send populate nowait : mirror:0 u64:0 u64:0x8000\n\
                  send read nowait : mirror:0 u64:0 u32:0x8000\n";
    let mut out = Outcome::default();
    let mut conn = Conn::default();
    let r = Script::parse(script).and_then(|s| {
        for step in &s.steps {
            run_step(ctx, scratch, &mut conn, step, Duration::ZERO, &mut out)?;
            if out.refused > 0 {
                break;
            }
        }
        Ok(())
    });
    let code = match r {
        Err(e) => {
            let _ = nix::unistd::write(&why, e.as_bytes());
            EXIT_FAILED
        }
        Ok(()) if out.barred > 0 => EXIT_BARRED,
        Ok(()) if out.refused > 0 => EXIT_REFUSED,
        Ok(()) => EXIT_IN_FLIGHT,
    };
    // SAFETY: ends the child at once (its socket and uffd close with it).
    unsafe { libc::_exit(code) }
}

/// Waits until `sock`'s peer hangs up (true) or `limit` passes (false), reading nothing.
fn wait_hangup(sock: BorrowedFd<'_>, limit: Duration) -> bool {
    // Each try blocks in poll(2) for up to 100 ms.
    let hung_up = || {
        // No events asked for: poll reports a hang-up (and errors) anyway, and queued
        // answers (a client that does not read has plenty) do not wake it.
        let mut p = [PollFd::new(sock, PollFlags::empty())];
        poll(&mut p, PollTimeout::from(100u16)).is_ok_and(|n| {
            n > 0
                && p[0]
                    .revents()
                    .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
        })
    };
    try_wait_until_every(limit, Duration::ZERO, hung_up).is_ok()
}

/// The `never-read` generator: floods `status` requests without reading the answers,
/// checks that the session loop still answers another client promptly, and that the
/// daemon closes the flooding session.
fn no_read(
    ctx: &Ctx,
    scratch: &Scratch,
    conn: &mut Conn,
    handshake: Duration,
    out: &mut Outcome,
) -> Result<(), String> {
    ensure_connected(ctx, conn, out)?;
    let sock = conn.sock.take().unwrap();
    let served = conn.frames > 0;
    let mut buf = std::mem::take(&mut conn.buf);
    *conn = Conn::default();
    // Flood until the daemon stops reading this session: its answers fill our socket, so
    // it is stuck sending one (or has given up on us).
    let status = Request::Status;
    let mut id = 0u64;
    repeat_for(ANSWER_DEADLINE, || {
        id += 1;
        match proto::send(sock.as_fd(), status.msg_type(), 0, id, &[], &[]) {
            Ok(()) => {
                out.sent += 1;
                true
            }
            Err(SocketError::WouldBlock) => {
                let mut p = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
                poll(&mut p, PollTimeout::from(500u16)).unwrap_or(0) > 0
            }
            Err(_) => false,
        }
    });
    // The session loop must still serve others while that session's answers are stuck: a
    // probe connection gets its answers promptly (or, its user barred, its refusal: the
    // session loop sends that too).
    let t = Instant::now();
    let mut probe = Conn::default();
    let refused = out.refused;
    for step in Script::parse("send hello : u16:1 u16:1 str:probe\nsend status\n")
        .map(|s| s.steps)
        .unwrap_or_default()
    {
        run_step(ctx, scratch, &mut probe, &step, handshake, out)
            .map_err(|e| format!("probe: {e}"))?;
        if out.refused > refused {
            break;
        }
    }
    let took = t.elapsed();
    drop(probe);
    if took > STALL_LIMIT {
        return Err(format!(
            "a client that does not read stalled the session loop: another client's status \
             took {took:?}"
        ));
    }
    if !wait_hangup(sock.as_fd(), 2 * ANSWER_DEADLINE) {
        return Err(format!(
            "a client that does not read was still connected after {:?}",
            2 * ANSWER_DEADLINE
        ));
    }
    out.closes += 1;
    // Closed without a word, as a client that does not read is; or refused at once, and
    // then the refusal is the first thing it was sent.
    if !served {
        if let Some((kind, why)) = left_behind(sock.as_fd(), &mut buf)?
            .first()
            .and_then(refusal_in)
        {
            note_refusal(ctx, kind, &why, out)?;
        }
    }
    Ok(())
}

/// Receives one frame within `limit`; `None` once the daemon has closed the connection
/// (then [`left_behind`] reads what it sent before).
fn recv_within(
    sock: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> Result<Option<proto::Frame>, String> {
    // `None`: nothing yet (each try waits in poll(2) for up to 100 ms first).
    let mut waited = false;
    let received = || -> Option<Result<Option<proto::Frame>, String>> {
        if std::mem::replace(&mut waited, true) {
            let mut p = [PollFd::new(sock, PollFlags::POLLIN)];
            let _ = poll(&mut p, PollTimeout::from(100u16));
        }
        match proto::recv(sock, buf) {
            Ok(f) => Some(Ok(Some(f))),
            Err(SocketError::WouldBlock) => None,
            Err(SocketError::Closed) => Some(Ok(None)),
            Err(e) => Some(Err(format!("bad frame from the daemon: {e}"))),
        }
    };
    try_wait_until_every(limit, Duration::ZERO, received)
        .map_err(|_| format!("no answer within {limit:?}"))?
}

/// What the daemon left on a connection it closed, read without waiting: the frames it
/// sent before it closed (answers; on a connection it refused, why). A reset (the daemon
/// closed with a request of ours unread) is reported before them, so reading goes on past
/// one end of the stream, until a second (or nothing is left).
fn left_behind(sock: BorrowedFd<'_>, buf: &mut Vec<u8>) -> Result<Vec<proto::Frame>, String> {
    let mut frames = Vec::new();
    let mut ends = 0;
    loop {
        match proto::recv(sock, buf) {
            Ok(f) => {
                ends = 0;
                frames.push(f);
            }
            Err(SocketError::Closed) if ends == 0 => ends += 1,
            Err(SocketError::Closed | SocketError::WouldBlock) => return Ok(frames),
            Err(e) => return Err(format!("bad frame from the daemon: {e}")),
        }
    }
}

/// Why the daemon refused a connection right after accepting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Its user is barred for a flood of malformed messages.
    Bar,
    /// The daemon or its user has its maximum of clients.
    Limit,
    /// Out of file descriptors, unidentifiable peer, shutting down.
    Other,
}

/// A frame that may be a refusal (request id 0, an error only `accept` sends or that ends
/// any session) and which; see [`on_frame`] for when it is one.
fn refusal(rid: u64, resp: &Response) -> Option<Refused> {
    let Response::Error { code, message } = resp else {
        return None;
    };
    match code {
        _ if rid != 0 => None,
        ErrorCode::TooManyClients if message.starts_with(BAR_MESSAGE) => Some(Refused::Bar),
        ErrorCode::TooManyClients => Some(Refused::Limit),
        ErrorCode::OutOfResources | ErrorCode::PermissionDenied | ErrorCode::ShuttingDown => {
            Some(Refused::Other)
        }
        _ => None,
    }
}

/// [`refusal`] of the first frame of a connection that sent no request of id 0, and its
/// message.
fn refusal_in(f: &proto::Frame) -> Option<(Refused, String)> {
    match Response::decode(f.header.msg_type, &f.payload, f.fds.len()).ok()? {
        r @ Response::Error { .. } => {
            let kind = refusal(f.header.request_id, &r)?;
            Some((kind, short(&r)))
        }
        _ => None,
    }
}

/// Counts a connection refused for `kind`: fine, but the bar only ever hits an
/// unprivileged user (one that sent malformed messages).
fn note_refusal(ctx: &Ctx, kind: Refused, why: &str, out: &mut Outcome) -> Result<(), String> {
    out.refused += 1;
    if kind == Refused::Bar {
        out.barred += 1;
        if ctx.privileged {
            return Err(format!(
                "a connection of uid {} was refused by the abuse bar, which never bars root \
                 nor the daemon's user: {why}",
                ctx.uid
            ));
        }
        if ctx.bystander {
            return Err(format!(
                "a connection of uid {} was refused by the abuse bar, though that user never \
                 sent a malformed frame (another user did): {why}",
                ctx.uid
            ));
        }
    }
    Ok(())
}

/// Renders a frame's record (header and payload, mutations applied).
fn render(ctx: &Ctx, scratch: &Scratch, conn: &mut Conn, f: &Send) -> Vec<u8> {
    let mirrors = &conn.mirrors;
    let engine = conn.engine;
    let value = |t: &Tok| match t {
        Tok::Addr(o) => scratch.rw.wrapping_add_signed(*o).to_le_bytes().to_vec(),
        Tok::Pid(w) => ctx.pid(*w).to_le_bytes().to_vec(),
        Tok::Mirror(k) => mirrors
            .get(usize::from(*k))
            .map_or(u64::from(*k) + 1, |m| m.0)
            .to_le_bytes()
            .to_vec(),
        // Two u64, low first: the u128's little-endian bytes.
        Tok::Token(g, k) => ctx.token(*g, *k).to_le_bytes().to_vec(),
        Tok::Write(off, n) => {
            let bytes = known_bytes(ctx, scratch, engine.as_ref(), *off, *n);
            let mut v = off.to_le_bytes().to_vec();
            v.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            v.extend_from_slice(&bytes);
            v
        }
        _ => Vec::new(),
    };
    render_with(f, &mut conn.next_id, &value)
}

/// The frames of `s` the daemon would find malformed (as [`send_frame`] counts them; the
/// values of addresses, pids and mirror ids do not change that).
fn malformed_frames(s: &Script) -> u64 {
    let mut ids = [1u64; 4];
    let zeros = |t: &Tok| match t {
        Tok::Pid(_) => vec![0; 4],
        Tok::Token(..) => vec![0; 16],
        Tok::Write(off, n) => {
            let mut v = off.to_le_bytes().to_vec();
            v.extend_from_slice(&n.to_le_bytes());
            v.resize(v.len() + *n as usize, 0);
            v
        }
        _ => vec![0; 8],
    };
    let mut n = 0;
    for st in &s.steps {
        if let Step::Send(f) = st {
            let rec = render_with(f, &mut ids[usize::from(f.conn) % 4], &zeros);
            let eof = rec.is_empty() && f.fds.is_empty();
            n += u64::from(!eof && daemon_view(&rec, f.fds.len()).1.is_none());
        }
    }
    n
}

/// [`render`], with `value` rendering the tokens whose bytes depend on the run (addresses,
/// pids, mirror ids); `next_id` is the connection's last request id.
fn render_with(f: &Send, next_id: &mut u64, value: &dyn Fn(&Tok) -> Vec<u8>) -> Vec<u8> {
    let mut p = Vec::new();
    for t in &f.payload {
        match t {
            Tok::Hex(b) => p.extend_from_slice(b),
            Tok::U8(v) => p.push(*v),
            Tok::U16(v) => p.extend_from_slice(&v.to_le_bytes()),
            Tok::U32(v) => p.extend_from_slice(&v.to_le_bytes()),
            Tok::U64(v) => p.extend_from_slice(&v.to_le_bytes()),
            Tok::I32(v) => p.extend_from_slice(&v.to_le_bytes()),
            Tok::Str(b) => {
                p.extend_from_slice(&(b.len() as u16).to_le_bytes());
                p.extend_from_slice(b);
            }
            Tok::Rep(n, b) => {
                for _ in 0..*n {
                    p.extend_from_slice(b);
                }
            }
            Tok::Addr(_) | Tok::Pid(_) | Tok::Mirror(_) | Tok::Token(..) | Tok::Write(..) => {
                p.extend_from_slice(&value(t))
            }
        }
    }
    let mut rec = if f.raw {
        p
    } else {
        let id = f.id.unwrap_or_else(|| {
            *next_id += 1;
            *next_id
        });
        let h = Header {
            version: f.ver.unwrap_or(proto::VERSION),
            msg_type: f.ty,
            flags: f.flags.unwrap_or(0),
            fd_count: f.hdrfds.unwrap_or(f.fds.len() as u16),
            payload_len: f.len.unwrap_or(p.len() as u32),
            request_id: id,
        };
        let mut r = h.encode().to_vec();
        if let Some(m) = f.magic {
            r[0..4].copy_from_slice(&m.to_le_bytes());
        }
        r.extend_from_slice(&p);
        r
    };
    for m in &f.muts {
        m.apply(&mut rec);
    }
    rec
}

/// What the daemon makes of `rec` with `nfds` fds: the request id it answers with, and
/// the request if the frame is well-formed.
fn daemon_view(rec: &[u8], nfds: usize) -> (u64, Option<Request>) {
    if rec.len() > HEADER_LEN + MAX_PAYLOAD || nfds > MAX_FDS {
        return (0, None);
    }
    let Ok(h) = Header::decode(rec) else {
        return (0, None);
    };
    if usize::from(h.fd_count) != nfds {
        return (0, None);
    }
    (
        h.request_id,
        Request::decode(h.msg_type, &rec[HEADER_LEN..], nfds).ok(),
    )
}

fn send_frame(
    ctx: &Ctx,
    scratch: &Scratch,
    conn: &mut Conn,
    f: &Send,
    out: &mut Outcome,
) -> Result<(), String> {
    let rec = render(ctx, scratch, conn, f);
    // An empty record reads as the end of the stream.
    let eof = rec.is_empty() && f.fds.is_empty();
    let (rid, req) = daemon_view(&rec, f.fds.len());
    if ctx.clean && !eof && req.is_none() {
        out.skipped += 1;
        return Ok(());
    }
    // A device write may write only what its client holds already (as `Tok::Write`
    // renders it): anything else (a mutated frame, another process's memory, an engine
    // not known yet) would change memory whose every read is checked. Not sent.
    if let Some(Request::EngineWrite { offset, bytes }) = &req {
        let attaching = conn
            .pending
            .iter()
            .any(|p| matches!(p.req, Some(Request::EngineAttach { .. })));
        let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        if !bytes.is_empty()
            && (attaching || known_bytes(ctx, scratch, conn.engine.as_ref(), *offset, n) != *bytes)
        {
            return Ok(());
        }
    }
    let sock = conn.sock.as_ref().unwrap();
    let owned: Vec<OwnedFd> = f
        .fds
        .iter()
        .map(|k| ctx.make_fd(*k, sock.as_fd()))
        .collect();
    let raw: Vec<RawFd> = owned.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [std::io::IoSlice::new(&rec)];
    // `None`: no room yet (each try after the first waits in poll(2) for up to 100 ms).
    let mut waited = false;
    let sent = || -> Option<Result<(), Errno>> {
        if std::mem::replace(&mut waited, true) {
            let mut p = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
            let _ = poll(&mut p, PollTimeout::from(100u16));
        }
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(_) => Some(Ok(())),
            Err(Errno::EINTR | Errno::EAGAIN) => None,
            Err(e) => Some(Err(e)),
        }
    };
    match try_wait_until_every(ANSWER_DEADLINE, Duration::ZERO, sent) {
        Ok(Ok(())) => {}
        Ok(Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN)) => {
            // The daemon closed the session already: it must have had a reason, which
            // (a refusal, an answer) may still wait to be read.
            return closed(ctx, scratch, conn, out);
        }
        Ok(Err(Errno::EMSGSIZE)) => return Ok(()),
        Ok(Err(e)) => return Err(format!("sendmsg: {e}")),
        Err(_) => {
            return Err(format!(
                "the daemon read nothing from this session for {ANSWER_DEADLINE:?}"
            ))
        }
    }
    drop(owned);
    out.sent += 1;
    if eof {
        conn.doomed = true;
        return Ok(());
    }
    if req.is_none() {
        out.malformed += 1;
        conn.doomed = true;
    }
    if let Some(Request::Trace { .. }) = &req {
        conn.traces.push(rid);
    }
    conn.pending.push_back(Pending {
        rid,
        req,
        fds: f.fds.clone(),
        desc: step_desc(&Step::Send(f.clone())),
    });
    Ok(())
}

/// The daemon closed the connection (a receive saw the end, or a send failed): reads what
/// it left, without waiting — answers to our requests, checked as any, and on a connection
/// it refused, why — then judges the close. Fine with a reason: a refusal, a malformed
/// frame or the end of the stream we sent, the handshake timeout; a finding without one
/// while requests wait for their answers.
fn closed(ctx: &Ctx, scratch: &Scratch, conn: &mut Conn, out: &mut Outcome) -> Result<(), String> {
    out.closes += 1;
    if let Some(sock) = conn.sock.take() {
        let mut buf = std::mem::take(&mut conn.buf);
        for f in left_behind(sock.as_fd(), &mut buf)? {
            on_frame(ctx, scratch, conn, f, out)?;
        }
    }
    let timed_out = !conn.hello
        && conn
            .opened
            .is_some_and(|t| t.elapsed() >= ctx.daemon_handshake);
    let doomed = conn.doomed || timed_out;
    let pending: Vec<String> = conn.pending.iter().map(|p| p.desc.clone()).collect();
    *conn = Conn::default();
    if doomed || pending.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the daemon closed a healthy session with {} request(s) unanswered, first: {}",
            pending.len(),
            pending[0]
        ))
    }
}

/// Reads answers until nothing is pending on the connection (or it closes).
fn drain(ctx: &Ctx, scratch: &Scratch, conn: &mut Conn, out: &mut Outcome) -> Result<(), String> {
    while !conn.pending.is_empty() {
        let Some(sock) = conn.sock.as_ref() else {
            conn.pending.clear();
            return Ok(());
        };
        match recv_within(sock.as_fd(), &mut conn.buf, ANSWER_DEADLINE) {
            Ok(Some(frame)) => on_frame(ctx, scratch, conn, frame, out)?,
            Ok(None) => return closed(ctx, scratch, conn, out),
            Err(e) => {
                return Err(format!(
                    "{e} (waiting for the answer to {})",
                    conn.pending[0].desc
                ))
            }
        }
    }
    Ok(())
}

/// One frame the daemon sent on `conn`: a refusal of the connection, a trace event, or the
/// answer to one of its pending requests (checked).
fn on_frame(
    ctx: &Ctx,
    scratch: &Scratch,
    conn: &mut Conn,
    frame: proto::Frame,
    out: &mut Outcome,
) -> Result<(), String> {
    let first = conn.frames == 0;
    conn.frames += 1;
    // The fds are closed when `fds` goes, whatever becomes of the answer.
    let proto::Frame {
        header,
        payload,
        fds,
    } = frame;
    // Only `EngineAttached` and `MonitorReady` carry fds (exactly ENGINE_FDS and
    // MONITOR_FDS; decoding checks the count).
    if header.msg_type == MONITOR_READY && fds.len() != proto::monitor_abi::MONITOR_FDS {
        return Err(format!("MonitorReady came with {} fds", fds.len()));
    }
    if !fds.is_empty() && header.msg_type != ENGINE_ATTACHED && header.msg_type != MONITOR_READY {
        return Err(format!(
            "the daemon sent {} fds with a {:#06x}",
            fds.len(),
            header.msg_type
        ));
    }
    if header.msg_type == ENGINE_ATTACHED && fds.len() != ENGINE_FDS {
        return Err(format!(
            "EngineAttached came with {} fds, not {ENGINE_FDS}",
            fds.len()
        ));
    }
    let resp = Response::decode(header.msg_type, &payload, fds.len()).map_err(|e| {
        format!(
            "undecodable answer {:#06x} with {} fds: {e}",
            header.msg_type,
            fds.len()
        )
    })?;
    let rid = header.request_id;
    // The pieces of one answer go out together: nothing else comes between them.
    if let Some((other, _)) = conn.pieces.iter().find(|(r, _)| *r != rid) {
        return Err(format!(
            "{} for request id {rid} between the pieces of the answer to request id {other}",
            short(&resp)
        ));
    }
    if header.msg_type == TRACE_EVENT || header.msg_type == TRACE_ACK {
        out.events += 1;
        if !conn.traces.contains(&rid) || header.flags & FLAG_MORE == 0 {
            return Err(format!("trace event for request {rid}, not a stream"));
        }
        return Ok(());
    }
    // A list answer in pieces: put together, then checked as one answer.
    let more = header.flags & FLAG_MORE != 0 && !matches!(resp, Response::TraceStarted);
    let resp = match conn.pieces.iter().position(|(r, _)| *r == rid) {
        Some(i) => {
            let (_, mut whole) = conn.pieces.swap_remove(i);
            let piece = short(&resp);
            if !whole.absorb(resp) {
                return Err(format!(
                    "{piece} after a piece of {} for request id {rid}",
                    short(&whole)
                ));
            }
            whole
        }
        None => resp,
    };
    if more {
        if !conn.pending.iter().any(|p| p.rid == rid) {
            return Err(format!(
                "a piece of {} for request id {rid}, which was not sent",
                short(&resp)
            ));
        }
        conn.pieces.push((rid, resp));
        return Ok(());
    }
    // A refusal is the only thing sent on a connection the daemon will not serve, and only
    // `accept` refuses with `TooManyClients`. The other codes of a refusal may answer a
    // request of id 0; two of them may also end a session (out of fds, shutting down).
    if let Some(kind) = refusal(rid, &resp) {
        let from_accept = matches!(kind, Refused::Bar | Refused::Limit);
        let answers_one = conn.pending.iter().any(|p| p.rid == 0 && p.req.is_some());
        let ends_session = matches!(
            resp,
            Response::Error {
                code: ErrorCode::OutOfResources | ErrorCode::ShuttingDown,
                ..
            }
        );
        if from_accept && !first {
            return Err(format!(
                "{} after it had served the connection",
                short(&resp)
            ));
        }
        if from_accept || (first && !answers_one) {
            conn.doomed = true;
            conn.pending.clear();
            return note_refusal(ctx, kind, &short(&resp), out);
        }
        if ends_session && !answers_one {
            conn.doomed = true;
            *out.errors.entry(resp_code(&resp)).or_default() += 1;
            return Ok(());
        }
    }
    out.replies += 1;
    match &resp {
        Response::Error { code, .. } => *out.errors.entry(code.code()).or_default() += 1,
        r => *out.ok.entry(variant(r).to_owned()).or_default() += 1,
    }
    // Ids may repeat (`id=`, or 0 for every frame the daemon cannot read a header of),
    // and slow requests are answered out of order: pair a BadMessage with a malformed
    // frame first, anything else with a well-formed one.
    let bad_message = matches!(
        resp,
        Response::Error {
            code: ErrorCode::BadMessage,
            ..
        }
    );
    let same = |p: &&Pending| p.rid == rid;
    let i = conn
        .pending
        .iter()
        .position(|p| same(&p) && p.req.is_none() == bad_message)
        .or_else(|| conn.pending.iter().position(|p| same(&p)));
    let Some(i) = i else {
        return Err(format!(
            "answer {} to request id {rid}, which was not sent",
            short(&resp)
        ));
    };
    let p = conn.pending.remove(i).unwrap();
    check_answer(ctx, scratch, conn, &p, &resp, &fds, out)
        .map_err(|e| format!("{e} (request: {})", p.desc))
}

/// The code of an error answer (0 for anything else).
fn resp_code(r: &Response) -> u16 {
    match r {
        Response::Error { code, .. } => code.code(),
        _ => 0,
    }
}

/// The answer `resp` to `p` is allowed in the session's state.
fn check_answer(
    ctx: &Ctx,
    scratch: &Scratch,
    conn: &mut Conn,
    p: &Pending,
    resp: &Response,
    fds: &[OwnedFd],
    out: &mut Outcome,
) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{why}: answered {}", short(resp)));
    let err_code = match resp {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    };
    let Some(req) = &p.req else {
        conn.doomed = true;
        return match err_code {
            // (Or, if the daemon could not take its fds, OutOfResources.)
            Some(ErrorCode::BadMessage | ErrorCode::OutOfResources | ErrorCode::ShuttingDown) => {
                Ok(())
            }
            _ => bad("a malformed frame was not refused as BadMessage"),
        };
    };
    // Slow requests run on the daemon's workers, so one sent before a `Hello`, `Bind` or
    // `Attach` that is still unanswered may be served after it.
    let pending =
        |f: fn(&Request) -> bool| conn.pending.iter().any(|q| q.req.as_ref().is_some_and(f));
    let hello_pending = pending(|r| matches!(r, Request::Hello { .. }));
    let bind_pending = pending(|r| matches!(r, Request::Bind { .. }));
    let attach_pending = pending(|r| matches!(r, Request::Attach { .. }));
    if let (Request::Hello { .. }, Response::HelloAck { version, .. }) = (req, resp) {
        if conn.hello {
            return bad("a second hello accepted");
        }
        conn.hello = true;
        conn.version = *version;
        return Ok(());
    }
    if !conn.hello && !hello_pending {
        // Any refusal will do (slow requests meet the in-flight quota before the state).
        return match err_code {
            Some(_) => Ok(()),
            None => bad("before hello"),
        };
    }
    // A session that is no engine (and is not becoming one: no `EngineAttach` unanswered;
    // engine requests may run on the workers, in any order) has its engine requests refused
    // as out of order (or first, if they run on a worker, for the in-flight quota).
    let engine_attach_pending = pending(|r| matches!(r, Request::EngineAttach { .. }));
    let maybe_engine = conn.engine.is_some() || engine_attach_pending;
    if let (
        Request::EngineFault { .. } | Request::EngineWrite { .. } | Request::EngineRead { .. },
        Some(code),
    ) = (req, err_code)
    {
        if !maybe_engine
            && !matches!(
                code,
                ErrorCode::OutOfOrder | ErrorCode::QuotaExceeded | ErrorCode::ShuttingDown
            )
        {
            return bad("an engine request of a session that is no engine, not refused OutOfOrder");
        }
    }
    // A token no grant handed out, or one revoked by its mirror's detach, is no grant (unless
    // the session's state or the in-flight quota refuses first).
    if let (Request::EngineAttach { token, .. }, Some(code)) = (req, err_code) {
        let owner = ctx.tokens.lock().unwrap().owner(*token);
        let no_grant = matches!(owner, None | Some(TokenOwner::Script(_, true)));
        if *token != 0
            && no_grant
            && !matches!(
                code,
                ErrorCode::NoSuchGrant
                    | ErrorCode::OutOfOrder
                    | ErrorCode::QuotaExceeded
                    | ErrorCode::ShuttingDown
            )
        {
            return bad("a token that is no (live) grant was not refused NoSuchGrant");
        }
    }
    if err_code.is_some() {
        return Ok(());
    }
    let matches = matches!(
        (req, resp),
        (Request::Bind { .. }, Response::Bound { .. })
            | (Request::Attach { .. }, Response::Attached { .. })
            | (Request::Detach { .. }, Response::Detached)
            | (Request::Read { .. }, Response::Data { .. })
            | (Request::Populate { .. }, Response::Populated { .. })
            | (Request::ClientStats, Response::Counters { .. })
            | (Request::Status, Response::StatusReport { .. })
            | (Request::ListClients, Response::Clients { .. })
            | (Request::ListMirrors { .. }, Response::Mirrors { .. })
            | (Request::Peek { .. }, Response::Data { .. })
            | (Request::Invalidate { .. }, Response::Invalidated { .. })
            | (Request::Trace { .. }, Response::TraceStarted)
            | (
                Request::Sync { .. } | Request::SyncPid { .. },
                Response::Synced { .. }
            )
            | (Request::Grant { .. }, Response::Granted { .. })
            | (
                Request::EngineAttach { .. },
                Response::EngineAttached { .. }
            )
            | (Request::EngineFault { .. }, Response::Populated { .. })
            | (Request::EngineWrite { .. }, Response::Written { .. })
            | (Request::ListEngines { .. }, Response::Engines { .. })
            | (Request::EngineRead { .. }, Response::Data { .. })
            | (Request::MonitorSetup, Response::MonitorReady { .. })
            | (Request::Monitor { .. }, Response::Monitored { .. })
            | (Request::Unmonitor { .. }, Response::Unmonitored)
    );
    if !matches {
        return bad("an answer of the wrong type");
    }
    let needs_bind = matches!(
        req,
        Request::Attach { .. }
            | Request::Detach { .. }
            | Request::Read { .. }
            | Request::Populate { .. }
            | Request::Sync { .. }
            | Request::ListMirrors { pid: 0 }
            | Request::Grant { .. }
            | Request::MonitorSetup
            | Request::Monitor { .. }
            | Request::Unmonitor { .. }
    );
    if needs_bind && !conn.bound && !bind_pending {
        return bad("before bind");
    }
    // A mirror id the answer is about: this session's (then its range), or unknown.
    let known = |conn: &Conn, id: u64| -> Result<Option<(u64, u64, u64)>, String> {
        if let Some(m) = conn.mirrors.iter().find(|m| m.0 == id) {
            return Ok(Some(*m));
        }
        match conn.gone.iter().find(|g| g.0 == id) {
            // Sent before the detach: requests run concurrently on the workers, so it may
            // have been served before the detach took the mirror away, or after.
            Some(&(_, detach)) if p.rid < detach => return Ok(None),
            Some(_) => return Err(format!("mirror {id} was detached")),
            None => {}
        }
        if attach_pending {
            return Ok(None);
        }
        Err(format!("mirror {id} was never attached by this session"))
    };
    let me = ctx.me;
    if !ctx.privileged {
        let other = match req {
            Request::ListClients | Request::Peek { .. } => true,
            Request::Invalidate { pid, .. }
            | Request::SyncPid { pid }
            | Request::Trace { pid, .. } => *pid != me,
            Request::ListMirrors { pid } => *pid != 0 && *pid != me,
            // Of every client (0), or of another one.
            Request::ListEngines { pid } => *pid != me,
            // By pid: root's and the daemon's user's only, even of its own process.
            Request::EngineAttach { token: 0, .. } => true,
            _ => false,
        };
        if other {
            return bad("an unprivileged client acted on another client");
        }
        if let Response::Mirrors { mirrors } = resp {
            if mirrors.iter().any(|m| m.pid != me) {
                return bad("an unprivileged client saw another client's mirrors");
            }
        }
        // The daemon's built-in engines (no client: they serve all) are listed to anyone.
        if let Response::Engines { engines } = resp {
            if engines
                .iter()
                .any(|e| e.client_pid != me && e.state != "built-in")
            {
                return bad("an unprivileged client saw another client's engines");
            }
        }
    }
    match (req, resp) {
        (Request::Bind { .. }, Response::Bound { .. }) => {
            if conn.bound {
                return bad("a second bind");
            }
            let uffd_ok = matches!(
                p.fds.first(),
                Some(Fd::Uffd | Fd::UffdApi | Fd::UffdForeign | Fd::UffdDead)
            );
            // Opened for reading: an `O_PATH` fd proves nothing (the daemon says `BadFd`).
            let mem_ok = matches!(p.fds.get(1), Some(Fd::Mem | Fd::MemRo));
            // Protocol 1: then pagemap, optionally; from protocol 2 on: maps, then pagemap
            // optionally.
            let pagemap_ok = if conn.version >= 2 {
                matches!(p.fds.get(2), Some(Fd::Maps))
                    && matches!(p.fds.get(3), None | Some(Fd::Pagemap))
            } else {
                matches!(p.fds.get(2), None | Some(Fd::Pagemap))
            };
            if !(uffd_ok && mem_ok && pagemap_ok) {
                return bad(
                    "bind accepted fds that are not the client's own uffd, mem, (maps) and \
                     pagemap",
                );
            }
            if matches!(p.fds.first(), Some(Fd::UffdForeign | Fd::UffdDead)) {
                out.foreign_uffd_bound += 1;
            }
            if conn.engine.is_some() {
                return bad("an engine's session bound: it became a client too");
            }
            conn.bound = true;
        }
        (Request::Grant { mirror_id }, Response::Granted { token }) => {
            if *token == 0 {
                return bad("a grant of token 0 (which attaches by pid)");
            }
            known(conn, *mirror_id).map_err(|e| format!("grant: {e}: answered Granted"))?;
            ctx.granted(*token, conn.serial, *mirror_id);
        }
        (
            Request::EngineAttach {
                token,
                pid,
                mirror_id,
            },
            Response::EngineAttached {
                mirror_id: got,
                addr,
                len,
                shadow_bytes,
                page_size,
                ..
            },
        ) => {
            if conn.bound || conn.engine.is_some() {
                return bad(if conn.bound {
                    "a bound session became an engine too"
                } else {
                    "an engine's session attached a second time"
                });
            }
            if u64::from(*page_size) != P
                || *len == 0
                || len % P != 0
                || addr % P != 0
                || addr.checked_add(*len).is_none()
                || *shadow_bytes == 0
                || shadow_bytes % P != 0
            {
                return bad("an engine's geometry that is not whole pages");
            }
            let own = if *token == 0 {
                if got != mirror_id {
                    return bad("attached by pid to another mirror than asked");
                }
                *pid == ctx.me
            } else {
                let owner = ctx.tokens.lock().unwrap().owner(*token);
                match owner {
                    None => return bad("a token no grant handed out was accepted"),
                    Some(TokenOwner::Script(_, true)) => {
                        return bad("a grant revoked by its mirror's detach was accepted");
                    }
                    Some(TokenOwner::Script(m, false)) => {
                        if m != *got {
                            return bad(&format!(
                                "attached to another mirror than its grant's {m}"
                            ));
                        }
                        true
                    }
                    Some(TokenOwner::Earlier | TokenOwner::Held) => false,
                    Some(TokenOwner::Worker(uid)) => {
                        if uid != ctx.uid && !ctx.privileged {
                            return bad(&format!(
                                "uid {} attached with a grant of uid {uid}",
                                ctx.uid
                            ));
                        }
                        false
                    }
                }
            };
            check_engine_fds(ctx, fds).map_err(|e| format!("{e}: answered {}", short(resp)))?;
            conn.engine = Some(EngineView {
                addr: *addr,
                len: *len,
                own,
            });
            conn.ring = fds.get(3).and_then(|f| Ring::map(f.as_fd()));
        }
        (Request::EngineFault { offset, len }, Response::Populated { pages }) => {
            let Some(e) = conn.engine else {
                if engine_attach_pending {
                    return Ok(());
                }
                return bad("an engine fault of a session that is no engine");
            };
            if offset.checked_add(*len).is_none_or(|end| end > e.len) {
                return bad("an engine fault outside the engine's mirror");
            }
            if *pages > e.len / P {
                return bad("more pages populated than the engine's mirror has");
            }
        }
        (Request::EngineRead { offset, len }, Response::Data { bytes }) => {
            let Some(e) = conn.engine else {
                if engine_attach_pending {
                    return Ok(());
                }
                return bad("an engine read of a session that is no engine");
            };
            if bytes.len() != *len as usize {
                return bad(&format!("an engine read of {len} bytes"));
            }
            if offset
                .checked_add(u64::from(*len))
                .is_none_or(|end| end > e.len)
            {
                return bad("an engine read outside the engine's mirror");
            }
            let start = e.addr.wrapping_add(*offset);
            if e.own && scratch.holds(start, u64::from(*len)) {
                let first = start - scratch.rw;
                if let Some(i) =
                    (0..bytes.len()).find(|i| bytes[*i] != pattern(ctx.salt, first + *i as u64))
                {
                    return bad(&format!(
                        "an engine read returned bytes that are not its client's (offset {i})"
                    ));
                }
            }
        }
        (Request::EngineWrite { offset, bytes }, Response::Written { len }) => {
            let Some(e) = conn.engine else {
                if engine_attach_pending {
                    return Ok(());
                }
                return bad("a device write of a session that is no engine");
            };
            if *len as usize > bytes.len() {
                return bad("more bytes written than sent");
            }
            if offset
                .checked_add(bytes.len() as u64)
                .is_none_or(|end| end > e.len)
            {
                return bad("a device write outside the engine's mirror");
            }
        }
        (Request::Attach { addr, len, .. }, Response::Attached { mirror_id }) => {
            // Detached already: a detach sent before this answer came ran after the attach
            // on another worker, and was answered first.
            if let Some(i) = conn.detached_early.iter().position(|m| m == mirror_id) {
                conn.detached_early.swap_remove(i);
                return Ok(());
            }
            if conn.mirrors.iter().any(|m| m.0 == *mirror_id)
                || conn.gone.iter().any(|g| g.0 == *mirror_id)
            {
                return bad("a mirror id handed out twice");
            }
            conn.mirrors.push((*mirror_id, *addr, *len));
        }
        (Request::Detach { mirror_id }, Response::Detached) => {
            if known(conn, *mirror_id)
                .map_err(|e| format!("detach: {e}: answered Detached"))?
                .is_none()
            {
                conn.detached_early.push(*mirror_id);
            }
            conn.mirrors.retain(|m| m.0 != *mirror_id);
            conn.gone.push((*mirror_id, p.rid));
            ctx.detached(conn.serial, *mirror_id);
        }
        (
            Request::Read {
                mirror_id,
                offset,
                len,
            },
            Response::Data { bytes },
        ) => {
            if bytes.len() != *len as usize {
                return bad(&format!("a read of {len} bytes"));
            }
            let Some(m) =
                known(conn, *mirror_id).map_err(|e| format!("read: {e}: answered Data"))?
            else {
                return Ok(());
            };
            if offset.checked_add(u64::from(*len)).is_none_or(|e| e > m.2) {
                return bad("a read beyond the end of its mirror");
            }
            let start = m.1.wrapping_add(*offset);
            if scratch.holds(start, u64::from(*len)) {
                let first = start - scratch.rw;
                if let Some(i) =
                    (0..bytes.len()).find(|i| bytes[*i] != pattern(ctx.salt, first + *i as u64))
                {
                    return bad(&format!(
                        "a read returned bytes that are not the client's (offset {i})"
                    ));
                }
            }
        }
        (Request::Peek { pid, addr, len }, Response::Data { bytes }) => {
            if bytes.len() != *len as usize {
                return bad(&format!("a peek of {len} bytes"));
            }
            if *pid == ctx.me && scratch.holds(*addr, u64::from(*len)) {
                let first = addr - scratch.rw;
                if (0..bytes.len()).any(|i| bytes[i] != pattern(ctx.salt, first + i as u64)) {
                    return bad("a peek returned bytes that are not the client's");
                }
            }
        }
        (Request::Populate { mirror_id, .. }, Response::Populated { pages }) => {
            let m = known(conn, *mirror_id)
                .map_err(|e| format!("populate: {e}: answered Populated"))?;
            if m.is_some_and(|m| *pages > m.2 / P) {
                return bad("more pages populated than the mirror has");
            }
        }
        (Request::ListMirrors { pid: 0 }, Response::Mirrors { mirrors }) if !attach_pending => {
            if let Some(x) = mirrors
                .iter()
                .find(|x| !conn.mirrors.iter().any(|m| m.0 == x.id))
            {
                return bad(&format!("lists mirror {} this session does not have", x.id));
            }
        }
        _ => {}
    }
    Ok(())
}

/// The name of a response's variant.
fn variant(r: &Response) -> &'static str {
    match r {
        Response::HelloAck { .. } => "HelloAck",
        Response::Bound { .. } => "Bound",
        Response::Attached { .. } => "Attached",
        Response::Detached => "Detached",
        Response::Data { .. } => "Data",
        Response::Populated { .. } => "Populated",
        Response::Counters { .. } => "Counters",
        Response::Clients { .. } => "Clients",
        Response::Mirrors { .. } => "Mirrors",
        Response::StatusReport { .. } => "StatusReport",
        Response::Invalidated { .. } => "Invalidated",
        Response::TraceStarted => "TraceStarted",
        Response::TraceEvent { .. } => "TraceEvent",
        Response::TraceAck { .. } => "TraceAck",
        Response::Synced { .. } => "Synced",
        Response::Granted { .. } => "Granted",
        Response::EngineAttached { .. } => "EngineAttached",
        Response::Written { .. } => "Written",
        Response::Engines { .. } => "Engines",
        Response::MonitorReady { .. } => "MonitorReady",
        Response::Monitored { .. } => "Monitored",
        Response::Unmonitored => "Unmonitored",
        Response::Error { .. } => "Error",
    }
}

/// A response, short enough for a message.
fn short(r: &Response) -> String {
    let s = match r {
        Response::Data { bytes } => format!("Data({} bytes)", bytes.len()),
        Response::StatusReport { .. } => "StatusReport".into(),
        r => format!("{r:?}"),
    };
    s.chars().take(200).collect()
}

/// A session of the worker that lives through an epoch (`hold` to `release`): a client with
/// a mirror of memory of its own and a few grants of it, published, so that the other
/// workers' engines meet live grants of every user (a script's grants live only as long as
/// the script, a few milliseconds). Its memory is never changed, so nothing waits for the
/// engines that attach to it.
struct Holder {
    _mirror: memshadow::Mirror,
    _client: memshadow::Client,
}

/// Memory a holder mirrors (the worker's for its whole life: a mirror must not outlive it).
const HOLDER_PAGES: usize = 4;

impl Holder {
    fn open(ctx: &Ctx, mem: &mut [u8]) -> Result<Holder, String> {
        let client = memshadow::Client::connect_to(&ctx.socket).map_err(|e| e.to_string())?;
        let mirror = client
            .attach(mem.as_ptr(), mem.len())
            .map_err(|e| e.to_string())?;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(mirror.grant().map_err(|e| e.to_string())?);
        }
        let mut b = ctx.tokens.lock().unwrap();
        b.held = held;
        ctx.publish(&b);
        Ok(Holder {
            _mirror: mirror,
            _client: client,
        })
    }
}

/// The worker process: reads `run K OTHER_PID HEX_SCRIPT` lines, answers `@@done K ...`;
/// `hold` and `release` open and close its [`Holder`] (`@@held`, `@@released`).
fn worker_main(socket: &str) {
    let env_i32 = |k: &str| -> i32 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let handshake = Duration::from_secs(
        std::env::var("MEMSHADOW_FUZZ_HANDSHAKE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let (sibling, sibling_sock) = start_sibling();
    let uid = nix::unistd::getuid().as_raw();
    let mut ctx = Ctx {
        socket: PathBuf::from(socket),
        me: std::process::id() as i32,
        uid,
        privileged: uid == 0
            || uid.to_string() == std::env::var("MEMSHADOW_FUZZ_DAEMON_UID").unwrap_or_default(),
        bystander: std::env::var_os("MEMSHADOW_FUZZ_BYSTANDER").is_some(),
        clean: false,
        daemon_handshake: Duration::from_millis(
            std::env::var("MEMSHADOW_FUZZ_DAEMON_HANDSHAKE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DAEMON_HANDSHAKE.as_millis() as u64),
        ),
        daemon: env_i32("MEMSHADOW_FUZZ_DAEMON_PID"),
        parent: env_i32("MEMSHADOW_FUZZ_PARENT_PID"),
        other: 0,
        salt: env_i32("MEMSHADOW_FUZZ_SALT") as u8,
        sibling,
        sibling_sock,
        tokens: Mutex::default(),
        token_dir: std::env::var_os("MEMSHADOW_FUZZ_TOKENS").map(PathBuf::from),
        enabled: Enabled::from_env(),
    };
    let stdout = std::io::stdout();
    println!("@@ready pid={} uid={}", ctx.me, ctx.uid);
    let _ = stdout.lock().flush();
    let mut holder_mem = vec![0x4du8; HOLDER_PAGES * P as usize + P as usize];
    let off = holder_mem.as_ptr().align_offset(P as usize);
    let mut holder: Option<Holder> = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.first().copied() {
            Some("hold") => {
                let mem = &mut holder_mem[off..off + HOLDER_PAGES * P as usize];
                let r = Holder::open(&ctx, mem).map(|h| holder = Some(h));
                println!("@@held {}", r.err().unwrap_or_default());
                let _ = stdout.lock().flush();
                continue;
            }
            Some("release") => {
                holder = None;
                let mut b = ctx.tokens.lock().unwrap();
                b.held.clear();
                ctx.publish(&b);
                println!("@@released");
                let _ = stdout.lock().flush();
                continue;
            }
            _ => {}
        }
        if w.first() != Some(&"run") || w.len() != 4 {
            break;
        }
        ctx.other = w[2].parse().unwrap_or(0);
        let text = String::from_utf8(unhex(w[3]).unwrap()).unwrap();
        let out = match Script::parse(&text) {
            Ok(s) => {
                ctx.clean = s.clean || ctx.bystander;
                run_script(&ctx, &s, handshake)
            }
            Err(e) => Outcome {
                violations: vec![format!("unparsable script: {e}")],
                ..Outcome::default()
            },
        };
        println!("@@done {} {}", w[1], out.encode());
        let _ = stdout.lock().flush();
    }
}

/// Not a test: the entry point of the worker processes the fuzz test starts (it does
/// nothing unless `MEMSHADOW_FUZZ_WORKER` is set).
#[test]
fn fuzz_worker_process() {
    if let Ok(socket) = std::env::var("MEMSHADOW_FUZZ_WORKER") {
        worker_main(&socket);
    }
}

// =======================================================================================
// The test: the daemon, the workers, the schedule and the checks.

/// A worker process as the test drives it.
struct Worker {
    index: usize,
    user: User,
    pid: i32,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_k: u64,
    dead: bool,
}

impl Worker {
    fn start(index: usize, user: User, d: &Daemon, daemon_args: &[String]) -> Worker {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "fuzz_worker_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env("MEMSHADOW_FUZZ_WORKER", d.socket())
        .env("MEMSHADOW_FUZZ_DAEMON_PID", d.pid().to_string())
        .env("MEMSHADOW_FUZZ_PARENT_PID", std::process::id().to_string())
        .env(
            "MEMSHADOW_FUZZ_DAEMON_UID",
            nix::unistd::geteuid().to_string(),
        )
        .env(
            "MEMSHADOW_FUZZ_DAEMON_HANDSHAKE_MS",
            handshake_ms(daemon_args).to_string(),
        )
        .env("MEMSHADOW_FUZZ_SALT", (index * 37 + 11).to_string())
        .env("MEMSHADOW_FUZZ_TOKENS", token_dir(d))
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        match user {
            // std drops the supplementary groups (setgroups(0)) when root sets a uid.
            User::Nobody => {
                cmd.uid(NOBODY).gid(NOBODY);
            }
            User::Bystander => {
                cmd.uid(BYSTANDER)
                    .gid(BYSTANDER)
                    .env("MEMSHADOW_FUZZ_BYSTANDER", "1");
            }
            User::Root | User::Any => {}
        }
        let mut child = cmd.spawn().expect("spawn a fuzz worker");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut w = Worker {
            index,
            user,
            pid: child.id() as i32,
            child,
            stdin,
            stdout,
            next_k: 0,
            dead: false,
        };
        let line = w.read_line(Duration::from_secs(30)).unwrap_or_else(|e| {
            panic!(
                "fuzz worker {index} ({user:?}) did not start: {e} (a worker as nobody needs \
                 to reach {} and the daemon's socket)",
                std::env::current_exe().unwrap().display()
            )
        });
        assert!(line.starts_with("@@ready"), "{line}");
        w
    }

    /// The next `@@` line within `limit`.
    fn read_line(&mut self, limit: Duration) -> Result<String, String> {
        // `None`: no `@@` line yet (each try waits in poll(2) for up to 100 ms for input).
        let line = || -> Option<Result<String, String>> {
            if !self.stdout.buffer().contains(&b'\n') {
                let fd = self.stdout.get_ref().as_fd();
                let mut p = [PollFd::new(fd, PollFlags::POLLIN)];
                if poll(&mut p, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
                    return None;
                }
            }
            let mut line = String::new();
            match self.stdout.read_line(&mut line) {
                Ok(0) => Some(Err("the worker exited".into())),
                Ok(_) if line.starts_with("@@") => Some(Ok(line.trim_end().to_owned())),
                Ok(_) => None,
                Err(e) => Some(Err(e.to_string())),
            }
        };
        try_wait_until_every(limit, Duration::ZERO, line)
            .map_err(|_| format!("no answer within {limit:?}"))?
    }

    /// Opens (`hold`) or closes (`release`) the worker's holder session.
    fn holder(&mut self, cmd: &str) -> Result<String, String> {
        writeln!(self.stdin, "{cmd}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("the worker is gone: {e}"))?;
        self.read_line(SCRIPT_DEADLINE)
    }

    /// Runs `script` on this worker; `other` is another client's pid.
    fn run(&mut self, k: u64, other: i32, script: &Script) -> Result<Outcome, String> {
        let text = script.print();
        writeln!(self.stdin, "run {k} {other} {}", hex(text.as_bytes()))
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("the worker is gone: {e}"))?;
        let line = self.read_line(SCRIPT_DEADLINE)?;
        let rest = line
            .strip_prefix(&format!("@@done {k} "))
            .ok_or(format!("unexpected worker line {line}"))?;
        Ok(Outcome::decode(rest))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the workers publish their grants for one another: in the daemon's directory,
/// writable by every worker's user (sticky, so each replaces only its own file).
fn token_dir(d: &Daemon) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = d.dir().path().join("tokens");
    if !dir.exists() {
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    dir
}

/// The daemon's handshake timeout with these arguments, ms.
fn handshake_ms(daemon_args: &[String]) -> u64 {
    daemon_args
        .windows(2)
        .find(|w| w[0] == "--handshake-timeout-ms")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(DAEMON_HANDSHAKE.as_millis() as u64)
}

/// The daemon's open fds (targets) and threads.
fn fd_targets(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    std::fs::read_link(e.path())
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `status` of the daemon through the client library, within [`STATUS_DEADLINE`] (the
/// library has no timeouts, so it runs on a thread that may be abandoned).
fn timed_status(socket: &Path) -> Result<(BTreeMap<String, u64>, Duration), String> {
    let (tx, rx) = mpsc::channel();
    let path = socket.to_owned();
    let t = Instant::now();
    std::thread::spawn(move || {
        let r = memshadow::Client::connect_control(Some(&path))
            .and_then(|c| c.status())
            .map(|s| s.counters.into_iter().collect::<BTreeMap<_, _>>())
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(STATUS_DEADLINE) {
        Ok(Ok(c)) => Ok((c, t.elapsed())),
        Ok(Err(e)) => Err(format!("status failed: {e}")),
        Err(_) => Err(format!("status did not answer within {STATUS_DEADLINE:?}")),
    }
}

/// The daemon at rest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rest {
    fds: Vec<String>,
    threads: usize,
}

/// Waits (polling) until the daemon is back at `base`: no more fds and threads, no shadow
/// slot in use, no client but the one asking.
fn settle(d: &Daemon, base: &Rest) -> Result<Rest, String> {
    // `Err`: not yet, and what was seen; `Ok(Err)`: it never will (the daemon died, or
    // does not answer).
    let at_rest = || -> Result<Result<Rest, String>, String> {
        if !alive(d.pid()) {
            return Ok(Err("the daemon died".into()));
        }
        let fds = fd_targets(d.pid());
        let threads = d.threads();
        let c = match timed_status(d.socket()) {
            Ok((c, _)) => c,
            Err(e) => return Ok(Err(e)),
        };
        let slots = c.get("shadow.slots_in_use").copied().unwrap_or(u64::MAX);
        // The status connection itself is a client.
        let clients = c.get("server.clients").copied().unwrap_or(u64::MAX);
        let now = Rest { fds, threads };
        if now.fds.len() <= base.fds.len() && threads <= base.threads && slots == 0 && clients <= 1
        {
            return Ok(Ok(now));
        }
        {
            let mut extra = now.fds.clone();
            for f in &base.fds {
                if let Some(i) = extra.iter().position(|x| x == f) {
                    extra.remove(i);
                }
            }
            let mut by: BTreeMap<String, usize> = BTreeMap::new();
            for f in extra {
                let key = if f.starts_with("socket:") {
                    "socket:[..]".to_owned()
                } else if f.starts_with("pipe:") {
                    "pipe:[..]".to_owned()
                } else {
                    f
                };
                *by.entry(key).or_default() += 1;
            }
            Err(format!(
                "fds {} (baseline {}; extra {by:?}), threads {} (baseline {}), \
                 shadow.slots_in_use {slots}, server.clients {clients} (1 is the status \
                 connection)",
                now.fds.len(),
                base.fds.len(),
                threads,
                base.threads
            ))
        }
    };
    try_wait_until_every(SETTLE_DEADLINE, Duration::from_millis(20), at_rest).map_err(|t| {
        format!(
            "after every session closed, the daemon did not come back to its baseline \
             within {SETTLE_DEADLINE:?}: {}",
            t.last.unwrap_or_default()
        )
    })?
}

/// The daemon at rest before fuzzing: once no client but the asking one is left and no
/// shadow slot is in use, the fewest fds and threads seen over a few samples.
fn baseline(d: &Daemon) -> Rest {
    d.wait_until("the daemon to come to rest", SETTLE_DEADLINE, || {
        let (c, _) = timed_status(d.socket()).expect("status before fuzzing");
        if c.get("server.clients") <= Some(&1) && c.get("shadow.slots_in_use") == Some(&0) {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    });
    let mut best: Option<Rest> = None;
    for _ in 0..5 {
        let now = Rest {
            fds: fd_targets(d.pid()),
            threads: d.threads(),
        };
        best = Some(match best {
            Some(b) if b.fds.len() <= now.fds.len() => Rest {
                threads: b.threads.min(now.threads),
                ..b
            },
            Some(b) => Rest {
                threads: b.threads.min(now.threads),
                ..now
            },
            None => now,
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    best.unwrap()
}

/// A well-behaved client can still connect, attach and read (within a deadline).
fn good_client_works(d: &Daemon) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let socket = d.socket().to_owned();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(move || {
            let mut c = TestClient::start(&socket);
            c.expect_ok("map a 4");
            c.expect_ok("fill a 7");
            c.expect_ok("attach a");
            c.expect_ok("read a 0 16384")
        });
        let _ = tx.send(r.map_err(|_| "the test client failed".to_owned()));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(a)) if a == "uniform=7" => Ok(()),
        Ok(Ok(a)) => Err(format!("a well-behaved client read {a}, not uniform=7")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("a well-behaved client did not finish within 30 s".into()),
    }
}

/// Malformed frames each user's scripts were let send lately (counted as they start).
#[derive(Debug, Default)]
struct Budget(BTreeMap<&'static str, VecDeque<(Instant, u64)>>);

impl Budget {
    /// Those of `user` within the last [`BAR_WINDOW`].
    fn used(&mut self, user: User) -> u64 {
        let q = self.0.entry(user.name()).or_default();
        while q.front().is_some_and(|(t, _)| t.elapsed() > BAR_WINDOW) {
            q.pop_front();
        }
        q.iter().map(|(_, n)| n).sum()
    }

    /// Lets a script of `user` with `n` malformed frames send them, if they fit in
    /// [`MALFORMED_BUDGET`] (or, more than it, if none were sent lately).
    fn take(&mut self, user: User, n: u64) -> bool {
        let used = self.used(user);
        let fits = n == 0 || used + n <= MALFORMED_BUDGET || used == 0;
        if fits && n > 0 {
            self.0
                .entry(user.name())
                .or_default()
                .push_back((Instant::now(), n));
        }
        fits
    }
}

/// Totals of the run.
#[derive(Debug, Default)]
struct Totals {
    sessions: u64,
    by_user: BTreeMap<&'static str, u64>,
    /// Per user: scripts that met the abuse bar, connections made, refused, refused by
    /// the bar, and time waiting for it to lift.
    met_bar: BTreeMap<&'static str, u64>,
    /// Per user: `clean` scripts, malformed frames sent, and not sent (clean scripts).
    clean: BTreeMap<&'static str, u64>,
    malformed: BTreeMap<&'static str, u64>,
    skipped: BTreeMap<&'static str, u64>,
    connects: BTreeMap<&'static str, u64>,
    refused: BTreeMap<&'static str, u64>,
    barred: BTreeMap<&'static str, u64>,
    bar_wait: BTreeMap<&'static str, Duration>,
    sent: u64,
    replies: u64,
    events: u64,
    closes: u64,
    foreign_uffd_bound: u64,
    errors: BTreeMap<u16, u64>,
    ok: BTreeMap<String, u64>,
    max_status: Duration,
}

impl Totals {
    fn add(&mut self, user: User, clean: bool, o: &Outcome) {
        self.sessions += 1;
        let u = user.name();
        *self.by_user.entry(u).or_default() += 1;
        *self.clean.entry(u).or_default() += u64::from(clean);
        *self.malformed.entry(u).or_default() += o.malformed;
        *self.skipped.entry(u).or_default() += o.skipped;
        *self.met_bar.entry(u).or_default() += u64::from(o.barred > 0);
        *self.connects.entry(u).or_default() += o.connects;
        *self.refused.entry(u).or_default() += o.refused;
        *self.barred.entry(u).or_default() += o.barred;
        *self.bar_wait.entry(u).or_default() += Duration::from_millis(o.bar_wait_ms);
        self.sent += o.sent;
        self.replies += o.replies;
        self.events += o.events;
        self.closes += o.closes;
        self.foreign_uffd_bound += o.foreign_uffd_bound;
        for (c, n) in &o.errors {
            *self.errors.entry(*c).or_default() += n;
        }
        for (c, n) in &o.ok {
            *self.ok.entry(c.clone()).or_default() += n;
        }
    }
}

fn error_name(c: u16) -> String {
    let s = format!("{:?}", ErrorCode::from_code(c));
    s.split('(').next().unwrap_or(&s).to_owned()
}

/// Where failing inputs go: `target/memshadow-fuzz/`.
fn finding_dir() -> PathBuf {
    let d = bin_dir().parent().unwrap().join("memshadow-fuzz");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `scripts` (one session each, run in order on replay) with `why` as a comment;
/// returns the path.
fn write_finding(name: &str, why: &str, daemon_args: &[String], scripts: &[&Script]) -> PathBuf {
    let path = finding_dir().join(format!("{name}.msf"));
    let mut text = String::new();
    for l in why.lines() {
        let _ = writeln!(text, "# {l}");
    }
    let _ = writeln!(
        text,
        "# replay: MEMSHADOW_FUZZ_REPLAY={} cargo test -p memshadow-tests --test fuzz",
        path.display()
    );
    for (i, s) in scripts.iter().enumerate() {
        if i > 0 {
            text.push_str("session\n");
        }
        let mut s = (*s).clone();
        s.daemon = daemon_args.to_vec();
        text.push_str(&s.print());
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// A replay file: sessions separated by `session` lines.
fn parse_replay(text: &str) -> Vec<Script> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines().chain(std::iter::once("session")) {
        if line.trim() == "session" {
            if !cur.trim().is_empty() {
                out.push(Script::parse(&cur).unwrap_or_else(|e| panic!("replay file: {e}")));
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    out
}

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{k} must be a number, not {v:?}"))
    })
}

#[test]
fn type_names_match_the_protocol() {
    let reqs = [
        Request::Hello {
            min_version: 1,
            max_version: 1,
            name: String::new(),
        },
        Request::Bind {
            flags: proto::BindFlags::empty(),
        },
        Request::Attach {
            addr: 0,
            len: 0,
            policy: proto::AttachPolicy::Default,
        },
        Request::Detach { mirror_id: 0 },
        Request::Read {
            mirror_id: 0,
            offset: 0,
            len: 0,
        },
        Request::Populate {
            mirror_id: 0,
            offset: 0,
            len: 0,
        },
        Request::ClientStats,
        Request::Status,
        Request::ListClients,
        Request::ListMirrors { pid: 0 },
        Request::Peek {
            pid: 0,
            addr: 0,
            len: 0,
        },
        Request::Invalidate {
            pid: 0,
            addr: 0,
            len: 0,
            event: proto::EventKind::Unmap,
            flags: proto::InvalidateFlags::empty(),
        },
        Request::Trace { pid: 0, events: 0 },
        Request::Sync { mirror_id: 0 },
        Request::SyncPid { pid: 0 },
        Request::Grant { mirror_id: 0 },
        Request::EngineAttach {
            token: 0,
            pid: 0,
            mirror_id: 0,
        },
        Request::EngineFault { offset: 0, len: 0 },
        Request::EngineWrite {
            offset: 0,
            bytes: Vec::new(),
        },
        Request::ListEngines { pid: 0 },
        Request::EngineRead { offset: 0, len: 0 },
        Request::MonitorSetup,
        Request::Monitor { addr: 0, len: 0 },
        Request::Unmonitor { slot: 0, gen: 0 },
    ];
    assert_eq!(reqs.len(), TYPES.len());
    for (r, (_, t)) in reqs.iter().zip(TYPES) {
        assert_eq!(r.msg_type(), *t, "{r:?}");
    }
    let ev = Response::TraceEvent {
        dropped: 0,
        report: proto::InvalidationReport {
            pid: 0,
            event: proto::EventKind::Unmap,
            start: 0,
            end: 0,
            notifiers: 0,
            would_block: false,
            start_ns: 0,
            finish_ns: 0,
            flushes_queued: 0,
            flushes_coalesced: 0,
        },
    };
    assert_eq!(ev.msg_type(), TRACE_EVENT);
    let ack = Response::TraceAck {
        dropped: 0,
        ack: proto::AckReport {
            pid: 0,
            engine_id: 0,
            engine_pid: 0,
            seq: 0,
            wait_ns: 0,
            outcome: proto::AckOutcome::Gone,
        },
    };
    assert_eq!(ack.msg_type(), TRACE_ACK);
    let attached = Response::EngineAttached {
        engine_id: 0,
        mirror_id: 0,
        addr: 0,
        len: 0,
        shadow_bytes: 0,
        page_size: 0,
    };
    assert_eq!(attached.msg_type(), ENGINE_ATTACHED);
    // A token renders as the u128's little-endian bytes: two u64, low first.
    let t: u128 = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;
    let attach = Request::EngineAttach {
        token: t,
        pid: 7,
        mirror_id: 9,
    };
    let mut want = t.to_le_bytes().to_vec();
    want.extend_from_slice(&7i32.to_le_bytes());
    want.extend_from_slice(&9u64.to_le_bytes());
    assert_eq!(attach.encode_payload(), want);
    // A `write:OFF:N` token renders as EngineWrite's payload.
    let w = Request::EngineWrite {
        offset: 5,
        bytes: vec![1, 2],
    };
    let mut want = 5u64.to_le_bytes().to_vec();
    want.extend_from_slice(&2u32.to_le_bytes());
    want.extend_from_slice(&[1, 2]);
    assert_eq!(w.encode_payload(), want);
}

/// The corpus parses, prints back to itself, and its scripts stay within their
/// declared generators.
#[test]
fn the_corpus_parses_and_round_trips() {
    let corpus = load_corpus();
    assert!(corpus.len() >= 24, "only {} corpus files", corpus.len());
    for (name, s) in &corpus {
        assert_eq!(&Script::parse(&s.print()).unwrap(), s, "{name}");
        for u in s.uses() {
            assert!(
                s.needs.iter().any(|n| n == u),
                "{name} uses {u} without `needs {u}`"
            );
        }
        // What the budget of malformed frames counts.
        match name.as_str() {
            "01-good-session.msf" => assert_eq!(malformed_frames(s), 0, "{name}"),
            "34-abuse-bar.msf" => assert_eq!(malformed_frames(s), 40, "{name}"),
            _ => {}
        }
    }
    // Generated and mutated scripts print and parse back too.
    let en = Enabled(SWITCHABLE.iter().map(|s| (*s).to_owned()).collect());
    let scripts: Vec<Script> = corpus.into_iter().map(|(_, s)| s).collect();
    for k in 0..2000 {
        let s = script_for(7, (k % 4) as usize, k, User::Root, &scripts, &en);
        let back = Script::parse(&s.print()).unwrap();
        if let Some(i) = (0..s.steps.len()).find(|i| back.steps.get(*i) != Some(&s.steps[*i])) {
            panic!("{:?}\nprints as {}", s.steps[i], step_desc(&s.steps[i]));
        }
        assert_eq!(back, s, "{}", s.print());
    }
}

#[test]
fn fuzz_the_daemon() {
    let enabled = Enabled::from_env();
    let replay = std::env::var("MEMSHADOW_FUZZ_REPLAY").ok();
    let secs = env_u64("MEMSHADOW_FUZZ_SECS").unwrap_or(20);
    let max_sessions = env_u64("MEMSHADOW_FUZZ_SESSIONS").unwrap_or(u64::MAX);
    let seed = env_u64("MEMSHADOW_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let corpus: Vec<Script> = load_corpus().into_iter().map(|(_, s)| s).collect();
    let replay_scripts = replay.as_ref().map(|p| {
        // Relative paths: from the current directory, else from the workspace root (cargo
        // runs the test in tests/).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let path = [PathBuf::from(p), root.join(p)]
            .into_iter()
            .find(|c| c.exists())
            .unwrap_or_else(|| panic!("MEMSHADOW_FUZZ_REPLAY: no file {p}"));
        parse_replay(&std::fs::read_to_string(&path).unwrap())
    });
    let root = nix::unistd::geteuid().is_root();

    // The daemon: small quotas so their limits are reached; a short handshake timeout, else
    // the `silent` steps (each waits for it) take most of the fuzzing time.
    let mut daemon_args: Vec<String> = [
        "--quota-mirrors",
        "4",
        "--quota-shadow-mib",
        "4",
        "--reserved-shadow-mib",
        "8",
        "--quota-inflight",
        "2",
        "--shadow-mib",
        "64",
        "--clients-per-uid",
        "64",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Ok(extra) = std::env::var("MEMSHADOW_FUZZ_DAEMON_ARGS") {
        daemon_args.extend(extra.split_whitespace().map(str::to_owned));
    }
    if !daemon_args.iter().any(|a| a == "--handshake-timeout-ms") {
        daemon_args.extend(["--handshake-timeout-ms".to_owned(), "1000".to_owned()]);
    }
    // The fuzzer's engines never acknowledge a flush: each change of a mirror they read
    // waits this long for each of them (then evicts it).
    if !daemon_args.iter().any(|a| a == "--engine-ack-timeout-ms") {
        daemon_args.extend([
            "--engine-ack-timeout-ms".to_owned(),
            ENGINE_ACK_TIMEOUT_MS.to_owned(),
        ]);
    }
    if let Some(s) = replay_scripts.as_ref().and_then(|v| v.first()) {
        if !s.daemon.is_empty() {
            daemon_args = s.daemon.clone();
        }
    }
    let mut args = daemon_args.clone();
    if std::env::var("MEMSHADOW_LOG").is_err() {
        // Every malformed frame is a warning: keep the test's output readable.
        args.extend(["--log-level".to_owned(), "error".to_owned()]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start(&arg_refs);
    // Workers running as nobody must reach the socket.
    let _ = Command::new("chmod")
        .arg("755")
        .arg(d.socket().parent().unwrap())
        .status();
    println!(
        "fuzz: seed={seed} secs={secs} daemon args {daemon_args:?}; known-bug generators on: \
         {:?} (off: {:?}); replay {:?}",
        enabled.0,
        KNOWN_BUGS
            .iter()
            .filter(|(k, _)| !enabled.on(k))
            .map(|(k, _)| *k)
            .collect::<Vec<_>>(),
        replay
    );

    // The baseline: after one well-behaved client came and went (lazy set-up done).
    good_client_works(&d).expect("a well-behaved client before fuzzing");
    let base = baseline(&d);

    let users: Vec<User> = if root {
        let mut u = vec![User::Root; WORKERS_PER_USER];
        u.extend(vec![User::Nobody; WORKERS_PER_USER]);
        u.push(User::Bystander);
        u
    } else {
        println!("fuzz: not root, so every session runs as this user (no unprivileged half)");
        vec![User::Root; 2 * WORKERS_PER_USER]
    };
    let mut workers: Vec<Worker> = users
        .iter()
        .enumerate()
        .map(|(i, u)| Worker::start(i, *u, &d, &daemon_args))
        .collect();
    let pids: Vec<i32> = workers.iter().map(|w| w.pid).collect();
    let daemon_pid = d.pid();

    let findings: Mutex<Vec<PathBuf>> = Mutex::default();
    let totals: Mutex<Totals> = Mutex::default();
    let budget: Mutex<Budget> = Mutex::default();
    let mut fatal: Option<String> = None;
    let t0 = Instant::now();
    let end = Deadline::after(Duration::from_secs(secs));

    // One script on one worker, with its outcome recorded.
    let run_one = |w: &mut Worker, k: u64, s: &Script, why_prefix: &str| -> Option<String> {
        let other = pids[(w.index + 1 + (k as usize % (pids.len() - 1))) % pids.len()];
        let name = match &replay {
            Some(_) => format!("replay-w{}-{k}", w.index),
            None => format!("{seed}-w{}-{k}", w.index),
        };
        match w.run(k, other, s) {
            Ok(o) => {
                totals.lock().unwrap().add(w.user, s.clean, &o);
                if !o.violations.is_empty() {
                    let why = format!(
                        "{why_prefix}seed {seed}, worker {} ({:?}), script {k}:\n{}",
                        w.index,
                        w.user,
                        o.violations.join("\n")
                    );
                    let p = write_finding(&name, &why, &daemon_args, &[s]);
                    println!("fuzz: FINDING {} — {}", p.display(), o.violations[0]);
                    findings.lock().unwrap().push(p);
                }
                None
            }
            Err(e) => {
                w.dead = true;
                let why = format!(
                    "{why_prefix}seed {seed}, worker {} ({:?}), script {k}: the worker did not \
                     finish the script: {e} (the daemon is {})",
                    w.index,
                    w.user,
                    if alive(daemon_pid) {
                        "alive: a hang in the daemon, or a crash of the worker (see stderr)"
                    } else {
                        "dead"
                    }
                );
                let p = write_finding(&name, &why, &daemon_args, &[s]);
                println!("fuzz: FINDING {} — {why}", p.display());
                findings.lock().unwrap().push(p.clone());
                Some(why)
            }
        }
    };

    if let Some(scripts) = &replay_scripts {
        for s in scripts {
            let w = workers
                .iter_mut()
                .find(|w| s.user.runs_as(w.user))
                .expect("a worker of the script's user");
            let k = w.next_k;
            w.next_k += 1;
            if let Some(e) = run_one(w, k, s, "replay: ") {
                fatal = Some(e);
                break;
            }
        }
    } else {
        // Epochs: all workers run scripts until the epoch ends; then, with every session
        // closed, the daemon must come back to its baseline.
        let mut epoch = 0u64;
        while !end.passed() && fatal.is_none() {
            let epoch_end = Deadline::after(EPOCH).min(end);
            // Live grants of every worker for the epoch (a holder that cannot open is no
            // finding: the daemon may refuse it, e.g. for the user's malformed frames).
            for w in workers.iter_mut().filter(|w| !w.dead) {
                match w.holder("hold") {
                    Ok(l) if l == "@@held" => {}
                    Ok(l) => println!("fuzz: worker {} could not hold grants: {l}", w.index),
                    Err(e) => println!("fuzz: worker {} could not hold grants: {e}", w.index),
                }
            }
            let ran: Mutex<Vec<(usize, u64, Script)>> = Mutex::default();
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|sc| {
                for w in workers.iter_mut().filter(|w| !w.dead) {
                    let (corpus, enabled, ran, totals, stop, budget) =
                        (&corpus, &enabled, &ran, &totals, &stop, &budget);
                    let run_one = &run_one;
                    sc.spawn(move || {
                        while !epoch_end.passed()
                            && !stop.load(std::sync::atomic::Ordering::Relaxed)
                            && totals.lock().unwrap().sessions < max_sessions
                        {
                            let k = w.next_k;
                            w.next_k += 1;
                            let mut s = script_for(seed, w.index, k, w.user, corpus, enabled);
                            // An unprivileged user's scripts may send MALFORMED_BUDGET
                            // malformed frames per second: a script over that runs clean,
                            // so that the abuse bar only now and then refuses the user (and
                            // it is waited out then). The corpus as written (the first
                            // scripts) runs whole once: it waits for room instead.
                            if w.user == User::Nobody {
                                let first_pass = corpus_for(w.user, corpus, enabled).len();
                                let n = malformed_frames(&s);
                                let fits = || budget.lock().unwrap().take(w.user, n);
                                if !fits() {
                                    if (k as usize) >= first_pass {
                                        s.clean = true;
                                    } else {
                                        wait_until(
                                            "room in the malformed-frame budget",
                                            HANG_GUARD,
                                            fits,
                                        );
                                    }
                                }
                            }
                            ran.lock().unwrap().push((w.index, k, s.clone()));
                            if run_one(w, k, &s, "").is_some() {
                                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                                return;
                            }
                        }
                    });
                }
                // Meanwhile: the daemon lives and answers.
                while !epoch_end.passed() && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if !alive(d.pid()) {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                    match timed_status(d.socket()) {
                        Ok((_, t)) => {
                            let mut tt = totals.lock().unwrap();
                            tt.max_status = tt.max_status.max(t);
                        }
                        Err(e) => {
                            println!("fuzz: the daemon does not answer status under load: {e}");
                            stop.store(true, std::sync::atomic::Ordering::Relaxed);
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
            epoch += 1;
            for w in workers.iter_mut().filter(|w| !w.dead) {
                if let Err(e) = w.holder("release") {
                    println!("fuzz: worker {} did not release its grants: {e}", w.index);
                    w.dead = true;
                }
            }
            let ran = ran.into_inner().unwrap();
            if !alive(d.pid()) || workers.iter().any(|w| w.dead) || stop.into_inner() {
                let why = if alive(d.pid()) {
                    "the daemon stopped answering (or a worker died) during this epoch".to_owned()
                } else {
                    format!("the daemon died during this epoch ({})", d.wait())
                };
                let last: Vec<&Script> = ran.iter().rev().take(16).map(|r| &r.2).collect();
                let p = write_finding(
                    &format!("{seed}-epoch{epoch}-last"),
                    &format!("{why}; the last scripts run, newest first"),
                    &daemon_args,
                    &last,
                );
                println!("fuzz: FINDING {} — {why}", p.display());
                findings.lock().unwrap().push(p);
                fatal = Some(why);
                break;
            }
            if let Err(e) = settle(&d, &base) {
                // Leaked: find a script that leaks on its own, replaying this epoch's.
                let why = format!("epoch {epoch}: {e}");
                let all: Vec<&Script> = ran.iter().map(|r| &r.2).collect();
                let p = write_finding(
                    &format!("{seed}-epoch{epoch}-all"),
                    &format!("{why}\nevery script of the epoch, in order"),
                    &daemon_args,
                    &all,
                );
                println!("fuzz: FINDING {} — {why}", p.display());
                findings.lock().unwrap().push(p);
                if let Some(p) = isolate_leak(&d, &mut workers, &ran, &daemon_args, seed, &run_one)
                {
                    findings.lock().unwrap().push(p);
                }
                fatal = Some(why);
                break;
            }
        }
    }
    let fuzz_time = t0.elapsed();
    drop(workers);

    // The end: the daemon is alive, back at rest, and serves a well-behaved client.
    let mut failures: Vec<String> = Vec::new();
    if let Some(f) = fatal {
        failures.push(f);
    } else if !alive(d.pid()) {
        failures.push("the daemon died".into());
    } else {
        if let Err(e) = settle(&d, &base) {
            failures.push(e);
        }
        if let Err(e) = good_client_works(&d) {
            failures.push(format!("after fuzzing: {e}"));
        }
    }
    let t = totals.into_inner().unwrap();
    let errs: Vec<String> = t
        .errors
        .iter()
        .map(|(c, n)| format!("{}={n}", error_name(*c)))
        .collect();
    let findings = findings.into_inner().unwrap();
    println!(
        "fuzz summary: seed={seed} time={:.1}s sessions={} ({}) frames={} answers={} \
         trace-events={} closes={} ok[{}] errors[{}] foreign-uffd-binds={} max-status={}ms \
         daemon fds={} threads={} findings={}",
        fuzz_time.as_secs_f64(),
        t.sessions,
        t.by_user
            .iter()
            .map(|(u, n)| format!("{u} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        t.sent,
        t.replies,
        t.events,
        t.closes,
        t.ok.iter()
            .map(|(c, n)| format!("{c}={n}"))
            .collect::<Vec<_>>()
            .join(" "),
        errs.join(" "),
        t.foreign_uffd_bound,
        t.max_status.as_millis(),
        base.fds.len(),
        base.threads,
        findings.len()
    );
    // The abuse bar, per user: how much of the fuzzing it refused.
    for (u, n) in &t.by_user {
        let get = |m: &BTreeMap<&str, u64>| m.get(u).copied().unwrap_or(0);
        let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
        let (met, conns, refused, barred) = (
            get(&t.met_bar),
            get(&t.connects),
            get(&t.refused),
            get(&t.barred),
        );
        let (clean, malformed, skipped) = (get(&t.clean), get(&t.malformed), get(&t.skipped));
        let waited = t.bar_wait.get(u).copied().unwrap_or_default();
        let worker_time = fuzz_time * users.iter().filter(|x| x.name() == *u).count() as u32;
        println!(
            "fuzz bar: {u}: scripts {n} ({clean} clean), {} ran unrefused, {met} met the bar \
             ({:.1}%); malformed frames sent {malformed}, not sent {skipped}; connections \
             {conns}, refused {refused}, by the bar {barred} ({:.1}%); waited for the bar \
             {:.1}s of {:.1}s worker time ({:.1}%)",
            n - met,
            pct(met, *n),
            pct(barred, conns),
            waited.as_secs_f64(),
            worker_time.as_secs_f64(),
            100.0 * waited.as_secs_f64() / worker_time.as_secs_f64().max(0.001)
        );
    }
    for p in &findings {
        println!("fuzz: replay with MEMSHADOW_FUZZ_REPLAY={}", p.display());
    }
    assert!(
        failures.is_empty() && findings.is_empty(),
        "fuzzing found problems (seed {seed}):\n{}\nreplay files:\n{}",
        failures.join("\n"),
        findings
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// After a leak in an epoch: replays the epoch's scripts one at a time (each on the worker
/// that ran it) until one leaves the daemon above its new resting point; writes that one.
fn isolate_leak(
    d: &Daemon,
    workers: &mut [Worker],
    ran: &[(usize, u64, Script)],
    daemon_args: &[String],
    seed: u64,
    run_one: &dyn Fn(&mut Worker, u64, &Script, &str) -> Option<String>,
) -> Option<PathBuf> {
    let budget = Deadline::after(Duration::from_secs(20));
    let mut rest = Rest {
        fds: fd_targets(d.pid()),
        threads: d.threads(),
    };
    for (wi, k, s) in ran {
        if budget.passed() {
            break;
        }
        let w = workers.iter_mut().find(|w| w.index == *wi && !w.dead)?;
        if run_one(w, *k, s, "isolating a leak: ").is_some() {
            return None;
        }
        // Settle briefly (2 s at most): the script's sessions are closed; their release
        // may lag.
        let sample = || Rest {
            fds: fd_targets(d.pid()),
            threads: d.threads(),
        };
        let _ = try_wait_until_every(Duration::from_secs(2), Duration::from_millis(20), || {
            sample().fds.len() <= rest.fds.len()
        });
        let now = sample();
        if now.fds.len() > rest.fds.len() || now.threads > rest.threads {
            let why = format!(
                "this script alone left the daemon with {} more fds and {} more threads \
                 (seed {seed}, worker {wi}, script {k})",
                now.fds.len() as i64 - rest.fds.len() as i64,
                now.threads as i64 - rest.threads as i64
            );
            let p = write_finding(&format!("{seed}-w{wi}-{k}-leak"), &why, daemon_args, &[s]);
            println!("fuzz: FINDING {} — {why}", p.display());
            return Some(p);
        }
        rest = now;
    }
    None
}
