//! The write path, the scanner and the consumer, driven step by step.

use std::sync::Arc;

use big_market::model::EventMessage;
use big_market::router::{route, Layout};
use big_market::store::{Delivered, Store};
use big_market::transport::{Handled, Handler};
use big_market::Error;

use crate::support::*;

fn a_saved_award_is_committed_published_and_delivered(kind: Kind) {
    let app = TestApp::spawn(kind);
    let (service, faulty) = (app.service(), app.faulty());
    let saved = service
        .save_award(award("xiaofuge", "100000000001"))
        .unwrap();
    assert_eq!(
        service
            .wait_confirmed(&saved, std::time::Duration::from_secs(10))
            .unwrap(),
        big_market::model::TaskState::Completed
    );
    assert_eq!(saved.db, 1, "xiaofuge routes to big_market_01");
    assert_eq!(saved.message_id.as_str(), "b0100000001");
    assert_eq!(faulty.forwarded(), 1);
    let t = app.shutdown();

    let c = 1;
    assert_eq!(t.count(c, "SELECT COUNT(*) FROM user_award_record_001 WHERE order_id = '100000000001' AND award_state = 'completed'"), 1);
    assert_eq!(
        t.count(
            c,
            "SELECT COUNT(*) FROM task WHERE state = 'completed' AND message_id = 'b0100000001'"
        ),
        1
    );
    let body = t.text(c, "SELECT message FROM task");
    let msg = EventMessage::decode(body.as_bytes()).unwrap();
    assert_eq!(
        (
            msg.data.user_id.as_str(),
            msg.data.award_id,
            msg.seq,
            msg.shard
        ),
        ("xiaofuge", 101, Some(1), Some(1))
    );
}

fn a_repeated_order_id_is_refused_and_writes_nothing(kind: Kind) {
    let app = TestApp::spawn(kind);
    let (service, faulty) = (app.service(), app.faulty());
    service
        .save_award(award("xiaofuge", "200000000001"))
        .unwrap();
    let err = service
        .save_award(award("xiaofuge", "200000000001"))
        .unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateOrder { order_id } if order_id == "200000000001"),
        "{err}"
    );
    assert!(err.to_string().contains("duplicate"));
    app.settle();
    assert_eq!(faulty.forwarded(), 1, "no second message");
    // The failed attempt left no hole in the sequence: the next task is seq 2.
    let next = service
        .save_award(award("xiaofuge", "200000000002"))
        .unwrap();
    assert_eq!(next.seq, 2);
    assert_eq!(app.shutdown().totals(), Totals::done(2));
}

fn a_failure_between_the_two_inserts_leaves_neither(kind: Kind) {
    let app = TestApp::spawn(kind);
    let service = app.service();
    // Inject a failure into the task insert, after the award insert of the same transaction.
    let c = 1;
    app.exec(c, match kind {
        Kind::Sqlite => "CREATE TRIGGER inject_fault BEFORE INSERT ON task BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
        Kind::Mariadb => "CREATE TRIGGER inject_fault BEFORE INSERT ON task FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected fault'",
    });
    let err = service
        .save_award(award("xiaofuge", "300000000001"))
        .unwrap_err();
    assert!(matches!(err, Error::Storage { .. }), "{err}");
    assert!(err.to_string().contains("injected fault"), "{err}");
    assert_eq!(
        app.awards(c, None),
        0,
        "the award insert was rolled back with the task insert"
    );
    assert_eq!(app.count(c, "SELECT COUNT(*) FROM task"), 0);
    app.exec(c, "DROP TRIGGER inject_fault");
    // No trace: the same order id is accepted now, with sequence 1.
    let saved = service
        .save_award(award("xiaofuge", "300000000001"))
        .unwrap();
    assert_eq!(saved.seq, 1);
    assert_eq!(app.shutdown().totals(), Totals::done(1));
}

fn a_failed_publish_leaves_a_failed_task_that_the_scanner_delivers(kind: Kind) {
    let app = TestApp::spawn(kind);
    let (service, faulty) = (app.service(), app.faulty());
    faulty.set_down(true);
    for i in 0..20 {
        service
            .save_award(award(&format!("u{i}"), &format!("4000000000{i:02}")))
            .unwrap();
    }
    app.settle();
    assert_eq!(app.totals(), Totals::saved(20));
    let failed: i64 = (1..=2)
        .map(|db| {
            app.count(
                db,
                "SELECT COUNT(*) FROM task WHERE state = 'fail' AND attempts = 0",
            )
        })
        .sum();
    assert_eq!(failed, 20, "an outage does not count as an attempt");
    // While the broker is down the scanner leaves the tasks alone.
    assert!(service.scan_once().unwrap().skipped_disconnected);
    faulty.set_down(false);
    let report = service.scan_once().unwrap();
    assert_eq!((report.claimed, report.relayed.completed), (20, 20));
    assert!(
        service.scan_once().unwrap().idle(),
        "completed tasks are never claimed again"
    );
    assert_eq!(app.shutdown().totals(), Totals::done(20));
}

