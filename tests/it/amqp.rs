//! Tests against the real RabbitMQ broker. Ignored by default; `.ci/run` runs them with
//! `cargo test -- --ignored`. They use `AMQP_URL` (default guest@127.0.0.1:5672) and fail,
//! never skip, when the broker is unreachable. Each test uses a queue of its own and deletes it.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use big_market::config::Settings;
use big_market::metrics::Metrics;
use big_market::service::{Parts, Service};
use big_market::transport::amqp::Amqp;
use big_market::transport::{Outgoing, Transport};
use big_market::util::{wait_until, Rng};

use crate::support::*;

/// The broker fault test stops the whole broker app: broker tests never overlap.
static BROKER: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    BROKER.lock().unwrap_or_else(|p| p.into_inner())
}

fn amqp_settings(dir: &std::path::Path) -> Settings {
    let mut s = settings(dir);
    s.amqp_url = Some(
        std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
    );
    s.topic = format!("send_award_test_{}", Rng::new().digits(10));
    if let Err(e) = Amqp::connect_once(&s) {
        panic!("RabbitMQ is required for this test and is unreachable: {e}. Start it with `rabbitmq-server -detached`.");
    }
    s
}

fn start_amqp(s: &Settings, parts: Parts) -> (Service, Arc<Amqp>) {
    let amqp = Arc::new(Amqp::connect(s.amqp_url.as_ref().unwrap(), s).unwrap());
    assert!(
        wait_until(Duration::from_secs(10), || amqp.is_connected()),
        "not connected"
    );
    let transport: Arc<dyn Transport> = amqp.clone();
    (Service::start(s.clone(), transport, parts).unwrap(), amqp)
}

const CONSUMER: Parts = Parts {
    consumer: true,
    scanner_loop: false,
};
const PUBLISH_ONLY: Parts = Parts {
    consumer: false,
    scanner_loop: false,
};

fn all_delivered(s: &Settings, n: i64) -> bool {
    let (a, d, t, c) = totals(s);
    a == n && d == n && t == n && c == n
}

/// Take up to `max` messages off a queue with basic.get, acking each.
fn drain_queue(s: &Settings, max: usize) -> Vec<(Vec<u8>, Option<u8>, Option<String>)> {
    let (url, queue) = (s.amqp_url.clone().unwrap(), s.topic.clone());
    async_global_executor::block_on(async move {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while out.len() < max {
            match ch
                .basic_get(
                    queue.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()
            {
                Some(m) => out.push((
                    m.delivery.data.clone(),
                    *m.delivery.properties.delivery_mode(),
                    m.delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|i| i.to_string()),
                )),
                None => break,
            }
        }
        let _ = conn.close(200, "done".into()).await;
        out
    })
}

#[test]
#[ignore = "needs RabbitMQ; run with --ignored"]
fn awards_are_published_to_rabbitmq_and_delivered_end_to_end() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = amqp_settings(dir.path());
    let (service, amqp) = start_amqp(&s, CONSUMER);
    for i in 0..200 {
        service
            .save_award(award(&format!("amqp{i}"), &format!("8{i:011}")))
            .unwrap();
    }
    // The consumer counts a delivery just after committing it: wait for both.
    let delivered = || Metrics::get(&service.metrics().delivered);
    assert!(
        wait_until(Duration::from_secs(30), || all_delivered(&s, 200)
            && delivered() == 200),
        "{:?} delivered={}",
        totals(&s),
        delivered()
    );
    service.shutdown().unwrap();
    amqp.delete_queue().unwrap();
}

