//! The shard writer: one thread per database owns its write connection. Callers send an
//! [`Op`] on a bounded channel and wait for the reply; the thread takes every op waiting (up to
//! `group_commit_max`) and hands the group to its backend's `Batch`, which runs it in one
//! transaction and commits once; only then does the thread reply. A failing op (a duplicate
//! order id) fails alone; a failed commit fails every op of the group. Backend-free: the SQL is
//! in `store::sqlite` and `store::mysql`.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::handoff::Handoff;
use super::op::{Op, Reply, SavedTask};
use super::Batch;
use crate::error::{Error, Result};

/// Capacity of a writer's queue. A full queue blocks callers: backpressure on the write path.
pub(crate) const WRITER_QUEUE: usize = 4096;

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
pub(crate) struct Writer {
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
        Ok(Writer { lanes, lane_of })
    }

    /// The queue of the lane that runs `op`.
    fn queue(&self, op: &Op) -> Result<&Sender<Job>> {
        let lane = (self.lane_of)(op).min(self.lanes.len() - 1);
        self.lanes[lane].tx.as_ref().ok_or(Error::ShuttingDown)
    }

    /// Run one op and wait until its transaction has committed (or failed). A barrier waits
    /// for every lane.
    pub(crate) fn call(&self, op: Op) -> Result<Reply> {
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
    pub(crate) async fn call_async(&self, op: Op) -> Result<Reply> {
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
    pub(crate) fn call_many(&self, ops: Vec<Op>) -> Vec<Result<Reply>> {
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
    pub(crate) fn send_detached(&self, op: Op) -> Result<()> {
        let tx = self.queue(&op)?;
        tx.send(Job { op, reply: None })
            .map_err(|_| Error::ShuttingDown)
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
            crate::crash::hit(crate::crash::Point::AfterCommit);
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
