//! Reverse tunnels: the idle `ReverseTunnel/Connect` streams agents hold open so kas can
//! reach into their clusters, and routing one gRPC call through one of them.
//!
//! - [`registry`]: per agent, ready tunnels and requests waiting for one (bounded).
//! - [`forward`]: the agent's side of a tunnel carrying a call — the message order of
//!   `ConnectRequest`/`ConnectResponse` enforced both ways.
//! - [`TunnelRegistry::route`]: the caller's side — find a tunnel, hand it the call, get a
//!   [`TunnelCall`] to stream through.
//!
//! A tunnel carries exactly one call and then its stream ends; agentk opens a new one.

pub mod forward;
pub mod metrics;
pub mod registry;
pub mod tracker;

use std::collections::HashMap;

use bytes::Bytes;
use tokio::sync::mpsc;

use kas_proto::gitlab::agent::prototool::Values;
use kas_proto::gitlab::agent::reverse_tunnel::info::AgentDescriptor;

pub use metrics::TunnelMetrics;
pub use registry::{
    FindError, RegisterError, Registration, RegistryLimits, Tunnel, TunnelRegistry,
};
pub use tracker::{NoTracker, Router, TunnelTracker};

/// The service agentk's tunnels serve in v16: the Kubernetes API proxy's target.
pub const KUBERNETES_API_SERVICE: &str = "gitlab.agent.kubernetes_api.rpc.KubernetesApi";
/// Its one method, and the full name kas sends in `RequestInfo.method_name`.
pub const MAKE_REQUEST: &str = "MakeRequest";
pub const MAKE_REQUEST_FULL: &str = "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest";

/// The descriptor agentk v16 sends first on every tunnel (its internal server's only
/// service), for test agents and load agents that must look like agentk.
pub fn kubernetes_api_descriptor() -> AgentDescriptor {
    use kas_proto::gitlab::agent::reverse_tunnel::info::{Method, Service};
    AgentDescriptor {
        services: vec![Service {
            name: KUBERNETES_API_SERVICE.into(),
            methods: vec![Method {
                name: MAKE_REQUEST.into(),
            }],
        }],
    }
}

/// gRPC metadata as the tunnel protocol carries it (`map<string, prototool.Values>`).
pub type Meta = HashMap<String, Values>;

/// Messages a call may queue towards the agent before the sender waits: backpressure from
/// a slow agent reaches the caller within a few messages.
const CHANNEL_DEPTH: usize = 8;

/// What an agent's tunnel serves: the services and methods of its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    services: Vec<(String, Vec<String>)>,
}

impl Descriptor {
    /// Checks the descriptor as real kas's validation does: every service and method has a
    /// name.
    pub fn from_proto(d: AgentDescriptor) -> Result<Self, String> {
        let mut services = Vec::with_capacity(d.services.len());
        for service in d.services {
            if service.name.is_empty() {
                return Err("descriptor names a service without a name".into());
            }
            let mut methods = Vec::with_capacity(service.methods.len());
            for method in service.methods {
                if method.name.is_empty() {
                    return Err(format!(
                        "descriptor of service {} names a method without a name",
                        service.name
                    ));
                }
                methods.push(method.name);
            }
            services.push((service.name, methods));
        }
        Ok(Self { services })
    }

    /// Exact match, as real kas: the first service with that name, then the method in it.
    pub fn supports(&self, service: &str, method: &str) -> bool {
        self.services
            .iter()
            .find(|(name, _)| name == service)
            .is_some_and(|(_, methods)| methods.iter().any(|m| m == method))
    }
}

/// Splits `/package.Service/Method` at its last `/` into service and method.
pub fn split_method(full: &str) -> Option<(&str, &str)> {
    let (service, method) = full.rsplit_once('/')?;
    let service = service.strip_prefix('/').unwrap_or(service);
    (!service.is_empty() && !method.is_empty()).then_some((service, method))
}

