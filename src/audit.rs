//! The audit: proof that nothing was lost. SQLite has one writer per file, so a shard's tasks
//! carry gap-free sequence numbers `1..=last_seq`; the consumer logs each sequence it handles.
//! Any committed number without a delivery is a message not (yet) delivered; any undelivered
//! award without a task, or task without an award, breaks the write path's atomicity.
//!
//! Compaction folds the oldest delivered range into a watermark W ("every number up to W was
//! committed, delivered and completed"): W only ever moves over numbers that were, one by one,
//! so the audit proves `1..=W` by the watermark and `W+1..=last_seq` row by row. The fold deletes
//! every task it passes, so a task row still there at or below W breaks that proof. Pure: it compares facts the
//! store read.

use std::collections::{HashMap, HashSet};

/// What one shard holds, as read by [`crate::store::Shard::audit_facts`].
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Database index.
    pub db: u32,
    /// Highest sequence number committed.
    pub last_seq: u64,
    /// Delivered sequence numbers (ascending) and their receipt counts.
    pub delivered: Vec<(u64, u32)>,
    /// Tasks: sequence, creation time (epoch ms), order id named by the message.
    pub tasks: Vec<(u64, i64, Option<String>)>,
    /// Order ids of delivered messages.
    pub delivered_orders: Vec<String>,
    /// Order ids of award records, and whether each was delivered (`completed`).
    pub award_orders: Vec<(String, bool)>,
    /// The compaction watermark: every number up to it was delivered (0: nothing compacted).
    pub watermark: u64,
    /// Numbers at or below the watermark whose task row is still there.
    pub tasks_below_watermark: Vec<u64>,
}

/// The audit of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardAudit {
    /// Database index.
    pub db: u32,
    /// Highest sequence number committed.
    pub committed: u64,
    /// Highest sequence number delivered.
    pub delivered_max: u64,
    /// Distinct sequence numbers delivered.
    pub delivered: u64,
    /// Committed numbers never delivered, with their age in ms (`None`: the task row is gone).
    pub missing: Vec<(u64, Option<i64>)>,
    /// Numbers delivered more than once (deduplicated by the consumer), with receipt counts.
    pub redelivered: Vec<(u64, u32)>,
    /// Delivered numbers that were never committed (must not happen).
    pub unknown: Vec<u64>,
    /// Tasks whose order id has no award record.
    pub tasks_without_award: u64,
    /// Award records not yet delivered with no task and no delivery.
    pub awards_without_task: u64,
    /// The compaction watermark: numbers up to it are proven by it, not row by row.
    pub watermark: u64,
    /// Numbers at or below the watermark whose task row is still there: the watermark was
    /// moved past rows it never folded.
    pub tasks_below_watermark: Vec<u64>,
}

impl ShardAudit {
    /// Missing numbers older than `min_age_ms` (or whose task is gone): real losses, not lag.
    pub fn lost(&self, min_age_ms: i64) -> Vec<u64> {
        self.missing
            .iter()
            .filter(|(_, age)| age.is_none_or(|a| a >= min_age_ms))
            .map(|(s, _)| *s)
            .collect()
    }

    /// Whether the shard breaks an invariant, counting only losses older than `min_age_ms`.
    pub fn violated(&self, min_age_ms: i64) -> bool {
        !self.lost(min_age_ms).is_empty()
            || !self.unknown.is_empty()
            || self.tasks_without_award > 0
            || self.awards_without_task > 0
            || !self.tasks_below_watermark.is_empty()
    }
}

