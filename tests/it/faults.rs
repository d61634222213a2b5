//! Fault tests: the process killed mid-load loses nothing once restarted.

use std::time::Duration;

use big_market::util::wait_until;

use crate::cli::bin;
use crate::support::*;

fn shard_invariants(s: &big_market::config::Settings) {
    for db in 1..=s.layout.db_count() {
        let c = raw(s, db);
        let tasks = count(&c, "SELECT COUNT(*) FROM task");
        assert_eq!(
            awards(&c, None),
            tasks,
            "shard {db}: every award has exactly one task"
        );
        assert_eq!(
            count(&c, "SELECT COUNT(*) FROM task WHERE state <> 'completed'"),
            0,
            "shard {db}: every task completed"
        );
        assert_eq!(
            awards(&c, Some("create")),
            0,
            "shard {db}: every award delivered"
        );
        assert_eq!(
            count(&c, "SELECT COALESCE(MAX(seq), 0) FROM task"),
            tasks,
            "shard {db}: sequence has no gaps"
        );
        assert_eq!(
            count(&c, "SELECT COUNT(*) FROM delivery"),
            tasks,
            "shard {db}: one delivery per task"
        );
    }
}

#[test]
fn sigkill_in_the_middle_of_load_then_serve_delivers_everything_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let mut load = bin(dir.path())
        .args([
            "--stale-after",
            "1s",
            "load",
            "--records",
            "200000",
            "--threads",
            "8",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a few thousand awards are committed.
    let committed = || {
        s.data_dir.join("big_market_02.db").exists()
            && std::panic::catch_unwind(|| totals(&s).0).unwrap_or(0) > 3000
    };
    assert!(
        wait_until(Duration::from_secs(60), committed),
        "load did not commit 3000 awards in 60 s"
    );
    load.kill().unwrap();
    load.wait().unwrap();
    let (awards_at_kill, ..) = totals(&s);
    assert!(awards_at_kill < 200_000, "killed mid-load");

    let mut serve = bin(dir.path())
        .args(["--stale-after", "1s", "--scan-interval", "100ms", "serve"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let done = wait_until(Duration::from_secs(90), || {
        let (a, d, t, c) = totals(&s);
        a == d && t == c && a == t
    });
    let status = std::process::Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = serve.wait().unwrap();
    assert!(done, "serve did not deliver the backlog: {:?}", totals(&s));
    assert!(exit.success(), "serve exits 0 on SIGTERM: {exit:?}");
    shard_invariants(&s);
}
