//! Dirty-tracking benchmark (docs/design.md §6): the time to find the pages written in
//! a mirrored range and re-arm them, per back end that works here, against reading
//! `/proc/PID/pagemap` for the whole range (what a pagemap-based tracker such as soft-dirty
//! must do just to find them), measured in the same run on the same memory.
//!
//! * `pagemap-scan`: one `PAGEMAP_SCAN` walk with `PM_SCAN_WP_MATCHING` (the daemon's own
//!   collection code) finds and re-arms the written pages;
//! * `uffd-wp`: the writes fault and a handler thread records and un-protects each page
//!   (that cost is paid by the writer: `write_us_per_page`); finding is free, re-arming is
//!   one `UFFDIO_WRITEPROTECT` per run of written pages;
//! * baseline: `pread` of the range's pagemap words and a pass that counts the present pages
//!   without the uffd-wp bit (the same "written" test); it re-arms nothing.
//!
//! Memory (4 KiB PTEs everywhere, `MADV_NOHUGEPAGE`: THP would shorten the scan):
//! * 1 GiB dense (0.25 GiB with `--quick`): anonymous, every page populated;
//! * 16 GiB virtual (2 GiB with `--quick`): an anonymous `MAP_NORESERVE` mapping in which
//!   only one page per 2 MiB is touched (every page table exists; arming fills the rest
//!   with uffd-wp markers), plus the pages the benchmark writes; reset between repetitions
//!   so at most one repetition's writes are resident;
//! * 16 GiB aliased (2 GiB with `--quick`): one 1 GiB memfd (256 MiB) mapped `MAP_SHARED`
//!   16 (8) times side by side, every PTE present, so a dense 16 GiB range costs 1 GiB of
//!   RAM (a write is counted per PTE: each alias has its own write-protect bit).
//!
//! `cargo bench -p memshadow-daemon --bench dirty [-- --quick]`; rows in
//! `target/memshadow-bench/dirty.json`.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use memshadow_daemon::dirty::{pagemap_scan, Backend};
use memshadow_daemon::sys::pagemap::word;
use memshadow_daemon::sys::uffd::{Uffd, UffdEvent};
use memshadow_daemon::sys::PAGE_SIZE;

const P: usize = PAGE_SIZE;
const HUGE: usize = 2 << 20;

/// How the measured range is backed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Anonymous, every page populated (`MADV_NOHUGEPAGE`).
    Dense,
    /// Anonymous `MAP_NORESERVE`, one page touched per 2 MiB (every page table exists).
    Virtual,
    /// One memfd of `ALIAS` bytes mapped again and again over the range (`MAP_SHARED`):
    /// every PTE present, physical memory only `ALIAS`.
    Aliased,
}

impl Layout {
    fn as_str(self) -> &'static str {
        match self {
            Layout::Dense => "dense",
            Layout::Virtual => "virtual",
            Layout::Aliased => "aliased",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Layout::Dense => "anonymous, every page populated, MADV_NOHUGEPAGE",
            Layout::Virtual => {
                "anonymous MAP_NORESERVE, one page touched per 2 MiB plus the pages written"
            }
            Layout::Aliased => {
                "a 1 GiB memfd (256 MiB with --quick) mapped MAP_SHARED over and over, every PTE present"
            }
        }
    }
}

/// The size of the memfd an aliased range repeats.
fn alias_len(quick: bool) -> usize {
    if quick {
        256 << 20
    } else {
        1 << 30
    }
}

/// A mapping of our own.
struct Region {
    addr: usize,
    len: usize,
    layout: Layout,
}

fn mmap(addr: usize, len: usize, flags: libc::c_int, fd: libc::c_int) -> usize {
    // SAFETY: a fresh mapping, or one replacing (MAP_FIXED) part of our own reservation
    // that nothing refers to yet.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes");
    p as usize
}

