//! The reads of one SQLite shard file (status, audit facts, listings), through its pool.

use std::collections::BTreeMap;
use std::path::PathBuf;

use r2d2_sqlite::SqliteConnectionManager;

use super::{sql, Pool};
use crate::error::{Error, Result};
use crate::model::TaskState;
use crate::router::award_table;
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
        let e = |what: &'static str| move |err| Error::storage(self.ctx(what), err);
        let tasks = sql::count_tasks_by_state(&conn)
            .map_err(e("counting tasks"))?
            .into_iter()
            .collect();
        let mut awards = BTreeMap::new();
        for t in 0..tb_count {
            for (state, n) in sql::count_awards_by_state(&conn, &award_table(t))
                .map_err(e("counting award records"))?
            {
                *awards.entry(state).or_insert(0) += n;
            }
        }
        let oldest_pending_ms =
            sql::oldest_pending(&conn).map_err(e("finding the oldest pending task"))?;
        let (delivered_messages, receipts) =
            sql::delivery_totals(&conn).map_err(e("counting deliveries"))?;
        let last_seq = sql::last_seq(&conn).map_err(e("reading the task sequence"))?;
        let compacted = sql::watermark(&conn).map_err(e("reading the watermark"))?;
        Ok(ShardStatus {
            db,
            location: self.path.display().to_string(),
            tasks,
            awards,
            oldest_pending_ms,
            delivered_messages,
            receipts,
            last_seq,
            compacted,
        })
    }

    fn audit_facts(&self, db: u32, tb_count: u32) -> Result<crate::audit::Facts> {
        let mut conn = self.conn()?;
        let e = |err| Error::storage(self.ctx("reading audit facts"), err);
        let tx = conn.transaction().map_err(e)?;
        let mut awards = Vec::new();
        for t in 0..tb_count {
            awards.extend(sql::award_orders(&tx, &award_table(t)).map_err(e)?);
        }
        Ok(crate::audit::Facts {
            db,
            last_seq: sql::last_seq(&tx).map_err(e)?,
            delivered: sql::delivered_seqs(&tx).map_err(e)?,
            tasks: sql::task_orders(&tx).map_err(e)?,
            delivered_orders: sql::delivered_orders(&tx).map_err(e)?,
            awards,
            watermark: sql::watermark(&tx).map_err(e)?,
            tasks_below_watermark: sql::tasks_below_watermark(&tx).map_err(e)?,
        })
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
