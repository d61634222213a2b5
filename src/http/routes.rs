//! What each request gets: framing checks a proxy could read differently from us, the bearer
//! token, then the routes. Nothing here blocks an executor thread: an award's commit runs on its
//! shard's writer thread and is awaited; reads of the shards run on a bounded blocking pool. A
//! slow commit never stalls accepting or parsing.
//!
//! Routes: `POST /api/v1/awards`, `GET /api/v1/awards?userId=…` (both behind the token when one
//! is set), `GET /healthz`, `GET /readyz`, `GET /metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::wire::{parse_award, Refusal};
use super::HttpLimits;
use crate::error::Error;
use crate::model::UserId;
use crate::router::route;
use crate::service::Service;
use crate::util::now_ms;

/// What every request handler shares.
pub struct Ctx {
    /// The pipeline.
    pub service: Arc<Service>,
    /// The bearer token `/api/` routes need, if any.
    pub token: Option<String>,
    /// Limits.
    pub limits: HttpLimits,
    /// Set once the server is stopping: API routes answer 503.
    pub draining: AtomicBool,
    /// Permits for the blocking pool: at most `limits.workers` handlers touch the shards at once.
    pub pool: async_lock::Semaphore,
}

/// The body type of every response.
pub type Body = Full<Bytes>;

const API_ROUTES: [&str; 1] = ["/api/v1/awards"];
const ROUTES: [&str; 4] = ["/api/v1/awards", "/healthz", "/readyz", "/metrics"];

fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn refused(r: Refusal) -> Response<Body> {
    json_response(r.status, &r.body)
}

