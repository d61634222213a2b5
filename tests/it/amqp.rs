//! Tests against the real RabbitMQ broker named by `BIG_MARKET_TEST_AMQP` (`.ci/run` sets it):
//! unset, each test prints one line and returns; set, they fail, never skip, when the broker
//! is unreachable. Each test uses a queue of its own, deleted when its `TestStore` drops. The
//! tests that stop the broker also need `rabbitmqctl`, and no two broker tests overlap.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use big_market::metrics::Metrics;
use big_market::service::Parts;
use big_market::transport::{Outgoing, Transport};
use big_market::util::wait_until;

use crate::support::*;

/// The broker fault test stops the whole broker app: broker tests never overlap.
static BROKER: Mutex<()> = Mutex::new(());

pub(crate) fn serial() -> MutexGuard<'static, ()> {
    BROKER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Take up to `max` messages off a queue with basic.get, acking each.
fn drain_queue(t: &TestStore, max: usize) -> Vec<(Vec<u8>, Option<u8>, Option<String>)> {
    let (url, queue) = (t.amqp_url().to_string(), t.settings.topic.clone());
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
fn awards_are_published_to_rabbitmq_and_delivered_end_to_end() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let app = t.start_amqp(CONSUMER);
    for i in 0..200 {
        app.save(&format!("amqp{i}"), &format!("8{i:011}"));
    }
    // The consumer counts a delivery just after committing it: wait for both.
    let delivered = || Metrics::get(&app.service().metrics().delivered);
    assert!(
        wait_until(Duration::from_secs(30), || app.totals()
            == Totals::done(200)
            && delivered() == 200),
        "{:?} delivered={}",
        app.totals(),
        delivered()
    );
    app.shutdown();
}

#[test]
fn a_task_is_completed_only_once_the_broker_holds_a_persistent_copy() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let (url, topic) = (t.amqp_url().to_string(), t.settings.topic.clone());
    let app = t.start_amqp(PUBLISH_ONLY);
    // First the queue refuses every message (a policy of length 0 with reject-publish): the
    // broker takes each publish and answers it with a nack. A task marked completed once its
    // message was handed over, or on any answer, would count these five as sent.
    let refusing = RefusingPolicy::set(&url, &topic);
    for i in 0..5 {
        app.save("xiaofuge", &format!("9000000001{i:02}"));
    }
    app.settle();
    let nacked =
        "SELECT COUNT(*) FROM task WHERE state = 'fail' AND attempts = 1 AND last_error LIKE '%nacked%'";
    assert_eq!(app.totals().completed, 0, "{:?}", app.totals());
    assert_eq!(app.count(1, nacked) + app.count(2, nacked), 5);
    drop(refusing);
    let mut ids = Vec::new();
    for i in 0..5 {
        let saved = app.save("xiaofuge", &format!("9000000000{i:02}"));
        ids.push(saved.message_id.as_str().to_string());
    }
    // save_award returns on the commit; the relay publishes, and the completed mark joins a
    // later group commit once the broker confirmed.
    assert!(
        wait_until(Duration::from_secs(10), || app.totals().completed == 5),
        "all five tasks completed: {:?}",
        app.totals()
    );
    // Completed means confirmed: the messages are in the queue, persistent, with their ids.
    let got = drain_queue(&app, 10);
    assert_eq!(got.len(), 5);
    for ((body, mode, id), want) in got.iter().zip(&ids) {
        assert_eq!(*mode, Some(2), "persistent");
        assert_eq!(id.as_deref(), Some(want.as_str()));
        let msg = big_market::model::EventMessage::decode(body).unwrap();
        assert_eq!(&msg.id, want);
    }
    app.shutdown();
}

/// A RabbitMQ policy that makes the queue `name` refuse every publish (a nack for each),
/// applied before `set` returns and cleared on drop, whatever the test's outcome.
struct RefusingPolicy {
    name: String,
    vhost: String,
}

