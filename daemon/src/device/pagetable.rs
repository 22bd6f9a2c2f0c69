//! The device page table of one client (docs/design.md §4): client virtual page → shadow slot.
//!
//! It lives inside the client's device lock (`ClientCore::pt`), which is the only way to
//! reach it, so only the device lock changes it. It also keeps, per mirror, which engines may
//! have cached translations of the mirror's pages since its last full flush (an engine sets
//! its bit under the same lock when it fills its TLB), so invalidations flush only them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::external::{ExternalEngine, ExternalFences, SharedPt};
use super::shadow::SlotRef;

/// Index of a mirror inside its client.
pub type MirrorIdx = u32;

/// A device page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pte {
    /// The slot holding the page.
    pub slot: SlotRef,
    /// The mirror the page belongs to.
    pub mirror: MirrorIdx,
}

#[derive(Debug, Default)]
struct MirrorPt {
    /// Engines that may cache translations of this mirror.
    engine_mask: u32,
    /// Pages of this mirror present in the table.
    pages: u64,
}

/// One client's device page table.
#[derive(Debug, Default)]
pub struct PageTable {
    ptes: BTreeMap<u64, Pte>,
    mirrors: HashMap<MirrorIdx, MirrorPt>,
    /// Fenced virtual pages (`first..=last`, with the fence's token): nothing may be
    /// installed there, because the kernel announced a change of those pages that it may
    /// not have made yet (see `DeviceClient::read`).
    fences: Vec<(u64, u64, u64)>,
    next_fence: u64,
    /// Scratch for `zap`, kept to avoid an allocation per invalidation.
    keys: Vec<u64>,
    /// External engines of the client, each with its view of the table (kept equal to
    /// the entries of its mirror's pages under this lock).
    external: Vec<ExternalView>,
}

/// An external engine and the page table it reads.
#[derive(Debug)]
struct ExternalView {
    engine: Arc<ExternalEngine>,
    pt: Arc<SharedPt>,
    mirror: MirrorIdx,
}

impl PageTable {
    /// Starts accepting entries for `mirror`.
    pub fn add_mirror(&mut self, mirror: MirrorIdx) {
        self.mirrors.entry(mirror).or_default();
    }

    /// True while `mirror` accepts entries.
    pub fn has_mirror(&self, mirror: MirrorIdx) -> bool {
        self.mirrors.contains_key(&mirror)
    }

    /// Stops accepting entries for `mirror`; returns its engine mask.
    pub fn remove_mirror(&mut self, mirror: MirrorIdx) -> u32 {
        self.mirrors.remove(&mirror).map_or(0, |m| m.engine_mask)
    }

    /// The entry of virtual page `vpn`.
    pub fn get(&self, vpn: u64) -> Option<Pte> {
        self.ptes.get(&vpn).copied()
    }

    /// Fences virtual pages `first..=last`: nothing is installed there until the token
    /// returned is given to [`PageTable::unfence`].
    pub fn fence(&mut self, first: u64, last: u64) -> u64 {
        self.next_fence += 1;
        self.fences.push((first, last, self.next_fence));
        self.next_fence
    }

    /// Lifts every fence of `tokens`, in one pass.
    pub fn unfence_all(&mut self, tokens: &std::collections::HashSet<u64>) {
        self.fences.retain(|f| !tokens.contains(&f.2));
    }

    /// True if any of virtual pages `first..=last` is fenced.
    pub fn fenced(&self, first: u64, last: u64) -> bool {
        self.fences.iter().any(|&(f, l, _)| f <= last && first <= l)
    }

