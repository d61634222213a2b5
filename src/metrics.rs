//! Process-wide counters, read by `status`, `load` and tests, and their Prometheus exposition
//! (OpenMetrics text through `prometheus-client`) for `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::counts::Counts;
use crate::model::{AwardState, TaskState};
use crate::router::db_name;
use crate::store::ShardStatus;

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
    /// Messages of the original's form (no order id) recorded in the delivery log, first
    /// receipts and repeats alike.
    pub original_messages: AtomicU64,
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

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A snapshot of the latency histogram, encoded as a Prometheus histogram.
#[derive(Debug)]
struct LatencySnapshot {
    /// (upper bound in seconds, count in that bucket alone); the last bound is +Inf.
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl LatencySnapshot {
    fn of(h: &Histogram) -> LatencySnapshot {
        let (cumulative, sum) = h.snapshot();
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_MS
            .iter()
            .map(|ms| ms / 1000.0)
            .chain(std::iter::once(f64::INFINITY))
            .zip(&cumulative)
            .map(|(bound, c)| {
                let in_bucket = c - below;
                below = *c;
                (bound, in_bucket)
            })
            .collect();
        LatencySnapshot {
            buckets,
            sum,
            count: below,
        }
    }
}

impl EncodeMetric for LatencySnapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels = Vec<(&'static str, String)>;

/// The exposition of the counters, per-shard state and the broker, in OpenMetrics text. Metric
/// names: `big_market_<counter>_total`, `big_market_tasks{shard,state}`,
/// `big_market_awards{shard,state}`, `big_market_oldest_pending_task_age_seconds{shard}`,
/// `big_market_shard_counts_age_seconds` (how old the shard counts are: see [`crate::counts`]),
/// `big_market_broker_connected`, `big_market_save_latency_seconds` (histogram).
pub fn render(
    m: &Metrics,
    counts: &Counts,
    broker_connected: bool,
    broker: Option<&crate::transport::BrokerInfo>,
    now_ms: i64,
) -> String {
    let statuses: &[ShardStatus] = &counts.shards;
    let mut r = Registry::with_prefix("big_market");
    let counters: [(&str, &str, &AtomicU64); 12] = [
        ("awards_saved", "Awards committed", &m.awards_saved),
        (
            "duplicates",
            "Awards refused as duplicate order ids",
            &m.duplicates,
        ),
        (
            "publish_confirmed",
            "Publishes confirmed",
            &m.publish_confirmed,
        ),
        ("publish_failed", "Publishes that failed", &m.publish_failed),
        ("tasks_dead", "Tasks parked as dead", &m.tasks_dead),
        ("scans", "Scanner passes", &m.scans),
        (
            "relayed",
            "Tasks the scanner claimed and relayed",
            &m.relayed,
        ),
        (
            "relay_ran_on_caller",
            "Relay jobs run on the scanner's thread (pool full)",
            &m.ran_on_caller,
        ),
        ("delivered", "Awards delivered", &m.delivered),
        (
            "redelivered",
            "Messages that arrived again and changed nothing",
            &m.redelivered,
        ),
        ("poison", "Messages rejected as unprocessable", &m.poison),
        (
            "original_messages",
            "Messages of the original's form (no orderId) recorded in the delivery log",
            &m.original_messages,
        ),
    ];
    for (name, help, c) in counters {
        r.register(name, help, ConstCounter::new(Metrics::get(c)));
    }
    let tasks = Family::<Labels, Gauge>::default();
    let awards = Family::<Labels, Gauge>::default();
    let age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for s in statuses {
        let shard = db_name(s.db);
        for state in TaskState::ALL {
            tasks
                .get_or_create(&vec![
                    ("shard", shard.clone()),
                    ("state", state.as_str().into()),
                ])
                .set(s.tasks_in(state) as i64);
        }
        for state in [AwardState::Create, AwardState::Completed] {
            awards
                .get_or_create(&vec![
                    ("shard", shard.clone()),
                    ("state", state.as_str().into()),
                ])
                .set(s.awards_in(state) as i64);
        }
        let secs = s
            .oldest_pending_ms
            .map(|t| (now_ms - t).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        age.get_or_create(&vec![("shard", shard)]).set(secs);
    }
    r.register("tasks", "Tasks per shard and state", tasks);
    r.register("awards", "Award records per shard and state", awards);
    r.register(
        "oldest_pending_task_age_seconds",
        "Age of the oldest task not yet completed",
        age,
    );
    r.register(
        "shard_counts_age_seconds",
        "How long ago the task and award counts were taken",
        ConstGauge::<f64>::new(counts.taken.elapsed().as_secs_f64()),
    );
    r.register(
        "broker_connected",
        "Whether publishing can succeed",
        ConstGauge::new(i64::from(broker_connected)),
    );
    if let Some(b) = broker {
        let info = Family::<Labels, Gauge>::default();
        info.get_or_create(&vec![
            ("node", b.node.clone().unwrap_or_default()),
            ("queue_type", b.queue_type.to_string()),
        ])
        .set(1);
        r.register(
            "broker_info",
            "The broker node publishing is connected to (empty while disconnected) and the queue type",
            info,
        );
    }
    r.register(
        "save_latency_seconds",
        "save_award latency",
        LatencySnapshot::of(&m.save_latency),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn metrics_render_in_openmetrics_text_with_the_known_names() {
        let m = Metrics::default();
        Metrics::add(&m.awards_saved, 3);
        m.save_latency.observe(Duration::from_millis(3));
        let mut s = ShardStatus {
            db: 1,
            oldest_pending_ms: Some(1000),
            ..Default::default()
        };
        s.tasks.insert("completed".into(), 3);
        let counts = Counts {
            shards: std::sync::Arc::new(vec![s]),
            taken: std::time::Instant::now(),
            took: Duration::ZERO,
        };
        let broker = crate::transport::BrokerInfo {
            node: Some("amqp://guest@127.0.0.1:5701/%2f".into()),
            queue_type: "quorum",
        };
        let text = render(&m, &counts, true, Some(&broker), 3000);
        assert!(
            text.contains(r#"big_market_broker_info{node="amqp://guest@127.0.0.1:5701/%2f",queue_type="quorum"} 1"#),
            "{text}"
        );
        for line in [
            "big_market_awards_saved_total 3",
            "big_market_tasks{shard=\"big_market_01\",state=\"completed\"} 3",
            "big_market_oldest_pending_task_age_seconds{shard=\"big_market_01\"} 2.0",
            "big_market_save_latency_seconds_bucket{le=\"0.005\"} 1",
            "big_market_save_latency_seconds_bucket{le=\"+Inf\"} 1",
            "big_market_save_latency_seconds_count 1",
            "big_market_broker_connected 1",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

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
