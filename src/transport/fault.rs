//! A transport wrapper that fails on command: the broker "down", every message refused, or
//! messages whose body contains a marker refused. Counts what reached the inner transport.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{ConsumerHandle, Handler, Outgoing, PublishFailure, Transport};
use crate::error::Result;

/// A scriptable, fault-injecting transport around another one.
pub struct Faulty {
    inner: Arc<dyn Transport>,
    down: AtomicBool,
    refuse_all: AtomicBool,
    refuse_marker: Mutex<Option<String>>,
    forwarded: AtomicU64,
    refused: AtomicU64,
}

impl Faulty {
    /// Wrap a transport; no faults until told.
    pub fn new(inner: Arc<dyn Transport>) -> Self {
        Faulty {
            inner,
            down: AtomicBool::new(false),
            refuse_all: AtomicBool::new(false),
            refuse_marker: Mutex::new(None),
            forwarded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }
    /// Behave as an unreachable broker (not counted against tasks).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    /// Refuse every message (counted against tasks).
    pub fn refuse_all(&self, on: bool) {
        self.refuse_all.store(on, Ordering::SeqCst);
    }
    /// Refuse messages whose body contains `marker`.
    pub fn refuse_containing(&self, marker: Option<&str>) {
        *self.refuse_marker.lock().unwrap() = marker.map(str::to_string);
    }
    /// Messages passed to the inner transport.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }
    /// Messages refused by a scripted fault.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Transport for Faulty {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    fn publish_batch(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishFailure>> {
        if self.down.load(Ordering::SeqCst) {
            return batch
                .iter()
                .map(|_| Err(PublishFailure::Unavailable("injected: broker down".into())))
                .collect();
        }
        let marker = self.refuse_marker.lock().unwrap().clone();
        let refuse = |m: &Outgoing| {
            self.refuse_all.load(Ordering::SeqCst)
                || marker.as_deref().is_some_and(|k| m.body.contains(k))
        };
        let pass: Vec<Outgoing> = batch.iter().filter(|m| !refuse(m)).cloned().collect();
        self.forwarded
            .fetch_add(pass.len() as u64, Ordering::SeqCst);
        let mut inner = self.inner.publish_batch(&pass).into_iter();
        batch
            .iter()
            .map(|m| {
                if refuse(m) {
                    self.refused.fetch_add(1, Ordering::SeqCst);
                    Err(PublishFailure::Rejected(
                        "injected: refused by broker".into(),
                    ))
                } else {
                    inner.next().expect("one result per forwarded message")
                }
            })
            .collect()
    }

    fn is_connected(&self) -> bool {
        !self.down.load(Ordering::SeqCst) && self.inner.is_connected()
    }

    fn start_consumer(
        &self,
        handler: Arc<dyn Handler>,
        threads: usize,
    ) -> Result<Box<dyn ConsumerHandle>> {
        self.inner.start_consumer(handler, threads)
    }
}
