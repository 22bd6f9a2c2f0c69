//! Dirty-tracking benchmark (issue 7, DESIGN.md §6): the time to find the pages written in
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
//! Memory: the 1 GiB range (0.25 GiB with `--quick`) is anonymous, fully populated, with
//! `MADV_NOHUGEPAGE` (4 KiB PTEs everywhere: the walk's worst case; THP would shorten it).
//! The 16 GiB range (2 GiB with `--quick`) is virtual: an anonymous `MAP_NORESERVE` mapping
//! in which only one page per 2 MiB is touched (so every page table exists and both walks
//! cover all of its PTEs), plus the pages the benchmark writes; it is reset between
//! repetitions so at most one repetition's writes are resident.
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

/// A private anonymous mapping of our own.
struct Region {
    addr: usize,
    len: usize,
    sparse: bool,
}

impl Region {
    fn new(len: usize, sparse: bool) -> Region {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes");
        let r = Region {
            addr: p as usize,
            len,
            sparse,
        };
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

    /// Dense: every page written; sparse: one page per 2 MiB.
    fn populate(&self) {
        let step = if self.sparse { HUGE } else { P };
        for off in (0..self.len).step_by(step) {
            self.write_page(off / P, 1);
        }
    }

    fn write_page(&self, page: usize, byte: u8) {
        // SAFETY: inside our own writable mapping.
        unsafe { std::ptr::write_volatile((self.addr + page * P + 8) as *mut u8, byte) };
    }

    /// Drops every page (sparse only, between repetitions) and touches the pattern again.
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

fn run(backend: Backend, bytes: usize, sparse: bool, reps: usize, pm: &File) -> Vec<Row> {
    let r = Region::new(bytes, sparse);
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
            if sparse && rep + rows.len() > 0 {
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
    let sizes: [(usize, bool, usize); 2] = if quick {
        [(256 << 20, false, 1), (2 << 30, true, 1)]
    } else {
        [(1 << 30, false, 5), (16 << 30, true, 3)]
    };
    let mut rows = Vec::new();
    for b in Backend::ALL {
        if let Err(why) = b.probe() {
            println!("{}: skipped, unavailable here: {why}", b.as_str());
            continue;
        }
        for (bytes, sparse, reps) in sizes {
            let t = Instant::now();
            rows.extend(run(b, bytes, sparse, reps, &pm));
            println!(
                "{} over {} GiB ({}): {:.1} s",
                b.as_str(),
                bytes as f64 / (1u64 << 30) as f64,
                if sparse { "virtual" } else { "dense" },
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
            "find + re-arm written pages vs a full /proc/PID/pagemap read (median of {} reps{})",
            if quick { 1 } else { 5 },
            if quick { ", --quick" } else { "; 3 for 16 GiB" }
        ),
        &[
            "backend",
            "GiB",
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
            "goal (pagemap-scan >= 10x a full pagemap read at 1 % dirty), {} GiB: {:.1}x {}",
            r.gib,
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
                "layout": if r.gib >= 2.0 { "virtual: MAP_NORESERVE, one page touched per 2 MiB, plus the pages written" } else { "dense: every page populated, MADV_NOHUGEPAGE" },
                "quick": quick,
            })
        })
        .collect();
    let p = common::write_json("dirty", &serde_json::Value::Array(json)).unwrap();
    println!("\nrows written to {}", p.display());
}
