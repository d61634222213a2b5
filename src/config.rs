//! Settings: plain values with documented defaults, validated once, then passed explicitly.
//! Nothing else in the crate reads flags or the environment.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::router::Layout;

/// Everything a running instance needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory holding `big_market_NN.db` (the SQLite store).
    pub data_dir: PathBuf,
    /// Where the shards live: SQLite files under `data_dir` (the default), or MySQL databases.
    pub store: StoreTarget,
    /// Databases x tables.
    pub layout: Layout,
    /// Topic (and queue) of award messages. Default `send_award`.
    pub topic: String,
    /// The broker's AMQP URL (never shown with its password); `None` runs on the in-process
    /// transport.
    pub amqp_url: Option<AmqpUrl>,
    /// How the queues are declared on RabbitMQ. Default classic.
    pub queue_type: QueueType,
    /// On a quorum queue, deliveries of one message after which the broker dead-letters it to
    /// `<topic>.dlq`. Default 20 (RabbitMQ 4's).
    pub delivery_limit: u32,
    /// A task not completed this long after its last claim is due again (the lease). Default 60 s.
    pub stale_after: Duration,
    /// Time between scanner ticks. Default 5 s.
    pub scan_interval: Duration,
    /// Tasks claimed per query by the scanner. Default 500.
    pub scan_batch: usize,
    /// Tasks published together by one pool job. Default 50.
    pub publish_chunk: usize,
    /// Relay pool threads. Default 4.
    pub pool_threads: usize,
    /// Relay pool queue capacity; overflow runs on the caller. Default 64.
    pub pool_queue: usize,
    /// Consumer threads. Default 2.
    pub consumer_threads: usize,
    /// Messages the broker hands the consumer before acks (AMQP prefetch). Default 512.
    pub prefetch: u16,
    /// Retry policy for refused publishes.
    pub retry: RetryPolicy,
    /// How long a writer waits on another process's write lock. Default 5 s.
    pub busy_timeout: Duration,
    /// MySQL store: the deadline of every round trip to the server (read and write timeouts
    /// of each connection) and of every call into a shard's write lane. Default 30 s, at least
    /// 2 s.
    pub mysql_timeout: Duration,
    /// Completed tasks older than this are deleted by the scanner; `None` keeps them.
    pub retention: Option<Duration>,
    /// Committed tasks a shard's relay holds in memory; past it they wait in SQLite and the
    /// relay reads them from there. Default 8192.
    pub handoff_capacity: usize,
    /// Most tasks the relay publishes as one pipelined batch. Default 1000.
    pub relay_batch: usize,
    /// How long a stopping process keeps relaying what is already committed. Default 10 s.
    pub drain_timeout: Duration,
    /// The deadline of one publish batch; `None` derives it from the lease (see
    /// [`Settings::publish_timeout`]).
    pub publish_deadline: Option<Duration>,
    /// Testing: cap each shard file at this many pages (SQLite's `max_page_count` on the
    /// writer's connection), to make a full disk happen on demand. `None`: no cap.
    pub max_shard_pages: Option<u64>,
    /// Random transport faults to inject (testing and `verify`); `None` injects nothing.
    pub faults: Option<FaultPlan>,
}

/// The width of the MySQL store's `task.topic` column (the original's `varchar(32)`): a longer
/// topic is refused at start.
pub const MYSQL_TOPIC_MAX: usize = 32;

