//! The MySQL/MariaDB backend: one database per shard (`big_market_01` ... on one server, or one
//! URL per database), the original's tables plus big-market's columns (`schema.mysql.sql`).
//!
//! Each database has two write lanes (connections with a writer thread each): saves, and
//! everything else. A lane's group runs in one READ COMMITTED transaction. The hot ops of a group
//! go as multi-row statements, sent as two scripts (round trips): every award of the group takes
//! its sequence numbers with one update of the counter row (locked until the commit, so sequence
//! numbers stay gap-free across processes), inserts its records with one statement per split
//! table and its tasks with one more; deliveries are checked, logged and applied the same way,
//! with the relay's completions in the same transaction. When a multi-row statement is refused (a
//! duplicate order id), the group rolls back and runs again one op per savepoint, so that only
//! the guilty op fails. Claims use `FOR UPDATE SKIP LOCKED`: processes on several machines share
//! the backlog without waiting on each other or sending a task twice.

pub(crate) mod ceiling;
pub(crate) mod scratch;
pub(crate) mod sql;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{IsolationLevel, Pool, PooledConn, TxOpts};

use super::op::{Delivered, Op, Reply, SavedTask};
use super::{AwardRow, Batch, Opened, Reads, ShardStatus, TaskRow};
use crate::config::{MysqlDatabase, Settings};
use crate::error::{Error, Result};
use crate::model::{AwardRecord, EventMessage, MessageId, TaskState};
use crate::router::award_table;

/// Times a group is run again after the server broke a deadlock by rolling it back.
const DEADLOCK_RETRIES: usize = 3;

/// Columns each table must have (the original's and ours); a database whose tables lack one was
/// made by something else, and is refused.
fn expected_columns(table: &str) -> &'static [&'static str] {
    match table {
        "shard_meta" => &[
            "id",
            "schema_version",
            "db_idx",
            "db_count",
            "tb_count",
            "next_seq",
        ],
        "task" => &[
            "id",
            "user_id",
            "topic",
            "message_id",
            "message",
            "state",
            "create_time",
            "update_time",
            "seq",
            "attempts",
            "next_attempt_at",
            "claimed_by",
            "last_error",
        ],
        "delivery" => &["message_id", "seq", "order_id", "receipts", "delivered_at"],
        _ => &[
            "id",
            "user_id",
            "activity_id",
            "strategy_id",
            "order_id",
            "award_id",
            "award_title",
            "award_time",
            "award_state",
            "create_time",
            "update_time",
        ],
    }
}

/// Open (with `create`: create what is missing of) every database of the target.
pub(crate) fn open_all(
    settings: &Settings,
    dbs: &[MysqlDatabase],
    create: bool,
) -> Result<Vec<Opened>> {
    // Check every database before changing any: a refused layout touches nothing.
    let mut plans = Vec::with_capacity(dbs.len());
    for (i, d) in dbs.iter().enumerate() {
        plans.push(check(settings, i as u32 + 1, d, create)?);
    }
    let mut out = Vec::with_capacity(dbs.len());
    for ((i, d), missing) in dbs.iter().enumerate().zip(plans) {
        out.push(open_one(settings, i as u32 + 1, d, missing)?);
    }
    Ok(out)
}

/// The driver's options for a database of `--store`: its URL, parsed by the driver (which
/// knows its query parameters). Errors never repeat the URL: it may hold a password.
pub(crate) fn opts(d: &MysqlDatabase) -> Result<mysql::Opts> {
    mysql::Opts::from_url(d.secret_url()).map_err(|e| {
        let why = match e {
            mysql::UrlError::ParseError(p) => p.to_string(),
            mysql::UrlError::UnsupportedScheme(_) => "unsupported scheme".into(),
            mysql::UrlError::UnknownParameter(p) => format!("unknown parameter {p}"),
            mysql::UrlError::InvalidValue(p, _) => format!("invalid value for {p}"),
            mysql::UrlError::FeatureRequired(f, p) => format!("{p} needs the {f} feature"),
            _ => "malformed".into(),
        };
        Error::Config(format!(
            "the URL of --store for {} is not valid ({why}): see https://docs.rs/mysql for its parameters",
            d.shown
        ))
    })
}

/// A pool of sessions in READ COMMITTED (no gap locks between processes' claims and inserts),
/// utf8mb4 (the scripts' literals are escaped for it), that wait at most `busy` for a row lock
/// another process holds (as SQLite's busy timeout), at least a second.
fn pool(d: &MysqlDatabase, with_db: bool, max: usize, busy: Duration) -> Result<Pool> {
    let mut b = mysql::OptsBuilder::from_opts(opts(d)?)
        .tcp_connect_timeout(Some(Duration::from_secs(10)))
        .stmt_cache_size(Some(512))
        .init(vec![
            "SET NAMES utf8mb4".to_string(),
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_string(),
            format!(
                "SET SESSION innodb_lock_wait_timeout = {}",
                busy.as_secs().clamp(1, 3600)
            ),
        ])
        .pool_opts(
            mysql::PoolOpts::default()
                .with_constraints(mysql::PoolConstraints::new(1, max).expect("1 <= max")),
        );
    if !with_db {
        b = b.db_name(None::<String>);
    }
    Pool::new(b).map_err(|e| Error::storage(format!("connecting to {}", d.shown), e))
}

