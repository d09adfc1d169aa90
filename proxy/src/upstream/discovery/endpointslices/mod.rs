//! kas pod discovery from the EndpointSlices of kas's headless Service.
//!
//! The edge connects to kas pods directly instead of through a Service VIP, so it
//! needs the pod IPs themselves. EndpointSlices (not the older Endpoints object)
//! carry the `terminating` condition, which lets the edge drain a pod that is
//! shutting down instead of cutting its agents off, and for a dual-stack
//! Service they list both address families.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{DiscoveryStatus, Endpoint};

/// Label the EndpointSlice controller puts on every slice it manages for a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Pause before replacing a watcher stream that ended. kube's watcher is meant
/// to be endless, so this only guards against a tight loop if that changes.
const RESTART_DELAY: Duration = Duration::from_secs(5);

/// Which Service's slices to follow and which of its ports carries agent traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSliceConfig {
    /// Namespace of the kas Service; slices live next to their Service.
    pub namespace: String,
    /// Name of the kas (headless) Service.
    pub service: String,
    /// Service port name (e.g. "agent"). Preferred over `port` because it
    /// names the port's role and so survives a renumbering.
    pub port_name: Option<String>,
    /// Pod-side (target) port number: slices list container ports, not the
    /// Service's `port`. Used when `port_name` is unset or matches nothing.
    /// With neither set, a slice must list exactly one TCP port.
    pub port: Option<u16>,
}

/// Configuration mistakes that no amount of retrying would fix.
#[derive(Debug, thiserror::Error)]
pub enum EndpointSliceError {
    #[error("kas discovery: namespace {0:?} is not a valid Kubernetes name (1-63 lowercase letters, digits or '-')")]
    InvalidNamespace(String),
    #[error("kas discovery: Service name {0:?} is not a valid Kubernetes name (1-63 lowercase letters, digits or '-')")]
    InvalidService(String),
    #[error("kas discovery: port name is empty; leave it unset to select the port by number")]
    EmptyPortName,
    #[error("kas discovery: port 0 cannot carry traffic")]
    ZeroPort,
}

impl EndpointSliceConfig {
    /// Rejects names that would make a malformed URL or label selector, so a
    /// typo fails at start-up instead of as an endless stream of 400s.
    fn validate(&self) -> Result<(), EndpointSliceError> {
        if crate::config::names::dns_label(&self.namespace).is_err() {
            return Err(EndpointSliceError::InvalidNamespace(self.namespace.clone()));
        }
        if crate::config::names::service_name(&self.service).is_err() {
            return Err(EndpointSliceError::InvalidService(self.service.clone()));
        }
        if self.port_name.as_deref() == Some("") {
            return Err(EndpointSliceError::EmptyPortName);
        }
        if self.port == Some(0) {
            return Err(EndpointSliceError::ZeroPort);
        }
        Ok(())
    }

    fn label_selector(&self) -> String {
        format!("{SERVICE_NAME_LABEL}={}", self.service)
    }
}

/// Follows the kas Service's EndpointSlices and publishes the pods on `tx`.
///
/// Returns an error only for configuration mistakes, and `Ok` once every
/// receiver is gone (nobody left to route with these pods). API failures are
/// logged and retried with kube's default back-off (0.8 s growing to 30 s):
/// the edge must keep serving from the last known pods while the API server
/// is unreachable, so they never end the loop.
///
/// Nothing is published until the first complete list, so receivers never see
/// a partial set; that first list is always announced, even if it equals the
/// channel's initial value, so that receivers can tell "synced" from "not yet".
/// After that, only actual changes are published.
///
/// `status` hears of every complete list and change (the edge is ready after the first)
/// and of every failed list or watch (RBAC, credentials, an unreachable API server).
pub async fn run(
    client: kube::Client,
    cfg: EndpointSliceConfig,
    tx: watch::Sender<Vec<Endpoint>>,
    status: std::sync::Arc<DiscoveryStatus>,
) -> Result<(), EndpointSliceError> {
    cfg.validate()?;
    let api: Api<EndpointSlice> = Api::namespaced(client, &cfg.namespace);
    let watch_config = watcher::Config::default().labels(&cfg.label_selector());
    let ports = PortSelector {
        name: cfg.port_name.clone(),
        number: cfg.port,
    };
    let mut slices = SliceSet::default();

    loop {
        let mut events = pin!(watcher(api.clone(), watch_config.clone()).default_backoff());
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                () = tx.closed() => {
                    stopped(&cfg);
                    return Ok(());
                }
            };
            match event {
                Some(Ok(event)) => {
                    if let Some(update) = slices.apply(event, &ports, &cfg) {
                        publish(&tx, update, &cfg);
                        status.succeeded();
                    }
                }
                Some(Err(err)) => {
                    if !is_routine(&err) {
                        status.failed(format_args!(
                            "EndpointSlices of Service {}/{}: {err}",
                            cfg.namespace, cfg.service
                        ));
                    }
                    log_watch_error(&err, &cfg, status.is_synced());
                }
                None => break,
            }
        }
        // A fresh watcher relists, and the Init..InitDone handling in SliceSet
        // reconciles whatever changed while no stream was running.
        warn!(
            namespace = %cfg.namespace,
            service = %cfg.service,
            "kas EndpointSlice watch ended unexpectedly; restarting it"
        );
        tokio::select! {
            () = tokio::time::sleep(RESTART_DELAY) => {}
            () = tx.closed() => {
                stopped(&cfg);
                return Ok(());
            }
        }
    }
}