impl Settings {
    /// MySQL store: how long a statement waits for a row lock another process holds: the busy
    /// timeout, at most half of `mysql_timeout` (so a lock wait is never taken for a server
    /// that does not answer), whole seconds, at least one.
    pub fn mysql_lock_wait(&self) -> Duration {
        let secs = self
            .busy_timeout
            .min(self.mysql_timeout / 2)
            .as_secs()
            .clamp(1, 3600);
        Duration::from_secs(secs)
    }

    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Settings {
            data_dir: data_dir.into(),
            store: StoreTarget::Sqlite,
            layout: Layout::default(),
            topic: "send_award".into(),
            amqp_url: None,
            queue_type: QueueType::Classic,
            delivery_limit: 20,
            stale_after: Duration::from_secs(60),
            scan_interval: Duration::from_secs(5),
            scan_batch: 500,
            publish_chunk: 50,
            pool_threads: 4,
            pool_queue: 64,
            consumer_threads: 2,
            prefetch: 512,
            retry: RetryPolicy::default(),
            busy_timeout: Duration::from_secs(5),
            mysql_timeout: Duration::from_secs(30),
            retention: None,
            handoff_capacity: 8192,
            relay_batch: 1000,
            drain_timeout: Duration::from_secs(10),
            publish_deadline: None,
            max_shard_pages: None,
            faults: None,
        }
    }

    /// One deadline for a whole publish batch: `--publish-timeout` when set, otherwise a third of
    /// the lease, at most 15 s. Any task in flight is leased for at least this plus
    /// [`Settings::lease_margin`], so a publish ends (confirmed or not) before anyone else may
    /// claim its tasks; `validate` refuses a lease too short for that.
    pub fn publish_timeout(&self) -> Duration {
        self.publish_deadline
            .unwrap_or_else(|| (self.stale_after / 3).min(Duration::from_secs(15)))
    }

    /// Lease a relay wants left on a task before it publishes it; with less, it renews the lease
    /// first (and drops the task if another claim took it).
    pub fn lease_margin(&self) -> Duration {
        self.publish_timeout() + self.publish_timeout() / 2
    }

    /// Check the values that flags and code can get wrong.
    pub fn validate(self) -> Result<Self> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::Config(format!("{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        positive("scan batch", self.scan_batch)?;
        positive("publish chunk", self.publish_chunk)?;
        positive("pool threads", self.pool_threads)?;
        positive("pool queue", self.pool_queue)?;
        positive("consumer threads", self.consumer_threads)?;
        positive("hand-off capacity", self.handoff_capacity)?;
        positive("relay batch", self.relay_batch)?;
        if self.prefetch == 0 {
            return Err(Error::Config("prefetch must be at least 1".into()));
        }
        if self.mysql_timeout < Duration::from_secs(2) {
            return Err(Error::Config(format!(
                "mysql timeout {:?} is too short: use at least 2s (a row lock wait takes up to half of it)",
                self.mysql_timeout
            )));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::Config("max attempts must be at least 1".into()));
        }
        if self.stale_after < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "stale-after {:?} is too short: use at least 100ms",
                self.stale_after
            )));
        }
        if let Some(p) = self.publish_deadline {
            if p < Duration::from_millis(10) {
                return Err(Error::Config(format!(
                    "publish timeout {p:?} is too short: use at least 10ms"
                )));
            }
            let needed = p + self.lease_margin();
            if self.stale_after < needed {
                return Err(Error::Config(format!(
                    "stale-after {:?} is shorter than the publish timeout {p:?} plus its margin ({:?}): a task could be claimed and sent again while its first publish is still open; use --stale-after {}ms or more, or a shorter --publish-timeout",
                    self.stale_after,
                    self.lease_margin(),
                    needed.as_millis()
                )));
            }
        }
        if self.stale_after > Duration::from_secs(86_400) {
            return Err(Error::Config(format!(
                "stale-after {:?} is over a day: a task whose process died would wait that long to be sent again",
                self.stale_after
            )));
        }
        if self.scan_interval > Duration::from_secs(3_600) {
            return Err(Error::Config("scan interval must be at most 1h".into()));
        }
        if self.scan_interval < Duration::from_millis(10) {
            return Err(Error::Config("scan interval must be at least 10ms".into()));
        }
        if self.topic.is_empty()
            || self.topic.len() > 200
            || !self
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(Error::Config(format!(
                "topic {:?} must be 1-200 characters of letters, digits, '.', '_' or '-'",
                self.topic
            )));
        }
        if let StoreTarget::Mysql(dbs) = &self.store {
            if self.topic.chars().count() > MYSQL_TOPIC_MAX {
                return Err(Error::Config(format!(
                    "topic {:?} is {} characters, but the MySQL store's task.topic column holds {MYSQL_TOPIC_MAX} (the original's varchar({MYSQL_TOPIC_MAX})): every save would fail; use a topic of at most {MYSQL_TOPIC_MAX} characters",
                    self.topic,
                    self.topic.chars().count()
                )));
            }
            if dbs.len() != self.layout.db_count() as usize {
                return Err(Error::Config(format!(
                    "--store names {} databases but the layout has {}: give one URL (a database name prefix) or one per database",
                    dbs.len(),
                    self.layout.db_count()
                )));
            }
        }
        Ok(self)
    }
}

