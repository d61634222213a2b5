//! The shard writer: one thread per database owns its write connection. Callers send an
//! [`Op`] on a bounded channel and wait for the reply; the thread takes every op waiting (up to
//! `group_commit_max`) and hands the group to its backend's `Batch`, which runs it in one
//! transaction and commits once; only then does the thread reply. A failing op (a duplicate
//! order id) fails alone; a failed commit fails every op of the group. Backend-free: the SQL is
//! in `store::sqlite` and `store::mysql`.
//!
//! A backend may give its calls a deadline (MySQL: `--mysql-timeout`). A caller whose op was not
//! yet taken into a group when it passes withdraws it (the writer skips it: nothing of it is
//! written) and hears "not written"; one whose op is in a running group hears "outcome
//! unknown" (the group may still commit).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// Who has the op: the queue, the writer, or a caller that gave up on it (`None`: a caller
    /// without a deadline).
    claim: Option<Arc<AtomicU8>>,
}

/// A submitted op: where its answer comes, and its claim (with a deadline).
type Submitted = (oneshot::Receiver<Result<Reply>>, Option<Arc<AtomicU8>>);

/// Ops queued by [`Writer::submit_many`] whose answers are still to be awaited.
pub(crate) struct Pending {
    due: Option<Instant>,
    waits: Vec<Result<Submitted>>,
}

/// [`Job::claim`]: still queued.
const QUEUED: u8 = 0;
/// [`Job::claim`]: taken into a group by the writer.
const TAKEN: u8 = 1;
/// [`Job::claim`]: withdrawn by its caller past the deadline; never run.
const WITHDRAWN: u8 = 2;

/// Where a job's result goes: a thread blocked on it, or a task awaiting it. A waiting thread
/// parks on a one-shot slot at once: with hundreds of callers on two cores, a channel whose
/// receive first spins and yields spent more of the CPU than the callers' own work.
enum ReplyTo {
    Wait(oneshot::Sender<Result<Reply>>),
    Async(async_channel::Sender<Result<Reply>>),
}

/// Why [`send_job`] did not queue a job.
enum Unsent {
    /// No room in the queue by the deadline.
    NoRoom,
    /// The writer is gone.
    Closed,
}

/// Put `job` on `tx`, waiting at most until `due` for room (`None`: as long as it takes).
fn send_job(tx: &Sender<Job>, job: Job, due: Option<Instant>) -> std::result::Result<(), Unsent> {
    match due {
        None => tx.send(job).map_err(|_| Unsent::Closed),
        Some(due) => tx.send_deadline(job, due).map_err(|e| match e {
            crossbeam_channel::SendTimeoutError::Timeout(_) => Unsent::NoRoom,
            crossbeam_channel::SendTimeoutError::Disconnected(_) => Unsent::Closed,
        }),
    }
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
    /// How long a caller waits for its op (`None`: until it is done).
    deadline: Option<Duration>,
    /// Where the shard is, for the errors of a deadline.
    location: String,
}

impl Writer {
    /// Start one writer thread per lane, each on its own write connection.
    pub(crate) fn spawn(
        db: u32,
        location: &str,
        batches: Vec<Box<dyn Batch>>,
        lane_of: LaneOf,
        deadline: Option<Duration>,
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
        Ok(Writer {
            lanes,
            lane_of,
            deadline,
            location: location.to_string(),
        })
    }

    /// The queue of the lane that runs `op`.
    fn queue(&self, op: &Op) -> Result<&Sender<Job>> {
        let lane = (self.lane_of)(op).min(self.lanes.len() - 1);
        self.lanes[lane].tx.as_ref().ok_or(Error::ShuttingDown)
    }

    /// When a call started now must have its answer.
    fn due(&self) -> Option<Instant> {
        self.deadline.map(|d| Instant::now() + d)
    }

    /// The error of a write that waited past the deadline before the writer took it: it was
    /// withdrawn, so nothing of it is written.
    fn not_written(&self) -> Error {
        let d = self.deadline.unwrap_or_default();
        Error::storage(
            format!(
                "writing to {} (nothing of this write was kept: the database did not take it within {d:?}, --mysql-timeout)",
                self.location
            ),
            crate::error::StorageError::new(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from the database"),
                " (check that the MySQL server of --store is running and reachable)",
                false,
            ),
        )
    }

