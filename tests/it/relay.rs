//! Return on commit: the relay publishes after the caller returned, leaves tasks in the store
//! when its hand-off is full, and never has a task in flight at the same time as the scanner.
//! Each test runs on both backends (`…::sqlite`, and `…::mariadb` with `BIG_MARKET_TEST_MYSQL`).

use std::sync::Arc;
use std::time::Duration;

use big_market::config::FaultPlan;
use big_market::model::TaskState;
use big_market::transport::fault::Faulty;
use big_market::transport::memory::InProcess;
use big_market::util::wait_until;

use crate::support::*;

fn save_award_returns_after_the_commit_while_the_transport_blocks_and_delivers_once_released(
    kind: Kind,
) {
    let app = TestApp::spawn(kind);
    let service = app.service();
    app.faulty().hold(true);
    // If a save waited for the broker, this thread would never finish.
    let saver = std::thread::scope(|scope| {
        let h = scope.spawn(|| {
            (0..50)
                .map(|i| {
                    service
                        .save_award(award(&format!("held{i}"), &format!("1{i:011}")))
                        .unwrap()
                })
                .collect::<Vec<_>>()
        });
        assert!(
            wait_until(Duration::from_secs(20), || h.is_finished()),
            "save_award waited for a blocked transport"
        );
        h.join().unwrap()
    });
    assert_eq!(saver.len(), 50);
    assert_eq!(
        app.totals(),
        Totals::saved(50),
        "committed, nothing confirmed yet"
    );
    app.faulty().hold(false);
    for saved in &saver {
        assert_eq!(
            service
                .wait_confirmed(saved, Duration::from_secs(20))
                .unwrap(),
            TaskState::Completed
        );
    }
    app.settle();
    assert_eq!(app.shutdown().totals(), Totals::done(50));
}

