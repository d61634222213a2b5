//! The shard writer: one thread per shard file owns its write connection. Callers send an
//! [`Op`] on a bounded channel and wait for the reply; the thread takes every op waiting (up to
//! `group_commit_max`), runs each in its own savepoint inside one `BEGIN IMMEDIATE`
//! transaction, commits once, and only then replies. A failing op (a duplicate order id)
//! rolls back its own savepoint and nothing else; a failed commit fails every op in the batch.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use rusqlite::{Connection, TransactionBehavior};

use super::sql;
use crate::error::{Error, Result};
use crate::model::{AwardRecord, EventMessage, MessageId, TaskState};
use crate::relay::Handoff;

/// Capacity of a writer's queue. A full queue blocks callers: backpressure on the write path.
pub const WRITER_QUEUE: usize = 4096;

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
}

/// A write to run on a shard.
#[derive(Debug)]
pub enum Op {
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
pub enum Reply {
    /// From `SaveAward`.
    Saved(SavedTask),
    /// Rows changed.
    Count(usize),
    /// From `Claim`.
    Claimed(Vec<sql::TaskRow>),
    /// From `Deliver`.
    Delivered(Delivered),
    /// From `Renew`: the ids renewed.
    Renewed(Vec<i64>),
}

struct Job {
    op: Op,
    /// `None` for a detached op: nobody waits, and a failure is logged.
    reply: Option<ReplyTo>,
}

/// Where a job's result goes: a thread blocked on it, or a task awaiting it.
enum ReplyTo {
    Wait(Sender<Result<Reply>>),
    Async(async_channel::Sender<Result<Reply>>),
}

/// Handle to a shard's writer thread. Dropping it lets the thread finish the queued work, then
/// joins it.
pub struct Writer {
    db: u32,
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Start the writer thread on a connection.
    pub fn spawn<C>(
        db: u32,
        conn: C,
        group_commit_max: usize,
        handoff: Arc<Handoff>,
    ) -> Result<Self>
    where
        C: std::ops::DerefMut<Target = Connection> + Send + 'static,
    {
        let (tx, rx) = bounded::<Job>(WRITER_QUEUE);
        let handle = std::thread::Builder::new()
            .name(format!("writer-{db:02}"))
            .spawn(move || run(db, conn, rx, group_commit_max, &handoff))
            .map_err(|e| Error::Io {
                path: format!("writer-{db:02}").into(),
                source: e,
            })?;
        Ok(Writer {
            db,
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Run one op and wait until its transaction has committed (or failed).
    pub fn call(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = bounded(1);
        let tx = self.tx.as_ref().ok_or(Error::ShuttingDown)?;
        tx.send(Job {
            op,
            reply: Some(ReplyTo::Wait(reply)),
        })
        .map_err(|_| Error::ShuttingDown)?;
        rx.recv().map_err(|_| Error::ShuttingDown)?
    }

    /// Run one op and await its commit without blocking the awaiting thread (an async
    /// executor's): the writer thread does the work and wakes the task. Only when the writer's
    /// queue is full does the hand-over wait, on the blocking pool.
    pub async fn call_async(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = async_channel::bounded(1);
        let tx = self.tx.as_ref().ok_or(Error::ShuttingDown)?;
        let job = Job {
            op,
            reply: Some(ReplyTo::Async(reply)),
        };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(job)) => {
                let tx = tx.clone();
                blocking::unblock(move || tx.send(job).map_err(|_| ()))
                    .await
                    .map_err(|_| Error::ShuttingDown)?;
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return Err(Error::ShuttingDown)
            }
        }
        rx.recv().await.map_err(|_| Error::ShuttingDown)?
    }

    /// Run several ops: all are queued before any reply is awaited, so they share a group commit.
    pub fn call_many(&self, ops: Vec<Op>) -> Vec<Result<Reply>> {
        let Some(tx) = self.tx.as_ref() else {
            return ops.iter().map(|_| Err(Error::ShuttingDown)).collect();
        };
        let waits: Vec<Option<crossbeam_channel::Receiver<Result<Reply>>>> = ops
            .into_iter()
            .map(|op| {
                let (reply, rx) = bounded(1);
                tx.send(Job {
                    op,
                    reply: Some(ReplyTo::Wait(reply)),
                })
                .ok()
                .map(|_| rx)
            })
            .collect();
        waits
            .into_iter()
            .map(|rx| match rx {
                Some(rx) => rx.recv().map_err(|_| Error::ShuttingDown)?,
                None => Err(Error::ShuttingDown),
            })
            .collect()
    }

    /// Queue an op without waiting for it: it commits with the next group. Used where a lost op
    /// is repaired anyway (a task left unmarked is resent after its lease, and deduplicated).
    pub fn send_detached(&self, op: Op) -> Result<()> {
        let tx = self.tx.as_ref().ok_or(Error::ShuttingDown)?;
        tx.send(Job { op, reply: None })
            .map_err(|_| Error::ShuttingDown)
    }

    /// The database index this writer serves.
    pub fn db(&self) -> u32 {
        self.db
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run<C: std::ops::DerefMut<Target = Connection>>(
    db: u32,
    mut conn: C,
    rx: Receiver<Job>,
    max: usize,
    handoff: &Handoff,
) {
    while let Ok(first) = rx.recv() {
        let batch = crate::util::drain_batch(&rx, first, max);
        log::trace!("writer shard={db:02} batch={}", batch.len());
        let results = run_batch(db, &mut conn, &batch);
        // The commit returned: hand this group's tasks to the relay before anyone hears back.
        let committed: Vec<SavedTask> = results
            .iter()
            .filter_map(|r| match r {
                Ok(Reply::Saved(t)) => Some(t.clone()),
                _ => None,
            })
            .collect();
        if !committed.is_empty() {
            crate::crash::hit("after-commit");
            handoff.offer(committed);
        }
        for (job, result) in batch.into_iter().zip(results) {
            match (job.reply, result) {
                (Some(ReplyTo::Wait(reply)), result) => {
                    let _ = reply.send(result);
                }
                (Some(ReplyTo::Async(reply)), result) => {
                    let _ = reply.try_send(result);
                }
                (None, Err(e)) => {
                    log::warn!("detached write failed shard={db:02}, repaired by a later scan: {e}")
                }
                (None, Ok(_)) => {}
            }
        }
    }
    log::debug!("writer shard={db:02} stopped");
}

fn run_batch(db: u32, conn: &mut Connection, batch: &[Job]) -> Vec<Result<Reply>> {
    let ctx = || format!("writing to shard big_market_{db:02}");
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            return batch
                .iter()
                .map(|_| Err(Error::storage(ctx(), copy_err(&e))))
                .collect()
        }
    };
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let result = (|| {
            let sp = tx.savepoint().map_err(|e| Error::storage(ctx(), e))?;
            let reply = apply(db, &sp, &job.op)?;
            sp.commit().map_err(|e| Error::storage(ctx(), e))?;
            Ok(reply)
        })();
        // After SQLITE_FULL, an I/O error or running out of memory, SQLite may roll the whole
        // transaction back by itself. Then nothing of this group is kept: every op, the ones
        // that had succeeded included, is reported as not written, and the rest are not run
        // (outside a transaction they would each commit on their own).
        if let Err(e) = &result {
            if tx.is_autocommit() {
                let (full, cause) = match e {
                    Error::Storage { source, .. } => (is_full(source), source.to_string()),
                    other => (false, other.to_string()),
                };
                return batch
                    .iter()
                    .map(|_| Err(rolled_back(db, full, &cause)))
                    .collect();
            }
        }
        results.push(result);
    }
    crate::crash::hit("mid-group-commit");
    match tx.commit() {
        Ok(()) => results,
        Err(e) => {
            let full = is_full(&e);
            batch
                .iter()
                .map(|_| {
                    Err(if full {
                        rolled_back(db, true, &e.to_string())
                    } else {
                        Error::storage(ctx(), copy_err(&e))
                    })
                })
                .collect()
        }
    }
}

fn is_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// The error of an op whose group SQLite rolled back by itself.
fn rolled_back(db: u32, full: bool, cause: &str) -> Error {
    let context = format!(
        "writing to shard big_market_{db:02}: SQLite rolled the whole transaction back, so nothing of this write was kept"
    );
    Error::Storage {
        context,
        source: rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(if full {
                rusqlite::ffi::SQLITE_FULL
            } else {
                rusqlite::ffi::SQLITE_ABORT
            }),
            Some(cause.to_string()),
        ),
    }
}