/// What `open_one` must create: nothing, the tables, or the database and its tables.
#[derive(Debug, PartialEq)]
enum Missing {
    Nothing,
    Tables,
    Database,
}

/// `check`'s verdict on a database.
struct Plan {
    missing: Missing,
    /// big-market's columns to add to the original's `task` table.
    add_to_task: Vec<&'static str>,
}

fn check(settings: &Settings, db: u32, d: &MysqlDatabase, create: bool) -> Result<Plan> {
    let ctx = |what: &str| format!("{what} {}", d.shown);
    let server = pool(d, false, 1, settings.busy_timeout)?;
    let mut conn = server
        .get_conn()
        .map_err(|e| Error::storage(ctx("connecting to"), e))?;
    let exists: Option<String> = conn
        .exec_first(
            "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name = ?",
            (&d.name,),
        )
        .map_err(|e| Error::storage(ctx("looking up"), e))?;
    let version: Option<String> = conn
        .query_first("SELECT VERSION()")
        .map_err(|e| Error::storage(ctx("reading the server version of"), e))?;
    check_server_version(version.as_deref().unwrap_or(""), &d.shown)?;
    if exists.is_none() {
        if !create {
            return Err(Error::Config(format!(
                "database {} does not exist: run `big-market init` with the same --store, --db-count and --tb-count first",
                d.shown
            )));
        }
        return Ok(Plan {
            missing: Missing::Database,
            add_to_task: Vec::new(),
        });
    }
    conn.query_drop(format!("USE `{}`", d.name))
        .map_err(|e| Error::storage(ctx("opening"), e))?;
    let mut tables: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for (t, c) in
        sql::columns(&mut conn).map_err(|e| Error::storage(ctx("reading the tables of"), e))?
    {
        tables.entry(t).or_default().insert(c);
    }
    let layout = settings.layout;
    let ours: Vec<String> = ["shard_meta", "task", "delivery"]
        .into_iter()
        .map(String::from)
        .chain((0..layout.tb_count()).map(award_table))
        .collect();
    let mut missing_tables = Vec::new();
    let mut add_to_task = Vec::new();
    for t in &ours {
        match tables.get(t) {
            None => missing_tables.push(t.clone()),
            Some(cols) => {
                let lacking: Vec<&'static str> = expected_columns(t)
                    .iter()
                    .copied()
                    .filter(|c| !cols.contains(*c))
                    .collect();
                // The original's task table (the Java service's database): it lacks only
                // big-market's own columns, which `init` adds with their defaults.
                let originals = t == "task"
                    && lacking
                        .iter()
                        .all(|c| sql::TASK_COLUMNS_ADDED.iter().any(|(name, _)| name == c));
                if !lacking.is_empty() && originals && create {
                    add_to_task = lacking;
                } else if !lacking.is_empty() && originals {
                    return Err(Error::Config(format!(
                        "{}: the task table is the original's, without big-market's columns {}: run `big-market init` to add them (with defaults, so the original's statements keep working)",
                        d.shown,
                        lacking.join(", ")
                    )));
                } else if !lacking.is_empty() {
                    return Err(Error::Config(format!(
                        "{}: table {t} lacks the columns {} that big-market needs: it was made by something else; use another database",
                        d.shown,
                        lacking.join(", ")
                    )));
                }
            }
        }
    }
    // A split table beyond the layout means the database was made for another --tb-count.
    if tables.contains_key(&award_table(layout.tb_count())) {
        return Err(Error::Config(format!(
            "{} holds {}, which a layout of {} tables does not have: pass the --tb-count it was made with",
            d.shown,
            award_table(layout.tb_count()),
            layout.tb_count()
        )));
    }
    if tables.contains_key("shard_meta") {
        let meta = sql::shard_meta(&mut conn)
            .map_err(|e| Error::storage(ctx("reading the layout of"), e))?;
        let Some((version, file_db, dbs, tbs)) = meta else {
            return Err(Error::Config(format!(
                "{} has an empty shard_meta table: it was not made by `big-market init`; use another database",
                d.shown
            )));
        };
        if version != sql::SCHEMA_VERSION {
            return Err(Error::Config(format!(
                "{} has schema version {version}, this build reads version {}: use the big-market that made it",
                d.shown,
                sql::SCHEMA_VERSION
            )));
        }
        if (file_db, dbs, tbs) != (db, layout.db_count(), layout.tb_count()) {
            return Err(Error::Config(format!(
                "{} was created as database {file_db:02} of a {dbs} x {tbs} layout, but this run uses it as {db:02} of {} x {}: pass --db-count {dbs} --tb-count {tbs}, or another --store",
                d.shown,
                layout.db_count(),
                layout.tb_count()
            )));
        }
    }
    if missing_tables.is_empty() && add_to_task.is_empty() {
        return Ok(Plan {
            missing: Missing::Nothing,
            add_to_task,
        });
    }
    if !create {
        return Err(Error::Config(format!(
            "database {} lacks the tables {}: run `big-market init` with the same --store, --db-count and --tb-count first",
            d.shown,
            missing_tables.join(", ")
        )));
    }
    Ok(Plan {
        missing: Missing::Tables,
        add_to_task,
    })
}

