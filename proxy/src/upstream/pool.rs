//! The kas pods the edge can route to, with what it knows about each: discovery state,
//! active health, passive failures and how many streams it carries now.
//!
//! Balancing is least in-flight: agent connections live for hours, so spreading by count
//! of open streams keeps pods even where round robin would drift with churn.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::telemetry::metrics::PodSample;
use crate::upstream::discovery::Endpoint;
use crate::upstream::h2c::{H2cSettings, PodConnections, RETIRE_SWEEP};
use crate::upstream::idle::IdleConnections;
use crate::upstream::route::Route;

pub struct Pod {
    pub addr: SocketAddr,
    /// Where `/readiness` is checked: the pod IP on the observability port.
    pub health_addr: SocketAddr,
    /// Pod name or address, for logs and metric labels.
    pub label: String,
    ready: AtomicBool,
    terminating: AtomicBool,
    /// Starts false: a pod gets traffic only after its first passing check.
    healthy: AtomicBool,
    pub(crate) consecutive_ok: AtomicU32,
    pub(crate) consecutive_fail: AtomicU32,
    in_flight: AtomicUsize,
    /// Nanoseconds after `created` until which the pod gets nothing new after a failed
    /// connection (0: not backing off). An atomic, so choosing a pod takes no lock.
    passive_down_until: AtomicU64,
    created: Instant,
    /// The edge's HTTP/2 connections to the pod, for gRPC.
    pub h2c: PodConnections,
    /// HTTP/1.1 connections to the pod between agent connections.
    pub idle_h1: IdleConnections,
    /// The pod's other ports that path routes send to ([`Route`]), in route order.
    routes: Vec<RoutePort>,
}

/// One routed port of a pod and the edge's connections to it.
pub struct RoutePort {
    pub addr: SocketAddr,
    pub h2c: PodConnections,
}

/// Where a request with a given [`Route`] goes on a pod.
pub struct PodPort<'a> {
    pub addr: SocketAddr,
    pub h2c: &'a PodConnections,
}

impl Pod {
    /// The address and HTTP/2 connections for `route` on this pod.
    pub fn port(&self, route: Route) -> PodPort<'_> {
        match route
            .index()
            .checked_sub(1)
            .and_then(|i| self.routes.get(i))
        {
            Some(port) => PodPort {
                addr: port.addr,
                h2c: &port.h2c,
            },
            None => PodPort {
                addr: self.addr,
                h2c: &self.h2c,
            },
        }
    }

    fn new(endpoint: &Endpoint, health_port: u16, route_ports: &[u16]) -> Self {
        Self {
            addr: endpoint.addr,
            health_addr: SocketAddr::new(endpoint.addr.ip(), health_port),
            label: endpoint
                .name
                .clone()
                .unwrap_or_else(|| endpoint.addr.to_string()),
            ready: AtomicBool::new(endpoint.ready),
            terminating: AtomicBool::new(endpoint.terminating),
            healthy: AtomicBool::new(false),
            consecutive_ok: AtomicU32::new(0),
            consecutive_fail: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            passive_down_until: AtomicU64::new(0),
            created: Instant::now(),
            h2c: PodConnections::default(),
            idle_h1: IdleConnections::default(),
            routes: route_ports
                .iter()
                .map(|port| RoutePort {
                    addr: SocketAddr::new(endpoint.addr.ip(), *port),
                    h2c: PodConnections::default(),
                })
                .collect(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::SeqCst) != healthy
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Every port's HTTP/2 connections to the pod.
    fn h2c_ports(&self) -> impl Iterator<Item = &PodConnections> {
        std::iter::once(&self.h2c).chain(self.routes.iter().map(|port| &port.h2c))
    }

    fn nanos_since_created(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.created).as_nanos()).unwrap_or(u64::MAX)
    }

    fn passively_down(&self, now: Instant) -> bool {
        self.passive_down_until.load(Ordering::Relaxed) > self.nanos_since_created(now)
    }

    /// Whether new traffic may go here. Existing streams are never affected.
    pub fn accepts_new(&self, now: Instant) -> bool {
        self.is_healthy()
            && self.ready.load(Ordering::SeqCst)
            && !self.terminating.load(Ordering::SeqCst)
            && !self.passively_down(now)
    }
}

/// Holds one in-flight slot on a pod; released on drop (end of stream or tunnel).
pub struct PodGuard {
    pod: Arc<Pod>,
}