/// A refusal after which the connection is closed: the request's framing is in doubt, or its
/// body was not read.
fn refused_and_close(r: Refusal) -> Response<Body> {
    let mut resp = refused(r);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Framing a proxy in front could read differently from us: refused before anything else.
/// hyper already refuses conflicting lengths, folded headers, versions other than 1.0 and 1.1,
/// and oversized heads; this adds what RFC 9112 lets a server refuse.
pub fn framing_error(version: Version, headers: &HeaderMap) -> Option<Refusal> {
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 1 {
        return Some(Refusal::new(400, "more than one Content-Length header"));
    }
    if lengths == 1 && headers.contains_key(header::TRANSFER_ENCODING) {
        return Some(Refusal::new(
            400,
            "both Content-Length and Transfer-Encoding: send one of them",
        ));
    }
    if version == Version::HTTP_11 && headers.get_all(header::HOST).iter().count() != 1 {
        return Some(Refusal::new(
            400,
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    None
}

/// Whether `headers` carry `Authorization: Bearer <token>`, compared in constant time.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    bool::from(given.ct_eq(token.as_bytes()))
}

/// What a request asks for, once its head is checked.
enum Route {
    Create,
    List(String),
    Ready,
    Metrics,
}

/// Decide from the head alone: a route, or the refusal to send.
fn decide(parts: &hyper::http::request::Parts, ctx: &Ctx) -> Result<Route, Box<Response<Body>>> {
    let path = parts.uri.path();
    if !ROUTES.contains(&path) {
        return Err(Box::new(refused(Refusal::new(
            404,
            format!("no route {path}"),
        ))));
    }
    if ctx.draining.load(Ordering::SeqCst) {
        return Err(Box::new(refused_and_close(Refusal::new(
            503,
            "shutting down: send the request to a running instance",
        ))));
    }
    if API_ROUTES.contains(&path) {
        if let Some(token) = &ctx.token {
            if !authorized(&parts.headers, token) {
                let mut r = refused(Refusal::new(
                    401,
                    "missing or wrong token: send Authorization: Bearer <token>",
                ));
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Err(Box::new(r));
            }
        }
    }
    match (&parts.method, path) {
        (&Method::POST, "/api/v1/awards") => Ok(Route::Create),
        (&Method::GET, "/api/v1/awards") => {
            Ok(Route::List(parts.uri.query().unwrap_or("").to_string()))
        }
        (&Method::GET, "/readyz") => Ok(Route::Ready),
        (&Method::GET, "/metrics") => Ok(Route::Metrics),
        (m, p) => {
            let allow = if p == "/api/v1/awards" {
                "GET, POST"
            } else {
                "GET"
            };
            let mut r = refused(Refusal::new(405, format!("method {m} not allowed on {p}")));
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            Err(Box::new(r))
        }
    }
}

/// Answer one request.
pub async fn handle(req: Request<Incoming>, ctx: Arc<Ctx>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if let Some(r) = framing_error(parts.version, &parts.headers) {
        return refused_and_close(r);
    }
    if parts.uri.path() == "/healthz" && parts.method == Method::GET {
        return discard_then(
            body,
            json_response(200, &json!({ "status": "ok" })),
            &ctx.limits,
        )
        .await;
    }
    match decide(&parts, &ctx) {
        Err(refusal) => discard_then(body, *refusal, &ctx.limits).await,
        Ok(Route::Create) => create(&parts, body, ctx).await,
        Ok(Route::List(query)) => {
            let r = blocking(&ctx, move |ctx| list(&ctx.service, &query)).await;
            discard_then(body, r, &ctx.limits).await
        }
        Ok(Route::Ready) => {
            let r = blocking(&ctx, |ctx| ready(&ctx.service)).await;
            discard_then(body, r, &ctx.limits).await
        }
        Ok(Route::Metrics) => {
            let r = blocking(&ctx, |ctx| metrics(&ctx.service)).await;
            discard_then(body, r, &ctx.limits).await
        }
    }
}

/// Read and drop a body the answer does not need, so that the keep-alive connection can carry
/// the next request; a body that is too large or too slow closes the connection instead.
async fn discard_then(
    body: Incoming,
    mut response: Response<Body>,
    limits: &HttpLimits,
) -> Response<Body> {
    if hyper::body::Body::is_end_stream(&body) {
        return response;
    }
    if read_body(body, limits).await.is_err() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Run `f` on the blocking pool, at most `limits.workers` at once.
async fn blocking<F>(ctx: &Arc<Ctx>, f: F) -> Response<Body>
where
    F: FnOnce(&Ctx) -> Response<Body> + Send + 'static,
{
    let _permit = ctx.pool.acquire().await;
    let ctx = ctx.clone();
    blocking::unblock(move || f(&ctx)).await
}

/// Read the whole body within the body deadline and the size limit.
async fn read_body(body: Incoming, limits: &HttpLimits) -> Result<Bytes, Refusal> {
    let collect = async {
        Limited::new(body, limits.max_body)
            .collect()
            .await
            .map(|c| Some(c.to_bytes()))
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Refusal::new(
                        413,
                        format!("body is over the limit of {} bytes", limits.max_body),
                    )
                } else {
                    Refusal::new(400, "the body could not be read to its end")
                }
            })
    };
    let deadline = async {
        async_io::Timer::after(limits.body_timeout).await;
        Ok(None)
    };
    match futures_lite::future::or(collect, deadline).await? {
        Some(b) => Ok(b),
        None => Err(Refusal::new(
            408,
            format!(
                "the body did not arrive within {}",
                secs(limits.body_timeout)
            ),
        )),
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

async fn create(
    parts: &hyper::http::request::Parts,
    body: Incoming,
    ctx: Arc<Ctx>,
) -> Response<Body> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > ctx.limits.max_body as u64) {
        return refused_and_close(Refusal::new(
            413,
            format!("body is over the limit of {} bytes", ctx.limits.max_body),
        ));
    }
    let body = match read_body(body, &ctx.limits).await {
        Ok(b) => b,
        Err(r) => return refused_and_close(r),
    };
    let record = match parse_award(&body, now_ms()) {
        Ok(r) => r,
        Err(r) => return refused(r),
    };
    // The commit runs on the shard's writer thread; this task awaits it without holding an
    // executor thread.
    let r = route(record.user_id.as_str(), ctx.service.settings().layout);
    match ctx.service.save_award_async(record).await {
        Ok(saved) => json_response(
            201,
            &json!({
                "messageId": saved.message_id.as_str(),
                "db": r.db_name(),
                "table": r.table_name(),
                "seq": saved.seq,
            }),
        ),
        Err(Error::DuplicateOrder { order_id }) => json_response(
            409,
            &json!({ "error": format!("duplicate order id {order_id}: the award already exists, nothing was written"), "orderId": order_id }),
        ),
        Err(Error::ShuttingDown) => refused(Refusal::new(
            503,
            "shutting down: send the request to a running instance",
        )),
        Err(Error::InvalidInput { field, reason }) => {
            refused(Refusal::field(field, format!("invalid {field}: {reason}")))
        }
        Err(e @ Error::OutcomeUnknown { .. }) => {
            log::warn!("http: {e}");
            refused(Refusal::new(503, OUTCOME_UNKNOWN))
        }
        Err(e) => {
            log::error!("http: saving an award failed: {e}");
            refused(Refusal::new(
                500,
                "the award was not saved because of a server-side failure: retry later (the server log has the cause)",
            ))
        }
    }
}

/// The answer to a save whose commit was sent when the connection to the database was lost.
pub(crate) const OUTCOME_UNKNOWN: &str = "outcome unknown: the database did not answer (or its writer failed on a bug) after the commit may have happened, so the award may or may not have been saved: retry with the same orderId (409 on the retry means it was saved)";

fn list(service: &Service, query: &str) -> Response<Body> {
    let user = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "userId")
        .map(|(_, v)| v.into_owned());
    let Some(user) = user else {
        return refused(Refusal::field("userId", "userId is required"));
    };
    let user = match UserId::parse(&user) {
        Ok(u) => u,
        Err(e) => return refused(Refusal::field("userId", e.to_string())),
    };
    match service.store().awards_of(&user, 1000) {
        Ok(rows) => json_response(200, &json!({ "userId": user.as_str(), "awards": rows })),
        Err(e) => {
            log::error!("http: listing awards failed: {e}");
            refused(Refusal::new(
                500,
                "the awards could not be read: retry later (the server log has the cause)",
            ))
        }
    }
}

