//! What every request path of the edge shares (pingora's, [`super::h1`], [`super::h2`]):
//! the checks that refuse a request before any pod is involved, and the pods it goes to.

use std::sync::Arc;

use super::refusal::{header_too_large, unavailable, Denial};
use crate::policy::Policies;
use crate::telemetry::metrics::EdgeMetrics;
use crate::upstream::connect::PodConnector;
use crate::upstream::pool::Pool;
use crate::upstream::route::Routes;

/// What every request path of the edge shares (pingora's, [`h1`], [`h2`]): the policies
/// and pods a request is checked against and sent to, and the metrics it is counted in.
pub struct RequestGate {
    pub policies: Arc<Policies>,
    pub pool: Arc<Pool>,
    pub metrics: EdgeMetrics,
    /// Connects requests to pods, trying another when one cannot be reached.
    pub connect: PodConnector,
    /// `downstream.max_request_header_bytes`.
    pub max_request_header_bytes: usize,
    /// Which port of a pod a path goes to (`upstream.routes`).
    pub routes: Routes,
}

impl RequestGate {
    /// Why a request is answered by the edge instead of a pod, checked in this order
    /// before any pod is involved: its head is over the limit, a policy refuses it, no
    /// pod is fit.
    pub(super) fn refused(
        &self,
        client: Option<std::net::IpAddr>,
        head_bytes: usize,
        headers: &http::HeaderMap,
    ) -> Option<Denial> {
        if head_bytes > self.max_request_header_bytes {
            return Some(header_too_large(head_bytes, self.max_request_header_bytes));
        }
        if let Some(refusal) = self.policies.check_request(client, headers) {
            return Some(Denial::from(refusal));
        }
        if !self.pool.any_accepting() {
            return Some(unavailable("no healthy kas pod"));
        }
        None
    }
}

/// `line` (method and target) plus the header block, with HTTP/1's separators.
pub(super) fn head_bytes(line: usize, headers: &http::HeaderMap) -> usize {
    headers.iter().fold(line + 12, |n, (name, value)| {
        n + name.as_str().len() + value.len() + 4
    })
}
