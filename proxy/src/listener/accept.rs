//! Layer 1: admission at TCP accept, before any TLS work. A refused client costs the
//! edge one `accept` and one table lookup.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::listeners::ConnectionFilter;

use crate::policy::Policies;

/// Layer 1: at accept, before TLS. A trusted load balancer's own address is not judged;
/// its clients are, once their PROXY header is read.
#[derive(Clone)]
pub struct AcceptFilter {
    pub policies: Arc<Policies>,
    /// The edge's own readiness probes, dropped quietly.
    pub probes: Arc<SelfProbes>,
}

impl std::fmt::Debug for AcceptFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AcceptFilter")
    }
}

#[async_trait]
impl ConnectionFilter for AcceptFilter {
    async fn should_accept(&self, addr: Option<&SocketAddr>) -> bool {
        let Some(addr) = addr else { return true };
        if self.probes.take(addr) {
            return false;
        }
        if self.policies.trusted.contains(addr.ip()) {
            return true;
        }
        self.policies.admit(addr.ip())
    }
}

/// Connections the edge opens to its own TLS port (the readiness probe: "does pingora
/// accept yet?"). The accept filter drops them without a word, so they neither count as
/// clients nor make pingora log a failed TLS handshake for a probe that never sends one.
#[derive(Default)]
pub struct SelfProbes(Mutex<HashSet<SocketAddr>>);

impl SelfProbes {
    /// True (once) for a connection that came from [`SelfProbes::connect`].
    pub fn take(&self, peer: &SocketAddr) -> bool {
        self.lock().remove(peer)
    }

    /// Connects to `target` from a source address registered first, so the accept filter
    /// can recognise the connection. Succeeds once something listens on `target`.
    pub async fn connect(&self, target: SocketAddr) -> std::io::Result<()> {
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let local_ip = if target.is_ipv4() {
            IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        };
        socket.bind(SocketAddr::new(local_ip, 0))?;
        let local = socket.local_addr()?;
        self.lock().insert(local);
        let connected = socket.connect(target).await.map(drop);
        if connected.is_err() {
            self.lock().remove(&local);
        }
        connected
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        crate::support::sync::lock(&self.0)
    }
}
