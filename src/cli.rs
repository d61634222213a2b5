//! The command line: flags (each with an environment variable) into [`Settings`], and one
//! function per subcommand. Output for people goes to stdout; logs go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{parse_duration, Settings, StoreTarget};
use crate::error::{Error, Result};
use crate::model::{AwardRecord, AwardState, NewAward, TaskState, UserId};
use crate::router::{route, Layout};
use crate::service::{transport_for, Parts, Service};
use crate::store::{ShardStatus, Store};
use crate::util::now_ms;

fn duration(s: &str) -> std::result::Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// `--retention`: how long completed tasks are kept, or never compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retention {
    /// Keep them (and, on SQLite, the delivery log) for ever.
    Off,
    /// Compact them once they are this old.
    Keep(Duration),
}

/// The SQLite store's retention when `--retention` is not given: a box left alone keeps a week
/// of completed tasks and its disk use stays flat.
const DEFAULT_SQLITE_RETENTION: Duration = Duration::from_secs(7 * 86_400);

fn retention(s: &str) -> std::result::Result<Retention, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        Ok(Retention::Off)
    } else {
        duration(s).map(Retention::Keep)
    }
}

fn queue_type(s: &str) -> std::result::Result<crate::config::QueueType, String> {
    crate::config::QueueType::parse(s).map_err(|e| e.to_string())
}

/// A whole number from 1 to `MAX`, for counts, sizes and threads: anything else is refused by
/// the argument parser (exit 2) before it can exhaust memory or overflow.
fn count<T: TryFrom<u64>, const MAX: u64>(s: &str) -> std::result::Result<T, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number from 1 to {MAX}"))?;
    if !(1..=MAX).contains(&n) {
        return Err(format!("{n} is out of range: use 1 to {MAX}"));
    }
    T::try_from(n).map_err(|_| format!("{n} is too large for this machine"))
}

