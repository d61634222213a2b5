//! End-to-end tests of `serve --http`: the real binary on a free loopback port, called through
//! ureq; raw sockets only where a request must be malformed, slow or split on purpose (their
//! responses are read with httparse).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use big_market::util::wait_until;
use serde_json::{json, Value};

use crate::cli::bin;
use crate::support::*;

/// ureq with a keep-alive pool: every status returned as a response, a deadline per call.
mod client {
    use std::time::Duration;

    pub fn agent(connections: usize) -> ureq::Agent {
        with_timeout(connections, Duration::from_secs(30))
    }

    pub fn with_timeout(connections: usize, timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .max_idle_connections(connections)
            .max_idle_connections_per_host(connections)
            .build()
            .into()
    }

    /// `GET url`: the status and the body.
    pub fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, String), ureq::Error> {
        let mut r = agent.get(url).call()?;
        let body = r.body_mut().read_to_string()?;
        Ok((r.status().as_u16(), body))
    }
}

pub const TOKEN: &str = "test-token-0123456789";

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Server {
    pub fn start(dir: &std::path::Path, extra: &[&str]) -> Server {
        Server::start_with(dir, extra, &[])
    }

    /// `serve --http 127.0.0.1:0` with `global` args before `serve` and `serve_args` after it.
    pub fn start_with(dir: &std::path::Path, global: &[&str], serve_args: &[&str]) -> Server {
        Server::spawn(bin(dir), global, serve_args, Stdio::null())
    }

    /// Like [`Server::start`], with its log (debug level) in `log`.
    pub fn start_logged(dir: &std::path::Path, global: &[&str], log: &std::path::Path) -> Server {
        let mut cmd = bin(dir);
        cmd.env("RUST_LOG", "info,big_market=debug");
        Server::spawn(cmd, global, &[], std::fs::File::create(log).unwrap().into())
    }

    fn spawn(
        mut cmd: std::process::Command,
        global: &[&str],
        serve_args: &[&str],
        stderr: Stdio,
    ) -> Server {
        let mut child = cmd
            .args(global)
            .args(["serve", "--http", "127.0.0.1:0"])
            .args(serve_args)
            .stdout(Stdio::piped())
            .stderr(stderr)
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
        let token = serve_args
            .iter()
            .position(|a| *a == "--http-token")
            .map(|i| serve_args[i + 1].to_string());
        Server {
            child,
            addr,
            agent: client::agent(4),
            token,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A call with the server's token, if it has one.
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        self.call_as(self.token.as_deref(), method, path, body)
    }

    pub fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, Value) {
        let url = self.url(path);
        let auth = token.map(|t| format!("Bearer {t}"));
        let r = match method {
            "GET" => {
                let mut req = self.agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.call()
            }
            "POST" => {
                let mut req = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json");
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.send(body)
            }
            "DELETE" => self.agent.delete(&url).call(),
            m => panic!("no method {m} here"),
        };
        let mut r = r.unwrap();
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// SIGTERM; returns how long the process took to exit, and asserts it exited 0.
    pub fn stop(mut self) -> Duration {
        let t0 = Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "serve exits 0 on SIGTERM"
        );
        t0.elapsed()
    }
}

impl Drop for Server {
    /// A test that fails before `stop` leaves no `serve` running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn award(user: &str, order: &str) -> Value {
    json!({"userId": user, "activityId": 100301, "strategyId": 100006, "orderId": order, "awardId": 101, "awardTitle": "OpenAI 增加使用次数", "awardTime": 1712377010878i64})
}

/// A response read off a raw socket.
#[derive(Debug)]
struct Raw {
    status: u16,
    body: String,
}

