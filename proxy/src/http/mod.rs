//! Layer 4, the requests. HTTP/2 connections (gRPC agents) are served by the edge's own
//! forwarder ([`h2`]); plain HTTP/1.1 requests by its own HTTP/1.1 loop ([`h1`]); what
//! that loop leaves to pingora goes through pingora's `ProxyHttp` seam ([`proxy_http`]):
//! websocket upgrades ([`websocket`]) and other HTTP/1.1 requests. All of them pass the
//! same [`RequestGate`] (refusals before any pod, the pods they go to).

mod access_log;
mod dial;
mod framing;
mod gate;
pub mod h1;
pub mod h2;
pub mod headers;
mod protocol;
mod proxy_http;
mod refusal;
pub mod websocket;

use gate::head_bytes;
pub use gate::RequestGate;
pub use protocol::Protocol;
pub use proxy_http::{EdgeProxy, RequestCtx};
