//! Quorum queues, and a RabbitMQ cluster's nodes failing over. The quorum tests run on the
//! broker `BIG_MARKET_TEST_AMQP` names (a quorum queue works on one node); the failover test on
//! the three-node cluster `BIG_MARKET_TEST_CLUSTER` names (comma-separated AMQP URLs of nodes
//! bm1..bm3@localhost, as `.ci/cluster start` prints them). Each fails, never skips, when its
//! variable is set and the broker does not answer, and deletes its queues. They take the broker
//! tests' lock: another broker test may stop the broker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use big_market::config::{AmqpUrl, QueueType, Settings};
use big_market::transport::amqp::{walk_dead_letters, Amqp, DeadLetterAction};
use big_market::transport::{Handled, Handler, Outgoing, Transport};
use big_market::util::{wait_until, Rng};

const CLUSTER_VAR: &str = "BIG_MARKET_TEST_CLUSTER";
const AMQP_VAR: &str = "BIG_MARKET_TEST_AMQP";

fn named(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            println!("not run: set {var} to run this test");
            None
        }
    }
}

/// Settings on a fresh directory and a quorum queue of the test's own.
fn quorum_settings(dir: &std::path::Path, url: &str, delivery_limit: u32) -> Settings {
    broker_settings(dir, url, QueueType::Quorum, delivery_limit)
}

/// Settings on a fresh directory and a queue of the test's own, declared as `queue_type`.
fn broker_settings(
    dir: &std::path::Path,
    url: &str,
    queue_type: QueueType,
    delivery_limit: u32,
) -> Settings {
    let mut s = Settings::new(dir.join("data"));
    s.amqp_url = Some(AmqpUrl::parse(url).unwrap());
    s.topic = format!("send_award_quorum_{}", Rng::new().digits(10));
    s.queue_type = queue_type;
    s.delivery_limit = delivery_limit;
    s.stale_after = Duration::from_secs(2);
    s.scan_interval = Duration::from_millis(200);
    if let Err(e) = Amqp::connect_once(&s) {
        panic!("the broker of this test does not answer: {e}. Start it, or unset the variable");
    }
    s
}

/// A client on `s`'s broker, asserted connected within ten seconds.
fn connected(s: &Settings) -> Arc<Amqp> {
    let amqp = Arc::new(Amqp::connect(s.amqp_url.as_ref().unwrap(), s).unwrap());
    assert!(wait_until(Duration::from_secs(10), || amqp.is_connected()));
    amqp
}

/// Deletes the test's queues on drop, whatever the outcome.
struct Queues(Settings);

impl Drop for Queues {
    fn drop(&mut self) {
        if let Some(url) = &self.0.amqp_url {
            if let Ok(amqp) = Amqp::connect(url, &self.0) {
                if wait_until(Duration::from_secs(10), || amqp.is_connected()) {
                    let _ = amqp.delete_queue();
                }
            }
        }
    }
}

fn dead_letters(s: &Settings) -> usize {
    walk_dead_letters(s, 100, |_| DeadLetterAction::Keep)
        .unwrap()
        .len()
}

/// A handler whose store is "down" while `down` is set: it backs off like the award consumer
/// (100 ms a try) and answers Retry; then it acks. Counts tries and acks.
struct Flaky {
    down: AtomicBool,
    tries: AtomicU64,
    acked: AtomicU64,
}

impl Handler for Flaky {
    fn handle(&self, _body: &[u8]) -> Handled {
        self.tries.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100)); // the handler's backoff, not a wait for a condition
            Handled::Retry("the store is failing".into())
        } else {
            self.acked.fetch_add(1, Ordering::SeqCst);
            Handled::Ack
        }
    }
}

