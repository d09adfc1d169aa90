//! Client addresses in one canonical form, so every table keyed by address agrees, and the
//! key every per-client limit counts by ([`client_key`]).

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU16, Ordering};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

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

/// How much of a client's address identifies the client for per-client limits: the
/// network of `ipv4` (default /32) or `ipv6` (default /64) prefix bits around it. An IPv6
/// subscriber is usually handed a whole /64 (SLAAC, privacy addresses), so keying by full
/// address would let one client rotate through 2^64 fresh budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPrefixes {
    ipv4: u8,
    ipv6: u8,
}

impl KeyPrefixes {
    /// Accepted IPv4 prefix lengths: shorter than /16 would lump whole providers together.
    pub const IPV4: RangeInclusive<u8> = 16..=32;
    /// Accepted IPv6 prefix lengths: shorter than /32 would lump whole providers together.
    pub const IPV6: RangeInclusive<u8> = 32..=128;
    pub const DEFAULT: Self = Self { ipv4: 32, ipv6: 64 };

    /// Prefix lengths within [`Self::IPV4`] and [`Self::IPV6`]; the error says which is not.
    pub fn new(ipv4: u8, ipv6: u8) -> Result<Self, String> {
        Self::check_ipv4(ipv4)?;
        Self::check_ipv6(ipv6)?;
        Ok(Self { ipv4, ipv6 })
    }

    pub fn check_ipv4(len: u8) -> Result<u8, String> {
        check(len, Self::IPV4, "IPv4")
    }

    pub fn check_ipv6(len: u8) -> Result<u8, String> {
        check(len, Self::IPV6, "IPv6")
    }

    pub fn ipv4(self) -> u8 {
        self.ipv4
    }

    pub fn ipv6(self) -> u8 {
        self.ipv6
    }
}

fn check(len: u8, range: RangeInclusive<u8>, family: &str) -> Result<u8, String> {
    if range.contains(&len) {
        Ok(len)
    } else {
        Err(format!(
            "{family} prefix length {len} is outside {}..={}",
            range.start(),
            range.end()
        ))
    }
}

impl Default for KeyPrefixes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The client a per-client limit counts: the network of [`KeyPrefixes`] bits around a
/// canonical address (`192.0.2.7/32`, `2001:db8:1:2::/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpNet);

impl ClientKey {
    pub fn net(self) -> IpNet {
        self.0
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The one derivation of a per-client key, shared by the new-connection rate, the
/// concurrency count (connection registry), the request rate and bans: the address is made
/// [`canonical`] first (an IPv4-mapped client is the IPv4 client), then cut to its prefix.
pub fn client_key(ip: IpAddr, prefixes: KeyPrefixes) -> ClientKey {
    // Prefix lengths are validated on construction, so neither constructor can fail; the
    // fallbacks (the full address) only keep this path free of panics.
    ClientKey(match canonical(ip) {
        IpAddr::V4(v4) => Ipv4Net::new(v4, prefixes.ipv4)
            .map(|n| IpNet::V4(n.trunc()))
            .unwrap_or_else(|_| IpNet::from(IpAddr::V4(v4))),
        IpAddr::V6(v6) => Ipv6Net::new(v6, prefixes.ipv6)
            .map(|n| IpNet::V6(n.trunc()))
            .unwrap_or_else(|_| IpNet::from(IpAddr::V6(v6))),
    })
}

/// [`KeyPrefixes`] shared between the policy files that set them and the tables that
/// count by them (the connection registry); one atomic, so a reader never sees half an
/// update.
#[derive(Debug)]
pub struct SharedKeyPrefixes(AtomicU16);

impl SharedKeyPrefixes {
    pub fn new(prefixes: KeyPrefixes) -> Self {
        Self(AtomicU16::new(Self::pack(prefixes)))
    }

    fn pack(p: KeyPrefixes) -> u16 {
        u16::from(p.ipv4) << 8 | u16::from(p.ipv6)
    }

    pub fn load(&self) -> KeyPrefixes {
        let packed = self.0.load(Ordering::Relaxed);
        let [ipv4, ipv6] = packed.to_be_bytes();
        // Only `pack`ed valid values are ever stored.
        KeyPrefixes::new(ipv4, ipv6).unwrap_or_default()
    }

    pub fn store(&self, prefixes: KeyPrefixes) {
        self.0.store(Self::pack(prefixes), Ordering::Relaxed);
    }

    /// The key of `ip` under the prefixes in force now.
    pub fn key(&self, ip: IpAddr) -> ClientKey {
        client_key(ip, self.load())
    }
}

impl Default for SharedKeyPrefixes {
    fn default() -> Self {
        Self::new(KeyPrefixes::DEFAULT)
    }
}

/// The peers whose PROXY headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// A trusted proxy range that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trusted proxy range {text:?}: {reason}")]
pub struct TrustedProxiesError {
    pub text: String,
    pub reason: String,
}

impl TrustedProxies {
    /// Parses addresses (`192.0.2.1`) and CIDRs (`10.0.0.0/8`). A CIDR with
    /// host bits set is refused rather than widened, because it usually
    /// means a mistyped prefix length.
    pub fn parse<S: AsRef<str>>(ranges: &[S]) -> Result<TrustedProxies, TrustedProxiesError> {
        let mut nets = Vec::with_capacity(ranges.len());
        for range in ranges {
            let text = range.as_ref().trim();
            let error = |reason: String| TrustedProxiesError {
                text: text.to_owned(),
                reason,
            };
            let net = match text.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => text
                    .parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| error("not an IP address or CIDR".to_owned()))?,
            };
            if net.trunc() != net {
                return Err(error(format!(
                    "host bits set, did you mean {}",
                    net.trunc()
                )));
            }
            let net = unmap(net);
            if net.prefix_len() == 0 {
                tracing::warn!(
                    range = %net,
                    "trusting PROXY headers from every peer lets any client choose its address"
                );
            }
            nets.push(net);
        }
        Ok(TrustedProxies(nets))
    }

