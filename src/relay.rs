//! The relay: the path from a commit to the broker.
//!
//! Each shard's writer hands the tasks of every group commit to that shard's [`Handoff`]; the
//! shard's relay thread takes whatever is waiting (up to `relay_batch` tasks), publishes it as
//! one pipelined batch with one deadline, and marks the confirmed tasks completed in one
//! batched write that joins the next group commit. Callers never wait for any of this.
//!
//! The hand-off is bounded in tasks, not batches. Past its capacity the writer keeps nothing in
//! memory: it records the range of sequence numbers it could not hand over, and the relay reads
//! those tasks back from SQLite in chunks once it has caught up. Nothing is lost, memory stays
//! bounded, and a task is never both in memory and in a range.
//!
//! Tasks are inserted already claimed by the relay's owner (`<process>/relay`), leased for
//! `stale_after`. Before publishing, the relay checks that each task has at least
//! [`Settings::lease_margin`] of lease left (more than a whole publish deadline); a task with
//! less, such as one that waited in a backlog older than the lease, has its lease renewed in a
//! write that only succeeds while the relay still holds the claim. A task the scanner (or
//! another process) claimed in the meantime is dropped, so the two never have a task in flight
//! at once.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::outbox::{Outbox, Pending, Relayed};
use crate::store::{Op, Reply, SavedTask, Store};
use crate::util::now_ms;

/// Committed tasks on their way from a shard's writer to its relay: in memory up to a capacity,
/// past it as a range of sequence numbers to read back from SQLite.
pub struct Handoff {
    /// Unbounded as a channel; bounded in tasks by `held` and `capacity`. An empty batch is a
    /// wake-up (a range was recorded, or the relay is asked to stop).
    tx: Sender<Vec<SavedTask>>,
    rx: Receiver<Vec<SavedTask>>,
    held: AtomicUsize,
    capacity: usize,
    /// Sequence numbers `(from, to)` committed but not handed over. While set, every new commit
    /// extends it instead of going to memory, so memory and range never share a task.
    spilled: Mutex<Option<(u64, u64)>>,
    spilled_total: AtomicU64,
}

