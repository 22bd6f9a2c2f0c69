//! The `soft-dirty` back end (docs/design.md §6): `/proc/PID/clear_refs` "4" clears every
//! soft-dirty bit of the process (write-protecting its pages so the next write sets the bit
//! again), and bit 55 of a page's pagemap word says it was written since. Needs
//! `CONFIG_MEM_SOFT_DIRTY`: the dev machines' kernel accepts "4" but never sets the bit, so
//! the probe reports the back end unavailable there; the parser and the collection are
//! tested on recorded pagemap words.
//!
//! Two limits of the mechanism itself, which `PAGEMAP_SCAN` exists to lift: the clear is for
//! the whole process (a collection reads every range asked for, then clears once), and a
//! write that lands between the read of the words and the clear is lost, so a collection is
//! exact only while the client does not write concurrently (e.g. `sync()` from the writing
//! thread).

use std::fs::File;

use super::{DirtyError, ProbeError};
use crate::sys::pagemap::{self, word};
use crate::sys::PAGE_SIZE;

/// Pages whose words one read fetches at most.
const CHUNK: usize = 1 << 16;

/// True if the pagemap word says the page is soft-dirty (written since the last clear).
pub fn is_soft_dirty(w: u64) -> bool {
    w & word::SOFT_DIRTY != 0
}

/// Appends the runs of soft-dirty pages among `words` (the words of consecutive pages from
/// `first`) to `out`, merging a run with the previous one if they touch.
pub fn dirty_runs(first: u64, words: &[u64], out: &mut Vec<(u64, u64)>) {
    let page = PAGE_SIZE as u64;
    for (i, w) in words.iter().enumerate() {
        if !is_soft_dirty(*w) {
            continue;
        }
        let a = first + i as u64 * page;
        match out.last_mut() {
            Some(last) if last.1 == a => last.1 = a + page,
            _ => out.push((a, a + page)),
        }
    }
}

/// Reads the words of `ranges` through `pagemap`, appends their soft-dirty runs to `out`,
/// then clears the process's soft-dirty bits through `clear_refs`. Returns the pages read.
pub fn collect(
    pagemap: &File,
    clear_refs: &File,
    ranges: &[(u64, u64)],
    out: &mut Vec<(u64, u64)>,
) -> Result<u64, DirtyError> {
    let page = PAGE_SIZE as u64;
    let mut scanned = 0;
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = (((end - at) / page) as usize).min(CHUNK);
            let words = pagemap::read_words(pagemap, at, n).map_err(DirtyError::Pagemap)?;
            if words.is_empty() {
                break;
            }
            dirty_runs(at, &words, out);
            scanned += words.len() as u64;
            at += words.len() as u64 * page;
        }
    }
    pagemap::clear_soft_dirty(clear_refs).map_err(DirtyError::ClearRefs)?;
    Ok(scanned)
}

/// Tries the back end on a scratch page of this process: after a clear its bit must be 0,
/// after a write 1.
pub fn probe() -> Result<(), ProbeError> {
    let clear = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .map_err(ProbeError::io("cannot open /proc/self/clear_refs"))?;
    let pm = File::open("/proc/self/pagemap")
        .map_err(ProbeError::io("cannot open /proc/self/pagemap"))?;
    let mut map = memmap2::MmapMut::map_anon(PAGE_SIZE).map_err(ProbeError::io("mmap"))?;
    map.fill(1);
    let addr = map.as_ptr() as u64;
    let bit = |pm: &File| -> Result<bool, ProbeError> {
        let w = pagemap::read_words(pm, addr, 1).map_err(ProbeError::io("reading pagemap"))?;
        Ok(w.first().is_some_and(|w| is_soft_dirty(*w)))
    };
    pagemap::clear_soft_dirty(&clear)
        .map_err(ProbeError::io("/proc/self/clear_refs refused \"4\""))?;
    if bit(&pm)? {
        return Err(ProbeError::Wrong(
            "clear_refs \"4\" left pagemap bit 55 set".into(),
        ));
    }
    map[0] = 2;
    std::hint::black_box(&mut map);
    if !bit(&pm)? {
        return Err(ProbeError::Unsupported(
            "clear_refs accepts \"4\" but pagemap bit 55 never sets after a write (kernel without \
             CONFIG_MEM_SOFT_DIRTY)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Words recorded on a dev machine (Linux 6.18, root, so PFNs show), with bit 55 (which
    // that kernel never sets) added by hand where a soft-dirty kernel sets it.
    /// A present, exclusively mapped anonymous page.
    const ANON: u64 = 0x8100_0000_002a_5055;
    /// The shared zero page after a read fault.
    const ZERO: u64 = 0x8000_0000_0000_3b34;
    /// Never touched.
    const NONE: u64 = 0;
    /// A present memfd (shared) page.
    const SHM: u64 = 0xa100_0000_002a_5054;
    /// A swapped page (type 0, offset 0x1234), as the format defines it.
    const SWAP: u64 = word::SWAPPED | (0x1234 << 5);
    const SD: u64 = word::SOFT_DIRTY;

    #[test]
    fn recorded_words_parse() {
        for w in [ANON, ZERO, NONE, SHM, SWAP] {
            assert!(!is_soft_dirty(w), "{w:#x}");
            assert!(is_soft_dirty(w | SD), "{w:#x}");
        }
        assert_ne!(ANON & word::PRESENT, 0);
        assert_ne!(SHM & word::FILE, 0);
        assert_eq!(ANON & word::UFFD_WP, 0);
    }

    #[test]
    fn runs_are_coalesced_and_placed() {
        let base = 0x7f00_0000_0000;
        let p = |i: u64| base + i * PAGE_SIZE as u64;
        let words = [
            ANON | SD,
            SHM | SD,
            ZERO,
            NONE,
            SWAP | SD,
            ANON,
            ANON | SD,
            NONE | SD,
        ];
        let mut out = Vec::new();
        dirty_runs(base, &words, &mut out);
        assert_eq!(out, vec![(p(0), p(2)), (p(4), p(5)), (p(6), p(8))]);
        // A following chunk that starts with a dirty page extends the last run.
        dirty_runs(p(8), &[SHM | SD, ANON], &mut out);
        assert_eq!(out, vec![(p(0), p(2)), (p(4), p(5)), (p(6), p(9))]);
        let mut none = Vec::new();
        dirty_runs(base, &[ANON, ZERO, NONE, SHM, SWAP], &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn collect_reads_the_ranges_and_clears() {
        // Our own pagemap and clear_refs: on a kernel without soft-dirty nothing is found,
        // but every page is read and the clear is accepted.
        let pm = File::open("/proc/self/pagemap").expect("pagemap");
        let clear = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/clear_refs")
            .expect("clear_refs");
        let mut map = memmap2::MmapMut::map_anon(8 * PAGE_SIZE).expect("mmap");
        map.fill(1);
        let a = map.as_ptr() as u64;
        let p = PAGE_SIZE as u64;
        let mut out = Vec::new();
        let n = collect(
            &pm,
            &clear,
            &[(a, a + 3 * p), (a + 5 * p, a + 8 * p)],
            &mut out,
        )
        .expect("collect");
        assert_eq!(n, 6);
        if probe().is_err() {
            assert!(out.is_empty(), "{out:x?}");
        }
    }

    #[test]
    fn the_probe_explains_itself() {
        // Available or not, depending on the kernel; unavailable must say why.
        if let Err(why) = probe().map_err(|e| e.to_string()) {
            assert!(
                why.contains("bit 55") || why.contains("clear_refs"),
                "{why}"
            );
        }
    }
}
