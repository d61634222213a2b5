//! Settings: plain values with documented defaults, validated once, then passed explicitly.
//! Nothing else in the crate reads flags or the environment.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::router::Layout;

/// Everything a running instance needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory holding `big_market_NN.db`.
    pub data_dir: PathBuf,
    /// Databases x tables.
    pub layout: Layout,
    /// Topic (and queue) of award messages. Default `send_award`.
    pub topic: String,
    /// AMQP URL of the broker; `None` runs on the in-process transport.
    pub amqp_url: Option<String>,
    /// A task not completed this long after its last claim is due again (the lease). Default 60 s.
    pub stale_after: Duration,
    /// Time between scanner ticks. Default 5 s.
    pub scan_interval: Duration,
    /// Tasks claimed per query by the scanner. Default 500.
    pub scan_batch: usize,
    /// Tasks published together by one pool job. Default 50.
    pub publish_chunk: usize,
    /// Relay pool threads. Default 4.
    pub pool_threads: usize,
    /// Relay pool queue capacity; overflow runs on the caller. Default 64.
    pub pool_queue: usize,
    /// Consumer threads. Default 2.
    pub consumer_threads: usize,
    /// Messages the broker hands the consumer before acks (AMQP prefetch). Default 512.
    pub prefetch: u16,
    /// Retry policy for refused publishes.
    pub retry: RetryPolicy,
    /// How long a writer waits on another process's write lock. Default 5 s.
    pub busy_timeout: Duration,
    /// Most operations one shard writer commits together. Default 256.
    pub group_commit_max: usize,
    /// Completed tasks older than this are deleted by the scanner; `None` keeps them.
    pub retention: Option<Duration>,
    /// Committed tasks a shard's relay holds in memory; past it they wait in SQLite and the
    /// relay reads them from there. Default 8192.
    pub handoff_capacity: usize,
    /// Most tasks the relay publishes as one pipelined batch. Default 1000.
    pub relay_batch: usize,
    /// How long a stopping process keeps relaying what is already committed. Default 10 s.
    pub drain_timeout: Duration,
    /// Random transport faults to inject (testing and `verify`); `None` injects nothing.
    pub faults: Option<crate::transport::fault::FaultPlan>,
}

impl Settings {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Settings {
            data_dir: data_dir.into(),
            layout: Layout::default(),
            topic: "send_award".into(),
            amqp_url: None,
            stale_after: Duration::from_secs(60),
            scan_interval: Duration::from_secs(5),
            scan_batch: 500,
            publish_chunk: 50,
            pool_threads: 4,
            pool_queue: 64,
            consumer_threads: 2,
            prefetch: 512,
            retry: RetryPolicy::default(),
            busy_timeout: Duration::from_secs(5),
            group_commit_max: 256,
            retention: None,
            handoff_capacity: 8192,
            relay_batch: 1000,
            drain_timeout: Duration::from_secs(10),
            faults: None,
        }
    }

    /// One deadline for a whole publish batch: a third of the lease, at most 15 s. Any task in
    /// flight is leased for at least this plus [`Settings::lease_margin`], so a publish ends
    /// (confirmed or not) before anyone else may claim its tasks.
    pub fn publish_timeout(&self) -> Duration {
        (self.stale_after / 3).min(Duration::from_secs(15))
    }

    /// Lease a relay wants left on a task before it publishes it; with less, it renews the lease
    /// first (and drops the task if another claim took it).
    pub fn lease_margin(&self) -> Duration {
        self.publish_timeout() + self.publish_timeout() / 2
    }

    /// Check the values that flags and code can get wrong.
    pub fn validate(self) -> Result<Self> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::Config(format!("{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        positive("scan batch", self.scan_batch)?;
        positive("publish chunk", self.publish_chunk)?;
        positive("pool threads", self.pool_threads)?;
        positive("pool queue", self.pool_queue)?;
        positive("consumer threads", self.consumer_threads)?;
        positive("group commit size", self.group_commit_max)?;
        positive("hand-off capacity", self.handoff_capacity)?;
        positive("relay batch", self.relay_batch)?;
        if self.prefetch == 0 {
            return Err(Error::Config("prefetch must be at least 1".into()));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::Config("max attempts must be at least 1".into()));
        }
        if self.stale_after < Duration::from_millis(100) {
            return Err(Error::Config("stale-after must be at least 100ms".into()));
        }
        if self.scan_interval < Duration::from_millis(10) {
            return Err(Error::Config("scan interval must be at least 10ms".into()));
        }
        if self.topic.is_empty()
            || self.topic.len() > 200
            || !self
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(Error::Config(format!(
                "topic {:?} must be 1-200 characters of letters, digits, '.', '_' or '-'",
                self.topic
            )));
        }
        if let Some(url) = &self.amqp_url {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(Error::Config(format!(
                    "AMQP URL {url:?} must start with amqp:// or amqps://"
                )));
            }
        }
        Ok(self)
    }
}

/// Parse a duration such as `250ms`, `5s`, `2m`, `1h` or `7d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        Error::invalid(
            "duration",
            format!("{s:?} is not like 250ms, 5s, 2m, 1h or 7d"),
        )
    })?;
    let ms = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(Error::invalid(
                "duration",
                format!("{s:?} has unit {unit:?}; use ms, s, m, h or d"),
            ))
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| Error::invalid("duration", format!("{s:?} is too long")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        for bad in ["", "s", "5x", "-1s", "1.5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_validate_and_bad_values_are_refused() {
        assert!(Settings::new("data").validate().is_ok());
        let mut s = Settings::new("data");
        s.pool_threads = 0;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pool threads"));
        let mut s = Settings::new("data");
        s.topic = "bad topic".into();
        assert!(s.validate().is_err());
        let mut s = Settings::new("data");
        s.amqp_url = Some("http://x".into());
        assert!(s.validate().unwrap_err().to_string().contains("amqp://"));
    }
}
