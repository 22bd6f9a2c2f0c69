//! Conversions between the wire's types (`memshadow_proto`) and the daemon's domain types.
//! The domain (the notifier core, the device, the address spaces, dirty tracking) does not
//! know the wire format; what crosses the socket is converted here, in one place.

use std::time::Duration;

use memshadow_proto::{AttachPolicy, DirtyBackend};

use crate::dirty::{Backend, DirtyPolicy};

/// The collection policy of an `Attach` whose flags ask for `requested`; `default` is the
/// daemon's (`dirty.policy`), for an attach that does not choose.
pub fn attach_policy(requested: AttachPolicy, default: DirtyPolicy) -> DirtyPolicy {
    match requested {
        AttachPolicy::Default => default,
        AttachPolicy::Manual => DirtyPolicy::Manual,
        AttachPolicy::Lazy => DirtyPolicy::Lazy,
        AttachPolicy::Strict => DirtyPolicy::Strict,
        AttachPolicy::Periodic { period_ms } => {
            DirtyPolicy::Periodic(Duration::from_millis(u64::from(period_ms)))
        }
    }
}

/// The wire's name for a back end (the `backend` of a `SyncReport`).
impl From<Backend> for DirtyBackend {
    fn from(b: Backend) -> DirtyBackend {
        match b {
            Backend::PagemapScan => DirtyBackend::PagemapScan,
            Backend::SoftDirty => DirtyBackend::SoftDirty,
            Backend::UffdWp => DirtyBackend::UffdWp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_keep_their_names_on_the_wire() {
        for b in Backend::ALL {
            assert_eq!(DirtyBackend::from(b).as_str(), b.as_str());
        }
    }

    #[test]
    fn an_attach_policy_becomes_the_domain_policy() {
        let default = DirtyPolicy::Strict;
        assert_eq!(attach_policy(AttachPolicy::Default, default), default);
        assert_eq!(
            attach_policy(AttachPolicy::Manual, default),
            DirtyPolicy::Manual
        );
        assert_eq!(
            attach_policy(AttachPolicy::Strict, DirtyPolicy::Manual),
            DirtyPolicy::Strict
        );
        assert_eq!(
            attach_policy(AttachPolicy::Periodic { period_ms: 250 }, default),
            DirtyPolicy::Periodic(Duration::from_millis(250))
        );
    }
}