/// Refuse servers without `SKIP LOCKED` (MariaDB before 10.6, MySQL before 8.0).
fn check_server_version(version: &str, shown: &str) -> Result<()> {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let maria = version.to_ascii_lowercase().contains("mariadb");
    let ok = if maria {
        (major, minor) >= (10, 6)
    } else {
        major >= 8
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{shown} runs {version}: big-market needs MySQL 8.0 or MariaDB 10.6 or newer (for SELECT ... FOR UPDATE SKIP LOCKED)"
        )))
    }
}

fn open_one(settings: &Settings, db: u32, d: &MysqlDatabase, plan: Plan) -> Result<Opened> {
    let ctx = |what: &str| format!("{what} {}", d.shown);
    let layout = settings.layout;
    let missing = plan.missing;
    if missing == Missing::Database {
        let server = pool(d, false, 1, settings.busy_timeout)?;
        let mut conn = server
            .get_conn()
            .map_err(|e| Error::storage(ctx("connecting to"), e))?;
        conn.query_drop(format!(
            "CREATE DATABASE IF NOT EXISTS `{}` DEFAULT CHARACTER SET utf8mb4",
            d.name
        ))
        .map_err(|e| Error::storage(ctx("creating"), e))?;
    }
    let pool = pool(d, true, LANES + 4, settings.busy_timeout)?;
    if missing != Missing::Nothing {
        let mut conn = pool
            .get_conn()
            .map_err(|e| Error::storage(ctx("connecting to"), e))?;
        if !plan.add_to_task.is_empty() {
            sql::add_task_columns(&mut conn, &plan.add_to_task).map_err(|e| {
                Error::storage(ctx("adding big-market's columns to the task table of"), e)
            })?;
            log::info!(
                "added {} to the original's task table in {}",
                plan.add_to_task.join(", "),
                d.shown
            );
        }
        sql::apply_schema(&mut conn, db, layout.db_count(), layout.tb_count())
            .map_err(|e| Error::storage(ctx("creating the schema in"), e))?;
        log::info!(
            "created shard {} db={db:02} tables={}",
            d.shown,
            layout.tb_count()
        );
    }
    // A multi-row insert's ids are consecutive only in InnoDB's lock modes 0 and 1, and only
    // with an increment of 1 (multi-primary setups use more).
    let autoinc: Option<(u32, u32)> = pool
        .get_conn()
        .and_then(|mut c| {
            c.query_first("SELECT @@innodb_autoinc_lock_mode, @@auto_increment_increment")
        })
        .map_err(|e| Error::storage(ctx("reading the auto-increment mode of"), e))?;
    let consecutive_ids = matches!(autoinc, Some((0 | 1, 1)));
    let mut lanes: Vec<Box<dyn Batch>> = Vec::with_capacity(LANES);
    for lane in 0..LANES {
        let conn = pool
            .get_conn()
            .map_err(|e| Error::storage(ctx("connecting to"), e))?;
        lanes.push(Box::new(MysqlBatch {
            db,
            shown: d.shown.clone(),
            pool: pool.clone(),
            conn: Some(conn),
            consecutive_ids,
            linger: if lane == 0 { Duration::ZERO } else { LINGER },
        }));
    }
    Ok(Opened {
        location: d.shown.clone(),
        reads: Box::new(MysqlReads {
            shown: d.shown.clone(),
            pool,
        }),
        lanes,
        lane_of,
    })
}

/// Write lanes per database: saves commit on a connection of their own, deliveries and the
/// relay's bookkeeping on another, so that a caller's save never waits behind the statements
/// and commit of a delivery group (a MySQL server runs transactions of several connections at
/// once; SQLite could not). They touch different rows: saves insert; deliveries update award
/// records and the delivery log, the relay updates task rows committed before it saw them. (A
/// third lane, deliveries apart from the relay, measured no faster: every lane's commit is one
/// more fsync.)
const LANES: usize = 2;

/// How long the second lane gathers ops before it runs a small group. Nobody waits on its
/// groups the way a caller waits on a save, and on MySQL every group has a fixed cost on the
/// server (statements, a commit): gathering for 5 ms took `bench` from 5,649 to 6,869 awards/s at
/// 16 callers, with save p50 2.66 -> 2.26 ms (10 and 20 ms measured no better).
const LINGER: Duration = Duration::from_millis(5);

fn lane_of(op: &Op) -> usize {
    match op {
        Op::SaveAward { .. } => 0,
        _ => 1,
    }
}

/// The reads of one database, through its pool.
struct MysqlReads {
    shown: String,
    pool: Pool,
}

impl MysqlReads {
    fn conn(&self) -> Result<PooledConn> {
        self.pool
            .get_conn()
            .map_err(|e| Error::storage(format!("connecting to {}", self.shown), e))
    }

    fn err(&self, what: &str) -> impl Fn(mysql::Error) -> Error + '_ {
        let context = format!("{what} in {}", self.shown);
        move |e| Error::storage(context.clone(), e)
    }
}

impl Reads for MysqlReads {
    fn ping(&self) -> Result<()> {
        sql::last_seq(&mut self.conn()?)
            .map(|_| ())
            .map_err(self.err("reading"))
    }

    fn leased_tasks(&self, owner: &str, from: u64, to: u64, limit: usize) -> Result<Vec<TaskRow>> {
        sql::leased_in_range(&mut self.conn()?, owner, from, to, limit)
            .map_err(self.err("reading back handed-off tasks"))
    }

    fn task_state(&self, message_id: &str) -> Result<Option<String>> {
        sql::task_state(&mut self.conn()?, message_id).map_err(self.err("reading a task"))
    }

