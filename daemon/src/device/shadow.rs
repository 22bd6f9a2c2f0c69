//! The shadow buffer (docs/design.md §4): one memfd-backed mapping cut into page-sized slots, with
//! a free-slot allocator and a generation per slot so reuse can be detected (G2).
//!
//! Freed slots go to a *warm* list first: their memory is still resident, so reusing them
//! costs no page fault (on a VM, clearing a fresh page costs more than copying one) and
//! freeing costs no system call on the invalidation path. [`Shadow::trim`], run by the
//! device's reclaimer every 100 ms, releases the memory of the slots that stayed free for a
//! whole period with a hole punch and moves them to the *cold* list, so the daemon's RSS
//! follows the number of slots in use within 200 ms (G5). Cold slots are populated in bulk (`MADV_POPULATE_WRITE`)
//! when allocated, instead of taking one page fault each during the copy.

use crate::lock;
use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use memmap2::{MmapOptions, MmapRaw};

use crate::sys::{self, PAGE_SIZE};

/// Largest shadow buffer we accept (the per-slot bookkeeping is 8 bytes a slot).
pub const MAX_CAPACITY: u64 = 64 << 30;

/// Errors of the shadow buffer.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The requested capacity is zero, not page-aligned or above [`MAX_CAPACITY`].
    #[error("bad shadow capacity {0} bytes (page multiple, 1 page ..= 64 GiB)")]
    BadCapacity(u64),
    /// Creating or mapping the memory file failed.
    #[error("cannot create the shadow buffer")]
    Create(#[source] std::io::Error),
    /// Every slot is in use.
    #[error("shadow buffer full: {wanted} slots wanted, {free} free")]
    Full {
        /// Slots asked for.
        wanted: usize,
        /// Slots free at the time.
        free: usize,
    },
}

/// A slot and the generation it was allocated with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRef {
    /// Slot index.
    pub slot: u32,
    /// Generation given to this allocation of the slot.
    pub gen: u32,
}

/// Free slots: `warm` ones still have resident memory (freed since the last trim), `aging`
/// ones too (freed before it; the next trim releases them), `cold` ones do not.
#[derive(Debug, Default)]
struct FreeLists {
    warm: Vec<u32>,
    aging: Vec<u32>,
    cold: Vec<u32>,
    /// Slots being released by a trim (in no list meanwhile); they come back as cold.
    releasing: usize,
}

impl FreeLists {
    fn len(&self) -> usize {
        self.warm.len() + self.aging.len() + self.cold.len()
    }

    /// Takes up to `n` slots from the back of `list` (the most recently freed), in the
    /// order they were freed, which keeps runs of adjacent slots adjacent.
    fn take(list: &mut Vec<u32>, n: usize, f: impl FnMut(u32)) -> usize {
        let k = n.min(list.len());
        let at = list.len() - k;
        list[at..].iter().copied().for_each(f);
        list.truncate(at);
        k
    }
}

