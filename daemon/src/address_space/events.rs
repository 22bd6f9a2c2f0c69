//! The client's uffd events, read and applied (docs/design.md §6): each event's range is
//! retired, fenced or invalidated, and its start pass runs under the access lock, so that a
//! device read issued after the client's call returned queues behind it (G1). Injected
//! invalidations take the same path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::table::Attached;
use super::AddressSpace;
use super::WatchError;
use crate::device::AccessGuard;
use crate::dirty::Backend;
use crate::lock;
use crate::notifier::{Event, InvalidateArgs, InvalidateError, Invalidation, Range};
use crate::sys::uffd::UffdEvent;
use crate::sys::PAGE_SIZE;
use crate::trace::TraceRecord;

/// Counters of a client's uffd events.
#[derive(Debug, Default)]
pub struct EventCounters {
    /// `UNMAP` events.
    pub unmap: AtomicU64,
    /// `REMOVE` events.
    pub remove: AtomicU64,
    /// `REMAP` events.
    pub remap: AtomicU64,
    /// `FORK` events (the child's uffd is closed: the child runs unmirrored).
    pub fork: AtomicU64,
    /// Write-protect or other faults (never requested; resolved at once).
    pub faults: AtomicU64,
    /// Reads of the uffd that returned events.
    pub batches: AtomicU64,
}

impl EventCounters {
    /// All events.
    pub fn total(&self) -> u64 {
        self.unmap.load(Relaxed)
            + self.remove.load(Relaxed)
            + self.remap.load(Relaxed)
            + self.fork.load(Relaxed)
            + self.faults.load(Relaxed)
    }
}

/// What [`AddressSpace::revisit`] asks of the event reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revisit {
    /// Come back soon: something still waits.
    pub again: bool,
    /// Fences wait to be lifted and this visit claimed their settling: run
    /// [`AddressSpace::settle_fences`] on a worker (it may wait for the client's mmap lock).
    pub settle: bool,
}

/// What [`AddressSpace::read_events`] hands back for the caller to do off the reader's path.
#[derive(Debug, Default)]
pub struct Deferred {
    /// Finish passes (G1: only the starts had to run before the next read).
    pub finishes: Vec<Invalidation>,
    /// Device mirrors whose range is gone: detach them (waits for invalidations).
    pub detach: Vec<u64>,
}

/// Test hook: `MEMSHADOW_TEST_EVENT_DELAY_US` (read once) delays every batch's start passes
/// after its events were read, by that many µs (at most 100 ms). Off unless set.
fn test_event_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let us: u64 = std::env::var("MEMSHADOW_TEST_EVENT_DELAY_US")
            .ok()?
            .parse()
            .ok()?;
        Some(std::time::Duration::from_micros(us.min(100_000)))
    })
}

/// Makes the epoch even again when the batch is done, however it ends.
struct EndEventRead<'a>(&'a crate::device::DeviceClient);

impl Drop for EndEventRead<'_> {
    fn drop(&mut self) {
        self.0.end_event_read();
    }
}

impl AddressSpace {
    /// Reads one batch of pending events and runs their start passes, all under the access
    /// lock (G1): when this returns, every device access of the client issued after the
    /// client's call returned queues behind the flushes started here. Finish passes and
    /// detaches are handed back in `out`. Returns the number of events read (0: none were
    /// pending, or the client was released).
    pub fn read_events(
        &self,
        buf: &mut userfaultfd::EventBuffer,
        scratch: &mut Vec<UffdEvent>,
        out: &mut Deferred,
    ) -> Result<usize, WatchError> {
        let guard = self.device.lock_access();
        scratch.clear();
        // Odd from before the read() that lets the client's call return until every start
        // pass of the batch has cleared its page-table words (docs/engines.md, G1).
        self.device.begin_event_read();
        let _even = EndEventRead(&self.device);
        let n = {
            let uffd = lock(&self.uffd);
            let Some(uffd) = uffd.as_ref() else {
                return Ok(0);
            };
            uffd.read_events(buf, scratch)?
        };
        if n == 0 {
            self.retry_wakes_locked(&guard, out);
            return Ok(0);
        }
        if let Some(d) = test_event_delay() {
            // Widens the window between the client's call returning and its start pass, so
            // that tests can show what the epoch closes (docs/testing.md).
            std::thread::sleep(d);
        }
        self.counters.batches.fetch_add(1, Relaxed);
        for ev in scratch.drain(..) {
            self.apply(&guard, ev, out);
        }
        self.retry_wakes_locked(&guard, out);
        Ok(n)
    }