impl PodGuard {
    pub fn pod(&self) -> &Arc<Pod> {
        &self.pod
    }
}

impl Drop for PodGuard {
    fn drop(&mut self) {
        self.pod.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Pool {
    pods: ArcSwap<Vec<Arc<Pod>>>,
    health_port: u16,
    /// The ports of `upstream.routes`, opened on every pod.
    route_ports: Vec<u16>,
    passive_backoff: Duration,
    /// Woken when discovery changes, so new pods are checked at once.
    pub(crate) changed: Notify,
}

impl Pool {
    pub fn new(health_port: u16, passive_backoff: Duration) -> Self {
        Self {
            pods: ArcSwap::from_pointee(Vec::new()),
            health_port,
            route_ports: Vec::new(),
            passive_backoff,
            changed: Notify::new(),
        }
    }

    /// Every pod also takes requests on these ports ([`Route`]s other than the agent's).
    pub fn with_route_ports(mut self, ports: Vec<u16>) -> Self {
        self.route_ports = ports;
        self
    }

    pub fn pods(&self) -> Arc<Vec<Arc<Pod>>> {
        self.pods.load_full()
    }

    /// The pods discovery knows now, as the per-pod metric series show them.
    pub fn samples(&self) -> Vec<PodSample> {
        self.pods
            .load()
            .iter()
            .map(|pod| PodSample {
                label: pod.label.clone(),
                healthy: pod.is_healthy(),
                in_flight: pod.in_flight(),
                h2_connections: pod.h2c_ports().map(|c| c.open_connections()).sum(),
            })
            .collect()
    }

    /// Closes, every [`RETIRE_SWEEP`], the idle HTTP/2 connections a burst made the edge
    /// dial beyond each pod's usual ones ([`PodConnections::retire_idle`]).
    pub async fn retire_idle_connections(self: Arc<Self>, settings: H2cSettings) {
        loop {
            tokio::time::sleep(RETIRE_SWEEP).await;
            for pod in self.pods().iter() {
                let closed: usize = pod.h2c_ports().map(|c| c.retire_idle(&settings)).sum();
                if closed > 0 {
                    tracing::debug!(pod = %pod.label, closed, "closed idle pod connections");
                }
            }
        }
    }

    /// Applies a discovery snapshot. Known pods keep their health and counters; new pods
    /// start unhealthy; vanished pods leave the set (their open streams continue, holding
    /// their own `Arc<Pod>`).
    pub fn update(&self, endpoints: &[Endpoint]) {
        let current = self.pods.load();
        let mut next = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let pod = match current.iter().find(|p| p.addr == endpoint.addr) {
                Some(pod) => pod.clone(),
                None => {
                    tracing::info!(pod = %endpoint.addr, name = ?endpoint.name, "pod discovered");
                    Arc::new(Pod::new(endpoint, self.health_port, &self.route_ports))
                }
            };
            pod.ready.store(endpoint.ready, Ordering::SeqCst);
            pod.terminating
                .store(endpoint.terminating, Ordering::SeqCst);
            next.push(pod);
        }
        for gone in current
            .iter()
            .filter(|p| !next.iter().any(|n| n.addr == p.addr))
        {
            tracing::info!(pod = %gone.label, in_flight = gone.in_flight(), "pod left discovery");
        }
        self.pods.store(Arc::new(next));
        self.changed.notify_one();
    }

    /// The eligible pod with the fewest in-flight streams, with a slot taken on it. No
    /// lock: two concurrent picks may both take the same least-loaded pod, an imbalance of
    /// one stream that the next picks even out (streams live for hours; exactness is not
    /// worth serialising every request of every worker thread).
    pub fn pick(&self) -> Option<PodGuard> {
        let now = Instant::now();
        let pods = self.pods.load();
        let pod = pods
            .iter()
            .filter(|p| p.accepts_new(now))
            .min_by_key(|p| p.in_flight())?
            .clone();
        pod.in_flight.fetch_add(1, Ordering::SeqCst);
        Some(PodGuard { pod })
    }

    /// A slot on `pod` itself: an agent connection's next request to the pod it already
    /// has a connection to (HTTP/1.1 keep-alive), while that pod is still discovered and
    /// takes new traffic.
    pub fn hold(&self, pod: &Arc<Pod>) -> Option<PodGuard> {
        let known = self.pods.load().iter().any(|p| Arc::ptr_eq(p, pod));
        if !known || !pod.accepts_new(Instant::now()) {
            return None;
        }
        pod.in_flight.fetch_add(1, Ordering::SeqCst);
        Some(PodGuard { pod: pod.clone() })
    }

    /// A connect failure or reset: stop new traffic to the pod for the back-off period.
    pub fn mark_failed(&self, pod: &Pod) {
        let until = pod.nanos_since_created(Instant::now() + self.passive_backoff);
        pod.passive_down_until.store(until, Ordering::Relaxed);
        tracing::warn!(pod = %pod.label, backoff = ?self.passive_backoff, "pod failed a connection; backing off");
    }

    pub fn any_accepting(&self) -> bool {
        let now = Instant::now();
        self.pods.load().iter().any(|p| p.accepts_new(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u8) -> Vec<Endpoint> {
        (1..=n)
            .map(|i| Endpoint::plain(SocketAddr::from(([127, 0, 1, i], 8150))))
            .collect()
    }

    fn healthy_pool(n: u8) -> Pool {
        let pool = Pool::new(8151, Duration::from_secs(5));
        pool.update(&endpoints(n));
        for p in pool.pods().iter() {
            p.set_healthy(true);
        }
        pool
    }

    #[test]
    fn new_pods_wait_for_their_first_check() {
        let pool = Pool::new(8151, Duration::from_secs(5));
        pool.update(&endpoints(2));
        assert!(pool.pick().is_none());
        assert_eq!(
            pool.pods()[0].health_addr,
            "127.0.1.1:8151".parse().unwrap()
        );
    }

    #[test]
    fn samples_show_the_current_pods_with_health_and_load() {
        let pool = Pool::new(8151, Duration::from_secs(5));
        pool.update(&endpoints(2));
        pool.pods()[1].set_healthy(true);
        let held = pool.pick().expect("the healthy pod");
        let sample = |label: &str, healthy, in_flight| PodSample {
            label: label.to_owned(),
            healthy,
            in_flight,
            h2_connections: 0,
        };
        assert_eq!(
            pool.samples(),
            [
                sample("127.0.1.1:8150", false, 0),
                sample("127.0.1.2:8150", true, 1)
            ]
        );
        drop(held);
        pool.update(&endpoints(1));
        assert_eq!(pool.samples(), [sample("127.0.1.1:8150", false, 0)]);
    }

    #[test]
    fn least_in_flight_spreads_evenly_and_releases() {
        let pool = healthy_pool(3);
        let guards: Vec<_> = (0..30).map(|_| pool.pick().unwrap()).collect();
        for pod in pool.pods().iter() {
            assert_eq!(pod.in_flight(), 10);
        }
        drop(guards);
        assert!(pool.pods().iter().all(|p| p.in_flight() == 0));
    }

    #[test]
    fn unready_terminating_and_failed_pods_get_nothing_new() {
        let pool = healthy_pool(3);
        let mut eps = endpoints(3);
        eps[0].ready = false;
        eps[1].terminating = true;
        pool.update(&eps);
        let third = pool.pods()[2].clone();
        for _ in 0..5 {
            assert_eq!(pool.pick().unwrap().pod().addr, third.addr);
        }
        pool.mark_failed(&third);
        assert!(pool.pick().is_none());
        assert!(!pool.any_accepting());
    }

    #[test]
    fn a_held_pod_is_kept_only_while_discovered_and_fit() {
        let pool = healthy_pool(2);
        let first = pool.pods()[0].clone();
        assert_eq!(pool.hold(&first).unwrap().pod().addr, first.addr);
        pool.mark_failed(&first);
        assert!(pool.hold(&first).is_none(), "backing off");
        let second = pool.pods()[1].clone();
        pool.update(&endpoints(1));
        assert!(second.accepts_new(Instant::now()));
        assert!(pool.hold(&second).is_none(), "gone from discovery");
    }

    #[test]
    fn rediscovery_keeps_state_and_open_guards_survive_removal() {
        let pool = healthy_pool(2);
        let guard = pool.pick().unwrap();
        pool.update(&endpoints(2));
        assert!(pool.pods().iter().all(|p| p.is_healthy()));
        pool.update(&endpoints(0));
        assert!(pool.pick().is_none());
        assert_eq!(guard.pod().in_flight(), 1);
    }
}