/// big-market: write award records and their outbox tasks atomically on SQLite or MySQL shards, and
/// deliver them through RabbitMQ or an in-process queue, losing nothing.
#[derive(Debug, Parser)]
#[command(name = "big-market", version, about, long_about = None, after_help = "Exit codes: 0 success, 1 failure, 2 bad input or settings, 3 duplicate order id, 4 outcome unknown (MySQL: retry with the same order id).\nLogs go to stderr; set RUST_LOG (error, warn, info, debug, trace) to change how much.")]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Directory of the shard files big_market_NN.db.
    #[arg(
        long,
        env = "BIG_MARKET_DATA_DIR",
        default_value = "data",
        global = true
    )]
    data_dir: PathBuf,
    /// Keep the shards in MySQL/MariaDB instead: mysql://user:password@host:3306/big_market uses
    /// databases big_market_01 ... big_market_NN on that server (db-router's names); a
    /// comma-separated list of one URL per database, in order, puts shards on separate servers.
    /// Unset: SQLite files under --data-dir.
    #[arg(long, env = "BIG_MARKET_STORE", hide_env_values = true, global = true)]
    store: Option<String>,
    /// Number of databases (shard files). db-count x tb-count must be a power of two.
    #[arg(long, env = "BIG_MARKET_DB_COUNT", default_value_t = 2, global = true, value_parser = count::<u32, 1024>)]
    db_count: u32,
    /// Number of split award tables per database.
    #[arg(long, env = "BIG_MARKET_TB_COUNT", default_value_t = 4, global = true, value_parser = count::<u32, 1024>)]
    tb_count: u32,
    /// RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f, or a cluster's nodes separated
    /// by commas (the first that answers is used; on a lost connection, the next). Unset: the
    /// in-process transport.
    #[arg(long, env = "AMQP_URL", hide_env_values = true, global = true)]
    amqp_url: Option<String>,
    /// How the queue and `<topic>.dlq` are declared on RabbitMQ: `classic` (the original's) or
    /// `quorum` (replicated over a cluster, with a delivery limit and broker-side
    /// dead-lettering). A queue that exists with other arguments is refused at start.
    #[arg(
        long,
        env = "BIG_MARKET_QUEUE_TYPE",
        default_value = "classic",
        value_parser = queue_type,
        global = true
    )]
    queue_type: crate::config::QueueType,
    /// On a quorum queue: deliveries of one message after which the broker dead-letters it
    /// to `<topic>.dlq` (1 to 1,000).
    #[arg(
        long,
        env = "BIG_MARKET_DELIVERY_LIMIT",
        default_value_t = 20,
        value_parser = count::<u32, 1_000>,
        global = true
    )]
    delivery_limit: u32,
    /// Topic of award messages (also the queue name on RabbitMQ).
    #[arg(
        long,
        env = "BIG_MARKET_TOPIC",
        default_value = "send_award",
        global = true
    )]
    topic: String,
    /// A task whose publish has not completed this long after it was claimed is sent again.
    #[arg(long, env = "BIG_MARKET_STALE_AFTER", default_value = "60s", value_parser = duration, global = true)]
    stale_after: Duration,
    /// The deadline of one publish batch; the lease (--stale-after) must be at least 2.5 times
    /// it. Unset: a third of --stale-after, at most 15s.
    #[arg(long, env = "BIG_MARKET_PUBLISH_TIMEOUT", value_parser = duration, global = true)]
    publish_timeout: Option<Duration>,
    /// MySQL store: the deadline of every round trip to the server (each connection's read and
    /// write timeouts; TCP keepalive and TCP_USER_TIMEOUT follow it) and of every call into a
    /// shard's write lane. A server that stops answering costs one clear error after it.
    #[arg(long, env = "BIG_MARKET_MYSQL_TIMEOUT", default_value = "30s", value_parser = duration, global = true)]
    mysql_timeout: Duration,
    /// Time between compensation scans.
    #[arg(long, env = "BIG_MARKET_SCAN_INTERVAL", default_value = "5s", value_parser = duration, global = true)]
    scan_interval: Duration,
    /// Refused publishes after which a task is parked as dead.
    #[arg(
        long,
        env = "BIG_MARKET_MAX_ATTEMPTS",
        default_value_t = 10,
        global = true,
        value_parser = count::<u32, 1_000_000>
    )]
    max_attempts: u32,
    /// Compact completed tasks older than this during scans (e.g. 7d), or `off`. SQLite folds
    /// them and their delivery log into the shard's watermark, so the logs stop growing;
    /// MySQL deletes completed tasks. Default: 7d on SQLite, off on MySQL.
    #[arg(long, env = "BIG_MARKET_RETENTION", value_parser = retention, global = true)]
    retention: Option<Retention>,
    /// Threads of the relay pool that republishes tasks.
    #[arg(
        long,
        env = "BIG_MARKET_POOL_THREADS",
        default_value_t = 4,
        global = true,
        value_parser = count::<usize, 256>
    )]
    pool_threads: usize,
    /// Jobs the relay pool queues before the scanner runs them itself (caller-runs).
    #[arg(
        long,
        env = "BIG_MARKET_POOL_QUEUE",
        default_value_t = 64,
        global = true,
        value_parser = count::<usize, 1_000_000>
    )]
    pool_queue: usize,
    /// Consumer threads delivering awards.
    #[arg(long, env = "BIG_MARKET_CONSUMERS", default_value_t = 2, global = true, value_parser = count::<usize, 64>)]
    consumers: usize,
    /// Testing: inject transport faults, e.g. refuse=0.05,drop-every=7,delay=2ms.
    #[arg(long, env = "BIG_MARKET_INJECT_FAULTS", global = true)]
    inject_faults: Option<String>,
    /// Testing: abort the process the N-th time it crosses POINT (after-commit, before-confirm,
    /// mid-relay-batch, before-mark, mid-group-commit, before-ack), as if killed there.
    #[arg(long, value_name = "POINT:N", global = true)]
    crash_at: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the shard files, or with --store the MySQL databases and tables (idempotent; on the
    /// original's own databases, it adds big-market's columns to the task table).
    Init,
    /// Print the database and table a user id routes to.
    Route {
        /// The user id.
        user_id: String,
    },
    /// Save one award through the whole pipeline.
    Award(AwardArgs),
    /// Write many awards with random order ids, wait until all are delivered, print a summary.
    Load(LoadArgs),
    /// Run the compensation scanner and the consumer until SIGINT or SIGTERM.
    Serve {
        /// Also serve HTTP on this address (e.g. 127.0.0.1:8091; port 0 picks a free port):
        /// POST/GET /api/v1/awards, /healthz, /readyz, /metrics.
        #[arg(long, env = "BIG_MARKET_HTTP")]
        http: Option<String>,
        /// Bearer token every /api/ route needs (Authorization: Bearer <token>); 16 to 1024
        /// visible characters. /healthz, /readyz and /metrics stay open.
        #[arg(long, env = "BIG_MARKET_HTTP_TOKEN", hide_env_values = true)]
        http_token: Option<String>,
        /// Serve an address other than loopback without a token (otherwise refused at start).
        #[arg(long)]
        http_insecure: bool,
        /// Open HTTP connections at most; past it a new one replaces the connection idle the
        /// longest, and is answered 503 and closed only when every one has a request in hand.
        #[arg(long, env = "BIG_MARKET_HTTP_MAX_CONNECTIONS", default_value_t = 256,
              value_parser = count::<u32, 65_536>)]
        http_max_connections: u32,
    },
    /// Show award records and tasks by state on every shard.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure the pipeline beside the storage and broker ceilings, in one run, on fresh temporary
    /// shards (with --store, scratch MySQL databases named after yours, dropped afterwards).
    Bench {
        /// Awards per phase (1 to 10,000,000).
        #[arg(long, default_value_t = 20000, value_parser = count::<usize, 10_000_000>)]
        records: usize,
        /// Caller threads (1 to 1024).
        #[arg(long, default_value_t = 16, value_parser = count::<usize, 1024>,
              conflicts_with = "sweep")]
        threads: usize,
        /// Also measure POST /api/v1/awards through the HTTP server on loopback (with --sweep,
        /// over as many keep-alive connections as callers at each count).
        #[arg(long)]
        http: bool,
        /// Measure the ceilings, the original's design and the pipeline at 16, 64 and 256
        /// callers instead of --threads (without the backlog drain); print one table and one
        /// JSON line per caller count.
        #[arg(long)]
        sweep: bool,
        /// With --sweep: draw the sweep as an SVG line chart in FILE (awards/s per caller count
        /// for the pipeline, batched saves, the original's design and every ceiling; save p99
        /// on a second axis).
        #[arg(long, value_name = "FILE", requires = "sweep")]
        plot: Option<std::path::PathBuf>,
    },
    /// Copy every shard file into a directory while `serve` (or anything else) runs: one file
    /// per shard, named as the shards are, each consistent as of one moment. The copy opens as
    /// a data directory (`serve --data-dir DIR`, `audit --data-dir DIR`). SQLite store only.
    Backup {
        /// Directory for the copies: new or empty (anything else is refused; nothing is
        /// overwritten). It appears whole at the end, every shard in it, or not at all.
        #[arg(long)]
        to: std::path::PathBuf,
    },
    /// Prove nothing was lost: per shard, committed vs delivered sequence numbers, gaps,
    /// redeliveries, tasks without awards and awards without tasks; the original's rows (tasks
    /// without a sequence number, awards none of ours name) apart, by state.
    Audit {
        /// Only count an undelivered task (or an original task not completed) as lost once it
        /// is this old.
        #[arg(long, default_value = "60s", value_parser = duration)]
        older_than: Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Kill and restart the pipeline at every crash boundary under injected faults, and audit;
    /// a scenario whose crash point is never reached fails. In-process by default; with
    /// --amqp-url, against RabbitMQ, with queues of its own per scenario (deleted afterwards);
    /// with --store, on MySQL databases of its own per scenario (dropped afterwards).
    Verify {
        /// Rounds over every boundary (1 to 100).
        #[arg(long, default_value_t = 1, value_parser = count::<usize, 100>)]
        rounds: usize,
        /// Awards per scenario (1 to 1,000,000).
        #[arg(long, default_value_t = 400, value_parser = count::<usize, 1_000_000>)]
        records: usize,
        /// Transport faults injected into every run.
        #[arg(long, default_value = "refuse=0.05,drop-every=13,delay=1ms")]
        faults: String,
    },
    /// Inspect and repair outbox tasks.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Look at, send back or clear the messages the consumer could not process, kept in the
    /// RabbitMQ queue `<topic>.dlq` with why and when (needs --amqp-url).
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first: message id, when, why, and the start of the body.
    List {
        /// At most this many (1 to 1,000,000).
        #[arg(long, default_value_t = 100, value_parser = count::<usize, 1_000_000>)]
        limit: usize,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters to the topic again (confirmed), and remove them from the dead-letter
    /// queue: for messages that can be processed now.
    Replay {
        /// The dead letter with this message id.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        message_id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters set aside longer ago than a given age.
    Purge {
        /// Age, e.g. 7d.
        #[arg(long, value_parser = duration)]
        older_than: Duration,
    },
}

#[derive(Debug, Args)]
struct AwardArgs {
    /// Who won.
    #[arg(long)]
    user_id: String,
    /// The activity id (positive integer).
    #[arg(long)]
    activity_id: i64,
    /// The strategy id (positive integer).
    #[arg(long)]
    strategy_id: i64,
    /// The order id: the idempotency key (at most 12 characters).
    #[arg(long)]
    order_id: String,
    /// The award id (positive integer).
    #[arg(long)]
    award_id: i64,
    /// The award's title.
    #[arg(long)]
    award_title: String,
    /// When it was won, epoch milliseconds (default: now).
    #[arg(long)]
    award_time: Option<i64>,
    /// What to wait for before exiting. `committed` (the default): the award and its task are
    /// durable; the message is published while the process stops, or by `serve` later.
    /// `confirmed`: the broker confirmed the message and the task is marked completed.
    #[arg(long, value_enum, default_value_t = WaitFor::Committed)]
    wait: WaitFor,
    /// With `--wait confirmed`, the longest wait.
    #[arg(long, value_parser = duration, default_value = "30s")]
    wait_timeout: Duration,
}

/// What `award` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WaitFor {
    /// The award and its task are committed.
    Committed,
    /// Its message is confirmed and the task completed.
    Confirmed,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// How many awards to write (1 to 10,000,000).
    #[arg(long, value_parser = count::<u64, 10_000_000>)]
    records: u64,
    /// How many distinct users they are spread over (1 to 100,000,000).
    #[arg(long, default_value_t = 100, value_parser = count::<u64, 100_000_000>)]
    users: u64,
    /// Caller threads writing concurrently (1 to 1024).
    #[arg(long, default_value_t = 16, value_parser = count::<usize, 1024>)]
    threads: usize,
    /// Give up waiting for delivery after this long.
    #[arg(long, default_value = "300s", value_parser = duration)]
    timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum TasksCommand {
    /// List tasks, oldest first.
    List {
        /// Only tasks in this state: create, fail, completed or dead.
        #[arg(long)]
        state: Option<String>,
        /// At most this many per shard (1 to 1,000,000).
        #[arg(long, default_value_t = 20, value_parser = count::<usize, 1_000_000>)]
        limit: usize,
    },
    /// Put tasks back in line, due now, with their attempts reset.
    Requeue {
        /// The task with this message id.
        #[arg(long, conflicts_with = "state", required_unless_present = "state")]
        message_id: Option<String>,
        /// Every task in this state (usually dead).
        #[arg(long)]
        state: Option<String>,
    },
    /// Delete completed tasks last changed before a given age.
    Purge {
        /// Age, e.g. 7d or 12h.
        #[arg(long, value_parser = duration)]
        older_than: Duration,
    },
}

impl GlobalArgs {
    fn settings(&self) -> Result<Settings> {
        let mut s = Settings::new(&self.data_dir);
        s.layout = Layout::new(self.db_count, self.tb_count)?;
        if let Some(spec) = self.store.as_deref().filter(|u| !u.trim().is_empty()) {
            s.store = StoreTarget::parse(spec, self.db_count)?;
        }
        s.topic = self.topic.clone();
        s.amqp_url = self
            .amqp_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(crate::config::AmqpUrl::parse)
            .transpose()?;
        s.queue_type = self.queue_type;
        s.delivery_limit = self.delivery_limit;
        s.stale_after = self.stale_after;
        s.publish_deadline = self.publish_timeout;
        s.scan_interval = self.scan_interval;
        s.mysql_timeout = self.mysql_timeout;
        s.retry.max_attempts = self.max_attempts;
        s.retention = match self.retention {
            Some(Retention::Off) => None,
            Some(Retention::Keep(d)) => Some(d),
            None if s.store == StoreTarget::Sqlite => Some(DEFAULT_SQLITE_RETENTION),
            None => None,
        };
        s.pool_threads = self.pool_threads;
        s.pool_queue = self.pool_queue;
        s.consumer_threads = self.consumers;
        s.faults = self
            .inject_faults
            .as_deref()
            .map(crate::config::FaultPlan::parse)
            .transpose()?;
        s.validate()
    }
}

/// Parse the process arguments, run the command, print any error; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                if !msg.contains(&s.to_string()) {
                    msg.push_str(&format!(": {s}"));
                }
                src = s.source();
            }
            eprintln!("{msg}");
            e.exit_code()
        }
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let settings = cli.global.settings()?;
    if let Some(spec) = &cli.global.crash_at {
        let (point, nth) = crate::crash::parse(spec)?;
        crate::crash::arm(point, nth);
    }
    match cli.command {
        Command::Init => init(&settings),
        Command::Route { user_id } => {
            let id = UserId::parse(&user_id)?;
            let r = route(id.as_str(), settings.layout);
            println!(
                "user_id={} db={} table={}",
                id.as_str(),
                r.db_name(),
                r.table_name()
            );
            Ok(())
        }
        Command::Award(a) => award(settings, a),
        Command::Load(a) => load(settings, a),
        Command::Serve {
            http,
            http_token,
            http_insecure,
            http_max_connections,
        } => serve(
            settings,
            http.map(|addr| crate::http::HttpConfig {
                addr,
                token: http_token,
                insecure: http_insecure,
                limits: crate::http::HttpLimits {
                    max_connections: http_max_connections as usize,
                    ..crate::http::HttpLimits::default()
                },
            }),
        ),
        Command::Status { json } => status(&settings, json),
        Command::Tasks(t) => tasks(&settings, t),
        Command::Dlq(d) => dlq(&settings, d),
        Command::Audit { older_than, json } => audit(&settings, older_than, json),
        Command::Backup { to } => backup(&settings, &to),
        Command::Verify {
            rounds,
            records,
            faults,
        } => {
            crate::config::FaultPlan::parse(&faults)?;
            if rounds == 0 || records == 0 {
                return Err(Error::invalid("rounds/records", "must be at least 1"));
            }
            crate::verify::run(
                &settings,
                &crate::verify::VerifyOptions {
                    rounds,
                    records,
                    faults,
                },
            )
            .map(|_| ())
        }
        Command::Bench {
            records,
            threads,
            http,
            sweep,
            plot,
        } => {
            if records == 0 || threads == 0 {
                return Err(Error::invalid("records/threads", "must be at least 1"));
            }
            let opts = crate::bench::BenchOptions {
                records,
                threads,
                http,
            };
            if sweep {
                crate::sweep::run(&settings, &opts, plot.as_deref()).map(|_| ())
            } else {
                crate::bench::run(&settings, &opts).map(|_| ())
            }
        }
    }
}

