//! The project-wide JSON log setup lives in `kas_common` so the edge can share it.

pub use kas_common::logging::{init, LogConfig};
