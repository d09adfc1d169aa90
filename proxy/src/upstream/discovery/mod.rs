//! Finding kas pods. Each source publishes the full, sorted list of pod endpoints into a
//! `watch` channel whenever it changes; the [`crate::upstream::pool`] turns that into backends.
//! Sources: a static list, a headless Service's DNS name, or Kubernetes EndpointSlices.
//!
//! Each source also reports how it is doing on a [`DiscoveryStatus`]: the edge is ready
//! only once its source has produced a first result (an empty one from a working source
//! counts: readiness reflects the edge, not kas), and `edge_discovery_up` /
//! `edge_discovery_errors_total` show a source that cannot reach its API or name.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::config::DiscoveryConfig;
use crate::telemetry::metrics::EdgeMetrics;

/// Longest a single DNS lookup may take before it counts as failed (the system resolver
/// can block for its timeout times its attempts times the search domains).
const DNS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether discovery has produced a result yet, and whether its last attempt worked.
pub use crate::support::status::SourceStatus as DiscoveryStatus;

/// Discovery's status, reporting into `edge_discovery_up` and `edge_discovery_errors_total`.
pub fn new_status(metrics: &EdgeMetrics) -> DiscoveryStatus {
    DiscoveryStatus::new(
        "discovery",
        metrics.discovery_up.clone(),
        metrics.discovery_errors.clone(),
    )
}

/// One kas pod as discovery sees it: its traffic address (pod IP and agent port).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Pod name when known (logs, metrics).
    pub name: Option<String>,
    /// False while Kubernetes says the pod is not ready.
    pub ready: bool,
    /// True while the pod is shutting down: no new connections, existing ones drain.
    pub terminating: bool,
}

impl Endpoint {
    /// A pod known only by address: a static entry or a DNS answer.
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            name: None,
            ready: true,
            terminating: false,
        }
    }
}

pub mod endpointslices;

/// Publishes `endpoints` (sorted, de-duplicated) if they differ from what was published.
pub fn publish(tx: &watch::Sender<Vec<Endpoint>>, mut endpoints: Vec<Endpoint>) {
    endpoints.sort();
    endpoints.dedup();
    tx.send_if_modified(|current| {
        if *current == endpoints {
            false
        } else {
            *current = endpoints;
            true
        }
    });
}

/// Re-resolves `name` (A and AAAA, via the system resolver, as a headless Service's DNS
/// name answers with every ready pod IP) every `interval`. A failed lookup keeps the last
/// answer: a DNS blip must not empty the backend set. Until the first lookup succeeds
/// the edge is not ready, and each failure is logged and counted.
pub async fn run_dns(
    name: String,
    port: u16,
    interval: Duration,
    tx: watch::Sender<Vec<Endpoint>>,
    status: std::sync::Arc<DiscoveryStatus>,
) {
    loop {
        let lookup = tokio::time::timeout(
            DNS_LOOKUP_TIMEOUT,
            tokio::net::lookup_host((name.as_str(), port)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {DNS_LOOKUP_TIMEOUT:?}"),
            ))
        });
        match lookup {
            Ok(addrs) => {
                let endpoints: Vec<Endpoint> = addrs.map(Endpoint::plain).collect();
                if endpoints.is_empty() {
                    tracing::warn!(%name, "DNS discovery: no addresses; keeping the previous set");
                } else {
                    publish(&tx, endpoints);
                }
                status.succeeded();
            }
            Err(e) if status.is_synced() => {
                status.failed(format!("DNS lookup of {name}: {e}"));
                tracing::warn!(%name, error = %e, "DNS discovery failed; keeping the previous set")
            }
            Err(e) => {
                status.failed(format!("DNS lookup of {name}: {e}"));
                tracing::error!(%name, error = %e, "DNS discovery failed: not ready until discovery.name resolves")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tx.closed() => return,
        }
    }
}

/// The namespace this pod runs in, for `discovery.namespace` left unset.
pub fn own_namespace() -> anyhow::Result<String> {
    crate::support::kubernetes::own_namespace("discovery.namespace")
}

/// What `run` would need from the pod for `config`, checked without contacting
/// anything: the pod's namespace when `discovery.namespace` is unset, and in-cluster
/// credentials for the Kubernetes API. `kas-edge check` and start-up share it.
pub fn preflight(config: &DiscoveryConfig) -> anyhow::Result<()> {
    let DiscoveryConfig::Kubernetes { namespace, .. } = config else {
        return Ok(());
    };
    if namespace.is_none() {
        own_namespace()?;
    }
    crate::support::kubernetes::preflight("discovery.kind = \"kubernetes\"", None)
}

