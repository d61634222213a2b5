//! Crash points for `verify`: named boundaries of the pipeline where a process can be made to
//! abort, as if killed, the N-th time it crosses one. Unarmed (the default) a crossing costs one
//! atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// A boundary of the pipeline where a process can be made to crash. An enum, so that a
/// misspelt crossing does not compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A group commit of awards and tasks returned; its tasks are not yet handed to the relay.
    AfterCommit,
    /// The message is handed to the transport; its confirm has not come back.
    BeforeConfirm,
    /// The first confirm of a relayed batch is in, the others are not.
    MidRelayBatch,
    /// The confirm came back; the task is not yet marked completed.
    BeforeMark,
    /// A group commit has run its operations but not committed them.
    MidGroupCommit,
    /// The consumer delivered the award; the message is not yet acknowledged.
    BeforeAck,
}

/// Every boundary, in pipeline order.
pub const BOUNDARIES: [Point; 6] = [
    Point::AfterCommit,
    Point::BeforeConfirm,
    Point::MidRelayBatch,
    Point::BeforeMark,
    Point::MidGroupCommit,
    Point::BeforeAck,
];

impl Point {
    /// Its name in `--crash-at POINT:N`.
    pub fn as_str(self) -> &'static str {
        match self {
            Point::AfterCommit => "after-commit",
            Point::BeforeConfirm => "before-confirm",
            Point::MidRelayBatch => "mid-relay-batch",
            Point::BeforeMark => "before-mark",
            Point::MidGroupCommit => "mid-group-commit",
            Point::BeforeAck => "before-ack",
        }
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

static PLAN: OnceLock<(Point, u64)> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Parse `POINT:N` (N >= 1).
pub fn parse(spec: &str) -> Result<(Point, u64)> {
    let (point, n) = spec
        .split_once(':')
        .ok_or_else(|| Error::invalid("crash-at", format!("{spec:?} is not POINT:N")))?;
    let point = BOUNDARIES
        .into_iter()
        .find(|b| b.as_str() == point)
        .ok_or_else(|| {
            let names: Vec<&str> = BOUNDARIES.iter().map(|b| b.as_str()).collect();
            Error::invalid(
                "crash-at",
                format!("{point:?} is not one of {}", names.join(", ")),
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
pub fn arm(point: Point, nth: u64) {
    let _ = PLAN.set((point, nth));
}

/// Mark a crossing of `point`; aborts the process on the armed crossing.
pub fn hit(point: Point) {
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
        assert_eq!(parse("before-ack:3").unwrap(), (Point::BeforeAck, 3));
        for b in BOUNDARIES {
            assert_eq!(parse(&format!("{b}:1")).unwrap(), (b, 1));
        }
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
