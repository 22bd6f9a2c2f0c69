//! Tests of the device model: the fault path, G1-style coherence against a simulated client,
//! G2 under stress, G3 (finish exactly once, also on EAGAIN and release), equivalence of the
//! invalidation modes, and release.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use super::*;
use crate::notifier::{Callbacks, Event, Invalidate, InvalidateArgs, OnePass, Range, WouldBlock};
use crate::source::SimMemory;
use crate::sys::PAGE_SIZE;

const BASE: u64 = 0x7f00_0000_0000;
const P: u64 = PAGE_SIZE as u64;

fn device(mode: InvalidationMode, engines: usize, latency_us: u64, slots: u64) -> Device {
    Device::new(&DeviceConfig {
        engines,
        flush_latency: Duration::from_micros(latency_us),
        mode,
        shadow_capacity: slots * P,
        tlb_entries: 64,
        batch_threshold: 4,
        ..DeviceConfig::default()
    })
    .unwrap()
}

/// Every invalidation mode, for tests that must hold in each.
const ALL_MODES: [InvalidationMode; 3] = [
    InvalidationMode::OnePass,
    InvalidationMode::TwoPass,
    InvalidationMode::TwoPassBatched,
];

/// Simulated memory of `pages` pages at [`BASE`], each stamped with its index and `version`.
fn stamped(pages: u64, version: u64) -> Arc<SimMemory> {
    let mem = Arc::new(SimMemory::new(BASE, pages as usize));
    for i in 0..pages {
        stamp(&mem, i, version);
    }
    mem
}

fn args(first_page: u64, pages: u64, event: Event) -> InvalidateArgs {
    InvalidateArgs::new(Range::new(BASE + first_page * P, pages * P).unwrap(), event)
}

/// Fills page `i` of `mem` with an 8-byte pattern of (page, version).
fn stamp(mem: &SimMemory, i: u64, version: u64) {
    let word = (i << 32) | version;
    let data: Vec<u8> = std::iter::repeat_n(word.to_le_bytes(), PAGE_SIZE / 8)
        .flatten()
        .collect();
    mem.write_page(BASE + i * P, &data);
}

/// Decodes (page, version) from a page read through the device, checking it is uniform.
fn unstamp(data: &[u8]) -> (u64, u64) {
    let word = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert!(
        data.chunks(8).all(|c| c == word.to_le_bytes()),
        "a page mixes two writes"
    );
    (word >> 32, word & 0xffff_ffff)
}

#[test]
fn reads_fault_pages_in_then_hit_the_tlb_and_the_page_table() {
    let dev = device(InvalidationMode::TwoPassBatched, 2, 0, 64);
    let mem = stamped(16, 1);
    let c = dev.client(mem.clone(), 1 << 20);
    let id = c.attach(BASE, 8 * P).unwrap();
    assert_eq!(id, 1);
    let data = c.read_on(0, BASE + P, 3 * P as usize).unwrap();
    assert_eq!(unstamp(&data[..PAGE_SIZE]), (1, 1));
    assert_eq!(unstamp(&data[2 * PAGE_SIZE..]), (3, 1));
    assert_eq!(dev.counters().faults.load(Ordering::Relaxed), 1);
    assert_eq!(c.page_table_len(), 3);
    c.read_on(0, BASE + P, 3 * P as usize).unwrap();
    assert_eq!(dev.counters().tlb_hits.load(Ordering::Relaxed), 3);
    c.read_on(1, BASE + P + 17, 100).unwrap();
    assert!(
        dev.counters().tlb_misses.load(Ordering::Relaxed) >= 4,
        "engine 1 walked the table"
    );
    // Outside any mirror.
    assert!(matches!(
        c.read(BASE + 9 * P, 10),
        Err(DeviceError::NotMirrored { .. })
    ));
    // Unmapped in the client.
    mem.set_mapped(BASE + 5 * P, false);
    assert!(matches!(
        c.read(BASE + 5 * P, 10),
        Err(DeviceError::NotMapped { .. })
    ));
    // Overlap is allowed (each mirror its own notifier); misalignment is refused.
    let over = c.attach(BASE + 7 * P, 2 * P).unwrap();
    c.detach(over).unwrap();
    assert!(matches!(
        c.attach(BASE + 9 * P + 1, P),
        Err(DeviceError::Unaligned { .. })
    ));
    assert!(matches!(
        c.attach(BASE + 9 * P, 0),
        Err(DeviceError::Range(_))
    ));
}