#[test]
fn a_store_outage_longer_than_the_delivery_limit_has_nothing_dead_lettered() {
    let _g = crate::amqp::serial();
    let Some(url) = named(AMQP_VAR) else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = quorum_settings(dir.path(), &url, 2);
    let _queues = Queues(s.clone());
    let amqp = connected(&s);
    let sent = amqp.publish_batch(
        &[Outgoing {
            message_id: "01000000001".into(),
            body: "{}".into(),
        }],
        &|| true,
    );
    assert!(sent.iter().all(Result::is_ok), "{sent:?}");
    let flaky = Arc::new(Flaky {
        down: AtomicBool::new(true),
        tries: AtomicU64::new(0),
        acked: AtomicU64::new(0),
    });
    let consumer = amqp.start_consumer(flaky.clone(), 1).unwrap();
    // Ten times the delivery limit's worth of failed tries.
    assert!(
        wait_until(Duration::from_secs(30), || flaky
            .tries
            .load(Ordering::SeqCst)
            >= 20),
        "the consumer did not try"
    );
    assert_eq!(
        dead_letters(&s),
        0,
        "the broker dead-lettered a message our store could not take"
    );
    flaky.down.store(false, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(20), || flaky
            .acked
            .load(Ordering::SeqCst)
            == 1),
        "not delivered once the store was back"
    );
    consumer.stop();
    assert_eq!(dead_letters(&s), 0);
    assert_eq!(flaky.acked.load(Ordering::SeqCst), 1);
}

fn run(c: &mut std::process::Command) -> std::process::Output {
    c.output().unwrap()
}

