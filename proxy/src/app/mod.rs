//! Where the edge is wired together: configuration in, pingora server out. Wiring only:
//! each layer's behaviour lives in its own module.
//!
//! Layers, outside in: accept filter and PROXY header (`listener`) → TLS (`listener::tls`)
//! → connection registration (`connection`) → HTTP by ALPN: the edge's own HTTP/2
//! forwarder (`http::h2`) or HTTP/1.1 loop (`http::h1`, which leaves upgrades and anything
//! unusual to pingora's `http::EdgeProxy`) → pods (`upstream`: discovery + health + least
//! in-flight; shared HTTP/2 connections in `upstream::h2c`).
//!
//! Runtimes and threads:
//! - pingora's: the TLS port (`listen.threads` workers);
//! - `edge-control` (1 worker): the control plane — pod health checks, discovery and the
//!   pool updates it drives, the admin port (`/readyz`, `/metrics`), the readiness probe,
//!   rate-limit key eviction, and the ACME client; it outlives pingora's listeners in a
//!   drain. File watchers (policies, certificates) run on threads of their own;
//! - `edge-http` (`public_http.threads` workers, 1 by default): the public `listen.http`
//!   listener and the ACME challenges it relays, and nothing else, so a flood there cannot
//!   delay a health check or `/readyz` in a queue; its threads also run at a lower CPU
//!   priority (nice 10), so it cannot take the CPU from them either.

pub mod preflight;
pub mod upgrade;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;

use crate::admin::{self, AdminState};
use crate::config::EdgeConfig;
use crate::connection::activity::ActivityTable;
use crate::connection::handoff::PendingHandoffs;
use crate::connection::registry::ConnectionRegistry;
use crate::connection::{ConnectionLayer, IdleLimits, MaxAge};
use crate::http::h1::H1Edge;
use crate::http::h2::H2Edge;
use crate::http::websocket::PodDialer;
use crate::http::{EdgeProxy, RequestGate};
use crate::listener::accept::{AcceptFilter, SelfProbes};
use crate::listener::handshake::{HandshakeLayer, HandshakeLimits};
use crate::listener::handshake_slots::HandshakeSlots;
use crate::listener::tls;
use crate::policy::Policies;
use crate::support::keepalive;
use crate::support::sync::lock;
use crate::telemetry::log_writer;
use crate::telemetry::metrics::EdgeMetrics;
use crate::upstream::discovery;
use crate::upstream::h2c::{self, H2cSettings};
use crate::upstream::pool::Pool;
use upgrade::{HandOver, OwnListeners, Start};

/// SIGTERM: readiness 503 first, listeners close only after `readiness_delay`.
/// SIGINT: the same, without the delay (an operator at a terminal wants it gone).
/// SIGQUIT: graceful upgrade (see [`upgrade`]): the edge's own listeners go to the new
/// process waiting with `--upgrade`, then pingora sends its TLS port and the drain
/// starts. With no new process waiting, the edge logs it and keeps serving.
struct EdgeSignals {
    state: Arc<AdminState>,
    readiness_delay: Duration,
    hand_over: Arc<HandOver>,
}

#[async_trait]
impl ShutdownSignalWatch for EdgeSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; waiting forever");
            std::future::pending::<()>().await;
            return ShutdownSignal::FastShutdown;
        };
        let delay = loop {
            tokio::select! {
                _ = term.recv() => break self.readiness_delay,
                _ = int.recv() => break Duration::ZERO,
                _ = quit.recv() => {
                    tracing::info!("upgrade: SIGQUIT; sending the listeners to the new process");
                    let hand_over = self.hand_over.clone();
                    match tokio::task::spawn_blocking(move || hand_over.send()).await {
                        Ok(Ok(())) => {
                            tracing::info!("upgrade: own listeners sent; pingora sends the TLS port next, then this process drains");
                            return ShutdownSignal::GracefulUpgrade;
                        }
                        Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "upgrade failed; still serving"),
                        Err(e) => tracing::error!(error = %e, "upgrade failed; still serving"),
                    }
                }
            }
        };
        self.state.set_ready(false);
        tracing::info!(delay = ?delay, "shutdown: readiness is now 503; listeners close after the delay");
        tokio::time::sleep(delay).await;
        tracing::info!("shutdown: closing listeners, sending GOAWAY; open streams continue until the drain deadline");
        ShutdownSignal::GracefulTerminate
    }
}