#[test]
fn quota_and_capacity_are_typed_errors() {
    let dev = device(InvalidationMode::TwoPass, 1, 0, 4);
    let mem = Arc::new(SimMemory::new(BASE, 16));
    let c = dev.client(mem.clone(), 2 * P);
    c.attach(BASE, 16 * P).unwrap();
    assert!(matches!(
        c.read(BASE, 3 * PAGE_SIZE),
        Err(DeviceError::QuotaExceeded { .. })
    ));
    c.read(BASE, 2 * PAGE_SIZE).unwrap();
    c.set_quota_bytes(64 * P);
    assert!(matches!(
        c.read(BASE + 2 * P, 3 * PAGE_SIZE),
        Err(DeviceError::Shadow(ShadowError::Full { .. }))
    ));
    assert_eq!(
        c.counters().pages.load(Ordering::Relaxed),
        2,
        "a refused fault holds nothing"
    );
}

#[test]
fn invalidation_zaps_flushes_and_frees_and_the_next_read_sees_new_bytes() {
    for mode in ALL_MODES {
        let dev = device(mode, 4, 20, 64);
        let mem = stamped(8, 1);
        let c = dev.client(mem.clone(), 1 << 20);
        c.attach(BASE, 8 * P).unwrap();
        for e in 0..4 {
            c.read_on(e, BASE, 8 * PAGE_SIZE).unwrap();
        }
        assert_eq!(dev.shadow().in_use(), 8);
        stamp(&mem, 2, 2);
        let s = c.invalidate(args(2, 1, Event::Clear)).unwrap();
        assert_eq!(s.hits, 1, "{mode:?}");
        assert_eq!(
            dev.shadow().in_use(),
            7,
            "{mode:?}: slot freed by the end of the invalidation"
        );
        for e in 0..4 {
            let d = c.read_on(e, BASE + 2 * P, PAGE_SIZE).unwrap();
            assert_eq!(
                unstamp(&d),
                (2, 2),
                "{mode:?}: engine {e} returned a stale page"
            );
        }
        let flushed = dev.counters().flushes_queued.load(Ordering::Relaxed);
        assert_eq!(
            flushed, 4,
            "{mode:?}: one flush per engine that cached the mirror"
        );
    }
}

/// G1 for prefetch: a populate issued while the event reader holds the access lock (it has
/// read an event, the client's call has returned, the start pass has not run yet) waits for
/// that start pass, so it faults the zapped pages back in instead of counting stale ones.
/// Without the lock the populate returns at once and the zap that follows leaves the range
/// empty (caught whenever the populate thread runs within the grace period, i.e. nearly
/// always; with the lock the test passes however slow the machine is).
#[test]
fn g1_populate_waits_for_the_start_pass_of_an_event_already_read() {
    for mode in ALL_MODES {
        let dev = device(mode, 2, 20, 64);
        let mem = stamped(8, 1);
        let c = Arc::new(dev.client(mem.clone(), 1 << 20));
        c.attach(BASE, 8 * P).unwrap();
        c.populate(BASE, 8 * P).unwrap();
        assert_eq!(c.page_table_len(), 8, "{mode:?}");
        let reader = c.lock_access();
        for i in 0..8 {
            stamp(&mem, i, 2);
        }
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let prefetch = {
            let c = Arc::clone(&c);
            thread::spawn(move || {
                let r = c.populate(BASE, 8 * P);
                let _ = done_tx.send(());
                r
            })
        };
        // Give an unserialised populate the chance to finish first (the test does not rely
        // on it: a correct populate is blocked whatever happens here).
        let early = done_rx.recv_timeout(Duration::from_millis(200)).is_ok();
        let inv = reader.begin_invalidate(args(0, 8, Event::Clear));
        drop(reader);
        inv.unwrap().finish();
        prefetch.join().unwrap().unwrap();
        assert!(!early, "{mode:?}: populate ran past a held access lock");
        assert_eq!(
            c.page_table_len(),
            8,
            "{mode:?}: populate returned before the start pass it must follow"
        );
        for i in 0..8 {
            let d = c.read(BASE + i * P, PAGE_SIZE).unwrap();
            assert_eq!(unstamp(&d), (i, 2), "{mode:?}");
        }
    }
}

