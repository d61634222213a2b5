//! The SQLite backend: one file per database, `big_market_NN.db`, in WAL mode with
//! `synchronous=FULL` (a commit is durable when it returns). Reads go through an r2d2 pool; the
//! writer thread runs each group of ops in one `BEGIN IMMEDIATE` transaction, one savepoint per
//! op, so a failing op (a duplicate order id) rolls back alone.

pub(crate) mod ceiling;
pub(crate) mod sql;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::op::{Delivered, Op, Reply, SavedTask};
use super::{AwardRow, Batch, Opened, Reads, ShardStatus, TaskRow};
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::model::{AwardRecord, EventMessage, MessageId, TaskState};
use crate::router::{award_table, db_name, route, Layout};

type Pool = r2d2::Pool<SqliteConnectionManager>;

/// Where database `db` of a data directory lives.
pub(crate) fn shard_path(settings: &Settings, db: u32) -> PathBuf {
    settings.data_dir.join(format!("{}.db", db_name(db)))
}

/// Open every shard file of `settings.data_dir`; with `create`, make the directory and any
/// missing file. Refuses files of another layout or schema, and files that are not shards.
pub(crate) fn open_all(settings: &Settings, create: bool) -> Result<Vec<Opened>> {
    let dir = &settings.data_dir;
    let layout = settings.layout;
    if create {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
    } else if !dir.is_dir() {
        return Err(Error::Config(format!(
            "no data directory at {}: run `big-market init` first or pass --data-dir",
            dir.display()
        )));
    }
    check_no_foreign_shards(dir, layout)?;
    (1..=layout.db_count())
        .map(|db| open_shard(settings, db, create))
        .collect()
}

/// The reads of one shard file, through its pool.
struct SqliteReads {
    path: PathBuf,
    pool: Pool,
}

impl SqliteReads {
    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        self.pool
            .get()
            .map_err(|e| Error::Config(format!("cannot open {}: {e}", self.path.display())))
    }

    fn ctx(&self, what: &str) -> String {
        format!("{what} in {}", self.path.display())
    }
}

impl Reads for SqliteReads {
    fn ping(&self) -> Result<()> {
        sql::last_seq(&*self.conn()?)
            .map(|_| ())
            .map_err(|e| Error::storage(self.ctx("reading"), e))
    }

    fn leased_tasks(&self, owner: &str, from: u64, to: u64, limit: usize) -> Result<Vec<TaskRow>> {
        sql::leased_in_range(&*self.conn()?, owner, from, to, limit)
            .map_err(|e| Error::storage(self.ctx("reading back handed-off tasks"), e))
    }

    fn task_state(&self, message_id: &str) -> Result<Option<String>> {
        sql::task_state(&*self.conn()?, message_id)
            .map_err(|e| Error::storage(self.ctx("reading a task"), e))
    }

