//! Device invalidation benchmark (docs/design.md §1, §4): the time of one invalidation that hits M
//! notifiers with K engines at a flush latency L, one-pass vs two-pass vs two-pass with
//! doorbell batching, measured in the same run; and the fault-in (mirror) bandwidth through
//! each memory-access path against a bare copy.
//!
//! `cargo bench -p memshadow-daemon --bench invalidate [-- --quick]`

#![allow(clippy::print_stdout, clippy::unwrap_used)]

mod common;

use std::io::IoSliceMut;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memshadow_daemon::device::{Device, DeviceConfig, InvalidationMode};
use memshadow_daemon::notifier::{Event, InvalidateArgs, Range};
use memshadow_daemon::source::{MemFileSource, MemorySource, ProcessVmSource, SimMemory};
use memshadow_daemon::sys::PAGE_SIZE;

const P: u64 = PAGE_SIZE as u64;
const BASE: u64 = 0x7e00_0000_0000;
const PAGES_PER_MIRROR: u64 = 4;

/// Median time (µs) of one invalidation hitting `m` mirrors, every page cached on all `k`
/// engines, and the flush jobs it queued.
fn invalidation_us(
    mode: InvalidationMode,
    m: u64,
    k: usize,
    latency: Duration,
    reps: usize,
) -> (f64, f64) {
    let dev = Device::new(&DeviceConfig {
        engines: k,
        flush_latency: latency,
        mode,
        shadow_capacity: (m * PAGES_PER_MIRROR + 64) * P,
        tlb_entries: 4096,
        batch_threshold: 1024,
        ..DeviceConfig::default()
    })
    .unwrap();
    let pages = m * PAGES_PER_MIRROR;
    let mem = Arc::new(SimMemory::new(BASE, pages as usize));
    let c = dev.client(mem, u64::MAX);
    for i in 0..m {
        c.attach(BASE + i * PAGES_PER_MIRROR * P, PAGES_PER_MIRROR * P)
            .unwrap();
    }
    let range = Range::new(BASE, pages * P).unwrap();
    let mut samples = Vec::with_capacity(reps);
    let mut starts = Vec::with_capacity(reps);
    let mut finishes = Vec::with_capacity(reps);
    let mut flushes = 0u64;
    for _ in 0..reps {
        for e in 0..k {
            c.read_on(e, BASE, (pages * P) as usize).unwrap();
        }
        let before = dev.counters().flushes_queued.load(Ordering::Relaxed);
        let t = Instant::now();
        let s = c
            .invalidate(InvalidateArgs::new(range, Event::Unmap))
            .unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        starts.push(s.start_time.as_secs_f64() * 1e6);
        finishes.push(s.finish_time.as_secs_f64() * 1e6);
        flushes += dev.counters().flushes_queued.load(Ordering::Relaxed) - before;
        assert_eq!(s.hits as u64, m);
    }
    samples.sort_by(f64::total_cmp);
    starts.sort_by(f64::total_cmp);
    finishes.sort_by(f64::total_cmp);
    if std::env::var_os("MEMSHADOW_BENCH_VERBOSE").is_some() {
        eprintln!(
            "{mode:?} M={m} K={k}: start p50 {:.0} finish p50 {:.0}; total p10 {:.0} p50 {:.0} p90 {:.0} max {:.0} us; flush latency p50 {} p99 {} us",
            common::percentile(&starts, 50.0),
            common::percentile(&finishes, 50.0),
            common::percentile(&samples, 10.0),
            common::percentile(&samples, 50.0),
            common::percentile(&samples, 90.0),
            common::percentile(&samples, 100.0),
            dev.flush_latency_histogram().percentile_us(50.0),
            dev.flush_latency_histogram().percentile_us(99.0),
        );
    }
    (
        common::percentile(&samples, 50.0),
        flushes as f64 / reps as f64,
    )
}

