//! Shared helpers: settings on a temporary directory, award builders, raw SQLite inspection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use big_market::config::Settings;
use big_market::model::{AwardRecord, NewAward};
use big_market::service::{Parts, Service};
use big_market::transport::fault::Faulty;
use big_market::transport::memory::InProcess;
use big_market::transport::Transport;
use rusqlite::Connection;

pub fn init_logs() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Settings for a test: a temporary data dir, short leases, a small relay pool.
pub fn settings(dir: &Path) -> Settings {
    init_logs();
    let mut s = Settings::new(dir.join("data"));
    s.stale_after = Duration::from_millis(500);
    s.scan_interval = Duration::from_secs(3600); // tests drive scan_once themselves
    s
}

pub fn award(user: &str, order: &str) -> AwardRecord {
    AwardRecord::new(NewAward {
        user_id: user,
        activity_id: 100301,
        strategy_id: 100006,
        order_id: order,
        award_id: 101,
        award_title: "OpenAI 增加使用次数",
        award_time_ms: 1_712_377_010_878,
    })
    .unwrap()
}

/// A service on the in-process transport behind a fault injector; consumer on, scanner loop off.
pub fn start(settings: Settings) -> (Service, Arc<Faulty>) {
    let faulty = Arc::new(Faulty::new(Arc::new(InProcess::new(Duration::from_secs(
        10,
    )))));
    let transport: Arc<dyn Transport> = faulty.clone();
    let service = Service::start(
        settings,
        transport,
        Parts {
            consumer: true,
            scanner_loop: false,
        },
    )
    .unwrap();
    (service, faulty)
}

/// Wait (bounded) until the relays have published what was committed and their writes landed.
pub fn settle(service: &Service) {
    assert!(
        service.settle(Duration::from_secs(20)).unwrap(),
        "the relays did not settle within 20 s"
    );
}

/// A raw connection to shard `db` for inspection.
pub fn raw(settings: &Settings, db: u32) -> Connection {
    Connection::open(settings.data_dir.join(format!("big_market_{db:02}.db"))).unwrap()
}

pub fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Award rows over every split table of a shard, optionally in one state.
pub fn awards(conn: &Connection, state: Option<&str>) -> i64 {
    (0..4)
        .map(|t| {
            let filter = state
                .map(|s| format!(" WHERE award_state = '{s}'"))
                .unwrap_or_default();
            count(
                conn,
                &format!("SELECT COUNT(*) FROM user_award_record_{t:03}{filter}"),
            )
        })
        .sum()
}

/// Totals over both shards: (awards, awards delivered, tasks, tasks completed).
pub fn totals(settings: &Settings) -> (i64, i64, i64, i64) {
    let mut t = (0, 0, 0, 0);
    for db in 1..=settings.layout.db_count() {
        let c = raw(settings, db);
        t.0 += awards(&c, None);
        t.1 += awards(&c, Some("completed"));
        t.2 += count(&c, "SELECT COUNT(*) FROM task");
        t.3 += count(&c, "SELECT COUNT(*) FROM task WHERE state = 'completed'");
    }
    t
}

/// A transport that records every publish per message id, and how many publishes of the same
/// message were in flight at once.
pub struct Recording {
    inner: Arc<dyn Transport>,
    state: std::sync::Mutex<std::collections::HashMap<String, (u32, u32)>>,
    overlaps: std::sync::atomic::AtomicU64,
}

impl Recording {
    /// Record around `inner`.
    pub fn new(inner: Arc<dyn Transport>) -> Self {
        Recording {
            inner,
            state: Default::default(),
            overlaps: Default::default(),
        }
    }
    /// Publishes of a message that started while another publish of it was in flight.
    pub fn overlaps(&self) -> u64 {
        self.overlaps.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Publishes per message id.
    pub fn publishes(&self) -> std::collections::HashMap<String, u32> {
        let state = self.state.lock().unwrap();
        state.iter().map(|(k, v)| (k.clone(), v.1)).collect()
    }
}

impl Transport for Recording {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn describe(&self) -> String {
        format!("recording({})", self.inner.describe())
    }
    fn publish_batch(
        &self,
        batch: &[big_market::transport::Outgoing],
        hold: &dyn Fn() -> bool,
    ) -> Vec<Result<(), big_market::transport::PublishFailure>> {
        {
            let mut state = self.state.lock().unwrap();
            for m in batch {
                let e = state.entry(m.message_id.clone()).or_default();
                if e.0 > 0 {
                    self.overlaps
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                e.0 += 1;
                e.1 += 1;
            }
        }
        let out = self.inner.publish_batch(batch, hold);
        let mut state = self.state.lock().unwrap();
        for m in batch {
            state.get_mut(&m.message_id).unwrap().0 -= 1;
        }
        out
    }
    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
    fn start_consumer(
        &self,
        handler: Arc<dyn big_market::transport::Handler>,
        threads: usize,
    ) -> big_market::Result<Box<dyn big_market::transport::ConsumerHandle>> {
        self.inner.start_consumer(handler, threads)
    }
}