    fn status(&self, db: u32, tb_count: u32) -> Result<ShardStatus> {
        let conn = self.conn()?;
        let e = |what: &'static str| move |err| Error::storage(self.ctx(what), err);
        let tasks = sql::count_tasks_by_state(&conn)
            .map_err(e("counting tasks"))?
            .into_iter()
            .collect();
        let mut awards = BTreeMap::new();
        for t in 0..tb_count {
            for (state, n) in sql::count_awards_by_state(&conn, &award_table(t))
                .map_err(e("counting award records"))?
            {
                *awards.entry(state).or_insert(0) += n;
            }
        }
        let oldest_pending_ms =
            sql::oldest_pending(&conn).map_err(e("finding the oldest pending task"))?;
        let (delivered_messages, receipts) =
            sql::delivery_totals(&conn).map_err(e("counting deliveries"))?;
        let last_seq = sql::last_seq(&conn).map_err(e("reading the task sequence"))?;
        Ok(ShardStatus {
            db,
            location: self.path.display().to_string(),
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
        let e = |err| Error::storage(self.ctx("reading audit facts"), err);
        let tx = conn.transaction().map_err(e)?;
        let mut awards = Vec::new();
        for t in 0..tb_count {
            awards.extend(sql::award_orders(&tx, &award_table(t)).map_err(e)?);
        }
        Ok(crate::audit::Facts {
            db,
            last_seq: sql::last_seq(&tx).map_err(e)?,
            delivered: sql::delivered_seqs(&tx).map_err(e)?,
            tasks: sql::task_orders(&tx).map_err(e)?,
            delivered_orders: sql::delivered_orders(&tx).map_err(e)?,
            award_orders: awards,
        })
    }

    fn list_tasks(&self, state: Option<TaskState>, limit: usize) -> Result<Vec<TaskRow>> {
        sql::list_tasks(&*self.conn()?, state, limit)
            .map_err(|e| Error::storage(self.ctx("listing tasks"), e))
    }

    fn awards_of(&self, table: &str, user: &str, limit: usize) -> Result<Vec<AwardRow>> {
        sql::awards_of_user(&*self.conn()?, table, user, limit)
            .map_err(|e| Error::storage(self.ctx("listing a user's awards"), e))
    }
}

/// The writes of one shard file, on the writer thread's connection.
struct SqliteBatch<C> {
    db: u32,
    conn: C,
}

impl<C> Batch for SqliteBatch<C>
where
    C: std::ops::DerefMut<Target = Connection> + Send + 'static,
{
    fn run_batch(&mut self, ops: &[&Op]) -> Vec<Result<Reply>> {
        run_batch(self.db, &mut self.conn, ops)
    }
}

fn run_batch(db: u32, conn: &mut Connection, batch: &[&Op]) -> Vec<Result<Reply>> {
    let ctx = || format!("writing to shard big_market_{db:02}");
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            return batch
                .iter()
                .map(|_| Err(Error::storage(ctx(), copy_err(&e))))
                .collect()
        }
    };
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let result = (|| {
            let sp = tx.savepoint().map_err(|e| Error::storage(ctx(), e))?;
            let reply = apply(db, &sp, job)?;
            sp.commit().map_err(|e| Error::storage(ctx(), e))?;
            Ok(reply)
        })();
        // After SQLITE_FULL, an I/O error or running out of memory, SQLite may roll the whole
        // transaction back by itself. Then nothing of this group is kept: every op, the ones
        // that had succeeded included, is reported as not written, and the rest are not run
        // (outside a transaction they would each commit on their own).
        if let Err(e) = &result {
            if tx.is_autocommit() {
                let (full, cause) = match e {
                    Error::Storage { source, .. } => (source.is_full(), source.to_string()),
                    other => (false, other.to_string()),
                };
                return batch
                    .iter()
                    .map(|_| Err(rolled_back(db, full, &cause)))
                    .collect();
            }
        }
        results.push(result);
    }
    crate::crash::hit(crate::crash::Point::MidGroupCommit);
    match tx.commit() {
        Ok(()) => results,
        Err(e) => {
            let full = is_full(&e);
            batch
                .iter()
                .map(|_| {
                    Err(if full {
                        rolled_back(db, true, &e.to_string())
                    } else {
                        Error::storage(ctx(), copy_err(&e))
                    })
                })
                .collect()
        }
    }
}

fn is_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// The error of an op whose group SQLite rolled back by itself.
fn rolled_back(db: u32, full: bool, cause: &str) -> Error {
    let context = format!(
        "writing to shard big_market_{db:02}: SQLite rolled the whole transaction back, so nothing of this write was kept"
    );
    Error::Storage {
        context,
        source: crate::error::StorageError::from(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(if full {
                rusqlite::ffi::SQLITE_FULL
            } else {
                rusqlite::ffi::SQLITE_ABORT
            }),
            Some(cause.to_string()),
        )),
    }
}

