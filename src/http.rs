//! The HTTP interface of `serve`: a small synchronous HTTP/1.1 server on `std::net`, shaped to
//! our thread model. One accept thread hands connections to a fixed pool of handler threads
//! through a bounded queue; a connection past `max_connections` gets `503` at once. Every
//! socket has read and write timeouts and bodies are capped, so a slow or large client holds one
//! handler for at most the timeout and never reaches a shard writer before its body is read.
//! Each response closes its connection.
//!
//! Routes: `POST /api/v1/awards`, `GET /api/v1/awards?userId=…`, `GET /healthz`,
//! `GET /readyz`, `GET /metrics` (Prometheus text format).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::bounded;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::metrics::{Metrics, LATENCY_BUCKETS_MS};
use crate::model::{AwardRecord, NewAward, TaskState, UserId};
use crate::router::{db_name, route};
use crate::service::Service;
use crate::store::ShardStatus;
use crate::util::now_ms;

/// Limits of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body accepted (bytes).
    pub max_body: usize,
    /// Largest request head (request line and headers, bytes).
    pub max_head: usize,
    /// Connections being handled or waiting for a handler, at most.
    pub max_connections: usize,
    /// Handler threads.
    pub workers: usize,
    /// Read and write timeout of every connection.
    pub io_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_body: 64 * 1024,
            max_head: 16 * 1024,
            max_connections: 256,
            workers: 16,
            io_timeout: Duration::from_secs(5),
        }
    }
}

/// A response before it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    fn json(status: u16, v: Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: v.to_string(),
        }
    }
    fn error(status: u16, msg: impl Into<String>) -> Response {
        Response::json(status, json!({ "error": msg.into() }))
    }
    fn field(status: u16, field: &str, msg: impl Into<String>) -> Response {
        Response::json(status, json!({ "error": msg.into(), "field": field }))
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// Body.
    pub body: Vec<u8>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_response(stream: &mut TcpStream, r: &Response) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(r.body.as_bytes()))
        .and_then(|_| stream.flush());
}

/// Close a connection so that the client reads the response even when it was still sending
/// (a refused oversized body): shut down our side, then discard what it still sends, bounded in
/// bytes and time.
fn finish(mut stream: TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 8192];
    let mut left: usize = 1 << 20;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Read one request; an `Err` is the response to send instead.
pub fn read_request(
    stream: &mut impl Read,
    limits: &HttpLimits,
) -> std::result::Result<Request, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if i > limits.max_head {
                return Err(Response::error(
                    431,
                    format!("request head over {} bytes", limits.max_head),
                ));
            }
            break i;
        }
        if buf.len() > limits.max_head {
            return Err(Response::error(
                431,
                format!("request head over {} bytes", limits.max_head),
            ));
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(Response::error(
                    400,
                    "connection closed before the request was complete",
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(Response::error(400, format!("reading the request: {e}"))),
        }
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| Response::error(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (method, target) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => (m.to_string(), t.to_string()),
        _ => return Err(Response::error(400, "malformed request line")),
    };
    let mut length = 0usize;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| Response::error(400, "malformed header"))?;
        let name = name.trim().to_ascii_lowercase();
        if name == "content-length" {
            length = value
                .trim()
                .parse()
                .map_err(|_| Response::error(400, "Content-Length is not a number"))?;
        } else if name == "transfer-encoding" {
            return Err(Response::error(
                411,
                "chunked bodies are not accepted: send Content-Length",
            ));
        }
    }
    if length > limits.max_body {
        return Err(Response::error(
            413,
            format!(
                "body of {length} bytes is over the limit of {}",
                limits.max_body
            ),
        ));
    }
    let mut body = buf[head_end + 4..].to_vec();
    body.truncate(length);
    while body.len() < length {
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(Response::error(
                    400,
                    "connection closed before the body was complete",
                ))
            }
            Ok(n) => body.extend_from_slice(&chunk[..n.min(length - body.len())]),
            Err(e) => return Err(Response::error(400, format!("reading the body: {e}"))),
        }
    }
    let (path, query) = target
        .split_once('?')
        .map(|(p, q)| (p.to_string(), q.to_string()))
        .unwrap_or((target, String::new()));
    Ok(Request {
        method,
        path,
        query,
        body,
    })
}

/// Decode `%XX` escapes and `+` in a query value.
pub fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or("truncated % escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad % escape %{hex}"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after decoding".to_string())
}

fn query_param(query: &str, key: &str) -> Option<std::result::Result<String, String>> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

/// The original's field names for the model's.
fn wire_field(field: &str) -> &str {
    match field {
        "user_id" => "userId",
        "order_id" => "orderId",
        "activity_id" => "activityId",
        "strategy_id" => "strategyId",
        "award_id" => "awardId",
        "award_title" => "awardTitle",
        "award_time" => "awardTime",
        other => other,
    }
}