    /// True while the event reader must come back to this client soon, with no event to
    /// wake it: un-protects of write faults to retry, fences to lift.
    pub fn needs_revisit(&self) -> bool {
        self.has_pending_wakes() || self.has_pending_fences()
    }

    /// The event reader's return visit: retries the un-protects of write faults that met
    /// `EAGAIN` (finishes go to `out`), and claims the settling of fences still up.
    pub fn revisit(&self, out: &mut Deferred) -> Revisit {
        let mut again = self.has_pending_wakes() && self.retry_wakes(out);
        let fenced = self.has_pending_fences();
        again |= fenced;
        Revisit {
            again,
            settle: fenced && self.claim_settling(),
        }
    }

    /// True while un-protects of write faults wait for a retry ([`Wakes`](crate::dirty::uffd_wp::Wakes)).
    pub fn has_pending_wakes(&self) -> bool {
        self.wakes.has_pending()
    }

    /// Retries the un-protects that met `EAGAIN`, taking the access lock; finishes go to
    /// `out`. True if some are still pending ([`Wakes::retry`](crate::dirty::uffd_wp::Wakes::retry)).
    pub fn retry_wakes(&self, out: &mut Deferred) -> bool {
        let guard = self.device.lock_access();
        self.retry_wakes_locked(&guard, out)
    }

    /// [`AddressSpace::retry_wakes`] under the access lock `guard`: a page un-protected is
    /// invalidated again (`SoftDirty`) before its writer is woken.
    fn retry_wakes_locked(&self, guard: &AccessGuard<'_>, out: &mut Deferred) -> bool {
        self.wakes.retry(&self.uffd, &self.dirty, |r| {
            self.invalidate(guard, r, Event::SoftDirty, out);
        })
    }

    fn apply(&self, guard: &AccessGuard<'_>, ev: UffdEvent, out: &mut Deferred) {
        match ev {
            UffdEvent::Unmap { start, end } => {
                self.counters.unmap.fetch_add(1, Relaxed);
                self.gone(guard, start, end, Event::Unmap, None, out);
            }
            UffdEvent::Remove { start, end } => {
                self.counters.remove.fetch_add(1, Relaxed);
                // The mapping stays, but the kernel zaps its pages only after this read:
                // fence the range until it has, then invalidate (any fault that began
                // earlier retries, and installs nothing while the fence stands).
                if let Ok(r) = Range::from_bounds(start, end) {
                    self.fence(guard, r);
                    self.invalidate(guard, r, Event::Clear, out);
                }
            }
            UffdEvent::Remap { from, to, len } => {
                self.counters.remap.fetch_add(1, Relaxed);
                self.gone(
                    guard,
                    from,
                    from.saturating_add(len),
                    Event::Unmap,
                    Some(to),
                    out,
                );
            }
            UffdEvent::Fork { child } => {
                self.counters.fork.fetch_add(1, Relaxed);
                // Closing the child's uffd unregisters its copies: the child runs unmirrored.
                drop(child);
                tracing::debug!(
                    "fork: the child's userfaultfd is closed, the child is not mirrored"
                );
            }
            UffdEvent::WriteFault { addr } if self.dirty.is(Backend::UffdWp) => {
                self.counters.faults.fetch_add(1, Relaxed);
                self.wakes.write_fault(&self.uffd, &self.dirty, addr, |r| {
                    self.invalidate(guard, r, Event::SoftDirty, out);
                });
            }
            UffdEvent::WriteFault { addr } | UffdEvent::OtherFault { addr } => {
                self.counters.faults.fetch_add(1, Relaxed);
                tracing::debug!(addr, "unexpected userfaultfd fault resolved");
                self.wakes.resolve(&self.uffd, &self.dirty, addr);
            }
        }
    }

