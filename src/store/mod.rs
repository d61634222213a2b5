//! The store: the shard files and the only code that speaks SQL.
//!
//! Each database of the layout is one SQLite file, `big_market_NN.db`, in WAL mode with
//! `synchronous=FULL` (a commit is durable when it returns). Reads go through an r2d2 pool;
//! every write goes through the shard's [`writer::Writer`] thread.

pub(crate) mod ceiling;
pub mod sql;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::model::{AwardRecord, EventMessage, TaskState};
use crate::relay::Handoff;
use crate::router::{award_table, db_name, route, Layout};
pub use sql::TaskRow;
pub use writer::{Delivered, Failure, Op, Reply, SavedTask};

type Pool = r2d2::Pool<SqliteConnectionManager>;

/// One shard file: a read pool and its writer.
pub struct Shard {
    db: u32,
    path: PathBuf,
    pool: Pool,
    handoff: Arc<Handoff>,
    writer: writer::Writer,
}

/// Per-shard counts for `status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardStatus {
    /// Database index.
    pub db: u32,
    /// File path.
    pub path: PathBuf,
    /// Tasks per state.
    pub tasks: BTreeMap<String, u64>,
    /// Award records per state (over every split table).
    pub awards: BTreeMap<String, u64>,
    /// Creation time of the oldest task not completed or dead.
    pub oldest_pending_ms: Option<i64>,
    /// Messages the consumer has handled.
    pub delivered_messages: u64,
    /// Receipts, counting redeliveries.
    pub receipts: u64,
    /// Highest task sequence number handed out.
    pub last_seq: u64,
}

impl ShardStatus {
    /// Tasks in a state.
    pub fn tasks_in(&self, s: TaskState) -> u64 {
        self.tasks.get(s.as_str()).copied().unwrap_or(0)
    }
    /// Award records in a state.
    pub fn awards_in(&self, s: &str) -> u64 {
        self.awards.get(s).copied().unwrap_or(0)
    }
    /// All tasks.
    pub fn task_total(&self) -> u64 {
        self.tasks.values().sum()
    }
    /// All award records.
    pub fn award_total(&self) -> u64 {
        self.awards.values().sum()
    }
}

impl Shard {
    /// Database index (1-based).
    pub fn db(&self) -> u32 {
        self.db
    }

    /// File path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where this shard's writer hands committed tasks to the relay.
    pub fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    /// Tasks with sequence numbers in `from..=to` that `owner` still holds unsent, in order.
    pub fn leased_tasks(
        &self,
        owner: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<TaskRow>> {
        let conn = self.read()?;
        sql::leased_in_range(&conn, owner, from, to, limit)
            .map_err(|e| Error::storage(self.ctx("reading back handed-off tasks"), e))
    }

    /// The state of a task, by message id (`None`: no such task).
    pub fn task_state(&self, message_id: &str) -> Result<Option<TaskState>> {
        let conn = self.read()?;
        let state = sql::task_state(&conn, message_id)
            .map_err(|e| Error::storage(self.ctx("reading a task"), e))?;
        Ok(state.and_then(|s| TaskState::parse(&s).ok()))
    }

    /// Run several write ops in the same group commit; one result per op, in order.
    pub fn write_many(&self, ops: Vec<Op>) -> Vec<Result<Reply>> {
        self.writer.call_many(ops)
    }

    /// Queue a write op without waiting for its commit.
    pub fn write_detached(&self, op: Op) -> Result<()> {
        self.writer.send_detached(op)
    }

    /// Run a write op on this shard's writer thread.
    pub fn write(&self, op: Op) -> Result<Reply> {
        self.writer.call(op)
    }

    /// Run a write op on this shard's writer thread and await its commit.
    pub async fn write_async(&self, op: Op) -> Result<Reply> {
        self.writer.call_async(op).await
    }

    fn read(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        self.pool
            .get()
            .map_err(|e| Error::Config(format!("cannot open {}: {e}", self.path.display())))
    }

    fn ctx(&self, what: &str) -> String {
        format!("{what} in {}", self.path.display())
    }

    /// Counts for `status`.
    pub fn status(&self, tb_count: u32) -> Result<ShardStatus> {
        let conn = self.read()?;
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
            db: self.db,
            path: self.path.clone(),
            tasks,
            awards,
            oldest_pending_ms,
            delivered_messages,
            receipts,
            last_seq,
        })
    }

    /// The raw facts the audit compares, read in one snapshot.
    pub fn audit_facts(&self, tb_count: u32) -> Result<crate::audit::Facts> {
        let mut conn = self.read()?;
        let e = |err| Error::storage(self.ctx("reading audit facts"), err);
        let tx = conn.transaction().map_err(e)?;
        let mut awards = Vec::new();
        for t in 0..tb_count {
            awards.extend(sql::award_orders(&tx, &award_table(t)).map_err(e)?);
        }
        Ok(crate::audit::Facts {
            db: self.db,
            last_seq: sql::last_seq(&tx).map_err(e)?,
            delivered: sql::delivered_seqs(&tx).map_err(e)?,
            tasks: sql::task_orders(&tx).map_err(e)?,
            delivered_orders: sql::delivered_orders(&tx).map_err(e)?,
            award_orders: awards,
        })
    }

    /// Tasks, oldest first.
    pub fn list_tasks(&self, state: Option<TaskState>, limit: usize) -> Result<Vec<TaskRow>> {
        let conn = self.read()?;
        sql::list_tasks(&conn, state, limit)
            .map_err(|e| Error::storage(self.ctx("listing tasks"), e))
    }
}