/// Parse and validate an award body with the original's field names.
pub fn parse_award(body: &[u8], now_ms: i64) -> std::result::Result<AwardRecord, Response> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("body is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Response::error(400, "body must be a JSON object"))?;
    let text = |f: &str| match obj.get(f) {
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(Response::field(400, f, format!("{f} must be a string"))),
        None => Err(Response::field(400, f, format!("{f} is required"))),
    };
    let int = |f: &str| match obj.get(f) {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| Response::field(400, f, format!("{f} must be an integer"))),
        Some(_) => Err(Response::field(400, f, format!("{f} must be an integer"))),
        None => Err(Response::field(400, f, format!("{f} is required"))),
    };
    let award_time_ms = match obj.get("awardTime") {
        None | Some(Value::Null) => now_ms,
        Some(_) => int("awardTime")?,
    };
    AwardRecord::new(NewAward {
        user_id: text("userId")?,
        activity_id: int("activityId")?,
        strategy_id: int("strategyId")?,
        order_id: text("orderId")?,
        award_id: int("awardId")?,
        award_title: text("awardTitle")?,
        award_time_ms,
    })
    .map_err(|e| match e {
        Error::InvalidInput { field, reason } => {
            let f = wire_field(field);
            Response::field(400, f, format!("invalid {f}: {reason}"))
        }
        other => Response::error(400, other.to_string()),
    })
}

/// Prometheus text for the counters, per-shard state and the broker.
pub fn render_metrics(
    m: &Metrics,
    statuses: &[ShardStatus],
    broker_connected: bool,
    now_ms: i64,
) -> String {
    let mut out = String::new();
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 11] = [
        ("awards_saved_total", "Awards committed.", &m.awards_saved),
        (
            "duplicates_total",
            "Awards refused as duplicate order ids.",
            &m.duplicates,
        ),
        (
            "publish_confirmed_total",
            "Publishes confirmed.",
            &m.publish_confirmed,
        ),
        (
            "publish_failed_total",
            "Publishes that failed.",
            &m.publish_failed,
        ),
        ("tasks_dead_total", "Tasks parked as dead.", &m.tasks_dead),
        ("scans_total", "Scanner passes.", &m.scans),
        (
            "relayed_total",
            "Tasks the scanner claimed and relayed.",
            &m.relayed,
        ),
        (
            "relay_ran_on_caller_total",
            "Relay jobs run on the scanner's thread (pool full).",
            &m.ran_on_caller,
        ),
        ("delivered_total", "Awards delivered.", &m.delivered),
        (
            "redelivered_total",
            "Messages that arrived again and changed nothing.",
            &m.redelivered,
        ),
        (
            "poison_total",
            "Messages rejected as unprocessable.",
            &m.poison,
        ),
    ];
    for (name, help, counter) in counters {
        out.push_str(&format!(
            "# HELP big_market_{name} {help}\n# TYPE big_market_{name} counter\nbig_market_{name} {}\n",
            Metrics::get(counter)
        ));
    }
    out.push_str(
        "# HELP big_market_tasks Tasks per shard and state.\n# TYPE big_market_tasks gauge\n",
    );
    for s in statuses {
        for state in TaskState::ALL {
            out.push_str(&format!(
                "big_market_tasks{{shard=\"{}\",state=\"{}\"}} {}\n",
                db_name(s.db),
                state.as_str(),
                s.tasks_in(state)
            ));
        }
    }
    out.push_str("# HELP big_market_awards Award records per shard and state.\n# TYPE big_market_awards gauge\n");
    for s in statuses {
        for state in ["create", "completed"] {
            out.push_str(&format!(
                "big_market_awards{{shard=\"{}\",state=\"{state}\"}} {}\n",
                db_name(s.db),
                s.awards_in(state)
            ));
        }
    }
    out.push_str("# HELP big_market_oldest_pending_task_age_seconds Age of the oldest task not yet completed.\n# TYPE big_market_oldest_pending_task_age_seconds gauge\n");
    for s in statuses {
        let age = s
            .oldest_pending_ms
            .map(|t| (now_ms - t) as f64 / 1000.0)
            .unwrap_or(0.0);
        out.push_str(&format!(
            "big_market_oldest_pending_task_age_seconds{{shard=\"{}\"}} {age}\n",
            db_name(s.db)
        ));
    }
    out.push_str(&format!(
        "# HELP big_market_broker_connected Whether publishing can succeed.\n# TYPE big_market_broker_connected gauge\nbig_market_broker_connected {}\n",
        u8::from(broker_connected)
    ));
    let (cumulative, sum) = m.save_latency.snapshot();
    out.push_str("# HELP big_market_save_latency_seconds save_award latency.\n# TYPE big_market_save_latency_seconds histogram\n");
    for (bound, c) in LATENCY_BUCKETS_MS.iter().zip(&cumulative) {
        out.push_str(&format!(
            "big_market_save_latency_seconds_bucket{{le=\"{}\"}} {c}\n",
            bound / 1000.0
        ));
    }
    let total = cumulative.last().copied().unwrap_or(0);
    out.push_str(&format!(
        "big_market_save_latency_seconds_bucket{{le=\"+Inf\"}} {total}\nbig_market_save_latency_seconds_sum {sum}\nbig_market_save_latency_seconds_count {total}\n"
    ));
    out
}