    fn status(&self, db: u32, tb_count: u32) -> Result<ShardStatus> {
        let mut conn = self.conn()?;
        let tasks = sql::count_tasks_by_state(&mut conn)
            .map_err(self.err("counting tasks"))?
            .into_iter()
            .collect();
        let mut awards = BTreeMap::new();
        for t in 0..tb_count {
            for (state, n) in sql::count_awards_by_state(&mut conn, &award_table(t))
                .map_err(self.err("counting award records"))?
            {
                *awards.entry(state).or_insert(0) += n;
            }
        }
        let oldest_pending_ms =
            sql::oldest_pending(&mut conn).map_err(self.err("finding the oldest pending task"))?;
        let (delivered_messages, receipts) =
            sql::delivery_totals(&mut conn).map_err(self.err("counting deliveries"))?;
        let last_seq = sql::last_seq(&mut conn).map_err(self.err("reading the task sequence"))?;
        Ok(ShardStatus {
            db,
            location: self.shown.clone(),
            tasks,
            awards,
            oldest_pending_ms,
            delivered_messages,
            receipts,
            last_seq,
        })
    }

    fn audit_facts(&self, db: u32, tb_count: u32) -> Result<crate::audit::Facts> {
        let mut conn = self.conn()?;
        let e = self.err("reading audit facts");
        let mut tx = conn
            .start_transaction(
                TxOpts::default()
                    .set_isolation_level(Some(IsolationLevel::RepeatableRead))
                    .set_with_consistent_snapshot(true)
                    .set_access_mode(Some(mysql::AccessMode::ReadOnly)),
            )
            .map_err(&e)?;
        let mut awards = Vec::new();
        for t in 0..tb_count {
            awards.extend(sql::award_orders(&mut tx, &award_table(t)).map_err(&e)?);
        }
        Ok(crate::audit::Facts {
            db,
            last_seq: sql::last_seq(&mut tx).map_err(&e)?,
            delivered: sql::delivered_seqs(&mut tx).map_err(&e)?,
            tasks: sql::task_orders(&mut tx).map_err(&e)?,
            delivered_orders: sql::delivered_orders(&mut tx).map_err(&e)?,
            award_orders: awards,
        })
    }

    fn list_tasks(&self, state: Option<TaskState>, limit: usize) -> Result<Vec<TaskRow>> {
        sql::list_tasks(&mut self.conn()?, state, limit).map_err(self.err("listing tasks"))
    }

    fn awards_of(&self, table: &str, user: &str, limit: usize) -> Result<Vec<AwardRow>> {
        sql::awards_of_user(&mut self.conn()?, table, user, limit)
            .map_err(self.err("listing a user's awards"))
    }
}

/// The writes of one database, on the writer thread's own connection (taken again from the
/// pool after the server dropped it).
struct MysqlBatch {
    db: u32,
    shown: String,
    pool: Pool,
    conn: Option<PooledConn>,
    /// Multi-row inserts get consecutive auto-increment ids (InnoDB lock mode 0 or 1).
    consecutive_ids: bool,
    /// How long the lane gathers ops before a group smaller than the maximum.
    linger: Duration,
}

/// Why a group did not commit.
enum GroupError {
    /// The server rolled the transaction back to break a deadlock: run it again.
    Deadlock(mysql::Error),
    /// Anything else: every op of the group fails with it.
    Failed(mysql::Error),
}

impl From<mysql::Error> for GroupError {
    fn from(e: mysql::Error) -> Self {
        if server_code(&e) == Some(1213) {
            GroupError::Deadlock(e)
        } else {
            GroupError::Failed(e)
        }
    }
}

fn server_code(e: &mysql::Error) -> Option<u16> {
    match e {
        mysql::Error::MySqlError(m) => Some(m.code),
        _ => None,
    }
}

/// Whether the server refused one statement for its data (a duplicate key, a value too long):
/// the op is at fault, not the connection or the transaction.
fn refused_for_data(e: &mysql::Error) -> bool {
    matches!(server_code(e), Some(code) if code != 1213 && code != 1205 && code != 1180 && code != 1181)
}

impl Batch for MysqlBatch {
    fn linger(&self) -> Duration {
        self.linger
    }

    fn run_batch(&mut self, ops: &[&Op]) -> Vec<Result<Reply>> {
        let mut last = None;
        for _ in 0..=DEADLOCK_RETRIES {
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => match self.pool.get_conn() {
                    Ok(c) => c,
                    Err(e) => return self.fail_all(ops, &e),
                },
            };
            let started = std::time::Instant::now();
            let outcome = run_group(self.db, conn.as_mut(), ops, self.consecutive_ids);
            log::trace!(
                "group db={:02} lane={} ops={} ok={} us={}",
                self.db,
                ops.first().map_or(0, |o| lane_of(o)),
                ops.len(),
                outcome.is_ok(),
                started.elapsed().as_micros()
            );
            let failure = match outcome {
                Ok(results) => {
                    self.conn = Some(conn);
                    return results;
                }
                Err(failure) => failure,
            };
            // Whatever the failure left open is not kept; a connection that cannot even roll
            // back, or that failed mid-group, is not used again.
            let usable = conn.query_drop("ROLLBACK").is_ok();
            match failure {
                GroupError::Deadlock(e) if usable => {
                    log::debug!(
                        "group on {} rolled back by a deadlock, running it again",
                        self.shown
                    );
                    self.conn = Some(conn);
                    last = Some(e);
                }
                GroupError::Deadlock(e) | GroupError::Failed(e) => {
                    if usable && !e.is_connectivity_error() {
                        self.conn = Some(conn);
                    }
                    return self.fail_all(ops, &e);
                }
            }
        }
        let e = last.expect("a deadlock was recorded");
        self.fail_all(ops, &e)
    }
}

