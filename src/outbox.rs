//! The write path and the publish-and-settle step.
//!
//! `save_award` commits the award and its task on the user's shard and returns once the commit
//! is durable; the shard's writer hands the task to the [`crate::relay`], which publishes it.
//! `relay` (the scanner) and `relay_committed` (the relay) publish a batch of claimed tasks and
//! settle each one: completed on confirm, otherwise failed with backoff, or dead.

use std::sync::{Arc, Mutex};

use crate::config::Settings;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::model::{AwardRecord, MessageId, TaskState};
use crate::retry::Next;
use crate::store::{Failure, Op, SavedTask, Store, TaskRow};
use crate::transport::{Outgoing, Transport};
use crate::util::{now_ms, Rng};

/// A committed award: the award record and its task are durable. The task is the outbox's
/// promise that its message will be delivered; it is published after the call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Message id of its task.
    pub message_id: MessageId,
    /// Database index of its shard.
    pub db: u32,
    /// Sequence number of its task.
    pub seq: u64,
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
    /// Until when the claim on it holds.
    pub lease_until_ms: i64,
}

impl From<TaskRow> for Pending {
    fn from(t: TaskRow) -> Self {
        Pending {
            id: t.id,
            message_id: t.message_id,
            body: t.message,
            attempts: t.attempts,
            lease_until_ms: t.next_attempt_at,
        }
    }
}

