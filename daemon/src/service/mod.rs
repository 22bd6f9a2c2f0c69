//! Running as a service (docs/design.md §1, §5 G6, §7): what the session loop tells the service
//! manager (`READY=1` once the socket accepts and the engines run, `STATUS=` with clients and
//! shadow bytes, `STOPPING=1`, `RELOADING=1` … `READY=1` around a reload), the watchdog ping
//! sent from the uffd-reader loop, the `SIGHUP` reload, socket activation and journald
//! logging. With no service manager (no `NOTIFY_SOCKET`) it only reloads.

pub mod activation;
pub mod logging;
pub mod notify;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::config::{Config, Sources};
use crate::events::Heartbeat;
use crate::server::{error_chain, Core, Summary, Supervisor};
use logging::SetLevel;
use notify::Notifier;

/// How often `STATUS=` is refreshed at most (it is sent only when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// Least time between two `STATUS=` updates caused by activity.
const STATUS_MIN_GAP: Duration = Duration::from_millis(200);

/// The environment variable of the test-only stall hook (see [`Stall`]).
pub const STALL_ENV: &str = "MEMSHADOWD_TEST_STALL";

/// A test-only hook, inert unless [`STALL_ENV`] is set: after the given number of watchdog
/// pings, the named loop stops for good (as if wedged), after telling the service manager
/// `X_MEMSHADOW_TEST_STALLED=<loop>`. Tests use it to show the watchdog pings stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// The uffd-reader loop, after this many pings.
    Reader(u64),
    /// The session loop, after this many pings.
    Session(u64),
}

impl Stall {
    /// Reads [`STALL_ENV`]; `Ok(None)` if unset.
    pub fn from_env() -> Result<Option<Stall>, String> {
        match std::env::var_os(STALL_ENV) {
            None => Ok(None),
            Some(v) => Stall::parse(&v.to_string_lossy()).map(Some),
        }
    }

    /// Parses `reader:N` or `session:N`.
    pub fn parse(v: &str) -> Result<Stall, String> {
        let bad = || format!("{STALL_ENV}={v:?}: expected reader:N or session:N");
        let (which, n) = v.split_once(':').ok_or_else(bad)?;
        let n: u64 = n.parse().map_err(|_| bad())?;
        match which {
            "reader" => Ok(Stall::Reader(n)),
            "session" => Ok(Stall::Session(n)),
            _ => Err(bad()),
        }
    }
}

/// Stops the calling thread for good (the stall hook).
fn wedge(notifier: &Notifier, which: &str) -> ! {
    tracing::warn!(thread = which, "test stall hook: this loop stops now");
    notifier.send(&[NotifyState::Custom(&format!(
        "X_MEMSHADOW_TEST_STALLED={which}"
    ))]);
    loop {
        std::thread::park();
    }
}

/// What the session loop and the uffd-reader loop share for the watchdog.
#[derive(Debug)]
struct Liveness {
    origin: Instant,
    /// When the session loop last turned, in ms since `origin`.
    session_ms: AtomicU64,
    /// Shutdown began: keep pinging while clients are released.
    stopping: AtomicBool,
    /// Watchdog pings sent.
    pings: AtomicU64,
}

impl Liveness {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Re-reads the configuration on `SIGHUP` and applies what can change at run time.
pub struct Reloader {
    sources: Sources,
    running: Config,
    set_level: SetLevel,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("sources", &self.sources)
            .field("running", &self.running)
            .finish()
    }
}

impl Reloader {
    /// `running` is what the daemon started with, from `sources`.
    pub fn new(sources: Sources, running: Config, set_level: SetLevel) -> Reloader {
        Reloader {
            sources,
            running,
            set_level,
        }
    }

    /// Reads the configuration again; applies the log level, limits and flush latency;
    /// logs, naming the keys, what changed and what needs a restart.
    pub fn reload(&mut self, core: &Core) {
        let (new, file) = match self.sources.resolve() {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(
                    "reload failed, the running configuration stays: {}",
                    error_chain(&e)
                );
                return;
            }
        };
        let file = file.map_or_else(|| "(none)".into(), |p: PathBuf| p.display().to_string());
        let changed = self.running.changed_keys(&new);
        if changed.is_empty() {
            tracing::info!(file = %file, "configuration reloaded: nothing changed");
            return;
        }
        let mut applied = self.running.with_reloadable(&new);
        if applied.log_level != self.running.log_level {
            if let Err(e) = (self.set_level)(&applied.log_level) {
                tracing::error!(error = %e, "cannot change the log level");
                applied.log_level = self.running.log_level.clone();
            }
        }
        if applied.limits() != self.running.limits() {
            core.set_limits(applied.limits());
            if applied.limits.quotas.mirrors > self.running.limits.quotas.mirrors {
                tracing::info!(
                    "quotas.mirrors raised: clients bound before keep their bind-time cap of {}",
                    self.running.limits.quotas.mirrors
                );
            }
        }
        if applied.device.engine_ack_timeout != self.running.device.engine_ack_timeout {
            core.device()
                .set_engine_ack_timeout(applied.device.engine_ack_timeout);
        }
        if applied.device.flush_latency != self.running.device.flush_latency {
            core.device()
                .set_flush_latency(applied.device.flush_latency);
        }
        let not_applied = applied.changed_keys(&new);
        let done: Vec<&str> = changed
            .iter()
            .copied()
            .filter(|k| !not_applied.contains(k))
            .collect();
        if !done.is_empty() {
            tracing::info!(file = %file, keys = %done.join(", "), "configuration reloaded");
        }
        if !not_applied.is_empty() {
            tracing::warn!(
                file = %file,
                keys = %not_applied.join(", "),
                "changed settings not applied: they need a restart"
            );
        }
        self.running = applied;
    }
}

