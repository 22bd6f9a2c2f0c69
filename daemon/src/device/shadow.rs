//! Shadow memory (docs/design.md §4): per client, one memfd-backed mapping cut into page-sized
//! slots, with a free-slot allocator and a generation per slot so reuse can be detected (G2).
//! One memfd per client, so that the client's external engines can map exactly that client's
//! pages and nobody else's (G7, docs/engines.md). The [`ShadowPool`] keeps what is global:
//! the capacity every client's slots count against, and the reclaimer's list of shadows.
//!
//! Freed slots go to a *warm* list first: their memory is still resident, so reusing them
//! costs no page fault (on a VM, clearing a fresh page costs more than copying one) and
//! freeing costs no system call on the invalidation path. [`ShadowPool::trim`], run by the
//! device's reclaimer every 100 ms, releases the memory of the slots that stayed free for a
//! whole period with a hole punch and moves them to the *cold* list, so the daemon's RSS
//! follows the number of slots in use within 200 ms (G5). Cold slots are populated in bulk
//! (`MADV_POPULATE_WRITE`) when allocated, instead of taking one page fault each during the
//! copy. Never-used slots cost nothing: the memfd and the generation array are sparse.

use crate::lock;
use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use memmap2::{MmapMut, MmapOptions, MmapRaw};

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
/// ones too (freed before it; the next trim releases them), `cold` ones do not, and the
/// `fresh` ones below `fresh` were never used.
#[derive(Debug, Default)]
struct FreeLists {
    warm: Vec<u32>,
    aging: Vec<u32>,
    cold: Vec<u32>,
    /// Slots `0..fresh` were never allocated (handed out from the top down).
    fresh: u32,
    /// Slots being released by a trim (in no list meanwhile); they come back as cold.
    releasing: usize,
}

impl FreeLists {
    fn len(&self) -> usize {
        self.warm.len() + self.aging.len() + self.cold.len() + self.fresh as usize
    }

    /// Takes up to `n` never-used slots, in ascending order.
    fn take_fresh(&mut self, n: usize, f: impl FnMut(u32)) -> usize {
        let k = n.min(self.fresh as usize) as u32;
        self.fresh -= k;
        (self.fresh..self.fresh + k).for_each(f);
        k as usize
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

/// What every client's shadow shares: the capacity their slots count against, and the
/// shadows the reclaimer trims.
#[derive(Debug)]
pub struct ShadowPool {
    slots: u32,
    in_use: AtomicU64,
    punched: AtomicU64,
    shadows: Mutex<Vec<Weak<Shadow>>>,
}

impl ShadowPool {
    /// A pool of `capacity` bytes (a multiple of the page size).
    pub fn new(capacity: u64) -> Result<ShadowPool, ShadowError> {
        if capacity == 0 || capacity % PAGE_SIZE as u64 != 0 || capacity > MAX_CAPACITY {
            return Err(ShadowError::BadCapacity(capacity));
        }
        let slots = u32::try_from(capacity / PAGE_SIZE as u64)
            .map_err(|_| ShadowError::BadCapacity(capacity))?;
        Ok(ShadowPool {
            slots,
            in_use: AtomicU64::new(0),
            punched: AtomicU64::new(0),
            shadows: Mutex::new(Vec::new()),
        })
    }

    /// A new client's shadow: its own memfd, as large as the whole pool (sparse), so the
    /// client can use any share of the capacity the quotas leave it.
    pub fn shadow(self: &Arc<Self>) -> Result<Arc<Shadow>, ShadowError> {
        let s = Arc::new(Shadow::new(Arc::clone(self))?);
        let mut all = lock(&self.shadows);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&s));
        Ok(s)
    }

    /// Number of slots.
    pub fn capacity(&self) -> u32 {
        self.slots
    }

    /// Slots currently allocated, over every client.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Pages released with a hole punch so far.
    pub fn punched(&self) -> u64 {
        self.punched.load(Ordering::Relaxed)
    }

