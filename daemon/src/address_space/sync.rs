//! Sync: collecting the pages the client wrote (by its dirty-tracking back end) and what no
//! event and no dirty bit tells (parts mapped unreadable since, pages gone from the client),
//! then invalidating them all with event `SoftDirty` (docs/design.md §6). The `periodic`
//! policy's timer collects through [`PeriodicTarget`](crate::dirty::periodic::PeriodicTarget).

use std::time::Instant;

use super::{AddressSpace, WatchError};
use crate::dirty::DirtyPolicy;
use crate::dirty::{Backend, Collected};
use crate::lock;
use crate::notifier::{Event, InvalidateArgs, InvalidateError, Range};
use crate::sys::PAGE_SIZE;

/// Invalidations of written pages begun per hold of the access lock.
const INVALIDATE_BATCH: usize = 256;

/// A `lazy` mirror no sync has armed yet: its id and live range.
pub(super) type Unarmed = (u64, u64, u64);

/// What [`AddressSpace::sync`] did.
#[derive(Debug, Clone, Copy)]
pub struct SyncStats {
    /// The back end.
    pub backend: Backend,
    /// Mirrors collected.
    pub mirrors: u32,
    /// What the collection found.
    pub collected: Collected,
    /// Time of the invalidations (start and finish passes), ns.
    pub invalidate_ns: u64,
}

impl AddressSpace {
    /// Collects the pages the client wrote in mirror `id` (every mirror if `None`) and
    /// invalidates them (event `SoftDirty`, two-pass), so the next device access re-mirrors
    /// them.
    pub fn sync(&self, id: Option<u64>) -> Result<SyncStats, WatchError> {
        if let Err(why) = self.dirty.backend() {
            return Err(WatchError::NotTracked(why.clone()));
        }
        self.after_events_read();
        let (ranges, unarmed) = {
            let t = lock(&self.table);
            if let Some(id) = id {
                if !t.by_id.contains_key(&id) {
                    return Err(WatchError::NoSuchMirror(id));
                }
            }
            let picked: Vec<_> = t
                .by_id
                .values()
                .filter(|m| id.is_none_or(|i| i == m.id) && m.dev.is_some())
                .filter(|m| m.live_start < m.live_end)
                .collect();
            let ranges: Vec<(u64, u64)> =
                picked.iter().map(|m| (m.live_start, m.live_end)).collect();
            let unarmed: Vec<Unarmed> = picked
                .iter()
                .filter(|m| !m.armed)
                .map(|m| (m.id, m.live_start, m.live_end))
                .collect();
            (ranges, unarmed)
        };
        self.sync_ranges(&ranges, ranges.len() as u32, &unarmed)
    }

