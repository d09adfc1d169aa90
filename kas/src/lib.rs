//! A stateless GitLab agent server (kas).
//!
//! Agents connect over gRPC (h2c) or gRPC over a `ws-tunnel` websocket on one port; every
//! request is authenticated with GitLab and every fact comes from GitLab, so any pod can
//! serve any agent and pods can come and go behind the edge.
//!
//! Layout: [`config`] (typed settings) → [`server`] (wiring and drain) → [`listener`]
//! (transports) → [`services`] (gRPC) → [`auth`], [`agent_config`] → [`gitlab`] (the one
//! place that talks to GitLab) and [`gitaly`] (repositories; [`head_poller`] shares the
//! polling). [`gitlab_standin`], [`gitaly::standin`] and [`devstack`] run a local system.

pub mod agent_config;
pub mod auth;
pub mod config;
mod config_files;
pub mod devstack;
pub mod gitaly;
pub mod gitlab;
pub mod gitlab_standin;
pub mod gitops;
pub mod head_poller;
pub mod kascfg;
mod listener;
pub mod logging;
pub mod metrics;
mod observability;
pub mod server;
mod services;
mod single_flight;
pub mod wstunnel;

pub use config::Config;
pub use server::BoundKas;