impl RefusingPolicy {
    /// On the virtual host of `url` (its path, percent-decoded).
    fn set(url: &str, queue: &str) -> RefusingPolicy {
        // The first node's URL (a cluster's are comma-separated), parsed as lapin parses it.
        let first = url.split(',').next().unwrap_or(url);
        let vhost = first
            .parse::<lapin::uri::AMQPUri>()
            .expect("an AMQP URL")
            .vhost;
        let policy = RefusingPolicy {
            name: format!("refuse-{queue}"),
            vhost,
        };
        assert!(
            std::process::Command::new("rabbitmqctl")
                .args([
                    "set_policy",
                    "-p",
                    &policy.vhost,
                    "--apply-to",
                    "queues",
                    "--priority",
                    "100",
                    &policy.name,
                    &format!("^{queue}$"),
                    r#"{"max-length":0,"overflow":"reject-publish"}"#,
                ])
                .output()
                .unwrap()
                .status
                .success(),
            "the refusing policy could not be set"
        );
        let applied = || {
            std::process::Command::new("rabbitmqctl")
                .args(["-q", "list_queues", "-p", &policy.vhost, "name", "policy"])
                .output()
                .is_ok_and(|out| {
                    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.len() == 2 && f[0] == queue && f[1] == policy.name
                    })
                })
        };
        assert!(
            wait_until(Duration::from_secs(20), applied),
            "the policy {} is on queue {queue}",
            policy.name
        );
        policy
    }
}

impl Drop for RefusingPolicy {
    fn drop(&mut self) {
        let cleared = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", "-p", &self.vhost, &self.name])
            .output()
            .is_ok_and(|out| out.status.success());
        if !std::thread::panicking() {
            assert!(cleared, "the policy {} could not be cleared", self.name);
        }
    }
}

#[test]
fn an_unroutable_message_is_a_failure_not_a_completed_task() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let app = t.start_amqp(PUBLISH_ONLY);
    app.amqp().delete_queue().unwrap(); // nothing is bound to the routing key now
    app.save("xiaofuge", "910000000001");
    app.settle();
    // A returned mandatory message must not count as sent.
    assert_eq!(app.count(1, "SELECT COUNT(*) FROM task WHERE state = 'fail' AND attempts = 1 AND last_error LIKE '%unroutable%'"), 1);
    app.shutdown();
}

#[test]
fn a_batch_of_unroutable_messages_on_both_shards_is_never_counted_as_sent() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let app = t.start_amqp(PUBLISH_ONLY);
    app.amqp().delete_queue().unwrap();
    // One call, so each shard's relay publishes its share as one batch, both relays at once:
    // lapin hands each returned message to whichever confirm an ack completes first.
    let awards = (0..80)
        .map(|i| award(&format!("user{i:03}"), &format!("93{i:010}")))
        .collect();
    for r in app.service().save_awards(awards) {
        r.unwrap();
    }
    app.settle();
    let unroutable =
        "SELECT COUNT(*) FROM task WHERE state = 'fail' AND last_error LIKE '%unroutable%'";
    let completed = "SELECT COUNT(*) FROM task WHERE state = 'completed'";
    assert_eq!(app.count(1, completed) + app.count(2, completed), 0);
    assert_eq!(app.count(1, unroutable) + app.count(2, unroutable), 80);
    assert!(app.count(1, unroutable) > 0 && app.count(2, unroutable) > 0);
    app.shutdown();
}

