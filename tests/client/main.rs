//! `test-client`: a real memshadow client process for the integration tests, driven one
//! command per line on stdin, answering one line (`ok ...` / `err ...`) on stdout.
//! Usage: `test-client SOCKET [--uid UID]` (`--uid`: drop to that uid and gid first, as an
//! unprivileged client would run).

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memshadow::{Client, Error, Mirror, Policy, SyncReport};

const P: usize = 4096;

/// A mapping of this process.
struct Map {
    addr: usize,
    len: usize,
    /// The memfd behind a shared map (`shm`), for hole punches and truncation.
    fd: Option<std::os::fd::OwnedFd>,
}

impl Map {
    fn new(pages: usize, shared: bool) -> Result<Map, String> {
        let len = pages * P;
        let (flags, fd) = if shared {
            let fd = nix::sys::memfd::memfd_create(
                "test-client",
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )
            .map_err(|e| e.to_string())?;
            nix::unistd::ftruncate(&fd, len as i64).map_err(|e| e.to_string())?;
            (libc::MAP_SHARED, Some(fd))
        } else {
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
        };
        let raw = fd.as_ref().map_or(-1, std::os::fd::AsRawFd::as_raw_fd);
        // SAFETY: a fresh mapping chosen by the kernel; nothing refers to it yet.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Map {
            addr: p as usize,
            len,
            fd,
        })
    }

    /// A 2 MiB-aligned anonymous mapping with `MADV_HUGEPAGE`, so it can be backed by
    /// transparent huge pages (the slack around it stays mapped and unused).
    fn new_thp(pages: usize) -> Result<Map, String> {
        const HUGE: usize = 2 << 20;
        let len = pages * P;
        // SAFETY: a fresh anonymous reservation chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let m = Map {
            addr: (p as usize).next_multiple_of(HUGE),
            len,
            fd: None,
        };
        m.madvise(libc::MADV_HUGEPAGE)?;
        Ok(m)
    }

    /// Writes `len` bytes of `byte` at `off` (a plain CPU write).
    fn write(&self, off: usize, len: usize, byte: u8) -> Result<(), String> {
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Err("outside the map".into());
        }
        // SAFETY: inside our own writable mapping (checked above).
        unsafe { std::ptr::write_bytes((self.addr + off) as *mut u8, byte, len) };
        Ok(())
    }

    /// Writes `len` bytes of `byte` at `off` through the kernel: `read(2)` from a pipe into
    /// the mapping (a kernel access, which a write-protected page of a user-mode-only uffd
    /// would fail with `EFAULT`).
    fn kernel_write(&self, off: usize, len: usize, byte: u8) -> Result<(), String> {
        if off.checked_add(len).is_none_or(|e| e > self.len) || len > 65536 {
            return Err("outside the map, or more than a pipe holds".into());
        }
        let (r, w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
        nix::unistd::write(&w, &vec![byte; len]).map_err(|e| e.to_string())?;
        let mut done = 0;
        while done < len {
            // SAFETY: the destination is inside our own writable mapping (checked above).
            let n = unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(&r),
                    (self.addr + off + done) as *mut libc::c_void,
                    len - done,
                )
            };
            if n <= 0 {
                return Err(format!(
                    "read(2) into the mapping: {}",
                    std::io::Error::last_os_error()
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// `AnonHugePages` of the mapping's VMA, in kB (from `/proc/self/smaps`).
    fn anon_huge_kb(&self) -> Result<u64, String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(|e| e.to_string())?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a <= self.addr && self.addr < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("AnonHugePages:") {
                    return v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse()
                        .map_err(|e| format!("{e}"));
                }
            }
        }
        Err("mapping not found in smaps".into())
    }

    fn fill(&self, byte: u8) {
        // SAFETY: the mapping is ours, writable and `len` bytes long.
        unsafe { std::ptr::write_bytes(self.addr as *mut u8, byte, self.len) };
    }

    fn madvise(&self, advice: libc::c_int) -> Result<(), String> {
        // SAFETY: advice on our own mapping.
        match unsafe { libc::madvise(self.addr as *mut libc::c_void, self.len, advice) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error().to_string()),
        }
    }

    fn unmap(&self) -> Result<(), String> {
        // SAFETY: unmaps our own mapping; callers never touch it afterwards.
        match unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error().to_string()),
        }
    }

    /// Moves the mapping elsewhere (to a fresh reservation).
    fn remap(&mut self) -> Result<(), String> {
        let target = Map::new(self.len / P, false)?;
        // SAFETY: moves our own mapping over our own reservation of the same size.
        let p = unsafe {
            libc::mremap(
                self.addr as *mut libc::c_void,
                self.len,
                self.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target.addr as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().to_string());
        }
        self.addr = p as usize;
        Ok(())
    }
}

