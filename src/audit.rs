//! The audit: proof that nothing was lost. SQLite has one writer per file, so a shard's tasks
//! carry gap-free sequence numbers `1..=last_seq`; the consumer logs each sequence it handles.
//! Any committed number without a delivery is a message not (yet) delivered; any undelivered
//! award without a task, or task without an award, breaks the write path's atomicity.
//!
//! Compaction folds the oldest delivered range into a watermark W ("every number up to W was
//! committed, delivered and completed"): W only ever moves over numbers that were, one by one,
//! so the audit proves `1..=W` by the watermark and `W+1..=last_seq` row by row. The fold deletes
//! every task it passes, so a task row still there at or below W breaks that proof. Pure: it
//! compares facts the store read.
//!
//! On MySQL the databases may also hold the original Java service's rows: its tasks have no
//! sequence number, and its message names no order id, only the user. An award is the
//! original's when an original task or delivery names its order, or when none does and its user
//! has an original task naming no order for it (the original writes the two in one
//! transaction). They are counted apart, by state; an original task never completed past the
//! age limit fails the audit, an original award left `create` does not (its message could not
//! name it, so no consumer can deliver it).

use std::collections::{BTreeMap, HashMap, HashSet};

/// One task row, as the audit sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFact {
    /// Sequence number; 0 for a task the original wrote (it has none).
    pub seq: u64,
    /// The user it belongs to.
    pub user_id: String,
    /// Creation time, epoch ms.
    pub created_ms: i64,
    /// The order id its message names (the original's form names none).
    pub order_id: Option<String>,
    /// Its state.
    pub state: String,
}

/// What one shard holds, as read by [`crate::store::Shard::audit_facts`].
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Database index.
    pub db: u32,
    /// Highest sequence number committed.
    pub last_seq: u64,
    /// Delivered sequence numbers (ascending, none of 0) and their receipt counts.
    pub delivered: Vec<(u64, u32)>,
    /// Every task.
    pub tasks: Vec<TaskFact>,
    /// Order ids of delivered messages, with the message's sequence number (0: none).
    pub delivered_orders: Vec<(String, u64)>,
    /// Award records.
    pub awards: Vec<AwardFact>,
    /// The compaction watermark: every number up to it was delivered (0: nothing compacted).
    pub watermark: u64,
    /// Numbers at or below the watermark whose task row is still there.
    pub tasks_below_watermark: Vec<u64>,
}

/// One award record, as the audit sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AwardFact {
    /// Its order id.
    pub order_id: String,
    /// Who won it.
    pub user_id: String,
    /// `create` or `completed`.
    pub state: String,
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
    /// Tasks of ours whose order id has no award record.
    pub tasks_without_award: u64,
    /// Award records not yet delivered with no task and no delivery (beyond the original's
    /// unnamed ones).
    pub awards_without_task: u64,
    /// The compaction watermark: numbers up to it are proven by it, not row by row.
    pub watermark: u64,
    /// Numbers at or below the watermark whose task row is still there: the watermark was
    /// moved past rows it never folded.
    pub tasks_below_watermark: Vec<u64>,
    /// The original's tasks (no sequence number), per state.
    pub original_tasks: BTreeMap<String, u64>,
    /// The original's award records, per state: those its tasks or deliveries name, and those
    /// of a user with as many of its tasks that name no order (its message's form).
    pub original_awards: BTreeMap<String, u64>,
    /// Ages (ms) of the original's tasks not completed.
    pub original_unfinished: Vec<i64>,
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

    /// The original's tasks never completed that are older than `min_age_ms`.
    pub fn originals_stuck(&self, min_age_ms: i64) -> usize {
        self.original_unfinished
            .iter()
            .filter(|a| **a >= min_age_ms)
            .count()
    }

    /// Whether the shard breaks an invariant, counting only losses (and the original's tasks
    /// not completed) older than `min_age_ms`. The original's awards left `create` are not.
    pub fn violated(&self, min_age_ms: i64) -> bool {
        !self.lost(min_age_ms).is_empty()
            || !self.unknown.is_empty()
            || self.tasks_without_award > 0
            || self.awards_without_task > 0
            || self.originals_stuck(min_age_ms) > 0
            || !self.tasks_below_watermark.is_empty()
    }
}

