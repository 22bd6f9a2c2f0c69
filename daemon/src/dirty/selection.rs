//! Which back end: the back ends ([`Backend`]), what the daemon is asked for
//! ([`DirtyTracking`]), the start-up probe of each and the choice, for the daemon and for
//! each client ([`Selection`]).

use super::{pagemap_scan, soft_dirty, uffd_wp, DirtyError};
use crate::sys::uffd::{features, Uffd, UffdError};

/// Why a back end does not work on this machine: what its start-up probe found. The text is
/// one line with its cause in it, as `status` shows it after "unavailable: ".
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel lacks something the back end needs.
    #[error("{0}")]
    Unsupported(&'static str),
    /// No userfaultfd could be created.
    #[error("cannot create a userfaultfd: {0}")]
    CreateUffd(UffdError),
    /// `UFFDIO_API` refused the back end's features.
    #[error("UFFDIO_API refused {needs}: {}", errno_text(.error))]
    Api {
        /// The features, and the kernel that has them.
        needs: &'static str,
        /// The refusal.
        error: UffdError,
    },
    /// A userfaultfd operation of the probe failed.
    #[error("{what} failed: {error}")]
    Uffd {
        /// The operation.
        what: &'static str,
        /// Its error.
        error: UffdError,
    },
    /// A file or memory operation of the probe failed.
    #[error("{what}: {error}")]
    Io {
        /// The operation.
        what: &'static str,
        /// Its error.
        error: std::io::Error,
    },
    /// Collecting written pages of the probe's mapping failed.
    #[error("{}", chain(&**.0))]
    Collect(Box<DirtyError>),
    /// The back end ran, but did not report what the probe's writes should have made it
    /// report (what it reported instead).
    #[error("{0}")]
    Wrong(String),
}

impl ProbeError {
    /// A file or memory operation `what` failed with `error`.
    pub(super) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ProbeError {
        move |error| ProbeError::Io { what, error }
    }

    /// A userfaultfd operation `what` failed with `error`.
    pub(super) fn uffd(what: &'static str) -> impl FnOnce(UffdError) -> ProbeError {
        move |error| ProbeError::Uffd { what, error }
    }
}

/// The kernel's description of the error number behind `e`, else `e`'s own text.
fn errno_text(e: &UffdError) -> String {
    e.errno()
        .map_or_else(|| e.to_string(), |n| n.desc().to_owned())
}

/// `e` and its causes, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Why a client gets no dirty tracking (`sync` and `stats` say it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untracked {
    /// The back end reads the client's pagemap, which it did not hand over.
    #[error("{} needs the client's /proc/self/pagemap fd, which it did not hand over", .0.as_str())]
    NoPagemap(Backend),
    /// `uffd-wp` on a user-mode-only userfaultfd.
    #[error(
        "uffd-wp needs a userfaultfd created without UFFD_USER_MODE_ONLY (kernel accesses to \
         write-protected pages would fail with EFAULT)"
    )]
    UserModeOnly,
    /// The daemon runs with `--dirty-tracking off`.
    #[error("dirty tracking is off (--dirty-tracking off)")]
    Off,
    /// No back end works on this machine (`auto`).
    #[error("no dirty-tracking back end works on this machine")]
    NoneWorks,
    /// Every back end that works here is unusable for this client, for these reasons.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Unusable(Vec<Untracked>),
    /// The client was made without dirty tracking (tests, benchmarks).
    #[error("not set up")]
    NotSetUp,
    /// A collection found the client's pagemap fd missing.
    #[error("no pagemap fd")]
    NoPagemapFd,
    /// A `soft-dirty` collection found the client's `clear_refs` fd missing.
    #[error("no clear_refs file")]
    NoClearRefs,
}

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
    pub fn probe(self) -> Result<(), ProbeError> {
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
    pub(super) fn probe_uffd(self, needs: &'static str) -> Result<(Uffd, u64), ProbeError> {
        let (uffd, _) = Uffd::create().map_err(ProbeError::CreateUffd)?;
        let granted = uffd
            .api(self.uffd_features())
            .map_err(|error| ProbeError::Api { needs, error })?;
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

/// What probing found and which back end the daemon uses.
#[derive(Debug)]
pub struct Selection {
    requested: DirtyTracking,
    chosen: Option<Backend>,
    probes: Vec<(Backend, Result<(), ProbeError>)>,
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
        mut probes: Vec<(Backend, Result<(), ProbeError>)>,
    ) -> Result<Selection, DirtyError> {
        let works = |b: Backend| probes.iter().any(|(p, r)| *p == b && r.is_ok());
        let chosen = match requested {
            DirtyTracking::Off => None,
            DirtyTracking::Auto => Backend::ALL.into_iter().find(|b| works(*b)),
            DirtyTracking::Forced(b) => {
                if let Some(i) = probes.iter().position(|(p, r)| *p == b && r.is_err()) {
                    let (_, r) = probes.swap_remove(i);
                    if let Err(reason) = r {
                        return Err(DirtyError::Unavailable {
                            backend: b.as_str(),
                            reason,
                        });
                    }
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
    pub fn for_client(
        &self,
        has_pagemap: bool,
        privileged_uffd: bool,
    ) -> Result<Backend, Untracked> {
        let usable = |b: Backend| match b {
            Backend::PagemapScan | Backend::SoftDirty if !has_pagemap => {
                Err(Untracked::NoPagemap(b))
            }
            Backend::UffdWp if !privileged_uffd => Err(Untracked::UserModeOnly),
            _ => Ok(b),
        };
        match self.requested {
            DirtyTracking::Off => Err(Untracked::Off),
            DirtyTracking::Forced(b) => usable(b),
            DirtyTracking::Auto => {
                let mut why = Vec::new();
                for b in Backend::ALL.into_iter().filter(|b| self.works(*b)) {
                    match usable(b) {
                        Ok(b) => return Ok(b),
                        Err(e) => why.push(e),
                    }
                }
                Err(match why.len() {
                    0 => Untracked::NoneWorks,
                    1 => why.remove(0),
                    _ => Untracked::Unusable(why),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(pm: bool, sd: bool, wp: bool) -> Vec<(Backend, Result<(), ProbeError>)> {
        let r = |ok: bool, why: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(ProbeError::Unsupported(why))
            }
        };
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
        let e = auto
            .for_client(false, false)
            .expect_err("neither")
            .to_string();
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
