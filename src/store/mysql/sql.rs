//! The MySQL/MariaDB backend's statements, one function each. Each takes anything that runs
//! statements (a connection or a transaction) and returns plain values. The original's datetime
//! columns are written with `FROM_UNIXTIME(ms / 1000)` and read with `UNIX_TIMESTAMP`, both in the
//! session time zone, as the original's `now()`; big-market's own columns hold epoch ms.

use mysql::prelude::Queryable;
use mysql::{Params, Row, Value};

use crate::model::TaskState;
use crate::store::{AwardRow, TaskRow};

pub(crate) type Sql<T> = std::result::Result<T, mysql::Error>;

/// The schema text, compiled in.
pub(crate) const SCHEMA: &str = include_str!("../../../schema.mysql.sql");
/// The schema version this build writes and reads.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// `next_attempt_at` of a task no claim may take again (completed or dead): out of the claim
/// query's index range, so settled tasks cost the claim nothing.
const NEVER: i64 = i64::MAX;

/// Run a statement; returns the rows it changed and the last insert id.
fn exec(q: &mut impl Queryable, sql: &str, params: impl Into<Params>) -> Sql<(u64, u64)> {
    let r = q.exec_iter(sql, params)?;
    Ok((r.affected_rows(), r.last_insert_id().unwrap_or(0)))
}

fn changed(q: &mut impl Queryable, sql: &str, params: impl Into<Params>) -> Sql<usize> {
    Ok(exec(q, sql, params)?.0 as usize)
}

/// `?, ?, ?` for `n` values.
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn col<T: mysql::prelude::FromValue>(row: &mut Row, i: usize) -> Sql<T> {
    match row.take_opt::<T, usize>(i) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(mysql::Error::FromValueError(e.0)),
        None => Err(mysql::Error::FromRowError(row.clone())),
    }
}

/// Create every missing table of the schema (each statement is `IF NOT EXISTS`) and the layout
/// row, if it is not there yet.
pub(crate) fn apply_schema(
    q: &mut impl Queryable,
    db_idx: u32,
    db_count: u32,
    tb_count: u32,
) -> Sql<()> {
    for script in crate::store::schema_scripts(SCHEMA, tb_count) {
        q.query_drop(script)?;
    }
    q.exec_drop(
        "INSERT IGNORE INTO shard_meta (id, schema_version, db_idx, db_count, tb_count, next_seq) VALUES (1, ?, ?, ?, ?, 1)",
        (SCHEMA_VERSION, db_idx, db_count, tb_count),
    )
}

/// The columns big-market adds to the original's `task` table, as `schema.mysql.sql` defines
/// them: each has a default, so the original's inserts, which do not name them, still work.
pub(crate) const TASK_COLUMNS_ADDED: [(&str, &str); 5] = [
    ("seq", "bigint unsigned NULL DEFAULT NULL"),
    ("attempts", "int unsigned NOT NULL DEFAULT 0"),
    ("next_attempt_at", "bigint NOT NULL DEFAULT 0"),
    ("claimed_by", "varchar(64) NULL DEFAULT NULL"),
    ("last_error", "varchar(512) NULL DEFAULT NULL"),
];

/// Add big-market's `columns` (and their indexes) to the original's `task` table, and take the
/// tasks it already settled out of the claim index's range.
pub(crate) fn add_task_columns(q: &mut impl Queryable, columns: &[&str]) -> Sql<()> {
    let mut alter: Vec<String> = TASK_COLUMNS_ADDED
        .iter()
        .filter(|(name, _)| columns.contains(name))
        .map(|(name, def)| format!("ADD COLUMN {name} {def}"))
        .collect();
    let indexes: Vec<String> = q.query(
        "SELECT DISTINCT CAST(index_name AS CHAR) FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name = 'task'",
    )?;
    if !indexes.iter().any(|i| i == "uq_task_seq") {
        alter.push("ADD UNIQUE KEY uq_task_seq (seq)".into());
    }
    if !indexes.iter().any(|i| i == "idx_task_due") {
        alter.push("ADD KEY idx_task_due (next_attempt_at)".into());
    }
    q.query_drop(format!("ALTER TABLE task {}", alter.join(", ")))?;
    q.exec_drop(
        "UPDATE task SET next_attempt_at = ? WHERE state NOT IN ('create', 'fail')",
        (NEVER,),
    )
}

/// The tables of the current database, with their columns.
pub(crate) fn columns(q: &mut impl Queryable) -> Sql<Vec<(String, String)>> {
    q.query(
        "SELECT CAST(table_name AS CHAR), CAST(column_name AS CHAR) FROM information_schema.columns WHERE table_schema = DATABASE()",
    )
}

/// The layout row: `(schema_version, db_idx, db_count, tb_count)`.
pub(crate) fn shard_meta(q: &mut impl Queryable) -> Sql<Option<(u32, u32, u32, u32)>> {
    q.query_first("SELECT schema_version, db_idx, db_count, tb_count FROM shard_meta WHERE id = 1")
}

