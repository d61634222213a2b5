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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::publish::{Pending, Publisher, Relayed, Settle};
use crate::store::{Handoff, Store};

/// One shard's relay.
pub struct Relay {
    db: u32,
    store: Arc<Store>,
    publisher: Arc<Publisher>,
    /// The claim owner new tasks are inserted with (`<process>/relay`).
    owner: Arc<str>,
    settings: Arc<Settings>,
    /// The part of a spilled range not read back yet.
    cursor: Mutex<Option<(u64, u64)>>,
    /// Set while the relay is between taking a batch and settling it.
    busy: AtomicBool,
}

impl Relay {
    /// The relay of shard `db`, publishing the tasks that `owner` holds.
    pub fn new(
        db: u32,
        store: Arc<Store>,
        publisher: Arc<Publisher>,
        owner: Arc<str>,
        settings: Arc<Settings>,
    ) -> Self {
        Relay {
            db,
            store,
            publisher,
            owner,
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
        let spilled_waiting =
            self.cursor.lock().expect("cursor lock").is_some() || self.handoff().has_spilled();
        let wait = if spilled_waiting {
            Duration::ZERO
        } else {
            wait
        };
        // Busy from the moment a batch is in hand (the hand-off sets it as it hands one over).
        let mut batch: Vec<Pending> = self
            .handoff()
            .take(wait, max, &self.busy)
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
            log::debug!("relay shard={:02} tasks={}", self.db, batch.len());
            self.publisher
                .publish(self.db, &batch, &self.owner, Settle::Detached)
        })();
        self.busy.store(false, Ordering::SeqCst);
        result
    }

    /// Whether nothing is waiting for this relay and it has no batch in hand.
    pub fn is_idle(&self) -> bool {
        let h = self.handoff();
        !self.busy.load(Ordering::SeqCst)
            && h.held() == 0
            && !h.has_spilled()
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
            let rows = self
                .store
                .shard(self.db)
                .leased_tasks(&self.owner, from, to, max)?;
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
        publisher: &Arc<Publisher>,
        owner: &Arc<str>,
        settings: &Arc<Settings>,
    ) -> Result<RelayThreads> {
        let (stop, stop_rx) = bounded::<()>(0);
        let mut relays = Vec::new();
        let mut handles = Vec::new();
        for shard in store.shards() {
            let relay = Arc::new(Relay::new(
                shard.db(),
                store.clone(),
                publisher.clone(),
                owner.clone(),
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

    /// Stop the threads, then relay what is already committed on this thread until
    /// `deadline`. Whatever is left stays committed; the stop releases its claims and the
    /// scanner sends it.
    pub fn stop_and_drain(mut self, deadline: Instant) {
        self.stop_threads();
        let limit = deadline.saturating_duration_since(Instant::now());
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
