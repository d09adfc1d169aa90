//! `[shutdown]`: how the edge drains.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::FieldError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Between `/readyz` turning 503 and the listeners closing: time for the load
    /// balancer in front to stop sending new connections.
    #[serde(with = "humantime_serde")]
    pub readiness_delay: Duration,
    /// How long open websockets and streams may continue after the listeners closed.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// Open tunnels and HTTP/2 connections are closed at random moments within this
    /// fraction of `drain_deadline` after the listeners close, so thousands of agents do
    /// not all reconnect in the same second. 0: they stay until the deadline.
    pub close_spread: f64,
    /// Where a new process started with `kas-edge run --upgrade` waits for the running
    /// one's listening sockets (sent when it gets SIGQUIT). pingora's TLS port uses this
    /// path; the edge's own listeners (admin, `listen.http`) use it with
    /// [`OWN_LISTENERS_SUFFIX`] appended. Both processes must read the same value.
    pub upgrade_socket: PathBuf,
}

/// Appended to `shutdown.upgrade_socket` for the socket that carries the edge's own
/// listeners (pingora's transfer is its own, on the path itself).
pub const OWN_LISTENERS_SUFFIX: &str = ".listeners";

/// The longest Unix socket path Linux takes (`sun_path` is 108 bytes with its NUL).
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Where `upgrade_socket` points by default: a path every user can create, the same for
/// the old and the new process. Two edges on one host need a path each.
pub const DEFAULT_UPGRADE_SOCKET: &str = "/tmp/kas-edge-upgrade.sock";

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            readiness_delay: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(60),
            close_spread: 0.8,
            upgrade_socket: PathBuf::from(DEFAULT_UPGRADE_SOCKET),
        }
    }
}

impl ShutdownConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        super::positive("shutdown.drain_deadline", self.drain_deadline)?;
        if !(0.0..=1.0).contains(&self.close_spread) {
            return Err(FieldError::new(
                "shutdown.close_spread",
                "must be between 0 and 1",
            ));
        }
        self.validate_upgrade_socket()
    }

    /// pingora binds this path with `unwrap()` and sends the addresses as space-separated
    /// text: a path it cannot bind would panic the new process, so it is checked here.
    fn validate_upgrade_socket(&self) -> Result<(), FieldError> {
        const FIELD: &str = "shutdown.upgrade_socket";
        let path = &self.upgrade_socket;
        let Some(text) = path.to_str() else {
            return Err(FieldError::new(FIELD, "must be valid UTF-8"));
        };
        if !path.is_absolute() {
            return Err(FieldError::new(FIELD, "must be an absolute path"));
        }
        if text.ends_with('/') || path.file_name().is_none() {
            return Err(FieldError::new(FIELD, "must name a file, not a directory"));
        }
        let longest = MAX_UNIX_SOCKET_PATH - OWN_LISTENERS_SUFFIX.len();
        if text.len() > longest {
            return Err(FieldError::new(
                FIELD,
                format!(
                    "a Unix socket path of at most {longest} bytes (it has {})",
                    text.len()
                ),
            ));
        }
        Ok(())
    }

    /// The socket of the edge's own listeners, beside pingora's.
    pub fn own_listeners_socket(&self) -> PathBuf {
        let mut path = self.upgrade_socket.clone().into_os_string();
        path.push(OWN_LISTENERS_SUFFIX);
        PathBuf::from(path)
    }
}