impl Handoff {
    /// A hand-off that holds at most `capacity` tasks in memory.
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = unbounded();
        Handoff {
            tx,
            rx,
            held: AtomicUsize::new(0),
            capacity,
            spilled: Mutex::new(None),
            spilled_total: AtomicU64::new(0),
        }
    }

    /// Hand over the tasks of one commit (the writer calls this after the commit returned).
    pub fn offer(&self, tasks: Vec<SavedTask>) {
        if tasks.is_empty() {
            return;
        }
        let n = tasks.len();
        let mut spilled = self.spilled.lock().expect("handoff lock");
        if spilled.is_none() && self.held.load(Ordering::SeqCst) + n <= self.capacity {
            self.held.fetch_add(n, Ordering::SeqCst);
            let _ = self.tx.send(tasks);
            return;
        }
        let lo = tasks.iter().map(|t| t.seq).min().unwrap_or(0);
        let hi = tasks.iter().map(|t| t.seq).max().unwrap_or(0);
        let was_empty = spilled.is_none();
        *spilled = Some(match *spilled {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
        self.spilled_total.fetch_add(n as u64, Ordering::SeqCst);
        if was_empty {
            log::debug!("relay hand-off full: tasks from seq={lo} wait in SQLite");
            let _ = self.tx.send(Vec::new());
        }
    }

    /// Up to about `max` handed-over tasks, waiting at most `wait` for the first.
    fn take(&self, wait: Duration, max: usize) -> Vec<SavedTask> {
        let first = if wait.is_zero() {
            self.rx.try_recv().ok()
        } else {
            self.rx.recv_timeout(wait).ok()
        };
        let mut out = first.unwrap_or_default();
        while out.len() < max {
            match self.rx.try_recv() {
                Ok(more) => out.extend(more),
                Err(_) => break,
            }
        }
        self.held.fetch_sub(out.len(), Ordering::SeqCst);
        out
    }

    fn take_spilled(&self) -> Option<(u64, u64)> {
        self.spilled.lock().expect("handoff lock").take()
    }

    fn wake(&self) {
        let _ = self.tx.send(Vec::new());
    }

    /// Tasks held in memory now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Tasks that did not fit and went the SQLite way, since start.
    pub fn spilled_total(&self) -> u64 {
        self.spilled_total.load(Ordering::SeqCst)
    }
}

/// One shard's relay.
pub struct Relay {
    db: u32,
    store: Arc<Store>,
    outbox: Arc<Outbox>,
    settings: Arc<Settings>,
    /// The part of a spilled range not read back yet.
    cursor: Mutex<Option<(u64, u64)>>,
    /// Set while the relay is between taking a batch and settling it.
    busy: AtomicBool,
}

impl Relay {
    /// The relay of shard `db`.
    pub fn new(db: u32, store: Arc<Store>, outbox: Arc<Outbox>, settings: Arc<Settings>) -> Self {
        Relay {
            db,
            store,
            outbox,
            settings,
            cursor: Mutex::new(None),
            busy: AtomicBool::new(false),
        }
    }

    fn handoff(&self) -> &Handoff {
        self.store.shard(self.db).handoff()
    }

    /// One deterministic step: take what the writer handed over (waiting at most `wait` for
    /// it), or else the next chunk of a spilled range from SQLite; publish it as one batch and
    /// settle it. Returns how the batch ended; an empty report means there was nothing to do.
    pub fn relay_once(&self, wait: Duration) -> Result<Relayed> {
        let max = self.settings.relay_batch;
        // Work waiting in SQLite: do not wait for the hand-off.
        let spilled_waiting = self.cursor.lock().expect("cursor lock").is_some()
            || self
                .handoff()
                .spilled
                .lock()
                .expect("handoff lock")
                .is_some();
        let wait = if spilled_waiting {
            Duration::ZERO
        } else {
            wait
        };
        let mut batch: Vec<Pending> = self
            .handoff()
            .take(wait, max)
            .into_iter()
            .map(Pending::from)
            .collect();
        self.busy.store(true, Ordering::SeqCst);
        let result = (|| {
            if batch.is_empty() {
                batch = self.read_spilled(max)?;
            }
            if batch.is_empty() {
                return Ok(Relayed::default());
            }
            let batch = self.hold_leases(batch)?;
            log::debug!("relay shard={:02} tasks={}", self.db, batch.len());
            self.outbox.relay_committed(self.db, &batch)
        })();
        self.busy.store(false, Ordering::SeqCst);
        result
    }

    /// Whether nothing is waiting for this relay and it has no batch in hand.
    pub fn is_idle(&self) -> bool {
        let h = self.handoff();
        !self.busy.load(Ordering::SeqCst)
            && h.held() == 0
            && h.spilled.lock().expect("handoff lock").is_none()
            && self.cursor.lock().expect("cursor lock").is_none()
    }

    fn read_spilled(&self, max: usize) -> Result<Vec<Pending>> {
        let mut cursor = self.cursor.lock().expect("cursor lock");
        loop {
            let (from, to) = match *cursor {
                Some(r) => r,
                None => match self.handoff().take_spilled() {
                    Some(r) => r,
                    None => return Ok(Vec::new()),
                },
            };
            let rows =
                self.store
                    .shard(self.db)
                    .leased_tasks(self.outbox.relay_owner(), from, to, max)?;
            match rows.last() {
                None => *cursor = None,
                Some(last) => {
                    *cursor = (last.seq < to && rows.len() == max).then_some((last.seq + 1, to));
                    log::debug!(
                        "relay shard={:02} read back tasks={} from seq={from}",
                        self.db,
                        rows.len()
                    );
                    return Ok(rows.into_iter().map(Pending::from).collect());
                }
            }
        }
    }

    /// Keep the tasks whose lease outlasts a publish; renew the others while the relay still
    /// holds their claim, and drop those another claim took.
    fn hold_leases(&self, batch: Vec<Pending>) -> Result<Vec<Pending>> {
        let now = now_ms();
        let margin = self.settings.lease_margin().as_millis() as i64;
        let (mut keep, short): (Vec<Pending>, Vec<Pending>) = batch
            .into_iter()
            .partition(|t| t.lease_until_ms - now >= margin);
        if short.is_empty() {
            return Ok(keep);
        }
        let lease_until_ms = now.saturating_add(self.settings.stale_after.as_millis() as i64);
        let renewed = match self.store.shard(self.db).write(Op::Renew {
            ids: short.iter().map(|t| t.id).collect(),
            owner: self.outbox.relay_owner().clone(),
            lease_until_ms,
            now_ms: now,
        })? {
            Reply::Renewed(ids) => ids,
            other => unreachable!("Renew replied {other:?}"),
        };
        let lost = short.len() - renewed.len();
        if lost > 0 {
            log::debug!(
                "relay shard={:02} left tasks={lost} to the claim that took them",
                self.db
            );
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

/// A running relay thread per shard.
pub struct RelayThreads {
    relays: Vec<Arc<Relay>>,
    /// Dropped to stop the threads: a disconnect ends their waits at once.
    stop: Option<Sender<()>>,
    handles: Vec<JoinHandle<()>>,
}

impl RelayThreads {
    /// Start one relay thread per shard.
    pub fn start(
        store: &Arc<Store>,
        outbox: &Arc<Outbox>,
        settings: &Arc<Settings>,
    ) -> Result<RelayThreads> {
        let (stop, stop_rx) = bounded::<()>(0);
        let mut relays = Vec::new();
        let mut handles = Vec::new();
        for shard in store.shards() {
            let relay = Arc::new(Relay::new(
                shard.db(),
                store.clone(),
                outbox.clone(),
                settings.clone(),
            ));
            let (r, stop_rx) = (relay.clone(), stop_rx.clone());
            let handle = crate::util::spawn(format!("relay-{:02}", shard.db()), move || {
                run(&r, &stop_rx)
            })?;
            relays.push(relay);
            handles.push(handle);
        }
        Ok(RelayThreads {
            relays,
            stop: Some(stop),
            handles,
        })
    }

    /// The relays, in shard order.
    pub fn relays(&self) -> &[Arc<Relay>] {
        &self.relays
    }

    /// Whether every relay is idle.
    pub fn is_idle(&self) -> bool {
        self.relays.iter().all(|r| r.is_idle())
    }

    /// Stop the threads and join them; each at most once.
    fn stop_threads(&mut self) {
        if self.stop.take().is_none() {
            return;
        }
        for r in &self.relays {
            r.handoff().wake();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }

    /// Stop the threads, then relay what is already committed on this thread for at most
    /// `limit`. Whatever is left stays leased in SQLite; the scanner sends it after the lease.
    pub fn stop_and_drain(mut self, limit: Duration) {
        self.stop_threads();
        let deadline = Instant::now() + limit;
        let mut relayed = Relayed::default();
        for r in &self.relays {
            while Instant::now() < deadline {
                match r.relay_once(Duration::ZERO) {
                    Ok(step) if step == Relayed::default() => break,
                    Ok(step) => relayed += step,
                    Err(e) => {
                        log::warn!("relay drain stopped shard={:02}: {e}", r.db);
                        break;
                    }
                }
            }
        }
        if !self.is_idle() {
            log::warn!("relay drain ran out of time after {limit:?}: the rest is sent by the scanner once its lease expires");
        }
        if relayed != Relayed::default() {
            log::info!(
                "relay drained completed={} failed={}",
                relayed.completed,
                relayed.failed + relayed.dead
            );
        }
    }
}

impl Drop for RelayThreads {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn run(relay: &Relay, stop: &Receiver<()>) {
    let stopped = || matches!(stop.try_recv(), Err(TryRecvError::Disconnected));
    let mut failing = false;
    while !stopped() {
        match relay.relay_once(Duration::from_millis(200)) {
            Ok(_) => {
                if failing {
                    log::info!("relay recovered shard={:02}", relay.db);
                    failing = false;
                }
            }
            Err(Error::ShuttingDown) => break,
            Err(e) => {
                if !failing {
                    log::warn!("relay step failed shard={:02}, retrying: {e}", relay.db);
                    failing = true;
                }
                // The batch stays leased in SQLite. Back off before the next step, waking
                // early only to stop (the hand-off is left alone: nothing in it is consumed).
                if !matches!(
                    stop.recv_timeout(Duration::from_millis(100)),
                    Err(RecvTimeoutError::Timeout)
                ) {
                    break;
                }
            }
        }
    }
    log::debug!("relay stopped shard={:02}", relay.db);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MessageId;

    fn task(seq: u64) -> SavedTask {
        SavedTask {
            id: seq as i64,
            db: 1,
            seq,
            message_id: MessageId::new(1, seq),
            topic: "t".into(),
            message: "{}".into(),
            lease_until_ms: 0,
        }
    }

    #[test]
    fn a_full_handoff_spills_a_range_that_never_overlaps_memory() {
        let h = Handoff::new(3);
        h.offer(vec![task(1), task(2)]);
        h.offer(vec![task(3), task(4)]); // does not fit: spilled
        h.offer(vec![task(5)]); // a range is open: spilled too, though it would fit
        assert_eq!(h.held(), 2);
        assert_eq!(h.spilled_total(), 3);
        let taken: Vec<u64> = h.take(Duration::ZERO, 10).iter().map(|t| t.seq).collect();
        assert_eq!(taken, vec![1, 2]);
        assert_eq!(h.held(), 0);
        assert_eq!(h.take_spilled(), Some((3, 5)));
        h.offer(vec![task(6)]); // range taken: memory again
        assert_eq!(h.held(), 1);
        assert_eq!(h.take_spilled(), None);
    }

    #[test]
    fn a_commit_larger_than_the_capacity_spills_and_wakes_the_relay() {
        let h = Handoff::new(2);
        h.offer((1..=5).map(task).collect());
        assert_eq!(h.held(), 0);
        // The wake-up is an empty batch, so a waiting relay looks at the range at once.
        assert!(h.take(Duration::from_secs(1), 10).is_empty());
        assert_eq!(h.take_spilled(), Some((1, 5)));
    }
}
