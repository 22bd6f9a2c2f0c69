//! The `uffd-wp` back end (docs/design.md §6), the universal fallback (Linux 5.7+; 6.4+ for
//! `WP_UNPOPULATED`), whole in this module:
//!
//! * **Arming.** A page is write-protected ("armed") just before the device copies it
//!   ([`ArmingSource`]), so a later write by the client raises a synchronous write-protect
//!   fault. The page is armed again when the device next faults it in. Nothing has to be
//!   scanned, and only pages the device mirrors cost the client a fault when written.
//! * **Faults and wakes** ([`Wakes`]). The event reader reads the fault, invalidates the page
//!   (event `SoftDirty`, start pass under the access lock), then un-protects it and wakes the
//!   writer. An un-protect that meets `EAGAIN` (an address-space event of the client is
//!   unread) is retried after the next read of events, the page invalidated again before the
//!   writer goes (see [`Wakes::retry`]); the reader comes back soon while one waits. Other
//!   faults (never requested) are resolved the same way, without the invalidation.
//! * **Probe.** [`probe`] tries all of it on scratch pages of the daemon's own.
//!
//! Only on a uffd created without `UFFD_USER_MODE_ONLY`: on a user-mode-only uffd a *kernel*
//! write to a protected page (e.g. `read(2)` into it) fails with `EFAULT` instead of waiting.
//! `WP_UNPOPULATED` is required: without it, arming a page not populated yet does nothing,
//! the device's read maps the zero page unprotected, and the client's first write to it
//! would leave no trace.

use crate::lock;
use std::io::IoSliceMut;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Backend, ClientDirty, ProbeError};
use crate::notifier::Range;
use crate::source::{MemorySource, SourceError};
use crate::sys::uffd::{features, SharedUffd, Uffd, UffdError, UffdEvent};
use crate::sys::PAGE_SIZE;

/// How long arming waits for the event reader to drain address-space events (the kernel
/// refuses write-protection with `EAGAIN` until it has).
const ARM_DEADLINE: Duration = Duration::from_secs(2);

/// A [`MemorySource`] that write-protects the pages it is asked for before reading them, so
/// any write after the copy faults (and invalidates the copy).
pub struct ArmingSource {
    inner: Arc<dyn MemorySource>,
    uffd: SharedUffd,
    dirty: Arc<ClientDirty>,
}

impl std::fmt::Debug for ArmingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmingSource")
            .field("inner", &self.inner.kind())
            .finish()
    }
}

impl ArmingSource {
    /// Arms through `uffd`, reads through `inner`, counts into `dirty`.
    pub fn new(inner: Arc<dyn MemorySource>, uffd: SharedUffd, dirty: Arc<ClientDirty>) -> Self {
        ArmingSource { inner, uffd, dirty }
    }

    /// Write-protects `addr..addr+len`; `Ok(false)` if the range is not (all) registered or
    /// mapped any more (the read that follows will say what is left).
    fn arm(&self, addr: u64, len: u64) -> Result<bool, SourceError> {
        let deadline = Instant::now() + ARM_DEADLINE;
        let mut backoff = Duration::from_micros(20);
        loop {
            let r = {
                let u = lock(&self.uffd);
                match u.as_ref() {
                    Some(u) => u.write_protect(addr, len),
                    None => return Err(arm_err(addr, nix::Error::ESHUTDOWN)),
                }
            };
            match r {
                Ok(()) => {
                    self.dirty.bump(|c| &c.arms, 1);
                    return Ok(true);
                }
                Err(e) => match e.errno() {
                    // Address-space events are unread: let the reader drain them.
                    Some(nix::Error::EAGAIN) if Instant::now() < deadline => {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(5));
                    }
                    Some(nix::Error::ENOENT | nix::Error::EFAULT | nix::Error::EINVAL) => {
                        return Ok(false)
                    }
                    Some(n) => return Err(arm_err(addr, n)),
                    None => return Err(arm_err(addr, nix::Error::EIO)),
                },
            }
        }
    }
}

fn arm_err(addr: u64, e: nix::Error) -> SourceError {
    SourceError::Io {
        addr,
        via: "uffd write-protect",
        source: e.into(),
    }
}