fn init(settings: &Settings) -> Result<()> {
    let store = Store::open(settings, true)?;
    for s in store.shards() {
        println!("shard {} ready", s.location());
    }
    let place = match &settings.store {
        StoreTarget::Sqlite => settings.data_dir.display().to_string(),
        StoreTarget::Mysql(_) => "the MySQL store".to_string(),
    };
    println!(
        "initialised {place} with {} databases x {} tables",
        settings.layout.db_count(),
        settings.layout.tb_count()
    );
    Ok(())
}

fn award(settings: Settings, a: AwardArgs) -> Result<()> {
    let record = AwardRecord::new(NewAward {
        user_id: &a.user_id,
        activity_id: a.activity_id,
        strategy_id: a.strategy_id,
        order_id: &a.order_id,
        award_id: a.award_id,
        award_title: &a.award_title,
        award_time_ms: a.award_time.unwrap_or_else(now_ms),
    })?;
    let transport = transport_for(&settings)?;
    // The in-process transport confirms only once its consumer has delivered, so it needs one.
    let parts = Parts {
        consumer: settings.amqp_url.is_none(),
        scanner_loop: false,
    };
    let service = Service::start(settings, transport, parts)?;
    let r = route(record.user_id.as_str(), service.settings().layout);
    let (user, order) = (
        record.user_id.as_str().to_string(),
        record.order_id.as_str().to_string(),
    );
    let result = service.save_award(record);
    let state = match (&result, a.wait) {
        (Ok(saved), WaitFor::Confirmed) => Some(service.wait_confirmed(saved, a.wait_timeout)),
        _ => None,
    };
    // Stopping drains the relay (bounded), so the message is normally published before exit.
    service.shutdown()?;
    let saved = result?;
    println!(
        "saved user_id={user} order_id={order} db={} table={} message_id={} seq={}",
        r.db_name(),
        r.table_name(),
        saved.message_id.as_str(),
        saved.seq,
    );
    match state.transpose()? {
        None | Some(TaskState::Completed) => Ok(()),
        Some(TaskState::Dead) => Err(crate::Error::Broker(format!(
            "message {} was refused until its task was parked as dead: see `big-market tasks list --state dead`",
            saved.message_id.as_str()
        ))),
        Some(other) => Err(crate::Error::Broker(format!(
            "message {} was not confirmed within {:?} (task state {}): the award is committed and `big-market serve` sends it",
            saved.message_id.as_str(),
            a.wait_timeout,
            other.as_str()
        ))),
    }
}