/// Starts the configured source on `rt`; the receiver sees every new set of pods and
/// `status` how the source is doing.
pub fn start(
    rt: &tokio::runtime::Handle,
    config: &DiscoveryConfig,
    status: std::sync::Arc<DiscoveryStatus>,
) -> anyhow::Result<watch::Receiver<Vec<Endpoint>>> {
    let (tx, rx) = watch::channel(Vec::new());
    match config.clone() {
        DiscoveryConfig::Static { endpoints } => {
            publish(&tx, endpoints.into_iter().map(Endpoint::plain).collect());
            status.succeeded();
            // Keep the sender alive: a closed channel would read as "discovery ended".
            rt.spawn(async move { tx.closed().await });
        }
        DiscoveryConfig::Dns {
            name,
            port,
            interval,
        } => {
            rt.spawn(run_dns(name, port, interval, tx, status));
        }
        DiscoveryConfig::Kubernetes {
            namespace,
            service,
            port_name,
            port,
        } => {
            let namespace = match namespace {
                Some(ns) => ns,
                None => own_namespace()?,
            };
            let cfg = endpointslices::EndpointSliceConfig {
                namespace,
                service,
                port_name,
                port,
            };
            let client = rt
                .block_on(crate::support::kubernetes::in_cluster_client(
                    "kas EndpointSlice discovery",
                ))
                .context("discovery.kind = \"kubernetes\" needs in-cluster credentials")?;
            rt.spawn(async move {
                if let Err(e) = endpointslices::run(client, cfg, tx, status.clone()).await {
                    status.failed(&e);
                    tracing::error!(error = %e, "EndpointSlice discovery stopped: not ready");
                }
            });
        }
    }
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn dns_source_resolves_and_publishes_sorted() {
        let (tx, mut rx) = watch::channel(Vec::new());
        let status = Arc::new(new_status(&EdgeMetrics::new()));
        let task = tokio::spawn(run_dns(
            "localhost".into(),
            8150,
            Duration::from_secs(60),
            tx,
            status.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(status.is_synced());
        assert_eq!(status.last_error(), None);
        let endpoints = rx.borrow().clone();
        assert!(!endpoints.is_empty());
        assert!(endpoints
            .iter()
            .all(|e| e.addr.port() == 8150 && e.addr.ip().is_loopback()));
        task.abort();
    }

    #[tokio::test]
    async fn dns_name_that_does_not_resolve_keeps_discovery_unsynced() {
        let metrics = EdgeMetrics::new();
        let status = Arc::new(new_status(&metrics));
        let (tx, rx) = watch::channel(Vec::new());
        // `.invalid` never resolves (RFC 6761), without depending on the network.
        let task = tokio::spawn(run_dns(
            "kas.invalid".into(),
            8150,
            Duration::from_millis(50),
            tx,
            status.clone(),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while metrics.discovery_errors.get() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no failed lookups counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        assert!(!status.is_synced());
        assert_eq!(metrics.discovery_up.get(), 0);
        let reason = status.last_error().unwrap();
        assert!(reason.contains("kas.invalid"), "{reason}");
        assert!(rx.borrow().is_empty());
    }

    #[test]
    fn static_source_is_synced_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let metrics = EdgeMetrics::new();
        let status = Arc::new(new_status(&metrics));
        let config = DiscoveryConfig::Static {
            endpoints: vec!["127.0.1.1:8150".parse().unwrap()],
        };
        let rx = start(rt.handle(), &config, status.clone()).unwrap();
        assert!(status.is_synced());
        assert_eq!(metrics.discovery_up.get(), 1);
        assert_eq!(rx.borrow().len(), 1);
    }

    #[test]
    fn kubernetes_preflight_names_what_is_missing() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return; // Running in a pod: nothing to check here.
        }
        let config = DiscoveryConfig::Kubernetes {
            namespace: Some("kas".into()),
            service: "kas".into(),
            port_name: None,
            port: None,
        };
        let err = preflight(&config).unwrap_err().to_string();
        assert!(err.contains("not running inside a Kubernetes pod"), "{err}");
        assert!(err.contains("discovery.kind"), "{err}");
    }

    #[test]
    fn publish_skips_unchanged_lists() {
        let a: SocketAddr = "127.0.1.1:8150".parse().unwrap();
        let b: SocketAddr = "127.0.1.2:8150".parse().unwrap();
        let (tx, rx) = watch::channel(Vec::new());
        publish(
            &tx,
            vec![Endpoint::plain(b), Endpoint::plain(a), Endpoint::plain(a)],
        );
        assert!(rx.has_changed().unwrap());
        let mut rx = rx;
        rx.mark_unchanged();
        assert_eq!(rx.borrow().len(), 2);
        publish(&tx, vec![Endpoint::plain(a), Endpoint::plain(b)]);
        assert!(!rx.has_changed().unwrap());
    }
}
