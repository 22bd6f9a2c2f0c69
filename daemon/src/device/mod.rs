//! The device model (docs/design.md §4): a shadow buffer cut into slots, a device page table per
//! client, K engines with TLBs, the shadow notifier that invalidates in one or two passes,
//! and the fault path. It knows nothing of sockets or uffd: client memory comes through a
//! [`MemorySource`].

pub mod account;
mod client;
pub mod counters;
mod engine;
pub mod external;
mod mirror;
mod pagetable;
mod shadow;

use crate::lock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use account::{Account, MONITORS_PER_USER};
pub use client::{
    AccessGuard, ClientCounters, DeviceClient, EngineAttachment, MirrorInfo, Unlinked,
};
pub use counters::{DeviceCounters, Histogram};
pub use engine::{BuiltinEngine, EngineError, Engines, MAX_ENGINES};
pub use pagetable::Pte;
pub use shadow::{Shadow, ShadowError, ShadowPool, SlotRef, MAX_CAPACITY};

use crate::notifier::{InvalidateError, NotifierError, RangeError};
use crate::source::{MemorySource, SourceError};
use crate::trace::{AckRecord, TraceHub, TraceItem};

/// Most external engines one client may have (each one's page-table view is written at
/// every install and zap of its pages, under the client's device lock).
pub const MAX_EXTERNAL_ENGINES: usize = 32;

/// How shadow notifiers invalidate (docs/design.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvalidationMode {
    /// Each notifier flushes and waits before the next (the baseline).
    OnePass,
    /// Starts queue flushes on every engine; finishes wait once the walk is done.
    TwoPass,
    /// Two-pass, and one flush job per engine for the whole walk (doorbell batching).
    TwoPassBatched,
}

impl InvalidationMode {
    /// Stable name, as in the configuration and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidationMode::OnePass => "one-pass",
            InvalidationMode::TwoPass => "two-pass",
            InvalidationMode::TwoPassBatched => "two-pass-batched",
        }
    }
}

/// Device parameters.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Number of engines (1..=16).
    pub engines: usize,
    /// Modelled TLB-flush round trip.
    pub flush_latency: Duration,
    /// How notifiers invalidate.
    pub mode: InvalidationMode,
    /// How long a finish waits for an external engine's acknowledgement before evicting it.
    pub engine_ack_timeout: Duration,
    /// Shadow buffer size in bytes (page multiple).
    pub shadow_capacity: u64,
    /// Entries per engine TLB.
    pub tlb_entries: usize,
    /// Ranges one engine may collect in one walk before a flush-all is sent instead.
    pub batch_threshold: usize,
    /// How long a freed slot keeps its memory (for cheap reuse) before the reclaimer
    /// releases it: between one and two of these periods.
    pub reclaim_interval: Duration,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            engines: 2,
            flush_latency: Duration::from_micros(50),
            mode: InvalidationMode::TwoPassBatched,
            engine_ack_timeout: Duration::from_secs(1),
            shadow_capacity: 1 << 30,
            tlb_entries: 512,
            batch_threshold: 16,
            reclaim_interval: RECLAIM_INTERVAL,
        }
    }
}

