//! kas-edge: the edge in front of kas pods.
//!
//! The modules are the layers a connection passes, outside in, wired together in [`app`]:
//! [`listener`] (accept, PROXY protocol, TLS, ACME) → [`connection`] (one registration per
//! client connection: limits, closing, tunnels) → [`http`] (the requests: the edge's own
//! HTTP/2 forwarder for gRPC and HTTP/1.1 loop, pingora's `ProxyHttp` for what that loop
//! leaves to it, websocket upgrades, policies per request) → [`upstream`] (discovery,
//! health, pod choice, connecting to a pod). [`policy`] holds the operator's decisions
//! (blocklist, limits, header rules), [`admin`] the private admin port and the public
//! plain-HTTP listener, [`telemetry`] metrics and logs, [`config`] the one typed
//! configuration, [`operator`] the commands that edit the blocklist every replica enforces
//! (`kas-edge block`), [`support`] small helpers several layers share (the byte duplex
//! that carries websocket tunnels among them).

pub mod admin;
pub mod app;
pub mod config;
pub mod connection;
#[cfg(feature = "dev")]
pub mod dev;
pub mod http;
pub mod listener;
pub mod operator;
pub(crate) mod pingora_compat;
pub mod policy;
pub mod support;
pub mod telemetry;
pub mod upstream;

pub use config::EdgeConfig;
