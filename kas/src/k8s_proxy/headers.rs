//! Which headers cross the proxy. Credentials meant for GitLab (`Authorization`, `Cookie`,
//! the agent id and CSRF headers and query parameters) never reach the cluster; hop-by-hop
//! headers (and those a `Connection` header names) end at each hop, except that an upgrade
//! is carried as an upgrade; every hop adds itself to `Via`.

use std::collections::HashMap;

use http::{header, HeaderMap, HeaderName, HeaderValue};

use kas_proto::prototool::Values;

use super::auth::{AGENT_ID_HEADER, AGENT_ID_QUERY, CSRF_HEADER, CSRF_QUERY};

/// This kas in `Via`, as real kas writes itself.
pub const VIA: &str = concat!("gRPC/1.0 gitlab-kas/v", env!("CARGO_PKG_VERSION"));

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the historical `Proxy-Connection`/`Keep-Alive`).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers meant for kas and GitLab, never for the cluster.
const CREDENTIALS: [&str; 4] = ["authorization", "cookie", AGENT_ID_HEADER, CSRF_HEADER];

/// The header names a `Connection` header lists.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether the request asks to switch protocols (websocket, SPDY).
pub fn upgrade_requested(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_listed(headers).iter().any(|t| t == "upgrade")
}

/// Removes hop-by-hop headers; an upgrade survives as `Upgrade` + `Connection: upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = headers
        .get_all(header::UPGRADE)
        .iter()
        .cloned()
        .collect::<Vec<_>>();
    for name in connection_listed(headers) {
        headers.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade && !upgrade.is_empty() {
        for value in upgrade {
            headers.append(header::UPGRADE, value);
        }
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn append_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, HeaderValue::from_static(VIA));
}

/// The request's headers as the cluster gets them, in the tunnel's encoding.
pub fn request_headers(mut headers: HeaderMap) -> HashMap<String, Values> {
    let upgrade = upgrade_requested(&headers);
    strip_hop_by_hop(&mut headers, upgrade);
    for name in CREDENTIALS {
        headers.remove(name);
    }
    headers.remove(header::HOST);
    append_via(&mut headers);
    to_values(&headers)
}

/// The query without the credentials' browser forms.
pub fn request_query(query: Vec<(String, String)>) -> HashMap<String, Values> {
    let mut out: HashMap<String, Values> = HashMap::new();
    for (k, v) in query {
        if k == AGENT_ID_QUERY || k == CSRF_QUERY {
            continue;
        }
        out.entry(k).or_default().value.push(v);
    }
    out
}

fn to_values(headers: &HeaderMap) -> HashMap<String, Values> {
    let mut out: HashMap<String, Values> = HashMap::new();
    for (name, value) in headers {
        // Header values that are not text cannot travel in the tunnel's string map.
        if let Ok(v) = value.to_str() {
            out.entry(name.as_str().to_owned())
                .or_default()
                .value
                .push(v.to_owned());
        }
    }
    out
}

/// The cluster's response headers as the caller gets them: hop-by-hop removed (an accepted
/// upgrade kept), the cluster's CORS headers dropped (kas answers CORS itself), `Via`
/// added. Names or values that are not valid HTTP are dropped, not passed on.
pub fn response_headers(from: &HashMap<String, Values>, upgraded: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in from {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if name.as_str().starts_with("access-control-") {
            continue;
        }
        for v in &values.value {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.append(name.clone(), v);
            }
        }
    }
    strip_hop_by_hop(&mut headers, upgraded);
    append_via(&mut headers);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_headers_never_reach_the_cluster() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer ci:1:x"),
            ("cookie", "_gitlab_kas=y"),
            ("gitlab-agent-id", "1"),
            ("x-csrf-token", "z"),
            ("host", "kas"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "p"),
            ("te", "trailers"),
            ("accept", "application/json"),
            ("impersonate-user", "someone"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = request_headers(h);
        let mut names: Vec<_> = out.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["accept", "impersonate-user", "via"]);
        assert_eq!(out["via"].value, [VIA]);
    }

    #[test]
    fn an_upgrade_is_carried_as_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_requested(&h));
        let out = request_headers(h);
        assert_eq!(out["upgrade"].value, ["websocket"]);
        assert_eq!(out["connection"].value, ["upgrade"]);
        let q = request_query(vec![
            ("gitlab-agent-id".into(), "1".into()),
            ("watch".into(), "1".into()),
        ]);
        assert_eq!(q.keys().collect::<Vec<_>>(), ["watch"]);
    }
}