/// Called once the edge has drained, just before the process ends.
pub type DrainedHook = Box<dyn FnOnce() + Send>;

/// Ends the process as soon as the drain has nothing left to wait for, instead of
/// pingora's unconditional grace-period sleep.
fn exit_when_drained(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    metrics: EdgeMetrics,
    deadline: Duration,
    on_drained: Arc<std::sync::Mutex<Option<DrainedHook>>>,
) {
    std::thread::spawn(move || {
        loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            let open: i64 = ["grpc", "websocket", "http"]
                .iter()
                .map(|p| metrics.active.with_label_values(&[p]).get())
                .sum();
            if open == 0 {
                // The connections those streams were on are closing (final GOAWAY, TLS
                // close): an exit now would cut that short with a reset.
                let connections_until =
                    (Instant::now() + CONNECTIONS_CLOSE_AFTER_STREAMS).min(until);
                while metrics.open_connections.get() > 0 && Instant::now() < connections_until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                tracing::info!("shutdown: all streams drained, exiting");
                run_hook(&on_drained);
                log_writer::flush_stdout(LOG_FLUSH_AT_EXIT);
                std::process::exit(0);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::info!("shutdown: drain deadline reached, closing remaining connections");
    });
}

/// Once pingora has sent its listening sockets to the new process: this process is no
/// longer ready, and stops accepting on its own listeners (the new process accepts on the
/// same sockets), so a load balancer's probes and `:80` reach only the new process.
/// Connections already accepted finish.
fn stop_own_listeners_once_handed_over(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    state: Arc<AdminState>,
    serving: Vec<tokio::task::AbortHandle>,
) {
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::GracefulUpgradeCloseTimeout) => {
                state.set_ready(false);
                for task in &serving {
                    task.abort();
                }
                tracing::info!(
                    "upgrade: sockets handed over; readiness 503, own listeners closed, draining"
                );
                return;
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        }
    });
}

/// How long a drained edge waits for its connections to finish closing after their last
/// stream ended (HTTP/2 connections linger until the client closes its side).
const CONNECTIONS_CLOSE_AFTER_STREAMS: Duration = Duration::from_secs(3);

fn run_hook(hook: &std::sync::Mutex<Option<DrainedHook>>) {
    if let Some(hook) = lock(hook).take() {
        hook();
    }
}

/// Checks everything the configuration names, then runs the edge until a signal ends it.
/// Blocks the calling thread.
pub fn run(config: EdgeConfig) -> anyhow::Result<()> {
    run_checked(preflight::check(config)?, Start::Fresh, Box::new(|| {}))
}

