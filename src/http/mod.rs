//! The HTTP interface of `serve`: HTTP/1.1 by hyper, on the async executor lapin already runs
//! (async-global-executor and async-io). This module is the server's setup: the listener, the
//! connection limit, the deadlines that hold against slow clients, and shutdown. [`routes`]
//! answers requests; [`wire`] is the award's JSON form.
//!
//! Deadlines per connection: the request head within `head_timeout` of its first byte, the whole
//! body within `body_timeout`, and a keep-alive connection with no request in hand is closed after
//! `idle_timeout`. At `max_connections`, a new connection takes the place of the one that has
//! waited longest without a request in hand (idle, or still sending its head), so slow clients can
//! never lock others out; only when every connection has a request in hand is a new one answered
//! `503` at once and closed.

pub mod client;
pub mod routes;
pub mod wire;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use event_listener::Event;
use futures_lite::future::or;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol_hyper::rt::FuturesIo;

use crate::error::{Error, Result};
use crate::service::Service;
use routes::Ctx;

/// Limits of the HTTP server. Every one of them is a bound on what a client can hold.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body (bytes); a bigger one gets 413.
    pub max_body: usize,
    /// Largest request head, request line and headers (bytes); a bigger one gets 431.
    pub max_head: usize,
    /// Open connections at most; past it a new one replaces the connection idle the longest,
    /// and is answered 503 and closed only when every one has a request in hand.
    pub max_connections: usize,
    /// Handlers touching the shards at once (the blocking pool's permits).
    pub workers: usize,
    /// The request head must arrive within this time of its first byte.
    pub head_timeout: Duration,
    /// The whole body must arrive within this time of the head (408 otherwise).
    pub body_timeout: Duration,
    /// A keep-alive connection without a request in hand is closed after this time.
    pub idle_timeout: Duration,
    /// On stop, requests in hand get this long to finish before their connections are dropped.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_body: 64 * 1024,
            max_head: 16 * 1024,
            max_connections: 256,
            workers: 32,
            head_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// How `serve --http` is set up.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Address to listen on (`127.0.0.1:8091`; port 0 picks a free port).
    pub addr: String,
    /// Bearer token every `/api/` route needs.
    pub token: Option<String>,
    /// Allow a non-loopback address without a token.
    pub insecure: bool,
    /// Limits.
    pub limits: HttpLimits,
}

impl HttpConfig {
    /// Loopback, no token, default limits.
    pub fn local(addr: &str) -> HttpConfig {
        HttpConfig {
            addr: addr.into(),
            token: None,
            insecure: false,
            limits: HttpLimits::default(),
        }
    }
}

impl HttpConfig {
    /// Check the token and the address, and resolve it: what `start` refuses, refused before
    /// anything else is opened.
    pub fn validate(&self) -> Result<Vec<SocketAddr>> {
        if let Some(t) = &self.token {
            check_token(t)?;
        }
        let addrs: Vec<SocketAddr> = self
            .addr
            .to_socket_addrs()
            .map_err(|e| {
                Error::Config(format!(
                    "--http {:?} is not an address like 127.0.0.1:8091: {e}",
                    self.addr
                ))
            })?
            .collect();
        if addrs.is_empty() {
            return Err(Error::Config(format!(
                "--http {:?} resolves to no address",
                self.addr
            )));
        }
        check_bind(&addrs, self.token.is_some(), self.insecure)?;
        Ok(addrs)
    }
}

/// Check a token: 16 to 1024 visible ASCII characters.
pub fn check_token(token: &str) -> Result<()> {
    if !(16..=1024).contains(&token.len()) || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(
            "http-token",
            "the token must be 16 to 1024 visible ASCII characters (no spaces)",
        ));
    }
    Ok(())
}

/// Refuse to expose the API beyond this machine without a token, unless told it is intended.
pub fn check_bind(addrs: &[SocketAddr], has_token: bool, insecure: bool) -> Result<()> {
    if has_token || insecure || addrs.iter().all(|a| a.ip().is_loopback()) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "refusing to serve HTTP on {} without a token: anyone who can reach it could create and read awards; set --http-token (BIG_MARKET_HTTP_TOKEN), bind 127.0.0.1, or pass --http-insecure if this is intended",
        addrs
            .first()
            .map(|a| a.to_string())
            .unwrap_or_default()
    )))
}

