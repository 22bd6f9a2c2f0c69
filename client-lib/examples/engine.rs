//! An external engine at work (docs/engines.md): a second process reads a client's mirrored
//! memory straight from the client's shadow, checksumming the whole mirror over and over,
//! while the client rewrites it, discards parts of it and unmaps and maps it again. It prints
//! one line a second: throughput, the checksum of the last whole pass, the flushes (TLB
//! invalidations) it acknowledged, its device faults and how often it attached again.
//!
//! Two roles, two processes:
//!
//! * the **client** (`engine --client`) maps a buffer, attaches it, grants it and prints
//!   `token=HEX pid=PID mirror=ID len=BYTES` on stdout; then it churns: every 100 ms it
//!   rewrites the buffer and collects the written pages (`Mirror::sync`, dirty tracking), in
//!   between it discards an eighth of it (`madvise(MADV_DONTNEED)`), and every second it
//!   unmaps the buffer, detaches the mirror (which evicts the engine and revokes the grant),
//!   maps a new one, attaches and grants it, and prints the new token;
//! * the **engine** attaches with the token (`memshadow::Engine::attach`), reads the mirror in
//!   256 KiB pieces, handles its doorbell (`Engine::poll`, which acknowledges the flushes),
//!   and when its mirror is gone (`Evicted`, `NotMirrored`, `NoSuchGrant`) attaches again
//!   with the next token the client printed.
//!
//! `engine` alone starts the client itself (this program again, `--client`) and reads its
//! tokens through a pipe; `engine --client | engine --tokens` does the same in a shell.
//! Both find the daemon as every client does (`MEMSHADOW_SOCKET`, the system socket, the
//! per-user one); `--socket PATH` picks one. `--help` says more.

#![allow(clippy::print_stdout)]

use std::error::Error;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use memshadow::{Client, Engine, Mirror};

const PAGE: usize = 4096;
/// Bytes of one engine read.
const PIECE: usize = 256 << 10;
/// How often the client rewrites its buffer (and, half-way between, discards an eighth).
const REWRITE_EVERY: Duration = Duration::from_millis(100);
/// How often the client unmaps its buffer and maps a new one.
const REMAP_EVERY: Duration = Duration::from_secs(1);
/// How long the engine waits for a token before giving up.
const TOKEN_WAIT: Duration = Duration::from_secs(10);

const USAGE: &str = "\
engine: an external engine checksums a client's mirrored buffer from shared memory while
the client rewrites, discards, unmaps and remaps it; one line a second.

usage: engine [--socket PATH] [--seconds N] [--mib N]
       engine --client [--until-eof] [--socket PATH] [--seconds N] [--mib N]
       engine --tokens [--socket PATH] [--seconds N]

  (no role)      start the client (this program, --client) and be its engine
  --client       the client only: print `token=HEX pid=PID mirror=ID len=BYTES` lines
  --until-eof    (--client) stop at the end of stdin too
  --tokens       the engine only: read those lines on stdin (engine --client | engine --tokens)
  --socket PATH  the memshadowd to use (default: $MEMSHADOW_SOCKET, else the system socket
                 if it exists, else $XDG_RUNTIME_DIR/memshadow/memshadowd.sock)
  --seconds N    how long to run (default 10)
  --mib N        the client's buffer, in MiB (default 4)
  -h, --help     print this help

It needs a running memshadowd: `memshadowd --socket PATH` (or the system service).
";

type Res<T> = Result<T, Box<dyn Error>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Start the client, and be its engine.
    Both,
    /// The client only.
    Client,
    /// The engine only, tokens on stdin.
    Tokens,
}

#[derive(Debug)]
struct Args {
    role: Role,
    socket: Option<OsString>,
    seconds: u64,
    mib: usize,
    /// The client stops when its stdin ends, too.
    until_eof: bool,
}