fn pending_tasks(statuses: &[ShardStatus]) -> u64 {
    statuses.iter().map(ShardStatus::pending).sum()
}

fn load(settings: Settings, a: LoadArgs) -> Result<()> {
    let opts = crate::load::LoadOptions {
        records: a.records,
        users: a.users,
        threads: a.threads,
        timeout: a.timeout,
    };
    // Checked before anything is opened or created.
    crate::load::run_checks(&opts)?;
    let transport = transport_for(&settings)?;
    let service = Service::start(settings, transport, Parts::ALL)?;
    let progress = crate::load::Progress::new(a.records);
    let report = crate::load::run(&service, &opts, &|saved, delivered, done| {
        progress.show(saved, delivered, done)
    });
    service.shutdown()?;
    let report = report?;
    println!("{report}");
    if let Some(e) = report.first_error {
        return Err(e);
    }
    if !report.all_delivered() {
        return Err(Error::Broker(format!(
            "{} of {} awards delivered within {:?}; the rest stay pending and `big-market serve` will deliver them",
            report.delivered, report.saved, a.timeout
        )));
    }
    Ok(())
}

/// How long `serve` waits for the transport before it tells systemd it is ready anyway.
const READY_WAIT: Duration = Duration::from_secs(30);

/// Tell the service manager (`NOTIFY_SOCKET`, set by systemd for `Type=notify`) a state
/// change; without the variable it does nothing.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::warn!("could not notify the service manager: {e}");
    }
}

