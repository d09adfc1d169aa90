//! The gRPC services kas offers agents. Each authenticates its caller through GitLab, so
//! any kas pod can serve any agent.

mod configuration;
mod diagnostics;
mod gitops;
mod registrar;
mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::service::Routes;

use kas_proto::agent_configuration::agent_configuration_server::AgentConfigurationServer;
use kas_proto::agent_registrar::agent_registrar_server::AgentRegistrarServer;
use kas_proto::diagnostics::diagnostics_server::DiagnosticsServer;
use kas_proto::gitops::gitops_server::GitopsServer;
use kas_proto::reverse_tunnel::reverse_tunnel_server::ReverseTunnelServer;

use crate::agent::config_files::ConfigFiles;
use crate::agent::gitops::{GitopsLimits, ProjectInfoCache};
use crate::auth::Agent;
use crate::auth::Authenticator;
use crate::sources::gitaly::{GitalyError, GitalyPool};
use crate::sources::{ConfigSource, ConfigSourceError};
use crate::sync::head_poller::HeadPollers;
use crate::telemetry::metrics::{GaugeGuard, Metrics};
use crate::transport::AgentConnection;
use crate::tunnel::TunnelRegistry;

/// State every service shares.
pub struct Shared {
    pub auth: Authenticator,
    pub config_source: Arc<dyn ConfigSource>,
    /// One head poller per (repository, branch), shared by all configuration streams.
    pub head_pollers: Arc<HeadPollers<ConfigSourceError>>,
    /// Configuration files read once per commit for every stream that needs them.
    pub config_files: ConfigFiles,
    /// Gitaly servers, for GitOps manifest projects.
    pub gitaly: Arc<GitalyPool>,
    /// One head poller per manifest project and branch, shared by all GitOps streams.
    pub gitops_pollers: Arc<HeadPollers<GitalyError>>,
    pub gitops_limits: GitopsLimits,
    /// GitLab's `project_info` answers for GitOps streams.
    pub project_info: ProjectInfoCache,
    pub metrics: Metrics,
    pub poll_interval: Duration,
    pub max_config_file_bytes: usize,
    pub gitlab_external_url: String,
    /// Reported by the diagnostics service so callers can see which pod answered.
    pub pod_name: String,
    /// Idle reverse tunnels of the agents connected here, and requests waiting for them.
    pub tunnels: TunnelRegistry,
    /// Cancelled at the drain deadline: long-lived streams end with OK so agents
    /// reconnect elsewhere instead of being cut.
    pub end_streams: CancellationToken,
    /// Connected agents, for GitLab (in Redis with a fleet).
    pub agent_tracker: crate::fleet::AgentTracker,
    /// New calls per token and minute across the fleet (with Redis only).
    pub token_limiter: Option<crate::fleet::TokenLimiter>,
}

/// What the agent tracker records of a connection: its metadata, when, and who.
fn connected_agent(
    agent: &Agent,
    meta: Option<kas_proto::entity::AgentMeta>,
    connection_id: i64,
) -> kas_proto::agent_tracker::ConnectedAgentInfo {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    kas_proto::agent_tracker::ConnectedAgentInfo {
        agent_meta: meta,
        connected_at: Some(prost_types::Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
        }),
        connection_id,
        agent_id: agent.info.agent_id,
        project_id: agent.info.project_id,
    }
}

impl Shared {
    /// Cancelled when a parked stream of `request`'s connection must end with OK: the
    /// connection reached its age or the pod's drain deadline passed.
    fn stream_end<T>(&self, request: &tonic::Request<T>) -> CancellationToken {
        request
            .extensions()
            .get::<AgentConnection>()
            .map(|conn| conn.end.clone())
            .unwrap_or_else(|| self.end_streams.clone())
    }

    /// Checks the caller's token with GitLab; the first success on a connection lifts its
    /// pre-authentication websocket message limit.
    async fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<Agent, tonic::Status> {
        if let Some(limiter) = &self.token_limiter {
            if let Ok(token) = crate::auth::AgentToken::from_metadata(request.metadata()) {
                if !limiter.allow(token.expose()).await {
                    return Err(tonic::Status::resource_exhausted(
                        "new connection rate limit exhausted for this agent, try again later",
                    ));
                }
            }
        }
        let agent = self.auth.authenticate(request.metadata()).await?;
        if let Some(conn) = request.extensions().get::<AgentConnection>() {
            conn.authenticated
                .store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(agent)
    }

    fn stream_guard(&self, method: &str) -> GaugeGuard {
        GaugeGuard::hold(self.metrics.streams.with_label_values(&[method]))
    }
}

/// All agent-facing services as one router, shared by the h2c and websocket paths.
pub fn routes(shared: Arc<Shared>) -> Routes {
    // agentk compresses every call with gzip; answer in kind.
    let gzip = CompressionEncoding::Gzip;
    let health = {
        let (reporter, service) = tonic_health::server::health_reporter();
        // The reporter only needs to live while the status is set; SERVING is the default
        // for the empty service name, and readiness is handled on the observability port.
        drop(reporter);
        service
    };
    Routes::new(
        AgentConfigurationServer::new(configuration::AgentConfigurationService::new(
            shared.clone(),
        ))
        .accept_compressed(gzip)
        .send_compressed(gzip),
    )
    .add_service(
        AgentRegistrarServer::new(registrar::AgentRegistrarService::new(shared.clone()))
            .accept_compressed(gzip)
            .send_compressed(gzip),
    )
    .add_service(
        ReverseTunnelServer::new(tunnel::ReverseTunnelService::new(shared.clone()))
            .accept_compressed(gzip)
            .send_compressed(gzip),
    )
    .add_service(
        GitopsServer::new(gitops::GitopsService::new(shared.clone()))
            .accept_compressed(gzip)
            .send_compressed(gzip),
    )
    .add_service(
        DiagnosticsServer::new(diagnostics::DiagnosticsService::new(shared))
            .accept_compressed(gzip),
    )
    .add_service(health)
}