fn stopped(cfg: &EndpointSliceConfig) {
    debug!(
        namespace = %cfg.namespace,
        service = %cfg.service,
        "no receivers left; stopping kas EndpointSlice discovery"
    );
}

fn api_status(err: &watcher::Error) -> Option<u16> {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// An expired resourceVersion: the watcher relists, nothing is wrong.
fn is_routine(err: &watcher::Error) -> bool {
    api_status(err) == Some(410)
}

fn log_watch_error(err: &watcher::Error, cfg: &EndpointSliceConfig, synced: bool) {
    if !synced && !is_routine(err) {
        warn!(
            namespace = %cfg.namespace,
            service = %cfg.service,
            error = %err,
            "kas EndpointSlice discovery has no first list yet: the edge stays unready (/readyz 503)"
        );
    }
    match api_status(err) {
        // Routine: the API server forgot our resourceVersion; the watcher relists.
        Some(410) => debug!(
            namespace = %cfg.namespace,
            service = %cfg.service,
            error = %err,
            "kas EndpointSlice watch expired; relisting"
        ),
        Some(403) => warn!(
            namespace = %cfg.namespace,
            service = %cfg.service,
            error = %err,
            "kas EndpointSlice watch forbidden: the edge's service account needs get, list and \
             watch on endpointslices.discovery.k8s.io in this namespace; retrying with back-off"
        ),
        _ => warn!(
            namespace = %cfg.namespace,
            service = %cfg.service,
            error = %err,
            "kas EndpointSlice watch failed; keeping the last known pods and retrying with back-off"
        ),
    }
}

fn publish(tx: &watch::Sender<Vec<Endpoint>>, update: Update, cfg: &EndpointSliceConfig) -> bool {
    let Update { endpoints, force } = update;
    let total = endpoints.len();
    let ready = endpoints
        .iter()
        .filter(|e| e.ready && !e.terminating)
        .count();
    let terminating = endpoints.iter().filter(|e| e.terminating).count();
    let sent = tx.send_if_modified(|current| {
        if !force && *current == endpoints {
            return false;
        }
        *current = endpoints;
        true
    });
    if sent {
        info!(
            namespace = %cfg.namespace,
            service = %cfg.service,
            total,
            ready,
            terminating,
            "kas endpoints updated"
        );
    }
    sent
}

/// A list to offer to receivers; `force` announces the first complete list.
#[derive(Debug)]
struct Update {
    endpoints: Vec<Endpoint>,
    force: bool,
}

/// The slices currently known, already reduced to endpoints, keyed by slice name.
#[derive(Debug, Default)]
struct SliceSet {
    live: BTreeMap<String, Vec<Endpoint>>,
    /// Collects a (re)list between `Init` and `InitDone`. It replaces `live`
    /// wholesale, which is what drops slices deleted while the watch was down:
    /// no `Delete` event is ever sent for those.
    relisting: Option<BTreeMap<String, Vec<Endpoint>>>,
    synced: bool,
}

impl SliceSet {
    /// Returns the merged endpoints when `live` may have changed.
    fn apply(
        &mut self,
        event: Event<EndpointSlice>,
        ports: &PortSelector,
        cfg: &EndpointSliceConfig,
    ) -> Option<Update> {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                None
            }
            Event::InitApply(slice) => {
                let name = slice.name_any();
                let endpoints = slice_endpoints(&slice, ports, cfg);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name, endpoints);
                None
            }
            Event::InitDone => {
                self.live = self.relisting.take().unwrap_or_default();
                let force = !self.synced;
                self.synced = true;
                Some(Update {
                    endpoints: self.merged(),
                    force,
                })
            }
            Event::Apply(slice) => {
                let name = slice.name_any();
                let endpoints = slice_endpoints(&slice, ports, cfg);
                self.live.insert(name, endpoints);
                self.update()
            }
            Event::Delete(slice) => {
                self.live.remove(&slice.name_any());
                self.update()
            }
        }
    }

    fn update(&self) -> Option<Update> {
        // The watcher only sends Apply/Delete after InitDone; holding back
        // anyway keeps the "never a partial list" promise if that ever changes.
        self.synced.then(|| Update {
            endpoints: self.merged(),
            force: false,
        })
    }

    /// One entry per address, sorted by address.
    ///
    /// The same pod can briefly appear in two slices while the EndpointSlice
    /// controller rebalances them, possibly with different conditions. Two
    /// entries for one address would make the pool double-count the pod, so
    /// keep one, preferring the copy that says the pod can take traffic.
    fn merged(&self) -> Vec<Endpoint> {
        fn rank(e: &Endpoint) -> (bool, bool, bool) {
            (e.ready && !e.terminating, !e.terminating, e.name.is_some())
        }
        let mut by_addr: BTreeMap<SocketAddr, &Endpoint> = BTreeMap::new();
        for e in self.live.values().flatten() {
            match by_addr.entry(e.addr) {
                Entry::Vacant(v) => {
                    v.insert(e);
                }
                Entry::Occupied(mut o) => {
                    // The full Ord breaks ties so the result does not depend on slice names.
                    if (rank(e), e) > (rank(o.get()), *o.get()) {
                        o.insert(e);
                    }
                }
            }
        }
        by_addr.into_values().cloned().collect()
    }
}

