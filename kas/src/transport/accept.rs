//! Accepting connections on one of kas's listeners until it stops.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// After a failed accept (out of file descriptors and the like), wait this long instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection (Nagle off: agents' and callers' small messages go at once), or
/// `None` once `stop` fires. `listener_name` names the listener in the warning a failed
/// accept logs.
pub async fn next_connection(
    listener: &TcpListener,
    stop: &CancellationToken,
    listener_name: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return None,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, peer));
            }
            Err(e) => {
                tracing::warn!(listener = listener_name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}