/// Read one response (head and `content-length` body) from `s`; `None` when the server closed
/// the connection without one.
fn read_response(s: &mut TcpStream) -> Option<Raw> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = resp.parse(&buf) {
            let status = resp.code.unwrap();
            let len = content_length(resp.headers);
            while buf.len() < head_len + len {
                let n = s.read(&mut chunk).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[head_len..head_len + len]).to_string();
            // Leave what follows (a pipelined response) unread: these tests send one at a time.
            return Some(Raw { status, body });
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Send `raw` on a new connection and read the response.
fn send_raw(addr: SocketAddr, raw: &[u8]) -> Option<Raw> {
    let mut s = connect(addr);
    s.write_all(raw).unwrap();
    read_response(&mut s)
}

fn post_head(extra: &str, len: usize) -> String {
    format!("POST /api/v1/awards HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}Content-Length: {len}\r\n\r\n")
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
    assert_eq!(body["messageId"], "b0100000001");
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
    let mut bad_time = award("xiaofuge", "100000000006");
    bad_time["awardTime"] = json!("last tuesday");
    let bad: Vec<(String, u16, Option<&str>)> = vec![
        (wrong_type.to_string(), 400, Some("awardId")),
        (missing.to_string(), 400, Some("awardTitle")),
        (bad_time.to_string(), 400, Some("awardTime")),
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
    assert_eq!(totals(&s).awards, 1, "bad input wrote nothing");

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
    assert!(
        wait_until(Duration::from_secs(10), || server
            .call("GET", "/api/v1/awards?userId=xiaofuge", "")
            .1["awards"][0]["awardState"]
            == "completed"),
        "delivered"
    );
    assert_eq!(server.call("GET", "/api/v1/awards", "").0, 400);

    let (status, metrics) = server.call("GET", "/metrics", "");
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap().to_string();
    for line in [
        "big_market_awards_saved_total 2",
        "big_market_duplicates_total 1",
        "big_market_save_latency_seconds_count 2",
        "big_market_broker_connected 1",
        "# EOF",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    // The shard gauges count what was just written: counts this quick are taken again for
    // each scrape (a long count would be served as kept, with its age).
    let awards_counted = |text: &str| -> i64 {
        text.lines()
            .filter(|l| l.starts_with("big_market_awards{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
            .sum()
    };
    assert_eq!(awards_counted(&metrics), 2, "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("big_market_shard_counts_age_seconds ")),
        "{metrics}"
    );
    let (status, _) = server.call(
        "POST",
        "/api/v1/awards",
        &award("xiaofuge", "100000000007").to_string(),
    );
    assert_eq!(status, 201);
    let (_, metrics) = server.call("GET", "/metrics", "");
    assert_eq!(awards_counted(metrics.as_str().unwrap()), 3, "{metrics}");
    assert_eq!(server.call("GET", "/healthz", "").0, 200);
    let (status, ready) = server.call("GET", "/readyz", "");
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["transport"], "in-process");
    let data_dir = dir.path().to_string_lossy().to_string();
    assert!(!ready.to_string().contains(&data_dir), "{ready}");
    assert_eq!(server.call("GET", "/nope", "").0, 404);
    assert_eq!(server.call("DELETE", "/api/v1/awards", "").0, 405);
    assert!(
        wait_until(Duration::from_secs(10), || totals(&s) == Totals::done(3)),
        "{:?}",
        totals(&s)
    );
    server.stop();
    assert_eq!(totals(&s), Totals::done(3));
}

#[test]
fn award_time_as_epoch_ms_or_rfc3339_is_stored_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let forms = [
        json!(1712377010878i64),
        json!("2024-04-06T04:16:50.878Z"),
        json!("2024-04-06T12:16:50.878+08:00"),
        json!("2024-04-06T04:16:50.878"),
    ];
    for (i, t) in forms.iter().enumerate() {
        let mut a = award("xiaofuge", &format!("20000000000{i}"));
        a["awardTime"] = t.clone();
        let (status, body) = server.call("POST", "/api/v1/awards", &a.to_string());
        assert_eq!(status, 201, "{t} -> {body}");
    }
    let (_, body) = server.call("GET", "/api/v1/awards?userId=xiaofuge", "");
    let times: Vec<&Value> = body["awards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["awardTime"])
        .collect();
    assert_eq!(times.len(), forms.len(), "{body}");
    assert!(
        times.iter().all(|t| **t == json!(1712377010878i64)),
        "{body}"
    );
    server.stop();
}

#[test]
fn smuggled_and_malformed_requests_get_4xx_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let server = Server::start(dir.path(), &[]);
    let body = award("xiaofuge", "300000000001").to_string();
    let n = body.len();
    let crlf_to_lf = |r: String| r.replace("\r\n", "\n");
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "duplicate Content-Length",
            format!(
                "{}{body}",
                post_head(&format!("Content-Length: {n}\r\n"), n)
            )
            .into_bytes(),
        ),
        (
            "conflicting Content-Length",
            format!(
                "{}{body}",
                post_head(&format!("Content-Length: {}\r\n", n + 1), n)
            )
            .into_bytes(),
        ),
        (
            "Content-Length with Transfer-Encoding",
            format!(
                "{}{:x}\r\n{body}\r\n0\r\n\r\n",
                post_head("Transfer-Encoding: chunked\r\n", n),
                n
            )
            .into_bytes(),
        ),
        (
            "signed Content-Length",
            format!(
                "{}{body}",
                post_head("", n).replace(&format!(": {n}\r"), &format!(": +{n}\r"))
            )
            .into_bytes(),
        ),
        (
            "bare LF line ends",
            format!("{}{body}", crlf_to_lf(post_head("", n))).into_bytes(),
        ),
        (
            "a bare LF hiding a header in the request line",
            format!("POST /api/v1/awards HTTP/1.1\nContent-Length: {n}\r\nHost: t\r\n\r\n{body}")
                .into_bytes(),
        ),
        (
            "folded header",
            format!("{}{body}", post_head("X-A: a\r\n b\r\n", n)).into_bytes(),
        ),
        (
            "HTTP/1.9",
            format!("{}{body}", post_head("", n).replace("HTTP/1.1", "HTTP/1.9")).into_bytes(),
        ),
        (
            "no Host",
            format!("{}{body}", post_head("", n).replace("Host: t\r\n", "")).into_bytes(),
        ),
        (
            "oversized head",
            format!(
                "{}{body}",
                post_head(&format!("X-Pad: {}\r\n", "a".repeat(20 * 1024)), n)
            )
            .into_bytes(),
        ),
        (
            "too many headers",
            format!("{}{body}", post_head(&many_headers, n)).into_bytes(),
        ),
        ("invalid UTF-8 in the path", {
            let mut r = b"POST /api/v1/awards\xff HTTP/1.1\r\nHost: t\r\n".to_vec();
            r.extend_from_slice(format!("Content-Length: {n}\r\n\r\n{body}").as_bytes());
            r
        }),
        ("invalid UTF-8 in the body", {
            let mut b = body.clone().into_bytes();
            let at = body.find("xiaofuge").unwrap() + 4;
            b.insert(at, 0xff);
            let mut r = post_head("", b.len()).into_bytes();
            r.extend_from_slice(&b);
            r
        }),
    ];
    for (what, raw) in cases {
        let r = send_raw(server.addr, &raw);
        let status = r.as_ref().map(|r| r.status);
        assert!(
            status.is_some_and(|s| (400..500).contains(&s)),
            "{what}: got {r:?}"
        );
    }
    assert_eq!(totals(&s).awards, 0, "nothing was written");
    // The same body, framed plainly, is taken.
    let ok = send_raw(
        server.addr,
        format!("{}{body}", post_head("", n)).as_bytes(),
    )
    .unwrap();
    assert_eq!(ok.status, 201, "{}", ok.body);
    server.stop();
    assert_eq!(totals(&s).awards, 1);
}

#[test]
fn one_keep_alive_connection_carries_100_requests_and_100_continue_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let server = Server::start(dir.path(), &[]);
    let mut conn = connect(server.addr);
    for i in 0..100 {
        let body = award("keepalive", &format!("4000000{i:05}")).to_string();
        conn.write_all(format!("{}{body}", post_head("", body.len())).as_bytes())
            .unwrap();
        let r = read_response(&mut conn)
            .unwrap_or_else(|| panic!("request {i}: the connection was closed"));
        assert_eq!(r.status, 201, "request {i}: {}", r.body);
    }
    assert_eq!(totals(&s).awards, 100);

    // Expect: 100-continue: the server says go before the client sends the body.
    let body = award("keepalive", "500000000001").to_string();
    conn.write_all(post_head("Expect: 100-continue\r\n", body.len()).as_bytes())
        .unwrap();
    let go = read_response(&mut conn).unwrap();
    assert_eq!(go.status, 100);
    conn.write_all(body.as_bytes()).unwrap();
    let r = read_response(&mut conn).unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    server.stop();
    assert_eq!(totals(&s).awards, 101);
}

