//! The shard writer: one thread per database owns its write connection. Callers send an
//! [`Op`] on a bounded channel and wait for the reply; the thread takes every op waiting (up to
//! `group_commit_max`) and hands the group to its backend's `Batch`, which runs it in one
//! transaction and commits once; only then does the thread reply. A failing op (a duplicate
//! order id) fails alone; a failed commit fails every op of the group. Backend-free: the SQL is
//! in `store::sqlite` and `store::mysql`.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::{Batch, TaskRow};
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
    Claimed(Vec<TaskRow>),
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

/// Which of a backend's write connections (lanes) runs an op. Lanes commit independently; a
/// backend with one lane (SQLite) runs every op in the same group.
pub(crate) type LaneOf = fn(&Op) -> usize;

/// One lane: its queue and its thread.
struct Lane {
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

/// Handle to a shard's writer threads, one per lane. Dropping it lets the threads finish the
/// queued work, then joins them.
pub struct Writer {
    db: u32,
    lanes: Vec<Lane>,
    lane_of: LaneOf,
}

impl Writer {
    /// Start one writer thread per lane, each on its own write connection.
    pub(crate) fn spawn(
        db: u32,
        batches: Vec<Box<dyn Batch>>,
        lane_of: LaneOf,
        group_commit_max: usize,
        handoff: Arc<Handoff>,
    ) -> Result<Self> {
        let mut lanes = Vec::with_capacity(batches.len());
        for (i, batch) in batches.into_iter().enumerate() {
            let (tx, rx) = bounded::<Job>(WRITER_QUEUE);
            let handoff = handoff.clone();
            let name = if i == 0 {
                format!("writer-{db:02}")
            } else {
                format!("writer-{db:02}-{i}")
            };
            let handle = crate::util::spawn(name.clone(), move || {
                run(db, batch, rx, group_commit_max, &handoff)
            })?;
            lanes.push(Lane {
                tx: Some(tx),
                handle: Some(handle),
            });
        }
        Ok(Writer { db, lanes, lane_of })
    }

    /// The queue of the lane that runs `op`.
    fn queue(&self, op: &Op) -> Result<&Sender<Job>> {
        let lane = (self.lane_of)(op).min(self.lanes.len() - 1);
        self.lanes[lane].tx.as_ref().ok_or(Error::ShuttingDown)
    }

    /// Run one op and wait until its transaction has committed (or failed). A barrier waits
    /// for every lane.
    pub fn call(&self, op: Op) -> Result<Reply> {
        if matches!(op, Op::Barrier) && self.lanes.len() > 1 {
            for lane in &self.lanes {
                let (reply, rx) = bounded(1);
                let tx = lane.tx.as_ref().ok_or(Error::ShuttingDown)?;
                tx.send(Job {
                    op: Op::Barrier,
                    reply: Some(ReplyTo::Wait(reply)),
                })
                .map_err(|_| Error::ShuttingDown)?;
                rx.recv().map_err(|_| Error::ShuttingDown)??;
            }
            return Ok(Reply::Count(0));
        }
        let (reply, rx) = bounded(1);
        let tx = self.queue(&op)?;
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
        let tx = self.queue(&op)?;
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

    /// Run several ops: all are queued before any reply is awaited, so they share a group commit
    /// (per lane).
    pub fn call_many(&self, ops: Vec<Op>) -> Vec<Result<Reply>> {
        let waits: Vec<Option<crossbeam_channel::Receiver<Result<Reply>>>> = ops
            .into_iter()
            .map(|op| {
                let (reply, rx) = bounded(1);
                let tx = self.queue(&op).ok()?;
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
        let tx = self.queue(&op)?;
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
        for lane in &mut self.lanes {
            lane.tx.take();
        }
        for lane in &mut self.lanes {
            if let Some(h) = lane.handle.take() {
                let _ = h.join();
            }
        }
    }
}

fn run(db: u32, mut backend: Box<dyn Batch>, rx: Receiver<Job>, max: usize, handoff: &Handoff) {
    let linger = backend.linger();
    while let Ok(first) = rx.recv() {
        let mut batch = crate::util::drain_batch(&rx, first, max);
        if !linger.is_zero() {
            let deadline = std::time::Instant::now() + linger;
            while batch.len() < max {
                match rx.recv_deadline(deadline) {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        log::trace!("writer shard={db:02} batch={}", batch.len());
        let ops: Vec<&Op> = batch.iter().map(|j| &j.op).collect();
        let results = backend.run_batch(&ops);
        debug_assert_eq!(results.len(), batch.len(), "one result per op");
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
