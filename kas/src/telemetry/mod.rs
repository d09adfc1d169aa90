//! What kas tells its operators: Prometheus metrics, the observability port (`/liveness`,
//! `/readiness`, `/metrics`) and JSON logs.

pub mod logging;
pub mod metrics;
pub(crate) mod observability;
