//! What the stand-in received: every request's method, path, query, headers and (for plain
//! requests) body, so a test can assert what crossed kas and the agent — the `Impersonate-*`
//! headers that arrived, the credentials that did not.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string, without `?`; empty when there was none.
    pub query: String,
    /// Header names lower-cased, in arrival order, repeated names kept.
    pub headers: Vec<(String, String)>,
    /// The body of a plain (non-upgrade) request, up to [`super::MAX_BODY`].
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// Every value of header `name` (any case), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether any header's name starts with `prefix` (any case), e.g. `impersonate-`.
    pub fn has_header_prefix(&self, prefix: &str) -> bool {
        let prefix = prefix.to_ascii_lowercase();
        self.headers.iter().any(|(n, _)| n.starts_with(&prefix))
    }

    /// The decoded values of query parameter `name`, in order.
    pub fn query_all(&self, name: &str) -> Vec<String> {
        super::query::pairs(&self.query)
            .into_iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }
}

/// The requests kept: the most recent ones (a load test sends millions).
pub const KEPT_REQUESTS: usize = 10_000;

#[derive(Default)]
pub struct Recorder {
    requests: Mutex<VecDeque<RecordedRequest>>,
}

impl Recorder {
    pub fn push(&self, request: RecordedRequest) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if requests.len() >= KEPT_REQUESTS {
            requests.pop_front();
        }
        requests.push_back(request);
    }

    pub fn all(&self) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}
