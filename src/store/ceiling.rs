//! Bench-only access to one shard file, outside the store's public surface: the bench measures
//! the storage ceilings and re-enacts the original's one-transaction-per-step design with it.

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::sqlite::{configure, insert_award_and_task, insert_pair, shard_path, sql};
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::model::AwardRecord;
use crate::router::{award_table, route, Layout};

/// Direct access to one shard file with the store's durability settings and no writer thread:
/// the bench measures the storage ceiling and re-enacts one-transaction-per-step designs with it.
pub(crate) struct Direct {
    conn: Connection,
    db: u32,
    layout: Layout,
}

impl Direct {
    /// Open shard `db` of an initialised data directory.
    pub(crate) fn open(settings: &Settings, db: u32) -> Result<Direct> {
        let path = shard_path(settings, db);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| Error::storage(format!("opening {}", path.display()), e))?;
        configure(&conn, settings.busy_timeout)
            .map_err(|e| Error::storage(format!("opening {}", path.display()), e))?;
        Ok(Direct {
            conn,
            db,
            layout: settings.layout,
        })
    }

    /// Insert awards and their tasks, `batch` awards per transaction. Records must route here.
    pub(crate) fn insert_batches(
        &mut self,
        records: &[AwardRecord],
        batch: usize,
        topic: &str,
        now_ms: i64,
    ) -> Result<()> {
        self.in_batches(records, batch, |tx, db, layout, r| {
            insert_pair(tx, db, layout, r, topic, now_ms).map(|_| ())
        })
    }

    /// Every statement the embedded pipeline runs for an award, `batch` awards per transaction:
    /// the award and task insert, the delivery log and the award's completion, the task's
    /// completion. Records must route here.
    pub(crate) fn e2e_batches(
        &mut self,
        records: &[AwardRecord],
        batch: usize,
        topic: &str,
        now_ms: i64,
    ) -> Result<()> {
        self.in_batches(records, batch, |tx, db, layout, r| {
            let e = |err| Error::storage("bench e2e batch", err);
            let table = award_table(route(r.user_id.as_str(), layout).table);
            let t = insert_award_and_task(tx, db, &table, r, topic, "bench", now_ms, now_ms)?;
            let (user, order) = (r.user_id.as_str(), r.order_id.as_str());
            sql::record_delivery(tx, t.message_id.as_str(), t.seq, order, now_ms).map_err(e)?;
            sql::complete_award(tx, &table, user, order, now_ms).map_err(e)?;
            sql::mark_completed(tx, t.id, None, now_ms).map_err(e)?;
            Ok(())
        })
    }

    /// Run `per_award` for every record, `batch` records per `BEGIN IMMEDIATE` transaction.
    fn in_batches(
        &mut self,
        records: &[AwardRecord],
        batch: usize,
        per_award: impl Fn(&Connection, u32, Layout, &AwardRecord) -> Result<()>,
    ) -> Result<()> {
        for chunk in records.chunks(batch.max(1)) {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| Error::storage("bench batch", e))?;
            for r in chunk {
                per_award(&tx, self.db, self.layout, r)?;
            }
            tx.commit()
                .map_err(|e| Error::storage("bench batch commit", e))?;
        }
        Ok(())
    }

    /// One award and its task in their own transaction; returns the task id and message body.
    pub(crate) fn save_one(
        &mut self,
        record: &AwardRecord,
        topic: &str,
        now_ms: i64,
    ) -> Result<(i64, String)> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::storage("naive save", e))?;
        let out = insert_pair(&tx, self.db, self.layout, record, topic, now_ms)?;
        tx.commit()
            .map_err(|e| Error::storage("naive save commit", e))?;
        Ok(out)
    }

    /// Mark one task completed in its own transaction.
    pub(crate) fn mark_one(&mut self, id: i64, now_ms: i64) -> Result<()> {
        sql::mark_completed(&self.conn, id, None, now_ms)
            .map_err(|e| Error::storage("naive mark", e))?;
        Ok(())
    }
}

