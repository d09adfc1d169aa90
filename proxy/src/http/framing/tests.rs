use super::*;

#[test]
fn chunked_bodies_decode_whatever_the_segmentation() {
    let wire = b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
    for step in [1, 2, 3, 7, wire.len()] {
        let mut decoder = ChunkedBody::default();
        let mut raw = BytesMut::new();
        let mut body = BytesMut::new();
        let mut done = false;
        for piece in wire.chunks(step) {
            raw.extend_from_slice(piece);
            done = decoder.decode(&mut raw, &mut body).unwrap();
            if done {
                break;
            }
        }
        assert!(done, "step {step}");
        assert_eq!(&body[..], b"hello world", "step {step}");
    }
}

#[test]
fn malformed_chunking_is_an_error_not_a_panic() {
    for wire in [
        &b"zz\r\nhello\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"ffffffffffffffffffffff\r\n",
        b"-1\r\n",
    ] {
        let mut raw = BytesMut::from(wire);
        let result = ChunkedBody::default().decode(&mut raw, &mut BytesMut::new());
        assert!(result.is_err(), "{:?}", String::from_utf8_lossy(wire));
    }
    let mut endless = BytesMut::from(&b"5;"[..]);
    endless.extend_from_slice(&[b'x'; MAX_CHUNK_SIZE_LINE + 1]);
    assert!(ChunkedBody::default()
        .decode(&mut endless, &mut BytesMut::new())
        .is_err());
}

fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
    let mut response = ResponseHeader::build(status, None).unwrap();
    for (name, value) in headers {
        response
            .append_header(name.to_string(), value.to_string())
            .unwrap();
    }
    response
}

#[test]
fn refusal_framing_follows_rfc_9112() {
    use ResponseFraming::*;
    type Case<'a> = (u16, &'a [(&'a str, &'a str)], ResponseFraming);
    let cases: &[Case] = &[
        (401, &[("content-length", "5")], Length(5)),
        (401, &[("content-length", "5, 5")], Length(5)),
        (
            401,
            &[("content-length", "5"), ("content-length", "6")],
            Invalid,
        ),
        (401, &[("content-length", "+5")], Invalid),
        (
            401,
            &[("content-length", "99999999999999999999999")],
            Invalid,
        ),
        (
            401,
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            Chunked,
        ),
        (401, &[("transfer-encoding", "gzip, Chunked")], Chunked),
        (401, &[("transfer-encoding", "chunked, gzip")], UntilClose),
        (401, &[], UntilClose),
        (204, &[("content-length", "5")], NoBody),
        (304, &[], NoBody),
    ];
    for (status, headers, expected) in cases {
        assert_eq!(
            ResponseFraming::of(&response(*status, headers)),
            *expected,
            "{status} {headers:?}"
        );
    }
}

#[test]
fn hop_by_hop_headers_are_not_relayed() {
    let mut head = response(
        426,
        &[
            ("Connection", "close, X-Hop"),
            ("Connection", "x-other-hop"),
            ("X-Hop", "1"),
            ("X-Other-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "websocket"),
            ("Proxy-Authenticate", "Basic"),
            ("Proxy-Connection", "keep-alive"),
            ("Content-Length", "12"),
            ("Sec-WebSocket-Version", "13"),
            ("Content-Type", "text/plain"),
        ],
    );
    strip_hop_by_hop(&mut head);
    let mut left: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
    left.sort_unstable();
    assert_eq!(left, ["content-type", "sec-websocket-version"]);
}

proptest::proptest! {
    #[test]
    fn chunked_decoding_never_panics(wire in proptest::collection::vec(proptest::num::u8::ANY, 0..512), step in 1usize..64) {
        let mut decoder = ChunkedBody::default();
        let mut raw = BytesMut::new();
        let mut body = BytesMut::new();
        for piece in wire.chunks(step) {
            raw.extend_from_slice(piece);
            if !matches!(decoder.decode(&mut raw, &mut body), Ok(false)) {
                break;
            }
        }
        proptest::prop_assert!(body.len() <= wire.len());
    }

    #[test]
    fn chunked_encoding_round_trips(body in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), sizes in proptest::collection::vec(1usize..300, 1..20)) {
        let mut wire = Vec::new();
        let mut rest = &body[..];
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*size).min(rest.len()));
            wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
            rest = tail;
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let mut raw = BytesMut::from(&wire[..]);
        let mut decoded = BytesMut::new();
        proptest::prop_assert!(ChunkedBody::default().decode(&mut raw, &mut decoded).unwrap());
        proptest::prop_assert_eq!(&decoded[..], &body[..]);
    }
}
