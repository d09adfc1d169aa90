//! Test fixtures for the workspace's tests, over real sockets: per-test loopback subnets
//! ([`net`]), bounded waits ([`wait`]), a GitLab stand-in with the demo agent ([`gitlab`]),
//! kas pods on their own addresses and runtimes ([`pods`]), the `kas-edge` binary in front
//! of them with a generated self-signed certificate ([`edge`]) and the clients agents use
//! ([`clients`], [`gitops`]), a Kubernetes API stand-in ([`kube_api`]) with real `kubectl`
//! to drive it ([`kubectl`]), and an agentk stand-in that holds reverse tunnels and replays
//! requests through them ([`agent`]), and a local ACME CA ([`pebble`]).
//!
//! What differs between the crates' tests (their token, pod timings) is a [`Profile`] each
//! test crate defines once in its `tests/common/mod.rs`, with an [`edge::EdgeProfile`]
//! when its tests start the edge.

pub mod clients;
pub mod edge;
pub mod gitlab;
pub mod gitops;
pub mod kubectl;
pub mod metrics;
pub mod net;
pub mod pebble;
pub mod pods;
pub mod redis;
pub mod tls;
pub mod wait;

use kas::Config;

/// The agentk and Kubernetes API stand-ins live in `kas::dev`, which the local stack runs
/// too; the tests reach them here. The Kubernetes API stand-in is the only one: pods, watch,
/// logs, exec for kubectl and the agent, ConfigMaps with resourceVersions for the edge's
/// blocklist watch and `kas-edge block`.
pub use kas::dev::{agent, kube_api};

/// What one crate's tests want of the fixtures.
pub trait Profile: 'static {
    /// The demo agent's token: the stand-in knows it, the tests send it.
    const TOKEN: &'static str;
    /// Tokens the stand-in knows but refuses (403), as GitLab does for a revoked agent.
    const FORBIDDEN_TOKENS: &'static [&'static str] = &[];
    /// `observability.logging.level` in the demo agent's configuration file.
    const AGENT_LOG_LEVEL: &'static str = "debug";

    /// A pod's settings after the fixture's own (listeners, GitLab address and secret) and
    /// before a test's tweak.
    fn pod_config(_config: &mut Config) {}
}
