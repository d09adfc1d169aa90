//! kas-edge: the edge in front of kas pods.
//!
//! One module per concern, wired together in [`edge`]:
//! [`config`] (typed TOML) · [`tls`] (certificates, SNI, hot reload) · [`discovery`]
//! (static, DNS, EndpointSlices) · [`pool`] (pods, least in-flight) · [`health`] (active
//! checks on the observability port) · [`proxy`] (pingora `ProxyHttp`: gRPC over h2c,
//! websocket upgrades handed to [`tunnel`]) · [`metrics`] · [`admin`] (health, metrics, http→https) · [`acme`].

pub mod acme;
pub mod acme_publish;
pub mod admin;
pub mod blocklist;
pub mod config;
pub mod connections;
pub mod dev;
pub mod discovery;
pub mod edge;
pub mod filewatch;
pub mod health;
pub mod kubernetes;
pub mod metrics;
pub mod plain_http;
pub mod policy;
mod policy_file;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod rules;
pub mod tls;
mod tls_setup;
pub mod tunnel;

pub use config::EdgeConfig;
