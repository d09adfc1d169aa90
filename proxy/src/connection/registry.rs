//! Client connections by client, from the start of their TLS handshake to their close, each
//! with a way to close it from outside. A client is a [`ClientKey`] (an IPv4 address or an
//! IPv6 /64 by default, as `limits.toml` `[keys]` says), the key every per-client limit
//! counts by: a client rotating through the addresses of its /64 is one client here too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

use crate::policy::ClientConnections;
use crate::support::memory::shrink_after_burst;
use crate::support::net::{ClientKey, KeyPrefixes, SharedKeyPrefixes};

#[derive(Default)]
struct Entry {
    /// Each connection's address (blocklist edits close by address) and its closer.
    tokens: HashMap<u64, (IpAddr, CancellationToken)>,
    /// How many of `tokens` belong to connections still in their TLS handshake.
    handshaking: usize,
}

/// Client connections by client key, from the moment the edge decides to handshake with
/// them until they close: a connection in its TLS handshake already counts against its
/// client's limits, and a blocklist edit closes it like an established one.
pub struct ConnectionRegistry {
    by_client: Mutex<HashMap<ClientKey, Entry>>,
    /// How addresses become keys; set from `limits.toml` (default: /32 and /64). After a
    /// change, connections already open stay counted under the key they were opened with.
    prefixes: SharedKeyPrefixes,
    /// Connections in their TLS handshake, by socket cookie (unique for the kernel's
    /// lifetime, unlike a file descriptor number), waiting for the connection layer.
    handshakes: Mutex<HashMap<u64, Handshake>>,
    next_id: AtomicU64,
    open: IntGauge,
    in_handshake: IntGauge,
}

/// A registration waiting for its TLS handshake to end.
struct Handshake {
    guard: ConnectionGuard,
    /// Cancelled when the handshake ended (either way), to stop its deadline.
    over: CancellationToken,
}

/// A connection between accept and the end of its TLS handshake.
pub struct HandshakeTicket {
    /// Cancelled when the edge wants this connection closed (its client was blocked).
    pub cancelled: CancellationToken,
    /// Cancelled when the handshake is over, successful or abandoned.
    pub over: CancellationToken,
}

/// Registration of one connection; unregisters on drop.
pub struct ConnectionGuard {
    registry: Arc<ConnectionRegistry>,
    pub(crate) ip: IpAddr,
    /// The key it is counted under.
    key: ClientKey,
    id: u64,
    /// False while the TLS handshake runs: only open connections are in `open`.
    established: bool,
    pub cancelled: CancellationToken,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut by_client = self.registry.lock();
        if let Some(entry) = by_client.get_mut(&self.key) {
            entry.tokens.remove(&self.id);
            if !self.established {
                entry.handshaking = entry.handshaking.saturating_sub(1);
            }
            if entry.tokens.is_empty() {
                by_client.remove(&self.key);
                shrink_after_burst(&mut by_client);
            }
        }
        drop(by_client);
        if self.established {
            self.registry.open.dec();
        } else {
            self.registry.in_handshake.dec();
        }
    }
}

impl ConnectionRegistry {
    pub fn new(open: IntGauge, in_handshake: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            by_client: Mutex::new(HashMap::new()),
            prefixes: SharedKeyPrefixes::default(),
            handshakes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            open,
            in_handshake,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Entry>> {
        crate::support::sync::lock(&self.by_client)
    }

    /// Which part of an address is the client, from now on.
    pub fn set_key_prefixes(&self, prefixes: KeyPrefixes) {
        self.prefixes.store(prefixes);
    }

    fn add(self: &Arc<Self>, ip: IpAddr, established: bool) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancelled = CancellationToken::new();
        let key = self.prefixes.key(ip);
        {
            let mut by_client = self.lock();
            let entry = by_client.entry(key).or_default();
            entry.tokens.insert(id, (ip, cancelled.clone()));
            if !established {
                entry.handshaking += 1;
            }
        }
        if established {
            self.open.inc();
        } else {
            self.in_handshake.inc();
        }
        ConnectionGuard {
            registry: self.clone(),
            ip,
            key,
            id,
            established,
            cancelled,
        }
    }

