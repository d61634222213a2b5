//! The save path: `save_award` commits the award and its task on the user's shard and returns
//! once the commit is durable; the shard's writer hands the task to the [`crate::relay`], which
//! publishes it through [`crate::publish`]. `wait_confirmed` waits for that, when asked.

use std::sync::Arc;

use crate::config::Settings;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::model::{AwardRecord, MessageId, TaskState};
use crate::store::{SavedTask, Store};
use crate::util::now_ms;

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

/// The write path.
pub struct Outbox {
    store: Arc<Store>,
    settings: Arc<Settings>,
    owner: Arc<str>,
    relay_owner: Arc<str>,
    topic: Arc<str>,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// A save path over a store; `owner` names this process in the scanner's claims, and
    /// `<owner>/relay` in the claims new tasks are inserted with.
    pub fn new(
        store: Arc<Store>,
        settings: Arc<Settings>,
        owner: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let topic: Arc<str> = settings.topic.as_str().into();
        let relay_owner: Arc<str> = format!("{owner}/relay").into();
        Outbox {
            store,
            settings,
            owner,
            relay_owner,
            topic,
            metrics,
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
            .insert_award_async(
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
        let saved = self.store.insert_awards(
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
}