fn a_full_handoff_leaves_tasks_in_the_store_and_every_one_is_still_delivered(kind: Kind) {
    let mut t = TestStore::new(kind);
    t.settings.stale_after = Duration::from_secs(60); // the scanner must not be what delivers them
    t.settings.handoff_capacity = 16;
    t.settings.relay_batch = 8;
    let app = t.start();
    let service = app.service();
    app.faulty().hold(true);
    let n = 2000;
    let most_held = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..8 {
            let (service, most_held) = (&service, &most_held);
            scope.spawn(move || {
                for i in (t..n).step_by(8) {
                    service
                        .save_award(award(&format!("full{}", i % 97), &format!("2{i:011}")))
                        .unwrap();
                    for shard in service.store().shards() {
                        most_held
                            .fetch_max(shard.handoff().held(), std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let spilled: u64 = service
        .store()
        .shards()
        .iter()
        .map(|sh| sh.handoff().spilled_total())
        .sum();
    assert!(spilled > 1000, "most tasks went the store's way: {spilled}");
    assert!(
        most_held.load(std::sync::atomic::Ordering::SeqCst) <= 16,
        "memory held at most the capacity"
    );
    app.faulty().hold(false);
    app.settle();
    // Delivered by the relay reading the store back, not by the scanner.
    assert_eq!(
        service
            .metrics()
            .relayed
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        app.faulty().forwarded(),
        n as u64,
        "each message published once"
    );
    assert_eq!(app.shutdown().totals(), Totals::done(n as i64));
}

fn the_relay_and_the_scanner_never_publish_one_task_at_once_with_a_backlog_older_than_the_lease(
    kind: Kind,
) {
    let mut t = TestStore::new(kind);
    t.settings.stale_after = Duration::from_millis(300);
    t.settings.handoff_capacity = 32;
    t.settings.relay_batch = 25;
    t.settings.publish_chunk = 25;
    // A slow broker: each batch's confirms come back 20 ms late.
    let slow = Faulty::with_plan(
        Arc::new(InProcess::new(t.settings.publish_timeout())),
        FaultPlan {
            delay: Duration::from_millis(20),
            ..FaultPlan::default()
        },
    );
    let recording = Arc::new(Recording::new(Arc::new(slow)));
    let app = t.start_with(recording.clone(), CONSUMER);
    let service = app.service();
    let n = 1500;
    let scans = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The scanner, as fast as it can: it claims whatever lease expired.
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                service.scan_once().unwrap();
                scans.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        for t in 0..4 {
            scope.spawn(move || {
                for i in (t..n).step_by(4) {
                    service
                        .save_award(award(&format!("race{}", i % 31), &format!("3{i:011}")))
                        .unwrap();
                }
            });
        }
        // Writers are joined by the scope only at its end: wait for the deliveries instead.
        let ok = wait_until(Duration::from_secs(60), || {
            app.totals().delivered == n as i64
        });
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(ok, "every award delivered: {:?}", app.totals());
    });
    app.settle();
    let m = service.metrics();
    let claimed_by_scanner = m.relayed.load(std::sync::atomic::Ordering::SeqCst);
    let failed = m.publish_failed.load(std::sync::atomic::Ordering::SeqCst);
    let t = app.shutdown();
    assert!(scans.into_inner() > 0);
    assert_eq!(
        recording.overlaps(),
        0,
        "no task was in flight twice at once"
    );
    let publishes = recording.publishes();
    assert_eq!(publishes.len(), n, "every task was published");
    // A message is published again only after a publish of it failed (a confirm past the
    // batch deadline), never because two claims held it.
    let total: u64 = publishes.values().map(|c| u64::from(*c)).sum();
    assert_eq!(
        total,
        n as u64 + failed,
        "publishes beyond one per task match failed publishes (scanner claimed {claimed_by_scanner})"
    );
    assert_eq!(t.totals(), Totals::done(n as i64));
}

fn a_failing_relay_step_backs_off_without_dropping_what_was_handed_over(kind: Kind) {
    let app = TestApp::spawn(kind);
    // Every relay step fails while recording its failed publishes: the store refuses updates.
    app.faulty().set_down(true);
    for db in 1..=2 {
        app.exec(db, match kind {
            Kind::Sqlite => "CREATE TRIGGER inject_fault BEFORE UPDATE ON task BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
            Kind::Mariadb => "CREATE TRIGGER inject_fault BEFORE UPDATE ON task FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected fault'",
        });
    }
    // Saves keep handing tasks over while the relays back off.
    for i in 0..200 {
        app.save(&format!("bo{}", i % 13), &format!("4{i:011}"));
    }
    for db in 1..=2 {
        app.exec(db, "DROP TRIGGER inject_fault");
    }
    app.faulty().set_down(false);
    // Idle means every handed-over task was taken and settled, none lost from the count.
    app.settle();
    // Tasks of the failed steps are still leased to the relay; once that lapses the scanner
    // sends them.
    assert!(
        wait_until(Duration::from_secs(20), || {
            app.service().drain(10).unwrap();
            app.totals().delivered == 200
        }),
        "{:?}",
        app.totals()
    );
    assert_eq!(app.shutdown().totals(), Totals::done(200));
}

fn a_relay_that_lost_its_lease_does_not_mark_the_task(kind: Kind) {
    let app = TestApp::spawn(kind);
    app.faulty().hold(true);
    let saved = app.save("leaseloser", "910000000001");
    let id = saved.message_id.as_str();
    // While the relay's publish is held, another process takes the claim (as a scanner whose
    // clock saw the lease expire would).
    app.exec(
        saved.db,
        &format!("UPDATE task SET claimed_by = 'other-process' WHERE message_id = '{id}'"),
    );
    assert_eq!(
        app.count(
            saved.db,
            &format!("SELECT COUNT(*) FROM task WHERE claimed_by = 'other-process' AND message_id = '{id}'")
        ),
        1
    );
    app.faulty().hold(false);
    assert!(
        wait_until(Duration::from_secs(20), || app
            .awards(saved.db, Some("completed"))
            == 1),
        "the message itself was delivered"
    );
    app.settle();
    let row = |col: &str| {
        app.text(
            saved.db,
            &format!("SELECT {col} FROM task WHERE message_id = '{id}'"),
        )
    };
    assert_eq!(
        (row("state").as_str(), row("claimed_by").as_str()),
        ("create", "other-process"),
        "the relay left the task to the claim that holds it"
    );
    app.shutdown();
}

crate::on_both_backends!(
    save_award_returns_after_the_commit_while_the_transport_blocks_and_delivers_once_released,
    a_full_handoff_leaves_tasks_in_the_store_and_every_one_is_still_delivered,
    the_relay_and_the_scanner_never_publish_one_task_at_once_with_a_backlog_older_than_the_lease,
    a_failing_relay_step_backs_off_without_dropping_what_was_handed_over,
    a_relay_that_lost_its_lease_does_not_mark_the_task,
);
