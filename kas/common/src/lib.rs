//! What kas and the edge must do identically, in a crate both can use without the edge
//! linking kas's server: one log format, one way to register metrics, one parser for the
//! agent's `authorization` header.

pub mod auth;
pub mod logging;
pub mod metrics;
