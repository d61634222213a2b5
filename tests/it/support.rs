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