/// Random transport faults (`--inject-faults`, `verify`, the bench's drain), as
/// `refuse=0.05,drop-every=7,delay=2ms`; `transport::fault` injects them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    /// Probability that a message is refused (counted against its task, like a nack).
    pub refuse: f64,
    /// Every N-th publish batch fails as if the connection dropped (0: never).
    pub drop_every: u64,
    /// Delay before each batch's confirms come back.
    pub delay: Duration,
    /// Append a line per published message to this file: its message id and when its publish
    /// started and ended (epoch ms), for tests that check what was in flight when.
    pub record: Option<PathBuf>,
}

impl FaultPlan {
    /// Parse a comma-separated spec.
    pub fn parse(spec: &str) -> Result<FaultPlan> {
        let bad = |why: &str| Error::invalid("inject-faults", why.to_string());
        let mut plan = FaultPlan::default();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("{part:?} is not KEY=VALUE")))?;
            match k {
                "refuse" => {
                    plan.refuse = v
                        .parse()
                        .ok()
                        .filter(|p: &f64| (0.0..=1.0).contains(p))
                        .ok_or_else(|| bad("refuse is a probability from 0 to 1"))?
                }
                "drop-every" => {
                    plan.drop_every = v.parse().map_err(|_| bad("drop-every is a whole number"))?
                }
                "delay" => plan.delay = parse_duration(v)?,
                "record" if !v.is_empty() => plan.record = Some(PathBuf::from(v)),
                _ => {
                    return Err(bad(&format!(
                        "unknown fault {k:?}: use refuse, drop-every, delay or record"
                    )))
                }
            }
        }
        Ok(plan)
    }
}

/// `--amqp-url`, parsed once: one RabbitMQ node, or a comma-separated list of a cluster's nodes
/// (tried in order; on a lost connection the transport moves to the next). Its `Debug` and
/// `Display` show it without passwords (`amqp://user@host:port/vhost`); the whole URL is only
/// handed to the AMQP client and to a child process's environment.
#[derive(Clone, PartialEq)]
pub struct AmqpUrl {
    nodes: Vec<AmqpNode>,
    /// The nodes' URLs as given, comma-separated, passwords included.
    spec: String,
}

/// One node of `--amqp-url`.
#[derive(Clone, PartialEq)]
pub struct AmqpNode {
    url: String,
    shown: String,
}

impl AmqpNode {
    /// The URL as given, password included: only ever handed to the AMQP client.
    pub fn secret_url(&self) -> &str {
        &self.url
    }

