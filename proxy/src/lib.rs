//! kas-edge: the edge in front of kas pods.
//!
//! The modules are the layers a connection passes, outside in, wired together in [`app`]:
//! [`listener`] (accept, PROXY protocol, TLS, ACME) → [`connection`] (one registration per
//! client connection: limits, closing, tunnels) → [`http`] (pingora's `ProxyHttp`: policies
//! per request, gRPC over h2c, websocket upgrades) → [`upstream`] (discovery, health, pod
//! choice). [`policy`] holds the operator's decisions (blocklist, limits, header rules),
//! [`admin`] the private admin port and the public plain-HTTP listener, [`telemetry`]
//! metrics and logs, [`config`] the one typed configuration, [`operator`] the commands that
//! edit the blocklist every replica enforces (`kas-edge block`).

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
