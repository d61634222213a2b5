//! Shared helpers: the servers the server suites run against, a test's shards (`TestStore`), a
//! service running on them (`TestApp`), named totals, award builders, raw SQLite inspection.
//!
//! The MySQL suites run when `BIG_MARKET_TEST_MYSQL` names a MariaDB/MySQL server, the RabbitMQ
//! suites when `BIG_MARKET_TEST_AMQP` names a broker; when a variable is set and its server is
//! unreachable they fail. Unset, each of their tests prints one line naming the variable and
//! returns.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use big_market::config::Settings;
use big_market::model::AwardRecord;
use big_market::outbox::Saved;
use big_market::service::{Parts, Service};
use big_market::transport::amqp::Amqp;
use big_market::transport::fault::Faulty;
use big_market::transport::memory::InProcess;
use big_market::transport::Transport;
use big_market::util::{wait_until, Rng};
use rusqlite::Connection;

/// Names the MariaDB/MySQL server the MySQL suites run against, e.g.
/// `mysql://root@127.0.0.1:3306/big_market_ci`.
pub const MYSQL_VAR: &str = "BIG_MARKET_TEST_MYSQL";
/// Names the RabbitMQ broker the broker suites run against, e.g.
/// `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub const AMQP_VAR: &str = "BIG_MARKET_TEST_AMQP";

pub fn init_logs() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// The value of `var` when it names a server; otherwise one line saying what would run the test.
fn named(var: &str, example: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
        _ => {
            eprintln!("not run: set {var} (e.g. {var}={example}) to run this test");
            None
        }
    }
}

/// The MariaDB/MySQL server named by `BIG_MARKET_TEST_MYSQL`, checked once.
pub struct MysqlServer {
    /// The server without a database, credentials included: `mysql://root@127.0.0.1:3306`.
    pub url: String,
    /// The same without the password, as big-market shows it.
    pub shown: String,
    /// `host:port`.
    pub addr: String,
    /// What the test databases' names start with: the URL's database, else `bmt`.
    pub base: String,
}

impl MysqlServer {
    fn parse(given: &str) -> Result<MysqlServer, String> {
        let mut url = url::Url::parse(given).map_err(|e| {
            format!("{MYSQL_VAR} is not a URL ({e}): use mysql://root@127.0.0.1:3306/big_market_ci")
        })?;
        if url.scheme() != "mysql" || url.host_str().is_none() {
            return Err(format!(
                "{MYSQL_VAR} is not a mysql:// URL: use mysql://root@127.0.0.1:3306/big_market_ci"
            ));
        }
        let base = match url.path().trim_matches('/') {
            "" => "bmt".to_string(),
            name => name.to_string(),
        };
        url.set_path("");
        url.set_query(None);
        let addr = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port().unwrap_or(3306)
        );
        let full = url.as_str().trim_end_matches('/').to_string();
        let _ = url.set_password(None);
        let shown = url.as_str().trim_end_matches('/').to_string();
        Ok(MysqlServer {
            url: full,
            shown,
            addr,
            base,
        })
    }

    /// Connection options for database `db` (none: the server), with a bounded connect.
    pub fn opts(&self, db: Option<&str>) -> mysql::Opts {
        let url = match db {
            Some(db) => format!("{}/{db}", self.url),
            None => self.url.clone(),
        };
        mysql::OptsBuilder::from_opts(mysql::Opts::from_url(&url).expect("a checked URL"))
            .tcp_connect_timeout(Some(Duration::from_secs(5)))
            .into()
    }

    /// A connection to the server, as the URL's user (root on development and CI machines).
    pub fn conn(&self) -> mysql::Conn {
        mysql::Conn::new(self.opts(None)).unwrap_or_else(|e| {
            panic!(
                "{MYSQL_VAR} names {} and it does not answer: {e}",
                self.shown
            )
        })
    }
}

