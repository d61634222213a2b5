//! The SQLite backend's statements, one function each. Each takes a `&Connection` (a savepoint or transaction
//! derefs to one), uses `prepare_cached`, and returns plain values.

use rusqlite::{params, Connection, OptionalExtension};

use crate::model::{AwardRecord, TaskState};
use crate::store::{AwardRow, TaskRow};

type Sql<T> = rusqlite::Result<T>;

/// The schema text, compiled in.
pub const SCHEMA: &str = include_str!("../../../schema.sql");
/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i64 = 2;

/// Create every table of a new shard file (inside the caller's transaction).
pub fn apply_schema(
    conn: &Connection,
    db_idx: u32,
    db_count: u32,
    tb_count: u32,
    now_ms: i64,
) -> Sql<()> {
    for script in crate::store::schema_scripts(SCHEMA, tb_count) {
        conn.execute_batch(&script)?;
    }
    conn.execute(
        "INSERT INTO shard_meta (id, db_idx, db_count, tb_count, next_seq, create_time) VALUES (1, ?1, ?2, ?3, 1, ?4)",
        params![db_idx, db_count, tb_count, now_ms],
    )?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

/// Upgrade a version 1 file to version 2 (inside the caller's transaction): the compaction
/// watermark, at once (adding a column with a default rewrites nothing). The delivery log's
/// sequence index, which takes a while on a large log, is built by the first compaction step,
/// once the service runs, rather than while the shard opens (a start has a deadline under
/// systemd). There is no way back: an older big-market refuses the file.
pub fn upgrade_from_1(conn: &Connection) -> Sql<()> {
    conn.execute_batch(
        "ALTER TABLE shard_meta ADD COLUMN compacted_seq INTEGER NOT NULL DEFAULT 0;",
    )?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// The schema version recorded in the file (0 for a new, empty file).
pub fn schema_version(conn: &Connection) -> Sql<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// The layout a shard file was created with: `(db_idx, db_count, tb_count)`.
pub fn shard_layout(conn: &Connection) -> Sql<(u32, u32, u32)> {
    conn.query_row(
        "SELECT db_idx, db_count, tb_count FROM shard_meta WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

/// Insert an award record into its split table.
pub fn insert_award(conn: &Connection, table: &str, rec: &AwardRecord, now_ms: i64) -> Sql<()> {
    let sql = format!(
        "INSERT INTO {table} (user_id, activity_id, strategy_id, order_id, award_id, award_title, award_time, award_state, create_time, update_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'create', ?8, ?8)"
    );
    conn.prepare_cached(&sql)?.execute(params![
        rec.user_id.as_str(),
        rec.activity_id,
        rec.strategy_id,
        rec.order_id.as_str(),
        rec.award_id,
        rec.award_title,
        rec.award_time_ms,
        now_ms
    ])?;
    Ok(())
}

/// Take the shard's next task sequence number (rolled back with the caller's transaction or
/// savepoint). A read and an update rather than `UPDATE … RETURNING`: SQLite runs `RETURNING`
/// through a temporary table with a page cache of its own, opened and closed per statement,
/// which cost the writer about 8% of its time.
///
/// Only inside a write transaction (`BEGIN IMMEDIATE`): on its own, two connections could read
/// the same number.
pub fn take_seq(conn: &Connection) -> Sql<u64> {
    debug_assert!(
        !conn.is_autocommit(),
        "take_seq runs inside a write transaction"
    );
    let seq: u64 = conn
        .prepare_cached("SELECT next_seq FROM shard_meta WHERE id = 1")?
        .query_row([], |r| r.get(0))?;
    conn.prepare_cached("UPDATE shard_meta SET next_seq = ?1 WHERE id = 1")?
        .execute([seq + 1])?;
    Ok(seq)
}

/// A task row to insert.
pub struct NewTask<'a> {
    /// User id.
    pub user_id: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Message id.
    pub message_id: &'a str,
    /// JSON body.
    pub message: &'a str,
    /// Sequence number.
    pub seq: u64,
    /// Claim owner (the writing process, which publishes it right after commit).
    pub owner: &'a str,
    /// Lease expiry: when the task becomes due if its first publish never completes.
    pub lease_until_ms: i64,
    /// Now.
    pub now_ms: i64,
}

/// Insert a task, claimed by the writing process. Returns its row id.
pub fn insert_task(conn: &Connection, t: &NewTask<'_>) -> Sql<i64> {
    conn.prepare_cached(
        "INSERT INTO task (user_id, topic, message_id, message, state, seq, attempts, next_attempt_at, claimed_by, create_time, update_time)
         VALUES (?1, ?2, ?3, ?4, 'create', ?5, 0, ?6, ?7, ?8, ?8)",
    )?
    .execute(params![t.user_id, t.topic, t.message_id, t.message, t.seq, t.lease_until_ms, t.owner, t.now_ms])?;
    Ok(conn.last_insert_rowid())
}

const TASK_COLUMNS: &str = "id, user_id, topic, message_id, message, seq, attempts, state, next_attempt_at, claimed_by, last_error, create_time, update_time";

fn task_row(r: &rusqlite::Row<'_>) -> Sql<TaskRow> {
    Ok(TaskRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        topic: r.get(2)?,
        message_id: r.get(3)?,
        message: r.get(4)?,
        seq: r.get(5)?,
        attempts: r.get(6)?,
        state: r.get(7)?,
        next_attempt_at: r.get(8)?,
        claimed_by: r.get(9)?,
        last_error: r.get(10)?,
        create_time: r.get(11)?,
        update_time: r.get(12)?,
    })
}

/// Claim up to `limit` due tasks (failed, or created and past their lease) for `owner` until
/// `lease_until_ms`. A claimed task is not due again until its lease expires.
pub fn claim_due(
    conn: &Connection,
    owner: &str,
    now_ms: i64,
    lease_until_ms: i64,
    limit: usize,
) -> Sql<Vec<TaskRow>> {
    let sql = format!(
        "UPDATE task SET claimed_by = ?1, next_attempt_at = ?2, update_time = ?3
         WHERE id IN (SELECT id FROM task WHERE state IN ('create', 'fail') AND next_attempt_at <= ?3
                      ORDER BY next_attempt_at LIMIT ?4)
         RETURNING {TASK_COLUMNS}"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![owner, lease_until_ms, now_ms, limit as i64],
        task_row,
    )?;
    let mut out: Vec<TaskRow> = rows.collect::<Sql<_>>()?;
    out.sort_by_key(|t| t.seq);
    Ok(out)
}

/// Mark a task completed (its message was confirmed). A completed or dead task is left alone,
/// and so is a task claimed by anyone but `owner` (when given): a publisher that lost its lease
/// does not mark the task; whoever holds the claim now sends it and marks it.
pub fn mark_completed(conn: &Connection, id: i64, owner: Option<&str>, now_ms: i64) -> Sql<usize> {
    conn.prepare_cached(
        "UPDATE task SET state = 'completed', claimed_by = NULL, last_error = NULL, update_time = ?2
         WHERE id = ?1 AND state IN ('create', 'fail') AND (?3 IS NULL OR claimed_by = ?3)",
    )?
    .execute(params![id, now_ms, owner])
}

/// Record a failed publish by `owner`: the new state (`fail` or `dead`), counted attempts and
/// the next due time. A task another process has claimed since is left alone.
#[allow(clippy::too_many_arguments)]
pub fn mark_failed(
    conn: &Connection,
    id: i64,
    owner: &str,
    state: TaskState,
    attempts: u32,
    next_attempt_at: i64,
    error: &str,
    now_ms: i64,
) -> Sql<usize> {
    conn.prepare_cached(
        "UPDATE task SET state = ?3, attempts = ?4, next_attempt_at = ?5, last_error = ?6, claimed_by = NULL, update_time = ?7
         WHERE id = ?1 AND claimed_by = ?2 AND state IN ('create', 'fail')",
    )?
    .execute(params![id, owner, state.as_str(), attempts, next_attempt_at, error, now_ms])
}

/// Extend the lease of a task that `owner` still holds and has not sent; 0 rows if another
/// claim took it, or it was settled.
pub fn renew_lease(
    conn: &Connection,
    id: i64,
    owner: &str,
    lease_until_ms: i64,
    now_ms: i64,
) -> Sql<usize> {
    conn.prepare_cached(
        "UPDATE task SET next_attempt_at = ?3, update_time = ?4
         WHERE id = ?1 AND claimed_by = ?2 AND state IN ('create', 'fail')",
    )?
    .execute(params![id, owner, lease_until_ms, now_ms])
}

/// Tasks with sequence numbers in `from..=to` still claimed by `owner` and not yet sent, in
/// sequence order, at most `limit`: what the relay reads back after its hand-off overflowed.
pub fn leased_in_range(
    conn: &Connection,
    owner: &str,
    from: u64,
    to: u64,
    limit: usize,
) -> Sql<Vec<TaskRow>> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM task
         WHERE seq BETWEEN ?2 AND ?3 AND claimed_by = ?1 AND state = 'create'
         ORDER BY seq LIMIT ?4"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![owner, from, to, limit as i64], task_row)?;
    rows.collect()
}

/// The state of the task with this message id, if there is one.
pub fn task_state(conn: &Connection, message_id: &str) -> Sql<Option<String>> {
    conn.prepare_cached("SELECT state FROM task WHERE message_id = ?1")?
        .query_row(params![message_id], |r| r.get(0))
        .optional()
}

/// Give back every claim `owner` holds, due now (on shutdown).
pub fn release_claims(conn: &Connection, owner: &str, now_ms: i64) -> Sql<usize> {
    conn.prepare_cached(
        "UPDATE task SET claimed_by = NULL, next_attempt_at = ?2, update_time = ?2
         WHERE claimed_by = ?1 AND state IN ('create', 'fail')",
    )?
    .execute(params![owner, now_ms])
}

/// Put tasks back in line, due now, with their attempts reset: one message id, or every task in
/// a state.
pub fn requeue(
    conn: &Connection,
    message_id: Option<&str>,
    state: Option<TaskState>,
    now_ms: i64,
) -> Sql<usize> {
    conn.prepare_cached(
        "UPDATE task SET state = 'fail', attempts = 0, next_attempt_at = ?3, claimed_by = NULL, update_time = ?3
         WHERE state IN ('fail', 'dead', 'create') AND (?1 IS NULL OR message_id = ?1) AND (?2 IS NULL OR state = ?2)",
    )?
    .execute(params![message_id, state.map(TaskState::as_str), now_ms])
}

/// Write a consistent, compacted copy of the database to a new file at `target`.
pub fn vacuum_into(conn: &Connection, target: &str) -> Sql<()> {
    conn.execute("VACUUM INTO ?1", params![target]).map(|_| ())
}

/// The compaction watermark: every sequence number up to it was committed and delivered, and
/// its rows were folded away.
pub fn watermark(conn: &Connection) -> Sql<u64> {
    conn.prepare_cached("SELECT compacted_seq FROM shard_meta WHERE id = 1")?
        .query_row([], |r| r.get(0))
}

/// Fold at most `max` sequence numbers past the watermark into it: from the watermark on, each
/// number whose delivery is logged and whose task is completed and last changed before
/// `before_ms` (or gone); the first one that is not (undelivered, pending, failed, dead, or
/// too young) stops the fold, so a gap is never folded away. The folded tasks and delivery
/// rows are deleted, except delivery rows received more than once. Returns how many numbers
/// were folded.
pub fn compact(conn: &Connection, before_ms: i64, max: u64) -> Sql<u64> {
    // A shard upgraded from version 1 gets the index here, once (see `upgrade_from_1`).
    conn.execute_batch("CREATE INDEX IF NOT EXISTS idx_delivery_seq ON delivery (seq);")?;
    let from = watermark(conn)?;
    let to = last_seq(conn)?.min(from.saturating_add(max));
    if to <= from {
        return Ok(0);
    }
    let mut tasks = std::collections::HashMap::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, state = 'completed' AND update_time < ?3 FROM task WHERE seq > ?1 AND seq <= ?2",
        )?;
        let rows = stmt.query_map(params![from, to, before_ms], |r| {
            Ok((r.get::<_, u64>(0)?, r.get::<_, bool>(1)?))
        })?;
        for row in rows {
            let (seq, settled) = row?;
            tasks.insert(seq, settled);
        }
    }
    let mut delivered = std::collections::HashSet::new();
    {
        let mut stmt =
            conn.prepare_cached("SELECT seq FROM delivery WHERE seq > ?1 AND seq <= ?2")?;
        let rows = stmt.query_map(params![from, to], |r| r.get::<_, u64>(0))?;
        for row in rows {
            delivered.insert(row?);
        }
    }
    let mut upto = from;
    while upto < to
        && delivered.contains(&(upto + 1))
        && tasks.get(&(upto + 1)).copied().unwrap_or(true)
    {
        upto += 1;
    }
    if upto == from {
        return Ok(0);
    }
    conn.prepare_cached("DELETE FROM task WHERE seq > ?1 AND seq <= ?2")?
        .execute(params![from, upto])?;
    conn.prepare_cached("DELETE FROM delivery WHERE seq > ?1 AND seq <= ?2 AND receipts = 1")?
        .execute(params![from, upto])?;
    conn.prepare_cached("UPDATE shard_meta SET compacted_seq = ?1 WHERE id = 1")?
        .execute(params![upto])?;
    Ok(upto - from)
}