impl Region {
    fn new(len: usize, layout: Layout, alias: usize) -> Region {
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let addr = mmap(0, len, anon, -1);
        let r = Region { addr, len, layout };
        if layout == Layout::Aliased {
            use std::os::fd::AsRawFd;
            let fd = nix::sys::memfd::memfd_create(
                "dirty-bench",
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )
            .unwrap();
            nix::unistd::ftruncate(&fd, alias as i64).unwrap();
            for off in (0..len).step_by(alias) {
                mmap(
                    addr + off,
                    alias,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                );
            }
        }
        r.madvise(libc::MADV_NOHUGEPAGE);
        r.populate();
        r
    }

    fn pages(&self) -> usize {
        self.len / P
    }

    fn madvise(&self, advice: libc::c_int) {
        // SAFETY: advice on our own mapping.
        let r = unsafe { libc::madvise(self.addr as *mut libc::c_void, self.len, advice) };
        assert_eq!(r, 0, "madvise {advice}");
    }

    /// Dense and aliased: every page written (so every PTE is present); virtual: one page
    /// per 2 MiB.
    fn populate(&self) {
        let step = if self.layout == Layout::Virtual {
            HUGE
        } else {
            P
        };
        for off in (0..self.len).step_by(step) {
            self.write_page(off / P, 1);
        }
    }

    fn write_page(&self, page: usize, byte: u8) {
        // SAFETY: inside our own writable mapping.
        unsafe { std::ptr::write_volatile((self.addr + page * P + 8) as *mut u8, byte) };
    }

