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
        let started = std::time::Instant::now();
        let saved = self
            .store
            .save_award(
                record,
                &self.topic,
                &self.owner,
                self.settings.stale_after,
                now_ms(),
            )
            .inspect_err(|e| {
                if matches!(e, crate::Error::DuplicateOrder { .. }) {
                    Metrics::add(&self.metrics.duplicates, 1);
                }
            })?;
        Metrics::add(&self.metrics.awards_saved, 1);
        crate::crash::hit("after-commit");
        let pending = Pending {
            id: saved.id,
            message_id: saved.message_id.as_str().to_string(),
            body: saved.message,
            attempts: 0,
        };
        let r = self.publish_and_settle(saved.db, &[pending], Settle::Detached)?;
        self.metrics.save_latency.observe(started.elapsed());
        Ok(Saved {
            message_id: saved.message_id,
            db: saved.db,
            seq: saved.seq,
            published: r.completed == 1,
        })
    }

    /// Publish claimed tasks of shard `db` together and settle each: completed on confirm,
    /// otherwise failed with backoff, or dead after the attempt limit.
    pub fn relay(&self, db: u32, tasks: &[Pending]) -> Result<Relayed> {
        self.publish_and_settle(db, tasks, Settle::Wait)
    }

    fn publish_and_settle(&self, db: u32, tasks: &[Pending], settle: Settle) -> Result<Relayed> {
        if tasks.is_empty() {
            return Ok(Relayed::default());
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
        Ok(out)
    }
}