/// Compare one shard's facts at time `now_ms`.
pub fn audit(f: &Facts, now_ms: i64) -> ShardAudit {
    let delivered: HashMap<u64, u32> = f.delivered.iter().copied().collect();
    let (ours, originals): (Vec<&TaskFact>, Vec<&TaskFact>) =
        f.tasks.iter().partition(|t| t.seq > 0);
    let created: HashMap<u64, i64> = ours.iter().map(|t| (t.seq, t.created_ms)).collect();
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
    let awards: HashSet<&str> = f.awards.iter().map(|a| a.order_id.as_str()).collect();
    let tasks_without_award = ours
        .iter()
        .filter(|t| t.order_id.as_deref().is_none_or(|o| !awards.contains(o)))
        .count() as u64;
    // Order ids named by our tasks and deliveries, and by the original's.
    let mut named_by_ours: HashSet<&str> = HashSet::new();
    let mut named_by_original: HashSet<&str> = HashSet::new();
    for t in &f.tasks {
        if let Some(o) = t.order_id.as_deref() {
            if t.seq > 0 {
                named_by_ours.insert(o);
            } else {
                named_by_original.insert(o);
            }
        }
    }
    for (o, seq) in &f.delivered_orders {
        if *seq > 0 {
            named_by_ours.insert(o);
        } else {
            named_by_original.insert(o);
        }
    }
    // Per user, the original's tasks whose message names no order: each answers for one award
    // of that user that nothing names.
    let mut unnamed: HashMap<&str, usize> = HashMap::new();
    for t in originals.iter().filter(|t| t.order_id.is_none()) {
        *unnamed.entry(t.user_id.as_str()).or_insert(0) += 1;
    }
    let kept_below = f
        .delivered
        .iter()
        .filter(|(s, _)| *s <= f.watermark)
        .count() as u64;
    let mut folded = f.watermark.saturating_sub(kept_below);
    let mut original_awards = BTreeMap::new();
    let mut awards_without_task = 0;
    for a in &f.awards {
        let order = a.order_id.as_str();
        if named_by_ours.contains(order) {
            continue;
        }
        if named_by_original.contains(order) {
            *original_awards.entry(a.state.clone()).or_insert(0) += 1;
            continue;
        }
        // A delivered award whose task and delivery row were folded into the watermark is
        // proven by it: each folded number had exactly one award, so at most W minus the
        // delivery rows kept at or below W (those name theirs) are excused.
        if a.state == "completed" && folded > 0 {
            folded -= 1;
            continue;
        }
        let excused = unnamed.get_mut(a.user_id.as_str()).is_some_and(|n| {
            let left = *n > 0;
            *n = n.saturating_sub(1);
            left
        });
        if excused {
            *original_awards.entry(a.state.clone()).or_insert(0) += 1;
        } else {
            awards_without_task += 1;
        }
    }
    let mut original_tasks = BTreeMap::new();
    let mut original_unfinished = Vec::new();
    for t in &originals {
        *original_tasks.entry(t.state.clone()).or_insert(0) += 1;
        if t.state != "completed" {
            original_unfinished.push(now_ms - t.created_ms);
        }
    }
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
        original_tasks,
        original_awards,
        original_unfinished,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(seq: u64, created_ms: i64, order: Option<&str>, state: &str) -> TaskFact {
        TaskFact {
            seq,
            user_id: "xiaofuge".into(),
            created_ms,
            order_id: order.map(String::from),
            state: state.into(),
        }
    }

    fn award(order: &str, state: &str) -> AwardFact {
        AwardFact {
            order_id: order.into(),
            user_id: "xiaofuge".into(),
            state: state.into(),
        }
    }

    fn facts() -> Facts {
        Facts {
            db: 1,
            last_seq: 5,
            delivered: vec![(1, 1), (2, 3), (4, 1), (5, 1)],
            tasks: (1..=5)
                .map(|s| task(s, 1000, Some(&format!("o{s}")), "completed"))
                .collect(),
            delivered_orders: [1, 2, 4, 5].map(|s| (format!("o{s}"), s)).to_vec(),
            awards: (1..=5)
                .map(|s| {
                    award(
                        &format!("o{s}"),
                        if s == 3 { "create" } else { "completed" },
                    )
                })
                .collect(),
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
        f.awards.push(award("lonely", "create"));
        f.tasks.push(task(6, 0, Some("ghost"), "create"));
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
        f.tasks.retain(|t| t.seq != 1 && t.seq != 3); // purged rows
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

    #[test]
    fn the_originals_rows_are_counted_apart_and_only_its_unfinished_tasks_fail() {
        let mut f = facts();
        f.delivered.insert(2, (3, 1));
        f.delivered.sort();
        // The seed's rows: a task naming no order, completed, and its award left `create`.
        f.tasks.push(task(0, 1000, None, "completed"));
        f.awards.push(award("seed", "create"));
        // A later version's rows: a task naming its award, and the award delivered.
        f.tasks.push(task(0, 1000, Some("later"), "completed"));
        f.awards.push(award("later", "completed"));
        f.delivered_orders.push(("later".into(), 0));
        let a = audit(&f, 100_000);
        assert_eq!(a.original_tasks, BTreeMap::from([("completed".into(), 2)]));
        assert_eq!(
            a.original_awards,
            BTreeMap::from([("completed".into(), 1), ("create".into(), 1)])
        );
        assert_eq!((a.tasks_without_award, a.awards_without_task), (0, 0));
        assert!(!a.violated(0), "{a:?}");

        // A second unnamed award of that user has no original task to answer for it.
        f.awards.push(award("orphan", "create"));
        let a = audit(&f, 100_000);
        assert_eq!(a.awards_without_task, 1, "{a:?}");
        assert!(a.violated(0));
        f.awards.pop();

        // An original task never completed fails once it is older than the limit.
        f.tasks.push(task(0, 40_000, None, "fail"));
        let a = audit(&f, 100_000);
        assert_eq!(a.original_unfinished, vec![60_000]);
        assert!(a.violated(60_000) && !a.violated(60_001), "{a:?}");
        f.tasks.pop();

        // A loss among our rows still fails with the original's rows beside it.
        f.delivered.retain(|(s, _)| *s != 4);
        assert_eq!(audit(&f, 100_000).lost(0), vec![4]);
    }

    /// Numbers 1..=3 folded into the watermark: their task and delivery rows are gone.
    fn compacted() -> Facts {
        let mut f = facts();
        f.delivered = vec![(2, 3), (4, 1), (5, 1)]; // a redelivered row stays
        f.tasks.retain(|t| t.seq > 3);
        f.delivered_orders = [2, 4, 5].map(|s| (format!("o{s}"), s)).to_vec();
        f.awards = (1..=5)
            .map(|s| award(&format!("o{s}"), "completed"))
            .collect();
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
        f.tasks = vec![task(4, 1000, Some("o4"), "create")];
        f.tasks_below_watermark = vec![4];
        assert!(audit(&f, 0).violated(0));
        // An award never delivered without its task is an orphan, compacted or not.
        let mut f = compacted();
        f.awards[0].state = "create".into();
        assert_eq!(audit(&f, 0).awards_without_task, 1);
        // Delivered awards beyond what the watermark folded are orphans too.
        let mut f = compacted();
        f.awards.push(award("forged", "completed"));
        assert_eq!(audit(&f, 0).awards_without_task, 1);
        assert!(audit(&f, 0).violated(0));
    }
}