/// A populated anonymous buffer standing in for a client's memory.
fn client_buffer(bytes: usize) -> memmap2::MmapMut {
    let mut m = memmap2::MmapOptions::new().len(bytes).map_anon().unwrap();
    for (i, page) in m.chunks_mut(PAGE_SIZE).enumerate() {
        page[0] = i as u8;
        page[PAGE_SIZE - 1] = 0x5a;
    }
    m
}

/// Fault-in bandwidth (GB/s) of `bytes` through a device client reading with `source`:
/// first into fresh shadow memory (cold), then again after a detach, into the recycled,
/// still-resident slots (warm: the steady state of a daemon under churn).
fn mirror_gbps(source: Arc<dyn MemorySource>, addr: u64, bytes: u64) -> (f64, f64) {
    let dev = Device::new(&DeviceConfig {
        shadow_capacity: bytes,
        // Keep freed slots resident across the two runs (the reclaimer would otherwise
        // release them part-way through the warm one).
        reclaim_interval: Duration::from_secs(30),
        ..DeviceConfig::default()
    })
    .unwrap();
    let c = dev.client(source, u64::MAX);
    let run = || {
        let id = c.attach(addr, bytes).unwrap();
        let t = Instant::now();
        c.populate(addr, bytes).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(dev.shadow().in_use(), bytes / P);
        // Spot-check a page through the device.
        let page = c.read(addr + 5 * P, PAGE_SIZE).unwrap();
        assert_eq!((page[0], page[PAGE_SIZE - 1]), (5, 0x5a));
        c.detach(id).unwrap();
        bytes as f64 / secs / 1e9
    };
    let cold = run();
    let warm = run();
    (cold, warm)
}

