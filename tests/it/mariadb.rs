//! What only the MySQL/MariaDB store has to show: the original Java service's own statements
//! work on big-market's databases and the other way round, rows sit where the Java router puts
//! them, refused databases are left untouched, and credentials never reach a log or an error.
//! Runs on the server named by `BIG_MARKET_TEST_MYSQL` (a user that may create databases and
//! users, as root is on development and CI machines); unset, each test prints one line and
//! returns; set, they fail when the server is unreachable.

use std::time::Duration;

use big_market::router::{award_table, route, Layout};
use big_market::store::Store;
use big_market::util::wait_until;
use mysql::prelude::Queryable;

use crate::support::*;

/// The seed's mapper statements, as MyBatis sends them (the db-router plugin puts the split
/// table's name in place of `user_award_record`).
const JAVA_INSERT_TASK: &str = "insert into task(
        user_id, topic, message_id, message, state, create_time, update_time
        ) values (
        ?,?,?,?,?,now(),now()
        )";
const JAVA_INSERT_AWARD: &str = "insert into user_award_record(
            user_id, activity_id, strategy_id, order_id, award_id, award_title, award_time, award_state, create_time, update_time
        ) values (
            ?,?,?,?,?,?,?,?,now(),now()
        )";
const JAVA_NO_SEND_TASKS: &str = "select user_id, topic, message_id, message
        from task
        where state = 'fail' or (state = 'create' and now() - update_time > 6)
        limit 10";

#[test]
fn the_originals_rows_are_relayed_and_delivered_and_ours_are_found_by_its_scan() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    drop(Store::open(&t.settings, true).unwrap());

    // The Java service writes an award and its task, as its mapper does.
    let user = "xiaofuge";
    let r = route(user, Layout::default());
    let message = r#"{"data":{"awardId":101,"awardTitle":"OpenAI 增加使用次数","orderId":"880000000001","userId":"xiaofuge"},"id":"74920280321","timestamp":1712377010878}"#;
    {
        let mut c = t.mysql(r.db);
        let mut tx = c.start_transaction(mysql::TxOpts::default()).unwrap();
        tx.exec_drop(
            JAVA_INSERT_AWARD.replace("user_award_record", &award_table(r.table)),
            (
                user,
                100301i64,
                100006i64,
                "880000000001",
                101,
                "OpenAI 增加使用次数",
                "2024-04-06 12:16:50",
                "create",
            ),
        )
        .unwrap();
        tx.exec_drop(
            JAVA_INSERT_TASK,
            (user, "send_award", "74920280321", message, "create"),
        )
        .unwrap();
        tx.commit().unwrap();
    }

    // big-market's scan finds it, publishes it, and its consumer delivers the award.
    let app = t.start();
    let (service, faulty) = (app.service(), app.faulty());
    let report = service.scan_once().unwrap();
    assert_eq!(
        (report.claimed, report.relayed.completed),
        (1, 1),
        "{report:?}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || app
            .awards(r.db, Some("completed"))
            == 1),
        "the original's award was not delivered"
    );
    assert_eq!(
        app.text(
            r.db,
            "SELECT state FROM task WHERE message_id = '74920280321'"
        ),
        "completed"
    );
    assert_eq!(
        app.count(
            r.db,
            "SELECT receipts FROM delivery WHERE message_id = '74920280321'"
        ),
        1
    );

    // A task big-market could not send is what the original's compensation scan selects.
    faulty.set_down(true);
    let saved = service
        .save_award(award("user001", "880000000002"))
        .unwrap();
    app.settle();
    let found: Vec<(String, String, String, String)> =
        app.mysql(saved.db).query(JAVA_NO_SEND_TASKS).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let (u, topic, id, body) = &found[0];
    assert_eq!(
        (u.as_str(), topic.as_str(), id.as_str()),
        ("user001", "send_award", saved.message_id.as_str())
    );
    let decoded = big_market::model::EventMessage::decode(body.as_bytes()).unwrap();
    assert_eq!(decoded.order_id(), Some("880000000002"));
    // The original's completion statement works on our row too.
    app.mysql(saved.db)
        .exec_drop(
            "update task set state = 'completed', update_time = now() where user_id = ? and message_id = ?",
            ("user001", saved.message_id.as_str()),
        )
        .unwrap();
    assert!(app
        .mysql(saved.db)
        .query::<String, _>(JAVA_NO_SEND_TASKS)
        .unwrap()
        .is_empty());
    app.shutdown();
}

#[test]
fn tasks_the_original_settled_leave_the_claim_range_and_do_not_hide_a_due_one() {
    let Some(mut t) = TestStore::mariadb() else {
        return;
    };
    t.settings.scan_batch = 5;
    drop(Store::open(&t.settings, true).unwrap());
    let user = "xiaofuge";
    let db = route(user, Layout::default()).db;
    {
        // 25 tasks the Java service wrote and completed itself (they keep next_attempt_at = 0,
        // the start of the claim range), then one it could not send.
        let mut c = t.mysql(db);
        for i in 0..25 {
            c.exec_drop(
                JAVA_INSERT_TASK,
                (user, "send_award", format!("7492028{i:04}"), "{}", "create"),
            )
            .unwrap();
            c.exec_drop(
                "update task set state = 'completed', update_time = now() where user_id = ? and message_id = ?",
                (user, format!("7492028{i:04}")),
            )
            .unwrap();
        }
        c.exec_drop(
            JAVA_INSERT_TASK,
            (
                user,
                "send_award",
                "74920289999",
                "{\"not\":\"ours\"}",
                "fail",
            ),
        )
        .unwrap();
    }
    let due_or_settled_in_range =
        "SELECT COUNT(*) FROM task WHERE next_attempt_at <= 1000 * UNIX_TIMESTAMP() AND state = 'completed'";
    assert_eq!(t.count(db, due_or_settled_in_range), 25);

    let app = t.start();
    let service = app.service();
    // One pass finds the failed task behind five claim windows of settled ones.
    let report = service.scan_once().unwrap();
    assert_eq!(report.claimed, 1, "{report:?}");
    assert_eq!(
        app.count(db, due_or_settled_in_range),
        0,
        "settled tasks moved out of the range"
    );
    assert_eq!(
        app.count(db, "SELECT COUNT(*) FROM task WHERE state = 'completed'"),
        25,
        "and left as they were"
    );
    app.shutdown();
}