/// Route one request.
pub fn handle(service: &Service, req: &Request, draining: bool) -> Response {
    let known = ["/api/v1/awards", "/healthz", "/readyz", "/metrics"];
    if req.path == "/healthz" {
        return Response::json(200, json!({ "status": "ok" }));
    }
    if draining && known.contains(&req.path.as_str()) {
        return Response::error(503, "shutting down: send the request to a running instance");
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/api/v1/awards") => create(service, req),
        ("GET", "/api/v1/awards") => list(service, req),
        ("GET", "/readyz") => ready(service),
        ("GET", "/metrics") => match service.status() {
            Ok(statuses) => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: render_metrics(
                    service.metrics(),
                    &statuses,
                    service.transport().is_connected(),
                    now_ms(),
                ),
            },
            Err(e) => Response::error(503, e.to_string()),
        },
        (_, p) if known.contains(&p) => {
            Response::error(405, format!("method {} not allowed on {p}", req.method))
        }
        _ => Response::error(404, format!("no route {}", req.path)),
    }
}

fn create(service: &Service, req: &Request) -> Response {
    let record = match parse_award(&req.body, now_ms()) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let r = route(record.user_id.as_str(), service.settings().layout);
    match service.save_award(record) {
        Ok(saved) => Response::json(
            201,
            json!({
                "messageId": saved.message_id.as_str(),
                "db": r.db_name(),
                "table": r.table_name(),
                "seq": saved.seq,
            }),
        ),
        Err(Error::DuplicateOrder { order_id }) => Response::json(
            409,
            json!({ "error": format!("duplicate order id {order_id}: the award already exists"), "orderId": order_id }),
        ),
        Err(Error::ShuttingDown) => {
            Response::error(503, "shutting down: send the request to a running instance")
        }
        Err(e) => {
            log::error!("http award failed: {e}");
            Response::error(500, e.to_string())
        }
    }
}

fn list(service: &Service, req: &Request) -> Response {
    let user = match query_param(&req.query, "userId") {
        None => return Response::field(400, "userId", "userId is required"),
        Some(Err(e)) => return Response::field(400, "userId", e),
        Some(Ok(u)) => u,
    };
    let user = match UserId::parse(&user) {
        Ok(u) => u,
        Err(e) => return Response::field(400, "userId", e.to_string()),
    };
    match service.store().awards_of(&user, 1000) {
        Ok(rows) => Response::json(200, json!({ "userId": user.as_str(), "awards": rows })),
        Err(e) => Response::error(500, e.to_string()),
    }
}

fn ready(service: &Service) -> Response {
    let shards = service.status().map(|_| ()).map_err(|e| e.to_string());
    let broker = service.transport().is_connected();
    let ok = shards.is_ok() && broker;
    Response::json(
        if ok { 200 } else { 503 },
        json!({
            "ready": ok,
            "shards": shards.err().unwrap_or_else(|| "open".into()),
            "transport": service.transport().describe(),
            "transport_connected": broker,
        }),
    )
}

