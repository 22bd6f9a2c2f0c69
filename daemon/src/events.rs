//! The uffd event source (docs/design.md §6): one reader thread polls every bound client's
//! userfaultfd, reads events in batches and runs their start passes under the client's access
//! lock (G1); a finisher thread runs the finish passes in order, so reading the next event
//! never waits for a flush while each invalidation stays open until its finish is done.
//! The reader never waits on anything a client can hold: not its socket, not its memory.

use crate::lock;
use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::address_space::{AddressSpace, Deferred};
use crate::notifier::Invalidation;
use crate::sys::uffd::UffdEvent;
use crate::workers::{Key, Submitter};

/// Events read from one uffd at most per batch.
pub const BATCH: usize = 64;
/// How soon the reader comes back to a client that needs it with no event to wake it
/// ([`AddressSpace::needs_revisit`]: un-protects of write faults to retry, fences to lift), ms.
const REVISIT_MS: u16 = 1;
const STOP: u64 = u64::MAX;

/// Errors of the event source.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// epoll or eventfd failed.
    #[error("event source setup failed")]
    Setup(#[source] nix::Error),
    /// A thread could not be started.
    #[error("cannot start the event reader")]
    Spawn(#[source] std::io::Error),
    /// The client was released before it was watched.
    #[error("client already released")]
    Released,
}

/// The watched clients by id, with the worker key their background work is queued under.
type Registry = Arc<RwLock<HashMap<u64, (Arc<AddressSpace>, Key)>>>;

/// The reader and finisher threads and the set of watched clients.
#[derive(Debug)]
pub struct EventReader {
    epoll: Arc<Epoll>,
    registry: Registry,
    stop: Arc<EventFd>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// Called with the id of a client whose uffd hung up or failed.
pub type Hangup = Box<dyn Fn(u64) + Send>;

/// Called by the reader thread itself at least every `every` while its loop turns (the
/// service watchdog, G6: a wedged reader stops calling it and gets killed).
pub struct Heartbeat {
    /// Longest time between two calls while the reader is healthy.
    pub every: std::time::Duration,
    /// The call.
    pub beat: Box<dyn FnMut() + Send>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("every", &self.every)
            .finish()
    }
}

impl EventReader {
    /// Starts the threads. Detaches of retired mirrors go to `jobs`; `hangup` is told the ids
    /// of clients whose uffd hung up.
    pub fn start(jobs: Submitter, hangup: Hangup) -> Result<EventReader, EventError> {
        Self::start_with(jobs, hangup, None)
    }

    /// [`EventReader::start`], with a `heartbeat` called from the reader loop.
    pub fn start_with(
        jobs: Submitter,
        hangup: Hangup,
        heartbeat: Option<Heartbeat>,
    ) -> Result<EventReader, EventError> {
        let epoll =
            Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(EventError::Setup)?);
        let stop = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(EventError::Setup)?,
        );
        epoll
            .add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))
            .map_err(EventError::Setup)?;
        let registry: Registry = Arc::default();
        let (fin_tx, fin_rx) = crossbeam_channel::unbounded::<Vec<Invalidation>>();
        let finisher = std::thread::Builder::new()
            .name("uffd-finish".into())
            .spawn(move || {
                for batch in fin_rx {
                    for inv in batch {
                        inv.finish();
                    }
                }
            })
            .map_err(EventError::Spawn)?;
        let reader = {
            let (epoll, registry) = (Arc::clone(&epoll), Arc::clone(&registry));
            std::thread::Builder::new()
                .name("uffd-reader".into())
                .spawn(move || reader_loop(&epoll, &registry, &fin_tx, &jobs, &hangup, heartbeat))
                .map_err(EventError::Spawn)?
        };
        Ok(EventReader {
            epoll,
            registry,
            stop,
            threads: std::sync::Mutex::new(vec![reader, finisher]),
        })
    }

    /// Starts reading the events of client `id`; its background work goes to the workers
    /// under `key`.
    pub fn watch(&self, id: u64, w: Arc<AddressSpace>, key: Key) -> Result<(), EventError> {
        let added = w.with_uffd(|u| {
            self.epoll
                .add(u.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, id))
        });
        match added {
            None => return Err(EventError::Released),
            Some(r) => r.map_err(EventError::Setup)?,
        }
        self.registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (w, key));
        Ok(())
    }

    /// Stops watching client `id` (after its release closed the uffd, or before).
    pub fn unwatch(&self, id: u64) -> Option<Arc<AddressSpace>> {
        let w = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)?
            .0;
        w.with_uffd(|u| {
            let _ = self.epoll.delete(u.as_fd());
        });
        Some(w)
    }

    /// Clients watched.
    pub fn len(&self) -> usize {
        self.registry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True if no client is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops the reader, then lets the finisher run what is queued.
    pub fn stop(&self) {
        let threads = std::mem::take(&mut *lock(&self.threads));
        if threads.is_empty() {
            return;
        }
        if let Err(e) = self.stop.write(1) {
            tracing::error!(error = %e, "cannot signal the event reader");
        }
        for t in threads {
            if t.join().is_err() {
                tracing::error!("an event thread panicked");
            }
        }
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The reader thread's loop: waits on every client's uffd, serves the ones with events, and
/// comes back to the clients that need it (un-protects to retry, fences to lift) every
/// [`REVISIT_MS`] while they do. Calls `heartbeat` while it turns.
fn reader_loop(
    epoll: &Epoll,
    registry: &Registry,
    finisher: &Sender<Vec<Invalidation>>,
    jobs: &Submitter,
    hangup: &Hangup,
    mut heartbeat: Option<Heartbeat>,
) {
    let mut reader = Reader {
        epoll,
        registry,
        finisher,
        jobs,
        hangup,
        buf: userfaultfd::EventBuffer::new(BATCH),
        scratch: Vec::with_capacity(BATCH),
        revisit: HashSet::new(),
    };
    let mut events = vec![EpollEvent::empty(); 64];
    let mut last_beat = Instant::now();
    loop {
        let mut timeout = beat(heartbeat.as_mut(), &mut last_beat);
        if !reader.revisit.is_empty() {
            timeout = EpollTimeout::from(REVISIT_MS);
        }
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait on userfaultfds failed; the event reader stops");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == STOP {
                return;
            }
            reader.serve(ev);
        }
        if !reader.revisit.is_empty() {
            reader.revisit_clients();
        }
    }
}

