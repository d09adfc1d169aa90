//! A stateless GitLab agent server (kas).
//!
//! Agents connect over gRPC (h2c) or gRPC over a `ws-tunnel` websocket on one port; every
//! request is authenticated with GitLab and every fact comes from GitLab, so any pod can
//! serve any agent and pods can come and go behind the edge.
//!
//! The parts, each a folder, from the outside in (a part uses only parts listed after it):
//!
//! - [`server`]: wiring only — builds the parts from [`config`], runs the listeners and the
//!   drain order the edge depends on.
//! - [`transport`]: the agent port (h2c and the `ws-tunnel` websocket on one listener,
//!   connection age, pre-auth message limits).
//! - `services`: the gRPC services, thin — decode, call [`agent`] or [`tunnel`], encode.
//! - [`api`]: the port GitLab calls — connected agents, push notifications.
//! - [`private_api`]: the fleet — the private API other pods reach this pod's tunnels on,
//!   and the router that finds an agent's tunnel on this pod or another.
//! - [`fleet`]: Redis — which pod holds which agent's tunnels (written as real kas v16
//!   does), polled once per agent.
//! - [`tunnel`]: reverse tunnels — per agent the idle tunnels and the requests waiting
//!   for one, and one call carried through a tunnel with the protocol's message order.
//! - [`agent`]: what an agent is served — its configuration built from `config.yaml`, the
//!   configuration-file cache, GitOps manifests.
//! - [`sources`]: where repository content comes from — the [`sources::ConfigSource`]
//!   trait, Gitaly ([`sources::gitaly`]: client, v2 token, pool) and GitLab's REST API.
//! - [`auth`]: agent tokens checked with GitLab, cached, single-flight, revalidated.
//! - [`gitlab`]: the one place that talks to GitLab's internal API (client, JWT, secret).
//! - [`sync`]: shared pollers and single-flight, the pieces that make a thousand streams
//!   cost one call.
//! - [`config`]: one validated structure, from kas.toml or real kas's YAML (kascfg).
//! - [`telemetry`]: metrics, the observability port, logging.
//! - [`dev`] (feature `dev`, off in the container builds): the GitLab and Gitaly stand-ins
//!   and the local stack behind `kas dev` / `kas-edge dev`.
//!
//! The Kubernetes API proxy ([`k8s_proxy`], on `agent.kubernetes_api.listen`) calls a
//! [`tunnel::Router`]: the registry alone, or the fleet's ([`private_api`]).

pub mod agent;
pub mod api;
pub mod auth;
pub mod config;
#[cfg(feature = "dev")]
pub mod dev;
pub mod fleet;
pub mod gitlab;
pub mod k8s_proxy;
pub mod private_api;
pub mod server;
mod services;
pub mod sources;
pub mod sync;
pub mod telemetry;
pub mod transport;
pub mod tunnel;

pub use config::Config;
pub use server::BoundKas;