/// Bare `process_vm_readv` of `bytes` into `dst`, in the same 4 MiB batches the fault path uses.
fn bare_gbps(addr: u64, dst: &mut [u8]) -> f64 {
    let pid = std::process::id() as i32;
    let t = Instant::now();
    for (i, chunk) in dst.chunks_mut(1024 * PAGE_SIZE).enumerate() {
        let mut iov: Vec<IoSliceMut<'_>> =
            chunk.chunks_mut(PAGE_SIZE).map(IoSliceMut::new).collect();
        let off = (i * 1024 * PAGE_SIZE) as u64;
        let n = memshadow_daemon::sys::read_remote(pid, addr + off, &mut iov).unwrap();
        assert_eq!(n, chunk.len());
    }
    dst.len() as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let quick = common::quick();
    let latency = Duration::from_micros(100);
    let only = std::env::args().find_map(|a| a.strip_prefix("--only=").map(str::to_owned));
    let bandwidth_only = only.as_deref() == Some("bandwidth");
    let (m_only, k_only) = match only.as_deref().and_then(|s| s.split_once(',')) {
        Some((m, k)) => (m.parse().ok(), k.parse().ok()),
        None => (None, None),
    };
    let ms: Vec<u64> = match m_only {
        Some(m) => vec![m],
        None if quick => vec![1, 16],
        None => vec![1, 4, 16, 64],
    };
    let ks: Vec<usize> = match k_only {
        Some(k) => vec![k],
        None if quick => vec![1, 4],
        None => vec![1, 2, 4, 8],
    };
    let reps = if quick { 3 } else { 31 };
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for &m in if bandwidth_only { &[][..] } else { &ms[..] } {
        for &k in &ks {
            let (one, f1) = invalidation_us(InvalidationMode::OnePass, m, k, latency, reps);
            let (two, f2) = invalidation_us(InvalidationMode::TwoPass, m, k, latency, reps);
            let (bat, f3) = invalidation_us(InvalidationMode::TwoPassBatched, m, k, latency, reps);
            let speedup = one / two;
            rows.push(vec![
                m.to_string(),
                k.to_string(),
                format!("{one:.0}"),
                format!("{two:.0}"),
                format!("{bat:.0}"),
                format!("{speedup:.1}x"),
                format!("{:.2}", speedup / m as f64),
                format!("{:.0}/{:.0}/{:.0}", f1, f2, f3),
            ]);
            json.push(serde_json::json!({
                "notifiers": m, "engines": k, "latency_us": 100,
                "one_pass_us": one, "two_pass_us": two, "batched_us": bat,
                "speedup": speedup, "speedup_over_m": speedup / m as f64,
                "batched_speedup": one / bat,
                "flush_jobs_one_pass": f1, "flush_jobs_two_pass": f2, "flush_jobs_batched": f3,
                "quick": quick,
            }));
        }
    }
    common::print_table(
        "invalidate: median time of one invalidation hitting M notifiers, K engines, flush latency L = 100 us",
        &["M", "K", "one_pass_us", "two_pass_us", "batched_us", "1p/2p", "(1p/2p)/M", "flush jobs 1p/2p/batched"],
        &rows,
    );
    if !bandwidth_only {
        let p = common::write_json("invalidate", &serde_json::Value::Array(json)).unwrap();
        println!("\nrows written to {}", p.display());
    }
    if only.is_some() && !bandwidth_only {
        return;
    }

    // Fault-in bandwidth.
    let bytes: usize = if quick { 64 << 20 } else { 1 << 30 };
    let client = client_buffer(bytes);
    let addr = client.as_ptr() as u64;
    let fresh = {
        // Bare copy into fresh memory, as a one-shot copier would do.
        let mut dst = memmap2::MmapOptions::new().len(bytes).map_anon().unwrap();
        bare_gbps(addr, &mut dst)
    };
    let mut dst = vec![0u8; bytes];
    dst.iter_mut().step_by(PAGE_SIZE).for_each(|b| *b = 1);
    let bare = (0..3)
        .map(|_| bare_gbps(addr, &mut dst))
        .fold(0.0, f64::max);
    drop(dst);
    let pid = std::process::id() as i32;
    let (pvm_cold, pvm_warm) = mirror_gbps(Arc::new(ProcessVmSource::new(pid)), addr, bytes as u64);
    let mem_file = Arc::new(MemFileSource::new(
        std::fs::File::open("/proc/self/mem").unwrap(),
        None,
    ));
    let (pmem_cold, pmem_warm) = mirror_gbps(mem_file, addr, bytes as u64);
    let row = |name: &str, g: f64| {
        vec![
            name.to_string(),
            format!("{g:.2}"),
            format!("{:.2}", g / bare),
        ]
    };
    let brows = vec![
        row(
            "bare process_vm_readv, pre-faulted destination (best of 3)",
            bare,
        ),
        row("bare process_vm_readv, fresh destination", fresh),
        row("mirror via process_vm_readv, warm slots", pvm_warm),
        row("mirror via process_vm_readv, cold slots", pvm_cold),
        row("mirror via /proc/PID/mem, warm slots", pmem_warm),
        row("mirror via /proc/PID/mem, cold slots", pmem_cold),
    ];
    common::print_table(
        &format!("mirror: fault-in bandwidth of {} MiB", bytes >> 20),
        &["path", "GB/s", "ratio to bare (pre-faulted)"],
        &brows,
    );
    let j = |path: &str, g: f64| serde_json::json!({"path": path, "bytes": bytes, "gbps": g, "ratio": g / bare, "quick": quick});
    let p = common::write_json(
        "mirror",
        &serde_json::json!([
            j("bare_process_vm_readv", bare),
            j("bare_process_vm_readv_fresh", fresh),
            j("mirror_process_vm_readv_warm", pvm_warm),
            j("mirror_process_vm_readv_cold", pvm_cold),
            j("mirror_proc_mem_warm", pmem_warm),
            j("mirror_proc_mem_cold", pmem_cold),
        ]),
    )
    .unwrap();
    println!("\nrows written to {}", p.display());
}