fn serve(settings: Settings, http: Option<crate::http::HttpConfig>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|e| Error::Io {
            path: "signal handler".into(),
            source: e,
        })?;
    if let Some(config) = &http {
        // A bad token or an exposed address is refused before anything is opened.
        config.validate()?;
    }
    let transport = transport_for(&settings)?;
    let service = Arc::new(Service::start(settings, transport, Parts::ALL)?);
    let server = match http {
        Some(config) => {
            let server = crate::http::HttpServer::start(config, service.clone())?;
            println!("listening on http://{}", server.local_addr());
            let _ = std::io::stdout().flush();
            Some(server)
        }
        None => None,
    };
    // Under systemd (Type=notify): ready once the shards are open and the transport is up, or
    // after a bounded wait for the broker (it keeps retrying; a start never hangs on it).
    // A signal during that wait is the first signal: the stop is not put off by it.
    let mut early = None;
    let connected = crate::util::wait_until(READY_WAIT, || {
        early = early.or_else(|| signals.pending().next());
        early.is_some() || service.transport().is_connected()
    }) && early.is_none();
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(if connected {
            "serving"
        } else {
            "serving; the broker does not answer yet, retrying"
        }),
    ]);
    log::info!("serving; send SIGINT or SIGTERM to stop");
    let first = early.or_else(|| signals.forever().next());
    notify(&[sd_notify::NotifyState::Stopping]);
    log::info!("signal {first:?} received: shutting down (send it again to exit at once; committed work is kept)");
    crate::util::spawn("second-signal", move || {
        if signals.forever().next().is_some() {
            eprintln!("second signal: exiting now; pending tasks are resent after the next start");
            std::process::exit(130);
        }
    })?;
    if let Some(server) = server {
        server.drain();
        server.stop();
    }
    let service = Arc::try_unwrap(service)
        .map_err(|_| Error::Config("the HTTP server still holds the service".into()))?;
    service.shutdown()
}