/// When a connection last did something, to enforce the head and idle deadlines, and where
/// its bytes have got to.
#[derive(Debug)]
struct Activity {
    state: Mutex<Phase>,
    /// Every byte the connection receives, scanned in order: heads, and the bodies between them.
    wire: Mutex<Wire>,
    /// Wakes the watcher when the connection is evicted.
    evict_wake: Event,
    /// Set when a newer connection took this one's place.
    evicted: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in hand since this instant.
    Idle(Instant),
    /// The first byte of a request head arrived at this instant.
    Head(Instant),
    /// A request is being answered (its body deadline is the handler's).
    Busy,
}

/// Where a connection's bytes have got to. Every request head is scanned, the pipelined ones
/// too: after a head, a `Content-Length` body is stepped over, and the bytes after it are the
/// next head. A body whose end the scan does not follow (chunked, or a length it cannot read,
/// which hyper refuses anyway) ends the scan, and its response closes the connection, so no
/// request after it is read unscanned.
#[derive(Debug, Clone, Copy)]
enum Wire {
    /// In a head (or before one).
    Head(HeadScan),
    /// In a body with this many bytes still to come.
    Body(u64),
    /// Past a body the scan does not follow: the connection closes after this response.
    Unfollowed,
    /// A head was spoiled: hyper refuses it with 400 and closes the connection.
    Spoiled,
}

impl Default for Wire {
    fn default() -> Self {
        Wire::Head(HeadScan::default())
    }
}

impl Wire {
    /// Scan the next bytes the connection received.
    fn feed(&mut self, buf: &mut [u8]) {
        let mut at = 0;
        while at < buf.len() {
            match self {
                Wire::Head(scan) => {
                    at += scan.scan(&mut buf[at..]);
                    if scan.spoiled {
                        *self = Wire::Spoiled;
                    } else if scan.done {
                        *self = match (scan.chunked || scan.length_bad, scan.length) {
                            (true, _) => Wire::Unfollowed,
                            (false, Some(n)) if n > 0 => Wire::Body(n),
                            (false, _) => Wire::default(),
                        };
                    }
                }
                Wire::Body(left) => {
                    let step = (*left).min((buf.len() - at) as u64);
                    at += step as usize;
                    *left -= step;
                    if *left == 0 {
                        *self = Wire::default();
                    }
                }
                Wire::Unfollowed | Wire::Spoiled => return,
            }
        }
    }
}

/// Where a head's bytes have got to: the last four bytes, the start of the current line, how
/// many framing lines (`Content-Length`, `Transfer-Encoding`) were seen, the length the
/// `Content-Length` line gives, and whether the blank line that ends the head has been seen.
#[derive(Debug, Clone, Copy, Default)]
struct HeadScan {
    last4: u32,
    line: [u8; 18],
    line_len: usize,
    framing: u8,
    /// Something other than empty lines (which may precede a request line) arrived.
    started: bool,
    /// In the value of a `Content-Length` line.
    in_length: bool,
    length: Option<u64>,
    length_bad: bool,
    chunked: bool,
    done: bool,
    spoiled: bool,
}

