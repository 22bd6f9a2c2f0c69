//! A fixed pool of threads for work that may block (device reads, attach, detach, release,
//! periodic collections), so the number of daemon threads does not grow with the number of
//! clients, shared fairly: each job carries a key (the uid of the client it serves), and
//! the threads take jobs from the keys in turn. A user who queues a thousand slow requests
//! delays its own, not everybody else's: another user's next job runs as soon as a thread
//! is free, after at most one job of each other waiting user.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send>;

/// Whose work a job is: jobs of one key run in submission order, keys take turns.
pub type Key = u32;

#[derive(Default)]
struct State {
    /// Waiting jobs per key; a key is in `turns` exactly while its queue is not empty.
    queues: HashMap<Key, VecDeque<Job>>,
    /// The keys with waiting jobs, in the order they get their next turn.
    turns: VecDeque<Key>,
    /// Live [`Submitter`]s; the threads stop once it is zero and nothing waits.
    submitters: usize,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next job in turn, waiting for one; `None` when no job can come any more.
    fn next(&self) -> Option<Job> {
        let mut st = self.state();
        loop {
            if let Some(key) = st.turns.pop_front() {
                let (job, more) = match st.queues.get_mut(&key) {
                    Some(q) => (q.pop_front(), !q.is_empty()),
                    None => (None, false),
                };
                if more {
                    st.turns.push_back(key);
                } else {
                    st.queues.remove(&key);
                }
                if job.is_some() {
                    return job;
                }
                continue;
            }
            if st.submitters == 0 {
                return None;
            }
            st = self.ready.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A handle to submit jobs with; the pool keeps running while any exists.
pub struct Submitter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter").finish_non_exhaustive()
    }
}

impl Submitter {
    /// Queues `job` behind the other jobs of `key`.
    pub fn submit(&self, key: Key, job: Job) {
        let mut st = self.shared.state();
        let q = st.queues.entry(key).or_default();
        let first = q.is_empty();
        q.push_back(job);
        if first {
            st.turns.push_back(key);
        }
        drop(st);
        self.shared.ready.notify_one();
    }

    /// Jobs waiting (not running).
    pub fn waiting(&self) -> usize {
        self.shared.state().queues.values().map(VecDeque::len).sum()
    }
}

impl Clone for Submitter {
    fn clone(&self) -> Self {
        self.shared.state().submitters += 1;
        Submitter {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Submitter {
    fn drop(&mut self) {
        let mut st = self.shared.state();
        st.submitters -= 1;
        if st.submitters == 0 {
            drop(st);
            self.shared.ready.notify_all();
        }
    }
}

/// The pool.
#[derive(Debug)]
pub struct Workers {
    submitter: Option<Submitter>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` (at least 1) threads named `name-N`.
    pub fn start(name: &str, n: usize) -> std::io::Result<Workers> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                submitters: 1,
                ..State::default()
            }),
            ready: Condvar::new(),
        });
        let submitter = Submitter {
            shared: Arc::clone(&shared),
        };
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let shared = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        while let Some(job) = shared.next() {
                            job();
                        }
                    })?,
            );
        }
        Ok(Workers {
            submitter: Some(submitter),
            threads,
        })
    }

    /// A handle to submit jobs with (`None` after [`Workers::join`]).
    pub fn submitter(&self) -> Option<Submitter> {
        self.submitter.clone()
    }

    /// Lets queued jobs finish (including jobs they submit while others still hold
    /// submitters) and joins the threads once every submitter is gone.
    pub fn join(&mut self) {
        self.submitter = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_before_join_returns() {
        let mut w = Workers::start("t", 3).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let tx = w.submitter().unwrap();
        for i in 0..100 {
            let n = Arc::clone(&n);
            tx.submit(
                i % 7,
                Box::new(move || {
                    n.fetch_add(1, Ordering::Relaxed);
                }),
            );
        }
        drop(tx);
        w.join();
        assert_eq!(n.load(Ordering::Relaxed), 100);
    }

    /// One key floods the pool; another key's single job runs after at most one more job of
    /// the flooding key, not after the whole flood (it would with one FIFO queue).
    #[test]
    fn keys_take_turns() {
        let mut w = Workers::start("t", 1).unwrap();
        let tx = w.submitter().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        // Hold the only thread until everything is queued.
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
        tx.submit(
            1,
            Box::new(move || {
                let _ = go_rx.recv();
            }),
        );
        for i in 0..50 {
            let order = Arc::clone(&order);
            tx.submit(1, Box::new(move || order.lock().unwrap().push((1, i))));
        }
        {
            let order = Arc::clone(&order);
            tx.submit(2, Box::new(move || order.lock().unwrap().push((2, 0))));
        }
        go_tx.send(()).unwrap();
        drop(tx);
        w.join();
        let order = order.lock().unwrap();
        let pos = order.iter().position(|&(k, _)| k == 2).unwrap();
        assert!(
            pos <= 1,
            "key 2 waited behind {pos} jobs of key 1: {order:?}"
        );
        let ones: Vec<i32> = order
            .iter()
            .filter(|(k, _)| *k == 1)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(
            ones,
            (0..50).collect::<Vec<_>>(),
            "one key's jobs stay in order"
        );
    }
}
