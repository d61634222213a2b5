//! Bounded whatever the peer does: credentials that no output or command line shows, connect
//! attempts that cannot pile up, request heads scanned to the last pipelined one.

use std::process::Stdio;
use std::time::Duration;

use big_market::util::wait_until;

use crate::cli::bin;
use crate::support::*;

const SECRET: &str = "s3cretpw77";

const AWARD: &[&str] = &[
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
    "--wait-timeout",
    "1s",
];

fn output_of(cmd: &mut std::process::Command) -> (Option<i32>, String) {
    let out = cmd.env("RUST_LOG", "debug").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn an_unparsable_amqp_or_mysql_url_is_refused_without_showing_its_password() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        format!("amqq//guest:{SECRET}@127.0.0.1:5672/%2f"),
        format!("amqp:/guest:{SECRET}@127.0.0.1"),
        format!("amqp://guest:{SECRET}@127.0.0.1:99999/%2f"),
        format!("amqp://guest:{SECRET}@127.0.0.1/%2f?heartbeat=x{SECRET}"),
        format!("amqp://guest:{SECRET}%ff@127.0.0.1/%2f"),
    ] {
        let (code, text) = output_of(bin(dir.path()).args(["--amqp-url", &url]).args(AWARD));
        assert_eq!(code, Some(2), "{url}: {text}");
        assert!(text.contains("AMQP URL"), "{url}: {text}");
        assert!(!text.contains(SECRET), "{url}: {text}");
    }
    for url in [
        format!("mysql://u:{SECRET}@127.0.0.1:99999/db"),
        format!("mysql//u:{SECRET}@127.0.0.1/db"),
        format!("mysql://u:{SECRET}@127.0.0.1/db?nonsense={SECRET}"),
        format!("mysql://u:{SECRET}@127.0.0.1"),
    ] {
        let (code, text) = output_of(bin(dir.path()).args(["--store", &url, "status"]));
        assert_eq!(code, Some(2), "{url}: {text}");
        assert!(text.contains("--store"), "{url}: {text}");
        assert!(!text.contains(SECRET), "{url}: {text}");
    }
}

/// Spawn `cmd`, wait for its first child process, and return that child's command line and
/// environment; every process involved is killed before this returns.
pub fn first_child_of(cmd: &mut std::process::Command) -> (String, String) {
    let mut parent = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = parent.id();
    let mut seen = None;
    wait_until(Duration::from_secs(60), || {
        seen = children_of(pid).into_iter().find_map(|c| {
            let line = cmdline(c);
            (!line.is_empty()).then(|| {
                let env = std::fs::read(format!("/proc/{c}/environ"))
                    .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
                    .unwrap_or_default();
                (line, env)
            })
        });
        seen.is_some()
    });
    for c in children_of(pid) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &c.to_string()])
            .status();
    }
    let _ = parent.kill();
    let _ = parent.wait();
    seen.expect("verify started no child process within 60s")
}

#[test]
fn verify_hands_the_amqp_url_to_its_children_through_the_environment_not_their_command_line() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9: the children start disconnected, and live long enough to read.
    let url = format!("amqp://guest:{SECRET}@127.0.0.1:9/%2f");
    let (line, env) = first_child_of(bin(dir.path()).env("AMQP_URL", &url).args([
        "verify",
        "--rounds",
        "1",
        "--records",
        "20",
    ]));
    assert!(line.contains(" load ") || line.contains(" init"), "{line}");
    assert!(
        !line.contains(SECRET),
        "a child's command line shows the password: {line}"
    );
    assert!(
        env.lines().any(|l| l == format!("AMQP_URL={url}")),
        "the child got the URL through its environment"
    );
}

#[test]
fn a_broker_that_accepts_and_never_speaks_costs_no_thread_or_socket_per_retry() {
    let dir = tempfile::tempdir().unwrap();
    // A peer that accepts every connection, holds it open and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    let accepted = || held.lock().unwrap().len();
    assert!(bin(dir.path()).arg("init").status().unwrap().success());
    let mut serve = bin(dir.path())
        .env(
            "AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = serve.id();
    // Started (its scanner thread runs), and retrying both links.
    assert!(
        wait_until(Duration::from_secs(60), || thread_names(pid)
            .contains(&"scanner".to_string())
            && accepted() >= 2),
        "serve did not start within 60 s"
    );
    let (first, at) = (threads_and_fds(pid), accepted());
    // Sample the process over 30 s of retries.
    let start = std::time::Instant::now();
    let mut most = first;
    while start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(250));
        let now = threads_and_fds(pid);
        most = (most.0.max(now.0), most.1.max(now.1));
    }
    let attempts = accepted() - at;
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(attempts >= 2, "only {attempts} connect attempts in 30 s");
    // At most one attempt in flight per link (publisher and consumer): whatever the number
    // of attempts, the process holds no more threads or sockets than while the first was open.
    assert!(
        most.0 <= first.0 + 2 && most.1 <= first.1 + 2,
        "{attempts} connect attempts grew the process from {first:?} to {most:?} (threads, fds)"
    );
}

/// Two processes scan the same shards with a lease of a second, and a transport slowed so that
/// the scanner's pool jobs wait in its queue past their lease. Each records when each message's
/// publish started and ended: no message is ever in flight in both at once.
fn two_processes_never_have_one_message_in_flight_at_once(kind: Kind) {
    let n = 2000;
    let t = backlog(TestStore::new(kind), n);
    // All due at once (not spread over their retry backoff), so that the first scans claim
    // far more than the pools publish within a lease.
    for db in 1..=t.settings.layout.db_count() {
        t.exec(db, "UPDATE task SET next_attempt_at = 0");
    }
    let logs = tempfile::tempdir().unwrap();
    let record = |name: &str| logs.path().join(format!("{name}.publishes"));
    let serve = |name: &str| {
        KillOnDrop(
            t.bin()
                .args([
                    "--stale-after",
                    "1s",
                    "--scan-interval",
                    "50ms",
                    "--pool-threads",
                    "2",
                    "--inject-faults",
                    &format!("delay=200ms,record={}", record(name).display()),
                    "serve",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let (mut a, mut b) = (serve("a"), serve("b"));
    t.wait_done(n as i64, Duration::from_secs(180));
    let (ea, eb) = (sigterm(&mut a.0), sigterm(&mut b.0));
    assert!(
        ea.is_some_and(|e| e.success()) && eb.is_some_and(|e| e.success()),
        "both exit 0 on SIGTERM: {ea:?} {eb:?}"
    );
    let mut flights: std::collections::HashMap<String, Vec<(&str, i64, i64)>> = Default::default();
    for name in ["a", "b"] {
        let text = std::fs::read_to_string(record(name)).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            flights.entry(f[0].to_string()).or_default().push((
                name,
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            ));
        }
    }
    assert!(
        flights.len() >= n,
        "every message was published: {}",
        flights.len()
    );
    let overlapping: Vec<_> = flights
        .iter()
        .filter(|(_, f)| {
            f.iter()
                .any(|x| f.iter().any(|y| x.0 != y.0 && x.1 < y.2 && y.1 < x.2))
        })
        .collect();
    assert!(
        overlapping.is_empty(),
        "{} messages were in flight in both processes at once, e.g. {:?}",
        overlapping.len(),
        overlapping.first()
    );
}

crate::on_both_backends!(two_processes_never_have_one_message_in_flight_at_once);
