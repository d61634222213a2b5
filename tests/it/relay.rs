//! Return on commit: the relay publishes after the caller returned, spills to SQLite when its
//! hand-off is full, and never has a task in flight at the same time as the scanner.

use std::sync::Arc;
use std::time::Duration;

use big_market::config::FaultPlan;
use big_market::model::TaskState;
use big_market::service::{Parts, Service};
use big_market::transport::fault::Faulty;
use big_market::transport::memory::InProcess;
use big_market::transport::Transport;
use big_market::util::wait_until;

use crate::support::*;

#[test]
fn save_award_returns_after_the_commit_while_the_transport_blocks_and_delivers_once_released() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let (service, faulty) = start(s.clone());
    faulty.hold(true);
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
    let (a, delivered, t, completed) = totals(&s);
    assert_eq!(
        (a, delivered, t, completed),
        (50, 0, 50, 0),
        "committed, nothing confirmed yet"
    );
    faulty.hold(false);
    for saved in &saver {
        assert_eq!(
            service
                .wait_confirmed(saved, Duration::from_secs(20))
                .unwrap(),
            TaskState::Completed
        );
    }
    settle(&service);
    service.shutdown().unwrap();
    assert_eq!(totals(&s), (50, 50, 50, 50));
}

#[test]
fn a_full_handoff_leaves_tasks_in_sqlite_and_every_one_is_still_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.stale_after = Duration::from_secs(60); // the scanner must not be what delivers them
    s.handoff_capacity = 16;
    s.relay_batch = 8;
    let (service, faulty) = start(s.clone());
    faulty.hold(true);
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
    assert!(spilled > 1000, "most tasks went the SQLite way: {spilled}");
    assert!(
        most_held.load(std::sync::atomic::Ordering::SeqCst) <= 16,
        "memory held at most the capacity"
    );
    faulty.hold(false);
    settle(&service);
    // Delivered by the relay reading SQLite back, not by the scanner.
    assert_eq!(
        service
            .metrics()
            .relayed
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    service.shutdown().unwrap();
    assert_eq!(totals(&s), (n as i64, n as i64, n as i64, n as i64));
    assert_eq!(faulty.forwarded(), n as u64, "each message published once");
}

#[test]
fn the_relay_and_the_scanner_never_publish_one_task_at_once_with_a_backlog_older_than_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.stale_after = Duration::from_millis(300);
    s.handoff_capacity = 32;
    s.relay_batch = 25;
    s.publish_chunk = 25;
    // A slow broker: each batch's confirms come back 20 ms late.
    let slow = Faulty::with_plan(
        Arc::new(InProcess::new(s.publish_timeout())),
        FaultPlan {
            delay: Duration::from_millis(20),
            ..FaultPlan::default()
        },
    );
    let recording = Arc::new(Recording::new(Arc::new(slow)));
    let transport: Arc<dyn Transport> = recording.clone();
    let service = Service::start(
        s.clone(),
        transport,
        Parts {
            consumer: true,
            scanner_loop: false,
        },
    )
    .unwrap();
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
            let service = &service;
            scope.spawn(move || {
                for i in (t..n).step_by(4) {
                    service
                        .save_award(award(&format!("race{}", i % 31), &format!("3{i:011}")))
                        .unwrap();
                }
            });
        }
        // Writers are joined by the scope only at its end: wait for the deliveries instead.
        let ok = wait_until(Duration::from_secs(60), || totals(&s).1 == n as i64);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(ok, "every award delivered: {:?}", totals(&s));
    });
    settle(&service);
    let m = service.metrics();
    let claimed_by_scanner = m.relayed.load(std::sync::atomic::Ordering::SeqCst);
    let failed = m.publish_failed.load(std::sync::atomic::Ordering::SeqCst);
    service.shutdown().unwrap();
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
    assert_eq!(totals(&s), (n as i64, n as i64, n as i64, n as i64));
}

#[test]
fn a_failing_relay_step_backs_off_without_dropping_what_was_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let (service, faulty) = start(s.clone());
    // Every relay step fails while recording its failed publishes: the store refuses updates.
    faulty.set_down(true);
    let c = raw(&s, 1);
    let c2 = raw(&s, 2);
    for conn in [&c, &c2] {
        conn.execute_batch("CREATE TRIGGER inject_fault BEFORE UPDATE ON task BEGIN SELECT RAISE(ABORT, 'injected fault'); END;").unwrap();
    }
    // Saves keep handing tasks over while the relays back off.
    for i in 0..200 {
        service
            .save_award(award(&format!("bo{}", i % 13), &format!("4{i:011}")))
            .unwrap();
    }
    for conn in [&c, &c2] {
        conn.execute_batch("DROP TRIGGER inject_fault;").unwrap();
    }
    faulty.set_down(false);
    // Idle means every handed-over task was taken and settled, none lost from the count.
    settle(&service);
    // Tasks of the failed steps are still leased to the relay; once that lapses the scanner
    // sends them.
    assert!(wait_until(Duration::from_secs(20), || {
        service.drain(10).unwrap();
        totals(&s).1 == 200
    }));
    service.shutdown().unwrap();
    assert_eq!(totals(&s), (200, 200, 200, 200));
}

#[test]
fn a_relay_that_lost_its_lease_does_not_mark_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let (service, faulty) = start(s.clone());
    faulty.hold(true);
    let saved = service
        .save_award(award("leaseloser", "910000000001"))
        .unwrap();
    // While the relay's publish is held, another process takes the claim (as a scanner whose
    // clock saw the lease expire would).
    let conn = raw(&s, saved.db);
    let stolen = conn
        .execute(
            "UPDATE task SET claimed_by = 'other-process' WHERE message_id = ?1",
            [saved.message_id.as_str()],
        )
        .unwrap();
    assert_eq!(stolen, 1);
    faulty.hold(false);
    assert!(
        wait_until(Duration::from_secs(20), || awards(&conn, Some("completed"))
            == 1),
        "the message itself was delivered"
    );
    settle(&service);
    let (state, owner): (String, String) = conn
        .query_row(
            "SELECT state, claimed_by FROM task WHERE message_id = ?1",
            [saved.message_id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (state.as_str(), owner.as_str()),
        ("create", "other-process"),
        "the relay left the task to the claim that holds it"
    );
    drop(conn);
    service.shutdown().unwrap();
}