#[test]
fn a_consumer_that_crashes_past_the_delivery_limit_has_the_message_dead_lettered_by_the_broker() {
    let _g = crate::amqp::serial();
    let Some(url) = named(AMQP_VAR) else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = quorum_settings(dir.path(), &url, 2);
    let _queues = Queues(s.clone());
    let bin = || {
        let mut c = crate::cli::bin(dir.path());
        c.env("AMQP_URL", &url)
            .env("BIG_MARKET_TOPIC", &s.topic)
            .env("BIG_MARKET_QUEUE_TYPE", "quorum")
            .env("BIG_MARKET_DELIVERY_LIMIT", "2");
        c
    };
    let out = run(bin().args([
        "award",
        "--user-id",
        "xiaofuge",
        "--activity-id",
        "1",
        "--strategy-id",
        "1",
        "--order-id",
        "710000000001",
        "--award-id",
        "1",
        "--award-title",
        "t",
        "--wait",
        "confirmed",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each serve crashes on its first delivery, before the ack: the broker counts it.
    let mut crashes = 0;
    while dead_letters(&s) == 0 && crashes < 6 {
        let mut serve = bin()
            .args(["serve", "--crash-at", "before-ack:1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = serve.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > Duration::from_secs(30) {
                // Nothing to crash on: the message was dead-lettered meanwhile.
                let _ = serve.kill();
                let _ = serve.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50)); // polling pace
        };
        match status {
            Some(status) => assert!(!status.success(), "serve did not crash"),
            None => break,
        }
        crashes += 1;
    }
    let letters = walk_dead_letters(&s, 10, |_| DeadLetterAction::Keep).unwrap();
    assert_eq!(letters.len(), 1, "after {crashes} crashes: {letters:?}");
    assert!(
        letters[0].0.reason.contains("delivery_limit"),
        "{:?}",
        letters[0].0
    );
    assert!(
        crashes > 2,
        "dead-lettered after {crashes} deliveries, the limit is 2"
    );
    let listed = run(bin().args(["dlq", "list"]));
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("delivery_limit"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
}

/// `rabbitmqctl list_queues name type arguments` lines of the queues whose names start with
/// `prefix`, sorted.
fn queues_of(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "type", "arguments"])
        .output()
        .unwrap();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[test]
fn a_queue_declared_classic_is_refused_with_quorum_and_left_unchanged() {
    let _g = crate::amqp::serial();
    let Some(url) = named(AMQP_VAR) else { return };
    let dir = tempfile::tempdir().unwrap();
    // Connecting declares both queues classic; then the dead-letter queue is deleted, as the
    // Java service's own broker has none.
    let s = broker_settings(dir.path(), &url, QueueType::Classic, 20);
    let _queues = Queues(s.clone());
    for only_the_topic in [false, true] {
        if only_the_topic {
            assert!(std::process::Command::new("rabbitmqctl")
                .args(["-q", "delete_queue", &format!("{}.dlq", s.topic)])
                .status()
                .unwrap()
                .success());
        }
        let before = queues_of(&s.topic);
        assert!(before.iter().all(|l| l.contains("classic")), "{before:?}");
        let out = run(crate::cli::bin(dir.path())
            .env("AMQP_URL", &url)
            .env("BIG_MARKET_TOPIC", &s.topic)
            .args(["--queue-type", "quorum", "serve"]));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("inequivalent arg") && err.contains("nothing was changed"),
            "{err}"
        );
        assert_eq!(
            err.trim()
                .lines()
                .filter(|l| l.starts_with("error:"))
                .count(),
            1,
            "{err}"
        );
        assert_eq!(queues_of(&s.topic), before, "the broker's queues changed");
    }
}

/// A handler whose store refuses the bodies that contain `bad` while `down` is set (backing
/// off 100 ms a try, like the award consumer), and takes every other body. Counts each.
struct OneShardDown {
    down: AtomicBool,
    good: AtomicU64,
    bad_tries: AtomicU64,
    bad_taken: AtomicU64,
}

impl Handler for OneShardDown {
    fn handle(&self, body: &[u8]) -> Handled {
        self.handle_batch(&[body]).pop().unwrap()
    }

    fn handle_batch(&self, bodies: &[&[u8]]) -> Vec<Handled> {
        let mut failed = false;
        let out = bodies
            .iter()
            .map(|b| {
                if b.windows(3).any(|w| w == b"bad") {
                    if self.down.load(Ordering::SeqCst) {
                        self.bad_tries.fetch_add(1, Ordering::SeqCst);
                        failed = true;
                        return Handled::Retry("that shard is down".into());
                    }
                    self.bad_taken.fetch_add(1, Ordering::SeqCst);
                } else {
                    self.good.fetch_add(1, Ordering::SeqCst);
                }
                Handled::Ack
            })
            .collect();
        if failed {
            std::thread::sleep(Duration::from_millis(100)); // the handler's backoff, not a wait for a condition
        }
        out
    }
}

#[test]
fn a_message_the_store_cannot_take_holds_up_nothing_but_itself() {
    let _g = crate::amqp::serial();
    let Some(url) = named(AMQP_VAR) else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = quorum_settings(dir.path(), &url, 2);
    let _queues = Queues(s.clone());
    let amqp = connected(&s);
    let handler = Arc::new(OneShardDown {
        down: AtomicBool::new(true),
        good: AtomicU64::new(0),
        bad_tries: AtomicU64::new(0),
        bad_taken: AtomicU64::new(0),
    });
    let consumer = amqp.start_consumer(handler.clone(), 2).unwrap();
    let message = |id: String, body: &str| Outgoing {
        message_id: id,
        body: body.into(),
    };
    // Two that the store cannot take first, one per consumer thread, then forty it can.
    let bad: Vec<Outgoing> = (0..2).map(|i| message(format!("bad{i}"), "bad")).collect();
    assert!(amqp.publish_batch(&bad, &|| true).iter().all(Result::is_ok));
    assert!(wait_until(Duration::from_secs(10), || handler
        .bad_tries
        .load(Ordering::SeqCst)
        >= 2));
    let good: Vec<Outgoing> = (0..40).map(|i| message(format!("good{i}"), "ok")).collect();
    assert!(amqp
        .publish_batch(&good, &|| true)
        .iter()
        .all(Result::is_ok));
    assert!(
        wait_until(Duration::from_secs(20), || handler
            .good
            .load(Ordering::SeqCst)
            == 40),
        "the messages the store could take waited behind the ones it could not: {} of 40",
        handler.good.load(Ordering::SeqCst)
    );
    assert_eq!(dead_letters(&s), 0, "held messages were dead-lettered");
    handler.down.store(false, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(20), || handler
        .bad_taken
        .load(Ordering::SeqCst)
        == 2));
    consumer.stop();
    assert_eq!(dead_letters(&s), 0);
}

/// `rabbitmqctl -n NODE ARGS`, true on success.
fn rabbitmqctl(node: &str, args: &[&str]) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", node])
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// The node that leads `queue`, from the first node that answers.
fn leader(nodes: &[String], queue: &str) -> Option<String> {
    for n in nodes {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", n, "list_queues", "name", "leader", "type"])
            .output()
            .ok()?;
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        return text.lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&queue)).then(|| cols[1].to_string())
        });
    }
    None
}

/// Child processes killed on drop, so that a failing assertion leaves none running.
struct Children(Vec<std::process::Child>);

