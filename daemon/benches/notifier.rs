//! Notifier-core benchmark: time per invalidation of a range that hits about 10 notifiers,
//! through the interval tree vs a linear scan of the same notifiers, for n = 1k … 1M.
//!
//! `cargo bench -p memshadow-daemon --bench notifier [-- --quick]`

#![allow(clippy::print_stdout, clippy::unwrap_used)]

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use common::Rng;
use memshadow_daemon::notifier::{
    Callbacks, Event, Invalidate, InvalidateArgs, OnePass, Range, Subscription, WouldBlock,
};

const PAGE: u64 = 4096;
const MIN_LEN: u64 = 4 * 1024;
const MAX_LEN: u64 = 2 * 1024 * 1024;

/// A notifier that does the minimum a correct callback must: record the sequence.
struct Noop;

impl OnePass for Noop {
    fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
        inv.set_seq();
        Ok(())
    }
}

fn main() {
    let quick = common::quick();
    let sizes: Vec<usize> =
        match std::env::args().find_map(|a| a.strip_prefix("--sizes=").map(str::to_owned)) {
            Some(list) => list.split(',').filter_map(|s| s.parse().ok()).collect(),
            None if quick => vec![1_000, 10_000],
            None => vec![1_000, 10_000, 100_000, 1_000_000],
        };
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for n in sizes {
        let mut rng = Rng(0x5eed ^ n as u64);
        let avg = (MIN_LEN + MAX_LEN) / 2;
        // Notifiers cover the span about once on average, so a query of 9 average lengths
        // overlaps about 10 of them.
        let span = n as u64 * avg;
        let query_len = 9 * avg;
        let sub = Subscription::new();
        let noop = Arc::new(Noop);
        let mut linear: Vec<(u64, u64)> = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        let built = Instant::now();
        for _ in 0..n {
            let len = rng.range(MIN_LEN / PAGE, MAX_LEN / PAGE + 1) * PAGE;
            let start = rng.range(0, span / PAGE) * PAGE;
            let r = Range::new(start, len).unwrap();
            handles.push(
                sub.insert(r, Callbacks::one_pass(Arc::clone(&noop)))
                    .unwrap(),
            );
            linear.push((r.start(), r.last()));
        }
        let insert_ns = built.elapsed().as_nanos() as f64 / n as f64;
        let queries: Vec<Range> = (0..1000)
            .map(|_| Range::new(rng.range(0, span / PAGE) * PAGE, query_len).unwrap())
            .collect();

        // Tree: the full invalidation path (locking, walk, callbacks, end).
        let reps = if quick {
            1
        } else {
            (2_000_000 / n).clamp(3, 200)
        };
        let mut hits = 0u64;
        let t = Instant::now();
        for _ in 0..reps {
            for q in &queries {
                hits += u64::from(
                    sub.invalidate(InvalidateArgs::new(*q, Event::Unmap))
                        .unwrap()
                        .hits,
                );
            }
        }
        let tree_ns = t.elapsed().as_nanos() as f64 / (reps * queries.len()) as f64;
        let avg_hits = hits as f64 / (reps * queries.len()) as f64;

        // Linear: only the lookup (no locking, no callbacks), so the ratio is conservative.
        let lin_queries = if quick {
            20
        } else {
            (20_000_000 / n).clamp(50, 1000)
        };
        let mut lin_hits = 0u64;
        let t = Instant::now();
        for q in queries.iter().cycle().take(lin_queries) {
            let (qs, ql) = (q.start(), q.last());
            lin_hits += linear.iter().filter(|&&(s, l)| s <= ql && l >= qs).count() as u64;
        }
        black_box(lin_hits);
        let linear_ns = t.elapsed().as_nanos() as f64 / lin_queries as f64;
        let speedup = linear_ns / tree_ns;
        let log2n = (n as f64).log2();
        rows.push(vec![
            n.to_string(),
            format!("{avg_hits:.1}"),
            format!("{tree_ns:.0}"),
            format!("{linear_ns:.0}"),
            format!("{speedup:.1}x"),
            format!("{:.1}", tree_ns / log2n),
            format!("{insert_ns:.0}"),
        ]);
        json.push(serde_json::json!({
            "n": n, "hits": avg_hits, "tree_ns": tree_ns, "linear_ns": linear_ns,
            "speedup": speedup, "tree_ns_per_log2n": tree_ns / log2n, "insert_ns": insert_ns, "quick": quick,
        }));
        drop(handles);
    }
    common::print_table(
        "notifier: one invalidation hitting ~10 notifiers (tree = full invalidate path; linear = lookup only)",
        &["n", "hits", "tree_ns", "linear_ns", "speedup", "tree_ns/log2(n)", "insert_ns"],
        &rows,
    );
    match common::write_json("notifier", &serde_json::Value::Array(json)) {
        Ok(p) => println!("\nrows written to {}", p.display()),
        Err(e) => {
            eprintln!("cannot write bench JSON: {e}");
            std::process::exit(1);
        }
    }
}
