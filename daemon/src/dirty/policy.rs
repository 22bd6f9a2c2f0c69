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
    /// Scan a range before each device read of it.
    Strict,
    /// Scan every attached range on a timer.
    Periodic(Duration),
}

impl DirtyPolicy {
    /// Parses `manual`, `strict` or `periodic=MS` (MS ≥ 1).
    pub fn parse(s: &str) -> Option<DirtyPolicy> {
        match s {
            "manual" => Some(DirtyPolicy::Manual),
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
            DirtyPolicy::Strict => f.write_str("strict"),
            DirtyPolicy::Periodic(d) => write!(f, "periodic={}", d.as_millis()),
        }
    }
}