/// A running HTTP server.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl HttpServer {
    /// Bind `addr` (port 0 picks a free port) and serve `service`.
    pub fn start(addr: &str, service: Arc<Service>, limits: HttpLimits) -> Result<HttpServer> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
        let addr = listener.local_addr().map_err(|e| Error::Io {
            path: "http listener".into(),
            source: e,
        })?;
        let (tx, rx) = bounded::<TcpStream>(limits.max_connections);
        let stop = Arc::new(AtomicBool::new(false));
        let draining = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::with_capacity(limits.workers);
        for i in 0..limits.workers {
            let (rx, service, draining, open) =
                (rx.clone(), service.clone(), draining.clone(), open.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("http-{i}"))
                    .spawn(move || {
                        for mut stream in rx {
                            let response = match read_request(&mut stream, &limits) {
                                Ok(req) => handle(&service, &req, draining.load(Ordering::SeqCst)),
                                Err(resp) => resp,
                            };
                            write_response(&mut stream, &response);
                            finish(stream);
                            open.fetch_sub(1, Ordering::SeqCst);
                        }
                    })
                    .map_err(|e| Error::Io {
                        path: "http worker".into(),
                        source: e,
                    })?,
            );
        }
        let stop_flag = stop.clone();
        let accept = std::thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop_flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut stream) = conn else { continue };
                    let _ = stream.set_read_timeout(Some(limits.io_timeout));
                    let _ = stream.set_write_timeout(Some(limits.io_timeout));
                    if open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
                        open.fetch_sub(1, Ordering::SeqCst);
                        write_response(
                            &mut stream,
                            &Response::error(503, "too many connections: retry shortly"),
                        );
                        continue;
                    }
                    if let Err(e) = tx.try_send(stream) {
                        open.fetch_sub(1, Ordering::SeqCst);
                        write_response(
                            &mut e.into_inner(),
                            &Response::error(503, "too many connections: retry shortly"),
                        );
                    }
                }
            })
            .map_err(|e| Error::Io {
                path: "http accept".into(),
                source: e,
            })?;
        log::info!("http listening addr={addr}");
        Ok(HttpServer {
            addr,
            stop,
            draining,
            accept: Some(accept),
            workers,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer `503` to new API requests from now on (health stays up).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stop accepting, finish the requests in hand, join every thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread blocked in accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A minimal HTTP/1.1 client for tests, the bench and scripts: one request per connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = ok_award();
        v[field] = value;
        v
    }

    fn ok_award() -> Value {
        json!({"userId":"xiaofuge","activityId":100301,"strategyId":100006,"orderId":"123456789012","awardId":101,"awardTitle":"t","awardTime":1712377010878i64})
    }

    #[test]
    fn award_bodies_are_validated_field_by_field() {
        assert_eq!(
            parse_award(&body(ok_award()), 0).unwrap().award_time_ms,
            1712377010878
        );
        let mut no_time = ok_award();
        no_time.as_object_mut().unwrap().remove("awardTime");
        assert_eq!(parse_award(&body(no_time), 42).unwrap().award_time_ms, 42);
        let cases: Vec<(Value, &str)> = vec![
            (json!({"userId":"u"}), "activityId"),
            (with("activityId", json!("100301")), "activityId"),
            (with("userId", json!(7)), "userId"),
            (with("orderId", json!("1234567890123")), "orderId"),
            (with("awardId", json!(1.5)), "awardId"),
        ];
        for (v, field) in cases {
            let r = parse_award(&body(v.clone()), 0).unwrap_err();
            assert_eq!(r.status, 400);
            let got: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(got["field"], field, "{v} -> {}", r.body);
        }
        assert_eq!(parse_award(b"not json", 0).unwrap_err().status, 400);
        assert_eq!(parse_award(b"[1]", 0).unwrap_err().status, 400);
    }

    #[test]
    fn requests_parse_and_limits_hold() {
        let limits = HttpLimits::default();
        let raw = b"POST /api/v1/awards?x=1 HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody";
        let r = read_request(&mut &raw[..], &limits).unwrap();
        assert_eq!(
            (
                r.method.as_str(),
                r.path.as_str(),
                r.query.as_str(),
                r.body.as_slice()
            ),
            ("POST", "/api/v1/awards", "x=1", &b"body"[..])
        );
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            limits.max_body + 1
        );
        assert_eq!(
            read_request(&mut big.as_bytes(), &limits)
                .unwrap_err()
                .status,
            413
        );
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            read_request(&mut &chunked[..], &limits).unwrap_err().status,
            411
        );
        let huge_head = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(limits.max_head + 10)
        );
        assert_eq!(
            read_request(&mut huge_head.as_bytes(), &limits)
                .unwrap_err()
                .status,
            431
        );
        assert_eq!(
            read_request(&mut &b"garbage\r\n\r\n"[..], &limits)
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            percent_decode("%E5%B0%8F%E5%82%85%E5%93%A5").unwrap(),
            "小傅哥"
        );
        assert_eq!(
            query_param("a=1&userId=x%20y", "userId").unwrap().unwrap(),
            "x y"
        );
        assert!(percent_decode("%zz").is_err());
    }

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let m = Metrics::default();
        Metrics::add(&m.awards_saved, 3);
        m.save_latency.observe(Duration::from_millis(3));
        let mut s = ShardStatus {
            db: 1,
            oldest_pending_ms: Some(1000),
            ..Default::default()
        };
        s.tasks.insert("completed".into(), 3);
        let text = render_metrics(&m, &[s], true, 3000);
        assert!(text.contains("big_market_awards_saved_total 3\n"));
        assert!(text.contains("big_market_tasks{shard=\"big_market_01\",state=\"completed\"} 3\n"));
        assert!(text
            .contains("big_market_oldest_pending_task_age_seconds{shard=\"big_market_01\"} 2\n"));
        assert!(text.contains("big_market_save_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("big_market_save_latency_seconds_count 1\n"));
        assert!(text.contains("big_market_broker_connected 1\n"));
    }
}
