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

/// The MariaDB server of every development and CI machine (root, no password).
pub const MARIADB: &str = "mysql://root@127.0.0.1:3306";

/// Which backend a test's shards live in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// SQLite files in a temporary directory.
    Sqlite,
    /// Databases with a fresh name prefix on the local MariaDB, dropped when the test ends.
    Mariadb,
}

/// Run each named test, `fn(Kind)`, once per backend: `name::sqlite` and `name::mariadb`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    super::$name($crate::support::Kind::Sqlite)
                }
                #[test]
                fn mariadb() {
                    super::$name($crate::support::Kind::Mariadb)
                }
            }
        )*
    };
}

/// A test's shards: a temporary directory (the SQLite files, or the binary's working directory)
/// and, on MariaDB, databases `<prefix>_01` ... that are dropped on drop. Inspection goes through
/// plain SQL that both backends understand.
pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub settings: Settings,
    pub kind: Kind,
    prefix: String,
    pools: std::sync::Mutex<std::collections::HashMap<u32, mysql::Pool>>,
}

static NEXT_PREFIX: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl TestStore {
    pub fn new(kind: Kind) -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let prefix = format!(
            "bmt_{}_{}_{}",
            std::process::id(),
            NEXT_PREFIX.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            fastrand::u32(..)
        );
        let mut t = TestStore {
            dir,
            settings: s,
            kind,
            prefix,
            pools: Default::default(),
        };
        t.set_layout(t.settings.layout);
        t
    }

    /// Use another layout (and, on MariaDB, name its databases).
    pub fn set_layout(&mut self, layout: big_market::router::Layout) {
        self.settings.layout = layout;
        if self.kind == Kind::Mariadb {
            self.settings.store =
                big_market::config::StoreTarget::parse(&self.url(), layout.db_count()).unwrap();
        }
    }

    /// The database name prefix of these shards (MariaDB).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The `--store` URL (MariaDB only).
    pub fn url(&self) -> String {
        format!("{MARIADB}/{}", self.prefix)
    }

    /// The binary, pointed at these shards.
    pub fn bin(&self) -> std::process::Command {
        let mut c = crate::cli::bin(self.dir.path());
        if self.kind == Kind::Mariadb {
            c.env("BIG_MARKET_STORE", self.url());
        }
        c
    }

    /// A connection to database `db` on MariaDB.
    pub fn mysql(&self, db: u32) -> mysql::PooledConn {
        let mut pools = self.pools.lock().unwrap();
        let pool = pools.entry(db).or_insert_with(|| {
            let url = format!("{}_{db:02}", self.url());
            mysql::Pool::new(url.as_str()).expect("MariaDB on 127.0.0.1:3306 (root, no password)")
        });
        pool.get_conn()
            .expect("MariaDB on 127.0.0.1:3306 (root, no password)")
    }

    /// Run statements on shard `db`.
    pub fn exec(&self, db: u32, sql: &str) {
        use mysql::prelude::Queryable;
        match self.kind {
            Kind::Sqlite => raw(&self.settings, db).execute_batch(sql).unwrap(),
            Kind::Mariadb => self.mysql(db).query_drop(sql).unwrap(),
        }
    }

    /// The first column of the first row of a query on shard `db`, as a number.
    pub fn count(&self, db: u32, sql: &str) -> i64 {
        use mysql::prelude::Queryable;
        match self.kind {
            Kind::Sqlite => count(&raw(&self.settings, db), sql),
            Kind::Mariadb => {
                let v: Option<mysql::Value> = self.mysql(db).query_first(sql).unwrap();
                match v {
                    Some(mysql::Value::Int(i)) => i,
                    Some(mysql::Value::UInt(u)) => u as i64,
                    Some(mysql::Value::Bytes(b)) => String::from_utf8(b).unwrap().parse().unwrap(),
                    Some(mysql::Value::NULL) | None => 0,
                    Some(other) => panic!("{sql}: not a number: {other:?}"),
                }
            }
        }
    }

    /// The first column of the first row of a query on shard `db`, as text.
    pub fn text(&self, db: u32, sql: &str) -> String {
        use mysql::prelude::Queryable;
        match self.kind {
            Kind::Sqlite => raw(&self.settings, db)
                .query_row(sql, [], |r| r.get(0))
                .unwrap(),
            Kind::Mariadb => self.mysql(db).query_first(sql).unwrap().unwrap(),
        }
    }

    /// Award rows over every split table of a shard, optionally in one state.
    pub fn awards(&self, db: u32, state: Option<&str>) -> i64 {
        (0..self.settings.layout.tb_count())
            .map(|t| {
                let filter = state
                    .map(|s| format!(" WHERE award_state = '{s}'"))
                    .unwrap_or_default();
                self.count(
                    db,
                    &format!("SELECT COUNT(*) FROM user_award_record_{t:03}{filter}"),
                )
            })
            .sum()
    }

    /// Totals over every shard: (awards, awards delivered, tasks, tasks completed).
    pub fn totals(&self) -> (i64, i64, i64, i64) {
        let mut t = (0, 0, 0, 0);
        for db in 1..=self.settings.layout.db_count() {
            t.0 += self.awards(db, None);
            t.1 += self.awards(db, Some("completed"));
            t.2 += self.count(db, "SELECT COUNT(*) FROM task");
            t.3 += self.count(db, "SELECT COUNT(*) FROM task WHERE state = 'completed'");
        }
        t
    }

    /// Whether the shards exist yet (the binary may still be creating them).
    pub fn ready(&self) -> bool {
        let last = self.settings.layout.db_count();
        match self.kind {
            Kind::Sqlite => self
                .settings
                .data_dir
                .join(format!("big_market_{last:02}.db"))
                .exists(),
            Kind::Mariadb => {
                use mysql::prelude::Queryable;
                let n: Option<i64> = mysql::Conn::new(MARIADB)
                    .unwrap()
                    .exec_first(
                        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = 'shard_meta'",
                        (format!("{}_{last:02}", self.prefix),),
                    )
                    .unwrap();
                n == Some(1)
            }
        }
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        use mysql::prelude::Queryable;
        if self.kind != Kind::Mariadb {
            return;
        }
        self.pools.lock().unwrap().clear();
        let Ok(server) = mysql::Pool::new(MARIADB) else {
            return;
        };
        let Ok(mut conn) = server.get_conn() else {
            return;
        };
        let like = format!("{}\\_%", self.prefix);
        let names: Vec<String> = conn
            .exec(
                "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name LIKE ?",
                (like,),
            )
            .unwrap_or_default();
        for name in names {
            let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"));
        }
    }
}
