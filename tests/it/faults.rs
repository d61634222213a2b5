//! Fault tests: the process killed mid-load loses nothing once restarted.

use std::time::Duration;

use big_market::util::wait_until;

use crate::cli::bin;
use crate::support::*;

fn shard_invariants(t: &TestStore) {
    for db in 1..=t.settings.layout.db_count() {
        let c = db;
        let tasks = t.count(c, "SELECT COUNT(*) FROM task");
        assert_eq!(
            t.awards(c, None),
            tasks,
            "shard {db}: every award has exactly one task"
        );
        assert_eq!(
            t.count(c, "SELECT COUNT(*) FROM task WHERE state <> 'completed'"),
            0,
            "shard {db}: every task completed"
        );
        assert_eq!(
            t.awards(c, Some("create")),
            0,
            "shard {db}: every award delivered"
        );
        assert_eq!(
            t.count(c, "SELECT COALESCE(MAX(seq), 0) FROM task"),
            tasks,
            "shard {db}: sequence has no gaps"
        );
        assert_eq!(
            t.count(c, "SELECT COUNT(DISTINCT seq) FROM task"),
            tasks,
            "shard {db}: no sequence number twice"
        );
        assert!(
            tasks == 0 || t.count(c, "SELECT MIN(seq) FROM task") == 1,
            "shard {db}: the sequence starts at 1"
        );
        assert_eq!(
            t.count(c, "SELECT COUNT(*) FROM delivery"),
            tasks,
            "shard {db}: one delivery per task"
        );
    }
}

