//! Calling the HTTP API from Rust (the bench, tests, scripts): `ureq` with a keep-alive pool.

use std::time::Duration;

use crate::error::{Error, Result};

/// An agent that keeps up to `connections` connections alive, with a 30 s deadline per call and
/// every status returned as a response, not an error.
pub fn agent(connections: usize) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .max_idle_connections(connections.max(1))
        .max_idle_connections_per_host(connections.max(1))
        .build()
        .into()
}

fn call(
    r: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(u16, String)> {
    let mut r = r.map_err(|e| Error::Broker(format!("http call failed: {e}")))?;
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .read_to_string()
        .map_err(|e| Error::Broker(format!("http response unreadable: {e}")))?;
    Ok((status, body))
}

/// `POST url` with a JSON body; the status and the body.
pub fn post_json(agent: &ureq::Agent, url: &str, body: &str) -> Result<(u16, String)> {
    call(
        agent
            .post(url)
            .header("content-type", "application/json")
            .send(body),
    )
}

/// `GET url`; the status and the body.
pub fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, String)> {
    call(agent.get(url).call())
}
