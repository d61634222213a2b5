//! The writes of one SQLite shard file: a group of ops in one `BEGIN IMMEDIATE` transaction,
//! one commit; a savepoint per op only when an op fails after it may have written something.

use rusqlite::{Connection, TransactionBehavior};

use super::sql;
use crate::error::{Error, Result};
use crate::model::{AwardRecord, EventMessage, MessageId};
use crate::router::{award_table, route, Layout};
use crate::store::op::{self, Delivered, Op, Reply, SavedTask};
use crate::store::Batch;

/// Most sequence numbers one compaction op folds: its deletes run in the writer's group commit,
/// so a step is kept short and `Store::purge` runs steps until one folds nothing.
pub(crate) const COMPACT_STEP: u64 = 5_000;

/// The writes of one shard file, on the writer thread's connection.
pub(super) struct SqliteBatch<C> {
    pub(super) db: u32,
    pub(super) conn: C,
}

impl<C> Batch for SqliteBatch<C>
where
    C: std::ops::DerefMut<Target = Connection> + Send + 'static,
{
    fn run_batch(&mut self, ops: &[&Op]) -> Vec<Result<Reply>> {
        run_batch(self.db, &mut self.conn, ops)
    }

    /// Nothing runs after the commit that could panic; a panic before it drops the transaction,
    /// which rolls back (and a rollback that failed is ended before the next group).
    fn kept_nothing_of_panicked_group(&mut self) -> bool {
        true
    }
}

/// Run a group in one transaction, first without a savepoint per op: most ops either succeed or
/// fail before changing a row (a duplicate order id fails on the award's insert, the op's first
/// statement), and a savepoint per op would copy every page the op touches that the group
/// had already changed into SQLite's sub-journal (about seven pages per award, most of the
/// writes of a busy shard). The group runs under one savepoint of its own instead; only if an
/// op fails after it changed a row is the group rolled back to it, inside the same
/// transaction (the write lock is kept), and run again with a savepoint per op, so that the op
/// fails alone.
fn run_batch(db: u32, conn: &mut Connection, batch: &[&Op]) -> Vec<Result<Reply>> {
    run_batch_counted(db, conn, batch).0
}

/// What running a group's ops came to.
enum Ran {
    /// Every op ran (some may have failed alone): commit.
    Done(Vec<Result<Reply>>),
    /// SQLite rolled the whole transaction back by itself: nothing of the group is kept.
    RolledBack(Vec<Result<Reply>>),
    /// An op failed after it may have written: run the group again with a savepoint per op.
    Again,
    /// A savepoint could not be opened, released or rolled back to: what the transaction holds
    /// is not known, so the whole group is rolled back and nothing of it is kept.
    Broken(rusqlite::Error),
}

/// [`run_batch`], and whether the group had to run again with savepoints.
fn run_batch_counted(db: u32, conn: &mut Connection, batch: &[&Op]) -> (Vec<Result<Reply>>, bool) {
    let ctx = || format!("writing to shard big_market_{db:02}");
    let fail_all = |e: &rusqlite::Error| -> Vec<Result<Reply>> {
        batch
            .iter()
            .map(|_| Err(Error::storage(ctx(), copy_err(e))))
            .collect()
    };
    // A transaction left open by a rollback that failed (rusqlite ignores the error of the
    // rollback on drop) would refuse every later group: end it first.
    if !conn.is_autocommit() {
        log::warn!("writer shard={db:02} ends a transaction a failed rollback left open");
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            return (fail_all(&e), false);
        }
    }
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return (fail_all(&e), false),
    };
    if let Err(e) = tx.execute_batch("SAVEPOINT bm_group") {
        return (fail_all(&e), false);
    }
    let (results, again) = match run_ops(db, &tx, batch, false) {
        Ran::Done(results) => match tx.execute_batch("RELEASE bm_group") {
            Ok(()) => (results, false),
            Err(e) => return (fail_all(&e), false),
        },
        Ran::RolledBack(results) => return (results, false),
        Ran::Broken(e) => return (fail_all(&e), false),
        Ran::Again => {
            log::debug!(
                "writer shard={db:02} group of {} runs again with a savepoint per op",
                batch.len()
            );
            if let Err(e) = tx.execute_batch("ROLLBACK TO bm_group; RELEASE bm_group") {
                return (fail_all(&e), true);
            }
            match run_ops(db, &tx, batch, true) {
                Ran::Done(results) => (results, true),
                Ran::RolledBack(results) => return (results, true),
                // Dropping the transaction rolls the whole group back.
                Ran::Broken(e) => return (fail_all(&e), true),
                Ran::Again => unreachable!("with a savepoint per op, an op fails alone"),
            }
        }
    };
    crate::crash::hit(crate::crash::Point::MidGroupCommit);
    let results = match tx.commit() {
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
    };
    (results, again)
}