/// Every shard of a data directory, opened and checked against the layout.
pub struct Store {
    layout: Layout,
    shards: Vec<Shard>,
}

impl Store {
    /// Open the shards of `settings.data_dir`; with `create`, make the directory and any missing
    /// shard file. Refuses files of another layout or schema, and files that are not shards.
    pub fn open(settings: &Settings, create: bool) -> Result<Store> {
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
        let mut shards = Vec::with_capacity(layout.db_count() as usize);
        for db in 1..=layout.db_count() {
            shards.push(open_shard(settings, db, create)?);
        }
        Ok(Store { layout, shards })
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Every shard, in database order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The shard of a database index (1-based).
    pub fn shard(&self, db: u32) -> &Shard {
        &self.shards[(db - 1) as usize]
    }

    /// Insert an award and its task in one transaction on the user's shard.
    pub fn save_award(
        &self,
        record: AwardRecord,
        topic: &Arc<str>,
        owner: &Arc<str>,
        lease: Duration,
        now_ms: i64,
    ) -> Result<SavedTask> {
        self.save_awards(vec![record], topic, owner, lease, now_ms)
            .pop()
            .expect("one result per award")
    }

    /// The write that saves `record`, and the database it routes to.
    fn save_op(
        &self,
        record: AwardRecord,
        topic: &Arc<str>,
        owner: &Arc<str>,
        lease: Duration,
        now_ms: i64,
    ) -> (u32, Op) {
        let r = route(record.user_id.as_str(), self.layout);
        let op = Op::SaveAward {
            record,
            table: award_table(r.table),
            topic: topic.clone(),
            owner: owner.clone(),
            lease_until_ms: now_ms + lease.as_millis() as i64,
            now_ms,
        };
        (r.db, op)
    }

    /// [`Store::save_award`] for an async caller: awaits the commit without blocking its thread.
    pub async fn save_award_async(
        &self,
        record: AwardRecord,
        topic: &Arc<str>,
        owner: &Arc<str>,
        lease: Duration,
        now_ms: i64,
    ) -> Result<SavedTask> {
        let (db, op) = self.save_op(record, topic, owner, lease, now_ms);
        match self.shard(db).write_async(op).await? {
            Reply::Saved(t) => Ok(t),
            other => unreachable!("SaveAward replied {other:?}"),
        }
    }

    /// Insert many awards, each with its task in its own savepoint; each shard's share is queued
    /// at once, so it lands in the same group commit. One result per award, in order.
    pub fn save_awards(
        &self,
        records: Vec<AwardRecord>,
        topic: &Arc<str>,
        owner: &Arc<str>,
        lease: Duration,
        now_ms: i64,
    ) -> Vec<Result<SavedTask>> {
        let results: Vec<Option<Result<SavedTask>>> = (0..records.len()).map(|_| None).collect();
        let mut per_shard: BTreeMap<u32, (Vec<usize>, Vec<Op>)> = BTreeMap::new();
        for (i, record) in records.into_iter().enumerate() {
            let (db, op) = self.save_op(record, topic, owner, lease, now_ms);
            let entry = per_shard.entry(db).or_default();
            entry.0.push(i);
            entry.1.push(op);
        }
        self.run_per_shard(per_shard, results, |r| match r {
            Reply::Saved(t) => t,
            other => unreachable!("SaveAward replied {other:?}"),
        })
    }

    /// Run each shard's ops in one group commit and put each reply at its caller's index;
    /// `results` already holds the answers decided without a write.
    fn run_per_shard<T>(
        &self,
        per_shard: BTreeMap<u32, (Vec<usize>, Vec<Op>)>,
        mut results: Vec<Option<Result<T>>>,
        unpack: impl Fn(Reply) -> T,
    ) -> Vec<Result<T>> {
        for (db, (idx, ops)) in per_shard {
            for (i, reply) in idx.into_iter().zip(self.shard(db).write_many(ops)) {
                results[i] = Some(reply.map(&unpack));
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every item has a result"))
            .collect()
    }

    /// Deliver a decoded message on the shard of its user: the award moves to completed once.
    pub fn deliver(&self, msg: EventMessage, now_ms: i64) -> Result<Delivered> {
        self.deliver_many(vec![msg], now_ms)
            .pop()
            .expect("one result per message")
    }

    /// Deliver many messages; each shard's share goes into one group commit. One result per
    /// message, in order.
    pub fn deliver_many(&self, msgs: Vec<EventMessage>, now_ms: i64) -> Vec<Result<Delivered>> {
        let mut results: Vec<Option<Result<Delivered>>> = (0..msgs.len()).map(|_| None).collect();
        let mut per_shard: BTreeMap<u32, (Vec<usize>, Vec<Op>)> = BTreeMap::new();
        for (i, msg) in msgs.into_iter().enumerate() {
            let r = route(&msg.data.user_id, self.layout);
            if let Some(shard) = msg.shard.filter(|s| *s != r.db) {
                results[i] = Some(Err(Error::Poison(format!(
                    "message {} says shard {shard} but user {} routes to {}",
                    msg.id,
                    msg.data.user_id,
                    r.db_name()
                ))));
                continue;
            }
            let entry = per_shard.entry(r.db).or_default();
            entry.0.push(i);
            entry.1.push(Op::Deliver {
                msg,
                table: award_table(r.table),
                now_ms,
            });
        }
        self.run_per_shard(per_shard, results, |r| match r {
            Reply::Delivered(d) => d,
            other => unreachable!("Deliver replied {other:?}"),
        })
    }

    /// A user's award records, newest first, at most `limit`.
    pub fn awards_of(
        &self,
        user: &crate::model::UserId,
        limit: usize,
    ) -> Result<Vec<sql::AwardRow>> {
        let r = route(user.as_str(), self.layout);
        let shard = self.shard(r.db);
        let conn = shard.read()?;
        sql::awards_of_user(&conn, &award_table(r.table), user.as_str(), limit)
            .map_err(|e| Error::storage(shard.ctx("listing a user's awards"), e))
    }

    /// Per-shard counts.
    pub fn status(&self) -> Result<Vec<ShardStatus>> {
        self.shards
            .iter()
            .map(|s| s.status(self.layout.tb_count()))
            .collect()
    }

    /// Write counts from an op that replies a count, on every shard; returns the sum.
    pub fn write_all(&self, op: impl Fn() -> Op) -> Result<usize> {
        let mut n = 0;
        for s in &self.shards {
            match s.write(op())? {
                Reply::Count(c) => n += c,
                other => unreachable!("count op replied {other:?}"),
            }
        }
        Ok(n)
    }
}

fn insert_pair(
    conn: &Connection,
    db: u32,
    layout: Layout,
    r: &AwardRecord,
    topic: &str,
    now_ms: i64,
) -> Result<(i64, String)> {
    let table = award_table(route(r.user_id.as_str(), layout).table);
    let saved = writer::insert_award_and_task(conn, db, &table, r, topic, "bench", now_ms, now_ms)?;
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

fn configure(conn: &Connection, busy: Duration) -> rusqlite::Result<()> {
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

fn open_shard(settings: &Settings, db: u32, create: bool) -> Result<Shard> {
    let path = settings.data_dir.join(format!("{}.db", db_name(db)));
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
    let handoff = Arc::new(Handoff::new(settings.handoff_capacity));
    let writer = writer::Writer::spawn(db, write_conn, settings.group_commit_max, handoff.clone())?;
    Ok(Shard {
        db,
        path,
        pool,
        handoff,
        writer,
    })
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
