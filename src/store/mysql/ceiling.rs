//! Bench-only access to MySQL databases (crate-private): the MySQL ceiling (every statement
//! of the pipeline, 1,000 awards per transaction) and the servers' work counters.

use crate::error::{Error, Result};
use crate::model::AwardRecord;
use crate::router::{award_table, route, Layout};

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
    use super::sql as my;
    use super::{Numbered, SaveArgs};
    use mysql::prelude::Queryable;
    use std::collections::BTreeMap;

    let e = |err: mysql::Error| Error::storage(format!("bench e2e batch on {}", d.shown), err);
    let mut conn = mysql::Conn::new(super::opts(d)?).map_err(e)?;
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .map_err(e)?;
    for chunk in records.chunks(batch.max(1)) {
        let now = crate::util::now_ms();
        let mut tx = conn
            .start_transaction(mysql::TxOpts::default())
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
    use mysql::prelude::Queryable;
    let mut seen = std::collections::HashSet::new();
    let mut total = ServerWork::default();
    for d in dbs {
        let opts = super::opts(d)?;
        if !seen.insert((opts.get_ip_or_hostname().to_string(), opts.get_tcp_port())) {
            continue;
        }
        let e =
            |err: mysql::Error| Error::storage(format!("reading the status of {}", d.shown), err);
        let server = mysql::OptsBuilder::from_opts(opts).db_name(None::<String>);
        let mut conn = mysql::Conn::new(server).map_err(e)?;
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

/// The seed's design on one MySQL database, for the bench's `mysql_naive`: its statements (the
/// award into its split table and the task in one transaction, then the task's completion on its
/// own, as the seed's mapper and `AwardRepository` run them), prepared, through a pool of
/// connections that callers take one statement group at a time.
pub(crate) struct SeedDatabase {
    pool: mysql::Pool,
    shown: String,
}

impl SeedDatabase {
    /// A pool of at most `connections` sessions on database `d` (created by `Store::open`).
    pub(crate) fn open(
        d: &crate::config::MysqlDatabase,
        connections: usize,
        settings: &crate::config::Settings,
    ) -> Result<SeedDatabase> {
        Ok(SeedDatabase {
            pool: super::pool(d, true, connections.max(1), settings)?,
            shown: d.shown.clone(),
        })
    }

    fn error(&self, what: &str) -> impl Fn(mysql::Error) -> Error + '_ {
        let what = what.to_string();
        move |err| Error::storage(format!("{what} on {}", self.shown), err)
    }

    /// The seed's `saveUserAwardRecord` transaction: the award into split table `table` and
    /// its task (`message_id`, `message`), committed together.
    pub(crate) fn save(
        &self,
        table: &str,
        record: &AwardRecord,
        topic: &str,
        message_id: &str,
        message: &str,
    ) -> Result<()> {
        use mysql::prelude::Queryable;
        let e = self.error("naive save");
        let mut conn = self.pool.get_conn().map_err(&e)?;
        let mut tx = conn
            .start_transaction(mysql::TxOpts::default())
            .map_err(&e)?;
        super::sql::insert_awards(
            &mut tx,
            table,
            &[super::sql::NewAward::of(record)],
            crate::util::now_ms(),
        )
        .map_err(&e)?;
        tx.exec_drop(
            "INSERT INTO task (user_id, topic, message_id, message, state, create_time, update_time) VALUES (?, ?, ?, ?, 'create', now(), now())",
            (record.user_id.as_str(), topic, message_id, message),
        )
        .map_err(&e)?;
        tx.commit().map_err(&e)
    }

    /// The seed's `updateTaskSendMessageCompleted`, a statement (and transaction) of its own.
    pub(crate) fn complete(&self, user_id: &str, message_id: &str) -> Result<()> {
        use mysql::prelude::Queryable;
        let e = self.error("naive completion");
        let mut conn = self.pool.get_conn().map_err(&e)?;
        conn.exec_drop(
            "UPDATE task SET state = 'completed', update_time = now() WHERE user_id = ? AND message_id = ?",
            (user_id, message_id),
        )
        .map_err(&e)
    }
}
