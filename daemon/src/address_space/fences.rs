//! Fences of announced changes (`MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`): the kernel
//! sends `UFFD_EVENT_REMOVE` *before* it zaps the pages, and lets the client's thread go on
//! as soon as the event is read; the thread then takes its mmap lock again and zaps. Between
//! the read and the zap, the client's memory still shows the old bytes, and a device fault
//! that copied them would keep them after the zap, with no event left to remove them.
//!
//! So the start pass of such an event also *fences* the range in the device: no page of it
//! is installed, and device reads of it are served from the client's memory itself (right
//! for any read issued after the client's call returned, since the kernel zaps first).
//! The fence is lifted once the zap is seen done, by a job on the workers (it may have to
//! wait for the client's mmap lock, which no shared thread may do):
//!
//! 1. the client's uffd no longer reports a change in flight (`mmap_changing`: the thread
//!    that made the call has run again after the read);
//! 2. one of the range's pages that were present when the event was read is not present
//!    any more (the zap, which runs under one hold of the read lock, has begun), or none
//!    was present already then (nothing left to zap), by the client's pagemap; without a
//!    pagemap, or if it never sees that, up to [`LIFT_AFTER`] passes;
//! 3. the mmap lock is taken for writing ([`Uffd::barrier`]): a zap in progress is over;
//! 4. one page of the range is read again (a hole punch of shared memory, `MADV_REMOVE`,
//!    makes that read wait for it).
//!
//! What is left: a thread preempted between the end of its wait for the event and taking
//! the lock again, for longer than [`LIFT_AFTER`], with nothing present in the range to
//! watch; and `MADV_FREE`, which zaps nothing (the pages stay until memory is short, then
//! read as zeros, with no event). Both are documented limits.

use std::fs::File;
use std::io::IoSliceMut;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::AddressSpace;
use crate::lock;
use crate::notifier::Range;
use crate::sys::pagemap::{read_words, word};
use crate::sys::uffd::Uffd;
use crate::sys::PAGE_SIZE;

/// Longest a fence waits to see its zap begin before it is lifted anyway.
pub const LIFT_AFTER: Duration = Duration::from_millis(200);

/// Pages of a fenced range whose presence is watched.
const MAX_SENTINELS: usize = 8;

/// A fence waiting to be lifted.
#[derive(Debug, Clone)]
pub struct PendingFence {
    /// The device's token for it.
    pub token: u64,
    /// The range.
    pub range: Range,
    /// When the event was read.
    pub since: Instant,
    /// Pages present then; the zap has begun once one of them is not.
    pub sentinels: Vec<u64>,
    /// A sentinel was seen not present (the fenced reads themselves look before they read:
    /// a read maps the page again).
    pub zap_seen: bool,
    /// Bumped when a newer change of the same range takes the fence over (see
    /// [`AddressSpace::fence`]): a settle job that looked at an older one lifts nothing.
    pub generation: u64,
}

impl PendingFence {
    /// A fence of `range` (device token `token`), with the present pages `pagemap` shows.
    pub fn new(token: u64, range: Range, pagemap: Option<&File>) -> PendingFence {
        let sentinels = pagemap.map(|p| present_pages(p, range));
        PendingFence {
            token,
            range,
            since: Instant::now(),
            // Nothing present already (the client's thread, let go at the read, may have
            // zapped before this look; or nothing was mapped): nothing is left to zap.
            zap_seen: sentinels.as_ref().is_some_and(Vec::is_empty),
            sentinels: sentinels.unwrap_or_default(),
            generation: 0,
        }
    }
}

/// Whether the page at `addr` is present (a swapped page, or a write-protect marker, is not).
fn present(pagemap: &File, addr: u64) -> Option<bool> {
    let w = read_words(pagemap, addr, 1).ok()?;
    Some(w.first().copied()? & word::PRESENT != 0)
}

/// Up to [`MAX_SENTINELS`] present pages spread over `range`. Spread, because the client's
/// own accesses after its call returned (and the daemon's fenced reads) map pages again,
/// beginning where the client goes first; the zap itself runs from the start to the end.
fn present_pages(pagemap: &File, range: Range) -> Vec<u64> {
    let page = PAGE_SIZE as u64;
    let pages = range.len() / page;
    let step = (pages / MAX_SENTINELS as u64).max(1);
    (0..pages)
        .step_by(usize::try_from(step).unwrap_or(usize::MAX))
        .map(|i| range.start() + i * page)
        .filter(|&a| present(pagemap, a) == Some(true))
        .take(MAX_SENTINELS)
        .collect()
}

/// True if some sentinel page is no longer present.
fn zap_begun(pagemap: &File, sentinels: &[u64]) -> bool {
    sentinels
        .iter()
        .any(|&a| present(pagemap, a) == Some(false))
}

/// What became of a fence when it was looked at.
enum Verdict {
    /// Not yet.
    Wait,
    /// The zap was seen made.
    Done,
    /// Waited [`LIFT_AFTER`] without seeing it.
    TimedOut,
}