/// Calls the heartbeat if it is due, and returns how long the reader may wait for events
/// before the next one is (forever without a heartbeat).
fn beat(heartbeat: Option<&mut Heartbeat>, last_beat: &mut Instant) -> EpollTimeout {
    let Some(hb) = heartbeat else {
        return EpollTimeout::NONE;
    };
    if last_beat.elapsed() >= hb.every {
        (hb.beat)();
        *last_beat = Instant::now();
    }
    let left = hb.every.saturating_sub(last_beat.elapsed());
    EpollTimeout::try_from(left.as_millis().saturating_add(1)).unwrap_or(EpollTimeout::MAX)
}

/// What the reader thread works with: the threads and tables it shares with the
/// [`EventReader`], its buffers, and the clients to come back to.
struct Reader<'a> {
    epoll: &'a Epoll,
    registry: &'a Registry,
    finisher: &'a Sender<Vec<Invalidation>>,
    jobs: &'a Submitter,
    hangup: &'a Hangup,
    buf: userfaultfd::EventBuffer,
    scratch: Vec<UffdEvent>,
    /// Clients to come back to soon ([`AddressSpace::needs_revisit`]).
    revisit: HashSet<u64>,
}

impl Reader<'_> {
    /// Serves the client whose uffd `ev` reports: reads a batch of its events and runs their
    /// start passes (G1), hands the rest off the reader's path, and releases a client whose
    /// uffd hung up or failed.
    fn serve(&mut self, ev: &EpollEvent) {
        let id = ev.data();
        let Some((w, key)) = self.client(id) else {
            return;
        };
        if ev
            .events()
            .intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP)
        {
            self.drop_client(id, &w);
            return;
        }
        let mut out = Deferred::default();
        match w.read_events(&mut self.buf, &mut self.scratch, &mut out) {
            Ok(_) if w.needs_revisit() => {
                self.revisit.insert(id);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(client = id, error = %e, "reading userfaultfd events failed; releasing the client");
                self.drop_client(id, &w);
            }
        }
        if w.device().has_external_engines() {
            // Those finishes may wait for other processes' acknowledgements (up to
            // `engine_ack_timeout_ms`): on the client's key of the worker pool, where they
            // hold up this user's work only, not the finisher every client shares.
            let finishes = out.finishes;
            if !finishes.is_empty() {
                self.jobs.submit(key, Box::new(move || drop(finishes)));
            }
        } else {
            self.finish_later(out.finishes);
        }
        if !out.detach.is_empty() {
            let devs = out.detach;
            self.jobs
                .submit(key, Box::new(move || w.detach_device_mirrors(&devs)));
        }
    }

    /// Comes back to the clients that asked for it: retries their un-protects, and has a
    /// worker settle their fences (settling may wait for the client's mmap lock: never on
    /// this thread).
    fn revisit_clients(&mut self) {
        let clients: Vec<_> = {
            let reg = self.registry.read().unwrap_or_else(PoisonError::into_inner);
            self.revisit
                .drain()
                .filter_map(|id| Some((id, reg.get(&id)?.clone())))
                .collect()
        };
        let mut out = Deferred::default();
        for (id, (w, key)) in clients {
            let visit = w.revisit(&mut out);
            if visit.settle {
                let w2 = Arc::clone(&w);
                self.jobs.submit(key, Box::new(move || w2.settle_fences()));
            }
            if visit.again {
                self.revisit.insert(id);
            }
        }
        self.finish_later(out.finishes);
    }

    /// The client `id` and its workers' key, if it is still watched.
    fn client(&self, id: u64) -> Option<(Arc<AddressSpace>, Key)> {
        self.registry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Stops polling client `id`'s uffd and tells `hangup`, which releases the client.
    fn drop_client(&self, id: u64, w: &AddressSpace) {
        w.with_uffd(|u| {
            let _ = self.epoll.delete(u.as_fd());
        });
        (self.hangup)(id);
    }

    /// Sends finish passes to the finisher thread, in order. If the finisher is gone
    /// (shutdown), dropping the batch here finishes them on this thread, which keeps G3.
    fn finish_later(&self, finishes: Vec<Invalidation>) {
        if finishes.is_empty() {
            return;
        }
        if let Err(crossbeam_channel::SendError(batch)) = self.finisher.send(finishes) {
            drop(batch);
        }
    }
}