/// rusqlite errors are not `Clone`; a failed commit is reported to every op of the batch.
fn copy_err(e: &rusqlite::Error) -> rusqlite::Error {
    let code = match e {
        rusqlite::Error::SqliteFailure(f, _) => f.extended_code,
        _ => rusqlite::ffi::SQLITE_ERROR,
    };
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(e.to_string()))
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Insert an award, take the shard's next sequence number, and insert its task, claimed by
/// `owner` until `lease_until_ms`: the rows of one award, on the caller's savepoint.
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_award_and_task(
    conn: &Connection,
    db: u32,
    table: &str,
    record: &AwardRecord,
    topic: &str,
    owner: &str,
    lease_until_ms: i64,
    now_ms: i64,
) -> Result<SavedTask> {
    let ctx = |what: &str| format!("{what} on shard big_market_{db:02}");
    sql::insert_award(conn, table, record, now_ms).map_err(|e| {
        if is_unique_violation(&e) {
            Error::DuplicateOrder {
                order_id: record.order_id.as_str().to_string(),
            }
        } else {
            Error::storage(ctx("inserting an award record"), e)
        }
    })?;
    let seq =
        sql::take_seq(conn).map_err(|e| Error::storage(ctx("taking a task sequence number"), e))?;
    let message = EventMessage::for_award(record, db, seq, now_ms).encode();
    let message_id = MessageId::new(db, seq);
    let id = sql::insert_task(
        conn,
        &sql::NewTask {
            user_id: record.user_id.as_str(),
            topic,
            message_id: message_id.as_str(),
            message: &message,
            seq,
            owner,
            lease_until_ms,
            now_ms,
        },
    )
    .map_err(|e| Error::storage(ctx("inserting a task"), e))?;
    Ok(SavedTask {
        id,
        db,
        seq,
        message_id,
        topic: topic.to_string(),
        message,
        lease_until_ms,
    })
}

fn apply(db: u32, conn: &Connection, op: &Op) -> Result<Reply> {
    let ctx = |what: &str| format!("{what} on shard big_market_{db:02}");
    match op {
        Op::SaveAward {
            record,
            table,
            topic,
            owner,
            lease_until_ms,
            now_ms,
        } => {
            let saved = insert_award_and_task(
                conn,
                db,
                table,
                record,
                topic,
                owner,
                *lease_until_ms,
                *now_ms,
            )?;
            Ok(Reply::Saved(saved))
        }
        Op::MarkCompleted { ids, owner, now_ms } => {
            let mut n = 0;
            for id in ids {
                n += sql::mark_completed(conn, *id, Some(owner), *now_ms)
                    .map_err(|e| Error::storage(ctx("marking a task completed"), e))?;
            }
            Ok(Reply::Count(n))
        }
        Op::MarkFailed {
            failures,
            owner,
            now_ms,
        } => {
            let mut n = 0;
            for f in failures {
                n += sql::mark_failed(
                    conn,
                    f.id,
                    owner,
                    f.state,
                    f.attempts,
                    f.next_attempt_at,
                    &f.error,
                    *now_ms,
                )
                .map_err(|e| Error::storage(ctx("marking a task failed"), e))?;
            }
            Ok(Reply::Count(n))
        }
        Op::Claim {
            owner,
            limit,
            lease_until_ms,
            now_ms,
        } => {
            let rows = sql::claim_due(conn, owner, *now_ms, *lease_until_ms, *limit)
                .map_err(|e| Error::storage(ctx("claiming due tasks"), e))?;
            Ok(Reply::Claimed(rows))
        }
        Op::Renew {
            ids,
            owner,
            lease_until_ms,
            now_ms,
        } => {
            let mut renewed = Vec::with_capacity(ids.len());
            for id in ids {
                if sql::renew_lease(conn, *id, owner, *lease_until_ms, *now_ms)
                    .map_err(|e| Error::storage(ctx("renewing a lease"), e))?
                    == 1
                {
                    renewed.push(*id);
                }
            }
            Ok(Reply::Renewed(renewed))
        }
        Op::Release { owner, now_ms } => {
            let n = sql::release_claims(conn, owner, *now_ms)
                .map_err(|e| Error::storage(ctx("releasing claims"), e))?;
            Ok(Reply::Count(n))
        }
        Op::Deliver { msg, table, now_ms } => {
            let d = &msg.data;
            let seq = msg.seq.unwrap_or(0);
            let receipts = sql::record_delivery(conn, &msg.id, seq, &d.order_id, *now_ms)
                .map_err(|e| Error::storage(ctx("logging a delivery"), e))?;
            if receipts > 1 {
                return Ok(Reply::Delivered(Delivered::Again));
            }
            let changed = sql::complete_award(conn, table, &d.user_id, &d.order_id, *now_ms)
                .map_err(|e| Error::storage(ctx("delivering an award"), e))?;
            if changed == 0
                && !sql::award_exists(conn, table, &d.user_id, &d.order_id)
                    .map_err(|e| Error::storage(ctx("looking up an award"), e))?
            {
                // The savepoint rolls back the delivery log entry with this error.
                return Err(Error::Poison(format!(
                    "message {} names user {} order {}, which has no award record in big_market_{db:02}.{table}",
                    msg.id, d.user_id, d.order_id
                )));
            }
            Ok(Reply::Delivered(Delivered::First))
        }
        Op::Requeue {
            message_id,
            state,
            now_ms,
        } => {
            let n = sql::requeue(conn, message_id.as_deref(), *state, *now_ms)
                .map_err(|e| Error::storage(ctx("requeueing tasks"), e))?;
            Ok(Reply::Count(n))
        }
        Op::Barrier => Ok(Reply::Count(0)),
        Op::Purge { before_ms } => {
            let n = sql::purge_completed(conn, *before_ms)
                .map_err(|e| Error::storage(ctx("purging completed tasks"), e))?;
            Ok(Reply::Count(n))
        }
    }
}