/// Errors of the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The shadow buffer could not be created or is full.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// The engines could not be started.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// An external engine's shared memory could not be made.
    #[error(transparent)]
    External(#[from] external::ExternalError),
    /// A range is empty or overflows.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// Address or length not page aligned.
    #[error("range {addr:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The client has used every mirror index.
    #[error("too many mirrors")]
    TooManyMirrors,
    /// The client already has [`MAX_EXTERNAL_ENGINES`] external engines.
    #[error("too many external engines for this client (at most {MAX_EXTERNAL_ENGINES})")]
    TooManyEngines,
    /// No mirror with that id.
    #[error("no mirror {0}")]
    NoSuchMirror(u64),
    /// A device access touched an address no mirror covers.
    #[error("address {addr:#x} is not mirrored")]
    NotMirrored {
        /// The address.
        addr: u64,
    },
    /// The client's memory at the address is not mapped (any more).
    #[error("address {addr:#x} is not mapped in the client")]
    NotMapped {
        /// The address.
        addr: u64,
    },
    /// The client's shadow quota would be exceeded.
    #[error("shadow quota of {quota_bytes} bytes exceeded")]
    QuotaExceeded {
        /// The quota.
        quota_bytes: u64,
    },
    /// The share of the client's user (all its clients together) would be exceeded.
    #[error(
        "the shadow share of this user ({quota_bytes} bytes, all its clients together) is used up"
    )]
    UserQuotaExceeded {
        /// The share.
        quota_bytes: u64,
    },
    /// Reading client memory failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The notifier core refused.
    #[error(transparent)]
    Notifier(#[from] NotifierError),
    /// An invalidation failed.
    #[error(transparent)]
    Invalidate(#[from] InvalidateError),
    /// A device read kept faulting (its pages invalidated faster than it could map them).
    #[error("device read at {addr:#x} kept faulting")]
    FaultStorm {
        /// First byte of the read.
        addr: u64,
    },
    /// The device is shutting down.
    #[error("device stopped")]
    Stopped,
}

/// What every client, engine and notifier shares.
pub(crate) struct DeviceShared {
    pub(crate) pool: Arc<ShadowPool>,
    pub(crate) engines: Engines,
    pub(crate) counters: Arc<DeviceCounters>,
    pub(crate) mode: InvalidationMode,
    pub(crate) batch_threshold: usize,
    pub(crate) trace: Arc<TraceHub>,
    /// Slots only privileged users' clients may take (reloadable).
    pub(crate) reserved_slots: AtomicUsize,
    /// How long a finish waits for an external engine's acknowledgement before it evicts
    /// the engine, ns (reloadable).
    pub(crate) ack_timeout_ns: AtomicU64,
    /// External engines evicted so far.
    pub(crate) evictions: AtomicU64,
    rr: AtomicUsize,
}

impl DeviceShared {
    /// Waits for external engines' acknowledgements of `client`'s flushes (G2), evicting
    /// those that miss `engine_ack_timeout`; each wait is traced.
    pub(crate) fn wait_external(
        &self,
        client: &client::ClientCore,
        fences: &external::ExternalFences,
    ) {
        if fences.is_empty() {
            return;
        }
        let timeout = Duration::from_nanos(self.ack_timeout_ns.load(Ordering::Relaxed));
        let evicted = external::wait_all(fences, timeout, |e, seq, outcome, wait| {
            if self.trace.active() {
                self.trace.publish(TraceItem::Ack(AckRecord {
                    tag: client.trace_tag(),
                    engine: e.id(),
                    engine_pid: e.pid(),
                    seq,
                    wait,
                    outcome,
                }));
            }
        });
        counters::bump(&self.evictions, evicted as u64);
    }

    fn next_engine(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % self.engines.count()
    }

    /// Frees slots of `client` (their translations are gone from every engine, G2).
    pub(crate) fn free_slots(&self, client: &client::ClientCore, slots: &[SlotRef]) {
        if slots.is_empty() {
            return;
        }
        match client.shadow() {
            Some(shadow) => shadow.free(slots),
            None => tracing::error!(
                client = client.id(),
                "slots freed of a client with no shadow"
            ),
        }
        client.uncharge(slots.len() as u64);
        counters::bump(&self.counters.slots_freed, slots.len() as u64);
    }
}

/// How often the reclaimer releases the memory of slots free for a whole period (G5 wants
/// RSS back within a second of a client's exit; this gives it within 200 ms).
const RECLAIM_INTERVAL: Duration = Duration::from_millis(100);

/// The device: shadow buffer, engines and counters, and the factory of its clients.
pub struct Device {
    shared: Arc<DeviceShared>,
    next_client: AtomicU64,
    reclaimer: Mutex<Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("mode", &self.shared.mode)
            .field("engines", &self.shared.engines)
            .field("shadow", &self.shared.pool)
            .finish()
    }
}