impl MysqlBatch {
    fn fail_all(&self, ops: &[&Op], e: &mysql::Error) -> Vec<Result<Reply>> {
        ops.iter()
            .map(|_| {
                Err(Error::storage(
                    format!("writing to {} (nothing of this write was kept)", self.shown),
                    copy_err(e),
                ))
            })
            .collect()
    }
}

/// mysql errors are not `Clone`; a failed group is reported to every op of it.
fn copy_err(e: &mysql::Error) -> mysql::Error {
    match e {
        mysql::Error::MySqlError(m) => mysql::Error::MySqlError(m.clone()),
        other => mysql::Error::IoError(std::io::Error::other(other.to_string())),
    }
}

/// What a group's multi-row statements need to know.
struct GroupCtx {
    db: u32,
    /// The session has `NO_BACKSLASH_ESCAPES`.
    nbe: bool,
    frame: sql::Frame,
    /// Multi-row inserts get consecutive auto-increment ids.
    consecutive_ids: bool,
}

/// Run one group in one transaction. `Ok` holds one result per op (some may be the op's own
/// error); `Err` means nothing was committed (the caller rolls the connection back).
///
/// A group of one kind (the save lane's, the delivery lane's) is its own transaction: its two
/// scripts begin and commit it, two round trips in all. Otherwise, or when the server refuses
/// a multi-row statement for its data, the group runs in an explicit transaction with each
/// kind under a savepoint, and op by op where it must.
fn run_group(
    db: u32,
    conn: &mut mysql::Conn,
    ops: &[&Op],
    consecutive_ids: bool,
) -> std::result::Result<Vec<Result<Reply>>, GroupError> {
    let ctx = |frame| GroupCtx {
        db,
        nbe: conn.no_backslash_escape(),
        frame,
        consecutive_ids,
    };
    let (as_tx, in_tx) = (ctx(sql::Frame::Transaction), ctx(sql::Frame::Savepoint));
    let alone: Option<GroupFn> = if ops.iter().all(|o| matches!(o, Op::SaveAward { .. })) {
        Some(save_awards)
    } else if ops
        .iter()
        .all(|o| matches!(o, Op::Deliver { .. } | Op::MarkCompleted { .. }))
    {
        Some(deliver_all)
    } else {
        None
    };
    let mut together_ok = true;
    if let Some(run) = alone {
        match run(conn, &as_tx, ops) {
            Ok(Some(replies)) => return Ok(replies),
            Ok(None) => {}
            Err(e) => {
                // The server stopped at the failing statement, before the COMMIT.
                conn.query_drop("ROLLBACK")?;
                if !refused_for_data(&e) {
                    return Err(e.into());
                }
                log::debug!(
                    "multi-row statement refused ({e}); running the group's ops one by one"
                );
                together_ok = false;
            }
        }
    }
    conn.query_drop("START TRANSACTION")?;
    let mut results: Vec<Option<Result<Reply>>> = ops.iter().map(|_| None).collect();
    if together_ok {
        for (kind, run) in [(0, save_awards as GroupFn), (1, deliver_all as GroupFn)] {
            let idx: Vec<usize> = (0..ops.len())
                .filter(|i| match ops[*i] {
                    Op::SaveAward { .. } => kind == 0,
                    Op::Deliver { .. } => kind == 1,
                    _ => false,
                })
                .collect();
            if !idx.is_empty() {
                together(conn, &in_tx, ops, &idx, &mut results, run)?;
            }
        }
    }
    for (i, op) in ops.iter().enumerate() {
        if results[i].is_none() {
            results[i] = Some(one_op(conn, db, op)?);
        }
    }
    crate::crash::hit(crate::crash::Point::MidGroupCommit);
    conn.query_drop("COMMIT")?;
    Ok(results
        .into_iter()
        .map(|r| r.expect("every op has a result"))
        .collect())
}