/// Parse and reach the server `given` names: the server, or why it cannot be used and what to do.
fn check_mysql(given: &str) -> Result<MysqlServer, String> {
    use mysql::prelude::Queryable;
    let server = MysqlServer::parse(given)?;
    mysql::Conn::new(server.opts(None))
        .and_then(|mut c| c.query_drop("SELECT 1"))
        .map_err(|e| {
            format!(
                "{MYSQL_VAR} names {}, which does not answer: {e}. Start it (`service mariadb start`), or unset {MYSQL_VAR} to leave the MySQL suites out",
                server.shown
            )
        })?;
    Ok(server)
}

/// Reach the broker `given` names: its URL, or why it cannot be used and what to do.
fn check_amqp(given: &str) -> Result<String, String> {
    let mut s = Settings::new(std::path::PathBuf::from("unused"));
    s.amqp_url = Some(big_market::config::AmqpUrl::parse(given).map_err(|e| e.to_string())?);
    Amqp::connect_once(&s).map_err(|e| {
        format!(
            "{AMQP_VAR} names a broker that does not answer: {e}. Start it (`rabbitmq-server -detached`), or unset {AMQP_VAR} to leave the RabbitMQ suites out"
        )
    })?;
    Ok(given.to_string())
}

/// The server of the MySQL suites, or `None` (after one line saying so) when
/// `BIG_MARKET_TEST_MYSQL` is unset. Panics when it is set and the server does not answer.
pub fn mysql_server() -> Option<&'static MysqlServer> {
    static SERVER: OnceLock<Option<Result<MysqlServer, String>>> = OnceLock::new();
    let checked = SERVER.get_or_init(|| {
        let given = std::env::var(MYSQL_VAR)
            .ok()
            .filter(|v| !v.trim().is_empty())?;
        Some(check_mysql(given.trim()))
    });
    match checked {
        None => {
            named(MYSQL_VAR, "mysql://root@127.0.0.1:3306/big_market_ci");
            None
        }
        Some(Ok(server)) => Some(server),
        Some(Err(why)) => panic!("{why}"),
    }
}

/// The broker of the RabbitMQ suites, or `None` (after one line saying so) when
/// `BIG_MARKET_TEST_AMQP` is unset. Panics when it is set and the broker does not answer.
pub fn amqp_url() -> Option<&'static str> {
    static BROKER: OnceLock<Option<Result<String, String>>> = OnceLock::new();
    let checked = BROKER.get_or_init(|| {
        let given = std::env::var(AMQP_VAR)
            .ok()
            .filter(|v| !v.trim().is_empty())?;
        Some(check_amqp(given.trim()))
    });
    match checked {
        None => {
            named(AMQP_VAR, "amqp://guest:guest@127.0.0.1:5672/%2f");
            None
        }
        Some(Ok(url)) => Some(url.as_str()),
        Some(Err(why)) => panic!("{why}"),
    }
}

#[test]
fn a_named_server_that_does_not_answer_fails_the_suite_with_what_to_do() {
    // Nothing listens on port 9 of the loopback.
    let why = check_mysql("mysql://root:hunter2@127.0.0.1:9/big_market_ci")
        .err()
        .expect("an unreachable MySQL server is an error");
    assert!(
        why.contains("BIG_MARKET_TEST_MYSQL names mysql://root@127.0.0.1:9, which does not answer")
            && why.contains("unset BIG_MARKET_TEST_MYSQL"),
        "{why}"
    );
    assert!(!why.contains("hunter2"), "{why}");
    let why = check_mysql("postgres://127.0.0.1/x").err().unwrap();
    assert!(why.contains("not a mysql:// URL"), "{why}");
    let why = check_amqp("amqp://guest:guest@127.0.0.1:9/%2f")
        .expect_err("an unreachable broker is an error");
    assert!(
        why.contains("BIG_MARKET_TEST_AMQP names a broker that does not answer")
            && why.contains("unset BIG_MARKET_TEST_AMQP"),
        "{why}"
    );
}

