//! Dirty tracking end to end (docs/design.md §6): the real `memshadowd` with each back
//! end that works here, real client processes writing to mirrored memory, and device reads
//! that must return the new bytes once the writes were collected, and the old ones when
//! tracking is off (so these tests can fail).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use memshadow_tests::{fields, needs_full_userfaultfd, needs_root, Daemon, TestClient, HANG_GUARD};
use std::collections::HashMap;

const P: u64 = 4096;
/// Pages of a PMD-mapped transparent huge page.
const HUGE_PAGES: u64 = 512;

/// The back ends these tests expect to work on the dev machines (Linux 6.18, soft-dirty
/// compiled out).
const WORKING: [&str; 2] = ["pagemap-scan", "uffd-wp"];

fn info(d: &Daemon) -> HashMap<String, String> {
    d.info()
}

/// The back ends of [`WORKING`] a client of this user gets: uffd-wp needs a userfaultfd
/// that reports the kernel's faults too (root); without one its part is skipped, saying so.
fn working_here() -> Vec<&'static str> {
    WORKING
        .into_iter()
        .filter(|b| {
            *b != "uffd-wp"
                || needs_full_userfaultfd("the uffd-wp part (a client gets uffd-wp only then)")
        })
        .collect()
}

fn n(f: &HashMap<String, String>, k: &str) -> u64 {
    f.get(k)
        .unwrap_or_else(|| panic!("no {k} in {f:?}"))
        .parse()
        .unwrap()
}

fn uniform(c: &mut TestClient, map: &str, off: u64, len: u64) -> String {
    fields(&c.expect_ok(&format!("read {map} {off} {len}")))["uniform"].clone()
}