#[test]
fn every_row_sits_where_the_java_router_puts_it() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    let app = t.start();
    let service = app.service();
    let mut users: Vec<String> = ["xiaofuge", "user001", "user 4", "用户一"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    users.extend((0..60).map(|i| format!("u{i}")));
    for (i, u) in users.iter().enumerate() {
        service.save_award(award(u, &format!("9{i:011}"))).unwrap();
    }
    app.settle();
    let t = app.shutdown();
    // The vectors of the original's router (see DESIGN.md), then every user.
    assert_eq!(
        (
            route("xiaofuge", Layout::default()).db,
            route("xiaofuge", Layout::default()).table
        ),
        (1, 1)
    );
    assert_eq!(
        (
            route("user001", Layout::default()).db,
            route("user001", Layout::default()).table
        ),
        (2, 0)
    );
    for u in &users {
        let r = route(u, Layout::default());
        for db in 1..=2 {
            for tb in 0..4 {
                let n = t.count(
                    db,
                    &format!(
                        "SELECT COUNT(*) FROM {} WHERE user_id = '{u}'",
                        award_table(tb)
                    ),
                );
                let here = (db, tb) == (r.db, r.table);
                assert_eq!(n, i64::from(here), "user {u:?} in db {db} table {tb}");
            }
            let tasks = t.count(
                db,
                &format!("SELECT COUNT(*) FROM task WHERE user_id = '{u}'"),
            );
            assert_eq!(tasks, i64::from(db == r.db), "task of {u:?} in db {db}");
        }
    }
}

#[test]
fn a_database_of_another_layout_version_or_origin_is_refused_in_one_line_and_left_untouched() {
    let Some(mut t) = TestStore::mariadb() else {
        return;
    };
    drop(Store::open(&t.settings, true).unwrap());
    let tables = |t: &TestStore, db: u32| -> Vec<String> {
        t.mysql(db)
            .query("SELECT CAST(table_name AS CHAR) FROM information_schema.tables WHERE table_schema = DATABASE() ORDER BY 1")
            .unwrap()
    };
    let before = tables(&t, 1);
    t.set_layout(Layout::new(2, 8).unwrap());
    let err = Store::open(&t.settings, true)
        .err()
        .expect("layout mismatch");
    let msg = err.to_string();
    assert!(msg.contains("--tb-count 4") && !msg.contains('\n'), "{msg}");
    assert_eq!(tables(&t, 1), before, "nothing was created");

    t.set_layout(Layout::default());
    t.exec(1, "UPDATE shard_meta SET schema_version = 2");
    let err = Store::open(&t.settings, true)
        .err()
        .expect("version mismatch");
    assert!(err.to_string().contains("schema version 2"), "{err}");
    assert_eq!(tables(&t, 2).len(), before.len());

    // A task table that is neither the original's nor ours is refused, even by init.
    let other = TestStore::new(Kind::Mariadb);
    create_database(&other);
    other.exec(1, "CREATE TABLE task (id bigint unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY, user_id varchar(32) NOT NULL, topic varchar(32) NOT NULL)");
    let err = Store::open(&other.settings, true)
        .err()
        .expect("foreign task table");
    assert!(err.to_string().contains("made by something else"), "{err}");
    assert_eq!(tables(&other, 1), ["task"], "nothing was added");

    // Without init, a missing database is named with what to do.
    let fresh = TestStore::new(Kind::Mariadb);
    let err = Store::open(&fresh.settings, false)
        .err()
        .expect("no database");
    assert!(err.to_string().contains("big-market init"), "{err}");
}

/// Create the test's first database, empty.
fn create_database(t: &TestStore) {
    let db1 = format!("{}_01", t.url().rsplit('/').next().unwrap());
    t.server()
        .conn()
        .query_drop(format!("CREATE DATABASE `{db1}`"))
        .unwrap();
}

/// The original's tables, as its DDL has them (DESIGN.md): no column of big-market's.
const ORIGINAL_TASK: &str = "CREATE TABLE task (id int unsigned NOT NULL AUTO_INCREMENT, user_id varchar(32) NOT NULL, topic varchar(32) NOT NULL, message_id varchar(11) NOT NULL, message varchar(512) NOT NULL, state varchar(16) NOT NULL DEFAULT 'create', create_time datetime NOT NULL DEFAULT CURRENT_TIMESTAMP, update_time datetime NOT NULL DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (id), UNIQUE KEY uq_message_id (message_id), KEY idx_state (state), KEY idx_update_time (update_time)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

