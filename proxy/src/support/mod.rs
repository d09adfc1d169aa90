//! Small helpers several layers need, each with one home.

pub mod filewatch;
pub mod fs;
pub mod http_client;
pub mod keepalive;
pub mod kubernetes;
pub mod net;
pub mod service_manager;
pub mod status;
pub mod sync;
