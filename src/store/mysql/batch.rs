//! The writes of one MySQL database: a lane's group of ops in one transaction, as multi-row
//! scripts where the group allows and op by op under savepoints where it must; deadlocks
//! retried.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use mysql::prelude::Queryable;

use super::{lane_of, sql};
use crate::error::{Error, Result};
use crate::model::{AwardRecord, EventMessage, MessageId};
use crate::store::op::{self, Delivered, Op, Reply, SavedTask};
use crate::store::Batch;

/// Times a group is run again after the server broke a deadlock by rolling it back.
const DEADLOCK_RETRIES: usize = 3;

/// The writes of one database, on the writer thread's own connection (opened again after the
/// server dropped it).
pub(super) struct MysqlBatch {
    pub(super) db: u32,
    pub(super) shown: String,
    /// How the lane connects, and connects again after its connection was lost. A lane owns
    /// its connection (not the pool's: a pooled connection given back is reset, one more
    /// round trip to a server that may not answer).
    pub(super) opts: mysql::Opts,
    pub(super) conn: Option<mysql::Conn>,
    /// Multi-row inserts get consecutive auto-increment ids (InnoDB lock mode 0 or 1).
    pub(super) consecutive_ids: bool,
    /// How long the lane gathers ops before a group smaller than the maximum.
    pub(super) linger: Duration,
    /// Whether the round trip carrying the running group's `COMMIT` was sent (reset for each
    /// run of a group): from then on a lost connection, or a panic, leaves its outcome unknown.
    pub(super) commit_sent: Cell<bool>,
}

/// Why a group did not commit.
enum GroupError {
    /// The server rolled the transaction back to break a deadlock: run it again.
    Deadlock(mysql::Error),
    /// Anything else: every op of the group fails with it.
    Failed(mysql::Error),
    /// The connection failed during the round trip that carried the `COMMIT`: the group may or
    /// may not have been committed.
    Unknown(mysql::Error),
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
                None => match mysql::Conn::new(self.opts.clone()) {
                    Ok(c) => {
                        log::info!("reconnected lane to {}", self.shown);
                        c
                    }
                    Err(e) => return self.fail_all(ops, &e),
                },
            };
            let started = std::time::Instant::now();
            self.commit_sent.set(false);
            let outcome = run_group(
                self.db,
                &mut conn,
                ops,
                self.consecutive_ids,
                &self.commit_sent,
            );
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
            // back, or that failed mid-group, is not used again (a lost one is not asked to
            // roll back: that would be one more wait on a server that does not answer).
            let lost = match &failure {
                GroupError::Deadlock(e) | GroupError::Failed(e) | GroupError::Unknown(e) => {
                    e.is_connectivity_error()
                }
            };
            let usable = !lost && conn.query_drop("ROLLBACK").is_ok();
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
                GroupError::Unknown(e) => {
                    log::warn!(
                        "the connection to {} was lost after a commit was sent: {} writes may or may not have been kept ({e})",
                        self.shown,
                        ops.len()
                    );
                    return ops
                        .iter()
                        .map(|_| {
                            Err(Error::OutcomeUnknown {
                                context: format!(
                                    "writing to {} (the connection was lost after the commit was sent)",
                                    self.shown
                                ),
                                source: copy_err(&e).into(),
                            })
                        })
                        .collect();
                }
            }
        }
        let e = last.expect("a deadlock was recorded");
        self.fail_all(ops, &e)
    }

    /// The panic unwound through `run_batch`, which had taken the connection out of the lane:
    /// it was dropped (its `COM_QUIT` sent), so the server rolls back whatever transaction it
    /// held open, and the next group connects again. Nothing was kept unless the round trip
    /// carrying the commit had gone out.
    fn kept_nothing_of_panicked_group(&mut self) -> bool {
        // A panic after the connection was put back (none is known) must not leave a half-run
        // transaction on the lane either.
        self.conn = None;
        !self.commit_sent.get()
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
struct GroupCtx<'a> {
    db: u32,
    /// The session has `NO_BACKSLASH_ESCAPES`.
    nbe: bool,
    frame: sql::Frame,
    /// Multi-row inserts get consecutive auto-increment ids.
    consecutive_ids: bool,
    /// Set just before the round trip that carries the group's `COMMIT` is sent: a connection
    /// lost from then on leaves the outcome unknown.
    commit_sent: &'a Cell<bool>,
}

