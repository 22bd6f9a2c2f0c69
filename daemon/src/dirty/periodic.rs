//! The `periodic=MS` policy: one daemon-wide timer thread, whatever the number of clients
//! and mirrors. It only keeps the deadlines; each due collection runs as a job on the worker
//! pool, and a mirror whose previous collection is still running skips a beat rather than
//! piling jobs up.

use crate::lock;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::workers::{Job, Key, Submitter};

/// The shortest period: a collection scans every page of the mirror, and a client with
/// many mirrors at a shorter period would keep the workers busy for nobody else.
pub const MIN_PERIOD: Duration = Duration::from_millis(10);

/// What the timer collects for.
pub trait PeriodicTarget: Send + Sync {
    /// Collects the written pages of mirror `mirror`. Returns false once the mirror is gone
    /// or no longer periodic (the timer then forgets it).
    fn periodic_sync(&self, mirror: u64) -> bool;
}

struct Entry {
    target: Weak<dyn PeriodicTarget>,
    /// The workers' fairness key of the client.
    key: Key,
    mirror: u64,
    period: Duration,
    busy: Arc<AtomicBool>,
    /// Set by a job that found the mirror gone.
    gone: Arc<AtomicBool>,
}

/// The timer thread's state: the next beat of every entry, earliest first.
#[derive(Default)]
struct Timer {
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    entries: HashMap<u64, Entry>,
    next_key: u64,
}

impl Timer {
    /// Takes new entries from `rx` and submits the due collections to `jobs`, until the
    /// [`Periodic`] is stopped (or dropped).
    fn run(mut self, rx: &Receiver<Entry>, jobs: &Submitter) {
        loop {
            let wait = self
                .due
                .peek()
                .map_or(Duration::from_secs(3600), |Reverse((t, _))| {
                    t.saturating_duration_since(Instant::now())
                });
            match rx.recv_timeout(wait) {
                Ok(e) => {
                    self.due
                        .push(Reverse((Instant::now() + e.period, self.next_key)));
                    self.entries.insert(self.next_key, e);
                    self.next_key += 1;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.fire(jobs);
        }
    }

    /// Submits a collection for every entry due now, unless its previous one still runs
    /// (it skips a beat), and forgets the entries whose target or mirror is gone.
    fn fire(&mut self, jobs: &Submitter) {
        let now = Instant::now();
        while let Some(&Reverse((t, key))) = self.due.peek() {
            if t > now {
                break;
            }
            self.due.pop();
            let Some(e) = self.entries.get(&key) else {
                continue;
            };
            let Some(target) = e.target.upgrade() else {
                self.entries.remove(&key);
                continue;
            };
            // A job sets `gone` before it clears `busy`: once `busy` is ours, `gone` is
            // final.
            if !e.busy.swap(true, SeqCst) {
                if e.gone.load(SeqCst) {
                    self.entries.remove(&key);
                    continue;
                }
                let (busy, gone, mirror) = (Arc::clone(&e.busy), Arc::clone(&e.gone), e.mirror);
                let job: Job = Box::new(move || {
                    if !target.periodic_sync(mirror) {
                        gone.store(true, SeqCst);
                    }
                    busy.store(false, SeqCst);
                });
                jobs.submit(e.key, job);
            }
            // The next beat counts from now if this one came late.
            self.due.push(Reverse(((t + e.period).max(now), key)));
        }
    }
}

/// The timer.
pub struct Periodic {
    tx: Mutex<Option<Sender<Entry>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Periodic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Periodic").finish_non_exhaustive()
    }
}

impl Periodic {
    /// Starts the timer thread; due collections go to `jobs`.
    pub fn start(jobs: Submitter) -> std::io::Result<Periodic> {
        let (tx, rx) = crossbeam_channel::unbounded::<Entry>();
        let thread = std::thread::Builder::new()
            .name("dirty-timer".into())
            .spawn(move || Timer::default().run(&rx, &jobs))?;
        Ok(Periodic {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Collects mirror `mirror` of `target` every `period` (at least [`MIN_PERIOD`]) until
    /// it reports the mirror gone or `target` is dropped; the collections run on the workers
    /// under `key` (the client's uid).
    pub fn add(&self, target: Weak<dyn PeriodicTarget>, mirror: u64, period: Duration, key: Key) {
        let e = Entry {
            target,
            key,
            mirror,
            period: period.max(MIN_PERIOD),
            busy: Arc::default(),
            gone: Arc::default(),
        };
        if let Some(tx) = &*lock(&self.tx) {
            let _ = tx.send(e);
        }
    }

    /// Stops the thread (it holds a sender of the worker pool: stop it before joining that).
    pub fn stop(&self) {
        lock(&self.tx).take();
        let t = lock(&self.thread).take();
        if let Some(t) = t {
            if t.join().is_err() {
                tracing::error!("the dirty-tracking timer panicked");
            }
        }
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    struct Counter {
        n: AtomicU64,
        stop_after: u64,
    }

    impl PeriodicTarget for Counter {
        fn periodic_sync(&self, mirror: u64) -> bool {
            assert_eq!(mirror, 7);
            self.n.fetch_add(1, Relaxed) + 1 < self.stop_after
        }
    }

    #[test]
    fn runs_on_the_pool_until_the_target_says_the_mirror_is_gone() {
        let mut pool = crate::workers::Workers::start("t", 1).expect("workers");
        let p = Periodic::start(pool.submitter().expect("submitter")).expect("timer");
        let c = Arc::new(Counter {
            n: AtomicU64::new(0),
            stop_after: 3,
        });
        let weak: Weak<dyn PeriodicTarget> =
            Arc::downgrade(&(Arc::clone(&c) as Arc<dyn PeriodicTarget>));
        p.add(weak, 7, MIN_PERIOD, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.n.load(Relaxed) < 3 {
            assert!(Instant::now() < deadline, "the timer never ran 3 times");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Told "gone" at the third run: it is forgotten, so the count stays at 3 for good
        // once the in-flight beat (if any) is done.
        p.stop();
        pool.join();
        assert_eq!(c.n.load(Relaxed), 3);
    }
}