/// An injected invalidation (`memshadowctl invalidate`) holds the access lock for its start
/// pass only, like one from a uffd event: while its finish waits for the flush, the event
/// reader (and so every client's munmap) can go on. The flush takes 2 s; the lock must be
/// seen free before the finish's wait for it is over (only a 2 s stall of this thread right after
/// the start pass could make a correct device fail this).
#[test]
fn an_injected_invalidation_frees_the_access_lock_before_its_finish_waits() {
    let dev = Arc::new(device(InvalidationMode::TwoPass, 1, 2_000_000, 16));
    let mem = Arc::new(SimMemory::new(BASE, 4));
    let c = Arc::new(dev.client(mem, 1 << 20));
    c.attach(BASE, 4 * P).unwrap();
    c.read(BASE, 4 * PAGE_SIZE).unwrap();
    let k = dev.counters();
    let queued = k.flushes_queued.load(Ordering::SeqCst);
    let waited = k.fences_waited.load(Ordering::SeqCst);
    let inject = {
        let c = Arc::clone(&c);
        thread::spawn(move || c.invalidate_recorded(args(0, 4, Event::Clear)).unwrap())
    };
    // The start pass queues the flush under the lock, then lets go of it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while k.flushes_queued.load(Ordering::SeqCst) == queued {
        assert!(std::time::Instant::now() < deadline, "no flush was queued");
        thread::yield_now();
    }
    let free_during_the_wait = loop {
        let flushed = k.fences_waited.load(Ordering::SeqCst) != waited;
        if c.access_is_free() {
            break !flushed;
        }
        if flushed {
            break false;
        }
        thread::yield_now();
    };
    let record = inject.join().unwrap();
    assert!(record.finish >= Duration::from_millis(1900), "{record:?}");
    assert!(
        free_during_the_wait,
        "the access lock was held through the finish's wait for the flush"
    );
}

/// One invalidation hitting many notifiers on many engines: two-pass queues every flush
/// before waiting; batching sends one flush job per engine.
#[test]
fn doorbell_batching_queues_one_flush_per_engine_per_walk() {
    for (mode, want) in [
        (InvalidationMode::OnePass, 16 * 4),
        (InvalidationMode::TwoPass, 16 * 4),
        (InvalidationMode::TwoPassBatched, 4),
    ] {
        let dev = device(mode, 4, 0, 256);
        let mem = Arc::new(SimMemory::new(BASE, 64));
        let c = dev.client(mem.clone(), 1 << 20);
        for m in 0..16 {
            c.attach(BASE + m * 4 * P, 4 * P).unwrap();
        }
        for e in 0..4 {
            c.read_on(e, BASE, 64 * PAGE_SIZE).unwrap();
        }
        let before = dev.counters().flushes_queued.load(Ordering::Relaxed);
        let s = c.invalidate(args(0, 64, Event::Unmap)).unwrap();
        assert_eq!(s.hits, 16);
        let queued = dev.counters().flushes_queued.load(Ordering::Relaxed) - before;
        assert_eq!(queued, want, "{mode:?}");
        assert_eq!(dev.shadow().in_use(), 0);
        if mode == InvalidationMode::TwoPassBatched {
            // 16 ranges > threshold 4: widened to a flush of the whole client.
            assert_eq!(dev.counters().flushes_all.load(Ordering::Relaxed), 4);
        }
    }
}

/// Refuses every non-blockable invalidation.
struct Refuser;

impl OnePass for Refuser {
    fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
        if let Some(no) = inv.refuse() {
            return Err(no);
        }
        inv.set_seq();
        Ok(())
    }
}

