//! The main job: starts `memshadowd` (from the same build, on its built-in defaults) on a
//! temporary socket, attaches 1 MiB of this process, reads it through the device, grants it
//! to an external engine (this program again, in a second process, that reads the mirror
//! from shared memory: docs/engines.md) and compares the two kinds of read, `madvise`s and
//! `munmap`s parts of it and prints what the daemon did (its live trace of invalidations)
//! and what the engine saw, shows `memshadowctl engines` and `memshadowctl status`, then
//! stops the daemon with SIGTERM. With `--socket PATH` (or `MEMSHADOW_SOCKET`) it uses the
//! daemon running there instead, and leaves it running. `--help` says so.

#![allow(clippy::print_stdout)]

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use memshadow::{Client, Engine, InvalidationReport, Mirror, Target};

const PAGE: usize = 4096;
const LEN: usize = 1 << 20;

/// The hidden argument that makes this program the demo's external engine.
const ENGINE_ROLE: &str = "--engine-child";

const USAGE: &str = "\
demo: mirrors 1 MiB of this process through memshadowd, lets an external engine (a second
process) read it from shared memory, changes it (madvise, munmap) and prints each
invalidation the daemon traced and what the engine saw, then `memshadowctl engines` and
`memshadowctl status`.

usage: demo [--socket PATH]

  --socket PATH  use the memshadowd listening at PATH, and leave it running
  -h, --help     print this help

Without --socket, the daemon at $MEMSHADOW_SOCKET if that is set; otherwise the demo starts
its own memshadowd (the one built next to it, on its built-in defaults: --no-config) on a
temporary socket and stops it with SIGTERM at the end.
";

/// Where the daemon comes from.
enum Source {
    /// `--socket PATH` or `MEMSHADOW_SOCKET`: a running daemon.
    Running(PathBuf, &'static str),
    /// None given: start one.
    Own,
}

/// The command line: `Ok(None)` for `--help`.
fn parse_args(
    args: impl Iterator<Item = std::ffi::OsString>,
    env: Option<std::ffi::OsString>,
) -> Result<Option<Source>, String> {
    let mut socket = None;
    let mut args = args;
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("-h" | "--help") => return Ok(None),
            Some("--socket") => {
                let p = args.next().ok_or("--socket needs a path")?;
                socket = Some(PathBuf::from(p));
            }
            Some(s) if s.starts_with("--socket=") => {
                socket = Some(PathBuf::from(&s["--socket=".len()..]));
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(Some(match (socket, env.filter(|e| !e.is_empty())) {
        (Some(p), _) => Source::Running(p, "--socket"),
        (None, Some(e)) => Source::Running(PathBuf::from(e), "MEMSHADOW_SOCKET"),
        (None, None) => Source::Own,
    }))
}

fn counter(c: &Client, name: &str) -> Result<u64, Box<dyn Error>> {
    Ok(c.stats()?
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, v)| v))
}

/// The daemon, stopped with SIGTERM (and its socket directory removed) on drop.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
}

