//! Answers for requests the edge does not forward: refused by a policy, no pod to take
//! them, or a pod that answered wrongly. gRPC clients get a trailers-only response with a
//! `grpc-status`, everyone else the HTTP status.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use super::Protocol;
use crate::policy::RequestRefusal;

/// gRPC status codes (grpc/doc/statuscodes.md): the ones the edge answers with, and the
/// ones it counts in `edge_grpc_responses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrpcCode {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl GrpcCode {
    /// Every code, in numeric order (the code's number is its index).
    pub const ALL: [GrpcCode; 17] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// The code as it goes on the wire in `grpc-status`.
    pub fn as_str(self) -> &'static str {
        const WIRE: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        WIRE[self as usize]
    }

    /// The canonical name, as gRPC libraries print it: the `grpc_status` label.
    pub fn name(self) -> &'static str {
        match self {
            GrpcCode::Ok => "OK",
            GrpcCode::Cancelled => "CANCELLED",
            GrpcCode::Unknown => "UNKNOWN",
            GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
            GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            GrpcCode::NotFound => "NOT_FOUND",
            GrpcCode::AlreadyExists => "ALREADY_EXISTS",
            GrpcCode::PermissionDenied => "PERMISSION_DENIED",
            GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            GrpcCode::FailedPrecondition => "FAILED_PRECONDITION",
            GrpcCode::Aborted => "ABORTED",
            GrpcCode::OutOfRange => "OUT_OF_RANGE",
            GrpcCode::Unimplemented => "UNIMPLEMENTED",
            GrpcCode::Internal => "INTERNAL",
            GrpcCode::Unavailable => "UNAVAILABLE",
            GrpcCode::DataLoss => "DATA_LOSS",
            GrpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// A `grpc-status` value as received; anything that is not a known code's number is
    /// `UNKNOWN`, as gRPC clients treat it.
    pub fn from_wire(value: &[u8]) -> GrpcCode {
        std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .and_then(|n| GrpcCode::ALL.get(n).copied())
            .unwrap_or(GrpcCode::Unknown)
    }

    /// What a gRPC client reports for an HTTP status that came without `grpc-status`
    /// (grpc/doc/http-grpc-status-mapping.md).
    pub fn from_http(status: u16) -> GrpcCode {
        match status {
            400 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            429 | 502 | 503 | 504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        }
    }
}

/// How a refused request is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub http_status: u16,
    pub grpc_code: GrpcCode,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl From<RequestRefusal> for Denial {
    fn from(refusal: RequestRefusal) -> Self {
        match refusal {
            RequestRefusal::HeaderRule { rule } => Self {
                http_status: 403,
                grpc_code: GrpcCode::PermissionDenied,
                message: format!("request denied by policy rule {rule:?}"),
                retry_after: None,
            },
            RequestRefusal::RateLimited {
                reason,
                retry_after,
            } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                Self {
                    http_status: 429,
                    grpc_code: GrpcCode::ResourceExhausted,
                    message: format!("rate limit exceeded ({reason}), try again in {secs} s"),
                    retry_after: Some(Duration::from_secs(secs)),
                }
            }
        }
    }
}

/// A refusal's answer, before a protocol writes it. gRPC gets a trailers-only response
/// (HEADERS with END_STREAM carrying `grpc-status`), which every gRPC client maps to the
/// status; other requests get the HTTP status and the message as a short body.
pub(super) struct DenialResponse {
    pub(super) status: u16,
    pub(super) headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `None` for gRPC: the head alone ends the stream.
    pub(super) body: Option<Bytes>,
}

impl DenialResponse {
    pub(super) fn new(protocol: Protocol, denial: &Denial) -> Self {
        use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
        let value = |s: &str| {
            http::HeaderValue::from_str(s)
                .unwrap_or_else(|_| http::HeaderValue::from_static("request refused"))
        };
        let mut headers = Vec::with_capacity(4);
        let (status, body) = if protocol == Protocol::Grpc {
            headers.push((
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            ));
            headers.push((
                http::HeaderName::from_static("grpc-status"),
                http::HeaderValue::from_static(denial.grpc_code.as_str()),
            ));
            headers.push((
                http::HeaderName::from_static("grpc-message"),
                value(&denial.message),
            ));
            (200, None)
        } else {
            let body = Bytes::from(format!("{}\n", denial.message));
            headers.push((
                CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; charset=utf-8"),
            ));
            headers.push((CONTENT_LENGTH, http::HeaderValue::from(body.len())));
            (denial.http_status, Some(body))
        };
        if let Some(after) = denial.retry_after {
            headers.push((RETRY_AFTER, http::HeaderValue::from(after.as_secs().max(1))));
        }
        Self {
            status,
            headers,
            body,
        }
    }
}

/// Answers a request the edge will not forward on pingora's session (HTTP/1; see
/// [`DenialResponse`]). Returns the HTTP status written.
pub(super) async fn respond_denied(
    session: &mut Session,
    protocol: Protocol,
    denial: &Denial,
) -> u16 {
    let answer = DenialResponse::new(protocol, denial);
    let written = async {
        let mut resp = ResponseHeader::build(answer.status, Some(answer.headers.len()))?;
        for (name, value) in answer.headers {
            resp.insert_header(name, value)?;
        }
        let end = answer.body.is_none();
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), end).await?;
        if let Some(body) = answer.body {
            session.write_response_body(Some(body), true).await?;
        }
        Ok::<_, Box<Error>>(())
    };
    if let Err(e) = written.await {
        tracing::debug!(error = %e, "could not write the error response");
    }
    answer.status
}

pub(super) fn unavailable(why: &str) -> Denial {
    Denial {
        http_status: 503,
        grpc_code: GrpcCode::Unavailable,
        message: why.to_owned(),
        retry_after: None,
    }
}

/// A request head over `downstream.max_request_header_bytes`.
pub(super) fn header_too_large(size: usize, limit: usize) -> Denial {
    Denial {
        http_status: 431,
        grpc_code: GrpcCode::ResourceExhausted,
        message: format!("request headers too large ({size} bytes, limit {limit})"),
        retry_after: None,
    }
}

/// A request the header rules refuse ([`super::headers`]): 400.
pub(super) fn bad_request(why: &str) -> Denial {
    Denial {
        http_status: 400,
        grpc_code: GrpcCode::from_http(400),
        message: why.to_owned(),
        retry_after: None,
    }
}

/// A pod was reached but did not answer usefully: 502 (gRPC: still UNAVAILABLE).
pub(super) fn bad_gateway(why: &str) -> Denial {
    Denial {
        http_status: 502,
        ..unavailable(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_round_trip_and_unknown_numbers_are_unknown() {
        for (n, code) in GrpcCode::ALL.iter().enumerate() {
            assert_eq!(code.as_str(), n.to_string());
            assert_eq!(GrpcCode::from_wire(code.as_str().as_bytes()), *code);
        }
        assert_eq!(GrpcCode::Unauthenticated.name(), "UNAUTHENTICATED");
        assert_eq!(GrpcCode::Unavailable.as_str(), "14");
        for odd in [
            &b"17"[..],
            b"-1",
            b"",
            b"ok",
            b"99999999999999999999999",
            b"\xff",
        ] {
            assert_eq!(GrpcCode::from_wire(odd), GrpcCode::Unknown, "{odd:?}");
        }
        assert_eq!(GrpcCode::from_http(503), GrpcCode::Unavailable);
        assert_eq!(GrpcCode::from_http(200), GrpcCode::Unknown);
    }
}
