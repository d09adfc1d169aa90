//! Metric registration shared by kas and the edge.

use prometheus::{IntGauge, Registry};

/// Registers `c` with `registry` and returns it.
///
/// Panics on a name clash: metric names are constants of the calling module, so a clash
/// is a programming error that every test constructing the metrics catches.
pub fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

/// Holds one unit of a gauge (an open connection, a running stream) for as long as it
/// lives, so the count comes back down on every path out, panics and early returns
/// included.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn hold(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_gauge_comes_back_down() {
        let gauge = IntGauge::new("held", "held").unwrap();
        let first = GaugeGuard::hold(gauge.clone());
        let second = GaugeGuard::hold(gauge.clone());
        assert_eq!(gauge.get(), 2);
        drop(first);
        assert_eq!(gauge.get(), 1);
        drop(second);
        assert_eq!(gauge.get(), 0);
    }
}
