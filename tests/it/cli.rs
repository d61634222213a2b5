//! End-to-end tests of the real binary on temporary data directories.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::*;

pub fn bin(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_big-market"));
    c.current_dir(dir)
        .env_remove("AMQP_URL")
        .env("RUST_LOG", "warn")
        .env("BIG_MARKET_DATA_DIR", dir.join("data"));
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    bin(dir).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

const AWARD: &[&str] = &[
    "award",
    "--user-id",
    "xiaofuge",
    "--activity-id",
    "100301",
    "--strategy-id",
    "100006",
    "--order-id",
    "000000000042",
    "--award-id",
    "101",
    "--award-title",
    "OpenAI 增加使用次数",
];

#[test]
fn route_prints_the_java_formulas_db_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["route", "xiaofuge"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        "user_id=xiaofuge db=big_market_01 table=user_award_record_001\n"
    );
    let out = run(dir.path(), &["route", "user001"]);
    assert_eq!(
        text(&out.stdout),
        "user_id=user001 db=big_market_02 table=user_award_record_000\n"
    );
}

#[test]
fn the_same_award_twice_is_refused_as_duplicate_with_one_record_and_one_task() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(dir.path(), AWARD);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stdout).contains("message_id=b0100000001"));
    let second = run(dir.path(), AWARD);
    assert_eq!(second.status.code(), Some(3));
    assert!(
        text(&second.stderr).contains("duplicate"),
        "{}",
        text(&second.stderr)
    );
    let s = settings(dir.path());
    assert_eq!(totals(&s), Totals::done(1));
    let status = run(dir.path(), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["pending"], 0);
    assert_eq!(v["shards"][0]["tasks"]["completed"], 1);
    assert_eq!(v["shards"][0]["awards"]["completed"], 1);
}

#[test]
fn load_writes_and_delivers_every_award() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &["load", "--records", "500", "--users", "7", "--threads", "4"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("saved=500")
            && stdout.contains("delivered=500")
            && stdout.contains("failed=0"),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("saved=500/500"),
        "progress is shown"
    );
    let s = settings(dir.path());
    assert_eq!(totals(&s), Totals::done(500));
}

#[test]
fn bad_input_exits_non_zero_with_one_clear_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["award", "--user-id", "u"], 2, "required"),
        (
            AWARD
                .iter()
                .map(|a| if *a == "100301" { "abc" } else { a })
                .collect(),
            2,
            "invalid value",
        ),
        (
            AWARD
                .iter()
                .map(|a| {
                    if *a == "000000000042" {
                        "0000000000420"
                    } else {
                        a
                    }
                })
                .collect(),
            2,
            "order_id",
        ),
        (
            AWARD
                .iter()
                .map(|a| if *a == "xiaofuge" { "" } else { a })
                .collect(),
            2,
            "user_id",
        ),
        (vec!["--db-count", "3", "route", "x"], 2, "power of two"),
        (vec!["status"], 2, "big-market init"),
        (vec!["tasks", "requeue"], 2, "required"),
        (vec!["load", "--records", "0"], 2, "records"),
    ];
    for (args, code, needle) in cases {
        let out = run(dir.path(), &args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(
        !dir.path().join("data").join("big_market_01.db").exists(),
        "no shard was created by bad input"
    );
}

#[test]
fn an_unwritable_data_dir_and_a_corrupt_shard_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = bin(dir.path())
        .env("BIG_MARKET_DATA_DIR", file.join("data"))
        .args(AWARD)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );

    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("big_market_01.db"), vec![7u8; 4096]).unwrap();
    let out = run(dir.path(), AWARD);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a SQLite database"), "{err}");
    assert!(!data.join("big_market_02.db").exists() || totals_of_shard2_is_empty(&data));
}

fn totals_of_shard2_is_empty(data: &Path) -> bool {
    let c = rusqlite::Connection::open(data.join("big_market_02.db")).unwrap();
    awards(&c, None) == 0
}

