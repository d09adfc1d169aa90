//! The public plain-HTTP listener (`listen.http`, usually `:80`): health for the load
//! balancer, HTTP-01 ACME challenges, and a redirect to https for everything else.
//!
//! It faces the internet like the TLS port and is admitted like it: [`admit`] is the same
//! accept-time decision (blocklist, per-IP connection rate), taken before a byte is read;
//! `[public_http]` caps connections globally and per IP and bounds their life
//! (`admin::serve`). Relayed ACME challenges are bounded in number and time.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use super::{now, text, AdminState, Admit, PerClientCap, Reply, ServeLimits};
use crate::config::PublicHttpConfig;
use crate::policy::Policies;

/// The accept-time decision of the TLS port, for `:80`: the blocklist and the per-IP
/// connection rate (one budget for both ports). A trusted load balancer's own address is
/// not judged, as on the TLS port: this listener reads no PROXY header, so its clients
/// cannot be told apart.
pub fn admit(policies: Arc<Policies>) -> Admit {
    Arc::new(move |ip: IpAddr| policies.trusted.contains(ip) || policies.admit(ip))
}

/// `[public_http]` as the bounds of [`super::serve`]; one client is what the TLS port's
/// limits count as one (`[keys]` in limits.toml, read at each connection).
pub fn limits(config: &PublicHttpConfig, policies: Arc<Policies>) -> ServeLimits {
    let per_client = PerClientCap {
        limit: config.max_connections_per_ip,
        key: {
            let policies = policies.clone();
            Arc::new(move |ip: IpAddr| policies.client_key(ip))
        },
    };
    ServeLimits {
        listener: "http",
        max_connections: config.max_connections,
        per_client: Some(per_client),
        header_timeout: config.header_timeout,
        lifetime: config.max_connection_lifetime,
        admit: Some(admit(policies)),
    }
}

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
/// How long the replica that runs ACME may take to answer a relayed challenge, name
/// resolution included.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Relays in flight at once; one more is answered 503 at once. A CA validates a handful
/// of tokens per order, so only a flood ever reaches this.
pub const MAX_RELAYS: usize = 16;

pub fn redirect_handler(state: Arc<AdminState>) -> impl Fn(&Request<Incoming>) -> Reply {
    let relays = Arc::new(Semaphore::new(MAX_RELAYS));
    move |req| {
        let path = req.uri().path();
        if path == "/healthz" {
            return now(text(StatusCode::OK, "ok\n"));
        }
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            return acme_challenge(&state, &relays, req, token);
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
fn acme_challenge(
    state: &AdminState,
    relays: &Arc<Semaphore>,
    req: &Request<Incoming>,
    token: &str,
) -> Reply {
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
    let results = &state.metrics.acme_relays;
    let Ok(permit) = relays.clone().try_acquire_owned() else {
        results.with_label_values(&["busy"]).inc();
        return now(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many ACME challenge relays in flight\n",
        ));
    };
    let (answered, not_answered) = (
        results.with_label_values(&["answered"]),
        results.with_label_values(&["not_answered"]),
    );
    let path = req.uri().path().to_owned();
    Box::pin(async move {
        let _permit = permit;
        let answer = tokio::time::timeout(RELAY_TIMEOUT, relay_challenge(&relay, &path))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(relay, path, "relayed ACME challenge timed out");
                None
            });
        match answer {
            Some(answer) => {
                answered.inc();
                text(StatusCode::OK, answer)
            }
            None => {
                not_answered.inc();
                not_pending()
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use crate::telemetry::metrics::EdgeMetrics;
    use crate::upstream::pool::Pool;

    async fn status_of(addr: std::net::SocketAddr, path: &str) -> u16 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: kas.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        s.read_to_end(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head);
        head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    #[tokio::test]
    async fn relays_are_bounded_in_number_and_time() {
        // The ACME replica: accepts and never answers.
        let hold = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = hold.local_addr().unwrap();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = hold.accept().await {
                held.push(s);
                let _ = accepted_tx.send(());
            }
        });
        let metrics = EdgeMetrics::new();
        let state = Arc::new(AdminState {
            ready: AtomicBool::new(true),
            pool: Arc::new(Pool::new(1, Duration::from_secs(1))),
            metrics: metrics.clone(),
            discovery: Arc::new(crate::upstream::discovery::new_status(&metrics)),
            blocklist_watch: None,
            https_port: 443,
            acme: None,
            acme_relay: Some(relay.to_string()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::admin::serve(
            listener,
            redirect_handler(state),
            ServeLimits {
                listener: "http",
                max_connections: 100,
                per_client: None,
                header_timeout: Duration::from_secs(30),
                lifetime: Duration::from_secs(30),
                admit: None,
            },
            metrics.clone(),
        ));

        let started = tokio::time::Instant::now();
        let pending: Vec<_> = (0..MAX_RELAYS)
            .map(|i| {
                let path = format!("/.well-known/acme-challenge/token{i}");
                tokio::spawn(async move { status_of(addr, &path).await })
            })
            .collect();
        for _ in 0..MAX_RELAYS {
            tokio::time::timeout(Duration::from_secs(5), accepted.recv())
                .await
                .expect("relay reached the ACME replica");
        }
        // One more while all are in flight: refused at once.
        let before = tokio::time::Instant::now();
        assert_eq!(
            status_of(addr, "/.well-known/acme-challenge/extra").await,
            503
        );
        assert!(
            before.elapsed() < Duration::from_secs(1),
            "{:?}",
            before.elapsed()
        );
        assert_eq!(metrics.acme_relays.with_label_values(&["busy"]).get(), 1);
        // The others give up at the relay timeout, not never.
        for task in pending {
            let status = tokio::time::timeout(RELAY_TIMEOUT * 2, task)
                .await
                .expect("relay bounded in time")
                .unwrap();
            assert_eq!(status, 404);
        }
        assert!(started.elapsed() >= RELAY_TIMEOUT);
        assert_eq!(
            metrics
                .acme_relays
                .with_label_values(&["not_answered"])
                .get(),
            MAX_RELAYS as u64
        );
        // Places are free again: the next relay is tried (and held) rather than refused.
        let next = tokio::spawn(status_of(addr, "/.well-known/acme-challenge/later"));
        tokio::time::timeout(Duration::from_secs(5), accepted.recv())
            .await
            .expect("a relay after the others ended");
        next.abort();
    }
}