/// Settings for a test: a temporary data dir, short leases, a small relay pool.
pub fn settings(dir: &Path) -> Settings {
    init_logs();
    let mut s = Settings::new(dir.join("data"));
    s.stale_after = Duration::from_millis(500);
    s.scan_interval = Duration::from_secs(3600); // tests drive scan_once themselves
    s
}

/// The seed's award for `user` with `order`, at a fixed time.
pub fn award(user: &str, order: &str) -> AwardRecord {
    AwardRecord::sample(user, order, 1_712_377_010_878).unwrap()
}

/// Consumer on, scanner loop off: tests drive `scan_once` themselves.
pub const CONSUMER: Parts = Parts {
    consumer: true,
    scanner_loop: false,
};
/// Neither consumer nor scanner loop: published messages stay in the queue.
pub const PUBLISH_ONLY: Parts = Parts {
    consumer: false,
    scanner_loop: false,
};

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
    (0..4).map(|t| count(conn, &award_count(t, state))).sum()
}

fn award_count(table: u32, state: Option<&str>) -> String {
    let filter = state
        .map(|s| format!(" WHERE award_state = '{s}'"))
        .unwrap_or_default();
    format!("SELECT COUNT(*) FROM user_award_record_{table:03}{filter}")
}

/// What the shards hold, summed over every shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Award records.
    pub awards: i64,
    /// Award records delivered (`award_state = 'completed'`).
    pub delivered: i64,
    /// Outbox tasks.
    pub tasks: i64,
    /// Tasks the transport confirmed (`state = 'completed'`).
    pub completed: i64,
    /// Rows of the delivery log: messages delivered, each counted once however often it came.
    pub deliveries: i64,
}

impl Totals {
    /// `n` awards committed with their tasks; nothing confirmed or delivered yet.
    pub fn saved(n: i64) -> Totals {
        Totals {
            awards: n,
            tasks: n,
            ..Totals::default()
        }
    }

    /// `n` awards committed, their tasks confirmed, each delivered once.
    pub fn done(n: i64) -> Totals {
        Totals {
            awards: n,
            delivered: n,
            tasks: n,
            completed: n,
            deliveries: n,
        }
    }

    /// Everything committed is confirmed and delivered once, however much that is.
    pub fn all_done(&self) -> bool {
        *self == Totals::done(self.awards)
    }

    fn over(db_count: u32, count: impl Fn(u32, &str) -> i64, tb_count: u32) -> Totals {
        let mut t = Totals::default();
        for db in 1..=db_count {
            for tb in 0..tb_count {
                t.awards += count(db, &award_count(tb, None));
                t.delivered += count(db, &award_count(tb, Some("completed")));
            }
            t.tasks += count(db, "SELECT COUNT(*) FROM task");
            t.completed += count(db, "SELECT COUNT(*) FROM task WHERE state = 'completed'");
            t.deliveries += count(db, "SELECT COUNT(*) FROM delivery");
        }
        t
    }
}

/// Totals over the SQLite shards of a data directory.
pub fn totals(settings: &Settings) -> Totals {
    Totals::over(
        settings.layout.db_count(),
        |db, sql| count(&raw(settings, db), sql),
        settings.layout.tb_count(),
    )
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

/// Which backend a test's shards live in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// SQLite files in a temporary directory.
    Sqlite,
    /// Databases with a fresh name prefix on the server of `BIG_MARKET_TEST_MYSQL`, dropped when
    /// the test ends.
    Mariadb,
}

/// Run each named test, `fn(Kind)`, once per backend: `name::sqlite` always, `name::mariadb`
/// when `BIG_MARKET_TEST_MYSQL` names a server.
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
                    if $crate::support::mysql_server().is_some() {
                        super::$name($crate::support::Kind::Mariadb)
                    }
                }
            }
        )*
    };
}

/// A backlog of `n` tasks on `t` that failed to publish (the transport was down), committed and
/// due again soon: work for the scanner.
pub fn backlog(t: TestStore, n: usize) -> TestStore {
    let app = t.start();
    app.faulty().set_down(true);
    for i in 0..n {
        app.save(&format!("b{}", i % 50), &format!("7{i:011}"));
    }
    app.settle();
    app.shutdown()
}