#[test]
fn init_adds_big_markets_columns_to_the_originals_database_and_its_rows_are_delivered() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    create_database(&t);
    t.exec(1, ORIGINAL_TASK);
    for tb in 0..4 {
        t.exec(1, &format!("CREATE TABLE user_award_record_{tb:03} (id int unsigned NOT NULL AUTO_INCREMENT, user_id varchar(32) NOT NULL, activity_id bigint NOT NULL, strategy_id bigint NOT NULL, order_id varchar(12) NOT NULL, award_id int NOT NULL, award_title varchar(128) NOT NULL, award_time datetime NOT NULL, award_state varchar(16) NOT NULL DEFAULT 'create', create_time datetime NOT NULL DEFAULT CURRENT_TIMESTAMP, update_time datetime NOT NULL DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (id), UNIQUE KEY uq_order_id (order_id), KEY idx_user_id (user_id), KEY idx_activity_id (activity_id), KEY idx_strategy_id (strategy_id)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"));
    }
    // The Java service's rows: a delivered award with its completed task, and one not yet sent.
    let mut c = t.mysql(1);
    for (order, id, state) in [
        ("870000000001", "11111111111", "completed"),
        ("870000000002", "22222222222", "create"),
    ] {
        c.exec_drop(
            JAVA_INSERT_AWARD.replace("user_award_record", "user_award_record_001"),
            (
                "xiaofuge",
                100301i64,
                100006i64,
                order,
                101,
                "t",
                "2024-04-06 12:16:50",
                if state == "completed" {
                    "completed"
                } else {
                    "create"
                },
            ),
        )
        .unwrap();
        let message = format!(
            r#"{{"data":{{"awardId":101,"awardTitle":"t","orderId":"{order}","userId":"xiaofuge"}},"id":"{id}","timestamp":1712377010878}}"#
        );
        c.exec_drop(
            JAVA_INSERT_TASK,
            ("xiaofuge", "send_award", id, message, state),
        )
        .unwrap();
    }
    drop(c);

    // Without init, the database is refused with what to do; init adds the columns.
    let status = t.bin().args(["status"]).output().unwrap();
    assert_eq!(status.status.code(), Some(2));
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("run `big-market init` to add them"), "{err}");
    let init = t.bin().args(["init"]).output().unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert_eq!(
        t.count(
            1,
            "SELECT COUNT(*) FROM task WHERE next_attempt_at = 9223372036854775807"
        ),
        1,
        "the original's settled task is out of the claim range"
    );

    // The Java service's own statements still work, and big-market delivers its pending row.
    t.mysql(1)
        .exec_drop(
            JAVA_INSERT_TASK,
            ("xiaofuge", "send_award", "33333333333", r#"{"data":{"awardId":101,"awardTitle":"t","orderId":"870000000002","userId":"xiaofuge"},"id":"33333333333","timestamp":1712377010878}"#, "create"),
        )
        .unwrap();
    let app = t.start();
    let service = app.service();
    let report = service.scan_once().unwrap();
    assert_eq!(report.relayed.completed, 2, "{report:?}");
    assert!(
        wait_until(Duration::from_secs(10), || app.awards(1, Some("completed"))
            == 2),
        "the original's pending award was delivered"
    );
    assert_eq!(
        app.count(1, "SELECT receipts FROM delivery WHERE order_id = '870000000002' AND message_id = '22222222222'"),
        1
    );
    app.shutdown();
}

#[test]
fn credentials_never_reach_a_log_or_an_error() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    let user = format!("u{}", fastrand::u32(..));
    let secret = format!("pw{}x", fastrand::u64(..));
    let server = t.server();
    let mut root = server.conn();
    root.query_drop(format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{secret}'"))
        .unwrap();
    struct DropUser(String, &'static MysqlServer);
    impl Drop for DropUser {
        fn drop(&mut self) {
            if let Ok(mut c) = mysql::Conn::new(self.1.opts(None)) {
                let _ = c.query_drop(format!("DROP USER IF EXISTS '{}'@'%'", self.0));
            }
        }
    }
    let _cleanup = DropUser(user.clone(), server);
    let prefix = t.url().rsplit('/').next().unwrap().to_string();
    root.query_drop(format!("GRANT ALL ON `{}\\_%`.* TO '{user}'@'%'", prefix))
        .unwrap();
    let addr = &server.addr;
    let url = format!("mysql://{user}:{secret}@{addr}/{prefix}");
    let run = |store: &str, args: &[&str]| {
        let out = t
            .bin()
            .env("BIG_MARKET_STORE", store)
            .env("RUST_LOG", "debug")
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    };
    let (ok, text) = run(&url, &["init"]);
    assert!(ok.success(), "{text}");
    assert!(
        text.contains(&format!("mysql://{user}@{addr}/{prefix}_01")),
        "{text}"
    );
    let (ok, text) = run(&url, &["load", "--records", "50"]);
    assert!(ok.success(), "{text}");
    assert!(!text.contains(&secret), "{text}");
    // A wrong password: refused, and neither password is shown.
    let wrong = url.replace(&secret, "wrongpw1234");
    let (ok, text) = run(&wrong, &["status"]);
    assert!(!ok.success());
    assert!(text.contains("check the user and password"), "{text}");
    assert!(
        !text.contains("wrongpw1234") && !text.contains(&secret),
        "{text}"
    );
    // verify's children get the URL through their environment, never their command line.
    let (line, env) = crate::bounded::first_child_of(t.bin().env("BIG_MARKET_STORE", &url).args([
        "verify",
        "--rounds",
        "1",
        "--records",
        "20",
    ]));
    assert!(!line.contains(&secret), "{line}");
    assert!(
        env.contains(&secret),
        "the child got the URL through its environment"
    );
}

#[test]
fn the_tools_and_the_http_api_run_on_mariadb() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    let run = |args: &[&str]| {
        let out = t.bin().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(run(&["init"]).contains("_02 ready"));
    run(&[
        "award",
        "--user-id",
        "user 4",
        "--activity-id",
        "100301",
        "--strategy-id",
        "100006",
        "--order-id",
        "990000000001",
        "--award-id",
        "101",
        "--award-title",
        "OpenAI 增加使用次数",
        "--wait",
        "confirmed",
    ]);
    let status: serde_json::Value = serde_json::from_str(&run(&["status", "--json"])).unwrap();
    assert!(
        status["shards"][1]["location"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/", t.server().shown)),
        "{status}"
    );
    assert_eq!(status["shards"][1]["tasks"]["completed"], 1, "{status}");
    assert!(run(&["tasks", "list"]).contains("b0200000001"));
    run(&["audit"]);

    // The HTTP API on the same databases.
    let url = t.url();
    let server = crate::http::Server::start_with(t.dir.path(), &["--store", &url], &[]);
    let body = r#"{"userId":"xiaofuge","activityId":100301,"strategyId":100006,"orderId":"990000000002","awardId":101,"awardTitle":"t","awardTime":"2024-04-06T12:16:50+08:00"}"#;
    let (code, v) = server.call("GET", "/readyz", "");
    assert_eq!(
        (code, &v["shards"]),
        (200, &serde_json::json!("open")),
        "{v}"
    );
    let (code, v) = server.call("POST", "/api/v1/awards", body);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["db"], "big_market_01");
    assert_eq!(v["table"], "user_award_record_001");
    let (code, _) = server.call("POST", "/api/v1/awards", body);
    assert_eq!(code, 409, "a repeated order id");
    let (code, v) = server.call("GET", "/api/v1/awards?userId=xiaofuge", "");
    assert_eq!(code, 200);
    assert_eq!(v["awards"][0]["orderId"], "990000000002", "{v}");
    assert_eq!(
        v["awards"][0]["awardTime"], 1_712_377_010_000i64,
        "the original's datetime column keeps the second: {v}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || t.awards(1, Some("completed"))
            == 1),
        "delivered"
    );
}

