//! Wires one kas instance together and runs its lifecycle, including the drain order the
//! edge depends on: readiness 503 → wait → stop accepting + GOAWAY → streams run until the
//! deadline → remaining streams end with OK → exit.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::agent::config_files::ConfigFiles;
use crate::api::{ApiServer, ApiTasks};
use crate::auth::Authenticator;
use crate::config::{Config, ConfigurationSourceKind};
use crate::fleet::events::OnPush;
use crate::fleet::AgentTracker;
use crate::gitlab::{GitlabClient, SharedSecret};
use crate::k8s_proxy::{self, auth::ProxyAuthorizer, K8sProxy, K8sProxyMetrics};
use crate::private_api::Fleet;
use crate::services::{self, Shared};
use crate::sources::gitaly::{GitalyConfigSource, GitalyPool};
use crate::sources::{ConfigSource, GitlabApiSource};
use crate::sync::head_poller::HeadPollers;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::observability::Observability;
use crate::transport::{self, Drain};
use crate::tunnel::{TunnelMetrics, TunnelRegistry};

/// After the deadline ends parked streams, connections get this long to say goodbye.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// Bound of the configuration file cache: at the 128 KiB file limit still 128 files, and
/// thousands of typical (few KiB) ones.
const CONFIG_FILE_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// A kas whose ports are bound (so tests can bind `:0` and learn the addresses) but that
/// does not serve until [`BoundKas::run`].
pub struct BoundKas {
    config: Config,
    agent_listener: TcpListener,
    obs_listener: TcpListener,
    /// The Kubernetes API proxy, when `kubernetes_api.listen` is set.
    k8s_proxy: Option<(TcpListener, Option<TlsAcceptor>, Arc<K8sProxy>)>,
    /// Redis, the tunnel tracker and the private API (off without `redis`/`private_api`).
    fleet: Fleet,
    /// The API port GitLab calls (off without `api.listen`), and what a push event wakes.
    api: Option<ApiServer>,
    on_push: OnPush,
    shared: Arc<Shared>,
}

async fn bind(addr: SocketAddr, field: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {field} = {addr}"))
}

