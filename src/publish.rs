//! Publish-and-settle, which the relay and the scanner share: a batch of tasks that one claim
//! owner holds is published with one deadline, and each task is settled: `completed` on
//! confirm, otherwise `fail` with backoff, or `dead` after the attempt limit. Just before it
//! publishes, every batch keeps only the tasks whose lease outlasts the publish, renewing the
//! leases that are short while the owner still holds the claim: however long a batch waited
//! (in the scanner's pool queue, in the relay's backlog), it is never published on a lease that
//! may run out under it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Settings;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::model::TaskState;
use crate::retry::Next;
use crate::store::{Failure, SavedTask, Store, TaskRow};
use crate::transport::{Outgoing, Transport};
use crate::util::{now_ms, Rng};

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

/// Whether the caller waits for a batch's task updates to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The scanner: `scan_once` returns with every claimed task settled.
    Wait,
    /// The relay: marking confirmed tasks completed joins the next group commit (if the
    /// process dies first, the lease expires and the consumer deduplicates the resend).
    Detached,
}

/// Publishes batches of claimed tasks and settles them.
pub struct Publisher {
    store: Arc<Store>,
    transport: Arc<dyn Transport>,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    rng: Mutex<Rng>,
    /// Set when the process stops: past it, a held publish gives up at its next deadline and
    /// no new one starts.
    give_up_at: Mutex<Option<Instant>>,
}

impl Publisher {
    /// A publisher over a store and a transport.
    pub fn new(
        store: Arc<Store>,
        transport: Arc<dyn Transport>,
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Publisher {
            store,
            transport,
            settings,
            metrics,
            rng: Mutex::new(Rng::new()),
            give_up_at: Mutex::new(None),
        }
    }

    /// The process is stopping: publishes may go on until `at` (a held batch keeps waiting
    /// for the broker, its leases renewed), and past it a held batch gives up at its next
    /// deadline, so every publish ends within one publish deadline after `at`. What was not
    /// confirmed stays committed, and its claims are released by the stop.
    pub fn stop_by(&self, at: Instant) {
        *self.give_up_at.lock().expect("give-up lock") = Some(at);
    }

    fn giving_up(&self) -> bool {
        self.give_up_at
            .lock()
            .expect("give-up lock")
            .is_some_and(|at| Instant::now() >= at)
    }

    /// Publish tasks of shard `db` that `owner` holds as one batch with one deadline, and
    /// settle each: completed on confirm, otherwise failed with backoff, or dead after the
    /// attempt limit. While the transport holds the batch past its deadline, the tasks' leases
    /// are renewed.
    pub fn publish(
        &self,
        db: u32,
        tasks: &[Pending],
        owner: &Arc<str>,
        settle: Settle,
    ) -> Result<Relayed> {
        if self.giving_up() {
            // Stopping, and out of time: not sent; the stop releases the claims.
            return Ok(Relayed {
                unavailable: tasks.len(),
                ..Relayed::default()
            });
        }
        let tasks = &self.hold_leases(db, tasks, owner)?;
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
            if self.giving_up() {
                log::warn!("stopping: gave up a publish the broker holds shard={db:02} tasks={}; not confirmed, it stays committed and is sent again by the next scan", tasks.len());
                return false;
            }
            let now = now_ms();
            let ids: Vec<i64> = tasks.iter().map(|t| t.id).collect();
            let n = ids.len();
            match shard.renew(ids, owner, now + lease_ms, now) {
                Ok(renewed) => renewed.len() == n,
                Err(e) => {
                    log::warn!("renewing the leases of a held publish failed shard={db:02}: {e}");
                    false
                }
            }
        };
        let results = self.transport.publish_batch(&batch, &hold);
        crate::crash::hit(crate::crash::Point::BeforeMark);
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
                        // A copy may still be routed: nobody sends it again within a lease.
                        Next::RetryAt { attempts, .. }
                            if matches!(f, crate::retry::PublishFailure::Unconfirmed(_)) =>
                        {
                            (TaskState::Fail, attempts, now.saturating_add(lease_ms))
                        }
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
            match settle {
                Settle::Wait => shard.mark_completed(done, owner, now).map(|_| ())?,
                Settle::Detached => shard.mark_completed_detached(done, owner, now)?,
            }
        }
        if !failures.is_empty() {
            shard.mark_failed(failures, owner, now)?;
        }
        Ok(out)
    }

    /// Keep the tasks whose lease outlasts a publish; renew the others while `owner` still
    /// holds their claim, and drop those another claim took. Called just before every publish
    /// (the relay's batches, and the scanner's jobs, which may have waited in the pool's queue
    /// past their lease), so that no task is published without a lease that outlasts it.
    fn hold_leases(&self, db: u32, batch: &[Pending], owner: &Arc<str>) -> Result<Vec<Pending>> {
        let now = now_ms();
        let margin = self.settings.lease_margin().as_millis() as i64;
        let (mut keep, short): (Vec<Pending>, Vec<Pending>) = batch
            .iter()
            .cloned()
            .partition(|t| t.lease_until_ms - now >= margin);
        if short.is_empty() {
            return Ok(keep);
        }
        let lease_until_ms = now.saturating_add(self.settings.stale_after.as_millis() as i64);
        let renewed = self.store.shard(db).renew(
            short.iter().map(|t| t.id).collect(),
            owner,
            lease_until_ms,
            now,
        )?;
        let lost = short.len() - renewed.len();
        if lost > 0 {
            log::debug!("publish shard={db:02} left tasks={lost} to the claim that took them");
        }
        let renewed: std::collections::HashSet<i64> = renewed.into_iter().collect();
        keep.extend(
            short
                .into_iter()
                .filter(|t| renewed.contains(&t.id))
                .map(|mut t| {
                    t.lease_until_ms = lease_until_ms;
                    t
                }),
        );
        Ok(keep)
    }
}