fn caller_runs_engages_when_the_pool_is_full_and_nothing_is_dropped(kind: Kind) {
    let mut t = TestStore::new(kind);
    t.settings.pool_threads = 1;
    t.settings.pool_queue = 1;
    t.settings.publish_chunk = 1;
    let app = t.start();
    let (service, faulty) = (app.service(), app.faulty());
    faulty.set_down(true);
    for i in 0..200 {
        service
            .save_award(award(&format!("cr{i}"), &format!("5{i:011}")))
            .unwrap();
    }
    app.settle();
    faulty.set_down(false);
    let report = service.scan_once().unwrap();
    assert_eq!(report.claimed, 200);
    assert_eq!(report.relayed.completed, 200);
    assert!(
        report.ran_on_caller > 0,
        "200 one-task jobs on a 1-thread, 1-slot pool must overflow: {report:?}"
    );
    assert_eq!(app.shutdown().totals(), Totals::done(200));
}

fn a_refused_message_ends_dead_after_the_attempt_limit_and_requeue_brings_it_back(kind: Kind) {
    let mut t = TestStore::new(kind);
    t.settings.retry.max_attempts = 3;
    // No backoff delay: a refused task is due again on the next pass.
    t.settings.retry.base = std::time::Duration::ZERO;
    t.settings.retry.cap = std::time::Duration::ZERO;
    let app = t.start();
    let (service, faulty) = (app.service(), app.faulty());
    faulty.refuse_containing(Some("poison-user"));
    service
        .save_award(award("poison-user", "600000000001"))
        .unwrap();
    service
        .save_award(award("fine-user", "600000000002"))
        .unwrap();
    let mut passes = 0;
    while service
        .status()
        .unwrap()
        .iter()
        .map(|st| st.tasks_in(big_market::model::TaskState::Dead))
        .sum::<u64>()
        == 0
    {
        passes += 1;
        assert!(passes < 200, "the task never reached dead");
        service.scan_once().unwrap();
    }
    assert_eq!(
        faulty.refused(),
        3,
        "exactly max_attempts refused publishes"
    );
    assert!(
        service.drain(5).unwrap().idle(),
        "a dead task is never retried by itself"
    );
    let db = route("poison-user", Layout::default()).db;
    let c = db;
    assert_eq!(
        app.count(
            c,
            "SELECT COUNT(*) FROM task WHERE state = 'dead' AND attempts = 3"
        ),
        1
    );
    // Requeue after the fault is gone: the task is delivered.
    faulty.refuse_containing(None);
    let n = service
        .store()
        .requeue(
            None,
            Some(big_market::model::TaskState::Dead),
            big_market::util::now_ms(),
        )
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(service.scan_once().unwrap().relayed.completed, 1);
    assert_eq!(app.shutdown().totals(), Totals::done(2));
}

fn a_redelivered_message_changes_nothing_and_concurrent_duplicates_deliver_once(kind: Kind) {
    let app = TestApp::spawn(kind);
    let (service, faulty) = (app.service(), app.faulty());
    faulty.set_down(true); // committed, not yet delivered
    service
        .save_award(award("xiaofuge", "700000000001"))
        .unwrap();
    let body = app.text(1, "SELECT message FROM task");
    let store = service.store().clone();
    // Eight threads deliver the same message at once: exactly one first delivery.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (store, body) = (store.clone(), body.clone());
            std::thread::spawn(move || {
                store
                    .deliver(EventMessage::decode(body.as_bytes()).unwrap(), 0)
                    .unwrap()
            })
        })
        .collect();
    let outcomes: Vec<Delivered> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        outcomes.iter().filter(|d| **d == Delivered::First).count(),
        1,
        "{outcomes:?}"
    );
    let c = 1;
    assert_eq!(
        app.count(
            c,
            "SELECT receipts FROM delivery WHERE message_id = 'b0100000001'"
        ),
        8
    );
    assert_eq!(app.awards(c, Some("completed")), 1);
    app.shutdown();
}

