//! Dirty tracking (docs/design.md §6): finds the pages a client wrote after they were
//! mirrored, so they can be invalidated (event `SoftDirty`, two-pass) and re-mirrored on the
//! next device access. Without it the shadow follows the client's mappings but not their
//! contents.
//!
//! Three back ends, chosen at start-up by really trying each one on a scratch mapping of the
//! daemon's own ([`Selection::probe`]), never by kernel version:
//!
//! * [`pagemap_scan`]: `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`
//!   finds written pages and re-arms them in one call, through the pagemap fd the client
//!   handed over (no ptrace right needed; safe on a `UFFD_USER_MODE_ONLY` uffd);
//! * [`soft_dirty`]: `clear_refs` "4" + pagemap bit 55 (`CONFIG_MEM_SOFT_DIRTY`);
//! * [`uffd_wp`]: synchronous write-protect faults, handled by the event reader (invalidate,
//!   un-protect, wake); pages are armed as the device mirrors them. Only on a uffd created
//!   without `UFFD_USER_MODE_ONLY` (a kernel write to a protected page would fail with
//!   `EFAULT` otherwise).
//!
//! Which written pages are collected when is the attach's policy ([`DirtyPolicy`]): on
//! `Sync`, before each device read (`strict`) or on one daemon-wide timer ([`periodic`]).
//!
//! The module knows neither the wire format nor the configuration file: the back end, the
//! daemon's choice ([`DirtyTracking`]) and the policy are its own types, which the config
//! parses into and the server converts to and from the protocol's (`server/convert.rs`).

pub mod pagemap_scan;
pub mod periodic;
mod policy;
mod selection;
pub mod soft_dirty;
pub mod uffd_wp;

pub use policy::DirtyPolicy;
pub use selection::{Backend, DirtyTracking, ProbeError, Selection, Untracked};

use crate::lock;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::sys::pagemap::PageRegion;

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A forced back end does not work on this machine (the daemon refuses to start).
    #[error("--dirty-tracking {backend} is unavailable here: {reason}")]
    Unavailable {
        /// The back end.
        backend: &'static str,
        /// What the probe found.
        reason: ProbeError,
    },
    /// This client has no back end it can use.
    #[error("no dirty tracking for this client: {0}")]
    NotTracked(Untracked),
    /// `PAGEMAP_SCAN` failed.
    #[error("PAGEMAP_SCAN of {start:#x}..{end:#x} failed")]
    Scan {
        /// First byte.
        start: u64,
        /// End.
        end: u64,
        /// The kernel's error.
        #[source]
        source: nix::Error,
    },
    /// Reading the client's pagemap failed.
    #[error("reading the client's pagemap failed")]
    Pagemap(#[source] std::io::Error),
    /// Writing the client's `clear_refs` failed.
    #[error("clearing the client's soft-dirty bits failed")]
    ClearRefs(#[source] std::io::Error),
}

/// Counters of dirty tracking (daemon-wide in `status`, per client in `stats`).
#[derive(Debug, Default)]
pub struct DirtyCounters {
    /// Collections (scans) run.
    pub scans: AtomicU64,
    /// Pages whose written state was looked at.
    pub pages_scanned: AtomicU64,
    /// Pages found written (and invalidated); for `uffd-wp`, pages whose write faults were
    /// handled.
    pub pages_dirty: AtomicU64,
    /// Time spent scanning and re-arming, ns.
    pub scan_ns: AtomicU64,
    /// Write-protect faults handled (`uffd-wp`).
    pub wp_faults: AtomicU64,
    /// Ranges write-protected as the device mirrored them (`uffd-wp`).
    pub arms: AtomicU64,
    /// Syncs asked for (`Sync`, `SyncPid`, strict reads, the periodic timer).
    pub syncs: AtomicU64,
    /// Un-protects of faulted pages deferred because events were unread (`EAGAIN`).
    pub wake_retries: AtomicU64,
}

impl DirtyCounters {
    /// The counters as `(prefix + name, value)`.
    pub fn snapshot(&self, prefix: &str) -> Vec<(String, u64)> {
        [
            ("scans", &self.scans),
            ("pages_scanned", &self.pages_scanned),
            ("pages_dirty", &self.pages_dirty),
            ("scan_ns", &self.scan_ns),
            ("wp_faults", &self.wp_faults),
            ("arms", &self.arms),
            ("syncs", &self.syncs),
            ("wake_retries", &self.wake_retries),
        ]
        .into_iter()
        .map(|(n, c)| (format!("{prefix}{n}"), c.load(Relaxed)))
        .collect()
    }
}

/// What one collection found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Pages looked at.
    pub pages_scanned: u64,
    /// Pages found written.
    pub pages_dirty: u64,
    /// Runs of written pages.
    pub regions: u64,
    /// Time spent, ns.
    pub scan_ns: u64,
}

