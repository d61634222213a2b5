//! The hand-off from a shard's writer to its relay: the writer's output port. After each
//! commit the writer offers the group's tasks; the relay takes them. Bounded in tasks: past its
//! capacity the writer keeps nothing in memory but records the range of sequence numbers it
//! could not hand over, which the relay reads back from the shard. A task is never both in
//! memory and in a range.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::op::SavedTask;

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
    pub(crate) fn new(capacity: usize) -> Self {
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
    pub(crate) fn offer(&self, tasks: Vec<SavedTask>) {
        if tasks.is_empty() {
            return;
        }
        let n = tasks.len();
        let mut spilled = self.range();
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

    /// Up to about `max` handed-over tasks, waiting at most `wait` for the first. `in_hand`
    /// is set before the tasks stop counting as held, so that the relay taking them is never
    /// seen idle with tasks in hand.
    pub fn take(&self, wait: Duration, max: usize, in_hand: &AtomicBool) -> Vec<SavedTask> {
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
        if !out.is_empty() {
            in_hand.store(true, Ordering::SeqCst);
        }
        self.held.fetch_sub(out.len(), Ordering::SeqCst);
        out
    }

    /// The range of sequence numbers committed but not handed over, if any; taking it closes
    /// it, so the next commit goes to memory again.
    pub fn take_spilled(&self) -> Option<(u64, u64)> {
        self.range().take()
    }

    /// Wake a relay waiting in [`Handoff::take`] (to look at a range, or to stop).
    pub fn wake(&self) {
        let _ = self.tx.send(Vec::new());
    }

    /// Whether a range of sequence numbers waits to be read back from the shard.
    pub fn has_spilled(&self) -> bool {
        self.range().is_some()
    }

    /// The spilled range, under its lock (a lock poisoned by a panicking holder is taken as
    /// it is: the range is one assignment, never half-written).
    fn range(&self) -> std::sync::MutexGuard<'_, Option<(u64, u64)>> {
        self.spilled.lock().unwrap_or_else(|e| e.into_inner())
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
        let taken: Vec<u64> = h
            .take(Duration::ZERO, 10, &AtomicBool::new(false))
            .iter()
            .map(|t| t.seq)
            .collect();
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
        assert!(h
            .take(Duration::from_secs(1), 10, &AtomicBool::new(false))
            .is_empty());
        assert_eq!(h.take_spilled(), Some((1, 5)));
    }
}