    /// Drops every page (virtual only, between repetitions) and touches the pattern again.
    fn reset(&self) {
        self.madvise(libc::MADV_DONTNEED);
        self.populate();
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping, which nothing uses any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// `count` distinct random pages of `pages`, sorted.
fn pick(rng: &mut common::Rng, pages: usize, count: usize) -> Vec<usize> {
    let mut taken = vec![false; pages];
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let p = rng.range(0, pages as u64) as usize;
        if !taken[p] {
            taken[p] = true;
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

/// The baseline: read the range's pagemap words (in 2 MiB `pread`s into a buffer reused
/// across calls, so no allocation or page fault of ours is timed) and count the written
/// pages (present or swapped, uffd-wp bit clear). Returns (µs, count).
fn pagemap_read(pm: &File, r: &Region, buf: &mut [u8]) -> (f64, usize) {
    use std::os::unix::fs::FileExt;
    let t = Instant::now();
    let mut written = 0;
    let mut off = (r.addr / P * 8) as u64;
    let end = off + (r.pages() * 8) as u64;
    while off < end {
        let want = buf.len().min((end - off) as usize);
        let n = pm.read_at(&mut buf[..want], off).unwrap();
        assert!(n > 0 && n % 8 == 0, "pagemap read of {n} bytes");
        written += buf[..n]
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
            .filter(|w| *w & (word::PRESENT | word::SWAPPED) != 0 && *w & word::UFFD_WP == 0)
            .count();
        off += n as u64;
    }
    (t.elapsed().as_secs_f64() * 1e6, written)
}

/// Records and resolves the write-protect faults of a uffd (the daemon's event reader's job).
struct FaultHandler {
    stop: Arc<AtomicBool>,
    pages: Arc<Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultHandler {
    fn start(uffd: Arc<Uffd>) -> FaultHandler {
        let stop = Arc::new(AtomicBool::new(false));
        let pages = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&pages));
        let thread = std::thread::spawn(move || {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            use std::os::fd::AsFd;
            let mut buf = userfaultfd::EventBuffer::new(64);
            let mut events = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(uffd.as_fd(), PollFlags::POLLIN)];
                if !matches!(poll(&mut fds, PollTimeout::from(10u8)), Ok(n) if n > 0) {
                    continue;
                }
                events.clear();
                uffd.read_events(&mut buf, &mut events).unwrap();
                for ev in events.drain(..) {
                    if let UffdEvent::WriteFault { addr } = ev {
                        let page = addr & !(P as u64 - 1);
                        p.lock().unwrap().push(page);
                        uffd.unprotect(page, P as u64, true).unwrap();
                    }
                }
            }
        });
        FaultHandler {
            stop,
            pages,
            thread: Some(thread),
        }
    }

    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.pages.lock().unwrap())
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// One back end's state over one region.
enum Tracker {
    Scan {
        buf: Vec<memshadow_daemon::sys::pagemap::PageRegion>,
    },
    Wp {
        handler: FaultHandler,
    },
}

struct Row {
    backend: &'static str,
    layout: Layout,
    gib: f64,
    dirty_pct: f64,
    dirty_pages: usize,
    regions: usize,
    scan_us: f64,
    pagemap_read_us: f64,
    write_us_per_page: f64,
    arm_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arm(uffd: &Uffd, r: &Region) -> f64 {
    let t = Instant::now();
    uffd.write_protect(r.addr as u64, r.len as u64).unwrap();
    t.elapsed().as_secs_f64() * 1e6
}

fn run(backend: Backend, bytes: usize, layout: Layout, reps: usize, pm: &File) -> Vec<Row> {
    let r = Region::new(bytes, layout, alias_len(common::quick()));
    let (uffd, _) = Uffd::create().unwrap();
    uffd.api(backend.uffd_features()).unwrap();
    uffd.set_nonblocking().unwrap();
    let uffd = Arc::new(uffd);
    uffd.register_wp(r.addr as u64, r.len as u64).unwrap();
    let arm_us = arm(&uffd, &r);
    let mut tracker = match backend {
        Backend::PagemapScan => Tracker::Scan { buf: Vec::new() },
        _ => Tracker::Wp {
            handler: FaultHandler::start(Arc::clone(&uffd)),
        },
    };
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let mut rng = common::Rng(0x9e37_79b9_7f4a_7c15);
    let mut words = vec![1u8; 2 << 20];
    let mut rows = Vec::new();
    for pct in [0.1, 1.0, 10.0] {
        let count = ((r.pages() as f64) * pct / 100.0).round() as usize;
        let (mut scans, mut reads, mut writes) = (Vec::new(), Vec::new(), Vec::new());
        let mut regions = 0;
        for rep in 0..reps {
            if layout == Layout::Virtual && rep + rows.len() > 0 {
                // Only one repetition's writes resident at a time.
                r.reset();
                arm(&uffd, &r);
                // Faults the re-population raised are not this repetition's writes.
                if let Tracker::Wp { handler } = &tracker {
                    handler.take();
                }
            }
            let pages = pick(&mut rng, r.pages(), count);
            let t = Instant::now();
            for &p in &pages {
                r.write_page(p, 2);
            }
            writes.push(t.elapsed().as_secs_f64() * 1e6 / count as f64);
            // Baseline first: it changes nothing, so both see the same written pages.
            let (read_us, seen) = pagemap_read(pm, &r, &mut words);
            assert_eq!(seen, count, "the pagemap read sees every written page");
            reads.push(read_us);
            let (us, found) = match &mut tracker {
                Tracker::Scan { buf } => {
                    let mut out = Vec::new();
                    let t = Instant::now();
                    pagemap_scan::collect(
                        pm,
                        r.addr as u64,
                        (r.addr + r.len) as u64,
                        buf,
                        &mut out,
                    )
                    .unwrap();
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    regions = out.len();
                    (
                        us,
                        out.iter().map(|(s, e)| ((e - s) / P as u64) as usize).sum(),
                    )
                }
                Tracker::Wp { handler } => {
                    let mut faulted = handler.take();
                    let t = Instant::now();
                    faulted.sort_unstable();
                    faulted.dedup();
                    let mut runs: Vec<(u64, u64)> = Vec::new();
                    for &p in &faulted {
                        match runs.last_mut() {
                            Some(last) if last.1 == p => last.1 = p + P as u64,
                            _ => runs.push((p, p + P as u64)),
                        }
                    }
                    for &(s, e) in &runs {
                        uffd.write_protect(s, e - s).unwrap();
                    }
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    regions = runs.len();
                    (us, faulted.len())
                }
            };
            assert_eq!(
                found,
                count,
                "{} found every written page",
                backend.as_str()
            );
            scans.push(us);
        }
        let (scan_us, pagemap_read_us) = (median(scans), median(reads));
        rows.push(Row {
            backend: backend.as_str(),
            layout,
            gib,
            dirty_pct: pct,
            dirty_pages: count,
            regions,
            scan_us,
            pagemap_read_us,
            write_us_per_page: median(writes),
            arm_us,
        });
    }
    drop(tracker);
    uffd.unregister(r.addr as u64, r.len as u64).unwrap();
    rows
}

fn main() {
    let quick = common::quick();
    let pm = File::open("/proc/self/pagemap").unwrap();
    // (bytes, layout, repetitions for pagemap-scan, for uffd-wp: each write faults).
    let sizes: [(usize, Layout, usize, usize); 3] = if quick {
        [
            (256 << 20, Layout::Dense, 1, 1),
            (2 << 30, Layout::Virtual, 1, 1),
            (2 << 30, Layout::Aliased, 1, 1),
        ]
    } else {
        [
            (1 << 30, Layout::Dense, 5, 5),
            (16 << 30, Layout::Virtual, 3, 1),
            (16 << 30, Layout::Aliased, 3, 1),
        ]
    };
    let mut rows = Vec::new();
    for b in Backend::ALL {
        if let Err(why) = b.probe() {
            println!("{}: skipped, unavailable here: {why}", b.as_str());
            continue;
        }
        for (bytes, layout, scan_reps, wp_reps) in sizes {
            let reps = if b == Backend::UffdWp {
                wp_reps
            } else {
                scan_reps
            };
            let t = Instant::now();
            rows.extend(run(b, bytes, layout, reps, &pm));
            println!(
                "{} over {} GiB ({}, {} reps): {:.1} s",
                b.as_str(),
                bytes as f64 / (1u64 << 30) as f64,
                layout.as_str(),
                reps,
                t.elapsed().as_secs_f64()
            );
        }
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.backend.into(),
                format!("{}", r.gib),
                r.layout.as_str().into(),
                format!("{}", r.dirty_pct),
                r.dirty_pages.to_string(),
                r.regions.to_string(),
                format!("{:.0}", r.scan_us),
                format!("{:.0}", r.pagemap_read_us),
                format!("{:.1}x", r.pagemap_read_us / r.scan_us),
                format!("{:.2}", r.write_us_per_page),
                format!("{:.0}", r.arm_us),
            ]
        })
        .collect();
    common::print_table(
        &format!(
            "find + re-arm written pages vs a full /proc/PID/pagemap read (median of the reps above{})",
            if quick { ", --quick" } else { "" }
        ),
        &[
            "backend",
            "GiB",
            "layout",
            "dirty %",
            "dirty pages",
            "runs",
            "scan µs",
            "pagemap read µs",
            "speedup",
            "write µs/page",
            "arm µs",
        ],
        &table,
    );
    for r in rows
        .iter()
        .filter(|r| r.backend == "pagemap-scan" && r.dirty_pct == 1.0)
    {
        let s = r.pagemap_read_us / r.scan_us;
        println!(
            "goal (pagemap-scan >= 10x a full pagemap read at 1 % dirty), {} GiB {}: {:.1}x {}",
            r.gib,
            r.layout.as_str(),
            s,
            if s >= 10.0 { "met" } else { "NOT met" }
        );
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "backend": r.backend,
                "gib": r.gib,
                "dirty_pct": r.dirty_pct,
                "dirty_pages": r.dirty_pages,
                "runs": r.regions,
                "scan_us": r.scan_us,
                "pagemap_read_us": r.pagemap_read_us,
                "speedup": r.pagemap_read_us / r.scan_us,
                "write_us_per_page": r.write_us_per_page,
                "arm_us": r.arm_us,
                "layout": r.layout.as_str(),
                "layout_detail": r.layout.describe(),
                "quick": quick,
            })
        })
        .collect();
    let p = common::write_json("dirty", &serde_json::Value::Array(json)).unwrap();
    println!("\nrows written to {}", p.display());
}