/// Compare one shard's facts at time `now_ms`.
pub fn audit(f: &Facts, now_ms: i64) -> ShardAudit {
    let delivered: HashMap<u64, u32> = f.delivered.iter().copied().collect();
    let created: HashMap<u64, i64> = f.tasks.iter().map(|(s, t, _)| (*s, *t)).collect();
    let missing = (f.watermark + 1..=f.last_seq)
        .filter(|s| !delivered.contains_key(s))
        .map(|s| (s, created.get(&s).map(|t| now_ms - t)))
        .collect();
    let mut redelivered: Vec<(u64, u32)> = f
        .delivered
        .iter()
        .filter(|(_, r)| *r > 1)
        .copied()
        .collect();
    redelivered.sort();
    let unknown = f
        .delivered
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s == 0 || *s > f.last_seq)
        .collect();
    let awards: HashSet<&str> = f.award_orders.iter().map(|(o, _)| o.as_str()).collect();
    let mut sent: HashSet<&str> = f
        .tasks
        .iter()
        .filter_map(|(_, _, o)| o.as_deref())
        .collect();
    let tasks_without_award = f
        .tasks
        .iter()
        .filter(|(_, _, o)| o.as_deref().is_none_or(|o| !awards.contains(o)))
        .count() as u64;
    sent.extend(f.delivered_orders.iter().map(String::as_str));
    // An award with neither task nor delivery row is an orphan, unless it was delivered and its
    // rows were folded into the watermark: each folded number had exactly one award, so at most
    // W minus the delivery rows kept at or below W (those are in `sent`) can be excused.
    let kept_below = f
        .delivered
        .iter()
        .filter(|(s, _)| *s <= f.watermark)
        .count() as u64;
    let folded = f.watermark.saturating_sub(kept_below);
    let (never_delivered, delivered_unproven) = f
        .award_orders
        .iter()
        .filter(|(o, _)| !sent.contains(o.as_str()))
        .fold((0u64, 0u64), |(n, d), (_, delivered)| {
            if *delivered {
                (n, d + 1)
            } else {
                (n + 1, d)
            }
        });
    let awards_without_task = never_delivered + delivered_unproven.saturating_sub(folded);
    let above: Vec<u64> = f
        .delivered
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s > f.watermark)
        .collect();
    ShardAudit {
        db: f.db,
        committed: f.last_seq,
        // Numbers up to the watermark were delivered, by its proof.
        delivered_max: above.last().copied().unwrap_or(0).max(f.watermark),
        delivered: f.watermark + above.len() as u64,
        missing,
        redelivered,
        unknown,
        tasks_without_award,
        awards_without_task,
        watermark: f.watermark,
        tasks_below_watermark: f.tasks_below_watermark.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            db: 1,
            last_seq: 5,
            delivered: vec![(1, 1), (2, 3), (4, 1), (5, 1)],
            tasks: (1..=5).map(|s| (s, 1000, Some(format!("o{s}")))).collect(),
            delivered_orders: vec!["o1".into(), "o2".into(), "o4".into(), "o5".into()],
            award_orders: (1..=5).map(|s| (format!("o{s}"), s != 3)).collect(),
            watermark: 0,
            tasks_below_watermark: Vec::new(),
        }
    }

    #[test]
    fn a_gap_is_reported_with_its_age_and_redeliveries_are_listed() {
        let a = audit(&facts(), 61_000);
        assert_eq!(a.missing, vec![(3, Some(60_000))]);
        assert_eq!(a.redelivered, vec![(2, 3)]);
        assert_eq!((a.committed, a.delivered_max, a.delivered), (5, 5, 4));
        assert!(a.violated(60_000), "older than the limit: lost");
        assert!(
            !a.violated(60_001),
            "younger than the limit: still in flight"
        );
    }

    #[test]
    fn a_clean_shard_has_no_violation() {
        let mut f = facts();
        f.delivered.insert(2, (3, 1));
        f.delivered.sort();
        let a = audit(&f, 0);
        assert!(a.missing.is_empty() && !a.violated(0), "{a:?}");
    }

    #[test]
    fn orphans_and_unknown_numbers_are_violations() {
        let mut f = facts();
        f.delivered = (1..=5).map(|s| (s, 1)).chain([(9, 1)]).collect();
        f.award_orders.push(("lonely".into(), false));
        f.tasks.push((6, 0, Some("ghost".into())));
        f.last_seq = 6;
        f.delivered.retain(|(s, _)| *s != 6);
        let a = audit(&f, 0);
        assert_eq!(a.unknown, vec![9]);
        assert_eq!((a.tasks_without_award, a.awards_without_task), (1, 1));
        assert!(a.violated(i64::MAX));
    }

    #[test]
    fn a_purged_task_that_was_delivered_is_not_missing_but_an_undelivered_one_is_lost() {
        let mut f = facts();
        f.tasks.retain(|(s, _, _)| *s != 1 && *s != 3); // purged rows
        let a = audit(&f, 0);
        assert_eq!(a.missing, vec![(3, None)]);
        assert_eq!(
            a.lost(i64::MAX),
            vec![3],
            "a gone task that was never delivered is lost at any age"
        );
        assert_eq!(
            a.awards_without_task, 1,
            "order o3 has neither task nor delivery"
        );
    }

    /// Numbers 1..=3 folded into the watermark: their task and delivery rows are gone.
    fn compacted() -> Facts {
        let mut f = facts();
        f.delivered = vec![(2, 3), (4, 1), (5, 1)]; // a redelivered row stays
        f.tasks.retain(|(s, _, _)| *s > 3);
        f.delivered_orders = vec!["o2".into(), "o4".into(), "o5".into()];
        f.award_orders = (1..=5).map(|s| (format!("o{s}"), true)).collect();
        f.watermark = 3;
        f
    }

    #[test]
    fn a_compacted_range_is_proven_by_the_watermark_and_the_rest_row_by_row() {
        let a = audit(&compacted(), 0);
        assert!(a.missing.is_empty() && !a.violated(0), "{a:?}");
        assert_eq!(a.redelivered, vec![(2, 3)], "redeliveries stay visible");
        assert_eq!(a.watermark, 3);
        assert_eq!(
            (a.delivered, a.delivered_max),
            (5, 5),
            "1..=3 by the watermark"
        );
    }

    #[test]
    fn a_tampered_compacted_shard_fails_the_audit() {
        // A delivery row removed above the watermark: that number is lost.
        let mut f = compacted();
        f.delivered.retain(|(s, _)| *s != 5);
        assert_eq!(audit(&f, i64::MAX).lost(0), vec![5]);
        assert!(audit(&f, i64::MAX).violated(0));
        // The watermark moved past a number that was never delivered (its task is still there).
        let mut f = compacted();
        f.watermark = 5;
        f.tasks = vec![(4, 1000, Some("o4".into()))];
        f.tasks_below_watermark = vec![4];
        assert!(audit(&f, 0).violated(0));
        // An award never delivered without its task is an orphan, compacted or not.
        let mut f = compacted();
        f.award_orders[0].1 = false;
        assert_eq!(audit(&f, 0).awards_without_task, 1);
        // Delivered awards beyond what the watermark folded are orphans too.
        let mut f = compacted();
        f.award_orders.push(("forged".into(), true));
        assert_eq!(audit(&f, 0).awards_without_task, 1);
        assert!(audit(&f, 0).violated(0));
    }
}