impl BoundKas {
    /// Checks the configuration's external inputs (secret file, token file) and binds the
    /// ports. `pod_name` is reported by the diagnostics service and in logs.
    pub async fn bind(config: Config, pod_name: &str) -> anyhow::Result<Self> {
        config.validate()?;
        let secret = SharedSecret::from_file(&config.gitlab.authentication_secret_file)
            .context("gitlab.authentication_secret_file")?;
        let metrics = Metrics::new();
        let gitlab = GitlabClient::new(&config.gitlab, secret, &metrics)?;
        let gitaly = Arc::new(GitalyPool::new(
            config.gitaly.limits(),
            metrics.gitaly_requests.clone(),
        ));
        let config_source: Arc<dyn ConfigSource> = match config.agent_configuration.source {
            ConfigurationSourceKind::Gitaly => {
                if config.agent_configuration.api_token_file.is_some() {
                    tracing::warn!(
                        "agent_configuration.api_token_file is ignored: it is only used with \
                         source = \"gitlab_api\"; configuration is read from Gitaly"
                    );
                }
                Arc::new(GitalyConfigSource::new(
                    gitaly.clone(),
                    config.agent_configuration.max_configuration_file_size,
                ))
            }
            ConfigurationSourceKind::GitlabApi => {
                let token_file = config
                    .agent_configuration
                    .api_token_file
                    .as_deref()
                    .context(
                    "agent_configuration.api_token_file is required with source = \"gitlab_api\"",
                )?;
                Arc::new(GitlabApiSource::new(gitlab.clone(), token_file)?)
            }
        };
        let proxy_authorizer = ProxyAuthorizer::new(
            gitlab.clone(),
            config.kubernetes_api.allowed_agent_cache_ttl,
            config.kubernetes_api.allowed_agent_cache_error_ttl,
            config.gitlab.auth_cache_max_entries,
        );
        let auth = Authenticator::new(
            gitlab,
            metrics.clone(),
            config.gitlab.auth_cache_ttl,
            config.gitlab.auth_cache_error_ttl,
            config.gitlab.auth_cache_max_entries,
        );
        let agent_listener = bind(config.agent.listen, "agent.listen").await?;
        let obs_listener = bind(config.observability.listen, "observability.listen").await?;
        let k8s_proxy_listener = match config.kubernetes_api.listen {
            Some(addr) => Some(bind(addr, "kubernetes_api.listen").await?),
            None => None,
        };
        let (mut fleet, tracker) = Fleet::bind(&config, &metrics).await?;
        let tunnels = TunnelRegistry::with_tracker(
            config.reverse_tunnel.limits(),
            TunnelMetrics::new(metrics.registry()),
            tracker,
        );
        let router = fleet.router(&tunnels, config.reverse_tunnel.routing_timeout);
        let k8s_proxy_tls = match (
            &config.kubernetes_api.certificate_file,
            &config.kubernetes_api.key_file,
        ) {
            (Some(cert), Some(key)) => Some(k8s_proxy::tls_acceptor(cert, key)?),
            _ => None,
        };
        let k8s_proxy = k8s_proxy_listener.map(|listener| {
            let proxy = K8sProxy::new(
                config.k8s_proxy_prefix(),
                config.external_url(),
                proxy_authorizer,
                router,
                K8sProxyMetrics::new(metrics.registry()),
            );
            (listener, k8s_proxy_tls, Arc::new(proxy))
        });
        let end_streams = CancellationToken::new();
        let head_pollers = HeadPollers::new(
            config.agent_configuration.poll_interval,
            end_streams.clone(),
        );
        let gitops_pollers = HeadPollers::new(config.gitops.poll_interval, end_streams.clone());
        let on_push: OnPush = {
            let (config, gitops) = (head_pollers.clone(), gitops_pollers.clone());
            Arc::new(move |event| {
                if let Some(project) = &event.project {
                    config.wake(&project.full_path);
                    gitops.wake(&project.full_path);
                }
            })
        };
        let agent_tracker = AgentTracker::new(fleet.redis.clone(), config.redis.conn_info_ttl);
        let api = ApiServer::bind(
            &config,
            agent_tracker.clone(),
            fleet.redis.clone(),
            on_push.clone(),
        )
        .await?;
        let shared = Arc::new(Shared {
            auth,
            config_source,
            head_pollers,
            config_files: ConfigFiles::new(CONFIG_FILE_CACHE_BYTES),
            gitaly: gitaly.clone(),
            gitops_pollers,
            gitops_limits: config.gitops.limits(),
            project_info: crate::agent::gitops::ProjectInfoCache::new(
                config.gitops.project_info_cache_ttl,
                config.gitops.project_info_cache_error_ttl,
                config.gitlab.auth_cache_max_entries,
            ),
            metrics: metrics.clone(),
            poll_interval: config.agent_configuration.poll_interval,
            max_config_file_bytes: config.agent_configuration.max_configuration_file_size,
            gitlab_external_url: config.external_url().to_owned(),
            pod_name: pod_name.to_owned(),
            tunnels,
            end_streams,
            agent_tracker,
            token_limiter: fleet.redis.clone().map(|redis| {
                crate::fleet::TokenLimiter::new(
                    redis,
                    config.agent.connections_per_token_per_minute,
                    metrics.registry(),
                )
            }),
        });
        Ok(Self {
            config,
            agent_listener,
            obs_listener,
            k8s_proxy,
            fleet,
            api,
            on_push,
            shared,
        })
    }

