//! A transport wrapper that fails on command: the broker "down", every message refused, or
//! messages whose body contains a marker refused; or, from a [`FaultPlan`], at random: refused
//! messages, dropped connections and delayed confirms. Counts what reached the inner transport.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{ConsumerHandle, Handler, Outgoing, PublishFailure, Transport};
use crate::config::FaultPlan;
use crate::error::Result;
use crate::util::Rng;

/// A scriptable, fault-injecting transport around another one.
pub struct Faulty {
    inner: Arc<dyn Transport>,
    down: AtomicBool,
    refuse_all: AtomicBool,
    refuse_marker: Mutex<Option<String>>,
    forwarded: AtomicU64,
    refused: AtomicU64,
    plan: FaultPlan,
    batches: AtomicU64,
    rng: Mutex<Rng>,
    /// While true, every publish waits at the gate (a broker that accepts nothing yet).
    held: Mutex<bool>,
    gate: Condvar,
}

impl Faulty {
    /// Wrap a transport; no faults until told.
    pub fn new(inner: Arc<dyn Transport>) -> Self {
        Faulty::with_plan(inner, FaultPlan::default())
    }
    /// Wrap a transport with random faults.
    pub fn with_plan(inner: Arc<dyn Transport>, plan: FaultPlan) -> Self {
        Faulty {
            inner,
            down: AtomicBool::new(false),
            refuse_all: AtomicBool::new(false),
            refuse_marker: Mutex::new(None),
            forwarded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            plan,
            batches: AtomicU64::new(0),
            rng: Mutex::new(Rng::new()),
            held: Mutex::new(false),
            gate: Condvar::new(),
        }
    }
    /// Make every publish block until released (`false`).
    pub fn hold(&self, on: bool) {
        *self.held.lock().unwrap() = on;
        self.gate.notify_all();
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

    fn publish_with_faults(
        &self,
        batch: &[Outgoing],
        hold: &dyn Fn() -> bool,
    ) -> Vec<Result<(), PublishFailure>> {
        let unavailable = |why: &str| {
            batch
                .iter()
                .map(|_| Err(PublishFailure::Unavailable(why.to_string())))
                .collect()
        };
        drop(
            self.gate
                .wait_while(self.held.lock().unwrap(), |held| *held)
                .unwrap(),
        );
        if self.down.load(Ordering::SeqCst) {
            return unavailable("injected: broker down");
        }
        let n = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        if self.plan.drop_every > 0 && n.is_multiple_of(self.plan.drop_every) {
            return unavailable("injected: connection dropped");
        }
        let marker = self.refuse_marker.lock().unwrap().clone();
        let all = self.refuse_all.load(Ordering::SeqCst);
        let refused: Vec<bool> = {
            let mut rng = self.rng.lock().unwrap();
            batch
                .iter()
                .map(|m| {
                    all || marker.as_deref().is_some_and(|k| m.body.contains(k))
                        || (self.plan.refuse > 0.0 && rng.next_f64() < self.plan.refuse)
                })
                .collect()
        };
        let pass: Vec<Outgoing> = batch
            .iter()
            .zip(&refused)
            .filter(|(_, r)| !**r)
            .map(|(m, _)| m.clone())
            .collect();
        self.forwarded
            .fetch_add(pass.len() as u64, Ordering::SeqCst);
        let mut inner = self.inner.publish_batch(&pass, hold).into_iter();
        if !self.plan.delay.is_zero() {
            // The injected fault is the delay itself: confirms come back late.
            std::thread::sleep(self.plan.delay);
        }
        refused
            .into_iter()
            .map(|refuse| {
                if refuse {
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
}

impl Transport for Faulty {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    fn publish_batch(
        &self,
        batch: &[Outgoing],
        hold: &dyn Fn() -> bool,
    ) -> Vec<Result<(), PublishFailure>> {
        let started = crate::util::now_ms();
        let results = self.publish_with_faults(batch, hold);
        if let Some(path) = &self.plan.record {
            let ended = crate::util::now_ms();
            let lines: String = batch
                .iter()
                .map(|m| format!("{} {started} {ended}\n", m.message_id))
                .collect();
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()));
            if let Err(e) = written {
                log::warn!("could not record publishes in {}: {e}", path.display());
            }
        }
        results
    }

    fn is_connected(&self) -> bool {
        !self.down.load(Ordering::SeqCst) && self.inner.is_connected()
    }

    fn broker(&self) -> Option<super::BrokerInfo> {
        self.inner.broker()
    }

    fn start_consumer(
        &self,
        handler: Arc<dyn Handler>,
        threads: usize,
    ) -> Result<Box<dyn ConsumerHandle>> {
        self.inner.start_consumer(handler, threads)
    }
}
