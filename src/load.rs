//! `big-market load`: the original's test as a workload. Many caller threads write awards for
//! a set of users with random 12-digit order ids (a collision with an earlier order is refused
//! as a duplicate and retried with a new id), then wait, bounded, until every saved award is
//! delivered.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::{AwardRecord, NewAward, TaskState};
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

/// Write the awards through `service` and wait for their delivery. `progress(saved, delivered,
/// done)` is called every 200 ms while writing and once at the end.
pub fn run(
    service: &Service,
    opts: &LoadOptions,
    progress: &(dyn Fn(u64, u64, bool) + Sync),
) -> Result<LoadReport> {
    run_checks(opts)?;
    let before = completed(&service.status()?);
    let (next, saved, retries, failed) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let first_error = Mutex::new(None);
    // Latencies in microseconds, 4 bytes an award: 40 MB at the 10,000,000-award limit.
    let latencies: Mutex<Vec<u32>> =
        Mutex::new(Vec::with_capacity(opts.records.min(1 << 20) as usize));
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let mut writers = Vec::with_capacity(opts.threads);
        for t in 0..opts.threads {
            let writer = || {
                let mut rng = Rng::new();
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= opts.records {
                        break;
                    }
                    let user = format!("user{:04}", i % opts.users);
                    loop {
                        let record = AwardRecord::new(NewAward {
                            user_id: &user,
                            activity_id: 100301,
                            strategy_id: 100006,
                            order_id: &rng.digits(12),
                            award_id: 101,
                            award_title: "OpenAI 增加使用次数",
                            award_time_ms: now_ms(),
                        })
                        .expect("generated awards are valid");
                        let t0 = Instant::now();
                        match service.save_award(record) {
                            Ok(_) => {
                                mine.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                                saved.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(Error::DuplicateOrder { .. }) => {
                                retries.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                first_error.lock().expect("error lock").get_or_insert(e);
                            }
                        }
                        break;
                    }
                }
                latencies.lock().expect("latency lock").extend(mine);
            };
            writers.push(crate::util::spawn_scoped(
                scope,
                format!("load-{t}"),
                writer,
            )?);
        }
        // Progress display pacing while the writers run; their end is what is waited for.
        while writers.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            progress(
                saved.load(Ordering::Relaxed),
                // The counts `/metrics` serves: a count that takes long (large MySQL tables) is
                // kept and taken again in the background, so that showing progress stays a
                // small share of the database's time. Start and end are counted exactly.
                completed(&service.shard_counts()?.shards).saturating_sub(before),
                false,
            );
        }
        Ok(())
    })?;
    let write_time = started.elapsed();
    let total_saved = saved.load(Ordering::Relaxed);
    let mut delivered = 0;
    wait_until(opts.timeout, || {
        delivered = service
            .status()
            .map_or(0, |shards| completed(&shards))
            .saturating_sub(before);
        delivered >= total_saved
    });
    let total_time = started.elapsed();
    progress(total_saved, delivered, true);
    let statuses = service.status()?;
    let mut lat = latencies.into_inner().expect("latency lock");
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|us| f64::from(*us) / 1000.0)
            .unwrap_or(0.0)
    };
    Ok(LoadReport {
        options: opts.clone(),
        saved: total_saved,
        delivered,
        failed: failed.load(Ordering::Relaxed),
        duplicate_retries: retries.load(Ordering::Relaxed),
        pending_tasks: statuses
            .iter()
            .map(|s| s.tasks_in(TaskState::Create) + s.tasks_in(TaskState::Fail))
            .sum(),
        dead_tasks: statuses.iter().map(|s| s.tasks_in(TaskState::Dead)).sum(),
        write_time,
        total_time,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        first_error: first_error.into_inner().expect("error lock"),
    })
}
