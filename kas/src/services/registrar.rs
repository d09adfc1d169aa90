use std::sync::Arc;

use tonic::{Request, Response, Status};

use kas_proto::agent_registrar::agent_registrar_server::AgentRegistrar;
use kas_proto::agent_registrar::{RegisterRequest, RegisterResponse};

use super::Shared;

pub struct AgentRegistrarService {
    shared: Arc<Shared>,
}

impl AgentRegistrarService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl AgentRegistrar for AgentRegistrarService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let agent = self.shared.authenticate(&request).await?;
        let request = request.into_inner();
        let meta = request.agent_meta.unwrap_or_default();
        let info = super::connected_agent(&agent, Some(meta.clone()), request.pod_id);
        if let Err(e) = self.shared.agent_tracker.register_once(&info).await {
            tracing::warn!(agent_id = agent.info.agent_id, error = %e, "cannot record the agent as connected");
        }
        tracing::info!(
            agent_id = agent.info.agent_id,
            pod_id = request.pod_id,
            agent_version = %meta.version,
            pod_namespace = %meta.pod_namespace,
            pod_name = %meta.pod_name,
            "agent registered"
        );
        Ok(Response::new(RegisterResponse {}))
    }
}