/// Runs a checked configuration, its listeners bound or taken from the running edge
/// (`start`), calling `on_drained` once the drain is over (the local stack uses it to
/// stop its kas pods before the process ends).
pub fn run_checked(
    checked: preflight::Preflight,
    start: Start,
    on_drained: DrainedHook,
) -> anyhow::Result<()> {
    let preflight::Preflight {
        config,
        policy_files,
        ..
    } = checked;
    // One crypto provider for every TLS user in the process (pingora, kube, ACME).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let on_drained = Arc::new(std::sync::Mutex::new(Some(on_drained)));
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("edge-control")
        .enable_all()
        .build()
        .context("cannot start the control-plane runtime")?;
    let public_http = match config.listen.http {
        Some(_) => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.public_http.threads)
                // Only relayed ACME challenges resolve names here, at most MAX_RELAYS.
                .max_blocking_threads(admin::public::MAX_RELAYS)
                .on_thread_start(yield_cpu_to_the_rest)
                .thread_name("edge-http")
                .enable_all()
                .build()
                .context("cannot start the runtime of listen.http")?,
        ),
        None => None,
    };
    let metrics = EdgeMetrics::new();
    let pool = Arc::new(
        Pool::new(config.health.port, config.health.passive_backoff)
            .with_route_ports(config.upstream.routes().ports()),
    );
    let tls = tls::TlsSetup::new(&config.tls, metrics.clone(), control.handle())?;
    let registry = ConnectionRegistry::new(
        metrics.open_connections.clone(),
        metrics.handshakes_in_progress.clone(),
    );
    metrics
        .handshakes_limit
        .set(i64::try_from(config.downstream.max_handshakes).unwrap_or(i64::MAX));
    let policies = Policies::new(
        policy_files,
        &config.policies,
        &config.proxy_protocol,
        registry.clone(),
        metrics.clone(),
    )?;
    let _policy_watchers = policies.watch(&config.policies)?;
    let blocklist_watch = match &config.policies.blocklist_configmap {
        Some(cm) => Some(crate::policy::configmap::start(
            control.handle(),
            cm,
            &policies,
            &metrics,
        )?),
        None => None,
    };
    let state = Arc::new(AdminState {
        ready: AtomicBool::new(false),
        pool: pool.clone(),
        metrics: metrics.clone(),
        discovery: Arc::new(discovery::new_status(&metrics)),
        blocklist_watch,
        https_port: config.listen.https.port(),
        acme: tls.acme(),
        acme_relay: config.tls.acme_challenge_relay.clone(),
    });
    control.spawn(policies.clone().evict_idle_keys());
    // Health checks run while an upgrading process waits for the old one's sockets, so
    // it knows its pods by the time it accepts.
    start_control_plane(&control, &config, &state)?;
    let own = match start {
        Start::Fresh => OwnListeners::bind(&config, &control)?,
        Start::Upgrade => OwnListeners::receive(&config, &control)?,
    };
    let hand_over = Arc::new(own.duplicate(&config)?);

    let conf = ServerConf {
        threads: config.listen.threads,
        work_stealing: config.listen.work_stealing,
        grace_period_seconds: Some(config.shutdown.drain_deadline.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(2),
        upgrade_sock: config
            .shutdown
            .upgrade_socket
            .to_str()
            .context("shutdown.upgrade_socket is not UTF-8")?
            .to_owned(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: start == Start::Upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // Upgrading: takes the TLS port from the old process (which sends it right after the
    // listeners above); the process exits if it never comes.
    server.bootstrap();
    // Served only now: an upgrading process must not answer `/readyz` with 503 (or `:80`)
    // next to the old one before it has the TLS port.
    let serving = start_listeners(
        &control,
        public_http.as_ref(),
        own,
        &config,
        &state,
        &policies,
    )?;

    let probes = Arc::new(SelfProbes::default());
    let service = proxy_service(&server, &config, &tls, policies, registry, &state, &probes)?;
    server.add_service(service);

    stop_own_listeners_once_handed_over(server.watch_execution_phase(), state.clone(), serving);
    exit_when_drained(
        server.watch_execution_phase(),
        metrics,
        config.shutdown.drain_deadline,
        on_drained.clone(),
    );
    ready_once_accepting(&control, state.clone(), probes, config.listen.https);
    tracing::info!(
        https = %config.listen.https,
        admin = %config.listen.admin,
        http = ?config.listen.http,
        "kas-edge serving"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(EdgeSignals {
            state,
            readiness_delay: config.shutdown.readiness_delay,
            hand_over,
        }),
    });
    drop(tls);
    run_hook(&on_drained);
    if let Some(rt) = public_http {
        rt.shutdown_timeout(Duration::from_millis(100));
    }
    control.shutdown_timeout(Duration::from_millis(200));
    log_writer::flush_stdout(LOG_FLUSH_AT_EXIT);
    Ok(())
}

/// How long an exiting edge waits for its queued log lines to reach stdout.
const LOG_FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// The nice value of the `listen.http` threads: under CPU contention the scheduler then
/// prefers agent traffic and the control plane to a flood of `:80`.
const PUBLIC_HTTP_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority (Linux: per thread; needs no privilege).
fn yield_cpu_to_the_rest() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls about the calling thread; no memory is shared.
        let result = unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                PUBLIC_HTTP_NICE,
            )
        };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the priority of a listen.http thread");
        }
    }
}

