//! The shadow buffer (DESIGN.md §4): one memfd-backed mapping cut into page-sized slots, with
//! a free-slot allocator and a generation per slot so reuse can be detected (G2).
//!
//! Freed slots have their memory released with a hole punch, so the daemon's RSS follows the
//! number of slots in use (G5).

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

/// The shadow buffer.
pub struct Shadow {
    file: File,
    map: MmapRaw,
    slots: u32,
    free: Mutex<Vec<u32>>,
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
            // Popped from the back: slot 0 first, so a fresh buffer fills in address order.
            free: Mutex::new((0..slots).rev().collect()),
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

    /// Allocates `n` slots (all or none), appending them to `out`.
    pub fn alloc(&self, n: usize, out: &mut Vec<SlotRef>) -> Result<(), ShadowError> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < n {
            return Err(ShadowError::Full {
                wanted: n,
                free: free.len(),
            });
        }
        let at = free.len() - n;
        out.reserve(n);
        for &slot in free[at..].iter().rev() {
            let gen = self.gens[slot as usize]
                .fetch_add(1, Ordering::AcqRel)
                .wrapping_add(1);
            out.push(SlotRef { slot, gen });
        }
        free.truncate(at);
        self.in_use.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Returns slots to the allocator and releases their memory. The caller guarantees that
    /// nothing can still read them: no page-table entry, and no TLB of an engine that has not
    /// completed a flush queued after the entry was zapped (G2).
    pub fn free(&self, slots: &[SlotRef]) {
        if slots.is_empty() {
            return;
        }
        let mut idx: Vec<u32> = slots.iter().map(|s| s.slot).collect();
        idx.sort_unstable();
        // Punch runs of adjacent slots with one call each.
        let mut i = 0;
        while i < idx.len() {
            let mut j = i + 1;
            while j < idx.len() && idx[j] == idx[j - 1] + 1 {
                j += 1;
            }
            let off = u64::from(idx[i]) * PAGE_SIZE as u64;
            let len = (j - i) as u64 * PAGE_SIZE as u64;
            if let Err(e) = sys::punch_hole(&self.file, off, len) {
                tracing::warn!(error = %e, off, len, "cannot release shadow pages");
            } else {
                self.punched.fetch_add((j - i) as u64, Ordering::Relaxed);
            }
            i = j;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        // Reuse the most recently freed slots first: it makes reuse (and any G2 bug) quick
        // to show up.
        free.extend(idx.iter().rev());
        self.in_use.fetch_sub(slots.len() as u64, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_generations_and_exhaustion() {
        let s = Shadow::new(4 * PAGE_SIZE as u64).expect("shadow");
        let mut v = Vec::new();
        s.alloc(3, &mut v).expect("alloc");
        assert_eq!(v.iter().map(|r| r.slot).collect::<Vec<_>>(), vec![0, 1, 2]);
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
            SlotRef { slot: 1, gen: 2 },
            "reused slot has a new generation"
        );
        assert_eq!(s.generation(1), 2);
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
        assert_eq!(s.punched(), 1);
        // SAFETY: freed and not reallocated: no writer.
        unsafe { s.copy_out(v[0].slot, 0, &mut out) };
        assert_eq!(out, [0; 16]);
    }
}
