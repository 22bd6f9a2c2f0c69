//! `/proc/PID/pagemap` and its `PAGEMAP_SCAN` ioctl (Linux 6.7+), and `/proc/PID/clear_refs`:
//! what the dirty-tracking back ends read (docs/design.md §6, §7).
//!
//! The C library headers of the dev machines predate `PAGEMAP_SCAN`, so the ioctl number,
//! `struct pm_scan_arg`, `struct page_region` and the flag bits are defined here, with their
//! layouts checked at compile time against `include/uapi/linux/fs.h`.

use std::fs::File;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;

use nix::errno::Errno;

use super::PAGE_SIZE;

/// `PM_SCAN_WP_MATCHING`: write-protect (re-arm) the pages reported.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` on a VMA not registered with
/// `UFFD_FEATURE_WP_ASYNC`.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Page categories of `PAGEMAP_SCAN` (`PAGE_IS_*`).
pub mod category {
    /// The page is in a VMA with asynchronous write protection.
    pub const WPALLOWED: u64 = 1 << 0;
    /// Written since it was last write-protected.
    pub const WRITTEN: u64 = 1 << 1;
    /// File backed.
    pub const FILE: u64 = 1 << 2;
    /// Present.
    pub const PRESENT: u64 = 1 << 3;
    /// Swapped out.
    pub const SWAPPED: u64 = 1 << 4;
    /// The zero page.
    pub const PFNZERO: u64 = 1 << 5;
    /// PMD-mapped THP or hugetlb.
    pub const HUGE: u64 = 1 << 6;
    /// Soft-dirty.
    pub const SOFT_DIRTY: u64 = 1 << 7;
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PmScanArg {
    /// `sizeof(struct pm_scan_arg)`.
    pub size: u64,
    /// `PM_SCAN_*` operations.
    pub flags: u64,
    /// First byte of the range.
    pub start: u64,
    /// One past its last byte.
    pub end: u64,
    /// Out: where the walk stopped (`end` if it covered the range).
    pub walk_end: u64,
    /// Address of the `page_region` array.
    pub vec: u64,
    /// Entries in it.
    pub vec_len: u64,
    /// Most pages to report (0: no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories that must all be set.
    pub category_mask: u64,
    /// Categories of which one must be set.
    pub category_anyof_mask: u64,
    /// Categories reported in each region.
    pub return_mask: u64,
}
const _: () = assert!(size_of::<PmScanArg>() == 96);
const _: () = assert!(offset_of!(PmScanArg, walk_end) == 32);
const _: () = assert!(offset_of!(PmScanArg, vec) == 40);
const _: () = assert!(offset_of!(PmScanArg, max_pages) == 56);
const _: () = assert!(offset_of!(PmScanArg, return_mask) == 88);

/// `struct page_region`: pages `start..end` share `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The categories of [`PmScanArg::return_mask`] these pages have.
    pub categories: u64,
}
const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(offset_of!(PageRegion, categories) == 16);

nix::ioctl_readwrite!(pagemap_scan_ioctl, b'f', 16, PmScanArg);
/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u64 = nix::request_code_readwrite!(b'f', 16, size_of::<PmScanArg>()) as u64;
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// One `PAGEMAP_SCAN` call on `pagemap` (a `/proc/PID/pagemap` file: the scan acts on that
/// process's mm) over `start..end`, filling `out`. Returns the regions filled and where the
/// walk stopped (short of `end` when `out` filled up).
pub fn scan(
    pagemap: &File,
    flags: u64,
    start: u64,
    end: u64,
    category_mask: u64,
    return_mask: u64,
    out: &mut [PageRegion],
) -> nix::Result<(usize, u64)> {
    let mut arg = PmScanArg {
        size: size_of::<PmScanArg>() as u64,
        flags,
        start,
        end,
        vec: if out.is_empty() {
            0
        } else {
            out.as_mut_ptr() as u64
        },
        vec_len: out.len() as u64,
        category_mask,
        return_mask,
        ..PmScanArg::default()
    };
    // SAFETY: `arg` is a valid `struct pm_scan_arg` for the whole call; its `vec` points to
    // `out`, which is valid for writes of `vec_len` regions and borrowed mutably until we
    // return, so the kernel's writes alias nothing else.
    let n = unsafe { pagemap_scan_ioctl(pagemap.as_fd().as_raw_fd(), &mut arg) }?;
    let n = usize::try_from(n).map_err(|_| Errno::EINVAL)?;
    Ok((n.min(out.len()), arg.walk_end))
}

/// Bits of a `/proc/PID/pagemap` word (Documentation/admin-guide/mm/pagemap.rst).
pub mod word {
    /// The pte is soft-dirty.
    pub const SOFT_DIRTY: u64 = 1 << 55;
    /// The page is mapped exclusively.
    pub const EXCLUSIVE: u64 = 1 << 56;
    /// The pte is uffd-wp write-protected.
    pub const UFFD_WP: u64 = 1 << 57;
    /// File page or shared anonymous.
    pub const FILE: u64 = 1 << 61;
    /// Swapped.
    pub const SWAPPED: u64 = 1 << 62;
    /// Present.
    pub const PRESENT: u64 = 1 << 63;
}

/// Reads the pagemap words of `pages` pages starting at `addr` (one `u64` per page; fewer if
/// the file ends first).
pub fn read_words(pagemap: &File, addr: u64, pages: usize) -> std::io::Result<Vec<u64>> {
    let off = (addr / PAGE_SIZE as u64) * 8;
    let mut bytes = vec![0u8; pages * 8];
    let mut done = 0;
    while done < bytes.len() {
        match pagemap.read_at(&mut bytes[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(bytes[..done - done % 8]
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Clears the soft-dirty bits of every page of a process (and write-protects them, so the
/// next write sets the bit again): writes "4" to its `clear_refs` file.
pub fn clear_soft_dirty(clear_refs: &File) -> std::io::Result<()> {
    clear_refs.write_at(b"4", 0).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_of_our_own_unregistered_memory_reports_present_pages() {
        let pm = File::open("/proc/self/pagemap").expect("open pagemap");
        let mut map = memmap2::MmapMut::map_anon(8 * PAGE_SIZE).expect("mmap");
        map[..3 * PAGE_SIZE].fill(1);
        let start = map.as_ptr() as u64;
        let mut out = [PageRegion::default(); 4];
        let (n, walk_end) = scan(
            &pm,
            0,
            start,
            start + 8 * PAGE_SIZE as u64,
            category::PRESENT,
            category::PRESENT,
            &mut out,
        )
        .expect("PAGEMAP_SCAN (Linux 6.7+)");
        assert_eq!(walk_end, start + 8 * PAGE_SIZE as u64);
        assert_eq!(n, 1);
        assert_eq!(out[0].start, start);
        assert_eq!(out[0].end, start + 3 * PAGE_SIZE as u64);
        let words = read_words(&pm, start, 8).expect("read pagemap");
        assert_eq!(words.len(), 8);
        assert!(words[..3].iter().all(|w| w & word::PRESENT != 0));
        assert!(words[3..].iter().all(|w| w & word::PRESENT == 0));
    }
}