/// Towards the agent, after the request info.
#[derive(Debug)]
pub enum ToAgent {
    /// One raw gRPC message of the call.
    Message(Bytes),
    /// The caller sent everything.
    CloseSend,
}

/// From the agent, in the order the protocol allows: `Header`, `Message`*, `Trailer`, then
/// optionally `Error`; or `Error` alone.
#[derive(Debug)]
pub enum FromAgent {
    Header(Meta),
    Message(Bytes),
    Trailer(Meta),
    /// The call failed: the agent's status, or the tunnel broke (the agent left, it broke
    /// the message order).
    Error(tonic::Status),
}

/// A call handed to a tunnel: what the tunnel's stream sends the agent first, and the two
/// directions of the call.
pub struct Routed {
    pub method_name: String,
    pub meta: Meta,
    pub to_agent: mpsc::Receiver<ToAgent>,
    pub from_agent: mpsc::Sender<FromAgent>,
}

/// The caller's side of a call routed through a tunnel.
pub struct TunnelCall {
    pub to_agent: CallSender,
    /// Ends (channel closed) after the agent's last message; closed without a trailer or
    /// error when kas ended the tunnel cleanly (drain).
    pub from_agent: mpsc::Receiver<FromAgent>,
}

impl TunnelCall {
    /// A call with its two ends apart: the caller's [`TunnelCall`], and what carries it
    /// (a local tunnel's stream, or a stream to the pod holding the tunnel).
    pub fn pair() -> (Self, mpsc::Receiver<ToAgent>, mpsc::Sender<FromAgent>) {
        let (to_tx, to_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (from_tx, from_rx) = mpsc::channel(CHANNEL_DEPTH);
        let call = TunnelCall {
            to_agent: CallSender { tx: to_tx },
            from_agent: from_rx,
        };
        (call, to_rx, from_tx)
    }
}

/// Sends the call's messages to the agent; [`CallSender::close_send`] consumes it, so
/// nothing can follow the half-close.
pub struct CallSender {
    tx: mpsc::Sender<ToAgent>,
}

impl CallSender {
    /// Queues one message; `false` once the tunnel is gone.
    pub async fn send(&self, message: Bytes) -> bool {
        self.tx.send(ToAgent::Message(message)).await.is_ok()
    }

    /// Half-closes the call.
    pub async fn close_send(self) -> bool {
        self.tx.send(ToAgent::CloseSend).await.is_ok()
    }
}

impl TunnelRegistry {
    /// Routes a call for `full_method` to one of `agent_id`'s tunnels, waiting for one up
    /// to the find timeout. A tunnel whose stream ended between being found and being used
    /// is skipped for the next.
    pub async fn route(
        &self,
        agent_id: i64,
        full_method: &str,
        meta: Meta,
    ) -> Result<TunnelCall, tonic::Status> {
        let (service, method) = split_method(full_method).ok_or_else(|| {
            tonic::Status::invalid_argument(format!("malformed method name {full_method:?}"))
        })?;
        let deadline = tokio::time::Instant::now() + self.limits().find_timeout;
        let (call, to_rx, from_tx) = TunnelCall::pair();
        let mut routed = Routed {
            method_name: full_method.to_owned(),
            meta,
            to_agent: to_rx,
            from_agent: from_tx,
        };
        loop {
            let started = std::time::Instant::now();
            let tunnel =
                match tokio::time::timeout_at(deadline, self.find(agent_id, service, method)).await
                {
                    Ok(found) => found?,
                    // This deadline and the find's own timeout end together; whichever fires
                    // first, the timeout is counted once.
                    Err(_) => {
                        let timed_out: Result<(), FindError> = Err(FindError::NotConnected);
                        self.count_routing(started, &timed_out);
                        return Err(FindError::NotConnected.into());
                    }
                };
            match tunnel.start(routed) {
                Ok(()) => return Ok(call),
                Err(back) => routed = back,
            }
        }
    }
}

#[cfg(test)]
mod tests;