/// The command line: `Ok(None)` for `--help`.
fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Option<Args>, String> {
    let mut a = Args {
        role: Role::Both,
        socket: None,
        seconds: 10,
        mib: 4,
        until_eof: false,
    };
    let num = |v: Option<OsString>, what: &str| -> Result<u64, String> {
        v.as_ref()
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{what} needs a positive number"))
    };
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(None),
            Some("--client") => a.role = Role::Client,
            Some("--tokens") => a.role = Role::Tokens,
            Some("--until-eof") => a.until_eof = true,
            Some("--socket") => a.socket = Some(args.next().ok_or("--socket needs a path")?),
            Some("--seconds") => a.seconds = num(args.next(), "--seconds")?,
            Some("--mib") => {
                a.mib = usize::try_from(num(args.next(), "--mib")?)
                    .ok()
                    .filter(|m| *m <= 256)
                    .ok_or("--mib is at most 256 (the daemon's default quota)")?;
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("engine: {e} (see engine --help)");
            return ExitCode::from(2);
        }
    };
    if let Some(s) = &args.socket {
        // Still one thread: every session of this process, and the client it starts, finds
        // the daemon through the variable, as any program would.
        std::env::set_var("MEMSHADOW_SOCKET", s);
    }
    let r = match args.role {
        Role::Client => churn(&args),
        Role::Tokens => {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || read_tokens(std::io::stdin().lock(), &tx));
            run_engine(&args, &rx)
        }
        Role::Both => both(&args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let what = if args.role == Role::Client {
                "engine --client"
            } else {
                "engine"
            };
            eprintln!("{what}: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line.
fn error_chain(e: &(dyn Error + 'static)) -> String {
    match e.downcast_ref::<memshadow::Error>() {
        Some(e) => memshadow::error_chain(e),
        None => e.to_string(),
    }
}

// ---- The client ----------------------------------------------------------------------

/// What the client did, printed as its last line.
#[derive(Debug, Default)]
struct Churned {
    rewrites: u64,
    discards: u64,
    remaps: u64,
    pages_collected: u64,
}

/// The client role: a buffer that is granted, rewritten, discarded in part, unmapped and
/// mapped again, for `--seconds`.
fn churn(args: &Args) -> Res<()> {
    let client = Client::builder().name("engine-client").connect()?;
    let len = args.mib << 20;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    if args.until_eof {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let going = || Instant::now() < deadline && !stop.load(Ordering::Relaxed);
    let mut did = Churned::default();
    let mut generation = 0u8;
    let mut tracking = true;
    while going() {
        let mut map = memmap2::MmapMut::map_anon(len)?;
        fill(&mut map, generation);
        let mirror = client.attach_mmap(&map)?;
        let token = mirror.grant()?;
        let published = {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "token={token:032x} pid={} mirror={} len={len}",
                std::process::id(),
                mirror.id()
            )
            .and_then(|()| out.flush())
        };
        match published {
            Ok(()) => {}
            // The engine is gone (`engine --client | engine --tokens` after the engine's
            // --seconds): nobody to churn for.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e.into()),
        }
        let until = deadline.min(Instant::now() + REMAP_EVERY);
        while going() && Instant::now() < until {
            std::thread::sleep(REWRITE_EVERY / 2);
            discard_an_eighth(&mut map, did.discards)?;
            did.discards += 1;
            std::thread::sleep(REWRITE_EVERY / 2);
            generation = generation.wrapping_add(1);
            fill(&mut map, generation);
            did.rewrites += 1;
            if tracking {
                tracking = collect(&mirror, &mut did)?;
            }
        }
        // Unmap, then detach: the engine's reads of the range stop at the unmap
        // (`NotMirrored`), and the detach evicts it and revokes the grant.
        drop(map);
        mirror.detach()?;
        did.remaps += 1;
    }
    // Last words; nobody may be listening any more.
    let _ = writeln!(
        std::io::stdout(),
        "client: {} rewrites ({} written pages collected), {} discards, {} unmaps and remaps",
        did.rewrites,
        did.pages_collected,
        did.discards,
        did.remaps
    );
    Ok(())
}

/// Page `n` holds the byte `generation + n` throughout.
fn fill(map: &mut [u8], generation: u8) {
    for (n, page) in map.chunks_mut(PAGE).enumerate() {
        page.fill(generation.wrapping_add(n as u8));
    }
}

/// `madvise(MADV_DONTNEED)` of the `round`-th eighth of `map` (in turn): it reads as zeros
/// until the next rewrite.
fn discard_an_eighth(map: &mut memmap2::MmapMut, round: u64) -> Res<()> {
    let eighth = map.len() / 8;
    let at = (round % 8) as usize * eighth;
    // SAFETY: a whole-page range inside our own mapping (its length is a multiple of 8
    // pages); afterwards it reads as zeros, which is all this program expects of it.
    let r = unsafe {
        libc::madvise(
            map.as_mut_ptr().wrapping_add(at).cast(),
            eighth,
            libc::MADV_DONTNEED,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Collects the written pages (dirty tracking), so the shadow, and the engine, see the
/// rewrite. Returns false (and says so once) if this daemon tracks no writes for us: the
/// engine then sees the buffer as it was when each page was faulted in.
fn collect(mirror: &Mirror, did: &mut Churned) -> Res<bool> {
    match mirror.sync() {
        Ok(r) => {
            did.pages_collected += r.pages_dirty;
            Ok(true)
        }
        Err(memshadow::Error::Unsupported(why)) => {
            eprintln!("engine --client: rewrites are not collected: {why}");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

// ---- The engine ----------------------------------------------------------------------

/// A grant the client published, or any other line it printed.
#[derive(Debug)]
enum FromClient {
    Grant { token: u128 },
    Line(String),
}

/// Reads the client's lines, sending each grant (and every other line) on `tx`.
fn read_tokens(from: impl BufRead, tx: &mpsc::Sender<FromClient>) {
    for line in from.lines() {
        let Ok(line) = line else { return };
        let token = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("token="))
            .and_then(|t| u128::from_str_radix(t, 16).ok());
        let m = match token {
            Some(token) => FromClient::Grant { token },
            None => FromClient::Line(line),
        };
        if tx.send(m).is_err() {
            return;
        }
    }
}

/// Both roles: the client is this program again (`--client --until-eof`), its stdout a pipe
/// to us; closing its stdin stops it.
fn both(args: &Args) -> Res<()> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["--client", "--until-eof"])
        .args(["--seconds", &(args.seconds + 5).to_string()])
        .args(["--mib", &args.mib.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().ok_or("no pipe from the client")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || read_tokens(BufReader::new(out), &tx));
    let r = run_engine(args, &rx);
    // Stop the client: it detaches, prints what it did and exits.
    drop(child.stdin.take());
    let exited = child.wait()?;
    let _ = reader.join();
    for m in rx.try_iter() {
        if let FromClient::Line(l) = m {
            println!("{l}");
        }
    }
    r?;
    if !exited.success() {
        return Err(format!("the client failed: {exited}").into());
    }
    Ok(())
}

/// What the engine counted, over every attachment.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    bytes: u64,
    passes: u64,
    flushes: u64,
    faults: u64,
    reattaches: u64,
    /// Checksum of the last whole pass.
    checksum: u64,
}

/// The engine role: attach with the first grant, read and checksum until `--seconds` have
/// passed (or the client is gone), attach again whenever the mirror goes away; print a line
/// a second and the totals.
fn run_engine(args: &Args, grants: &mpsc::Receiver<FromClient>) -> Res<()> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let evictions_before = evictions();
    let mut token = None;
    let Some(mut engine) = next_engine(grants, &mut token, started + TOKEN_WAIT)? else {
        return Err("the client published no token".into());
    };
    println!(
        "engine {} (pid {}) attached to mirror {} ({} KiB) of its client",
        engine.engine_id(),
        std::process::id(),
        engine.mirror_id(),
        engine.len() >> 10
    );
    let mut buf = vec![0u8; PIECE];
    let mut total = Seen::default();
    let mut last = Seen::default();
    let mut tick = started + Duration::from_secs(1);
    let mut pass = Checksum::new();
    let mut offset = 0u64;
    while Instant::now() < deadline {
        if Instant::now() >= tick {
            let now = total_with(&total, &engine);
            print_second(tick - started, &now, &last);
            last = now;
            tick += Duration::from_secs(1);
        }
        // The doorbell rang: acknowledge now (a read handles the ring too; an engine that
        // sleeps between its accesses must do this, or it is evicted).
        let polled = if doorbell_rang(&engine) {
            engine.poll()
        } else {
            Ok(())
        };
        let n = (engine.len() - offset).min(PIECE as u64) as usize;
        match polled.and_then(|()| engine.read(offset, &mut buf[..n])) {
            Ok(()) => {
                pass.add(&buf[..n]);
                total.bytes += n as u64;
                offset += n as u64;
                if offset == engine.len() {
                    total.checksum = pass.finish();
                    total.passes += 1;
                    pass = Checksum::new();
                    offset = 0;
                }
            }
            Err(e) if mirror_gone(&e) => {
                // Unmapped, detached, evicted: attach again with the client's next grant.
                total = total_with(&total, &engine);
                drop(engine);
                match next_engine(grants, &mut token, deadline.max(Instant::now()))? {
                    Some(e) => engine = e,
                    None => {
                        print_totals(&total, started.elapsed(), evictions_before);
                        return Ok(());
                    }
                }
                total.reattaches += 1;
                pass = Checksum::new();
                offset = 0;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let total = total_with(&total, &engine);
    drop(engine);
    print_totals(&total, started.elapsed(), evictions_before);
    Ok(())
}

/// `total` plus what `engine` counted (its counters start at zero).
fn total_with(total: &Seen, engine: &Engine) -> Seen {
    let s = engine.stats();
    Seen {
        flushes: total.flushes + s.flushes_processed,
        faults: total.faults + s.faults,
        ..*total
    }
}

/// Errors that mean the engine's mirror went away (the client unmapped or detached it, or
/// exited, or the engine was evicted), so that another grant may serve.
fn mirror_gone(e: &memshadow::Error) -> bool {
    matches!(
        e,
        memshadow::Error::Evicted(_)
            | memshadow::Error::NotMirrored(_)
            | memshadow::Error::NoSuchMirror(_)
            | memshadow::Error::NoSuchGrant(_)
    )
}

/// Attaches with the newest grant the client published, else again with `current` (an
/// engine evicted for a late acknowledgement may attach again while its grant lives),
/// waiting until `until` for a grant that works; `None` when the client is gone or
/// published nothing in time. Other lines of the client are printed.
fn next_engine(
    grants: &mpsc::Receiver<FromClient>,
    current: &mut Option<u128>,
    until: Instant,
) -> Res<Option<Engine>> {
    let mut candidate = newest(grants.try_iter()).or(*current);
    loop {
        if let Some(token) = candidate.take() {
            match attach(token) {
                Ok(e) => {
                    *current = Some(token);
                    return Ok(Some(e));
                }
                // Revoked (the client detached it) or its mirror unmapped: wait for the next.
                Err(e) if mirror_gone(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let wait = until.saturating_duration_since(Instant::now());
        let Ok(first) = grants.recv_timeout(wait) else {
            return Ok(None);
        };
        candidate = newest(std::iter::once(first).chain(grants.try_iter()));
    }
}

/// The newest grant of `from` (the older ones are stale); other lines are printed.
fn newest(from: impl Iterator<Item = FromClient>) -> Option<u128> {
    let mut newest = None;
    for m in from {
        match m {
            FromClient::Grant { token, .. } => newest = Some(token),
            FromClient::Line(l) => println!("{l}"),
        }
    }
    newest
}

/// The engine's side of the README's "External engines" snippet: attach with the token the
/// client handed over, then read from the shadow.
fn attach(token: u128) -> Result<Engine, memshadow::Error> {
    let mut engine = memshadow::Engine::attach(None, token)?; // in the engine's process
    let mut buf = [0u8; 64];
    engine.read(0, &mut buf)?; // from the shadow, no system call on a hit
    Ok(engine)
}

/// True if the engine's doorbell is readable (without waiting).
fn doorbell_rang(engine: &Engine) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        engine.fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
        Ok(n) if n > 0
    )
}

fn print_second(at: Duration, now: &Seen, last: &Seen) {
    println!(
        "{:>3}s  {:>8.1} MB/s  checksum {:016x}  flushes {:>5}  faults {:>5}  reattaches {:>3}",
        at.as_secs(),
        (now.bytes - last.bytes) as f64 / 1e6,
        now.checksum,
        now.flushes - last.flushes,
        now.faults - last.faults,
        now.reattaches
    );
}

fn print_totals(total: &Seen, took: Duration, evictions_before: Option<u64>) {
    let secs = took.as_secs_f64().max(1e-9);
    // Evictions for late acknowledgements, as opposed to the grants the client revoked: the
    // engine is told the same (`Evicted`), the daemon counts only the former.
    let evicted = match (evictions_before, evictions()) {
        (Some(a), Some(b)) => format!(
            " (the daemon evicted {} engine(s) for a late acknowledgement meanwhile)",
            b.saturating_sub(a)
        ),
        _ => String::new(),
    };
    println!(
        "engine: {secs:.1} s, {} MB read in {} whole passes ({:.1} MB/s), {} flushes \
         acknowledged, {} device faults, {} reattaches{evicted}",
        total.bytes / 1_000_000,
        total.passes,
        total.bytes as f64 / 1e6 / secs,
        total.flushes,
        total.faults,
        total.reattaches
    );
}

/// The daemon's count of engines evicted for a late acknowledgement
/// (`device.engine_evictions`), if it says.
fn evictions() -> Option<u64> {
    let status = memshadow::Control::connect().ok()?.status().ok()?;
    status.counter("device.engine_evictions")
}

/// A 64-bit checksum of a pass over the mirror (not cryptographic: it shows the bytes
/// change).
#[derive(Debug)]
struct Checksum(u64);

impl Checksum {
    fn new() -> Checksum {
        Checksum(0x9e37_79b9_7f4a_7c15)
    }

    fn add(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(a)).wrapping_mul(0x5151_5151_5151_5153);
        }
        for &b in words.remainder() {
            h = (h.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x5151_5151_5151_5153);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
