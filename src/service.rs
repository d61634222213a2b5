//! Wiring and lifecycle: open the store, pick the transport, start the consumer, the relays and
//! the scanner loop, and shut everything down in order (stop the scanner, drain the relays, stop
//! the consumer, release claims, join the writers).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use crate::config::Settings;
use crate::consumer::AwardConsumer;
use crate::counts::{CountCache, Counts};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::model::{AwardRecord, TaskState};
use crate::outbox::{Outbox, Saved};
use crate::publish::Publisher;
use crate::relay::RelayThreads;
use crate::scanner::{ScanReport, Scanner};
use crate::store::{ShardStatus, Store};
use crate::transport::{memory::InProcess, ConsumerHandle, Transport};
use crate::util::{now_ms, Rng};

/// Which background parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// Consume the topic and deliver awards.
    pub consumer: bool,
    /// Run the scanner every `scan_interval` on its own thread.
    pub scanner_loop: bool,
}

impl Parts {
    /// Consumer and scanner loop: what `serve` runs.
    pub const ALL: Parts = Parts {
        consumer: true,
        scanner_loop: true,
    };
}

/// The transport the settings ask for: RabbitMQ when an AMQP URL is set, else in-process.
pub fn transport_for(settings: &Settings) -> Result<Arc<dyn Transport>> {
    let transport = base_transport(settings)?;
    Ok(match &settings.faults {
        Some(plan) => {
            log::warn!("injecting transport faults {plan:?}");
            Arc::new(crate::transport::fault::Faulty::with_plan(
                transport,
                plan.clone(),
            ))
        }
        None => transport,
    })
}

fn base_transport(settings: &Settings) -> Result<Arc<dyn Transport>> {
    match &settings.amqp_url {
        Some(url) => Ok(Arc::new(crate::transport::amqp::Amqp::connect(
            url, settings,
        )?)),
        None => {
            log::info!("no AMQP URL given: using the embedded in-process transport (messages stay inside this process; pending tasks are resent by the scanner after a restart)");
            Ok(Arc::new(InProcess::new(settings.publish_timeout())))
        }
    }
}

/// A running instance.
pub struct Service {
    settings: Arc<Settings>,
    store: Arc<Store>,
    transport: Arc<dyn Transport>,
    outbox: Arc<Outbox>,
    scanner: Arc<Scanner>,
    publisher: Arc<Publisher>,
    metrics: Arc<Metrics>,
    counts: Arc<CountCache>,
    consumer: Option<Box<dyn ConsumerHandle>>,
    relays: Option<RelayThreads>,
    scan_loop: Option<(Sender<()>, JoinHandle<()>)>,
}

impl Service {
    /// Open the data directory (creating missing shards) and start the requested parts.
    pub fn start(
        settings: Settings,
        transport: Arc<dyn Transport>,
        parts: Parts,
    ) -> Result<Service> {
        let settings = Arc::new(settings.validate()?);
        // Only `init` creates or alters a MySQL database; SQLite files are made on first use.
        let store = Arc::new(Store::open_to_run(&settings)?);
        let metrics = Arc::new(Metrics::default());
        let owner: Arc<str> = format!(
            "{}-{:06x}",
            std::process::id(),
            Rng::new().next_u64() & 0xff_ffff
        )
        .into();
        let outbox = Arc::new(Outbox::new(
            store.clone(),
            settings.clone(),
            owner.clone(),
            metrics.clone(),
        ));
        let publisher = Arc::new(Publisher::new(
            store.clone(),
            transport.clone(),
            settings.clone(),
            metrics.clone(),
        ));
        let scanner = Arc::new(Scanner::new(
            store.clone(),
            publisher.clone(),
            owner.clone(),
            transport.clone(),
            settings.clone(),
            metrics.clone(),
        )?);
        let consumer = if parts.consumer {
            let handler = Arc::new(AwardConsumer::new(store.clone(), metrics.clone()));
            Some(transport.start_consumer(handler, settings.consumer_threads)?)
        } else {
            None
        };
        let relays = Some(RelayThreads::start(
            &store,
            &publisher,
            outbox.relay_owner(),
            &settings,
        )?);
        let mut service = Service {
            settings,
            counts: CountCache::new(store.clone()),
            store,
            transport,
            outbox,
            scanner,
            publisher,
            metrics,
            consumer,
            relays,
            scan_loop: None,
        };
        if parts.scanner_loop {
            service.scan_loop = Some(service.spawn_scan_loop()?);
        }
        log::info!(
            "started store={} layout={}x{} transport={} owner={owner}",
            match &service.settings.store {
                crate::config::StoreTarget::Sqlite =>
                    service.settings.data_dir.display().to_string(),
                crate::config::StoreTarget::Mysql(dbs) => dbs
                    .iter()
                    .map(|d| d.shown.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            },
            service.settings.layout.db_count(),
            service.settings.layout.tb_count(),
            service.transport.describe()
        );
        Ok(service)
    }

    fn spawn_scan_loop(&self) -> Result<(Sender<()>, JoinHandle<()>)> {
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let scanner = self.scanner.clone();
        let interval = self.settings.scan_interval;
        let handle = crate::util::spawn("scanner", move || {
            let mut was_disconnected = false;
            loop {
                let started = Instant::now();
                match scanner.scan_once() {
                    Ok(r) => {
                        if r.skipped_disconnected != was_disconnected {
                            if r.skipped_disconnected {
                                log::warn!("scanner paused: the transport is disconnected; tasks stay pending");
                            } else {
                                log::info!("scanner resumed: the transport is connected");
                            }
                            was_disconnected = r.skipped_disconnected;
                        }
                    }
                    Err(e) => log::warn!("scan failed, retrying next tick: {e}"),
                }
                let wait = interval.saturating_sub(started.elapsed());
                // The stop sender is dropped on shutdown: a disconnect ends the loop at once.
                match stop_rx.recv_timeout(wait) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                    _ => break,
                }
            }
            log::debug!("scanner stopped");
        })?;
        Ok((stop_tx, handle))
    }

