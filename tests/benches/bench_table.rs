//! A benchmark's results as rows against a baseline measured in the same run: the table it
//! prints and the JSON it writes, and its daemon started on built-in defaults. Included by
//! the benchmarks whose rows have this shape (`monitor`, `preload`), after `bench_daemon`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use memshadow_tests::Percentiles as Stats;
use serde_json::{json, Value};

use crate::bench_daemon::Daemon;

/// One row: what memshadow costs against a baseline measured in the same run.
#[derive(Debug)]
pub struct Row {
    /// The row's name.
    pub op: String,
    /// memshadow's samples.
    pub value: Stats,
    /// The unit of both.
    pub unit: &'static str,
    /// What the baseline is, in a few words.
    pub baseline: &'static str,
    /// The baseline's samples.
    pub base: Stats,
    /// The goal, as printed (`<=1.10x`), or `-`.
    pub goal: String,
    /// Whether the goal was met (`None`: reported only).
    pub met: Option<bool>,
    /// Whatever else the row wants in the JSON.
    pub extra: Value,
}

/// `x` rounded to three decimals, or null if it is not finite.
pub fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

/// Prints the table: p50 and p99 of both sides, the ratio of the p50s, the goal; then each
/// row's baseline and extras.
#[allow(clippy::print_stdout, reason = "a benchmark's table is its output")]
pub fn print(rows: &[Row]) {
    println!(
        "{:<16} {:>21} {:>21} {:>8} {:>24} {:>4}",
        "op", "memshadow p50 / p99", "baseline p50 / p99", "ratio", "goal", "met"
    );
    for r in rows {
        println!(
            "{:<16} {:>18.3} {:<2} {:>18.3} {:<2} {:>8.3} {:>24} {:>4}",
            r.op,
            r.value.p50,
            r.unit,
            r.base.p50,
            r.unit,
            r.value.p50 / r.base.p50,
            r.goal,
            r.met.map_or("-", |m| if m { "yes" } else { "NO" })
        );
        println!(
            "{:<16} {:>18.3} {:<2} {:>18.3} {:<2}",
            "", r.value.p99, r.unit, r.base.p99, r.unit
        );
    }
    println!();
    for r in rows {
        println!("{}: baseline = {}; {}", r.op, r.baseline, r.extra);
    }
    let unmet: Vec<&str> = rows
        .iter()
        .filter(|r| r.met == Some(false))
        .map(|r| r.op.as_str())
        .collect();
    if unmet.is_empty() {
        println!("all goals met");
    } else {
        println!("GOALS NOT MET: {}", unmet.join(", "));
    }
}

/// Writes the rows (with the run's `setting`) to `target/memshadow-bench/BENCH.json` and
/// says so, with the time since `started`.
pub fn write_json(
    bench: &str,
    target: &Path,
    rows: &[Row],
    setting: &Value,
    started: std::time::Instant,
) -> Result<(), Box<dyn Error>> {
    let out_dir = target.join("memshadow-bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(format!("{bench}.json"));
    let json_rows: Vec<Value> = rows.iter().map(|r| json_of(r, setting)).collect();
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&Value::Array(json_rows))?,
    )?;
    eprintln!(
        "{bench}: wrote {} after {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The row as JSON, with the run's `setting`.
fn json_of(r: &Row, setting: &Value) -> Value {
    json!({
        "op": r.op,
        "unit": r.unit,
        "memshadow_p50": num(r.value.p50),
        "memshadow_p99": num(r.value.p99),
        "baseline": r.baseline,
        "baseline_p50": num(r.base.p50),
        "baseline_p99": num(r.base.p99),
        "ratio": num(r.value.p50 / r.base.p50),
        "goal": r.goal,
        "met": r.met,
        "samples": r.value.n,
        "extra": r.extra,
        "setting": setting,
    })
}

/// The daemon `bin` of benchmark `bench` on its built-in defaults, listening at `socket`,
/// logging warnings to the benchmark's stderr.
pub fn start_daemon(
    bench: &'static str,
    bin: &Path,
    socket: PathBuf,
) -> Result<Daemon, Box<dyn Error>> {
    let mut cmd = Command::new(bin);
    cmd.arg("--no-config")
        .arg("--socket")
        .arg(&socket)
        .env("MEMSHADOW_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Daemon::start(bench, cmd, socket, " (its log is above)")
}