impl MemorySource for ArmingSource {
    fn read_pages(&self, addr: u64, dst: &mut [IoSliceMut<'_>]) -> Result<usize, SourceError> {
        let len: u64 = dst.iter().map(|s| s.len() as u64).sum();
        if len > 0 && !self.arm(addr, len)? {
            return Ok(0);
        }
        self.inner.read_pages(addr, dst)
    }

    /// Nothing read this way is installed, so nothing needs arming.
    fn read_uncached(&self, addr: u64, dst: &mut [IoSliceMut<'_>]) -> Result<usize, SourceError> {
        self.inner.read_uncached(addr, dst)
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn alive(&self) -> bool {
        self.inner.alive()
    }
}

/// The writers of a client's write-protect faults still to be woken: pages whose un-protect
/// met `EAGAIN` because an address-space event of the client was unread. The unread event
/// wakes the event reader again; it then retries them ([`Wakes::retry`]), so every faulting
/// thread is woken in the end (G6).
#[derive(Debug, Default)]
pub struct Wakes {
    pending: Mutex<Vec<u64>>,
    /// Tests: the next this many un-protects act as if they met `EAGAIN` (the kernel's
    /// window for that is a race between two client threads).
    #[cfg(test)]
    pub(crate) defer: std::sync::atomic::AtomicU32,
}

impl Wakes {
    /// A write fault at `addr` under `uffd-wp` tracking, read by the event reader: counts it,
    /// has `invalidate` run the start pass of the page's invalidation (the device may hold
    /// it) before the write can complete, then lets the writer go. The page is armed again
    /// when the device next faults it in.
    pub fn write_fault(
        &self,
        uffd: &SharedUffd,
        dirty: &ClientDirty,
        addr: u64,
        invalidate: impl FnOnce(Range),
    ) {
        dirty.wp_fault();
        let page = page_of(addr);
        if let Ok(r) = Range::new(page, PAGE_SIZE as u64) {
            invalidate(r);
        }
        self.resolve(uffd, dirty, page);
    }

    /// Un-protects and wakes the page of a fault at `addr`; on `EAGAIN` (events unread)
    /// remembers it for after the next read of events (the unread event is what wakes the
    /// reader again). Also resolves faults nobody asked for.
    pub fn resolve(&self, uffd: &SharedUffd, dirty: &ClientDirty, addr: u64) {
        let page = page_of(addr);
        if self.forced_eagain() {
            lock(&self.pending).push(page);
            return;
        }
        let r = with_uffd(uffd, |u| u.unprotect(page, PAGE_SIZE as u64, true));
        match r {
            Some(Err(e)) if e.errno() == Some(nix::Error::EAGAIN) => {
                dirty.bump(|c| &c.wake_retries, 1);
                lock(&self.pending).push(page);
            }
            Some(Err(e)) => wake_anyway(uffd, page, &e),
            _ => {}
        }
    }

    /// True while un-protects of write faults wait for a retry.
    pub fn has_pending(&self) -> bool {
        !lock(&self.pending).is_empty()
    }

    /// Retries the un-protects that met `EAGAIN`; call under the client's access lock. True
    /// if some are still pending: the event reader calls it again soon while that is so (the
    /// unread event that caused `EAGAIN` is only counted done once the client thread that
    /// raised it ran again, after the read).
    ///
    /// The fault's own invalidation has ended by now, so the device may have faulted the
    /// page in again meanwhile: arming it changed nothing (it was still protected) and the
    /// copy holds the bytes from before the blocked write. So the page is un-protected
    /// *without* waking, invalidated again through `invalidate` (`uffd-wp` tracking only),
    /// and only then is the writer woken: no copy taken before the write survives it, and
    /// none taken after it lacks protection.
    pub fn retry(
        &self,
        uffd: &SharedUffd,
        dirty: &ClientDirty,
        mut invalidate: impl FnMut(Range),
    ) -> bool {
        let pages = std::mem::take(&mut *lock(&self.pending));
        let mut still = Vec::new();
        for page in pages {
            if self.forced_eagain() {
                still.push(page);
                continue;
            }
            // `None`: released; closing the uffd woke every waiter.
            match with_uffd(uffd, |u| u.unprotect(page, PAGE_SIZE as u64, false)) {
                None => {}
                Some(Err(e)) if e.errno() == Some(nix::Error::EAGAIN) => {
                    dirty.bump(|c| &c.wake_retries, 1);
                    still.push(page);
                }
                Some(Err(e)) => wake_anyway(uffd, page, &e),
                Some(Ok(())) => {
                    if dirty.is(Backend::UffdWp) {
                        if let Ok(r) = Range::new(page, PAGE_SIZE as u64) {
                            invalidate(r);
                        }
                    }
                    if let Some(Err(e)) = with_uffd(uffd, |u| u.wake(page, PAGE_SIZE as u64)) {
                        tracing::warn!(addr = page, error = %e, "could not wake a writer");
                    }
                }
            }
        }
        let mut pending = lock(&self.pending);
        pending.extend(still);
        !pending.is_empty()
    }

    /// Tests: whether this un-protect is to act as if it met `EAGAIN`.
    fn forced_eagain(&self) -> bool {
        #[cfg(test)]
        return self
            .defer
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok();
        #[cfg(not(test))]
        false
    }
}

/// The page that contains `addr`.
fn page_of(addr: u64) -> u64 {
    addr & !(PAGE_SIZE as u64 - 1)
}

/// Runs `f` on the uffd unless the client was released.
fn with_uffd<R>(uffd: &SharedUffd, f: impl FnOnce(&Uffd) -> R) -> Option<R> {
    lock(uffd).as_ref().map(f)
}

/// A write fault whose page cannot be un-protected (typically `ENOENT`: another client
/// thread unmapped it meanwhile) still has a writer waiting: wake it, or it would wait
/// until the client is released (G6). It then faults on whatever is there now.
fn wake_anyway(uffd: &SharedUffd, page: u64, e: &UffdError) {
    tracing::debug!(addr = page, error = %e, "write-protect fault on a page gone; waking the writer");
    if let Some(Err(e)) = with_uffd(uffd, |u| u.wake(page, PAGE_SIZE as u64)) {
        tracing::warn!(addr = page, error = %e, "could not wake a writer");
    }
}

/// Tries the back end on two scratch pages of this process, one populated and one not:
/// arm both, read the second (the zero page), then write both from another thread; each
/// write must raise a write-protect fault, which this thread resolves.
pub fn probe() -> Result<(), ProbeError> {
    let (uffd, granted) = Backend::UffdWp.probe_uffd("UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+)")?;
    if granted & features::PAGEFAULT_FLAG_WP == 0 {
        return Err(ProbeError::Unsupported(
            "the kernel does not offer write-protect faults (Linux 5.7+)",
        ));
    }
    uffd.set_nonblocking().map_err(ProbeError::uffd(
        "making the probe's userfaultfd non-blocking",
    ))?;
    let page = PAGE_SIZE as u64;
    let mut map = memmap2::MmapMut::map_anon(2 * PAGE_SIZE).map_err(ProbeError::io("mmap"))?;
    map[..PAGE_SIZE].fill(1);
    let start = map.as_ptr() as u64;
    uffd.register_wp(start, 2 * page)
        .map_err(ProbeError::uffd("UFFDIO_REGISTER (write-protect mode)"))?;
    uffd.write_protect(start, 2 * page)
        .map_err(ProbeError::uffd("UFFDIO_WRITEPROTECT"))?;
    // A read fault on the armed, unpopulated page maps the zero page; WP_UNPOPULATED keeps
    // it protected.
    std::hint::black_box(map[PAGE_SIZE]);
    let writer = std::thread::Builder::new()
        .name("uffd-wp-probe".into())
        .spawn(move || {
            map[0] = 7;
            map[PAGE_SIZE] = 9;
            map
        })
        .map_err(ProbeError::io("cannot start the probe's writer"))?;
    let seen = resolve_probe_faults(&uffd, &writer, start);
    // Closing the uffd releases the writer if a fault was missed.
    drop(uffd);
    let map = writer
        .join()
        .map_err(|_| ProbeError::Wrong("the probe's writer panicked".into()))?;
    let mut seen = seen?;
    seen.dedup();
    if seen != [0, 1] {
        return Err(ProbeError::Wrong(format!(
            "writes to the armed pages (populated, then zero page) raised faults on pages \
             {seen:?}, expected [0, 1]"
        )));
    }
    if map[0] != 7 || map[PAGE_SIZE] != 9 {
        return Err(ProbeError::Wrong(
            "a write resolved through a write-protect fault was lost".into(),
        ));
    }
    Ok(())
}

/// The probe's fault handler: resolves the write-protect faults of `writer` (for up to 2 s)
/// and returns the pages, counted from `start`, that faulted.
fn resolve_probe_faults<T>(
    uffd: &Uffd,
    writer: &std::thread::JoinHandle<T>,
    start: u64,
) -> Result<Vec<u64>, ProbeError> {
    let page = PAGE_SIZE as u64;
    let mut seen = Vec::new();
    let mut buf = userfaultfd::EventBuffer::new(4);
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !writer.is_finished() && Instant::now() < deadline {
        events.clear();
        match uffd.read_events(&mut buf, &mut events) {
            Ok(0) => std::thread::sleep(Duration::from_micros(100)),
            Ok(_) => {}
            Err(e) => return Err(ProbeError::uffd("reading the probe's userfaultfd")(e)),
        }
        for ev in events.drain(..) {
            if let UffdEvent::WriteFault { addr } = ev {
                let p = page_of(addr);
                seen.push((p - start) / page);
                uffd.unprotect(p, page, true)
                    .map_err(ProbeError::uffd("un-protecting a faulted page"))?;
            }
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_passes_on_this_kernel() {
        if let Err(e) = probe() {
            panic!("the uffd-wp probe failed: {e}");
        }
    }
}
