//! PROXY protocol headers, versions 1 and 2, as specified by HAProxy
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>).
//!
//! When the edge sits behind an L4 load balancer, the TCP peer is the load
//! balancer and the agent's own address arrives in a PROXY header sent before
//! any TLS byte. Blocklists, rate limits and logs need the agent's address,
//! so the header is read first, but only from peers in [`TrustedProxies`](crate::support::net::TrustedProxies):
//! anyone else could otherwise claim any address they like.
//!
//! What is accepted:
//!
//! - v1: `TCP4`, `TCP6` and `UNKNOWN` lines of at most 107 bytes, ending in
//!   CRLF, with single spaces between fields and ports without leading zeros.
//! - v2: version 2 with the `PROXY` command over TCP (IPv4 or IPv6), and the
//!   `LOCAL` command with anything. TLVs are checked for framing and skipped.
//!   Headers longer than [`V2_MAX_LEN`] bytes are refused, which leaves room
//!   for the TLVs cloud load balancers add while bounding what a peer can
//!   make the edge buffer.
//!
//! v1 `UNKNOWN`, v2 `LOCAL`, v2 `AF_UNSPEC` and v2 `AF_UNIX` all yield
//! [`ProxyHeader::Local`]: there is no IP address to take, so the TCP peer's
//! address stands.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 header, CRLF included, per the specification.
pub const V1_MAX_LEN: usize = 107;

/// Longest v2 header accepted, the 16-byte fixed part included. The
/// specification suggests receivers accept at least this much.
pub const V2_MAX_LEN: usize = 536;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
const V2_FIXED_LEN: usize = 16;

/// Longest textual IPv4 and IPv6 addresses, to reject a runaway v1 field
/// before the whole line has arrived.
const V4_TEXT_MAX: usize = 15;
const V6_TEXT_MAX: usize = 45;

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection was relayed for `source`, which dialed `destination`.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No client address is given (health checks, unknown or non-IP
    /// transports): keep using the TCP peer address.
    Local,
}

impl ProxyHeader {
    /// The address to treat as the client's.
    pub fn client_addr(&self, peer: SocketAddr) -> SocketAddr {
        match *self {
            ProxyHeader::Proxied { source, .. } => source,
            ProxyHeader::Local => peer,
        }
    }
}

/// Why bytes are not an acceptable PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("not a PROXY protocol header")]
    NotProxyProtocol,
    #[error("PROXY v1 header is longer than {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1Malformed(&'static str),
    #[error("unsupported PROXY v2 version {0}")]
    V2Version(u8),
    #[error("unsupported PROXY v2 command {0:#x}")]
    V2Command(u8),
    #[error(
        "unsupported PROXY v2 address family and transport {0:#04x}; \
         only TCP over IPv4 or IPv6, UNIX and UNSPEC are accepted"
    )]
    V2Family(u8),
    #[error("PROXY v2 header of {0} bytes is over the limit of {V2_MAX_LEN} bytes")]
    V2TooLong(usize),
    #[error("PROXY v2 address block of {len} bytes is too short for {family}")]
    V2AddressTooShort { family: &'static str, len: usize },
    #[error("PROXY v2 TLV runs past the end of the header")]
    V2BadTlv,
    #[error("connection closed before the PROXY header was complete")]
    UnexpectedEof,
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(std::io::Error),
}

type ParseResult = Result<Option<(ProxyHeader, usize)>, ProxyHeaderError>;

/// Parses a header at the start of `buf`.
///
/// Returns `Ok(None)` while `buf` could still grow into a valid header, and
/// the header with its length in bytes once complete; bytes after it are
/// not looked at. Errors come as soon as the bytes seen rule out a valid
/// header, so garbage is refused without waiting for more of it.
pub fn parse(buf: &[u8]) -> ParseResult {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyHeaderError::NotProxyProtocol),
    }
}

