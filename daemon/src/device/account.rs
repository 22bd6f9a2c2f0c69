//! Shadow pages charged to a user: every client of one uid shares one account, so a user
//! cannot take the whole shadow by opening more sessions, and a user with no share limit
//! (root, the daemon's own user) may also take the slots kept in reserve for it. Monitors
//! are charged here too: each costs the daemon memory, and a user's clients together may
//! hold [`MONITORS_PER_USER`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Monitors an unprivileged user's clients may hold together (about 150 bytes of the
/// daemon's memory each; one client may hold `monitor_abi::MAX_MONITORS`).
pub const MONITORS_PER_USER: u64 = 1 << 18;

/// The shadow pages of every client of one user, against that user's share.
#[derive(Debug)]
pub struct Account {
    pages: AtomicU64,
    monitors: AtomicU64,
    /// Most pages the user may hold; `None` for a privileged user (no limit, and the
    /// reserve is open to it).
    quota_pages: Option<AtomicU64>,
}

/// Why an account refused pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverQuota {
    /// The share, in bytes.
    pub quota_bytes: u64,
}

impl Account {
    /// The account of an unprivileged user allowed `quota_bytes` of shadow.
    pub fn limited(quota_bytes: u64) -> Account {
        Account {
            pages: AtomicU64::new(0),
            monitors: AtomicU64::new(0),
            quota_pages: Some(AtomicU64::new(quota_bytes / crate::sys::PAGE_SIZE as u64)),
        }
    }

    /// The account of a privileged user: no share limit, the reserve is open to it.
    pub fn privileged() -> Account {
        Account {
            pages: AtomicU64::new(0),
            monitors: AtomicU64::new(0),
            quota_pages: None,
        }
    }

    /// True if the reserved slots are open to this account.
    pub fn privileged_user(&self) -> bool {
        self.quota_pages.is_none()
    }

    /// Pages held now.
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// Changes the share (a reload); pages held above it stay until freed.
    pub fn set_quota_bytes(&self, bytes: u64) {
        if let Some(q) = &self.quota_pages {
            q.store(bytes / crate::sys::PAGE_SIZE as u64, Ordering::Relaxed);
        }
    }

    /// Charges `n` pages, or refuses if the share would be exceeded.
    pub fn charge(&self, n: u64) -> Result<(), OverQuota> {
        let Some(q) = &self.quota_pages else {
            self.pages.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        };
        let quota = q.load(Ordering::Relaxed);
        let mut cur = self.pages.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(n) > quota {
                return Err(OverQuota {
                    quota_bytes: quota * crate::sys::PAGE_SIZE as u64,
                });
            }
            match self.pages.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(v) => cur = v,
            }
        }
    }

    /// Returns `n` charged pages.
    pub fn uncharge(&self, n: u64) {
        self.pages.fetch_sub(n, Ordering::Relaxed);
    }

    /// Charges one monitor; false if an unprivileged user holds [`MONITORS_PER_USER`].
    pub fn charge_monitor(&self) -> bool {
        let limit = if self.privileged_user() {
            u64::MAX
        } else {
            MONITORS_PER_USER
        };
        self.monitors
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Returns `n` charged monitors.
    pub fn uncharge_monitors(&self, n: u64) {
        let _ = self
            .monitors
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |m| {
                Some(m.saturating_sub(n))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::PAGE_SIZE;

    #[test]
    fn a_share_is_shared_by_every_client_of_the_user() {
        let a = Account::limited(4 * PAGE_SIZE as u64);
        a.charge(3).expect("fits");
        assert_eq!(
            a.charge(2),
            Err(OverQuota {
                quota_bytes: 4 * PAGE_SIZE as u64
            })
        );
        a.charge(1).expect("fits exactly");
        a.uncharge(4);
        assert_eq!(a.pages(), 0);
        let root = Account::privileged();
        root.charge(1 << 40).expect("no limit");
        assert!(root.privileged_user() && !a.privileged_user());
    }

    #[test]
    fn monitors_of_a_user_are_bounded() {
        let a = Account::limited(0);
        for _ in 0..MONITORS_PER_USER {
            assert!(a.charge_monitor());
        }
        assert!(!a.charge_monitor());
        a.uncharge_monitors(1);
        assert!(a.charge_monitor());
        let root = Account::privileged();
        root.monitors.store(MONITORS_PER_USER, Ordering::Relaxed);
        assert!(root.charge_monitor(), "no per-user limit for root");
    }
}
