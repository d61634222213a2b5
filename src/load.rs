//! `big-market load`: the original's test as a workload. Many caller threads write awards for
//! a set of users with random 12-digit order ids (a collision with an earlier order is refused
//! as a duplicate and retried with a new id), then wait, bounded, until every saved award is
//! delivered.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::{AwardRecord, TaskState};
use crate::service::Service;
use crate::store::ShardStatus;
use crate::util::{now_ms, wait_until, Rng};

/// What to write.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Awards to write.
    pub records: u64,
    /// Distinct users (`user0000` …) they are spread over.
    pub users: u64,
    /// Caller threads.
    pub threads: usize,
    /// Longest wait for delivery after the last write.
    pub timeout: Duration,
}

/// How a load ended.
#[derive(Debug)]
pub struct LoadReport {
    /// The options it ran with.
    pub options: LoadOptions,
    /// Awards committed.
    pub saved: u64,
    /// Awards delivered during the run (completed records gained).
    pub delivered: u64,
    /// Saves that failed (not duplicates).
    pub failed: u64,
    /// Order ids that collided with existing ones and were drawn again.
    pub duplicate_retries: u64,
    /// Tasks still `create` or `fail` at the end, over the whole data dir.
    pub pending_tasks: u64,
    /// Tasks `dead` at the end, over the whole data dir.
    pub dead_tasks: u64,
    /// Time to write everything.
    pub write_time: Duration,
    /// Time until delivered (or the timeout).
    pub total_time: Duration,
    /// Median `save_award` latency, ms.
    pub p50_ms: f64,
    /// 99th percentile `save_award` latency, ms.
    pub p99_ms: f64,
    /// The first save error, if any.
    pub first_error: Option<Error>,
}

impl LoadReport {
    /// Whether every saved award was delivered.
    pub fn all_delivered(&self) -> bool {
        self.delivered >= self.saved
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.options;
        write!(
            f,
            "load records={} saved={} users={} threads={} write_s={:.2} total_s={:.2} records_per_s={:.0} delivered={} failed={} pending_tasks={} dead_tasks={} duplicate_retries={} p50_ms={:.2} p99_ms={:.2}",
            o.records,
            self.saved,
            o.users,
            o.threads,
            self.write_time.as_secs_f64(),
            self.total_time.as_secs_f64(),
            self.saved as f64 / self.total_time.as_secs_f64().max(1e-9),
            self.delivered,
            self.failed,
            self.pending_tasks,
            self.dead_tasks,
            self.duplicate_retries,
            self.p50_ms,
            self.p99_ms
        )
    }
}

/// A progress bar on stderr when it is a terminal; hidden otherwise (callers print plain lines).
pub fn progress_bar(total: u64, label: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} saved {msg} ({per_sec}, eta {eta})",
        )
        .expect("progress template is valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// Progress of a load on stderr: an indicatif bar on a terminal, a plain line per tenth
/// otherwise.
pub struct Progress {
    bar: indicatif::ProgressBar,
    total: u64,
    last_decile: AtomicU64,
}

impl Progress {
    /// Progress towards `total` saved awards.
    pub fn new(total: u64) -> Self {
        Progress {
            bar: progress_bar(total, "load"),
            total,
            last_decile: AtomicU64::new(0),
        }
    }

    /// Show the counts so far; `done` once at the end.
    pub fn show(&self, saved: u64, delivered: u64, done: bool) {
        if !self.bar.is_hidden() {
            self.bar.set_position(saved);
            self.bar.set_message(format!("delivered {delivered}"));
            if done {
                self.bar.finish();
            }
        } else {
            let decile = saved * 10 / self.total.max(1);
            if decile > self.last_decile.swap(decile, Ordering::Relaxed) || done {
                eprintln!(
                    "progress saved={saved}/{} delivered={delivered}",
                    self.total
                );
            }
        }
    }
}

/// Refuse options that cannot run.
pub fn run_checks(opts: &LoadOptions) -> Result<()> {
    if opts.records == 0 {
        return Err(Error::invalid("records", "must be at least 1"));
    }
    if opts.users == 0 || opts.threads == 0 {
        return Err(Error::invalid("users/threads", "must be at least 1"));
    }
    Ok(())
}

/// Completed awards in these shard counts.
fn completed(shards: &[ShardStatus]) -> u64 {
    shards
        .iter()
        .map(|s| s.awards_in(crate::model::AwardState::Completed))
        .sum()
}

/// Latencies in microseconds, 4 bytes each: 40 MB at load's 10,000,000-award limit.
#[derive(Debug, Default)]
pub struct Latencies {
    us: Vec<u32>,
    sorted: bool,
}

impl Latencies {
    /// Add one latency (saturating at 71 minutes).
    pub fn push(&mut self, d: Duration) {
        self.us.push(d.as_micros().min(u128::from(u32::MAX)) as u32);
        self.sorted = false;
    }

    /// Move `other`'s latencies into these.
    pub fn append(&mut self, other: &mut Latencies) {
        self.us.append(&mut other.us);
        self.sorted = false;
    }

    /// How many were measured.
    pub fn len(&self) -> usize {
        self.us.len()
    }

    /// Whether none were measured.
    pub fn is_empty(&self) -> bool {
        self.us.is_empty()
    }

    /// The `p` quantile (0.5 the median, 0.99 the 99th percentile) in milliseconds; 0 when
    /// nothing was measured.
    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if !self.sorted {
            self.us.sort_unstable();
            self.sorted = true;
        }
        let at = ((self.us.len() as f64 * p) as usize).min(self.us.len().saturating_sub(1));
        self.us.get(at).map_or(0.0, |us| f64::from(*us) / 1000.0)
    }
}