#[test]
#[ignore = "needs RabbitMQ; run with --ignored"]
fn a_task_is_completed_only_once_the_broker_holds_a_persistent_copy() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = amqp_settings(dir.path());
    let (service, amqp) = start_amqp(&s, PUBLISH_ONLY);
    let mut ids = Vec::new();
    for i in 0..5 {
        let saved = service
            .save_award(award("xiaofuge", &format!("9000000000{i:02}")))
            .unwrap();
        ids.push(saved.message_id.as_str().to_string());
    }
    // save_award returns on the commit; the relay publishes, and the completed mark joins a
    // later group commit once the broker confirmed.
    assert!(
        wait_until(Duration::from_secs(10), || totals(&s).3 == 5),
        "all five tasks completed: {:?}",
        totals(&s)
    );
    // Completed means confirmed: the messages are in the queue, persistent, with their ids.
    let got = drain_queue(&s, 10);
    assert_eq!(got.len(), 5);
    for ((body, mode, id), want) in got.iter().zip(&ids) {
        assert_eq!(*mode, Some(2), "persistent");
        assert_eq!(id.as_deref(), Some(want.as_str()));
        let msg = big_market::model::EventMessage::decode(body).unwrap();
        assert_eq!(&msg.id, want);
    }
    service.shutdown().unwrap();
    amqp.delete_queue().unwrap();
}

#[test]
#[ignore = "needs RabbitMQ; run with --ignored"]
fn an_unroutable_message_is_a_failure_not_a_completed_task() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = amqp_settings(dir.path());
    let (service, amqp) = start_amqp(&s, PUBLISH_ONLY);
    amqp.delete_queue().unwrap(); // nothing is bound to the routing key now
    service
        .save_award(award("xiaofuge", "910000000001"))
        .unwrap();
    settle(&service);
    // A returned mandatory message must not count as sent.
    let c = raw(&s, 1);
    assert_eq!(count(&c, "SELECT COUNT(*) FROM task WHERE state = 'fail' AND attempts = 1 AND last_error LIKE '%unroutable%'"), 1);
    service.shutdown().unwrap();
}

#[test]
#[ignore = "needs RabbitMQ; run with --ignored"]
fn a_redelivered_message_is_handled_once_and_poison_is_set_aside() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = amqp_settings(dir.path());
    let (service, amqp) = start_amqp(&s, CONSUMER);
    service
        .save_award(award("xiaofuge", "920000000001"))
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || all_delivered(&s, 1)));
    let body: String = raw(&s, 1)
        .query_row("SELECT message FROM task", [], |r| r.get(0))
        .unwrap();
    // The same message twice more, and a poison message between them.
    let again = Outgoing {
        message_id: "01000000001".into(),
        body,
    };
    let poison = Outgoing {
        message_id: "00000000000".into(),
        body: "{not json".into(),
    };
    for r in amqp.publish_batch(&[again.clone(), poison, again], &|| false) {
        r.unwrap();
    }
    let m = service.metrics().clone();
    // Counters move just after each commit: wait for all three together.
    assert!(wait_until(Duration::from_secs(10), || Metrics::get(
        &m.redelivered
    ) == 2
        && Metrics::get(&m.poison) == 1
        && Metrics::get(&m.delivered) == 1));
    assert_eq!(count(&raw(&s, 1), "SELECT receipts FROM delivery"), 3);
    // The consumer goes on after the poison message.
    service
        .save_award(award("xiaofuge", "920000000002"))
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || all_delivered(&s, 2)));
    service.shutdown().unwrap();
    amqp.delete_queue().unwrap();
}

/// Starts the broker app again even if the test fails half-way.
struct RestartOnDrop;
impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = rabbitmqctl("start_app");
    }
}

