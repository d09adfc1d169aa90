//! How an HTTP/1.1 response from a pod is delimited (RFC 9112 6.3, 7.1), and what of its
//! head may cross to the client. The edge re-frames every body it relays (a plain
//! request's answer in [`super::h1`], a refused upgrade's error page in
//! [`super::websocket`]), so it must know where the pod's body ends whatever framing the
//! pod chose, and must not pass on this hop's own headers.

use bytes::BytesMut;
use pingora::http::ResponseHeader;

use super::headers::Hop;

/// The longest chunk-size line accepted (extensions included).
const MAX_CHUNK_SIZE_LINE: usize = 4 * 1024;

/// Removes what must not cross to the agent ([`super::headers::hop_by_hop`]) and the
/// pod's `Content-Length` (the relay sets its own).
pub(super) fn strip_hop_by_hop(head: &mut ResponseHeader) {
    let mut names = super::headers::hop_by_hop(&head.headers, Hop::Http1);
    names.push(http::header::CONTENT_LENGTH);
    for name in &names {
        // A removal takes every value of the name.
        let _ = head.remove_header(name);
    }
}

/// How a pod delimits its response body (RFC 9112 6.3; a HEAD request's answer is
/// [`ResponseFraming::HeadOnly`], which the caller knows and the head does not say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResponseFraming {
    /// 1xx, 204, 304: no body.
    NoBody,
    /// The answer to a HEAD request: no body, and the `Content-Length` a GET would get.
    HeadOnly(u64),
    Chunked,
    Length(u64),
    /// No length (or a transfer coding other than chunked last): until the pod closes.
    UntilClose,
    /// Conflicting or unparsable `Content-Length`: the body cannot be delimited and is
    /// not relayed.
    Invalid,
}

impl ResponseFraming {
    pub(super) fn of(response: &ResponseHeader) -> Self {
        let status = response.status;
        if status.is_informational() || status == 204 || status == 304 {
            return Self::NoBody;
        }
        let headers = &response.headers;
        if headers.contains_key(http::header::TRANSFER_ENCODING) {
            let last = headers
                .get_all(http::header::TRANSFER_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .rfind(|coding| !coding.is_empty());
            return match last {
                Some(coding) if coding.eq_ignore_ascii_case("chunked") => Self::Chunked,
                _ => Self::UntilClose,
            };
        }
        let mut length = None;
        for value in headers.get_all(http::header::CONTENT_LENGTH) {
            let Ok(value) = value.to_str() else {
                return Self::Invalid;
            };
            for item in value.split(',') {
                let item = item.trim();
                let Some(n) = item
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| item.parse::<u64>().ok())
                    .flatten()
                else {
                    return Self::Invalid;
                };
                if length.is_some_and(|l| l != n) {
                    return Self::Invalid;
                }
                length = Some(n);
            }
        }
        length.map_or(Self::UntilClose, Self::Length)
    }
}

/// Decodes a chunked body incrementally (RFC 9112 7.1); trailers are not needed and not read.
#[derive(Debug, Default)]
pub(super) struct ChunkedBody {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// The last (zero-size) chunk was read.
    Done,
}

impl ChunkedBody {
    /// Moves what `raw` holds into `body`; `Ok(true)` once the last chunk is read.
    pub(super) fn decode(
        &mut self,
        raw: &mut BytesMut,
        body: &mut BytesMut,
    ) -> Result<bool, String> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Size => match httparse::parse_chunk_size(raw) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        let _ = raw.split_to(used);
                        self.state = ChunkState::Done;
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = raw.split_to(used);
                        self.state = ChunkState::Data(size);
                    }
                    Ok(httparse::Status::Partial) if raw.len() > MAX_CHUNK_SIZE_LINE => {
                        return Err("chunk-size line too long".into())
                    }
                    Ok(httparse::Status::Partial) => return Ok(false),
                    Err(_) => return Err("invalid chunk size".into()),
                },
                ChunkState::Data(left) => {
                    if raw.is_empty() {
                        return Ok(false);
                    }
                    let take = left.min(raw.len() as u64) as usize;
                    body.extend_from_slice(&raw.split_to(take));
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if raw.len() < 2 {
                        return Ok(false);
                    }
                    if raw.split_to(2)[..] != b"\r\n"[..] {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    self.state = ChunkState::Size;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