    /// Registers an open connection (its handshake is over, or it never had one).
    pub fn register(self: &Arc<Self>, ip: IpAddr) -> ConnectionGuard {
        self.add(ip, true)
    }

    /// Registers a connection about to start its TLS handshake on the socket with
    /// `socket` cookie; [`ConnectionRegistry::finish_handshake`] turns it into an open one.
    pub fn begin_handshake(self: &Arc<Self>, ip: IpAddr, socket: u64) -> HandshakeTicket {
        let guard = self.add(ip, false);
        let ticket = HandshakeTicket {
            cancelled: guard.cancelled.clone(),
            over: CancellationToken::new(),
        };
        let previous = crate::support::sync::lock(&self.handshakes).insert(
            socket,
            Handshake {
                guard,
                over: ticket.over.clone(),
            },
        );
        // A cookie is never reused, so there is no previous entry; if there were, it
        // belongs to no live handshake.
        if let Some(stale) = previous {
            stale.over.cancel();
        }
        ticket
    }

    /// The registration of a socket whose TLS handshake completed, now counted as open.
    /// `None` when its handshake was abandoned meanwhile (deadline or block).
    pub fn finish_handshake(&self, socket: u64) -> Option<ConnectionGuard> {
        let Handshake { mut guard, over } = self.take_handshake(socket)?;
        over.cancel();
        if let Some(entry) = self.lock().get_mut(&guard.key) {
            entry.handshaking = entry.handshaking.saturating_sub(1);
        }
        guard.established = true;
        self.in_handshake.dec();
        self.open.inc();
        Some(guard)
    }

    /// Forgets a handshake that will not complete; true if it was still waiting.
    pub fn abandon_handshake(&self, socket: u64) -> bool {
        match self.take_handshake(socket) {
            Some(handshake) => {
                handshake.over.cancel();
                true
            }
            None => false,
        }
    }

    /// Removes a socket's waiting handshake; the table gives back what a flood of
    /// handshakes made it grow to once the flood is over.
    fn take_handshake(&self, socket: u64) -> Option<Handshake> {
        let mut handshakes = crate::support::sync::lock(&self.handshakes);
        let handshake = handshakes.remove(&socket);
        shrink_after_burst(&mut handshakes);
        handshake
    }

    /// Connections in their TLS handshake now (waiting for a slot included), from every
    /// client. The global cap counts slots instead ([`crate::listener::handshake_slots`]).
    #[cfg(test)]
    pub fn handshakes(&self) -> usize {
        crate::support::sync::lock(&self.handshakes).len()
    }

    /// Connections of `ip`'s client (every address with its key) in their TLS handshake
    /// now.
    pub fn handshakes_from(&self, ip: IpAddr) -> usize {
        let key = self.prefixes.key(ip);
        self.lock().get(&key).map_or(0, |e| e.handshaking)
    }

    /// Connections of `ip`'s client (every address with its key), open or in their
    /// handshake.
    pub fn count(&self, ip: IpAddr) -> usize {
        let key = self.prefixes.key(ip);
        self.lock().get(&key).map_or(0, |e| e.tokens.len())
    }

    /// Closes every connection (open or in its handshake) whose own address matches;
    /// returns how many.
    pub fn close_matching(&self, matches: impl Fn(IpAddr) -> bool) -> usize {
        let by_client = self.lock();
        let mut closed = 0;
        for (key, entry) in by_client.iter() {
            let mut closed_here = 0;
            for (_, token) in entry.tokens.values().filter(|(ip, _)| matches(*ip)) {
                token.cancel();
                closed_here += 1;
            }
            if closed_here > 0 {
                tracing::info!(client = %key, connections = closed_here, "closing established connections");
            }
            closed += closed_here;
        }
        closed
    }
}