/// A client's dirty tracking: its back end (or why it has none), the lock that serialises
/// its collections (a collection that found nothing must not let a read overtake another
/// collection's invalidations), and its counters.
#[derive(Debug)]
pub struct ClientDirty {
    backend: Result<Backend, Untracked>,
    clear_refs: Option<File>,
    scan: Mutex<Vec<PageRegion>>,
    counters: DirtyCounters,
    global: Arc<DirtyCounters>,
    faults_since_sync: AtomicU64,
}

/// Serialises a client's collections; hold it until the invalidations of what was found
/// have begun.
#[derive(Debug)]
pub struct CollectGuard<'a> {
    buf: MutexGuard<'a, Vec<PageRegion>>,
}

impl ClientDirty {
    /// Tracking with `backend` (or none, and why), counting into `global` too. `clear_refs`
    /// is the client's `/proc/PID/clear_refs`, opened for writing (`soft-dirty` only).
    pub fn new(
        backend: Result<Backend, Untracked>,
        clear_refs: Option<File>,
        global: Arc<DirtyCounters>,
    ) -> ClientDirty {
        ClientDirty {
            backend,
            clear_refs,
            scan: Mutex::new(Vec::new()),
            counters: DirtyCounters::default(),
            global,
            faults_since_sync: AtomicU64::new(0),
        }
    }

    /// No tracking, because `why`.
    pub fn off(why: Untracked) -> ClientDirty {
        ClientDirty::new(Err(why), None, Arc::default())
    }

    /// The client's back end, or why it has none.
    pub fn backend(&self) -> Result<Backend, &Untracked> {
        self.backend.as_ref().copied()
    }

    /// True if `b` is the client's back end.
    pub fn is(&self, b: Backend) -> bool {
        self.backend.as_ref().ok() == Some(&b)
    }

    /// The client's counters.
    pub fn counters(&self) -> &DirtyCounters {
        &self.counters
    }

    /// Adds `n` to a counter of the client and the daemon-wide one.
    pub fn bump(&self, which: impl Fn(&DirtyCounters) -> &AtomicU64, n: u64) {
        which(&self.counters).fetch_add(n, Relaxed);
        which(&self.global).fetch_add(n, Relaxed);
    }

    /// Counts a write-protect fault handled (`uffd-wp`).
    pub fn wp_fault(&self) {
        self.bump(|c| &c.wp_faults, 1);
        self.bump(|c| &c.pages_dirty, 1);
        self.faults_since_sync.fetch_add(1, Relaxed);
    }

    /// True if attached ranges must be write-protected ("armed") as a whole when attached:
    /// `pagemap-scan` reports written whatever is not write-protected.
    pub fn arms_on_attach(&self) -> bool {
        self.is(Backend::PagemapScan)
    }

    /// Takes the client's collection lock.
    pub fn lock(&self) -> CollectGuard<'_> {
        CollectGuard {
            buf: lock(&self.scan),
        }
    }

    /// Finds the pages written in `ranges` (`(start, end)` pairs, page aligned) since the
    /// previous collection, re-arms them, and appends them as runs to `out`. `pagemap` is
    /// the client's pagemap fd.
    pub fn collect(
        &self,
        guard: &mut CollectGuard<'_>,
        pagemap: Option<&File>,
        ranges: &[(u64, u64)],
        out: &mut Vec<(u64, u64)>,
    ) -> Result<Collected, DirtyError> {
        let t = Instant::now();
        let before = out.len();
        let backend = self
            .backend()
            .map_err(|e| DirtyError::NotTracked(e.clone()))?;
        let no_pagemap = || DirtyError::NotTracked(Untracked::NoPagemapFd);
        let mut c = Collected::default();
        match backend {
            Backend::PagemapScan => {
                let pm = pagemap.ok_or_else(no_pagemap)?;
                for &(start, end) in ranges {
                    pagemap_scan::collect(pm, start, end, &mut guard.buf, out)?;
                    c.pages_scanned += (end - start) / crate::sys::PAGE_SIZE as u64;
                }
            }
            Backend::SoftDirty => {
                let pm = pagemap.ok_or_else(no_pagemap)?;
                let clear = self
                    .clear_refs
                    .as_ref()
                    .ok_or(DirtyError::NotTracked(Untracked::NoClearRefs))?;
                c.pages_scanned = soft_dirty::collect(pm, clear, ranges, out)?;
            }
            Backend::UffdWp => {
                // Nothing to scan: each write fault invalidated its page as it happened.
                c.pages_dirty = self.faults_since_sync.swap(0, Relaxed);
            }
        }
        let found = &out[before..];
        c.regions = found.len() as u64;
        c.pages_dirty += found
            .iter()
            .map(|(s, e)| (e - s) / crate::sys::PAGE_SIZE as u64)
            .sum::<u64>();
        c.scan_ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if backend != Backend::UffdWp {
            self.bump(|k| &k.scans, 1);
            self.bump(|k| &k.pages_scanned, c.pages_scanned);
            self.bump(|k| &k.pages_dirty, c.pages_dirty);
            self.bump(|k| &k.scan_ns, c.scan_ns);
        }
        Ok(c)
    }
}