/// The [`Supervisor`] of a daemon run as a service.
#[derive(Debug)]
pub struct Service {
    notifier: Arc<Notifier>,
    live: Arc<Liveness>,
    watchdog: Option<Duration>,
    stall: Option<Stall>,
    reloader: Reloader,
    /// The last `STATUS=` summary sent, and when the summary was last looked at.
    last_status: Option<Summary>,
    last_check: Option<Instant>,
}

impl Service {
    /// A service notifying `notifier`, pinging the watchdog every quarter of `watchdog` from
    /// the uffd-reader loop, reloading with `reloader`.
    pub fn new(
        notifier: Arc<Notifier>,
        watchdog: Option<Duration>,
        stall: Option<Stall>,
        reloader: Reloader,
    ) -> Service {
        let watchdog = watchdog.filter(|_| notifier.enabled());
        Service {
            notifier,
            live: Arc::new(Liveness {
                origin: Instant::now(),
                session_ms: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
                pings: AtomicU64::new(0),
            }),
            watchdog,
            stall,
            reloader,
            last_status: None,
            last_check: None,
        }
    }

    /// The watchdog ping for the uffd-reader loop (none without a watchdog). It pings only
    /// while the session loop also turned within half the watchdog period, so a wedge of
    /// either loop gets the daemon killed.
    pub fn heartbeat(&self) -> Option<Heartbeat> {
        let period = self.watchdog?;
        let (notifier, live) = (Arc::clone(&self.notifier), Arc::clone(&self.live));
        let stall = match self.stall {
            Some(Stall::Reader(n)) => Some(n),
            _ => None,
        };
        let limit_ms = u64::try_from((period / 2).as_millis()).unwrap_or(u64::MAX);
        let mut withheld = false;
        Some(Heartbeat {
            every: period / 4,
            beat: Box::new(move || {
                let age = live.now_ms().saturating_sub(live.session_ms.load(Relaxed));
                if age > limit_ms && !live.stopping.load(Relaxed) {
                    if !withheld {
                        tracing::error!(
                            stalled_ms = age,
                            "the session loop is not turning; withholding the watchdog ping"
                        );
                        withheld = true;
                    }
                    return;
                }
                withheld = false;
                notifier.send(&[NotifyState::Watchdog]);
                let pings = live.pings.fetch_add(1, Relaxed) + 1;
                if stall.is_some_and(|n| pings >= n) {
                    wedge(&notifier, "reader");
                }
            }),
        })
    }

    fn status_line(s: Summary) -> String {
        format!(
            "clients={} bound={} shadow_bytes={} ({:.1} MiB)",
            s.clients,
            s.bound,
            s.shadow_bytes,
            s.shadow_bytes as f64 / f64::from(1u32 << 20)
        )
    }

    /// Sends `extra` with a `STATUS=` line; unless `force`, only if the summary changed, and
    /// looks at it at most every [`STATUS_MIN_GAP`] (the periodic tick catches up).
    fn send_status(&mut self, core: &Core, force: bool, extra: &[NotifyState<'_>]) {
        let now = Instant::now();
        if !force
            && self
                .last_check
                .is_some_and(|at| now.duration_since(at) < STATUS_MIN_GAP)
        {
            return;
        }
        self.last_check = Some(now);
        let s = core.summary();
        if !force && self.last_status == Some(s) {
            return;
        }
        self.last_status = Some(s);
        let line = Self::status_line(s);
        let mut states = extra.to_vec();
        states.push(NotifyState::Status(&line));
        self.notifier.send(&states);
    }
}

impl Supervisor for Service {
    fn tick_every(&self) -> Option<Duration> {
        if !self.notifier.enabled() {
            return None;
        }
        Some(match self.watchdog {
            Some(w) => STATUS_EVERY.min(w / 4),
            None => STATUS_EVERY,
        })
    }

    fn ready(&mut self, core: &Core) {
        self.live.session_ms.store(self.live.now_ms(), Relaxed);
        self.send_status(core, true, &[NotifyState::Ready]);
        tracing::debug!(
            watchdog_ms = self.watchdog.map(|w| w.as_millis() as u64),
            notify = self.notifier.enabled(),
            "ready"
        );
    }

    fn tick(&mut self, core: &Core) {
        self.live.session_ms.store(self.live.now_ms(), Relaxed);
        if let Some(Stall::Session(n)) = self.stall {
            if self.live.pings.load(Relaxed) >= n {
                wedge(&self.notifier, "session");
            }
        }
        if self.notifier.enabled() {
            self.send_status(core, false, &[]);
        }
    }

    fn reload(&mut self, core: &Core) {
        tracing::info!("SIGHUP: reloading the configuration");
        self.notifier.reloading();
        self.reloader.reload(core);
        self.live.session_ms.store(self.live.now_ms(), Relaxed);
        self.send_status(core, true, &[NotifyState::Ready]);
    }

    fn stopping(&mut self, core: &Core) {
        self.live.stopping.store(true, Relaxed);
        let line = format!("stopping: releasing {} clients", core.summary().clients);
        self.notifier
            .send(&[NotifyState::Stopping, NotifyState::Status(&line)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_hook_is_parsed_strictly() {
        assert_eq!(Stall::parse("reader:3"), Ok(Stall::Reader(3)));
        assert_eq!(Stall::parse("session:1"), Ok(Stall::Session(1)));
        for bad in ["reader", "reader:x", "finisher:1", ""] {
            assert!(Stall::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_line_names_clients_and_shadow_bytes() {
        let l = Service::status_line(Summary {
            clients: 3,
            bound: 2,
            shadow_bytes: 3 << 20,
        });
        assert_eq!(l, "clients=3 bound=2 shadow_bytes=3145728 (3.0 MiB)");
    }
}