    /// The URL without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl AmqpUrl {
    /// Parse `--amqp-url`: one URL, or several separated by commas (a cluster's nodes). The
    /// AMQP transport reads their AMQP parts. Errors never repeat a URL: it may hold a password.
    pub fn parse(spec: &str) -> Result<AmqpUrl> {
        let urls: Vec<&str> = spec.split(',').map(str::trim).collect();
        let mut nodes = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let node = AmqpNode::parse(url).map_err(|why| {
                Error::Config(AmqpUrl::refusal(&if urls.len() == 1 {
                    why
                } else {
                    format!("(node {} of {}) {why}", i + 1, urls.len())
                }))
            })?;
            nodes.push(node);
        }
        let spec = nodes
            .iter()
            .map(AmqpNode::secret_url)
            .collect::<Vec<_>>()
            .join(",");
        Ok(AmqpUrl { nodes, spec })
    }

    /// The nodes, in the order given.
    pub fn nodes(&self) -> &[AmqpNode] {
        &self.nodes
    }

    /// Why an AMQP URL is refused, in a message that does not repeat it.
    pub fn refusal(why: &str) -> String {
        format!(
            "the AMQP URL {why}: give amqp://user:password@host:5672/%2f, or a cluster's nodes separated by commas (the URL is not repeated here: it may hold a password)"
        )
    }

    /// The URLs as given, passwords included, comma-separated: only ever handed to a child
    /// process's environment.
    pub fn secret_url(&self) -> &str {
        &self.spec
    }

    /// The URLs without their passwords, comma-separated.
    pub fn shown(&self) -> String {
        self.nodes
            .iter()
            .map(AmqpNode::shown)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl AmqpNode {
    /// One node's URL; the error says why it is refused, without repeating it.
    fn parse(url: &str) -> std::result::Result<AmqpNode, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("is not a valid URL ({e})"))?;
        if !matches!(parsed.scheme(), "amqp" | "amqps") || parsed.cannot_be_a_base() {
            return Err("does not start with amqp:// or amqps://".into());
        }
        let host = parsed.host_str().unwrap_or("");
        if host.is_empty() {
            return Err("names no host".into());
        }
        // An `@` past the host means a password with an unescaped `/`, `?` or `#` in it, which
        // would be read as the path and shown: refused, to be written with %2F, %3F or %23.
        if parsed.path().contains('@')
            || parsed.query().is_some_and(|q| q.contains('@'))
            || parsed.fragment().is_some_and(|f| f.contains('@'))
        {
            return Err(
                "has an '@' after its host (escape '/', '?' and '#' in the password as %2F, %3F and %23)"
                    .into(),
            );
        }
        let port = parsed.port().unwrap_or(if parsed.scheme() == "amqps" {
            5671
        } else {
            5672
        });
        let user = parsed.username();
        let shown = format!(
            "{}://{user}{}{host}:{port}{}",
            parsed.scheme(),
            if user.is_empty() { "" } else { "@" },
            parsed.path()
        );
        Ok(AmqpNode {
            url: url.to_string(),
            shown,
        })
    }
}

impl std::fmt::Debug for AmqpNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

impl std::fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

/// `--queue-type`: how the topic's queue and its dead-letter queue are declared on RabbitMQ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    /// A durable classic queue without arguments: the original's queue.
    #[default]
    Classic,
    /// A quorum queue (Raft-replicated over the cluster's nodes; a confirm means a majority
    /// wrote the message) with a delivery limit and broker-side dead-lettering.
    Quorum,
}

impl QueueType {
    /// Parse `classic` or `quorum`.
    pub fn parse(s: &str) -> Result<QueueType> {
        match s.trim() {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(Error::invalid(
                "queue-type",
                format!("{other:?} is not classic or quorum"),
            )),
        }
    }

    /// Its name, as `x-queue-type` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// Where the shards live.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StoreTarget {
    /// One SQLite file per database under the data directory.
    #[default]
    Sqlite,
    /// One MySQL/MariaDB database per shard, in database order.
    Mysql(Vec<MysqlDatabase>),
}

/// One MySQL database of the layout: how to connect (credentials included, never shown) and
/// what to call it in logs and errors. `store::mysql` turns it into the driver's options.
#[derive(Clone, PartialEq)]
pub struct MysqlDatabase {
    /// The database name.
    pub name: String,
    /// `mysql://user@host:port/name`: the URL without its password.
    pub shown: String,
    /// The URL of this one database, password included: only ever handed to a child process's
    /// environment, never shown.
    url: String,
}

