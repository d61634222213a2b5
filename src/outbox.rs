//! The write path and the relay step.
//!
//! `save_award` commits the award and its task on the user's shard, then publishes the task's
//! message and marks the task completed, or failed (the scanner retries it). `relay` publishes a
//! batch of claimed tasks and settles each one; the write path and the scanner share it.

use std::sync::{Arc, Mutex};

use crate::config::Settings;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::model::{AwardRecord, MessageId, TaskState};
use crate::retry::Next;
use crate::store::{Failure, Op, Store, TaskRow};
use crate::transport::{Outgoing, Transport};
use crate::util::{now_ms, Rng};

/// The result of a committed award.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Message id of its task.
    pub message_id: MessageId,
    /// Database index of its shard.
    pub db: u32,
    /// Sequence number of its task.
    pub seq: u64,
    /// Whether the first publish was confirmed (if not, the scanner retries).
    pub published: bool,
}

/// A claimed task to publish.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Task row id.
    pub id: i64,
    /// Message id.
    pub message_id: String,
    /// Body.
    pub body: String,
    /// Counted attempts so far.
    pub attempts: u32,
}

impl From<TaskRow> for Pending {
    fn from(t: TaskRow) -> Self {
        Pending {
            id: t.id,
            message_id: t.message_id,
            body: t.message,
            attempts: t.attempts,
        }
    }
}

/// How a relayed batch ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Confirmed and marked completed.
    pub completed: usize,
    /// Failed and due again later.
    pub failed: usize,
    /// Parked as dead.
    pub dead: usize,
    /// Failures because the broker was unreachable.
    pub unavailable: usize,
}

impl std::ops::AddAssign for Relayed {
    fn add_assign(&mut self, o: Relayed) {
        self.completed += o.completed;
        self.failed += o.failed;
        self.dead += o.dead;
        self.unavailable += o.unavailable;
    }
}

/// Whether the caller waits for a relay's task updates to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// The scanner: `scan_once` returns with every claimed task settled.
    Wait,
    /// The write path: the award is safe and its message confirmed; marking the task completed
    /// joins the next group commit (if the process dies first, the lease expires and the
    /// consumer deduplicates the resend).
    Detached,
}

/// The write path.
pub struct Outbox {
    store: Arc<Store>,
    transport: Arc<dyn Transport>,
    settings: Arc<Settings>,
    owner: Arc<str>,
    topic: Arc<str>,
    metrics: Arc<Metrics>,
    rng: Mutex<Rng>,
}

impl Outbox {
    /// A write path over a store and a transport; `owner` names this process in claims.
    pub fn new(
        store: Arc<Store>,
        transport: Arc<dyn Transport>,
        settings: Arc<Settings>,
        owner: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let topic: Arc<str> = settings.topic.as_str().into();
        Outbox {
            store,
            transport,
            settings,
            owner,
            topic,
            metrics,
            rng: Mutex::new(Rng::new()),
        }
    }

    /// This process's claim owner id.
    pub fn owner(&self) -> &Arc<str> {
        &self.owner
    }

    /// Commit an award and its task in one transaction, then publish and settle the task.
    /// A repeated order id fails with [`crate::Error::DuplicateOrder`] and writes nothing.
    /// Once committed the award is safe: a failed publish leaves a failed task to retry.
    pub fn save_award(&self, record: AwardRecord) -> Result<Saved> {
        self.save_awards(vec![record])
            .pop()
            .expect("one result per award")
    }