fn rabbitmqctl(cmd: &str) -> bool {
    std::process::Command::new("rabbitmqctl")
        .arg(cmd)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Save `n` awards from 16 threads while the broker app is stopped and started `outages`
/// times; then check that everything was delivered once in effect and nothing is pending.
fn load_through_outages(n: u64, outages: u64) {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut s = amqp_settings(dir.path());
    s.scan_interval = Duration::from_millis(200);
    s.stale_after = Duration::from_secs(2);
    let (service, amqp) = start_amqp(&s, Parts::ALL);
    let service = Arc::new(service);
    let _restart = RestartOnDrop;
    let saved = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..16)
        .map(|t| {
            let (service, saved) = (service.clone(), saved.clone());
            std::thread::spawn(move || {
                for i in (t..n).step_by(16) {
                    service
                        .save_award(award(&format!("f{}", i % 997), &format!("93{i:010}")))
                        .expect("writes commit while the broker is down");
                    saved.fetch_add(1, SeqCst);
                }
            })
        })
        .collect();
    for k in 1..=outages {
        let at = n * k / (outages + 1);
        assert!(
            wait_until(Duration::from_secs(120), || saved.load(SeqCst) >= at),
            "load stalled before outage {k}"
        );
        assert!(rabbitmqctl("stop_app"), "rabbitmqctl stop_app failed");
        assert!(
            wait_until(Duration::from_secs(30), || !amqp.is_connected()),
            "the transport noticed outage {k}"
        );
        let during = saved.load(SeqCst);
        let more = (n / 50).min(n - during);
        assert!(
            wait_until(Duration::from_secs(60), || saved.load(SeqCst)
                >= during + more),
            "writes go on during outage {k}"
        );
        assert!(rabbitmqctl("start_app"), "rabbitmqctl start_app failed");
        assert!(
            wait_until(Duration::from_secs(30), || amqp.is_connected()),
            "reconnected after outage {k}"
        );
    }
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(300), || all_delivered(&s, n as i64)),
        "not everything delivered: {:?}",
        totals(&s)
    );
    // Exactly once in effect: one delivery log row per task, every award completed once.
    for db in 1..=2 {
        let c = raw(&s, db);
        assert_eq!(
            count(&c, "SELECT COUNT(*) FROM delivery"),
            count(&c, "SELECT COUNT(*) FROM task")
        );
    }
    let pending: u64 = service
        .status()
        .unwrap()
        .iter()
        .map(|st| {
            st.tasks_in(big_market::model::TaskState::Create)
                + st.tasks_in(big_market::model::TaskState::Fail)
        })
        .sum();
    assert_eq!(pending, 0, "status reports zero pending");
    let service = Arc::try_unwrap(service).ok().unwrap();
    service.shutdown().unwrap();
    amqp.delete_queue().unwrap();
}

#[test]
#[ignore = "needs RabbitMQ and rabbitmqctl; run with --ignored"]
fn the_broker_stopped_mid_load_loses_nothing_and_delivers_once() {
    load_through_outages(3000, 1);
}

#[test]
#[ignore = "needs RabbitMQ and rabbitmqctl; run with --ignored"]
fn soak_100k_awards_through_three_broker_outages_ends_with_nothing_pending() {
    load_through_outages(100_000, 3);
}

#[test]
#[ignore = "needs RabbitMQ and rabbitmqctl; run with --ignored"]
fn readiness_flips_when_the_broker_is_stopped_and_back() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = amqp_settings(dir.path());
    let _restart = RestartOnDrop;
    let server = crate::http::Server::start(
        dir.path(),
        &[
            "--amqp-url",
            s.amqp_url.as_deref().unwrap(),
            "--topic",
            &s.topic,
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || server
        .call("GET", "/readyz", "")
        .0
        == 200));
    assert!(rabbitmqctl("stop_app"));
    assert!(
        wait_until(Duration::from_secs(30), || server
            .call("GET", "/readyz", "")
            .0
            == 503),
        "not ready without a broker"
    );
    assert_eq!(server.call("GET", "/healthz", "").0, 200, "still alive");
    assert!(rabbitmqctl("start_app"));
    assert!(
        wait_until(Duration::from_secs(30), || server
            .call("GET", "/readyz", "")
            .0
            == 200),
        "ready again"
    );
    server.stop();
    let amqp = Amqp::connect(s.amqp_url.as_deref().unwrap(), &s).unwrap();
    assert!(wait_until(Duration::from_secs(10), || amqp.is_connected()));
    amqp.delete_queue().unwrap();
}

/// `rabbitmqctl list_queues`: (ready, unacked) of `queue`.
fn queue_counts(queue: &str) -> Option<(u64, u64)> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 3 && f[0] == queue {
            Some((f[1].parse().ok()?, f[2].parse().ok()?))
        } else {
            None
        }
    })
}