fn ready(service: &Service) -> Response<Body> {
    let shards = match service.store().ping() {
        Ok(_) => "open",
        Err(e) => {
            log::warn!("readyz: shards unavailable: {e}");
            "unavailable"
        }
    };
    let broker = service.transport().is_connected();
    let ok = shards == "open" && broker;
    json_response(
        if ok { 200 } else { 503 },
        &json!({
            "ready": ok,
            "shards": shards,
            "transport": service.transport().kind(),
            "transport_connected": broker,
        }),
    )
}

fn metrics(service: &Service) -> Response<Body> {
    match service.shard_counts() {
        Ok(counts) => {
            let text = crate::metrics::render(
                service.metrics(),
                &counts,
                service.transport().is_connected(),
                service.transport().broker().as_ref(),
                now_ms(),
            );
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        Err(e) => {
            log::warn!("metrics: shards unavailable: {e}");
            refused(Refusal::new(503, "the shards cannot be read right now"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let ok = headers(&[("host", "a"), ("content-length", "5")]);
        assert_eq!(framing_error(Version::HTTP_11, &ok), None);
        let cases = [
            headers(&[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "5"),
            ]),
            headers(&[
                ("host", "a"),
                ("content-length", "5"),
                ("transfer-encoding", "chunked"),
            ]),
            headers(&[("content-length", "5")]),
            headers(&[("host", "a"), ("host", "b")]),
        ];
        for h in cases {
            assert_eq!(
                framing_error(Version::HTTP_11, &h).map(|r| r.status),
                Some(400),
                "{h:?}"
            );
        }
        assert_eq!(
            framing_error(Version::HTTP_10, &headers(&[("content-length", "1")])),
            None,
            "HTTP/1.0 has no Host requirement"
        );
    }

    #[test]
    fn the_token_must_match_exactly() {
        let t = "s3cret-token";
        assert!(authorized(
            &headers(&[("authorization", "Bearer s3cret-token")]),
            t
        ));
        for bad in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "bearer s3cret-token",
            "Basic s3cret-token",
            "s3cret-token",
            "Bearer ",
        ] {
            assert!(!authorized(&headers(&[("authorization", bad)]), t), "{bad}");
        }
        assert!(!authorized(&HeaderMap::new(), t));
    }
}
