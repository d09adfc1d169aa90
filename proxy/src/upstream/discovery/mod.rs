//! Finding kas pods. Each source publishes the full, sorted list of pod endpoints into a
//! `watch` channel whenever it changes; the [`crate::upstream::pool`] turns that into backends.
//! Sources: a static list, a headless Service's DNS name, or Kubernetes EndpointSlices.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::config::DiscoveryConfig;

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
/// answer: a DNS blip must not empty the backend set.
pub async fn run_dns(
    name: String,
    port: u16,
    interval: Duration,
    tx: watch::Sender<Vec<Endpoint>>,
) {
    loop {
        match tokio::net::lookup_host((name.as_str(), port)).await {
            Ok(addrs) => {
                let endpoints: Vec<Endpoint> = addrs.map(Endpoint::plain).collect();
                if endpoints.is_empty() {
                    tracing::warn!(%name, "DNS discovery: no addresses; keeping the previous set");
                } else {
                    publish(&tx, endpoints);
                }
            }
            Err(e) => {
                tracing::warn!(%name, error = %e, "DNS discovery failed; keeping the previous set")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Where Kubernetes mounts the pod's namespace.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The namespace this pod runs in, for `discovery.namespace` left unset.
pub fn own_namespace() -> anyhow::Result<String> {
    std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
        .map(|ns| ns.trim().to_owned())
        .context("discovery.namespace is not set and the pod's own namespace is unknown")
}

/// Starts the configured source on `rt`; the receiver sees every new set of pods.
pub fn start(
    rt: &tokio::runtime::Handle,
    config: &DiscoveryConfig,
) -> anyhow::Result<watch::Receiver<Vec<Endpoint>>> {
    let (tx, rx) = watch::channel(Vec::new());
    match config.clone() {
        DiscoveryConfig::Static { endpoints } => {
            publish(&tx, endpoints.into_iter().map(Endpoint::plain).collect());
            // Keep the sender alive: a closed channel would read as "discovery ended".
            rt.spawn(async move { tx.closed().await });
        }
        DiscoveryConfig::Dns {
            name,
            port,
            interval,
        } => {
            rt.spawn(run_dns(name, port, interval, tx));
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
                if let Err(e) = endpointslices::run(client, cfg, tx).await {
                    tracing::error!(error = %e, "EndpointSlice discovery stopped");
                }
            });
        }
    }
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dns_source_resolves_and_publishes_sorted() {
        let (tx, mut rx) = watch::channel(Vec::new());
        let task = tokio::spawn(run_dns(
            "localhost".into(),
            8150,
            Duration::from_secs(60),
            tx,
        ));
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let endpoints = rx.borrow().clone();
        assert!(!endpoints.is_empty());
        assert!(endpoints
            .iter()
            .all(|e| e.addr.port() == 8150 && e.addr.ip().is_loopback()));
        task.abort();
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
