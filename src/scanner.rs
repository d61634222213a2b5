//! The compensation scanner. Each pass claims every due task (failed, or created and past its
//! lease) on every shard, in batches, and relays them through the caller-runs pool; it drains
//! the whole backlog in one pass rather than a fixed number per tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::unbounded;

use crate::config::Settings;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::pool::{CallerRunsPool, Submitted};
use crate::publish::{Pending, Publisher, Relayed, Settle};
use crate::store::Store;
use crate::transport::Transport;
use crate::util::now_ms;

/// Longest a pass spends compacting settled tasks (`--retention`) after its claims.
const COMPACT_BUDGET: std::time::Duration = std::time::Duration::from_millis(250);

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Tasks claimed.
    pub claimed: usize,
    /// How the relayed tasks ended.
    pub relayed: Relayed,
    /// Relay jobs that ran on the scanner's thread because the pool was full.
    pub ran_on_caller: usize,
    /// Completed tasks purged by the retention rule.
    pub purged: usize,
    /// The pass was skipped because the transport is disconnected.
    pub skipped_disconnected: bool,
}

impl ScanReport {
    /// Nothing was due.
    pub fn idle(&self) -> bool {
        self.claimed == 0
    }
}

/// The scanner: claims due tasks and relays them.
pub struct Scanner {
    store: Arc<Store>,
    publisher: Arc<Publisher>,
    /// This process's claim owner.
    owner: Arc<str>,
    transport: Arc<dyn Transport>,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    pool: CallerRunsPool,
}

impl Scanner {
    /// A scanner with its own relay pool, claiming as `owner`.
    pub fn new(
        store: Arc<Store>,
        publisher: Arc<Publisher>,
        owner: Arc<str>,
        transport: Arc<dyn Transport>,
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let pool = CallerRunsPool::new("relay", settings.pool_threads, settings.pool_queue)?;
        Ok(Scanner {
            store,
            publisher,
            owner,
            transport,
            settings,
            metrics,
            pool,
        })
    }

    /// One deterministic pass over every shard. Returns once every claimed task is settled.
    pub fn scan_once(&self) -> Result<ScanReport> {
        let mut report = ScanReport::default();
        Metrics::add(&self.metrics.scans, 1);
        if !self.transport.is_connected() {
            report.skipped_disconnected = true;
            return Ok(report);
        }
        let lease = self.settings.stale_after;
        // Claims are leased, so the pass keeps claiming while earlier chunks are still being
        // published; the pool's caller-runs overflow is the backpressure. Results are gathered
        // at the end, so the pass still returns with every claimed task settled.
        let (tx, rx) = unbounded::<Result<Relayed>>();
        let unavailable = Arc::new(AtomicBool::new(false));
        let mut jobs = 0;
        // A claim that fails ends the claiming, not the pass: the jobs already submitted are
        // waited for below, so the pass never returns with a publish of its own in flight.
        let mut claim_err = None;
        'shards: for shard in self.store.shards() {
            let db = shard.db();
            // An unreachable broker ends this pass; the tasks are due again next tick.
            while !unavailable.load(Ordering::SeqCst) {
                let now = now_ms();
                let claimed = match shard.claim(
                    &self.owner,
                    self.settings.scan_batch,
                    now + lease.as_millis() as i64,
                    now,
                ) {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        claim_err = Some(e);
                        break 'shards;
                    }
                };
                let n = claimed.len();
                if n == 0 {
                    break;
                }
                report.claimed += n;
                log::debug!("scan claimed shard={db:02} tasks={n}");
                let pending: Vec<Pending> = claimed.into_iter().map(Pending::from).collect();
                for chunk in pending.chunks(self.settings.publish_chunk) {
                    let (publisher, owner, chunk, tx, unavailable) = (
                        self.publisher.clone(),
                        self.owner.clone(),
                        chunk.to_vec(),
                        tx.clone(),
                        unavailable.clone(),
                    );
                    jobs += 1;
                    let submitted = self.pool.submit(move || {
                        let r = publisher.publish(db, &chunk, &owner, Settle::Wait);
                        if r.as_ref().is_ok_and(|r| r.unavailable > 0) {
                            unavailable.store(true, Ordering::SeqCst);
                        }
                        let _ = tx.send(r);
                    });
                    if submitted == Submitted::RanOnCaller {
                        report.ran_on_caller += 1;
                    }
                }
                if n < self.settings.scan_batch {
                    break;
                }
            }
        }
        drop(tx);
        let mut first_err = claim_err;
        for r in rx.iter().take(jobs) {
            match r {
                Ok(r) => report.relayed += r,
                Err(e) => {
                    log::warn!("relay failed: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        // Compaction after the claims, for a bounded time, and never at their expense: a failed
        // step (a full disk, a busy shard) is logged and the next pass tries again.
        if let Some(keep) = self.settings.retention {
            let before_ms = now_ms() - keep.as_millis() as i64;
            match self.store.purge_within(before_ms, Some(COMPACT_BUDGET)) {
                Ok(n) => report.purged = n,
                Err(e) => log::warn!("compacting completed tasks failed, retried next scan: {e}"),
            }
        }
        Metrics::add(&self.metrics.relayed, report.claimed as u64);
        Metrics::add(&self.metrics.ran_on_caller, report.ran_on_caller as u64);
        if report.claimed > 0 {
            log::info!(
                "scan relayed claimed={} completed={} failed={} dead={} ran_on_caller={}",
                report.claimed,
                report.relayed.completed,
                report.relayed.failed,
                report.relayed.dead,
                report.ran_on_caller
            );
        }
        Ok(report)
    }

    /// Run passes until one finds nothing due, at most `max_passes`; returns the summed report.
    pub fn drain(&self, max_passes: usize) -> Result<ScanReport> {
        let mut total = ScanReport::default();
        for _ in 0..max_passes {
            let r = self.scan_once()?;
            total.claimed += r.claimed;
            total.relayed += r.relayed;
            total.ran_on_caller += r.ran_on_caller;
            total.purged += r.purged;
            if r.idle() || r.skipped_disconnected {
                total.skipped_disconnected = r.skipped_disconnected;
                break;
            }
        }
        Ok(total)
    }
}