    /// Counts `n` slots as allocated unless fewer than `n + keep` are free.
    fn take(&self, n: usize, keep: usize) -> Result<(), ShadowError> {
        let cap = u64::from(self.slots);
        let want = (n as u64).saturating_add(keep as u64);
        let mut cur = self.in_use.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(want) > cap {
                return Err(ShadowError::Full {
                    wanted: n,
                    free: usize::try_from(cap.saturating_sub(cur).saturating_sub(keep as u64))
                        .unwrap_or(usize::MAX),
                });
            }
            match self.in_use.compare_exchange_weak(
                cur,
                cur + n as u64,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(v) => cur = v,
            }
        }
    }

    fn give_back(&self, n: u64) {
        self.in_use.fetch_sub(n, Ordering::Relaxed);
    }

    fn live(&self) -> Vec<Arc<Shadow>> {
        lock(&self.shadows)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Trims every client's shadow ([`Shadow::trim`]); returns the slots released.
    pub fn trim(&self) -> usize {
        self.live().iter().map(|s| s.trim()).sum()
    }

    /// Releases the memory of every free slot of every client that still has some.
    pub fn trim_all(&self) -> usize {
        self.live().iter().map(|s| s.trim_all()).sum()
    }

    /// Free slots whose memory is still resident, over every client.
    pub fn warm(&self) -> usize {
        self.live().iter().map(|s| s.warm()).sum()
    }
}

/// One client's shadow memory.
pub struct Shadow {
    file: File,
    map: MmapRaw,
    slots: u32,
    free: Mutex<FreeLists>,
    /// Signalled when a trim returns released slots.
    released: std::sync::Condvar,
    /// One `AtomicU32` per slot, in anonymous memory that is resident only where touched.
    gens: MmapMut,
    in_use: AtomicU64,
    pool: Arc<ShadowPool>,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("slots", &self.slots)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        // Slots still allocated when the client goes (a release that failed) go back to the
        // pool with the memory, which closing the memfd frees.
        self.pool.give_back(self.in_use());
    }
}

impl Shadow {
    fn new(pool: Arc<ShadowPool>) -> Result<Shadow, ShadowError> {
        let slots = pool.slots;
        let capacity = u64::from(slots) * PAGE_SIZE as u64;
        let file = sys::memfd_sealed("memshadow-shadow", capacity)
            .map_err(|e| ShadowError::Create(e.into()))?;
        let map = MmapOptions::new()
            .len(capacity as usize)
            .map_raw(&file)
            .map_err(ShadowError::Create)?;
        let gens = MmapOptions::new()
            .len(slots as usize * std::mem::size_of::<AtomicU32>())
            .map_anon()
            .map_err(ShadowError::Create)?;
        Ok(Shadow {
            file,
            map,
            slots,
            free: Mutex::new(FreeLists {
                fresh: slots,
                ..FreeLists::default()
            }),
            released: std::sync::Condvar::new(),
            gens,
            in_use: AtomicU64::new(0),
            pool,
        })
    }

    /// The memory file (the engines' read-only view is opened from it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of the memory file.
    pub fn bytes(&self) -> u64 {
        u64::from(self.slots) * PAGE_SIZE as u64
    }

    fn gen(&self, slot: u32) -> &AtomicU32 {
        assert!(slot < self.slots, "slot {slot} out of range");
        // SAFETY: the anonymous mapping holds `slots` properly aligned (page-aligned base,
        // 4-byte stride) `AtomicU32`s; zero-filled memory is a valid `AtomicU32`; the mapping
        // lives as long as `self`, and every access to it is atomic.
        let ptr = self
            .gens
            .as_ptr()
            .cast::<AtomicU32>()
            .wrapping_add(slot as usize);
        // SAFETY: see above; `ptr` is in bounds since `slot < slots`.
        unsafe { &*ptr }
    }

    /// Number of slots.
    pub fn capacity(&self) -> u32 {
        self.slots
    }

    /// Slots of this client currently allocated.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Current generation of `slot` (moves on at every allocation).
    pub fn generation(&self, slot: u32) -> u32 {
        self.gen(slot).load(Ordering::Acquire)
    }

    /// Allocates `n` slots (all or none), appending them to `out`: recently freed (warm)
    /// slots first, then cold ones, which are populated in bulk.
    pub fn alloc(&self, n: usize, out: &mut Vec<SlotRef>) -> Result<(), ShadowError> {
        self.alloc_keeping(n, 0, out)
    }

