//! The HTTP side of a proxied request: kas's `HttpRequest.Header` made into a request to
//! the configured API server (impersonation applied, `Via` appended), and the answer's head
//! made into an `HttpResponse.Header`. Connections to the API server are pooled, as
//! agentk's transports are.

use std::collections::HashMap;
use std::convert::Infallible;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING, VIA};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kas_proto::grpctool::http_request;
use kas_proto::prototool::Values;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Code;

use super::inbound::Failure;
use super::{impersonation, url};

pub type RequestBody = BoxBody<Bytes, Infallible>;

/// The agent's client to its cluster's API server.
pub struct Upstream {
    client: Client<HttpConnector, RequestBody>,
    base: String,
    /// The `Via` product, e.g. `gitlab-agent/kas-testkit`.
    via: String,
}

impl Upstream {
    pub fn new(base: &str, via: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: base.to_owned(),
            via: via.to_owned(),
        }
    }

    /// The request kas described, with its body read from `body` unless kas said there is
    /// none (`content_length == 0`; agentk sends no body then, which SPDY upgrades need).
    pub fn build(
        &self,
        head: &http_request::Header,
        body: mpsc::Receiver<Bytes>,
    ) -> Result<Request<RequestBody>, Failure> {
        let invalid = |m: String| (Code::InvalidArgument, m);
        let req = head
            .request
            .as_ref()
            .ok_or_else(|| invalid("HttpRequest.Header without request".into()))?;
        let method = Method::from_bytes(req.method.as_bytes())
            .map_err(|e| invalid(format!("method {:?}: {e}", req.method)))?;
        let uri = url::build(&self.base, &req.url_path, &req.query);
        let mut headers = HeaderMap::new();
        for (name, values) in &req.header {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                return Err(invalid(format!("header name {name:?}")));
            };
            for value in &values.value {
                let value = HeaderValue::from_str(value)
                    .map_err(|e| invalid(format!("header {name} value: {e}")))?;
                headers.append(name.clone(), value);
            }
        }
        let impersonate = impersonation::config(head.extra.as_ref()).map_err(invalid)?;
        if let Some(config) = &impersonate {
            if impersonation::requested_by_client(&headers) {
                return Err((
                    Code::Unavailable,
                    "gRPC -> HTTP: nested impersonation is not supported".into(),
                ));
            }
            impersonation::apply(config, &mut headers).map_err(invalid)?;
        }
        if let Ok(via) = HeaderValue::from_str(&format!("gRPC/1.0 {}", self.via)) {
            headers.append(VIA, via);
        }
        headers.remove(CONTENT_LENGTH);
        headers.remove(TRANSFER_ENCODING);
        let content_length = head.content_length.unwrap_or(-1);
        let body: RequestBody = if content_length == 0 {
            Empty::new().boxed()
        } else {
            if content_length > 0 {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(content_length));
            }
            BodyExt::boxed(StreamBody::new(
                ReceiverStream::new(body).map(|b| Ok::<_, Infallible>(Frame::data(b))),
            ))
        };
        let mut request = Request::builder()
            .method(method)
            .uri(&uri)
            .body(body)
            .map_err(|e| invalid(format!("request to {uri}: {e}")))?;
        *request.headers_mut() = headers;
        Ok(request)
    }

    pub async fn send(&self, request: Request<RequestBody>) -> Result<Response<Incoming>, Failure> {
        self.client
            .request(request)
            .await
            .map_err(|e| (Code::Unavailable, format!("gRPC -> HTTP: {e:?}")))
    }

    /// The answer's head for kas: status, `"200 OK"`-style status text, headers under Go's
    /// canonical names (agentk's `http.Header`), `Via` appended. `Transfer-Encoding` is
    /// dropped: the body was de-chunked here and kas frames it anew.
    pub fn response_head(
        &self,
        response: &Response<Incoming>,
    ) -> (u16, String, HashMap<String, Values>) {
        let status = response.status();
        let text = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .trim_end()
        .to_owned();
        let mut header: HashMap<String, Values> = HashMap::new();
        for (name, value) in response.headers() {
            if name == TRANSFER_ENCODING {
                continue;
            }
            header
                .entry(canonical(name.as_str()))
                .or_default()
                .value
                .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
        let version = match response.version() {
            Version::HTTP_10 => "1.0",
            Version::HTTP_2 => "2.0",
            _ => "1.1",
        };
        header
            .entry("Via".into())
            .or_default()
            .value
            .push(format!("{version} {}", self.via));
        (status.as_u16(), text, header)
    }
}

/// Go's canonical MIME header key: `content-type` → `Content-Type`.
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    #[test]
    fn canonical_names() {
        assert_eq!(super::canonical("content-type"), "Content-Type");
        assert_eq!(
            super::canonical("x-kubernetes-pf-flowschema-uid"),
            "X-Kubernetes-Pf-Flowschema-Uid"
        );
        assert_eq!(super::canonical("www-authenticate"), "Www-Authenticate");
    }
}
