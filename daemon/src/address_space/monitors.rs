//! The client's monitors (docs/monitors.md): each a range registered with the client's
//! userfaultfd, so that its unmap, move or discard raises an event, and an entry in the
//! client's index of monitors, whose generation the event reader bumps where it applies
//! that event, under the access lock, before the epoch turns even.
//!
//! **Why an index of their own, not notifiers in the device's subscription.** The
//! subscription defers an insert made while an invalidation is in progress until none is
//! (rule 4), and an invalidation that starts meanwhile does not see the new notifier: right
//! for the device, whose readers wait in `read_begin` and re-walk, wrong for a monitor,
//! which has no reader to wait and would miss that event for good. Monitors are made,
//! removed and bumped under the access lock, which the event reader holds from its `read()`
//! to the end of the batch: a monitor made before a change's event was read is bumped by
//! it, with no deferral and no wait.
//!
//! A monitor is registered, then indexed, under the access lock. An event of a change
//! already under way when the monitor was made (another thread's `munmap` of an old mapping
//! at that address) may still reach it: a needless "invalid", never a missed one. Removing
//! a monitor leaves its range registered (another monitor or mirror may share it; an event
//! of a range nobody watches costs a read and a lookup); a mirror's detach keeps the
//! registration of whatever monitors still cover.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::{AddressSpace, WatchError, USER_ADDR_END};
use std::ops::ControlFlow;

use crate::device::AccessGuard;
use crate::lock;
use crate::monitor::{MonitorArea, MonitorError};
use crate::notifier::{Event, IntervalTree, Range};
use crate::sys::PAGE_SIZE;

/// One live monitor.
#[derive(Debug)]
struct Live {
    gen: u64,
    range: Range,
}

/// The monitors of one client (made at its first `MonitorSetup` or `Monitor`).
pub struct Monitors {
    area: Arc<MonitorArea>,
    live: HashMap<u32, Live>,
    /// The live monitors by range (the slot is the entry's id and value).
    index: IntervalTree<u32>,
}

impl std::fmt::Debug for Monitors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitors")
            .field("live", &self.live.len())
            .finish()
    }
}

/// The monitors of a client the daemon lets go (its session ended, the daemon stops) all
/// turn invalid: nothing would bump them any more. They give their charge back to its user.
impl Drop for AddressSpace {
    fn drop(&mut self) {
        self.release_monitors();
    }
}

impl AddressSpace {
    /// Turns every monitor invalid (kind `release`) and gives their charge back: the
    /// client is let go, nothing will bump them any more. Called by `release`, before the
    /// uffd closes (from then on an unmap raises no event), and on drop.
    pub(super) fn release_monitors(&self) {
        let Some(m) = lock(&self.monitors).take() else {
            return;
        };
        m.area.invalidate(
            m.live.iter().map(|(&slot, l)| (slot, l.range)),
            Event::Release,
        );
        self.device.account().uncharge_monitors(m.live.len() as u64);
    }
}

/// What a new monitor was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Made {
    /// Its slot in the generation table.
    pub slot: u32,
    /// Its generation: valid while the slot holds it.
    pub gen: u64,
    /// The range watched (rounded out to pages).
    pub range: Range,
}

impl AddressSpace {
    /// What the client maps for its monitors: the epoch page, the generation table (both
    /// read-only), the event queue and its doorbell.
    pub fn monitor_setup(&self) -> Result<[OwnedFd; 4], WatchError> {
        let epoch = self.device.share_epoch().map_err(MonitorError::from)?;
        let area = self.monitor_area()?;
        let [gens, queue, doorbell] = area.share()?;
        Ok([epoch, gens, queue, doorbell])
    }

    fn monitor_area(&self) -> Result<Arc<MonitorArea>, WatchError> {
        let mut m = lock(&self.monitors);
        if let Some(m) = m.as_ref() {
            return Ok(Arc::clone(&m.area));
        }
        let area = Arc::new(MonitorArea::new()?);
        *m = Some(Monitors {
            area: Arc::clone(&area),
            live: HashMap::new(),
            index: IntervalTree::new(),
        });
        Ok(area)
    }