fn sigkill_in_the_middle_of_load_then_serve_delivers_everything_exactly_once(kind: Kind) {
    let t = TestStore::new(kind);
    t.init();
    let mut load = KillOnDrop(
        t.bin()
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
            .unwrap(),
    );
    // Kill it once a few thousand awards are committed.
    let committed = || {
        t.ready()
            && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.totals().awards))
                .unwrap_or(0)
                > 3000
    };
    assert!(
        wait_until(Duration::from_secs(60), committed),
        "load did not commit 3000 awards in 60 s"
    );
    load.0.kill().unwrap();
    load.0.wait().unwrap();
    assert!(t.totals().awards < 200_000, "killed mid-load");

    let mut serve = KillOnDrop(
        t.bin()
            .args(["--stale-after", "1s", "--scan-interval", "100ms", "serve"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let done = wait_until(Duration::from_secs(90), || t.totals().all_done());
    let exit = sigterm(&mut serve.0);
    assert!(done, "serve did not deliver the backlog: {:?}", t.totals());
    assert!(
        exit.is_some_and(|e| e.success()),
        "serve exits 0 on SIGTERM: {exit:?}"
    );
    shard_invariants(&t);
}

fn two_serve_processes_on_one_backlog_send_each_message_once(kind: Kind) {
    let t = backlog(TestStore::new(kind), 3000);
    let serve = || {
        t.bin()
            .args(["--scan-interval", "50ms", "serve"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (KillOnDrop(serve()), KillOnDrop(serve()));
    let done = wait_until(Duration::from_secs(60), || t.totals() == Totals::done(3000));
    let (ea, eb) = (sigterm(&mut a.0), sigterm(&mut b.0));
    assert!(done, "backlog not delivered: {:?}", t.totals());
    assert!(
        ea.is_some_and(|e| e.success()) && eb.is_some_and(|e| e.success()),
        "both exit 0 on SIGTERM: {ea:?} {eb:?}"
    );
    for db in 1..=2 {
        let c = db;
        let tasks = t.count(c, "SELECT COUNT(*) FROM task");
        // Every message reached a consumer exactly once: no receipt beyond the first.
        assert_eq!(
            t.count(c, "SELECT COALESCE(SUM(receipts), 0) FROM delivery"),
            tasks,
            "shard {db}: a message was sent twice"
        );
        assert_eq!(
            t.count(c, "SELECT COUNT(*) FROM task WHERE claimed_by IS NOT NULL"),
            0,
            "shard {db}: claims released on shutdown"
        );
    }
    shard_invariants(&t);
}

/// Two processes saving on the same shards at the same moment: each shard's sequence numbers
/// stay gap-free and unique (the counter is taken inside each saving transaction), so the audit
/// keeps its proof.
fn two_load_processes_saving_on_the_same_shards_at_once_keep_every_sequence_gap_free(kind: Kind) {
    let t = TestStore::new(kind);
    t.init();
    // Each on a topic of its own, so that its tasks can be told apart; two callers each, so
    // that each save is a commit of its own and a load lasts long enough (seconds) for the two
    // to overlap even when the second starts late.
    let load = |topic: &str| {
        t.bin()
            .args([
                "--topic",
                topic,
                "load",
                "--records",
                "2000",
                "--threads",
                "2",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut a = KillOnDrop(load("send_award_a"));
    let mut b = KillOnDrop(load("send_award_b"));
    let (mut ea, mut eb) = (None, None);
    wait_until(Duration::from_secs(120), || {
        ea = ea.or_else(|| a.0.try_wait().unwrap());
        eb = eb.or_else(|| b.0.try_wait().unwrap());
        ea.is_some() && eb.is_some()
    });
    assert!(
        ea.is_some_and(|e| e.success()) && eb.is_some_and(|e| e.success()),
        "both loads exit 0 within 120 s: {ea:?} {eb:?}"
    );
    assert_eq!(t.totals(), Totals::done(4000));
    shard_invariants(&t);
    // They did save at once: on each shard, the two topics' sequence numbers interleave.
    for db in 1..=t.settings.layout.db_count() {
        let switches = t.count(
            db,
            "SELECT COUNT(*) FROM task a JOIN task b ON b.seq = a.seq + 1 WHERE a.topic <> b.topic",
        );
        assert!(
            switches > 1,
            "shard {db}: the loads did not overlap ({switches})"
        );
    }
    let audit = t.bin().arg("audit").output().unwrap();
    assert!(
        audit.status.success(),
        "audit: {}",
        String::from_utf8_lossy(&audit.stdout)
    );
}

#[test]
fn a_malformed_task_row_ends_dead_without_stopping_the_rest_and_requeue_brings_it_back() {
    let t = backlog(TestStore::new(Kind::Sqlite), 20);
    let (dir, s) = (&t.dir, &t.settings);
    // A row no consumer can handle, written behind the store's back.
    raw(s, 1)
        .execute_batch(
            "UPDATE shard_meta SET next_seq = next_seq + 1;
             INSERT INTO task (user_id, topic, message_id, message, state, seq, attempts, next_attempt_at, create_time, update_time)
             SELECT 'ghost', 'send_award', '01999999999', 'this is not json', 'fail', next_seq - 1, 0, 0, 0, 0 FROM shard_meta;",
        )
        .unwrap();
    let mut serve = KillOnDrop(
        bin(dir.path())
            .args(["--scan-interval", "50ms", "--max-attempts", "2", "serve"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = raw(s, 1);
    let dead = wait_until(Duration::from_secs(30), || {
        count(&c, "SELECT COUNT(*) FROM task WHERE state = 'dead'") == 1
            && t.totals().delivered == 20
    });
    assert!(sigterm(&mut serve.0).is_some_and(|e| e.success()));
    assert!(
        dead,
        "the malformed task did not end dead, or the others were not delivered: {:?}",
        t.totals()
    );
    assert_eq!(
        count(
            &c,
            "SELECT attempts FROM task WHERE message_id = '01999999999'"
        ),
        2
    );

    let listed = bin(dir.path())
        .args(["tasks", "list", "--state", "dead"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed.contains("01999999999") && listed.contains("dead"),
        "{listed}"
    );
    let status = bin(dir.path()).args(["status", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        v["shards"][0]["tasks"]["dead"], 1,
        "dead tasks are visible in status"
    );

    let requeued = bin(dir.path())
        .args(["tasks", "requeue", "--message-id", "01999999999"])
        .output()
        .unwrap();
    assert!(
        requeued.status.success(),
        "{}",
        String::from_utf8_lossy(&requeued.stderr)
    );
    assert_eq!(count(&c, "SELECT COUNT(*) FROM task WHERE message_id = '01999999999' AND state = 'fail' AND attempts = 0"), 1);
    let unknown = bin(dir.path())
        .args(["tasks", "requeue", "--message-id", "nope"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

#[test]
fn purge_deletes_only_completed_tasks_past_their_age() {
    let app = TestApp::spawn(Kind::Sqlite);
    for i in 0..10 {
        app.save("p", &format!("6{i:011}"));
    }
    let t = app.shutdown();
    let (dir, s) = (&t.dir, &t.settings);
    let keep = bin(dir.path())
        .args(["tasks", "purge", "--older-than", "1h"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&keep.stdout).contains("purged 0"));
    raw(s, route_db("p"))
        .execute_batch("UPDATE task SET update_time = update_time - 7200000 WHERE seq <= 4")
        .unwrap();
    let out = bin(dir.path())
        .args(["tasks", "purge", "--older-than", "1h"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("purged 4"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        count(&raw(s, route_db("p")), "SELECT COUNT(*) FROM task"),
        6
    );
}

fn route_db(user: &str) -> u32 {
    big_market::router::route(user, big_market::router::Layout::default()).db
}

#[test]
fn a_data_dir_of_another_layout_is_refused_by_every_command_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    assert!(bin(dir.path())
        .arg("init")
        .output()
        .unwrap()
        .status
        .success());
    let before = std::fs::read(dir.path().join("data/big_market_01.db")).unwrap();
    for args in [
        vec!["--tb-count", "8", "status"],
        vec!["--db-count", "4", "init"],
        vec!["--tb-count", "2", "serve"],
        vec!["--db-count", "1", "load", "--records", "5"],
    ] {
        let out = bin(dir.path()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("layout") || err.contains("--db-count"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        std::fs::read(dir.path().join("data/big_market_01.db")).unwrap(),
        before
    );
    assert!(!dir.path().join("data/big_market_03.db").exists());
}

fn audit_passes_a_clean_data_dir_and_catches_a_lost_delivery_and_a_half_written_award(kind: Kind) {
    let app = TestApp::spawn(kind);
    for i in 0..30 {
        app.save(&format!("a{i}"), &format!("5{i:011}"));
    }
    let t = app.shutdown();
    let clean = t.bin().args(["audit"]).output().unwrap();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).contains("big_market_01"));

    // Forget one delivery: the number is missing; young, it is lag; old enough, it is a loss.
    t.exec(1, "DELETE FROM delivery WHERE seq = 3");
    let lag = t
        .bin()
        .args(["audit", "--older-than", "1h"])
        .output()
        .unwrap();
    assert!(lag.status.success(), "a fresh gap is not yet a loss");
    assert!(String::from_utf8_lossy(&lag.stdout).contains("missing seq=3"));
    let lost = t
        .bin()
        .args(["audit", "--older-than", "0s"])
        .output()
        .unwrap();
    assert_eq!(lost.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&lost.stderr).contains("big_market_01"),
        "{}",
        String::from_utf8_lossy(&lost.stderr)
    );

    // An award with no task and no delivery breaks atomicity, whatever its age.
    let app = TestApp::spawn(kind);
    app.save("xiaofuge", "500000000001");
    let t2 = app.shutdown();
    t2.exec(1, match kind {
        Kind::Sqlite => "INSERT INTO user_award_record_001 (user_id, activity_id, strategy_id, order_id, award_id, award_title, award_time, create_time, update_time) VALUES ('xiaofuge', 1, 1, 'orphan', 1, 't', 0, 0, 0)",
        Kind::Mariadb => "INSERT INTO user_award_record_001 (user_id, activity_id, strategy_id, order_id, award_id, award_title, award_time, create_time, update_time) VALUES ('xiaofuge', 1, 1, 'orphan', 1, 't', now(), now(), now())",
    });
    let json = t2
        .bin()
        .args(["audit", "--json", "--older-than", "1h"])
        .output()
        .unwrap();
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v[0]["awards_without_task"], 1);
}

#[test]
fn verify_kills_the_pipeline_at_every_boundary_and_finds_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin(dir.path())
        .env("TMPDIR", dir.path())
        .args(["verify", "--rounds", "1", "--records", "200"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for boundary in big_market::crash::BOUNDARIES {
        let row = stdout
            .lines()
            .find(|l| l.contains(boundary.as_str()))
            .unwrap_or_else(|| panic!("no row for {boundary}:\n{stdout}"));
        assert!(
            row.contains("crashed (abort)"),
            "the crash point was reached: {row}"
        );
        assert!(row.trim_end().ends_with("ok"), "{row}");
    }
    let scenarios = big_market::crash::BOUNDARIES.len() + 1;
    assert!(
        stdout.contains(&format!("{scenarios} passed, 0 failed")),
        "{stdout}"
    );
}

#[test]
fn a_full_shard_refuses_writes_in_one_line_keeps_nothing_half_written_and_recovers() {
    // Completed tasks to free later, on the shard of one user.
    let app = TestApp::spawn(Kind::Sqlite);
    let user = "fills-the-disk";
    let db = big_market::router::route(user, app.settings.layout).db;
    for i in 0..300 {
        app.save(user, &format!("1{i:011}"));
    }
    app.settle();
    let mut t = app.shutdown();
    let pages = count(&raw(&t.settings, db), "PRAGMA page_count");

    // The same shard, capped a little above its size, with the transport held so that only
    // saves write.
    t.settings.max_shard_pages = Some(pages as u64 + 8);
    let app = t.start();
    let (service, faulty) = (app.service(), app.faulty());
    faulty.hold(true);
    let mut saved = 0;
    let err = (0..100_000)
        .find_map(
            |i| match service.save_award(award(user, &format!("2{i:011}"))) {
                Ok(_) => {
                    saved += 1;
                    None
                }
                Err(e) => Some(e),
            },
        )
        .expect("the shard fills up");
    let msg = err.to_string();
    assert!(msg.contains("full") && msg.contains("nothing"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    let c = raw(&app.settings, db);
    assert_eq!(
        awards(&c, None),
        count(&c, "SELECT COUNT(*) FROM task"),
        "every award has its task and no task lacks its award"
    );
    assert_eq!(
        awards(&c, None),
        300 + saved,
        "exactly the saves that returned Ok"
    );
    // Still full: another save fails the same way and writes nothing.
    assert!(service.save_award(award(user, "300000000001")).is_err());
    assert_eq!(awards(&c, None), 300 + saved);

    // Free space, as the error says, and writes succeed again in the same running service.
    let purged = service
        .store()
        .purge(big_market::util::now_ms() + 1)
        .unwrap();
    assert_eq!(purged, 300);
    service
        .save_award(award(user, "400000000001"))
        .expect("a write succeeds once space is freed");
    faulty.hold(false);
    app.settle();
    app.shutdown();
    assert_eq!(awards(&c, None), 301 + saved);
    assert_eq!(awards(&c, Some("completed")), 301 + saved, "all delivered");
}

#[test]
fn the_consumer_holds_back_while_the_store_fails_and_resumes_once_it_writes_again() {
    use big_market::consumer::{AwardConsumer, BACKOFF_MIN};
    use big_market::transport::{Handled, Handler};
    use std::sync::Arc;
    use std::time::Instant;

    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    let user = "store-fails";
    let db = big_market::router::route(user, s.layout).db;
    let topic: Arc<str> = Arc::from(s.topic.as_str());
    let owner: Arc<str> = Arc::from("test");
    let store = big_market::store::Store::open(&s, true).unwrap();
    for chunk in 0..10 {
        let batch = (0..300)
            .map(|i| award(user, &format!("2{:011}", chunk * 300 + i)))
            .collect();
        for r in store.insert_awards(batch, &topic, &owner, Duration::from_secs(600), 0) {
            r.unwrap();
        }
    }
    drop(store);
    let fillers: Vec<String> = raw(&s, db)
        .prepare("SELECT message FROM task ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();

    // Cap the shard just above its size, and fill it by delivering the other awards.
    let pages = count(&raw(&s, db), "PRAGMA page_count");
    s.max_shard_pages = Some(pages as u64 + 4);
    let store = Arc::new(big_market::store::Store::open(&s, false).unwrap());
    // The first message that no longer fits is the one the consumer will be given.
    let body = fillers
        .iter()
        .find(|f| {
            let msg = big_market::model::EventMessage::decode(f.as_bytes()).unwrap();
            store.deliver(msg, big_market::util::now_ms()).is_err()
        })
        .expect("the shard never filled up")
        .clone();
    let completed = awards(&raw(&s, db), Some("completed"));
    let consumer = AwardConsumer::new(store.clone(), Arc::default());
    let t0 = Instant::now();
    for _ in 0..3 {
        let out = consumer.handle_batch(&[body.as_bytes()]);
        assert!(matches!(out[0], Handled::Retry(_)), "{out:?}");
    }
    // Each failed batch held the consumer back, doubling: 1 + 2 + 4 times the first wait.
    assert!(
        t0.elapsed() >= BACKOFF_MIN * 7,
        "no backoff between failures: {:?}",
        t0.elapsed()
    );
    assert_eq!(awards(&raw(&s, db), Some("completed")), completed);

    // Space comes back (the fillers' deliveries go): the next batch delivers.
    let c = raw(&s, db);
    c.execute("DELETE FROM delivery", []).unwrap();
    let out = consumer.handle_batch(&[body.as_bytes()]);
    assert_eq!(out, vec![Handled::Ack]);
    assert_eq!(
        awards(&c, Some("completed")),
        completed + 1,
        "delivered once the store writes again"
    );
}

crate::on_both_backends!(
    sigkill_in_the_middle_of_load_then_serve_delivers_everything_exactly_once,
    two_serve_processes_on_one_backlog_send_each_message_once,
    two_load_processes_saving_on_the_same_shards_at_once_keep_every_sequence_gap_free,
    audit_passes_a_clean_data_dir_and_catches_a_lost_delivery_and_a_half_written_award,
);
