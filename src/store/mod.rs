//! The store: the shards and the only code that speaks SQL.
//!
//! Each database of the layout is a shard: a SQLite file under the data directory (the
//! default, `store::sqlite`) or a MySQL/MariaDB database (`--store mysql://…`,
//! `store::mysql`). A backend gives the store two things per database: its `Reads`, and one
//! `Batch` per write lane, through which the shard's writer threads run every write. Callers
//! use the typed methods of [`Store`] and [`Shard`]; the ops the writer threads run stay
//! private to the store. Everything above this module (relay, scanner, consumer, CLI) is
//! backend-free.

pub(crate) mod counting;
pub mod handoff;
pub(crate) mod mysql;
pub(crate) mod op;
pub(crate) mod sqlite;
pub(crate) mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Settings, StoreTarget};
use crate::error::{Error, Result};
use crate::model::{AwardRecord, AwardState, EventMessage, TaskState};
use crate::router::{award_table, route, Layout};
// The MySQL backend by another name here, so that `mysql::` in this crate always means the
// driver, which only `store::mysql` may use (the tidy test).
use self::{mysql as backend_mysql, sqlite as backend_sqlite};

/// Bench and verify reach the backends' direct access through these (crate-private).
pub(crate) use self::{
    backend_mysql::ceiling::{mysql_e2e_batches, mysql_server_work, SeedDatabase},
    backend_mysql::scratch::Scratch,
    backend_sqlite::ceiling::Direct,
};
pub use handoff::Handoff;
pub use op::{Delivered, Failure, SavedTask};
pub(crate) use op::{Op, Reply};

/// The scripts that create a schema: the part every database has once, then, per split table
/// index, the part after the `-- @split-table` marker with `000` replaced by that index.
pub(crate) fn schema_scripts(schema: &str, tb_count: u32) -> Vec<String> {
    let (shared, split) = schema
        .split_once("-- @split-table")
        .expect("a schema has the split-table marker");
    std::iter::once(shared.to_string())
        .chain((0..tb_count).map(|t| split.replace("000", &format!("{t:03}"))))
        .collect()
}

/// The writes of one database: run a group of ops in one transaction, commit once, and return
/// one result per op, in order. A failing op fails alone; a failed commit fails them all.
pub(crate) trait Batch: Send + 'static {
    /// Run `ops` as one group commit.
    fn run_batch(&mut self, ops: &[&Op]) -> Vec<Result<Reply>>;

    /// How long the writer waits for more ops before it runs a group smaller than the maximum:
    /// zero (the default) runs whatever is waiting at once.
    fn linger(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Called after [`Batch::run_batch`] panicked: whether nothing of that group is kept (its
    /// transaction rolled back, or abandoned before its commit went out), so that the writer
    /// may run the group's ops again one at a time. Either way the backend must be usable for
    /// the next group when it returns.
    fn kept_nothing_of_panicked_group(&mut self) -> bool {
        false
    }
}

/// The reads of one database.
pub(crate) trait Reads: Send + Sync {
    /// Whether the database answers a trivial query (readiness; cheap at any size).
    fn ping(&self) -> Result<()>;
    /// Tasks with sequence numbers in `from..=to` that `owner` still holds unsent, in order.
    fn leased_tasks(&self, owner: &str, from: u64, to: u64, limit: usize) -> Result<Vec<TaskRow>>;
    /// The state of a task, by message id.
    fn task_state(&self, message_id: &str) -> Result<Option<String>>;
    /// Counts for `status`.
    fn status(&self, db: u32, tb_count: u32) -> Result<ShardStatus>;
    /// The audit's facts, read in one snapshot.
    fn audit_facts(&self, db: u32, tb_count: u32) -> Result<crate::audit::Facts>;
    /// Tasks in sequence order.
    fn list_tasks(&self, state: Option<TaskState>, limit: usize) -> Result<Vec<TaskRow>>;
    /// A user's award records in their split table, newest first.
    fn awards_of(&self, table: &str, user: &str, limit: usize) -> Result<Vec<AwardRow>>;
    /// The shard's file, where it is one (SQLite); `None` for a database on a server.
    fn file(&self) -> Option<&std::path::Path>;
    /// Write a consistent copy of the shard, as of one read transaction, to `target` (a new
    /// file), while writers go on.
    fn copy_into(&self, target: &std::path::Path) -> Result<()>;
}

/// A database a backend opened and checked: where it is (for people: no credentials), its
/// reads and its writes.
pub(crate) struct Opened {
    pub(crate) location: String,
    pub(crate) reads: Box<dyn Reads>,
    /// One write connection per lane.
    pub(crate) lanes: Vec<Box<dyn Batch>>,
    /// Which lane runs an op.
    pub(crate) lane_of: writer::LaneOf,
    /// How long a caller waits for its write (`None`: until it is done).
    pub(crate) call_deadline: Option<Duration>,
    /// Most ops one lane commits together.
    pub(crate) group_commit_max: usize,
}

/// One database: its reads and its writer.
pub struct Shard {
    db: u32,
    location: String,
    reads: Box<dyn Reads>,
    handoff: Arc<Handoff>,
    writer: writer::Writer,
}

/// A task claimed for publishing.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    /// Row id.
    pub id: i64,
    /// User id.
    pub user_id: String,
    /// Topic.
    pub topic: String,
    /// Message id.
    pub message_id: String,
    /// JSON body.
    pub message: String,
    /// Sequence number.
    pub seq: u64,
    /// Counted attempts so far.
    pub attempts: u32,
    /// State.
    pub state: String,
    /// Due time or lease expiry.
    pub next_attempt_at: i64,
    /// Claim owner.
    pub claimed_by: Option<String>,
    /// Last failure.
    pub last_error: Option<String>,
    /// Created.
    pub create_time: i64,
    /// Last changed.
    pub update_time: i64,
}

