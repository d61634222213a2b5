//! Load on the HTTP API for the bench: hyper's client, on the executor the server runs on.

use std::time::Duration;

use crate::error::{Error, Result};

/// Keep-alive load for the bench: `connections` connections, each sending `POST path` with the
/// bodies `body(i)` for its share of `0..n` one after another, through hyper's client on the
/// same executor the server runs on (no thread per client). Returns each request's latency;
/// fails on the first status other than 201.
pub fn post_load(
    addr: std::net::SocketAddr,
    path: &str,
    connections: usize,
    n: usize,
    body: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Result<Vec<Duration>> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let next = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(body);
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| Error::Config(format!("bad bench url: {e}")))?;
    let tasks: Vec<_> = (0..connections.max(1))
        .map(|_| {
            let (next, body, uri) = (next.clone(), body.clone(), uri.clone());
            async_global_executor::spawn(async move {
                let stream = async_io::Async::<std::net::TcpStream>::connect(addr)
                    .await
                    .map_err(|e| Error::Broker(format!("http bench connect: {e}")))?;
                stream.get_ref().set_nodelay(true).ok();
                let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
                    smol_hyper::rt::FuturesIo::new(stream),
                )
                .await
                .map_err(|e| Error::Broker(format!("http bench handshake: {e}")))?;
                let driver = async_global_executor::spawn(async move {
                    if let Err(e) = conn.await {
                        log::warn!("http bench connection ended: {e}");
                    }
                });
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let req = hyper::Request::post(uri.clone())
                        .header("host", addr.to_string())
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body(i))))
                        .map_err(|e| Error::Config(format!("bench request: {e}")))?;
                    let t0 = std::time::Instant::now();
                    sender
                        .ready()
                        .await
                        .map_err(|e| Error::Broker(format!("http bench connection: {e}")))?;
                    let resp = sender
                        .send_request(req)
                        .await
                        .map_err(|e| Error::Broker(format!("http bench request: {e}")))?;
                    let status = resp.status().as_u16();
                    let text = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| Error::Broker(format!("http bench response: {e}")))?
                        .to_bytes();
                    lat.push(t0.elapsed());
                    if status != 201 {
                        return Err(Error::Broker(format!(
                            "http bench got {status}: {}",
                            String::from_utf8_lossy(&text)
                        )));
                    }
                }
                drop(sender);
                driver.await;
                Ok::<_, Error>(lat)
            })
        })
        .collect();
    async_global_executor::block_on(async {
        let mut all = Vec::with_capacity(n);
        for t in tasks {
            all.extend(t.await?);
        }
        Ok(all)
    })
}
