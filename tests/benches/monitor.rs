//! `monitor`: what monitors (docs/monitors.md, `memshadow::Monitor`) cost, each row against
//! a baseline measured in the same run:
//!
//! 1. `check`: `Monitor::is_valid` of a valid monitor, against one acquire load of a local
//!    word (what a check cannot beat). Timed in batches of [`CHECK_BATCH`]; p50/p99 over
//!    batches, in ns per check. Goal: p50 <= 20 ns and no system call: the checks run with
//!    a perf counter of the `raw_syscalls:sys_enter` tracepoint on (root; "not counted",
//!    and the goal unmet, where the kernel does not let the benchmark count).
//! 2. `munmap_m1000` and `munmap_m100000`: the client's `munmap` of a fresh, touched,
//!    monitored page while the client has 1 000 (100 000) other monitors, against the same
//!    `munmap` watched by an in-process userfaultfd monitor doing the same job the way
//!    libfabric's does: its own uffd, its own thread reading the events and bumping the
//!    generations of an index of as many ranges. Goal: <= 1.25x.
//! 3. `unmap_to_event`: from just before the `munmap` until the monitor's event is in the
//!    queue (`MonitorEvents::drain`, spinning), against the same for the in-process monitor
//!    (until its thread bumped the generation). No goal: reported.
//! 4. `regcache_round`: a round of the C registration cache example
//!    (`client-lib/examples/c/regcache.c`, built here with `cc` against the release
//!    library): 4 threads, `malloc`/`free` churn with `free()` unmapping, a lookup per
//!    round; its wall time per round, against the same cache with no monitor (which hands
//!    out stale registrations: the price of being right). Several runs; p50/p99 over runs.
//!    No goal: reported, with the counters of the last run.
//!
//! Goals are reported, never asserted. Run: `cargo build --release --workspace --lib --bins
//! --examples && cargo bench -p memshadow-tests --bench monitor -- --quick`. Prints a table
//! and writes `target/memshadow-bench/monitor.json`. Needs root (a userfaultfd that sees the
//! kernel's events, for the baseline, and the syscall counter).
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::error::Error;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memshadow::{Client, Monitor, MonitorEvent};
use serde_json::json;
use userfaultfd::{Event, FeatureFlags, Uffd, UffdBuilder};

#[path = "bench_daemon.rs"]
mod bench_daemon;
use bench_daemon::BenchPaths;
#[path = "bench_table.rs"]
mod bench_table;
use bench_table::{print, start_daemon, write_json, Row};
use memshadow_tests::{percentiles as stats, Percentiles as Stats};

type Res<T> = Result<T, Box<dyn Error>>;

/// Checks of one timed batch of `check`.
const CHECK_BATCH: usize = 1000;
/// Checks run with the syscall counter on.
const COUNTED_CHECKS: usize = 1_000_000;
/// Background monitors of the two `munmap` rows.
const BACKGROUND: [usize; 2] = [1000, 100_000];
const GOAL_CHECK_NS: f64 = 20.0;
const GOAL_MUNMAP: f64 = 1.25;
const PAGE: usize = 4096;

fn map(len: usize) -> Res<*mut u8> {
    Ok(memshadow_tests::map_anon(len).map_err(|e| format!("mmap of {len} bytes: {e}"))?)
}

fn touch(p: *mut u8, len: usize) {
    for off in (0..len).step_by(PAGE) {
        // SAFETY: callers pass a live read-write mapping of `len` bytes of their own, which
        // no Rust reference reaches.
        unsafe { p.wrapping_add(off).write_volatile(1) };
    }
}

fn unmap(p: *mut u8, len: usize) {
    // SAFETY: callers pass a mapping of their own that nothing uses any more.
    unsafe { libc::munmap(p.cast(), len) };
}

// ---------------------------------------------------------------------------------------
// Counting system calls.

/// A perf counter of this thread's system call entries (`raw_syscalls:sys_enter`).
struct SyscallCounter {
    fd: std::os::fd::OwnedFd,
}

