//! Reading repositories from Gitaly, as real kas does: the agent configuration file and
//! GitOps manifests come from the Gitaly server GitLab names in `agent_info`
//! (`gitaly_info`, `gitaly_repository`, see [`crate::gitlab::GitalyLocation`]), not from
//! GitLab's REST API (which does not accept agent tokens).
//!
//! - [`token`]: the v2 HMAC token signed fresh for every call.
//! - [`GitalyPool`]: one HTTP/2 channel per Gitaly address, a global and a per-server rate
//!   limit, a deadline on every call, `kas_gitaly_requests_total{rpc,outcome}`.
//! - [`GitalyConfigSource`]: the [`crate::sources::ConfigSource`] built on them.

mod client;
mod config_source;
pub mod token;

pub use client::{GitalyError, GitalyLimits, GitalyPool, TreeEntryInfo};
pub use config_source::{branch_head, GitalyConfigSource};
