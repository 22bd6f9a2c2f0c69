//! A bound client's address space as the daemon watches it: the client's userfaultfd, its
//! device client, and the table of ranges it attached (docs/design.md §1, §6). Everything the
//! daemon does to or learns about a client's memory goes through an [`AddressSpace`]: attach
//! and detach, device reads and populate, collection of written pages (sync), and the uffd
//! events that change the address space under the mirrors. Mirror ids given to the client stay
//! stable while the range follows `mremap`; this module knows nothing of sockets or of the
//! wire format.

mod access;
mod attach;
mod events;
mod fences;
mod monitors;
mod sync;
mod table;

#[cfg(test)]
mod tests;

pub use events::{Deferred, EventCounters, Revisit};
pub use monitors::Made as MonitorMade;
pub use sync::SyncStats;
pub use table::Attached;

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::device::{DeviceClient, DeviceError};
use crate::dirty::uffd_wp::Wakes;
use crate::dirty::{ClientDirty, DirtyError, Untracked};
use crate::lock;
use crate::notifier::InvalidateError;
use crate::sys::maps::Maps;
use crate::sys::uffd::{SharedUffd, Uffd, UffdError};
use table::Table;

/// Highest user address plus one that any x86-64/arm64 configuration hands out (56-bit
/// with 5-level paging); anything above is a kernel address and refused outright.
pub const USER_ADDR_END: u64 = 1 << 56;

/// Errors of the operations on a watched address space.
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
    NotTracked(Untracked),
    /// Collecting written pages failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// A monitor could not be made.
    #[error(transparent)]
    Monitor(#[from] crate::monitor::MonitorError),
    /// No live monitor in that slot with that generation.
    #[error("no monitor in slot {slot} with generation {gen}")]
    NoSuchMonitor {
        /// The slot.
        slot: u32,
        /// The generation asked for.
        gen: u64,
    },
}

/// A bound client's address space, as the daemon watches and mirrors it.
#[derive(Debug)]
pub struct AddressSpace {
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
    /// Writers of write-protect faults still to be woken.
    wakes: Wakes,
    /// The client's monitors, once it set them up.
    monitors: Mutex<Option<monitors::Monitors>>,
}

impl AddressSpace {
    /// A client whose uffd already did its `UFFDIO_API`, without dirty tracking.
    pub fn new(
        uffd: Uffd,
        device: DeviceClient,
        pagemap: Option<File>,
        max_mirrors: u32,
    ) -> AddressSpace {
        AddressSpace::with_dirty(
            Arc::new(Mutex::new(Some(uffd))),
            device,
            pagemap,
            max_mirrors,
            Arc::new(ClientDirty::off(Untracked::NotSetUp)),
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
    ) -> AddressSpace {
        AddressSpace {
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
            wakes: Wakes::default(),
            monitors: Mutex::new(None),
        }
    }

    /// The same client, checking mappings and protections in `maps` (attach, sync).
    pub fn with_maps(mut self, maps: Option<Arc<Maps>>) -> AddressSpace {
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

    /// Waits until the events already read have been applied (G1): the event reader reads
    /// and applies under the access lock, and the table follows the client's munmap and
    /// mremap only once applied, while the client's call returns at the read.
    fn after_events_read(&self) {
        drop(self.device.lock_access());
    }

    /// Releases the client (rule 8, G5): everything is invalidated and freed, and the uffd
    /// is closed, which wakes every client thread blocked on an event (G6).
    pub fn release(&self) -> Result<(), WatchError> {
        let r = self.device.release();
        lock(&self.table).by_id.clear();
        let uffd = {
            let _g = self.device.lock_access();
            // Before the uffd closes: from then on an unmap raises no event.
            self.release_monitors();
            lock(&self.uffd).take()
        };
        drop(uffd);
        r.map(|_| ()).map_err(Into::into)
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
