//! `[upstream]`: how the edge talks to kas pods.

use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Concurrent gRPC streams per HTTP/2 connection to a pod, at most: a pod may allow
    /// fewer (kas allows 200); a stream that finds every connection full opens another.
    pub max_h2_streams: usize,
    /// HTTP/2 PINGs find dead pods without an idle timeout on healthy streams.
    #[serde(with = "humantime_serde")]
    pub h2_ping_interval: Duration,
    /// TCP keepalive idle time towards pods.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// How many pods a request may try when connecting fails.
    pub max_connect_attempts: u32,
    /// How long a pod may take to answer a websocket upgrade before the agent gets a 502.
    #[serde(with = "humantime_serde")]
    pub upgrade_timeout: Duration,
    /// Paths that go to another port of the same pods: `[[upstream.routes]]` with
    /// `path_prefix = "/k8s-proxy/"` and `port = 8154` sends `kubectl`'s requests to kas's
    /// Kubernetes API proxy. Everything else goes to the discovered (agent) port.
    pub routes: Vec<PathRoute>,
}

/// One path route (see [`UpstreamConfig::routes`]).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PathRoute {
    pub path_prefix: String,
    pub port: u16,
}

/// More routes than this is a configuration mistake (every pod keeps connections per route).
const MAX_ROUTES: usize = 8;

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            max_h2_streams: 256,
            h2_ping_interval: Duration::from_secs(30),
            tcp_keepalive: Duration::from_secs(60),
            max_connect_attempts: 3,
            upgrade_timeout: Duration::from_secs(10),
            routes: Vec::new(),
        }
    }
}

/// The most streams a pod connection may carry: its flow-control window is every stream's
/// window added up (256 KiB each, and one for a probe), which HTTP/2 caps at 2^31 - 1.
pub const MAX_H2_STREAMS: usize = 8190;

impl UpstreamConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        super::positive("upstream.connect_timeout", self.connect_timeout)?;
        super::positive("upstream.h2_ping_interval", self.h2_ping_interval)?;
        super::positive("upstream.upgrade_timeout", self.upgrade_timeout)?;
        super::at_least_one("upstream.max_connect_attempts", self.max_connect_attempts)?;
        if self.max_h2_streams == 0 || self.max_h2_streams > MAX_H2_STREAMS {
            return Err(FieldError::new(
                "upstream.max_h2_streams",
                format!("must be from 1 to {MAX_H2_STREAMS}"),
            ));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(FieldError::new(
                "upstream.routes",
                format!("at most {MAX_ROUTES} routes"),
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            if !route.path_prefix.starts_with('/') || route.path_prefix.len() < 2 {
                return Err(FieldError::new(
                    "upstream.routes.path_prefix",
                    format!(
                        "{:?} must start with / and name a path (e.g. \"/k8s-proxy/\")",
                        route.path_prefix
                    ),
                ));
            }
            if route.port == 0 {
                return Err(FieldError::new(
                    "upstream.routes.port",
                    format!("route {:?} needs a port", route.path_prefix),
                ));
            }
            if self.routes[..i]
                .iter()
                .any(|r| r.path_prefix == route.path_prefix)
            {
                return Err(FieldError::new(
                    "upstream.routes.path_prefix",
                    format!("{:?} is listed twice", route.path_prefix),
                ));
            }
        }
        Ok(())
    }

    pub fn routes(&self) -> crate::upstream::route::Routes {
        crate::upstream::route::Routes::new(
            self.routes
                .iter()
                .map(|r| (r.path_prefix.clone(), r.port))
                .collect(),
        )
    }
}