/// Reads one header from `stream`, and not a byte more.
///
/// The bytes after the header (normally a TLS ClientHello) must stay in the
/// socket for the TLS layer, and a generic reader cannot peek or push bytes
/// back. So this reads only bytes the header is known to contain: one at a
/// time for the v1 text line, whose length is known only at its CRLF, and
/// for v2 the 16-byte fixed part followed by the length it announces.
///
/// `timeout` bounds the whole header, so a peer trickling bytes cannot hold
/// the connection open.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyHeaderError> {
    match tokio::time::timeout(timeout, read_header_bytes(stream)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ProxyHeaderError::Timeout(timeout)),
    }
}

async fn read_header_bytes<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut buf = [0u8; V2_MAX_LEN];
    let mut filled = 0;
    loop {
        let seen = buf.get(..filled).unwrap_or_default();
        if let Some((header, _)) = parse(seen)? {
            return Ok(header);
        }
        let end = filled + bytes_certainly_in_header(seen);
        // `parse` has refused any v2 length beyond the buffer, so this only
        // guards against a bug, not against input.
        let chunk = buf
            .get_mut(filled..end)
            .ok_or(ProxyHeaderError::V2TooLong(end))?;
        stream.read_exact(chunk).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ProxyHeaderError::UnexpectedEof
            } else {
                ProxyHeaderError::Io(e)
            }
        })?;
        filled = end;
    }
}

/// How many more bytes a header starting with `seen` (which `parse` found
/// incomplete) is sure to contain. Never zero.
fn bytes_certainly_in_header(seen: &[u8]) -> usize {
    if seen.first() != Some(&b'\r') {
        return 1;
    }
    let total = match v2_announced_len(seen) {
        Some(len) => V2_FIXED_LEN + usize::from(len),
        None => V2_FIXED_LEN,
    };
    total.saturating_sub(seen.len()).max(1)
}

fn v2_announced_len(buf: &[u8]) -> Option<u16> {
    let bytes: [u8; 2] = buf.get(14..16)?.try_into().ok()?;
    Some(u16::from_be_bytes(bytes))
}

fn parse_v1(buf: &[u8]) -> ParseResult {
    let window = buf.get(..V1_MAX_LEN).unwrap_or(buf);
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyHeaderError::V1TooLong);
        }
        // With the CR already here every field is whole and can be checked
        // in full; otherwise the last one may still be growing.
        return match window.strip_suffix(b"\r") {
            Some(line) => parse_v1_line(line, true).map(|_| None),
            None => parse_v1_line(window, false).map(|_| None),
        };
    };
    let line = window
        .get(..lf)
        .and_then(|line| line.strip_suffix(b"\r"))
        .ok_or(ProxyHeaderError::V1Malformed("line does not end with CRLF"))?;
    match parse_v1_line(line, true)? {
        Some(header) => Ok(Some((header, lf + 1))),
        None => Err(ProxyHeaderError::V1Malformed("incomplete line")),
    }
}

/// Splits a v1 line into space-separated fields, telling for each whether
/// it is whole: every field but the last is, and the last is once the line
/// is complete.
struct V1Fields<'a> {
    rest: Option<&'a [u8]>,
    complete: bool,
}

impl<'a> V1Fields<'a> {
    fn next_field(&mut self) -> Option<(&'a [u8], bool)> {
        let rest = self.rest?;
        match rest.iter().position(|&b| b == b' ') {
            Some(space) => {
                self.rest = rest.get(space + 1..);
                Some((rest.get(..space)?, true))
            }
            None => {
                self.rest = None;
                Some((rest, self.complete))
            }
        }
    }
}

