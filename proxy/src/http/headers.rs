//! The header rules of every path a request takes through the edge, in one table: the
//! edge's own HTTP/1.1 loop ([`super::h1`]), pingora's HTTP/1.1 proxy and the websocket
//! upgrades it hands to [`super::websocket`], and HTTP/2 ([`super::h2`]). Paths that each
//! decide for themselves drift apart, and a client then gets past one what another
//! refuses (a second `Host`, a header its `Connection` names).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

/// What the edge does with a header of a given name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Describes one connection, not the message (RFC 9110 7.6.1): never forwarded,
    /// requests or answers. Neither is any header a `Connection` header names, nor any
    /// `proxy-*` header. A path that upgrades the next hop states its own `Connection`
    /// and `Upgrade` there.
    HopByHop,
    /// `te`: hop-by-hop, but HTTP/2 carries exactly `te: trailers` (RFC 9113 8.2.2),
    /// which gRPC requires: forwarded so to an HTTP/2 hop, never over HTTP/1.1.
    TrailersOverHttp2,
    /// `host`: a request names one target. HTTP/1.1: exactly one `Host` (RFC 9112 3.2);
    /// HTTP/1.0: at most one. HTTP/2: at most one `host`, equal to `:authority` when both
    /// are sent; alone it becomes `:authority` (RFC 9113 8.3.1); neither: refused. A pod
    /// gets the target once, as `:authority` over HTTP/2 and `Host` over HTTP/1.1.
    Target,
}

/// The rules by header name (lowercase, as `http` keeps names). `proxy-*` names are
/// [`Rule::HopByHop`] too; every other header is forwarded as it came.
pub const RULES: &[(&str, Rule)] = &[
    ("connection", Rule::HopByHop),
    ("keep-alive", Rule::HopByHop),
    ("proxy-connection", Rule::HopByHop),
    ("transfer-encoding", Rule::HopByHop),
    ("upgrade", Rule::HopByHop),
    ("trailer", Rule::HopByHop),
    ("http2-settings", Rule::HopByHop),
    ("te", Rule::TrailersOverHttp2),
    ("host", Rule::Target),
];

/// Headers a `Connection` header may not take away: the request's target and its
/// framing, which the edge and the pod both rely on. A token naming one is ignored.
const NOT_NAMEABLE: &[&str] = &["host", "content-length"];

/// The protocol of the hop a message is forwarded over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    Http1,
    Http2,
}

/// The rule for headers called `name`, if any.
pub fn rule(name: &HeaderName) -> Option<Rule> {
    let name = name.as_str();
    RULES
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, rule)| *rule)
        .or_else(|| name.starts_with("proxy-").then_some(Rule::HopByHop))
}

/// The names in `headers` that must not cross to a `next` hop: hop-by-hop by the table,
/// named by a `Connection` header, or a `te` that is not HTTP/2's `trailers`.
pub fn hop_by_hop(headers: &HeaderMap, next: Hop) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| match rule(name) {
            Some(Rule::HopByHop) => true,
            Some(Rule::TrailersOverHttp2) => {
                next == Hop::Http1 || headers.get_all(*name).iter().any(|v| v != "trailers")
            }
            Some(Rule::Target) | None => false,
        })
        .cloned()
        .collect();
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| !NOT_NAMEABLE.contains(&name.as_str()) && headers.contains_key(name));
    for name in named {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Removes from `headers` what must not cross to a `next` hop ([`hop_by_hop`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, next: Hop) {
    for name in hop_by_hop(headers, next) {
        // A removal takes every value of the name.
        headers.remove(&name);
    }
}

/// Why a request's headers are refused: the reason a 400 gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

/// The [`Rule::Target`] check of an HTTP/1 request (`http11`: HTTP/1.1, else 1.0).
pub fn check_http1_target(headers: &HeaderMap, http11: bool) -> Result<(), Refused> {
    match headers.get_all(header::HOST).iter().count() {
        0 if http11 => Err(Refused("an HTTP/1.1 request needs a Host header")),
        0 | 1 => Ok(()),
        _ => Err(Refused("more than one Host header")),
    }
}

/// The [`Rule::Target`] check of an HTTP/2 request: its target, from `:authority` (in
/// `uri`) and `host`.
pub fn http2_target(uri: &http::Uri, headers: &HeaderMap) -> Result<Authority, Refused> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refused("more than one host header"));
    }
    match (uri.authority(), host) {
        (Some(authority), Some(host)) if !same_authority(authority, host) => {
            Err(Refused("host and :authority disagree"))
        }
        (Some(authority), _) => Ok(authority.clone()),
        (None, Some(host)) => {
            Authority::try_from(host.as_bytes()).map_err(|_| Refused("host is not an authority"))
        }
        (None, None) => Err(Refused("neither :authority nor host names a target")),
    }
}

fn same_authority(authority: &Authority, host: &HeaderValue) -> bool {
    host.as_bytes()
        .eq_ignore_ascii_case(authority.as_str().as_bytes())
}