/// Writes `len` bytes of `byte` into process `pid` at `addr` with `process_vm_writev`.
fn remote_write(pid: i32, addr: u64, len: usize, byte: u8) {
    let data = vec![byte; len];
    let local = [std::io::IoSlice::new(&data)];
    let remote = [nix::sys::uio::RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let n =
        nix::sys::uio::process_vm_writev(nix::unistd::Pid::from_raw(pid), &local, &remote).unwrap();
    assert_eq!(n, len);
}

/// Every page of `pages` pages of `map` reads as `expect(page)` through the device.
fn check_pages(c: &mut TestClient, map: &str, pages: u64, expect: impl Fn(u64) -> u8) {
    for p in 0..pages {
        assert_eq!(
            uniform(c, map, p * P, P),
            expect(p).to_string(),
            "page {p} of {map}"
        );
    }
}

/// Per working back end, anonymous and memfd (shmem) memory: a write after mirroring
/// reaches the device once collected by `sync` (and, with pagemap-scan, not before: the
/// read in between is stale, which is what `sync` exists to fix), whether the CPU, the
/// kernel (`read(2)` into the page) or another process (`process_vm_writev`) wrote it;
/// `strict` collects before each read without any `sync`.
#[test]
fn writes_reach_the_device_after_sync_for_each_backend() {
    for backend in working_here() {
        let d = Daemon::start(&["--dirty-tracking", backend]);
        assert_eq!(info(&d)["dirty.backend"], backend);
        let mut c = TestClient::start(d.socket());
        assert_eq!(
            fields(&c.expect_ok("stats")).get(&format!("dirty.backend.{backend}")),
            Some(&"1".to_owned()),
            "the client got {backend}"
        );
        for kind in ["anon", "shm"] {
            let addr = fields(&c.expect_ok(&format!("map {kind} 16 {kind}")))["addr"].clone();
            c.expect_ok(&format!("fill {kind} 1"));
            c.expect_ok(&format!("attach {kind}"));
            assert_eq!(uniform(&mut c, kind, 0, 16 * P), "1");
            c.expect_ok(&format!("write {kind} {} {P} 2", 2 * P));
            let before_sync = uniform(&mut c, kind, 2 * P, P);
            match backend {
                // Nothing was collected yet: the shadow still has the old bytes.
                "pagemap-scan" => assert_eq!(before_sync, "1", "{backend} {kind}"),
                // The write fault invalidated the page before the write completed.
                _ => assert_eq!(before_sync, "2", "{backend} {kind}"),
            }
            let r = fields(&c.expect_ok(&format!("sync {kind}")));
            assert_eq!(r["backend"], backend);
            assert_eq!(n(&r, "pages_dirty"), 1, "{backend} {kind}: {r:?}");
            check_pages(&mut c, kind, 16, |p| if p == 2 { 2 } else { 1 });
            let r = fields(&c.expect_ok(&format!("sync {kind}")));
            assert_eq!(n(&r, "pages_dirty"), 0, "re-armed: {r:?}");
            // Written again after the re-mirror: found again.
            c.expect_ok(&format!("write {kind} {} {P} 3", 2 * P));
            let r = fields(&c.expect_ok(&format!("sync {kind}")));
            assert_eq!(n(&r, "pages_dirty"), 1, "{backend} {kind}: {r:?}");
            assert_eq!(uniform(&mut c, kind, 2 * P, P), "3");
            // A write by the kernel (read(2) into the page): with uffd-wp the kernel's
            // access waits for the daemon like a CPU write (a full uffd, as root).
            c.expect_ok(&format!("kernel-write {kind} {} {P} 9", 5 * P));
            let r = fields(&c.expect_ok(&format!("sync {kind}")));
            assert_eq!(n(&r, "pages_dirty"), 1, "{backend} {kind}: {r:?}");
            assert_eq!(uniform(&mut c, kind, 5 * P, P), "9");
            // Memory changed by another process (process_vm_writev, as root): no uffd event,
            // only dirty tracking sees it (docs/design.md §6).
            let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap();
            remote_write(c.pid(), addr + 7 * P, P as usize, 11);
            let r = fields(&c.expect_ok(&format!("sync {kind}")));
            assert_eq!(n(&r, "pages_dirty"), 1, "{backend} {kind}: {r:?}");
            assert_eq!(uniform(&mut c, kind, 7 * P, P), "11");
        }
        // strict: the read collects its pages first; no sync anywhere.
        for kind in ["anon", "shm"] {
            let m = format!("strict-{kind}");
            c.expect_ok(&format!("map {m} 16 {kind}"));
            c.expect_ok(&format!("fill {m} 1"));
            c.expect_ok(&format!("attach-policy {m} strict"));
            assert_eq!(uniform(&mut c, &m, 0, 16 * P), "1");
            for round in 2..5u64 {
                c.expect_ok(&format!("write {m} {} {P} {round}", round * P));
                assert_eq!(uniform(&mut c, &m, round * P, P), round.to_string());
            }
            check_pages(&mut c, &m, 16, |p| {
                if (2..5).contains(&p) {
                    p as u8
                } else {
                    1
                }
            });
        }
        let s = d.status();
        if backend == "pagemap-scan" {
            assert!(s["dirty.scans"] >= 6, "{s:?}");
            assert!(s["dirty.pages_scanned"] >= 6 * 16, "{s:?}");
        } else {
            assert!(s["dirty.wp_faults"] >= 4 + 6, "{s:?}");
            assert!(s["dirty.arms"] >= 1, "{s:?}");
        }
        assert!(s["dirty.pages_dirty"] >= 4, "{s:?}");
    }
}

/// With tracking off the same sequence shows the stale read: the tests above can fail.
#[test]
fn with_tracking_off_the_read_stays_stale() {
    let d = Daemon::start(&["--dirty-tracking", "off"]);
    let i = info(&d);
    assert_eq!(i["dirty.backend"], "off");
    assert_eq!(i["dirty.requested"], "off");
    for b in WORKING {
        assert_eq!(
            i[&format!("dirty.refused.{b}")],
            "works, not chosen (--dirty-tracking off)"
        );
    }
    let mut c = TestClient::start(d.socket());
    assert_eq!(fields(&c.expect_ok("stats"))["dirty.backend.off"], "1");
    c.expect_ok("map a 16 anon");
    c.expect_ok("fill a 1");
    c.expect_ok("attach a");
    assert_eq!(uniform(&mut c, "a", 0, 16 * P), "1");
    c.expect_ok(&format!("write a {} {P} 2", 2 * P));
    let e = c.cmd("sync a");
    assert!(e.starts_with("err") && e.contains("off"), "{e}");
    assert_eq!(
        uniform(&mut c, "a", 2 * P, P),
        "1",
        "stale: nothing tracks writes"
    );
    c.expect_ok("map b 4 anon");
    let e = c.cmd("attach-policy b strict");
    assert!(e.starts_with("err") && e.contains("dirty tracking"), "{e}");
}

/// THP-backed memory (`MADV_HUGEPAGE`), per working back end. Coherence is checked on every
/// page of both huge pages. Where THP is really in use (AnonHugePages of the mapping), the
/// invalidations must cover exactly what became writable without a trace:
/// * a write to an armed huge page: the kernel splits the PMD and only the 4 KiB page
///   written is unprotected, so exactly one page is invalidated;
/// * pagemap-scan, a huge page re-faulted after `MADV_DONTNEED` (mapped whole by one PMD,
///   never armed): written pages inside it raise no fault, the scan reports the whole
///   extent, and all 512 pages are invalidated.
#[test]
fn thp_backed_memory_stays_coherent_and_huge_extents_are_covered() {
    let enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap_or_else(|_| "absent".into());
    println!("transparent_hugepage/enabled: {}", enabled.trim());
    for backend in working_here() {
        let d = Daemon::start(&["--dirty-tracking", backend]);
        let mut c = TestClient::start(d.socket());
        let pages = 2 * HUGE_PAGES;
        c.expect_ok(&format!("map t {pages} thp"));
        c.expect_ok("fill t 1");
        let huge_kb = n(&fields(&c.expect_ok("thp t")), "anon_huge_kb");
        let thp = huge_kb >= 2 * 2048;
        if !thp {
            println!(
                "THP unavailable for {backend} (AnonHugePages {huge_kb} kB): checking coherence only"
            );
        }
        c.expect_ok("attach t");
        assert_eq!(n(&fields(&c.expect_ok("populate t")), "pages"), pages);
        // A write into the first huge page.
        c.expect_ok(&format!("write t {} {P} 2", 5 * P));
        let r = fields(&c.expect_ok("sync t"));
        assert_eq!(n(&r, "pages_dirty"), 1, "{backend}: {r:?}");
        let left = n(&fields(&c.expect_ok("mirror-pages t")), "pages");
        assert_eq!(
            left,
            pages - 1,
            "{backend}: only the written page was invalidated"
        );
        check_pages(&mut c, "t", pages, |p| if p == 5 { 2 } else { 1 });
        // Re-fault the second huge page as a whole after MADV_DONTNEED, mirror it, then
        // write another page of it.
        let second = HUGE_PAGES * P;
        c.expect_ok(&format!("madvise-range t {second} {}", HUGE_PAGES * P));
        c.expect_ok(&format!("write t {second} {P} 3"));
        let refault_kb = n(&fields(&c.expect_ok("thp t")), "anon_huge_kb");
        assert_eq!(n(&fields(&c.expect_ok("populate t")), "pages"), pages);
        c.expect_ok(&format!("write t {} {P} 4", second + 100 * P));
        let r = fields(&c.expect_ok("sync t"));
        let left = n(&fields(&c.expect_ok("mirror-pages t")), "pages");
        println!(
            "{backend}: THP {thp} (AnonHugePages {huge_kb} kB at fill, {refault_kb} kB after \
             the re-fault); write into the re-faulted extent -> {r:?}, {left} pages left"
        );
        match backend {
            "pagemap-scan" if refault_kb >= 2048 => {
                // Mapped whole by a PMD that was never armed: the write left no per-page
                // trace, the scan reports the whole extent, all of it is invalidated.
                assert_eq!(n(&r, "pages_dirty"), HUGE_PAGES, "{r:?}");
                assert_eq!(n(&r, "regions"), 1, "{r:?}");
                assert_eq!(left, pages - HUGE_PAGES);
            }
            "pagemap-scan" => {
                println!("the re-fault was not a THP: whole-extent case not exercised");
                assert!(n(&r, "pages_dirty") >= 1, "{r:?}");
            }
            _ => {
                // uffd-wp armed the re-faulted extent as populate mirrored it; the write
                // faulted and exactly its page was un-protected and invalidated.
                assert_eq!(n(&r, "pages_dirty"), 1, "{r:?}");
                assert_eq!(left, pages - 1);
            }
        }
        check_pages(&mut c, "t", pages, |p| match p {
            5 => 2,
            p if p == HUGE_PAGES => 3,
            p if p == HUGE_PAGES + 100 => 4,
            p if p > HUGE_PAGES => 0,
            _ => 1,
        });
    }
}

/// pagemap-scan with a `UFFD_USER_MODE_ONLY` uffd: the test-client drops to `nobody`
/// before connecting, so the library falls back to a user-mode-only uffd. Its writes (CPU
/// writes and a kernel write by `read(2)`) are found by `sync`; under forced `uffd-wp`,
/// which would make that kernel write fail with `EFAULT`, such a client gets no tracking
/// and says why, and the kernel write still works.
#[test]
fn pagemap_scan_serves_an_unprivileged_client() {
    if !needs_root("runs a client as nobody beside a root client") {
        return;
    }
    let d = Daemon::start(&[]);
    assert_eq!(info(&d)["dirty.backend"], "pagemap-scan");
    let mut root = TestClient::start(d.socket());
    let mut c = TestClient::start_with(d.socket(), &["--uid", "65534"]);
    let stats = fields(&c.expect_ok("stats"));
    assert_eq!(stats["dirty.backend.pagemap-scan"], "1", "{stats:?}");
    c.expect_ok("map a 16 anon");
    c.expect_ok("fill a 1");
    c.expect_ok("attach a");
    assert_eq!(uniform(&mut c, "a", 0, 16 * P), "1");
    c.expect_ok(&format!("write a {} {P} 2", 3 * P));
    c.expect_ok(&format!("kernel-write a {} {P} 5", 9 * P));
    let r = fields(&c.expect_ok("sync a"));
    assert_eq!(n(&r, "pages_dirty"), 2, "{r:?}");
    check_pages(&mut c, "a", 16, |p| match p {
        3 => 2,
        9 => 5,
        _ => 1,
    });
    // sync --pid: another client's only for root or the daemon's owner.
    let e = c.cmd(&format!("sync-pid {}", root.pid()));
    assert!(e.starts_with("err permission denied"), "{e}");
    c.expect_ok(&format!("write a {} {P} 6", 4 * P));
    let r = fields(&root.expect_ok(&format!("sync-pid {}", c.pid())));
    assert_eq!(r["backend"], "pagemap-scan");
    assert_eq!(n(&r, "pages_dirty"), 1, "{r:?}");
    assert_eq!(uniform(&mut c, "a", 4 * P, P), "6");
    drop((c, root, d));

    let d = Daemon::start(&["--dirty-tracking", "uffd-wp"]);
    let mut c = TestClient::start_with(d.socket(), &["--uid", "65534"]);
    assert_eq!(fields(&c.expect_ok("stats"))["dirty.backend.off"], "1");
    c.expect_ok("map a 16 anon");
    c.expect_ok("fill a 1");
    c.expect_ok("attach a");
    assert_eq!(uniform(&mut c, "a", 0, 16 * P), "1");
    c.expect_ok(&format!("kernel-write a {} {P} 5", 9 * P));
    let e = c.cmd("sync a");
    assert!(e.contains("USER_MODE_ONLY"), "{e}");
}

/// `periodic=MS`: the daemon's timer collects without any sync or strict read; a manual
/// mirror of the same client stays stale meanwhile.
#[test]
fn periodic_policy_collects_on_the_daemons_timer() {
    let d = Daemon::start(&["--dirty-tracking", "pagemap-scan"]);
    let threads = d.threads();
    let mut c = TestClient::start(d.socket());
    for m in ["p", "m"] {
        c.expect_ok(&format!("map {m} 8 anon"));
        c.expect_ok(&format!("fill {m} 1"));
    }
    c.expect_ok("attach-policy p periodic=20");
    c.expect_ok("attach m");
    assert_eq!(uniform(&mut c, "p", 0, 8 * P), "1");
    assert_eq!(uniform(&mut c, "m", 0, 8 * P), "1");
    c.expect_ok(&format!("write p {P} {P} 2"));
    c.expect_ok(&format!("write m {P} {P} 2"));
    d.wait_until(
        "the periodic timer to collect the write",
        HANG_GUARD,
        || uniform(&mut c, "p", P, P) == "2",
    );
    assert_eq!(uniform(&mut c, "m", P, P), "1", "manual: not collected");
    let st = c.expect_ok("mirror-pages p");
    assert!(st.contains("periodic=20"), "{st}");
    assert_eq!(d.threads(), threads, "no thread per periodic mirror");
}

/// The probe decides, and `status` shows what it found: every back end not chosen has a
/// `dirty.refused.<name>` line with its reason; forcing one the probe found unavailable
/// (soft-dirty here) stops the daemon with that reason on one line, before it listens.
#[test]
fn the_probe_result_is_what_status_shows_and_forcing_a_broken_backend_fails() {
    let d = Daemon::start(&[]);
    let i = info(&d);
    println!("{:#?}", {
        let mut v: Vec<_> = i.iter().filter(|(k, _)| k.starts_with("dirty.")).collect();
        v.sort();
        v
    });
    assert_eq!(i["dirty.requested"], "auto");
    let chosen = i["dirty.backend"].clone();
    assert_eq!(chosen, "pagemap-scan", "the fastest back end works here");
    for b in ["pagemap-scan", "soft-dirty", "uffd-wp"] {
        if b != chosen {
            assert!(i.contains_key(&format!("dirty.refused.{b}")), "{b}: {i:?}");
        }
    }
    assert!(i.contains_key("dirty.refused.off"));
    assert_eq!(
        i["dirty.refused.uffd-wp"],
        "works, but pagemap-scan is preferred"
    );
    let soft = i["dirty.refused.soft-dirty"].clone();
    let why = soft
        .strip_prefix("unavailable: ")
        .unwrap_or_else(|| panic!("soft-dirty should be unavailable here: {soft}"));
    assert!(why.contains("bit 55"), "{why}");
    drop(d);

    // Forcing it: a clear one-line error with the same reason, exit non-zero, no socket.
    let mut forced = Daemon::builder()
        .args(["--dirty-tracking", "soft-dirty"])
        .env("MEMSHADOW_LOG", "info")
        .spawn();
    let status = forced.wait();
    let err = forced.log();
    println!("stderr: {err}");
    assert!(!status.success(), "{status:?}");
    let line = err
        .lines()
        .find(|l| l.contains("cannot start"))
        .unwrap_or_else(|| panic!("no error line in {err:?}"));
    assert!(
        line.contains("--dirty-tracking soft-dirty is unavailable here") && line.contains(why),
        "{line}"
    );
    assert!(!forced.socket().exists(), "it never listened");

    // Forcing a working one: chosen, and the preferred one is refused as not chosen.
    let d = Daemon::start(&["--dirty-tracking", "uffd-wp"]);
    let i = info(&d);
    assert_eq!(i["dirty.backend"], "uffd-wp");
    assert_eq!(
        i["dirty.refused.pagemap-scan"],
        "works, not chosen (--dirty-tracking uffd-wp)"
    );
    assert_eq!(i["dirty.refused.soft-dirty"], soft);
}

/// uffd-wp: an attach overlapping a mirror, and its detach, leave that mirror's armed pages
/// armed and registered, so a later write to them still faults and invalidates (the probe
/// for unread events must not un-protect anything, and the detach unregisters only what
/// no other mirror covers).
#[test]
fn an_overlapping_attach_and_detach_leave_the_pages_armed() {
    if !needs_full_userfaultfd("a client with uffd-wp tracking") {
        return;
    }
    let d = Daemon::start(&["--dirty-tracking", "uffd-wp"]);
    let mut c = TestClient::start(d.socket());
    let addr = fields(&c.expect_ok("map a 16 anon"))["addr"].clone();
    let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap();
    c.expect_ok("fill a 1");
    c.expect_ok("attach a");
    assert_eq!(uniform(&mut c, "a", 0, 16 * P), "1");
    // Attached and (the handle dropped) detached at once.
    c.expect_ok(&format!("attach-raw {:#x} {}", addr + P, 2 * P));
    c.expect_ok(&format!("write a {P} {P} 2"));
    assert_eq!(uniform(&mut c, "a", P, P), "2", "the write was tracked");
}

/// uffd-wp under address-space churn (the G1 stress of e2e.rs): writes to armed pages that
/// moved with `mremap` fault while unmap, remove and remap events of other threads are in
/// flight (an un-protect may then meet `EAGAIN` and is retried after the next read of
/// events); every round still reads the right bytes and no writer is left blocked.
#[test]
fn uffd_wp_survives_address_space_churn() {
    if !needs_full_userfaultfd("a client with uffd-wp tracking") {
        return;
    }
    let d = Daemon::start(&["--dirty-tracking", "uffd-wp", "--flush-latency-us", "50"]);
    let mut c = TestClient::start(d.socket());
    let r = fields(&c.expect_ok("stress 4 300"));
    assert_eq!(r["rounds"], "1200");
    let s = d.status();
    assert!(s["dirty.wp_faults"] > 0, "{s:?}");
    println!(
        "wp faults {}, un-protects retried after EAGAIN {}",
        s["dirty.wp_faults"], s["dirty.wake_retries"]
    );
    assert_eq!(s["device.g2_violations"], 0);
}

/// `--dirty-policy` is the policy of a plain attach: `strict` makes reads collect without
/// any sync; without tracking a plain attach still works (as `manual`).
#[test]
fn the_daemons_default_policy_applies_to_plain_attaches() {
    let d = Daemon::start(&["--dirty-policy", "strict"]);
    assert_eq!(info(&d)["dirty.policy"], "strict");
    let mut c = TestClient::start(d.socket());
    c.expect_ok("map a 8 anon");
    c.expect_ok("fill a 1");
    c.expect_ok("attach a");
    assert!(c.expect_ok("mirror-pages a").contains("strict"));
    assert_eq!(uniform(&mut c, "a", 0, 8 * P), "1");
    c.expect_ok(&format!("write a {P} {P} 2"));
    assert_eq!(uniform(&mut c, "a", P, P), "2");
    drop((c, d));

    let d = Daemon::start(&["--dirty-policy", "strict", "--dirty-tracking", "off"]);
    let mut c = TestClient::start(d.socket());
    c.expect_ok("map a 8 anon");
    c.expect_ok("fill a 1");
    c.expect_ok("attach a");
    assert!(!c.expect_ok("mirror-pages a").contains("strict"));
    assert_eq!(uniform(&mut c, "a", 0, 8 * P), "1");
}

/// A `lazy` mirror (memshadow-run's default) is not armed when attached, so the client's
/// first writes to it cost no write-protect fault; its first sync invalidates all of it
/// (any page may have been written since the attach) and arms it; later syncs invalidate
/// only what was written since the one before. Per working back end.
#[test]
fn a_lazy_mirror_is_armed_by_its_first_sync() {
    for backend in working_here() {
        let d = Daemon::start(&["--dirty-tracking", backend]);
        let mut c = TestClient::start(d.socket());
        let pages = 16;
        c.expect_ok(&format!("map t {pages}"));
        c.expect_ok("fill t 1");
        let attached = c.expect_ok("attach-policy t lazy");
        let id = fields(&attached)["id"].clone();
        let ctl = memshadow::Control::connect_to(d.socket()).unwrap();
        let listed = ctl.list_mirrors(memshadow::Target::All).unwrap();
        assert!(
            listed.iter().any(|m| m.state == "active, lazy"),
            "{backend}: the state names the policy: {listed:?}"
        );
        assert_eq!(n(&fields(&c.expect_ok("populate t")), "pages"), pages);
        c.expect_ok(&format!("write t {} {P} 2", 3 * P));
        c.expect_ok("sync t");
        let left = n(&fields(&c.expect_ok("mirror-pages t")), "pages");
        assert_eq!(
            left, 0,
            "{backend}: the first sync of mirror {id} invalidates it whole"
        );
        check_pages(&mut c, "t", pages, |p| if p == 3 { 2 } else { 1 });
        // Armed now: the next sync sees exactly the page written since.
        assert_eq!(n(&fields(&c.expect_ok("populate t")), "pages"), pages);
        c.expect_ok(&format!("write t {} {P} 3", 7 * P));
        let r = fields(&c.expect_ok("sync t"));
        assert_eq!(n(&r, "pages_dirty"), 1, "{backend}: {r:?}");
        let left = n(&fields(&c.expect_ok("mirror-pages t")), "pages");
        assert_eq!(left, pages - 1, "{backend}: only the written page went");
        check_pages(&mut c, "t", pages, |p| match p {
            3 => 2,
            7 => 3,
            _ => 1,
        });
    }
}
