//! What an edge box left alone needs: compaction that keeps the disk flat and the audit's
//! proof, online backups that open as data directories, and `serve` as a systemd notify
//! service.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use big_market::model::EventMessage;
use big_market::store::Delivered;
use big_market::util::{now_ms, wait_until};
use rusqlite::Connection;

use crate::support::*;

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn shard_files(data: &Path) -> Vec<std::path::PathBuf> {
    (1..=2)
        .map(|db| data.join(format!("big_market_{db:02}.db")))
        .collect()
}

/// Bytes of the shard files, and of those the award tables and their indexes use (the users'
/// records, which compaction never touches). Read after every process has closed the shards,
/// so the WAL is checkpointed into the files.
fn sizes(data: &Path) -> (u64, u64) {
    let mut file = 0;
    let mut awards = 0;
    for path in shard_files(data) {
        file += std::fs::metadata(&path).unwrap().len();
        let conn = Connection::open(&path).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN
                 (SELECT name FROM sqlite_master WHERE tbl_name LIKE 'user_award_record_%')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        awards += n as u64;
    }
    (file, awards)
}

fn load(t: &TestStore, records: u32) -> String {
    ok(run(t.bin().args([
        "load",
        "--records",
        &records.to_string(),
        "--threads",
        "64",
        "--retention",
        "off",
    ])))
}

fn compact_all(t: &TestStore) -> String {
    ok(run(t.bin().args(["tasks", "purge", "--older-than", "0s"])))
}

fn audit(dir: &Path) -> Output {
    run(crate::cli::bin(dir).args(["audit", "--older-than", "0s"]))
}

#[test]
fn compaction_keeps_the_disk_flat_and_the_audit_proves_the_compacted_range() {
    let t = TestStore::new(Kind::Sqlite);
    let data = &t.settings.data_dir;
    load(&t, 100_000);
    assert!(compact_all(&t).contains("purged 100000"));
    let (first, first_awards) = sizes(data);
    load(&t, 100_000);
    assert!(compact_all(&t).contains("purged 100000"));
    let (second, second_awards) = sizes(data);
    let growth = second - first;
    let log_growth = growth.saturating_sub(second_awards - first_awards);
    println!(
        "shard files after 100,000 awards: {first} bytes; after 200,000: {second} bytes (+{:.1}%), of which award records +{} bytes; the rest +{log_growth} bytes ({:.1}%)",
        growth as f64 * 100.0 / first as f64,
        second_awards - first_awards,
        log_growth as f64 * 100.0 / first as f64,
    );
    // Deleting completed tasks alone (the delivery log kept) measured +15% here; folding both,
    // about 3%.
    assert!(
        log_growth * 10 <= first,
        "besides the award records, the shards grew by {log_growth} bytes over {first}: the folded tasks' and deliveries' pages are not reused"
    );
    let out = ok(audit(t.dir.path()));
    for row in out.lines().filter(|l| l.starts_with("big_market_")) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[1], cols[2], "everything is compacted: {row}");
    }

    // Rows above the watermark, then two ways of tampering, each on a copy of its own.
    load(&t, 200);
    ok(audit(t.dir.path()));
    let tampered = |name: &str, sql: &str| {
        let copy = t.dir.path().join(name);
        ok(run(t.bin().args([
            "backup",
            "--to",
            copy.join("data").to_str().unwrap(),
        ])));
        let conn = Connection::open(copy.join("data").join("big_market_01.db")).unwrap();
        assert_eq!(conn.execute(sql, []).unwrap(), 1, "{sql}");
        drop(conn);
        let out = audit(&copy);
        assert!(!out.status.success(), "a tampered shard passed: {sql}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let removed = tampered(
        "removed",
        "DELETE FROM delivery WHERE seq = (SELECT MAX(seq) FROM delivery)",
    );
    assert!(removed.contains("missing seq="), "{removed}");
    let moved = tampered(
        "moved",
        "UPDATE shard_meta SET compacted_seq = next_seq - 1 WHERE id = 1",
    );
    assert!(
        moved.contains("task rows at or below the watermark"),
        "{moved}"
    );
}