    pub(super) fn invalidate(
        &self,
        guard: &AccessGuard<'_>,
        range: Range,
        event: Event,
        out: &mut Deferred,
    ) {
        if event != Event::SoftDirty {
            // Written pages are still the same pages: a monitor stays valid through them.
            self.bump_monitors(guard, range, event);
        }
        match guard.begin_invalidate(InvalidateArgs::new(range, event)) {
            Ok(inv) => out.finishes.push(inv),
            Err(InvalidateError::Released) => {}
            Err(e) => tracing::warn!(error = %e, start = range.start(), "invalidation failed"),
        }
    }

    /// `start..end` stopped being the mapping the client attached (munmap, or the source of
    /// an mremap to `moved_to`): retire it in the device, invalidate it, and update the table
    /// (a mirror wholly inside a moved range follows it; anything else loses that part).
    fn gone(
        &self,
        guard: &AccessGuard<'_>,
        start: u64,
        end: u64,
        event: Event,
        moved_to: Option<u64>,
        out: &mut Deferred,
    ) {
        let Ok(range) = Range::from_bounds(start, end) else {
            return;
        };
        out.detach.extend(guard.retire(range));
        self.invalidate(guard, range, event, out);
        let mut t = lock(&self.table);
        for m in t.by_id.values_mut() {
            let Some(dev) = m.dev else { continue };
            let (ls, le) = (m.live_start, m.live_end);
            if !(ls < end && start < le) {
                continue;
            }
            let inside = start <= ls && le <= end && !m.holes;
            match moved_to {
                Some(to) if inside => {
                    if !out.detach.contains(&dev) {
                        out.detach.push(dev);
                    }
                    self.follow(m, to + (ls - start));
                }
                _ if inside => m.dev = None,
                // Partly gone: the device refuses the retired part, the rest stays mirrored.
                _ => m.cut(start, end),
            }
        }
    }

    /// Mirror `m`, moved whole by an mremap, follows its range to `new`: a new device mirror
    /// there, the same mirror id for the client (none if the device refuses).
    fn follow(&self, m: &mut Attached, new: u64) {
        let (ls, le) = (m.live_start, m.live_end);
        match self.device.attach(new, le - ls) {
            Ok(d) => {
                tracing::debug!(mirror = m.id, from = ls, to = new, "mirror follows mremap");
                m.addr = m.addr.wrapping_add(new.wrapping_sub(ls));
                m.live_start = new;
                m.live_end = new + (le - ls);
                m.dev = Some(d);
            }
            Err(e) => {
                tracing::warn!(mirror = m.id, error = %e, "mirror cannot follow mremap");
                m.dev = None;
            }
        }
    }

    /// Invalidates `start..start+len` (rounded out to pages) of the client's shadow as if
    /// its address space had changed with `event`: the same two-pass path as a uffd event,
    /// under the access lock (G1). Nothing is retired, so the pages fault in again on the
    /// next device read. A non-blockable invalidation that must wait is refused (`EAGAIN`)
    /// after finishing what it started (rule 7).
    pub fn inject(
        &self,
        start: u64,
        len: u64,
        event: Event,
        blockable: bool,
    ) -> Result<TraceRecord, WatchError> {
        let page = PAGE_SIZE as u64;
        let bad = |why| WatchError::BadRange {
            addr: start,
            len,
            why,
        };
        let end = start
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(page))
            .ok_or(bad("overflows"))?;
        let range = Range::from_bounds(start - start % page, end).map_err(|_| bad("is empty"))?;
        let mut args = InvalidateArgs::new(range, event);
        if !blockable {
            args = args.non_blockable();
        }
        self.device
            .invalidate_recorded(args)
            .map_err(|_| WatchError::Released)
    }
}
