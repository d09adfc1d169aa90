use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use kas_proto::agent_configuration::agent_configuration_server::AgentConfiguration;
use kas_proto::agent_configuration::{ConfigurationRequest, ConfigurationResponse};

use super::Shared;
use crate::agent::configuration::build_configuration_limited;
use crate::auth::Agent;
use crate::sources::ConfigSourceError;
use crate::sync::driven::{driven, Yielder};
use crate::sync::head_poller::{jittered, PollFn};

/// A configuration that could not be read for a passing reason is tried again this soon
/// (or at the next poll interval, if shorter).
const READ_RETRY: Duration = Duration::from_secs(10);

pub struct AgentConfigurationService {
    shared: Arc<Shared>,
}

impl AgentConfigurationService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Reads and parses the configuration at `commit`.
async fn read_configuration(
    shared: &Shared,
    agent: &Agent,
    commit: &str,
) -> Result<ConfigurationResponse, ConfigSourceError> {
    // Keyed by the poll key (repository and branch), the commit and the agent (its file).
    let key = format!(
        "{}|{commit}|{}",
        shared.config_source.poll_key(agent),
        agent.info.agent_name
    );
    let (file, outcome) = shared
        .config_files
        .get(&key, || shared.config_source.config_file(agent, commit))
        .await;
    shared
        .metrics
        .config_file_reads
        .with_label_values(&[outcome.label()])
        .inc();
    let file = file?;
    let configuration = build_configuration_limited(
        file.as_ref().as_deref(),
        &agent.info,
        &shared.gitlab_external_url,
        shared.max_config_file_bytes,
    )?;
    Ok(ConfigurationResponse {
        configuration: Some(configuration),
        commit_id: commit.to_owned(),
    })
}

fn head_poll(shared: &Shared, agent: &Agent) -> PollFn<ConfigSourceError> {
    let source = shared.config_source.clone();
    let agent = agent.clone();
    Arc::new(move || {
        let (source, agent) = (source.clone(), agent.clone());
        Box::pin(async move { source.head_commit(&agent).await })
    })
}

async fn poll_loop(
    shared: Arc<Shared>,
    mut agent: Agent,
    mut last_commit: String,
    tx: Yielder<Result<ConfigurationResponse, Status>>,
    end: CancellationToken,
) {
    let events = &shared.metrics.config_events;
    let agent_id = agent.info.agent_id;
    let mut key = shared.config_source.poll_key(&agent);
    let mut heads = shared.head_pollers.subscribe_tagged(
        &key,
        Some(&agent.info.project_path),
        head_poll(&shared, &agent),
    );
    // The token is checked with GitLab again every cache TTL, so a revoked agent's stream
    // ends within about one TTL instead of living until the connection closes.
    let revalidate_every = shared.auth.success_ttl();
    let mut revalidate_at = Instant::now() + jittered(revalidate_every);
    loop {
        let state = heads.borrow_and_update().clone();
        let mut retry_at: Option<Instant> = None;
        match state.as_deref() {
            Some(Ok(Some(head))) if *head != last_commit => {
                match read_configuration(&shared, &agent, head).await {
                    Ok(response) => {
                        tx.send(Ok(response)).await;
                        events.with_label_values(&["sent"]).inc();
                        tracing::info!(agent_id, commit_id = %head, "sent agent configuration");
                        last_commit = head.clone();
                    }
                    Err(e) if e.is_final() => {
                        events.with_label_values(&["rejected"]).inc();
                        tracing::warn!(agent_id, commit_id = %head, error = %e, "agent configuration rejected; the stream ends with it");
                        tx.send(Err(e.into())).await;
                        return;
                    }
                    Err(e) => {
                        events.with_label_values(&["read_failed"]).inc();
                        tracing::warn!(agent_id, commit_id = %head, error = %e, "cannot read agent configuration; will retry");
                        retry_at =
                            Some(Instant::now() + jittered(READ_RETRY.min(shared.poll_interval)));
                    }
                }
            }
            Some(Ok(Some(_))) => {}
            Some(Ok(None)) => {
                events.with_label_values(&["empty_repository"]).inc();
                tracing::debug!(agent_id, "agent repository has no configuration branch yet");
            }
            Some(Err(e)) if e.is_final() => {
                events.with_label_values(&["rejected"]).inc();
                tx.send(Err(e.clone().into())).await;
                return;
            }
            Some(Err(e)) => {
                events.with_label_values(&["poll_failed"]).inc();
                tracing::debug!(agent_id, error = %e, "cannot poll agent configuration (the poller logs it once)");
            }
            None => {}
        }
        tokio::select! {
            changed = heads.changed() => {
                if changed.is_err() {
                    // The poller stopped: the pod is shutting down.
                    return;
                }
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
            _ = tokio::time::sleep_until(revalidate_at) => {
                revalidate_at = Instant::now() + jittered(revalidate_every);
                match shared.auth.revalidate(&agent.token).await {
                    Ok(info) => {
                        if info != agent.info {
                            agent.info = info;
                            let new_key = shared.config_source.poll_key(&agent);
                            if new_key != key {
                                tracing::info!(agent_id, "agent repository moved; following it");
                                key = new_key;
                                heads = shared.head_pollers.subscribe_tagged(&key, Some(&agent.info.project_path), head_poll(&shared, &agent));
                            }
                        }
                    }
                    Err(e) if e.is_definite() => {
                        events.with_label_values(&["token_revoked"]).inc();
                        tracing::info!(agent_id, outcome = e.outcome_label(), "agent token no longer accepted; ending its configuration stream");
                        tx.send(Err(e.into())).await;
                        return;
                    }
                    // GitLab unreachable: keep the stream, ask again later.
                    Err(_) => {}
                }
            }
            _ = end.cancelled() => return,
        }
    }
}

#[tonic::async_trait]
impl AgentConfiguration for AgentConfigurationService {
    type GetConfigurationStream = BoxStream<'static, Result<ConfigurationResponse, Status>>;

    async fn get_configuration(
        &self,
        request: Request<ConfigurationRequest>,
    ) -> Result<Response<Self::GetConfigurationStream>, Status> {
        let agent = self.shared.authenticate(&request).await?;
        let end = self.shared.stream_end(&request);
        let request = request.into_inner();
        let guard = self.shared.stream_guard("GetConfiguration");
        // Listed as connected while the stream lives (connection id: random, as real kas).
        let tracked = (!request.skip_register).then(|| {
            let id = rand::random::<i64>() & i64::MAX;
            let info = super::connected_agent(&agent, request.agent_meta.clone(), id);
            self.shared.agent_tracker.track(info)
        });
        let shared = self.shared.clone();
        // No task and no channel per agent: the response stream runs the poll loop (the
        // stream's end, the client going away, drops it where it waits).
        Ok(Response::new(Box::pin(driven(move |tx| async move {
            let _guard = guard;
            let _tracked = tracked;
            poll_loop(shared, agent, request.commit_id, tx, end).await;
        }))))
    }
}
