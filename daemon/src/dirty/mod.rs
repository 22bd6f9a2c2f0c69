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
pub mod soft_dirty;
pub mod uffd_wp;

pub use policy::DirtyPolicy;

use crate::lock;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::sys::pagemap::PageRegion;
use crate::sys::uffd::{features, Uffd};

/// A dirty-tracking back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`.
    PagemapScan,
    /// `clear_refs` "4" + pagemap bit 55.
    SoftDirty,
    /// Synchronous uffd write-protect faults.
    UffdWp,
}

impl Backend {
    /// Every back end, in the order `auto` prefers them (fastest first).
    pub const ALL: [Backend; 3] = [Backend::PagemapScan, Backend::SoftDirty, Backend::UffdWp];

    /// The name used by `--dirty-tracking`, `status` and `sync`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::PagemapScan => "pagemap-scan",
            Backend::SoftDirty => "soft-dirty",
            Backend::UffdWp => "uffd-wp",
        }
    }

    /// Tries the back end on a scratch mapping of this process; `Err` says why it does not
    /// work here.
    pub fn probe(self) -> Result<(), String> {
        match self {
            Backend::PagemapScan => pagemap_scan::probe(),
            Backend::SoftDirty => soft_dirty::probe(),
            Backend::UffdWp => uffd_wp::probe(),
        }
    }

    /// The `UFFDIO_API` features a client's uffd needs for it. `WP_ASYNC` is per uffd: it
    /// turns every write-protect fault of that uffd into one the kernel resolves itself, so
    /// `pagemap-scan` and `uffd-wp` exclude each other on one uffd. `WP_UNPOPULATED` makes
    /// write protection stick to pages not populated yet (without it a zero page the device
    /// read would be written without a trace).
    pub fn uffd_features(self) -> u64 {
        match self {
            Backend::PagemapScan => features::WP_ASYNC | features::WP_UNPOPULATED,
            Backend::UffdWp => features::WP_UNPOPULATED,
            Backend::SoftDirty => 0,
        }
    }

    /// A userfaultfd of this process with this back end's features, for its start-up
    /// probe, and the features the kernel granted; a refusal says it needs `needs`.
    fn probe_uffd(self, needs: &str) -> Result<(Uffd, u64), String> {
        let (uffd, _) = Uffd::create().map_err(|e| format!("cannot create a userfaultfd: {e}"))?;
        let granted = uffd.api(self.uffd_features()).map_err(|e| {
            format!(
                "UFFDIO_API refused {needs}: {}",
                e.errno()
                    .map_or_else(|| e.to_string(), |n| n.desc().to_owned())
            )
        })?;
        Ok((uffd, granted))
    }
}

/// Which dirty-tracking back end the daemon is asked to use (`dirty.tracking`,
/// `--dirty-tracking`); `Auto` takes the fastest one the start-up probe finds working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// The fastest back end that works here.
    #[default]
    Auto,
    /// This back end, or the daemon does not start.
    Forced(Backend),
    /// No dirty tracking: the shadow follows the mappings, not the contents.
    Off,
}

impl DirtyTracking {
    /// Every choice, in the order `auto` tries the back ends (after `Auto` itself).
    pub const ALL: [DirtyTracking; 5] = [
        DirtyTracking::Auto,
        DirtyTracking::Forced(Backend::PagemapScan),
        DirtyTracking::Forced(Backend::SoftDirty),
        DirtyTracking::Forced(Backend::UffdWp),
        DirtyTracking::Off,
    ];

    /// The name used by flags, the config file and `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            DirtyTracking::Auto => "auto",
            DirtyTracking::Forced(b) => b.as_str(),
            DirtyTracking::Off => "off",
        }
    }

    /// Parses one of the names of [`DirtyTracking::as_str`].
    pub fn parse(s: &str) -> Option<DirtyTracking> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A forced back end does not work on this machine (the daemon refuses to start).
    #[error("--dirty-tracking {backend} is unavailable here: {reason}")]
    Unavailable {
        /// The back end.
        backend: &'static str,
        /// What the probe found.
        reason: String,
    },
    /// This client has no back end it can use.
    #[error("no dirty tracking for this client: {0}")]
    NotTracked(String),
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

/// What probing found and which back end the daemon uses.
#[derive(Debug, Clone)]
pub struct Selection {
    requested: DirtyTracking,
    chosen: Option<Backend>,
    probes: Vec<(Backend, Result<(), String>)>,
}

impl Selection {
    /// Probes every back end on this machine and chooses as `requested` says; a forced back
    /// end that does not work is an error.
    pub fn probe(requested: DirtyTracking) -> Result<Selection, DirtyError> {
        let probes = Backend::ALL
            .into_iter()
            .map(|b| {
                let r = b.probe();
                match &r {
                    Ok(()) => tracing::debug!(backend = b.as_str(), "dirty back end works"),
                    Err(why) => {
                        tracing::debug!(backend = b.as_str(), reason = %why, "dirty back end unavailable")
                    }
                }
                (b, r)
            })
            .collect();
        Selection::from_probes(requested, probes)
    }