fn a_poison_message_is_rejected_and_the_consumer_goes_on(kind: Kind) {
    let t = TestStore::new(kind);
    let store = Arc::new(Store::open(&t.settings, true).unwrap());
    let consumer = big_market::consumer::AwardConsumer::new(store.clone(), Default::default());
    assert!(matches!(consumer.handle(b"{not json"), Handled::Reject(_)));
    let unknown = r#"{"data":{"awardId":1,"awardTitle":"t","orderId":"1","userId":"nobody"},"id":"01000000009","seq":9,"shard":1,"timestamp":0}"#;
    let route_db = route("nobody", Layout::default()).db;
    let unknown = unknown.replace("\"shard\":1", &format!("\"shard\":{route_db}"));
    match consumer.handle(unknown.as_bytes()) {
        Handled::Reject(reason) => assert!(reason.contains("no award record"), "{reason}"),
        other => panic!("expected reject, got {other:?}"),
    }
    // Nothing was logged as delivered for the unknown message.
    assert_eq!(t.count(route_db, "SELECT COUNT(*) FROM delivery"), 0);
}

#[test]
fn a_data_dir_of_another_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    drop(Store::open(&s, true).unwrap());
    let mut other = s.clone();
    other.layout = Layout::new(2, 8).unwrap();
    let err = Store::open(&other, true)
        .err()
        .expect("layout mismatch must fail");
    assert!(err.to_string().contains("--tb-count 4"), "{err}");
    let mut more = s.clone();
    more.layout = Layout::new(1, 4).unwrap();
    let err = Store::open(&more, true)
        .err()
        .expect("an extra shard file must fail");
    assert!(err.to_string().contains("big_market_02.db"), "{err}");
}

#[test]
fn a_shard_file_that_is_not_sqlite_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    std::fs::create_dir_all(&s.data_dir).unwrap();
    std::fs::write(s.data_dir.join("big_market_01.db"), vec![b'x'; 8192]).unwrap();
    let err = Store::open(&s, true)
        .err()
        .expect("a corrupt shard must fail");
    assert!(
        err.to_string().contains("not a SQLite database")
            || err.to_string().contains("not a database"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(s.data_dir.join("big_market_01.db")).unwrap(),
        vec![b'x'; 8192],
        "the file is untouched"
    );
}

fn with_a_retention_the_scanner_purges_old_completed_tasks_only(kind: Kind) {
    let mut t = TestStore::new(kind);
    t.settings.retention = Some(std::time::Duration::from_secs(3600));
    let app = t.start();
    let (service, faulty) = (app.service(), app.faulty());
    for i in 0..6 {
        service
            .save_award(award("keeper", &format!("41{i:010}")))
            .unwrap();
    }
    app.settle();
    faulty.set_down(true);
    service.save_award(award("keeper", "420000000000")).unwrap(); // failed, not completed
    app.settle();
    faulty.set_down(false);
    let db = route("keeper", Layout::default()).db;
    let c = db;
    assert!(app.count(c, "SELECT COUNT(*) FROM task WHERE state = 'completed'") >= 1);
    // Age every task past the retention; only completed ones may go.
    assert!(big_market::util::wait_until(
        std::time::Duration::from_secs(5),
        || app.count(c, "SELECT COUNT(*) FROM task WHERE state = 'completed'") == 6
    ));
    app.exec(
        c,
        match kind {
            Kind::Sqlite => "UPDATE task SET update_time = update_time - 7200000",
            Kind::Mariadb => "UPDATE task SET update_time = update_time - INTERVAL 2 HOUR",
        },
    );
    let report = service.scan_once().unwrap();
    assert_eq!(report.purged, 6);
    assert_eq!(
        report.relayed.completed, 1,
        "the failed task was resent, not purged"
    );
    app.shutdown();
}

