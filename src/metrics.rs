//! Process-wide counters, read by `status`, `load` and tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of what this process did. Cheap to bump from any thread.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Awards committed.
    pub awards_saved: AtomicU64,
    /// Awards refused as duplicate order ids.
    pub duplicates: AtomicU64,
    /// Publishes confirmed.
    pub publish_confirmed: AtomicU64,
    /// Publishes failed (any reason).
    pub publish_failed: AtomicU64,
    /// Tasks parked as dead.
    pub tasks_dead: AtomicU64,
    /// Scanner passes.
    pub scans: AtomicU64,
    /// Tasks the scanner claimed and relayed.
    pub relayed: AtomicU64,
    /// Relay jobs that ran on the scanner's own thread (pool full).
    pub ran_on_caller: AtomicU64,
    /// Messages delivered for the first time.
    pub delivered: AtomicU64,
    /// Messages that arrived again and changed nothing.
    pub redelivered: AtomicU64,
    /// Messages rejected as unprocessable.
    pub poison: AtomicU64,
}

impl Metrics {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
