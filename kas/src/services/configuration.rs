use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use kas_proto::agent_configuration::agent_configuration_server::AgentConfiguration;
use kas_proto::agent_configuration::{ConfigurationRequest, ConfigurationResponse};

use super::Shared;
use crate::agent_config::{build_configuration, ConfigSourceError};
use crate::auth::Agent;

pub struct AgentConfigurationService {
    shared: Arc<Shared>,
}

impl AgentConfigurationService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Reads the configuration if the branch moved past `last_commit`.
async fn fetch_if_changed(
    shared: &Shared,
    agent: &Agent,
    last_commit: &str,
) -> Result<Option<ConfigurationResponse>, ConfigSourceError> {
    let head = shared.config_source.head_commit(agent).await?;
    if head == last_commit {
        return Ok(None);
    }
    let file = shared.config_source.config_file(agent, &head).await?;
    let configuration =
        build_configuration(file.as_deref(), &agent.info, &shared.gitlab_external_url)?;
    Ok(Some(ConfigurationResponse {
        configuration: Some(configuration),
        commit_id: head,
    }))
}

async fn poll_loop(
    shared: Arc<Shared>,
    agent: Agent,
    mut last_commit: String,
    tx: mpsc::Sender<Result<ConfigurationResponse, Status>>,
) {
    let events = &shared.metrics.config_events;
    loop {
        match fetch_if_changed(&shared, &agent, &last_commit).await {
            Ok(Some(response)) => {
                let commit = response.commit_id.clone();
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                events.with_label_values(&["sent"]).inc();
                tracing::info!(agent_id = agent.info.agent_id, commit_id = %commit, "sent agent configuration");
                last_commit = commit;
            }
            Ok(None) => {}
            // GitLab hiccups are retried at the next poll; the agent keeps its config.
            Err(ConfigSourceError::Gitlab(e)) if !e.is_definite() => {
                events.with_label_values(&["gitlab_unavailable"]).inc();
                tracing::warn!(agent_id = agent.info.agent_id, error = %e, "cannot poll agent configuration");
            }
            Err(e) => {
                events.with_label_values(&["rejected"]).inc();
                tracing::warn!(agent_id = agent.info.agent_id, error = %e, "agent configuration stream ends");
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.poll_interval) => {}
            _ = tx.closed() => return,
            _ = shared.end_streams.cancelled() => return,
        }
    }
}

#[tonic::async_trait]
impl AgentConfiguration for AgentConfigurationService {
    type GetConfigurationStream = ReceiverStream<Result<ConfigurationResponse, Status>>;

    async fn get_configuration(
        &self,
        request: Request<ConfigurationRequest>,
    ) -> Result<Response<Self::GetConfigurationStream>, Status> {
        let agent = self.shared.auth.authenticate(request.metadata()).await?;
        let request = request.into_inner();
        let guard = self.shared.stream_guard("GetConfiguration");
        let (tx, rx) = mpsc::channel(1);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            poll_loop(shared, agent, request.commit_id, tx).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
