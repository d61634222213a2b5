//! A bounded thread pool whose overflow runs on the submitting thread (caller-runs). When the
//! queue is full the submitter does the work itself, which slows the producer instead of
//! dropping work or growing memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender, TrySendError};

use crate::error::Result;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Where a submitted job ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Queued for a pool thread.
    Queued,
    /// The queue was full; it already ran on the caller's thread.
    RanOnCaller,
}

/// The pool. Dropping it finishes the queued jobs and joins every thread.
pub struct CallerRunsPool {
    tx: Option<Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
    ran_on_caller: AtomicU64,
}

impl CallerRunsPool {
    /// `threads` named workers and a queue of `capacity` jobs.
    pub fn new(name: &str, threads: usize, capacity: usize) -> Result<Self> {
        let (tx, rx) = bounded::<Job>(capacity);
        let handles = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                crate::util::spawn(format!("{name}-{i}"), move || {
                    for job in rx {
                        job();
                    }
                })
            })
            .collect::<Result<_>>()?;
        Ok(CallerRunsPool {
            tx: Some(tx),
            handles,
            ran_on_caller: AtomicU64::new(0),
        })
    }

    /// Queue a job, or run it now on this thread if the queue is full.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Submitted {
        let tx = self.tx.as_ref().expect("pool is running until dropped");
        match tx.try_send(Box::new(job)) {
            Ok(()) => Submitted::Queued,
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                self.ran_on_caller.fetch_add(1, Ordering::Relaxed);
                job();
                Submitted::RanOnCaller
            }
        }
    }

    /// Jobs that ran on a caller's thread so far.
    pub fn ran_on_caller(&self) -> u64 {
        self.ran_on_caller.load(Ordering::Relaxed)
    }
}

impl Drop for CallerRunsPool {
    fn drop(&mut self) {
        self.tx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::unbounded;
    use std::sync::{Arc, Barrier};

    #[test]
    fn overflow_runs_on_the_caller_and_nothing_is_dropped() {
        let pool = CallerRunsPool::new("t", 1, 1).unwrap();
        // Hold the only worker until released.
        let gate = Arc::new(Barrier::new(2));
        let (done_tx, done_rx) = unbounded();
        let g = gate.clone();
        let d = done_tx.clone();
        assert_eq!(
            pool.submit(move || {
                g.wait();
                d.send("blocked").unwrap();
            }),
            Submitted::Queued
        );
        // Wait until the worker has taken it, so the queue is empty again.
        assert!(crate::util::wait_until(
            std::time::Duration::from_secs(5),
            || pool.tx.as_ref().unwrap().is_empty()
        ));
        let d = done_tx.clone();
        assert_eq!(
            pool.submit(move || d.send("queued").unwrap()),
            Submitted::Queued
        );
        let caller = std::thread::current().id();
        let (tid_tx, tid_rx) = unbounded();
        let d = done_tx.clone();
        assert_eq!(
            pool.submit(move || {
                tid_tx.send(std::thread::current().id()).unwrap();
                d.send("overflow").unwrap();
            }),
            Submitted::RanOnCaller
        );
        assert_eq!(tid_rx.recv().unwrap(), caller);
        assert_eq!(pool.ran_on_caller(), 1);
        gate.wait();
        drop(pool);
        drop(done_tx);
        let mut got: Vec<&str> = done_rx.iter().collect();
        got.sort();
        assert_eq!(got, vec!["blocked", "overflow", "queued"]);
    }
}
