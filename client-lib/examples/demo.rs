//! The main job: starts `memshadowd` (from the same build, on its built-in defaults) on a
//! temporary socket, attaches 1 MiB of this process, reads it through the device,
//! `madvise`s and `munmap`s parts of it and prints what the daemon did (its live trace of
//! invalidations), shows `memshadowctl status`, then stops the daemon with SIGTERM.
//! With `--socket PATH` (or `MEMSHADOW_SOCKET`) it uses the daemon running there instead,
//! and leaves it running. `--help` says so.

#![allow(clippy::print_stdout)]

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use memshadow::{Client, InvalidationReport, Mirror, Target};

const PAGE: usize = 4096;
const LEN: usize = 1 << 20;

const USAGE: &str = "\
demo: mirrors 1 MiB of this process through memshadowd, changes it (madvise, munmap) and
prints each invalidation the daemon traced, then `memshadowctl status`.

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
/// that is read, discarded in part and unmapped in part, and the daemon's status.
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
    discard_pages(&mut map)?;
    daemon_did("madvise")?;
    let mut buf = [0u8; 4];
    mirror.read(8 * PAGE as u64, &mut buf)?;
    println!("device read of page 8 -> {buf:?} (re-faulted: the kernel's zero page, as the process sees it)");
    unmap_half(map)?;
    daemon_did("munmap")?;
    after_unmap(&client, &mirror)?;
    mirror.detach()?;
    show_status(&ctl_bin, &socket)?;
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

/// The unmapped half is refused, the rest still read; this client's counters.
fn after_unmap(client: &Client, mirror: &Mirror) -> Res<()> {
    let mut buf = [0u8; 4];
    match mirror.read((LEN / 2 + PAGE) as u64, &mut buf) {
        Err(e) => println!("device read of the unmapped half is refused: {e}"),
        Ok(()) => return Err("a read of the unmapped half succeeded".into()),
    }
    mirror.read(PAGE as u64, &mut buf)?;
    println!("device read of page 1 still works -> {buf:?}");
    println!(
        "this client: {} uffd events, {} invalidations, {} device faults",
        counter(client, "events.unmap")? + counter(client, "events.remove")?,
        counter(client, "client.invalidations")?,
        counter(client, "client.faults")?
    );
    Ok(())
}

/// `memshadowctl status` against the daemon used.
fn show_status(ctl_bin: &Path, socket: &Path) -> Res<()> {
    println!("== memshadowctl status");
    let st = Command::new(ctl_bin)
        .arg("--socket")
        .arg(socket)
        .arg("status")
        .status()?;
    if !st.success() {
        return Err(format!("memshadowctl status failed: {st}").into());
    }
    Ok(())
}