/// Run one group in one transaction. `Ok` holds one result per op (some may be the op's own
/// error); `Err` means nothing was committed (the caller rolls the connection back).
///
/// Two routes: a group of one kind (the save lane's, the delivery lane's) is its own
/// transaction, whose two scripts begin and commit it, two round trips in all ([`run_alone`]).
/// Otherwise, or when the server refuses a multi-row statement for its data, the group runs in
/// an explicit transaction ([`run_mixed`]).
///
/// A connection lost (no answer from the server, rather than its refusal) once the round trip
/// carrying the `COMMIT` was sent is [`GroupError::Unknown`]: the server may have committed.
fn run_group(
    db: u32,
    conn: &mut mysql::Conn,
    ops: &[&Op],
    consecutive_ids: bool,
    commit_sent: &Cell<bool>,
) -> std::result::Result<Vec<Result<Reply>>, GroupError> {
    let outcome = run_group_with(db, conn, ops, consecutive_ids, commit_sent);
    #[cfg(test)]
    if outcome.is_ok() {
        tests::panic_point(tests::Stage::Committed);
    }
    match outcome {
        Err(GroupError::Failed(e))
            if commit_sent.get() && (server_code(&e).is_none() || cut_short(&e)) =>
        {
            Err(GroupError::Unknown(e))
        }
        other => other,
    }
}

/// The next round trip carries the group's `COMMIT` (a crash point for `verify`).
fn commit_going_out(sent: &Cell<bool>) {
    crate::crash::hit(crate::crash::Point::MidGroupCommit);
    #[cfg(test)]
    tests::panic_point(tests::Stage::BeforeCommit);
    sent.set(true);
}

fn run_group_with(
    db: u32,
    conn: &mut mysql::Conn,
    ops: &[&Op],
    consecutive_ids: bool,
    commit_sent: &Cell<bool>,
) -> std::result::Result<Vec<Result<Reply>>, GroupError> {
    let ctx = |frame| GroupCtx {
        db,
        nbe: conn.no_backslash_escape(),
        frame,
        consecutive_ids,
        commit_sent,
    };
    let (as_tx, in_tx) = (ctx(sql::Frame::Transaction), ctx(sql::Frame::Savepoint));
    let together_ok = match one_kind(ops) {
        Some(run) => match run_alone(conn, &as_tx, ops, run)? {
            Alone::Done(replies) => return Ok(replies),
            Alone::Mixed { together_ok } => together_ok,
        },
        None => true,
    };
    run_mixed(conn, db, &in_tx, ops, together_ok)
}

/// The multi-row runner of a group whose ops are all of one kind, if they are.
fn one_kind(ops: &[&Op]) -> Option<GroupFn> {
    if ops.iter().all(|o| matches!(o, Op::SaveAward { .. })) {
        Some(insert_save_group)
    } else if ops
        .iter()
        .all(|o| matches!(o, Op::Deliver { .. } | Op::MarkCompleted { .. }))
    {
        Some(deliver_all)
    } else {
        None
    }
}

/// How [`run_alone`] ended.
enum Alone {
    /// Committed: one reply per op.
    Done(Vec<Result<Reply>>),
    /// Nothing was kept; run the group as a mixed one, with its multi-row statements again
    /// (`together_ok`) or op by op (the server refused one for its data).
    Mixed { together_ok: bool },
}

/// Whether the server answered that it cut the statement short itself (the connection killed,
/// the server shutting down, the query interrupted): an answer, but not a refusal, so a
/// `COMMIT` in flight may or may not have been kept.
fn cut_short(e: &mysql::Error) -> bool {
    matches!(server_code(e), Some(1927 | 1053 | 1317))
}

/// Run a group of one kind as its own transaction, begun and committed by its scripts.
fn run_alone(
    conn: &mut mysql::Conn,
    as_tx: &GroupCtx,
    ops: &[&Op],
    run: GroupFn,
) -> std::result::Result<Alone, GroupError> {
    match run(conn, as_tx, ops) {
        Ok(Some(replies)) => Ok(Alone::Done(replies)),
        Ok(None) => Ok(Alone::Mixed { together_ok: true }),
        Err(e) if server_code(&e).is_some() && !cut_short(&e) => {
            // The server refused a statement and stopped there, before the COMMIT.
            as_tx.commit_sent.set(false);
            conn.query_drop("ROLLBACK")?;
            if !refused_for_data(&e) {
                return Err(e.into());
            }
            log::debug!("multi-row statement refused ({e}); running the group's ops one by one");
            Ok(Alone::Mixed { together_ok: false })
        }
        Err(e) => Err(e.into()),
    }
}