fn status(settings: &Settings, json: bool) -> Result<()> {
    let store = Store::open(settings, false)?;
    let statuses = store.status()?;
    let now = now_ms();
    let broker = match &settings.amqp_url {
        None => "in-process (no broker configured)".to_string(),
        Some(_) => match crate::transport::amqp::Amqp::connect_once(settings) {
            Ok(node) => format!(
                "connected to {node}, queue {} ({})",
                settings.topic,
                settings.queue_type.as_str()
            ),
            Err(e) => format!("unreachable: {e}"),
        },
    };
    if json {
        let shards: Vec<serde_json::Value> = statuses
            .iter()
            .map(|s| {
                serde_json::json!({
                    "db": crate::router::db_name(s.db),
                    "location": s.location,
                    "awards": s.awards,
                    "tasks": s.tasks,
                    "oldest_pending_age_ms": s.oldest_pending_ms.map(|t| now - t),
                    "delivered_messages": s.delivered_messages,
                    "redeliveries": s.receipts - s.delivered_messages,
                    "last_seq": s.last_seq,
                    "compacted": s.compacted,
                })
            })
            .collect();
        let out = serde_json::json!({ "broker": broker, "pending": pending_tasks(&statuses), "shards": shards });
        println!("{out}");
        return Ok(());
    }
    println!("broker: {broker}");
    println!(
        "{:<14} {:>9} {:>9} | {:>8} {:>8} {:>10} {:>6} | {:>14} {:>9} {:>9}",
        "shard",
        "award:new",
        "delivered",
        "task:new",
        "fail",
        "completed",
        "dead",
        "oldest pending",
        "last seq",
        "compacted"
    );
    for s in &statuses {
        let oldest = s
            .oldest_pending_ms
            .map(|t| format!("{:.1}s", (now - t) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:>9} {:>9} | {:>8} {:>8} {:>10} {:>6} | {:>14} {:>9} {:>9}",
            crate::router::db_name(s.db),
            s.awards_in(AwardState::Create),
            s.awards_in(AwardState::Completed),
            s.tasks_in(TaskState::Create),
            s.tasks_in(TaskState::Fail),
            s.tasks_in(TaskState::Completed),
            s.tasks_in(TaskState::Dead),
            oldest,
            s.last_seq,
            s.compacted
        );
    }
    println!("pending tasks: {}", pending_tasks(&statuses));
    Ok(())
}

