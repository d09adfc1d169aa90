//! What the edge tells its operators: Prometheus metrics and JSON logs.

pub mod log_writer;
pub mod metrics;