/// Run ops of one kind with multi-row statements under the savepoint `together` (which `run`
/// opens and releases); if the server refuses one for its data, roll back to the savepoint and
/// leave them to `one_op`.
fn together(
    tx: &mut mysql::Conn,
    ctx: &GroupCtx,
    ops: &[&Op],
    idx: &[usize],
    results: &mut [Option<Result<Reply>>],
    run: GroupFn,
) -> std::result::Result<(), GroupError> {
    let group: Vec<&Op> = idx.iter().map(|i| ops[*i]).collect();
    match run(tx, ctx, &group) {
        Ok(Some(replies)) => {
            for (i, r) in idx.iter().zip(replies) {
                results[*i] = Some(r);
            }
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) if refused_for_data(&e) => {
            log::debug!("multi-row statement refused ({e}); running the group's ops one by one");
            tx.query_drop("ROLLBACK TO SAVEPOINT together")?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

type Sql<T> = sql::Sql<T>;

/// Runs ops of one kind together; `None` leaves them to be run one by one.
type GroupFn = fn(&mut mysql::Conn, &GroupCtx, &[&Op]) -> Sql<Option<Vec<Result<Reply>>>>;

/// Run one op under its own savepoint; an error the op caused rolls back only the op.
fn one_op(
    tx: &mut mysql::Conn,
    db: u32,
    op: &Op,
) -> std::result::Result<Result<Reply>, GroupError> {
    // One statement is atomic by itself: it needs no savepoint of its own.
    let single = matches!(
        op,
        Op::MarkCompleted { .. }
            | Op::Release { .. }
            | Op::Requeue { .. }
            | Op::Purge { .. }
            | Op::Barrier
    );
    if single {
        return match apply(tx, db, op) {
            Ok(reply) => Ok(Ok(reply)),
            Err(OpError::Op(e)) => Ok(Err(e)),
            Err(OpError::Server(e)) if refused_for_data(&e) => Ok(Err(Error::storage(
                format!("writing to shard big_market_{db:02}"),
                e,
            ))),
            Err(OpError::Server(e)) => Err(e.into()),
        };
    }
    tx.query_drop("SAVEPOINT one")?;
    match apply(tx, db, op) {
        Ok(reply) => {
            tx.query_drop("RELEASE SAVEPOINT one")?;
            Ok(Ok(reply))
        }
        Err(OpError::Op(e)) => {
            tx.query_drop("ROLLBACK TO SAVEPOINT one")?;
            Ok(Err(e))
        }
        Err(OpError::Server(e)) if refused_for_data(&e) => {
            tx.query_drop("ROLLBACK TO SAVEPOINT one")?;
            Ok(Err(Error::storage(
                format!("writing to shard big_market_{db:02}"),
                e,
            )))
        }
        Err(OpError::Server(e)) => Err(e.into()),
    }
}

enum OpError {
    /// The op's own failure (a duplicate order id, a message naming no award).
    Op(Error),
    /// The server's: the op's statement, or the whole group, failed.
    Server(mysql::Error),
}

impl From<mysql::Error> for OpError {
    fn from(e: mysql::Error) -> Self {
        OpError::Server(e)
    }
}

fn is_duplicate(e: &mysql::Error) -> bool {
    server_code(e) == Some(1062)
}

/// What saving one award needs.
pub(crate) struct SaveArgs<'a> {
    pub(crate) record: &'a AwardRecord,
    pub(crate) table: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) owner: &'a str,
    pub(crate) lease_until_ms: i64,
    pub(crate) now_ms: i64,
}

fn save_args(op: &Op) -> SaveArgs<'_> {
    match op {
        Op::SaveAward {
            record,
            table,
            topic,
            owner,
            lease_until_ms,
            now_ms,
        } => SaveArgs {
            record,
            table,
            topic,
            owner,
            lease_until_ms: *lease_until_ms,
            now_ms: *now_ms,
        },
        other => unreachable!("not a save: {other:?}"),
    }
}

/// The awards of `args` numbered from `first`: each one's sequence number, message id and
/// message, the task rows that carry them, and (given the tasks' ids) the replies.
pub(crate) struct Numbered<'a> {
    args: &'a [SaveArgs<'a>],
    db: u32,
    pub(crate) messages: Vec<(u64, MessageId, String)>,
}

impl<'a> Numbered<'a> {
    pub(crate) fn new(db: u32, args: &'a [SaveArgs<'a>], first: u64) -> Self {
        let messages = args
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let seq = first + i as u64;
                let body = EventMessage::for_award(a.record, db, seq, a.now_ms).encode();
                (seq, MessageId::new(db, seq), body)
            })
            .collect();
        Numbered { args, db, messages }
    }

    pub(crate) fn task_rows(&self) -> Vec<sql::NewTask<'_>> {
        self.args
            .iter()
            .zip(&self.messages)
            .map(|(a, (seq, id, body))| sql::NewTask {
                user_id: a.record.user_id.as_str(),
                topic: a.topic,
                message_id: id.as_str(),
                message: body,
                seq: *seq,
                owner: a.owner,
                lease_until_ms: a.lease_until_ms,
            })
            .collect()
    }

    fn saved(self, ids: Vec<i64>) -> Vec<Reply> {
        let db = self.db;
        self.args
            .iter()
            .zip(self.messages)
            .zip(ids)
            .map(|((a, (seq, message_id, message)), id)| {
                Reply::Saved(SavedTask {
                    id,
                    db,
                    seq,
                    message_id,
                    topic: a.topic.to_string(),
                    message,
                    lease_until_ms: a.lease_until_ms,
                })
            })
            .collect()
    }
}