impl SyscallCounter {
    fn open() -> Result<SyscallCounter, String> {
        let id = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|d| {
                std::fs::read_to_string(format!("{d}/events/raw_syscalls/sys_enter/id")).ok()
            })
            .ok_or("no tracefs with raw_syscalls:sys_enter")?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|e| format!("tracepoint id: {e}"))?;
        // perf_event_attr, 128 bytes: type (PERF_TYPE_TRACEPOINT = 2) and size, config (the
        // tracepoint), then flags with `disabled` (bit 0) set; the rest zero.
        let mut attr = [0u64; 16];
        attr[0] = 2 | (128u64 << 32);
        attr[1] = id;
        attr[5] = 1;
        // SAFETY: perf_event_open reads `attr` (128 valid bytes, as its size field says);
        // pid 0 and cpu -1: this thread, any CPU; no group, no flags.
        let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) };
        if fd < 0 {
            return Err(format!(
                "perf_event_open: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        Ok(SyscallCounter { fd })
    }

    /// System calls this thread entered while `f` ran (the disabling `ioctl` included).
    fn count(&self, f: impl FnOnce()) -> Result<u64, String> {
        use std::os::fd::AsRawFd;
        const RESET: libc::c_ulong = 0x2403;
        const ENABLE: libc::c_ulong = 0x2400;
        const DISABLE: libc::c_ulong = 0x2401;
        let fd = self.fd.as_raw_fd();
        // SAFETY: PERF_EVENT_IOC_* on a perf event fd of ours take no pointer argument.
        let reset = unsafe { libc::ioctl(fd, RESET, 0) };
        // SAFETY: as above.
        let enable = unsafe { libc::ioctl(fd, ENABLE, 0) };
        if reset != 0 || enable != 0 {
            return Err(format!("perf ioctl: {}", std::io::Error::last_os_error()));
        }
        f();
        // SAFETY: as above.
        unsafe { libc::ioctl(fd, DISABLE, 0) };
        let mut v = [0u8; 8];
        nix::unistd::read(&self.fd, &mut v).map_err(|e| format!("read of the counter: {e}"))?;
        Ok(u64::from_ne_bytes(v))
    }
}

/// System calls of `COUNTED_CHECKS` checks, net of the counter's own.
fn syscalls_of_checks(m: &Monitor) -> Result<u64, String> {
    let c = SyscallCounter::open()?;
    let empty = c.count(|| {})?;
    // The counter must see system calls, or its zero would prove nothing.
    let ten = c.count(|| {
        for _ in 0..10 {
            // SAFETY: getpid has no arguments and no preconditions.
            black_box(unsafe { libc::syscall(libc::SYS_getpid) });
        }
    })?;
    if ten < empty + 10 {
        return Err(format!("the counter saw {ten} system calls of 10 getpid"));
    }
    let checks = c.count(|| {
        for _ in 0..COUNTED_CHECKS {
            black_box(m.is_valid());
        }
    })?;
    Ok(checks.saturating_sub(empty))
}

// ---------------------------------------------------------------------------------------
// Row 1: the check.

/// ns per call of `f`, over batches.
fn per_call_ns(batches: usize, mut f: impl FnMut() -> bool) -> Stats {
    let mut v = Vec::with_capacity(batches);
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..CHECK_BATCH {
            black_box(f());
        }
        v.push(t.elapsed().as_nanos() as f64 / CHECK_BATCH as f64);
    }
    stats(v)
}

struct CheckRow {
    check: Stats,
    load: Stats,
    syscalls: Result<u64, String>,
}

fn check_row(client: &Client, batches: usize) -> Res<CheckRow> {
    let p = map(PAGE)?;
    touch(p, PAGE);
    let m = client.monitor(p, PAGE)?;
    if !m.is_valid() {
        return Err("a fresh monitor is not valid".into());
    }
    let word = AtomicU64::new(7);
    let load = per_call_ns(batches, || black_box(&word).load(Ordering::Acquire) == 7);
    let check = per_call_ns(batches, || m.is_valid());
    let syscalls = syscalls_of_checks(&m);
    drop(m);
    unmap(p, PAGE);
    Ok(CheckRow {
        check,
        load,
        syscalls,
    })
}