/// Checks a v1 line without its CRLF. With `complete` false the line is a
/// prefix still being received: it is checked as far as it goes and yields
/// `Ok(None)`.
fn parse_v1_line(line: &[u8], complete: bool) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let Some(rest) = line.strip_prefix(V1_PREFIX) else {
        return if !complete && V1_PREFIX.starts_with(line) {
            Ok(None)
        } else {
            Err(ProxyHeaderError::NotProxyProtocol)
        };
    };
    if !rest.iter().all(|b| (0x20..=0x7E).contains(b)) {
        return Err(ProxyHeaderError::V1Malformed(
            "control or non-ASCII byte in the line",
        ));
    }
    let mut fields = V1Fields {
        rest: Some(rest),
        complete,
    };
    let (protocol, whole) = fields.next_field().unwrap_or((&[], complete));
    if !whole {
        return if [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
            .iter()
            .any(|known| known.starts_with(protocol))
        {
            Ok(None)
        } else {
            Err(ProxyHeaderError::V1Malformed("unknown protocol"))
        };
    }
    let v6 = match protocol {
        b"TCP4" => false,
        b"TCP6" => true,
        // The specification has receivers ignore the rest of such a line.
        b"UNKNOWN" => return Ok(complete.then_some(ProxyHeader::Local)),
        _ => {
            return Err(ProxyHeaderError::V1Malformed(
                "unknown protocol, expected TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let Some(source) = v1_address(fields.next_field(), v6)? else {
        return Ok(None);
    };
    let Some(destination) = v1_address(fields.next_field(), v6)? else {
        return Ok(None);
    };
    let Some(source_port) = v1_port(fields.next_field())? else {
        return Ok(None);
    };
    let Some(destination_port) = v1_port(fields.next_field())? else {
        return Ok(None);
    };
    if fields.next_field().is_some() {
        return Err(ProxyHeaderError::V1Malformed("extra fields"));
    }
    Ok(Some(ProxyHeader::Proxied {
        source: SocketAddr::new(source, source_port),
        destination: SocketAddr::new(destination, destination_port),
    }))
}

fn v1_address(field: Option<(&[u8], bool)>, v6: bool) -> Result<Option<IpAddr>, ProxyHeaderError> {
    let Some((text, whole)) = field else {
        return Err(ProxyHeaderError::V1Malformed("missing address"));
    };
    let (max, allowed): (usize, fn(&u8) -> bool) = if v6 {
        (V6_TEXT_MAX, |b| {
            b.is_ascii_hexdigit() || *b == b':' || *b == b'.'
        })
    } else {
        (V4_TEXT_MAX, |b| b.is_ascii_digit() || *b == b'.')
    };
    if text.len() > max || !text.iter().all(allowed) {
        return Err(ProxyHeaderError::V1Malformed("bad address"));
    }
    if !whole {
        return Ok(None);
    }
    let text =
        std::str::from_utf8(text).map_err(|_| ProxyHeaderError::V1Malformed("bad address"))?;
    let parsed = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    parsed
        .map(Some)
        .map_err(|_| ProxyHeaderError::V1Malformed("bad address"))
}

fn v1_port(field: Option<(&[u8], bool)>) -> Result<Option<u16>, ProxyHeaderError> {
    let Some((text, whole)) = field else {
        return Err(ProxyHeaderError::V1Malformed("missing port"));
    };
    let leading_zero = text.len() > 1 && text.first() == Some(&b'0');
    if text.len() > 5 || leading_zero || !text.iter().all(u8::is_ascii_digit) {
        return Err(ProxyHeaderError::V1Malformed("bad port"));
    }
    if !whole {
        return Ok(None);
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|text| text.parse::<u16>().ok())
        .map(Some)
        .ok_or(ProxyHeaderError::V1Malformed("bad port"))
}

const V2_CMD_LOCAL: u8 = 0x0;
const V2_CMD_PROXY: u8 = 0x1;
const V2_UNSPEC: u8 = 0x00;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
const V2_UNIX_STREAM: u8 = 0x31;
const V2_UNIX_DGRAM: u8 = 0x32;

fn parse_v2(buf: &[u8]) -> ParseResult {
    let seen = buf.len().min(V2_SIGNATURE.len());
    if buf.get(..seen) != V2_SIGNATURE.get(..seen) {
        return Err(ProxyHeaderError::NotProxyProtocol);
    }
    let Some(&version_command) = buf.get(12) else {
        return Ok(None);
    };
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::V2Version(version_command >> 4));
    }
    let command = version_command & 0x0F;
    if command != V2_CMD_LOCAL && command != V2_CMD_PROXY {
        return Err(ProxyHeaderError::V2Command(command));
    }
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // LOCAL connections carry no client, so their family does not matter.
    if command == V2_CMD_PROXY
        && ![V2_UNSPEC, V2_TCP4, V2_TCP6, V2_UNIX_STREAM, V2_UNIX_DGRAM].contains(&family)
    {
        return Err(ProxyHeaderError::V2Family(family));
    }
    let Some(len) = v2_announced_len(buf) else {
        return Ok(None);
    };
    let total = V2_FIXED_LEN + usize::from(len);
    if total > V2_MAX_LEN {
        return Err(ProxyHeaderError::V2TooLong(total));
    }
    let Some(body) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(None);
    };
    let header = if command == V2_CMD_LOCAL {
        ProxyHeader::Local
    } else {
        v2_addresses(family, body)?
    };
    Ok(Some((header, total)))
}