impl FromIterator<Duration> for Latencies {
    fn from_iter<I: IntoIterator<Item = Duration>>(iter: I) -> Self {
        let mut l = Latencies::default();
        for d in iter {
            l.push(d);
        }
        l
    }
}

/// What [`callers`] measured.
#[derive(Debug)]
pub struct Calls {
    /// From the start of the first call to the end of the last.
    pub elapsed: Duration,
    /// The latency of every call that succeeded.
    pub latencies: Latencies,
    /// Calls that failed.
    pub failed: u64,
    /// The first failure.
    pub first_error: Option<Error>,
}

impl Calls {
    /// These calls, or the first failure if one failed.
    pub fn all_ok(self) -> Result<Calls> {
        match self.first_error {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }
}

/// `threads` caller threads (`<name>-<t>`), each taking the next index below `n` and calling
/// `call` with it, timing each call; a failed call is counted and the callers go on. `watch`
/// runs on this thread every 200 ms while they do (the load's progress); its error ends the
/// wait, not the callers.
pub fn callers(
    name: &str,
    threads: usize,
    n: u64,
    call: impl Fn(u64) -> Result<()> + Sync,
    mut watch: impl FnMut() -> Result<()>,
) -> Result<Calls> {
    let next = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let first_error = Mutex::new(None);
    let latencies = Mutex::new(Latencies::default());
    let last_end = Mutex::new(None::<Instant>);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        // Each caller holds a sender; the channel disconnects when the last one is done.
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        for t in 0..threads {
            let done = done_tx.clone();
            let (next, failed, first_error, latencies, last_end, call) =
                (&next, &failed, &first_error, &latencies, &last_end, &call);
            crate::util::spawn_scoped(scope, format!("{name}-{t}"), move || {
                let mut mine = Latencies::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let t0 = Instant::now();
                    match call(i) {
                        Ok(()) => mine.push(t0.elapsed()),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().expect("error lock").get_or_insert(e);
                        }
                    }
                }
                let end = Instant::now();
                let mut last = last_end.lock().expect("end lock");
                *last = Some(last.map_or(end, |l| l.max(end)));
                latencies.lock().expect("latency lock").append(&mut mine);
                drop(done);
            })?;
        }
        drop(done_tx);
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
            done_rx.recv_timeout(Duration::from_millis(200))
        {
            watch()?;
        }
        Ok(())
    })?;
    let end = last_end.into_inner().expect("end lock").unwrap_or(started);
    Ok(Calls {
        elapsed: end.duration_since(started),
        latencies: latencies.into_inner().expect("latency lock"),
        failed: failed.into_inner(),
        first_error: first_error.into_inner().expect("error lock"),
    })
}

