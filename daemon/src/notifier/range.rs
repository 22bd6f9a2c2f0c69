//! Address ranges as the notifier core sees them (docs/design.md §3 rule 1 and rule 4).
//!
//! A range is inclusive of its first byte and exclusive of its end. It is stored as
//! `start..=last` so that the whole address space (`0..=u64::MAX`, used by release, rule 8)
//! is representable; an empty range or one whose end does not fit in 64 bits is refused.

use std::fmt;

/// Why a range was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The range has no bytes.
    #[error("empty range at {start:#x}")]
    Empty {
        /// First byte of the refused range.
        start: u64,
    },
    /// `start + len` does not fit in the 64-bit address space.
    #[error("range {start:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// First byte of the refused range.
        start: u64,
        /// Length of the refused range.
        len: u64,
    },
}

/// A non-empty range of addresses, `start..=last`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    start: u64,
    last: u64,
}

impl Range {
    /// The whole address space, as invalidated by release (rule 8).
    pub const FULL: Range = Range {
        start: 0,
        last: u64::MAX,
    };

    /// The range of `len` bytes from `start`; refuses `len == 0` and ranges whose last byte
    /// would lie beyond `u64::MAX`.
    pub fn new(start: u64, len: u64) -> Result<Range, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        let last = start
            .checked_add(len - 1)
            .ok_or(RangeError::Overflow { start, len })?;
        Ok(Range { start, last })
    }

    /// The range `start..end` (end exclusive); refuses `end <= start`.
    pub fn from_bounds(start: u64, end: u64) -> Result<Range, RangeError> {
        if end <= start {
            return Err(RangeError::Empty { start });
        }
        Ok(Range {
            start,
            last: end - 1,
        })
    }

    /// The range `start..=last`; refuses `last < start`.
    pub fn inclusive(start: u64, last: u64) -> Result<Range, RangeError> {
        if last < start {
            return Err(RangeError::Empty { start });
        }
        Ok(Range { start, last })
    }

    /// First byte.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Last byte (inclusive).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// One past the last byte, saturating at `u64::MAX` for a range that ends at the top of
    /// the address space.
    pub fn end_saturating(&self) -> u64 {
        self.last.saturating_add(1)
    }

    /// Number of bytes, saturating at `u64::MAX` (only [`Range::FULL`]-like ranges saturate).
    pub fn len(&self) -> u64 {
        (self.last - self.start).saturating_add(1)
    }

    /// A range is never empty; provided for clippy's `len_without_is_empty` and symmetry.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True if the two ranges share at least one byte.
    pub fn overlaps(&self, other: &Range) -> bool {
        self.start <= other.last && other.start <= self.last
    }

    /// True if `addr` lies inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.last
    }

    /// The bytes the two ranges share, if any.
    pub fn intersection(&self, other: &Range) -> Option<Range> {
        let start = self.start.max(other.start);
        let last = self.last.min(other.last);
        (start <= last).then_some(Range { start, last })
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.start, self.last)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule4_empty_and_overflowing_ranges_are_refused() {
        assert_eq!(
            Range::new(0x1000, 0),
            Err(RangeError::Empty { start: 0x1000 })
        );
        assert_eq!(
            Range::new(u64::MAX, 2),
            Err(RangeError::Overflow {
                start: u64::MAX,
                len: 2
            })
        );
        assert_eq!(
            Range::from_bounds(0x2000, 0x2000),
            Err(RangeError::Empty { start: 0x2000 })
        );
        assert_eq!(Range::inclusive(5, 4), Err(RangeError::Empty { start: 5 }));
        // The very top of the address space is allowed, as in the kernel.
        let top = Range::new(u64::MAX - 0xfff, 0x1000).expect("top page");
        assert_eq!(top.last(), u64::MAX);
        assert_eq!(top.end_saturating(), u64::MAX);
        assert_eq!(Range::FULL.len(), u64::MAX);
    }

    #[test]
    fn rule1_ranges_are_inclusive_of_start_exclusive_of_end() {
        let r = Range::new(0x1000, 0x1000).expect("range");
        assert!(r.contains(0x1000));
        assert!(r.contains(0x1fff));
        assert!(!r.contains(0x2000));
        let next = Range::new(0x2000, 0x1000).expect("range");
        assert!(!r.overlaps(&next));
        let straddle = Range::new(0x1fff, 2).expect("range");
        assert!(r.overlaps(&straddle) && next.overlaps(&straddle));
        assert_eq!(
            r.intersection(&straddle),
            Some(Range::inclusive(0x1fff, 0x1fff).expect("range"))
        );
        assert_eq!(r.intersection(&next), None);
    }
}
