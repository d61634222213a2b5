//! The reads of one SQLite shard file (status, audit facts, listings), through its pool.

use std::path::PathBuf;

use r2d2_sqlite::SqliteConnectionManager;

use super::{sql, Pool};
use crate::error::{Error, Result};
use crate::model::TaskState;
use crate::store::counting::{self, Counting};
use crate::store::{AwardRow, Reads, ShardStatus, TaskRow};

/// The reads of one shard file, through its pool.
pub(super) struct SqliteReads {
    pub(super) path: PathBuf,
    pub(super) pool: Pool,
}

impl SqliteReads {
    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        self.pool
            .get()
            .map_err(|e| Error::Config(format!("cannot open {}: {e}", self.path.display())))
    }

    fn ctx(&self, what: &str) -> String {
        format!("{what} in {}", self.path.display())
    }
}

impl Reads for SqliteReads {
    fn ping(&self) -> Result<()> {
        sql::last_seq(&*self.conn()?)
            .map(|_| ())
            .map_err(|e| Error::storage(self.ctx("reading"), e))
    }

    fn leased_tasks(&self, owner: &str, from: u64, to: u64, limit: usize) -> Result<Vec<TaskRow>> {
        sql::leased_in_range(&*self.conn()?, owner, from, to, limit)
            .map_err(|e| Error::storage(self.ctx("reading back handed-off tasks"), e))
    }

    fn task_state(&self, message_id: &str) -> Result<Option<String>> {
        sql::task_state(&*self.conn()?, message_id)
            .map_err(|e| Error::storage(self.ctx("reading a task"), e))
    }

    fn status(&self, db: u32, tb_count: u32) -> Result<ShardStatus> {
        let conn = self.conn()?;
        let location = self.path.display().to_string();
        counting::status(
            db,
            location,
            tb_count,
            &mut Asking {
                conn: &conn,
                reads: self,
            },
        )
    }

    fn audit_facts(&self, db: u32, tb_count: u32) -> Result<crate::audit::Facts> {
        let mut conn = self.conn()?;
        // One read transaction: the facts are of one snapshot.
        let tx = conn
            .transaction()
            .map_err(|e| Error::storage(self.ctx("reading audit facts"), e))?;
        counting::audit_facts(
            db,
            tb_count,
            &mut Asking {
                conn: &tx,
                reads: self,
            },
        )
    }

    fn list_tasks(&self, state: Option<TaskState>, limit: usize) -> Result<Vec<TaskRow>> {
        sql::list_tasks(&*self.conn()?, state, limit)
            .map_err(|e| Error::storage(self.ctx("listing tasks"), e))
    }

    fn awards_of(&self, table: &str, user: &str, limit: usize) -> Result<Vec<AwardRow>> {
        sql::awards_of_user(&*self.conn()?, table, user, limit)
            .map_err(|e| Error::storage(self.ctx("listing a user's awards"), e))
    }

    fn file(&self) -> Option<&std::path::Path> {
        Some(&self.path)
    }

    fn copy_into(&self, target: &std::path::Path) -> Result<()> {
        // VACUUM INTO reads the shard in one read transaction (WAL: writers go on) and writes
        // a compact, consistent copy; unlike the online backup API it never restarts when the
        // shard is written meanwhile.
        let target = target
            .to_str()
            .ok_or_else(|| Error::Config(format!("{} is not a UTF-8 path", target.display())))?;
        sql::vacuum_into(&*self.conn()?, target)
            .map_err(|e| Error::storage(self.ctx(&format!("copying to {target}")), e))
    }
}

/// The counting questions, asked of one connection (or transaction) of a shard file.
struct Asking<'a> {
    conn: &'a rusqlite::Connection,
    reads: &'a SqliteReads,
}

impl Asking<'_> {
    fn ask<T>(&self, what: &str, r: rusqlite::Result<T>) -> Result<T> {
        r.map_err(|e| Error::storage(self.reads.ctx(what), e))
    }
}

impl Counting for Asking<'_> {
    fn tasks_by_state(&mut self) -> Result<Vec<(String, u64)>> {
        self.ask("counting tasks", sql::count_tasks_by_state(self.conn))
    }
    fn awards_by_state(&mut self, table: &str) -> Result<Vec<(String, u64)>> {
        self.ask(
            "counting award records",
            sql::count_awards_by_state(self.conn, table),
        )
    }
    fn oldest_pending(&mut self) -> Result<Option<i64>> {
        self.ask(
            "finding the oldest pending task",
            sql::oldest_pending(self.conn),
        )
    }
    fn delivery_totals(&mut self) -> Result<(u64, u64)> {
        self.ask("counting deliveries", sql::delivery_totals(self.conn))
    }
    fn last_seq(&mut self) -> Result<u64> {
        self.ask("reading the task sequence", sql::last_seq(self.conn))
    }
    fn watermark(&mut self) -> Result<u64> {
        self.ask("reading the watermark", sql::watermark(self.conn))
    }
    fn delivered_seqs(&mut self) -> Result<Vec<(u64, u32)>> {
        self.ask("reading audit facts", sql::delivered_seqs(self.conn))
    }
    fn task_facts(&mut self) -> Result<Vec<crate::audit::TaskFact>> {
        self.ask("reading audit facts", sql::task_orders(self.conn))
    }
    fn delivered_orders(&mut self) -> Result<Vec<(String, u64)>> {
        self.ask("reading audit facts", sql::delivered_orders(self.conn))
    }
    fn award_facts(&mut self, table: &str) -> Result<Vec<crate::audit::AwardFact>> {
        self.ask("reading audit facts", sql::award_orders(self.conn, table))
    }
    fn tasks_below_watermark(&mut self) -> Result<Vec<u64>> {
        self.ask("reading audit facts", sql::tasks_below_watermark(self.conn))
    }
}