impl MysqlDatabase {
    /// The same server and credentials, another database.
    pub fn renamed(&self, name: &str) -> MysqlDatabase {
        let mut url = url::Url::parse(&self.url).expect("a URL that parsed before");
        url.set_path(name);
        let shown = match self.shown.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => name.to_string(),
        };
        MysqlDatabase {
            name: name.to_string(),
            shown,
            url: url.to_string(),
        }
    }

    /// The URL of this database, password included (for the driver, and a child process's
    /// environment).
    pub fn secret_url(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Debug for MysqlDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl StoreTarget {
    /// Parse `--store`: `mysql://user:pass@host:3306/big_market` names the prefix of databases
    /// `big_market_01` ... `big_market_NN` on one server, as db-router names them; a comma-separated
    /// list of `db_count` URLs names each database itself, in order (shards on separate servers).
    /// Errors never repeat a URL: it may hold a password.
    pub fn parse(spec: &str, db_count: u32) -> Result<StoreTarget> {
        let urls: Vec<&str> = spec.split(',').map(str::trim).collect();
        let bad = |which: String, why: &str| {
            Error::Config(format!(
                "{which} of --store {why}: give mysql://user:password@host:3306/big_market (databases big_market_01 ...), or one URL per database; leave --store unset for SQLite under --data-dir"
            ))
        };
        let which = |i: usize| {
            if urls.len() == 1 {
                "the URL".to_string()
            } else {
                format!("URL {} of {}", i + 1, urls.len())
            }
        };
        if urls.len() != 1 && urls.len() != db_count as usize {
            return Err(Error::Config(format!(
                "--store lists {} URLs but the layout has {} databases: give one URL (a database name prefix) or one per database",
                urls.len(),
                db_count
            )));
        }
        let mut out = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            if !url.starts_with("mysql://") {
                return Err(bad(which(i), "does not start with mysql://"));
            }
            let parsed = url::Url::parse(url)
                .map_err(|e| bad(which(i), &format!("is not a valid URL ({e})")))?;
            if parsed.scheme() != "mysql" || parsed.host_str().unwrap_or("").is_empty() {
                return Err(bad(which(i), "names no server"));
            }
            let named = parsed.path().trim_start_matches('/').to_string();
            if named.is_empty() {
                return Err(bad(which(i), "names no database"));
            }
            let names: Vec<String> = if urls.len() == 1 {
                (1..=db_count)
                    .map(|db| format!("{named}_{db:02}"))
                    .collect()
            } else {
                vec![named]
            };
            for name in names {
                if name.len() > 64
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
                {
                    return Err(bad(
                        which(i),
                        "names a database that is not 1-64 letters, digits, '_' or '$'",
                    ));
                }
                let shown = format!(
                    "mysql://{}@{}:{}/{name}",
                    parsed.username(),
                    parsed.host_str().unwrap_or(""),
                    parsed.port().unwrap_or(3306)
                );
                let mut full = parsed.clone();
                full.set_path(&name);
                out.push(MysqlDatabase {
                    name,
                    shown,
                    url: full.to_string(),
                });
            }
        }
        Ok(StoreTarget::Mysql(out))
    }
}

