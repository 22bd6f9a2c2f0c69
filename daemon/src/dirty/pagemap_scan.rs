//! The `pagemap-scan` back end (docs/design.md §6): the client's uffd has `UFFD_FEATURE_WP_ASYNC`,
//! so a write to a write-protected page is resolved by the kernel, which only clears the
//! page's uffd-wp bit; `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`
//! then reports the pages whose bit is clear ("written") and sets it again, atomically per
//! page, in one call. Writes raise no fault, so this is safe on a `UFFD_USER_MODE_ONLY` uffd.
//!
//! The scan asks for exactly `PAGE_IS_WRITTEN` (category and return mask), the kernel's
//! fast path. Its regions are taken whole: a huge page mapped by one PMD and written as a
//! whole (e.g. re-faulted as a THP after `MADV_DONTNEED`) is reported, and so invalidated,
//! as its whole extent; a write to an armed THP makes the kernel split the PMD and report
//! only the 4 KiB page written (the other PTEs keep their write protection).

use std::fs::File;

use nix::errno::Errno;

use super::{Backend, DirtyError, ProbeError};
use crate::sys::pagemap::{self, category, PageRegion, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING};
use crate::sys::uffd::features;
use crate::sys::PAGE_SIZE;

/// Regions one `PAGEMAP_SCAN` call may return (a full vector makes the walk stop early; the
/// loop goes on from `walk_end`).
pub const VEC_LEN: usize = 1024;