    /// Collects `ranges` (those of `mirrors` mirrors) and invalidates what was written;
    /// `unarmed` (`lazy` mirrors no sync has armed yet) are armed after the collection and
    /// invalidated whole: any page of them may have been written since their attach, and
    /// a write after the arming is in the next collection.
    pub(super) fn sync_ranges(
        &self,
        ranges: &[(u64, u64)],
        mirrors: u32,
        unarmed: &[Unarmed],
    ) -> Result<SyncStats, WatchError> {
        let backend = self
            .dirty
            .backend()
            .map_err(|why| WatchError::NotTracked(why.clone()))?;
        self.dirty.bump(|c| &c.syncs, 1);
        let mut found = Vec::new();
        let mut guard = self.dirty.lock();
        let collected =
            self.dirty
                .collect(&mut guard, self.pagemap.as_ref(), ranges, &mut found)?;
        for &(id, s, e) in unarmed {
            self.arm_lazy(id, s, e);
            found.push((s, e));
        }
        // What no event and no dirty bit tells: mappings made unreadable (mprotect), and
        // mirrored pages gone from the client (a hole punched in, or a truncation of, a file
        // or memfd it maps).
        for &(s, e) in ranges {
            self.unreadable_parts(s, e, &mut found)?;
            self.vanished_pages(s, e, &mut found);
        }
        // Begin every invalidation before releasing the collection lock: a collection that
        // runs next and finds nothing must not let its read overtake these. The access lock
        // (which the event reader needs) is taken per batch, not for all of them.
        let t = Instant::now();
        let mut begun = Vec::with_capacity(found.len());
        for batch in found.chunks(INVALIDATE_BATCH) {
            let g = self.device.lock_access();
            for &(s, e) in batch {
                let Ok(range) = Range::from_bounds(s, e) else {
                    continue;
                };
                match g.begin_invalidate(InvalidateArgs::new(range, Event::SoftDirty)) {
                    Ok(inv) => begun.push(inv),
                    Err(InvalidateError::Released) => return Err(WatchError::Released),
                    Err(e) => {
                        tracing::warn!(error = %e, start = s, "invalidation of written pages failed")
                    }
                }
            }
        }
        drop(guard);
        for inv in begun {
            inv.finish();
        }
        Ok(SyncStats {
            backend,
            mirrors,
            collected,
            invalidate_ns: u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX),
        })
    }

    /// Arms `lazy` mirror `id` (`start..end`) as an attach arms a mirror, if the back end
    /// needs it; marks it armed if that worked (a refusal, such as `EAGAIN` while a change
    /// of the client's mappings is under way, leaves it for the next sync).
    fn arm_lazy(&self, id: u64, start: u64, end: u64) {
        let armed = !self.dirty.arms_on_attach()
            || lock(&self.uffd)
                .as_ref()
                .is_some_and(|u| self.arm(u, start, end - start).is_ok());
        if armed {
            if let Some(m) = lock(&self.table).by_id.get_mut(&id) {
                m.armed = true;
            }
        }
    }

    /// Appends the parts of `start..end` that the client mapped unreadable since (by the
    /// client's maps, when it handed them over).
    fn unreadable_parts(
        &self,
        start: u64,
        end: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), WatchError> {
        let Some(maps) = &self.maps else {
            return Ok(());
        };
        let mut at = start;
        while let Some(u) = maps.first_unreadable(at, end)? {
            let stop = maps
                .at_or_after(u)?
                .map_or(end, |v| v.end.min(end))
                .max(u + PAGE_SIZE as u64);
            out.push((u, stop));
            at = stop;
        }
        Ok(())
    }

    /// Appends the runs of pages of `start..end` in the shadow that are not present in the
    /// client any more (by its pagemap, when it handed it over).
    fn vanished_pages(&self, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        use crate::sys::pagemap::{read_words, word};
        let (Some(pagemap), Ok(range)) = (&self.pagemap, Range::from_bounds(start, end)) else {
            return;
        };
        let page = PAGE_SIZE as u64;
        for (first, last) in self.device.mirrored_runs(range) {
            let n = usize::try_from(last - first + 1).unwrap_or(0);
            let Ok(words) = read_words(pagemap, first * page, n) else {
                continue;
            };
            for (i, w) in words.iter().enumerate() {
                if w & word::PRESENT == 0 {
                    let a = (first + i as u64) * page;
                    match out.last_mut() {
                        Some(r) if r.1 == a => r.1 = a + page,
                        _ => out.push((a, a + page)),
                    }
                }
            }
        }
    }
}

impl crate::dirty::periodic::PeriodicTarget for AddressSpace {
    fn periodic_sync(&self, mirror: u64) -> bool {
        let periodic = lock(&self.table)
            .by_id
            .get(&mirror)
            .is_some_and(|m| m.dev.is_some() && matches!(m.policy, DirtyPolicy::Periodic(_)));
        if !periodic {
            return false;
        }
        match self.sync(Some(mirror)) {
            Ok(_) => true,
            Err(WatchError::NoSuchMirror(_) | WatchError::Released | WatchError::NotTracked(_)) => {
                false
            }
            Err(e) => {
                tracing::debug!(mirror, error = %e, "periodic collection failed");
                true
            }
        }
    }
}
