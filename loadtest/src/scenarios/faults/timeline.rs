//! The faults scenario's timeline: every sample interval, agents connected, errors so far,
//! and the edge's and the kas pods' memory and CPU read from `/proc`. The processes change
//! under it (a pod killed and started again, two edges during an upgrade), so it reads the
//! pids it is told about at each tick and computes CPU per process from its own last
//! reading.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::probe::{clock_ticks, read_cpu_ticks, read_rss};
use crate::stats::Stats;

/// One point of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct ProcSample {
    /// Seconds since the run started.
    pub t: f64,
    pub connected: i64,
    /// Errors counted so far (all kinds).
    pub errors: u64,
    pub edge_rss_bytes: u64,
    /// CPU cores the edge used since the last sample (1.0 = one core busy).
    pub edge_cpu_cores: f64,
    pub kas_rss_bytes: u64,
    pub kas_cpu_cores: f64,
}

/// The processes to sample: updated by whoever starts and stops them.
#[derive(Clone, Default)]
pub struct Watched {
    inner: Arc<Mutex<(Vec<u32>, Vec<u32>)>>,
}

impl Watched {
    pub fn set_edge(&self, pids: Vec<u32>) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0 = pids;
    }

    pub fn set_kas(&self, pids: Vec<u32>) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1 = pids;
    }

    fn get(&self) -> (Vec<u32>, Vec<u32>) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// CPU ticks per process at the last sample.
struct CpuMeter {
    last: HashMap<u32, u64>,
    ticks_per_second: f64,
}

impl CpuMeter {
    /// Memory of `pids` added up, and the cores they used over `dt` seconds. A process
    /// seen for the first time counts all its ticks (it started within the interval, or
    /// nearly); one that is gone counts nothing.
    fn measure(&mut self, pids: &[u32], dt: f64, seen: &mut Vec<u32>) -> (u64, f64) {
        let (mut rss, mut ticks) = (0, 0);
        for &pid in pids {
            let (Some(r), Some(now)) = (read_rss(pid), read_cpu_ticks(pid)) else {
                continue;
            };
            rss += r;
            ticks += now.saturating_sub(self.last.get(&pid).copied().unwrap_or(0));
            self.last.insert(pid, now);
            seen.push(pid);
        }
        (rss, ticks as f64 / self.ticks_per_second / dt.max(1e-3))
    }
}

/// Samples every `every` until `stop` (at most `max_samples`); returns the timeline.
pub fn spawn(
    stats: Arc<Stats>,
    watched: Watched,
    every: Duration,
    max_samples: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<ProcSample>> {
    tokio::spawn(async move {
        let mut meter = CpuMeter {
            last: HashMap::new(),
            ticks_per_second: clock_ticks(),
        };
        let mut timeline = Vec::new();
        let mut tick = interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Prime the per-process readings, so the first point is not all their past CPU.
        let (edge, kas) = watched.get();
        let mut seen = Vec::new();
        meter.measure(&edge, 1.0, &mut seen);
        meter.measure(&kas, 1.0, &mut seen);
        let mut last_t = stats.elapsed_secs();
        while timeline.len() < max_samples {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let t = stats.elapsed_secs();
            let (edge, kas) = watched.get();
            let mut seen = Vec::new();
            let (edge_rss, edge_cpu) = meter.measure(&edge, t - last_t, &mut seen);
            let (kas_rss, kas_cpu) = meter.measure(&kas, t - last_t, &mut seen);
            meter.last.retain(|pid, _| seen.contains(pid));
            timeline.push(ProcSample {
                t,
                connected: stats.now_connected(),
                errors: stats.errors.total(),
                edge_rss_bytes: edge_rss,
                edge_cpu_cores: (edge_cpu * 1000.0).round() / 1000.0,
                kas_rss_bytes: kas_rss,
                kas_cpu_cores: (kas_cpu * 1000.0).round() / 1000.0,
            });
            last_t = t;
        }
        timeline
    })
}
