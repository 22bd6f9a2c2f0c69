//! The `memshadowd` of a benchmark: started from the command the benchmark builds (its own
//! flags, log and environment), ready once a control session connects, stopped with SIGTERM
//! (SIGKILL if it ignores that) and reaped on drop. Both benchmarks include this file.

use std::error::Error;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use memshadow::Client;
use memshadow_tests::try_wait_until;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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