/// What a device read returned, summarised: `Some(byte)` if uniform, error text otherwise.
fn read_summary(m: &Mirror, offset: u64, len: usize) -> Result<Option<u8>, Error> {
    let mut buf = vec![0u8; len];
    m.read(offset, &mut buf)?;
    Ok(buf.iter().all(|b| *b == buf[0]).then_some(buf[0]))
}

/// One G1 round of `kind`: stamp, read through the device, change the mapping, read at once.
/// Returns Err(description) on a violation (old bytes after the change).
///
/// `concurrent`: other threads of this process change mappings at the same time. Then a
/// mirror moved by mremap may be refused (`NotMirrored`) instead of followed: the kernel
/// queues the `UNMAP` of another thread's earlier mremap source after letting go of the
/// address space, so it can arrive after this thread's `REMAP` into that very range, and
/// the daemon cannot tell it from an unmap of the moved mapping (README, "Limits").
fn g1_round(c: &Client, kind: &str, stamp: u8, concurrent: bool) -> Result<(), String> {
    let shared = kind == "remove";
    let mut map = Map::new(4, shared)?;
    map.fill(stamp);
    let m = c
        .attach(map.addr as *const u8, map.len)
        .map_err(|e| e.to_string())?;
    match read_summary(&m, 0, 4 * P) {
        Ok(Some(b)) if b == stamp => {}
        other => return Err(format!("first read {other:?}, want {stamp}")),
    }
    let after = match kind {
        "munmap" => {
            map.unmap()?;
            read_summary(&m, P as u64, 64)
        }
        "dontneed" => {
            map.madvise(libc::MADV_DONTNEED)?;
            read_summary(&m, P as u64, 64)
        }
        "remove" => {
            map.madvise(libc::MADV_REMOVE)?;
            read_summary(&m, P as u64, 64)
        }
        "mremap" => {
            map.remap()?;
            // New bytes at the new place: a read must see them, never the cached stamp.
            map.fill(stamp.wrapping_add(1));
            read_summary(&m, P as u64, 64)
        }
        k => return Err(format!("unknown kind {k}")),
    };
    // The mirror covers the whole mapping, so it follows an mremap: a read after it has the
    // new bytes (G1 orders the lookup of the mirror behind the event too).
    let ok = match (&after, kind) {
        (Err(Error::NotMirrored(_)), "munmap") => true,
        (Err(Error::NotMirrored(_)), "mremap") => concurrent,
        (Ok(Some(0)), "dontneed" | "remove") => true,
        (Ok(Some(b)), "mremap") => *b == stamp.wrapping_add(1),
        _ => false,
    };
    if kind != "munmap" {
        let _ = map.unmap();
    }
    drop(m);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind}: read after the change returned {after:?} (stamp {stamp})"
        ))
    }
}

struct Churn {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    iterations: Arc<AtomicU64>,
    max_us: Arc<AtomicU64>,
}

fn sync_answer(r: Result<SyncReport, Error>) -> Result<String, String> {
    let r = r.map_err(|e| e.to_string())?;
    Ok(format!(
        "backend={} mirrors={} pages_scanned={} pages_dirty={} regions={} scan_ns={}",
        r.backend.as_str(),
        r.mirrors,
        r.pages_scanned,
        r.pages_dirty,
        r.regions,
        r.scan_ns
    ))
}

fn policy(s: &str) -> Result<Policy, String> {
    match s {
        "manual" => Ok(Policy::Manual),
        "lazy" => Ok(Policy::Lazy),
        "strict" => Ok(Policy::Strict),
        _ => s
            .strip_prefix("periodic=")
            .and_then(|ms| ms.parse().ok())
            .map(|ms| Policy::Periodic(Duration::from_millis(ms)))
            .ok_or(format!("unknown policy {s}")),
    }
}