#[test]
fn the_token_guards_the_api_and_an_exposed_address_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let server = Server::start_with(dir.path(), &[], &["--http-token", TOKEN]);
    let body = award("xiaofuge", "600000000001").to_string();
    for token in [
        None,
        Some("wrong-token-0123456789"),
        Some("test-token-012345678"),
    ] {
        let (status, b) = server.call_as(token, "POST", "/api/v1/awards", &body);
        assert_eq!(status, 401, "{token:?}: {b}");
        let (status, _) = server.call_as(token, "GET", "/api/v1/awards?userId=xiaofuge", "");
        assert_eq!(status, 401, "{token:?}");
    }
    assert_eq!(totals(&s).awards, 0, "refused calls wrote nothing");
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(server.call_as(None, "GET", open, "").0, 200, "{open}");
    }
    let (status, b) = server.call("POST", "/api/v1/awards", &body);
    assert_eq!(status, 201, "{b}");
    assert_eq!(
        server.call("GET", "/api/v1/awards?userId=xiaofuge", "").0,
        200
    );
    // A refused request's body is read and dropped: the connection carries the next request.
    let mut conn = connect(server.addr);
    let second = award("xiaofuge", "600000000002").to_string();
    conn.write_all(format!("{}{second}", post_head("", second.len())).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut conn).unwrap().status, 401);
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    conn.write_all(format!("{}{second}", post_head(&auth, second.len())).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut conn).unwrap().status, 201);
    server.stop();
    assert_eq!(totals(&s).awards, 2);

    // Every interface, no token: refused at start, nothing opened.
    let other = tempfile::tempdir().unwrap();
    let out = bin(other.path())
        .args(["serve", "--http", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--http-token") && err.contains("--http-insecure"),
        "{err}"
    );
    assert!(!other.path().join("data").exists(), "no shard was created");
    // Said to be intended: it serves.
    let server = Server::start_with(other.path(), &[], &["--http-insecure"]);
    assert_eq!(server.call("GET", "/healthz", "").0, 200);
    server.stop();
}