/// Kill every server connection to the test's databases (as a network drop or a server-side
/// `KILL` would); returns how many there were.
fn kill_connections(t: &TestStore) -> usize {
    let mut root = t.server().conn();
    let prefix = t.url().rsplit('/').next().unwrap().to_string();
    let ids: Vec<u64> = root
        .exec(
            "SELECT id FROM information_schema.processlist WHERE db LIKE ? AND id <> CONNECTION_ID()",
            (format!("{prefix}\\_%"),),
        )
        .unwrap();
    for id in &ids {
        let _ = root.query_drop(format!("KILL CONNECTION {id}"));
    }
    ids.len()
}

#[test]
fn connections_killed_mid_load_lose_nothing_and_the_service_reconnects() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    let app = t.start();
    let service = app.service();
    let saved = std::sync::Mutex::new(Vec::new());
    let failed = std::sync::atomic::AtomicUsize::new(0);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let total = 3000;
    let killed = std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let order = format!("6{i:011}");
                match service.save_award(award(&format!("k{}", i % 40), &order)) {
                    Ok(_) => saved.lock().unwrap().push(order),
                    Err(_) => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
        let mut killed = 0;
        for round in 1..=3 {
            assert!(
                wait_until(Duration::from_secs(30), || next
                    .load(std::sync::atomic::Ordering::SeqCst)
                    >= round * total / 4),
                "the load did not progress"
            );
            killed += kill_connections(&app);
        }
        killed
    });
    assert!(killed > 0, "connections were killed");
    eprintln!(
        "killed {killed} connections; {} saves failed",
        failed.load(std::sync::atomic::Ordering::SeqCst)
    );
    let saved = saved.into_inner().unwrap();
    assert!(
        saved.len() > total / 2,
        "most saves succeed: {} of {total}, {} failed",
        saved.len(),
        failed.load(std::sync::atomic::Ordering::SeqCst)
    );
    // The service reconnects: a save after the kills succeeds, and the scanner sends whatever
    // was committed but not marked.
    service.save_award(award("after", "699999999999")).unwrap();
    let done = wait_until(Duration::from_secs(60), || {
        service.scan_once().is_ok() && { app.totals().all_done() }
    });
    assert!(
        done,
        "not everything committed was delivered: {:?}",
        app.totals()
    );
    let t = app.shutdown();
    // Every acknowledged save is stored (a save whose reply was lost may be stored as well).
    assert!(
        t.totals().awards as usize > saved.len(),
        "the acknowledged saves and the one after the kills"
    );
    for order in saved.iter().step_by(97) {
        let r = route(
            &format!("k{}", order[1..].parse::<usize>().unwrap() % 40),
            Layout::default(),
        );
        assert_eq!(
            t.count(
                r.db,
                &format!(
                    "SELECT COUNT(*) FROM {} WHERE order_id = '{order}'",
                    award_table(r.table)
                )
            ),
            1,
            "order {order}"
        );
    }
    let audit = t.bin().args(["audit"]).output().unwrap();
    assert!(
        audit.status.success(),
        "{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
}

#[test]
fn quotes_backslashes_and_any_unicode_in_values_are_stored_exactly() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    let app = t.start();
    let service = app.service();
    let nasty = [
        ("o'brien", r#"it's "quoted""#),
        (r"back\slash", r"C:\path\to\n"),
        ("x'); DROP TABLE task; --", "'; DELETE FROM task; --"),
        ("用户 😀", "奖品 🎁\u{2028}中"),
        ("%_like", "100% _off_"),
    ];
    // Saved together, so they go through one multi-row script; the delivery of their messages
    // (whose bodies hold the same values, JSON-escaped) goes through another.
    let records: Vec<_> = nasty
        .iter()
        .enumerate()
        .map(|(i, (user, title))| {
            big_market::model::AwardRecord::new(big_market::model::NewAward {
                user_id: user,
                activity_id: 1,
                strategy_id: 2,
                order_id: &format!("55000000000{i}"),
                award_id: 3,
                award_title: title,
                award_time_ms: 1_712_377_010_000,
            })
            .unwrap()
        })
        .collect();
    for r in service.save_awards(records) {
        r.unwrap();
    }
    app.settle();
    for (i, (user, title)) in nasty.iter().enumerate() {
        let r = route(user, Layout::default());
        let stored: Option<(String, String)> = app
            .mysql(r.db)
            .exec_first(
                format!(
                    "SELECT user_id, award_title FROM {} WHERE order_id = ?",
                    award_table(r.table)
                ),
                (format!("55000000000{i}"),),
            )
            .unwrap();
        let (u, ti) = stored.unwrap_or_else(|| panic!("{user:?} not stored"));
        assert_eq!((u.as_str(), ti.as_str()), (*user, *title));
        let awards = service
            .store()
            .awards_of(&big_market::model::UserId::parse(user).unwrap(), 10)
            .unwrap();
        assert_eq!(awards[0].award_title, *title);
    }
    assert!(
        wait_until(Duration::from_secs(10), || app.totals() == Totals::done(5)),
        "{:?}",
        app.totals()
    );
    app.shutdown();
}