#[test]
fn a_message_redelivered_after_its_delivery_row_was_compacted_is_not_delivered_twice() {
    let app = TestApp::spawn(Kind::Sqlite);
    let saved = app.save("xiaofuge", "500000000001");
    app.settle();
    let shard = app.service().store().shard(saved.db);
    let task = shard
        .list_tasks(None, 10)
        .unwrap()
        .into_iter()
        .find(|t| t.message_id == saved.message_id.as_str())
        .expect("the task");
    let msg = EventMessage::decode(task.message.as_bytes()).unwrap();
    assert_eq!(app.service().store().purge(now_ms() + 1).unwrap(), 1);
    let raw = raw(&app.settings, saved.db);
    assert_eq!(count(&raw, "SELECT COUNT(*) FROM delivery"), 0, "folded");
    assert_eq!(count(&raw, "SELECT compacted_seq FROM shard_meta"), 1);
    assert_eq!(
        app.service().store().deliver(msg, now_ms()).unwrap(),
        Delivered::Again
    );
    assert_eq!(
        count(&raw, "SELECT COUNT(*) FROM delivery"),
        0,
        "no row below the watermark"
    );
    assert_eq!(awards(&raw, Some("completed")), 1);
    let out = audit(app.dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn awards_in(data: &Path) -> i64 {
    shard_files(data)
        .iter()
        .map(|p| awards(&Connection::open(p).unwrap(), None))
        .sum()
}

fn stop(mut child: Child) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    child.wait().unwrap()
}

#[test]
fn a_backup_taken_during_load_passes_the_audit_and_serve_delivers_what_it_held_pending() {
    let t = TestStore::new(Kind::Sqlite);
    let data = t.settings.data_dir.clone();
    let mut loading = t
        .bin()
        // Short leases, so that serve on the copy may take over what the load held.
        .args([
            "load",
            "--records",
            "30000",
            "--threads",
            "16",
            "--stale-after",
            "2s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read-only, and 0 while a shard is still being created (no file, or no tables yet).
    let committed = || -> i64 {
        shard_files(&data)
            .iter()
            .map(|p| {
                Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .and_then(|c| {
                        (0..4).try_fold(0i64, |n, t| {
                            c.query_row(
                                &format!("SELECT COUNT(*) FROM user_award_record_{t:03}"),
                                [],
                                |r| r.get::<_, i64>(0),
                            )
                            .map(|k| n + k)
                        })
                    })
                    .unwrap_or(0)
            })
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(60), || committed() >= 2_000),
        "the load did not start"
    );
    let before = awards_in(&data);
    let copy = t.dir.path().join("copy");
    let out = ok(run(t.bin().args([
        "backup",
        "--to",
        copy.join("data").to_str().unwrap(),
    ])));
    assert!(out.contains("backup done: 2 shards"), "{out}");
    let load_was_running = loading.try_wait().unwrap().is_none();
    assert!(loading.wait().unwrap().success());
    assert!(load_was_running, "the backup ran after the load had ended");

    let held = awards_in(&copy.join("data"));
    assert!(
        held >= before,
        "the copy holds {held} awards, {before} were committed before"
    );
    // The copy audits clean, pending tasks included (they are young, not lost) ...
    let out = run(crate::cli::bin(&copy).args(["audit", "--older-than", "1h"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // ... and serve on it delivers every award it holds.
    let serve = crate::cli::bin(&copy)
        .args(["serve", "--scan-interval", "200ms", "--stale-after", "1s"])
        .spawn()
        .unwrap();
    let delivered = wait_until(Duration::from_secs(60), || {
        shard_files(&copy.join("data"))
            .iter()
            .map(|p| awards(&Connection::open(p).unwrap(), Some("completed")))
            .sum::<i64>()
            == held
    });
    assert!(stop(serve).success());
    assert!(
        delivered,
        "serve on the copy did not deliver all {held} awards"
    );
    let out = audit(&copy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A child process killed on drop, so that a failing assertion never leaves it running.
struct Running(Option<Child>);

impl Running {
    /// Send it SIGTERM, asserting that `kill` succeeded.
    fn term(&self) {
        let pid = self.0.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Wait (bounded) for it to exit.
    fn wait(mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("the process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20)); // polling pace
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn serve_tells_the_service_manager_when_it_is_ready_and_when_it_stops() {
    let t = TestStore::new(Kind::Sqlite);
    let socket_path = t.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let serve = Running(Some(
        t.bin()
            .arg("serve")
            .env("NOTIFY_SOCKET", &socket_path)
            .spawn()
            .unwrap(),
    ));
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("no notification within 30 s");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=serving"), "{ready:?}");
    // Ready means open: the shards take a write from another process at once.
    let out = run(t.bin().args([
        "award",
        "--user-id",
        "u1",
        "--activity-id",
        "1",
        "--strategy-id",
        "1",
        "--order-id",
        "720000000001",
        "--award-id",
        "1",
        "--award-title",
        "t",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("READY=1 after {:?}", started.elapsed());
    serve.term();
    let n = socket.recv(&mut buf).expect("no STOPPING=1 within 30 s");
    let stopping = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(serve.wait(Duration::from_secs(30)).success());
}

#[test]
fn a_data_dir_missing_one_shard_file_is_refused_and_nothing_is_created() {
    let t = TestStore::new(Kind::Sqlite);
    ok(run(t.bin().arg("init")));
    let second = t.settings.data_dir.join("big_market_02.db");
    std::fs::remove_file(&second).unwrap();
    for args in [&["serve"][..], &["init"], &["status"]] {
        let out = run(t.bin().args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("big_market_02.db") && err.contains("missing"),
            "{err}"
        );
        assert!(!second.exists(), "{args:?} created the missing shard");
    }
}

#[test]
fn a_backup_appears_whole_or_not_at_all_and_never_overwrites() {
    let t = TestStore::new(Kind::Sqlite);
    load(&t, 200);
    let copy = t.dir.path().join("copy");
    ok(run(t.bin().args([
        "backup",
        "--to",
        copy.to_str().unwrap(),
    ])));
    assert!(shard_files(&copy).iter().all(|p| p.exists()));
    assert!(!t.dir.path().join("copy.partial").exists());
    let again = run(t.bin().args(["backup", "--to", copy.to_str().unwrap()]));
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    // A directory named with a trailing slash (as shells complete it) is the same directory:
    // the copies are staged beside it, not inside it.
    let slashed = format!("{}/", t.dir.path().join("copy2").display());
    ok(run(t.bin().args(["backup", "--to", &slashed])));
    let copy2 = t.dir.path().join("copy2");
    assert!(shard_files(&copy2).iter().all(|p| p.exists()));
    assert_eq!(
        std::fs::read_dir(&copy2).unwrap().count(),
        shard_files(&copy2).len(),
        "only the shard files"
    );
    assert!(!t.dir.path().join("copy2.partial").exists());
}

#[test]
fn serve_stops_at_once_on_sigterm_while_it_waits_for_a_broker_that_refuses() {
    let t = TestStore::new(Kind::Sqlite);
    let serve = Running(Some(
        t.bin()
            .arg("serve")
            .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2f")
            .spawn()
            .unwrap(),
    ));
    assert!(
        wait_until(Duration::from_secs(30), || t.ready()),
        "serve did not open its shards"
    );
    let sent = Instant::now();
    serve.term();
    let status = serve.wait(Duration::from_secs(60));
    let took = sent.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(15),
        "serve took {took:?} to stop: it waited for the broker before reading the signal"
    );
}
