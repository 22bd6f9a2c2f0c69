//! Coherence holes the kernel's own HMM test scenarios found (docs/design.md, "what is seen
//! when"): each test drives a real daemon with a real client process.

#![allow(clippy::unwrap_used)]

use memshadow_tests::{fields, needs_full_userfaultfd, Daemon, TestClient};

/// Invalidation modes × dirty-tracking back ends the daemon can run with.
const MODES: [&str; 3] = ["one-pass", "two-pass", "two-pass-batched"];
const BACKENDS: [&str; 3] = ["pagemap-scan", "uffd-wp", "off"];

/// Old bytes after `madvise` returned (G1): the kernel sends the event before it zaps the
/// pages, so a device fault in between copied the old bytes in and kept them. Readers fault
/// pages in while the range is cleared again and again; every read issued after the
/// `madvise` returned must see zeros. Private anonymous memory with `MADV_DONTNEED` and a
/// shared memfd with `MADV_REMOVE`, in every mode and back end.
#[test]
fn no_old_bytes_after_madvise_returned() {
    for mode in MODES {
        for backend in BACKENDS {
            let d = Daemon::start(&["--mode", mode, "--dirty-tracking", backend]);
            let mut c = TestClient::start(d.socket());
            for kind in ["anon", "shm"] {
                let r = c.cmd(&format!("dontneed-stress 4096 4 3 {kind}"));
                assert!(r.starts_with("ok"), "{mode} {backend} {kind}: {r}");
                let f = fields(&r);
                eprintln!("{mode} {backend} {kind}: {r}");
                assert_eq!(f["checked"], (4096 * 4).to_string());
            }
            let st = d.status();
            eprintln!(
                "{mode} {backend}: fences {} lifted {} timed out {} fenced reads {}",
                st["device.fences"],
                st["device.fences_lifted"],
                st["device.fences_timed_out"],
                st["device.fenced_reads"]
            );
            assert!(st["device.fences"] > 0);
        }
    }
}

/// An attach over an unmapped hole is refused, naming the hole: a page mapped there later
/// would raise no event, so nothing would ever invalidate it.
#[test]
fn an_attach_over_a_hole_is_refused_naming_it() {
    let d = Daemon::start(&[]);
    let mut c = TestClient::start(d.socket());
    let addr = u64::from_str_radix(
        fields(&c.expect_ok("map h 4"))["addr"].trim_start_matches("0x"),
        16,
    )
    .unwrap();
    c.expect_ok(&format!("unmap-page h {P}"));
    let r = c.cmd(&format!("attach-raw {addr:#x} {}", 4 * P));
    assert!(r.starts_with("err bad range"), "{r}");
    assert!(r.contains(&format!("not mapped at {:#x}", addr + P)), "{r}");
}

const P: u64 = 4096;

/// `mprotect(PROT_NONE)` raises no event; the device must not serve what the CPU may not
/// read. Before anything is mirrored, a device read of a PROT_NONE page is refused (the
/// mem file ignores protections); after mirroring, the change is seen at the next sync,
/// and at once under the strict policy.
#[test]
fn protection_changes_stop_device_reads() {
    let d = Daemon::start(&[]);
    let mut c = TestClient::start(d.socket());
    // Not mirrored yet: refused at the fault.
    c.expect_ok("map n 4");
    c.expect_ok("fill n 7");
    c.expect_ok(&format!("mprotect n 0 {} none", 4 * P));
    c.expect_ok("attach n");
    let r = c.cmd(&format!("read n 0 {P}"));
    assert!(r.contains("not readable"), "{r}");
    // Mirrored, then protected: seen at the next sync.
    c.expect_ok("map m 4");
    c.expect_ok("fill m 7");
    c.expect_ok("attach m");
    assert_eq!(
        fields(&c.expect_ok(&format!("read m 0 {}", 4 * P)))["uniform"],
        "7"
    );
    c.expect_ok(&format!("mprotect m {P} {P} none"));
    c.expect_ok("sync m");
    let r = c.cmd(&format!("read m {P} {P}"));
    assert!(r.contains("not readable"), "{r}");
    assert_eq!(
        fields(&c.expect_ok(&format!("read m 0 {P}")))["uniform"],
        "7"
    );
    // Under strict, at once.
    c.expect_ok("map s 4");
    c.expect_ok("fill s 7");
    c.expect_ok("attach-policy s strict");
    assert_eq!(
        fields(&c.expect_ok(&format!("read s 0 {}", 4 * P)))["uniform"],
        "7"
    );
    c.expect_ok(&format!("mprotect s 0 {P} none"));
    let r = c.cmd(&format!("read s 0 {P}"));
    assert!(r.contains("not readable"), "{r}");
    // Readable again: served again.
    c.expect_ok(&format!("mprotect s 0 {P} rw"));
    assert_eq!(
        fields(&c.expect_ok(&format!("read s 0 {P}")))["uniform"],
        "7"
    );
}