    /// The error of a write in a group that had not answered by the deadline: the group may
    /// still commit.
    fn unknown(&self) -> Error {
        let d = self.deadline.unwrap_or_default();
        Error::OutcomeUnknown {
            context: format!(
                "writing to {} (no answer within {d:?}, --mysql-timeout)",
                self.location
            ),
            source: crate::error::StorageError::new(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer from the database"),
                " (check that the MySQL server of --store is running and reachable)",
                false,
            ),
        }
    }

    /// Queue `op` (waiting at most until `due` for room) with its reply channel.
    fn submit(&self, op: Op, due: Option<Instant>) -> Result<Submitted> {
        let tx = self.queue(&op)?;
        self.submit_to(tx, op, due)
    }

    /// Queue `op` on the lane queue `tx`, waiting at most until `due` for room.
    fn submit_to(&self, tx: &Sender<Job>, op: Op, due: Option<Instant>) -> Result<Submitted> {
        let (reply, rx) = oneshot::channel();
        let claim = due.map(|_| Arc::new(AtomicU8::new(QUEUED)));
        let job = Job {
            op,
            reply: Some(ReplyTo::Wait(reply)),
            claim: claim.clone(),
        };
        self.enqueue(tx, job, due)?;
        Ok((rx, claim))
    }

    /// Put `job` on `tx`, waiting at most until `due` for room: past it nothing of the job was
    /// queued.
    fn enqueue(&self, tx: &Sender<Job>, job: Job, due: Option<Instant>) -> Result<()> {
        send_job(tx, job, due).map_err(|e| self.unsent(e))
    }

    /// The error of a job that [`send_job`] could not queue.
    fn unsent(&self, e: Unsent) -> Error {
        match e {
            Unsent::NoRoom => self.not_written(),
            Unsent::Closed => Error::ShuttingDown,
        }
    }

    /// The answer to a submitted op, waiting at most until `due`.
    fn answer(
        &self,
        rx: &oneshot::Receiver<Result<Reply>>,
        claim: Option<&AtomicU8>,
        due: Option<Instant>,
    ) -> Result<Reply> {
        let (Some(due), Some(claim)) = (due, claim) else {
            return rx.recv_ref().map_err(|_| Error::ShuttingDown)?;
        };
        match rx.recv_deadline(due) {
            Ok(r) => r,
            Err(oneshot::RecvTimeoutError::Disconnected) => Err(Error::ShuttingDown),
            Err(oneshot::RecvTimeoutError::Timeout) => self.give_up(claim, || rx.try_recv().ok()),
        }
    }

    /// Past the deadline: withdraw the op if the writer has not taken it, else it is in a
    /// running group, whose outcome is unknown (unless it answered meanwhile: `answered`).
    fn give_up(
        &self,
        claim: &AtomicU8,
        answered: impl FnOnce() -> Option<Result<Reply>>,
    ) -> Result<Reply> {
        match claim.compare_exchange(QUEUED, WITHDRAWN, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => Err(self.not_written()),
            Err(_) => answered().unwrap_or_else(|| Err(self.unknown())),
        }
    }

    /// Run one op and wait until its transaction has committed (or failed), at most the
    /// backend's deadline. A barrier waits for every lane.
    pub(crate) fn call(&self, op: Op) -> Result<Reply> {
        let due = self.due();
        if matches!(op, Op::Barrier) && self.lanes.len() > 1 {
            for lane in &self.lanes {
                let tx = lane.tx.as_ref().ok_or(Error::ShuttingDown)?;
                let (rx, claim) = self.submit_to(tx, Op::Barrier, due)?;
                self.answer(&rx, claim.as_deref(), due)?;
            }
            return Ok(Reply::Count(0));
        }
        let (rx, claim) = self.submit(op, due)?;
        self.answer(&rx, claim.as_deref(), due)
    }