impl Daemon {
    fn stop(&mut self) -> Result<String, Box<dyn Error>> {
        let Some(mut child) = self.child.take() else {
            return Ok("not running".into());
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(child.wait()?.to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sibling(name: &str) -> Result<PathBuf, Box<dyn Error>> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join(name))
        .ok_or("no target dir")?;
    if !p.exists() {
        return Err(format!(
            "{} not found: build the workspace first (the README's main command does)",
            p.display()
        )
        .into());
    }
    Ok(p)
}

fn describe(r: &InvalidationReport) -> String {
    format!(
        "{:<6} {:#x}-{:#x} ({} pages): {} notifier(s), start pass {:.1} us, finish pass {:.1} us, \
         {} TLB flush(es) queued",
        r.event.as_str(),
        r.start,
        r.end,
        (r.end - r.start) / PAGE as u64,
        r.notifiers,
        r.start_ns as f64 / 1e3,
        r.finish_ns as f64 / 1e3,
        r.flushes_queued
    )
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == ENGINE_ROLE) {
        return match engine_child() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo engine: {}", memshadow_error_chain(e.as_ref()));
                ExitCode::FAILURE
            }
        };
    }
    let source = match parse_args(
        std::env::args_os().skip(1),
        std::env::var_os("MEMSHADOW_SOCKET"),
    ) {
        Ok(Some(s)) => s,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("demo: {e} (see demo --help)");
            return ExitCode::from(2);
        }
    };
    match run(source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {}", memshadow_error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line.
fn memshadow_error_chain(e: &(dyn Error + 'static)) -> String {
    match e.downcast_ref::<memshadow::Error>() {
        Some(e) => memshadow::error_chain(e),
        None => e.to_string(),
    }
}

type Res<T> = Result<T, Box<dyn Error>>;

/// The tour: a daemon, a client, a traced stream of what the daemon does, then a mirror
/// that is read, by the daemon and by an external engine, discarded in part and unmapped in
/// part, and the daemon's status.
fn run(source: Source) -> Res<()> {
    let ctl_bin = sibling("memshadowctl")?;
    let (socket, mut daemon) = daemon_for(source)?;
    let client = connect(&socket, daemon.is_some())?;
    let trace = watch_trace(&client)?;
    let daemon_did = |what: &str| -> Res<()> {
        let r = trace
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| format!("no invalidation traced after {what}"))?;
        println!("   daemon: {}", describe(&r));
        Ok(())
    };
    let mut map = memmap2::MmapMut::map_anon(LEN)?;
    for (i, b) in map.iter_mut().enumerate() {
        *b = (i / PAGE) as u8;
    }
    let mirror = attach_and_read(&client, &map)?;
    let mut engine = EngineChild::start(&mirror, &socket)?;
    if let Some(e) = engine.as_mut() {
        e.compare_reads(&mirror)?;
    }
    discard_pages(&mut map)?;
    daemon_did("madvise")?;
    let mut buf = [0u8; 4];
    mirror.read(8 * PAGE as u64, &mut buf)?;
    println!("device read of page 8 -> {buf:?} (re-faulted: the kernel's zero page, as the process sees it)");
    if let Some(e) = engine.as_mut() {
        e.saw_flush("madvise")?;
        e.show_read(
            8 * PAGE as u64,
            "page 8",
            "re-faulted after its TLB entries were dropped",
        )?;
    }
    unmap_half(map)?;
    daemon_did("munmap")?;
    if let Some(e) = engine.as_mut() {
        e.saw_flush("munmap")?;
    }
    after_unmap(&client, &mirror, engine.as_mut())?;
    if let Some(mut e) = engine {
        e.summary()?;
        show_ctl(&ctl_bin, &socket, "engines")?;
        e.stop()?;
    }
    mirror.detach()?;
    show_ctl(&ctl_bin, &socket, "status")?;
    drop(client);
    if let Some(daemon) = daemon.as_mut() {
        println!("== stopping memshadowd (SIGTERM)");
        let how = daemon.stop()?;
        println!("memshadowd stopped: {how}");
    }
    Ok(())
}

/// The socket to use, and the daemon this demo started on it, if it started one.
fn daemon_for(source: Source) -> Res<(PathBuf, Option<Daemon>)> {
    match source {
        Source::Running(socket, from) => {
            println!(
                "== using the memshadowd at {} (from {from}); it keeps running",
                socket.display()
            );
            Ok((socket, None))
        }
        Source::Own => {
            let daemon_bin = sibling("memshadowd")?;
            let dir = std::env::temp_dir().join(format!("memshadow-demo-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let socket = dir.join("memshadowd.sock");
            println!(
                "== starting memshadowd on {} (built-in defaults: --no-config)",
                socket.display()
            );
            let child = Command::new(&daemon_bin)
                .arg("--no-config")
                .arg("--socket")
                .arg(&socket)
                .env("MEMSHADOW_LOG", "warn")
                .spawn()?;
            Ok((
                socket,
                Some(Daemon {
                    child: Some(child),
                    dir,
                }),
            ))
        }
    }
}

/// Connects, giving a daemon of our own (`starting`) time to come up; a running one
/// answers at once.
fn connect(socket: &Path, starting: bool) -> Res<Client> {
    let wait = if starting {
        Duration::from_secs(10)
    } else {
        Duration::ZERO
    };
    let t = Instant::now();
    let client = loop {
        match Client::connect_to(socket) {
            Ok(c) => break c,
            Err(_) if t.elapsed() < wait => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.into()),
        }
    };
    println!(
        "connected: memshadowd {} (protocol {}), it reads this process's memory via {}",
        client.daemon_version(),
        client.protocol_version(),
        client.access_path().map_or("?", |a| a.as_str())
    );
    Ok(client)
}

/// What the daemon does, as it tells any `memshadowctl trace`. The stream has a
/// connection of its own: the thread blocked on it holds up none of the client's calls.
fn watch_trace(client: &Client) -> Res<mpsc::Receiver<InvalidationReport>> {
    let (tx, trace) = mpsc::channel();
    let mut stream = client.control().trace(Target::Me, 0)?;
    std::thread::spawn(move || {
        while let Ok(rec) = stream.next_record() {
            if tx.send(rec.report).is_err() {
                return;
            }
        }
    });
    Ok(trace)
}

/// Attaches `map`, reads one page through the device and populates the rest.
fn attach_and_read(client: &Client, map: &memmap2::MmapMut) -> Res<Mirror> {
    let base = map.as_ptr() as u64;
    let mirror = client.attach_mmap(map)?;
    println!(
        "== attached 1 MiB at {base:#x} as mirror {} (page n holds the byte n)",
        mirror.id()
    );
    let mut buf = [0u8; 4];
    mirror.read(5 * PAGE as u64, &mut buf)?;
    println!(
        "device read of page 5 -> {buf:?} (the shadow faulted it in: {} fault(s))",
        counter(client, "client.faults")?
    );
    let pages = mirror.populate(0, LEN as u64)?;
    println!("populated the whole range: {pages} pages now live in the shadow");
    Ok(mirror)
}

/// `madvise(MADV_DONTNEED)` of pages 8..16.
fn discard_pages(map: &mut memmap2::MmapMut) -> Res<()> {
    println!("== madvise(MADV_DONTNEED) of pages 8..16");
    // SAFETY: pages 8..16 of our own mapping; afterwards they read as zeros, which is what
    // the rest of this program expects.
    let r = unsafe {
        libc::madvise(
            map.as_mut_ptr().wrapping_add(8 * PAGE).cast(),
            8 * PAGE,
            libc::MADV_DONTNEED,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// `munmap` of the second half of `map`; the first half stays mapped for the rest of the
/// process (the `MmapMut` is forgotten, never touched or unmapped again).
fn unmap_half(mut map: memmap2::MmapMut) -> Res<()> {
    println!("== munmap of the second half");
    let half = map.as_mut_ptr().wrapping_add(LEN / 2);
    std::mem::forget(map);
    // SAFETY: unmaps the second half of our own mapping, which nothing else uses: the
    // `MmapMut` that owned it was forgotten above.
    let r = unsafe { libc::munmap(half.cast(), LEN / 2) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// The unmapped half is refused, the rest still read (by the daemon and by the engine);
/// this client's counters.
fn after_unmap(client: &Client, mirror: &Mirror, mut engine: Option<&mut EngineChild>) -> Res<()> {
    let mut buf = [0u8; 4];
    let unmapped = (LEN / 2 + PAGE) as u64;
    match mirror.read(unmapped, &mut buf) {
        Err(e) => println!("device read of the unmapped half is refused: {e}"),
        Ok(()) => return Err("a read of the unmapped half succeeded".into()),
    }
    if let Some(e) = engine.as_mut() {
        match e.read(unmapped, 4)? {
            Err(why) => println!("engine read of the unmapped half is refused: {why}"),
            Ok(bytes) => {
                return Err(format!("an engine read of the unmapped half returned {bytes}").into())
            }
        }
    }
    mirror.read(PAGE as u64, &mut buf)?;
    println!("device read of page 1 still works -> {buf:?}");
    if let Some(e) = engine.as_mut() {
        e.show_read(
            PAGE as u64,
            "page 1",
            "from its TLB: no fault, no system call",
        )?;
    }
    println!(
        "this client: {} uffd events, {} invalidations, {} device faults",
        counter(client, "events.unmap")? + counter(client, "events.remove")?,
        counter(client, "client.invalidations")?,
        counter(client, "client.faults")?
    );
    Ok(())
}

/// `memshadowctl WHAT` against the daemon used.
fn show_ctl(ctl_bin: &Path, socket: &Path, what: &str) -> Res<()> {
    println!("== memshadowctl {what}");
    let st = Command::new(ctl_bin)
        .arg("--socket")
        .arg(socket)
        .arg(what)
        .status()?;
    if !st.success() {
        return Err(format!("memshadowctl {what} failed: {st}").into());
    }
    Ok(())
}

// ---- The external engine --------------------------------------------------------------

/// Reads of the engine's benchmark: batches of this many 64-byte reads, timed per batch.
const BATCH: u32 = 100;
/// Batches the engine times.
const BATCHES: usize = 300;
/// Device reads through the socket the demo times, one by one.
const SOCKET_READS: usize = 1000;

/// The demo's external engine: this program again (`--engine-child`), in a process of its
/// own, driven by lines on its stdin; it answers `ok ...` or `err ...` on its stdout.
struct EngineChild {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    pid: u32,
    flushes: u64,
}

impl EngineChild {
    /// Grants `mirror`, starts the engine process and hands it the token through a pipe;
    /// `None` (said why) when this daemon has no external engines.
    fn start(mirror: &Mirror, socket: &Path) -> Res<Option<EngineChild>> {
        let token = match mirror.grant() {
            Ok(t) => t,
            Err(memshadow::Error::Unsupported(why)) => {
                println!("(no external engine: {why})");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let mut child = Command::new(std::env::current_exe()?)
            .arg(ENGINE_ROLE)
            .env("MEMSHADOW_SOCKET", socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (Some(to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("no pipes to the engine".into());
        };
        let pid = child.id();
        let mut e = EngineChild {
            child,
            to,
            from: BufReader::new(from),
            pid,
            flushes: 0,
        };
        println!(
            "== an external engine: a second process (pid {pid}) maps this client's shadow and \
             reads the mirror from it"
        );
        let attached = e.ask(&format!("{token:032x}"))?;
        println!(
            "granted mirror {} to it (an unguessable token, handed over through a pipe): it \
             attached as {attached}",
            mirror.id()
        );
        e.show_read(
            5 * PAGE as u64,
            "page 5",
            "found through its page table: the daemon had mirrored it, nothing to fault",
        )?;
        Ok(Some(e))
    }

    /// Sends one command line; the answer after `ok`, or the engine's error.
    fn ask(&mut self, line: &str) -> Res<String> {
        self.try_ask(line)?
            .map_err(|e| format!("the engine: {line}: {e}").into())
    }

    /// Sends one command line: `Ok(answer)` or `Err(the engine's refusal)`.
    fn try_ask(&mut self, line: &str) -> Res<Result<String, String>> {
        writeln!(self.to, "{line}")?;
        self.to.flush()?;
        let mut a = String::new();
        if self.from.read_line(&mut a)? == 0 {
            let st = self.child.wait()?;
            return Err(format!("the engine exited ({st}) during {line:?}").into());
        }
        let a = a.trim_end();
        Ok(match a.split_once(' ').unwrap_or((a, "")) {
            ("ok", rest) => Ok(rest.to_owned()),
            (_, rest) => Err(rest.to_owned()),
        })
    }

    /// An engine read of `len` bytes at `offset`: `Ok(bytes as text)` or `Err(refusal)`.
    fn read(&mut self, offset: u64, len: usize) -> Res<Result<String, String>> {
        self.try_ask(&format!("read {offset} {len}"))
    }

    fn show_read(&mut self, offset: u64, what: &str, how: &str) -> Res<()> {
        let bytes = self
            .read(offset, 4)?
            .map_err(|e| format!("engine read of {what}: {e}"))?;
        println!("engine read of {what} -> {bytes} ({how})");
        Ok(())
    }

    /// The engine's 64-byte reads against `Mirror::read`'s, both p50.
    fn compare_reads(&mut self, mirror: &Mirror) -> Res<()> {
        let f = fields(&self.ask(&format!("bench {BATCHES}"))?);
        let mut us = Vec::with_capacity(SOCKET_READS);
        let mut buf = [0u8; 64];
        for i in 0..SOCKET_READS {
            let t = Instant::now();
            mirror.read(spread(i as u64), &mut buf)?;
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        us.sort_by(f64::total_cmp);
        let p50 = us[us.len() / 2];
        let engine_p50: f64 = f.get("p50_ns").and_then(|v| v.parse().ok()).unwrap_or(0.0);
        println!(
            "engine: 64-byte reads p50 {engine_p50:.0} ns (its own mapping, no system call) vs \
             socket read p50 {p50:.1} us (Mirror::read, a round trip to memshadowd): {:.0}x",
            p50 * 1e3 / engine_p50.max(1.0)
        );
        Ok(())
    }

    /// The engine acknowledged the flush of the invalidation `what` (it had before the
    /// daemon's finish pass could free the pages' shadow slots, which the trace record shows).
    fn saw_flush(&mut self, what: &str) -> Res<()> {
        let f = fields(&self.ask("stats")?);
        let n: u64 = f.get("flushes").and_then(|v| v.parse().ok()).unwrap_or(0);
        if n > self.flushes {
            println!(
                "   engine: acknowledged {} flush request(s) of its ring after the {what} (its TLB \
                 entries of those pages dropped) before the daemon could free their slots",
                n - self.flushes
            );
        } else {
            println!("   engine: no flush of its ring after the {what}");
        }
        self.flushes = n;
        Ok(())
    }

    fn summary(&mut self) -> Res<()> {
        let f = fields(&self.ask("stats")?);
        let get = |k: &str| f.get(k).map_or("?", String::as_str).to_owned();
        println!(
            "engine: {} invalidation(s) acknowledged, TLB {} hits and {} misses, {} device \
             fault(s) (EngineFault requests), {} read(s) started again",
            get("flushes"),
            get("tlb_hits"),
            get("tlb_misses"),
            get("faults"),
            get("retries")
        );
        Ok(())
    }

    /// Ends the engine process (its session closes: the daemon stops waiting for it).
    fn stop(mut self) -> Res<()> {
        drop(self.to);
        let st = self.child.wait()?;
        if !st.success() {
            return Err(format!("the engine (pid {}) failed: {st}", self.pid).into());
        }
        Ok(())
    }
}

/// Offsets of the timed reads: across the populated first half, at varied places in a page.
fn spread(i: u64) -> u64 {
    (i * 4160) % (LEN as u64 / 2 - 64)
}

/// `key=value` words.
fn fields(answer: &str) -> std::collections::HashMap<String, String> {
    answer
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The engine process: reads the token from its first line on stdin, attaches, then answers
/// `bench N`, `read OFF LEN` and `stats` lines until its stdin ends, handling its doorbell
/// (acknowledging flushes) whenever it rings in between.
fn engine_child() -> Res<()> {
    let mut input = Lines::default();
    let token = input.next(None)?.ok_or("no token on stdin")?;
    let token = u128::from_str_radix(token.trim(), 16)?;
    let mut engine = memshadow::Engine::attach(None, token)?; // MEMSHADOW_SOCKET, as the demo set it
    answer(Ok(format!(
        "engine {} of mirror {}",
        engine.engine_id(),
        engine.mirror_id()
    )))?;
    while let Some(line) = input.next(Some(&mut engine))? {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let a = match w.first().copied() {
            Some("bench") => bench(&mut engine, num(1) as usize),
            Some("read") => {
                let mut buf = vec![0u8; num(2) as usize];
                engine
                    .read(num(1), &mut buf)
                    .map(|()| format!("{buf:?}"))
                    .map_err(|e| e.to_string())
            }
            Some("stats") => {
                let s = engine.stats();
                Ok(format!(
                    "flushes={} tlb_hits={} tlb_misses={} faults={} retries={}",
                    s.flushes_processed, s.tlb_hits, s.tlb_misses, s.faults, s.retries
                ))
            }
            _ => Err(format!("unknown command {line:?}")),
        };
        answer(a)?;
    }
    Ok(())
}

fn answer(a: Result<String, String>) -> Res<()> {
    let mut out = std::io::stdout().lock();
    match a {
        Ok(s) => writeln!(out, "ok {s}")?,
        Err(e) => writeln!(out, "err {e}")?,
    }
    out.flush()?;
    Ok(())
}

/// `batches` timed batches of [`BATCH`] 64-byte engine reads: p50 and p99 per read.
fn bench(engine: &mut Engine, batches: usize) -> Result<String, String> {
    let mut buf = [0u8; 64];
    let mut ns = Vec::with_capacity(batches);
    let mut i = 0u64;
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..BATCH {
            engine
                .read(spread(i), &mut buf)
                .map_err(|e| e.to_string())?;
            i += 1;
        }
        ns.push(t.elapsed().as_secs_f64() * 1e9 / f64::from(BATCH));
    }
    ns.sort_by(f64::total_cmp);
    let at = |q: usize| {
        ns.get((ns.len().max(1) - 1) * q / 100)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(format!("p50_ns={:.1} p99_ns={:.1}", at(50), at(99)))
}

/// Lines of stdin, read without blocking the engine: while it waits for one, a doorbell
/// that rings is answered (`Engine::poll`: the flushes are acknowledged at once).
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn next(&mut self, mut engine: Option<&mut Engine>) -> Res<Option<String>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..i]).into_owned()));
            }
            let stdin = std::io::stdin();
            let (stdin_ready, rang) = {
                let mut fds = vec![PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
                if let Some(e) = engine.as_deref() {
                    fds.push(PollFd::new(e.fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
                let ready = |f: &PollFd<'_>| f.any().unwrap_or(false);
                (ready(&fds[0]), fds.get(1).is_some_and(ready))
            };
            if rang {
                if let Some(e) = engine.as_deref_mut() {
                    // An evicted engine keeps answering: its next read says so.
                    let _ = e.poll();
                }
            }
            if stdin_ready {
                let mut chunk = [0u8; 256];
                let n = nix::unistd::read(&stdin, &mut chunk)?;
                if n == 0 {
                    return Ok(None);
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}