fn tasks(settings: &Settings, cmd: TasksCommand) -> Result<()> {
    let store = Store::open(settings, false)?;
    match cmd {
        TasksCommand::List { state, limit } => {
            let state = state.as_deref().map(TaskState::parse).transpose()?;
            println!(
                "{:<14} {:<12} {:>6} {:<10} {:>8} {:<12} last_error",
                "shard", "message_id", "seq", "state", "attempts", "user_id"
            );
            for shard in store.shards() {
                for t in shard.list_tasks(state, limit)? {
                    println!(
                        "{:<14} {:<12} {:>6} {:<10} {:>8} {:<12} {}",
                        crate::router::db_name(shard.db()),
                        t.message_id,
                        t.seq,
                        t.state,
                        t.attempts,
                        t.user_id,
                        t.last_error.unwrap_or_default()
                    );
                }
            }
        }
        TasksCommand::Requeue { message_id, state } => {
            let state = state.as_deref().map(TaskState::parse).transpose()?;
            if state == Some(TaskState::Completed) {
                return Err(Error::invalid(
                    "state",
                    "completed tasks are never resent; requeue dead or fail",
                ));
            }
            let now = now_ms();
            let n = store.requeue(message_id.as_deref(), state, now)?;
            if n == 0 && message_id.is_some() {
                return Err(Error::invalid(
                    "message_id",
                    "no pending, failed or dead task has this message id",
                ));
            }
            println!("requeued {n} tasks; the next scan sends them");
        }
        TasksCommand::Purge { older_than } => {
            // older_than is at most ten years (parse_duration), so this cannot wrap.
            let before_ms = now_ms().saturating_sub(older_than.as_millis() as i64);
            let n = store.purge(before_ms)?;
            println!("purged {n} completed tasks older than {older_than:?}");
        }
    }
    Ok(())
}

fn dlq(settings: &Settings, command: DlqCommand) -> Result<()> {
    use crate::transport::amqp::{dead_letter_queue, walk_dead_letters, DeadLetterAction as A};
    let queue = dead_letter_queue(&settings.topic);
    match command {
        DlqCommand::List { limit, json } => {
            let seen = walk_dead_letters(settings, limit, |_| A::Keep)?;
            if json {
                let letters: Vec<_> = seen.iter().map(|(l, _)| l).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&letters).expect("dead letters serialize")
                );
            } else {
                for (l, _) in &seen {
                    let at = jiff::Timestamp::from_millisecond(l.dead_lettered_at_ms)
                        .map(|t| t.to_string())
                        .unwrap_or_else(|_| "-".into());
                    let body: String = l.body.chars().take(120).collect();
                    println!(
                        "message_id={} at={at} reason={:?} body={body:?}",
                        l.message_id.as_deref().unwrap_or("-"),
                        l.reason
                    );
                }
                println!("{} dead letters in {queue}", seen.len());
            }
        }
        DlqCommand::Replay { message_id, all } => {
            // One copy per message id: a dead letter whose confirm came late (a broker under
            // an alarm) may have been set aside twice; the copies after the first are removed.
            let mut replayed = std::collections::HashSet::new();
            let seen = walk_dead_letters(settings, usize::MAX, move |l| {
                if !(all || l.message_id.is_some() && l.message_id == message_id) {
                    A::Keep
                } else if l
                    .message_id
                    .as_ref()
                    .is_some_and(|id| !replayed.insert(id.clone()))
                {
                    A::Drop
                } else {
                    A::Replay
                }
            })?;
            let n = seen.iter().filter(|(_, a)| *a == A::Replay).count();
            let copies = seen.iter().filter(|(_, a)| *a == A::Drop).count();
            println!(
                "replayed {n} messages from {queue} to {} ({copies} duplicate copies removed)",
                settings.topic
            );
            if n == 0 && !all {
                return Err(Error::invalid(
                    "message_id",
                    format!("no dead letter in {queue} has this message id"),
                ));
            }
        }
        DlqCommand::Purge { older_than } => {
            let before_ms = now_ms().saturating_sub(older_than.as_millis() as i64);
            let seen = walk_dead_letters(settings, usize::MAX, move |l| {
                if l.dead_lettered_at_ms < before_ms {
                    A::Drop
                } else {
                    A::Keep
                }
            })?;
            let n = seen.iter().filter(|(_, a)| *a == A::Drop).count();
            println!("purged {n} dead letters older than {older_than:?} from {queue}");
        }
    }
    Ok(())
}

