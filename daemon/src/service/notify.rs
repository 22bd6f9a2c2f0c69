//! The service manager's notification protocol (`sd_notify`: `READY=1`, `STATUS=`,
//! `WATCHDOG=1`, `RELOADING=1`, `STOPPING=1`), sent through the `sd-notify` crate by a
//! thread of its own. Without `NOTIFY_SOCKET` every call is a no-op.
//!
//! Why a thread: a datagram to a listener whose queue is full blocks the sender
//! (`net.unix.max_dgram_qlen` is 10 by default), and the watchdog ping comes from the
//! uffd-reader loop, which must never block (docs/design.md §6: clients' `munmap` waits for it).
//! Callers only queue; the queue keeps the order; when it is full, messages are dropped
//! and counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use sd_notify::NotifyState;

/// Messages waiting for the notify thread at most.
const QUEUE: usize = 256;

enum Msg {
    Send(String),
    Flush(Sender<()>),
}

/// Queues notifications for `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    tx: Option<Sender<Msg>>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Send(s) => f.debug_tuple("Send").field(s).finish(),
            Msg::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Notifier {
    /// Enabled if `NOTIFY_SOCKET` is set; then starts the notify thread (block the handled
    /// signals first: the thread inherits the mask).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty());
        let tx = enabled.then(|| {
            let (tx, rx) = crossbeam_channel::bounded::<Msg>(QUEUE);
            let spawned = std::thread::Builder::new()
                .name("sd-notify".into())
                .spawn(move || {
                    let failed = AtomicBool::new(false);
                    for m in rx {
                        match m {
                            Msg::Send(text) => {
                                let r = sd_notify::notify(&[NotifyState::Custom(&text)]);
                                if let Err(e) = r {
                                    if failed.swap(true, Relaxed) {
                                        tracing::debug!(error = %e, "cannot notify the service manager");
                                    } else {
                                        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
                                    }
                                }
                            }
                            Msg::Flush(ack) => {
                                let _ = ack.send(());
                            }
                        }
                    }
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the notify thread; the service manager will not be notified");
                    None
                }
            }
        });
        Notifier {
            tx: tx.flatten(),
            dropped: AtomicU64::new(0),
        }
    }

    /// True if a service manager listens.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues `states` as one datagram; never blocks.
    pub fn send(&self, states: &[NotifyState<'_>]) {
        let Some(tx) = &self.tx else { return };
        let text = states
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        match tx.try_send(Msg::Send(text)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self.dropped.fetch_add(1, Relaxed) == 0 {
                    tracing::warn!(
                        "the service manager does not read its notifications; dropping them"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (systemd 253+ wants both).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// Waits up to `timeout` until everything queued so far was sent (before exiting).
    pub fn flush(&self, timeout: Duration) {
        let Some(tx) = &self.tx else { return };
        let (ack, done) = crossbeam_channel::bounded(1);
        if tx.send_timeout(Msg::Flush(ack), timeout).is_ok() {
            let _ = done.recv_timeout(timeout);
        }
    }
}

/// The watchdog period the service manager asked for (`WATCHDOG_USEC`, for this process
/// if `WATCHDOG_PID` is set).
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}
