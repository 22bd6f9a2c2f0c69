//! A fixed pool of threads for work that may block (device reads, attach, detach, release),
//! so the number of daemon threads does not grow with the number of clients.

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send>;

/// The pool.
#[derive(Debug)]
pub struct Workers {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` (at least 1) threads named `name-N`.
    pub fn start(name: &str, n: usize) -> std::io::Result<Workers> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rx: Receiver<Job> = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })?,
            );
        }
        Ok(Workers {
            tx: Some(tx),
            threads,
        })
    }

    /// A handle to submit jobs with.
    pub fn sender(&self) -> Sender<Job> {
        match &self.tx {
            Some(tx) => tx.clone(),
            // After `join` nothing runs: a disconnected sender makes submissions fail.
            None => crossbeam_channel::bounded(0).0,
        }
    }

    /// Lets queued jobs finish (including jobs they submit while others still hold senders)
    /// and joins the threads once every sender is gone.
    pub fn join(&mut self) {
        self.tx = None;
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
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn runs_every_job_before_join_returns() {
        let mut w = Workers::start("t", 3).expect("start");
        let n = Arc::new(AtomicUsize::new(0));
        let tx = w.sender();
        for _ in 0..100 {
            let n = Arc::clone(&n);
            tx.send(Box::new(move || {
                n.fetch_add(1, Ordering::Relaxed);
            }))
            .expect("send");
        }
        drop(tx);
        w.join();
        assert_eq!(n.load(Ordering::Relaxed), 100);
    }
}
