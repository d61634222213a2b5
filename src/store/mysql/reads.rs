//! The reads of one MySQL database (status, audit facts, listings), through its pool.

use std::collections::BTreeMap;

use mysql::{IsolationLevel, Pool, PooledConn, TxOpts};

use super::sql;
use crate::error::{Error, Result};
use crate::model::TaskState;
use crate::router::award_table;
use crate::store::{AwardRow, Reads, ShardStatus, TaskRow};

/// The reads of one database, through its pool.
pub(super) struct MysqlReads {
    pub(super) shown: String,
    pub(super) pool: Pool,
    /// How long a read waits for a pooled connection (`--mysql-timeout`).
    pub(super) timeout: std::time::Duration,
}

impl MysqlReads {
    fn conn(&self) -> Result<PooledConn> {
        self.pool
            .try_get_conn(self.timeout)
            .map_err(|e| Error::storage(format!("connecting to {}", self.shown), e))
    }

    fn err(&self, what: &str) -> impl Fn(mysql::Error) -> Error + '_ {
        let context = format!("{what} in {}", self.shown);
        move |e| Error::storage(context.clone(), e)
    }
}

impl Reads for MysqlReads {
    fn ping(&self) -> Result<()> {
        sql::last_seq(&mut self.conn()?)
            .map(|_| ())
            .map_err(self.err("reading"))
    }

    fn leased_tasks(&self, owner: &str, from: u64, to: u64, limit: usize) -> Result<Vec<TaskRow>> {
        sql::leased_in_range(&mut self.conn()?, owner, from, to, limit)
            .map_err(self.err("reading back handed-off tasks"))
    }

    fn task_state(&self, message_id: &str) -> Result<Option<String>> {
        sql::task_state(&mut self.conn()?, message_id).map_err(self.err("reading a task"))
    }

    fn status(&self, db: u32, tb_count: u32) -> Result<ShardStatus> {
        let mut conn = self.conn()?;
        let tasks = sql::count_tasks_by_state(&mut conn)
            .map_err(self.err("counting tasks"))?
            .into_iter()
            .collect();
        let mut awards = BTreeMap::new();
        for t in 0..tb_count {
            for (state, n) in sql::count_awards_by_state(&mut conn, &award_table(t))
                .map_err(self.err("counting award records"))?
            {
                *awards.entry(state).or_insert(0) += n;
            }
        }
        let oldest_pending_ms =
            sql::oldest_pending(&mut conn).map_err(self.err("finding the oldest pending task"))?;
        let (delivered_messages, receipts) =
            sql::delivery_totals(&mut conn).map_err(self.err("counting deliveries"))?;
        let last_seq = sql::last_seq(&mut conn).map_err(self.err("reading the task sequence"))?;
        Ok(ShardStatus {
            db,
            location: self.shown.clone(),
            tasks,
            awards,
            oldest_pending_ms,
            delivered_messages,
            receipts,
            last_seq,
            // The MySQL store does not compact.
            compacted: 0,
        })
    }

    fn audit_facts(&self, db: u32, tb_count: u32) -> Result<crate::audit::Facts> {
        let mut conn = self.conn()?;
        let e = self.err("reading audit facts");
        let mut tx = conn
            .start_transaction(
                TxOpts::default()
                    .set_isolation_level(Some(IsolationLevel::RepeatableRead))
                    .set_with_consistent_snapshot(true)
                    .set_access_mode(Some(mysql::AccessMode::ReadOnly)),
            )
            .map_err(&e)?;
        let mut awards = Vec::new();
        for t in 0..tb_count {
            awards.extend(sql::award_orders(&mut tx, &award_table(t)).map_err(&e)?);
        }
        Ok(crate::audit::Facts {
            db,
            last_seq: sql::last_seq(&mut tx).map_err(&e)?,
            delivered: sql::delivered_seqs(&mut tx).map_err(&e)?,
            tasks: sql::task_orders(&mut tx).map_err(&e)?,
            delivered_orders: sql::delivered_orders(&mut tx).map_err(&e)?,
            awards,
            // The MySQL store does not compact (the Java service may read its tables).
            watermark: 0,
            tasks_below_watermark: Vec::new(),
        })
    }

    fn list_tasks(&self, state: Option<TaskState>, limit: usize) -> Result<Vec<TaskRow>> {
        sql::list_tasks(&mut self.conn()?, state, limit).map_err(self.err("listing tasks"))
    }

    fn awards_of(&self, table: &str, user: &str, limit: usize) -> Result<Vec<AwardRow>> {
        sql::awards_of_user(&mut self.conn()?, table, user, limit)
            .map_err(self.err("listing a user's awards"))
    }

    fn file(&self) -> Option<&std::path::Path> {
        None
    }

    fn copy_into(&self, _target: &std::path::Path) -> Result<()> {
        Err(Error::Config(format!(
            "{} is a database on a server: back it up with the server's own tools",
            self.shown
        )))
    }
}
