//! Metric registration shared by kas and the edge.

use prometheus::Registry;

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
