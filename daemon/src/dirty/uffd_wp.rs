//! The `uffd-wp` back end (docs/design.md §6), the universal fallback (Linux 5.7+; 6.4+ for
//! `WP_UNPOPULATED`): a page is write-protected ("armed") just before the device copies it
//! ([`ArmingSource`]), so a later write by the client raises a synchronous write-protect
//! fault; the event reader invalidates the page (event `SoftDirty`, start pass under the
//! access lock), then un-protects it and wakes the writer (`watched.rs`). The page is armed
//! again when the device next faults it in. Nothing has to be scanned, and only pages the
//! device mirrors cost the client a fault when written.
//!
//! Only on a uffd created without `UFFD_USER_MODE_ONLY`: on a user-mode-only uffd a *kernel*
//! write to a protected page (e.g. `read(2)` into it) fails with `EFAULT` instead of waiting.
//! `WP_UNPOPULATED` is required: without it, arming a page not populated yet does nothing,
//! the device's read maps the zero page unprotected, and the client's first write to it
//! would leave no trace.

use crate::lock;
use std::io::IoSliceMut;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Backend, ClientDirty};
use crate::source::{MemorySource, SourceError};
use crate::sys::uffd::{features, SharedUffd, UffdEvent};
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

/// Tries the back end on two scratch pages of this process, one populated and one not:
/// arm both, read the second (the zero page), then write both from another thread; each
/// write must raise a write-protect fault, which this thread resolves.
pub fn probe() -> Result<(), String> {
    let (uffd, granted) = Backend::UffdWp.probe_uffd("UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+)")?;
    if granted & features::PAGEFAULT_FLAG_WP == 0 {
        return Err("the kernel does not offer write-protect faults (Linux 5.7+)".into());
    }
    uffd.set_nonblocking().map_err(|e| e.to_string())?;
    let page = PAGE_SIZE as u64;
    let mut map = memmap2::MmapMut::map_anon(2 * PAGE_SIZE).map_err(|e| format!("mmap: {e}"))?;
    map[..PAGE_SIZE].fill(1);
    let start = map.as_ptr() as u64;
    uffd.register_wp(start, 2 * page)
        .map_err(|e| format!("UFFDIO_REGISTER (write-protect mode) failed: {e}"))?;
    if let Err(e) = uffd.write_protect(start, 2 * page) {
        return Err(format!("UFFDIO_WRITEPROTECT failed: {e}"));
    }
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
        .map_err(|e| format!("cannot start the probe's writer: {e}"))?;
    let mut seen = Vec::new();
    let mut buf = userfaultfd::EventBuffer::new(4);
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !writer.is_finished() && Instant::now() < deadline {
        events.clear();
        match uffd.read_events(&mut buf, &mut events) {
            Ok(0) => std::thread::sleep(Duration::from_micros(100)),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the probe's userfaultfd failed: {e}")),
        }
        for ev in events.drain(..) {
            if let UffdEvent::WriteFault { addr } = ev {
                let p = addr & !(page - 1);
                seen.push((p - start) / page);
                if let Err(e) = uffd.unprotect(p, page, true) {
                    return Err(format!("un-protecting a faulted page failed: {e}"));
                }
            }
        }
    }
    // Closing the uffd releases the writer if a fault was missed.
    drop(uffd);
    let map = writer
        .join()
        .map_err(|_| "the probe's writer panicked".to_owned())?;
    seen.dedup();
    if seen != [0, 1] {
        return Err(format!(
            "writes to the armed pages (populated, then zero page) raised faults on pages \
             {seen:?}, expected [0, 1]"
        ));
    }
    if map[0] != 7 || map[PAGE_SIZE] != 9 {
        return Err("a write resolved through a write-protect fault was lost".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_passes_on_this_kernel() {
        assert_eq!(probe(), Ok(()));
    }
}