#[test]
fn bench_on_mariadb_prints_the_ceiling_the_originals_design_the_pipeline_and_their_server_work_and_cleans_up(
) {
    use mysql::prelude::Queryable;
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    // 256 callers: more than the original's pool has connections, so they queue for them.
    let out = t
        .bin()
        .args(["bench", "--records", "600", "--threads", "256"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for key in [
        "mysql_e2e_limit",
        "mysql_group_limit",
        "mysql_naive",
        "pipeline_over_naive",
        "pipeline",
        "pipeline_batched",
        "mysql_e2e_statements_per_award",
        "pipeline_statements_per_award",
        "pipeline_commits_per_award",
    ] {
        assert!(figures[key].as_f64().unwrap() > 0.0, "{key}: {figures}");
    }
    assert!(
        stdout.lines().any(|l| l.starts_with("mysql_naive ")),
        "the original's design is printed beside the ceiling: {stdout}"
    );
    assert!(figures["naive"].is_null(), "no SQLite figure: {figures}");
    // A pipeline commits each award at least twice (its save, its delivery) in groups of at
    // most the callers per database; the ceiling commits once per 1,000.
    assert!(
        figures["pipeline_commits_per_award"].as_f64().unwrap()
            > figures["mysql_e2e_commits_per_award"].as_f64().unwrap(),
        "{figures}"
    );
    let left: Vec<String> = t
        .server()
        .conn()
        .exec(
            "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name LIKE ?",
            (format!("{}\\_%", t.prefix()),),
        )
        .unwrap();
    assert!(left.is_empty(), "scratch databases left behind: {left:?}");
}

/// The seed's `SendAwardMessage`, exactly: no `orderId`.
const SEED_MESSAGE: &str = r#"{"data":{"awardId":101,"awardTitle":"OpenAI 增加使用次数","userId":"xiaofuge"},"id":"74920280321","timestamp":1712377010878}"#;

/// The original's award and task, written as its mapper writes them, in one transaction.
fn java_saves(t: &TestStore, order: &str, message_id: &str, message: &str) {
    let user = "xiaofuge";
    let r = route(user, Layout::default());
    let mut c = t.mysql(r.db);
    let mut tx = c.start_transaction(mysql::TxOpts::default()).unwrap();
    tx.exec_drop(
        JAVA_INSERT_AWARD.replace("user_award_record", &award_table(r.table)),
        (
            user,
            100301i64,
            100006i64,
            order,
            101,
            "OpenAI 增加使用次数",
            "2024-04-06 12:16:50",
            "create",
        ),
    )
    .unwrap();
    tx.exec_drop(
        JAVA_INSERT_TASK,
        (user, "send_award", message_id, message, "create"),
    )
    .unwrap();
    tx.commit().unwrap();
}

#[test]
fn the_seeds_own_message_is_recorded_and_acknowledged_its_task_completed_and_audit_shows_it_apart()
{
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    t.init();
    let db = route("xiaofuge", Layout::default()).db;
    // The seed's form, and a later version's that names its award.
    java_saves(&t, "880000000001", "74920280321", SEED_MESSAGE);
    let later = r#"{"data":{"awardId":101,"awardTitle":"OpenAI 增加使用次数","orderId":"880000000002","userId":"xiaofuge"},"id":"74920280322","timestamp":1712377010878}"#;
    java_saves(&t, "880000000002", "74920280322", later);

    let url = t.url();
    let server = crate::http::Server::start_with(
        t.dir.path(),
        &["--store", &url, "--scan-interval", "200ms"],
        &[],
    );
    let completed = "SELECT COUNT(*) FROM task WHERE state = 'completed'";
    assert!(
        wait_until(Duration::from_secs(30), || t.count(db, completed) == 2),
        "both tasks completed: {:?}",
        t.mysql(db)
            .query::<(String, String, Option<String>), _>(
                "SELECT message_id, state, last_error FROM task"
            )
            .unwrap()
    );
    let (_, metrics) = server.call("GET", "/metrics", "");
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains("big_market_original_messages_total 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("big_market_poison_total 0\n"), "{metrics}");
    server.stop();

    // Recorded under its message id, acknowledged once, never refused or parked.
    assert_eq!(
        t.count(
            db,
            "SELECT receipts FROM delivery WHERE message_id = '74920280321' AND order_id = ''"
        ),
        1
    );
    assert_eq!(
        t.count(
            db,
            "SELECT COUNT(*) FROM task WHERE state IN ('dead', 'fail') OR attempts > 0"
        ),
        0
    );
    // The later version's award was delivered exactly as ours; the seed's cannot be named.
    let table = award_table(route("xiaofuge", Layout::default()).table);
    assert_eq!(
        t.text(
            db,
            &format!("SELECT award_state FROM {table} WHERE order_id = '880000000002'")
        ),
        "completed"
    );
    assert_eq!(
        t.text(
            db,
            &format!("SELECT award_state FROM {table} WHERE order_id = '880000000001'")
        ),
        "create"
    );

    // The audit passes and shows the original's rows in their own columns.
    let audit = t
        .bin()
        .args(["audit", "--older-than", "0s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    let row = text
        .lines()
        .find(|l| l.starts_with(&big_market::router::db_name(db)))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("completed=2") && row.contains("completed=1 create=1"),
        "{text}"
    );
    let json = t.bin().args(["audit", "--json"]).output().unwrap();
    let audits: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let a = &audits[(db - 1) as usize];
    assert_eq!(
        a["original_tasks"],
        serde_json::json!({"completed": 2}),
        "{a}"
    );
    assert_eq!(
        (
            a["tasks_without_award"].as_u64(),
            a["awards_without_task"].as_u64()
        ),
        (Some(0), Some(0)),
        "{a}"
    );

    // An original task left unsent fails the audit once it is older than --older-than.
    t.mysql(db)
        .exec_drop(
            JAVA_INSERT_TASK,
            (
                "xiaofuge",
                "send_award",
                "74920280323",
                SEED_MESSAGE.replace("74920280321", "74920280323"),
                "fail",
            ),
        )
        .unwrap();
    let audit = t
        .bin()
        .args(["audit", "--older-than", "0s"])
        .output()
        .unwrap();
    assert_eq!(
        audit.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    let audit = t
        .bin()
        .args(["audit", "--older-than", "1h"])
        .output()
        .unwrap();
    assert!(
        audit.status.success(),
        "younger than the limit: not yet a failure"
    );
}

/// `big-market award` of `order` for xiaofuge on `store`.
fn award_cmd(t: &TestStore, store: &str, order: &str) -> std::process::Output {
    award_cmd_with(t, store, order, "30s")
}

/// [`award_cmd`] with `--mysql-timeout`.
fn award_cmd_with(t: &TestStore, store: &str, order: &str, timeout: &str) -> std::process::Output {
    let mut cmd = t.bin();
    cmd.env("BIG_MARKET_STORE", store)
        .env("BIG_MARKET_MYSQL_TIMEOUT", timeout)
        .args([
            "award",
            "--user-id",
            "xiaofuge",
            "--activity-id",
            "100301",
            "--strategy-id",
            "100006",
            "--order-id",
            order,
            "--award-id",
            "101",
            "--award-title",
            "OpenAI 增加使用次数",
        ]);
    // Bounded: a regression of the deadlines under test fails the test instead of hanging it.
    bounded(cmd, Duration::from_secs(120))
}

/// Award records of `order` (xiaofuge's split table).
fn awards_of_order(t: &TestStore, order: &str) -> i64 {
    let r = route("xiaofuge", Layout::default());
    t.count(
        r.db,
        &format!(
            "SELECT COUNT(*) FROM {} WHERE order_id = '{order}'",
            award_table(r.table)
        ),
    )
}

#[test]
fn a_connection_cut_just_after_the_commit_is_sent_is_outcome_unknown_and_the_retry_is_a_duplicate()
{
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    t.init();
    let proxy = Proxy::to(&t.server().addr);
    let via = proxy.url(t.server(), t.prefix());

    // `award`: the server commits, the answer never comes back.
    proxy.cut_after("COMMIT");
    let out = award_cmd(&t, &via, "770000000001");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "cuts={} {err}", proxy.cuts());
    assert_eq!(proxy.cuts(), 1);
    let line = err.lines().last().unwrap();
    assert!(
        line.contains("outcome unknown")
            && line.contains("may or may not have been saved")
            && line.contains("retry with the same orderId"),
        "{err}"
    );
    assert_eq!(
        awards_of_order(&t, "770000000001"),
        1,
        "the commit happened"
    );
    let retry = award_cmd(&t, &via, "770000000001");
    assert_eq!(
        retry.status.code(),
        Some(3),
        "the retry says duplicate: {}",
        String::from_utf8_lossy(&retry.stderr)
    );
    assert_eq!(awards_of_order(&t, "770000000001"), 1, "exactly one award");

    // HTTP: 503 with the same advice, then 409 on the retry; the award is delivered.
    let server = crate::http::Server::start_with(
        t.dir.path(),
        &[
            "--store",
            &via,
            "--stale-after",
            "3s",
            "--scan-interval",
            "200ms",
        ],
        &[],
    );
    proxy.cut_after("INSERT INTO task");
    let body = r#"{"userId":"xiaofuge","activityId":100301,"strategyId":100006,"orderId":"770000000002","awardId":101,"awardTitle":"t","awardTime":1712377010878}"#;
    let (code, v) = server.call("POST", "/api/v1/awards", body);
    assert_eq!(code, 503, "{v}");
    assert!(
        v.to_string().contains("outcome unknown")
            && v.to_string().contains("retry with the same orderId"),
        "{v}"
    );
    let (code, v) = server.call("POST", "/api/v1/awards", body);
    assert_eq!(code, 409, "{v}");
    assert_eq!(awards_of_order(&t, "770000000002"), 1);
    let db = route("xiaofuge", Layout::default()).db;
    assert!(
        wait_until(Duration::from_secs(30), || t.awards(db, Some("completed"))
            == 2),
        "both committed awards delivered: {:?}",
        t.totals()
    );
    server.stop();
}

#[test]
fn a_server_that_stops_answering_costs_a_clear_error_within_the_deadline_and_nothing_committed_is_lost(
) {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    t.init();
    let proxy = Proxy::to(&t.server().addr);
    let via = proxy.url(t.server(), t.prefix());
    let timeout = Duration::from_secs(2);
    let server = crate::http::Server::start_with(
        t.dir.path(),
        &[
            "--store",
            &via,
            "--mysql-timeout",
            "2s",
            "--stale-after",
            "3s",
            "--scan-interval",
            "200ms",
        ],
        &[],
    );
    let body = |order: &str| {
        format!(
            r#"{{"userId":"xiaofuge","activityId":100301,"strategyId":100006,"orderId":"{order}","awardId":101,"awardTitle":"t","awardTime":1712377010878}}"#
        )
    };
    let (code, v) = server.call("POST", "/api/v1/awards", &body("660000000001"));
    assert_eq!(code, 201, "{v}");

    // Half-open: the proxy keeps every connection and forwards nothing.
    proxy.pause();
    let t0 = std::time::Instant::now();
    let out = award_cmd_with(&t, &via, "660000000002", "2s");
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.lines().count() == 1
            && err.contains("check that the MySQL server of --store is running and reachable"),
        "{err}"
    );
    assert!(took < timeout * 4, "award failed after {took:?}: {err}");

    let t0 = std::time::Instant::now();
    let (code, v) = server.call("POST", "/api/v1/awards", &body("660000000003"));
    let took = t0.elapsed();
    assert!(code == 500 || code == 503, "{code} {v}");
    assert!(took < timeout * 3, "the save answered after {took:?}");
    let (code, _) = server.call("GET", "/healthz", "");
    assert_eq!(code, 200, "healthz answers while the database does not");

    // Forwarding again: saves succeed once the lanes have reconnected, and every award that
    // was committed (the one of the unknown outcome too, if it was) is delivered.
    proxy.resume();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (code, _) = server.call("POST", "/api/v1/awards", &body("660000000004"));
            code == 201 || code == 409
        }),
        "saves succeed again"
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            let n = t.totals();
            n.all_done() && n.awards >= 2
        }),
        "every committed award delivered: {:?}",
        t.totals()
    );
    assert_eq!(
        awards_of_order(&t, "660000000002"),
        0,
        "award wrote nothing"
    );
    server.stop();
    let audit = t
        .bin()
        .args(["audit", "--older-than", "0s"])
        .output()
        .unwrap();
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
}

