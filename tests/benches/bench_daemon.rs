//! The `memshadowd` of a benchmark: started from the command the benchmark builds (its own
//! flags, log and environment), ready once a control session connects, stopped with SIGTERM
//! (SIGKILL if it ignores that) and reaped on drop; where a benchmark finds that daemon and
//! writes its results ([`BenchPaths`]), and whether it is a quick run ([`quick_run`]). Every
//! benchmark of this crate includes this file.

use std::error::Error;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use memshadow::Client;
use memshadow_tests::try_wait_until;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where a benchmark's programs are: `target/<profile>/` (its `memshadowd`, the release
/// library) and `target/` (whose `memshadow-bench/` gets the results).
#[derive(Debug)]
pub struct BenchPaths {
    /// `target/<profile>/`.
    #[allow(
        dead_code,
        reason = "only the monitor and preload benchmarks use the programs there"
    )]
    pub profile: PathBuf,
    /// `target/`.
    pub target: PathBuf,
    /// `target/<profile>/memshadowd`, built.
    pub daemon: PathBuf,
}

impl BenchPaths {
    /// The paths of the running benchmark; an error saying `build` (the command that builds
    /// the daemon) if the daemon is not there.
    pub fn locate(build: &str) -> Result<BenchPaths, Box<dyn Error>> {
        let exe = std::env::current_exe()?;
        let profile = exe
            .parent()
            .and_then(std::path::Path::parent)
            .ok_or("the benchmark is not in target/<profile>/deps")?
            .to_owned();
        let target = profile
            .parent()
            .ok_or("profile dir has no parent")?
            .to_owned();
        let daemon = profile.join("memshadowd");
        if !daemon.exists() {
            return Err(format!("{} is missing: run `{build}` first", daemon.display()).into());
        }
        Ok(BenchPaths {
            profile,
            target,
            daemon,
        })
    }
}

/// True if the arguments ask for a quick run (`--quick`); `--bench` is cargo's, anything
/// else is ignored with a word (benchmark `bench`).
#[allow(dead_code, reason = "the hostile benchmark parses options of its own")]
pub fn quick_run(bench: &str) -> bool {
    let mut quick = false;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--quick" => quick = true,
            "--bench" => {}
            other => eprintln!("{bench}: ignoring argument {other:?}"),
        }
    }
    quick
}

/// How long a daemon may take to serve its socket, and to exit after SIGTERM.
const LIMIT: Duration = Duration::from_secs(10);

/// A running `memshadowd`.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Where it listens.
    pub socket: PathBuf,
    /// The benchmark's name, for its messages.
    bench: &'static str,
}

impl Daemon {
    /// Spawns `cmd` (a `memshadowd` listening at `socket`) and waits until it serves;
    /// `log` names where its output went, for the error if it exits first.
    pub fn start(
        bench: &'static str,
        mut cmd: Command,
        socket: PathBuf,
        log: &str,
    ) -> Result<Daemon, Box<dyn Error>> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let mut d = Daemon {
            child,
            socket,
            bench,
        };
        let served = try_wait_until(LIMIT, || match d.child.try_wait() {
            Ok(Some(st)) => Ok(Err(format!("memshadowd exited early: {st}{log}"))),
            _ => Client::connect_control(Some(&d.socket))
                .map(|_| Ok(()))
                .map_err(|e| e.to_string()),
        });
        match served {
            Ok(Ok(())) => Ok(d),
            Ok(Err(exited)) => Err(exited.into()),
            Err(t) => {
                Err(format!("memshadowd not connectable at {}: {t}", d.socket.display()).into())
            }
        }
    }

    /// The daemon's pid.
    #[allow(
        dead_code,
        reason = "the roundtrip benchmark includes this file and never asks"
    )]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        match try_wait_until(LIMIT, || self.child.try_wait().ok().flatten()) {
            Ok(st) if !st.success() => eprintln!("{}: memshadowd exited with {st}", self.bench),
            Ok(_) => {}
            Err(_) => {
                eprintln!("{}: memshadowd ignored SIGTERM; killing it", self.bench);
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