fn backup(settings: &Settings, to: &std::path::Path) -> Result<()> {
    let store = Store::open(settings, false)?;
    let started = std::time::Instant::now();
    let copies = store.backup(to, |b| {
        println!(
            "copied {} for {} ({} bytes in {:.2}s)",
            crate::router::db_name(b.db),
            b.target.display(),
            b.bytes,
            b.took.as_secs_f64()
        );
        let _ = std::io::stdout().flush();
    })?;
    println!(
        "backup done: {} shards, {} bytes in {:.2}s; restore by pointing --data-dir at {}",
        copies.len(),
        copies.iter().map(|b| b.bytes).sum::<u64>(),
        started.elapsed().as_secs_f64(),
        to.display()
    );
    Ok(())
}

fn audit(settings: &Settings, older_than: Duration, json: bool) -> Result<()> {
    let store = Store::open(settings, false)?;
    let now = now_ms();
    let min_age = older_than.as_millis() as i64;
    let mut audits = Vec::new();
    for shard in store.shards() {
        audits.push(crate::audit::audit(
            &shard.audit_facts(settings.layout.tb_count())?,
            now,
        ));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&audits).expect("audits serialize")
        );
    } else {
        // The original's rows per state, as `completed=3 create=1` (`-`: none).
        let by_state = |m: &std::collections::BTreeMap<String, u64>| {
            if m.is_empty() {
                "-".to_string()
            } else {
                m.iter()
                    .map(|(s, n)| format!("{s}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        println!(
            "{:<14} {:>9} {:>9} {:>13} {:>9} {:>8} {:>11} {:>15} {:>15} | {:<22} {:<22}",
            "shard",
            "committed",
            "compacted",
            "delivered max",
            "delivered",
            "missing",
            "redelivered",
            "task w/o award",
            "award w/o task",
            "original tasks",
            "original awards"
        );
        for a in &audits {
            println!(
                "{:<14} {:>9} {:>9} {:>13} {:>9} {:>8} {:>11} {:>15} {:>15} | {:<22} {:<22}",
                crate::router::db_name(a.db),
                a.committed,
                a.watermark,
                a.delivered_max,
                a.delivered,
                a.missing.len(),
                a.redelivered.len(),
                a.tasks_without_award,
                a.awards_without_task,
                by_state(&a.original_tasks),
                by_state(&a.original_awards)
            );
            if !a.tasks_below_watermark.is_empty() {
                println!(
                    "  task rows at or below the watermark {}, which compaction never left: {:?}",
                    a.watermark, a.tasks_below_watermark
                );
            }
            let stuck = a.originals_stuck(min_age);
            if stuck > 0 {
                println!(
                    "  {stuck} of the original's tasks older than {older_than:?} never completed"
                );
            }
            for (seq, age) in a.missing.iter().take(20) {
                let age = age
                    .map(|ms| format!("{:.1}s old", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "task row gone".into());
                println!("  missing seq={seq} ({age})");
            }
            if !a.unknown.is_empty() {
                println!("  delivered but never committed: {:?}", a.unknown);
            }
        }
    }
    let broken: Vec<String> = audits
        .iter()
        .filter(|a| a.violated(min_age))
        .map(|a| crate::router::db_name(a.db))
        .collect();
    if broken.is_empty() {
        Ok(())
    } else {
        Err(Error::Violation(format!(
            "audit failed on {}: committed tasks (or the original's tasks) older than {older_than:?} were never delivered, or awards and tasks do not match",
            broken.join(", ")
        )))
    }
}