/// Run a group in an explicit transaction: each kind's ops together under a savepoint (when
/// `together_ok`), and whatever is left op by op, each under its own savepoint; one commit.
fn run_mixed(
    conn: &mut mysql::Conn,
    db: u32,
    in_tx: &GroupCtx,
    ops: &[&Op],
    together_ok: bool,
) -> std::result::Result<Vec<Result<Reply>>, GroupError> {
    conn.query_drop("START TRANSACTION")?;
    let mut results: Vec<Option<Result<Reply>>> = ops.iter().map(|_| None).collect();
    if together_ok {
        for (kind, run) in [
            (0, insert_save_group as GroupFn),
            (1, deliver_all as GroupFn),
        ] {
            let idx: Vec<usize> = (0..ops.len())
                .filter(|i| match ops[*i] {
                    Op::SaveAward { .. } => kind == 0,
                    Op::Deliver { .. } => kind == 1,
                    _ => false,
                })
                .collect();
            if !idx.is_empty() {
                together(conn, in_tx, ops, &idx, &mut results, run)?;
            }
        }
    }
    for (i, op) in ops.iter().enumerate() {
        if results[i].is_none() {
            results[i] = Some(one_op(conn, db, op)?);
        }
    }
    commit_going_out(in_tx.commit_sent);
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
            Ok(Err(match op {
                // A message whose values the database can never hold: no retry will change
                // that, so it is set aside as poison (dead-lettered, or its task parked dead).
                Op::Deliver { msg, .. } if is_data_refusal(&e) => Error::Poison(format!(
                    "big_market_{db:02} refuses to record message {} for its data: {e}",
                    msg.id
                )),
                _ => Error::storage(format!("writing to shard big_market_{db:02}"), e),
            }))
        }
        Err(OpError::Server(e)) => Err(e.into()),
    }
}

