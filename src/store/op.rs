//! The store's write vocabulary: the ops a shard's writer thread runs and their replies
//! (crate-private: callers use `Store` and `Shard` methods), and the public values they carry.

use std::sync::Arc;

use super::TaskRow;
use crate::model::{AwardRecord, EventMessage, MessageId, TaskState};

/// A task committed with its award, to publish after the commit.
#[derive(Debug, Clone)]
pub struct SavedTask {
    /// Task row id.
    pub id: i64,
    /// Database index.
    pub db: u32,
    /// Per-shard sequence number.
    pub seq: u64,
    /// Message id.
    pub message_id: MessageId,
    /// Topic.
    pub topic: String,
    /// JSON body.
    pub message: String,
    /// Until when the relay's claim on it holds.
    pub lease_until_ms: i64,
}

/// A failed publish to record.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Task row id.
    pub id: i64,
    /// `fail` or `dead`.
    pub state: TaskState,
    /// Counted attempts after this failure.
    pub attempts: u32,
    /// When the task is due again.
    pub next_attempt_at: i64,
    /// Why it failed.
    pub error: String,
}

/// What delivering a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// First receipt: the award record moved to completed.
    First,
    /// The message was handled before; nothing changed but the receipt count.
    Again,
    /// First receipt of a message in the original's form, which names no award (no
    /// `orderId`): logged under its message id; there is nothing to deliver.
    Recorded,
}

/// A write to run on a shard.
#[derive(Debug)]
pub(crate) enum Op {
    /// Insert an award and its task.
    SaveAward {
        /// The award.
        record: AwardRecord,
        /// Its split table.
        table: String,
        /// Topic of the task.
        topic: Arc<str>,
        /// Claim owner (this process).
        owner: Arc<str>,
        /// Lease expiry of the first publish.
        lease_until_ms: i64,
        /// Now.
        now_ms: i64,
    },
    /// Mark tasks completed, those still claimed by `owner`.
    MarkCompleted {
        /// Task ids.
        ids: Vec<i64>,
        /// The claim owner that published them.
        owner: Arc<str>,
        /// Now.
        now_ms: i64,
    },
    /// Record failed publishes.
    MarkFailed {
        /// Failures.
        failures: Vec<Failure>,
        /// The claim owner that published.
        owner: Arc<str>,
        /// Now.
        now_ms: i64,
    },
    /// Claim due tasks.
    Claim {
        /// Claim owner.
        owner: Arc<str>,
        /// Most tasks to claim.
        limit: usize,
        /// Lease expiry.
        lease_until_ms: i64,
        /// Now.
        now_ms: i64,
    },
    /// Extend the leases of tasks still claimed by `owner` and not yet sent; replies the ids
    /// renewed (a task another claim took is left out).
    Renew {
        /// Task ids.
        ids: Vec<i64>,
        /// The claim owner that must still hold them.
        owner: Arc<str>,
        /// New lease expiry.
        lease_until_ms: i64,
        /// Now.
        now_ms: i64,
    },
    /// Release every claim of an owner.
    Release {
        /// Claim owner.
        owner: Arc<str>,
        /// Now.
        now_ms: i64,
    },
    /// Deliver an award message.
    Deliver {
        /// The decoded message.
        msg: EventMessage,
        /// The award's split table.
        table: String,
        /// Now.
        now_ms: i64,
    },
    /// Requeue parked or failed tasks.
    Requeue {
        /// One message id.
        message_id: Option<String>,
        /// Every task in this state.
        state: Option<TaskState>,
        /// Now.
        now_ms: i64,
    },
    /// Nothing: replies once every op queued before it (detached ones too) has committed.
    Barrier,
    /// Delete completed tasks older than a time.
    Purge {
        /// Cut-off, epoch ms.
        before_ms: i64,
    },
}

/// The result of an [`Op`].
#[derive(Debug)]
pub(crate) enum Reply {
    /// From `SaveAward`.
    Saved(SavedTask),
    /// Rows changed.
    Count(usize),
    /// From `Claim`.
    Claimed(Vec<TaskRow>),
    /// From `Deliver`.
    Delivered(Delivered),
    /// From `Renew`: the ids renewed.
    Renewed(Vec<i64>),
}

/// Mark each failure with `mark` (one row's update, the backend's statement); the number of
/// tasks marked. Both backends run a `MarkFailed` this way.
pub(crate) fn mark_each<E>(
    failures: &[Failure],
    mut mark: impl FnMut(&Failure) -> std::result::Result<usize, E>,
) -> std::result::Result<Reply, E> {
    let mut n = 0;
    for f in failures {
        n += mark(f)?;
    }
    Ok(Reply::Count(n))
}

/// Renew each task's lease with `renew` (one row's update, changing 1 row while the owner still
/// holds the claim); the ids renewed. Both backends run a `Renew` this way.
pub(crate) fn renew_each<E>(
    ids: &[i64],
    mut renew: impl FnMut(i64) -> std::result::Result<usize, E>,
) -> std::result::Result<Reply, E> {
    let mut renewed = Vec::with_capacity(ids.len());
    for id in ids {
        if renew(*id)? == 1 {
            renewed.push(*id);
        }
    }
    Ok(Reply::Renewed(renewed))
}

impl Reply {
    /// The reply of an op that counts rows.
    pub(crate) fn count(self) -> usize {
        match self {
            Reply::Count(n) => n,
            other => unreachable!("a counting op replied {other:?}"),
        }
    }

    /// The reply of `SaveAward`.
    pub(crate) fn saved(self) -> SavedTask {
        match self {
            Reply::Saved(t) => t,
            other => unreachable!("SaveAward replied {other:?}"),
        }
    }

    /// The reply of `Deliver`.
    pub(crate) fn delivered(self) -> Delivered {
        match self {
            Reply::Delivered(d) => d,
            other => unreachable!("Deliver replied {other:?}"),
        }
    }

    /// The reply of `Claim`.
    pub(crate) fn claimed(self) -> Vec<TaskRow> {
        match self {
            Reply::Claimed(rows) => rows,
            other => unreachable!("Claim replied {other:?}"),
        }
    }

    /// The reply of `Renew`.
    pub(crate) fn renewed(self) -> Vec<i64> {
        match self {
            Reply::Renewed(ids) => ids,
            other => unreachable!("Renew replied {other:?}"),
        }
    }
}
