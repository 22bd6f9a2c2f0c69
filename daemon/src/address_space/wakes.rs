//! Waking the writers of write-protect faults: un-protect the page and wake the faulting
//! thread, and when the un-protect meets `EAGAIN` (events unread), retry after the next read
//! of events.

use super::events::Deferred;
use super::AddressSpace;
use crate::device::AccessGuard;
use crate::dirty::Backend;
use crate::lock;
use crate::notifier::{Event, Range};
use crate::sys::uffd::UffdError;
use crate::sys::PAGE_SIZE;

impl AddressSpace {
    /// Un-protects and wakes `page`; on `EAGAIN` (events unread) remembers it for after the
    /// next read of events (the unread event is what wakes the reader again).
    pub(super) fn unprotect_and_wake(&self, page: u64) {
        if self.forced_eagain() {
            lock(&self.pending_wake).push(page);
            return;
        }
        let r = self.with_uffd(|u| u.unprotect(page, PAGE_SIZE as u64, true));
        match r {
            Some(Err(e)) if e.errno() == Some(nix::Error::EAGAIN) => {
                self.dirty.bump(|c| &c.wake_retries, 1);
                lock(&self.pending_wake).push(page);
            }
            Some(Err(e)) => self.wake_anyway(page, &e),
            _ => {}
        }
    }

    /// A write fault whose page cannot be un-protected (typically `ENOENT`: another client
    /// thread unmapped it meanwhile) still has a writer waiting: wake it, or it would wait
    /// until the client is released (G6). It then faults on whatever is there now.
    fn wake_anyway(&self, page: u64, e: &UffdError) {
        tracing::debug!(addr = page, error = %e, "write-protect fault on a page gone; waking the writer");
        if let Some(Err(e)) = self.with_uffd(|u| u.wake(page, PAGE_SIZE as u64)) {
            tracing::warn!(addr = page, error = %e, "could not wake a writer");
        }
    }

    /// Tests: whether this un-protect is to act as if it met `EAGAIN`.
    fn forced_eagain(&self) -> bool {
        #[cfg(test)]
        return self
            .defer_wakes
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok();
        #[cfg(not(test))]
        false
    }

    /// True while un-protects of write faults wait for a retry.
    pub fn has_pending_wakes(&self) -> bool {
        !lock(&self.pending_wake).is_empty()
    }

    /// Retries the un-protects that met `EAGAIN`, taking the access lock; finishes go to
    /// `out`. True if some are still pending: the event reader calls it again soon while
    /// that is so (the unread event that caused `EAGAIN` is only counted done once the
    /// client thread that raised it ran again, after the read).
    pub fn retry_wakes(&self, out: &mut Deferred) -> bool {
        let guard = self.device.lock_access();
        self.retry_wakes_locked(&guard, out)
    }

    /// [`AddressSpace::retry_wakes`] under the access lock `guard`.
    ///
    /// The fault's own invalidation has ended by now, so the device may have faulted the
    /// page in again meanwhile: arming it changed nothing (it was still protected) and the
    /// copy holds the bytes from before the blocked write. So the page is un-protected
    /// *without* waking, invalidated again (uffd-wp), and only then is the writer woken: no
    /// copy taken before the write survives it, and none taken after it lacks protection.
    pub(super) fn retry_wakes_locked(&self, guard: &AccessGuard<'_>, out: &mut Deferred) -> bool {
        let pages = std::mem::take(&mut *lock(&self.pending_wake));
        let mut still = Vec::new();
        for page in pages {
            if self.forced_eagain() {
                still.push(page);
                continue;
            }
            // `None`: released; closing the uffd woke every waiter.
            match self.with_uffd(|u| u.unprotect(page, PAGE_SIZE as u64, false)) {
                None => {}
                Some(Err(e)) if e.errno() == Some(nix::Error::EAGAIN) => {
                    self.dirty.bump(|c| &c.wake_retries, 1);
                    still.push(page);
                }
                Some(Err(e)) => self.wake_anyway(page, &e),
                Some(Ok(())) => {
                    if self.dirty.is(Backend::UffdWp) {
                        if let Ok(r) = Range::new(page, PAGE_SIZE as u64) {
                            self.invalidate(guard, r, Event::SoftDirty, out);
                        }
                    }
                    if let Some(Err(e)) = self.with_uffd(|u| u.wake(page, PAGE_SIZE as u64)) {
                        tracing::warn!(addr = page, error = %e, "could not wake a writer");
                    }
                }
            }
        }
        let mut pending = lock(&self.pending_wake);
        pending.extend(still);
        !pending.is_empty()
    }
}
