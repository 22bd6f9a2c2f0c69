//! The main job: starts `memshadowd` (from the same build) on a temporary socket, attaches
//! 1 MiB of this process, reads it through the device, munmaps part of it and shows the
//! invalidation, then stops the daemon with SIGTERM.

#![allow(clippy::print_stdout)]

use std::error::Error;
use std::process::Command;
use std::time::{Duration, Instant};

use memshadow::Client;

fn counter(c: &Client, daemon: bool, name: &str) -> Result<u64, Box<dyn Error>> {
    let v = if daemon {
        c.status()?.counters
    } else {
        c.stats()?
    };
    Ok(v.into_iter().find(|(n, _)| n == name).map_or(0, |(_, v)| v))
}

fn main() -> Result<(), Box<dyn Error>> {
    let exe = std::env::current_exe()?;
    let daemon_bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("memshadowd"))
        .ok_or("no target dir")?;
    if !daemon_bin.exists() {
        return Err(format!(
            "{} not found: build the workspace first",
            daemon_bin.display()
        )
        .into());
    }
    let dir = std::env::temp_dir().join(format!("memshadow-demo-{}", std::process::id()));
    let socket = dir.join("memshadowd.sock");
    let mut daemon = Command::new(&daemon_bin)
        .arg("--socket")
        .arg(&socket)
        .arg("--flush-latency-us")
        .arg("100")
        .spawn()?;
    let result = (|| -> Result<(), Box<dyn Error>> {
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
            "connected: daemon {} (protocol {}), memory read via {:?}",
            client.daemon_version(),
            client.protocol_version(),
            client.access_path()
        );
        let len = 1 << 20;
        let mut map = memmap2::MmapMut::map_anon(len)?;
        for (i, b) in map.iter_mut().enumerate() {
            *b = (i / 4096) as u8;
        }
        let mirror = client.attach_mmap(&map)?;
        println!(
            "attached {len} bytes at {:#x} as mirror {}",
            mirror.addr(),
            mirror.id()
        );
        let mut buf = [0u8; 16];
        mirror.read(5 * 4096, &mut buf)?;
        println!(
            "device read of page 5: {:?}... (faults: {})",
            &buf[..4],
            counter(&client, false, "client.faults")?
        );
        mirror.populate(0, len as u64)?;
        println!(
            "populated: {} shadow slots in use",
            counter(&client, true, "shadow.slots_in_use")?
        );
        let inv_before = counter(&client, false, "client.invalidations")?;
        // SAFETY: unmaps the second half of our own mapping, which nothing else uses; the
        // `MmapMut` is forgotten below so it is never touched or unmapped again.
        let half = map.as_mut_ptr().wrapping_add(len / 2);
        // SAFETY: see above.
        let r = unsafe { libc::munmap(half.cast(), len / 2) };
        if r != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // This device read queues behind the flush the munmap's invalidation started (G1).
        match mirror.read((len / 2 + 4096) as u64, &mut buf) {
            Err(e) => println!("device read of the unmapped half right after munmap: {e}"),
            Ok(()) => return Err("a read of the unmapped half succeeded".into()),
        }
        println!(
            "munmap of the second half: invalidations {} -> {}, uffd unmap events {}",
            inv_before,
            counter(&client, false, "client.invalidations")?,
            counter(&client, false, "events.unmap")?,
        );
        mirror.read(4096, &mut buf)?;
        println!("device read of page 1 still works: {:?}...", &buf[..4]);
        let status = client.status()?;
        for key in [
            "device.flushes_issued",
            "device.flushes_coalesced",
            "engine.flush_latency_p50_us",
            "events.total",
        ] {
            if let Some((k, v)) = status.counters.iter().find(|(k, _)| k == key) {
                println!("  {k} = {v}");
            }
        }
        mirror.detach()?;
        println!(
            "detached: {} shadow slots in use",
            counter(&client, true, "shadow.slots_in_use")?
        );
        std::mem::forget(map);
        Ok(())
    })();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = daemon.wait()?;
    println!("memshadowd stopped: {status}");
    let _ = std::fs::remove_dir_all(&dir);
    result
}