    /// Watches `addr..addr+len`, rounded out to pages.
    pub fn monitor(&self, addr: u64, len: u64) -> Result<Made, WatchError> {
        let range = monitored_range(addr, len)?;
        // The epoch must exist before the first check can rely on it.
        self.device.ensure_epoch().map_err(MonitorError::from)?;
        let area = self.monitor_area()?;
        let _access = self.device.lock_access();
        self.register(range)?;
        let account = self.device.account();
        if !account.charge_monitor() {
            return Err(MonitorError::UserQuota.into());
        }
        let (slot, gen) = match area.alloc() {
            Ok(a) => a,
            Err(e) => {
                account.uncharge_monitors(1);
                return Err(e.into());
            }
        };
        let mut m = lock(&self.monitors);
        let Some(m) = m.as_mut() else {
            area.release(slot);
            account.uncharge_monitors(1);
            return Err(WatchError::Released);
        };
        m.live.insert(slot, Live { gen, range });
        m.index.insert(range, u64::from(slot), slot);
        Ok(Made { slot, gen, range })
    }

    /// Registers exactly `range`'s pages with the client's uffd. Not more: pages around it
    /// may be another userfaultfd's to register (another session of the process, a
    /// garbage collector). Monitors scattered through one mapping split it into VMAs,
    /// bounded by the kernel's `vm.max_map_count`; past that the registration fails and
    /// the monitor is refused.
    fn register(&self, range: Range) -> Result<(), WatchError> {
        let (addr, len) = (range.start(), range.len());
        let uffd = lock(&self.uffd);
        let uffd = uffd.as_ref().ok_or(WatchError::Released)?;
        uffd.register_wp(addr, len)
            .map_err(|e| self.why_not_registered(addr, len, e))
    }

    /// Stops monitor `slot` of generation `gen`, under the access lock: no batch of events
    /// is being applied, so none can bump the slot for its next owner.
    pub fn unmonitor(&self, slot: u32, gen: u64) -> Result<(), WatchError> {
        let _access = self.device.lock_access();
        let mut m = lock(&self.monitors);
        let m = m.as_mut().ok_or(WatchError::NoSuchMonitor { slot, gen })?;
        match m.live.get(&slot) {
            Some(l) if l.gen == gen => {}
            _ => return Err(WatchError::NoSuchMonitor { slot, gen }),
        }
        if let Some(l) = m.live.remove(&slot) {
            m.index.remove(l.range, u64::from(slot));
        }
        m.area.release(slot);
        self.device.account().uncharge_monitors(1);
        Ok(())
    }

    /// Bumps every monitor that `range` overlaps, for `event` (an address-space change;
    /// under the access lock `_guard`, where the event reader applies its batch).
    pub(super) fn bump_monitors(&self, _guard: &AccessGuard<'_>, range: Range, event: Event) {
        let m = lock(&self.monitors);
        let Some(m) = m.as_ref() else { return };
        let mut hit = Vec::new();
        let _ = m.index.for_each_overlap(range, |&slot| {
            if let Some(l) = m.live.get(&slot) {
                hit.push((slot, l.range.intersection(&range).unwrap_or(l.range)));
            }
            ControlFlow::<()>::Continue(())
        });
        m.area.invalidate(hit, event);
    }

    /// The parts of `start..end` some monitor watches (their registration must stay).
    pub(super) fn monitored_parts(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let m = lock(&self.monitors);
        let (Some(m), Ok(range)) = (m.as_ref(), Range::from_bounds(start, end)) else {
            return Vec::new();
        };
        let mut parts = Vec::new();
        let _ = m.index.for_each_overlap(range, |&slot| {
            if let Some(part) = m.live.get(&slot).and_then(|l| l.range.intersection(&range)) {
                parts.push((part.start(), part.start() + part.len()));
            }
            ControlFlow::<()>::Continue(())
        });
        parts
    }
}

/// `addr..addr+len` rounded out to pages, if it is a non-empty user range.
fn monitored_range(addr: u64, len: u64) -> Result<Range, WatchError> {
    let bad = |why| WatchError::BadRange { addr, len, why };
    if len == 0 {
        return Err(bad("empty"));
    }
    let page = PAGE_SIZE as u64;
    let end = addr
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(page))
        .ok_or(bad("overflows"))?;
    if end > USER_ADDR_END {
        return Err(bad("not a user address"));
    }
    Range::from_bounds(addr - addr % page, end).map_err(|_| bad("empty"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_rounded_out_to_pages_and_checked() {
        let r = monitored_range(0x1010, 0x20).expect("range");
        assert_eq!((r.start(), r.len()), (0x1000, 0x1000));
        let r = monitored_range(0x1ff0, 0x20).expect("range");
        assert_eq!((r.start(), r.len()), (0x1000, 0x2000));
        assert!(monitored_range(0x1000, 0).is_err());
        assert!(monitored_range(u64::MAX - 10, 5).is_err());
        assert!(monitored_range(USER_ADDR_END, 1).is_err());
    }
}