// ---------------------------------------------------------------------------------------
// The baseline: an in-process userfaultfd monitor, as libfabric's.

/// The ranges an in-process monitor watches, and their generations.
#[derive(Default)]
struct Index {
    /// start -> (end, generation slot)
    ranges: BTreeMap<usize, (usize, usize)>,
    gens: Vec<u64>,
}

impl Index {
    fn bump(&mut self, start: usize, end: usize) {
        let Index { ranges, gens } = self;
        for (_, &(e, slot)) in ranges.range(..end) {
            if e > start {
                gens[slot] += 1;
            }
        }
    }
}

/// libfabric's design: a uffd of this process, and a thread that reads its events and
/// bumps the generations of the ranges they cover.
struct InProcess {
    uffd: Arc<Uffd>,
    index: Arc<Mutex<Index>>,
    /// Bumps done, for the unmap-to-event row.
    bumps: Arc<AtomicU64>,
}

impl InProcess {
    fn start() -> Res<InProcess> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(false)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::EVENT_UNMAP | FeatureFlags::EVENT_REMOVE | FeatureFlags::EVENT_REMAP,
            )
            .create()
            .map_err(|e| format!("userfaultfd (needs root): {e}"))?;
        let me = InProcess {
            uffd: Arc::new(uffd),
            index: Arc::default(),
            bumps: Arc::default(),
        };
        let (uffd, index, bumps) = (
            Arc::clone(&me.uffd),
            Arc::clone(&me.index),
            Arc::clone(&me.bumps),
        );
        std::thread::Builder::new()
            .name("uffd-monitor".into())
            .spawn(move || reader(&uffd, &index, &bumps))?;
        Ok(me)
    }

    /// Watches `p..p+len` (touched already, so no page fault comes); its slot.
    fn watch(&self, p: *mut u8, len: usize) -> Res<usize> {
        self.uffd
            .register(p.cast(), len)
            .map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
        let mut ix = self.index.lock().map_err(|_| "index poisoned")?;
        let slot = ix.gens.len();
        ix.gens.push(0);
        ix.ranges.insert(p as usize, (p as usize + len, slot));
        Ok(slot)
    }

    fn forget(&self, p: *mut u8) {
        if let Ok(mut ix) = self.index.lock() {
            ix.ranges.remove(&(p as usize));
        }
    }
}