/// Take `n` sequence numbers under the counter row's lock (held to the end of the
/// transaction); returns the first.
pub(crate) fn take_seqs(q: &mut impl Queryable, n: u64) -> Sql<u64> {
    let (_, next) = exec(
        q,
        "UPDATE shard_meta SET next_seq = LAST_INSERT_ID(next_seq + ?) WHERE id = 1",
        (n,),
    )?;
    Ok(next - n)
}

/// An award record to insert.
pub(crate) struct NewAward<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) activity_id: i64,
    pub(crate) strategy_id: i64,
    pub(crate) order_id: &'a str,
    pub(crate) award_id: i32,
    pub(crate) award_title: &'a str,
    pub(crate) award_time_ms: i64,
}

impl<'a> NewAward<'a> {
    /// The row of an award record.
    pub(crate) fn of(r: &'a crate::model::AwardRecord) -> Self {
        NewAward {
            user_id: r.user_id.as_str(),
            activity_id: r.activity_id,
            strategy_id: r.strategy_id,
            order_id: r.order_id.as_str(),
            award_id: r.award_id,
            award_title: &r.award_title,
            award_time_ms: r.award_time_ms,
        }
    }
}

/// A statement with `?` placeholders and its values. It goes out prepared on its own, or inside
/// a [`Script`] with the values bound as the driver's escaped literals: one definition of each
/// statement serves both. The SQL text is ours; no `?` stands anywhere but as a placeholder.
pub(crate) struct Stmt {
    pub(crate) sql: String,
    pub(crate) params: Vec<Value>,
}

impl Stmt {
    /// Run it prepared; returns the rows it changed and the last insert id.
    fn exec(self, q: &mut impl Queryable) -> Sql<(u64, u64)> {
        exec(q, &self.sql, self.params)
    }
}

/// Insert award records into one split table, in one statement.
pub(crate) fn award_insert(table: &str, rows: &[NewAward<'_>], now_ms: i64) -> Stmt {
    // FROM_UNIXTIME stops at 2038 on some servers; an award time may be as late as 9999.
    let one = "(?, ?, ?, ?, ?, ?, TIMESTAMPADD(MICROSECOND, ? * 1000, FROM_UNIXTIME(0)), 'create', FROM_UNIXTIME(? / 1000), FROM_UNIXTIME(? / 1000))";
    let sql = format!(
        "INSERT INTO {table} (user_id, activity_id, strategy_id, order_id, award_id, award_title, award_time, award_state, create_time, update_time) VALUES {}",
        vec![one; rows.len()].join(", ")
    );
    let mut params: Vec<Value> = Vec::with_capacity(rows.len() * 9);
    for r in rows {
        params.extend([
            r.user_id.into(),
            r.activity_id.into(),
            r.strategy_id.into(),
            r.order_id.into(),
            r.award_id.into(),
            r.award_title.into(),
            r.award_time_ms.into(),
            now_ms.into(),
            now_ms.into(),
        ]);
    }
    Stmt { sql, params }
}

/// [`award_insert`], prepared.
pub(crate) fn insert_awards(
    q: &mut impl Queryable,
    table: &str,
    rows: &[NewAward<'_>],
    now_ms: i64,
) -> Sql<()> {
    award_insert(table, rows, now_ms).exec(q).map(|_| ())
}

/// A task row to insert, claimed by the writing process until its lease expires.
pub(crate) struct NewTask<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) message_id: &'a str,
    pub(crate) message: &'a str,
    pub(crate) seq: u64,
    pub(crate) owner: &'a str,
    pub(crate) lease_until_ms: i64,
}

