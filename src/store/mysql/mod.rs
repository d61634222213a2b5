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

mod batch;
pub(crate) mod ceiling;
mod reads;
pub(crate) mod scratch;
pub(crate) mod sql;

use batch::MysqlBatch;
pub(crate) use batch::{Numbered, SaveArgs};
use reads::MysqlReads;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::Pool;

use super::op::Op;
use super::{Batch, Opened};
use crate::config::{MysqlDatabase, Settings};
use crate::error::{Error, Result};
use crate::router::award_table;

/// Most ops one lane commits together: a group is one transaction of as many round trips to the
/// server, and each must finish within `--mysql-timeout`.
const GROUP_COMMIT_MAX: usize = 256;

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

/// The options of every connection to `d`: sessions in READ COMMITTED (no gap locks between
/// processes' claims and inserts), utf8mb4 (the scripts' literals are escaped for it), that
/// wait at most [`Settings::mysql_lock_wait`] for a row lock another process holds (as SQLite's
/// busy timeout); and deadlines on every round trip (`--mysql-timeout`): connect, read and
/// write timeouts, TCP keepalive probes that find a dead peer within about the same time, and
/// `TCP_USER_TIMEOUT` (data unacknowledged that long closes the connection).
fn conn_opts(d: &MysqlDatabase, with_db: bool, settings: &Settings) -> Result<mysql::OptsBuilder> {
    let t = settings.mysql_timeout;
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    // Keepalive: the first probe after a third of the deadline idle, then three probes a
    // ninth apart: a peer gone silent is found within about two thirds of the deadline.
    let probe = (t / 9).as_secs().max(1) as u32;
    let mut b = mysql::OptsBuilder::from_opts(opts(d)?)
        .tcp_connect_timeout(Some(t.min(Duration::from_secs(10))))
        .read_timeout(Some(t))
        .write_timeout(Some(t))
        .tcp_keepalive_time_ms(Some(ms(t / 3).max(1000)))
        .tcp_keepalive_probe_interval_secs(Some(probe))
        .tcp_keepalive_probe_count(Some(3))
        .tcp_user_timeout_ms(Some(ms(t)))
        .stmt_cache_size(Some(512))
        .init(vec![
            "SET NAMES utf8mb4".to_string(),
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_string(),
            format!(
                "SET SESSION innodb_lock_wait_timeout = {}",
                settings.mysql_lock_wait().as_secs()
            ),
        ]);
    if !with_db {
        b = b.db_name(None::<String>);
    }
    Ok(b)
}

/// A pool of connections to `d` (see [`conn_opts`]), at most `max`.
fn pool(d: &MysqlDatabase, with_db: bool, max: usize, settings: &Settings) -> Result<Pool> {
    let b = conn_opts(d, with_db, settings)?.pool_opts(
        mysql::PoolOpts::default()
            .with_constraints(mysql::PoolConstraints::new(1, max).expect("1 <= max")),
    );
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
    let server = pool(d, false, 1, settings)?;
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
        let server = pool(d, false, 1, settings)?;
        let mut conn = server
            .get_conn()
            .map_err(|e| Error::storage(ctx("connecting to"), e))?;
        conn.query_drop(format!(
            "CREATE DATABASE IF NOT EXISTS `{}` DEFAULT CHARACTER SET utf8mb4",
            d.name
        ))
        .map_err(|e| Error::storage(ctx("creating"), e))?;
    }
    let pool = pool(d, true, LANES + 4, settings)?;
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
    let lane_opts: mysql::Opts = conn_opts(d, true, settings)?.into();
    for lane in 0..LANES {
        let conn = mysql::Conn::new(lane_opts.clone())
            .map_err(|e| Error::storage(ctx("connecting to"), e))?;
        lanes.push(Box::new(MysqlBatch {
            db,
            shown: d.shown.clone(),
            opts: lane_opts.clone(),
            conn: Some(conn),
            consecutive_ids,
            linger: if lane == 0 { Duration::ZERO } else { LINGER },
            commit_sent: std::cell::Cell::new(false),
        }));
    }
    Ok(Opened {
        location: d.shown.clone(),
        reads: Box::new(MysqlReads {
            shown: d.shown.clone(),
            pool,
            timeout: settings.mysql_timeout,
        }),
        lanes,
        lane_of,
        call_deadline: Some(settings.mysql_timeout),
        group_commit_max: GROUP_COMMIT_MAX,
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

pub(super) fn lane_of(op: &Op) -> usize {
    match op {
        Op::SaveAward { .. } => 0,
        _ => 1,
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
