//! Shared plumbing of memshadow's benchmarks: `--quick`, a printed table and JSON rows in
//! `target/memshadow-bench/NAME.json`.

#![allow(dead_code, clippy::print_stdout)]

use std::path::PathBuf;

/// True when the bench was started with `--quick` (small sizes, one iteration; CI runs this
/// so the benches never rot, and asserts nothing about the timings).
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick") || std::env::var_os("MEMSHADOW_BENCH_QUICK").is_some()
}

/// `target/memshadow-bench`, honouring `CARGO_TARGET_DIR`.
pub fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    target.join("memshadow-bench")
}

/// Prints `rows` as an aligned table under `title`.
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    println!("\n{title}");
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:>width$}", c, width = w[i]))
            .collect();
        println!("  {}", s.join("  "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    line(w.iter().map(|n| "-".repeat(*n)).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Writes `rows` (an array of JSON objects) to `target/memshadow-bench/{name}.json`.
pub fn write_json(name: &str, rows: &serde_json::Value) -> std::io::Result<PathBuf> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(rows).map_err(std::io::Error::other)?;
    std::fs::write(&path, text + "\n")?;
    Ok(path)
}

/// A small xorshift generator: benches need reproducible inputs, not good randomness.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Percentile `p` (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