#[test]
fn a_publishing_channel_given_up_with_confirms_outstanding_is_set_aside_and_replaced() {
    let _g = serial();
    let Some(mut t) = TestStore::amqp() else {
        return;
    };
    // A deadline no batch of persistent messages meets, and a hold that never waits longer.
    t.settings.publish_deadline = Some(Duration::from_millis(10));
    let app = t.start_amqp(PUBLISH_ONLY);
    let (free, total, parked) = app.amqp().publishing_channels().expect("connected");
    assert_eq!((free, parked), (total, 0));
    let batch: Vec<Outgoing> = (0..5000)
        .map(|i| Outgoing {
            message_id: format!("77{i:09}"),
            body: "{}".into(),
        })
        .collect();
    let results = app.amqp().publish_batch(&batch, &|| false);
    assert!(
        results.iter().any(|r| r.is_err()),
        "the batch gave up before its confirms came back (handing over or awaiting them)"
    );
    // Its channel may still get late acks and returned messages: it is set aside for good (not
    // lent again), and a fresh one takes its place, on the same link.
    assert!(
        wait_until(Duration::from_secs(20), || app.amqp().publishing_channels()
            == Some((total, total, 1))),
        "the pool is whole again and one channel set aside: {:?} of {total}",
        app.amqp().publishing_channels()
    );
    app.shutdown();
}

#[test]
fn a_redelivered_message_is_handled_once_and_poison_is_set_aside() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let app = t.start_amqp(CONSUMER);
    app.save("xiaofuge", "920000000001");
    app.wait_done(1, Duration::from_secs(10));
    let body = app.text(1, "SELECT message FROM task");
    // The same message twice more, and a poison message between them.
    let again = Outgoing {
        message_id: "01000000001".into(),
        body,
    };
    let poison = Outgoing {
        message_id: "00000000000".into(),
        body: "{not json".into(),
    };
    for r in app
        .amqp()
        .publish_batch(&[again.clone(), poison, again], &|| false)
    {
        r.unwrap();
    }
    let m = app.service().metrics().clone();
    // Counters move just after each commit: wait for all three together.
    assert!(wait_until(Duration::from_secs(10), || Metrics::get(
        &m.redelivered
    ) == 2
        && Metrics::get(&m.poison) == 1
        && Metrics::get(&m.delivered) == 1));
    assert_eq!(app.count(1, "SELECT receipts FROM delivery"), 3);
    // The consumer goes on after the poison message.
    app.save("xiaofuge", "920000000002");
    app.wait_done(2, Duration::from_secs(10));
    app.shutdown();
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
    let Some(mut t) = TestStore::amqp() else {
        return;
    };
    t.settings.scan_interval = Duration::from_millis(200);
    t.settings.stale_after = Duration::from_secs(2);
    let app = t.start_amqp(Parts::ALL);
    let _restart = RestartOnDrop;
    let saved = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..16 {
            let (app, saved) = (&app, &saved);
            scope.spawn(move || {
                for i in (t..n).step_by(16) {
                    app.service()
                        .save_award(award(&format!("f{}", i % 997), &format!("93{i:010}")))
                        .expect("writes commit while the broker is down");
                    saved.fetch_add(1, SeqCst);
                }
            });
        }
        for k in 1..=outages {
            let at = n * k / (outages + 1);
            assert!(
                wait_until(Duration::from_secs(120), || saved.load(SeqCst) >= at),
                "load stalled before outage {k}"
            );
            assert!(rabbitmqctl("stop_app"), "rabbitmqctl stop_app failed");
            assert!(
                wait_until(Duration::from_secs(30), || !app.amqp().is_connected()),
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
                wait_until(Duration::from_secs(30), || app.amqp().is_connected()),
                "reconnected after outage {k}"
            );
        }
    });
    // Exactly once in effect: every award completed once, one delivery log row per task.
    app.wait_done(n as i64, Duration::from_secs(300));
    let pending: u64 = app
        .service()
        .status()
        .unwrap()
        .iter()
        .map(|st| {
            st.tasks_in(big_market::model::TaskState::Create)
                + st.tasks_in(big_market::model::TaskState::Fail)
        })
        .sum();
    assert_eq!(pending, 0, "status reports zero pending");
    app.shutdown();
}

#[test]
fn the_broker_stopped_mid_load_loses_nothing_and_delivers_once() {
    load_through_outages(3000, 1);
}

#[test]
fn soak_100k_awards_through_three_broker_outages_ends_with_nothing_pending() {
    load_through_outages(100_000, 3);
}