impl Device {
    /// Creates the shadow buffer and starts the engines.
    pub fn new(cfg: &DeviceConfig) -> Result<Device, DeviceError> {
        let pool = Arc::new(ShadowPool::new(cfg.shadow_capacity)?);
        let counters = Arc::new(DeviceCounters::default());
        let latency = u64::try_from(cfg.flush_latency.as_nanos()).unwrap_or(u64::MAX);
        let engines = Engines::start(cfg.engines, latency, cfg.tlb_entries, Arc::clone(&counters))?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let reclaim_interval = cfg.reclaim_interval;
        let trimmed = Arc::clone(&pool);
        let reclaimer = std::thread::Builder::new()
            .name("shadow-reclaim".into())
            .spawn(move || loop {
                let stop = !matches!(
                    stop_rx.recv_timeout(reclaim_interval),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout)
                );
                if stop {
                    trimmed.trim_all();
                    return;
                }
                trimmed.trim();
            })
            .map_err(EngineError::Spawn)?;
        Ok(Device {
            reclaimer: Mutex::new(Some((stop_tx, reclaimer))),
            shared: Arc::new(DeviceShared {
                pool,
                engines,
                counters,
                mode: cfg.mode,
                batch_threshold: cfg.batch_threshold,
                trace: Arc::new(TraceHub::default()),
                reserved_slots: AtomicUsize::new(0),
                ack_timeout_ns: AtomicU64::new(
                    u64::try_from(cfg.engine_ack_timeout.as_nanos()).unwrap_or(u64::MAX),
                ),
                evictions: AtomicU64::new(0),
                rr: AtomicUsize::new(0),
            }),
            next_client: AtomicU64::new(1),
        })
    }

    /// A new client whose pages come from `source`, with a shadow quota of `quota_bytes`,
    /// charged to an account of its own with no share limit (tests, benchmarks).
    pub fn client(&self, source: Arc<dyn MemorySource>, quota_bytes: u64) -> DeviceClient {
        self.client_of(source, quota_bytes, Arc::new(Account::privileged()))
    }

    /// A new client whose pages come from `source`, with a shadow quota of `quota_bytes`,
    /// charged to its user's `account` too.
    pub fn client_of(
        &self,
        source: Arc<dyn MemorySource>,
        quota_bytes: u64,
        account: Arc<Account>,
    ) -> DeviceClient {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        DeviceClient::new(Arc::clone(&self.shared), id, source, quota_bytes, account)
    }

    /// Keeps `bytes` of the shadow for clients of privileged accounts (run-time reloadable).
    pub fn set_reserved_bytes(&self, bytes: u64) {
        let slots = usize::try_from(bytes / crate::sys::PAGE_SIZE as u64).unwrap_or(usize::MAX);
        self.shared.reserved_slots.store(slots, Ordering::Relaxed);
    }

    /// How long a flush waits for an external engine before evicting it (reloadable).
    pub fn set_engine_ack_timeout(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shared.ack_timeout_ns.store(ns, Ordering::Relaxed);
    }

    /// External engines evicted so far.
    pub fn evictions(&self) -> u64 {
        self.shared.evictions.load(Ordering::Relaxed)
    }

    /// The bus every client's invalidations are traced on.
    pub fn trace(&self) -> &Arc<TraceHub> {
        &self.shared.trace
    }

    /// The invalidation mode.
    pub fn mode(&self) -> InvalidationMode {
        self.shared.mode
    }

    /// What each built-in engine did so far.
    pub fn builtin_engines(&self) -> Vec<BuiltinEngine> {
        self.shared.engines.snapshot()
    }

    /// Number of engines.
    pub fn engine_count(&self) -> usize {
        self.shared.engines.count()
    }

    /// The modelled flush round trip.
    pub fn flush_latency(&self) -> Duration {
        Duration::from_nanos(self.shared.engines.latency_ns())
    }

    /// Changes the modelled flush round trip (run-time reloadable).
    pub fn set_flush_latency(&self, d: Duration) {
        self.shared
            .engines
            .set_latency_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Achieved flush round trips, as fence waiters saw them.
    pub fn flush_latency_histogram(&self) -> &Histogram {
        self.shared.engines.latency_histogram()
    }

    /// The device counters.
    pub fn counters(&self) -> &DeviceCounters {
        &self.shared.counters
    }

    /// The shadow memory of every client.
    pub fn shadow(&self) -> &ShadowPool {
        &self.shared.pool
    }

    /// Every counter of the device as `(name, value)`, including slot usage and achieved
    /// flush latency percentiles.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        self.shared.counters.snapshot(&mut v, "device.");
        let s = &self.shared.pool;
        v.push(("shadow.slots_total".into(), u64::from(s.capacity())));
        v.push(("shadow.slots_in_use".into(), s.in_use()));
        v.push(("shadow.slots_warm".into(), s.warm() as u64));
        v.push(("shadow.pages_punched".into(), s.punched()));
        v.push((
            "device.engine_evictions".into(),
            self.shared.evictions.load(Ordering::Relaxed),
        ));
        let h = self.flush_latency_histogram();
        v.push((
            "engine.flush_latency_target_ns".into(),
            self.shared.engines.latency_ns(),
        ));
        v.push(("engine.flush_latency_p50_us".into(), h.percentile_us(50.0)));
        v.push(("engine.flush_latency_p99_us".into(), h.percentile_us(99.0)));
        v.push(("engine.flush_latency_max_us".into(), h.percentile_us(100.0)));
        v
    }

    /// Stops the engines (after their queued jobs) and the reclaimer (after a last trim).
    pub fn shutdown(&self) {
        self.shared.engines.shutdown();
        let reclaimer = lock(&self.reclaimer).take();
        if let Some((stop, thread)) = reclaimer {
            drop(stop);
            if thread.join().is_err() {
                tracing::error!("the shadow reclaimer panicked");
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