/// Run a group's ops in the caller's transaction. With `savepoints`, each op runs under a
/// savepoint of its own and a failing op fails alone; without, an op that fails after it may
/// have written something stops the run ([`Ran::Again`]).
fn run_ops(db: u32, conn: &Connection, batch: &[&Op], savepoints: bool) -> Ran {
    let mut results = Vec::with_capacity(batch.len());
    // The compaction watermark, read once a group when a delivery needs it (not once a
    // delivery); a compaction step in the group moves it, and it is read again after one.
    let mut watermark = None;
    for job in batch {
        let result = if savepoints {
            if let Err(e) = conn.execute_batch("SAVEPOINT bm_op") {
                return Ran::Broken(e);
            }
            let result = apply(db, conn, job, &mut watermark);
            if !conn.is_autocommit() {
                let end = match result {
                    Ok(_) => "RELEASE bm_op",
                    Err(_) => "ROLLBACK TO bm_op; RELEASE bm_op",
                };
                if let Err(e) = conn.execute_batch(end) {
                    return Ran::Broken(e);
                }
            }
            result
        } else {
            // An op that failed having changed no row wrote nothing (a duplicate order id is
            // refused by the award's insert; a delivery below the watermark after reads): it
            // fails alone. One that changed rows may have kept part of itself.
            let changes = conn.total_changes();
            let result = apply(db, conn, job, &mut watermark);
            match &result {
                Err(_) if conn.total_changes() != changes && !conn.is_autocommit() => {
                    return Ran::Again
                }
                _ => result,
            }
        };
        // After SQLITE_FULL, an I/O error or running out of memory, SQLite may roll the whole
        // transaction back by itself. Then nothing of this group is kept: every op, the ones
        // that had succeeded included, is reported as not written, and the rest are not run
        // (outside a transaction they would each commit on their own).
        if let Err(e) = &result {
            if conn.is_autocommit() {
                let (full, cause) = match e {
                    Error::Storage { source, .. } => (source.is_full(), source.to_string()),
                    other => (false, other.to_string()),
                };
                return Ran::RolledBack(
                    batch
                        .iter()
                        .map(|_| Err(rolled_back(db, full, &cause)))
                        .collect(),
                );
            }
        }
        results.push(result);
    }
    Ran::Done(results)
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
/// `owner` until `lease_until_ms`: the rows of one award, in the caller's write transaction. A
/// duplicate order id fails on the first statement, so it writes nothing.
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
    if !MessageId::fits(seq) {
        // A failure after a write: the group runs again with a savepoint per op, which rolls the
        // award and the sequence number back with this error.
        return Err(MessageId::exhausted(&format!("shard big_market_{db:02}")));
    }
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

fn apply(db: u32, conn: &Connection, op: &Op, watermark: &mut Option<u64>) -> Result<Reply> {
    #[cfg(test)]
    tests::panic_point();
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
        } => op::mark_each(failures, |f| {
            sql::mark_failed(
                conn,
                f.id,
                owner,
                f.state,
                f.attempts,
                f.next_attempt_at,
                &f.error,
                *now_ms,
            )
            .map_err(|e| Error::storage(ctx("marking a task failed"), e))
        }),
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
        } => op::renew_each(ids, |id| {
            sql::renew_lease(conn, id, owner, *lease_until_ms, *now_ms)
                .map_err(|e| Error::storage(ctx("renewing a lease"), e))
        }),
        Op::Release { owner, now_ms } => {
            let n = sql::release_claims(conn, owner, *now_ms)
                .map_err(|e| Error::storage(ctx("releasing claims"), e))?;
            Ok(Reply::Count(n))
        }
        Op::Deliver { msg, table, now_ms } => {
            let d = &msg.data;
            let seq = msg.seq.unwrap_or(0);
            // At or below the watermark its delivery was proven and its log row folded away:
            // a redelivery, and logging it again would put a row below the watermark. Only if it
            // is ours (the id this shard gave that number) and its award was delivered; anything
            // else is not a message this shard sent.
            let below = seq > 0
                && seq
                    <= match *watermark {
                        Some(w) => w,
                        None => {
                            let w = sql::watermark(conn)
                                .map_err(|e| Error::storage(ctx("reading the watermark"), e))?;
                            *watermark = Some(w);
                            w
                        }
                    };
            if below {
                // The id this shard gave that number (or, for a message sent before the id
                // scheme changed, the shard and the sequence in decimal).
                let ours = msg.id == MessageId::new(db, seq).as_str()
                    || msg.id == format!("{db:02}{seq:09}");
                if ours
                    && sql::award_delivered(conn, table, &d.user_id, msg.order_id().unwrap_or(""))
                        .map_err(|e| Error::storage(ctx("looking up an award"), e))?
                {
                    return Ok(Reply::Delivered(Delivered::Again));
                }
                return Err(Error::Poison(format!(
                    "message {} names seq {seq} of big_market_{db:02}, which is compacted as delivered, but {}",
                    msg.id,
                    if ours {
                        format!(
                            "order {} has no delivered award in {table}",
                            msg.order_id().unwrap_or("-")
                        )
                    } else {
                        format!("the shard gave that number the id {}", MessageId::new(db, seq).as_str())
                    }
                )));
            }
            let order = msg.order_id();
            let receipts = sql::record_delivery(conn, &msg.id, seq, order.unwrap_or(""), *now_ms)
                .map_err(|e| Error::storage(ctx("logging a delivery"), e))?;
            if receipts > 1 {
                return Ok(Reply::Delivered(Delivered::Again));
            }
            let Some(order) = order else {
                return Ok(Reply::Delivered(Delivered::Recorded));
            };
            let changed = sql::complete_award(conn, table, &d.user_id, order, *now_ms)
                .map_err(|e| Error::storage(ctx("delivering an award"), e))?;
            if changed == 0
                && !sql::award_exists(conn, table, &d.user_id, order)
                    .map_err(|e| Error::storage(ctx("looking up an award"), e))?
            {
                // A failure after a write: the group runs again with a savepoint per op, which
                // rolls the delivery log entry back with this error.
                return Err(Error::Poison(format!(
                    "message {} names user {} order {order}, which has no award record in big_market_{db:02}.{table}",
                    msg.id, d.user_id
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
            let e = |e| Error::storage(ctx("compacting completed tasks"), e);
            *watermark = None;
            let n = sql::compact(conn, *before_ms, COMPACT_STEP).map_err(e)?;
            if n == 0 {
                if let Some((seq, why)) = sql::compaction_held(conn, *before_ms).map_err(e)? {
                    warn_held(db, seq, &why);
                }
            }
            Ok(Reply::Count(n as usize))
        }
    }
}

/// Say once per shard and number that compaction is held back by a number older than the
/// retention: until an operator acts on it, the shard's logs grow again.
fn warn_held(db: u32, seq: u64, why: &str) {
    static WARNED: std::sync::Mutex<std::collections::BTreeMap<u32, u64>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if warned.insert(db, seq) != Some(seq) {
        log::warn!(
            "compaction held shard=big_market_{db:02} seq={seq}: {why}; the logs after it are kept until it is delivered (`big-market tasks requeue`, `big-market audit`)"
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    thread_local! {
        /// Ops this thread's `apply` runs before it panics, as a bug would (`None`: never).
        static PANIC_AFTER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    /// Called at the start of every `apply` in tests.
    pub(super) fn panic_point() {
        PANIC_AFTER.with(|left| match left.get() {
            Some(0) => {
                left.set(None);
                panic!("a bug in apply (test)");
            }
            Some(n) => left.set(Some(n - 1)),
            None => {}
        });
    }

    #[test]
    fn a_group_that_panics_keeps_nothing_and_the_next_group_commits() {
        let (_dir, mut conn) = shard();
        let next_seq = "SELECT next_seq FROM shard_meta";
        let before = count(&conn, next_seq);
        let ops = [save("o1"), save("o2"), save("o3")];
        let refs: Vec<&Op> = ops.iter().collect();
        PANIC_AFTER.with(|p| p.set(Some(2)));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_batch(1, &mut conn, &refs)
        }));
        assert!(panicked.is_err(), "the third op panicked");
        assert!(conn.is_autocommit(), "no transaction is left open");
        assert_eq!(awards(&conn), 0, "nothing of the group was kept");
        assert_eq!(
            count(&conn, next_seq),
            before,
            "no sequence number was taken"
        );
        let results = run_batch(1, &mut conn, &refs);
        assert_eq!(outcomes(&results), ["saved"; 3], "{results:?}");
        assert_eq!(awards(&conn), 3);
    }

    fn shard() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.db")).unwrap();
        sql::apply_schema(&conn, 1, 2, 4, 0).unwrap();
        (dir, conn)
    }

    fn save(order: &str) -> Op {
        let record = AwardRecord::sample("user0001", order, 1_000).unwrap();
        Op::SaveAward {
            table: award_table(route("user0001", Layout::new(2, 4).unwrap()).table),
            record,
            topic: Arc::from("send_award"),
            owner: Arc::from("test"),
            lease_until_ms: 2_000,
            now_ms: 1_000,
        }
    }

    /// What each op of a group came to: `saved`, `duplicate`, `poison`, or `other`.
    fn outcomes(results: &[Result<Reply>]) -> Vec<&'static str> {
        results
            .iter()
            .map(|r| match r {
                Ok(Reply::Saved(_)) => "saved",
                Err(Error::DuplicateOrder { .. }) => "duplicate",
                Err(Error::Poison(_)) => "poison",
                _ => "other",
            })
            .collect()
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    fn awards(conn: &Connection) -> i64 {
        (0..4)
            .map(|t| count(conn, &format!("SELECT COUNT(*) FROM {}", award_table(t))))
            .sum()
    }

    #[test]
    fn a_duplicate_order_fails_alone_without_running_the_group_again() {
        let (_dir, mut conn) = shard();
        let ops = [save("o1"), save("o1"), save("o2")];
        let refs: Vec<&Op> = ops.iter().collect();
        let (results, again) = run_batch_counted(1, &mut conn, &refs);
        assert!(!again, "a duplicate writes nothing: no savepoints needed");
        assert_eq!(
            outcomes(&results),
            ["saved", "duplicate", "saved"],
            "{results:?}"
        );
        assert_eq!(awards(&conn), 2);
        // The refused award took no sequence number: the committed tasks are 1 and 2.
        let seqs: String = conn
            .query_row("SELECT group_concat(seq ORDER BY seq) FROM task", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(seqs, "1,2");
    }

    #[test]
    fn a_refusal_that_wrote_nothing_does_not_run_the_group_again() {
        let (_dir, mut conn) = shard();
        // The poison's sequence number is below the compaction watermark, and its award was
        // never delivered: it is refused after reads alone.
        conn.execute_batch("UPDATE shard_meta SET compacted_seq = 100, next_seq = 101")
            .unwrap();
        let ops = [save("o1"), poison(), save("o2")];
        let refs: Vec<&Op> = ops.iter().collect();
        let (results, again) = run_batch_counted(1, &mut conn, &refs);
        assert!(
            !again,
            "nothing was written to roll back: no savepoints needed"
        );
        assert_eq!(
            outcomes(&results),
            ["saved", "poison", "saved"],
            "{results:?}"
        );
        assert_eq!(awards(&conn), 2);
    }

    #[test]
    fn an_op_that_fails_after_writing_fails_alone_and_the_rest_of_its_group_commits() {
        let (_dir, mut conn) = shard();
        // A message naming an award this shard does not have: its delivery row is written
        // before the award is found missing, so the op fails after a write.
        let ops = [save("o1"), poison(), save("o1"), save("o2")];
        let refs: Vec<&Op> = ops.iter().collect();
        // The group never leaves its transaction (another process could write in between):
        // no transaction is rolled back, and one commits.
        let ends = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, r) = (ends.clone(), ends.clone());
        conn.commit_hook(Some(move || {
            c.lock().unwrap().push("commit");
            false
        }))
        .unwrap();
        conn.rollback_hook(Some(move || r.lock().unwrap().push("rollback")))
            .unwrap();
        let (results, again) = run_batch_counted(1, &mut conn, &refs);
        assert_eq!(*ends.lock().unwrap(), ["commit"]);
        assert!(again, "the failed delivery had written its log row");
        assert_eq!(
            outcomes(&results),
            ["saved", "poison", "duplicate", "saved"],
            "{results:?}"
        );
        assert_eq!(awards(&conn), 2);
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM task"), 2);
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM delivery"),
            0,
            "nothing of the poison"
        );
        assert_eq!(count(&conn, "SELECT MAX(next_seq) FROM shard_meta"), 3);
    }

    /// A shard connection that refuses, once each, the control statements `deny` names
    /// (`(operation, savepoint name)`; an empty name for the transaction's own ROLLBACK), as a
    /// failing SQLite would.
    fn refusing(
        conn: &Connection,
        deny: Vec<(rusqlite::hooks::TransactionOperation, &'static str)>,
    ) -> Arc<std::sync::Mutex<usize>> {
        use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
        let deny = std::sync::Mutex::new(deny);
        let refused = Arc::new(std::sync::Mutex::new(0));
        let r = refused.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            let mut deny = deny.lock().unwrap();
            let hit = deny.iter().position(|(op, name)| match ctx.action {
                AuthAction::Savepoint {
                    operation,
                    savepoint_name,
                } => operation == *op && savepoint_name == *name,
                AuthAction::Transaction { operation } => operation == *op && name.is_empty(),
                _ => false,
            });
            match hit {
                Some(i) => {
                    deny.remove(i);
                    *r.lock().unwrap() += 1;
                    Authorization::Deny
                }
                None => Authorization::Allow,
            }
        }))
        .unwrap();
        refused
    }

    fn poison() -> Op {
        let stranger = AwardRecord::sample("user0001", "nobody", 1_000).unwrap();
        Op::Deliver {
            msg: EventMessage::for_award(&stranger, 1, 77, 1_000),
            table: award_table(route("user0001", Layout::new(2, 4).unwrap()).table),
            now_ms: 1_000,
        }
    }

    #[test]
    fn a_savepoint_that_cannot_be_released_fails_its_whole_group_and_keeps_nothing() {
        use rusqlite::hooks::TransactionOperation::Release;
        let (_dir, mut conn) = shard();
        let refused = refusing(&conn, vec![(Release, "bm_op")]);
        let ops = [save("o1"), poison(), save("o2")];
        let refs: Vec<&Op> = ops.iter().collect();
        let (results, again) = run_batch_counted(1, &mut conn, &refs);
        assert!(again, "the poison ran the group again op by op");
        assert_eq!(*refused.lock().unwrap(), 1, "the RELEASE was refused");
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert!(conn.is_autocommit(), "the group was rolled back");
        assert_eq!(awards(&conn), 0);
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM task"), 0);
        assert_eq!(count(&conn, "SELECT MAX(next_seq) FROM shard_meta"), 1);
        // The next group commits.
        let ops = [save("o3")];
        let refs: Vec<&Op> = ops.iter().collect();
        assert!(run_batch_counted(1, &mut conn, &refs).0[0].is_ok());
        assert_eq!(awards(&conn), 1);
    }

    #[test]
    fn a_transaction_a_failed_rollback_left_open_is_ended_before_the_next_group() {
        use rusqlite::hooks::TransactionOperation::{Release, Rollback};
        let (_dir, mut conn) = shard();
        let refused = refusing(&conn, vec![(Release, "bm_op"), (Rollback, "")]);
        let ops = [save("o1"), poison(), save("o2")];
        let refs: Vec<&Op> = ops.iter().collect();
        let (results, _) = run_batch_counted(1, &mut conn, &refs);
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert_eq!(*refused.lock().unwrap(), 2, "the RELEASE and the ROLLBACK");
        assert!(
            !conn.is_autocommit(),
            "the refused rollback left the transaction open"
        );
        let ops = [save("o3")];
        let refs: Vec<&Op> = ops.iter().collect();
        let (results, _) = run_batch_counted(1, &mut conn, &refs);
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(conn.is_autocommit());
        assert_eq!(awards(&conn), 1, "nothing of the broken group is kept");
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM delivery"), 0);
        assert_eq!(count(&conn, "SELECT MAX(next_seq) FROM shard_meta"), 2);
    }
}