/// Drops to `uid` (and the same gid) like an unprivileged client, staying dumpable so the
/// process may open its own `/proc/self/mem` and `pagemap` (docs/design.md §7).
fn become_uid(uid: u32) -> Result<(), String> {
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).map_err(|e| format!("setgid: {e}"))?;
    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(|e| format!("setuid: {e}"))?;
    nix::sys::prctl::set_dumpable(true).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let socket = args
        .get(1)
        .cloned()
        .ok_or("usage: test-client SOCKET [--uid UID]")?;
    if let Some(i) = args.iter().position(|a| a == "--uid") {
        let uid = args
            .get(i + 1)
            .and_then(|u| u.parse().ok())
            .ok_or("--uid takes a number")?;
        become_uid(uid)?;
    }
    if let Some(i) = args.iter().position(|a| a == "--engine") {
        let how = args.get(i + 1).ok_or("--engine takes a token")?;
        let ack_delay = args
            .iter()
            .position(|a| a == "--ack-delay-ms")
            .and_then(|i| args.get(i + 1))
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis);
        return engine_main(&socket, how, ack_delay);
    }
    let device_writes = args.iter().any(|a| a == "--device-writes");
    let mut client = Client::builder()
        .socket(&socket)
        .device_writes(device_writes)
        .connect()
        .map_err(|e| format!("connect: {e}"))?;
    let mut maps: HashMap<String, (Map, Option<Mirror>)> = HashMap::new();
    // More mirrors of parts of the maps, by name (overlapping the maps' own mirrors).
    let mut subs: HashMap<String, Mirror> = HashMap::new();
    let mut second: Option<Client> = None;
    let mut churn: Option<Churn> = None;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let answer: Result<String, String> = (|| {
            let arg = |i: usize| w.get(i).copied().ok_or(format!("missing argument {i}"));
            let num = |i: usize| -> Result<u64, String> {
                arg(i)?.parse::<u64>().map_err(|e| e.to_string())
            };
            Ok(match arg(0)? {
                "ping" => String::new(),
                "map" => {
                    let pages = num(2)? as usize;
                    let m = match arg(3).unwrap_or("anon") {
                        "thp" => Map::new_thp(pages)?,
                        kind => Map::new(pages, kind == "shm")?,
                    };
                    let a = format!("addr={:#x}", m.addr);
                    maps.insert(arg(1)?.into(), (m, None));
                    a
                }
                "fill" => {
                    maps.get(arg(1)?)
                        .ok_or("no such map")?
                        .0
                        .fill(num(2)? as u8);
                    String::new()
                }
                "attach" => {
                    let (m, mirror) = maps.get_mut(arg(1)?).ok_or("no such map")?;
                    let x = client
                        .attach(m.addr as *const u8, m.len)
                        .map_err(|e| e.to_string())?;
                    let id = x.id();
                    *mirror = Some(x);
                    format!("id={id}")
                }
                "attach-raw" => {
                    let addr = u64::from_str_radix(arg(1)?.trim_start_matches("0x"), 16)
                        .map_err(|e| e.to_string())?;
                    let m = client
                        .attach(addr as *const u8, num(2)? as usize)
                        .map_err(|e| e.to_string())?;
                    format!("id={}", m.id())
                }
                "attach-policy" => {
                    let (m, mirror) = maps.get_mut(arg(1)?).ok_or("no such map")?;
                    let x = client
                        .attach_with(m.addr as *const u8, m.len, policy(arg(2)?)?)
                        .map_err(|e| e.to_string())?;
                    let id = x.id();
                    *mirror = Some(x);
                    format!("id={id}")
                }
                "write" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    m.write(num(2)? as usize, num(3)? as usize, num(4)? as u8)?;
                    String::new()
                }
                "kernel-write" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    m.kernel_write(num(2)? as usize, num(3)? as usize, num(4)? as u8)?;
                    String::new()
                }
                "sync" => {
                    let (_, mirror) = maps.get(arg(1)?).ok_or("no such map")?;
                    sync_answer(mirror.as_ref().ok_or("not attached")?.sync())?
                }
                "sync-all" => sync_answer(client.sync())?,
                "sync-pid" => sync_answer(
                    client
                        .control()
                        .sync_pid(arg(1)?.parse::<i32>().map_err(|e| e.to_string())?),
                )?,
                "thp" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    format!("anon_huge_kb={}", m.anon_huge_kb()?)
                }
                "map-file" => {
                    // A shared mapping of a regular file at PATH (created, PAGES pages).
                    let path = arg(2)?;
                    let len = num(3)? as usize * P;
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(path)
                        .map_err(|e| e.to_string())?;
                    f.set_len(len as u64).map_err(|e| e.to_string())?;
                    // SAFETY: a fresh shared mapping of our own file, chosen by the kernel.
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            len,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_SHARED,
                            std::os::fd::AsRawFd::as_raw_fd(&f),
                            0,
                        )
                    };
                    if p == libc::MAP_FAILED {
                        return Err(std::io::Error::last_os_error().to_string());
                    }
                    let m = Map {
                        addr: p as usize,
                        len,
                        fd: Some(f.into()),
                    };
                    let a = format!("addr={:#x}", m.addr);
                    maps.insert(arg(1)?.into(), (m, None));
                    a
                }
                "attach-sub" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    let (off, len) = (num(2)? as usize, num(3)? as usize);
                    if off.checked_add(len).is_none_or(|e| e > m.len) {
                        return Err("outside the map".into());
                    }
                    let x = client
                        .attach((m.addr + off) as *const u8, len)
                        .map_err(|e| e.to_string())?;
                    let id = x.id();
                    subs.insert(arg(4)?.into(), x);
                    format!("id={id}")
                }
                "read-sub" => {
                    let m = subs.get(arg(1)?).ok_or("no such sub-mirror")?;
                    match read_summary(m, num(2)?, num(3)? as usize) {
                        Ok(Some(b)) => format!("uniform={b}"),
                        Ok(None) => "uniform=no".into(),
                        Err(Error::NotMirrored(_)) => return Err("NotMirrored".into()),
                        Err(e) => return Err(e.to_string()),
                    }
                }
                "stamp" => {
                    // Page i of the map gets byte i*32 + 1 + K%31: a page's bytes name it.
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    let k = num(2)?;
                    for i in 0..m.len / P {
                        m.write(i * P, P, stamp_byte(i as u64, k))?;
                    }
                    String::new()
                }
                "remap" => {
                    let (m, _) = maps.get_mut(arg(1)?).ok_or("no such map")?;
                    m.remap()?;
                    format!("addr={:#x}", m.addr)
                }
                "grant" => {
                    let (_, mirror) = maps.get(arg(1)?).ok_or("no such map")?;
                    let t = mirror
                        .as_ref()
                        .ok_or("not attached")?
                        .grant()
                        .map_err(|e| e.to_string())?;
                    format!("token={t:032x}")
                }
                "byte" => {
                    // A byte of this process's own memory (what the CPU sees).
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    let off = num(2)? as usize;
                    if off >= m.len {
                        return Err("outside the map".into());
                    }
                    // SAFETY: a byte inside our own mapping.
                    let b = unsafe { std::ptr::read_volatile((m.addr + off) as *const u8) };
                    format!("byte={b}")
                }
                "detach" => {
                    let (_, mirror) = maps.get_mut(arg(1)?).ok_or("no such map")?;
                    mirror
                        .take()
                        .ok_or("not attached")?
                        .detach()
                        .map_err(|e| e.to_string())?;
                    String::new()
                }
                "detach-sub" => {
                    let m = subs.remove(arg(1)?).ok_or("no such sub-mirror")?;
                    m.detach().map_err(|e| e.to_string())?;
                    String::new()
                }
                "second-session-attach" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    if second.is_none() {
                        second = Some(
                            Client::connect_to(socket.as_ref())
                                .map_err(|e| format!("connect: {e}"))?,
                        );
                    }
                    let c2 = second.as_ref().ok_or("no second session")?;
                    let x = c2
                        .attach(m.addr as *const u8, m.len)
                        .map_err(|e| e.to_string())?;
                    let id = x.id();
                    std::mem::forget(x);
                    format!("id={id}")
                }
                "mprotect" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    let (off, len) = (num(2)? as usize, num(3)? as usize);
                    let prot = match arg(4)? {
                        "none" => libc::PROT_NONE,
                        "r" => libc::PROT_READ,
                        "rw" => libc::PROT_READ | libc::PROT_WRITE,
                        p => return Err(format!("unknown protection {p}")),
                    };
                    if off.checked_add(len).is_none_or(|e| e > m.len) {
                        return Err("outside the map".into());
                    }
                    // SAFETY: our own mapping; the protection is ours to choose.
                    if unsafe { libc::mprotect((m.addr + off) as *mut libc::c_void, len, prot) }
                        != 0
                    {
                        return Err(std::io::Error::last_os_error().to_string());
                    }
                    String::new()
                }
                "punch" | "truncate" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    let fd = m.fd.as_ref().ok_or("not a shared (memfd) map")?;
                    let (off, len) = (num(2)? as i64, num(3).unwrap_or(0) as i64);
                    let r = if arg(0)? == "punch" {
                        nix::fcntl::fallocate(
                            fd,
                            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                            off,
                            len,
                        )
                    } else {
                        nix::unistd::ftruncate(fd, off)
                    };
                    r.map_err(|e| e.to_string())?;
                    String::new()
                }
                "unmap-page" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    let off = num(2)? as usize;
                    if off >= m.len {
                        return Err("outside the map".into());
                    }
                    // SAFETY: one page of our own mapping, which nothing else uses.
                    unsafe { libc::munmap((m.addr + off) as *mut libc::c_void, P) };
                    String::new()
                }
                "madvise-range" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    let (off, len) = (num(2)? as usize, num(3)? as usize);
                    if off.checked_add(len).is_none_or(|e| e > m.len) {
                        return Err("outside the map".into());
                    }
                    let part = Map {
                        addr: m.addr + off,
                        len,
                        fd: None,
                    };
                    part.madvise(libc::MADV_DONTNEED)?;
                    String::new()
                }
                "mirror-pages" => {
                    let (_, mirror) = maps.get(arg(1)?).ok_or("no such map")?;
                    let id = mirror.as_ref().ok_or("not attached")?.id();
                    let list = client.list_mirrors().map_err(|e| e.to_string())?;
                    let m = list
                        .iter()
                        .find(|m| m.id == id)
                        .ok_or("mirror not listed")?;
                    format!("pages={} state={}", m.pages, m.state.replace(' ', "_"))
                }
                "populate" => {
                    let (m, mirror) = maps.get(arg(1)?).ok_or("no such map")?;
                    let pages = mirror
                        .as_ref()
                        .ok_or("not attached")?
                        .populate(0, m.len as u64)
                        .map_err(|e| e.to_string())?;
                    format!("pages={pages}")
                }
                "read" => {
                    let (_, mirror) = maps.get(arg(1)?).ok_or("no such map")?;
                    match read_summary(
                        mirror.as_ref().ok_or("not attached")?,
                        num(2)?,
                        num(3)? as usize,
                    ) {
                        Ok(Some(b)) => format!("uniform={b}"),
                        Ok(None) => "uniform=no".into(),
                        Err(Error::NotMirrored(_)) => return Err("NotMirrored".into()),
                        Err(e) => return Err(e.to_string()),
                    }
                }
                "munmap" => {
                    let (m, mirror) = maps.remove(arg(1)?).ok_or("no such map")?;
                    m.unmap()?;
                    // The mirror's range is gone; forget the handle without a detach.
                    std::mem::forget(mirror);
                    String::new()
                }
                "madvise" => {
                    let advice = if arg(2)? == "remove" {
                        libc::MADV_REMOVE
                    } else {
                        libc::MADV_DONTNEED
                    };
                    maps.get(arg(1)?).ok_or("no such map")?.0.madvise(advice)?;
                    String::new()
                }
                "stats" => {
                    let s = client.stats().map_err(|e| e.to_string())?;
                    s.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
                "g1" => {
                    let (kind, rounds) = (arg(1)?, num(2)?);
                    for r in 0..rounds {
                        g1_round(&client, kind, (r % 250) as u8 + 1, false)?;
                    }
                    format!("rounds={rounds}")
                }
                "stress" => {
                    let all = ["munmap", "dontneed", "mremap", "remove"];
                    let kinds: Vec<&'static str> = match w.get(3) {
                        Some(list) => all
                            .iter()
                            .copied()
                            .filter(|k| list.split(',').any(|x| x == *k))
                            .collect(),
                        None => all.to_vec(),
                    };
                    stress(&client, num(1)? as usize, num(2)?, &kinds)?
                }
                "multi" => multi(&socket, num(1)? as usize, num(2)?)?,
                "dontneed-stress" => dontneed_stress(
                    &client,
                    num(1)? as usize,
                    num(2)?,
                    num(3)? as usize,
                    w.get(4).copied().unwrap_or("anon"),
                )?,
                "churn-start" => {
                    let (m, _) = maps.get(arg(1)?).ok_or("no such map")?;
                    let (addr, len) = (m.addr, m.len);
                    let c = Churn {
                        stop: Arc::default(),
                        done: Arc::default(),
                        iterations: Arc::default(),
                        max_us: Arc::default(),
                    };
                    let (stop, done, it, max) = (
                        c.stop.clone(),
                        c.done.clone(),
                        c.iterations.clone(),
                        c.max_us.clone(),
                    );
                    std::thread::spawn(move || {
                        while !stop.load(Relaxed) {
                            let t = Instant::now();
                            // SAFETY: advice on our own mapping, which stays mapped.
                            unsafe {
                                libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED)
                            };
                            max.fetch_max(t.elapsed().as_micros() as u64, Relaxed);
                            it.fetch_add(1, Relaxed);
                        }
                        done.store(true, Relaxed);
                    });
                    churn = Some(c);
                    String::new()
                }
                "churn-progress" => {
                    let c = churn.as_ref().ok_or("no churn")?;
                    format!("iterations={}", c.iterations.load(Relaxed))
                }
                "churn-stop" => {
                    let c = churn.take().ok_or("no churn")?;
                    c.stop.store(true, Relaxed);
                    // A thread still in madvise after 5 s is stuck (the answer says so).
                    let _ = memshadow_tests::try_wait_until(Duration::from_secs(5), || {
                        c.done.load(Relaxed)
                    });
                    format!(
                        "iterations={} max_us={} stuck={}",
                        c.iterations.load(Relaxed),
                        c.max_us.load(Relaxed),
                        u8::from(!c.done.load(Relaxed))
                    )
                }
                "reconnect" => {
                    // A new session (e.g. after the daemon restarted); old mirrors are dropped.
                    for (_, m) in maps.values_mut() {
                        m.take();
                    }
                    client =
                        Client::connect_to(socket.as_ref()).map_err(|e| format!("connect: {e}"))?;
                    String::new()
                }
                // `features`: the uffd features the daemon enabled for this client.
                "access" => format!(
                    "access={} features={:#x}",
                    client.access_path().map_or("none", |a| a.as_str()),
                    client.uffd_features()
                ),
                "limits" => {
                    let l = client.limits();
                    format!(
                        "mirrors={} shadow_bytes={} inflight={} clients_per_uid={}",
                        l.mirrors, l.shadow_bytes, l.inflight, l.clients_per_uid
                    )
                }
                "fork" => {
                    // A child that exits at once: with fork events the daemon sees a FORK.
                    // SAFETY: the child only calls _exit (async-signal-safe).
                    match unsafe { libc::fork() } {
                        -1 => return Err(std::io::Error::last_os_error().to_string()),
                        // SAFETY: ends the child without running anything of the parent's.
                        0 => unsafe { libc::_exit(0) },
                        child => {
                            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)
                                .map_err(|e| e.to_string())?;
                            format!("child={child}")
                        }
                    }
                }
                // `setname HEX`: names this process (prctl PR_SET_NAME, at most 15 bytes,
                // shown in /proc/PID/comm); hex so any byte can cross this line protocol.
                "setname" => {
                    let hex = arg(1)?;
                    let bytes = (0..hex.len())
                        .step_by(2)
                        .map(|i| {
                            hex.get(i..i + 2)
                                .and_then(|b| u8::from_str_radix(b, 16).ok())
                                .ok_or(format!("not hex: {hex}"))
                        })
                        .collect::<Result<Vec<u8>, String>>()?;
                    let name = std::ffi::CString::new(bytes).map_err(|e| e.to_string())?;
                    nix::sys::prctl::set_name(&name).map_err(|e| format!("PR_SET_NAME: {e}"))?;
                    String::new()
                }
                "exit" => std::process::exit(0),
                other => return Err(format!("unknown command {other}")),
            })
        })();
        match answer {
            Ok(a) => println!("ok {a}"),
            Err(e) => println!("err {e}"),
        }
    }
    Ok(())
}

