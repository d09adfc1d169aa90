//! Open client connections by IP, each with a way to close it from outside.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

use crate::policy::ClientConnections;

#[derive(Default)]
struct Entry {
    tokens: HashMap<u64, CancellationToken>,
}

/// Open connections by client IP.
pub struct ConnectionRegistry {
    by_ip: Mutex<HashMap<IpAddr, Entry>>,
    next_id: AtomicU64,
    open: IntGauge,
}

/// Registration of one connection; unregisters on drop.
pub struct ConnectionGuard {
    registry: Arc<ConnectionRegistry>,
    pub(crate) ip: IpAddr,
    id: u64,
    pub cancelled: CancellationToken,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut by_ip = self.registry.lock();
        if let Some(entry) = by_ip.get_mut(&self.ip) {
            entry.tokens.remove(&self.id);
            if entry.tokens.is_empty() {
                by_ip.remove(&self.ip);
            }
        }
        self.registry.open.dec();
    }
}

impl ConnectionRegistry {
    pub fn new(open: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            by_ip: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            open,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        crate::support::sync::lock(&self.by_ip)
    }

    pub fn register(self: &Arc<Self>, ip: IpAddr) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancelled = CancellationToken::new();
        self.lock()
            .entry(ip)
            .or_default()
            .tokens
            .insert(id, cancelled.clone());
        self.open.inc();
        ConnectionGuard {
            registry: self.clone(),
            ip,
            id,
            cancelled,
        }
    }

    /// Open connections of `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip).map_or(0, |e| e.tokens.len())
    }

    /// Closes every open connection whose client IP matches; returns how many.
    pub fn close_matching(&self, matches: impl Fn(IpAddr) -> bool) -> usize {
        let by_ip = self.lock();
        let mut closed = 0;
        for (ip, entry) in by_ip.iter().filter(|(ip, _)| matches(**ip)) {
            for token in entry.tokens.values() {
                token.cancel();
                closed += 1;
            }
            tracing::info!(client = %ip, connections = entry.tokens.len(), "closing established connections");
        }
        closed
    }
}

impl ClientConnections for ConnectionRegistry {
    fn open_from(&self, ip: IpAddr) -> usize {
        self.count(ip)
    }

    fn close_matching(&self, matches: &dyn Fn(IpAddr) -> bool) -> usize {
        ConnectionRegistry::close_matching(self, matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_counts_and_closes_by_ip() {
        let registry = ConnectionRegistry::new(IntGauge::new("open", "open").unwrap());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = registry.register(a);
        let a2 = registry.register(a);
        let b1 = registry.register(b);
        assert_eq!(registry.count(a), 2);
        assert_eq!(registry.open.get(), 3);
        assert_eq!(registry.close_matching(|ip| ip == a), 2);
        assert!(a1.cancelled.is_cancelled() && a2.cancelled.is_cancelled());
        assert!(!b1.cancelled.is_cancelled());
        drop((a1, a2));
        assert_eq!(registry.count(a), 0);
        assert_eq!(registry.open.get(), 1);
    }
}
