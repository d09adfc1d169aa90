//! Layers 1–2: what happens to a connection before the proxy sees a request — admission
//! at accept, the PROXY protocol header from a trusted load balancer, TLS with hot-reloaded
//! certificates, and ACME to obtain them.

pub mod accept;
pub mod acme;
pub mod handshake;
pub mod handshake_slots;
pub mod proxy_protocol;
pub mod tls;