/// The client's own hole punch or truncation of a memfd it maps raises no event and writes
/// nothing: a sync finds the mirrored pages that are no longer present.
#[test]
fn a_sync_sees_the_clients_own_hole_punch_and_truncation() {
    for backend in ["pagemap-scan", "uffd-wp"] {
        if backend == "uffd-wp"
            && !needs_full_userfaultfd("the uffd-wp part (a client gets uffd-wp only then)")
        {
            continue;
        }
        let d = Daemon::start(&["--dirty-tracking", backend]);
        let mut c = TestClient::start(d.socket());
        c.expect_ok("map f 8 shm");
        c.expect_ok("fill f 9");
        c.expect_ok("attach f");
        assert_eq!(fields(&c.expect_ok("populate f"))["pages"], "8");
        c.expect_ok(&format!("punch f {P} {}", 2 * P));
        c.expect_ok("sync f");
        assert_eq!(
            fields(&c.expect_ok(&format!("read f {P} {}", 2 * P)))["uniform"],
            "0",
            "{backend}: the punched pages read zeros"
        );
        assert_eq!(
            fields(&c.expect_ok(&format!("read f 0 {P}")))["uniform"],
            "9"
        );
        // Truncate to 4 pages, then grow back: the pages past 4 read zeros.
        c.expect_ok(&format!("truncate f {}", 4 * P));
        c.expect_ok(&format!("truncate f {}", 8 * P));
        c.expect_ok("sync f");
        assert_eq!(
            fields(&c.expect_ok(&format!("read f {} {}", 4 * P, 4 * P)))["uniform"],
            "0",
            "{backend}: the truncated pages read zeros"
        );
        assert_eq!(
            fields(&c.expect_ok(&format!("read f {} {P}", 3 * P)))["uniform"],
            "9"
        );
    }
}

/// Two mirrors of one buffer (two devices, or two libraries in one process) are the normal
/// case: they may overlap within a session, each with its own notifier, and both stay
/// coherent; detaching one leaves the other watched (the registration stays where it still
/// covers). A second session of the same process cannot register the same range (one
/// userfaultfd per range): it is told why, and what to do instead.
#[test]
fn overlapping_mirrors_stay_coherent_and_a_second_session_is_told_why_not() {
    let d = Daemon::start(&[]);
    let mut c = TestClient::start(d.socket());
    c.expect_ok("map a 12");
    c.expect_ok("fill a 3");
    c.expect_ok("attach a");
    c.expect_ok(&format!("attach-sub a {} {} b", 4 * P, 8 * P));
    assert_eq!(
        fields(&c.expect_ok(&format!("read a 0 {}", 12 * P)))["uniform"],
        "3"
    );
    assert_eq!(
        fields(&c.expect_ok(&format!("read-sub b 0 {}", 8 * P)))["uniform"],
        "3"
    );
    // A change in the overlap reaches both.
    c.expect_ok(&format!("madvise-range a {} {}", 5 * P, P));
    assert_eq!(
        fields(&c.expect_ok(&format!("read a {} {P}", 5 * P)))["uniform"],
        "0"
    );
    assert_eq!(
        fields(&c.expect_ok(&format!("read-sub b {P} {P}")))["uniform"],
        "0"
    );
    // Detach the big one: the sub-mirror's range stays registered and coherent.
    d.wait_fences_lifted();
    c.expect_ok("detach a");
    c.expect_ok(&format!("write a {} {} 8", 4 * P, 8 * P));
    c.expect_ok("sync-all");
    assert_eq!(
        fields(&c.expect_ok(&format!("read-sub b 0 {}", 8 * P)))["uniform"],
        "8"
    );
    c.expect_ok(&format!("madvise-range a {} {}", 6 * P, P));
    assert_eq!(
        fields(&c.expect_ok(&format!("read-sub b {} {P}", 2 * P)))["uniform"],
        "0"
    );
    // A second session of this process over the same range.
    c.expect_ok("map s 4");
    c.expect_ok("attach s");
    let r = c.cmd("second-session-attach s");
    assert!(r.starts_with("err range already watched"), "{r}");
    assert!(
        r.contains("another memshadow session of this process"),
        "{r}"
    );
}

/// A device read longer than one message faults each missing run once, as a device does
/// (it was one fault per 60 KiB message: 69 for 4 MiB).
#[test]
fn a_long_read_faults_once_per_missing_run() {
    let d = Daemon::start(&[]);
    let mut c = TestClient::start(d.socket());
    c.expect_ok("map big 1024");
    c.expect_ok("fill big 4");
    c.expect_ok("attach big");
    let faults = |c: &mut TestClient| {
        fields(&c.expect_ok("stats"))["client.faults"]
            .parse::<u64>()
            .unwrap()
    };
    let before = faults(&mut c);
    assert_eq!(
        fields(&c.expect_ok(&format!("read big 0 {}", 1024 * P)))["uniform"],
        "4"
    );
    assert_eq!(faults(&mut c) - before, 1, "4 MiB is one missing run");
}

/// A disk-file mapping can be registered in write-protect mode only with asynchronous
/// write-protect (the pagemap-scan back end): elsewhere the refusal says so.
#[test]
fn a_disk_file_mapping_refused_says_why() {
    let dir = memshadow_tests::TempDir::new("diskfile");
    for backend in ["off", "uffd-wp"] {
        let d = Daemon::start(&["--dirty-tracking", backend]);
        let mut c = TestClient::start(d.socket());
        let path = dir.path().join(format!("{backend}.dat"));
        c.expect_ok(&format!("map-file f {} 4", path.display()));
        let r = c.cmd("attach f");
        assert!(r.contains("maps a file on disk"), "{backend}: {r}");
        assert!(r.contains("pagemap-scan"), "{backend}: {r}");
    }
    let d = Daemon::start(&["--dirty-tracking", "pagemap-scan"]);
    let mut c = TestClient::start(d.socket());
    c.expect_ok(&format!(
        "map-file f {} 4",
        dir.path().join("scan.dat").display()
    ));
    c.expect_ok("attach f");
}