/// The MySQL ceiling: every statement the pipeline runs for an award (sequence numbers, award
/// and task inserts, delivery log, award completion, task completion), as the multi-row
/// statements of one group, `batch` awards per transaction, on one connection to database
/// `d`. Records must route to it. The database must have been created (`Store::open`).
pub(crate) fn mysql_e2e_batches(
    d: &crate::config::MysqlDatabase,
    db: u32,
    layout: Layout,
    records: &[AwardRecord],
    batch: usize,
    topic: &str,
) -> Result<()> {
    use super::mysql::sql as my;
    use super::mysql::{Numbered, SaveArgs};
    use ::mysql::prelude::Queryable;
    use std::collections::BTreeMap;

    let e = |err: ::mysql::Error| Error::storage(format!("bench e2e batch on {}", d.shown), err);
    let mut conn = ::mysql::Conn::new(d.opts.clone()).map_err(e)?;
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .map_err(e)?;
    for chunk in records.chunks(batch.max(1)) {
        let now = crate::util::now_ms();
        let mut tx = conn
            .start_transaction(::mysql::TxOpts::default())
            .map_err(e)?;
        let first = my::take_seqs(&mut tx, chunk.len() as u64).map_err(e)?;
        let split: Vec<String> = chunk
            .iter()
            .map(|r| award_table(route(r.user_id.as_str(), layout).table))
            .collect();
        let mut tables: BTreeMap<&str, Vec<my::NewAward<'_>>> = BTreeMap::new();
        for (r, table) in chunk.iter().zip(&split) {
            tables.entry(table).or_default().push(my::NewAward::of(r));
        }
        for (table, rows) in &tables {
            my::insert_awards(&mut tx, table, rows, now).map_err(e)?;
        }
        let args: Vec<SaveArgs<'_>> = chunk
            .iter()
            .zip(&split)
            .map(|(record, table)| SaveArgs {
                record,
                table,
                topic,
                owner: "bench",
                lease_until_ms: now,
                now_ms: now,
            })
            .collect();
        let numbered = Numbered::new(db, &args, first);
        let ids = my::insert_tasks(&mut tx, &numbered.task_rows(), now).map_err(e)?;
        let deliveries: Vec<(&str, u64, &str)> = chunk
            .iter()
            .zip(&numbered.messages)
            .map(|(r, (seq, id, _))| (id.as_str(), *seq, r.order_id.as_str()))
            .collect();
        let logged: Vec<&str> = deliveries.iter().map(|d| d.0).collect();
        my::logged_deliveries(&mut tx, &logged).map_err(e)?;
        my::insert_deliveries(&mut tx, &deliveries, now).map_err(e)?;
        for (table, rows) in &tables {
            let orders: Vec<&str> = rows.iter().map(|a| a.order_id).collect();
            my::existing_awards(&mut tx, table, &orders).map_err(e)?;
            my::complete_awards(&mut tx, table, &orders, now).map_err(e)?;
        }
        my::mark_completed(&mut tx, &ids, None, now).map_err(e)?;
        tx.commit().map_err(e)?;
    }
    Ok(())
}

/// What MySQL servers have run so far: statements received and transactions committed, from
/// their global status. Other clients of the same servers count too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ServerWork {
    /// `Questions`: statements clients sent (each statement of a multi-statement query too).
    pub(crate) statements: u64,
    /// `Com_commit`: COMMIT statements.
    pub(crate) commits: u64,
}

impl ServerWork {
    /// Per award, between `before` and `self`, over `n` awards.
    pub(crate) fn per_award(self, before: ServerWork, n: usize) -> (f64, f64) {
        let n = n.max(1) as f64;
        (
            self.statements.saturating_sub(before.statements) as f64 / n,
            self.commits.saturating_sub(before.commits) as f64 / n,
        )
    }
}

/// The work counters summed over the distinct servers of `dbs`.
pub(crate) fn mysql_server_work(dbs: &[crate::config::MysqlDatabase]) -> Result<ServerWork> {
    use ::mysql::prelude::Queryable;
    let mut seen = std::collections::HashSet::new();
    let mut total = ServerWork::default();
    for d in dbs {
        if !seen.insert((
            d.opts.get_ip_or_hostname().to_string(),
            d.opts.get_tcp_port(),
        )) {
            continue;
        }
        let e =
            |err: ::mysql::Error| Error::storage(format!("reading the status of {}", d.shown), err);
        let server = ::mysql::OptsBuilder::from_opts(d.opts.clone()).db_name(None::<String>);
        let mut conn = ::mysql::Conn::new(server).map_err(e)?;
        let rows: Vec<(String, String)> = conn
            .query("SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_commit')")
            .map_err(e)?;
        for (name, value) in rows {
            let v: u64 = value.parse().unwrap_or(0);
            match name.as_str() {
                "Questions" => total.statements += v,
                "Com_commit" => total.commits += v,
                _ => {}
            }
        }
    }
    Ok(total)
}