/// Run a command to its end, at most `limit` (killed past it, and the test fails).
fn bounded(mut cmd: std::process::Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &id.to_string()])
                .status();
            panic!("the command did not end within {limit:?}: {cmd:?}");
        }
    }
}

/// Runs `cmd` with `args` (bounded, 60 s), asserts it exits 2 and returns its stderr.
fn refused(mut cmd: std::process::Command, args: &[&str]) -> String {
    cmd.args(args);
    let out = bounded(cmd, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    err
}

/// Every command but `init`, as a user would first try it.
fn commands_but_init() -> Vec<Vec<&'static str>> {
    vec![
        vec!["serve"],
        vec!["load", "--records", "1"],
        vec![
            "award",
            "--user-id",
            "xiaofuge",
            "--activity-id",
            "1",
            "--strategy-id",
            "1",
            "--order-id",
            "1",
            "--award-id",
            "1",
            "--award-title",
            "t",
        ],
        vec!["status"],
        vec!["audit"],
    ]
}

/// The databases of the test's prefix that exist.
fn databases_of(t: &TestStore) -> Vec<String> {
    t.server()
        .conn()
        .exec(
            "SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata WHERE schema_name LIKE ?",
            (format!("{}\\_%", t.prefix()),),
        )
        .unwrap()
}