/// A test's shards: a temporary directory (the SQLite files, or the binary's working directory)
/// and, on MariaDB, databases `<prefix>_01` ... that are dropped on drop; with a broker, a queue
/// of its own, deleted on drop. Inspection goes through plain SQL that both backends understand.
pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub settings: Settings,
    pub kind: Kind,
    prefix: String,
    server: Option<&'static MysqlServer>,
    pools: Mutex<HashMap<u32, mysql::Pool>>,
}

static NEXT_PREFIX: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl TestStore {
    /// Fresh shards of `kind`. MariaDB needs `BIG_MARKET_TEST_MYSQL`: gate such a test with
    /// [`TestStore::mariadb`] or `on_both_backends!`.
    pub fn new(kind: Kind) -> TestStore {
        let server = match kind {
            Kind::Sqlite => None,
            Kind::Mariadb => Some(mysql_server().unwrap_or_else(|| {
                panic!("this test needs {MYSQL_VAR}: gate it with TestStore::mariadb() or on_both_backends!")
            })),
        };
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let prefix = format!(
            "{}_{}_{}_{}",
            server.map_or("bmt", |m| m.base.as_str()),
            std::process::id(),
            NEXT_PREFIX.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            fastrand::u32(..)
        );
        let mut t = TestStore {
            dir,
            settings: s,
            kind,
            prefix,
            server,
            pools: Default::default(),
        };
        t.set_layout(t.settings.layout);
        t
    }

    /// Fresh MariaDB shards, or `None` when `BIG_MARKET_TEST_MYSQL` is unset (the test returns).
    pub fn mariadb() -> Option<TestStore> {
        mysql_server().map(|_| TestStore::new(Kind::Mariadb))
    }

    /// Fresh SQLite shards and a topic of their own on the broker of `BIG_MARKET_TEST_AMQP`, or
    /// `None` when it is unset (the test returns).
    pub fn amqp() -> Option<TestStore> {
        let url = amqp_url()?;
        let mut t = TestStore::new(Kind::Sqlite);
        t.settings.amqp_url = Some(big_market::config::AmqpUrl::parse(url).unwrap());
        t.settings.topic = format!("send_award_test_{}", Rng::new().digits(10));
        Some(t)
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

    /// The MariaDB server of these shards.
    pub fn server(&self) -> &'static MysqlServer {
        self.server.expect("a MariaDB test store")
    }

    /// The `--store` URL (MariaDB only).
    pub fn url(&self) -> String {
        format!("{}/{}", self.server().url, self.prefix)
    }

    /// The AMQP URL of the broker, password included (broker tests only).
    pub fn amqp_url(&self) -> &str {
        self.settings
            .amqp_url
            .as_ref()
            .expect("a broker test store")
            .secret_url()
    }

    /// The binary, pointed at these shards.
    pub fn bin(&self) -> std::process::Command {
        let mut c = crate::cli::bin(self.dir.path());
        if self.kind == Kind::Mariadb {
            c.env("BIG_MARKET_STORE", self.url());
        }
        c
    }

    /// Runs the binary's `init` on these shards and asserts it succeeded, showing its stderr if not.
    pub fn init(&self) {
        let init = self.bin().arg("init").output().unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
    }

    /// A connection to database `db` on MariaDB.
    pub fn mysql(&self, db: u32) -> mysql::PooledConn {
        let server = self.server();
        let mut pools = self.pools.lock().unwrap();
        let pool = pools.entry(db).or_insert_with(|| {
            let name = format!("{}_{db:02}", self.prefix);
            mysql::Pool::new(server.opts(Some(&name)))
                .unwrap_or_else(|e| panic!("database {name} on {}: {e}", server.shown))
        });
        pool.get_conn()
            .unwrap_or_else(|e| panic!("a connection to {}: {e}", server.shown))
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

    /// The first column of every row of a query on shard `db`, as text.
    pub fn texts(&self, db: u32, sql: &str) -> Vec<String> {
        use mysql::prelude::Queryable;
        match self.kind {
            Kind::Sqlite => raw(&self.settings, db)
                .prepare(sql)
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(|r| r.unwrap())
                .collect(),
            Kind::Mariadb => self.mysql(db).query(sql).unwrap(),
        }
    }

    /// Award rows over every split table of a shard, optionally in one state.
    pub fn awards(&self, db: u32, state: Option<&str>) -> i64 {
        (0..self.settings.layout.tb_count())
            .map(|t| self.count(db, &award_count(t, state)))
            .sum()
    }

    /// What every shard holds.
    pub fn totals(&self) -> Totals {
        Totals::over(
            self.settings.layout.db_count(),
            |db, sql| self.count(db, sql),
            self.settings.layout.tb_count(),
        )
    }

    /// Wait (bounded) until `n` awards are committed, confirmed and delivered once each.
    pub fn wait_done(&self, n: i64, timeout: Duration) {
        assert!(
            wait_until(timeout, || self.totals() == Totals::done(n)),
            "not all {n} awards delivered within {timeout:?}: {:?}",
            self.totals()
        );
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
                let n: Option<i64> = self.server()
                    .conn()
                    .exec_first(
                        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = 'shard_meta'",
                        (format!("{}_{last:02}", self.prefix),),
                    )
                    .unwrap();
                n == Some(1)
            }
        }
    }

    /// A service on these shards, on the in-process transport behind a fault injector;
    /// consumer on, scanner loop off.
    pub fn start(self) -> TestApp {
        let faulty = Arc::new(Faulty::new(Arc::new(InProcess::new(Duration::from_secs(
            10,
        )))));
        self.start_with(faulty.clone(), CONSUMER)
            .with_faulty(faulty)
    }

    /// A service on these shards, on the broker of [`TestStore::amqp`], connected.
    pub fn start_amqp(self, parts: Parts) -> TestApp {
        let url = self
            .settings
            .amqp_url
            .as_ref()
            .expect("a broker test store");
        let amqp = Arc::new(Amqp::connect(url, &self.settings).unwrap());
        assert!(
            wait_until(Duration::from_secs(10), || amqp.is_connected()),
            "not connected to the broker within 10 s"
        );
        let mut app = self.start_with(amqp.clone(), parts);
        app.amqp = Some(amqp);
        app
    }

    /// A service on these shards and the given transport.
    pub fn start_with(self, transport: Arc<dyn Transport>, parts: Parts) -> TestApp {
        if self.kind == Kind::Mariadb {
            // As `big-market init` does: only it creates MySQL databases.
            drop(big_market::store::Store::open(&self.settings, true).unwrap());
        }
        let service = Service::start(self.settings.clone(), transport, parts).unwrap();
        TestApp {
            service: Some(service),
            faulty: None,
            amqp: None,
            store: Some(self),
        }
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(url) = self.settings.amqp_url.clone() {
            // The test's queue and its dead-letter queue; a broker that is down keeps them.
            if let Ok(amqp) = Amqp::connect(&url, &self.settings) {
                if wait_until(Duration::from_secs(10), || amqp.is_connected()) {
                    let _ = amqp.delete_queue();
                }
            }
        }
        let Some(server) = self.server else {
            return;
        };
        use mysql::prelude::Queryable;
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let Ok(mut conn) = mysql::Conn::new(server.opts(None)) else {
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

/// A service under test, in the manner of zero2prod's `TestApp`: it owns its shards
/// ([`TestStore`], which it derefs to for inspection), the service and its transport, and shuts
/// the service down on drop. [`TestApp::shutdown`] stops it and hands the shards back.
pub struct TestApp {
    service: Option<Service>,
    faulty: Option<Arc<Faulty>>,
    amqp: Option<Arc<Amqp>>,
    store: Option<TestStore>,
}

impl TestApp {
    /// Fresh shards of `kind` and a service on them, in-process behind a fault injector.
    pub fn spawn(kind: Kind) -> TestApp {
        TestStore::new(kind).start()
    }

    fn with_faulty(mut self, faulty: Arc<Faulty>) -> TestApp {
        self.faulty = Some(faulty);
        self
    }

    pub fn service(&self) -> &Service {
        self.service.as_ref().expect("running until shutdown")
    }

    /// The fault injector in front of the in-process transport.
    pub fn faulty(&self) -> &Faulty {
        self.faulty
            .as_deref()
            .expect("a service started with TestStore::start")
    }

    /// The RabbitMQ transport.
    pub fn amqp(&self) -> &Amqp {
        self.amqp
            .as_deref()
            .expect("a service started with TestStore::start_amqp")
    }

    /// Save an award for `user` with `order`; panics if the save fails.
    pub fn save(&self, user: &str, order: &str) -> Saved {
        self.service()
            .save_award(award(user, order))
            .unwrap_or_else(|e| panic!("saving {user}/{order}: {e}"))
    }

    /// Wait (bounded) until the relays have published what was committed and their writes landed.
    pub fn settle(&self) {
        settle(self.service());
    }

    /// Stop the service (it must stop cleanly) and hand the shards back.
    pub fn shutdown(mut self) -> TestStore {
        self.service.take().unwrap().shutdown().unwrap();
        self.store.take().unwrap()
    }
}

impl Deref for TestApp {
    type Target = TestStore;
    fn deref(&self) -> &TestStore {
        self.store.as_ref().expect("shards until shutdown")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(service) = self.service.take() {
            let _ = service.shutdown();
        }
    }
}

/// The ids of the live processes whose parent is `parent` (from `/proc/<pid>/stat`).
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces, so read after its last ')'.
        let after = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        if after.split_whitespace().nth(1) == Some(&parent.to_string()) {
            out.push(pid);
        }
    }
    out
}