/// The monitor thread: reads events until the uffd is gone (the process exits).
fn reader(uffd: &Uffd, index: &Mutex<Index>, bumps: &AtomicU64) {
    loop {
        let (start, end) = match uffd.read_event() {
            Ok(Some(Event::Unmap { start, end } | Event::Remove { start, end })) => {
                (start as usize, end as usize)
            }
            Ok(Some(Event::Remap { from, len, .. })) => (from as usize, from as usize + len),
            Ok(_) => continue,
            Err(_) => return,
        };
        if let Ok(mut ix) = index.lock() {
            ix.bump(start, end);
        }
        bumps.fetch_add(1, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------
// Rows 2 and 3.

struct MunmapRows {
    background: usize,
    daemon: Stats,
    in_process: Stats,
    daemon_event: Stats,
    in_process_event: Stats,
}

fn since_us(t: Instant) -> f64 {
    t.elapsed().as_nanos() as f64 / 1000.0
}

fn munmap_rows(client: &Client, background: usize, iters: usize) -> Res<MunmapRows> {
    // The background: `background` monitors of consecutive pages of one mapping (never
    // touched, so it costs no memory; registered page by page, so its VMAs merge).
    let bg_len = background * PAGE;
    let bg = map(bg_len)?;
    let started = Instant::now();
    let mut keep = Vec::with_capacity(background);
    for i in 0..background {
        keep.push(client.monitor(bg.wrapping_add(i * PAGE), PAGE)?);
    }
    let setup_s = started.elapsed().as_secs_f64();
    let ip = InProcess::start()?;
    let ip_bg = map(bg_len)?;
    touch(ip_bg, bg_len);
    for i in 0..background {
        ip.watch(ip_bg.wrapping_add(i * PAGE), PAGE)?;
    }
    eprintln!("monitor: {background} background monitors made in {setup_s:.1} s");
    let events = client.monitor_events()?;
    let mut drained: Vec<MonitorEvent> = Vec::new();
    events.drain(&mut drained);
    let (mut d, mut i, mut de, mut ie) = (vec![], vec![], vec![], vec![]);
    for _ in 0..iters {
        // memshadow.
        let p = map(PAGE)?;
        touch(p, PAGE);
        let m = client.monitor(p, PAGE)?;
        let t = Instant::now();
        unmap(p, PAGE);
        d.push(since_us(t));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            drained.clear();
            events.drain(&mut drained);
            if drained.iter().any(|e| e.slot == m.slot()) {
                break;
            }
            if Instant::now() > deadline {
                return Err("no event of an unmapped monitor in 10 s".into());
            }
            std::hint::spin_loop();
        }
        de.push(since_us(t));
        if m.is_valid() {
            return Err("a monitor is valid after its munmap returned".into());
        }
        drop(m);
        // In process.
        let p = map(PAGE)?;
        touch(p, PAGE);
        ip.watch(p, PAGE)?;
        let before = ip.bumps.load(Ordering::Acquire);
        let t = Instant::now();
        unmap(p, PAGE);
        i.push(since_us(t));
        while ip.bumps.load(Ordering::Acquire) == before {
            std::hint::spin_loop();
        }
        ie.push(since_us(t));
        ip.forget(p);
    }
    drop(keep);
    unmap(bg, bg_len);
    unmap(ip_bg, bg_len);
    Ok(MunmapRows {
        background,
        daemon: stats(d),
        in_process: stats(i),
        daemon_event: stats(de),
        in_process_event: stats(ie),
    })
}

// ---------------------------------------------------------------------------------------
// Row 4: the C registration cache.

struct RegcacheRow {
    monitored: Stats,
    bare: Stats,
    counters: String,
}

/// Builds `regcache.c` in `dir` against the release library of `profile` (its loader
/// finds `libmemshadow.so.0` in `dir`); the program.
fn build_regcache(profile: &Path, dir: &Path) -> Res<PathBuf> {
    let root = memshadow_tests::repo_root();
    let lib = profile.join("libmemshadow.so");
    std::os::unix::fs::symlink(&lib, dir.join("libmemshadow.so.0"))
        .map_err(|e| format!("link {}: {e}", lib.display()))?;
    let out = dir.join("regcache");
    let st = Command::new("cc")
        .args(["-std=c99", "-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(root.join("client-lib/examples/c/regcache.c"))
        .arg("-I")
        .arg(root.join("client-lib/include"))
        .arg(&lib)
        .status()
        .map_err(|e| format!("cc (the README's prerequisites): {e}"))?;
    if !st.success() {
        return Err(format!("cc of regcache.c: {st}").into());
    }
    Ok(out)
}

fn regcache_row(profile: &Path, dir: &Path, socket: &Path, runs: usize) -> Res<RegcacheRow> {
    const ROUNDS: u64 = 5000;
    const THREADS: u64 = 4;
    let bin = build_regcache(profile, dir)?;
    // Wall time per round of one run, and what it printed.
    let run = |extra: &[&str]| -> Res<(f64, String)> {
        let t = Instant::now();
        let o = Command::new(&bin)
            .env("LD_LIBRARY_PATH", dir)
            .arg("--socket")
            .arg(socket)
            .args([
                "--threads",
                &THREADS.to_string(),
                "--rounds",
                &ROUNDS.to_string(),
            ])
            .args(extra)
            .output()?;
        let us = since_us(t) / (ROUNDS * THREADS) as f64;
        let text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        Ok((us, format!("{text} ({})", o.status)))
    };
    let (mut m, mut b, mut counters) = (vec![], vec![], String::new());
    for _ in 0..runs {
        let (us, c) = run(&[])?;
        if !c.contains(" stale=0 ") {
            return Err(format!("the monitored cache handed out a stale entry: {c}").into());
        }
        m.push(us);
        counters = c;
        b.push(run(&["--no-monitor"])?.0);
    }
    Ok(RegcacheRow {
        monitored: stats(m),
        bare: stats(b),
        counters,
    })
}

// ---------------------------------------------------------------------------------------
// Report.

fn rows(check: &CheckRow, munmaps: &[MunmapRows], regcache: &RegcacheRow) -> Vec<Row> {
    let syscalls = check.syscalls.as_ref().ok().copied();
    let mut rows = vec![Row {
        op: "check".into(),
        value: check.check,
        unit: "ns",
        baseline: "one acquire load of a local word",
        base: check.load,
        goal: format!("p50<={GOAL_CHECK_NS}ns, 0 syscalls"),
        met: Some(check.check.p50 <= GOAL_CHECK_NS && syscalls == Some(0)),
        extra: json!({
            "syscalls": syscalls,
            "checks_counted": COUNTED_CHECKS,
            "syscalls_not_counted": check.syscalls.as_ref().err(),
            "batch": CHECK_BATCH,
        }),
    }];
    for m in munmaps {
        let ratio = m.daemon.p50 / m.in_process.p50;
        rows.push(Row {
            op: format!("munmap_m{}", m.background),
            value: m.daemon,
            unit: "us",
            baseline: "in-process uffd reader thread (libfabric's design)",
            base: m.in_process,
            goal: format!("<={GOAL_MUNMAP}x"),
            met: ratio.is_finite().then_some(ratio <= GOAL_MUNMAP),
            extra: json!({"background_monitors": m.background}),
        });
    }
    if let Some(m) = munmaps.first() {
        rows.push(Row {
            op: "unmap_to_event".into(),
            value: m.daemon_event,
            unit: "us",
            baseline: "in-process: until its thread bumped the generation",
            base: m.in_process_event,
            goal: "-".into(),
            met: None,
            extra: json!({"background_monitors": m.background}),
        });
    }
    rows.push(Row {
        op: "regcache_round".into(),
        value: regcache.monitored,
        unit: "us",
        baseline: "the same cache with no monitor (stale entries and all)",
        base: regcache.bare,
        goal: "-".into(),
        met: None,
        extra: json!({"last_run": regcache.counters}),
    });
    rows
}

fn main() -> Res<()> {
    let quick = bench_daemon::quick_run("monitor");
    let (batches, iters) = if quick { (300, 200) } else { (5000, 2000) };
    let BenchPaths {
        profile,
        target,
        daemon: daemon_bin,
    } = BenchPaths::locate("cargo build --release --workspace --lib --bins --examples")?;
    let dir = memshadow_tests::TempDir::new("monitor-bench");
    let started = Instant::now();
    let daemon = start_daemon("monitor", &daemon_bin, dir.path().join("d.sock"))?;
    let client = Client::connect_to(&daemon.socket)?;
    let check = check_row(&client, batches)?;
    let mut munmaps = Vec::new();
    for n in BACKGROUND {
        munmaps.push(munmap_rows(&client, n, iters)?);
    }
    let regcache = regcache_row(
        &profile,
        dir.path(),
        &daemon.socket,
        if quick { 3 } else { 10 },
    )?;
    let rows = rows(&check, &munmaps, &regcache);
    print(&rows);
    let setting = json!({
        "quick": quick,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "check_batches": batches,
        "munmap_iterations": iters,
    });
    write_json("monitor", &target, &rows, &setting, started)
}