#[test]
fn only_init_creates_a_database_every_other_command_refuses_in_one_line_naming_init() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    for args in commands_but_init() {
        let err = refused(t.bin(), &args);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.contains("does not exist") && last.contains("run `big-market init`"),
            "{args:?}: {err}"
        );
        assert!(
            databases_of(&t).is_empty(),
            "{args:?} created {:?}",
            databases_of(&t)
        );
    }
    t.init();
    assert_eq!(databases_of(&t).len(), 2);
}

#[test]
fn the_java_services_databases_are_refused_before_init_and_their_task_table_left_as_it_is() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    let server = t.server();
    for db in 1..=2 {
        server
            .conn()
            .query_drop(format!("CREATE DATABASE `{}_{db:02}`", t.prefix()))
            .unwrap();
        t.exec(db, ORIGINAL_TASK);
        for tb in 0..4 {
            t.exec(db, &format!("CREATE TABLE user_award_record_{tb:03} (id int unsigned NOT NULL AUTO_INCREMENT, user_id varchar(32) NOT NULL, activity_id bigint NOT NULL, strategy_id bigint NOT NULL, order_id varchar(12) NOT NULL, award_id int NOT NULL, award_title varchar(128) NOT NULL, award_time datetime NOT NULL, award_state varchar(16) NOT NULL DEFAULT 'create', create_time datetime NOT NULL DEFAULT CURRENT_TIMESTAMP, update_time datetime NOT NULL DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (id), UNIQUE KEY uq_order_id (order_id), KEY idx_user_id (user_id), KEY idx_activity_id (activity_id), KEY idx_strategy_id (strategy_id)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"));
        }
    }
    let shape = |t: &TestStore| -> Vec<(String, String)> {
        (1..=2)
            .flat_map(|db| {
                let mut c = t.mysql(db);
                let task: (String, String) = c.query_first("SHOW CREATE TABLE task").unwrap().unwrap();
                let tables: Vec<String> = c
                    .query("SELECT CAST(table_name AS CHAR) FROM information_schema.tables WHERE table_schema = DATABASE() ORDER BY 1")
                    .unwrap();
                [task, ("tables".into(), tables.join(","))]
            })
            .collect()
    };
    let before = shape(&t);
    for args in commands_but_init() {
        let err = refused(t.bin(), &args);
        assert!(
            err.lines()
                .last()
                .unwrap_or_default()
                .contains("run `big-market init`"),
            "{args:?}: {err}"
        );
        assert_eq!(
            shape(&t),
            before,
            "{args:?} changed the Java service's tables"
        );
    }
    t.init();
    assert_ne!(
        shape(&t),
        before,
        "init adds big-market's columns and tables"
    );
}