fn v2_addresses(family: u8, body: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    let (header, tlvs) = match family {
        V2_TCP4 => {
            let too_short = || ProxyHeaderError::V2AddressTooShort {
                family: "TCP over IPv4",
                len: body.len(),
            };
            let source: [u8; 4] = take(body, 0).ok_or_else(too_short)?;
            let destination: [u8; 4] = take(body, 4).ok_or_else(too_short)?;
            let ports: [u8; 4] = take(body, 8).ok_or_else(too_short)?;
            (
                proxied(source.into(), destination.into(), ports),
                body.get(12..),
            )
        }
        V2_TCP6 => {
            let too_short = || ProxyHeaderError::V2AddressTooShort {
                family: "TCP over IPv6",
                len: body.len(),
            };
            let source: [u8; 16] = take(body, 0).ok_or_else(too_short)?;
            let destination: [u8; 16] = take(body, 16).ok_or_else(too_short)?;
            let ports: [u8; 4] = take(body, 32).ok_or_else(too_short)?;
            (
                proxied(source.into(), destination.into(), ports),
                body.get(36..),
            )
        }
        // UNSPEC and UNIX: nothing the edge could use as a client address.
        _ => return Ok(ProxyHeader::Local),
    };
    check_tlvs(tlvs.unwrap_or_default())?;
    Ok(header)
}

fn proxied(source: IpAddr, destination: IpAddr, ports: [u8; 4]) -> ProxyHeader {
    let [sh, sl, dh, dl] = ports;
    ProxyHeader::Proxied {
        source: SocketAddr::new(source, u16::from_be_bytes([sh, sl])),
        destination: SocketAddr::new(destination, u16::from_be_bytes([dh, dl])),
    }
}

