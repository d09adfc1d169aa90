//! Who else must know which agents hold tunnels here, and how a call finds a tunnel.
//!
//! - [`TunnelTracker`]: told when an agent gets its first ready tunnel on this pod and when
//!   its last one is gone. The in-process default ([`NoTracker`]) tells nobody: a single
//!   process (`kas dev`, tests) routes to its own tunnels only. The Redis tracker
//!   (the `fleet` part) publishes it for the other pods.
//! - [`Router`]: what the Kubernetes API proxy calls to reach an agent. The registry itself
//!   is one (this pod's tunnels only); the `private_api` part has the fleet's (this pod, then
//!   the pods Redis names).

use tonic::Status;

use super::{Meta, TunnelCall, TunnelRegistry};

/// Told, under the registry's lock, when an agent's ready tunnels on this pod go from none
/// to some (`true`) and from some to none (`false`). Must not block: implementations note
/// the change and do their I/O elsewhere.
pub trait TunnelTracker: Send + Sync {
    fn set_has_tunnels(&self, agent_id: i64, has_tunnels: bool);
}

/// The in-process default: nothing outside this process needs to know.
pub struct NoTracker;

impl TunnelTracker for NoTracker {
    fn set_has_tunnels(&self, _agent_id: i64, _has_tunnels: bool) {}
}

/// Routes one call to a tunnel of `agent_id` serving `full_method`.
#[tonic::async_trait]
pub trait Router: Send + Sync {
    async fn route(
        &self,
        agent_id: i64,
        full_method: &str,
        meta: Meta,
    ) -> Result<TunnelCall, Status>;
}

#[tonic::async_trait]
impl Router for TunnelRegistry {
    async fn route(
        &self,
        agent_id: i64,
        full_method: &str,
        meta: Meta,
    ) -> Result<TunnelCall, Status> {
        TunnelRegistry::route(self, agent_id, full_method, meta).await
    }
}