    /// Save an award: returns once the award and its task are durably committed. The shard's
    /// relay publishes the message after that; [`Service::wait_confirmed`] waits for it.
    pub fn save_award(&self, record: AwardRecord) -> Result<Saved> {
        self.outbox.save_award(record)
    }

    /// [`Service::save_award`] for an async caller: awaits the commit without blocking the
    /// executor thread it runs on.
    pub async fn save_award_async(&self, record: AwardRecord) -> Result<Saved> {
        self.outbox.save_award_async(record).await
    }

    /// Wait at most `timeout` until a saved award's message is confirmed (task `completed`) or
    /// parked (`dead`); returns the task's state then.
    pub fn wait_confirmed(&self, saved: &Saved, timeout: Duration) -> Result<TaskState> {
        self.outbox.wait_confirmed(saved, timeout)
    }

    /// Wait at most `timeout` until the relays are idle and every write they queued has
    /// committed; returns whether that happened. Tests and the bench use it to observe a
    /// settled state.
    pub fn settle(&self, timeout: Duration) -> Result<bool> {
        if !crate::util::wait_until(timeout, || self.relays_idle()) {
            return Ok(false);
        }
        self.store.barrier()?;
        Ok(true)
    }

    /// Whether every shard's relay has nothing waiting and no batch in hand.
    pub fn relays_idle(&self) -> bool {
        self.relays.as_ref().is_none_or(RelayThreads::is_idle)
    }

    /// Save many awards at once: each shard's share goes into one group commit. One result per
    /// award, in order; a duplicate fails only itself.
    pub fn save_awards(&self, records: Vec<AwardRecord>) -> Vec<Result<Saved>> {
        self.outbox.save_awards(records)
    }

    /// One scanner pass (tests and commands drive this directly).
    pub fn scan_once(&self) -> Result<ScanReport> {
        self.scanner.scan_once()
    }

    /// Scanner passes until idle, at most `max_passes`.
    pub fn drain(&self, max_passes: usize) -> Result<ScanReport> {
        self.scanner.drain(max_passes)
    }

    /// Per-shard counts, counted now.
    pub fn status(&self) -> Result<Vec<ShardStatus>> {
        self.store.status()
    }

    /// Per-shard counts as `/metrics` serves them: kept, and counted again only as often as
    /// their own duration allows (see [`crate::counts`]).
    pub fn shard_counts(&self) -> Result<Counts> {
        self.counts.get()
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// This process's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Stop in order: the scanner, then the relays after sending what is already committed
    /// (for at most `drain_timeout`), then the consumer; release this process's claims, so
    /// another process can take them now (a store that does not answer leaves them to expire
    /// with their lease: stopping does not wait on it beyond its deadline).
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_background();
        let mut released = 0;
        for owner in [
            self.outbox.owner().clone(),
            self.outbox.relay_owner().clone(),
        ] {
            // Releasing only spares the tasks the wait for their lease: a store that does not
            // answer (within its deadline) leaves them to expire, and stopping goes on.
            match self.store.release(&owner, now_ms()) {
                Ok(n) => released += n,
                Err(e) => log::warn!(
                    "claims of owner={owner} not released, they expire after the lease ({:?}): {e}",
                    self.settings.stale_after
                ),
            }
        }
        if released > 0 {
            log::info!("released claims tasks={released}");
        }
        log::info!("stopped");
        Ok(())
    }
}

impl Service {
    /// Stop the scanner loop, drain the relays, then stop the consumer (in-process, the relays
    /// need it to confirm); each at most once.
    /// The stop is bounded by `drain_timeout` plus one publish deadline, whatever the broker
    /// does: publishes go on for `drain_timeout` (the scanner's pass, the relays' drain), and
    /// past it a publish the broker holds gives up at its next deadline.
    fn stop_background(&mut self) {
        let deadline = Instant::now() + self.settings.drain_timeout;
        if self.scan_loop.is_some() || self.relays.is_some() {
            self.publisher.stop_by(deadline);
        }
        if let Some((stop, handle)) = self.scan_loop.take() {
            drop(stop);
            let _ = handle.join();
        }
        if let Some(relays) = self.relays.take() {
            relays.stop_and_drain(deadline);
        }
        if let Some(c) = self.consumer.take() {
            c.stop();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_background();
    }
}