/// Insert tasks in one statement.
pub(crate) fn task_insert_stmt(rows: &[NewTask<'_>], now_ms: i64) -> Stmt {
    let one =
        "(?, ?, ?, ?, 'create', FROM_UNIXTIME(? / 1000), FROM_UNIXTIME(? / 1000), ?, 0, ?, ?)";
    let sql = format!(
        "INSERT INTO task (user_id, topic, message_id, message, state, create_time, update_time, seq, attempts, next_attempt_at, claimed_by) VALUES {}",
        vec![one; rows.len()].join(", ")
    );
    let mut params: Vec<Value> = Vec::with_capacity(rows.len() * 9);
    for t in rows {
        params.extend([
            t.user_id.into(),
            t.topic.into(),
            t.message_id.into(),
            t.message.into(),
            now_ms.into(),
            now_ms.into(),
            t.seq.into(),
            t.lease_until_ms.into(),
            t.owner.into(),
        ]);
    }
    Stmt { sql, params }
}

/// [`task_insert_stmt`], prepared; returns the id of each task, in order.
pub(crate) fn insert_tasks(
    q: &mut impl Queryable,
    rows: &[NewTask<'_>],
    now_ms: i64,
) -> Sql<Vec<i64>> {
    task_insert_stmt(rows, now_ms).exec(q)?;
    let ids = tasks_by_seq(rows);
    let found: Vec<(i64, u64)> = q.exec(ids.sql, ids.params)?;
    ids_in_order(found, rows)
}

/// `(id, seq)` of the tasks with the sequence numbers of `rows` (ids need not be consecutive:
/// interleaved auto-increment).
fn tasks_by_seq(rows: &[NewTask<'_>]) -> Stmt {
    Stmt {
        sql: "SELECT id, seq FROM task WHERE seq BETWEEN ? AND ?".into(),
        params: vec![
            rows.first().map_or(0, |t| t.seq).into(),
            rows.last().map_or(0, |t| t.seq).into(),
        ],
    }
}

/// The id of each of `rows`, in order, from the `(id, seq)` pairs read back.
fn ids_in_order(found: Vec<(i64, u64)>, rows: &[NewTask<'_>]) -> Sql<Vec<i64>> {
    let by_seq: std::collections::HashMap<u64, i64> =
        found.into_iter().map(|(i, s)| (s, i)).collect();
    rows.iter()
        .map(|t| {
            by_seq.get(&t.seq).copied().ok_or_else(|| {
                mysql::Error::MySqlError(mysql::MySqlError {
                    state: "HY000".into(),
                    message: format!("task {} is not where it was just inserted", t.seq),
                    code: 0,
                })
            })
        })
        .collect()
}

const TASK_COLUMNS: &str = "id, user_id, topic, message_id, message, COALESCE(seq, 0), attempts, state, next_attempt_at, claimed_by, last_error, CAST(UNIX_TIMESTAMP(create_time) * 1000 AS SIGNED), CAST(UNIX_TIMESTAMP(update_time) * 1000 AS SIGNED)";

fn task_row(mut r: Row) -> Sql<TaskRow> {
    Ok(TaskRow {
        id: col(&mut r, 0)?,
        user_id: col(&mut r, 1)?,
        topic: col(&mut r, 2)?,
        message_id: col(&mut r, 3)?,
        message: col(&mut r, 4)?,
        seq: col(&mut r, 5)?,
        attempts: col(&mut r, 6)?,
        state: col(&mut r, 7)?,
        next_attempt_at: col(&mut r, 8)?,
        claimed_by: col(&mut r, 9)?,
        last_error: col(&mut r, 10)?,
        create_time: col(&mut r, 11)?,
        update_time: col(&mut r, 12)?,
    })
}

fn task_rows(q: &mut impl Queryable, sql: &str, params: impl Into<Params>) -> Sql<Vec<TaskRow>> {
    let rows: Vec<Row> = q.exec(sql, params)?;
    rows.into_iter().map(task_row).collect()
}

/// Rounds of one claim that may meet settled tasks in the due range (see [`claim_due`]).
const CLAIM_ROUNDS: usize = 8;

/// Claim up to `limit` due tasks for `owner` until `lease_until_ms`. Rows another process is
/// claiming right now are skipped, not waited for (`SKIP LOCKED`).
///
/// The claim walks the due range (`next_attempt_at <= now`) from its start. Tasks settled by
/// the original service keep the `next_attempt_at` they had (0 for its own rows), so they sit at
/// the start of that range: each claim moves those it meets out of the range for good, and
/// reads on, for at most [`CLAIM_ROUNDS`] windows of `limit` rows. Claimed rows leave the range
/// as they are leased, so no row is read twice.
pub(crate) fn claim_due(
    q: &mut impl Queryable,
    owner: &str,
    now_ms: i64,
    lease_until_ms: i64,
    limit: usize,
) -> Sql<Vec<TaskRow>> {
    let mut ids: Vec<i64> = Vec::new();
    for _ in 0..CLAIM_ROUNDS {
        let want = limit - ids.len();
        let window: Vec<(i64, String)> = q.exec(
            "SELECT id, state FROM task WHERE next_attempt_at <= ?
             ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED",
            (now_ms, want as u64),
        )?;
        let (due, settled): (Vec<_>, Vec<_>) = window
            .iter()
            .partition(|(_, state)| matches!(state.as_str(), "create" | "fail"));
        let due: Vec<i64> = due.into_iter().map(|(id, _)| *id).collect();
        if !due.is_empty() {
            let mut params: Vec<Value> = vec![owner.into(), lease_until_ms.into(), now_ms.into()];
            params.extend(due.iter().map(|i| Value::from(*i)));
            exec(
                q,
                &format!(
                    "UPDATE task SET claimed_by = ?, next_attempt_at = ?, update_time = FROM_UNIXTIME(? / 1000) WHERE id IN ({})",
                    marks(due.len())
                ),
                params,
            )?;
            ids.extend(due);
        }
        if settled.is_empty() {
            break;
        }
        let mut params: Vec<Value> = vec![NEVER.into()];
        params.extend(settled.iter().map(|(id, _)| Value::from(*id)));
        exec(
            q,
            &format!(
                "UPDATE task SET next_attempt_at = ? WHERE state NOT IN ('create', 'fail') AND id IN ({})",
                marks(settled.len())
            ),
            params,
        )?;
        if window.len() < want || ids.len() >= limit {
            break;
        }
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = task_rows(
        q,
        &format!(
            "SELECT {TASK_COLUMNS} FROM task WHERE id IN ({})",
            marks(ids.len())
        ),
        ids,
    )?;
    out.sort_by_key(|t| (t.seq, t.id));
    Ok(out)
}

/// Mark tasks completed, those still claimed by `owner` (any: `None`) and not settled; a settled
/// task leaves the claim index's range.
pub(crate) fn tasks_completion(ids: &[i64], owner: Option<&str>, now_ms: i64) -> Stmt {
    let mut params: Vec<Value> = vec![NEVER.into(), now_ms.into(), owner.into(), owner.into()];
    params.extend(ids.iter().map(|i| Value::from(*i)));
    Stmt {
        sql: format!(
            "UPDATE task SET state = 'completed', claimed_by = NULL, last_error = NULL, next_attempt_at = ?, update_time = FROM_UNIXTIME(? / 1000)
             WHERE state IN ('create', 'fail') AND (? IS NULL OR claimed_by = ?) AND id IN ({})",
            marks(ids.len())
        ),
        params,
    }
}

/// [`tasks_completion`], prepared; returns the rows changed.
pub(crate) fn mark_completed(
    q: &mut impl Queryable,
    ids: &[i64],
    owner: Option<&str>,
    now_ms: i64,
) -> Sql<usize> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(tasks_completion(ids, owner, now_ms).exec(q)?.0 as usize)
}

/// Record a failed publish by `owner` (a task another claim took since is left alone).
#[allow(clippy::too_many_arguments)]
pub(crate) fn mark_failed(
    q: &mut impl Queryable,
    id: i64,
    owner: &str,
    state: TaskState,
    attempts: u32,
    next_attempt_at: i64,
    error: &str,
    now_ms: i64,
) -> Sql<usize> {
    let due = if state == TaskState::Dead {
        NEVER
    } else {
        next_attempt_at
    };
    let error: String = error.chars().take(512).collect();
    changed(
        q,
        "UPDATE task SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?, claimed_by = NULL, update_time = FROM_UNIXTIME(? / 1000)
         WHERE id = ? AND claimed_by = ? AND state IN ('create', 'fail')",
        (state.as_str(), attempts, due, error, now_ms, id, owner),
    )
}

/// Extend the lease of a task `owner` still holds unsent; 0 if another claim took it.
pub(crate) fn renew_lease(
    q: &mut impl Queryable,
    id: i64,
    owner: &str,
    lease_until_ms: i64,
    now_ms: i64,
) -> Sql<usize> {
    changed(
        q,
        "UPDATE task SET next_attempt_at = ?, update_time = FROM_UNIXTIME(? / 1000)
         WHERE id = ? AND claimed_by = ? AND state IN ('create', 'fail')",
        (lease_until_ms, now_ms, id, owner),
    )
}

/// Give back every claim `owner` holds, due now.
pub(crate) fn release_claims(q: &mut impl Queryable, owner: &str, now_ms: i64) -> Sql<usize> {
    changed(
        q,
        "UPDATE task SET claimed_by = NULL, next_attempt_at = ?, update_time = FROM_UNIXTIME(? / 1000)
         WHERE claimed_by = ? AND state IN ('create', 'fail')",
        (now_ms, now_ms, owner),
    )
}

/// Put tasks back in line, due now, attempts reset: one message id, or every task in a state.
pub(crate) fn requeue(
    q: &mut impl Queryable,
    message_id: Option<&str>,
    state: Option<TaskState>,
    now_ms: i64,
) -> Sql<usize> {
    let state = state.map(TaskState::as_str);
    changed(
        q,
        "UPDATE task SET state = 'fail', attempts = 0, next_attempt_at = ?, claimed_by = NULL, update_time = FROM_UNIXTIME(? / 1000)
         WHERE state IN ('fail', 'dead', 'create') AND (? IS NULL OR message_id = ?) AND (? IS NULL OR state = ?)",
        (now_ms, now_ms, message_id, message_id, state, state),
    )
}

/// Delete completed tasks last changed before `before_ms`.
pub(crate) fn purge_completed(q: &mut impl Queryable, before_ms: i64) -> Sql<usize> {
    changed(
        q,
        // Only ours (with a sequence number): the Java service's rows are its own, and the audit
        // tells the original's awards apart by them.
        "DELETE FROM task WHERE state = 'completed' AND seq IS NOT NULL AND update_time < FROM_UNIXTIME(? / 1000)",
        (before_ms,),
    )
}

/// Log a delivery; returns whether it is the first receipt of `message_id`.
pub(crate) fn record_delivery(
    q: &mut impl Queryable,
    message_id: &str,
    seq: u64,
    order_id: &str,
    now_ms: i64,
) -> Sql<bool> {
    // One row changed: inserted; two: an existing row was updated.
    let (n, _) = exec(
        q,
        "INSERT INTO delivery (message_id, seq, order_id, receipts, delivered_at) VALUES (?, ?, ?, 1, ?)
         ON DUPLICATE KEY UPDATE receipts = receipts + 1",
        (message_id, seq, order_id, now_ms),
    )?;
    Ok(n == 1)
}

/// Log first receipts, in one statement.
pub(crate) fn delivery_insert(rows: &[(&str, u64, &str)], now_ms: i64) -> Stmt {
    let sql = format!(
        "INSERT INTO delivery (message_id, seq, order_id, receipts, delivered_at) VALUES {}",
        vec!["(?, ?, ?, 1, ?)"; rows.len()].join(", ")
    );
    let mut params: Vec<Value> = Vec::with_capacity(rows.len() * 4);
    for (m, s, o) in rows {
        params.extend([(*m).into(), (*s).into(), (*o).into(), now_ms.into()]);
    }
    Stmt { sql, params }
}

/// [`delivery_insert`], prepared.
pub(crate) fn insert_deliveries(
    q: &mut impl Queryable,
    rows: &[(&str, u64, &str)],
    now_ms: i64,
) -> Sql<()> {
    delivery_insert(rows, now_ms).exec(q).map(|_| ())
}

/// Count one more receipt of a message the log holds.
fn receipt_count(message_id: &str) -> Stmt {
    Stmt {
        sql: "UPDATE delivery SET receipts = receipts + 1 WHERE message_id = ?".into(),
        params: vec![message_id.into()],
    }
}

/// Which of these message ids the delivery log holds.
fn deliveries_lookup(ids: &[&str]) -> Stmt {
    Stmt {
        sql: format!(
            "SELECT message_id FROM delivery WHERE message_id IN ({})",
            marks(ids.len())
        ),
        params: ids.iter().map(|i| Value::from(*i)).collect(),
    }
}

/// [`deliveries_lookup`], prepared.
pub(crate) fn logged_deliveries(q: &mut impl Queryable, ids: &[&str]) -> Sql<Vec<String>> {
    let s = deliveries_lookup(ids);
    q.exec(s.sql, s.params)
}

/// `(table, order_id, user_id)` of the award records among these order ids in one split table.
fn awards_lookup(table: &str, orders: &[&str]) -> Stmt {
    let mut params: Vec<Value> = vec![table.into()];
    params.extend(orders.iter().map(|o| Value::from(*o)));
    Stmt {
        sql: format!(
            "SELECT ?, order_id, user_id FROM {table} WHERE order_id IN ({})",
            marks(orders.len())
        ),
        params,
    }
}

/// [`awards_lookup`], prepared.
pub(crate) fn existing_awards(
    q: &mut impl Queryable,
    table: &str,
    orders: &[&str],
) -> Sql<Vec<(String, String, String)>> {
    let s = awards_lookup(table, orders);
    q.exec(s.sql, s.params)
}

/// Move award records from `create` to `completed`.
fn awards_completion(table: &str, orders: &[&str], now_ms: i64) -> Stmt {
    let mut params: Vec<Value> = vec![now_ms.into()];
    params.extend(orders.iter().map(|o| Value::from(*o)));
    Stmt {
        sql: format!(
            "UPDATE {table} SET award_state = 'completed', update_time = FROM_UNIXTIME(? / 1000)
             WHERE award_state = 'create' AND order_id IN ({})",
            marks(orders.len())
        ),
        params,
    }
}

/// [`awards_completion`], prepared; returns the rows changed.
pub(crate) fn complete_awards(
    q: &mut impl Queryable,
    table: &str,
    orders: &[&str],
    now_ms: i64,
) -> Sql<usize> {
    Ok(awards_completion(table, orders, now_ms).exec(q)?.0 as usize)
}

/// Whether the award record of `order_id` belongs to `user_id`.
pub(crate) fn award_exists(
    q: &mut impl Queryable,
    table: &str,
    user_id: &str,
    order_id: &str,
) -> Sql<bool> {
    let found: Option<u8> = q.exec_first(
        format!("SELECT 1 FROM {table} WHERE order_id = ? AND user_id = ?"),
        (order_id, user_id),
    )?;
    Ok(found.is_some())
}

/// Tasks with sequence numbers in `from..=to` still claimed by `owner` and unsent, in order.
pub(crate) fn leased_in_range(
    q: &mut impl Queryable,
    owner: &str,
    from: u64,
    to: u64,
    limit: usize,
) -> Sql<Vec<TaskRow>> {
    task_rows(
        q,
        &format!(
            "SELECT {TASK_COLUMNS} FROM task WHERE seq BETWEEN ? AND ? AND claimed_by = ? AND state = 'create' ORDER BY seq LIMIT ?"
        ),
        (from, to, owner, limit as u64),
    )
}

/// The state of the task with this message id.
pub(crate) fn task_state(q: &mut impl Queryable, message_id: &str) -> Sql<Option<String>> {
    q.exec_first("SELECT state FROM task WHERE message_id = ?", (message_id,))
}

/// Tasks in sequence order (the original's, which have none, first), optionally in one state.
pub(crate) fn list_tasks(
    q: &mut impl Queryable,
    state: Option<TaskState>,
    limit: usize,
) -> Sql<Vec<TaskRow>> {
    let state = state.map(TaskState::as_str);
    task_rows(
        q,
        &format!(
            "SELECT {TASK_COLUMNS} FROM task WHERE (? IS NULL OR state = ?) ORDER BY seq, id LIMIT ?"
        ),
        (state, state, limit as u64),
    )
}

/// Tasks per state.
pub(crate) fn count_tasks_by_state(q: &mut impl Queryable) -> Sql<Vec<(String, u64)>> {
    q.query("SELECT state, COUNT(*) FROM task GROUP BY state")
}

/// Award records per state in one split table.
pub(crate) fn count_awards_by_state(
    q: &mut impl Queryable,
    table: &str,
) -> Sql<Vec<(String, u64)>> {
    q.query(format!(
        "SELECT award_state, COUNT(*) FROM {table} GROUP BY award_state"
    ))
}

/// Creation time of the oldest task not completed or dead, epoch ms.
pub(crate) fn oldest_pending(q: &mut impl Queryable) -> Sql<Option<i64>> {
    let v: Option<Option<i64>> = q.query_first(
        "SELECT CAST(UNIX_TIMESTAMP(MIN(create_time)) * 1000 AS SIGNED) FROM task WHERE state IN ('create', 'fail')",
    )?;
    Ok(v.flatten())
}

/// `(messages handled, receipts)`.
pub(crate) fn delivery_totals(q: &mut impl Queryable) -> Sql<(u64, u64)> {
    let v: Option<(u64, u64)> = q.query_first(
        "SELECT COUNT(*), CAST(COALESCE(SUM(receipts), 0) AS UNSIGNED) FROM delivery",
    )?;
    Ok(v.unwrap_or((0, 0)))
}

/// The highest sequence number handed out.
pub(crate) fn last_seq(q: &mut impl Queryable) -> Sql<u64> {
    let v: Option<u64> = q.query_first("SELECT next_seq - 1 FROM shard_meta WHERE id = 1")?;
    Ok(v.unwrap_or(0))
}

/// Delivered sequence numbers, ascending, with receipts (messages without one left out).
pub(crate) fn delivered_seqs(q: &mut impl Queryable) -> Sql<Vec<(u64, u32)>> {
    q.query("SELECT seq, receipts FROM delivery WHERE seq > 0 ORDER BY seq")
}

/// Every task's sequence number (0 for the original's), creation time, the order id its
/// message names, and state.
pub(crate) fn task_orders(q: &mut impl Queryable) -> Sql<Vec<crate::audit::TaskFact>> {
    let rows: Vec<(u64, String, i64, Option<String>, String)> = q.query(
        "SELECT COALESCE(seq, 0), user_id, CAST(UNIX_TIMESTAMP(create_time) * 1000 AS SIGNED),
                JSON_UNQUOTE(JSON_EXTRACT(message, '$.data.orderId')), state
         FROM task ORDER BY seq",
    )?;
    Ok(rows
        .into_iter()
        .map(
            |(seq, user_id, created_ms, order_id, state)| crate::audit::TaskFact {
                seq,
                user_id,
                created_ms,
                // A message that is not JSON, or names no order, names none.
                order_id: order_id.filter(|o| o != "null"),
                state,
            },
        )
        .collect())
}

/// Order ids of every delivered message, with its sequence number (0: none).
pub(crate) fn delivered_orders(q: &mut impl Queryable) -> Sql<Vec<(String, u64)>> {
    q.query("SELECT order_id, seq FROM delivery WHERE order_id <> ''")
}

/// The award records of one split table: order id, user, state.
pub(crate) fn award_orders(
    q: &mut impl Queryable,
    table: &str,
) -> Sql<Vec<crate::audit::AwardFact>> {
    let rows: Vec<(String, String, String)> = q.query(format!(
        "SELECT order_id, user_id, award_state FROM {table}"
    ))?;
    Ok(rows
        .into_iter()
        .map(|(order_id, user_id, state)| crate::audit::AwardFact {
            order_id,
            user_id,
            state,
        })
        .collect())
}

/// A user's award records in their split table, newest first.
pub(crate) fn awards_of_user(
    q: &mut impl Queryable,
    table: &str,
    user_id: &str,
    limit: usize,
) -> Sql<Vec<AwardRow>> {
    let rows: Vec<Row> = q.exec(
        format!(
            "SELECT order_id, activity_id, strategy_id, award_id, award_title,
                    TIMESTAMPDIFF(MICROSECOND, FROM_UNIXTIME(0), award_time) DIV 1000, award_state
             FROM {table} WHERE user_id = ? ORDER BY id DESC LIMIT ?"
        ),
        (user_id, limit as u64),
    )?;
    rows.into_iter()
        .map(|mut r| {
            Ok(AwardRow {
                order_id: col(&mut r, 0)?,
                activity_id: col(&mut r, 1)?,
                strategy_id: col(&mut r, 2)?,
                award_id: col(&mut r, 3)?,
                award_title: col(&mut r, 4)?,
                award_time: col(&mut r, 5)?,
                award_state: col(&mut r, 6)?,
            })
        })
        .collect()
}

/// Several statements sent as one query (one round trip), for the writer's multi-row group
/// statements. Values go in as literals that the `mysql` crate escapes (`Value::as_sql`, which
/// honours the session's `NO_BACKSLASH_ESCAPES`); the connection's character set is utf8mb4.
/// The server runs the statements in order and stops at the first error, which is returned.
pub(crate) struct Script {
    text: String,
    statements: usize,
    no_backslash_escape: bool,
}

/// What one statement of a script returned.
pub(crate) struct Outcome {
    pub(crate) affected: u64,
    pub(crate) last_insert_id: u64,
    pub(crate) rows: Vec<Row>,
}

impl Script {
    pub(crate) fn new(no_backslash_escape: bool) -> Script {
        Script {
            text: String::new(),
            statements: 0,
            no_backslash_escape,
        }
    }

    /// A value as an escaped SQL literal.
    fn lit(&self, v: &Value) -> String {
        v.as_sql(self.no_backslash_escape)
    }

    /// A statement's text with each `?` replaced by its value as an escaped literal.
    pub(crate) fn bind(&self, stmt: &Stmt) -> String {
        let mut values = stmt.params.iter();
        let mut out = String::with_capacity(stmt.sql.len() + 16 * stmt.params.len());
        for c in stmt.sql.chars() {
            if c == '?' {
                let v = values.next().expect("a value for every placeholder");
                out.push_str(&self.lit(v));
            } else {
                out.push(c);
            }
        }
        debug_assert!(values.next().is_none(), "a placeholder for every value");
        out
    }

    /// Add a statement with its values bound.
    pub(crate) fn push_stmt(&mut self, stmt: &Stmt) {
        let text = self.bind(stmt);
        self.push(text);
    }

    pub(crate) fn push(&mut self, statement: String) {
        if self.statements > 0 {
            self.text.push_str(";\n");
        }
        self.text.push_str(&statement);
        self.statements += 1;
    }

    /// Run every statement; one outcome each, in order.
    pub(crate) fn run(self, q: &mut impl Queryable) -> Sql<Vec<Outcome>> {
        let mut result = q.query_iter(&self.text)?;
        let mut out = Vec::with_capacity(self.statements);
        while let Some(mut set) = result.iter() {
            // Read the OK packet's figures before the rows: consuming them moves to the next set.
            let last_insert_id = set.last_insert_id().unwrap_or(0);
            let affected = set.affected_rows();
            let mut rows = Vec::new();
            for row in set.by_ref() {
                rows.push(row?);
            }
            out.push(Outcome {
                affected,
                last_insert_id,
                rows,
            });
        }
        if out.len() != self.statements {
            return Err(mysql::Error::MySqlError(mysql::MySqlError {
                state: "HY000".into(),
                message: format!(
                    "a script of {} statements returned {} results",
                    self.statements,
                    out.len()
                ),
                code: 0,
            }));
        }
        Ok(out)
    }
}

/// How a group's scripts are framed: inside the writer's transaction (a savepoint, released at
/// the end), or as the whole transaction (begun by the first script, committed by the last).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Frame {
    Savepoint,
    Transaction,
}

impl Frame {
    fn open(self) -> String {
        match self {
            Frame::Savepoint => "SAVEPOINT together".into(),
            Frame::Transaction => "START TRANSACTION".into(),
        }
    }
    fn close(self) -> String {
        match self {
            Frame::Savepoint => "RELEASE SAVEPOINT together".into(),
            Frame::Transaction => "COMMIT".into(),
        }
    }
}

/// Open the group's frame and take `n` sequence numbers; returns the first.
pub(crate) fn group_take_seqs(q: &mut impl Queryable, nbe: bool, frame: Frame, n: u64) -> Sql<u64> {
    let mut s = Script::new(nbe);
    s.push(frame.open());
    s.push(format!(
        "UPDATE shard_meta SET next_seq = LAST_INSERT_ID(next_seq + {n}) WHERE id = 1"
    ));
    let out = s.run(q)?;
    Ok(out[1].last_insert_id - n)
}

/// Insert a group's award records (one statement per split table) and tasks (one statement),
/// close the frame; returns the task ids in the order of `tasks`. With `consecutive_ids` (the
/// server hands a multi-row insert consecutive auto-increment values: InnoDB's lock modes 0
/// and 1) they follow from the insert's first id; otherwise they are read back by sequence.
pub(crate) fn group_insert(
    q: &mut impl Queryable,
    nbe: bool,
    frame: Frame,
    consecutive_ids: bool,
    awards: &std::collections::BTreeMap<&str, Vec<NewAward<'_>>>,
    tasks: &[NewTask<'_>],
    now_ms: i64,
) -> Sql<Vec<i64>> {
    let mut s = Script::new(nbe);
    for (table, rows) in awards {
        s.push_stmt(&award_insert(table, rows, now_ms));
    }
    let task_insert = s.statements;
    s.push_stmt(&task_insert_stmt(tasks, now_ms));
    if !consecutive_ids {
        s.push_stmt(&tasks_by_seq(tasks));
    }
    s.push(frame.close());
    let mut out = s.run(q)?;
    if consecutive_ids {
        let first_id = out[task_insert].last_insert_id as i64;
        return Ok((0..tasks.len() as i64).map(|i| first_id + i).collect());
    }
    let mut found = Vec::new();
    for mut r in std::mem::take(&mut out[task_insert + 1].rows) {
        found.push((col(&mut r, 0)?, col(&mut r, 1)?));
    }
    ids_in_order(found, tasks)
}

/// Open the group's frame and look up, in one round trip, the award records the messages name
/// (`(table, order_id, user_id)`) and which message ids the delivery log already holds.
#[allow(clippy::type_complexity)]
pub(crate) fn group_lookup(
    q: &mut impl Queryable,
    nbe: bool,
    frame: Frame,
    orders: &std::collections::BTreeMap<&str, Vec<&str>>,
    message_ids: &[&str],
) -> Sql<(Vec<(String, String, String)>, Vec<String>)> {
    let mut s = Script::new(nbe);
    s.push(frame.open());
    let selects: Vec<String> = orders
        .iter()
        .map(|(table, orders)| s.bind(&awards_lookup(table, orders)))
        .collect();
    let orders_at = if selects.is_empty() {
        // Only messages of the original's form, which name no award.
        None
    } else {
        s.push(selects.join(" UNION ALL "));
        Some(s.statements)
    };
    s.push_stmt(&deliveries_lookup(message_ids));
    let mut out = s.run(q)?;
    let logged_at = out.len() - 1;
    let mut awards = Vec::new();
    if let Some(at) = orders_at {
        for mut r in std::mem::take(&mut out[at - 1].rows) {
            awards.push((col(&mut r, 0)?, col(&mut r, 1)?, col(&mut r, 2)?));
        }
    }
    let mut logged = Vec::new();
    for mut r in std::mem::take(&mut out[logged_at].rows) {
        logged.push(col(&mut r, 0)?);
    }
    Ok((awards, logged))
}

/// A task completion for a script, as [`tasks_completion`].
pub(crate) struct Marks<'a> {
    pub(crate) ids: &'a [i64],
    pub(crate) owner: Option<&'a str>,
    pub(crate) now_ms: i64,
}

fn push_marks(s: &mut Script, marks: &[Marks<'_>]) {
    for m in marks.iter().filter(|m| !m.ids.is_empty()) {
        s.push_stmt(&tasks_completion(m.ids, m.owner, m.now_ms));
    }
}

/// Rows each of `marks` changed, read from the script's outcomes that follow `from`.
fn marked(out: &[Outcome], from: usize, marks: &[Marks<'_>]) -> Vec<usize> {
    let mut at = from;
    marks
        .iter()
        .map(|m| {
            if m.ids.is_empty() {
                0
            } else {
                at += 1;
                out[at - 1].affected as usize
            }
        })
        .collect()
}

/// Task completions alone, as one transaction in one round trip; rows changed per mark.
pub(crate) fn group_marks(
    q: &mut impl Queryable,
    nbe: bool,
    marks: &[Marks<'_>],
) -> Sql<Vec<usize>> {
    let mut s = Script::new(nbe);
    s.push("START TRANSACTION".into());
    push_marks(&mut s, marks);
    s.push("COMMIT".into());
    let out = s.run(q)?;
    Ok(marked(&out, 1, marks))
}

/// Apply a group's deliveries in one round trip: log the first receipts, count the repeated
/// ones, complete the awards, mark the tasks of `marks` completed, close the frame. Returns the
/// rows each mark changed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_deliver(
    q: &mut impl Queryable,
    nbe: bool,
    frame: Frame,
    firsts: &[(&str, u64, &str)],
    again: &[&str],
    complete: &std::collections::BTreeMap<&str, Vec<&str>>,
    marks: &[Marks<'_>],
    now_ms: i64,
) -> Sql<Vec<usize>> {
    let mut s = Script::new(nbe);
    if !firsts.is_empty() {
        s.push_stmt(&delivery_insert(firsts, now_ms));
    }
    for m in again {
        s.push_stmt(&receipt_count(m));
    }
    for (table, orders) in complete {
        s.push_stmt(&awards_completion(table, orders, now_ms));
    }
    let before_marks = s.statements;
    push_marks(&mut s, marks);
    s.push(frame.close());
    let out = s.run(q)?;
    Ok(marked(&out, before_marks, marks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_columns_added_to_the_originals_task_table_are_the_schemas() {
        for (name, def) in TASK_COLUMNS_ADDED {
            let line = SCHEMA
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} is in schema.mysql.sql"));
            let squeezed: String = line.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(squeezed.starts_with(&format!("{name} {def}")), "{squeezed}");
        }
    }

    #[test]
    fn the_widths_checked_at_start_are_the_schemas() {
        let width = |col: &str| {
            let line = SCHEMA
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{col} ")))
                .unwrap_or_else(|| panic!("{col} is in schema.mysql.sql"));
            let squeezed: String = line.split_whitespace().collect::<Vec<_>>().join(" ");
            squeezed
                .split("varchar(")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("{squeezed}"))
        };
        assert_eq!(width("topic"), crate::config::MYSQL_TOPIC_MAX);
        assert_eq!(width("message"), crate::model::MESSAGE_MAX);
        assert_eq!(
            width("message_id"),
            crate::model::MessageId::new(1, 1).as_str().len()
        );
        assert_eq!(width("user_id"), 32);
        assert_eq!(width("order_id"), 12);
        assert_eq!(width("award_title"), 128);
    }

    #[test]
    fn script_literals_are_escaped_by_the_driver() {
        let s = Script::new(false);
        assert_eq!(s.lit(&Value::from("it's")), r"'it\'s'");
        assert_eq!(s.lit(&Value::from(r"a\b")), r"'a\\b'");
        assert_eq!(s.lit(&Value::from(42i64)), "42");
        let stmt = Stmt {
            sql: "(?, ?)".into(),
            params: vec!["a".into(), "b'".into()],
        };
        assert_eq!(s.bind(&stmt), r"('a', 'b\'')");
        let strict = Script::new(true);
        assert_eq!(strict.lit(&Value::from("it's")), "'it''s'");
    }
}