impl Children {
    fn take(mut self) -> Vec<std::process::Child> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts a stopped node again on drop, whatever the outcome.
struct Restart(Option<String>);

impl Drop for Restart {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            rabbitmqctl(&n, &["start_app"]);
        }
    }
}

#[test]
fn load_through_a_node_stop_on_a_quorum_queue_delivers_every_award_once() {
    let _g = crate::amqp::serial();
    let Some(urls) = named(CLUSTER_VAR) else {
        return;
    };
    let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
    assert_eq!(urls.len(), 3, "{CLUSTER_VAR} names three nodes");
    let nodes: Vec<String> = (1..=3).map(|i| format!("bm{i}@localhost")).collect();
    let dir = tempfile::tempdir().unwrap();
    let s = quorum_settings(dir.path(), &urls.join(","), 20);
    let _queues = Queues(s.clone());
    let rotated = |k: usize| {
        (0..3)
            .map(|i| urls[(i + k) % 3].clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    let bin = |nodes: String| {
        let mut c = crate::cli::bin(dir.path());
        c.env("AMQP_URL", nodes)
            .env("BIG_MARKET_TOPIC", &s.topic)
            .env("BIG_MARKET_QUEUE_TYPE", "quorum")
            .env("BIG_MARKET_STALE_AFTER", "3s")
            .env("BIG_MARKET_SCAN_INTERVAL", "500ms")
            .env("RUST_LOG", "info");
        c
    };
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
    assert!(run(bin(rotated(0)).arg("init")).status.success());
    // Two consumers connected to different nodes, and the load on the third; each logs its
    // connections.
    let serves = Children(
        (0..2)
            .map(|k| {
                bin(rotated(k))
                    .arg("serve")
                    .stderr(log(&format!("serve{k}.log")))
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let load = bin(rotated(2))
        .stderr(log("load.log"))
        .args([
            "load",
            "--records",
            "10000",
            "--threads",
            "16",
            "--timeout",
            "240s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-load, stop the node that leads the queue, and start it again a little later.
    assert!(
        wait_until(Duration::from_secs(60), || {
            crate::support::count(&crate::support::raw(&s, 1), "SELECT COUNT(*) FROM task") > 1_000
        }),
        "the load did not start"
    );
    let connects = || -> usize {
        let logs: String = ["serve0.log", "serve1.log", "load.log"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
            .collect();
        logs.matches("broker connected").count() + logs.matches("consumer connected").count()
    };
    let connected_before = connects();
    let lead = leader(&nodes, &s.topic).expect("the queue has a leader");
    let mut restart = Restart(Some(lead.clone()));
    assert!(rabbitmqctl(&lead, &["stop_app"]), "could not stop {lead}");
    let moved = wait_until(Duration::from_secs(30), || {
        leader(&nodes, &s.topic).is_some_and(|l| l != lead)
    });
    std::thread::sleep(Duration::from_secs(3)); // the outage's length, not a wait for a condition
    assert!(rabbitmqctl(&lead, &["start_app"]), "could not start {lead}");
    restart.0 = None;
    assert!(moved, "the queue's leader did not move off {lead}");
    let out = load.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{summary}");
    assert!(summary.contains("delivered=10000"), "{summary}");
    for mut serve in serves.take() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &serve.id().to_string()])
            .status();
        assert!(serve.wait().unwrap().success());
    }
    // A link that lost the stopped node and moved to another logs its connect again.
    let connected_after = connects();
    assert!(
        connected_after > connected_before,
        "no process reconnected after {lead} stopped ({connected_before} connects before, {connected_after} after)"
    );
    let audit = run(bin(rotated(0)).args(["audit", "--older-than", "0s"]));
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    let receipts: i64 = (1..=2)
        .map(|db| {
            crate::support::count(
                &crate::support::raw(&s, db),
                "SELECT COALESCE(SUM(receipts), 0) FROM delivery",
            )
        })
        .sum();
    println!(
        "leader {lead} stopped mid-load; receipts={receipts} for 10000 deliveries; connects {connected_before} -> {connected_after}"
    );
    let types = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", &nodes[0], "list_queues", "name", "type"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&types.stdout)
        .lines()
        .any(|l| l.starts_with(&s.topic) && l.trim_end().ends_with("quorum")));
}