/// One award record as listed to its user.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AwardRow {
    /// Order id.
    pub order_id: String,
    /// Activity id.
    pub activity_id: i64,
    /// Strategy id.
    pub strategy_id: i64,
    /// Award id.
    pub award_id: i64,
    /// Award title.
    pub award_title: String,
    /// Award time, epoch ms.
    pub award_time: i64,
    /// `create` (not yet delivered) or `completed` (delivered).
    pub award_state: String,
}

/// One shard copied by [`Store::backup`].
#[derive(Debug, Clone, PartialEq)]
pub struct BackedUp {
    /// Database index.
    pub db: u32,
    /// Where the copy is once the backup is done.
    pub target: std::path::PathBuf,
    /// Its size.
    pub bytes: u64,
    /// How long the copy took.
    pub took: Duration,
}

/// Per-shard counts for `status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardStatus {
    /// Database index.
    pub db: u32,
    /// The file path, or the database's URL without credentials.
    pub location: String,
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
    /// The compaction watermark: every number up to it was delivered and folded (SQLite).
    pub compacted: u64,
}

impl ShardStatus {
    /// Tasks in a state.
    pub fn tasks_in(&self, s: TaskState) -> u64 {
        self.tasks.get(s.as_str()).copied().unwrap_or(0)
    }
    /// Award records in a state.
    pub fn awards_in(&self, s: AwardState) -> u64 {
        self.awards.get(s.as_str()).copied().unwrap_or(0)
    }
    /// Tasks still to be sent: `create` (new or in flight) and `fail` (due again).
    pub fn pending(&self) -> u64 {
        self.tasks_in(TaskState::Create) + self.tasks_in(TaskState::Fail)
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

    /// The file path, or the database's URL without credentials.
    pub fn location(&self) -> &str {
        &self.location
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
        self.reads.leased_tasks(owner, from, to, limit)
    }

    /// The state of a task, by message id (`None`: no such task).
    pub fn task_state(&self, message_id: &str) -> Result<Option<TaskState>> {
        let state = self.reads.task_state(message_id)?;
        Ok(state.and_then(|s| TaskState::parse(&s).ok()))
    }

    /// Run a write op on this shard's writer thread and wait for its commit.
    fn write(&self, op: Op) -> Result<Reply> {
        self.writer.call(op)
    }

    /// Claim up to `limit` due tasks (failed ones past their backoff, and pending ones whose
    /// lease expired) for `owner`, leased until `lease_until_ms`.
    pub fn claim(
        &self,
        owner: &Arc<str>,
        limit: usize,
        lease_until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<TaskRow>> {
        self.write(Op::Claim {
            owner: owner.clone(),
            limit,
            lease_until_ms,
            now_ms,
        })
        .map(Reply::claimed)
    }

    /// Extend the leases of tasks `owner` still holds unsent; returns the ids renewed (a task
    /// another claim took is left out).
    pub fn renew(
        &self,
        ids: Vec<i64>,
        owner: &Arc<str>,
        lease_until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<i64>> {
        self.write(Op::Renew {
            ids,
            owner: owner.clone(),
            lease_until_ms,
            now_ms,
        })
        .map(Reply::renewed)
    }

    /// Mark tasks completed, those `owner` still holds; returns how many were.
    pub fn mark_completed(&self, ids: Vec<i64>, owner: &Arc<str>, now_ms: i64) -> Result<usize> {
        self.write(Self::completed(ids, owner, now_ms))
            .map(Reply::count)
    }

    /// [`Shard::mark_completed`] without waiting: it commits with the next group. For tasks
    /// whose loss is repaired anyway (a task left unmarked is resent after its lease, and the
    /// consumer deduplicates it).
    pub fn mark_completed_detached(
        &self,
        ids: Vec<i64>,
        owner: &Arc<str>,
        now_ms: i64,
    ) -> Result<()> {
        self.writer
            .send_detached(Self::completed(ids, owner, now_ms))
    }

    fn completed(ids: Vec<i64>, owner: &Arc<str>, now_ms: i64) -> Op {
        Op::MarkCompleted {
            ids,
            owner: owner.clone(),
            now_ms,
        }
    }

    /// Record failed publishes of tasks `owner` still holds; returns how many were recorded.
    pub fn mark_failed(
        &self,
        failures: Vec<Failure>,
        owner: &Arc<str>,
        now_ms: i64,
    ) -> Result<usize> {
        self.write(Op::MarkFailed {
            failures,
            owner: owner.clone(),
            now_ms,
        })
        .map(Reply::count)
    }

    /// Counts for `status`.
    pub fn status(&self, tb_count: u32) -> Result<ShardStatus> {
        self.reads.status(self.db, tb_count)
    }

    /// Whether the shard answers a trivial query, without counting anything.
    pub fn ping(&self) -> Result<()> {
        self.reads.ping()
    }

    /// The raw facts the audit compares, read in one snapshot.
    pub fn audit_facts(&self, tb_count: u32) -> Result<crate::audit::Facts> {
        self.reads.audit_facts(self.db, tb_count)
    }

    /// Tasks, oldest first.
    pub fn list_tasks(&self, state: Option<TaskState>, limit: usize) -> Result<Vec<TaskRow>> {
        self.reads.list_tasks(state, limit)
    }
}

/// Every shard of a data directory, opened and checked against the layout.
pub struct Store {
    layout: Layout,
    shards: Vec<Shard>,
}

impl Store {
    /// Open the shards `settings.store` names: the files of `settings.data_dir`, or the
    /// databases of a MySQL server; with `create`, make what is missing (`init`). Refuses shards
    /// of another layout or schema, and files or databases that are not shards.
    pub fn open(settings: &Settings, create: bool) -> Result<Store> {
        Store::open_as(settings, create, create)
    }

    /// Open the shards for a command that runs the pipeline (`serve`, `load`, `award`): SQLite
    /// shard files are created on first use (one info line with the path each), but only `init`
    /// creates or alters a MySQL database: one that is missing, or lacks big-market's tables or
    /// columns, is refused with one line that says to run `init`, and nothing is touched.
    pub fn open_to_run(settings: &Settings) -> Result<Store> {
        Store::open_as(settings, true, false)
    }

    /// Open with `create_files`: make missing SQLite files; `create_databases`: make or alter
    /// MySQL databases.
    fn open_as(settings: &Settings, create_files: bool, create_databases: bool) -> Result<Store> {
        let opened = match &settings.store {
            StoreTarget::Sqlite => backend_sqlite::open_all(settings, create_files)?,
            StoreTarget::Mysql(target) => {
                backend_mysql::open_all(settings, target, create_databases)?
            }
        };
        let mut shards = Vec::with_capacity(opened.len());
        for (i, o) in opened.into_iter().enumerate() {
            let db = i as u32 + 1;
            let handoff = Arc::new(Handoff::new(settings.handoff_capacity));
            let writer = writer::Writer::spawn(
                db,
                &o.location,
                o.lanes,
                o.lane_of,
                o.call_deadline,
                o.group_commit_max,
                handoff.clone(),
            )?;
            shards.push(Shard {
                db,
                location: o.location,
                reads: o.reads,
                handoff,
                writer,
            });
        }
        Ok(Store {
            layout: settings.layout,
            shards,
        })
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

    /// Insert an award and its task in one transaction on the user's shard, for an async
    /// caller: awaits the commit without blocking its thread.
    pub async fn insert_award_async(
        &self,
        record: AwardRecord,
        topic: &Arc<str>,
        owner: &Arc<str>,
        lease: Duration,
        now_ms: i64,
    ) -> Result<SavedTask> {
        let (db, op) = self.save_op(record, topic, owner, lease, now_ms);
        self.shard(db).writer.call_async(op).await.map(Reply::saved)
    }

    /// Insert many awards, each with its task (each fails alone, a duplicate order id writing
    /// nothing); each shard's share is queued at once, so it lands in the same group commit.
    /// One result per award, in order.
    pub fn insert_awards(
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
        self.run_per_shard(per_shard, results, Reply::saved)
    }

    /// Run each shard's ops in one group commit and put each reply at its caller's index;
    /// `results` already holds the answers decided without a write.
    fn run_per_shard<T>(
        &self,
        per_shard: BTreeMap<u32, (Vec<usize>, Vec<Op>)>,
        mut results: Vec<Option<Result<T>>>,
        unpack: impl Fn(Reply) -> T,
    ) -> Vec<Result<T>> {
        // Every shard's ops are queued before any answer is awaited: the shards commit their
        // shares side by side rather than one after the other.
        let pending: Vec<_> = per_shard
            .into_iter()
            .map(|(db, (idx, ops))| (db, idx, self.shard(db).writer.submit_many(ops)))
            .collect();
        for (db, idx, pending) in pending {
            for (i, reply) in idx.into_iter().zip(self.shard(db).writer.answers(pending)) {
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
        self.run_per_shard(per_shard, results, Reply::delivered)
    }

    /// A user's award records, newest first, at most `limit`.
    pub fn awards_of(&self, user: &crate::model::UserId, limit: usize) -> Result<Vec<AwardRow>> {
        let r = route(user.as_str(), self.layout);
        self.shard(r.db)
            .reads
            .awards_of(&award_table(r.table), user.as_str(), limit)
    }

    /// Whether every shard answers a trivial query (for readiness probes: unlike `status`, it
    /// counts nothing, so it costs the same on a shard of any size).
    pub fn ping(&self) -> Result<()> {
        self.shards.iter().try_for_each(Shard::ping)
    }

    /// Copy every shard, consistent as of one read transaction each, into `dir` under the
    /// shard's own file name, while the service goes on writing. The copies are written into
    /// `<dir>.partial`, synced, and the directory renamed to `dir` at the end, so `dir` holds
    /// either every shard or nothing (a copy cut short leaves only `<dir>.partial`). Refuses a
    /// `dir` that exists and is not empty (nothing is overwritten), and a store whose shards are
    /// not files (MySQL: use the server's own backup). `progress` hears of each copy.
    pub fn backup(
        &self,
        dir: &std::path::Path,
        mut progress: impl FnMut(&BackedUp),
    ) -> Result<Vec<BackedUp>> {
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let mut names = Vec::new();
        for shard in &self.shards {
            let file = shard.reads.file().ok_or_else(|| {
                Error::Config(
                    "backup copies SQLite shard files; back a MySQL store up with the server's own tools (e.g. mysqldump --single-transaction)".into(),
                )
            })?;
            names.push(
                file.file_name()
                    .expect("a shard file has a name")
                    .to_owned(),
            );
        }
        if dir.exists() {
            let empty = std::fs::read_dir(dir).map_err(io(dir))?.next().is_none();
            if !empty {
                return Err(Error::Config(format!(
                    "{} exists and is not empty: back up into a new directory (nothing was written)",
                    dir.display()
                )));
            }
        }
        // Staged beside DIR, under its own name: `copy/` names the same directory as `copy`.
        let name = dir.file_name().ok_or_else(|| {
            Error::Config(format!(
                "{} names no directory to create: give a path such as backups/today (nothing was written)",
                dir.display()
            ))
        })?;
        let mut staged = name.to_owned();
        staged.push(".partial");
        let partial = dir.with_file_name(staged);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        let mut done = Vec::new();
        for (shard, name) in self.shards.iter().zip(names) {
            let started = std::time::Instant::now();
            let copy = partial.join(&name);
            shard.reads.copy_into(&copy)?;
            std::fs::File::open(&copy)
                .and_then(|f| f.sync_all())
                .map_err(io(&copy))?;
            let bytes = std::fs::metadata(&copy).map_err(io(&copy))?.len();
            let b = BackedUp {
                db: shard.db,
                target: dir.join(&name),
                bytes,
                took: started.elapsed(),
            };
            progress(&b);
            done.push(b);
        }
        std::fs::File::open(&partial)
            .and_then(|d| d.sync_all())
            .map_err(io(&partial))?;
        if dir.exists() {
            std::fs::remove_dir(dir).map_err(io(dir))?;
        }
        std::fs::rename(&partial, dir).map_err(io(dir))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io(parent))?;
        }
        Ok(done)
    }

    /// Per-shard counts.
    pub fn status(&self) -> Result<Vec<ShardStatus>> {
        self.shards
            .iter()
            .map(|s| s.status(self.layout.tb_count()))
            .collect()
    }

    /// Run a counting op on every shard; returns the sum.
    fn count_all(&self, op: impl Fn() -> Op) -> Result<usize> {
        let mut n = 0;
        for s in &self.shards {
            n += s.write(op())?.count();
        }
        Ok(n)
    }

    /// Release every claim `owner` holds, on every shard (a stopping process hands its tasks
    /// back: they are due at once); returns how many were released.
    pub fn release(&self, owner: &Arc<str>, now_ms: i64) -> Result<usize> {
        self.count_all(|| Op::Release {
            owner: owner.clone(),
            now_ms,
        })
    }

    /// Make parked (`dead`) or failed tasks due now: the one with `message_id`, or every task in
    /// `state`. Returns how many were requeued.
    pub fn requeue(
        &self,
        message_id: Option<&str>,
        state: Option<TaskState>,
        now_ms: i64,
    ) -> Result<usize> {
        self.count_all(|| Op::Requeue {
            message_id: message_id.map(str::to_string),
            state,
            now_ms,
        })
    }

    /// Settle completed tasks older than `before_ms` on every shard; returns how many. SQLite
    /// folds them, with their delivery log, into the shard's watermark (the audit's proof
    /// holds: see [`crate::audit`]), a step at a time so that saves interleave; MySQL deletes
    /// completed tasks and keeps the delivery log (the Java service may read those tables).
    /// Runs until nothing is left to settle (`tasks purge`).
    pub fn purge(&self, before_ms: i64) -> Result<usize> {
        self.purge_within(before_ms, None)
    }

    /// [`Store::purge`] for about `budget` (a step is not cut short): the scanner's, so that a
    /// large backlog of settled tasks never holds its claims back for long. Each shard has an
    /// equal share of the budget and at least one step a call, so a long backlog on one shard
    /// does not starve the others; a shard whose step fails does not stop the others, and the
    /// first failure is returned after them.
    pub fn purge_within(&self, before_ms: i64, budget: Option<Duration>) -> Result<usize> {
        let share = budget.map(|b| b / self.shards.len().max(1) as u32);
        let mut total = 0;
        let mut first_err = None;
        for s in &self.shards {
            let started = std::time::Instant::now();
            loop {
                match s.write(Op::Purge { before_ms }) {
                    Ok(r) => {
                        let n = r.count();
                        total += n;
                        if n == 0 || share.is_some_and(|b| started.elapsed() >= b) {
                            break;
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        match first_err {
            None => Ok(total),
            Some(e) => {
                if total > 0 {
                    log::info!("compacted {total} completed tasks before a shard failed");
                }
                Err(e)
            }
        }
    }

    /// Return once every write queued before it, on every shard and lane (detached ones too),
    /// has committed.
    pub fn barrier(&self) -> Result<()> {
        self.count_all(|| Op::Barrier).map(|_| ())
    }
}