    /// The API port's address, when it is configured.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(ApiServer::addr)
    }

    /// The private API's address, when it is configured.
    pub fn private_api_addr(&self) -> Option<SocketAddr> {
        self.fleet.private_api_addr()
    }

    pub fn agent_addr(&self) -> SocketAddr {
        self.agent_listener
            .local_addr()
            .unwrap_or(self.config.agent.listen)
    }

    pub fn observability_addr(&self) -> SocketAddr {
        self.obs_listener
            .local_addr()
            .unwrap_or(self.config.observability.listen)
    }

    /// The readiness probe's path on the observability port
    /// (`observability.readiness_probe.url_path`).
    pub fn readiness_path(&self) -> &str {
        &self.config.observability.readiness_probe.url_path
    }

    /// The Kubernetes API proxy's address, when it is configured.
    pub fn k8s_proxy_addr(&self) -> Option<SocketAddr> {
        self.k8s_proxy
            .as_ref()
            .and_then(|(l, _, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains. Returns once every connection is
    /// closed or the drain deadline (plus a short flush) has passed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let pod = self.shared.pod_name.clone();
        let agent_addr = self.agent_addr();
        let obs_addr = self.observability_addr();
        let k8s_proxy_addr = self.k8s_proxy_addr();
        let ready = Arc::new(AtomicBool::new(true));
        let metrics = self.shared.metrics.clone();
        metrics.ready.set(1);

        let obs_stop = CancellationToken::new();
        let obs = Observability::new(&self.config.observability, ready.clone(), metrics.clone());
        let obs_task = tokio::spawn(obs.serve(self.obs_listener, obs_stop.clone()));

        let stop_accepting = CancellationToken::new();
        let drain = Drain::default();
        let routes = services::routes(self.shared.clone());
        let agent_cfg = self.config.agent.clone();
        let accept_task = {
            let (stop, drain, metrics) = (stop_accepting.clone(), drain.clone(), metrics.clone());
            let end_streams = self.shared.end_streams.clone();
            tokio::spawn(async move {
                transport::serve(
                    self.agent_listener,
                    routes,
                    &agent_cfg,
                    metrics,
                    stop,
                    drain,
                    end_streams,
                )
                .await
            })
        };
        let k8s_proxy_task = self.k8s_proxy.map(|(listener, tls, proxy)| {
            tokio::spawn(k8s_proxy::serve(
                listener,
                tls,
                proxy,
                stop_accepting.clone(),
                drain.goaway.clone(),
                drain.tracker.clone(),
            ))
        });
        let private_api_addr = self.fleet.private_api_addr();
        let api_addr = self.api.as_ref().and_then(ApiServer::addr);
        let redis = self.fleet.redis.clone();
        let mut fleet = self.fleet.start();
        let api_tasks = ApiTasks::start(
            self.api,
            self.shared.agent_tracker.clone(),
            redis,
            self.on_push,
            &self.config.redis,
        );
        tracing::info!(%pod, %agent_addr, %obs_addr, ?k8s_proxy_addr, ?private_api_addr, ?api_addr, "kas serving");

        shutdown.await;
        let cfg = &self.config.shutdown;
        ready.store(false, Ordering::SeqCst);
        metrics.ready.set(0);
        tracing::info!(%pod, delay = ?cfg.readiness_delay, "shutdown: readiness is now 503");
        tokio::time::sleep(cfg.readiness_delay).await;

        stop_accepting.cancel();
        fleet.begin_drain().await;
        accept_task.await.context("agent listener task failed")?;
        if let Some(task) = k8s_proxy_task {
            task.await.context("k8s-proxy listener task failed")?;
        }
        drain.goaway.cancel();
        drain.tracker.close();
        tracing::info!(%pod, deadline = ?cfg.drain_deadline, "shutdown: listener closed, GOAWAY sent, draining");
        let drained = drain.tracker.wait();
        tokio::pin!(drained);
        tokio::select! {
            _ = &mut drained => tracing::info!(%pod, "shutdown: all connections drained"),
            _ = tokio::time::sleep(cfg.drain_deadline) => {
                tracing::info!(%pod, "shutdown: drain deadline reached, ending open streams");
                self.shared.tunnels.shut_down();
                self.shared.end_streams.cancel();
                if tokio::time::timeout(FINAL_FLUSH, &mut drained).await.is_err() {
                    tracing::warn!(%pod, "shutdown: connections still open after the final flush; closing");
                }
            }
        }
        fleet.stop().await;
        api_tasks.stop().await;
        obs_stop.cancel();
        let _ = obs_task.await;
        tracing::info!(%pod, "shutdown complete");
        Ok(())
    }
}