#[test]
fn readiness_flips_when_the_broker_is_stopped_and_back() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let _restart = RestartOnDrop;
    let server = crate::http::Server::start(
        t.dir.path(),
        &["--amqp-url", t.amqp_url(), "--topic", &t.settings.topic],
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
fn publish_plain(t: &TestStore, bodies: &[&[u8]]) {
    let (url, queue) = (t.amqp_url().to_string(), t.settings.topic.clone());
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
fn save_unpublished(t: &TestStore, user: &str, order: &str) -> big_market::store::SavedTask {
    let store = big_market::store::Store::open(&t.settings, true).unwrap();
    store
        .insert_awards(
            vec![award(user, order)],
            &Arc::from(t.settings.topic.as_str()),
            &Arc::from("test"),
            Duration::from_secs(600),
            big_market::util::now_ms(),
        )
        .pop()
        .unwrap()
        .unwrap()
}

/// `big-market dlq ARGS` on the test's broker and topic; asserts it succeeds, returns stdout.
fn dlq(t: &TestStore, args: &[&str]) -> Vec<u8> {
    let out = crate::cli::bin(t.dir.path())
        .args([
            "--amqp-url",
            t.amqp_url(),
            "--topic",
            &t.settings.topic,
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

fn dlq_list(t: &TestStore) -> Vec<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(&dlq(t, &["list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn unprocessable_messages_go_to_the_dead_letter_queue_with_their_reason_and_replay_delivers_them() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    // An award whose message a plain client will publish: written by the store alone, so that
    // big-market itself does not publish it (its lease keeps the scanner away meanwhile).
    let valid = save_unpublished(&t, "dlq-valid", "500000000001");
    let db = valid.db;
    let body = t.text(
        db,
        &format!(
            "SELECT message FROM task WHERE message_id = '{}'",
            valid.message_id.as_str()
        ),
    );

    let server = crate::http::Server::start(
        t.dir.path(),
        &["--amqp-url", t.amqp_url(), "--topic", &t.settings.topic],
    );
    // No user id: it names no award (the seed's own form, without an orderId, is delivered as
    // the original's consumer delivers it, not set aside).
    let nameless = r#"{"data":{"awardId":101,"awardTitle":"OpenAI 增加使用次数"},"id":"12345678901","timestamp":1712377010878}"#;
    publish_plain(
        &t,
        &[nameless.as_bytes(), b"not json at all", body.as_bytes()],
    );
    assert!(
        wait_until(Duration::from_secs(30), || t.awards(db, Some("completed"))
            == 1),
        "the valid message was delivered"
    );
    assert!(wait_until(Duration::from_secs(30), || dlq_list(&t).len() == 2));
    // Two consumers set messages aside concurrently: find each letter by what it is, not by
    // its place in the queue.
    let letters = dlq_list(&t);
    let nameless_letter = letters
        .iter()
        .find(|l| l["message_id"] == "12345678901")
        .unwrap_or_else(|| panic!("{letters:?}"));
    assert!(
        nameless_letter["reason"]
            .as_str()
            .unwrap()
            .contains("userId"),
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
    let topic = t.settings.topic.as_str();
    assert!(
        wait_until(Duration::from_secs(30), || queue_counts(topic)
            == Some((0, 0))),
        "nothing left ready or unacked on {topic}: {:?}",
        queue_counts(topic)
    );

    // A message for an award that does not exist yet is set aside; once the award exists,
    // replaying it delivers it.
    let later = br#"{"data":{"awardId":101,"awardTitle":"t","orderId":"500000000002","userId":"dlq-later"},"id":"99000000001","timestamp":1712377010878}"#;
    // Twice, as a dead letter whose confirm came late is set aside twice: replay sends one.
    publish_plain(&t, &[later, later]);
    assert!(wait_until(Duration::from_secs(30), || dlq_list(&t).len() == 4));
    let b = save_unpublished(&t, "dlq-later", "500000000002");
    let replayed = dlq(&t, &["replay", "--message-id", "99000000001"]);
    let replayed = String::from_utf8_lossy(&replayed);
    assert!(
        replayed.contains("replayed 1 messages") && replayed.contains("1 duplicate copies removed"),
        "{replayed}"
    );
    assert!(
        wait_until(Duration::from_secs(30), || t
            .awards(b.db, Some("completed"))
            == t.awards(b.db, None)
            && t.awards(b.db, None) >= 1),
        "the replayed message delivered its award"
    );
    let left = dlq_list(&t);
    assert_eq!(left.len(), 2, "only the unprocessable two remain: {left:?}");
    server.stop();
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

/// The serve flags both memory-alarm tests give: this store's broker and topic, a 3s lease and a
/// 200ms scan.
fn serve_args(t: &TestStore) -> [&str; 8] {
    [
        "--amqp-url",
        t.amqp_url(),
        "--topic",
        t.settings.topic.as_str(),
        "--stale-after",
        "3s",
        "--scan-interval",
        "200ms",
    ]
}

/// Sets the broker's memory watermark to 0, which blocks every publisher, asserting it took.
fn raise_memory_alarm() {
    assert!(
        std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0"])
            .output()
            .unwrap()
            .status
            .success(),
        "the memory alarm could not be raised"
    );
}

impl Drop for RestoreWatermark {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.0])
            .output();
    }
}

#[test]
fn a_publisher_block_longer_than_the_lease_with_two_serves_delivers_every_award_published_once() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let restore = RestoreWatermark::read();
    let common = serve_args(&t);
    let logs = tempfile::tempdir().unwrap();
    let a = crate::http::Server::start_logged(t.dir.path(), &common, &logs.path().join("a.log"));
    let b = crate::http::Server::start_logged(t.dir.path(), &common, &logs.path().join("b.log"));
    for server in [&a, &b] {
        assert!(wait_until(Duration::from_secs(20), || server
            .call("GET", "/readyz", "")
            .0
            == 200));
    }
    raise_memory_alarm();
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
        t.totals().delivered,
        0,
        "nothing can be delivered while publishers are blocked"
    );
    drop(restore);
    t.wait_done(n, Duration::from_secs(60));
    a.stop();
    b.stop();
    for db in 1..=t.settings.layout.db_count() {
        let twice = t.texts(db, "SELECT message_id FROM delivery WHERE receipts > 1");
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
}

#[test]
fn a_dead_letter_queue_that_refuses_publishes_slows_the_consumer_to_a_backoff_and_sigterm_stops_it()
{
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let dir = t.dir.path();
    let url = t.amqp_url().to_string();
    // The topic's queue, one unprocessable message in it, and a dead-letter queue that refuses
    // every publish.
    let (u, queue) = (url.clone(), t.settings.topic.clone());
    async_global_executor::block_on(async move {
        use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable};
        let conn = lapin::Connection::connect(&u, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.as_str().into(), durable, FieldTable::default())
            .await
            .unwrap();
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(0));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        ch.queue_declare(format!("{queue}.dlq").as_str().into(), durable, args)
            .await
            .unwrap();
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"not an award message",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "done".into()).await;
    });
    let log = dir.join("serve.log");
    assert!(crate::cli::bin(dir).arg("init").status().unwrap().success());
    let mut serve = KillOnDrop(
        crate::cli::bin(dir)
            .env("AMQP_URL", &url)
            .env("RUST_LOG", "error")
            .args(["--topic", &t.settings.topic, "serve"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let serve = &mut serve.0;
    let handled = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("unprocessable message refused")
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(30), || handled() >= 1),
        "the consumer never got the message"
    );
    let first = handled();
    // Count how often the message comes back over ten seconds.
    std::thread::sleep(Duration::from_secs(10));
    let redelivered = handled() - first;
    let stop = std::time::Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let mut exit = None;
    wait_until(Duration::from_secs(30), || {
        exit = serve.try_wait().unwrap();
        exit.is_some()
    });
    let took = stop.elapsed();
    assert!(
        (1..=20).contains(&redelivered),
        "the refused dead letter came back {redelivered} times in 10 s: a backoff brings it back a handful of times"
    );
    assert!(
        exit.is_some_and(|e| e.success()) && took < Duration::from_secs(5),
        "serve did not stop within 5 s of SIGTERM ({exit:?} after {took:?})"
    );
}

#[test]
fn a_wrong_amqp_password_is_refused_without_showing_it_in_any_output_or_log_line() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let wrong = "wr0ngpw4242";
    let parsed = url::Url::parse(t.amqp_url()).unwrap();
    let mut url = parsed.clone();
    url.set_password(Some(wrong)).unwrap();
    let url = url.to_string();
    let run = |args: &[&str]| {
        let out = t
            .bin()
            .env("AMQP_URL", &url)
            .env("RUST_LOG", "debug")
            .args(["--topic", &t.settings.topic])
            .args(args)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let award = run(&[
        "award",
        "--user-id",
        "u1",
        "--activity-id",
        "1",
        "--strategy-id",
        "1",
        "--order-id",
        "000000000001",
        "--award-id",
        "1",
        "--award-title",
        "t",
        "--wait",
        "confirmed",
        "--wait-timeout",
        "2s",
    ]);
    assert!(award.contains("not confirmed"), "{award}");
    let status = run(&["status"]);
    assert!(status.contains("ACCESS_REFUSED"), "{status}");
    for text in [award, status] {
        assert!(!text.contains(wrong), "{text}");
        if let Some(real) = parsed.password().filter(|p| p.len() > 3) {
            assert!(!text.contains(&format!(":{real}@")), "{text}");
        }
    }
}

#[test]
fn award_under_a_memory_alarm_exits_within_the_drain_bound_and_a_later_serve_delivers_it_once() {
    let _g = serial();
    let Some(t) = TestStore::amqp() else { return };
    let restore = RestoreWatermark::read();
    let common = serve_args(&t);
    // The bound the README states: drain_timeout plus one publish deadline.
    let mut s = t.settings.clone();
    s.stale_after = Duration::from_secs(3);
    let bound = s.drain_timeout + s.publish_timeout();
    raise_memory_alarm();
    let started = std::time::Instant::now();
    let mut award = KillOnDrop(
        t.bin()
            .args(common)
            .args([
                "award",
                "--user-id",
                "alarmed",
                "--activity-id",
                "1",
                "--strategy-id",
                "1",
                "--order-id",
                "000000000077",
                "--award-id",
                "1",
                "--award-title",
                "t",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Starting and exiting the process (connecting, opening the shards) come on top of the
    // bound: three seconds for both.
    let mut exit = None;
    wait_until(bound + Duration::from_secs(3), || {
        exit = award.0.try_wait().unwrap();
        exit.is_some()
    });
    let took = started.elapsed();
    assert!(
        exit.is_some_and(|e| e.success()),
        "award under a memory alarm did not exit 0 within {bound:?} and 3 s ({exit:?} after {took:?})"
    );
    assert_eq!(t.totals().awards, 1, "the award is committed");
    // The alarm held the publish: award exited without its confirm (a publish that went
    // through would have completed the task before award exited).
    assert_eq!(
        t.totals().completed,
        0,
        "the task is not completed under the alarm"
    );
    drop(restore);
    let mut serve = KillOnDrop(
        t.bin()
            .args(common)
            .arg("serve")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    t.wait_done(1, Duration::from_secs(60));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &serve.0.id().to_string()])
        .status();
    wait_until(Duration::from_secs(30), || {
        serve.0.try_wait().unwrap().is_some()
    });
    // Delivered once in effect: one delivery, one award completed. The copy the broker held
    // when award gave up is routed once the alarm clears, beside the scan's resend; the
    // delivery log makes the second change nothing.
    let deliveries: i64 = (1..=t.settings.layout.db_count())
        .map(|db| t.count(db, "SELECT COUNT(*) FROM delivery"))
        .sum();
    assert_eq!(deliveries, 1, "delivered once");
    assert_eq!(t.totals(), Totals::done(1));
}