    /// [`Shadow::alloc`], refusing unless `keep` slots of the pool stay free afterwards
    /// (the reserve of privileged users, which others may not take).
    pub fn alloc_keeping(
        &self,
        n: usize,
        keep: usize,
        out: &mut Vec<SlotRef>,
    ) -> Result<(), ShadowError> {
        self.pool.take(n, keep)?;
        let first_cold = {
            let mut free = lock(&self.free);
            // The pool counted these slots, so this client's own space (as large as the
            // pool) has them, though a trim may be releasing some: wait for them.
            while free.len() < n && free.releasing > 0 {
                free = self
                    .released
                    .wait(free)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if free.len() < n {
                let left = free.len();
                drop(free);
                self.pool.give_back(n as u64);
                return Err(ShadowError::Full {
                    wanted: n,
                    free: left,
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
            left -= FreeLists::take(cold, left, |s| out.push(self.next_gen(s)));
            free.take_fresh(left, |s| out.push(self.next_gen(s)));
            first_cold
        };
        self.in_use.fetch_add(n as u64, Ordering::Relaxed);
        self.populate(&out[first_cold..]);
        Ok(())
    }

    fn next_gen(&self, slot: u32) -> SlotRef {
        let gen = self
            .gen(slot)
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
        self.pool.give_back(slots.len() as u64);
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
                self.pool
                    .punched
                    .fetch_add(u64::from(count), Ordering::Relaxed);
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
        let pool = Arc::new(ShadowPool::new(4 * PAGE_SIZE as u64).expect("pool"));
        let s = pool.shadow().expect("shadow");
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
        assert_eq!(pool.in_use(), 3);
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
            ShadowPool::new(100),
            Err(ShadowError::BadCapacity(100))
        ));
    }

    #[test]
    fn freed_slots_are_zeroed_by_the_hole_punch() {
        let pool = Arc::new(ShadowPool::new(2 * PAGE_SIZE as u64).expect("pool"));
        let s = pool.shadow().expect("shadow");
        let mut v = Vec::new();
        s.alloc(1, &mut v).expect("alloc");
        // SAFETY: just allocated, unpublished.
        unsafe { s.slot_mut(v[0].slot) }.fill(0xab);
        let mut out = [0u8; 16];
        // SAFETY: nobody writes the slot meanwhile.
        unsafe { s.copy_out(v[0].slot, 100, &mut out) };
        assert_eq!(out, [0xab; 16]);
        s.free(&v);
        assert_eq!(pool.punched(), 0, "free is lazy");
        assert_eq!(pool.warm(), 1);
        assert_eq!(pool.trim(), 0, "freed since the last trim: kept one period");
        assert_eq!(pool.warm(), 1);
        assert_eq!(pool.trim(), 1);
        assert_eq!(pool.punched(), 1);
        assert_eq!(pool.warm(), 0);
        // SAFETY: freed and not reallocated: no writer.
        unsafe { s.copy_out(v[0].slot, 0, &mut out) };
        assert_eq!(out, [0; 16]);
    }

    #[test]
    fn clients_have_their_own_memory_and_share_the_capacity() {
        let pool = Arc::new(ShadowPool::new(3 * PAGE_SIZE as u64).expect("pool"));
        let (a, b) = (pool.shadow().expect("a"), pool.shadow().expect("b"));
        let (mut va, mut vb) = (Vec::new(), Vec::new());
        a.alloc(2, &mut va).expect("a alloc");
        b.alloc(1, &mut vb).expect("b alloc");
        assert!(matches!(b.alloc(1, &mut vb), Err(ShadowError::Full { .. })));
        // SAFETY: just allocated, unpublished.
        unsafe { a.slot_mut(va[0].slot) }.fill(0x5a);
        let mut out = [0u8; 8];
        // SAFETY: nobody writes b's slot meanwhile.
        unsafe { b.copy_out(vb[0].slot, 0, &mut out) };
        assert_eq!(out, [0; 8], "b's memory is not a's");
        assert!(matches!(
            b.alloc_keeping(0, 1, &mut vb),
            Err(ShadowError::Full { .. })
        ));
        drop(a);
        assert_eq!(pool.in_use(), 1, "a client's slots go back with its shadow");
        b.alloc(2, &mut vb).expect("b takes what a had");
    }
}
