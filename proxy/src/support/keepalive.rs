//! TCP keepalive: how dead peers are found on connections that may idle for hours, where
//! no idle timer is allowed to cut a healthy agent. Agents and pods get the same probe
//! rhythm after their own idle time.

use std::time::Duration;

/// Probes after the idle time, this far apart...
const INTERVAL: Duration = Duration::from_secs(10);
/// ...this many unanswered before the connection is dead.
const PROBES: u32 = 3;

/// For pingora's listeners and upstream peers.
pub fn pingora(idle: Duration) -> pingora::protocols::l4::ext::TcpKeepalive {
    pingora::protocols::l4::ext::TcpKeepalive {
        idle,
        interval: INTERVAL,
        count: PROBES as usize,
        #[cfg(target_os = "linux")]
        user_timeout: Duration::ZERO,
    }
}

/// For sockets the edge opens itself.
pub fn apply(stream: &tokio::net::TcpStream, idle: Duration) -> std::io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(INTERVAL)
        .with_retries(PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}