/// rusqlite errors are not `Clone`; a failed commit is reported to every op of the batch.
fn copy_err(e: &rusqlite::Error) -> rusqlite::Error {
    let code = match e {
        rusqlite::Error::SqliteFailure(f, _) => f.extended_code,
        _ => rusqlite::ffi::SQLITE_ERROR,
    };
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(e.to_string()))
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Insert an award, take the shard's next sequence number, and insert its task, claimed by
/// `owner` until `lease_until_ms`: the rows of one award, on the caller's savepoint.
#[allow(clippy::too_many_arguments)]
pub(super) fn insert_award_and_task(
    conn: &Connection,
    db: u32,
    table: &str,
    record: &AwardRecord,
    topic: &str,
    owner: &str,
    lease_until_ms: i64,
    now_ms: i64,
) -> Result<SavedTask> {
    let ctx = |what: &str| format!("{what} on shard big_market_{db:02}");
    sql::insert_award(conn, table, record, now_ms).map_err(|e| {
        if is_unique_violation(&e) {
            Error::DuplicateOrder {
                order_id: record.order_id.as_str().to_string(),
            }
        } else {
            Error::storage(ctx("inserting an award record"), e)
        }
    })?;
    let seq =
        sql::take_seq(conn).map_err(|e| Error::storage(ctx("taking a task sequence number"), e))?;
    let message = EventMessage::for_award(record, db, seq, now_ms).encode();
    let message_id = MessageId::new(db, seq);
    let id = sql::insert_task(
        conn,
        &sql::NewTask {
            user_id: record.user_id.as_str(),
            topic,
            message_id: message_id.as_str(),
            message: &message,
            seq,
            owner,
            lease_until_ms,
            now_ms,
        },
    )
    .map_err(|e| Error::storage(ctx("inserting a task"), e))?;
    Ok(SavedTask {
        id,
        db,
        seq,
        message_id,
        topic: topic.to_string(),
        message,
        lease_until_ms,
    })
}