/// A process's command line, its arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// A process's thread count (`Threads:` of `/proc/<pid>/status`) and open file descriptors.
pub fn threads_and_fds(pid: u32) -> (usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (threads, fds)
}

/// The names of a process's threads (`/proc/<pid>/task/*/comm`).
pub fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A loopback TCP proxy in front of MariaDB, for tests of a network that misbehaves. It
/// forwards both ways until told otherwise:
/// - [`Proxy::pause`] stops forwarding without closing anything (a half-open peer: a paused
///   server, a NAT that lost its state); what arrives meanwhile is held and forwarded on
///   [`Proxy::resume`];
/// - [`Proxy::cut_after`] arms a cut: the next chunk a client sends that contains the word
///   (`COMMIT`, not `COMMITTED`) is forwarded, the server's answer to it is swallowed, and both
///   sides of that connection are closed, so the server has run the statement and the client
///   never hears of it.
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ProxyState {
    paused: std::sync::Mutex<bool>,
    resumed: std::sync::Condvar,
    stop: std::sync::atomic::AtomicBool,
    cut_word: std::sync::Mutex<Option<Vec<u8>>>,
    cuts: std::sync::atomic::AtomicUsize,
    sockets: std::sync::Mutex<Vec<std::net::TcpStream>>,
    pumps: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl ProxyState {
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Block while paused (bounded slices, so that a stopping proxy is noticed).
    fn wait_forwarding(&self) {
        let mut paused = self.paused.lock().unwrap();
        while *paused && !self.stopped() {
            paused = self
                .resumed
                .wait_timeout(paused, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    /// Whether `chunk` holds the armed word as a whole word; disarms it if so.
    fn take_cut(&self, chunk: &[u8]) -> bool {
        let mut word = self.cut_word.lock().unwrap();
        let hit = word.as_deref().is_some_and(|w| {
            chunk.windows(w.len()).enumerate().any(|(i, win)| {
                win == w
                    && chunk
                        .get(i + w.len())
                        .is_none_or(|b| !b.is_ascii_alphanumeric())
            })
        });
        if hit {
            *word = None;
        }
        hit
    }
}

impl Proxy {
    /// A proxy on a free loopback port in front of `target` (a loopback address).
    pub fn to(target: &str) -> Proxy {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let target = target.to_string();
        let st = state.clone();
        let accept = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if st.stopped() {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(&target) else {
                        continue;
                    };
                    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    {
                        let mut sockets = st.sockets.lock().unwrap();
                        sockets.push(client.try_clone().unwrap());
                        sockets.push(server.try_clone().unwrap());
                    }
                    let up = Proxy::pump(&st, &client, &server, &cut, true);
                    let down = Proxy::pump(&st, &server, &client, &cut, false);
                    st.pumps.lock().unwrap().extend([up, down]);
                }
            })
            .unwrap();
        Proxy {
            port,
            state,
            accept: Some(accept),
        }
    }

    /// Copy `from` to `to` on a thread; `upstream`: from the client to the server.
    fn pump(
        st: &Arc<ProxyState>,
        from: &std::net::TcpStream,
        to: &std::net::TcpStream,
        cut: &Arc<std::sync::atomic::AtomicBool>,
        upstream: bool,
    ) -> std::thread::JoinHandle<()> {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering::SeqCst;
        let (st, cut) = (st.clone(), cut.clone());
        let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
        from.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        std::thread::Builder::new()
            .name(if upstream { "proxy-up" } else { "proxy-down" }.into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let close = |a: &std::net::TcpStream, b: &std::net::TcpStream| {
                    let _ = a.shutdown(std::net::Shutdown::Both);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                };
                while !st.stopped() {
                    let n = match from.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue
                        }
                        Err(_) => break,
                    };
                    st.wait_forwarding();
                    if !upstream && cut.load(SeqCst) {
                        // The server's answer to the cut statement: the client never sees it.
                        close(&from, &to);
                        break;
                    }
                    let chunk = &buf[..n];
                    if upstream && st.take_cut(chunk) {
                        st.cuts.fetch_add(1, SeqCst);
                        cut.store(true, SeqCst);
                    }
                    if to.write_all(chunk).is_err() {
                        break;
                    }
                }
                close(&from, &to);
            })
            .unwrap()
    }

    /// A `--store` URL for databases `prefix_NN` of `server` through this proxy (TCP only: the
    /// driver would otherwise move to the server's Unix socket, around the proxy).
    pub fn url(&self, server: &MysqlServer, prefix: &str) -> String {
        let mut url = url::Url::parse(&server.url).expect("a checked URL");
        url.set_host(Some("127.0.0.1")).expect("a host");
        url.set_port(Some(self.port)).expect("a port");
        url.set_path(prefix);
        url.set_query(Some("prefer_socket=false"));
        url.to_string()
    }

    /// Stop forwarding, keeping every connection open.
    pub fn pause(&self) {
        *self.state.paused.lock().unwrap() = true;
    }

    /// Forward again, what was held first.
    pub fn resume(&self) {
        *self.state.paused.lock().unwrap() = false;
        self.state.resumed.notify_all();
    }

    /// Cut the connection whose client next sends `word`, once the server has it.
    pub fn cut_after(&self, word: &str) {
        *self.state.cut_word.lock().unwrap() = Some(word.as_bytes().to_vec());
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.state.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.resume();
        for s in self.state.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept loop, which then sees the stop.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let pumps: Vec<_> = self.state.pumps.lock().unwrap().drain(..).collect();
        for h in pumps {
            let _ = h.join();
        }
    }
}

/// A child process killed when the test ends, whatever happened.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Send `child` SIGTERM (asserting that `kill` succeeded) and wait at most 60 s for it to exit;
/// `None` if it is still running then (a `KillOnDrop` around it, or the caller, ends it).
pub fn sigterm(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {} failed", child.id());
    let mut exit = None;
    wait_until(Duration::from_secs(60), || {
        exit = child.try_wait().unwrap();
        exit.is_some()
    });
    exit
}
