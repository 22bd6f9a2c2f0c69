//! Coherence holes the kernel's own HMM test scenarios found (docs/design.md, "what is seen
//! when"): each test drives a real daemon with a real client process.

#![allow(clippy::unwrap_used)]

use memshadow_tests::{fields, Daemon, TestClient};

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
