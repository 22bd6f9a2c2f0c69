//! The table of attached ranges: what the client attached, under stable mirror ids, and what
//! is left of each range after the client's munmap and mremap (docs/design.md §4, retired
//! ranges). Lookups by id and address see every event already read (G1).

use std::collections::BTreeMap;

use super::{AddressSpace, WatchError};
use crate::dirty::DirtyPolicy;
use crate::lock;

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
    /// Write-protected for dirty tracking where the back end needs it (false only for a
    /// `lazy` mirror no sync has armed yet: its first sync invalidates it whole).
    pub armed: bool,
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

    /// `start..end`, which overlaps what is left of the range, stopped being the mapping
    /// attached, and the mirror does not follow it: the head or tail shrinks, or a hole is
    /// noted (the rest stays mirrored but no longer follows mremap). Nothing left: the
    /// mirror is gone.
    pub(super) fn cut(&mut self, start: u64, end: u64) {
        let (ls, le) = (self.live_start, self.live_end);
        if start <= ls {
            self.live_start = end.min(le);
        } else if end >= le {
            self.live_end = start.max(ls);
        } else {
            self.holes = true;
        }
        if self.live_start >= self.live_end {
            self.dev = None;
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) by_id: BTreeMap<u64, Attached>,
    pub(super) next: u64,
}

impl AddressSpace {
    /// The parts of `start..end` that no live mirror of `t` covers, in address order.
    pub(super) fn uncovered(t: &Table, start: u64, end: u64) -> Vec<(u64, u64)> {
        gaps(start, end, Self::covered(t, start, end))
    }

    /// The parts of `start..end` that live mirrors of `t` cover (unsorted, may overlap).
    pub(super) fn covered(t: &Table, start: u64, end: u64) -> Vec<(u64, u64)> {
        t.by_id
            .values()
            .filter(|m| m.dev.is_some())
            .map(|m| (m.live_start.max(start), m.live_end.min(end)))
            .filter(|(s, e)| s < e)
            .collect()
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

    /// Number of attached ranges.
    pub fn len(&self) -> usize {
        lock(&self.table).by_id.len()
    }

    /// True if nothing is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parts of `start..end` that none of `covered` (inside it, unsorted, overlapping or
/// not) covers, in order.
pub(super) fn gaps(start: u64, end: u64, mut covered: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
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