#[test]
fn help_explains_every_flag_and_its_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["--help"]);
    let help = text(&out.stdout);
    for needle in [
        "--data-dir",
        "BIG_MARKET_DATA_DIR",
        "--db-count",
        "--tb-count",
        "AMQP_URL",
        "init",
        "route",
        "award",
        "load",
        "serve",
        "status",
        "tasks",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn bench_runs_every_phase_and_ends_with_one_json_line_of_figures() {
    // 256 callers over two shard files: the original's design among them too, whose callers
    // once ran into SQLite's busy timeout ("database is locked").
    let dir = tempfile::tempdir().unwrap();
    let out = bin(dir.path())
        .env("TMPDIR", dir.path())
        .args(["bench", "--records", "600", "--threads", "256", "--http"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in [
        "sqlite_limit",
        "naive",
        "pipeline",
        "drain",
        "save_p50_ms",
        "save_p99_ms",
        "peak_rss_mb",
        "pipeline_over_naive",
        "http",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x > 0.0),
            "{key} missing or zero in {last}"
        );
    }
    assert_eq!(v["threads"], 256, "{last}");
    assert!(
        v["broker_limit"].is_null() && v["mysql_naive"].is_null(),
        "no broker figure without --amqp-url, no MySQL figure without --store: {last}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("naive ")),
        "the naive figure is printed: {stdout}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "the bench works on temporary shards only"
    );
}

#[test]
fn bench_sweep_prints_a_table_and_a_json_line_per_caller_count_and_draws_them_as_svg() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("sweep.svg");
    let out = bin(dir.path())
        .env("TMPDIR", dir.path())
        .args(["bench", "--sweep", "--records", "200", "--http", "--plot"])
        .arg(&plot)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let points: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let callers: Vec<u64> = points
        .iter()
        .map(|p| p["threads"].as_u64().unwrap())
        .collect();
    assert_eq!(callers, [16, 64, 256], "{stdout}");
    for p in &points {
        for key in [
            "sqlite_e2e_limit",
            "sqlite_group_limit",
            "naive",
            "pipeline",
            "pipeline_batched",
            "http",
            "save_p99_ms",
            "pipeline_batched_over_e2e_limit",
        ] {
            assert!(p[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {p}");
        }
        assert!(p["drain"].is_null(), "a sweep does not drain: {p}");
    }
    let table: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(
        table.len(),
        2 + 3,
        "a header, its rule and a row per point: {stdout}"
    );
    for (row, n) in table[2..].iter().zip(["16", "64", "256"]) {
        assert!(row.starts_with(&format!("| {n} |")), "{row}");
    }

    let svg = std::fs::read_to_string(&plot).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let labels: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for name in [
        "pipeline",
        "pipeline_batched",
        "sqlite_limit",
        "sqlite_e2e_limit",
        "sqlite_group_limit",
        "naive",
        "http",
        "save_p99_ms",
        "http_p99_ms",
    ] {
        assert!(
            labels.contains(&name),
            "{name} not in the chart: {labels:?}"
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "the sweep works on temporary shards only"
    );

    let help = text(&run(dir.path(), &["bench", "--help"]).stdout);
    assert!(
        help.contains("--sweep") && help.contains("--plot <FILE>") && help.contains("256"),
        "{help}"
    );
    let alone = run(dir.path(), &["bench", "--plot", "x.svg"]);
    assert!(!alone.status.success(), "--plot needs --sweep");
}

#[test]
fn award_returns_on_commit_publishes_before_it_exits_and_can_wait_for_the_confirm() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    // Default: return on commit; stopping drains the relay, so the message still goes out.
    let first = run(dir.path(), AWARD);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(
        totals(&s),
        Totals::done(1),
        "published and delivered before exit"
    );
    // --wait confirmed: exits 0 only once the task is completed.
    let mut args = AWARD.to_vec();
    args[8] = "000000000043";
    args.extend(["--wait", "confirmed"]);
    let second = run(dir.path(), &args);
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_eq!(totals(&s), Totals::done(2));
    // A broker that never answers: committed, and the wait fails with a clear line.
    args[8] = "000000000044";
    args.extend(["--wait-timeout", "1s"]);
    let third = bin(dir.path())
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f")
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(third.status.code(), Some(1), "{}", text(&third.stderr));
    assert!(
        text(&third.stderr).contains("was not confirmed within 1s"),
        "{}",
        text(&third.stderr)
    );
    assert_eq!(totals(&s).awards, 3, "the award is committed all the same");
}

#[test]
fn overflowing_or_absurd_numbers_exit_2_and_delete_nothing() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run(dir.path(), AWARD).status.success());
    assert!(run(
        dir.path(),
        &["--scan-interval", "10ms", "load", "--records", "20"]
    )
    .status
    .success());
    let completed = |dir: &Path| {
        let out = run(
            dir,
            &["tasks", "list", "--state", "completed", "--limit", "1000"],
        );
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains("completed"))
            .count()
    };
    let before = completed(dir.path());
    assert!(before >= 21, "every task completed before: {before}");
    let mut award_time = AWARD.to_vec();
    award_time.extend(["--award-time", "99999999999999999"]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["load", "--records", "10000000000"], "out of range"),
        (
            vec!["load", "--records", "5", "--threads", "0"],
            "out of range",
        ),
        (vec!["load", "--records", "5", "--users=-1"], "whole number"),
        (
            vec!["tasks", "purge", "--older-than", "200000000000d"],
            "duration",
        ),
        (vec!["tasks", "purge", "--older-than", "3651d"], "ten years"),
        (
            vec!["tasks", "list", "--limit", "99999999999999999999"],
            "whole number",
        ),
        (
            vec!["--stale-after", "9999999999999d", "status"],
            "duration",
        ),
        (vec!["--stale-after", "2d", "status"], "over a day"),
        (
            vec!["--publish-timeout", "30s", "status"],
            "publish timeout",
        ),
        (vec!["--pool-threads", "100000", "status"], "out of range"),
        (vec!["--consumers", "0", "status"], "out of range"),
        (
            vec!["--max-attempts", "4294967296", "status"],
            "out of range",
        ),
        (vec!["--db-count", "100000", "status"], "out of range"),
        (vec!["bench", "--records", "100000000000"], "out of range"),
        (vec!["verify", "--rounds", "0"], "out of range"),
        (
            vec![
                "serve",
                "--http",
                "127.0.0.1:0",
                "--http-max-connections",
                "0",
            ],
            "out of range",
        ),
        (award_time, "award_time"),
    ];
    for (args, needle) in cases {
        let out = run(dir.path(), &args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(err.lines().count() <= 3, "{args:?}: a short message: {err}");
    }
    assert_eq!(completed(dir.path()), before, "nothing was deleted");
}

#[test]
fn a_user_id_with_a_space_is_taken_and_stored_where_the_java_router_puts_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["route", "user 4"]);
    assert_eq!(
        text(&out.stdout),
        "user_id=user 4 db=big_market_02 table=user_award_record_000\n"
    );
    let award: Vec<&str> = AWARD
        .iter()
        .map(|a| if *a == "xiaofuge" { "user 4" } else { a })
        .collect();
    let out = run(dir.path(), &award);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = settings(dir.path());
    let c = raw(&s, 2);
    assert_eq!(
        count(
            &c,
            "SELECT COUNT(*) FROM user_award_record_000 WHERE user_id = 'user 4'"
        ),
        1
    );
    assert_eq!(run(dir.path(), &["route", "a\tb"]).status.code(), Some(2));
}