/// Save every award of the group with one counter update, one insert per split table and one
/// for the tasks. `None`: the group repeats an order id; the ops run one by one instead.
fn save_awards(
    tx: &mut mysql::Conn,
    ctx: &GroupCtx,
    ops: &[&Op],
) -> Sql<Option<Vec<Result<Reply>>>> {
    let db = ctx.db;
    let args: Vec<SaveArgs<'_>> = ops.iter().map(|op| save_args(op)).collect();
    let mut orders = HashSet::new();
    if !args
        .iter()
        .all(|a| orders.insert(a.record.order_id.as_str()))
    {
        return Ok(None);
    }
    // Round trip 1: the frame and the sequence numbers (the messages carry them).
    let first = sql::group_take_seqs(tx, ctx.nbe, ctx.frame, args.len() as u64)?;
    let mut by_table: BTreeMap<&str, Vec<sql::NewAward<'_>>> = BTreeMap::new();
    for a in &args {
        by_table
            .entry(a.table)
            .or_default()
            .push(sql::NewAward::of(a.record));
    }
    let now_ms = args[0].now_ms;
    let numbered = Numbered::new(db, &args, first);
    let rows = numbered.task_rows();
    // Round trip 2: every row, the task ids, the frame closed (committed, as its own
    // transaction).
    if ctx.frame == sql::Frame::Transaction {
        crate::crash::hit(crate::crash::Point::MidGroupCommit);
    }
    let ids = sql::group_insert(
        tx,
        ctx.nbe,
        ctx.frame,
        ctx.consecutive_ids,
        &by_table,
        &rows,
        now_ms,
    )?;
    drop(rows);
    Ok(Some(numbered.saved(ids).into_iter().map(Ok).collect()))
}

/// Deliver every message of the group in two round trips: the look-up of their awards and of
/// the delivery log, then the log's inserts and the awards' updates.
fn deliver_all(
    tx: &mut mysql::Conn,
    ctx: &GroupCtx,
    ops: &[&Op],
) -> Sql<Option<Vec<Result<Reply>>>> {
    let db = ctx.db;
    // The relay's completions ride along in the same transaction (the delivery lane's groups
    // hold both).
    let marks: Vec<sql::Marks<'_>> = ops
        .iter()
        .filter_map(|op| match op {
            Op::MarkCompleted { ids, owner, now_ms } => Some(sql::Marks {
                ids,
                owner: Some(owner),
                now_ms: *now_ms,
            }),
            _ => None,
        })
        .collect();
    let msgs: Vec<(&EventMessage, &str, i64)> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Deliver { msg, table, now_ms } => Some((msg, table.as_str(), *now_ms)),
            Op::MarkCompleted { .. } => None,
            other => unreachable!("not a delivery or a completion: {other:?}"),
        })
        .collect();
    if msgs.is_empty() {
        if ctx.frame != sql::Frame::Transaction {
            return Ok(None);
        }
        crate::crash::hit(crate::crash::Point::MidGroupCommit);
        let counts = sql::group_marks(tx, ctx.nbe, &marks)?;
        return Ok(Some(
            counts.into_iter().map(|n| Ok(Reply::Count(n))).collect(),
        ));
    }
    let mut by_table: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (m, table, _) in &msgs {
        by_table.entry(table).or_default().push(&m.data.order_id);
    }
    let ids: Vec<&str> = msgs.iter().map(|(m, _, _)| m.id.as_str()).collect();
    let (found, logged) = sql::group_lookup(tx, ctx.nbe, ctx.frame, &by_table, &ids)?;
    let owners: HashSet<(String, String, String)> = found.into_iter().collect();
    let mut logged: HashSet<String> = logged.into_iter().collect();
    let now_ms = msgs[0].2;
    let mut results = Vec::with_capacity(msgs.len());
    let mut firsts: Vec<(&str, u64, &str)> = Vec::new();
    let mut again: Vec<&str> = Vec::new();
    let mut complete: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (m, table, _) in &msgs {
        let d = &m.data;
        let key = (table.to_string(), d.order_id.clone(), d.user_id.clone());
        if !owners.contains(&key) {
            results.push(Err(poison(m, table, db)));
            continue;
        }
        if logged.insert(m.id.clone()) {
            firsts.push((&m.id, m.seq.unwrap_or(0), &d.order_id));
            complete.entry(table).or_default().push(&d.order_id);
            results.push(Ok(Reply::Delivered(Delivered::First)));
        } else {
            again.push(&m.id);
            results.push(Ok(Reply::Delivered(Delivered::Again)));
        }
    }
    if ctx.frame == sql::Frame::Transaction {
        crate::crash::hit(crate::crash::Point::MidGroupCommit);
    }
    let counts = sql::group_deliver(
        tx, ctx.nbe, ctx.frame, &firsts, &again, &complete, &marks, now_ms,
    )?;
    // One result per op, in the order of `ops`.
    let mut delivered = results.into_iter();
    let mut counted = counts.into_iter();
    Ok(Some(
        ops.iter()
            .map(|op| match op {
                Op::MarkCompleted { .. } => Ok(Reply::Count(counted.next().unwrap_or(0))),
                _ => delivered.next().expect("one result per delivery"),
            })
            .collect(),
    ))
}

fn poison(m: &EventMessage, table: &str, db: u32) -> Error {
    Error::Poison(format!(
        "message {} names user {} order {}, which has no award record in big_market_{db:02}.{table}",
        m.id, m.data.user_id, m.data.order_id
    ))
}

