//! The fleet's shared state in Redis, written as real kas v16 writes it so our pods and
//! real kas pods can share one Redis during a migration.
//!
//! - [`redis`]: the connection (lazy, reconnecting; every operation bounded in time and
//!   counted), key names and the `ExpiringValue` encoding.
//! - [`tunnel_tracker`]: which pods hold tunnels of which agent — one hash per agent, one
//!   field per pod, refreshed, unregistered late (the Redis [`crate::tunnel::TunnelTracker`]).
//! - [`querier`]: where an agent's tunnels are, polled once per agent for every request
//!   that waits (never a Redis call per request).
//! - [`agent_tracker`]: connected agents (`agent_tracker2`), for GitLab's UI.
//! - [`events`]: push events on the `kas_events` channel, waking every pod's pollers.
//! - [`token_limiter`]: new agent calls per token and minute, across the fleet.
//! - [`jwt`]: the JWTs kas pods (issuer and audience `gitlab-kas`) and GitLab (audience
//!   `gitlab-kas`) present to kas.
//!
//! Redis being down or slow never ends an agent's connection: writes are retried, lookups
//! fail and callers fall back to this pod's own tunnels.

pub mod agent_tracker;
pub mod events;
pub mod jwt;
pub mod querier;
pub mod redis;
pub mod token_limiter;
pub mod tunnel_tracker;

pub use self::redis::{Redis, RedisMetrics};
pub use agent_tracker::AgentTracker;
pub use querier::{KasUrlQuerier, Lookup};
pub use token_limiter::TokenLimiter;
pub use tunnel_tracker::RedisTunnelTracker;