/// Whether the server refused a statement for the values it carries (too long, out of range,
/// not valid in the column's character set, NULL, a constraint): the same values are refused
/// every time. Not a full disk, a lock or a lost connection.
fn is_data_refusal(e: &mysql::Error) -> bool {
    matches!(
        server_code(e),
        Some(1048 | 1062 | 1264 | 1265 | 1292 | 1366 | 1406 | 1451 | 1452 | 3819 | 4025)
    )
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
fn insert_save_group(
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
    if !MessageId::fits(first + args.len() as u64 - 1) {
        // Past the message id range: give the numbers back, and let the ops run one by one,
        // so that those that fit are saved and the rest refused.
        tx.query_drop(match ctx.frame {
            sql::Frame::Transaction => "ROLLBACK",
            sql::Frame::Savepoint => "ROLLBACK TO SAVEPOINT together",
        })?;
        return Ok(None);
    }
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
        commit_going_out(ctx.commit_sent);
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
        commit_going_out(ctx.commit_sent);
        let counts = sql::group_marks(tx, ctx.nbe, &marks)?;
        return Ok(Some(
            counts.into_iter().map(|n| Ok(Reply::Count(n))).collect(),
        ));
    }
    let mut by_table: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (m, table, _) in &msgs {
        if let Some(order) = m.order_id() {
            by_table.entry(table).or_default().push(order);
        }
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
        let order = m.order_id();
        if let Some(order) = order {
            let key = (table.to_string(), order.to_string(), d.user_id.clone());
            if !owners.contains(&key) {
                results.push(Err(poison(m, table, db)));
                continue;
            }
        }
        if logged.insert(m.id.clone()) {
            firsts.push((&m.id, m.seq.unwrap_or(0), order.unwrap_or("")));
            match order {
                Some(order) => {
                    complete.entry(table).or_default().push(order);
                    results.push(Ok(Reply::Delivered(Delivered::First)));
                }
                // The original's form names no award: logged, nothing to deliver.
                None => results.push(Ok(Reply::Delivered(Delivered::Recorded))),
            }
        } else {
            again.push(&m.id);
            results.push(Ok(Reply::Delivered(Delivered::Again)));
        }
    }
    if ctx.frame == sql::Frame::Transaction {
        commit_going_out(ctx.commit_sent);
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
        m.id,
        m.data.user_id,
        m.order_id().unwrap_or("-")
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
            if !MessageId::fits(seq) {
                // The op's savepoint rolls the award and the sequence number back.
                return Err(OpError::Op(MessageId::exhausted(&format!(
                    "shard big_market_{db:02}"
                ))));
            }
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
        } => Ok(op::mark_each(failures, |f| {
            sql::mark_failed(
                tx,
                f.id,
                owner,
                f.state,
                f.attempts,
                f.next_attempt_at,
                &f.error,
                *now_ms,
            )
        })?),
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
        } => Ok(op::renew_each(ids, |id| {
            sql::renew_lease(tx, id, owner, *lease_until_ms, *now_ms)
        })?),
        Op::Release { owner, now_ms } => Ok(Reply::Count(sql::release_claims(tx, owner, *now_ms)?)),
        Op::Deliver { msg, table, now_ms } => {
            let d = &msg.data;
            let order = msg.order_id();
            if let Some(order) = order {
                if !sql::award_exists(tx, table, &d.user_id, order)? {
                    return Err(OpError::Op(poison(msg, table, db)));
                }
            }
            let first = sql::record_delivery(
                tx,
                &msg.id,
                msg.seq.unwrap_or(0),
                order.unwrap_or(""),
                *now_ms,
            )?;
            match (first, order) {
                (false, _) => Ok(Reply::Delivered(Delivered::Again)),
                (true, None) => Ok(Reply::Delivered(Delivered::Recorded)),
                (true, Some(order)) => {
                    sql::complete_awards(tx, table, &[order], *now_ms)?;
                    Ok(Reply::Delivered(Delivered::First))
                }
            }
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

#[cfg(test)]
mod tests {
    //! A panic inside a group, against the MariaDB/MySQL server named by
    //! `BIG_MARKET_TEST_MYSQL` (on scratch databases, dropped after). Without the variable the
    //! test has nothing to run against and returns at once, as the integration suites skip.

    use super::*;
    use crate::config::{Settings, StoreTarget};
    use crate::model::AwardRecord;
    use crate::router::{award_table, route};
    use crate::store::mysql::scratch::Scratch;
    use crate::store::writer::run_contained;
    use std::sync::Arc;

    /// Where a test makes the group panic, as a bug would.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(super) enum Stage {
        /// Its statements have run; the round trip with the `COMMIT` has not gone out.
        BeforeCommit,
        /// The commit was answered.
        Committed,
    }

    thread_local! {
        /// The stages at which to panic next, in order (on this thread only): a stage reached
        /// while it is first in line panics and leaves the line.
        static PANIC_AT: std::cell::RefCell<std::collections::VecDeque<Stage>> =
            const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
    }

    pub(super) fn panic_point(stage: Stage) {
        let hit = PANIC_AT.with(|line| {
            let mut line = line.borrow_mut();
            let first = line.front() == Some(&stage);
            if first {
                line.pop_front();
            }
            first
        });
        if hit {
            panic!("a bug in a MySQL group (test, {stage:?})");
        }
    }

    fn arm(stages: &[Stage]) {
        PANIC_AT.with(|line| *line.borrow_mut() = stages.iter().copied().collect());
    }

    /// The save lane's batch of database 1 on fresh scratch databases, and a connection to
    /// look at what was kept.
    fn lane() -> Option<(Scratch, MysqlBatch, mysql::Conn)> {
        let url = std::env::var("BIG_MARKET_TEST_MYSQL").ok()?;
        let settings = Settings::new("unused");
        let StoreTarget::Mysql(dbs) = StoreTarget::parse(&url, settings.layout.db_count())
            .expect("BIG_MARKET_TEST_MYSQL is a mysql:// URL")
        else {
            panic!("BIG_MARKET_TEST_MYSQL is not a mysql:// URL");
        };
        let tag = format!("panic{}", std::process::id());
        let scratch = Scratch::new(&dbs, &tag);
        let mut settings = settings;
        settings.store = scratch.target();
        super::super::open_all(&settings, scratch.dbs(), true).unwrap_or_else(|e| {
            panic!("BIG_MARKET_TEST_MYSQL names a server that does not answer: {e}")
        });
        let d = &scratch.dbs()[0];
        let opts: mysql::Opts = super::super::conn_opts(d, true, &settings).unwrap().into();
        let lane = MysqlBatch {
            db: 1,
            shown: d.shown.clone(),
            opts: opts.clone(),
            conn: None,
            consecutive_ids: false,
            linger: Duration::ZERO,
            commit_sent: Cell::new(false),
        };
        let look = mysql::Conn::new(opts).unwrap();
        Some((scratch, lane, look))
    }

    const USER: &str = "user0001";

    fn table() -> String {
        let layout = Settings::new("unused").layout;
        award_table(route(USER, layout).table)
    }

    fn save(order: &str) -> Op {
        Op::SaveAward {
            table: table(),
            record: AwardRecord::sample(USER, order, 1_000).unwrap(),
            topic: Arc::from("send_award"),
            owner: Arc::from("test"),
            lease_until_ms: 2_000,
            now_ms: 1_000,
        }
    }

    fn deliver(saved: &Result<Reply>) -> Op {
        let Ok(Reply::Saved(task)) = saved else {
            panic!("expected a saved award: {saved:?}")
        };
        Op::Deliver {
            msg: EventMessage::decode(task.message.as_bytes()).unwrap(),
            table: table(),
            now_ms: 3_000,
        }
    }

    fn run(lane: &mut MysqlBatch, ops: &[Op]) -> Vec<Result<Reply>> {
        let refs: Vec<&Op> = ops.iter().collect();
        run_contained(1, lane, &refs)
    }

    /// `(order id, award state)` of every award record, and the task sequence numbers, in order.
    fn kept(look: &mut mysql::Conn) -> (Vec<(String, String)>, Vec<u64>) {
        let awards = look
            .query(format!(
                "SELECT order_id, award_state FROM {} ORDER BY order_id",
                table()
            ))
            .unwrap();
        let seqs = look.query("SELECT seq FROM task ORDER BY seq").unwrap();
        (awards, seqs)
    }

    fn award(order: &str, state: &str) -> (String, String) {
        (order.to_string(), state.to_string())
    }

    #[test]
    fn a_group_that_panics_before_its_commit_went_out_keeps_nothing_and_its_ops_run_again_alone() {
        let Some((_scratch, mut lane, mut look)) = lane() else {
            eprintln!("BIG_MARKET_TEST_MYSQL is unset: nothing to run against");
            return;
        };

        // Three saves; the group panics after its sequence numbers were taken (the counter
        // row locked, in a transaction still open), before the commit. Each save then runs
        // alone, on a new connection, and is kept once, with no sequence number lost.
        arm(&[Stage::BeforeCommit]);
        let saved = run(&mut lane, &[save("o1"), save("o2"), save("o3")]);
        assert!(
            saved.iter().all(|r| matches!(r, Ok(Reply::Saved(_)))),
            "each save, run again alone, is saved: {saved:?}"
        );
        let (awards, seqs) = kept(&mut look);
        assert_eq!(
            awards,
            [
                award("o1", "create"),
                award("o2", "create"),
                award("o3", "create")
            ]
        );
        assert_eq!(
            seqs,
            [1, 2, 3],
            "gap-free: the panicked group's numbers were not kept"
        );

        // A delivery that fails on the bug every time is refused as unprocessable (the
        // consumer dead-letters it) and nothing of it is kept; the save beside it is kept.
        arm(&[Stage::BeforeCommit, Stage::BeforeCommit]);
        let results = run(&mut lane, &[deliver(&saved[0]), save("o4")]);
        assert!(
            matches!(&results[0], Err(Error::Poison(_))),
            "the delivery that panics alone too: {:?}",
            results[0]
        );
        assert!(
            matches!(&results[1], Ok(Reply::Saved(_))),
            "{:?}",
            results[1]
        );
        let (awards, seqs) = kept(&mut look);
        assert_eq!(
            awards[0],
            award("o1", "create"),
            "the delivery kept nothing"
        );
        assert_eq!(awards.len(), 4);
        assert_eq!(seqs, [1, 2, 3, 4]);
        let logged: Option<u64> = look.query_first("SELECT COUNT(*) FROM delivery").unwrap();
        assert_eq!(logged, Some(0), "no delivery log row");

        // A panic after the commit was answered: the group was kept, and its ops hear
        // "outcome unknown" (a retry with the same order id is then refused as a duplicate).
        arm(&[Stage::Committed]);
        let results = run(&mut lane, &[save("o5"), save("o6")]);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(Error::OutcomeUnknown { .. }))),
            "{results:?}"
        );
        let (awards, seqs) = kept(&mut look);
        assert_eq!(awards.len(), 6, "the group was committed: {awards:?}");
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);

        // The group panics before its commit, and the first op, run again alone, panics
        // after its own commit: that op's outcome is unknown (it was kept), the other's saved.
        arm(&[Stage::BeforeCommit, Stage::Committed]);
        let results = run(&mut lane, &[save("o7"), save("o8")]);
        assert!(
            matches!(&results[0], Err(Error::OutcomeUnknown { .. })),
            "{:?}",
            results[0]
        );
        assert!(
            matches!(&results[1], Ok(Reply::Saved(_))),
            "{:?}",
            results[1]
        );
        let (awards, seqs) = kept(&mut look);
        assert_eq!(awards[6..], [award("o7", "create"), award("o8", "create")]);
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7, 8]);

        // The lane goes on.
        let results = run(&mut lane, &[deliver(&saved[1])]);
        assert!(
            matches!(&results[0], Ok(Reply::Delivered(Delivered::First))),
            "{results:?}"
        );
        assert_eq!(kept(&mut look).0[1], award("o2", "completed"));
    }
}
