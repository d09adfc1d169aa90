//! Where agents connect, and the guard that keeps load on this machine.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{bail, Context};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: bool,
    /// Path for the websocket upgrade (`/` for kas and the edge).
    pub path: String,
    /// The URL as given, for reports.
    pub url: String,
}

pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Refuses an address off this machine unless the operator said otherwise explicitly.
pub fn check_loopback(
    addr: SocketAddr,
    allow_non_loopback: bool,
    what: &str,
) -> anyhow::Result<()> {
    if !allow_non_loopback && !is_loopback(addr.ip()) {
        bail!(
            "{what} {addr} is not a loopback address; load goes to this machine only unless \
             --allow-non-loopback is given"
        );
    }
    Ok(())
}

/// Splits `scheme://host:port/path` (IPv6 hosts in brackets).
fn split_url(url: &str) -> anyhow::Result<(&str, &str, &str)> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("`{url}` has no scheme (wss://, ws://, grpcs:// or grpc://)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("`{url}` has no host");
    }
    Ok((scheme, authority, path))
}

impl Target {
    pub fn parse(url: &str, allow_non_loopback: bool) -> anyhow::Result<Self> {
        let (scheme, authority, path) = split_url(url)?;
        let (tls, default_port) = match scheme {
            "wss" | "grpcs" | "https" => (true, 443),
            "ws" | "grpc" | "http" => (false, 80),
            other => bail!("`{url}`: unknown scheme `{other}` (wss, ws, grpcs, grpc)"),
        };
        let with_port = if authority.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']'))
        }) {
            authority.to_owned()
        } else {
            format!("{authority}:{default_port}")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("`{url}`: cannot resolve {with_port}"))?
            .next()
            .with_context(|| format!("`{url}`: {with_port} resolves to nothing"))?;
        check_loopback(addr, allow_non_loopback, "target")?;
        Ok(Self {
            addr,
            tls,
            path: path.to_owned(),
            url: url.to_owned(),
        })
    }

    /// The websocket URL the handshake asks for; its host becomes the Host header.
    pub fn ws_url(&self, server_name: &str) -> String {
        if self.tls {
            format!("wss://{server_name}{}", self.path)
        } else {
            format!("ws://{}{}", self.addr, self.path)
        }
    }

    /// The origin gRPC requests carry (`:scheme` and `:authority`).
    pub fn grpc_origin(&self, server_name: &str) -> String {
        if self.tls {
            format!("https://{server_name}")
        } else {
            format!("http://{}", self.addr)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_forms() {
        let t = Target::parse("wss://127.0.0.1:8443/", false).unwrap();
        assert!(t.tls && t.addr.port() == 8443 && t.path == "/");
        let t = Target::parse("grpcs://127.0.0.1:8443", false).unwrap();
        assert!(t.tls && t.path == "/");
        let t = Target::parse("ws://127.0.1.1:8150/", false).unwrap();
        assert!(!t.tls && t.addr.ip().to_string() == "127.0.1.1");
        let t = Target::parse("grpc://[::1]:8150", false).unwrap();
        assert!(!t.tls && t.addr.port() == 8150);
        assert_eq!(
            Target::parse("wss://localhost/", false)
                .unwrap()
                .addr
                .port(),
            443
        );
    }

    #[test]
    fn refuses_other_hosts_unless_allowed() {
        let err = Target::parse("grpc://10.1.2.3:8150", false).unwrap_err();
        assert!(err.to_string().contains("--allow-non-loopback"), "{err}");
        assert!(Target::parse("grpc://10.1.2.3:8150", true).is_ok());
        assert!(Target::parse("ftp://127.0.0.1:1", false).is_err());
        assert!(Target::parse("127.0.0.1:1", false).is_err());
    }
}