pub(crate) fn insert_pair(
    conn: &Connection,
    db: u32,
    layout: Layout,
    r: &AwardRecord,
    topic: &str,
    now_ms: i64,
) -> Result<(i64, String)> {
    let table = award_table(route(r.user_id.as_str(), layout).table);
    let saved = insert_award_and_task(conn, db, &table, r, topic, "bench", now_ms, now_ms)?;
    Ok((saved.id, saved.message))
}

fn check_no_foreign_shards(dir: &Path, layout: Layout) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let idx = name
            .strip_prefix("big_market_")
            .and_then(|s| s.strip_suffix(".db"))
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(idx) = idx {
            if idx == 0 || idx > layout.db_count() {
                return Err(Error::Config(format!(
                    "{} holds {name}, which a layout of {} databases does not have: this data dir was made with another --db-count",
                    dir.display(),
                    layout.db_count()
                )));
            }
        }
    }
    Ok(())
}

pub(crate) fn configure(conn: &Connection, busy: Duration) -> rusqlite::Result<()> {
    conn.busy_timeout(busy)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("journal_mode is {mode}, WAL is required")),
        ));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Checkpoint every 10,000 WAL pages (about 40 MB) instead of SQLite's 1,000: at about 15
    // pages per award, the default made every ~70th award's commit copy the WAL back and fsync
    // the database file as well.
    conn.pragma_update(None, "wal_autocheckpoint", 10000)?;
    Ok(())
}

