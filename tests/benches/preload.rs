//! `preload`: what `memshadow-run` (the preload library, client-lib/preload) costs an
//! unmodified program, each row against a baseline measured in the same run: the wall time
//! of `tests/programs/bench_buffers.py` (a Python program that allocates, fills, slices,
//! extends and frees bytearrays of 1 to 16 MiB, and writes, resizes and closes private
//! anonymous mmaps; deterministic, it prints a digest) run by `memshadow-run`, against the
//! same program with the same arguments run directly. Baseline and memshadow runs alternate
//! (in pairs whose order flips each time, so drift cancels), [`RUNS`] of each (quick:
//! [`RUNS_QUICK`]); p50/p99 are over runs, and the ratio is memshadow p50 / baseline p50.
//!
//! 1. `python_default`: `memshadow-run --socket S` (the default kinds: private, shared and
//!    malloc mappings of at least 1 MiB). Goal: <= 1.10x.
//! 2. `python_all`: the same with `--include all` (the heap too). Goal: <= 1.10x.
//! 3. `daemon_absent`: `memshadow-run` with a socket path where nothing listens (the
//!    library finds no daemon and the program runs unmirrored). Goal: <= 1.10x.
//!
//! Every run's stdout and exit status must equal the first baseline run's, and every run of
//! the first two rows must have connected to the daemon (its `server.sessions_total`
//! grows by one a run), or the benchmark fails: a number of a broken run is no number. How
//! many ranges a row's runs attach is counted in one more, untimed, run with
//! `--grant-file` (one line a mirror); `python_default` attaching nothing is an error too.
//! The daemon's counters over each row's timed runs go into the JSON beside that count.
//! After each run with the daemon, the benchmark waits (untimed) until the daemon has torn
//! the run's session down, so that work lands in no other run's time.
//!
//! The interpreter is `python3` from `PATH`, resolved to the program behind it
//! (`sys.executable`: no pyenv shim script in the measurement); without `python3` the
//! benchmark says so and exits 0 (fails under `MEMSHADOW_TESTS_REQUIRE_ALL=1`, as
//! `.ci/run` sets it: there every test and benchmark must run). Goals are reported, never asserted. Run: `cargo build
//! --release -p memshadow-daemon -p memshadow-preload -p memshadow-run && cargo bench -p
//! memshadow-tests --bench preload -- --quick`. Prints a table and writes
//! `target/memshadow-bench/preload.json`.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use memshadow::run::PRELOAD_FILE;
use memshadow::{Control, Status};
use serde_json::{json, Map};

#[path = "bench_daemon.rs"]
mod bench_daemon;
use bench_daemon::BenchPaths;
#[path = "bench_table.rs"]
mod bench_table;
use bench_table::{num, print, start_daemon, write_json, Row};
use memshadow_tests::percentiles as stats;

type Res<T> = Result<T, Box<dyn Error>>;

const BUILD: &str =
    "cargo build --release -p memshadow-daemon -p memshadow-preload -p memshadow-run";
/// Timed runs of each kind (baseline, memshadow) per row.
const RUNS: usize = 15;
const RUNS_QUICK: usize = 5;
/// `--rounds` of the workload: about 1 s a run (quick: about 0.3 s) on a 2-CPU EPYC.
const ROUNDS: u32 = 12;
const ROUNDS_QUICK: u32 = 2;
const GOAL: f64 = 1.10;
/// How long the daemon may take to tear down the session of a program that exited.
const RELEASE_LIMIT: Duration = Duration::from_secs(10);
/// The daemon's counters whose growth over a row's timed runs goes into the JSON
/// (`server.requests` net of the benchmark's own status requests).
const COUNTERS: [&str; 6] = [
    "server.sessions_total",
    "server.requests",
    "server.released",
    "events.total",
    "device.notifier_starts",
    "device.inv_unmap",
];

/// One run of the workload: what it printed and how it ended.
struct Outcome {
    ms: f64,
    stdout: String,
    stderr: String,
    status: ExitStatus,
}

/// How a row runs the workload.
struct Way {
    op: &'static str,
    /// `memshadow-run`'s options before `--`.
    options: Vec<OsString>,
    /// The runs connect to the daemon (not so `daemon_absent`'s).
    connects: bool,
    baseline: &'static str,
}

/// Runs the workload directly or, given `memshadow-run`'s options, through it.
struct Runner {
    python: PathBuf,
    script: PathBuf,
    rounds: u32,
    run_bin: PathBuf,
    /// The environment's settings of memshadow and the loader, which the runs go without.
    scrub: Vec<OsString>,
}

