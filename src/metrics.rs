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
    /// `save_award` latency.
    pub save_latency: Histogram,
}

/// Upper bounds (ms) of the latency histogram buckets; a last bucket holds the rest.
pub const LATENCY_BUCKETS_MS: [f64; 11] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
];

/// A fixed-bucket latency histogram (Prometheus style: cumulative on output).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
    /// Cumulative counts per bucket (the last is the total), and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut acc = 0;
        let cumulative = self.buckets.iter().map(|b| {
            acc += b.load(Ordering::Relaxed);
            acc
        });
        (
            cumulative.collect(),
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(5));
        let (c, sum) = h.snapshot();
        assert_eq!(c[0], 1); // <= 0.5 ms
        assert_eq!(c[3], 2); // <= 5 ms
        assert_eq!(*c.last().unwrap(), 3);
        assert!((sum - 5.0033).abs() < 1e-6);
    }
}