#[test]
fn g3_a_finish_for_every_start_also_on_eagain_and_on_release() {
    for mode in [InvalidationMode::TwoPass, InvalidationMode::TwoPassBatched] {
        let dev = device(mode, 2, 10, 64);
        let mem = Arc::new(SimMemory::new(BASE, 16));
        let c = dev.client(mem.clone(), 1 << 20);
        c.attach(BASE, 4 * P).unwrap();
        c.attach(BASE + 4 * P, 4 * P).unwrap();
        // A notifier after both mirrors that refuses non-blockable ranges.
        let _refuser = c
            .subscription()
            .insert(
                Range::new(BASE + 12 * P, P).unwrap(),
                Callbacks::one_pass(Arc::new(Refuser)),
            )
            .unwrap();
        c.read_on(0, BASE, 8 * PAGE_SIZE).unwrap();
        c.read_on(1, BASE, 8 * PAGE_SIZE).unwrap();
        let counters = dev.counters();
        let err = c
            .invalidate(args(0, 16, Event::Clear).non_blockable())
            .unwrap_err();
        let InvalidateError::WouldBlock(s) = err else {
            panic!("{err:?}")
        };
        assert_eq!(
            (s.started, s.finished),
            (2, 2),
            "{mode:?}: both mirrors started and finished"
        );
        assert_eq!(
            counters.notifier_finishes.load(Ordering::Relaxed),
            2,
            "{mode:?}: exactly one finish each"
        );
        assert_eq!(
            dev.shadow().in_use(),
            0,
            "{mode:?}: finishes freed the slots on EAGAIN"
        );
        assert_eq!(c.subscription().active(), 0);
        assert_eq!(counters.inv_would_block.load(Ordering::Relaxed), 1);
        // Release.
        c.read_on(0, BASE, 8 * PAGE_SIZE).unwrap();
        let s = c.release().unwrap();
        assert_eq!((s.started, s.finished), (2, 2), "{mode:?}");
        assert_eq!(counters.notifier_finishes.load(Ordering::Relaxed), 4);
        assert_eq!(dev.shadow().in_use(), 0);
        assert_eq!(c.page_table_len(), 0);
        assert_eq!(c.mirror_count(), 0);
    }
}

#[test]
fn detach_flushes_and_frees_and_stops_callbacks() {
    let dev = device(InvalidationMode::TwoPassBatched, 2, 10, 64);
    let mem = Arc::new(SimMemory::new(BASE, 16));
    let c = dev.client(mem.clone(), 1 << 20);
    let a = c.attach(BASE, 4 * P).unwrap();
    c.read_on(0, BASE, 4 * PAGE_SIZE).unwrap();
    c.read_on(1, BASE, 4 * PAGE_SIZE).unwrap();
    c.detach(a).unwrap();
    assert_eq!(dev.shadow().in_use(), 0);
    assert_eq!(c.counters().pages.load(Ordering::Relaxed), 0);
    assert!(matches!(c.detach(a), Err(DeviceError::NoSuchMirror(_))));
    assert!(matches!(
        c.read(BASE, 10),
        Err(DeviceError::NotMirrored { .. })
    ));
    assert_eq!(c.invalidate(args(0, 4, Event::Unmap)).unwrap().hits, 0);
    assert_eq!(dev.counters().g2_violations.load(Ordering::Relaxed), 0);
}