impl Runner {
    fn command(&self, run_options: Option<&[OsString]>) -> Command {
        let mut cmd = match run_options {
            Some(options) => {
                let mut c = Command::new(&self.run_bin);
                c.args(options).arg("--").arg(&self.python);
                c
            }
            None => Command::new(&self.python),
        };
        cmd.arg(&self.script)
            .args(["--rounds", &self.rounds.to_string()])
            .stdin(Stdio::null());
        for k in &self.scrub {
            cmd.env_remove(k);
        }
        cmd
    }

    fn run(&self, run_options: Option<&[OsString]>) -> Res<Outcome> {
        let mut cmd = self.command(run_options);
        let t = Instant::now();
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        Ok(Outcome {
            ms,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            status: out.status,
        })
    }
}

/// Fails unless `got` printed and ended as the first baseline run did.
fn same_as(want: &Outcome, got: &Outcome, what: &str) -> Res<()> {
    if got.stdout != want.stdout || got.status.code() != want.status.code() {
        return Err(format!(
            "{what}: printed {:?} and ended with {}, the baseline printed {:?} and ended with {}; \
             its stderr: {}",
            got.stdout,
            got.status,
            want.stdout,
            want.status,
            got.stderr.trim()
        )
        .into());
    }
    Ok(())
}