impl HeadScan {
    /// Scan the next bytes of a head up to its blank line; returns how many bytes were the
    /// head's. Spoils (with a NUL, which hyper's parser refuses with 400) what hyper would
    /// take but a proxy in front may read otherwise: a bare LF as a line end (RFC 9112 lets a
    /// server accept it), and more than one framing line (hyper merges identical
    /// `Content-Length`s and lets `Transfer-Encoding` override `Content-Length`). This only
    /// ever refuses a request that would have been accepted; it never changes how one is
    /// framed.
    fn scan(&mut self, buf: &mut [u8]) -> usize {
        const FRAMING: [&[u8]; 2] = [b"content-length:", b"transfer-encoding:"];
        for (i, b) in buf.iter_mut().enumerate() {
            if self.done || self.spoiled {
                return i;
            }
            if !self.started {
                // Empty lines before a request line are skipped, by hyper too.
                if *b == b'\r' || *b == b'\n' {
                    continue;
                }
                self.started = true;
            }
            let prev = (self.last4 & 0xff) as u8;
            if *b == b'\n' && prev != b'\r' {
                *b = 0;
                self.spoiled = true;
                return i + 1;
            }
            if prev == b'\n' {
                self.line_len = 0;
            }
            if *b == b'\r' || *b == b'\n' {
                self.in_length = false;
            } else if self.in_length {
                match (*b, self.length) {
                    (b' ' | b'\t', _) => {}
                    (b'0'..=b'9', Some(n)) => {
                        self.length = n
                            .checked_mul(10)
                            .and_then(|n| n.checked_add(u64::from(*b - b'0')));
                        self.length_bad |= self.length.is_none();
                    }
                    _ => self.length_bad = true,
                }
            }
            if self.line_len < self.line.len() {
                self.line[self.line_len] = b.to_ascii_lowercase();
                self.line_len += 1;
                let line = &self.line[..self.line_len];
                if FRAMING.contains(&line) {
                    self.framing += 1;
                    if self.framing > 1 {
                        *b = 0;
                        self.spoiled = true;
                        return i + 1;
                    }
                    if line == FRAMING[0] {
                        self.in_length = true;
                        self.length = Some(0);
                    } else {
                        self.chunked = true;
                    }
                }
            }
            self.last4 = (self.last4 << 8) | u32::from(*b);
            self.done = self.last4 == u32::from_be_bytes(*b"\r\n\r\n");
            if self.done {
                return i + 1;
            }
        }
        buf.len()
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(Phase::Idle(Instant::now())),
            wire: Mutex::new(Wire::default()),
            evict_wake: Event::new(),
            evicted: AtomicBool::new(false),
        }
    }
    fn set(&self, p: Phase) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
    /// Bytes arrived: they are scanned, and outside a request they start a head.
    fn read_some(&self, buf: &mut [u8]) {
        self.wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .feed(buf);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Phase::Idle(_) = *s {
            *s = Phase::Head(Instant::now());
        }
    }
    /// Whether the scan stopped following this connection's bytes: its response must close it.
    fn unfollowed(&self) -> bool {
        matches!(
            *self.wire.lock().unwrap_or_else(|e| e.into_inner()),
            Wire::Unfollowed
        )
    }
    /// Since when this connection has been without a request in hand, if it is (and not yet
    /// evicted).
    fn waiting_since(&self) -> Option<Instant> {
        if self.evicted.load(Ordering::SeqCst) {
            return None;
        }
        match *self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Idle(t) | Phase::Head(t) => Some(t),
            Phase::Busy => None,
        }
    }
    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        self.evict_wake.notify(usize::MAX);
    }
    fn deadline(&self, l: &HttpLimits) -> Option<Instant> {
        match *self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Idle(t) => Some(t + l.idle_timeout),
            Phase::Head(t) => Some(t + l.head_timeout),
            Phase::Busy => None,
        }
    }
    /// Resolves when the connection has been idle, or in its head, for too long, or was evicted.
    /// It looks at the clock at most every [`WATCH_TICK`] rather than being woken by every
    /// request (a timer per request costs more than the request's parsing), so a deadline is
    /// enforced within one tick of passing; an eviction wakes it at once.
    async fn expired(&self, l: &HttpLimits) {
        loop {
            let evicted = self.evict_wake.listen();
            if self.evicted.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            let wake = match self.deadline(l) {
                Some(d) if d <= now => return,
                Some(d) => d.min(now + WATCH_TICK),
                None => now + WATCH_TICK,
            };
            or(
                async {
                    Timer::at(wake).await;
                },
                evicted,
            )
            .await;
        }
    }
}

/// How often a connection's deadlines are checked.
const WATCH_TICK: Duration = Duration::from_millis(500);

/// Marks a connection busy while a request is answered.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: &Arc<Activity>) -> Busy {
        a.set(Phase::Busy);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set(Phase::Idle(Instant::now()));
    }
}