    /// Run one op and await its commit without blocking the awaiting thread (an async
    /// executor's): the writer thread does the work and wakes the task. Only when the writer's
    /// queue is full does the hand-over wait, on the blocking pool. At most the backend's
    /// deadline.
    pub(crate) async fn call_async(&self, op: Op) -> Result<Reply> {
        let due = self.due();
        let (reply, rx) = async_channel::bounded(1);
        let tx = self.queue(&op)?;
        let claim = due.map(|_| Arc::new(AtomicU8::new(QUEUED)));
        let job = Job {
            op,
            reply: Some(ReplyTo::Async(reply)),
            claim: claim.clone(),
        };
        match tx.try_send(job) {
            Ok(()) => {}
            // The wait for room blocks: off the executor.
            Err(crossbeam_channel::TrySendError::Full(job)) => {
                let tx = tx.clone();
                blocking::unblock(move || send_job(&tx, job, due))
                    .await
                    .map_err(|e| self.unsent(e))?;
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return Err(Error::ShuttingDown)
            }
        }
        let (Some(due), Some(claim)) = (due, claim) else {
            return rx.recv().await.map_err(|_| Error::ShuttingDown)?;
        };
        let timer = async {
            async_io::Timer::at(due).await;
            None
        };
        match futures_lite::future::or(async { Some(rx.recv().await) }, timer).await {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::ShuttingDown),
            None => self.give_up(&claim, || rx.try_recv().ok()),
        }
    }

    /// Queue several ops without waiting for them (they share a group commit, per lane):
    /// [`Writer::answers`] waits. A caller with ops for several shards queues them all first,
    /// so the shards commit them side by side.
    pub(crate) fn submit_many(&self, ops: Vec<Op>) -> Pending {
        let due = self.due();
        Pending {
            due,
            waits: ops.into_iter().map(|op| self.submit(op, due)).collect(),
        }
    }

    /// The answers to ops queued by [`Writer::submit_many`], in order, each within the backend's
    /// deadline of the submission.
    pub(crate) fn answers(&self, pending: Pending) -> Vec<Result<Reply>> {
        let due = pending.due;
        pending
            .waits
            .into_iter()
            .map(|w| {
                let (rx, claim) = w?;
                self.answer(&rx, claim.as_deref(), due)
            })
            .collect()
    }

    /// Queue an op without waiting for it: it commits with the next group. Used where a lost op
    /// is repaired anyway (a task left unmarked is resent after its lease, and deduplicated).
    /// Waits for room in the queue at most the backend's deadline.
    pub(crate) fn send_detached(&self, op: Op) -> Result<()> {
        let tx = self.queue(&op)?;
        let job = Job {
            op,
            reply: None,
            claim: None,
        };
        self.enqueue(tx, job, self.due())
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

/// Run a group on the backend, containing a panic (a bug) so that the writer thread goes on: a
/// dead writer thread would leave the ops queued behind it waiting for ever. When the backend
/// knows it kept nothing of the panicked group (SQLite always; MySQL when the panic came
/// before the group's commit was sent), its ops run again one at a time, so only the op that
/// panics fails: a delivery as unprocessable (it is dead-lettered rather than retried for
/// ever), anything else as not written. Otherwise (the panic came after a commit was sent)
/// every op of the group hears "outcome unknown".
pub(in crate::store) fn run_contained(
    db: u32,
    backend: &mut dyn Batch,
    ops: &[&Op],
) -> Vec<Result<Reply>> {
    let what = match catch(db, backend, ops) {
        Ok(results) => return results,
        Err(what) => what,
    };
    if !backend.kept_nothing_of_panicked_group() {
        log::error!(
            "writer shard={db:02} failed a group of {} writes on a bug ({what}); their outcome is unknown, the writer goes on",
            ops.len()
        );
        return ops.iter().map(|_| Err(unknown(db, &what))).collect();
    }
    let refuse = |op: &Op, what: &str| -> Result<Reply> {
        log::error!("writer shard={db:02} refused a write that fails on a bug ({what}); nothing of it was kept");
        Err(match op {
            Op::Deliver { .. } => Error::Poison(format!(
                "delivering it fails on a bug in big-market ({what}); nothing was written: please report it with the log"
            )),
            _ => Error::storage(
                format!("writing to shard big_market_{db:02} (nothing of this write was kept)"),
                bug(what),
            ),
        })
    };
    if let [op] = ops {
        return vec![refuse(op, &what)];
    }
    log::error!(
        "writer shard={db:02} rolled back a group of {} writes on a bug ({what}); they run again one at a time",
        ops.len()
    );
    ops.iter()
        .map(|op| match catch(db, backend, &[op]) {
            Ok(mut results) => results.pop().expect("one result for one op"),
            Err(what) if backend.kept_nothing_of_panicked_group() => refuse(op, &what),
            Err(what) => Err(unknown(db, &what)),
        })
        .collect()
}

/// The error of a write whose group failed on a bug that may have come after its commit.
fn unknown(db: u32, what: &str) -> Error {
    Error::OutcomeUnknown {
        context: format!("writing to shard big_market_{db:02}"),
        source: bug(what),
    }
}

/// The cause of a write that failed on a bug in the writer's backend.
fn bug(what: &str) -> crate::error::StorageError {
    crate::error::StorageError::new(
        std::io::Error::other(format!("the shard writer failed on a bug: {what}")),
        " (a bug in big-market: please report it with the log)",
        false,
    )
}

/// `run_batch` with a panic caught (its message returned), and one result per op checked: a
/// backend that answered too many has the extra dropped, too few has the missing ones
/// "outcome unknown".
fn catch(
    db: u32,
    backend: &mut dyn Batch,
    ops: &[&Op],
) -> std::result::Result<Vec<Result<Reply>>, String> {
    let mut results =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.run_batch(ops))).map_err(
            |panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_string())
            },
        )?;
    if results.len() != ops.len() {
        let what = format!("{} results for {} writes", results.len(), ops.len());
        log::error!("writer shard={db:02} got {what} from its backend (a bug)");
        results.truncate(ops.len());
        results.resize_with(ops.len(), || Err(unknown(db, &what)));
    }
    Ok(results)
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
        // Take each op from its caller, leaving out those withdrawn past their deadline.
        let before = batch.len();
        batch.retain(|j| {
            j.claim.as_ref().is_none_or(|c| {
                c.compare_exchange(QUEUED, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            })
        });
        if batch.len() < before {
            log::debug!(
                "writer shard={db:02} skipped {} writes withdrawn past their deadline",
                before - batch.len()
            );
        }
        if batch.is_empty() {
            continue;
        }
        log::trace!("writer shard={db:02} batch={}", batch.len());
        let ops: Vec<&Op> = batch.iter().map(|j| &j.op).collect();
        let results = run_contained(db, backend.as_mut(), &ops);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// A backend whose groups wait until the test opens the gate, and that counts the ops it
    /// ran (and, with `panic_first`, panics in its first group).
    struct Gated {
        open: Arc<Mutex<bool>>,
        entered: Arc<AtomicUsize>,
        ran: Arc<AtomicUsize>,
        /// Panic in the first group, once the gate opens, as a bug would.
        panic_first: bool,
    }

    impl Batch for Gated {
        fn run_batch(&mut self, ops: &[&Op]) -> Vec<Result<Reply>> {
            let first = self.entered.fetch_add(1, Ordering::SeqCst) == 0;
            assert!(
                crate::util::wait_until(Duration::from_secs(20), || *self.open.lock().unwrap()),
                "the test opens the gate"
            );
            if first && self.panic_first {
                panic!("a bug in a backend");
            }
            self.ran.fetch_add(ops.len(), Ordering::SeqCst);
            ops.iter().map(|_| Ok(Reply::Count(0))).collect()
        }
    }

    /// A one-lane writer over a [`Gated`] backend, a group holding one op: the writer, its
    /// gate, and the groups entered and ops run.
    fn gated(
        deadline: Option<Duration>,
        panic_first: bool,
    ) -> (
        Arc<Writer>,
        Arc<Mutex<bool>>,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        let open = Arc::new(Mutex::new(false));
        let (entered, ran) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let batch = Gated {
            open: open.clone(),
            entered: entered.clone(),
            ran: ran.clone(),
            panic_first,
        };
        let w = Writer::spawn(
            1,
            "test-shard",
            vec![Box::new(batch)],
            |_| 0,
            deadline,
            1,
            Arc::new(Handoff::new(16)),
        )
        .unwrap();
        (Arc::new(w), open, entered, ran)
    }

    #[test]
    fn a_write_that_finds_the_queue_full_waits_for_room_and_past_its_deadline_nothing_of_it_is_queued(
    ) {
        let deadline = Duration::from_millis(300);
        let (w, open, entered, ran) = gated(Some(deadline), false);
        // Whatever the outcome, the gate opens when the test ends, so that a failed assertion
        // does not leave the writer waiting at it with thousands of writes queued.
        struct OpenOnDrop(Arc<Mutex<bool>>);
        impl Drop for OpenOnDrop {
            fn drop(&mut self) {
                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            }
        }
        let _open = OpenOnDrop(open.clone());
        // One write in a group held at the gate, then the queue filled behind it.
        assert!(w.send_detached(Op::Barrier).is_ok());
        assert!(crate::util::wait_until(Duration::from_secs(10), || entered
            .load(Ordering::SeqCst)
            == 1));
        for _ in 0..WRITER_QUEUE {
            assert!(w.send_detached(Op::Barrier).is_ok(), "room in the queue");
        }
        // One more waits for room, and past its deadline is refused, not queued; so does an
        // async caller's (its own path: the wait for room off the executor).
        let started = Instant::now();
        let refused = w.send_detached(Op::Barrier);
        assert!(
            matches!(&refused, Err(Error::Storage { context, .. }) if context.contains("nothing of this write was kept")),
            "{refused:?}"
        );
        assert!(started.elapsed() >= deadline, "it waited for room");
        let started = Instant::now();
        let refused = async_global_executor::block_on(w.call_async(Op::Barrier));
        assert!(
            matches!(&refused, Err(Error::Storage { context, .. }) if context.contains("nothing of this write was kept")),
            "{refused:?}"
        );
        assert!(
            started.elapsed() >= deadline,
            "the async caller waited for room"
        );
        assert_eq!(
            w.lanes[0].tx.as_ref().map(|tx| tx.len()),
            Some(WRITER_QUEUE)
        );
        *open.lock().unwrap() = true;
        assert!(crate::util::wait_until(Duration::from_secs(30), || ran
            .load(Ordering::SeqCst)
            == WRITER_QUEUE + 1));
        // Every queued write ran, the queue is empty and no group is running: the refused
        // write is nowhere, so it never runs.
        assert_eq!(w.lanes[0].tx.as_ref().map(|tx| tx.len()), Some(0));
        assert_eq!(
            entered.load(Ordering::SeqCst),
            WRITER_QUEUE + 1,
            "the refused write never ran"
        );
    }

    #[test]
    fn a_group_that_panics_is_outcome_unknown_and_the_writer_serves_the_ops_behind_it() {
        let (w, open, entered, _) = gated(None, true);
        // Callers on threads of their own, not scoped: if the queued one never heard back, the
        // test fails at its bounded wait instead of hanging on a join.
        let caller = |name: &str| {
            let w = w.clone();
            crate::util::spawn(name, move || w.call(Op::Barrier)).unwrap()
        };
        let in_group = caller("in-group");
        assert!(crate::util::wait_until(Duration::from_secs(10), || entered
            .load(Ordering::SeqCst)
            == 1));
        let queued = caller("queued");
        // The second op is in the queue before the writer panics (a group holds one op).
        assert!(crate::util::wait_until(Duration::from_secs(10), || w.lanes
            [0]
        .tx
        .as_ref()
        .is_some_and(|tx| tx.len() == 1)));
        *open.lock().unwrap() = true;
        let r = in_group.join().unwrap();
        assert!(
            matches!(&r, Err(Error::OutcomeUnknown { .. })),
            "the op in the group that panicked: {r:?}"
        );
        assert!(
            crate::util::wait_until(Duration::from_secs(10), || queued.is_finished()),
            "the op queued behind the panic is answered"
        );
        let r = queued.join().unwrap();
        assert!(
            matches!(r, Ok(Reply::Count(0))),
            "the op queued behind it: {r:?}"
        );
        assert!(matches!(w.call(Op::Barrier), Ok(Reply::Count(0))));
        assert_eq!(entered.load(Ordering::SeqCst), 3, "three groups ran");
    }

    /// A backend that answers `extra` more results than ops (or fewer, when negative).
    struct Miscounts {
        extra: isize,
    }

    impl Batch for Miscounts {
        fn run_batch(&mut self, ops: &[&Op]) -> Vec<Result<Reply>> {
            let n = (ops.len() as isize + self.extra).max(0) as usize;
            (0..n).map(|i| Ok(Reply::Count(i))).collect()
        }
    }

    #[test]
    fn a_backend_that_miscounts_its_results_gets_extras_dropped_and_the_missing_unknown() {
        let ops = [&Op::Barrier, &Op::Barrier, &Op::Barrier];
        let r = run_contained(1, &mut Miscounts { extra: 2 }, &ops);
        assert_eq!(r.len(), 3, "one result per op");
        assert!(r
            .iter()
            .enumerate()
            .all(|(i, r)| matches!(r, Ok(Reply::Count(n)) if *n == i)));
        let r = run_contained(1, &mut Miscounts { extra: -2 }, &ops);
        assert_eq!(r.len(), 3, "one result per op");
        assert!(matches!(r[0], Ok(Reply::Count(0))));
        assert!(
            r[1..]
                .iter()
                .all(|r| matches!(r, Err(Error::OutcomeUnknown { .. }))),
            "{r:?}"
        );
    }

    /// A backend that panics on any group holding a delivery or a purge before time -1, and
    /// runs every other group; `rolls_back` says whether a panic kept nothing.
    struct PanicsOn {
        rolls_back: bool,
        groups: usize,
    }

    impl Batch for PanicsOn {
        fn run_batch(&mut self, ops: &[&Op]) -> Vec<Result<Reply>> {
            self.groups += 1;
            let bad = |op: &&Op| matches!(op, Op::Deliver { .. } | Op::Purge { before_ms: -1 });
            if ops.iter().any(bad) {
                panic!("a bug in a backend");
            }
            ops.iter().map(|_| Ok(Reply::Count(0))).collect()
        }

        fn kept_nothing_of_panicked_group(&mut self) -> bool {
            self.rolls_back
        }
    }

    #[test]
    fn in_a_group_that_panics_only_the_op_that_panics_fails_where_the_backend_rolled_back() {
        let seed = br#"{"data":{"awardId":101,"awardTitle":"t","orderId":"1","userId":"u"},"id":"b0100000001","timestamp":1}"#;
        let deliver = Op::Deliver {
            msg: crate::model::EventMessage::decode(seed).unwrap(),
            table: "user_award_record_000".to_string(),
            now_ms: 0,
        };
        let (fine, purge) = (Op::Barrier, Op::Purge { before_ms: -1 });
        let ops = [&fine, &purge, &deliver, &fine];

        let mut rolled_back = PanicsOn {
            rolls_back: true,
            groups: 0,
        };
        let r = run_contained(1, &mut rolled_back, &ops);
        assert!(matches!(r[0], Ok(Reply::Count(0))), "{:?}", r[0]);
        assert!(
            matches!(&r[1], Err(Error::Storage { context, .. }) if context.contains("nothing of this write was kept")),
            "{:?}",
            r[1]
        );
        assert!(
            matches!(&r[2], Err(Error::Poison(_))),
            "a delivery is refused: {:?}",
            r[2]
        );
        assert!(matches!(r[3], Ok(Reply::Count(0))), "{:?}", r[3]);
        assert_eq!(rolled_back.groups, 5, "the group, then each op alone");

        let mut unknown = PanicsOn {
            rolls_back: false,
            groups: 0,
        };
        let r = run_contained(1, &mut unknown, &ops);
        assert!(
            r.iter()
                .all(|r| matches!(r, Err(Error::OutcomeUnknown { .. }))),
            "the panic may have come after a commit: {r:?}"
        );
        assert_eq!(unknown.groups, 1, "nothing runs again");
    }

    #[test]
    fn past_the_deadline_a_queued_op_is_withdrawn_and_one_in_a_running_group_is_outcome_unknown() {
        let deadline = Duration::from_millis(300);
        let (w, open, entered, ran) = gated(Some(deadline), false);
        std::thread::scope(|s| {
            let in_group = s.spawn(|| {
                let t0 = Instant::now();
                (w.call(Op::Barrier), t0.elapsed())
            });
            assert!(crate::util::wait_until(Duration::from_secs(10), || entered
                .load(Ordering::SeqCst)
                == 1));
            let t0 = Instant::now();
            let queued = w.call(Op::Barrier);
            let waited = t0.elapsed();
            match queued {
                Err(Error::Storage { context, .. }) => {
                    assert!(
                        context.contains("nothing of this write was kept"),
                        "{context}"
                    )
                }
                other => panic!("expected not written, got {other:?}"),
            }
            assert!(waited >= deadline && waited < deadline * 4, "{waited:?}");
            let (r, waited) = in_group.join().unwrap();
            assert!(
                matches!(r, Err(Error::OutcomeUnknown { .. })),
                "the op in the blocked group: {r:?}"
            );
            assert!(waited < deadline * 4, "{waited:?}");
        });
        *open.lock().unwrap() = true;
        // The writer goes on: a new call is answered, and the withdrawn op never ran.
        assert!(matches!(w.call(Op::Barrier), Ok(Reply::Count(0))));
        assert_eq!(
            ran.load(Ordering::SeqCst),
            2,
            "the blocked op and the new one"
        );
    }
}
