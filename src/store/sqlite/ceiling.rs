//! Bench-only access to one SQLite shard file, outside the store's public surface: the bench
//! measures the storage ceiling and re-enacts the original's one-transaction-per-step design.

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::{configure, insert_award_and_task, insert_pair, shard_path, sql};
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
