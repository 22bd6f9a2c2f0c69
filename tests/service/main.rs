//! memshadowd as a service (docs/design.md §7), with the tools a machine without systemd
//! as PID 1 has, one file per concern:
//!
//! * `units.rs`: the units pass `systemd-analyze verify`; the unit's capabilities and
//!   system-call filter checked against what the daemon really does.
//! * `activation.rs`: socket activation through `systemd-socket-activate`; a restart on a
//!   socket the test holds.
//! * `watchdog.rs`: readiness, status and the watchdog through a `NOTIFY_SOCKET` listener of
//!   the test's own ([`Notify`]); a client that never reads stalls nobody.
//! * `config.rs`: the configuration file, flags, `SIGHUP` reload, `--print-config`,
//!   journald detection.
//! * `install.rs`: the install script.
//!
//! Tests that need root, `systemd-analyze`, `systemd-socket-activate`, `strace`, `setpriv`
//! or `groupadd` say so and are put on the skip list (`tests/run.sh` prints it), unless
//! `MEMSHADOW_TESTS_REQUIRE_ALL=1` (set by `.ci/run`) makes that a failure.

#![allow(clippy::unwrap_used)]

mod activation;
mod config;
mod install;
mod units;
mod watchdog;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use memshadow_tests::{repeat_for, repo_root, Daemon, DaemonBuilder, HANG_GUARD};

/// A daemon as a service manager starts it: nothing in its environment but what the test
/// sets (not even the developer's `MEMSHADOW_LOG`: these tests check log levels).
fn service_daemon() -> DaemonBuilder {
    Daemon::builder().env_remove("MEMSHADOW_LOG")
}

/// The text of a file of `systemd/`.
fn unit(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("systemd").join(name)).unwrap()
}

/// Values of `Key=` lines of a unit (every occurrence, words split).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

/// The test's own service-manager end of `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message received, each as its lines.
    msgs: Vec<Vec<String>>,
}

impl Notify {
    fn new(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Notify {
            sock,
            path,
            msgs: Vec::new(),
        }
    }

    /// Receives one message, waiting at most 50 ms for it.
    fn recv_one(&mut self) {
        let mut buf = vec![0u8; 65536];
        if let Ok(n) = self.sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]);
            self.msgs.push(
                m.lines()
                    .filter(|l| !l.is_empty())
                    .map(Into::into)
                    .collect(),
            );
        }
    }

    /// Receives for `window`.
    fn recv_for(&mut self, window: Duration) {
        repeat_for(window, || {
            self.recv_one();
            true
        });
    }

    /// Receives until a message (from index `from` on) has a line for which `pred` holds;
    /// returns its index. `d` is the daemon that sends them (its log is shown if none
    /// comes).
    fn wait_for(
        &mut self,
        d: &Daemon,
        from: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> usize {
        d.wait_until(format!("{what} from the daemon"), HANG_GUARD, || {
            let found = (from..self.msgs.len()).find(|i| self.msgs[*i].iter().any(|l| pred(l)));
            if found.is_none() {
                self.recv_one();
            }
            found.ok_or_else(|| format!("messages {:?}", self.msgs))
        })
    }

    /// Messages in `range` with the line `line`.
    fn count(&self, range: std::ops::Range<usize>, line: &str) -> usize {
        self.msgs[range]
            .iter()
            .filter(|m| m.iter().any(|l| l == line))
            .count()
    }

    /// Messages so far with the line `line`.
    fn count_all(&self, line: &str) -> usize {
        self.count(0..self.msgs.len(), line)
    }
}