/// The socket, noting when bytes arrive.
struct Tracked {
    inner: Async<TcpStream>,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.activity.read_some(&mut buf[..n]);
            }
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Open connections, and a wake-up when one closes.
#[derive(Default)]
struct Open {
    conns: Mutex<HashMap<u64, Arc<Activity>>>,
    next_id: AtomicU64,
    closed: Event,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn count(&self) -> usize {
        self.lock().len()
    }
    /// Take a place for a new connection: a free one, or the place of the connection that has
    /// waited longest without a request in hand. `None` when every place has a request in hand.
    fn admit(self: &Arc<Self>, max: usize) -> Option<(Slot, Arc<Activity>)> {
        let mut conns = self.lock();
        let live = conns
            .values()
            .filter(|a| !a.evicted.load(Ordering::SeqCst))
            .count();
        if live >= max {
            let victim = conns
                .values()
                .filter_map(|a| a.waiting_since().map(|t| (t, a)))
                .min_by_key(|(t, _)| *t)
                .map(|(_, a)| a.clone())?;
            victim.evict();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        conns.insert(id, activity.clone());
        Some((Slot(self.clone(), id), activity))
    }
}

/// A connection's place in [`Open`], given back when its task ends, however it ends.
struct Slot(Arc<Open>, u64);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
        self.0.closed.notify(usize::MAX);
    }
}

/// A running HTTP server.
pub struct HttpServer {
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    stop: Option<async_channel::Sender<()>>,
    accept: Option<async_global_executor::Task<()>>,
    open: Arc<Open>,
}

impl HttpServer {
    /// Bind and serve `service`. Refuses a non-loopback address without a token (unless
    /// `insecure`), and a malformed token.
    pub fn start(config: HttpConfig, service: Arc<Service>) -> Result<HttpServer> {
        let addrs = config.validate()?;
        let listener = TcpListener::bind(&addrs[..])
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.addr)))?;
        let addr = listener.local_addr().map_err(|e| Error::Io {
            path: "http listener".into(),
            source: e,
        })?;
        let listener = Async::new(listener).map_err(|e| Error::Io {
            path: "http listener".into(),
            source: e,
        })?;
        let limits = config.limits;
        let ctx = Arc::new(Ctx {
            service,
            token: config.token,
            limits,
            draining: AtomicBool::new(false),
            pool: async_lock::Semaphore::new(limits.workers.max(1)),
        });
        let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
        let open = Arc::new(Open::default());
        let accept =
            async_global_executor::spawn(accept_loop(listener, ctx.clone(), stop_rx, open.clone()));
        log::info!(
            "http listening addr={addr} token={} max_connections={}",
            if ctx.token.is_some() {
                "required"
            } else {
                "none"
            },
            limits.max_connections
        );
        Ok(HttpServer {
            addr,
            ctx,
            stop: Some(stop_tx),
            accept: Some(accept),
            open,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.open.count()
    }

    /// Answer `503` to new requests from now on (`/healthz` stays up).
    pub fn drain(&self) {
        self.ctx.draining.store(true, Ordering::SeqCst);
    }

    /// Stop accepting, let requests in hand finish within `shutdown_grace`, close every
    /// connection and return once none is left.
    pub fn stop(self) {
        self.drain();
        drop(self); // closing the stop channel ends the accept loop; Drop waits for it
    }
}

impl Drop for HttpServer {
    /// Stop accepting and wait until every connection is closed (see [`HttpServer::stop`]).
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(accept) = self.accept.take() {
            async_global_executor::block_on(accept);
        }
    }
}

