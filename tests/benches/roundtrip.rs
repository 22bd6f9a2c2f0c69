//! `roundtrip`: what memshadowd costs a client's `madvise`/`munmap` (docs/design.md §5 G1, §7),
//! against no userfaultfd at all and against a bare in-process uffd reader; plus device-read
//! latency, and fault-in bandwidth against bare copies by `pread` of `/proc/self/mem` (the
//! daemon's one access path) and by `process_vm_readv`.
//!
//! Run: `cargo build --release -p memshadow-daemon && cargo bench -p memshadow-tests --bench
//! roundtrip -- --quick`. Prints a table and writes `target/memshadow-bench/roundtrip.json`.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memshadow::{Client, Mirror};
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn Error>>;

#[path = "bench_daemon.rs"]
mod bench_daemon;
use bench_daemon::{BenchPaths, Daemon};
use memshadow_tests::{percentiles as stats, Percentiles as Stats};

const RANGE: usize = 64 << 10;
const WARMUP: usize = 50;
const FLUSH_LATENCY_US: u64 = 100;
const GOAL: f64 = 1.25;

// userfaultfd ABI (linux/userfaultfd.h).
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFD_MSG_SIZE: usize = 32;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

fn page_size() -> usize {
    // SAFETY: sysconf with a valid name has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// A fresh private anonymous mapping of `len` bytes.
fn map_anon(len: usize) -> Res<*mut u8> {
    Ok(memshadow_tests::map_anon(len).map_err(|e| format!("mmap of {len} bytes: {e}"))?)
}

/// Writes one byte per page of `ptr..ptr+len` (a mapping this program made and still owns).
fn touch(ptr: *mut u8, len: usize, page: usize, val: u8) {
    for off in (0..len).step_by(page) {
        // SAFETY: `ptr..ptr+len` is a live read-write mapping of ours; no reference to it
        // exists, so a volatile byte write cannot alias anything.
        unsafe { ptr.wrapping_add(off).write_volatile(val) };
    }
}

fn madvise_dontneed(ptr: *mut u8, len: usize) -> Res<()> {
    // SAFETY: discards pages of a mapping that only this program uses, through raw
    // pointers; no Rust reference points into it.
    let r = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) };
    if r != 0 {
        return Err(format!("madvise: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

fn unmap(ptr: *mut u8, len: usize) -> Res<()> {
    // SAFETY: `ptr..ptr+len` is a mapping this program made; it is never used again.
    let r = unsafe { libc::munmap(ptr.cast(), len) };
    if r != 0 {
        return Err(format!("munmap: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// Times `op` (the syscall alone), in microseconds.
fn timed(op: impl FnOnce() -> Res<()>) -> Res<f64> {
    let t = Instant::now();
    op()?;
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// Runs `WARMUP` unrecorded then `iters` recorded iterations of `one` (which returns the
/// timed part of one iteration, in µs).
fn run(iters: usize, mut one: impl FnMut() -> Res<f64>) -> Res<Stats> {
    for _ in 0..WARMUP {
        one()?;
    }
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        v.push(one()?);
    }
    Ok(stats(v))
}

// ---------------------------------------------------------------------------------------
// Processes and files.

/// A temporary directory removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the daemon the latency and bandwidth rows measure, at `socket`.
fn start_daemon(bin: &Path, socket: PathBuf) -> Res<Daemon> {
    let mut cmd = Command::new(bin);
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--flush-latency-us", &FLUSH_LATENCY_US.to_string()])
        .env("MEMSHADOW_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Daemon::start("roundtrip", cmd, socket, " (its log is above)")
}

// ---------------------------------------------------------------------------------------
// The bare in-process reader.

/// A userfaultfd of this process with one thread that only `poll()`s and `read()`s events.
struct BareUffd {
    fd: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    events: Arc<AtomicU64>,
    reader: Option<JoinHandle<()>>,
}

impl BareUffd {
    fn new() -> Res<BareUffd> {
        // SAFETY: a plain system call with integer flags; on success it returns a new fd.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()).into());
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw as libc::c_int) });
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_EVENT_UNMAP
                | UFFD_FEATURE_EVENT_REMOVE
                | UFFD_FEATURE_EVENT_REMAP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api`
        // is (repr(C), three u64), alive for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if r != 0 {
            return Err(format!("UFFDIO_API: {}", std::io::Error::last_os_error()).into());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let reader = {
            let (fd, stop, events) = (Arc::clone(&fd), Arc::clone(&stop), Arc::clone(&events));
            std::thread::Builder::new()
                .name("bare-uffd-reader".into())
                .spawn(move || bare_reader(&fd, &stop, &events))?
        };
        Ok(BareUffd {
            fd,
            stop,
            events,
            reader: Some(reader),
        })
    }

    fn register(&self, ptr: *mut u8, len: usize) -> Res<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: ptr as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one `struct uffdio_register`,
        // which `reg` is (repr(C)), alive for the call; the range is a mapping of ours.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if r != 0 {
            return Err(format!("UFFDIO_REGISTER: {}", std::io::Error::last_os_error()).into());
        }
        Ok(())
    }
}

impl Drop for BareUffd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

fn bare_reader(fd: &OwnedFd, stop: &AtomicBool, events: &AtomicU64) {
    let mut buf = [0u8; UFFD_MSG_SIZE * 16];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd, alive for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n <= 0 {
            continue;
        }
        // SAFETY: reads at most `buf.len()` bytes into `buf`, which we own.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r > 0 {
            events.fetch_add(r as u64 / UFFD_MSG_SIZE as u64, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The three ways.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    MadviseDontneed,
    Munmap,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::MadviseDontneed => "madvise_dontneed",
            Op::Munmap => "munmap",
        }
    }
}

/// How a fresh 64 KiB range is watched (returns what must live while it is mapped), and
/// what must happen before each op.
trait Way {
    type Handle;
    fn watch(&mut self, ptr: *mut u8, len: usize) -> Res<Self::Handle>;
    fn before_op(&mut self, _h: &Self::Handle) -> Res<()> {
        Ok(())
    }
}

struct NoUffd;

impl Way for NoUffd {
    type Handle = ();
    fn watch(&mut self, _ptr: *mut u8, _len: usize) -> Res<()> {
        Ok(())
    }
}

impl Way for &BareUffd {
    type Handle = ();
    fn watch(&mut self, ptr: *mut u8, len: usize) -> Res<()> {
        self.register(ptr, len)
    }
}

struct Shadowed<'a>(&'a Client);

impl Way for Shadowed<'_> {
    type Handle = Mirror;
    fn watch(&mut self, ptr: *mut u8, len: usize) -> Res<Mirror> {
        // The previous range's mirror may still be retiring at this address: retry.
        let mut tries = 0;
        loop {
            match self.0.attach(ptr, len) {
                Ok(m) => return Ok(m),
                Err(memshadow::Error::Overlap(_)) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    fn before_op(&mut self, m: &Mirror) -> Res<()> {
        m.populate(0, m.len())?;
        Ok(())
    }
}

fn measure<W: Way>(mut way: W, op: Op, iters: usize, page: usize) -> Res<Stats> {
    match op {
        Op::MadviseDontneed => {
            let ptr = map_anon(RANGE)?;
            touch(ptr, RANGE, page, 1);
            let h = way.watch(ptr, RANGE)?;
            let s = run(iters, || {
                touch(ptr, RANGE, page, 1);
                way.before_op(&h)?;
                timed(|| madvise_dontneed(ptr, RANGE))
            });
            drop(h);
            unmap(ptr, RANGE)?;
            s
        }
        Op::Munmap => run(iters, || {
            let ptr = map_anon(RANGE)?;
            touch(ptr, RANGE, page, 1);
            let h = way.watch(ptr, RANGE)?;
            way.before_op(&h)?;
            let t = timed(|| unmap(ptr, RANGE))?;
            // The daemon retired the mirror on UNMAP; the detach this sends is harmless.
            drop(h);
            Ok(t)
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Device reads and bandwidth.

fn read_latency(client: &Client, iters: usize, page: usize, fault: bool) -> Res<Stats> {
    let ptr = map_anon(RANGE)?;
    touch(ptr, RANGE, page, 7);
    let m = client.attach(ptr, RANGE)?;
    m.populate(0, RANGE as u64)?;
    let mut buf = [0u8; 64];
    let s = run(iters, || {
        if fault {
            madvise_dontneed(ptr, page)?;
            touch(ptr, page, page, 7);
        }
        let t = Instant::now();
        m.read(0, &mut buf)?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    });
    if s.is_ok() && buf[0] != 7 {
        return Err(format!("device read returned {} instead of 7", buf[0]).into());
    }
    drop(m);
    unmap(ptr, RANGE)?;
    s
}

const BW_REPS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn mbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

/// `mirror.populate` of a fresh attach of `ptr..ptr+len` (touched), median MB/s.
fn populate_bw(client: &Client, ptr: *mut u8, len: usize) -> Res<f64> {
    let mut v = Vec::new();
    for _ in 0..BW_REPS {
        let m = client.attach(ptr, len)?;
        let t = Instant::now();
        m.populate(0, len as u64)?;
        v.push(mbps(len, t.elapsed()));
        m.detach()?;
    }
    Ok(median(v))
}

/// The same bytes copied by `process_vm_readv` from this process into a fresh buffer.
fn bare_process_vm_bw(ptr: *mut u8, len: usize) -> Res<f64> {
    let pid = nix::unistd::getpid().as_raw();
    let mut v = Vec::new();
    for _ in 0..BW_REPS {
        let mut dst = vec![0u8; len];
        let t = Instant::now();
        let mut done = 0;
        while done < len {
            let local = libc::iovec {
                iov_base: dst[done..].as_mut_ptr().cast(),
                iov_len: len - done,
            };
            let remote = libc::iovec {
                iov_base: ptr.wrapping_add(done).cast(),
                iov_len: len - done,
            };
            // SAFETY: `local` covers the rest of `dst`, which we own mutably; `remote`
            // names our own mapping, which the kernel reads (it never writes it).
            let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            if n <= 0 {
                return Err(
                    format!("process_vm_readv: {}", std::io::Error::last_os_error()).into(),
                );
            }
            done += n as usize;
        }
        v.push(mbps(len, t.elapsed()));
        std::hint::black_box(&dst);
    }
    Ok(median(v))
}

/// The same bytes copied by `pread` of `/proc/self/mem` into a fresh buffer.
fn bare_mem_fd_bw(ptr: *mut u8, len: usize) -> Res<f64> {
    let mem = File::open("/proc/self/mem")?;
    let mut v = Vec::new();
    for _ in 0..BW_REPS {
        let mut dst = vec![0u8; len];
        let t = Instant::now();
        mem.read_exact_at(&mut dst, ptr as u64)?;
        v.push(mbps(len, t.elapsed()));
        std::hint::black_box(&dst);
    }
    Ok(median(v))
}

// ---------------------------------------------------------------------------------------
// Output.

fn fmt_us(v: Option<Stats>) -> String {
    match v {
        Some(s) => format!("{:.1} / {:.1}", s.p50, s.p99),
        None => "-".into(),
    }
}

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

struct LatRow {
    op: &'static str,
    no_uffd: Option<Stats>,
    bare: Option<Stats>,
    memshadow: Stats,
    goal: Option<f64>,
}

impl LatRow {
    fn ratio(&self) -> Option<f64> {
        self.bare.map(|b| self.memshadow.p50 / b.p50)
    }
    fn met(&self) -> Option<bool> {
        Some(self.ratio()? <= self.goal?)
    }
    fn json(&self, iters: usize) -> Value {
        let p = |s: Option<Stats>, f: fn(Stats) -> f64| s.map_or(Value::Null, |s| num(f(s)));
        json!({
            "op": self.op,
            "no_uffd_us": p(self.no_uffd, |s| s.p50),
            "no_uffd_p99_us": p(self.no_uffd, |s| s.p99),
            "bare_reader_us": p(self.bare, |s| s.p50),
            "bare_reader_p99_us": p(self.bare, |s| s.p99),
            "memshadow_us": num(self.memshadow.p50),
            "memshadow_p99_us": num(self.memshadow.p99),
            "ratio_to_bare": self.ratio().map_or(Value::Null, num),
            "goal": self.goal,
            "met": self.met(),
            "iterations": iters,
            "flush_latency_us": FLUSH_LATENCY_US,
        })
    }
}

struct BwRow {
    op: &'static str,
    bare: f64,
    memshadow: f64,
    bytes: usize,
}

impl BwRow {
    fn ratio(&self) -> f64 {
        self.memshadow / self.bare
    }
    fn json(&self) -> Value {
        json!({
            "op": self.op,
            "no_uffd_us": null,
            "no_uffd_p99_us": null,
            "bare_reader_us": null,
            "bare_reader_p99_us": null,
            "memshadow_us": null,
            "memshadow_p99_us": null,
            "bare_MBps": num(self.bare),
            "memshadow_MBps": num(self.memshadow),
            "ratio_to_bare": num(self.ratio()),
            "goal": null,
            "met": null,
            "bytes": self.bytes,
            "repetitions": BW_REPS,
        })
    }
}

// ---------------------------------------------------------------------------------------

fn main() -> Res<()> {
    let quick = bench_daemon::quick_run("roundtrip");
    let iters = if quick { 300 } else { 2000 };
    let bw_len: usize = if quick { 16 << 20 } else { 64 << 20 };
    let page = page_size();

    let BenchPaths {
        target,
        daemon: daemon_bin,
        ..
    } = BenchPaths::locate("cargo build --release -p memshadow-daemon")?;
    let dir = TempDir(std::env::temp_dir().join(format!("memshadow-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    eprintln!(
        "roundtrip: {iters} iterations per op per way (+{WARMUP} warm-up), {} KiB range, \
         --flush-latency-us {FLUSH_LATENCY_US}, default mode and engines",
        RANGE >> 10
    );

    // Invalidation round trips, three ways.
    let mut lat = Vec::new();
    let bare = BareUffd::new()?;
    {
        let daemon = start_daemon(&daemon_bin, dir.0.join("lat.sock"))?;
        let client = Client::connect_to(&daemon.socket)?;
        for op in [Op::MadviseDontneed, Op::Munmap] {
            let no_uffd = measure(NoUffd, op, iters, page)?;
            let bare_s = measure(&bare, op, iters, page)?;
            let ms = measure(Shadowed(&client), op, iters, page)?;
            lat.push(LatRow {
                op: op.name(),
                no_uffd: Some(no_uffd),
                bare: Some(bare_s),
                memshadow: ms,
                goal: Some(GOAL),
            });
        }
        for (op, fault) in [("read_tlb_hit", false), ("read_fault", true)] {
            lat.push(LatRow {
                op,
                no_uffd: None,
                bare: None,
                memshadow: read_latency(&client, iters, page, fault)?,
                goal: None,
            });
        }
        let st = client.stats()?;
        let get = |k: &str| st.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
        eprintln!(
            "roundtrip: daemon saw events.remove={} events.unmap={} client.invalidations={} \
             client.faults={}; bare reader read {} events",
            get("events.remove"),
            get("events.unmap"),
            get("client.invalidations"),
            get("client.faults"),
            bare.events.load(Ordering::Relaxed)
        );
        drop(client);
    }
    drop(bare);

    // Fault-in bandwidth through each access path, each against its bare copy.
    let mut bw = Vec::new();
    let src = map_anon(bw_len)?;
    for off in (0..bw_len).step_by(page) {
        // SAFETY: `src..src+bw_len` is our live mapping; no reference points into it.
        unsafe { src.wrapping_add(off).write_volatile((off / page) as u8 | 1) };
    }
    let result = (|| -> Res<()> {
        // The daemon reads a client only through the client's /proc/self/mem (a pid may name
        // another program after an exec): its populate against a bare pread of that file,
        // and against the faster process_vm_readv it no longer uses (what safety costs).
        let daemon = start_daemon(&daemon_bin, dir.0.join("bw.sock"))?;
        let client = Client::connect_to(&daemon.socket)?;
        eprintln!("roundtrip: client bound with {:?}", client.access_path());
        let memshadow = populate_bw(&client, src, bw_len)?;
        drop(client);
        drop(daemon);
        for (op, bare) in [
            ("populate_vs_mem_fd_MBps", bare_mem_fd_bw(src, bw_len)?),
            (
                "populate_vs_process_vm_MBps",
                bare_process_vm_bw(src, bw_len)?,
            ),
        ] {
            bw.push(BwRow {
                op,
                bare,
                memshadow,
                bytes: bw_len,
            });
        }
        Ok(())
    })();
    unmap(src, bw_len)?;
    result?;

    // Table.
    println!(
        "{:<18} {:>16} {:>16} {:>16} {:>14} {:>6} {:>4}",
        "op", "no_uffd_us", "bare_reader_us", "memshadow_us", "ratio_to_bare", "goal", "met"
    );
    println!(
        "{:<18} {:>16} {:>16} {:>16} {:>14} {:>6} {:>4}",
        "", "p50 / p99", "p50 / p99", "p50 / p99", "(p50)", "", ""
    );
    for r in &lat {
        println!(
            "{:<18} {:>16} {:>16} {:>16} {:>14} {:>6} {:>4}",
            r.op,
            fmt_us(r.no_uffd),
            fmt_us(r.bare),
            fmt_us(Some(r.memshadow)),
            r.ratio().map_or("-".into(), |x| format!("{x:.2}")),
            r.goal.map_or("-".into(), |g| format!("<={g}")),
            r.met().map_or("-", |m| if m { "yes" } else { "no" }),
        );
    }
    println!();
    println!(
        "{:<26} {:>12} {:>15} {:>14}",
        "op", "bare_MBps", "memshadow_MBps", "ratio_to_bare"
    );
    for r in &bw {
        println!(
            "{:<26} {:>12.0} {:>15.0} {:>14.2}",
            r.op,
            r.bare,
            r.memshadow,
            r.ratio()
        );
    }

    let rows: Vec<Value> = lat
        .iter()
        .map(|r| r.json(iters))
        .chain(bw.iter().map(BwRow::json))
        .collect();
    let out_dir = target.join("memshadow-bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("roundtrip.json");
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Array(rows))?)?;
    eprintln!("roundtrip: wrote {}", out.display());
    Ok(())
}