impl From<SavedTask> for Pending {
    fn from(t: SavedTask) -> Self {
        Pending {
            id: t.id,
            message_id: t.message_id.as_str().to_string(),
            body: t.message,
            attempts: 0,
            lease_until_ms: t.lease_until_ms,
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
    /// The relay: marking confirmed tasks completed joins the next group commit (if the
    /// process dies first, the lease expires and the consumer deduplicates the resend).
    Detached,
}

/// The write path.
pub struct Outbox {
    store: Arc<Store>,
    transport: Arc<dyn Transport>,
    settings: Arc<Settings>,
    owner: Arc<str>,
    relay_owner: Arc<str>,
    topic: Arc<str>,
    metrics: Arc<Metrics>,
    rng: Mutex<Rng>,
}

impl Outbox {
    /// A write path over a store and a transport; `owner` names this process in the scanner's
    /// claims, and `<owner>/relay` in the claims new tasks are inserted with.
    pub fn new(
        store: Arc<Store>,
        transport: Arc<dyn Transport>,
        settings: Arc<Settings>,
        owner: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let topic: Arc<str> = settings.topic.as_str().into();
        let relay_owner: Arc<str> = format!("{owner}/relay").into();
        Outbox {
            store,
            transport,
            settings,
            owner,
            relay_owner,
            topic,
            metrics,
            rng: Mutex::new(Rng::new()),
        }
    }

    /// This process's claim owner id (the scanner's).
    pub fn owner(&self) -> &Arc<str> {
        &self.owner
    }

    /// The claim owner of tasks on their way through this process's relay.
    pub fn relay_owner(&self) -> &Arc<str> {
        &self.relay_owner
    }

    /// Commit an award and its task in one transaction and return once the commit is durable.
    /// A repeated order id fails with [`crate::Error::DuplicateOrder`] and writes nothing. The
    /// message is published afterwards by the shard's relay (see [`Outbox::wait_confirmed`]).
    pub fn save_award(&self, record: AwardRecord) -> Result<Saved> {
        self.save_awards(vec![record])
            .pop()
            .expect("one result per award")
    }

    /// [`Outbox::save_award`] for an async caller (the HTTP server): the commit is awaited, not
    /// blocked on, so the executor's threads keep accepting and parsing meanwhile.
    pub async fn save_award_async(&self, record: AwardRecord) -> Result<Saved> {
        let started = std::time::Instant::now();
        let saved = self
            .store
            .save_award_async(
                record,
                &self.topic,
                &self.relay_owner,
                self.settings.stale_after,
                now_ms(),
            )
            .await;
        self.account(saved, started.elapsed())
    }

    fn account(&self, saved: Result<SavedTask>, elapsed: std::time::Duration) -> Result<Saved> {
        match saved {
            Ok(task) => {
                Metrics::add(&self.metrics.awards_saved, 1);
                self.metrics.save_latency.observe(elapsed);
                Ok(Saved {
                    message_id: task.message_id,
                    db: task.db,
                    seq: task.seq,
                })
            }
            Err(e) => {
                if matches!(e, crate::Error::DuplicateOrder { .. }) {
                    Metrics::add(&self.metrics.duplicates, 1);
                }
                Err(e)
            }
        }
    }

    /// Save many awards: each is committed with its task (a duplicate fails only itself), each
    /// shard's share in one group commit. One result per award, in order.
    pub fn save_awards(&self, records: Vec<AwardRecord>) -> Vec<Result<Saved>> {
        let started = std::time::Instant::now();
        let saved = self.store.save_awards(
            records,
            &self.topic,
            &self.relay_owner,
            self.settings.stale_after,
            now_ms(),
        );
        let elapsed = started.elapsed();
        saved
            .into_iter()
            .map(|r| self.account(r, elapsed))
            .collect()
    }

    /// Wait, at most `timeout`, until a saved award's message is confirmed and its task marked
    /// completed, or the task is parked as dead. Returns the task's state at the end.
    pub fn wait_confirmed(&self, saved: &Saved, timeout: std::time::Duration) -> Result<TaskState> {
        let shard = self.store.shard(saved.db);
        let mut state = None;
        let mut err = None;
        crate::util::wait_until(timeout, || {
            match shard.task_state(saved.message_id.as_str()) {
                Ok(s) => {
                    state = s;
                    matches!(s, Some(TaskState::Completed | TaskState::Dead))
                }
                Err(e) => {
                    err = Some(e);
                    true
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        state.ok_or_else(|| {
            crate::Error::invalid(
                "message_id",
                format!("no task has message id {}", saved.message_id.as_str()),
            )
        })
    }

    /// Publish tasks the relay holds (inserted with the award, or renewed) and settle them;
    /// confirmed tasks are marked completed in the next group commit, without waiting for it.
    pub fn relay_committed(&self, db: u32, tasks: &[Pending]) -> Result<Relayed> {
        self.publish_and_settle(db, tasks, &self.relay_owner, Settle::Detached)
    }

    /// Publish claimed tasks of shard `db` together and settle each: completed on confirm,
    /// otherwise failed with backoff, or dead after the attempt limit.
    pub fn relay(&self, db: u32, tasks: &[Pending]) -> Result<Relayed> {
        self.publish_and_settle(db, tasks, &self.owner, Settle::Wait)
    }

    /// Publish and settle tasks claimed by `owner`.
    fn publish_and_settle(
        &self,
        db: u32,
        tasks: &[Pending],
        owner: &Arc<str>,
        settle: Settle,
    ) -> Result<Relayed> {
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
        // While a transport holds a batch past its deadline (a broker blocking publishers), the
        // leases on its tasks are renewed, so that nobody claims and sends them meanwhile.
        let shard = self.store.shard(db);
        let lease_ms = self.settings.stale_after.as_millis() as i64;
        let hold = || {
            let now = now_ms();
            let ids: Vec<i64> = tasks.iter().map(|t| t.id).collect();
            let n = ids.len();
            match shard.write(Op::Renew {
                ids,
                owner: owner.clone(),
                lease_until_ms: now + lease_ms,
                now_ms: now,
            }) {
                Ok(crate::store::Reply::Renewed(renewed)) => renewed.len() == n,
                Ok(_) => false,
                Err(e) => {
                    log::warn!("renewing the leases of a held publish failed shard={db:02}: {e}");
                    false
                }
            }
        };
        let results = self.transport.publish_batch(&batch, &hold);
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
        if !done.is_empty() {
            let op = Op::MarkCompleted {
                ids: done,
                owner: owner.clone(),
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
                owner: owner.clone(),
                now_ms: now,
            })?;
        }
        Ok(out)
    }
}