/// The most a header list the edge sends a pod over HTTP/2 may weigh, as h2 weighs it
/// (RFC 7541 4.1: name, value and 32 per field, pseudo-headers included). h2 closes a
/// connection (ENHANCE_YOUR_CALM) on a list over four times its
/// SETTINGS_MAX_HEADER_LIST_SIZE, 16 KiB in kas (hyper's default): 64 KiB. Up to that a
/// pod refuses a long list with a 431 on its stream; the edge answers longer ones itself
/// (431 / RESOURCE_EXHAUSTED), whatever `downstream.max_request_header_bytes` allows.
pub const POD_HEADER_LIST_MAX: usize = 4 * 16 * 1024;

/// The weight of `request`'s header list as HTTP/2 sends it (see [`POD_HEADER_LIST_MAX`]).
pub fn http2_header_list_size(request: &http::Request<()>) -> usize {
    let field = |name: usize, value: usize| name + value + 32;
    let uri = request.uri();
    let pseudo = field(":method".len(), request.method().as_str().len())
        + field(":scheme".len(), uri.scheme_str().map_or(0, str::len))
        + field(
            ":authority".len(),
            uri.authority().map_or(0, |a| a.as_str().len()),
        )
        + field(
            ":path".len(),
            uri.path_and_query().map_or(1, |p| p.as_str().len()),
        );
    request
        .headers()
        .iter()
        .fold(pseudo, |size, (name, value)| {
            size + field(name.as_str().len(), value.len())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn the_table_covers_every_hop_by_hop_header_and_proxy_ones() {
        for name in ["connection", "keep-alive", "upgrade", "proxy-authorization"] {
            let name = HeaderName::from_static(name);
            assert_eq!(rule(&name), Some(Rule::HopByHop), "{name}");
        }
        assert_eq!(rule(&header::CONTENT_TYPE), None);
    }

    #[test]
    fn what_connection_names_goes_but_never_the_target_or_framing() {
        let mut h = headers(&[
            ("connection", "x-hop, host, content-length, keep-alive"),
            ("x-hop", "1"),
            ("host", "kas.example"),
            ("content-length", "0"),
            ("te", "trailers"),
            ("x-end", "2"),
        ]);
        strip_hop_by_hop(&mut h, Hop::Http1);
        let mut left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host", "x-end"]);
    }

    #[test]
    fn te_trailers_crosses_to_http2_only() {
        let mut h2 = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h2, Hop::Http2);
        assert!(h2.contains_key("te"));
        let mut h1 = h2.clone();
        strip_hop_by_hop(&mut h1, Hop::Http1);
        assert!(!h1.contains_key("te"));
        let mut other = headers(&[("te", "gzip")]);
        strip_hop_by_hop(&mut other, Hop::Http2);
        assert!(!other.contains_key("te"));
    }

    #[test]
    fn http1_needs_exactly_one_host_and_http10_at_most_one() {
        let one = headers(&[("host", "a")]);
        let two = headers(&[("host", "a"), ("host", "a")]);
        let none = HeaderMap::new();
        assert_eq!(check_http1_target(&one, true), Ok(()));
        assert!(check_http1_target(&two, true).is_err());
        assert!(check_http1_target(&none, true).is_err());
        assert_eq!(check_http1_target(&none, false), Ok(()));
        assert!(check_http1_target(&two, false).is_err());
    }

    #[test]
    fn http2_names_one_target() {
        let with_authority: http::Uri = "https://kas.example/x".parse().unwrap();
        let without: http::Uri = "/x".parse().unwrap();
        let target = |uri: &http::Uri, fields: &[(&str, &str)]| {
            http2_target(uri, &headers(fields)).map(|a| a.to_string())
        };
        assert_eq!(target(&with_authority, &[]).unwrap(), "kas.example");
        assert_eq!(
            target(&with_authority, &[("host", "KAS.example")]).unwrap(),
            "kas.example"
        );
        assert!(target(&with_authority, &[("host", "other")]).is_err());
        assert!(target(
            &with_authority,
            &[("host", "kas.example"), ("host", "other")]
        )
        .is_err());
        assert!(target(
            &with_authority,
            &[("host", "kas.example"), ("host", "kas.example")]
        )
        .is_err());
        assert_eq!(
            target(&without, &[("host", "kas.example")]).unwrap(),
            "kas.example"
        );
        assert!(target(&without, &[("host", "not an authority")]).is_err());
        assert!(target(&without, &[]).is_err());
    }

    #[test]
    fn a_header_list_weighs_what_h2_counts() {
        let mut request = http::Request::new(());
        *request.uri_mut() = "http://ab/c".parse().unwrap();
        request
            .headers_mut()
            .insert("x", HeaderValue::from_static("yz"));
        // :method GET, :scheme http, :authority ab, :path /c, x: yz.
        let expected = (7 + 3) + (7 + 4) + (10 + 2) + (5 + 2) + (1 + 2) + 5 * 32;
        assert_eq!(http2_header_list_size(&request), expected);
    }
}
