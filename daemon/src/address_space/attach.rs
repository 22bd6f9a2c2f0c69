//! Attach and detach: registering a range with the client's uffd, arming it for dirty
//! tracking, mirroring it in the device, and undoing all of that, each under the access lock
//! so no event of the range slips in between (G1).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use super::table::{self, Attached, Table};
use super::{AddressSpace, WatchError, USER_ADDR_END};
use crate::device::DeviceError;
use crate::dirty::DirtyPolicy;
use crate::lock;
use crate::sys::uffd::{Uffd, UffdError};
use crate::sys::PAGE_SIZE;

/// Bytes write-protected per `UFFDIO_WRITEPROTECT` when a range is armed: between two
/// pieces the attach notices a client that went away (arming fills the page tables of the
/// whole range, milliseconds per GiB).
pub(super) const ARM_CHUNK: u64 = 64 << 20;

/// What one try of [`AddressSpace::attach_locked`] came to.
enum Attempt {
    /// Mirrored as this device mirror.
    Attached(u64),
    /// Events were unread: try again once the reader has applied them.
    Again,
}

impl AddressSpace {
    /// Attaches `addr..addr+len` with the `manual` policy.
    pub fn attach(&self, addr: u64, len: u64) -> Result<u64, WatchError> {
        self.attach_with(addr, len, DirtyPolicy::Manual)
    }

    /// Attaches `addr..addr+len`: registers it with the uffd in write-protect mode, arms it
    /// if the dirty back end reports unarmed pages as written (`pagemap-scan`), and mirrors
    /// it, all under the access lock so no event of the range can slip in between.
    /// `policy` says when its written pages are collected; a policy other than `manual`
    /// needs dirty tracking.
    pub fn attach_with(&self, addr: u64, len: u64, policy: DirtyPolicy) -> Result<u64, WatchError> {
        let bad = |why| WatchError::BadRange { addr, len, why };
        let page = PAGE_SIZE as u64;
        if len == 0 {
            return Err(bad("empty"));
        }
        if addr % page != 0 || len % page != 0 {
            return Err(bad("not page aligned"));
        }
        let end = addr.checked_add(len).ok_or(bad("overflows"))?;
        if end > USER_ADDR_END {
            return Err(bad("not a user address"));
        }
        if !policy.on_sync_only() {
            if let Err(why) = self.dirty.backend() {
                return Err(WatchError::NotTracked(why.clone()));
            }
        }
        let arm = policy != DirtyPolicy::Lazy;
        let (mut t, dev) = self.attach_settled(addr, len, arm)?;
        let id = t.next;
        t.next += 1;
        t.by_id.insert(
            id,
            Attached {
                id,
                addr,
                len,
                dev: Some(dev),
                live_start: addr,
                live_end: end,
                holes: false,
                pages: 0,
                seq: 0,
                notifier: "pending-insert",
                policy,
                armed: arm,
            },
        );
        Ok(id)
    }