    /// Whether the TCP peer `ip` may send a PROXY header.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_keys_are_ipv4_addresses_and_ipv6_slash_64s() {
        let key = |s: &str| client_key(ip(s), KeyPrefixes::default()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7/32");
        assert_eq!(key("192.0.2.8"), "192.0.2.8/32");
        // A client rotating through its /64 stays one client...
        assert_eq!(key("2001:db8:1:2::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:a:b:c:d"), "2001:db8:1:2::/64");
        // ...and the next /64 is another.
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::/64");
    }

    #[test]
    fn mapped_addresses_are_keyed_as_ipv4() {
        let p = KeyPrefixes::default();
        assert_eq!(
            client_key(ip("::ffff:192.0.2.7"), p),
            client_key(ip("192.0.2.7"), p)
        );
        // Not cut to the IPv6 /64 (which would lump all of IPv4 into ::ffff:0:0/64).
        assert_ne!(
            client_key(ip("::ffff:192.0.2.7"), p),
            client_key(ip("::ffff:192.0.2.8"), p)
        );
        let p24 = KeyPrefixes::new(24, 64).unwrap();
        assert_eq!(
            client_key(ip("::ffff:192.0.2.7"), p24).to_string(),
            "192.0.2.0/24"
        );
    }

    #[test]
    fn prefixes_are_configurable_and_validated() {
        let p = KeyPrefixes::new(24, 48).unwrap();
        assert_eq!(client_key(ip("192.0.2.200"), p).to_string(), "192.0.2.0/24");
        assert_eq!(
            client_key(ip("2001:db8:1:2::1"), p).to_string(),
            "2001:db8:1::/48"
        );
        let full = KeyPrefixes::new(32, 128).unwrap();
        assert_eq!(
            client_key(ip("2001:db8:1:2::1"), full).to_string(),
            "2001:db8:1:2::1/128"
        );
        for (v4, v6) in [(15, 64), (33, 64), (32, 31), (32, 129), (0, 0)] {
            let err = KeyPrefixes::new(v4, v6).unwrap_err();
            assert!(err.contains("prefix length"), "{err}");
        }
        assert!(KeyPrefixes::new(16, 32).is_ok() && KeyPrefixes::new(32, 128).is_ok());
    }

    #[test]
    fn shared_prefixes_round_trip() {
        let shared = SharedKeyPrefixes::default();
        assert_eq!(shared.load(), KeyPrefixes::DEFAULT);
        let p = KeyPrefixes::new(20, 56).unwrap();
        shared.store(p);
        assert_eq!(shared.load(), p);
        assert_eq!(shared.key(ip("10.1.2.3")).to_string(), "10.1.0.0/20");
    }

    #[test]
    fn mapped_addresses_and_ranges_become_ipv4() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(canonical(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(canonical(ip("2001:db8::1")), ip("2001:db8::1"));
        assert_eq!(unmap(net("::ffff:192.0.2.0/120")), net("192.0.2.0/24"));
        assert_eq!(unmap(net("2001:db8::/32")), net("2001:db8::/32"));
        // Shorter than the mapped prefix: not an IPv4 range.
        assert_eq!(unmap(net("::/64")), net("::/64"));
    }

    #[test]
    fn trusted_proxies() {
        let trusted = TrustedProxies::parse(&[
            "10.0.0.0/8",
            " 192.0.2.7 ",
            "2001:db8::/32",
            "::ffff:172.16.0.0/108",
        ])
        .unwrap();
        assert!(trusted.contains("10.1.2.3".parse().unwrap()));
        assert!(trusted.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(trusted.contains("192.0.2.7".parse().unwrap()));
        assert!(!trusted.contains("192.0.2.8".parse().unwrap()));
        assert!(trusted.contains("2001:db8::9".parse().unwrap()));
        assert!(trusted.contains("172.31.0.1".parse().unwrap()));
        assert!(!trusted.contains("172.32.0.1".parse().unwrap()));
        assert_eq!(trusted.nets().len(), 4);

        let none = TrustedProxies::parse::<String>(&[]).unwrap();
        assert!(none.is_empty());
        assert!(!none.contains("10.0.0.1".parse().unwrap()));

        let strings = vec!["10.1.2.3/8".to_owned()];
        assert_eq!(
            TrustedProxies::parse(&strings).unwrap_err().to_string(),
            "invalid trusted proxy range \"10.1.2.3/8\": host bits set, did you mean 10.0.0.0/8"
        );
        assert_eq!(
            TrustedProxies::parse(&["lb.internal"])
                .unwrap_err()
                .to_string(),
            "invalid trusted proxy range \"lb.internal\": not an IP address or CIDR"
        );
        assert!(TrustedProxies::parse(&["10.0.0.0/33"]).is_err());
    }
}
