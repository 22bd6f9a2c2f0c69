//! Users whose connections keep sending malformed messages: their log lines are rate
//! limited, and past a threshold their new connections are refused at once for a while,
//! before the daemon spends anything on them (no pidfd, no session, no answer). A
//! well-behaved client never sends a malformed message, so it never gets near the
//! threshold; a flood of bad connections costs the daemon an `accept` and a `close` each.
//! The session loop owns this (no lock).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Length of a counting window.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Malformed messages of one user per window that are logged one by one.
pub const LOGGED_PER_WINDOW: u32 = 4;
/// Malformed messages of one user per window after which its connections are refused
/// for the rest of the window and the next.
pub const BAR_AFTER: u32 = 32;

#[derive(Debug)]
struct Record {
    since: Instant,
    bad: u32,
    /// Of `bad`, logged or reported by a sweep already.
    told: u32,
    barred_until: Option<Instant>,
}

/// What to do about one more malformed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noted {
    /// Log it (else it is only counted; [`Abuse::sweep`] reports how many were not).
    pub log: bool,
    /// This message barred the user.
    pub barred_now: bool,
}

/// The records of every user that sent a malformed message lately.
#[derive(Debug, Default)]
pub struct Abuse {
    users: HashMap<u32, Record>,
}

impl Abuse {
    /// Notes a malformed message from `uid` at `now`.
    pub fn bad_message(&mut self, uid: u32, now: Instant) -> Noted {
        let r = self.users.entry(uid).or_insert(Record {
            since: now,
            bad: 0,
            told: 0,
            barred_until: None,
        });
        if now.duration_since(r.since) >= WINDOW {
            r.since = now;
            r.bad = 0;
            r.told = 0;
        }
        r.bad += 1;
        if r.bad <= LOGGED_PER_WINDOW {
            r.told = r.bad;
        }
        let barred_now = r.bad == BAR_AFTER;
        if barred_now {
            r.barred_until = Some(now + 2 * WINDOW);
        }
        Noted {
            log: r.bad <= LOGGED_PER_WINDOW,
            barred_now,
        }
    }

    /// True while `uid`'s new connections are refused.
    pub fn barred(&self, uid: u32, now: Instant) -> bool {
        self.users
            .get(&uid)
            .and_then(|r| r.barred_until)
            .is_some_and(|t| now < t)
    }

    /// Forgets users quiet for a while, and returns, per user, how many of its malformed
    /// messages were neither logged nor reported by an earlier sweep.
    pub fn sweep(&mut self, now: Instant) -> Vec<(u32, u32)> {
        self.users.retain(|_, r| {
            now.duration_since(r.since) < 2 * WINDOW || r.barred_until.is_some_and(|t| now < t)
        });
        let mut untold = Vec::new();
        for (uid, r) in &mut self.users {
            if r.bad > r.told {
                untold.push((*uid, r.bad - r.told));
                r.told = r.bad;
            }
        }
        untold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_a_little_and_barred_for_a_while() {
        let mut a = Abuse::default();
        let t0 = Instant::now();
        let mut logged = 0;
        for i in 0..BAR_AFTER {
            let n = a.bad_message(7, t0);
            logged += u32::from(n.log);
            assert_eq!(n.barred_now, i + 1 == BAR_AFTER);
        }
        assert_eq!(logged, LOGGED_PER_WINDOW);
        assert!(a.barred(7, t0 + WINDOW));
        assert!(!a.barred(8, t0), "other users are not touched");
        assert_eq!(a.sweep(t0), vec![(7, BAR_AFTER - LOGGED_PER_WINDOW)]);
        assert_eq!(a.sweep(t0), vec![], "reported once");
        assert!(!a.barred(7, t0 + 2 * WINDOW), "the bar lifts");
        a.sweep(t0 + 3 * WINDOW);
        assert!(a.users.is_empty(), "quiet users are forgotten");
    }

    #[test]
    fn a_few_bad_messages_spread_out_never_bar() {
        let mut a = Abuse::default();
        let t0 = Instant::now();
        for i in 0..100u32 {
            let n = a.bad_message(7, t0 + WINDOW * i);
            assert!(n.log && !n.barred_now);
        }
        assert!(!a.barred(7, t0 + WINDOW * 100));
    }
}
