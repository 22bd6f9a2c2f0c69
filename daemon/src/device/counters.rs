//! The device's counters (for `stats` and `status`): plain relaxed atomics, read as a
//! snapshot of `(name, value)` pairs so a new counter needs no protocol change.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::notifier::Event;

/// A latency histogram with 1 µs buckets up to 4 ms and one overflow bucket.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

const BUCKETS: usize = 4096;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Histogram {
    /// Records one sample of `ns` nanoseconds.
    pub fn record(&self, ns: u64) {
        let b = usize::try_from(ns / 1000).unwrap_or(BUCKETS).min(BUCKETS);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `p`-th percentile (0..=100) in microseconds (bucket upper bound), or 0 if empty.
    pub fn percentile_us(&self, p: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let want = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want {
                return i as u64 + 1;
            }
        }
        BUCKETS as u64 + 1
    }
}

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fm])* pub $field: AtomicU64,)*
        }

        impl $name {
            /// Every counter as `(name, value)`.
            pub fn snapshot(&self, out: &mut Vec<(String, u64)>, prefix: &str) {
                $(out.push((format!("{prefix}{}", stringify!($field)), self.$field.load(Ordering::Relaxed)));)*
            }
        }
    };
}

counters!(
    /// Device-wide counters.
    DeviceCounters {
        /// Device reads served.
        reads,
        /// Bytes returned by device reads.
        read_bytes,
        /// Pages translated through an engine TLB.
        tlb_hits,
        /// Pages that missed the TLB and walked the page table.
        tlb_misses,
        /// Device faults raised (a read that found no page-table entry).
        faults,
        /// Faults that had to start over because an invalidation touched their range.
        fault_retries,
        /// Device reads of fenced pages, served from the client's memory, nothing installed.
        fenced_reads,
        /// Fences put up (a change announced before it is made: `MADV_DONTNEED`/`REMOVE`).
        fences,
        /// Fences lifted once the change was seen made.
        fences_lifted,
        /// Fences lifted after waiting the longest without seeing the change made.
        fences_timed_out,
        /// Pages copied into the shadow by the fault path.
        pages_mirrored,
        /// Bytes copied into the shadow by the fault path.
        bytes_mirrored,
        /// Flush jobs queued on engines.
        flushes_queued,
        /// Flush jobs merged into the flush before them on the same engine.
        flushes_coalesced,
        /// Flushes performed (each costs one flush latency).
        flushes_executed,
        /// Flush requests that doorbell batching folded into another within one walk.
        flushes_batched,
        /// Flushes widened to the whole client because a walk queued many ranges.
        flushes_all,
        /// Fence waits performed by finish passes (and one-pass invalidations).
        fences_waited,
        /// Page-table entries zapped by invalidations.
        ptes_zapped,
        /// Slots returned to the allocator.
        slots_freed,
        /// Start passes (and one-pass invalidations) run by shadow notifiers.
        notifier_starts,
        /// Finish passes run by shadow notifiers.
        notifier_finishes,
        /// Nanoseconds spent in start passes.
        start_ns,
        /// Nanoseconds spent in finish passes.
        finish_ns,
        /// Reads that saw a slot reused under a live translation (G2 broken): must stay 0.
        g2_violations,
        /// Invalidations with event `unmap`.
        inv_unmap,
        /// Invalidations with event `clear`.
        inv_clear,
        /// Invalidations with event `protection-vma`.
        inv_protection_vma,
        /// Invalidations with event `protection-page`.
        inv_protection_page,
        /// Invalidations with event `soft-dirty`.
        inv_soft_dirty,
        /// Invalidations with event `release`.
        inv_release,
        /// Invalidations refused with EAGAIN (non-blockable).
        inv_would_block,
    }
);

impl DeviceCounters {
    /// The per-event invalidation counter.
    pub fn invalidations(&self, event: Event) -> &AtomicU64 {
        match event {
            Event::Unmap => &self.inv_unmap,
            Event::Clear => &self.inv_clear,
            Event::ProtectionVma => &self.inv_protection_vma,
            Event::ProtectionPage => &self.inv_protection_page,
            Event::SoftDirty => &self.inv_soft_dirty,
            Event::Release => &self.inv_release,
        }
    }

    /// Total invalidations of every kind.
    pub fn invalidations_total(&self) -> u64 {
        Event::ALL
            .iter()
            .map(|e| self.invalidations(*e).load(Ordering::Relaxed))
            .sum()
    }
}

/// Adds `n` to a counter.
#[inline]
pub fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles() {
        let h = Histogram::default();
        for us in 1..=100u64 {
            h.record(us * 1000 - 1);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile_us(50.0), 50);
        assert_eq!(h.percentile_us(99.0), 99);
        h.record(10_000_000_000);
        assert_eq!(h.percentile_us(100.0), BUCKETS as u64 + 1);
    }

    #[test]
    fn snapshot_names_every_counter() {
        let c = DeviceCounters::default();
        bump(&c.faults, 3);
        let mut v = Vec::new();
        c.snapshot(&mut v, "device.");
        assert!(v.contains(&("device.faults".to_string(), 3)));
        assert!(v.iter().any(|(n, _)| n == "device.g2_violations"));
    }
}