/// The number that holds the fold back, if it is older than `before_ms` (a young one is only
/// lag): the first past the watermark, and what it lacks.
pub fn compaction_held(conn: &Connection, before_ms: i64) -> Sql<Option<(u64, String)>> {
    let next = watermark(conn)? + 1;
    if next > last_seq(conn)? {
        return Ok(None);
    }
    let task: Option<(String, i64)> = conn
        .prepare_cached("SELECT state, create_time FROM task WHERE seq = ?1")?
        .query_row(params![next], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let delivered = conn
        .prepare_cached("SELECT 1 FROM delivery WHERE seq = ?1")?
        .query_row(params![next], |_| Ok(()))
        .optional()?
        .is_some();
    Ok(match task {
        Some((_, created)) if created >= before_ms => None,
        Some((state, _)) if !delivered => {
            Some((next, format!("its task is {state} and was never delivered")))
        }
        Some((state, _)) if state != "completed" => {
            Some((next, format!("it was delivered but its task is {state}")))
        }
        Some(_) => None,
        None if !delivered => Some((
            next,
            "its task row is gone and it was never delivered: a loss, see `big-market audit`"
                .into(),
        )),
        None => None,
    })
}

/// Sequence numbers at or below the watermark whose task row is still there: the fold deletes
/// every task it passes, so each one is a watermark moved past rows it never folded.
pub fn tasks_below_watermark(conn: &Connection) -> Sql<Vec<u64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq FROM task WHERE seq <= (SELECT compacted_seq FROM shard_meta WHERE id = 1)
         ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// Log a delivery of `message_id`; returns how many times it has now been received (1 = first).
/// Inside the writer's transaction (a redelivery is an update and a read).
pub fn record_delivery(
    conn: &Connection,
    message_id: &str,
    seq: u64,
    order_id: &str,
    now_ms: i64,
) -> Sql<u32> {
    // The first receipt is an insert; only a redelivery (rare) reads the count back. No
    // `RETURNING`: SQLite runs it through a temporary table opened and closed per statement.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO delivery (message_id, seq, order_id, receipts, delivered_at) VALUES (?1, ?2, ?3, 1, ?4)
             ON CONFLICT (message_id) DO NOTHING",
        )?
        .execute(params![message_id, seq, order_id, now_ms])?;
    if inserted == 1 {
        return Ok(1);
    }
    conn.prepare_cached("UPDATE delivery SET receipts = receipts + 1 WHERE message_id = ?1")?
        .execute([message_id])?;
    conn.prepare_cached("SELECT receipts FROM delivery WHERE message_id = ?1")?
        .query_row([message_id], |r| r.get(0))
}

