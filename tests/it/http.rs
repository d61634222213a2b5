//! End-to-end tests of `serve --http`: the real binary on a free loopback port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};

use big_market::http::request;
use serde_json::{json, Value};

use crate::cli::bin;
use crate::support::*;

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(dir: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = bin(dir)
            .args(extra)
            .args(["serve", "--http", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }

    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let (status, body) = request(self.addr, method, path, body.as_bytes()).unwrap();
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    pub fn stop(mut self) {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "serve exits 0 on SIGTERM"
        );
    }
}

fn award(user: &str, order: &str) -> Value {
    json!({"userId": user, "activityId": 100301, "strategyId": 100006, "orderId": order, "awardId": 101, "awardTitle": "OpenAI 增加使用次数", "awardTime": 1712377010878i64})
}

#[test]
fn the_http_api_creates_refuses_duplicates_and_bad_input_lists_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let server = Server::start(dir.path(), &[]);

    let (status, body) = server.call(
        "POST",
        "/api/v1/awards",
        &award("xiaofuge", "100000000001").to_string(),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["messageId"], "01000000001");
    assert_eq!(
        (body["db"].as_str(), body["table"].as_str()),
        (Some("big_market_01"), Some("user_award_record_001"))
    );

    let (status, body) = server.call(
        "POST",
        "/api/v1/awards",
        &award("xiaofuge", "100000000001").to_string(),
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["orderId"], "100000000001");

    let mut wrong_type = award("xiaofuge", "100000000002");
    wrong_type["awardId"] = json!("101");
    let mut missing = award("xiaofuge", "100000000003");
    missing.as_object_mut().unwrap().remove("awardTitle");
    let bad: Vec<(String, u16, Option<&str>)> = vec![
        (wrong_type.to_string(), 400, Some("awardId")),
        (missing.to_string(), 400, Some("awardTitle")),
        (award("", "100000000004").to_string(), 400, Some("userId")),
        ("{not json".into(), 400, None),
        (
            format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024)),
            413,
            None,
        ),
    ];
    for (b, code, field) in bad {
        let (status, body) = server.call("POST", "/api/v1/awards", &b);
        assert_eq!(status, code, "{body}");
        if let Some(f) = field {
            assert_eq!(body["field"], f, "{body}");
        }
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    assert_eq!(totals(&s).0, 1, "bad input wrote nothing");

    server.call(
        "POST",
        "/api/v1/awards",
        &award("小傅哥", "100000000005").to_string(),
    );
    let (status, body) = server.call(
        "GET",
        "/api/v1/awards?userId=%E5%B0%8F%E5%82%85%E5%93%A5",
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["awards"].as_array().unwrap().len(), 1);
    let (_, body) = server.call("GET", "/api/v1/awards?userId=xiaofuge", "");
    assert_eq!(body["awards"][0]["orderId"], "100000000001");
    assert_eq!(body["awards"][0]["awardState"], "completed", "delivered");
    assert_eq!(server.call("GET", "/api/v1/awards", "").0, 400);

    let (status, metrics) = server.call("GET", "/metrics", "");
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap().to_string();
    for line in [
        "big_market_awards_saved_total 2",
        "big_market_duplicates_total 1",
        "big_market_save_latency_seconds_count 2",
        "big_market_broker_connected 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert_eq!(server.call("GET", "/healthz", "").0, 200);
    assert_eq!(server.call("GET", "/readyz", "").0, 200);
    assert_eq!(server.call("GET", "/nope", "").0, 404);
    assert_eq!(server.call("DELETE", "/api/v1/awards", "").0, 405);
    server.stop();
    assert_eq!(totals(&s), (2, 2, 2, 2));
}

#[test]
fn connections_past_the_limit_get_503_and_slow_clients_do_not_stall_the_writers() {
    use big_market::http::{HttpLimits, HttpServer};
    use std::io::Read;
    use std::sync::Arc;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let (service, _) = start(s.clone());
    let service = Arc::new(service);
    let limits = HttpLimits {
        max_connections: 2,
        workers: 1,
        io_timeout: Duration::from_secs(3),
        ..HttpLimits::default()
    };
    let server = HttpServer::start("127.0.0.1:0", service.clone(), limits).unwrap();
    let addr = server.local_addr();
    // Two clients connect and send nothing: one holds the only handler, one waits for it.
    let slow: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let mut third = std::net::TcpStream::connect(addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut answer = String::new();
    third.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // The writers are not held up by the stalled connections.
    service.save_award(award_record()).unwrap();
    drop(slow);
    server.stop();
    Arc::try_unwrap(service).ok().unwrap().shutdown().unwrap();
    assert_eq!(totals(&s).0, 1);
}

fn award_record() -> big_market::model::AwardRecord {
    crate::support::award("xiaofuge", "777000000001")
}
