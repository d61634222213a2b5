//! What `status` and `audit` are made of, assembled once for both backends: each backend answers
//! the same small questions on one connection (or, for the audit, one snapshot), and the store
//! puts the answers together.

use std::collections::BTreeMap;

use super::ShardStatus;
use crate::audit::{AwardFact, Facts, TaskFact};
use crate::error::Result;
use crate::router::award_table;

/// The questions, asked of one connection or snapshot of a shard. Errors carry what was asked.
pub(crate) trait Counting {
    /// Tasks per state.
    fn tasks_by_state(&mut self) -> Result<Vec<(String, u64)>>;
    /// Award records of one split table per state.
    fn awards_by_state(&mut self, table: &str) -> Result<Vec<(String, u64)>>;
    /// Creation time of the oldest task not completed or dead.
    fn oldest_pending(&mut self) -> Result<Option<i64>>;
    /// Messages delivered, and receipts counting redeliveries.
    fn delivery_totals(&mut self) -> Result<(u64, u64)>;
    /// Highest sequence number handed out.
    fn last_seq(&mut self) -> Result<u64>;
    /// The compaction watermark (0 where the backend does not compact).
    fn watermark(&mut self) -> Result<u64>;
    /// Delivered sequence numbers, ascending, with receipt counts.
    fn delivered_seqs(&mut self) -> Result<Vec<(u64, u32)>>;
    /// Every task, for the audit.
    fn task_facts(&mut self) -> Result<Vec<TaskFact>>;
    /// Order ids of delivered messages, with their sequence numbers.
    fn delivered_orders(&mut self) -> Result<Vec<(String, u64)>>;
    /// Award records of one split table, for the audit.
    fn award_facts(&mut self, table: &str) -> Result<Vec<AwardFact>>;
    /// Sequence numbers at or below the watermark whose task row is still there.
    fn tasks_below_watermark(&mut self) -> Result<Vec<u64>>;
}

/// A shard's counts for `status`.
pub(crate) fn status(
    db: u32,
    location: String,
    tb_count: u32,
    c: &mut dyn Counting,
) -> Result<ShardStatus> {
    let tasks = c.tasks_by_state()?.into_iter().collect();
    let mut awards = BTreeMap::new();
    for t in 0..tb_count {
        for (state, n) in c.awards_by_state(&award_table(t))? {
            *awards.entry(state).or_insert(0) += n;
        }
    }
    let (delivered_messages, receipts) = c.delivery_totals()?;
    Ok(ShardStatus {
        db,
        location,
        tasks,
        awards,
        oldest_pending_ms: c.oldest_pending()?,
        delivered_messages,
        receipts,
        last_seq: c.last_seq()?,
        compacted: c.watermark()?,
    })
}

/// A shard's facts for the audit, from one snapshot.
pub(crate) fn audit_facts(db: u32, tb_count: u32, c: &mut dyn Counting) -> Result<Facts> {
    let mut awards = Vec::new();
    for t in 0..tb_count {
        awards.extend(c.award_facts(&award_table(t))?);
    }
    Ok(Facts {
        db,
        last_seq: c.last_seq()?,
        delivered: c.delivered_seqs()?,
        tasks: c.task_facts()?,
        delivered_orders: c.delivered_orders()?,
        awards,
        watermark: c.watermark()?,
        tasks_below_watermark: c.tasks_below_watermark()?,
    })
}