fn open_shard(settings: &Settings, db: u32, create: bool) -> Result<Opened> {
    let path = shard_path(settings, db);
    let layout = settings.layout;
    if !create && !path.exists() {
        return Err(Error::Config(format!(
            "shard file {} is missing: run `big-market init` (with the same --db-count/--tb-count) first",
            path.display()
        )));
    }
    let ctx = |what: &str| format!("{what} {}", path.display());
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn =
        Connection::open_with_flags(&path, flags).map_err(|e| Error::storage(ctx("opening"), e))?;
    configure(&conn, settings.busy_timeout).map_err(|e| Error::storage(ctx("opening"), e))?;
    {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::storage(ctx("locking"), e))?;
        let version = sql::schema_version(&tx)
            .map_err(|e| Error::storage(ctx("reading the schema version of"), e))?;
        if version == 0 {
            let objects: i64 = tx
                .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(|e| Error::storage(ctx("reading"), e))?;
            if objects > 0 {
                return Err(Error::Config(format!(
                    "{} is a SQLite file but not a big-market shard (no schema version): move it away",
                    path.display()
                )));
            }
            sql::apply_schema(
                &tx,
                db,
                layout.db_count(),
                layout.tb_count(),
                crate::util::now_ms(),
            )
            .map_err(|e| Error::storage(ctx("creating the schema in"), e))?;
            log::info!(
                "created shard path={} db={} tables={}",
                path.display(),
                db_name(db),
                layout.tb_count()
            );
        } else if version > sql::SCHEMA_VERSION {
            return Err(Error::Config(format!(
                "{} has schema version {version}, newer than this build's {}: use a newer big-market",
                path.display(),
                sql::SCHEMA_VERSION
            )));
        }
        let (file_db, dbs, tbs) =
            sql::shard_layout(&tx).map_err(|e| Error::storage(ctx("reading the layout of"), e))?;
        if (file_db, dbs, tbs) != (db, layout.db_count(), layout.tb_count()) {
            return Err(Error::Config(format!(
                "{} was created as database {file_db:02} of a {dbs} x {tbs} layout, but this run uses {} x {}: pass --db-count {dbs} --tb-count {tbs}, or another --data-dir",
                path.display(),
                layout.db_count(),
                layout.tb_count()
            )));
        }
        tx.commit()
            .map_err(|e| Error::storage(ctx("initialising"), e))?;
    }
    drop(conn);
    let busy = settings.busy_timeout;
    let manager = SqliteConnectionManager::file(&path)
        .with_flags(
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .with_init(move |c| configure(c, busy));
    let pool = r2d2::Pool::builder()
        .max_size(4)
        .min_idle(Some(1))
        .connection_timeout(Duration::from_secs(10))
        .build_unchecked(manager);
    let write_conn = pool
        .get()
        .map_err(|e| Error::Config(format!("cannot open {}: {e}", path.display())))?;
    if let Some(pages) = settings.max_shard_pages {
        write_conn
            .pragma_update(None, "max_page_count", pages)
            .map_err(|e| Error::storage(ctx("capping the size of"), e))?;
    }
    Ok(Opened {
        location: path.display().to_string(),
        reads: Box::new(SqliteReads { path, pool }),
        // SQLite has one writer per file: one lane.
        lanes: vec![Box::new(SqliteBatch {
            db,
            conn: write_conn,
        })],
        lane_of: |_| 0,
    })
}

/// The driver's errors, with what to do about each: only this backend knows their codes.
impl From<rusqlite::Error> for crate::error::StorageError {
    fn from(e: rusqlite::Error) -> Self {
        let code = e.sqlite_error_code();
        let hint = match code {
            Some(rusqlite::ErrorCode::NotADatabase) => {
                " (the file is not a SQLite database: move it away or point --data-dir elsewhere)"
            }
            Some(rusqlite::ErrorCode::DiskFull) => {
                " (the disk is full, or the shard reached its size limit: free space, e.g. `big-market tasks purge --older-than 7d`, and retry)"
            }
            Some(rusqlite::ErrorCode::ReadOnly) | Some(rusqlite::ErrorCode::CannotOpen) => {
                " (check that the data directory exists and is writable)"
            }
            Some(rusqlite::ErrorCode::DatabaseBusy) => {
                " (another process holds the shard's write lock: retry)"
            }
            _ => "",
        };
        let full = code == Some(rusqlite::ErrorCode::DiskFull);
        crate::error::StorageError::new(e, hint, full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_applies_to_a_fresh_file_with_every_split_table() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.db")).unwrap();
        sql::apply_schema(&conn, 1, 2, 4, 0).unwrap();
        for t in 0..4 {
            let n: i64 = conn
                .query_row(
                    &format!("SELECT COUNT(*) FROM {}", award_table(t)),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, 0);
        }
        assert_eq!(sql::schema_version(&conn).unwrap(), sql::SCHEMA_VERSION);
        assert_eq!(sql::shard_layout(&conn).unwrap(), (1, 2, 4));
        assert_eq!(sql::take_seq(&conn).unwrap(), 1);
        assert_eq!(sql::take_seq(&conn).unwrap(), 2);
    }
}