/// Fault path under concurrent writers and invalidations: once an invalidation of a page has
/// returned, no device read submitted afterwards returns the bytes it replaced.
#[test]
fn fault_path_never_returns_bytes_older_than_a_returned_invalidation() {
    const PAGES: u64 = 32;
    for mode in [
        InvalidationMode::TwoPass,
        InvalidationMode::TwoPassBatched,
        InvalidationMode::OnePass,
    ] {
        let dev = Arc::new(device(mode, 3, 5, 256));
        let mem = stamped(PAGES, 0);
        let c = Arc::new(dev.client(mem.clone(), 1 << 20));
        c.attach(BASE, 16 * P).unwrap();
        c.attach(BASE + 16 * P, 16 * P).unwrap();
        let floor: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let stale = Arc::new(AtomicUsize::new(0));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (c, mem, floor) = (Arc::clone(&c), Arc::clone(&mem), Arc::clone(&floor));
                thread::spawn(move || {
                    let mut x = 0x1234_5678u64 + w;
                    for round in 1..=300u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Writer w owns pages of its parity, so versions only grow.
                        let page = (x % (PAGES / 2)) * 2 + w;
                        stamp(&mem, page, round);
                        // A range of 1..=4 pages that contains `page`.
                        let first = page.saturating_sub((x >> 40) & 1);
                        let last = (page + 1 + (x >> 20) % 3).min(PAGES);
                        c.invalidate(args(first, last - first, Event::Clear))
                            .unwrap();
                        floor[page as usize].store(round, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..3usize)
            .map(|r| {
                let (c, floor, stop, stale) = (
                    Arc::clone(&c),
                    Arc::clone(&floor),
                    Arc::clone(&stop),
                    Arc::clone(&stale),
                );
                thread::spawn(move || {
                    let mut x = 0x9876_5432u64 + r as u64;
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = x % PAGES;
                        let pages = (1 + (x >> 32) % 4).min(PAGES - page);
                        let floors: Vec<u64> = (page..page + pages)
                            .map(|p| floor[p as usize].load(Ordering::SeqCst))
                            .collect();
                        let data = c.read_on(r, BASE + page * P, (pages * P) as usize).unwrap();
                        for (k, chunk) in data.chunks(PAGE_SIZE).enumerate() {
                            let (pg, ver) = unstamp(chunk);
                            assert_eq!(
                                pg,
                                page + k as u64,
                                "a page came back with another page's bytes"
                            );
                            if ver < floors[k] {
                                stale.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert_eq!(
            stale.load(Ordering::SeqCst),
            0,
            "{mode:?}: a read returned bytes older than a returned invalidation"
        );
        assert!(reads > 0);
        assert_eq!(
            dev.counters().g2_violations.load(Ordering::Relaxed),
            0,
            "{mode:?}"
        );
        c.release().unwrap();
        assert_eq!(dev.shadow().in_use(), 0, "{mode:?}");
    }
}

/// G2 under stress: engines read while ranges are invalidated and slots reused at once
/// (small LIFO free list). The engines check each slot's generation on every read through a
/// translation, and every page carries its own address, so a read from a slot reassigned
/// before every engine's flush completed shows up either way.
#[test]
fn g2_no_read_from_a_slot_reused_before_every_engine_flushed() {
    const PAGES: u64 = 64;
    const READERS: u64 = 4;
    const MAX_READ: u64 = 8;
    const MAX_INVALIDATE: u64 = 12;
    // Peak slot use: every page mapped, each reader holding a fault run's slots that lose
    // the race to another reader (freed after the install), and one invalidation's slots
    // waiting for its finish. A few more keep reuse close (LIFO) without running dry.
    const SLOTS: u64 = PAGES + READERS * MAX_READ + MAX_INVALIDATE + 4;
    for mode in [InvalidationMode::TwoPass, InvalidationMode::TwoPassBatched] {
        let dev = Arc::new(device(mode, READERS as usize, 30, SLOTS));
        let mem = stamped(PAGES, 7);
        let c = Arc::new(dev.client(mem.clone(), 1 << 30));
        for m in 0..PAGES / 8 {
            c.attach(BASE + m * 8 * P, 8 * P).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let wrong = Arc::new(AtomicUsize::new(0));
        let reads = Arc::new(AtomicU64::new(0));
        let start = Arc::new(Barrier::new(READERS as usize + 1));
        let readers: Vec<_> = (0..READERS as usize)
            .map(|e| {
                let (c, stop, wrong, start) = (
                    Arc::clone(&c),
                    Arc::clone(&stop),
                    Arc::clone(&wrong),
                    Arc::clone(&start),
                );
                let reads = Arc::clone(&reads);
                thread::spawn(move || {
                    start.wait();
                    let mut x = 0xdead_beefu64 ^ (e as u64) << 20;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = x % PAGES;
                        let pages = (1 + (x >> 32) % MAX_READ).min(PAGES - page);
                        let data = c.read_on(e, BASE + page * P, (pages * P) as usize).unwrap();
                        for (k, chunk) in data.chunks(PAGE_SIZE).enumerate() {
                            if unstamp(chunk).0 != page + k as u64 {
                                wrong.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        reads.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        start.wait();
        let mut x = 0x5555u64;
        for _ in 0..1500 {
            // Interleave with the readers without depending on timing: wait for a few reads
            // (mapping and caching pages) between invalidations.
            let seen = reads.load(Ordering::SeqCst);
            while reads.load(Ordering::SeqCst) < seen + 4 {
                thread::yield_now();
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let first = x % PAGES;
            let n = (1 + (x >> 16) % MAX_INVALIDATE).min(PAGES - first);
            c.invalidate(args(first, n, Event::Unmap)).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        let k = dev.counters();
        assert_eq!(
            k.g2_violations.load(Ordering::Relaxed),
            0,
            "{mode:?}: slot reused under a live translation"
        );
        assert_eq!(
            wrong.load(Ordering::SeqCst),
            0,
            "{mode:?}: a read returned another page's bytes"
        );
        assert!(
            k.slots_freed.load(Ordering::Relaxed) > 100,
            "{mode:?}: the stress never reused slots"
        );
        assert!(k.tlb_hits.load(Ordering::Relaxed) > 0);
    }
}

/// Equivalence: the same random single-threaded workload on the three modes ends with the
/// same reads, page tables, slot contents and (non-timing, non-flush) counters.
mod equivalence {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Read {
            engine: usize,
            page: u64,
            pages: u64,
        },
        Write {
            page: u64,
            version: u64,
        },
        Invalidate {
            page: u64,
            pages: u64,
            unmap: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..3, 0u64..32, 1u64..6).prop_map(|(engine, page, pages)| Op::Read { engine, page, pages }),
            2 => (0u64..32, 1u64..100).prop_map(|(page, version)| Op::Write { page, version }),
            2 => (0u64..32, 1u64..10, any::<bool>()).prop_map(|(page, pages, unmap)| Op::Invalidate { page, pages, unmap }),
        ]
    }

    struct Rig {
        dev: Device,
        mem: Arc<SimMemory>,
        c: DeviceClient,
    }

    fn rig(mode: InvalidationMode) -> Rig {
        let dev = device(mode, 3, 0, 128);
        let mem = stamped(32, 0);
        let c = dev.client(mem.clone(), 1 << 20);
        for m in 0..4 {
            c.attach(BASE + m * 8 * P, 8 * P).unwrap();
        }
        Rig { dev, mem, c }
    }

    const COMPARED: [&str; 8] = [
        "device.reads",
        "device.faults",
        "device.pages_mirrored",
        "device.ptes_zapped",
        "device.slots_freed",
        "device.inv_clear",
        "device.inv_unmap",
        "shadow.slots_in_use",
    ];

    fn counters(r: &Rig) -> Vec<(String, u64)> {
        r.dev
            .snapshot()
            .into_iter()
            .filter(|(k, _)| COMPARED.contains(&k.as_str()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn one_pass_two_pass_and_batched_end_identical(ops in prop::collection::vec(op(), 1..60)) {
            let rigs = [rig(InvalidationMode::OnePass), rig(InvalidationMode::TwoPass), rig(InvalidationMode::TwoPassBatched)];
            for op in &ops {
                let mut results = Vec::new();
                for r in &rigs {
                    let out = match *op {
                        Op::Read { engine, page, pages } => {
                            let pages = pages.min(32 - page);
                            r.c.read_on(engine, BASE + page * P, (pages * P) as usize).unwrap()
                        }
                        Op::Write { page, version } => { stamp(&r.mem, page, version); Vec::new() }
                        Op::Invalidate { page, pages, unmap } => {
                            let pages = pages.min(32 - page);
                            let e = if unmap { Event::Unmap } else { Event::Clear };
                            let s = r.c.invalidate(args(page, pages, e)).unwrap();
                            s.hits.to_le_bytes().to_vec()
                        }
                    };
                    results.push(out);
                }
                prop_assert_eq!(&results[0], &results[1]);
                prop_assert_eq!(&results[0], &results[2]);
            }
            // Which pages are mapped (slot numbers differ: the reclaimer trims free slots at
            // its own pace, which changes the allocation order, not the contents).
            let tables: Vec<Vec<u64>> = rigs.iter().map(|r| r.c.page_table_entries().into_iter().map(|(v, _)| v).collect()).collect();
            prop_assert_eq!(&tables[0], &tables[1]);
            prop_assert_eq!(&tables[0], &tables[2]);
            // Slot contents: read every present page back through the device.
            for vpn in &tables[0] {
                let a = rigs[0].c.read_on(0, vpn * P, PAGE_SIZE).unwrap();
                prop_assert_eq!(&a, &rigs[1].c.read_on(0, vpn * P, PAGE_SIZE).unwrap());
                prop_assert_eq!(&a, &rigs[2].c.read_on(0, vpn * P, PAGE_SIZE).unwrap());
            }
            let k: Vec<_> = rigs.iter().map(counters).collect();
            prop_assert_eq!(&k[0], &k[1]);
            prop_assert_eq!(&k[0], &k[2]);
            // Batching never queues more flushes than the unbatched modes.
            let q = |r: &Rig| r.dev.counters().flushes_queued.load(Ordering::Relaxed);
            prop_assert_eq!(q(&rigs[0]), q(&rigs[1]));
            prop_assert!(q(&rigs[2]) <= q(&rigs[1]));
        }
    }
}

/// An unmapped part of a mirror is retired before its invalidation: a read after that can
/// neither hit old shadow pages nor fault in whatever is mapped there later (G1).
#[test]
fn retired_ranges_are_never_faulted_in_again() {
    let dev = device(InvalidationMode::TwoPassBatched, 2, 20, 64);
    let mem = stamped(16, 1);
    let c = dev.client(mem.clone(), 1 << 20);
    let id = c.attach(BASE, 8 * P).unwrap();
    c.read(BASE, 8 * PAGE_SIZE).unwrap();
    let inv = {
        let g = c.lock_access();
        assert!(g
            .retire(Range::new(BASE + 2 * P, 2 * P).unwrap())
            .is_empty());
        g.begin_invalidate(args(2, 2, Event::Unmap)).unwrap()
    };
    // The "client" maps something new there at once; it must not be mirrored.
    stamp(&mem, 2, 2);
    thread::scope(|s| {
        s.spawn(move || drop(inv));
        assert!(matches!(
            c.read(BASE + 2 * P, 10),
            Err(DeviceError::NotMirrored { .. })
        ));
    });
    assert_eq!(unstamp(&c.read(BASE + 4 * P, PAGE_SIZE).unwrap()), (4, 1));
    let g = c.lock_access();
    assert_eq!(g.retire(Range::new(BASE, 8 * P).unwrap()), vec![id]);
}

/// A mirror retired entirely is out of the way at once: the same range can be attached
/// again (the client mapped something new there, or an mremap moved a mirror onto it)
/// before the old one's detach, and that late detach frees only the old mirror's pages.
#[test]
fn a_wholly_retired_mirror_makes_way_before_its_detach() {
    let dev = device(InvalidationMode::TwoPass, 2, 20, 64);
    let mem = stamped(8, 1);
    let c = dev.client(mem.clone(), 1 << 20);
    let old = c.attach(BASE, 8 * P).unwrap();
    c.read(BASE, 8 * PAGE_SIZE).unwrap();
    {
        let g = c.lock_access();
        assert_eq!(g.retire(Range::new(BASE, 8 * P).unwrap()), vec![old]);
        g.begin_invalidate(args(0, 8, Event::Unmap))
            .unwrap()
            .finish();
    }
    assert_eq!(c.mirror_count(), 0, "only live mirrors count");
    for i in 0..8 {
        stamp(&mem, i, 2);
    }
    let new = c.attach(BASE, 8 * P).unwrap();
    assert_ne!(new, old);
    assert_eq!(unstamp(&c.read(BASE + 3 * P, PAGE_SIZE).unwrap()), (3, 2));
    c.populate(BASE, 8 * P).unwrap();
    assert_eq!(c.page_table_len(), 8);
    c.detach(old).unwrap();
    assert_eq!(
        c.page_table_len(),
        8,
        "the late detach left the new mirror's pages"
    );
    assert_eq!(dev.shadow().in_use(), 8);
    assert!(matches!(c.detach(old), Err(DeviceError::NoSuchMirror(_))));
    c.detach(new).unwrap();
    assert_eq!(dev.shadow().in_use(), 0);
}

/// Detach hands back the parts of the mirror never retired, and only those: the caller
/// unregisters them, and a part the client unmapped may be someone else's by now.
#[test]
fn detach_returns_the_parts_never_retired() {
    let dev = device(InvalidationMode::TwoPass, 1, 20, 64);
    let mem = Arc::new(SimMemory::new(BASE, 8));
    let c = dev.client(mem, 1 << 20);
    let r = |first: u64, pages: u64| Range::new(BASE + first * P, pages * P).unwrap();
    let whole = c.attach(BASE, 8 * P).unwrap();
    assert_eq!(c.detach(whole).unwrap(), vec![r(0, 8)]);
    let id = c.attach(BASE, 8 * P).unwrap();
    {
        let g = c.lock_access();
        assert!(g.retire(r(2, 2)).is_empty());
        assert!(g.retire(r(3, 2)).is_empty(), "overlapping pieces");
        assert!(g.retire(r(7, 1)).is_empty());
    }
    assert_eq!(c.detach(id).unwrap(), vec![r(0, 2), r(5, 2)]);
}
