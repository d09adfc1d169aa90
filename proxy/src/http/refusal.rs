//! Answers for requests the edge does not forward: refused by a policy, no pod to take
//! them, or a pod that answered wrongly. gRPC clients get a trailers-only response with a
//! `grpc-status`, everyone else the HTTP status.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as HttpSession;

use super::Protocol;
use crate::policy::RequestRefusal;

/// The gRPC status codes the edge answers with (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
}

impl GrpcCode {
    /// The code as it goes on the wire in `grpc-status`.
    pub fn as_str(self) -> &'static str {
        match self {
            GrpcCode::PermissionDenied => "7",
            GrpcCode::ResourceExhausted => "8",
            GrpcCode::Unavailable => "14",
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

/// Answers a request the edge will not forward. gRPC gets a trailers-only response
/// (HEADERS with END_STREAM carrying `grpc-status`), which every gRPC client maps to the
/// status; other requests get the HTTP status. Returns the HTTP status written.
pub(super) async fn respond_denied(
    session: &mut Session,
    protocol: Protocol,
    denial: &Denial,
) -> u16 {
    let retry_after = denial.retry_after.map(|d| d.as_secs().max(1).to_string());
    if protocol == Protocol::Grpc {
        let written = (|| -> Result<()> {
            let mut resp = ResponseHeader::build(200, Some(4))?;
            resp.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
            resp.insert_header("grpc-status", denial.grpc_code.as_str())?;
            resp.insert_header("grpc-message", denial.message.as_str())?;
            if let Some(secs) = &retry_after {
                resp.insert_header(http::header::RETRY_AFTER, secs.as_str())?;
            }
            match session.as_downstream_mut() {
                HttpSession::H2(h2) => h2.write_response_header(Box::new(resp), true),
                _ => Err(Error::explain(
                    InternalError,
                    "gRPC on a non-HTTP/2 session",
                )),
            }
        })();
        if let Err(e) = written {
            tracing::debug!(error = %e, "could not write the gRPC error response");
        }
        200
    } else {
        let written = async {
            let body = Bytes::from(format!("{}\n", denial.message));
            let mut resp = ResponseHeader::build(denial.http_status, Some(4))?;
            resp.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
            resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
            if let Some(secs) = &retry_after {
                resp.insert_header(http::header::RETRY_AFTER, secs.as_str())?;
            }
            session.set_keepalive(None);
            session.write_response_header(Box::new(resp), false).await?;
            session.write_response_body(Some(body), true).await
        };
        if let Err(e) = written.await {
            tracing::debug!(error = %e, "could not write the error response");
        }
        denial.http_status
    }
}

pub(super) fn unavailable(why: &str) -> Denial {
    Denial {
        http_status: 503,
        grpc_code: GrpcCode::Unavailable,
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