/// One op, one statement at a time (the slow path, and every op that is not hot).
fn apply(tx: &mut mysql::Conn, db: u32, op: &Op) -> std::result::Result<Reply, OpError> {
    match op {
        Op::SaveAward { .. } => {
            let a = save_args(op);
            if let Err(e) =
                sql::insert_awards(tx, a.table, &[sql::NewAward::of(a.record)], a.now_ms)
            {
                return Err(if is_duplicate(&e) {
                    OpError::Op(Error::DuplicateOrder {
                        order_id: a.record.order_id.as_str().to_string(),
                    })
                } else {
                    e.into()
                });
            }
            let seq = sql::take_seqs(tx, 1)?;
            let one = [a];
            let numbered = Numbered::new(db, &one, seq);
            let ids = sql::insert_tasks(tx, &numbered.task_rows(), one[0].now_ms)?;
            Ok(numbered.saved(ids).pop().expect("one reply"))
        }
        Op::MarkCompleted { ids, owner, now_ms } => Ok(Reply::Count(sql::mark_completed(
            tx,
            ids,
            Some(owner),
            *now_ms,
        )?)),
        Op::MarkFailed {
            failures,
            owner,
            now_ms,
        } => {
            let mut n = 0;
            for f in failures {
                n += sql::mark_failed(
                    tx,
                    f.id,
                    owner,
                    f.state,
                    f.attempts,
                    f.next_attempt_at,
                    &f.error,
                    *now_ms,
                )?;
            }
            Ok(Reply::Count(n))
        }
        Op::Claim {
            owner,
            limit,
            lease_until_ms,
            now_ms,
        } => Ok(Reply::Claimed(sql::claim_due(
            tx,
            owner,
            *now_ms,
            *lease_until_ms,
            *limit,
        )?)),
        Op::Renew {
            ids,
            owner,
            lease_until_ms,
            now_ms,
        } => {
            let mut renewed = Vec::with_capacity(ids.len());
            for id in ids {
                if sql::renew_lease(tx, *id, owner, *lease_until_ms, *now_ms)? == 1 {
                    renewed.push(*id);
                }
            }
            Ok(Reply::Renewed(renewed))
        }
        Op::Release { owner, now_ms } => Ok(Reply::Count(sql::release_claims(tx, owner, *now_ms)?)),
        Op::Deliver { msg, table, now_ms } => {
            let d = &msg.data;
            if !sql::award_exists(tx, table, &d.user_id, &d.order_id)? {
                return Err(OpError::Op(poison(msg, table, db)));
            }
            let first =
                sql::record_delivery(tx, &msg.id, msg.seq.unwrap_or(0), &d.order_id, *now_ms)?;
            if !first {
                return Ok(Reply::Delivered(Delivered::Again));
            }
            sql::complete_awards(tx, table, &[&d.order_id], *now_ms)?;
            Ok(Reply::Delivered(Delivered::First))
        }
        Op::Requeue {
            message_id,
            state,
            now_ms,
        } => Ok(Reply::Count(sql::requeue(
            tx,
            message_id.as_deref(),
            *state,
            *now_ms,
        )?)),
        Op::Barrier => Ok(Reply::Count(0)),
        Op::Purge { before_ms } => Ok(Reply::Count(sql::purge_completed(tx, *before_ms)?)),
    }
}

/// The driver's errors, with what to do about each: only this backend knows their codes.
impl From<mysql::Error> for crate::error::StorageError {
    fn from(e: mysql::Error) -> Self {
        let (hint, full) = match &e {
            mysql::Error::MySqlError(m) if m.code == 1213 => {
                (" (a deadlock between processes: retry)", false)
            }
            mysql::Error::MySqlError(m) if m.code == 1205 => {
                (" (another process held a row lock too long: retry)", false)
            }
            mysql::Error::MySqlError(m) if m.code == 1114 || m.code == 1021 => (
                " (the MySQL server is out of space: free space, e.g. `big-market tasks purge --older-than 7d`, and retry)",
                true,
            ),
            mysql::Error::MySqlError(m) if m.code == 1045 || m.code == 1044 || m.code == 1142 => {
                (" (check the user and password of --store and the user's grants)", false)
            }
            e if e.is_connectivity_error() => (
                " (check that the MySQL server of --store is running and reachable)",
                false,
            ),
            _ => ("", false),
        };
        crate::error::StorageError::new(e, hint, full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreTarget;

    #[test]
    fn a_url_the_driver_refuses_is_a_config_error_without_its_password() {
        let StoreTarget::Mysql(dbs) =
            StoreTarget::parse("mysql://u:s3cret@h/db?nonsense=1", 2).unwrap()
        else {
            panic!("not mysql")
        };
        let e = opts(&dbs[0]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = e.to_string();
        assert!(e.contains("nonsense") && e.contains("--store"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let StoreTarget::Mysql(good) = StoreTarget::parse("mysql://u:s3cret@h/db", 2).unwrap()
        else {
            panic!("not mysql")
        };
        assert_eq!(opts(&good[1]).unwrap().get_db_name(), Some("db_02"));
    }

    #[test]
    fn servers_without_skip_locked_are_refused() {
        assert!(check_server_version("10.11.19-MariaDB-0+deb12u1", "x").is_ok());
        assert!(check_server_version("10.6.0-MariaDB", "x").is_ok());
        assert!(check_server_version("8.0.36", "x").is_ok());
        assert!(check_server_version("10.5.9-MariaDB", "x").is_err());
        assert!(check_server_version("5.7.44-log", "x").is_err());
    }

    #[test]
    fn the_schema_has_the_split_marker_and_every_expected_column() {
        let (shared, split) = sql::SCHEMA.split_once("-- @split-table").unwrap();
        for t in ["shard_meta", "task", "delivery"] {
            for c in expected_columns(t) {
                assert!(shared.contains(&format!("    {c} ")), "{t}.{c}");
            }
        }
        for c in expected_columns("user_award_record_000") {
            assert!(split.contains(&format!("    {c} ")), "{c}");
        }
    }
}