    /// Save many awards: each is committed with its task (a duplicate fails only itself), each
    /// shard's share in one group commit and one pipelined publish. One result per award, in
    /// order.
    pub fn save_awards(&self, records: Vec<AwardRecord>) -> Vec<Result<Saved>> {
        let started = std::time::Instant::now();
        let n = records.len();
        let saved = self.store.save_awards(
            records,
            &self.topic,
            &self.owner,
            self.settings.stale_after,
            now_ms(),
        );
        let mut results: Vec<Option<Result<Saved>>> = (0..n).map(|_| None).collect();
        let mut per_shard: std::collections::BTreeMap<u32, Vec<(usize, crate::store::SavedTask)>> =
            Default::default();
        for (i, r) in saved.into_iter().enumerate() {
            match r {
                Ok(task) => {
                    Metrics::add(&self.metrics.awards_saved, 1);
                    per_shard.entry(task.db).or_default().push((i, task));
                }
                Err(e) => {
                    if matches!(e, crate::Error::DuplicateOrder { .. }) {
                        Metrics::add(&self.metrics.duplicates, 1);
                    }
                    results[i] = Some(Err(e));
                }
            }
        }
        crate::crash::hit("after-commit");
        for (db, tasks) in per_shard {
            let pending: Vec<Pending> = tasks
                .iter()
                .map(|(_, t)| Pending {
                    id: t.id,
                    message_id: t.message_id.as_str().to_string(),
                    body: t.message.clone(),
                    attempts: 0,
                })
                .collect();
            match self.publish_and_settle(db, &pending, Settle::Detached) {
                Ok((_, published)) => {
                    for ((i, t), published) in tasks.into_iter().zip(published) {
                        results[i] = Some(Ok(Saved {
                            message_id: t.message_id,
                            db: t.db,
                            seq: t.seq,
                            published,
                        }));
                    }
                }
                Err(e) => {
                    // Committed but not settled: the tasks stay leased and the scanner resends them.
                    log::warn!("settling published tasks failed shard={db:02}: {e}");
                    for (i, t) in tasks {
                        results[i] = Some(Ok(Saved {
                            message_id: t.message_id,
                            db: t.db,
                            seq: t.seq,
                            published: false,
                        }));
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        for r in &results {
            if matches!(r, Some(Ok(_))) {
                self.metrics.save_latency.observe(elapsed);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every award has a result"))
            .collect()
    }

    /// Publish claimed tasks of shard `db` together and settle each: completed on confirm,
    /// otherwise failed with backoff, or dead after the attempt limit.
    pub fn relay(&self, db: u32, tasks: &[Pending]) -> Result<Relayed> {
        self.publish_and_settle(db, tasks, Settle::Wait)
            .map(|(r, _)| r)
    }

    /// Publish and settle; also returns, per task, whether its publish was confirmed.
    fn publish_and_settle(
        &self,
        db: u32,
        tasks: &[Pending],
        settle: Settle,
    ) -> Result<(Relayed, Vec<bool>)> {
        if tasks.is_empty() {
            return Ok((Relayed::default(), Vec::new()));
        }
        let batch: Vec<Outgoing> = tasks
            .iter()
            .map(|t| Outgoing {
                message_id: t.message_id.clone(),
                body: t.body.clone(),
            })
            .collect();
        let results = self.transport.publish_batch(&batch);
        crate::crash::hit("before-mark");
        let confirmed: Vec<bool> = results.iter().map(Result::is_ok).collect();
        let now = now_ms();
        let mut done = Vec::new();
        let mut failures = Vec::new();
        let mut out = Relayed::default();
        for (task, result) in tasks.iter().zip(results) {
            match result {
                Ok(()) => done.push(task.id),
                Err(f) => {
                    let rand = self.rng.lock().expect("rng lock").next_f64();
                    let (state, attempts, next_attempt_at) = match self
                        .settings
                        .retry
                        .after_failure(&f, task.attempts, now, rand)
                    {
                        Next::RetryAt { at_ms, attempts } => (TaskState::Fail, attempts, at_ms),
                        Next::Dead { attempts } => (TaskState::Dead, attempts, now),
                    };
                    if f.counts() {
                        log::warn!("publish refused shard={db:02} message_id={} attempt={attempts} reason={:?}", task.message_id, f.reason());
                    } else {
                        out.unavailable += 1;
                        log::debug!(
                            "publish unavailable shard={db:02} message_id={} reason={:?}",
                            task.message_id,
                            f.reason()
                        );
                    }
                    if state == TaskState::Dead {
                        log::error!("task parked as dead shard={db:02} message_id={} attempts={attempts}: requeue with `big-market tasks requeue --message-id {}`", task.message_id, task.message_id);
                        out.dead += 1;
                    } else {
                        out.failed += 1;
                    }
                    failures.push(Failure {
                        id: task.id,
                        state,
                        attempts,
                        next_attempt_at,
                        error: f.reason().to_string(),
                    });
                }
            }
        }
        out.completed = done.len();
        Metrics::add(&self.metrics.publish_confirmed, done.len() as u64);
        Metrics::add(&self.metrics.publish_failed, failures.len() as u64);
        Metrics::add(&self.metrics.tasks_dead, out.dead as u64);
        let shard = self.store.shard(db);
        if !done.is_empty() {
            let op = Op::MarkCompleted {
                ids: done,
                now_ms: now,
            };
            match settle {
                Settle::Wait => shard.write(op).map(|_| ())?,
                Settle::Detached => shard.write_detached(op)?,
            }
        }
        if !failures.is_empty() {
            shard.write(Op::MarkFailed {
                failures,
                owner: self.owner.clone(),
                now_ms: now,
            })?;
        }
        Ok((out, confirmed))
    }
}