/// Publish raw bodies to a queue as a plain AMQP client would.
fn publish_plain(s: &Settings, bodies: &[&[u8]]) {
    let (url, queue) = (s.amqp_url.clone().unwrap(), s.topic.clone());
    let bodies: Vec<Vec<u8>> = bodies.iter().map(|b| b.to_vec()).collect();
    async_global_executor::block_on(async move {
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        for b in bodies {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                Default::default(),
                &b,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        conn.close(200, "done".into()).await.unwrap();
    });
}

/// Save an award with the store alone: nothing publishes its message (its ten-minute lease keeps
/// the scanner away).
fn save_unpublished(s: &Settings, user: &str, order: &str) -> big_market::store::SavedTask {
    let store = big_market::store::Store::open(s, true).unwrap();
    store
        .insert_awards(
            vec![award(user, order)],
            &Arc::from(s.topic.as_str()),
            &Arc::from("test"),
            Duration::from_secs(600),
            big_market::util::now_ms(),
        )
        .pop()
        .unwrap()
        .unwrap()
}

/// `big-market dlq ARGS` on the test's broker and topic; asserts it succeeds, returns stdout.
fn dlq(dir: &std::path::Path, s: &Settings, args: &[&str]) -> Vec<u8> {
    let out = crate::cli::bin(dir)
        .args([
            "--amqp-url",
            s.amqp_url.as_deref().unwrap(),
            "--topic",
            &s.topic,
            "dlq",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn dlq_list(dir: &std::path::Path, s: &Settings) -> Vec<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(&dlq(dir, s, &["list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
#[ignore = "needs RabbitMQ and rabbitmqctl; run with --ignored"]
fn unprocessable_messages_go_to_the_dead_letter_queue_with_their_reason_and_replay_delivers_them() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = amqp_settings(dir.path());
    // An award whose message a plain client will publish: written by the store alone, so that
    // big-market itself does not publish it (its lease keeps the scanner away meanwhile).
    let valid = save_unpublished(&s, "dlq-valid", "500000000001");
    let db = valid.db;
    let body: String = raw(&s, db)
        .query_row(
            "SELECT message FROM task WHERE message_id = ?1",
            [valid.message_id.as_str()],
            |r| r.get(0),
        )
        .unwrap();

    let server = crate::http::Server::start(
        dir.path(),
        &[
            "--amqp-url",
            s.amqp_url.as_deref().unwrap(),
            "--topic",
            &s.topic,
        ],
    );
    let java = r#"{"data":{"awardId":101,"awardTitle":"OpenAI 增加使用次数","userId":"xiaofuge"},"id":"12345678901","timestamp":1712377010878}"#;
    publish_plain(&s, &[java.as_bytes(), b"not json at all", body.as_bytes()]);
    let conn = raw(&s, db);
    assert!(
        wait_until(Duration::from_secs(30), || awards(&conn, Some("completed"))
            == 1),
        "the valid message was delivered"
    );
    assert!(wait_until(Duration::from_secs(30), || dlq_list(
        dir.path(),
        &s
    )
    .len()
        == 2));
    // Two consumers set messages aside concurrently: find each letter by what it is, not by
    // its place in the queue.
    let letters = dlq_list(dir.path(), &s);
    let java_letter = letters
        .iter()
        .find(|l| l["message_id"] == "12345678901")
        .unwrap_or_else(|| panic!("{letters:?}"));
    assert!(
        java_letter["reason"].as_str().unwrap().contains("orderId"),
        "{letters:?}"
    );
    let garbage = letters
        .iter()
        .find(|l| l["body"] == "not json at all")
        .unwrap_or_else(|| panic!("{letters:?}"));
    assert!(!garbage["reason"].as_str().unwrap().is_empty());
    assert!(letters
        .iter()
        .all(|l| l["dead_lettered_at_ms"].as_i64() > Some(0)));
    assert!(
        wait_until(Duration::from_secs(30), || queue_counts(&s.topic)
            == Some((0, 0))),
        "nothing left ready or unacked on {}: {:?}",
        s.topic,
        queue_counts(&s.topic)
    );

    // A message for an award that does not exist yet is set aside; once the award exists,
    // replaying it delivers it.
    let later = br#"{"data":{"awardId":101,"awardTitle":"t","orderId":"500000000002","userId":"dlq-later"},"id":"99000000001","timestamp":1712377010878}"#;
    publish_plain(&s, &[later]);
    assert!(wait_until(Duration::from_secs(30), || dlq_list(
        dir.path(),
        &s
    )
    .len()
        == 3));
    let b = save_unpublished(&s, "dlq-later", "500000000002");
    dlq(dir.path(), &s, &["replay", "--message-id", "99000000001"]);
    let conn_b = raw(&s, b.db);
    assert!(
        wait_until(Duration::from_secs(30), || awards(
            &conn_b,
            Some("completed")
        ) == awards(&conn_b, None)
            && awards(&conn_b, None) >= 1),
        "the replayed message delivered its award"
    );
    let left = dlq_list(dir.path(), &s);
    assert_eq!(left.len(), 2, "only the unprocessable two remain: {left:?}");
    server.stop();
    let amqp = Amqp::connect(s.amqp_url.as_deref().unwrap(), &s).unwrap();
    assert!(wait_until(Duration::from_secs(10), || amqp.is_connected()));
    amqp.delete_queue().unwrap();
}

/// Sets RabbitMQ's memory high watermark back to what it was, whatever the test's outcome.
struct RestoreWatermark(String);

impl RestoreWatermark {
    fn read() -> RestoreWatermark {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .output()
            .unwrap();
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // A relative watermark prints as a float; anything else falls back to the default.
        RestoreWatermark(if v.parse::<f64>().is_ok() {
            v
        } else {
            "0.4".into()
        })
    }
}

impl Drop for RestoreWatermark {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.0])
            .output();
    }
}

#[test]
#[ignore = "needs RabbitMQ and rabbitmqctl; run with --ignored"]
fn a_publisher_block_longer_than_the_lease_with_two_serves_delivers_every_award_published_once() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = amqp_settings(dir.path());
    let restore = RestoreWatermark::read();
    let url = s.amqp_url.clone().unwrap();
    let common = [
        "--amqp-url",
        url.as_str(),
        "--topic",
        s.topic.as_str(),
        "--stale-after",
        "3s",
        "--scan-interval",
        "200ms",
    ];
    let logs = tempfile::tempdir().unwrap();
    let a = crate::http::Server::start_logged(dir.path(), &common, &logs.path().join("a.log"));
    let b = crate::http::Server::start_logged(dir.path(), &common, &logs.path().join("b.log"));
    for server in [&a, &b] {
        assert!(wait_until(Duration::from_secs(20), || server
            .call("GET", "/readyz", "")
            .0
            == 200));
    }
    assert!(
        std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0"])
            .status()
            .unwrap()
            .success(),
        "the memory alarm could not be raised"
    );
    let n = 60;
    for i in 0..n {
        let body = serde_json::json!({"userId": format!("blocked{}", i % 7), "activityId": 100301, "strategyId": 100006, "orderId": format!("7{i:011}"), "awardId": 101, "awardTitle": "t"});
        let (status, resp) = a.call("POST", "/api/v1/awards", &body.to_string());
        assert_eq!(status, 201, "saves commit while the broker blocks: {resp}");
    }
    assert!(
        wait_until(Duration::from_secs(20), || a.call("GET", "/readyz", "").0
            == 503),
        "a blocked broker makes the instance unready"
    );
    // The block itself: held for three leases, so that any lease not kept alive would expire
    // and the other process would claim and send its tasks again.
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(
        totals(&s).1,
        0,
        "nothing can be delivered while publishers are blocked"
    );
    drop(restore);
    assert!(
        wait_until(Duration::from_secs(60), || all_delivered(&s, n)),
        "every award delivered after the alarm cleared: {:?}",
        totals(&s)
    );
    a.stop();
    b.stop();
    for db in 1..=s.layout.db_count() {
        let c = raw(&s, db);
        let twice: Vec<String> = c
            .prepare("SELECT message_id FROM delivery WHERE receipts > 1")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        if !twice.is_empty() {
            for log in ["a.log", "b.log"] {
                let text = std::fs::read_to_string(logs.path().join(log)).unwrap_or_default();
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        l.contains(twice[0].as_str())
                            || !twice.iter().any(|id| l.contains(id.as_str()))
                    })
                    .collect();
                eprintln!("--- {log}:\n{}", lines.join("\n"));
            }
        }
        assert!(
            twice.is_empty(),
            "shard {db}: messages that reached the consumers more than once: {twice:?}"
        );
    }
    let amqp = Amqp::connect(&url, &s).unwrap();
    assert!(wait_until(Duration::from_secs(10), || amqp.is_connected()));
    amqp.delete_queue().unwrap();
}
