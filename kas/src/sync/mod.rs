//! Sharing work between streams: one poller per repository branch ([`head_poller`]) and
//! one call per key at a time ([`single_flight`]), so a thousand streams of one project
//! cost one Gitaly or GitLab call.

pub mod driven;
pub mod head_poller;
pub(crate) mod single_flight;
pub mod ttl_cache;