#[derive(Debug)]
struct PortSelector {
    name: Option<String>,
    number: Option<u16>,
}

impl PortSelector {
    /// Falls back to "the only port" only when nothing was configured: if a
    /// configured name or number is missing, guessing could send agents to a
    /// metrics or health port.
    fn pick(&self, ports: &[EndpointPort]) -> Option<u16> {
        let tcp = || {
            ports
                .iter()
                .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        };
        if let Some(name) = &self.name {
            if let Some(p) = tcp().find(|p| p.name.as_deref() == Some(name.as_str())) {
                return port_number(p);
            }
        }
        if let Some(number) = self.number {
            return tcp()
                .any(|p| port_number(p) == Some(number))
                .then_some(number);
        }
        if self.name.is_some() {
            return None;
        }
        let mut candidates = tcp();
        match (candidates.next(), candidates.next()) {
            (Some(only), None) => port_number(only),
            _ => None,
        }
    }
}

fn port_number(p: &EndpointPort) -> Option<u16> {
    p.port
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| n != 0)
}

/// Endpoints of one slice, or none (with a warning) when the traffic port
/// cannot be determined: a slice without it tells us nothing usable.
fn slice_endpoints(
    slice: &EndpointSlice,
    ports: &PortSelector,
    cfg: &EndpointSliceConfig,
) -> Vec<Endpoint> {
    let slice_name = slice.name_any();
    if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
        // FQDN slices name hosts, not pods; the edge needs IPs.
        debug!(
            slice = %slice_name,
            address_type = %slice.address_type,
            "ignoring EndpointSlice that does not list IP addresses"
        );
        return Vec::new();
    }
    let slice_ports = slice.ports.as_deref().unwrap_or_default();
    let Some(port) = ports.pick(slice_ports) else {
        let available: Vec<String> = slice_ports
            .iter()
            .map(|p| {
                format!(
                    "{}:{}/{}",
                    p.name.as_deref().unwrap_or(""),
                    p.port.map_or_else(|| "?".to_owned(), |n| n.to_string()),
                    p.protocol.as_deref().unwrap_or("TCP")
                )
            })
            .collect();
        warn!(
            namespace = %cfg.namespace,
            service = %cfg.service,
            slice = %slice_name,
            port_name = ?cfg.port_name,
            port = ?cfg.port,
            ?available,
            "EndpointSlice has no matching kas agent port; ignoring its endpoints"
        );
        return Vec::new();
    };

    let mut out = Vec::new();
    for ep in &slice.endpoints {
        let conditions = ep.conditions.as_ref();
        // The API defines a missing `ready` as "unknown, treat as ready".
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        let name = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        for address in &ep.addresses {
            match address.parse::<IpAddr>() {
                Ok(ip) => out.push(Endpoint {
                    addr: SocketAddr::new(ip, port),
                    name: name.clone(),
                    ready,
                    terminating,
                }),
                Err(err) => warn!(
                    slice = %slice_name,
                    %address,
                    error = %err,
                    "ignoring EndpointSlice address that is not an IP"
                ),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