impl ClientConnections for ConnectionRegistry {
    fn set_key_prefixes(&self, prefixes: KeyPrefixes) {
        ConnectionRegistry::set_key_prefixes(self, prefixes);
    }

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
        let registry = ConnectionRegistry::new(
            IntGauge::new("open", "open").unwrap(),
            IntGauge::new("handshaking", "handshaking").unwrap(),
        );
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

    #[test]
    fn an_ipv6_client_is_its_slash_64_and_a_block_closes_only_the_blocked_address() {
        let registry = ConnectionRegistry::new(
            IntGauge::new("open", "open").unwrap(),
            IntGauge::new("handshaking", "handshaking").unwrap(),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, other) = (
            ip("2001:db8:1:2::a"),
            ip("2001:db8:1:2:ffff::b"),
            ip("2001:db8:1:3::a"),
        );
        let a1 = registry.register(a);
        let b1 = registry.register(b);
        let _h = registry.begin_handshake(ip("2001:db8:1:2::c"), 7);
        let o1 = registry.register(other);
        // Keyed by address, each of these was a client with one connection.
        assert_eq!(registry.count(a), 3);
        assert_eq!(registry.count(ip("2001:db8:1:2::99")), 3);
        assert_eq!(registry.handshakes_from(b), 1);
        assert_eq!(registry.count(other), 1);
        // IPv4-mapped addresses are their IPv4 client.
        let v4 = registry.register(ip("192.0.2.1"));
        assert_eq!(registry.count(ip("::ffff:192.0.2.1")), 1);

        // A blocklist entry for one address closes that address's connections only.
        assert_eq!(registry.close_matching(|ip| ip == b), 1);
        assert!(b1.cancelled.is_cancelled() && !a1.cancelled.is_cancelled());
        drop(b1);
        assert_eq!(registry.count(a), 2);

        // Full-address keys when the limits say so; open connections keep their key.
        registry.set_key_prefixes(KeyPrefixes::new(32, 128).unwrap());
        let a2 = registry.register(a);
        assert_eq!(registry.count(a), 1);
        drop((a1, a2, o1, v4));
        assert_eq!(registry.open.get(), 0);
        registry.set_key_prefixes(KeyPrefixes::DEFAULT);
        assert_eq!(registry.count(a), 1, "the handshake is left");
    }

    #[test]
    fn handshakes_count_against_their_client_until_finished_or_abandoned() {
        let registry = ConnectionRegistry::new(
            IntGauge::new("open", "open").unwrap(),
            IntGauge::new("handshaking", "handshaking").unwrap(),
        );
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let first = registry.begin_handshake(a, 11);
        let second = registry.begin_handshake(a, 12);
        assert_eq!((registry.count(a), registry.handshakes_from(a)), (2, 2));
        assert_eq!((registry.open.get(), registry.in_handshake.get()), (0, 2));

        // A blocklist edit reaches connections still in their handshake.
        assert_eq!(registry.close_matching(|ip| ip == a), 2);
        assert!(first.cancelled.is_cancelled() && second.cancelled.is_cancelled());

        let open = registry.finish_handshake(11).expect("still waiting");
        assert!(first.over.is_cancelled());
        assert_eq!((registry.open.get(), registry.in_handshake.get()), (1, 1));
        assert_eq!(registry.handshakes_from(a), 1);
        assert!(registry.abandon_handshake(12));
        assert!(second.over.is_cancelled());
        assert!(
            registry.finish_handshake(12).is_none(),
            "abandoned stays abandoned"
        );
        assert_eq!((registry.count(a), registry.handshakes()), (1, 0));
        drop(open);
        assert_eq!(registry.count(a), 0);
        assert_eq!((registry.open.get(), registry.in_handshake.get()), (0, 0));
    }
}
