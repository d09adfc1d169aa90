//! Client addresses in one canonical form, so every table keyed by address agrees.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// An IPv4 client on an IPv6 socket shows up IPv4-mapped (`::ffff:a.b.c.d`); it is the
/// same client as `a.b.c.d` and is judged as such.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A range written IPv4-mapped denotes the IPv4 range it maps; stored that way it matches
/// [`canonical`] addresses.
pub fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), Some(len)) = (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96))
        {
            if let Ok(v4net) = Ipv4Net::new(v4, len) {
                return IpNet::V4(v4net);
            }
        }
    }
    net
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_and_ranges_become_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(canonical(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(canonical(ip("2001:db8::1")), ip("2001:db8::1"));
        assert_eq!(unmap(net("::ffff:192.0.2.0/120")), net("192.0.2.0/24"));
        assert_eq!(unmap(net("2001:db8::/32")), net("2001:db8::/32"));
        // Shorter than the mapped prefix: not an IPv4 range.
        assert_eq!(unmap(net("::/64")), net("::/64"));
    }
}
