//! A bound client as the event source and the device see it: its userfaultfd, its device
//! client, and the table of ranges it attached (docs/design.md §1, §6). Mirror ids given to the
//! client stay stable while the range follows `mremap`; this module knows nothing of sockets.

mod fences;

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::DirtyPolicy;
use crate::device::{AccessGuard, DeviceClient, DeviceError};
use crate::dirty::{Backend, ClientDirty, Collected, DirtyError};
use crate::lock;
use crate::notifier::{Event, InvalidateArgs, InvalidateError, Invalidation, Range};
use crate::sys::maps::Maps;
use crate::sys::uffd::{SharedUffd, Uffd, UffdError, UffdEvent};
use crate::sys::PAGE_SIZE;
use crate::trace::TraceRecord;

/// Highest user address plus one that any x86-64/arm64 configuration hands out (56-bit
/// with 5-level paging); anything above is a kernel address and refused outright.
pub const USER_ADDR_END: u64 = 1 << 56;

/// Invalidations of written pages begun per hold of the access lock.
const INVALIDATE_BATCH: usize = 256;

/// Bytes write-protected per `UFFDIO_WRITEPROTECT` when a range is armed: between two
/// pieces the attach notices a client that went away (arming fills the page tables of the
/// whole range, milliseconds per GiB).
const ARM_CHUNK: u64 = 64 << 20;

/// Errors of a bound client's operations.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// Empty, unaligned, overflowing or kernel range.
    #[error("bad range {addr:#x}+{len:#x}: {why}")]
    BadRange {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
        /// Why.
        why: &'static str,
    },
    /// Part of the range is not mapped (no event would tell of a mapping made there later).
    #[error("range {addr:#x}+{len:#x} is not mapped at {hole:#x}")]
    Hole {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
        /// The first address not mapped.
        hole: u64,
    },
    /// The range is mapped, by a mapping this userfaultfd cannot register in write-protect
    /// mode (the kernel needs `WP_ASYNC` to register a file on disk).
    #[error(
        "range {addr:#x}+{len:#x} maps a file on disk, which can be attached only with the \
         pagemap-scan dirty-tracking back end (write-protect registration of a disk file \
         needs asynchronous write-protect)"
    )]
    DiskFile {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The client's mappings could not be read.
    #[error(transparent)]
    Maps(#[from] crate::sys::maps::MapsError),
    /// The mirror quota is used up.
    #[error("mirror quota of {0} ranges reached")]
    TooManyMirrors(u32),
    /// The attach would take the client over its quota of attached address space.
    #[error("attaching {len:#x} bytes would exceed the quota of {quota} bytes of attached address space ({attached} attached)")]
    TooMuchAttached {
        /// Bytes asked for.
        len: u64,
        /// Bytes attached already.
        attached: u64,
        /// The quota.
        quota: u64,
    },
    /// No mirror with that id.
    #[error("no mirror {0}")]
    NoSuchMirror(u64),
    /// The bytes asked for are (no longer) mirrored: unmapped or moved away.
    #[error("address {0:#x} is not mirrored (unmapped or moved)")]
    NotMirrored(u64),
    /// The userfaultfd refused.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The device refused.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The client's address space kept changing for 2 s (its events were not drained).
    #[error("the address space keeps changing; try again")]
    Busy,
    /// The client was released, or its session is closing.
    #[error("client released")]
    Released,
    /// The client has no dirty tracking (why), so it cannot sync or ask for a policy.
    #[error("no dirty tracking for this client: {0}")]
    NotTracked(String),
    /// Collecting written pages failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
}

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

/// One attached range as the client knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// Stable id.
    pub id: u64,
    /// Current first byte (follows `mremap`).
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// The device mirror currently behind it; `None` once it was unmapped entirely.
    pub dev: Option<u64>,
    /// First byte of the part still mapped (a munmap of the head or tail shrinks it).
    pub live_start: u64,
    /// One past the last byte still mapped.
    pub live_end: u64,
    /// A munmap cut a hole inside: the rest stays mirrored but no longer follows mremap.
    pub holes: bool,
    /// Pages currently in the shadow.
    pub pages: u64,
    /// The device notifier's sequence (0 once it is gone).
    pub seq: u64,
    /// The device notifier's state (`active`, `pending-insert`, …; `gone` without one).
    pub notifier: &'static str,
    /// When its written pages are collected.
    pub policy: DirtyPolicy,
}