    /// Registers, arms and mirrors `addr..addr+len` ([`AddressSpace::attach_locked`]) once no
    /// address-space change of the client is under way, and returns the device mirror with
    /// the table still locked, for the caller to enter it.
    ///
    /// It first waits until every event of a change already under way has been read and
    /// applied (under the access lock, which it then keeps): otherwise an unmap of an old
    /// mapping at this address, delivered late, would retire the new mirror, or an old
    /// mirror not yet retired would look like an overlap. Arming meets the same condition
    /// (`EAGAIN`): undo and wait again, for up to 2 s.
    fn attach_settled(
        &self,
        addr: u64,
        len: u64,
        arm: bool,
    ) -> Result<(MutexGuard<'_, Table>, u64), WatchError> {
        let mut backoff = Duration::from_micros(20);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let guard = self.device.lock_access();
            let pending = match &*lock(&self.uffd) {
                Some(u) => u.events_pending(addr, len),
                None => return Err(WatchError::Released),
            };
            if !pending {
                let t = lock(&self.table);
                match self.attach_locked(&t, addr, len, arm)? {
                    Attempt::Attached(dev) => {
                        drop(guard);
                        return Ok((t, dev));
                    }
                    Attempt::Again => drop(t),
                }
            }
            drop(guard);
            if Instant::now() > deadline {
                return Err(WatchError::Busy);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(5));
        }
    }

    /// The part of an attach done under the access and table locks: checks, registration,
    /// arming (unless `arm` is false: a `lazy` mirror) and the device mirror. Anything but
    /// [`Attempt::Attached`] was undone.
    fn attach_locked(
        &self,
        t: &Table,
        addr: u64,
        len: u64,
        arm: bool,
    ) -> Result<Attempt, WatchError> {
        let end = addr + len;
        self.check_quotas(t, addr, len)?;
        let uffd = lock(&self.uffd);
        let uffd = uffd.as_ref().ok_or(WatchError::Released)?;
        if let Err(e) = uffd.register_wp(addr, len) {
            return Err(self.why_not_registered(addr, len, e));
        }
        // Undone where no other mirror and no monitor needs the registration.
        let undo = |why: &str| {
            let mut covered = self.monitored_parts(addr, end);
            covered.extend(Self::covered(t, addr, end));
            for (s, e) in table::gaps(addr, end, covered) {
                if let Err(u) = uffd.unregister(s, e - s) {
                    tracing::warn!(addr = s, len = e - s, error = %u, "unregister after {why}");
                }
            }
        };
        if arm && self.dirty.arms_on_attach() {
            // Only what no other mirror covers: re-arming a page written since the other
            // mirror's last collection would hide that write from it.
            let fresh = Self::uncovered(t, addr, end);
            if let Err(e) = fresh
                .iter()
                .try_for_each(|&(s, e)| self.arm(uffd, s, e - s))
            {
                undo("a failed arm");
                return match &e {
                    WatchError::Uffd(u) if u.errno() == Some(nix::Error::EAGAIN) => {
                        Ok(Attempt::Again)
                    }
                    _ => Err(e),
                };
            }
        }
        // A device mirror the client unmapped here, whose detach is still queued, is not in
        // the way: the device set it aside when it was retired entirely.
        match self.device.attach(addr, len) {
            Ok(d) => Ok(Attempt::Attached(d)),
            Err(e) => {
                undo("a failed attach");
                Err(e.into())
            }
        }
    }

    /// Refuses an attach of `addr..addr+len` beyond the mirror or address-space quota of the
    /// table `t`, or over a hole in the client's mappings.
    fn check_quotas(&self, t: &Table, addr: u64, len: u64) -> Result<(), WatchError> {
        if t.by_id.len() >= self.max_mirrors as usize {
            return Err(WatchError::TooManyMirrors(self.max_mirrors));
        }
        let attached: u64 = t
            .by_id
            .values()
            .filter(|m| m.dev.is_some())
            .map(|m| m.len)
            .sum();
        let quota = self.attach_quota.load(Relaxed);
        if attached.saturating_add(len) > quota {
            return Err(WatchError::TooMuchAttached {
                len,
                attached,
                quota,
            });
        }
        if let Some(hole) = self
            .maps
            .as_ref()
            .map(|m| m.first_hole(addr, addr + len))
            .transpose()?
            .flatten()
        {
            return Err(WatchError::Hole { addr, len, hole });
        }
        Ok(())
    }

    /// The error of a refused registration, named plainly when the client's mappings say
    /// why (a file on disk).
    pub(super) fn why_not_registered(&self, addr: u64, len: u64, e: UffdError) -> WatchError {
        let disk = matches!(e, UffdError::Invalid { .. })
            && self
                .maps
                .as_ref()
                .and_then(|m| m.at_or_after(addr).ok().flatten())
                .is_some_and(|v| v.disk_file && v.start < addr + len);
        if disk {
            WatchError::DiskFile { addr, len }
        } else {
            e.into()
        }
    }

    /// Write-protects `addr..addr+len` in pieces of [`ARM_CHUNK`], stopping if the client
    /// goes away meanwhile.
    pub(super) fn arm(&self, uffd: &Uffd, addr: u64, len: u64) -> Result<(), WatchError> {
        let end = addr + len;
        let mut at = addr;
        while at < end {
            self.cancelled()?;
            let n = ARM_CHUNK.min(end - at);
            uffd.write_protect(at, n)?;
            at += n;
        }
        Ok(())
    }

    /// Detaches mirror `id`: unregisters what is left of it and frees its shadow.
    ///
    /// The table entry, the device mirror and the registration go under the access lock,
    /// after every event already read (G1) and before any later one: a part another client
    /// thread unmapped (and maybe mapped and attached anew) is never unregistered, and what
    /// is unregistered raises no event any more. The teardown waits for invalidations, so
    /// it runs after the lock is let go.
    pub fn detach(&self, id: u64) -> Result<(), WatchError> {
        let unlinked = {
            let guard = self.device.lock_access();
            let m = lock(&self.table)
                .by_id
                .remove(&id)
                .ok_or(WatchError::NoSuchMirror(id))?;
            let Some(dev) = m.dev else {
                return Ok(());
            };
            let unlinked = guard.unlink(dev)?;
            // The registration stays where another mirror or a monitor still covers the
            // range.
            let t = lock(&self.table);
            for r in unlinked.live() {
                let (start, end) = (r.start(), r.start() + r.len());
                let mut covered = self.monitored_parts(start, end);
                covered.extend(Self::covered(&t, start, end));
                for (s, e) in table::gaps(start, end, covered) {
                    self.with_uffd(|u| {
                        if let Err(e) = u.unregister(s, e - s) {
                            tracing::debug!(mirror = id, error = %e, "unregister on detach");
                        }
                    });
                }
            }
            unlinked
        };
        self.device.tear_down(unlinked);
        Ok(())
    }

    /// Detaches device mirrors whose range is gone (off the event reader's path: it waits for
    /// the invalidations that may still call them).
    pub fn detach_device_mirrors(&self, devs: &[u64]) {
        for &d in devs {
            match self.device.detach(d) {
                Ok(_) | Err(DeviceError::NoSuchMirror(_)) => {}
                Err(e) => tracing::warn!(mirror = d, error = %e, "detaching a retired mirror"),
            }
        }
    }
}