/// The scanner's compaction with its budget spent at once still takes a step on every shard: a
/// long backlog on the first shard cannot starve the next.
#[test]
fn compaction_within_a_spent_budget_still_steps_every_shard() {
    let mut t = TestStore::new(Kind::Sqlite);
    t.settings.retention = Some(std::time::Duration::from_secs(3600));
    let app = t.start();
    let service = app.service();
    let users = [
        "keeper", "keeper2", "keeper3", "keeper4", "keeper5", "keeper6",
    ];
    let mut per_db = std::collections::BTreeMap::new();
    for u in users {
        per_db.entry(route(u, Layout::default()).db).or_insert(u);
    }
    assert_eq!(per_db.len(), 2, "users on both shards: {per_db:?}");
    for (i, user) in per_db.values().enumerate() {
        for j in 0..3 {
            service
                .save_award(award(user, &format!("43{i}{j:09}")))
                .unwrap();
        }
    }
    app.settle();
    for &db in per_db.keys() {
        assert!(big_market::util::wait_until(
            std::time::Duration::from_secs(5),
            || app.count(db, "SELECT COUNT(*) FROM task WHERE state = 'completed'") == 3
        ));
        app.exec(db, "UPDATE task SET update_time = update_time - 7200000");
    }
    let before_ms = big_market::util::now_ms() - 3_600_000;
    let purged = service
        .store()
        .purge_within(before_ms, Some(std::time::Duration::ZERO))
        .unwrap();
    assert_eq!(purged, 6, "three tasks folded on each shard");
    for &db in per_db.keys() {
        assert_eq!(app.count(db, "SELECT COUNT(*) FROM task"), 0, "shard {db}");
    }
    app.shutdown();
}

fn save_awards_commits_a_batch_across_shards_and_a_duplicate_fails_alone(kind: Kind) {
    let app = TestApp::spawn(kind);
    let service = app.service();
    service
        .save_award(award("user001", "300000000000"))
        .unwrap();
    let batch = vec![
        award("xiaofuge", "300000000001"),
        award("user001", "300000000000"), // already saved
        award("user002", "300000000002"),
        award("xiaofuge", "300000000001"), // repeated inside the batch
        award("user003", "300000000003"),
    ];
    let results = service.save_awards(batch);
    let shape: Vec<&str> = results
        .iter()
        .map(|r| match r {
            Ok(_) => "saved",
            Err(Error::DuplicateOrder { .. }) => "duplicate",
            Err(_) => "error",
        })
        .collect();
    assert_eq!(shape, ["saved", "duplicate", "saved", "duplicate", "saved"]);
    assert_eq!(app.shutdown().totals(), Totals::done(4));
}

fn a_shard_at_the_end_of_its_message_id_range_refuses_the_next_save_clearly_and_writes_nothing(
    kind: Kind,
) {
    use big_market::model::MessageId;
    let app = TestApp::spawn(kind);
    let db = big_market::router::route("xiaofuge", big_market::router::Layout::default()).db;
    // One number left: the last of the range.
    app.exec(
        db,
        &format!(
            "UPDATE shard_meta SET next_seq = {} WHERE id = 1",
            MessageId::MAX_SEQ
        ),
    );
    let service = app.service();
    // Two awards in one group: the first takes the last number, the second is refused.
    let results = service.save_awards(vec![
        award("xiaofuge", "310000000001"),
        award("xiaofuge", "310000000002"),
    ]);
    let last = results[0].as_ref().expect("the last number is used");
    assert_eq!(last.message_id.as_str(), "b01zzzzzzzz");
    let refused = results[1].as_ref().expect_err("past the range");
    let line = refused.to_string();
    assert!(
        line.contains("has used every message id")
            && line.contains("nothing of this award was written")
            && !line.contains('\n'),
        "{line}"
    );
    assert_eq!(refused.exit_code(), 2);
    // And so is the next save alone; nothing of either refusal is in the shard.
    assert!(service
        .save_award(award("xiaofuge", "310000000003"))
        .is_err());
    app.settle();
    let counts = app.totals();
    assert_eq!((counts.awards, counts.tasks), (1, 1), "{counts:?}");
    assert_eq!(
        app.count(db, "SELECT next_seq - 1 FROM shard_meta WHERE id = 1"),
        MessageId::MAX_SEQ as i64,
        "no number was taken past the range"
    );
    // Another shard goes on.
    service
        .save_award(award("user001", "310000000004"))
        .unwrap();
    app.shutdown();
}

crate::on_both_backends!(
    a_shard_at_the_end_of_its_message_id_range_refuses_the_next_save_clearly_and_writes_nothing,
    a_saved_award_is_committed_published_and_delivered,
    a_repeated_order_id_is_refused_and_writes_nothing,
    a_failure_between_the_two_inserts_leaves_neither,
    a_failed_publish_leaves_a_failed_task_that_the_scanner_delivers,
    caller_runs_engages_when_the_pool_is_full_and_nothing_is_dropped,
    a_refused_message_ends_dead_after_the_attempt_limit_and_requeue_brings_it_back,
    a_redelivered_message_changes_nothing_and_concurrent_duplicates_deliver_once,
    a_poison_message_is_rejected_and_the_consumer_goes_on,
    with_a_retention_the_scanner_purges_old_completed_tasks_only,
    save_awards_commits_a_batch_across_shards_and_a_duplicate_fails_alone,
);