async fn accept_loop(
    listener: Async<TcpListener>,
    ctx: Arc<Ctx>,
    stop: async_channel::Receiver<()>,
    open: Arc<Open>,
) {
    let limits = ctx.limits;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .max_buf_size(limits.max_head.max(8192) + 8192)
        .max_header_size(limits.max_head)
        .header_read_timeout(None);
    let rejecting = Arc::new(AtomicUsize::new(0));
    loop {
        let next = or(async { Some(listener.accept().await) }, async {
            let _ = stop.recv().await;
            None
        })
        .await;
        let (stream, _peer) = match next {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                log::warn!("http: accept failed: {e}");
                or(
                    async {
                        Timer::after(Duration::from_millis(100)).await;
                    },
                    async {
                        let _ = stop.recv().await;
                    },
                )
                .await;
                continue;
            }
        };
        let _ = stream.get_ref().set_nodelay(true);
        let Some((slot, activity)) = open.admit(limits.max_connections) else {
            if rejecting.fetch_add(1, Ordering::SeqCst) < limits.max_connections {
                let rejecting = rejecting.clone();
                async_global_executor::spawn(async move {
                    reject_busy(stream).await;
                    rejecting.fetch_sub(1, Ordering::SeqCst);
                })
                .detach();
            } else {
                rejecting.fetch_sub(1, Ordering::SeqCst);
            }
            continue;
        };
        let (ctx, stop, builder) = (ctx.clone(), stop.clone(), builder.clone());
        async_global_executor::spawn(async move {
            serve_connection(stream, activity, ctx, stop, builder).await;
            drop(slot);
        })
        .detach();
    }
    // Stopping: every connection saw the closed channel; wait until they are gone.
    let deadline = Instant::now() + limits.shutdown_grace + Duration::from_secs(1);
    while open.count() > 0 && Instant::now() < deadline {
        let l = open.closed.listen();
        if open.count() == 0 {
            break;
        }
        or(
            async {
                Timer::at(deadline).await;
            },
            l,
        )
        .await;
    }
}

/// Past the connection limit: a 503 the client actually receives, then close. The response goes
/// out before the request is read; what the client still sends is read and dropped for a moment,
/// so that closing does not reset the connection under the response.
async fn reject_busy(mut stream: Async<TcpStream>) {
    const BODY: &str = "{\"error\":\"too many connections: retry shortly\"}";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let send = async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.get_ref().shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    or(send, async {
        Timer::after(Duration::from_secs(1)).await;
    })
    .await;
}