/// Appends the written runs of `start..end` to `out` (merging runs split across calls) and
/// re-arms them, through the client's `pagemap` fd; `buf` is scratch.
pub fn collect(
    pagemap: &File,
    start: u64,
    end: u64,
    buf: &mut Vec<PageRegion>,
    out: &mut Vec<(u64, u64)>,
) -> Result<(), DirtyError> {
    if buf.len() < VEC_LEN {
        buf.resize(VEC_LEN, PageRegion::default());
    }
    let err = |source| DirtyError::Scan { start, end, source };
    let mut flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
    let mut at = start;
    let first = out.len();
    while at < end {
        let (n, walk_end) = match pagemap::scan(
            pagemap,
            flags,
            at,
            end,
            category::WRITTEN,
            category::WRITTEN,
            buf,
        ) {
            Ok(r) => r,
            Err(Errno::EPERM) if flags & PM_SCAN_CHECK_WPASYNC != 0 => {
                // A VMA without WP_ASYNC inside the range: something the client mapped into
                // a hole a munmap cut in the mirror (that part is retired). Skip such VMAs.
                tracing::debug!(
                    start,
                    end,
                    "PAGEMAP_SCAN met a VMA without WP_ASYNC; skipping it"
                );
                flags &= !PM_SCAN_CHECK_WPASYNC;
                continue;
            }
            Err(e) => return Err(err(e)),
        };
        for r in &buf[..n] {
            let ours = out.len() > first;
            match out.last_mut() {
                Some(last) if ours && last.1 == r.start => last.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        if walk_end <= at {
            return Err(err(Errno::EIO));
        }
        at = walk_end;
    }
    Ok(())
}

/// Tries the back end on a scratch mapping: arm it, write some pages, and check that one
/// scan reports exactly those and a second one nothing (they were re-armed).
pub fn probe() -> Result<(), ProbeError> {
    let pages = 16usize;
    let len = (pages * PAGE_SIZE) as u64;
    let (uffd, granted) =
        Backend::PagemapScan.probe_uffd("UFFD_FEATURE_WP_ASYNC|WP_UNPOPULATED (Linux 6.7+)")?;
    if granted & features::WP_ASYNC == 0 {
        return Err(ProbeError::Unsupported(
            "the kernel does not offer UFFD_FEATURE_WP_ASYNC (Linux 6.7+)",
        ));
    }
    let mut map = memmap2::MmapMut::map_anon(pages * PAGE_SIZE).map_err(ProbeError::io("mmap"))?;
    map.fill(1);
    let start = map.as_ptr() as u64;
    uffd.register_wp(start, len)
        .map_err(ProbeError::uffd("UFFDIO_REGISTER (write-protect mode)"))?;
    let result = uffd
        .write_protect(start, len)
        .map_err(ProbeError::uffd("UFFDIO_WRITEPROTECT"))
        .and_then(|()| write_and_scan(&mut map));
    if let Err(e) = uffd.unregister(start, len) {
        tracing::debug!(error = %e, "unregister after the pagemap-scan probe");
    }
    drop(uffd);
    drop(map);
    result
}

/// The probe's checks on its armed mapping `map`: nothing written at first, then exactly
/// the pages written, then nothing again (the scan re-armed them).
fn write_and_scan(map: &mut memmap2::MmapMut) -> Result<(), ProbeError> {
    let start = map.as_ptr() as u64;
    let end = start + map.len() as u64;
    let pm = File::open("/proc/self/pagemap")
        .map_err(ProbeError::io("cannot open /proc/self/pagemap"))?;
    let mut buf = Vec::new();
    let mut found = Vec::new();
    let mut scan = |found: &mut Vec<(u64, u64)>| {
        found.clear();
        collect(&pm, start, end, &mut buf, found).map_err(|e| match e {
            DirtyError::Scan {
                source: Errno::ENOTTY | Errno::EINVAL,
                ..
            } => ProbeError::Unsupported("the PAGEMAP_SCAN ioctl is not supported (Linux 6.7+)"),
            e => ProbeError::Collect(Box::new(e)),
        })
    };
    scan(&mut found)?;
    if !found.is_empty() {
        return Err(ProbeError::Wrong(format!(
            "freshly armed pages read as written: {found:x?}"
        )));
    }
    map[3 * PAGE_SIZE] = 2;
    map[7 * PAGE_SIZE..10 * PAGE_SIZE].fill(3);
    std::hint::black_box(&mut *map);
    scan(&mut found)?;
    let page = |a: u64| (a - start) / PAGE_SIZE as u64;
    if found
        .iter()
        .map(|&(s, e)| (page(s), page(e)))
        .ne([(3, 4), (7, 10)])
    {
        return Err(ProbeError::Wrong(format!(
            "after writing pages 3 and 7..10 the scan reported {:?}",
            found
                .iter()
                .map(|&(s, e)| (page(s), page(e)))
                .collect::<Vec<_>>()
        )));
    }
    scan(&mut found)?;
    if !found.is_empty() {
        return Err(ProbeError::Wrong(
            "PM_SCAN_WP_MATCHING did not re-arm the written pages".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_passes_on_this_kernel() {
        if let Err(e) = probe() {
            panic!("the pagemap-scan probe failed: {e}");
        }
    }

    /// Many scattered written pages: more runs than one call's vector holds, so the loop
    /// goes on from `walk_end` and still reports each run once.
    #[test]
    fn collect_loops_past_a_full_vector() {
        let pages = 3 * VEC_LEN + 10;
        let (uffd, _) = Backend::PagemapScan.probe_uffd("WP_ASYNC").expect("uffd");
        let mut map = memmap2::MmapMut::map_anon(2 * pages * PAGE_SIZE).expect("mmap");
        map.fill(0);
        let start = map.as_ptr() as u64;
        let len = map.len() as u64;
        uffd.register_wp(start, len).expect("register");
        uffd.write_protect(start, len).expect("arm");
        for i in 0..pages {
            map[2 * i * PAGE_SIZE] = 1;
        }
        std::hint::black_box(&mut map);
        let pm = File::open("/proc/self/pagemap").expect("pagemap");
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        collect(&pm, start, start + len, &mut buf, &mut out).expect("collect");
        assert_eq!(out.len(), pages);
        for (i, (s, e)) in out.iter().enumerate() {
            assert_eq!(*s, start + (2 * i * PAGE_SIZE) as u64);
            assert_eq!(*e, s + PAGE_SIZE as u64);
        }
        out.clear();
        collect(&pm, start, start + len, &mut buf, &mut out).expect("collect");
        assert!(out.is_empty(), "re-armed");
        uffd.unregister(start, len).expect("unregister");
    }
}