/// The shadow buffer.
pub struct Shadow {
    file: File,
    map: MmapRaw,
    slots: u32,
    free: Mutex<FreeLists>,
    /// Signalled when a trim returns released slots.
    released: std::sync::Condvar,
    gens: Box<[AtomicU32]>,
    in_use: AtomicU64,
    punched: AtomicU64,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("slots", &self.slots)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl Shadow {
    /// A shadow buffer of `capacity` bytes (a multiple of the page size).
    pub fn new(capacity: u64) -> Result<Shadow, ShadowError> {
        if capacity == 0 || capacity % PAGE_SIZE as u64 != 0 || capacity > MAX_CAPACITY {
            return Err(ShadowError::BadCapacity(capacity));
        }
        let slots = u32::try_from(capacity / PAGE_SIZE as u64)
            .map_err(|_| ShadowError::BadCapacity(capacity))?;
        let file =
            sys::memfd("memshadow-shadow", capacity).map_err(|e| ShadowError::Create(e.into()))?;
        let map = MmapOptions::new()
            .len(capacity as usize)
            .map_raw(&file)
            .map_err(ShadowError::Create)?;
        Ok(Shadow {
            file,
            map,
            slots,
            // Taken from the back: a fresh buffer fills from its end, in address order within
            // each allocation.
            free: Mutex::new(FreeLists {
                warm: Vec::new(),
                aging: Vec::new(),
                cold: (0..slots).collect(),
                releasing: 0,
            }),
            released: std::sync::Condvar::new(),
            gens: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            in_use: AtomicU64::new(0),
            punched: AtomicU64::new(0),
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> u32 {
        self.slots
    }

    /// Slots currently allocated.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Pages released with a hole punch so far.
    pub fn punched(&self) -> u64 {
        self.punched.load(Ordering::Relaxed)
    }

    /// Current generation of `slot` (moves on at every allocation).
    pub fn generation(&self, slot: u32) -> u32 {
        self.gens[slot as usize].load(Ordering::Acquire)
    }

    /// Allocates `n` slots (all or none), appending them to `out`: recently freed (warm)
    /// slots first, then cold ones, which are populated in bulk.
    pub fn alloc(&self, n: usize, out: &mut Vec<SlotRef>) -> Result<(), ShadowError> {
        self.alloc_keeping(n, 0, out)
    }

    /// [`Shadow::alloc`], refusing unless `keep` slots stay free afterwards (the reserve of
    /// privileged users, which others may not take).
    pub fn alloc_keeping(
        &self,
        n: usize,
        keep: usize,
        out: &mut Vec<SlotRef>,
    ) -> Result<(), ShadowError> {
        let want = n.saturating_add(keep);
        let first_cold = {
            let mut free = lock(&self.free);
            // Slots a trim is releasing come back shortly: wait for them rather than fail.
            while free.len() < want && free.releasing > 0 {
                free = self
                    .released
                    .wait(free)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if free.len() < want {
                return Err(ShadowError::Full {
                    wanted: n,
                    free: free.len().saturating_sub(keep),
                });
            }
            out.reserve(n);
            let FreeLists {
                warm, aging, cold, ..
            } = &mut *free;
            let mut left = n;
            left -= FreeLists::take(warm, left, |s| out.push(self.next_gen(s)));
            left -= FreeLists::take(aging, left, |s| out.push(self.next_gen(s)));
            let first_cold = out.len();
            FreeLists::take(cold, left, |s| out.push(self.next_gen(s)));
            first_cold
        };
        self.in_use.fetch_add(n as u64, Ordering::Relaxed);
        self.populate(&out[first_cold..]);
        Ok(())
    }

    fn next_gen(&self, slot: u32) -> SlotRef {
        let gen = self.gens[slot as usize]
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        SlotRef { slot, gen }
    }

    /// Makes cold slots resident in one call per run of adjacent slots (an optimisation: a
    /// failure just leaves the page faults to the copy).
    fn populate(&self, slots: &[SlotRef]) {
        for_each_run(slots.iter().map(|s| s.slot), |first, count| {
            let off = first as usize * PAGE_SIZE;
            let len = count as usize * PAGE_SIZE;
            if let Err(e) = self
                .map
                .advise_range(memmap2::Advice::PopulateWrite, off, len)
            {
                tracing::debug!(error = %e, "MADV_POPULATE_WRITE failed; faulting pages in instead");
            }
        });
    }

    /// Returns slots to the allocator. Their memory stays resident until the next
    /// [`trim`](Self::trim). The caller guarantees that nothing can still read them: no
    /// page-table entry, and no TLB of an engine that has not completed a flush queued after
    /// the entry was zapped (G2).
    pub fn free(&self, slots: &[SlotRef]) {
        if slots.is_empty() {
            return;
        }
        let mut free = lock(&self.free);
        // Reuse the most recently freed slots first: warm memory, and any G2 bug shows up fast.
        free.warm.extend(slots.iter().map(|s| s.slot));
        drop(free);
        self.in_use.fetch_sub(slots.len() as u64, Ordering::Relaxed);
    }

    /// Releases the memory of the slots that have been free since before the previous
    /// trim, with a hole punch (one call per run of adjacent slots), and makes them cold;
    /// the slots freed since then start aging. Returns the number of slots released.
    pub fn trim(&self) -> usize {
        let mut warm = {
            let mut free = lock(&self.free);
            let young = std::mem::take(&mut free.warm);
            let old = std::mem::replace(&mut free.aging, young);
            free.releasing += old.len();
            old
        };
        self.release(&mut warm)
    }

    /// Releases the memory of every free slot that still has some.
    pub fn trim_all(&self) -> usize {
        let mut warm = {
            let mut free = lock(&self.free);
            let mut all = std::mem::take(&mut free.warm);
            all.append(&mut free.aging);
            free.releasing += all.len();
            all
        };
        self.release(&mut warm)
    }

    /// Punches the holes of `warm` (already counted in `releasing`) and returns them cold.
    fn release(&self, warm: &mut [u32]) -> usize {
        if warm.is_empty() {
            return 0;
        }
        warm.sort_unstable();
        for_each_run(warm.iter().copied(), |first, count| {
            let off = u64::from(first) * PAGE_SIZE as u64;
            let len = u64::from(count) * PAGE_SIZE as u64;
            if let Err(e) = sys::punch_hole(&self.file, off, len) {
                tracing::warn!(error = %e, off, len, "cannot release shadow pages");
            } else {
                self.punched.fetch_add(u64::from(count), Ordering::Relaxed);
            }
        });
        let n = warm.len();
        let mut free = lock(&self.free);
        free.cold.extend(warm.iter());
        free.releasing -= n;
        drop(free);
        self.released.notify_all();
        n
    }

    /// Free slots whose memory is still resident.
    pub fn warm(&self) -> usize {
        let free = lock(&self.free);
        free.warm.len() + free.aging.len()
    }

    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots, "slot {slot} out of range");
        // In bounds: slot < slots and the mapping is slots pages long.
        self.map
            .as_mut_ptr()
            .wrapping_add(slot as usize * PAGE_SIZE)
    }

    /// The memory of a slot the caller has just allocated and not yet published.
    ///
    /// # Safety
    /// The caller owns `slot` exclusively: it was allocated by the caller, is not in any page
    /// table, and no other reference to its memory exists while the slice lives.
    // The buffer is shared memory handed out slot by slot; exclusivity per slot is the
    // caller's contract, not the borrow of `self`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, slot: u32) -> &mut [u8] {
        let ptr = self.slot_ptr(slot);
        // SAFETY: `ptr` points at PAGE_SIZE bytes of our live shared mapping; exclusivity is
        // the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(ptr, PAGE_SIZE) }
    }

    /// Copies `dst.len()` bytes of `slot` from `offset` into `dst`.
    ///
    /// # Safety
    /// `slot` is published (reachable through a page table or TLB entry) and therefore not
    /// written by anyone until it is freed, which G2 keeps from happening while this engine
    /// can still use the translation it read it through.
    pub unsafe fn copy_out(&self, slot: u32, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= PAGE_SIZE, "copy beyond the slot");
        let src = self.slot_ptr(slot).wrapping_add(offset);
        // SAFETY: src..src+len lies inside the slot (checked above); no writer exists per the
        // caller's contract; dst is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
    }
}

/// Calls `f(first, count)` for each run of consecutive values in `slots` (in the order given).
fn for_each_run(slots: impl Iterator<Item = u32>, mut f: impl FnMut(u32, u32)) {
    let mut run: Option<(u32, u32)> = None;
    for s in slots {
        run = match run {
            Some((first, count)) if first.checked_add(count) == Some(s) => Some((first, count + 1)),
            Some((first, count)) => {
                f(first, count);
                Some((s, 1))
            }
            None => Some((s, 1)),
        };
    }
    if let Some((first, count)) = run {
        f(first, count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_generations_and_exhaustion() {
        let s = Shadow::new(4 * PAGE_SIZE as u64).expect("shadow");
        let mut v = Vec::new();
        s.alloc(3, &mut v).expect("alloc");
        assert_eq!(
            v.iter().map(|r| r.slot).collect::<Vec<_>>(),
            vec![1, 2, 3],
            "ascending run"
        );
        assert!(v.iter().all(|r| r.gen == 1));
        assert!(matches!(
            s.alloc(2, &mut v),
            Err(ShadowError::Full { wanted: 2, free: 1 })
        ));
        assert_eq!(s.in_use(), 3);
        s.free(&v[1..2]);
        let mut w = Vec::new();
        s.alloc(1, &mut w).expect("realloc");
        assert_eq!(
            w[0],
            SlotRef { slot: 2, gen: 2 },
            "reused slot has a new generation"
        );
        assert_eq!(s.generation(2), 2);
        assert!(matches!(
            Shadow::new(100),
            Err(ShadowError::BadCapacity(100))
        ));
    }

    #[test]
    fn freed_slots_are_zeroed_by_the_hole_punch() {
        let s = Shadow::new(2 * PAGE_SIZE as u64).expect("shadow");
        let mut v = Vec::new();
        s.alloc(1, &mut v).expect("alloc");
        // SAFETY: just allocated, unpublished.
        unsafe { s.slot_mut(v[0].slot) }.fill(0xab);
        let mut out = [0u8; 16];
        // SAFETY: nobody writes the slot meanwhile.
        unsafe { s.copy_out(v[0].slot, 100, &mut out) };
        assert_eq!(out, [0xab; 16]);
        s.free(&v);
        assert_eq!(s.punched(), 0, "free is lazy");
        assert_eq!(s.warm(), 1);
        assert_eq!(s.trim(), 0, "freed since the last trim: kept one period");
        assert_eq!(s.warm(), 1);
        assert_eq!(s.trim(), 1);
        assert_eq!(s.punched(), 1);
        assert_eq!(s.warm(), 0);
        // SAFETY: freed and not reallocated: no writer.
        unsafe { s.copy_out(v[0].slot, 0, &mut out) };
        assert_eq!(out, [0; 16]);
    }
}