/// G1 under stress: `threads` threads churn their own mappings (munmap, madvise, mremap in
/// turn), checking every read after a change, while two more threads keep reading a stable
/// mirror whose content must never change.
fn stress(
    c: &Client,
    threads: usize,
    rounds: u64,
    kinds: &[&'static str],
) -> Result<String, String> {
    let stable = Map::new(16, false)?;
    stable.fill(0x5a);
    let sm = Arc::new(
        c.attach(stable.addr as *const u8, stable.len)
            .map_err(|e| e.to_string())?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let (sm, stop, reads) = (sm.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut k = i;
                while !stop.load(Relaxed) {
                    match read_summary(&sm, ((k % 16) * P) as u64, P) {
                        Ok(Some(0x5a)) => {}
                        other => return Err(format!("stable mirror read {other:?}")),
                    }
                    k += 1;
                    reads.fetch_add(1, Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let kinds: Vec<&'static str> = kinds.to_vec();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let c = c.clone();
            let kinds = kinds.clone();
            std::thread::spawn(move || -> Result<(), String> {
                for r in 0..rounds {
                    let kind = kinds[(r as usize + t) % kinds.len()];
                    g1_round(&c, kind, ((r + t as u64) % 250) as u8 + 1, threads > 1)?;
                }
                Ok(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for w in workers {
        if let Err(e) = w
            .join()
            .map_err(|_| "a worker panicked".to_string())
            .and_then(|r| r)
        {
            errors.push(e);
        }
    }
    stop.store(true, Relaxed);
    for r in readers {
        if let Err(e) = r
            .join()
            .map_err(|_| "a reader panicked".to_string())
            .and_then(|r| r)
        {
            errors.push(e);
        }
    }
    if let Some(e) = errors.first() {
        return Err(format!("{} violations, first: {e}", errors.len()));
    }
    Ok(format!(
        "rounds={} stable_reads={}",
        rounds * threads as u64,
        reads.load(Relaxed)
    ))
}

/// The stamp of round `r` in page `p`: the round and the page, so a page read elsewhere, or
/// a round's leftovers, both show.
fn stamp(r: u64, p: usize) -> u64 {
    (r << 32) | p as u64 | 1 << 63
}

/// G1 for `madvise` under load: `pages` pages (`anon`: private anonymous, cleared with
/// `MADV_DONTNEED`; or `shm`: a shared memfd, cleared with `MADV_REMOVE`), stamped per page
/// and round, attached; `readers` threads keep faulting random pages in through the device
/// while the main thread, each round, stamps every page, `madvise`s the whole range and
/// then reads every page through the device: each must read zeros. The readers check their
/// side: a read issued after round `d`'s `madvise` returned never sees a stamp of round `d`
/// or earlier. (The kernel announces these changes before it makes them: a fault between
/// the two must not keep the old bytes.)
fn dontneed_stress(
    c: &Client,
    pages: usize,
    rounds: u64,
    readers: usize,
    kind: &str,
) -> Result<String, String> {
    let shared = kind == "shm";
    let map = Map::new(pages, shared)?;
    let mirror = Arc::new(
        c.attach(map.addr as *const u8, map.len)
            .map_err(|e| e.to_string())?,
    );
    // The last round whose madvise returned (0: none yet).
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicU64::new(0));
    let first_stale = Arc::new(std::sync::Mutex::new(None::<String>));
    let reads = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..readers)
        .map(|t| {
            let (m, done, stop, stale, first, reads) = (
                mirror.clone(),
                done.clone(),
                stop.clone(),
                stale.clone(),
                first_stale.clone(),
                reads.clone(),
            );
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                let mut buf = [0u8; 8];
                while !stop.load(Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x % pages as u64) as usize;
                    let d = done.load(std::sync::atomic::Ordering::SeqCst);
                    if m.read((p * P) as u64, &mut buf).is_err() {
                        continue;
                    }
                    reads.fetch_add(1, Relaxed);
                    let v = u64::from_le_bytes(buf);
                    let round = (v >> 32) & 0x7fff_ffff;
                    if v != 0 && round <= d {
                        stale.fetch_add(1, Relaxed);
                        first.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(
                            format!("reader: page {p} read round {round} after round {d}'s madvise returned"),
                        );
                    }
                }
            })
        })
        .collect();
    let mut checked = 0u64;
    let mut chunk = vec![0u8; 15 * P];
    for r in 1..=rounds {
        for p in 0..pages {
            // SAFETY: inside our own writable mapping.
            unsafe { ((map.addr + p * P) as *mut u64).write_volatile(stamp(r, p)) };
        }
        map.madvise(if shared {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        })?;
        done.store(r, std::sync::atomic::Ordering::SeqCst);
        // Every page, through the device, after the madvise returned.
        for first in (0..pages).step_by(15) {
            let n = 15.min(pages - first);
            let buf = &mut chunk[..n * P];
            mirror
                .read((first * P) as u64, buf)
                .map_err(|e| format!("round {r}: read of pages {first}..: {e}"))?;
            for i in 0..n {
                let v = u64::from_le_bytes(buf[i * P..i * P + 8].try_into().unwrap_or([0; 8]));
                checked += 1;
                if v != 0 {
                    stale.fetch_add(1, Relaxed);
                    first_stale
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert(format!(
                            "round {r}: page {} read {v:#x} after the madvise returned",
                            first + i
                        ));
                }
            }
        }
    }
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let n = stale.load(Relaxed);
    if n > 0 {
        let first = first_stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        return Err(format!("{n} stale reads, first: {first}"));
    }
    Ok(format!(
        "rounds={rounds} checked={checked} reader_reads={}",
        reads.load(Relaxed)
    ))
}

/// `n` more sessions of this process, each attaching its own range and churning it.
fn multi(socket: &str, n: usize, rounds: u64) -> Result<String, String> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let socket = socket.to_owned();
            std::thread::spawn(move || -> Result<u64, String> {
                let c = Client::connect_to(socket.as_ref()).map_err(|e| format!("connect: {e}"))?;
                let mut events = 0;
                for r in 0..rounds {
                    let kind = if (r + i as u64) % 2 == 0 {
                        "dontneed"
                    } else {
                        "munmap"
                    };
                    g1_round(&c, kind, (r % 250) as u8 + 1, false)?;
                    events += 1;
                }
                Ok(events)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| "a session thread panicked".to_string())??;
    }
    Ok(format!("sessions={n} changes={total}"))
}

/// The byte `stamp` writes in page `page` in round `k` (`page` < 8): its top three bits
/// name the page, so a page showing another page's byte came from a reused slot (G2).
fn stamp_byte(page: u64, k: u64) -> u8 {
    (page * 32 + 1 + k % 31) as u8
}

/// An external engine of another client's mirror (`test-client SOCKET --engine TOKEN`,
/// token in hex, or `--engine pid:PID:MIRROR`), driven by lines on stdin:
/// `ping` (answers `engine=ID`), `read OFF LEN` (answers `uniform=B`, `bytes=B0,B1,…` for a mixed read, or the error),
/// `write OFF LEN BYTE`, `poll`, `stats`, `exit`.
fn engine_main(socket: &str, how: &str, ack_delay: Option<Duration>) -> Result<(), String> {
    let path = std::path::Path::new(socket);
    let mut e = match how.strip_prefix("pid:") {
        Some(rest) => {
            let (pid, mirror) = rest.split_once(':').ok_or("pid:PID:MIRROR")?;
            let pid = pid.parse().map_err(|e| format!("{e}"))?;
            let mirror = mirror.parse().map_err(|e| format!("{e}"))?;
            memshadow::Engine::attach_pid(Some(path), pid, mirror)
        }
        None => {
            let t = u128::from_str_radix(how, 16).map_err(|e| format!("token: {e}"))?;
            memshadow::Engine::attach(Some(path), t)
        }
    }
    .map_err(|e| format!("attach: {e}"))?;
    // Lines come from a reader thread, so that between commands the engine serves its
    // doorbell (acknowledges flushes) as an engine must, or it would be evicted.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (wake_r, wake_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() || nix::unistd::write(&wake_w, b"x").is_err() {
                break;
            }
        }
        // stdin closed: wake the loop, which then exits.
        drop(tx);
        let _ = nix::unistd::write(&wake_w, b"x");
    });
    loop {
        use std::os::fd::AsFd;
        let mut fds = [
            nix::poll::PollFd::new(e.fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(wake_r.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let doorbell = fds[0].any().unwrap_or(false);
        let woken = fds[1].any().unwrap_or(false);
        if doorbell {
            // A slow engine: it acknowledges only `--ack-delay-ms` after the doorbell rang.
            if let Some(d) = ack_delay {
                std::thread::sleep(d);
            }
            // An evicted engine keeps running: its next command says so.
            let _ = e.poll();
        }
        if !woken {
            continue;
        }
        let mut b = [0u8; 1];
        let _ = nix::unistd::read(&wake_r, &mut b);
        let line = match rx.try_recv() {
            Ok(l) => l,
            Err(std::sync::mpsc::TryRecvError::Empty) => continue,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(()),
        };
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<u64, String> {
            w.get(i)
                .ok_or(format!("missing argument {i}"))?
                .parse::<u64>()
                .map_err(|e| e.to_string())
        };
        let answer: Result<String, String> = (|| match w.first().copied() {
            Some("ping") => Ok(format!("engine={}", e.engine_id())),
            Some("read") => {
                let mut buf = vec![0u8; num(2)? as usize];
                e.read(num(1)?, &mut buf).map_err(|e| e.to_string())?;
                Ok(if buf.iter().all(|b| *b == buf[0]) {
                    format!("uniform={}", buf.first().copied().unwrap_or(0))
                } else {
                    let v: Vec<String> = buf.iter().map(u8::to_string).collect();
                    format!("bytes={}", v.join(","))
                })
            }
            Some("write") => {
                let buf = vec![num(3)? as u8; num(2)? as usize];
                let n = e.write(num(1)?, &buf).map_err(|e| e.to_string())?;
                Ok(format!("written={n}"))
            }
            Some("poll") => e.poll().map(|_| String::new()).map_err(|e| e.to_string()),
            Some("verify") => {
                // Reads pages 0..N, ROUNDS times: a page shows 0 or its own stamp, never
                // another page's (a reused slot read through a stale translation).
                let (pages, rounds) = (num(1)?, num(2)?);
                let mut page = vec![0u8; P];
                let (mut bad, mut reads) = (0u64, 0u64);
                for _ in 0..rounds {
                    for i in 0..pages {
                        if e.read(i * P as u64, &mut page).is_err() {
                            continue;
                        }
                        reads += 1;
                        if page.iter().any(|b| *b != 0 && u64::from(*b) / 32 != i) {
                            bad += 1;
                        }
                    }
                }
                Ok(format!("reads={reads} foreign={bad}"))
            }
            Some("stats") => {
                let s = e.stats();
                Ok(format!(
                    "tlb_hits={} tlb_misses={} faults={} flushes={} retries={}",
                    s.tlb_hits, s.tlb_misses, s.faults, s.flushes_processed, s.retries
                ))
            }
            Some("exit") => std::process::exit(0),
            _ => Err(format!("unknown engine command {line:?}")),
        })();
        match answer {
            Ok(a) => println!("ok {a}"),
            Err(e) => println!("err {e}"),
        }
    }
}

fn main() {
    if let Err(e) = run() {
        println!("err {e}");
        std::process::exit(1);
    }
}
