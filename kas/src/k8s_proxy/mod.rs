//! The Kubernetes API proxy (real kas's `agent.kubernetes_api`): `kubectl`, CI jobs and
//! GitLab's UI talk to `https://kas.example.com/k8s-proxy/…`; kas checks the caller with
//! GitLab, picks one of the named agent's idle tunnels and the agent replays the request
//! against its cluster's API server.
//!
//! - [`auth`]: the caller's credential (CI job token, personal access token, session
//!   cookie) and GitLab's answer, cached.
//! - `impersonation`: as whom the request runs in the cluster (sent to the agent).
//! - `headers`: what crosses the proxy (no credentials, no hop-by-hop headers; `Via`).
//! - `pipe`: the request and its answer through the tunnel, streamed both ways, upgrades
//!   included.
//! - `server`: the listener, path prefix, CORS and errors as Kubernetes `Status` objects.

pub mod auth;
mod headers;
mod impersonation;
mod pipe;
mod server;
mod status;
mod tls;

use std::io;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

pub use server::{serve, K8sProxy, K8sProxyMetrics};
pub use status::ProxyError;
pub use tls::acceptor as tls_acceptor;

/// Every response body of the proxy: errors, and the cluster's answers as they stream.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, io::Error>;

fn full_body(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty_body() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
