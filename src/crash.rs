//! Crash points for `verify`: named boundaries of the pipeline where a process can be made to
//! abort, as if killed, the N-th time it crosses one. Unarmed (the default) a crossing costs one
//! atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Every boundary, in pipeline order.
pub const BOUNDARIES: [&str; 6] = [
    // A group commit of awards and tasks returned; its tasks are not yet handed to the relay.
    "after-commit",
    // The message is handed to the transport; its confirm has not come back.
    "before-confirm",
    // The first confirm of a relayed batch is in, the others are not.
    "mid-relay-batch",
    // The confirm came back; the task is not yet marked completed.
    "before-mark",
    // A group commit has run its operations but not committed them.
    "mid-group-commit",
    // The consumer delivered the award; the message is not yet acknowledged.
    "before-ack",
];

static PLAN: OnceLock<(&'static str, u64)> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Parse `POINT:N` (N >= 1).
pub fn parse(spec: &str) -> Result<(&'static str, u64)> {
    let (point, n) = spec
        .split_once(':')
        .ok_or_else(|| Error::invalid("crash-at", format!("{spec:?} is not POINT:N")))?;
    let point = BOUNDARIES.iter().find(|b| **b == point).ok_or_else(|| {
        Error::invalid(
            "crash-at",
            format!("{point:?} is not one of {}", BOUNDARIES.join(", ")),
        )
    })?;
    let n: u64 = n
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| Error::invalid("crash-at", "N must be a whole number >= 1"))?;
    Ok((point, n))
}

/// Arm one crash point for this process (once).
pub fn arm(point: &'static str, nth: u64) {
    let _ = PLAN.set((point, nth));
}

/// Mark a crossing of `point`; aborts the process on the armed crossing.
pub fn hit(point: &'static str) {
    if let Some((armed, nth)) = PLAN.get() {
        if *armed == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
            eprintln!("crash point {point} reached ({nth}th crossing): aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(parse("before-ack:3").unwrap(), ("before-ack", 3));
        for bad in [
            "before-ack",
            "nowhere:1",
            "after-commit:0",
            "after-commit:x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