    /// Installs an entry; refuses (returns false) if `vpn` already has one, is fenced, or its
    /// mirror is gone.
    pub fn install(&mut self, vpn: u64, pte: Pte) -> bool {
        if self.fenced(vpn, vpn) {
            return false;
        }
        let Some(m) = self.mirrors.get_mut(&pte.mirror) else {
            return false;
        };
        match self.ptes.entry(vpn) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(pte);
                m.pages += 1;
                for x in &self.external {
                    x.pt.set(vpn, pte.slot.slot, pte.slot.gen);
                }
                true
            }
        }
    }

    /// Records that `engine` cached a translation of `mirror`.
    pub fn mark_cached(&mut self, mirror: MirrorIdx, engine: usize) {
        if let Some(m) = self.mirrors.get_mut(&mirror) {
            m.engine_mask |= 1 << engine;
        }
    }

    /// The engines that may cache translations of `mirror`; with `clear`, forgets them (the
    /// caller is flushing all of the mirror on them).
    pub fn engine_mask(&mut self, mirror: MirrorIdx, clear: bool) -> u32 {
        match self.mirrors.get_mut(&mirror) {
            Some(m) => {
                let mask = m.engine_mask;
                if clear {
                    m.engine_mask = 0;
                }
                mask
            }
            None => 0,
        }
    }

    /// Removes the entries of `mirror` for virtual pages `first..=last`, appending their
    /// slots to `out`. Returns how many were removed. Entries of other mirrors (a new mirror
    /// of the same addresses) are left alone: only their own notifier knows which engines
    /// may cache them, so only it may zap them (G2).
    pub fn zap(
        &mut self,
        first: u64,
        last: u64,
        mirror: MirrorIdx,
        out: &mut Vec<SlotRef>,
    ) -> usize {
        self.keys.clear();
        self.keys.extend(
            self.ptes
                .range(first..=last)
                .filter(|(_, p)| p.mirror == mirror)
                .map(|(k, _)| *k),
        );
        for k in &self.keys {
            if let Some(pte) = self.ptes.remove(k) {
                if let Some(m) = self.mirrors.get_mut(&pte.mirror) {
                    m.pages -= 1;
                }
                for x in &self.external {
                    x.pt.clear(*k);
                }
                out.push(pte.slot);
            }
        }
        self.keys.len()
    }

    /// Adds an external engine of `mirror` reading `pt`, which is first filled with the
    /// entries of its pages.
    pub fn add_external(
        &mut self,
        engine: Arc<ExternalEngine>,
        pt: Arc<SharedPt>,
        mirror: MirrorIdx,
    ) {
        let (first, last) = pt.vpns();
        for (vpn, pte) in self.ptes.range(first..=last) {
            pt.set(*vpn, pte.slot.slot, pte.slot.gen);
        }
        self.external.push(ExternalView { engine, pt, mirror });
    }

    /// Removes the external engines that `which` selects, returning them.
    pub fn remove_external(
        &mut self,
        mut which: impl FnMut(&ExternalEngine, MirrorIdx) -> bool,
    ) -> Vec<Arc<ExternalEngine>> {
        let mut out = Vec::new();
        self.external.retain(|x| {
            let go = which(&x.engine, x.mirror);
            if go {
                out.push(Arc::clone(&x.engine));
            }
            !go
        });
        out
    }

    /// Queues a flush of virtual pages `first..=last` on every external engine that may
    /// cache them, appending what to wait for to `out`. Engine `caller`, whose own request
    /// (a device write) caused the invalidation, gets the flush but is not waited for: it
    /// is inside that request, so no access of it is running, and it drops the
    /// translations before its next access.
    pub fn flush_external(
        &self,
        first: u64,
        last: u64,
        caller: Option<u32>,
        defer: bool,
        out: &mut ExternalFences,
    ) {
        for x in &self.external {
            if x.engine.overlaps(first, last) && !x.engine.is_gone() {
                let seq = x.engine.push(first, last, defer);
                if caller != Some(x.engine.id()) {
                    out.push((Arc::clone(&x.engine), seq));
                }
            }
        }
    }

    /// Rings the doorbells of the external engines whose flushes were queued deferred.
    pub fn ring_external(&self) {
        for x in &self.external {
            x.engine.ring();
        }
    }

    /// The external engines of the client.
    pub fn external_engines(&self) -> impl Iterator<Item = &Arc<ExternalEngine>> + '_ {
        self.external.iter().map(|x| &x.engine)
    }

    /// Pages present for `mirror`.
    pub fn mirror_pages(&self, mirror: MirrorIdx) -> u64 {
        self.mirrors.get(&mirror).map_or(0, |m| m.pages)
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.ptes.len()
    }

    /// True if the table has no entry.
    pub fn is_empty(&self) -> bool {
        self.ptes.is_empty()
    }

    /// The entries of virtual pages `first..=last`, in address order.
    pub fn entries_in(&self, first: u64, last: u64) -> impl Iterator<Item = (u64, Pte)> + '_ {
        self.ptes.range(first..=last).map(|(k, v)| (*k, *v))
    }

    /// All entries, in address order (tests and equivalence checks).
    pub fn entries(&self) -> impl Iterator<Item = (u64, Pte)> + '_ {
        self.ptes.iter().map(|(k, v)| (*k, *v))
    }

    /// Drops the table's scratch and tree memory once it is empty (after release).
    pub fn shrink(&mut self) {
        if self.ptes.is_empty() {
            self.ptes = BTreeMap::new();
            self.keys = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pte(slot: u32, mirror: MirrorIdx) -> Pte {
        Pte {
            slot: SlotRef { slot, gen: 1 },
            mirror,
        }
    }

    #[test]
    fn install_zap_and_masks() {
        let mut pt = PageTable::default();
        assert!(!pt.install(1, pte(0, 7)), "unknown mirror refused");
        pt.add_mirror(7);
        assert!(pt.install(1, pte(0, 7)));
        assert!(pt.install(2, pte(1, 7)));
        assert!(!pt.install(2, pte(2, 7)), "occupied refused");
        assert!(pt.install(5, pte(3, 7)));
        let f = pt.fence(9, 10);
        assert!(pt.fenced(8, 9) && !pt.fenced(11, 20));
        assert!(!pt.install(10, pte(4, 7)), "fenced refused");
        pt.unfence_all(&[f].into());
        assert!(pt.install(10, pte(4, 7)));
        let mut gone = Vec::new();
        assert_eq!(pt.zap(10, 10, 7, &mut gone), 1);
        pt.mark_cached(7, 3);
        assert_eq!(pt.engine_mask(7, false), 0b1000);
        let mut out = Vec::new();
        assert_eq!(
            pt.zap(2, 5, 8, &mut out),
            0,
            "another mirror's entries are not touched"
        );
        assert_eq!(pt.zap(2, 5, 7, &mut out), 2);
        assert_eq!(out.iter().map(|s| s.slot).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(pt.mirror_pages(7), 1);
        assert_eq!(pt.engine_mask(7, true), 0b1000);
        assert_eq!(pt.engine_mask(7, false), 0);
        assert_eq!(pt.remove_mirror(7), 0);
        assert!(!pt.install(9, pte(4, 7)));
    }
}