/// The longest duration any flag takes: ten years. Anything longer is a mistake, and would
/// overflow the epoch-millisecond arithmetic of cut-offs and leases.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Parse a duration such as `250ms`, `5s`, `2m`, `1h`, `7d` or `1h 30m` (humantime's syntax); a
/// bare number is seconds. At most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>().ok().map(Duration::from_secs)
    } else {
        humantime::parse_duration(s).ok()
    };
    let d = d.ok_or_else(|| {
        Error::invalid(
            "duration",
            format!("{s:?} is not a duration like 250ms, 5s, 2m, 1h or 7d"),
        )
    })?;
    if d > MAX_DURATION {
        return Err(Error::invalid(
            "duration",
            format!("{s:?} is longer than the limit of 3650d (ten years)"),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("3650d").unwrap(), MAX_DURATION);
        for bad in [
            "",
            "s",
            "5x",
            "-1s",
            "99999999999999999999d",
            "200000000000d",
            "3651d",
            "99999999999999999999",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_store_url_names_a_database_per_shard_and_never_shows_its_password() {
        let StoreTarget::Mysql(dbs) =
            StoreTarget::parse("mysql://app:s3cret@db.example:3307/big_market", 2).unwrap()
        else {
            panic!("not mysql")
        };
        let names: Vec<&str> = dbs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["big_market_01", "big_market_02"]);
        assert_eq!(dbs[1].shown, "mysql://app@db.example:3307/big_market_02");
        assert_eq!(dbs[1].name, "big_market_02");
        assert_eq!(
            dbs[1].secret_url(),
            "mysql://app:s3cret@db.example:3307/big_market_02"
        );
        let scratch = dbs[0].renamed("big_market_01_x");
        assert_eq!(
            (scratch.shown.as_str(), scratch.secret_url()),
            (
                "mysql://app@db.example:3307/big_market_01_x",
                "mysql://app:s3cret@db.example:3307/big_market_01_x"
            )
        );
        assert!(!format!("{dbs:?}").contains("s3cret"));
        let StoreTarget::Mysql(dbs) =
            StoreTarget::parse("mysql://a:p@h1/shard_a, mysql://a:p@h2/shard_b", 2).unwrap()
        else {
            panic!("not mysql")
        };
        assert_eq!(dbs[0].shown, "mysql://a@h1:3306/shard_a");
        assert_eq!(dbs[1].name, "shard_b");
        for bad in [
            "postgres://u:s3cret@h/db",
            "mysql://u:s3cret@h",
            "mysql://u:s3cret@h/a,mysql://u:s3cret@h/b,mysql://u:s3cret@h/c",
            "mysql://u:s3cret@h/bad`name",
            "mysql://u:s3cret@h:99999/db",
        ] {
            let e = StoreTarget::parse(bad, 2).unwrap_err().to_string();
            assert!(!e.contains("s3cret") && e.contains("--store"), "{bad}: {e}");
        }
        let mut s = Settings::new("data");
        s.store = StoreTarget::parse("mysql://u@h/one", 1).unwrap();
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("layout has 2"));
    }

    #[test]
    fn an_amqp_url_is_never_shown_with_its_password_not_even_when_it_does_not_parse() {
        let url = AmqpUrl::parse("amqp://guest:s3cret@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(url.shown(), "amqp://guest@127.0.0.1:5672/%2f");
        assert_eq!(url.secret_url(), "amqp://guest:s3cret@127.0.0.1:5672/%2f");
        assert_eq!(AmqpUrl::parse("amqp://h").unwrap().shown(), "amqp://h:5672");
        let mut s = Settings::new("data");
        s.amqp_url = Some(url.clone());
        s.store = StoreTarget::parse("mysql://u:s3cret@h/db", 2).unwrap();
        let debug = format!("{s:?} {url}");
        assert!(
            !debug.contains("s3cret") && debug.contains("guest@127.0.0.1"),
            "{debug}"
        );
        for bad in [
            "http://guest:s3cret@127.0.0.1/",
            "amqq//guest:s3cret@127.0.0.1/",
            "amqp:guest:s3cret@127.0.0.1",
            "amqp://guest:s3cret@127.0.0.1:99999/%2f",
            "amqp://guest:s3cret@/%2f",
        ] {
            let e = AmqpUrl::parse(bad).unwrap_err().to_string();
            assert!(
                !e.contains("s3cret") && e.contains("AMQP URL"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn defaults_validate_and_bad_values_are_refused() {
        assert!(Settings::new("data").validate().is_ok());
        let mut s = Settings::new("data");
        s.pool_threads = 0;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pool threads"));
        let mut s = Settings::new("data");
        s.topic = "bad topic".into();
        assert!(s.validate().is_err());
        // The MySQL store's topic column holds 32 characters; SQLite's holds any.
        let mut s = Settings::new("data");
        s.topic = "t".repeat(33);
        assert!(s.clone().validate().is_ok());
        s.store = StoreTarget::parse("mysql://root@127.0.0.1:3306/big_market", 2).unwrap();
        let e = s.clone().validate().unwrap_err().to_string();
        assert!(e.contains("holds 32") && !e.contains('\n'), "{e}");
        s.topic = "t".repeat(32);
        assert!(s.validate().is_ok());
        let mut s = Settings::new("data");
        s.publish_deadline = Some(Duration::from_secs(30));
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("stale-after") && e.contains("75000ms"), "{e}");
        let mut s = Settings::new("data");
        s.publish_deadline = Some(Duration::from_secs(20));
        assert_eq!(
            s.clone().validate().unwrap().publish_timeout(),
            Duration::from_secs(20)
        );
        s.stale_after = Duration::from_secs(86_401);
        assert!(s.validate().unwrap_err().to_string().contains("over a day"));
    }

    #[test]
    fn fault_plans_parse_and_bad_ones_are_refused() {
        let p = FaultPlan::parse("refuse=0.05,drop-every=7,delay=2ms,record=/tmp/r").unwrap();
        assert_eq!(
            p,
            FaultPlan {
                refuse: 0.05,
                drop_every: 7,
                delay: Duration::from_millis(2),
                record: Some(PathBuf::from("/tmp/r")),
            }
        );
        assert_eq!(FaultPlan::parse("").unwrap(), FaultPlan::default());
        for bad in [
            "refuse=2",
            "refuse",
            "drop-every=x",
            "delay=5x",
            "explode=1",
        ] {
            assert!(FaultPlan::parse(bad).is_err(), "{bad}");
        }
    }
}
