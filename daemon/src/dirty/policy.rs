//! When the written pages of an attached range are collected (docs/design.md §6): the
//! attach's collection policy.

use std::time::Duration;

/// When written pages are collected: the policy of one attach, and the daemon's default for
/// an attach that does not choose (`dirty.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyPolicy {
    /// Only on an explicit `sync`.
    #[default]
    Manual,
    /// Only on an explicit `sync`, armed at the first (not at attach), which invalidates
    /// the whole range: the client's first writes cost it no write-protect fault.
    Lazy,
    /// Scan a range before each device read of it.
    Strict,
    /// Scan every attached range on a timer.
    Periodic(Duration),
}

impl DirtyPolicy {
    /// Collected only when a `sync` asks, so no dirty tracking is needed to attach.
    pub fn on_sync_only(self) -> bool {
        matches!(self, DirtyPolicy::Manual | DirtyPolicy::Lazy)
    }
}

impl DirtyPolicy {
    /// Parses `manual`, `lazy`, `strict` or `periodic=MS` (MS ≥ 1).
    pub fn parse(s: &str) -> Option<DirtyPolicy> {
        match s {
            "manual" => Some(DirtyPolicy::Manual),
            "lazy" => Some(DirtyPolicy::Lazy),
            "strict" => Some(DirtyPolicy::Strict),
            _ => {
                let ms: u64 = s.strip_prefix("periodic=")?.parse().ok()?;
                (ms > 0).then(|| DirtyPolicy::Periodic(Duration::from_millis(ms)))
            }
        }
    }
}

impl std::fmt::Display for DirtyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirtyPolicy::Manual => f.write_str("manual"),
            DirtyPolicy::Lazy => f.write_str("lazy"),
            DirtyPolicy::Strict => f.write_str("strict"),
            DirtyPolicy::Periodic(d) => write!(f, "periodic={}", d.as_millis()),
        }
    }
}