/// Sends `at_once`, then `slowly` one byte every `every`, until the server closes the
/// connection; returns the response it got, if any, and how long the connection lasted.
fn trickle(
    addr: SocketAddr,
    at_once: Vec<u8>,
    slowly: Vec<u8>,
    every: Duration,
) -> std::thread::JoinHandle<(Option<Raw>, Duration)> {
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut s = connect(addr);
        let mut reader = s.try_clone().unwrap();
        let reply = std::thread::spawn(move || read_response(&mut reader));
        s.write_all(&at_once).unwrap();
        for b in &slowly {
            if s.write_all(&[*b]).is_err() || reply.is_finished() {
                break;
            }
            std::thread::sleep(every); // the slow client's pace, not a wait for a condition
        }
        (reply.join().unwrap(), t0.elapsed())
    })
}

#[test]
fn slow_and_idle_clients_do_not_lock_out_health_checks_or_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let limit = 8;
    let server = Server::start_with(
        dir.path(),
        &[],
        &["--http-max-connections", &limit.to_string()],
    );
    let every = Duration::from_millis(400);
    let body = award("slowpoke", "700000000001").to_string();
    // Twice the limit trickling heads, a few trickling bodies, a few idle on keep-alive.
    let heads: Vec<_> = (0..2 * limit)
        .map(|_| {
            trickle(
                server.addr,
                vec![],
                post_head("", body.len()).into_bytes(),
                every,
            )
        })
        .collect();
    let bodies: Vec<_> = (0..3)
        .map(|_| {
            trickle(
                server.addr,
                post_head("", body.len()).into_bytes(),
                body.clone().into_bytes(),
                every,
            )
        })
        .collect();
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = connect(server.addr);
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            assert_eq!(read_response(&mut c).unwrap().status, 200);
            c
        })
        .collect();
    // Health answers within a second throughout, on a new connection each time.
    let until = Instant::now() + Duration::from_secs(7);
    let mut probes = 0;
    while Instant::now() < until {
        let t0 = Instant::now();
        let fresh = client::with_timeout(1, Duration::from_secs(1));
        let r = client::get(&fresh, &format!("http://{}/healthz", server.addr));
        assert!(
            matches!(r, Ok((200, _))) && t0.elapsed() < Duration::from_secs(1),
            "probe {probes}: {r:?} after {:?}",
            t0.elapsed()
        );
        probes += 1;
        std::thread::sleep(Duration::from_millis(100)); // probing pace
    }
    // Heads that never finish are cut off (5 s deadline, or evicted sooner by newer connections).
    for h in heads {
        let (reply, took) = h.join().unwrap();
        assert!(reply.as_ref().is_none_or(|r| r.status >= 400), "{reply:?}");
        assert!(
            took < Duration::from_secs(8),
            "a slow head held on for {took:?}"
        );
    }
    // SIGTERM returns promptly even with bodies still trickling and idle connections open.
    let took = server.stop();
    assert!(took < Duration::from_secs(6), "serve took {took:?} to stop");
    for b in bodies {
        let (reply, _) = b.join().unwrap();
        assert!(reply.as_ref().is_none_or(|r| r.status >= 400), "{reply:?}");
    }
    drop(idle);
    assert_eq!(
        totals(&s).awards,
        0,
        "no slow body got through half-written"
    );
}

