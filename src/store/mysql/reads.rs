//! The reads of one MySQL database (status, audit facts, listings), through its pool.

use mysql::{IsolationLevel, Pool, PooledConn, TxOpts};

use super::sql;
use crate::error::{Error, Result};
use crate::model::TaskState;
use crate::store::counting::{self, Counting};
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
        counting::status(
            db,
            self.shown.clone(),
            tb_count,
            &mut Asking {
                q: &mut conn,
                reads: self,
            },
        )
    }

    fn audit_facts(&self, db: u32, tb_count: u32) -> Result<crate::audit::Facts> {
        let mut conn = self.conn()?;
        // One consistent, read-only snapshot: the facts are of one moment.
        let mut tx = conn
            .start_transaction(
                TxOpts::default()
                    .set_isolation_level(Some(IsolationLevel::RepeatableRead))
                    .set_with_consistent_snapshot(true)
                    .set_access_mode(Some(mysql::AccessMode::ReadOnly)),
            )
            .map_err(self.err("reading audit facts"))?;
        counting::audit_facts(
            db,
            tb_count,
            &mut Asking {
                q: &mut tx,
                reads: self,
            },
        )
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

/// The counting questions, asked of one connection (or transaction) of a database.
struct Asking<'a, Q: mysql::prelude::Queryable> {
    q: &'a mut Q,
    reads: &'a MysqlReads,
}

impl<Q: mysql::prelude::Queryable> Counting for Asking<'_, Q> {
    fn tasks_by_state(&mut self) -> Result<Vec<(String, u64)>> {
        sql::count_tasks_by_state(self.q).map_err(self.reads.err("counting tasks"))
    }
    fn awards_by_state(&mut self, table: &str) -> Result<Vec<(String, u64)>> {
        sql::count_awards_by_state(self.q, table).map_err(self.reads.err("counting award records"))
    }
    fn oldest_pending(&mut self) -> Result<Option<i64>> {
        sql::oldest_pending(self.q).map_err(self.reads.err("finding the oldest pending task"))
    }
    fn delivery_totals(&mut self) -> Result<(u64, u64)> {
        sql::delivery_totals(self.q).map_err(self.reads.err("counting deliveries"))
    }
    fn last_seq(&mut self) -> Result<u64> {
        sql::last_seq(self.q).map_err(self.reads.err("reading the task sequence"))
    }
    fn watermark(&mut self) -> Result<u64> {
        // The MySQL store does not compact (the Java service may read its tables).
        Ok(0)
    }
    fn delivered_seqs(&mut self) -> Result<Vec<(u64, u32)>> {
        sql::delivered_seqs(self.q).map_err(self.reads.err("reading audit facts"))
    }
    fn task_facts(&mut self) -> Result<Vec<crate::audit::TaskFact>> {
        sql::task_orders(self.q).map_err(self.reads.err("reading audit facts"))
    }
    fn delivered_orders(&mut self) -> Result<Vec<(String, u64)>> {
        sql::delivered_orders(self.q).map_err(self.reads.err("reading audit facts"))
    }
    fn award_facts(&mut self, table: &str) -> Result<Vec<crate::audit::AwardFact>> {
        sql::award_orders(self.q, table).map_err(self.reads.err("reading audit facts"))
    }
    fn tasks_below_watermark(&mut self) -> Result<Vec<u64>> {
        Ok(Vec::new())
    }
}