impl AddressSpace {
    /// Fences `range` for an event that announces a change not made yet; call under the
    /// access lock, before the range's invalidation.
    ///
    /// A change of a range that already has a fence up takes that fence over (a client that
    /// discards one buffer in a loop keeps one fence, not one per call): the fence is then
    /// lifted only once the newer change is seen made, and the conditions for that, checked
    /// after the newer event was read, cover the older change too (its thread has run, or a
    /// change would still be in flight; the barrier ends a zap in progress).
    pub(super) fn fence(&self, guard: &crate::device::AccessGuard<'_>, range: Range) {
        let mut fences = lock(&self.fences);
        if let Some(f) = fences.iter_mut().find(|f| f.range == range) {
            let generation = f.generation + 1;
            *f = PendingFence {
                generation,
                ..PendingFence::new(f.token, range, self.pagemap.as_ref())
            };
            return;
        }
        let token = guard.fence(range);
        fences.push(PendingFence::new(token, range, self.pagemap.as_ref()));
    }

    /// Before a device read of `range`: notes, for the fences over it, whether their zap has
    /// begun (the read may map the fenced pages again, hiding that from a later look).
    pub(super) fn observe_fences(&self, range: Range) {
        let Some(pagemap) = &self.pagemap else {
            return;
        };
        let mut fences = lock(&self.fences);
        for f in fences
            .iter_mut()
            .filter(|f| !f.zap_seen && f.range.overlaps(&range))
        {
            f.zap_seen = zap_begun(pagemap, &f.sentinels);
        }
    }

    /// True while a fence waits to be lifted.
    pub fn has_pending_fences(&self) -> bool {
        !lock(&self.fences).is_empty()
    }

    /// Claims the right to settle fences (one job at a time per client); false if a job
    /// already has it.
    pub fn claim_settling(&self) -> bool {
        !self.settling.swap(true, Relaxed)
    }

    /// Lifts the fences whose change is seen made (see the module). Blocks while the
    /// client holds its mmap lock: run it on a worker, after [`AddressSpace::claim_settling`].
    /// The event reader looks again later while [`AddressSpace::has_pending_fences`].
    pub fn settle_fences(&self) {
        // Looked at on a copy (a look may wait for the client's mmap lock), and left in the
        // list until lifted in the device too: whoever waits for the list to empty
        // ([`AddressSpace::settle_over`]) then finds the pages installable.
        let pending: Vec<PendingFence> = lock(&self.fences).clone();
        let mut lifted = Vec::new();
        for f in pending {
            match self.look_at(&f) {
                Verdict::Wait => continue,
                Verdict::Done => lifted.push((f.token, f.generation, false)),
                Verdict::TimedOut => lifted.push((f.token, f.generation, true)),
            }
        }
        if !lifted.is_empty() {
            // One pass over the list, and over the device's fences, however many lift. A
            // fence taken over by a newer change meanwhile (another generation) stays.
            let mut fences = lock(&self.fences);
            let now: std::collections::HashMap<u64, u64> =
                fences.iter().map(|p| (p.token, p.generation)).collect();
            let gone = lifted.iter().filter(|(t, g, _)| now.get(t) == Some(g));
            let timed_out = gone.clone().filter(|(_, _, late)| *late).count() as u64;
            let tokens: std::collections::HashSet<u64> = gone.map(|(t, _, _)| *t).collect();
            fences.retain(|p| !tokens.contains(&p.token));
            self.device.unfence_all(&tokens, timed_out);
        }
        self.settling.store(false, Relaxed);
    }

    /// Settles, on this thread, the fences over `range` until none is left (at most about
    /// [`LIFT_AFTER`]): for requests that must install pages there (populate).
    pub(super) fn settle_over(&self, range: Range) {
        let deadline = Instant::now() + LIFT_AFTER + Duration::from_millis(50);
        let overlaps = || lock(&self.fences).iter().any(|f| f.range.overlaps(&range));
        while overlaps() && Instant::now() < deadline {
            if self.claim_settling() {
                self.settle_fences();
            }
            if overlaps() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if overlaps() {
            tracing::debug!(
                start = range.start(),
                "fences still up after waiting for them"
            );
        }
    }

    fn look_at(&self, f: &PendingFence) -> Verdict {
        let Some(changing) = self.with_uffd(|u| u.events_pending(f.range.start(), 0)) else {
            // Released: the fence goes with the device client.
            return Verdict::Done;
        };
        let late = f.since.elapsed() >= LIFT_AFTER;
        if changing && !late {
            return Verdict::Wait;
        }
        let begun = f.zap_seen
            || match (&self.pagemap, f.sentinels.is_empty()) {
                (Some(p), false) => zap_begun(p, &f.sentinels),
                _ => false,
            };
        if !begun && !late {
            return Verdict::Wait;
        }
        self.with_uffd(Uffd::barrier);
        // A punch of shared memory in progress makes this read wait for its end.
        let mut page = [0u8; PAGE_SIZE];
        let _ = self
            .device
            .source()
            .read_uncached(f.range.start(), &mut [IoSliceMut::new(&mut page)]);
        if begun {
            Verdict::Done
        } else {
            tracing::debug!(
                start = f.range.start(),
                len = f.range.len(),
                changing,
                sentinels = f.sentinels.len(),
                "fence lifted without seeing its zap"
            );
            Verdict::TimedOut
        }
    }
}