fn apply(db: u32, conn: &Connection, op: &Op) -> Result<Reply> {
    let ctx = |what: &str| format!("{what} on shard big_market_{db:02}");
    match op {
        Op::SaveAward {
            record,
            table,
            topic,
            owner,
            lease_until_ms,
            now_ms,
        } => {
            let saved = insert_award_and_task(
                conn,
                db,
                table,
                record,
                topic,
                owner,
                *lease_until_ms,
                *now_ms,
            )?;
            Ok(Reply::Saved(saved))
        }
        Op::MarkCompleted { ids, owner, now_ms } => {
            let mut n = 0;
            for id in ids {
                n += sql::mark_completed(conn, *id, Some(owner), *now_ms)
                    .map_err(|e| Error::storage(ctx("marking a task completed"), e))?;
            }
            Ok(Reply::Count(n))
        }
        Op::MarkFailed {
            failures,
            owner,
            now_ms,
        } => {
            let mut n = 0;
            for f in failures {
                n += sql::mark_failed(
                    conn,
                    f.id,
                    owner,
                    f.state,
                    f.attempts,
                    f.next_attempt_at,
                    &f.error,
                    *now_ms,
                )
                .map_err(|e| Error::storage(ctx("marking a task failed"), e))?;
            }
            Ok(Reply::Count(n))
        }
        Op::Claim {
            owner,
            limit,
            lease_until_ms,
            now_ms,
        } => {
            let rows = sql::claim_due(conn, owner, *now_ms, *lease_until_ms, *limit)
                .map_err(|e| Error::storage(ctx("claiming due tasks"), e))?;
            Ok(Reply::Claimed(rows))
        }
        Op::Renew {
            ids,
            owner,
            lease_until_ms,
            now_ms,
        } => {
            let mut renewed = Vec::with_capacity(ids.len());
            for id in ids {
                if sql::renew_lease(conn, *id, owner, *lease_until_ms, *now_ms)
                    .map_err(|e| Error::storage(ctx("renewing a lease"), e))?
                    == 1
                {
                    renewed.push(*id);
                }
            }
            Ok(Reply::Renewed(renewed))
        }
        Op::Release { owner, now_ms } => {
            let n = sql::release_claims(conn, owner, *now_ms)
                .map_err(|e| Error::storage(ctx("releasing claims"), e))?;
            Ok(Reply::Count(n))
        }
        Op::Deliver { msg, table, now_ms } => {
            let d = &msg.data;
            let seq = msg.seq.unwrap_or(0);
            let receipts = sql::record_delivery(conn, &msg.id, seq, &d.order_id, *now_ms)
                .map_err(|e| Error::storage(ctx("logging a delivery"), e))?;
            if receipts > 1 {
                return Ok(Reply::Delivered(Delivered::Again));
            }
            let changed = sql::complete_award(conn, table, &d.user_id, &d.order_id, *now_ms)
                .map_err(|e| Error::storage(ctx("delivering an award"), e))?;
            if changed == 0
                && !sql::award_exists(conn, table, &d.user_id, &d.order_id)
                    .map_err(|e| Error::storage(ctx("looking up an award"), e))?
            {
                // The savepoint rolls back the delivery log entry with this error.
                return Err(Error::Poison(format!(
                    "message {} names user {} order {}, which has no award record in big_market_{db:02}.{table}",
                    msg.id, d.user_id, d.order_id
                )));
            }
            Ok(Reply::Delivered(Delivered::First))
        }
        Op::Requeue {
            message_id,
            state,
            now_ms,
        } => {
            let n = sql::requeue(conn, message_id.as_deref(), *state, *now_ms)
                .map_err(|e| Error::storage(ctx("requeueing tasks"), e))?;
            Ok(Reply::Count(n))
        }
        Op::Barrier => Ok(Reply::Count(0)),
        Op::Purge { before_ms } => {
            let n = sql::purge_completed(conn, *before_ms)
                .map_err(|e| Error::storage(ctx("purging completed tasks"), e))?;
            Ok(Reply::Count(n))
        }
    }
}
