//! Counters every agent task updates and the sampler reads. Atomics for the hot counts;
//! histograms and error samples behind short mutexes (updated once per event, not per
//! byte).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies in microseconds, from 1 µs to 10 minutes at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        Self(Mutex::new(new_histogram()))
    }
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(us);
    }

    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Default)]
pub struct ErrorLog(Mutex<BTreeMap<String, (u64, String)>>);

impl ErrorLog {
    /// Counts an error under `kind`, keeping the first message as an example.
    pub fn add(&self, kind: &str, message: impl FnOnce() -> String) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(kind) {
            Some((n, _)) => *n += 1,
            None => {
                map.insert(kind.to_owned(), (1, message()));
            }
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, (u64, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn total(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(n, _)| n)
            .sum()
    }
}

fn add(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

pub struct Stats {
    pub start: Instant,
    pub connect_attempts: AtomicU64,
    /// Transport ready (TCP + TLS + websocket + HTTP/2): completed handshakes.
    pub handshakes: AtomicU64,
    /// Authenticated and holding the configuration stream.
    pub connects_ok: AtomicU64,
    pub connected: AtomicI64,
    pub peak_connected: AtomicI64,
    /// Connections that ended without us asking: errors unless expected.
    pub unexpected_cuts: AtomicU64,
    /// Cuts of agents a scenario meant to be cut (blocked ones).
    pub expected_cuts: AtomicU64,
    /// Disconnects we asked for (storm, churn).
    pub cycles: AtomicU64,
    pub config_messages: AtomicU64,
    pub echo_sent: AtomicU64,
    pub echo_ok: AtomicU64,
    pub rpc_sent: AtomicU64,
    pub rpc_ok: AtomicU64,
    /// Kubernetes API requests (GETs, writes, watches) sent and answered with success.
    pub k8s_sent: AtomicU64,
    pub k8s_ok: AtomicU64,
    /// Watch streams open now.
    pub watches_open: AtomicU64,
    /// Reverse tunnels the agents opened (counted as operations of the error budget).
    pub tunnels_opened: AtomicU64,
    /// Tunnelled requests the agent saw cancelled (a watch its caller closed, kas ending
    /// the stream once the answer was through): not errors.
    pub tunnel_requests_cancelled: AtomicU64,
    pub connect_latency: Latency,
    pub handshake_latency: Latency,
    pub echo_rtt: Latency,
    pub rpc_latency: Latency,
    pub errors: ErrorLog,
}

impl Stats {
    /// Microseconds since the run started.
    pub fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            connect_attempts: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            connects_ok: AtomicU64::new(0),
            connected: AtomicI64::new(0),
            peak_connected: AtomicI64::new(0),
            unexpected_cuts: AtomicU64::new(0),
            expected_cuts: AtomicU64::new(0),
            cycles: AtomicU64::new(0),
            config_messages: AtomicU64::new(0),
            echo_sent: AtomicU64::new(0),
            echo_ok: AtomicU64::new(0),
            rpc_sent: AtomicU64::new(0),
            rpc_ok: AtomicU64::new(0),
            k8s_sent: AtomicU64::new(0),
            k8s_ok: AtomicU64::new(0),
            watches_open: AtomicU64::new(0),
            tunnels_opened: AtomicU64::new(0),
            tunnel_requests_cancelled: AtomicU64::new(0),
            connect_latency: Latency::default(),
            handshake_latency: Latency::default(),
            echo_rtt: Latency::default(),
            rpc_latency: Latency::default(),
            errors: ErrorLog::default(),
        }
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn inc(&self, counter: &AtomicU64) {
        add(counter);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn now_connected(&self) -> i64 {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn agent_up(&self) {
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_connected.fetch_max(now, Ordering::Relaxed);
    }

    pub fn agent_down(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// Operations the error budget is measured against.
    pub fn operations(&self) -> u64 {
        Self::get(&self.connect_attempts)
            + Self::get(&self.echo_sent)
            + Self::get(&self.rpc_sent)
            + Self::get(&self.k8s_sent)
            + Self::get(&self.tunnels_opened)
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}