#[test]
fn a_topic_the_task_column_cannot_hold_is_refused_at_start_before_anything_is_opened() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    let topic = "t".repeat(33);
    for args in [vec!["init"], vec!["serve"], vec!["status"]] {
        let mut c = t.bin();
        c.args(["--topic", &topic]);
        let err = refused(c, &args);
        assert!(
            err.lines().count() == 1 && err.contains("holds 32"),
            "{args:?}: {err}"
        );
        assert!(databases_of(&t).is_empty(), "nothing was opened or created");
    }
}

#[test]
fn a_delivery_the_database_refuses_for_its_data_is_poison_and_its_task_is_parked_dead_with_why() {
    let Some(mut t) = TestStore::mariadb() else {
        return;
    };
    t.settings.retry.max_attempts = 1;
    drop(Store::open(&t.settings, true).unwrap());
    // The Java service's award and task, whose message id (12 digits) is wider than the
    // delivery log's message_id varchar(11): the delivery can never be recorded.
    let wide = r#"{"data":{"awardId":101,"awardTitle":"t","orderId":"880000000009","userId":"xiaofuge"},"id":"749202803999","timestamp":1712377010878}"#;
    java_saves(&t, "880000000009", "74920280399", wide);
    let store = std::sync::Arc::new(Store::open(&t.settings, false).unwrap());
    let consumer = big_market::consumer::AwardConsumer::new(store, Default::default());
    let fine = r#"{"data":{"awardId":101,"awardTitle":"t","orderId":"880000000008","userId":"xiaofuge"},"id":"74920280398","timestamp":1712377010878}"#;
    java_saves(&t, "880000000008", "74920280398", fine);
    use big_market::transport::Handler;
    let outcomes = consumer.handle_batch(&[wide.as_bytes(), fine.as_bytes()]);
    match &outcomes[0] {
        big_market::transport::Handled::Reject(why) => {
            assert!(
                why.contains("refuses to record message 749202803999"),
                "{why}"
            )
        }
        other => panic!("expected the wide message refused as poison, got {other:?}"),
    }
    assert_eq!(
        outcomes[1],
        big_market::transport::Handled::Ack,
        "the other message of the batch is delivered"
    );
    drop(consumer);

    // End to end in-process: the scan publishes the task, the consumer refuses its message,
    // and the task is parked dead with the reason.
    let app = t.start();
    let db = route("xiaofuge", Layout::default()).db;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let _ = app.service().scan_once();
            app.count(
                db,
                "SELECT COUNT(*) FROM task WHERE message_id = '74920280399' AND state = 'dead'",
            ) == 1
        }),
        "the task was not parked dead"
    );
    let why = app.text(
        db,
        "SELECT last_error FROM task WHERE message_id = '74920280399'",
    );
    assert!(why.contains("refuses to record message"), "{why}");
    app.shutdown();
}

#[test]
fn on_rabbitmq_the_seeds_own_message_is_acknowledged_and_never_dead_lettered() {
    let _g = crate::amqp::serial();
    let Some(mut t) = TestStore::mariadb() else {
        return;
    };
    let Some(amqp) = amqp_url() else {
        return;
    };
    t.settings.amqp_url = Some(big_market::config::AmqpUrl::parse(amqp).unwrap());
    t.settings.topic = format!(
        "send_award_test_{}",
        big_market::util::Rng::new().digits(10)
    );
    t.init();
    java_saves(&t, "880000000011", "74920280321", SEED_MESSAGE);
    let db = route("xiaofuge", Layout::default()).db;
    let url = t.url();
    let topic = t.settings.topic.clone();
    let server = crate::http::Server::start_with(
        t.dir.path(),
        &[
            "--store",
            &url,
            "--amqp-url",
            amqp,
            "--topic",
            &topic,
            "--scan-interval",
            "200ms",
        ],
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            t.count(
            db,
            "SELECT receipts FROM delivery WHERE message_id = '74920280321'"
        ) == 1
            && t.count(
                db,
                "SELECT COUNT(*) FROM task WHERE message_id = '74920280321' AND state = 'completed'"
            ) == 1
        }),
        "the seed's message was not consumed and its task completed"
    );
    let (_, metrics) = server.call("GET", "/metrics", "");
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("big_market_original_messages_total 1\n"),
        "{metrics}"
    );
    server.stop();
    let out = t
        .bin()
        .args([
            "--amqp-url",
            amqp,
            "--topic",
            &topic,
            "dlq",
            "list",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let letters: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(letters, serde_json::json!([]), "nothing was dead-lettered");
}

#[test]
fn serve_stops_within_its_deadlines_while_the_server_does_not_answer() {
    let Some(t) = TestStore::mariadb() else {
        return;
    };
    t.init();
    let proxy = Proxy::to(&t.server().addr);
    let via = proxy.url(t.server(), t.prefix());
    let args = [
        "--store",
        &via,
        "--mysql-timeout",
        "2s",
        "--stale-after",
        "3s",
        "--scan-interval",
        "200ms",
    ];
    let server = crate::http::Server::start_with(t.dir.path(), &args, &[]);
    let body = r#"{"userId":"xiaofuge","activityId":100301,"strategyId":100006,"orderId":"650000000001","awardId":101,"awardTitle":"t","awardTime":1712377010878}"#;
    assert_eq!(server.call("POST", "/api/v1/awards", body).0, 201);
    proxy.pause();
    let body = body.replace("650000000001", "650000000002");
    let (code, _) = server.call("POST", "/api/v1/awards", &body);
    assert!(code == 500 || code == 503, "{code}");
    let took = server.stop();
    assert!(
        took < Duration::from_secs(30),
        "serve took {took:?} to stop"
    );
    proxy.resume();
    // What was committed is delivered by the next serve.
    let server = crate::http::Server::start_with(t.dir.path(), &args, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || t.totals().all_done()),
        "{:?}",
        t.totals()
    );
    server.stop();
}