impl Attached {
    /// The notifier's state and what is left of the range, in a few words.
    pub fn state(&self) -> String {
        let mut s = self.notifier.to_owned();
        if self.dev.is_some()
            && (self.live_start > self.addr || self.live_end < self.addr + self.len)
        {
            s.push_str(", shrunk");
        }
        if self.holes {
            s.push_str(", holes");
        }
        match self.policy {
            DirtyPolicy::Manual => {}
            p => {
                s.push_str(", ");
                s.push_str(&p.to_string());
            }
        }
        s
    }
}

#[derive(Debug, Default)]
struct Table {
    by_id: BTreeMap<u64, Attached>,
    next: u64,
}

/// What [`Watched::sync`] did.
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

/// A bound client.
#[derive(Debug)]
pub struct Watched {
    uffd: SharedUffd,
    device: DeviceClient,
    table: Mutex<Table>,
    pagemap: Option<File>,
    /// The client's mappings (protocol 2 clients hand their `/proc/self/maps` over).
    maps: Option<Arc<Maps>>,
    max_mirrors: u32,
    /// Most bytes of address space attached at once (sum of the mirrors' lengths).
    attach_quota: AtomicU64,
    /// Set when the session closes: long work stops at its next chunk.
    cancelled: AtomicBool,
    /// Fences of announced changes, waiting to be lifted ([`fences`]).
    fences: Mutex<Vec<fences::PendingFence>>,
    /// Set while a job settles the fences.
    settling: AtomicBool,
    counters: EventCounters,
    dirty: Arc<ClientDirty>,
    /// Write-protect faults whose un-protect met `EAGAIN` (events unread): retried after
    /// the next read of events, so the faulting thread is always woken.
    pending_wake: Mutex<Vec<u64>>,
    /// Tests: the next this many un-protects of write faults act as if they met `EAGAIN`
    /// (the kernel's window for that is a race between two client threads).
    #[cfg(test)]
    defer_wakes: std::sync::atomic::AtomicU32,
}

/// What one try of [`Watched::attach_locked`] came to.
enum Attempt {
    /// Mirrored as this device mirror.
    Attached(u64),
    /// Events were unread: try again once the reader has applied them.
    Again,
}

/// What [`Watched::read_events`] hands back for the caller to do off the reader's path.
#[derive(Debug, Default)]
pub struct Deferred {
    /// Finish passes (G1: only the starts had to run before the next read).
    pub finishes: Vec<Invalidation>,
    /// Device mirrors whose range is gone: detach them (waits for invalidations).
    pub detach: Vec<u64>,
}

impl Watched {
    /// A client whose uffd already did its `UFFDIO_API`, without dirty tracking.
    pub fn new(
        uffd: Uffd,
        device: DeviceClient,
        pagemap: Option<File>,
        max_mirrors: u32,
    ) -> Watched {
        Watched::with_dirty(
            Arc::new(Mutex::new(Some(uffd))),
            device,
            pagemap,
            max_mirrors,
            Arc::new(ClientDirty::off("not set up")),
        )
    }