    /// Chooses from probe results (the pure half of [`Selection::probe`]).
    pub fn from_probes(
        requested: DirtyTracking,
        probes: Vec<(Backend, Result<(), String>)>,
    ) -> Result<Selection, DirtyError> {
        let works = |b: Backend| probes.iter().any(|(p, r)| *p == b && r.is_ok());
        let chosen = match requested {
            DirtyTracking::Off => None,
            DirtyTracking::Auto => Backend::ALL.into_iter().find(|b| works(*b)),
            DirtyTracking::Forced(b) => {
                if let Some((_, Err(reason))) = probes.iter().find(|(p, _)| *p == b) {
                    return Err(DirtyError::Unavailable {
                        backend: b.as_str(),
                        reason: reason.clone(),
                    });
                }
                Some(b)
            }
        };
        Ok(Selection {
            requested,
            chosen,
            probes,
        })
    }

    /// The daemon's back end (`None`: tracking off).
    pub fn chosen(&self) -> Option<Backend> {
        self.chosen
    }

    /// True if the probe found `b` working.
    pub fn works(&self, b: Backend) -> bool {
        self.probes.iter().any(|(p, r)| *p == b && r.is_ok())
    }

    /// The `status` lines: `dirty.backend`, `dirty.requested`, and `dirty.refused.<name>`
    /// with the reason for every back end not chosen (and for `off` when one was).
    pub fn status_lines(&self) -> Vec<(String, String)> {
        let mut v = vec![
            (
                "dirty.backend".to_owned(),
                self.chosen.map_or("off", Backend::as_str).to_owned(),
            ),
            (
                "dirty.requested".to_owned(),
                self.requested.as_str().to_owned(),
            ),
        ];
        for (b, r) in &self.probes {
            if Some(*b) == self.chosen {
                continue;
            }
            let why = match (r, self.requested) {
                (Err(e), _) => format!("unavailable: {e}"),
                (Ok(()), DirtyTracking::Auto) => format!(
                    "works, but {} is preferred",
                    self.chosen.map_or("off", Backend::as_str)
                ),
                (Ok(()), forced) => {
                    format!("works, not chosen (--dirty-tracking {})", forced.as_str())
                }
            };
            v.push((format!("dirty.refused.{}", b.as_str()), why));
        }
        if self.chosen.is_some() {
            v.push((
                "dirty.refused.off".to_owned(),
                match self.requested {
                    DirtyTracking::Auto => "not chosen: a back end works".to_owned(),
                    forced => format!("not chosen (--dirty-tracking {})", forced.as_str()),
                },
            ));
        }
        v
    }

