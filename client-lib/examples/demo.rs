//! The main job: starts `memshadowd` (from the same build) on a temporary socket, attaches
//! 1 MiB of this process, reads it through the device, `madvise`s and `munmap`s parts of it
//! and prints what the daemon did (its live trace of invalidations), shows
//! `memshadowctl status`, then stops the daemon with SIGTERM.

#![allow(clippy::print_stdout)]

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use memshadow::{Client, InvalidationReport, Target};

const PAGE: usize = 4096;
const LEN: usize = 1 << 20;

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
            "{} not found: build the workspace first (cargo build --release --workspace --examples)",
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

fn main() -> Result<(), Box<dyn Error>> {
    let daemon_bin = sibling("memshadowd")?;
    let ctl_bin = sibling("memshadowctl")?;
    let dir = std::env::temp_dir().join(format!("memshadow-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("memshadowd.sock");
    println!("== starting memshadowd on {}", socket.display());
    let mut daemon = Daemon {
        child: Some(
            Command::new(&daemon_bin)
                .arg("--socket")
                .arg(&socket)
                .arg("--flush-latency-us")
                .arg("100")
                .env("MEMSHADOW_LOG", "warn")
                .spawn()?,
        ),
        dir,
    };
    let t = Instant::now();
    let client = loop {
        match Client::connect_to(&socket) {
            Ok(c) => break c,
            Err(_) if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e.into()),
        }
    };
    println!(
        "connected: memshadowd {} (protocol {}), it reads this process's memory via {}",
        client.daemon_version(),
        client.protocol_version(),
        client.access_path().map_or("?", |a| a.as_str())
    );

    // What the daemon does, as it tells any `memshadowctl trace`. The stream has a
    // connection of its own: the thread blocked on it holds up none of the calls below.
    let (tx, trace) = mpsc::channel();
    let mut stream = client.control().trace(Target::Me, 0)?;
    std::thread::spawn(move || {
        while let Ok(rec) = stream.next_record() {
            if tx.send(rec.report).is_err() {
                return;
            }
        }
    });
    let daemon_did = |what: &str| -> Result<(), Box<dyn Error>> {
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
    let base = map.as_ptr() as u64;
    let mirror = client.attach_mmap(&map)?;
    println!(
        "== attached 1 MiB at {base:#x} as mirror {} (page n holds the byte n)",
        mirror.id()
    );
    let mut buf = [0u8; 4];
    mirror.read(5 * PAGE as u64, &mut buf)?;
    println!(
        "device read of page 5 -> {buf:?} (the shadow faulted it in: {} fault(s))",
        counter(&client, "client.faults")?
    );
    let pages = mirror.populate(0, LEN as u64)?;
    println!("populated the whole range: {pages} pages now live in the shadow");

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
    daemon_did("madvise")?;
    mirror.read(8 * PAGE as u64, &mut buf)?;
    println!("device read of page 8 -> {buf:?} (re-faulted: the kernel's zero page, as the process sees it)");

    println!("== munmap of the second half");
    let half = map.as_mut_ptr().wrapping_add(LEN / 2);
    // SAFETY: unmaps the second half of our own mapping, which nothing else uses; the
    // `MmapMut` is forgotten below so it is never touched or unmapped again.
    let r = unsafe { libc::munmap(half.cast(), LEN / 2) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    daemon_did("munmap")?;
    match mirror.read((LEN / 2 + PAGE) as u64, &mut buf) {
        Err(e) => println!("device read of the unmapped half is refused: {e}"),
        Ok(()) => return Err("a read of the unmapped half succeeded".into()),
    }
    mirror.read(PAGE as u64, &mut buf)?;
    println!("device read of page 1 still works -> {buf:?}");
    println!(
        "this client: {} uffd events, {} invalidations, {} device faults",
        counter(&client, "events.unmap")? + counter(&client, "events.remove")?,
        counter(&client, "client.invalidations")?,
        counter(&client, "client.faults")?
    );
    mirror.detach()?;
    std::mem::forget(map);

    println!("== memshadowctl status");
    let st = Command::new(&ctl_bin)
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .status()?;
    if !st.success() {
        return Err(format!("memshadowctl status failed: {st}").into());
    }
    drop(client);
    println!("== stopping memshadowd (SIGTERM)");
    let how = daemon.stop()?;
    println!("memshadowd stopped: {how}");
    Ok(())
}