/// Serves the admin port (on the control runtime) and the public `listen.http` (on its
/// own runtime, admitted like the TLS port and capped by `[public_http]`). Returns their
/// accept loops, to stop once a new process has taken the sockets over.
fn start_listeners(
    control: &tokio::runtime::Runtime,
    public_http: Option<&tokio::runtime::Runtime>,
    own: OwnListeners,
    config: &EdgeConfig,
    state: &Arc<AdminState>,
    policies: &Arc<Policies>,
) -> anyhow::Result<Vec<tokio::task::AbortHandle>> {
    let admin_listener = {
        let _in = control.enter();
        tokio::net::TcpListener::from_std(own.admin).context("listen.admin")?
    };
    let mut serving = vec![control
        .spawn(admin::serve(
            admin_listener,
            admin::private::admin_handler(state.clone()),
            admin::private::limits(),
            state.metrics.clone(),
        ))
        .abort_handle()];
    if let (Some(listener), Some(rt)) = (own.http, public_http) {
        let listener = {
            let _in = rt.enter();
            tokio::net::TcpListener::from_std(listener).context("listen.http")?
        };
        serving.push(
            rt.spawn(admin::serve(
                listener,
                admin::public::redirect_handler(state.clone()),
                admin::public::limits(&config.public_http, policies.clone()),
                state.metrics.clone(),
            ))
            .abort_handle(),
        );
    }
    Ok(serving)
}

/// Discovery feeding the pool, and health checks: on the control runtime, so they keep
/// working while pingora drains and no public listener can delay them.
fn start_control_plane(
    control: &tokio::runtime::Runtime,
    config: &EdgeConfig,
    state: &Arc<AdminState>,
) -> anyhow::Result<()> {
    let mut endpoints =
        discovery::start(control.handle(), &config.discovery, state.discovery.clone())?;
    let pool = state.pool.clone();
    control.spawn(async move {
        loop {
            let snapshot = endpoints.borrow_and_update().clone();
            pool.update(&snapshot);
            if endpoints.changed().await.is_err() {
                tracing::warn!("discovery ended; keeping the last set of pods");
                return;
            }
        }
    });
    control.spawn(crate::upstream::health::run(
        state.pool.clone(),
        config.health.clone(),
        state.metrics.clone(),
    ));
    control.spawn(
        state
            .pool
            .clone()
            .retire_idle_connections(h2c_settings(config)),
    );
    Ok(())
}

