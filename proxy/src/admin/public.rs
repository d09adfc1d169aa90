//! The public plain-HTTP listener (`listen.http`, usually `:80`): health for the load
//! balancer, HTTP-01 ACME challenges, and a redirect to https for everything else.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use hyper::body::Incoming;

use super::{now, text, AdminState, Reply};

/// Builds the https URL for a plain-HTTP request, keeping the host and path.
fn https_location(req: &Request<Incoming>, https_port: u16) -> Option<String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())?;
    // Strip a port, minding IPv6 literals like [::1]:80.
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if name.is_empty() || name.contains(['/', '@', ' ']) {
        return None;
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    Some(if https_port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{https_port}{path}")
    })
}

/// The user agent of relayed challenge requests; a replica never relays one of those
/// again, so a misconfigured relay cannot loop.
const RELAY_USER_AGENT: &str = "kas-edge-acme-relay";
/// How long the replica that runs ACME may take to answer a relayed challenge.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

pub fn redirect_handler(state: Arc<AdminState>) -> impl Fn(&Request<Incoming>) -> Reply {
    move |req| {
        let path = req.uri().path();
        if path == "/healthz" {
            return now(text(StatusCode::OK, "ok\n"));
        }
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            return acme_challenge(&state, req, token);
        }
        now(match https_location(req, state.https_port) {
            Some(location) => {
                let mut r = text(StatusCode::PERMANENT_REDIRECT, format!("see {location}\n"));
                if let Ok(v) = header::HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                r
            }
            None => text(StatusCode::BAD_REQUEST, "missing or invalid Host header\n"),
        })
    }
}

/// Answers an HTTP-01 challenge from this replica's own ACME client or, when another
/// replica runs ACME (the CA's request may reach any replica through the load balancer),
/// relays it there.
fn acme_challenge(state: &AdminState, req: &Request<Incoming>, token: &str) -> Reply {
    let not_pending = || text(StatusCode::NOT_FOUND, "no ACME challenge pending\n");
    // ACME tokens are base64url; anything else is not worth a relay.
    let plausible = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plausible {
        return now(not_pending());
    }
    if let Some(answer) = state
        .acme
        .as_ref()
        .and_then(|acme| acme.http01_key_authorization(token))
    {
        return now(text(StatusCode::OK, answer));
    }
    let relayed = req
        .headers()
        .get(header::USER_AGENT)
        .is_some_and(|ua| ua == RELAY_USER_AGENT);
    let Some(relay) = state.acme_relay.clone().filter(|_| !relayed) else {
        return now(not_pending());
    };
    let path = req.uri().path().to_owned();
    Box::pin(async move {
        match relay_challenge(&relay, &path).await {
            Some(answer) => text(StatusCode::OK, answer),
            None => not_pending(),
        }
    })
}

async fn relay_challenge(relay: &str, path: &str) -> Option<Bytes> {
    let addr = match tokio::net::lookup_host(relay).await {
        Ok(mut addrs) => addrs.next()?,
        Err(e) => {
            tracing::warn!(relay, error = %e, "cannot resolve tls.acme_challenge_relay");
            return None;
        }
    };
    let answer =
        crate::support::http_client::get(addr, relay, path, RELAY_USER_AGENT, RELAY_TIMEOUT, 4096)
            .await;
    match answer {
        Some(answer) if answer.status == StatusCode::OK => {
            tracing::info!(relay, path, "relayed an ACME challenge");
            Some(answer.body)
        }
        other => {
            tracing::warn!(relay, path, status = ?other.map(|a| a.status), "relayed ACME challenge not answered");
            None
        }
    }
}