/// Move an award record from `create` to `completed`; returns rows changed (0 if already
/// delivered or missing).
pub fn complete_award(
    conn: &Connection,
    table: &str,
    user_id: &str,
    order_id: &str,
    now_ms: i64,
) -> Sql<usize> {
    let sql = format!(
        "UPDATE {table} SET award_state = 'completed', update_time = ?3
         WHERE order_id = ?1 AND user_id = ?2 AND award_state = 'create'"
    );
    conn.prepare_cached(&sql)?
        .execute(params![order_id, user_id, now_ms])
}

/// Whether an award record exists and was delivered (`completed`).
pub fn award_delivered(conn: &Connection, table: &str, user_id: &str, order_id: &str) -> Sql<bool> {
    let sql = format!(
        "SELECT 1 FROM {table} WHERE order_id = ?1 AND user_id = ?2 AND award_state = 'completed'"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params![order_id, user_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Whether an award record exists.
pub fn award_exists(conn: &Connection, table: &str, user_id: &str, order_id: &str) -> Sql<bool> {
    let sql = format!("SELECT 1 FROM {table} WHERE order_id = ?1 AND user_id = ?2");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params![order_id, user_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Count tasks per state.
pub fn count_tasks_by_state(conn: &Connection) -> Sql<Vec<(String, u64)>> {
    let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM task GROUP BY state")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Count award records per state in one split table.
pub fn count_awards_by_state(conn: &Connection, table: &str) -> Sql<Vec<(String, u64)>> {
    let sql = format!("SELECT award_state, COUNT(*) FROM {table} GROUP BY award_state");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Creation time of the oldest task not yet completed or dead.
pub fn oldest_pending(conn: &Connection) -> Sql<Option<i64>> {
    conn.prepare_cached("SELECT MIN(create_time) FROM task WHERE state IN ('create', 'fail')")?
        .query_row([], |r| r.get(0))
}

/// Tasks, oldest first, optionally in one state.
pub fn list_tasks(conn: &Connection, state: Option<TaskState>, limit: usize) -> Sql<Vec<TaskRow>> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM task WHERE (?1 IS NULL OR state = ?1) ORDER BY seq LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![state.map(TaskState::as_str), limit as i64],
        task_row,
    )?;
    rows.collect()
}

/// Delivery log totals: `(messages handled, receipts including redeliveries)`.
pub fn delivery_totals(conn: &Connection) -> Sql<(u64, u64)> {
    conn.prepare_cached("SELECT COUNT(*), COALESCE(SUM(receipts), 0) FROM delivery")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// The highest sequence number handed out on this shard.
pub fn last_seq(conn: &Connection) -> Sql<u64> {
    conn.prepare_cached("SELECT next_seq - 1 FROM shard_meta WHERE id = 1")?
        .query_row([], |r| r.get(0))
}

/// Sequence numbers the consumer has handled, ascending, with their receipt counts (messages
/// without one left out).
pub fn delivered_seqs(conn: &Connection) -> Sql<Vec<(u64, u32)>> {
    let mut stmt =
        conn.prepare_cached("SELECT seq, receipts FROM delivery WHERE seq > 0 ORDER BY seq")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Every task's sequence number, creation time, the order id its message names, and state.
pub fn task_orders(conn: &Connection) -> Sql<Vec<crate::audit::TaskFact>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, user_id, create_time, json_extract(message, '$.data.orderId'), state FROM task ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(crate::audit::TaskFact {
            seq: r.get(0)?,
            user_id: r.get(1)?,
            created_ms: r.get(2)?,
            order_id: r.get(3).ok(),
            state: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Order ids of every delivered message, with its sequence number (0: none).
pub fn delivered_orders(conn: &Connection) -> Sql<Vec<(String, u64)>> {
    let mut stmt =
        conn.prepare_cached("SELECT order_id, seq FROM delivery WHERE order_id <> ''")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// The award records of one split table: order id, user, state.
pub fn award_orders(conn: &Connection, table: &str) -> Sql<Vec<crate::audit::AwardFact>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT order_id, user_id, award_state FROM {table}"
    ))?;
    let rows = stmt.query_map([], |r| {
        Ok(crate::audit::AwardFact {
            order_id: r.get(0)?,
            user_id: r.get(1)?,
            state: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// A user's award records in their split table, newest first.
pub fn awards_of_user(
    conn: &Connection,
    table: &str,
    user_id: &str,
    limit: usize,
) -> Sql<Vec<AwardRow>> {
    let sql = format!(
        "SELECT order_id, activity_id, strategy_id, award_id, award_title, award_time, award_state
         FROM {table} WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![user_id, limit as i64], |r| {
        Ok(AwardRow {
            order_id: r.get(0)?,
            activity_id: r.get(1)?,
            strategy_id: r.get(2)?,
            award_id: r.get(3)?,
            award_title: r.get(4)?,
            award_time: r.get(5)?,
            award_state: r.get(6)?,
        })
    })?;
    rows.collect()
}