#[test]
fn when_every_connection_is_busy_a_new_one_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &[], &["--http-max-connections", "2"]);
    let body = award("slowpoke", "800000000001").to_string();
    // Two clients whose heads are in and whose bodies trickle: both places have a request in
    // hand (the 100 Continue says the handler is reading the body).
    let mut busy: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = connect(server.addr);
            c.write_all(post_head("Expect: 100-continue\r\n", body.len()).as_bytes())
                .unwrap();
            assert_eq!(read_response(&mut c).unwrap().status, 100);
            c.write_all(&body.as_bytes()[..1]).unwrap();
            c
        })
        .collect();
    let fresh = client::agent(1);
    let url = format!("http://{}/healthz", server.addr);
    let mut last = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let r = client::get(&fresh, &url);
            let refused = matches!(r, Ok((503, _)));
            last = Some(r);
            refused
        }),
        "a third connection is refused with a 503 it can read: {last:?}"
    );
    // The busy ones finish their bodies and are answered.
    for c in &mut busy {
        c.write_all(&body.as_bytes()[1..]).unwrap();
    }
    let statuses: Vec<u16> = busy
        .iter_mut()
        .map(|c| read_response(c).unwrap().status)
        .collect();
    statuses
        .iter()
        .for_each(|s| assert!([201, 409].contains(s), "{statuses:?}"));
    drop(busy);
    assert!(wait_until(Duration::from_secs(5), || matches!(
        client::get(&fresh, &url),
        Ok((200, _))
    )));
    server.stop();
}

/// Every response on `s` until the server closes it: (status, body) each.
fn read_all_responses(s: &mut TcpStream) -> Vec<(u16, String)> {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = resp.parse(&buf[at..]) else {
            break;
        };
        let len = content_length(resp.headers);
        let body = &buf[at + head_len..(at + head_len + len).min(buf.len())];
        out.push((
            resp.code.unwrap(),
            String::from_utf8_lossy(body).to_string(),
        ));
        at += head_len + len;
    }
    out
}

#[test]
fn a_pipelined_request_with_a_bare_lf_gets_400_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let server = Server::start(dir.path(), &[]);
    let first = award("pipe1", "310000000001").to_string();
    let second = award("pipe2", "310000000002").to_string();
    let bare_lf = post_head("X-A: a\n", second.len()).replace("\r\nX-A: a\n", "\nX-A: a\n");
    for (what, raw) in [
        (
            "after a POST, in the same write",
            format!(
                "{}{first}{}{second}",
                post_head("Connection: keep-alive\r\n", first.len()),
                bare_lf
            ),
        ),
        (
            "after a GET, in the same write",
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n{bare_lf}{second}"),
        ),
    ] {
        let mut c = connect(server.addr);
        c.write_all(raw.as_bytes()).unwrap();
        let statuses: Vec<u16> = read_all_responses(&mut c).iter().map(|r| r.0).collect();
        assert_eq!(statuses.len(), 2, "{what}: {statuses:?}");
        assert!(
            matches!(statuses[0], 200 | 201) && statuses[1] == 400,
            "{what}: {statuses:?}"
        );
    }
    assert_eq!(totals(&s).awards, 1, "only the first award was written");
    server.stop();
}

/// A response head's Content-Length, 0 if it has none.
fn content_length(headers: &[httparse::Header]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
        .unwrap_or(0)
}