    /// The back end a client gets: the daemon's, if the client can use it; with `auto`, the
    /// first working one it can use. A client needs its pagemap fd for `pagemap-scan` and
    /// `soft-dirty`, and a privileged uffd for `uffd-wp`.
    pub fn for_client(&self, has_pagemap: bool, privileged_uffd: bool) -> Result<Backend, String> {
        let usable = |b: Backend| -> Result<(), String> {
            match b {
                Backend::PagemapScan | Backend::SoftDirty if !has_pagemap => Err(format!(
                    "{} needs the client's /proc/self/pagemap fd, which it did not hand over",
                    b.as_str()
                )),
                Backend::UffdWp if !privileged_uffd => Err(
                    "uffd-wp needs a userfaultfd created without UFFD_USER_MODE_ONLY (kernel \
                     accesses to write-protected pages would fail with EFAULT)"
                        .to_owned(),
                ),
                _ => Ok(()),
            }
        };
        match self.requested {
            DirtyTracking::Off => Err("dirty tracking is off (--dirty-tracking off)".into()),
            DirtyTracking::Auto => {
                let mut why = Vec::new();
                for b in Backend::ALL.into_iter().filter(|b| self.works(*b)) {
                    match usable(b) {
                        Ok(()) => return Ok(b),
                        Err(e) => why.push(e),
                    }
                }
                Err(if why.is_empty() {
                    "no dirty-tracking back end works on this machine".to_owned()
                } else {
                    why.join("; ")
                })
            }
            _ => match self.chosen {
                Some(b) => usable(b).map(|()| b),
                None => Err("dirty tracking is off".into()),
            },
        }
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
    backend: Result<Backend, String>,
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
        backend: Result<Backend, String>,
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
    pub fn off(why: impl Into<String>) -> ClientDirty {
        ClientDirty::new(Err(why.into()), None, Arc::default())
    }

    /// The client's back end, or why it has none.
    pub fn backend(&self) -> Result<Backend, &str> {
        self.backend.as_ref().copied().map_err(String::as_str)
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
            .map_err(|e| DirtyError::NotTracked(e.to_owned()))?;
        let no_pagemap = || DirtyError::NotTracked("no pagemap fd".into());
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
                    .ok_or_else(|| DirtyError::NotTracked("no clear_refs file".into()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(pm: bool, sd: bool, wp: bool) -> Vec<(Backend, Result<(), String>)> {
        let r = |ok: bool, why: &str| if ok { Ok(()) } else { Err(why.to_owned()) };
        vec![
            (Backend::PagemapScan, r(pm, "no PAGEMAP_SCAN")),
            (Backend::SoftDirty, r(sd, "bit 55 never sets")),
            (Backend::UffdWp, r(wp, "no WP")),
        ]
    }

    fn line(s: &Selection, k: &str) -> Option<String> {
        s.status_lines()
            .into_iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v)
    }

    #[test]
    fn auto_takes_the_first_working_back_end_and_says_why_not_the_others() {
        let s = Selection::from_probes(DirtyTracking::Auto, probes(true, false, true))
            .expect("auto never fails");
        assert_eq!(s.chosen(), Some(Backend::PagemapScan));
        assert_eq!(line(&s, "dirty.backend").as_deref(), Some("pagemap-scan"));
        assert_eq!(
            line(&s, "dirty.refused.soft-dirty").as_deref(),
            Some("unavailable: bit 55 never sets")
        );
        assert_eq!(
            line(&s, "dirty.refused.uffd-wp").as_deref(),
            Some("works, but pagemap-scan is preferred")
        );
        assert!(line(&s, "dirty.refused.pagemap-scan").as_deref().is_none());
        assert!(line(&s, "dirty.refused.off").as_deref().is_some());
        let s =
            Selection::from_probes(DirtyTracking::Auto, probes(false, false, true)).expect("auto");
        assert_eq!(s.chosen(), Some(Backend::UffdWp));
        let s =
            Selection::from_probes(DirtyTracking::Auto, probes(false, false, false)).expect("auto");
        assert_eq!(s.chosen(), None);
        assert_eq!(line(&s, "dirty.backend").as_deref(), Some("off"));
        assert!(line(&s, "dirty.refused.off").as_deref().is_none());
    }

    #[test]
    fn a_forced_back_end_that_does_not_work_is_an_error() {
        let e = Selection::from_probes(
            DirtyTracking::Forced(Backend::SoftDirty),
            probes(true, false, true),
        )
        .expect_err("soft-dirty does not work");
        assert_eq!(
            e.to_string(),
            "--dirty-tracking soft-dirty is unavailable here: bit 55 never sets"
        );
        let s = Selection::from_probes(
            DirtyTracking::Forced(Backend::UffdWp),
            probes(true, false, true),
        )
        .expect("uffd-wp works");
        assert_eq!(s.chosen(), Some(Backend::UffdWp));
        assert_eq!(
            line(&s, "dirty.refused.pagemap-scan").as_deref(),
            Some("works, not chosen (--dirty-tracking uffd-wp)")
        );
        let s = Selection::from_probes(DirtyTracking::Off, probes(true, false, true))
            .expect("off always works");
        assert_eq!(s.chosen(), None);
        assert_eq!(
            line(&s, "dirty.refused.pagemap-scan").as_deref(),
            Some("works, not chosen (--dirty-tracking off)")
        );
    }

    #[test]
    fn each_client_gets_a_back_end_it_can_use() {
        let auto =
            Selection::from_probes(DirtyTracking::Auto, probes(true, false, true)).expect("auto");
        assert_eq!(auto.for_client(true, false), Ok(Backend::PagemapScan));
        assert_eq!(auto.for_client(false, true), Ok(Backend::UffdWp));
        let e = auto.for_client(false, false).expect_err("neither");
        assert!(e.contains("pagemap") && e.contains("USER_MODE_ONLY"), "{e}");
        let wp = Selection::from_probes(
            DirtyTracking::Forced(Backend::UffdWp),
            probes(true, false, true),
        )
        .expect("uffd-wp");
        assert_eq!(wp.for_client(true, true), Ok(Backend::UffdWp));
        assert!(wp.for_client(true, false).is_err());
        let off =
            Selection::from_probes(DirtyTracking::Off, probes(true, false, true)).expect("off");
        assert!(off.for_client(true, true).is_err());
    }

    #[test]
    fn features_keep_wp_async_and_sync_wp_apart() {
        assert_ne!(Backend::PagemapScan.uffd_features() & features::WP_ASYNC, 0);
        assert_eq!(Backend::UffdWp.uffd_features() & features::WP_ASYNC, 0);
        assert_ne!(
            Backend::UffdWp.uffd_features() & features::WP_UNPOPULATED,
            0
        );
    }
}