/// Write the awards through `service` and wait for their delivery. `progress(saved, delivered,
/// done)` is called every 200 ms while writing and once at the end.
pub fn run(
    service: &Service,
    opts: &LoadOptions,
    progress: &(dyn Fn(u64, u64, bool) + Sync),
) -> Result<LoadReport> {
    run_checks(opts)?;
    let before = completed(&service.status()?);
    let metrics = service.metrics();
    let delivered_here_before = Metrics::get(&metrics.delivered);
    let (saved, retries) = (AtomicU64::new(0), AtomicU64::new(0));
    let save = |i: u64| -> Result<()> {
        let user = format!("user{:04}", i % opts.users);
        let mut rng = Rng::new();
        loop {
            let record = AwardRecord::sample(&user, &rng.digits(12), now_ms())
                .expect("generated awards are valid");
            match service.save_award(record) {
                Ok(_) => {
                    saved.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(Error::DuplicateOrder { .. }) => {
                    retries.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
    };
    let show = || -> Result<()> {
        progress(
            saved.load(Ordering::Relaxed),
            // The counts `/metrics` serves: a count that takes long (large MySQL tables) is
            // kept and taken again in the background, so that showing progress stays a small
            // share of the database's time. Start and end are counted exactly.
            completed(&service.shard_counts()?.shards).saturating_sub(before),
            false,
        );
        Ok(())
    };
    let started = Instant::now();
    let mut calls = callers("load", opts.threads, opts.records, save, show)?;
    let write_time = started.elapsed();
    let total_saved = saved.load(Ordering::Relaxed);
    // Waiting for the deliveries counts the shards exactly only when a cheap sign says they
    // are all in: this process's consumer counts what it delivers, and the kept counts that
    // `/metrics` serves (taken again only as often as they are cheap) see a consumer in another
    // process. Counting every shard at each poll took a tenth of the process's CPU from the
    // deliveries it waited for.
    let mut delivered = 0;
    wait_until(opts.timeout, || {
        let here = Metrics::get(&metrics.delivered).saturating_sub(delivered_here_before);
        // The kept counts only while this process's consumer has not seen them all.
        let seen = if here >= total_saved {
            here
        } else {
            service
                .shard_counts()
                .map_or(0, |c| completed(&c.shards).saturating_sub(before))
                .max(here)
        }
        .min(total_saved);
        if seen < total_saved {
            delivered = delivered.max(seen);
            progress(total_saved, delivered, false);
            return false;
        }
        delivered = service
            .status()
            .map_or(0, |shards| completed(&shards))
            .saturating_sub(before);
        delivered >= total_saved
    });
    let total_time = started.elapsed();
    let statuses = service.status()?;
    // Exact whether or not every delivery came in time (the wait may have ended on a kept
    // count).
    delivered = completed(&statuses).saturating_sub(before);
    progress(total_saved, delivered, true);
    Ok(LoadReport {
        options: opts.clone(),
        saved: total_saved,
        delivered,
        failed: calls.failed,
        duplicate_retries: retries.load(Ordering::Relaxed),
        pending_tasks: statuses.iter().map(ShardStatus::pending).sum(),
        dead_tasks: statuses.iter().map(|s| s.tasks_in(TaskState::Dead)).sum(),
        write_time,
        total_time,
        p50_ms: calls.latencies.percentile_ms(0.50),
        p99_ms: calls.latencies.percentile_ms(0.99),
        first_error: calls.first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_read_off_the_sorted_latencies() {
        let mut l: Latencies = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(l.percentile_ms(0.50), 51.0);
        assert_eq!(l.percentile_ms(0.99), 100.0);
        assert_eq!(l.percentile_ms(0.0), 1.0);
        assert_eq!(Latencies::default().percentile_ms(0.99), 0.0);
    }

    #[test]
    fn callers_make_every_call_once_count_failures_and_time_the_rest() {
        let seen: Vec<AtomicU64> = (0..500).map(|_| AtomicU64::new(0)).collect();
        let calls = callers(
            "t",
            4,
            500,
            |i| {
                seen[i as usize].fetch_add(1, Ordering::Relaxed);
                if i % 100 == 7 {
                    Err(Error::invalid("i", "refused"))
                } else {
                    Ok(())
                }
            },
            || Ok(()),
        )
        .unwrap();
        assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        assert_eq!((calls.failed, calls.latencies.len()), (5, 495));
        assert!(calls.all_ok().is_err(), "the first failure is kept");
    }
}