/// Waits until the daemon's `server.released` counter reaches `n` (every session of the
/// runs so far torn down); how long that took, in ms. Counts its status requests in `asked`.
fn released_by(control: &Control, n: u64, asked: &mut u64) -> Res<f64> {
    let t = Instant::now();
    memshadow_tests::try_wait_until_every(RELEASE_LIMIT, Duration::from_millis(1), || {
        *asked += 1;
        match control.status().map(|s| s.counter("server.released")) {
            Ok(Some(r)) if r >= n => Ok(()),
            Ok(r) => Err(format!("server.released = {r:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .map_err(|e| format!("memshadowd did not release a finished run's session: {e}"))?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

fn counter(s: &Status, name: &str) -> Res<u64> {
    s.counter(name)
        .ok_or_else(|| format!("memshadowd's status has no counter {name}").into())
}

fn measure(
    r: &Runner,
    way: &Way,
    runs: usize,
    want: &Outcome,
    control: &Control,
    dir: &Path,
) -> Res<Row> {
    let mut released = counter(&control.status()?, "server.released")?;
    // The untimed run that counts the ranges attached: one grant line a mirror.
    let grants = dir.join(format!("{}.grants", way.op));
    let mut counted = way.options.clone();
    counted.push("--grant-file".into());
    counted.push(grants.clone().into_os_string());
    let probe = r.run(Some(&counted))?;
    same_as(want, &probe, &format!("{} (with --grant-file)", way.op))?;
    let attached = match std::fs::read_to_string(&grants) {
        Ok(text) => text.lines().count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("{}: {e}", grants.display()).into()),
    };
    if way.connects && attached == 0 {
        return Err(format!(
            "{}: the program attached nothing (no line in {}); its stderr: {}",
            way.op,
            grants.display(),
            probe.stderr.trim()
        )
        .into());
    }
    if !way.connects && attached != 0 {
        return Err(format!("{}: {attached} ranges attached with no daemon", way.op).into());
    }
    if way.connects {
        released += 1;
        released_by(control, released, &mut 0)?;
    }

    let before = control.status()?;
    let (mut ms, mut base) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    let mut release_ms = Vec::with_capacity(runs);
    // Status requests of this benchmark's own among the daemon's `server.requests` (the
    // last one counts itself).
    let mut asked = 1u64;
    let mut stderr = String::new();
    for i in 0..runs {
        // Pairs: baseline first in even pairs, memshadow first in odd ones.
        for memshadow_turn in [i % 2 == 1, i % 2 == 0] {
            if memshadow_turn {
                let o = r.run(Some(&way.options))?;
                same_as(want, &o, &format!("{} run {i}", way.op))?;
                ms.push(o.ms);
                stderr = o.stderr;
                // The daemon tears the session down after the program exited: untimed.
                if way.connects {
                    released += 1;
                    release_ms.push(released_by(control, released, &mut asked)?);
                }
            } else {
                let o = r.run(None)?;
                same_as(want, &o, &format!("baseline of {} run {i}", way.op))?;
                base.push(o.ms);
            }
        }
    }
    let after = control.status()?;
    let grew = |name: &str| -> Res<u64> {
        Ok(counter(&after, name)?.saturating_sub(counter(&before, name)?))
    };
    let mut grown = Map::new();
    for name in COUNTERS {
        let mut n = grew(name)?;
        if name == "server.requests" {
            n = n.saturating_sub(asked);
        }
        grown.insert(name.to_owned(), json!(n));
    }
    let sessions = grew("server.sessions_total")?;
    if way.connects && sessions < runs as u64 {
        return Err(format!(
            "{}: {runs} runs opened {sessions} sessions with memshadowd; the last one's \
             stderr: {}",
            way.op,
            stderr.trim()
        )
        .into());
    }
    if !way.connects && sessions != 0 {
        return Err(format!("{}: {sessions} sessions opened with no daemon", way.op).into());
    }
    let (value, base) = (stats(ms), stats(base));
    let ratio = value.p50 / base.p50;
    let options: Vec<String> = way
        .options
        .iter()
        .map(|o| o.to_string_lossy().into_owned())
        .collect();
    Ok(Row {
        op: way.op.to_owned(),
        value,
        unit: "ms",
        base,
        baseline: way.baseline,
        goal: format!("<={GOAL:.2}x"),
        met: Some(ratio <= GOAL),
        extra: json!({
            "memshadow_run_options": options,
            "mirrors_attached_per_run": attached,
            "daemon_counters_grown": grown,
            "daemon_release_after_exit_ms_p50": num(stats(release_ms).p50),
            "stderr_of_last_run": stderr.trim(),
        }),
    })
}

fn main() -> Res<()> {
    let quick = bench_daemon::quick_run("preload");
    let (runs, rounds) = if quick {
        (RUNS_QUICK, ROUNDS_QUICK)
    } else {
        (RUNS, ROUNDS)
    };
    let Some((python, python_version)) = memshadow_tests::python3()? else {
        if memshadow_tests::require_all() {
            return Err(
                "no python3 on PATH, and MEMSHADOW_TESTS_REQUIRE_ALL is set: the \
                        preload benchmark must run"
                    .into(),
            );
        }
        eprintln!(
            "\n*** SKIPPED: the preload benchmark runs a Python workload and there is no \
             python3 on PATH; it did not run ***\n"
        );
        return Ok(());
    };
    let BenchPaths {
        profile,
        target,
        daemon: daemon_bin,
    } = BenchPaths::locate(BUILD)?;
    let run_bin = profile.join("memshadow-run");
    for p in [&run_bin, &profile.join(PRELOAD_FILE)] {
        if !p.exists() {
            return Err(format!("{} is missing: run `{BUILD}` first", p.display()).into());
        }
    }
    let script = memshadow_tests::repo_root().join("tests/programs/bench_buffers.py");
    let dir = memshadow_tests::TempDir::new("preload-bench");
    let started = Instant::now();
    let daemon = start_daemon("preload", &daemon_bin, dir.path().join("d.sock"))?;
    let control = Control::connect_to(&daemon.socket)?;
    let absent = dir.path().join("absent.sock");
    let runner = Runner {
        python: python.clone(),
        script,
        rounds,
        run_bin,
        scrub: std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| {
                let k = k.to_string_lossy();
                k.starts_with("MEMSHADOW_") || k == "LD_PRELOAD"
            })
            .collect(),
    };
    eprintln!(
        "preload: {} {} --rounds {rounds}, {runs} runs each way per row",
        python.display(),
        runner.script.display()
    );
    // The reference run (untimed: it also warms the page cache and the interpreter's files).
    let want = runner.run(None)?;
    if !want.status.success() || want.stdout.is_empty() {
        return Err(format!(
            "the workload failed on its own: {}, stdout {:?}, stderr {}",
            want.status,
            want.stdout,
            want.stderr.trim()
        )
        .into());
    }
    let socket = |p: &Path| vec![OsString::from("--socket"), p.as_os_str().to_owned()];
    let mut all = socket(&daemon.socket);
    all.extend(["--include".into(), "all".into()]);
    let ways = [
        Way {
            op: "python_default",
            options: socket(&daemon.socket),
            connects: true,
            baseline: "the same program run directly",
        },
        Way {
            op: "python_all",
            options: all,
            connects: true,
            baseline: "the same program run directly",
        },
        Way {
            op: "daemon_absent",
            options: socket(&absent),
            connects: false,
            baseline: "the same program run directly",
        },
    ];
    let mut rows = Vec::new();
    for way in &ways {
        let row = measure(&runner, way, runs, &want, &control, dir.path())?;
        eprintln!(
            "preload: {} done after {:.1} s",
            way.op,
            started.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    drop(daemon);
    print(&rows);
    let setting = json!({
        "quick": quick,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "runs": runs,
        "rounds": rounds,
        "python": python,
        "python_version": python_version,
        "workload_stdout": want.stdout.trim(),
    });
    write_json("preload", &target, &rows, &setting, started)
}