async fn serve_connection(
    stream: Async<TcpStream>,
    activity: Arc<Activity>,
    ctx: Arc<Ctx>,
    stop: async_channel::Receiver<()>,
    builder: hyper::server::conn::http1::Builder,
) {
    let limits = ctx.limits;
    let io = FuturesIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let handler_activity = activity.clone();
    let service = hyper::service::service_fn(move |req| {
        let busy = Busy::new(&handler_activity);
        let ctx = ctx.clone();
        let activity = handler_activity.clone();
        async move {
            let mut response = routes::handle(req, ctx).await;
            if activity.unfollowed() {
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            drop(busy);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut conn = pin!(builder.serve_connection(io, service));
    enum End {
        Done,
        Expired,
        Stop,
    }
    let end = or(
        or(
            async {
                if let Err(e) = conn.as_mut().await {
                    log::debug!("http connection ended: {e}");
                }
                End::Done
            },
            async {
                activity.expired(&limits).await;
                End::Expired
            },
        ),
        async {
            let _ = stop.recv().await;
            End::Stop
        },
    )
    .await;
    match end {
        End::Done | End::Expired => {}
        End::Stop => {
            conn.as_mut().graceful_shutdown();
            or(
                async {
                    let _ = conn.as_mut().await;
                },
                async {
                    Timer::after(limits.shutdown_grace).await;
                },
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_may_go_without_a_token() {
        let lo: SocketAddr = "127.0.0.1:8091".parse().unwrap();
        let lo6: SocketAddr = "[::1]:8091".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8091".parse().unwrap();
        assert!(check_bind(&[lo, lo6], false, false).is_ok());
        let e = check_bind(&[any], false, false).unwrap_err().to_string();
        assert!(
            e.contains("--http-token") && e.contains("--http-insecure"),
            "{e}"
        );
        assert!(check_bind(&[any], true, false).is_ok());
        assert!(check_bind(&[any], false, true).is_ok());
        assert!(check_bind(&[lo, any], false, false).is_err());
    }

    #[test]
    fn tokens_are_long_and_visible() {
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789 abcdef").is_err());
        assert!(check_token(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn a_connection_expires_when_idle_or_slow_in_its_head() {
        let l = HttpLimits {
            idle_timeout: Duration::from_secs(30),
            head_timeout: Duration::from_secs(5),
            ..HttpLimits::default()
        };
        let a = Activity::new();
        let idle = a.deadline(&l).unwrap();
        a.read_some(&mut b"GET / HTTP/1.1\r\n".to_vec());
        let head = a.deadline(&l).unwrap();
        assert!(
            head < idle,
            "a head that started must finish sooner than idling"
        );
        a.set(Phase::Busy);
        assert_eq!(
            a.deadline(&l),
            None,
            "no deadline while a request is answered"
        );
        a.read_some(&mut b"body".to_vec());
        assert_eq!(a.deadline(&l), None, "body bytes do not start a head");
    }

    #[test]
    fn a_full_house_evicts_the_longest_waiting_and_refuses_when_all_are_busy() {
        let open = Arc::new(Open::default());
        let (s1, a1) = open.admit(2).unwrap();
        let (_s2, a2) = open.admit(2).unwrap();
        a2.set(Phase::Busy);
        let (_s3, a3) = open.admit(2).unwrap();
        assert!(a1.evicted.load(Ordering::SeqCst), "the idle one made room");
        assert!(!a2.evicted.load(Ordering::SeqCst));
        a3.set(Phase::Busy);
        assert!(
            open.admit(2).is_none(),
            "every live place has a request in hand"
        );
        drop(s1);
        assert_eq!(open.count(), 2);
    }

    fn scanned(chunks: &[&[u8]]) -> Vec<u8> {
        let mut wire = Wire::default();
        let mut out = Vec::new();
        for c in chunks {
            let mut c = c.to_vec();
            wire.feed(&mut c);
            out.extend(c);
        }
        out
    }

    #[test]
    fn a_bare_lf_in_a_head_is_spoiled_and_the_body_left_alone() {
        let ok: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n{\n\"a\": 1\n}";
        assert_eq!(scanned(&[ok]), ok, "LFs in the body are the body's");
        assert_eq!(
            scanned(&[b"POST / HTTP/1.1\r", b"\nHost: a\r\n\r", b"\n\n"]),
            b"POST / HTTP/1.1\r\nHost: a\r\n\r\n\n",
            "CR and LF split across reads"
        );
        assert_eq!(
            scanned(&[b"GET / HTTP/1.1\nHost: a\r\n\r\n"]),
            b"GET / HTTP/1.1\0Host: a\r\n\r\n"
        );
        assert_eq!(
            scanned(&[b"GET / HTTP/1.1\r\nHost: a\n\n"]),
            b"GET / HTTP/1.1\r\nHost: a\0\n"
        );
        assert_eq!(
            scanned(&[
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-LENGTH",
                b": 1\r\n\r\nx"
            ]),
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-LENGTH\0 1\r\n\r\nx",
            "a second Content-Length line"
        );
        assert_eq!(
            scanned(&[
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            ]),
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding\0 chunked\r\n\r\n",
            "Content-Length with Transfer-Encoding"
        );
        let body_with_length: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\n\r\ncontent-length: 5\r\n";
        assert_eq!(
            scanned(&[body_with_length]),
            body_with_length,
            "the body is not scanned"
        );
    }

    #[test]
    fn every_pipelined_head_is_scanned_and_the_bodies_between_them_stepped_over() {
        let two =
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na\nbGET / HTTP/1.1\nHost: a\r\n\r\n";
        assert_eq!(
            scanned(&[two]),
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na\nbGET / HTTP/1.1\0Host: a\r\n\r\n"
                .to_vec(),
            "the second head, after a body with a bare LF in it"
        );
        assert_eq!(
            scanned(&[
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHo",
                b"st: a\r\n\r\n\r\nGET /c HTTP/1.1\r\nHost: a\n\n"
            ]),
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET /c HTTP/1.1\r\nHost: a\0\n".to_vec(),
            "three heads over two reads, an empty line between two of them"
        );
        let mut wire = Wire::default();
        wire.feed(&mut b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n".to_vec());
        assert!(
            matches!(wire, Wire::Unfollowed),
            "a chunked body is not followed: its response closes the connection"
        );
        let mut wire = Wire::default();
        wire.feed(&mut b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec());
        assert!(matches!(wire, Wire::Unfollowed), "an unreadable length");
    }
}
