//! The API port GitLab calls (real kas's `api.listen`, `:8153`), gRPC with a JWT in
//! `authorization: Bearer` (HS256, audience `gitlab-kas`, signed with
//! `api.authentication_secret_file`; GitLab's host as issuer, not checked, as real kas):
//!
//! - `AgentTracker/GetConnectedAgents`: the agents connected to the fleet, by project or
//!   by agent ([`crate::fleet::AgentTracker`]);
//! - `Notifications/GitPushEvent`: a push to a project; published on Redis so every pod
//!   polls that project's configuration at once ([`crate::fleet::events`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use kas_proto::agent_tracker::rpc::agent_tracker_server::{
    AgentTracker as AgentTrackerRpc, AgentTrackerServer,
};
use kas_proto::agent_tracker::rpc::get_connected_agents_request::Request as ByWhat;
use kas_proto::agent_tracker::rpc::{GetConnectedAgentsRequest, GetConnectedAgentsResponse};
use kas_proto::notifications::notifications_server::{Notifications, NotificationsServer};
use kas_proto::notifications::{GitPushEventRequest, GitPushEventResponse};

use crate::config::Config;
use crate::fleet::events::{self, OnPush};
use crate::fleet::{jwt, AgentTracker, Redis};
use crate::gitlab::SharedSecret;

/// The API port, bound.
pub struct ApiServer {
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    secret: SharedSecret,
    tracker: AgentTracker,
    redis: Option<Arc<Redis>>,
    on_push: OnPush,
}

impl ApiServer {
    /// Reads the secret and binds `api.listen`; `None` when it is not configured.
    pub async fn bind(
        config: &Config,
        tracker: AgentTracker,
        redis: Option<Arc<Redis>>,
        on_push: OnPush,
    ) -> anyhow::Result<Option<Self>> {
        let Some(listen) = config.api.listen else {
            return Ok(None);
        };
        let secret = SharedSecret::from_file(&config.api.authentication_secret_file)
            .context("api.authentication_secret_file")?;
        let tls = crate::private_api::server_tls(
            "api",
            &config.api.certificate_file,
            &config.api.key_file,
        )?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on api.listen = {listen}"))?;
        Ok(Some(Self {
            listener,
            tls,
            secret,
            tracker,
            redis,
            on_push,
        }))
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop`.
    pub async fn serve(self, stop: CancellationToken) {
        let handler = Arc::new(Handler {
            tracker: self.tracker,
            redis: self.redis,
            on_push: self.on_push,
        });
        let secret = self.secret;
        let auth = move |request: Request<()>| {
            jwt::verify(request.metadata(), &secret, None)?;
            Ok(request)
        };
        // Small frames go out at once (no Nagle wait on the peer's delayed ACK).
        let incoming = tonic::transport::server::TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            match builder.tls_config(tls) {
                Ok(b) => builder = b,
                Err(e) => {
                    tracing::error!(error = %e, "API port TLS configuration");
                    return;
                }
            }
        }
        let result = builder
            .http2_keepalive_interval(Some(Duration::from_secs(50)))
            // GitLab's calls are short unary ones (its client gives up after 5 s).
            .timeout(Duration::from_secs(10))
            .max_concurrent_streams(Some(100))
            .add_service(AgentTrackerServer::with_interceptor(
                Api(handler.clone()),
                auth.clone(),
            ))
            .add_service(NotificationsServer::with_interceptor(Api(handler), auth))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "API server failed");
        }
    }
}

struct Handler {
    tracker: AgentTracker,
    redis: Option<Arc<Redis>>,
    on_push: OnPush,
}

struct Api(Arc<Handler>);

#[tonic::async_trait]
impl AgentTrackerRpc for Api {
    async fn get_connected_agents(
        &self,
        request: Request<GetConnectedAgentsRequest>,
    ) -> Result<Response<GetConnectedAgentsResponse>, Status> {
        let agents = match request.into_inner().request {
            Some(ByWhat::AgentId(id)) => self.0.tracker.by_agent(id).await,
            Some(ByWhat::ProjectId(id)) => self.0.tracker.by_project(id).await,
            None => {
                return Err(Status::invalid_argument(
                    "one of project_id and agent_id is required",
                ))
            }
        }
        .map_err(|e| Status::unavailable(format!("GetConnectedAgents: {e}")))?;
        Ok(Response::new(GetConnectedAgentsResponse { agents }))
    }
}

#[tonic::async_trait]
impl Notifications for Api {
    async fn git_push_event(
        &self,
        request: Request<GitPushEventRequest>,
    ) -> Result<Response<GitPushEventResponse>, Status> {
        let event = request
            .into_inner()
            .event
            .ok_or_else(|| Status::invalid_argument("GitPushEvent without an event"))?;
        let project = event
            .project
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("GitPushEvent without a project"))?;
        tracing::info!(project_id = project.id, project = %project.full_path, "git push event");
        match &self.0.redis {
            // Every pod hears it on kas_events, this one included.
            Some(redis) => events::publish(redis, &event)
                .await
                .map_err(|e| Status::unavailable(format!("GitPushEvent: {e}")))?,
            None => (self.0.on_push)(&event),
        }
        Ok(Response::new(GitPushEventResponse {}))
    }
}

/// The API port and the fleet's background work for it: the agent tracker's writes and the
/// `kas_events` subscription.
pub struct ApiTasks {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ApiTasks {
    pub fn start(
        api: Option<ApiServer>,
        tracker: AgentTracker,
        redis: Option<Arc<Redis>>,
        on_push: OnPush,
        config: &crate::config::RedisConfig,
    ) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        if let Some(redis) = redis {
            tasks.push(tokio::spawn(tracker.run(
                config.conn_info_refresh,
                config.conn_info_gc,
                stop.clone(),
            )));
            tasks.push(tokio::spawn(events::subscribe(
                redis,
                on_push,
                stop.clone(),
            )));
        }
        if let Some(api) = api {
            tasks.push(tokio::spawn(api.serve(stop.clone())));
        }
        Self { stop, tasks }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(6), task).await;
        }
    }
}
