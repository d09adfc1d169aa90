//! The URL other pods reach this pod's private API at, found as real kas finds it:
//! `private_api.own_url`, else `OWN_PRIVATE_API_URL`, else the address of this host inside
//! `OWN_PRIVATE_API_CIDR` (with `OWN_PRIVATE_API_SCHEME`, default `grpc`, and
//! `OWN_PRIVATE_API_PORT`, default the listener's port), else the listen address when it
//! names one host.

use std::net::{IpAddr, SocketAddr};

use crate::config::PrivateApiConfig;

pub fn own_url(
    config: &PrivateApiConfig,
    listen: SocketAddr,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    if let Some(url) = &config.own_url {
        return Ok(url.clone());
    }
    if let Some(url) = env("OWN_PRIVATE_API_URL").filter(|u| !u.is_empty()) {
        if !(url.starts_with("grpc://") || url.starts_with("grpcs://")) {
            return Err(format!(
                "OWN_PRIVATE_API_URL must start with grpc:// or grpcs://, got {url:?}"
            ));
        }
        return Ok(url);
    }
    let default_scheme = if config.certificate_file.is_some() {
        "grpcs"
    } else {
        "grpc"
    };
    let scheme = env("OWN_PRIVATE_API_SCHEME").unwrap_or_else(|| default_scheme.into());
    if scheme != "grpc" && scheme != "grpcs" {
        return Err(format!(
            "OWN_PRIVATE_API_SCHEME must be grpc or grpcs, got {scheme:?}"
        ));
    }
    let port = match env("OWN_PRIVATE_API_PORT") {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("OWN_PRIVATE_API_PORT is not a port: {p:?}"))?,
        None => listen.port(),
    };
    if let Some(cidr) = env("OWN_PRIVATE_API_CIDR").filter(|c| !c.is_empty()) {
        let ip = local_ip_in(&cidr, &local_addresses())?;
        return Ok(format!("{scheme}://{}", SocketAddr::new(ip, port)));
    }
    if listen.ip().is_unspecified() {
        return Err(format!(
            "private_api.own_url is needed: private_api.listen ({listen}) names no single \
             address other pods could use (or set OWN_PRIVATE_API_URL or OWN_PRIVATE_API_CIDR)"
        ));
    }
    Ok(format!("{scheme}://{}", SocketAddr::new(listen.ip(), port)))
}

/// The first of `addresses` inside `cidr` (`10.0.0.0/8`, `fd00::/8`).
pub fn local_ip_in(cidr: &str, addresses: &[IpAddr]) -> Result<IpAddr, String> {
    let (net, bits) = cidr
        .split_once('/')
        .ok_or_else(|| format!("OWN_PRIVATE_API_CIDR is not a CIDR: {cidr:?}"))?;
    let net: IpAddr = net
        .parse()
        .map_err(|_| format!("OWN_PRIVATE_API_CIDR is not a CIDR: {cidr:?}"))?;
    let bits: u32 = bits
        .parse()
        .map_err(|_| format!("OWN_PRIVATE_API_CIDR is not a CIDR: {cidr:?}"))?;
    let inside = |ip: &IpAddr| match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(*a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(*a) & mask
        }
        _ => false,
    };
    addresses
        .iter()
        .find(|ip| inside(ip))
        .copied()
        .ok_or_else(|| format!("no address of this host is inside OWN_PRIVATE_API_CIDR {cidr}"))
}

/// This host's addresses, from Linux's `/proc/net/fib_trie` (local IPv4) and
/// `/proc/net/if_inet6`; empty elsewhere.
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(trie) = std::fs::read_to_string("/proc/net/fib_trie") {
        let mut last: Option<IpAddr> = None;
        for line in trie.lines() {
            let t = line.trim_start_matches([' ', '|', '+', '-']);
            if let Ok(ip) = t.trim().parse::<IpAddr>() {
                last = Some(ip);
            } else if t.contains("/32 host LOCAL") {
                if let Some(ip) = last.filter(|ip| !out.contains(ip)) {
                    out.push(ip);
                }
            }
        }
    }
    if let Ok(v6) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in v6.lines() {
            let Some(hex) = line.split_whitespace().next() else {
                continue;
            };
            if let Ok(n) = u128::from_str_radix(hex, 16) {
                out.push(IpAddr::V6(n.into()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PrivateApiConfig {
        PrivateApiConfig::default()
    }

    #[test]
    fn order_of_sources() {
        let listen: SocketAddr = "10.1.2.3:8155".parse().unwrap();
        let none = |_: &str| None;
        assert_eq!(
            own_url(&cfg(), listen, none).unwrap(),
            "grpc://10.1.2.3:8155"
        );
        let env = |k: &str| (k == "OWN_PRIVATE_API_URL").then(|| "grpc://kas-1:8155".to_owned());
        assert_eq!(own_url(&cfg(), listen, env).unwrap(), "grpc://kas-1:8155");
        let mut with = cfg();
        with.own_url = Some("grpcs://x:1".into());
        assert_eq!(own_url(&with, listen, env).unwrap(), "grpcs://x:1");
        let wildcard: SocketAddr = "0.0.0.0:8155".parse().unwrap();
        let err = own_url(&cfg(), wildcard, none).unwrap_err();
        assert!(err.contains("private_api.own_url"), "{err}");
    }

    #[test]
    fn cidr_picks_the_address_inside() {
        let addrs: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.4.5.6".parse().unwrap()];
        assert_eq!(
            local_ip_in("10.0.0.0/8", &addrs).unwrap(),
            "10.4.5.6".parse::<IpAddr>().unwrap()
        );
        assert!(local_ip_in("192.168.0.0/16", &addrs).is_err());
        assert!(local_ip_in("nonsense", &addrs).is_err());
    }
}