    /// A client whose uffd (shared with its memory source when that arms pages, `uffd-wp`)
    /// already did its `UFFDIO_API` with the features `dirty`'s back end needs.
    pub fn with_dirty(
        uffd: SharedUffd,
        device: DeviceClient,
        pagemap: Option<File>,
        max_mirrors: u32,
        dirty: Arc<ClientDirty>,
    ) -> Watched {
        Watched {
            uffd,
            device,
            table: Mutex::new(Table {
                by_id: BTreeMap::new(),
                next: 1,
            }),
            pagemap,
            maps: None,
            max_mirrors,
            attach_quota: AtomicU64::new(u64::MAX),
            cancelled: AtomicBool::new(false),
            fences: Mutex::new(Vec::new()),
            settling: AtomicBool::new(false),
            counters: EventCounters::default(),
            dirty,
            pending_wake: Mutex::new(Vec::new()),
            #[cfg(test)]
            defer_wakes: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// The same client, checking mappings and protections in `maps` (attach, sync).
    pub fn with_maps(mut self, maps: Option<Arc<Maps>>) -> Watched {
        self.maps = maps;
        self
    }

    /// The client's dirty tracking.
    pub fn dirty(&self) -> &ClientDirty {
        &self.dirty
    }

    /// The device client.
    pub fn device(&self) -> &DeviceClient {
        &self.device
    }

    /// False once the client's address space is gone (it exited or `exec`ed while its
    /// session lives on in another process): the session must end.
    pub fn alive(&self) -> bool {
        self.device.source_alive()
    }

    /// Sets the most address space the client may have attached at once.
    pub fn set_attach_quota(&self, bytes: u64) {
        self.attach_quota.store(bytes, Relaxed);
    }

    /// Asks long work of this client (arming, populating, collecting) to stop at its next
    /// chunk: the session is closing and nobody waits for the answer.
    pub fn cancel(&self) {
        self.cancelled.store(true, Relaxed);
    }

    fn cancelled(&self) -> Result<(), WatchError> {
        if self.cancelled.load(Relaxed) {
            Err(WatchError::Released)
        } else {
            Ok(())
        }
    }

    /// Event counters.
    pub fn counters(&self) -> &EventCounters {
        &self.counters
    }

    /// The client's pagemap fd, if it handed one over (dirty tracking).
    pub fn pagemap(&self) -> Option<&File> {
        self.pagemap.as_ref()
    }

    /// Runs `f` on the uffd unless the client was released.
    pub fn with_uffd<R>(&self, f: impl FnOnce(&Uffd) -> R) -> Option<R> {
        lock(&self.uffd).as_ref().map(f)
    }

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
        if policy != DirtyPolicy::Manual {
            if let Err(why) = self.dirty.backend() {
                return Err(WatchError::NotTracked(why.to_owned()));
            }
        }
        // Wait until every event of an address-space change already under way has been read
        // and applied (under the access lock, which we then keep): otherwise an unmap of an
        // old mapping at this address, delivered late, would retire the new mirror, or an
        // old mirror not yet retired would look like an overlap. Arming meets the same
        // condition (`EAGAIN`): undo and wait again.
        let mut backoff = Duration::from_micros(20);
        let deadline = Instant::now() + Duration::from_secs(2);
        let (guard, mut t, dev) = loop {
            let guard = self.device.lock_access();
            let pending = match &*lock(&self.uffd) {
                Some(u) => u.events_pending(addr, len),
                None => return Err(WatchError::Released),
            };
            if !pending {
                let t = lock(&self.table);
                match self.attach_locked(&t, addr, len)? {
                    Attempt::Attached(dev) => break (guard, t, dev),
                    Attempt::Again => drop(t),
                }
            }
            drop(guard);
            if Instant::now() > deadline {
                return Err(WatchError::Busy);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(5));
        };
        drop(guard);
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
            },
        );
        Ok(id)
    }

    /// The part of an attach done under the access and table locks: checks, registration,
    /// arming and the device mirror. Anything but [`Attempt::Attached`] was undone.
    fn attach_locked(&self, t: &Table, addr: u64, len: u64) -> Result<Attempt, WatchError> {
        let end = addr + len;
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
            .map(|m| m.first_hole(addr, end))
            .transpose()?
            .flatten()
        {
            return Err(WatchError::Hole { addr, len, hole });
        }
        let uffd = lock(&self.uffd);
        let uffd = uffd.as_ref().ok_or(WatchError::Released)?;
        if let Err(e) = uffd.register_wp(addr, len) {
            return Err(self.why_not_registered(addr, len, e));
        }
        let undo = |why: &str| {
            if let Err(u) = uffd.unregister(addr, len) {
                tracing::warn!(addr, len, error = %u, "unregister after {why}");
            }
        };
        if self.dirty.arms_on_attach() {
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

    /// The error of a refused registration, named plainly when the client's mappings say
    /// why (a file on disk).
    fn why_not_registered(&self, addr: u64, len: u64, e: UffdError) -> WatchError {
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

    /// The parts of `start..end` that no live mirror of `t` covers, in address order.
    fn uncovered(t: &Table, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut covered: Vec<(u64, u64)> = t
            .by_id
            .values()
            .filter(|m| m.dev.is_some())
            .map(|m| (m.live_start.max(start), m.live_end.min(end)))
            .filter(|(s, e)| s < e)
            .collect();
        covered.sort_unstable();
        let mut out = Vec::new();
        let mut at = start;
        for (s, e) in covered {
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Write-protects `addr..addr+len` in pieces of [`ARM_CHUNK`], stopping if the client
    /// goes away meanwhile.
    fn arm(&self, uffd: &Uffd, addr: u64, len: u64) -> Result<(), WatchError> {
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
            // The registration stays where another mirror still covers the range.
            let t = lock(&self.table);
            for r in unlinked.live() {
                for (s, e) in Self::uncovered(&t, r.start(), r.start() + r.len()) {
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

    /// Waits until the events already read have been applied (G1): the event reader reads
    /// and applies under the access lock, and the table follows the client's munmap and
    /// mremap only once applied, while the client's call returns at the read.
    fn after_events_read(&self) {
        drop(self.device.lock_access());
    }

    /// The client address of `offset..offset+len` in mirror `id`, as of every event read
    /// before the call (a mirror moved by an mremap the client saw return has its new
    /// address).
    pub fn resolve(&self, id: u64, offset: u64, len: u64) -> Result<u64, WatchError> {
        self.after_events_read();
        let t = lock(&self.table);
        let m = t.by_id.get(&id).ok_or(WatchError::NoSuchMirror(id))?;
        offset
            .checked_add(len)
            .filter(|e| *e <= m.len)
            .ok_or(WatchError::BadRange {
                addr: m.addr.wrapping_add(offset),
                len,
                why: "outside the mirror",
            })?;
        let addr = m.addr.wrapping_add(offset);
        if m.dev.is_none() || addr < m.live_start || addr + len > m.live_end {
            return Err(WatchError::NotMirrored(addr));
        }
        Ok(addr)
    }

    /// A device read of `len` bytes at `offset` of mirror `id`; under the `strict` policy
    /// the pages read are collected first, so the read returns what the client wrote.
    pub fn read(&self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, WatchError> {
        let addr = self.resolve(id, offset, len as u64)?;
        let strict = lock(&self.table)
            .by_id
            .get(&id)
            .is_some_and(|m| m.policy == DirtyPolicy::Strict);
        if strict && len > 0 {
            let page = PAGE_SIZE as u64;
            let start = addr - addr % page;
            let end = (addr + len as u64).next_multiple_of(page);
            self.sync_ranges(&[(start, end)], 1)?;
        }
        if let Ok(r) = Range::new(addr, len as u64) {
            self.observe_fences(r);
        }
        self.device.read(addr, len).map_err(not_mirrored)
    }

    /// Collects the pages the client wrote in mirror `id` (every mirror if `None`) and
    /// invalidates them (event `SoftDirty`, two-pass), so the next device access re-mirrors
    /// them.
    pub fn sync(&self, id: Option<u64>) -> Result<SyncStats, WatchError> {
        if let Err(why) = self.dirty.backend() {
            return Err(WatchError::NotTracked(why.to_owned()));
        }
        self.after_events_read();
        let ranges: Vec<(u64, u64)> = {
            let t = lock(&self.table);
            if let Some(id) = id {
                if !t.by_id.contains_key(&id) {
                    return Err(WatchError::NoSuchMirror(id));
                }
            }
            t.by_id
                .values()
                .filter(|m| id.is_none_or(|i| i == m.id) && m.dev.is_some())
                .map(|m| (m.live_start, m.live_end))
                .filter(|(s, e)| s < e)
                .collect()
        };
        self.sync_ranges(&ranges, ranges.len() as u32)
    }

    fn sync_ranges(&self, ranges: &[(u64, u64)], mirrors: u32) -> Result<SyncStats, WatchError> {
        let backend = self
            .dirty
            .backend()
            .map_err(|why| WatchError::NotTracked(why.to_owned()))?;
        self.dirty.bump(|c| &c.syncs, 1);
        let mut found = Vec::new();
        let mut guard = self.dirty.lock();
        let collected =
            self.dirty
                .collect(&mut guard, self.pagemap.as_ref(), ranges, &mut found)?;
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

    /// Faults `offset..offset+len` of mirror `id` into the shadow; returns the pages the
    /// mirror then has.
    pub fn populate(&self, id: u64, offset: u64, len: u64) -> Result<u64, WatchError> {
        let addr = self.resolve(id, offset, len)?;
        // Nothing is installed in a fenced range: wait for its fences to lift first.
        if let Ok(r) = Range::new(addr, len) {
            self.settle_over(r);
        }
        let end = addr + len;
        let mut at = addr;
        while at < end {
            self.cancelled()?;
            let n = ARM_CHUNK.min(end - at);
            self.device.populate(at, n).map_err(not_mirrored)?;
            at += n;
        }
        Ok(self
            .list()
            .iter()
            .find(|m| m.id == id)
            .map_or(0, |m| m.pages))
    }

    /// The attached ranges, with their shadow pages.
    pub fn list(&self) -> Vec<Attached> {
        let dev = self.device.mirror_list();
        lock(&self.table)
            .by_id
            .values()
            .map(|m| {
                let d = m.dev.and_then(|d| dev.iter().find(|i| i.id == d));
                Attached {
                    pages: d.map_or(0, |i| i.pages),
                    seq: d.map_or(0, |i| i.seq),
                    notifier: d.map_or("gone", |i| i.state),
                    ..*m
                }
            })
            .collect()
    }

    /// The attached range that contains `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<Attached> {
        self.after_events_read();
        lock(&self.table)
            .by_id
            .values()
            .find(|m| m.dev.is_some() && (m.live_start..m.live_end).contains(&addr))
            .copied()
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

    /// Number of attached ranges.
    pub fn len(&self) -> usize {
        lock(&self.table).by_id.len()
    }

    /// True if nothing is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

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
        self.counters.batches.fetch_add(1, Relaxed);
        for ev in scratch.drain(..) {
            self.apply(&guard, ev, out);
        }
        self.retry_wakes_locked(&guard, out);
        Ok(n)
    }

    /// Un-protects and wakes `page`; on `EAGAIN` (events unread) remembers it for after the
    /// next read of events (the unread event is what wakes the reader again).
    fn unprotect_and_wake(&self, page: u64) {
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
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
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

    /// [`Watched::retry_wakes`] under the access lock `guard`.
    ///
    /// The fault's own invalidation has ended by now, so the device may have faulted the
    /// page in again meanwhile: arming it changed nothing (it was still protected) and the
    /// copy holds the bytes from before the blocked write. So the page is un-protected
    /// *without* waking, invalidated again (uffd-wp), and only then is the writer woken: no
    /// copy taken before the write survives it, and none taken after it lacks protection.
    fn retry_wakes_locked(&self, guard: &AccessGuard<'_>, out: &mut Deferred) -> bool {
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
                // A write to a page the device may hold (uffd-wp tracking): invalidate it
                // before the write can complete, then let the writer go. The page is armed
                // again when the device next faults it in.
                self.counters.faults.fetch_add(1, Relaxed);
                self.dirty.wp_fault();
                let page = addr & !(PAGE_SIZE as u64 - 1);
                if let Ok(r) = Range::new(page, PAGE_SIZE as u64) {
                    self.invalidate(guard, r, Event::SoftDirty, out);
                }
                self.unprotect_and_wake(page);
            }
            UffdEvent::WriteFault { addr } | UffdEvent::OtherFault { addr } => {
                self.counters.faults.fetch_add(1, Relaxed);
                tracing::debug!(addr, "unexpected userfaultfd fault resolved");
                self.unprotect_and_wake(addr & !(PAGE_SIZE as u64 - 1));
            }
        }
    }

    fn invalidate(&self, guard: &AccessGuard<'_>, range: Range, event: Event, out: &mut Deferred) {
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
                    let new = to + (ls - start);
                    if !out.detach.contains(&dev) {
                        out.detach.push(dev);
                    }
                    match self.device.attach(new, le - ls) {
                        Ok(d) => {
                            tracing::debug!(
                                mirror = m.id,
                                from = ls,
                                to = new,
                                "mirror follows mremap"
                            );
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
                _ if inside => m.dev = None,
                // Partly gone: the device refuses the retired part, the rest stays mirrored.
                _ => {
                    if start <= ls {
                        m.live_start = end.min(le);
                    } else if end >= le {
                        m.live_end = start.max(ls);
                    } else {
                        m.holes = true;
                    }
                    if m.live_start >= m.live_end {
                        m.dev = None;
                    }
                }
            }
        }
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

    /// Releases the client (rule 8, G5): everything is invalidated and freed, and the uffd
    /// is closed, which wakes every client thread blocked on an event (G6).
    pub fn release(&self) -> Result<(), WatchError> {
        let r = self.device.release();
        lock(&self.table).by_id.clear();
        let uffd = {
            let _g = self.device.lock_access();
            lock(&self.uffd).take()
        };
        drop(uffd);
        r.map(|_| ()).map_err(Into::into)
    }
}

impl crate::dirty::periodic::PeriodicTarget for Watched {
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

fn not_mirrored(e: DeviceError) -> WatchError {
    match e {
        DeviceError::NotMirrored { addr } | DeviceError::NotMapped { addr } => {
            WatchError::NotMirrored(addr)
        }
        DeviceError::Invalidate(InvalidateError::Released) | DeviceError::Notifier(_) => {
            WatchError::Released
        }
        e => WatchError::Device(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::device::{Device, DeviceConfig};
    use crate::dirty::uffd_wp::ArmingSource;
    use crate::source::{MemorySource, ProcessVmSource};
    use crate::sys::uffd::features;
    use std::mem::ManuallyDrop;

    type Mapping = ManuallyDrop<memmap2::MmapMut>;

    /// A client without dirty tracking on this process's own memory, on a device made
    /// with `cfg` (returned too, to keep alive beside it).
    fn plain_watched(cfg: &DeviceConfig) -> (Arc<Watched>, Device) {
        let (uffd, _) = Uffd::create().unwrap();
        uffd.api(features::EVENT_UNMAP | features::EVENT_REMOVE | features::EVENT_REMAP)
            .unwrap();
        uffd.set_nonblocking().unwrap();
        let dev = Device::new(cfg).unwrap();
        let source = Arc::new(ProcessVmSource::new(std::process::id() as i32));
        let w = Arc::new(Watched::new(uffd, dev.client(source, 1 << 20), None, 8));
        (w, dev)
    }

    /// Maps fresh anonymous memory over `addr..addr+len` in one call, on another thread (an
    /// unmap event of a registered range blocks it until read), serving events meanwhile.
    fn map_over(w: &Watched, addr: u64, len: usize, out: &mut Deferred) {
        let mapper = std::thread::spawn(move || {
            // SAFETY: the tests call this on mappings of their own, which they no longer
            // touch through other handles.
            let p = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            p as u64
        });
        let mut buf = userfaultfd::EventBuffer::new(8);
        let mut scratch = Vec::new();
        while !mapper.is_finished() {
            w.read_events(&mut buf, &mut scratch, out).unwrap();
            std::thread::yield_now();
        }
        // One more read: the event that released the mapper may not be applied yet.
        w.read_events(&mut buf, &mut scratch, out).unwrap();
        assert_eq!(mapper.join().unwrap(), addr, "mapped over the range");
    }

    /// A client with uffd-wp dirty tracking on this process's own memory (and the device,
    /// to keep alive beside it).
    fn uffd_wp_watched() -> (Watched, Device) {
        let (uffd, user_mode_only) = Uffd::create().unwrap();
        assert!(!user_mode_only, "the tests run as root (docs/design.md §7)");
        uffd.api(
            Backend::UffdWp.uffd_features()
                | features::EVENT_UNMAP
                | features::EVENT_REMOVE
                | features::EVENT_REMAP,
        )
        .unwrap();
        uffd.set_nonblocking().unwrap();
        let uffd: SharedUffd = Arc::new(Mutex::new(Some(uffd)));
        let dirty = Arc::new(ClientDirty::new(Ok(Backend::UffdWp), None, Arc::default()));
        let source: Arc<dyn MemorySource> = Arc::new(ArmingSource::new(
            Arc::new(ProcessVmSource::new(std::process::id() as i32)),
            Arc::clone(&uffd),
            Arc::clone(&dirty),
        ));
        let dev = Device::new(&DeviceConfig::default()).unwrap();
        let w = Watched::with_dirty(uffd, dev.client(source, 1 << 20), None, 8, dirty);
        (w, dev)
    }

    /// A client thread writing `byte` at `offset` of `map` (it may block in a write-protect
    /// fault); the mapping comes back once the write is done.
    fn write_in_thread(
        mut map: Mapping,
        offset: usize,
        byte: u8,
    ) -> crossbeam_channel::Receiver<Mapping> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            map[offset] = byte;
            let _ = tx.send(map);
        });
        rx
    }

    /// Waits for the writer of [`write_in_thread`]; fails after 20 s (a writer nobody
    /// woke) instead of hanging.
    fn written(writer: &crossbeam_channel::Receiver<Mapping>) -> Mapping {
        writer
            .recv_timeout(Duration::from_secs(20))
            .expect("the writer was never woken")
    }

    /// The event reader's part: reads until some events came (a test that expects events
    /// fails after 20 s instead of spinning).
    fn read_some_events(
        w: &Watched,
        buf: &mut userfaultfd::EventBuffer,
        scratch: &mut Vec<UffdEvent>,
        out: &mut Deferred,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while w.read_events(buf, scratch, out).unwrap() == 0 {
            assert!(Instant::now() < deadline, "no userfaultfd event came");
            std::thread::yield_now();
        }
    }

    /// uffd-wp: when the un-protect of a write fault has to wait (`EAGAIN`), the fault's
    /// invalidation ends first and the device may mirror the page again (arming it is a
    /// no-op: it is still protected) before the writer is let go. The retry must invalidate
    /// it again before waking the writer, or the copy from before the write survives it
    /// with nothing armed to report the write. Fails if `retry_wakes` just un-protects and
    /// wakes.
    #[test]
    fn a_deferred_wake_invalidates_a_page_mirrored_again_before_the_write() {
        crate::test_support::needs_full_userfaultfd!();
        let page = PAGE_SIZE as u64;
        let (w, _dev) = uffd_wp_watched();
        // Unmapping a registered range blocks until its event is read: if an assertion
        // fails, the mapping leaks instead of hanging the unwinding.
        let mut map = ManuallyDrop::new(memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap());
        map.fill(1);
        let addr = map.as_ptr() as u64;
        let id = w.attach(addr, 4 * page).unwrap();
        assert_eq!(w.read(id, 0, 8).unwrap(), vec![1; 8], "mirrored and armed");

        // The fault's own un-protect and the retry at the end of that read of events.
        w.defer_wakes.store(2, Relaxed);
        let writer = write_in_thread(map, 0, 2);
        // The reader's part: read the write fault, invalidate the page, defer the wake.
        let mut buf = userfaultfd::EventBuffer::new(8);
        let mut scratch = Vec::new();
        let mut out = Deferred::default();
        read_some_events(&w, &mut buf, &mut scratch, &mut out);
        assert!(w.has_pending_wakes());
        drop(std::mem::take(&mut out.finishes));
        // The device mirrors the page again while the writer still waits.
        assert_eq!(w.read(id, 0, 8).unwrap(), vec![1; 8]);
        // The retry lets the writer go.
        assert!(!w.retry_wakes(&mut out), "nothing left pending");
        drop(std::mem::take(&mut out.finishes));
        let map = written(&writer);
        assert_eq!(map[0], 2);
        assert_eq!(
            w.read(id, 0, 8).unwrap(),
            [&[2u8][..], &[1; 7]].concat(),
            "the device read after the write returned the copy taken before it"
        );
        // And the page is armed again: the next write is seen.
        let before = w.dirty().counters().wp_faults.load(Relaxed);
        let writer = write_in_thread(map, 1, 3);
        read_some_events(&w, &mut buf, &mut scratch, &mut out);
        drop(std::mem::take(&mut out.finishes));
        let map = written(&writer);
        assert_eq!(w.dirty().counters().wp_faults.load(Relaxed), before + 1);
        assert_eq!(w.read(id, 0, 2).unwrap(), vec![2, 3]);
        w.release().unwrap();
        drop(ManuallyDrop::into_inner(map));
    }

    /// A detach unregisters its range before it lets go of the access lock, not after the
    /// teardown (which waits a flush, here 1 s): a part of the range that another client
    /// thread maps anew and attaches meanwhile keeps its registration. Unregistering late
    /// silenced the new mirror's events (G1).
    #[test]
    fn a_slow_detach_leaves_a_range_attached_anew_registered() {
        let page = PAGE_SIZE as u64;
        let (w, _dev) = plain_watched(&DeviceConfig {
            flush_latency: Duration::from_secs(1),
            ..DeviceConfig::default()
        });
        // Leaked, not unmapped, if an assertion fails (see above).
        let map = ManuallyDrop::new(memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap());
        let addr = map.as_ptr() as u64;
        let id = w.attach(addr, 4 * page).unwrap();
        w.read(id, 0, 8).unwrap();
        let detacher = {
            let w = Arc::clone(&w);
            std::thread::spawn(move || w.detach(id))
        };
        while w.list().iter().any(|m| m.id == id) {
            std::thread::yield_now();
        }
        // Another thread maps fresh memory over the first page and attaches it.
        let mut out = Deferred::default();
        map_over(&w, addr, PAGE_SIZE, &mut out);
        drop(std::mem::take(&mut out.finishes));
        let again = w.attach(addr, page).unwrap();
        detacher.join().unwrap().unwrap();
        assert_eq!(
            w.with_uffd(|u| u.unprotect(addr, page, false).map_err(|e| e.errno())),
            Some(Ok(())),
            "the range attached anew is still registered"
        );
        w.detach(again).unwrap();
        w.release().unwrap();
        drop(ManuallyDrop::into_inner(map));
    }

    /// An attach where the client unmapped a mirror whose device detach is still queued
    /// neither fails nor waits for that detach. The detach waits for the client's open
    /// invalidations, and one of them may need the access lock to end (a sync begins its
    /// invalidations in batches, each under the lock, and finishes them all after the
    /// last): an attach that detached the old mirror under the lock deadlocked with the
    /// sync and the client's event reader. The stand-in for the sync waits 200 ms before
    /// it needs the lock; the test fails by a 20 s deadline, not by hanging.
    #[test]
    fn attach_over_a_retired_mirror_waits_for_no_detach() {
        let page = PAGE_SIZE as u64;
        let (w, _dev) = plain_watched(&DeviceConfig::default());
        // Leaked, not unmapped, if an assertion fails (see above).
        let keep = ManuallyDrop::new(memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap());
        let other = w.attach(keep.as_ptr() as u64, 4 * page).unwrap();
        let gone = ManuallyDrop::new(memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap());
        let addr = gone.as_ptr() as u64;
        w.attach(addr, 4 * page).unwrap();
        // The client maps something new over it in one call (no window for another test
        // thread to take the address): the old mapping's unmap event retires the device
        // mirror and queues its detach, which this test never runs.
        let mut out = Deferred::default();
        map_over(&w, addr, 4 * PAGE_SIZE, &mut out);
        let again = addr as *mut libc::c_void;
        assert_eq!(out.detach.len(), 1, "a retired mirror waits for its detach");
        drop(std::mem::take(&mut out.finishes));
        // A sync stand-in: an invalidation begun under the lock, ended only after taking
        // the lock again.
        let range = Range::new(keep.as_ptr() as u64, page).unwrap();
        let open = w
            .device()
            .lock_access()
            .begin_invalidate(InvalidateArgs::new(range, Event::SoftDirty))
            .unwrap();
        let sync = {
            let w = Arc::clone(&w);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                drop(w.device().lock_access());
                open.finish();
            })
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let attacher = {
            let w = Arc::clone(&w);
            std::thread::spawn(move || {
                let _ = tx.send(w.attach(addr, 4 * page));
            })
        };
        let attached = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("attach deadlocked with an open invalidation that needs the access lock");
        assert!(attached.is_ok(), "{attached:?}");
        attacher.join().unwrap();
        sync.join().unwrap();
        w.detach(other).unwrap();
        w.release().unwrap();
        // SAFETY: the mapping made above, unused now.
        unsafe { libc::munmap(again, 4 * PAGE_SIZE) };
        drop(ManuallyDrop::into_inner(keep));
    }
}