/// The public TLS service: accept filter → PROXY header → TLS → connection layer → proxy.
fn proxy_service(
    server: &Server,
    config: &EdgeConfig,
    tls: &tls::TlsSetup,
    policies: Arc<Policies>,
    registry: Arc<ConnectionRegistry>,
    state: &AdminState,
    probes: &Arc<SelfProbes>,
) -> anyhow::Result<Service<ConnectionLayer<pingora::proxy::HttpProxy<EdgeProxy>>>> {
    let handoffs = Arc::new(PendingHandoffs::default());
    let activity = Arc::new(ActivityTable::default());
    let gate = Arc::new(RequestGate {
        policies: policies.clone(),
        pool: state.pool.clone(),
        metrics: state.metrics.clone(),
        connect: crate::upstream::connect::PodConnector::new(
            state.pool.clone(),
            state.metrics.upstream_connect_failures.clone(),
            config.upstream.max_connect_attempts,
        ),
        max_request_header_bytes: config.downstream.max_request_header_bytes,
        routes: config.upstream.routes(),
    });
    let proxy = EdgeProxy {
        gate: gate.clone(),
        handoffs: handoffs.clone(),
        activity: activity.clone(),
        upstream: config.upstream.clone(),
    };
    let h2 = H2Edge::new(gate.clone(), h2c_settings(config));
    let h1 = H1Edge::new(
        gate,
        PodDialer {
            connect_timeout: config.upstream.connect_timeout,
            response_timeout: config.upstream.upgrade_timeout,
            tcp_keepalive: config.upstream.tcp_keepalive,
        },
        config.downstream.request_head_timeout,
    );
    let app = ConnectionLayer {
        inner: Arc::new(pingora::proxy::http_proxy(&server.configuration, proxy)),
        h2: Arc::new(h2),
        h1: Arc::new(h1),
        policies: policies.clone(),
        registry: registry.clone(),
        metrics: state.metrics.clone(),
        max_age: config.downstream.max_connection_age.map(|age| MaxAge {
            age,
            jitter: config.downstream.max_connection_age_jitter,
        }),
        handoffs,
        activity,
        drain_spread: config
            .shutdown
            .drain_deadline
            .mul_f64(config.shutdown.close_spread),
        idle: IdleLimits {
            request_head: config.downstream.request_head_timeout,
            keepalive: config.downstream.keepalive_timeout,
            h2_idle: config.downstream.h2_idle_timeout,
        },
    };
    let mut service = Service::new("kas-edge".to_string(), app);
    service.set_connection_filter(Arc::new(AcceptFilter {
        policies: policies.clone(),
        probes: probes.clone(),
    }));
    service
        .endpoints()
        .set_pre_tls_callback(Arc::new(HandshakeLayer {
            policies: policies.clone(),
            registry: registry.clone(),
            limits: HandshakeLimits {
                timeout: config.downstream.handshake_timeout,
                max_total: config.downstream.max_handshakes,
                max_per_client: config.downstream.max_handshakes_per_client,
            },
            metrics: state.metrics.clone(),
            slots: HandshakeSlots::new(
                config.downstream.max_handshakes,
                config.downstream.max_handshake_queue,
                state.metrics.handshakes_queued.clone(),
            ),
        }));
    let mut tls_settings = TlsSettings::with_callbacks(tls.handshake_callbacks())
        .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    tls_settings.set_cert_resolver(tls.resolver());
    tls_settings.enable_h2();
    let mut socket = TcpSocketOptions::default();
    socket.tcp_keepalive = Some(keepalive::pingora(config.downstream.tcp_keepalive));
    service.endpoints().add_listener(
        ListenerConfig::tcp(config.listen.https.to_string())
            .tcp_socket_options(socket)
            .tls(tls_settings)
            .l4_buffer(L4BufferSettings::new(
                config.downstream.read_buffer,
                config.downstream.write_buffer,
            )),
    );
    Ok(service)
}

/// How the edge's gRPC streams reach pods: one connection per pod per edge worker thread,
/// so streams started on one worker share a connection.
fn h2c_settings(config: &EdgeConfig) -> H2cSettings {
    let upstream = &config.upstream;
    H2cSettings {
        connect_timeout: upstream.connect_timeout,
        tcp_keepalive: upstream.tcp_keepalive,
        ping_interval: upstream.h2_ping_interval,
        max_streams: upstream.max_h2_streams,
        connections: config.listen.threads.clamp(1, h2c::MAX_CONNECTIONS),
        stream_window: POD_STREAM_WINDOW,
    }
}

/// What a pod may send the edge ahead of a slow agent, per stream. The connection's
/// window is every stream's added up ([`H2cSettings::connection_window`]), so one agent's
/// unread answers never hold back another's.
pub const POD_STREAM_WINDOW: u32 = 256 * 1024;

/// Ready only once pingora accepts on the TLS port: it binds when `run` starts its
/// services, and a load balancer acting on an early 200 would see refusals.
fn ready_once_accepting(
    control: &tokio::runtime::Runtime,
    state: Arc<AdminState>,
    probes: Arc<SelfProbes>,
    https: std::net::SocketAddr,
) {
    let probe = if https.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), https.port())
    } else {
        https
    };
    control.spawn(async move {
        while probes.connect(probe).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        state.set_ready(true);
        // systemd (`Type=notify`): ready, and after an upgrade this is the main process.
        crate::support::service_manager::notify_ready();
    });
}
