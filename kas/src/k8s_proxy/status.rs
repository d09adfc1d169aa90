//! Errors as Kubernetes `Status` objects, the way kubectl and client-go read them: kubectl
//! prints `message`, and a 401 carries `Gitlab-Unauthorized: true` so a client can tell
//! GitLab's refusal from the cluster's.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::ProxyBody;

/// One error answer of the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub code: StatusCode,
    pub message: String,
}

impl ProxyError {
    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, message)
    }

    /// Kubernetes' `reason` for the status code.
    fn reason(&self) -> &'static str {
        match self.code {
            StatusCode::BAD_REQUEST => "BadRequest",
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
            StatusCode::GATEWAY_TIMEOUT => "Timeout",
            _ => "InternalError",
        }
    }

    /// The JSON `Status` object, message prefixed like real kas's.
    pub fn body(&self) -> String {
        serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("GitLab Agent Server: {}", self.message),
            "reason": self.reason(),
            "code": self.code.as_u16(),
        })
        .to_string()
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(super::full_body(Bytes::from(self.body())));
        *response.status_mut() = self.code;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.code == StatusCode::UNAUTHORIZED {
            headers.insert("gitlab-unauthorized", HeaderValue::from_static("true"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_object_kubectl_can_read() {
        let e = ProxyError::unauthorized("no valid credentials provided");
        let v: serde_json::Value = serde_json::from_str(&e.body()).expect("json");
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["reason"], "Unauthorized");
        assert_eq!(v["code"], 401);
        assert_eq!(
            v["message"],
            "GitLab Agent Server: no valid credentials provided"
        );
        let r = e.into_response();
        assert_eq!(r.headers()["gitlab-unauthorized"], "true");
    }
}