fn take<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// TLVs are not used, but a chain that does not fit the announced length
/// means the sender and this parser disagree on the format, and then the
/// addresses cannot be trusted either.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyHeaderError> {
    while !tlvs.is_empty() {
        let [_kind, high, low]: [u8; 3] = take(tlvs, 0).ok_or(ProxyHeaderError::V2BadTlv)?;
        let value_len = usize::from(u16::from_be_bytes([high, low]));
        tlvs = tlvs
            .get(3 + value_len..)
            .ok_or(ProxyHeaderError::V2BadTlv)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{SocketAddrV4, SocketAddrV6};
    use tokio::io::AsyncWriteExt;

    const TLS_START: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// A v2 header assembled field by field as section 2.2 of the
    /// specification lays it out.
    fn v2(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
        ];
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn v2_tcp4_body() -> Vec<u8> {
        let mut body = vec![192, 0, 2, 1]; // source address
        body.extend_from_slice(&[198, 51, 100, 2]); // destination address
        body.extend_from_slice(&[0xC8, 0x22]); // source port 51234
        body.extend_from_slice(&[0x01, 0xBB]); // destination port 443
        body
    }

    fn v2_tcp6_body() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
        ]);
        body.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
        ]);
        body.extend_from_slice(&[0x04, 0xD2]); // 1234
        body.extend_from_slice(&[0x01, 0xBB]); // 443
        body
    }

    fn tlvs() -> Vec<u8> {
        let mut out = vec![0x01, 0x00, 0x02, b'h', b'2']; // PP2_TYPE_ALPN "h2"
        out.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]); // PP2_TYPE_NOOP
        out.extend_from_slice(&[0xEA, 0x00, 0x00]); // AWS-style custom, empty
        out
    }

    const WORST_V1: &str = "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                            ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";

    /// Valid headers and what they must parse to.
    fn valid_examples() -> Vec<(Vec<u8>, ProxyHeader)> {
        let tcp4 = ProxyHeader::Proxied {
            source: sa("192.0.2.1:51234"),
            destination: sa("198.51.100.2:443"),
        };
        let tcp6 = ProxyHeader::Proxied {
            source: sa("[2001:db8::1]:1234"),
            destination: sa("[2001:db8::2]:443"),
        };
        let mut tcp4_tlv = v2_tcp4_body();
        tcp4_tlv.extend(tlvs());
        let mut tcp6_tlv = v2_tcp6_body();
        tcp6_tlv.extend(tlvs());
        vec![
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n".to_vec(),
                tcp4,
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n".to_vec(),
                tcp6,
            ),
            (
                b"PROXY TCP6 ::ffff:192.0.2.1 ::1 0 65535\r\n".to_vec(),
                ProxyHeader::Proxied {
                    source: sa("[::ffff:192.0.2.1]:0"),
                    destination: sa("[::1]:65535"),
                },
            ),
            (b"PROXY UNKNOWN\r\n".to_vec(), ProxyHeader::Local),
            (
                b"PROXY UNKNOWN whatever follows\r\n".to_vec(),
                ProxyHeader::Local,
            ),
            (WORST_V1.as_bytes().to_vec(), ProxyHeader::Local),
            (v2(0x21, 0x11, &v2_tcp4_body()), tcp4),
            (v2(0x21, 0x21, &v2_tcp6_body()), tcp6),
            (v2(0x21, 0x11, &tcp4_tlv), tcp4),
            (v2(0x21, 0x21, &tcp6_tlv), tcp6),
            (v2(0x20, 0x00, &[]), ProxyHeader::Local),
            // LOCAL ignores whatever address block comes with it.
            (v2(0x20, 0x11, &v2_tcp4_body()), ProxyHeader::Local),
            (v2(0x20, 0x99, &[1, 2, 3]), ProxyHeader::Local),
            (v2(0x21, 0x00, &[]), ProxyHeader::Local),
            (v2(0x21, 0x31, &[0; 216]), ProxyHeader::Local),
            (v2(0x21, 0x32, &[0; 216]), ProxyHeader::Local),
            (v2(0x20, 0x00, &[0; V2_MAX_LEN - 16]), ProxyHeader::Local),
        ]
    }

    #[test]
    fn worst_case_v1_is_exactly_the_limit() {
        assert_eq!(WORST_V1.len(), V1_MAX_LEN);
    }

    #[test]
    fn valid_headers_parse_and_stop_at_their_end() {
        for (bytes, expected) in valid_examples() {
            let mut with_tail = bytes.clone();
            with_tail.extend_from_slice(TLS_START);
            for input in [&bytes, &with_tail] {
                let parsed = parse(input).unwrap_or_else(|e| panic!("{e}: {bytes:x?}"));
                assert_eq!(parsed, Some((expected, bytes.len())), "{bytes:x?}");
            }
        }
    }

    #[test]
    fn every_split_point_is_incomplete() {
        for (bytes, _) in valid_examples() {
            for cut in 0..bytes.len() {
                let prefix = &bytes[..cut];
                assert!(
                    matches!(parse(prefix), Ok(None)),
                    "prefix {cut} of {bytes:x?}: {:?}",
                    parse(prefix)
                );
            }
        }
    }

    #[test]
    fn v1_errors() {
        let bad: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01",
            b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n",
            b"PROXY TCP5 ",
            b"PROXY UDP4",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
            b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.256 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 080 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2x",
            b"PROXY TCP4 192.0.2.1x",
            b"PROXY TCP4 1234567890123456",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 123456",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
            b"PROXY UNKNOWN \x00\r\n",
            b"PROXY UNKNOWN caf\xc3\xa9\r\n",
        ];
        for input in bad {
            assert!(
                parse(input).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn v1_length_limit() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX_LEN, b'x');
        assert!(matches!(parse(&long), Err(ProxyHeaderError::V1TooLong)));
        // 107 bytes with the LF as the 108th is one too many.
        long.truncate(V1_MAX_LEN - 1);
        long.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&long), Err(ProxyHeaderError::V1TooLong)));
        long.truncate(V1_MAX_LEN - 2);
        long.extend_from_slice(b"\r\n");
        assert_eq!(
            parse(&long).unwrap(),
            Some((ProxyHeader::Local, V1_MAX_LEN))
        );
    }

    #[test]
    fn v2_errors() {
        let mut bad_signature = v2(0x21, 0x11, &v2_tcp4_body());
        bad_signature[5] = 0;
        assert!(matches!(
            parse(&bad_signature[..6]),
            Err(ProxyHeaderError::NotProxyProtocol)
        ));
        assert!(matches!(
            parse(&v2(0x11, 0x11, &v2_tcp4_body())[..13]),
            Err(ProxyHeaderError::V2Version(1))
        ));
        assert!(matches!(
            parse(&v2(0x22, 0x11, &v2_tcp4_body())[..13]),
            Err(ProxyHeaderError::V2Command(2))
        ));
        for family in [0x12, 0x22, 0x10, 0x20, 0x01, 0x41, 0x33] {
            assert!(
                matches!(
                    parse(&v2(0x21, family, &v2_tcp4_body())[..14]),
                    Err(ProxyHeaderError::V2Family(f)) if f == family
                ),
                "{family:#x}"
            );
        }
        let too_long = v2(0x20, 0x00, &[0; V2_MAX_LEN - 15]);
        assert!(matches!(
            parse(&too_long[..16]),
            Err(ProxyHeaderError::V2TooLong(537))
        ));
        assert!(matches!(
            parse(&v2(0x21, 0x11, &[192, 0, 2, 1, 198, 51, 100, 2])),
            Err(ProxyHeaderError::V2AddressTooShort { len: 8, .. })
        ));
        assert!(matches!(
            parse(&v2(0x21, 0x21, &v2_tcp4_body())),
            Err(ProxyHeaderError::V2AddressTooShort { len: 12, .. })
        ));
        let mut truncated_tlv = v2_tcp4_body();
        truncated_tlv.extend_from_slice(&[0x01, 0x00, 0x05, b'h', b'2']);
        assert!(matches!(
            parse(&v2(0x21, 0x11, &truncated_tlv)),
            Err(ProxyHeaderError::V2BadTlv)
        ));
        let mut stray_byte = v2_tcp6_body();
        stray_byte.push(0);
        assert!(matches!(
            parse(&v2(0x21, 0x21, &stray_byte)),
            Err(ProxyHeaderError::V2BadTlv)
        ));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n")
                .unwrap_err()
                .to_string(),
            "malformed PROXY v1 header: bad port"
        );
        assert_eq!(
            parse(&v2(0x21, 0x12, &[])).unwrap_err().to_string(),
            "unsupported PROXY v2 address family and transport 0x12; \
             only TCP over IPv4 or IPv6, UNIX and UNSPEC are accepted"
        );
        assert_eq!(
            ProxyHeaderError::V2TooLong(600).to_string(),
            "PROXY v2 header of 600 bytes is over the limit of 536 bytes"
        );
    }

    #[test]
    fn client_addr_falls_back_to_the_peer() {
        let peer = sa("10.0.0.1:40000");
        assert_eq!(ProxyHeader::Local.client_addr(peer), peer);
        let proxied = ProxyHeader::Proxied {
            source: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 5)),
            destination: SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 443, 0, 0)),
        };
        assert_eq!(proxied.client_addr(peer), sa("192.0.2.1:5"));
    }

    /// Reads a header from a stream that holds `input`, then everything
    /// after it, to see exactly what `read_header` consumed.
    async fn read_then_rest(input: &[u8]) -> (Result<ProxyHeader, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(input).await.unwrap();
        drop(client);
        let header = read_header(&mut server, Duration::from_secs(5)).await;
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut rest)
            .await
            .unwrap();
        (header, rest)
    }

    #[tokio::test]
    async fn read_header_leaves_the_following_bytes_unread() {
        for (bytes, expected) in valid_examples() {
            let mut input = bytes.clone();
            input.extend_from_slice(TLS_START);
            let (header, rest) = read_then_rest(&input).await;
            assert_eq!(header.unwrap(), expected, "{bytes:x?}");
            assert_eq!(rest, TLS_START, "{bytes:x?}");
        }
    }

    #[tokio::test]
    async fn read_header_assembles_trickled_bytes() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut input = v2(0x21, 0x21, &v2_tcp6_body());
        input.extend_from_slice(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n");
        let writer = tokio::spawn(async move {
            for chunk in input.chunks(3) {
                client.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client
        });
        let first = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        let second = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            first.client_addr(sa("10.0.0.1:1")),
            sa("[2001:db8::1]:1234")
        );
        assert_eq!(second.client_addr(sa("10.0.0.1:1")), sa("192.0.2.1:1"));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn read_header_errors() {
        // Garbage is refused at once, without waiting for more bytes.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(TLS_START).await.unwrap();
        let started = std::time::Instant::now();
        let err = read_header(&mut server, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyHeaderError::NotProxyProtocol), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));

        // A stalled peer runs into the timeout.
        client.write_all(b"x").await.unwrap();
        let (mut stalled_client, mut stalled) = tokio::io::duplex(1024);
        stalled_client
            .write_all(b"PROXY TCP4 192.0.2.1")
            .await
            .unwrap();
        let err = read_header(&mut stalled, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyHeaderError::Timeout(_)), "{err}");
        assert_eq!(err.to_string(), "no complete PROXY header within 50ms");

        // A peer that hangs up early.
        let (header, rest) = read_then_rest(&v2(0x21, 0x11, &v2_tcp4_body())[..20]).await;
        assert!(matches!(header, Err(ProxyHeaderError::UnexpectedEof)));
        assert!(rest.is_empty());
        let (header, _) = read_then_rest(b"").await;
        assert!(matches!(header, Err(ProxyHeaderError::UnexpectedEof)));

        // An oversized v2 header is refused after its 16-byte fixed part.
        let (header, rest) = read_then_rest(&v2(0x20, 0x00, &[7; 600])).await;
        assert!(matches!(header, Err(ProxyHeaderError::V2TooLong(616))));
        assert_eq!(rest, vec![7; 600]);
    }

    fn gen_header() -> impl Strategy<Value = (Vec<u8>, ProxyHeader)> {
        let v4 = (any::<SocketAddrV4>(), any::<SocketAddrV4>())
            .prop_map(|(s, d)| (SocketAddr::V4(s), SocketAddr::V4(d)));
        let v6 = (
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>(),
        )
            .prop_map(|(s, sp, d, dp)| {
                (
                    SocketAddr::new(Ipv6Addr::from(s).into(), sp),
                    SocketAddr::new(Ipv6Addr::from(d).into(), dp),
                )
            });
        let tlvs = proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)),
            0..4,
        );
        (prop_oneof![v4, v6], any::<bool>(), tlvs).prop_map(
            |((source, destination), text, tlvs)| {
                let header = ProxyHeader::Proxied {
                    source,
                    destination,
                };
                let bytes = if text {
                    let protocol = if source.is_ipv4() { "TCP4" } else { "TCP6" };
                    format!(
                        "PROXY {protocol} {} {} {} {}\r\n",
                        source.ip(),
                        destination.ip(),
                        source.port(),
                        destination.port()
                    )
                    .into_bytes()
                } else {
                    let mut body = Vec::new();
                    let family = match (source.ip(), destination.ip()) {
                        (IpAddr::V4(s), IpAddr::V4(d)) => {
                            body.extend(s.octets());
                            body.extend(d.octets());
                            0x11
                        }
                        (IpAddr::V6(s), IpAddr::V6(d)) => {
                            body.extend(s.octets());
                            body.extend(d.octets());
                            0x21
                        }
                        _ => unreachable!(),
                    };
                    body.extend(source.port().to_be_bytes());
                    body.extend(destination.port().to_be_bytes());
                    for (kind, value) in tlvs {
                        body.push(kind);
                        body.extend(u16::try_from(value.len()).unwrap().to_be_bytes());
                        body.extend(value);
                    }
                    v2(0x21, family, &body)
                };
                (bytes, header)
            },
        )
    }

    fn gen_junk_after_prefix() -> impl Strategy<Value = Vec<u8>> {
        let prefixes = prop_oneof![
            Just(b"PROXY ".to_vec()),
            Just(b"PROXY TCP4 ".to_vec()),
            Just(b"PROXY TCP6 ".to_vec()),
            Just(b"PROXY TCP4 1.2.3.4 5.6.7.8 ".to_vec()),
            Just(v2(0x21, 0x11, &[])[..12].to_vec()),
            Just(v2(0x21, 0x11, &[])[..14].to_vec()),
            Just(v2(0x21, 0x21, &[])[..14].to_vec()),
        ];
        (prefixes, proptest::collection::vec(any::<u8>(), 0..700)).prop_map(|(mut p, tail)| {
            p.extend(tail);
            p
        })
    }

    fn check_parse_is_sane(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(Some((_, consumed))) = parse(bytes) {
            prop_assert!(consumed <= bytes.len());
            prop_assert!(consumed <= V2_MAX_LEN);
            // The header must not depend on what follows it.
            prop_assert_eq!(parse(&bytes[..consumed]).unwrap(), parse(bytes).unwrap());
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            check_parse_is_sane(&bytes)?;
        }

        #[test]
        fn junk_after_valid_prefixes_never_panics(bytes in gen_junk_after_prefix()) {
            check_parse_is_sane(&bytes)?;
        }

        #[test]
        fn generated_headers_round_trip(
            (bytes, expected) in gen_header(),
            tail in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let mut input = bytes.clone();
            input.extend_from_slice(&tail);
            prop_assert_eq!(parse(&input).unwrap(), Some((expected, bytes.len())));
            for cut in 0..bytes.len() {
                prop_assert!(matches!(parse(&bytes[..cut]), Ok(None)), "cut {}", cut);
            }
        }

        #[test]
        fn read_header_consumes_what_parse_reports(bytes in gen_junk_after_prefix()) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let (header, rest) = runtime.block_on(read_then_rest(&bytes));
            if let Ok(Some((expected, consumed))) = parse(&bytes) {
                prop_assert_eq!(header.unwrap(), expected);
                prop_assert_eq!(&rest[..], &bytes[consumed..]);
            } else {
                prop_assert!(header.is_err());
            }
        }
    }
}
