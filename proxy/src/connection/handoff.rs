//! Work a request hands to its connection: an established websocket tunnel.
//!
//! pingora keeps a large per-request state alive for as long as a request runs. A tunnel
//! that lives for hours should not: the request puts the tunnel here under its connection's
//! id and ends; the connection layer takes it and carries it in a small task of its own, so
//! an idle agent costs its TLS state, two sockets and one small buffer. The connection
//! layer does not know what it carries, only how to stop it (a block, the maximum age).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use pingora::protocols::UniqueIDType;

use crate::support::sync::lock;

/// Resolves when the edge wants the carried work to stop.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

type Carry = Box<dyn FnOnce(StopSignal) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Work waiting to be carried after its request ended.
pub struct Handoff {
    connection: UniqueIDType,
    carry: Carry,
}

impl Handoff {
    /// `carry` runs until it is done or its stop signal fires; it owns everything that
    /// must live exactly as long as the work (sockets, the pod's in-flight slot, gauges).
    pub fn new<F, Fut>(connection: UniqueIDType, carry: F) -> Self
    where
        F: FnOnce(StopSignal) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            connection,
            carry: Box::new(move |stop| Box::pin(carry(stop))),
        }
    }

    /// Runs the work to its end.
    pub async fn carry(self, stop: StopSignal) {
        (self.carry)(stop).await
    }
}

/// Handed-off work waiting for its connection's layer to pick it up, by connection id.
#[derive(Default)]
pub struct PendingHandoffs {
    slots: Mutex<HashMap<UniqueIDType, Handoff>>,
}

impl PendingHandoffs {
    pub fn put(&self, handoff: Handoff) {
        lock(&self.slots).insert(handoff.connection, handoff);
    }

    /// The work handed off on connection `id`, if any. Whoever takes it carries it (or
    /// drops it, which closes its sockets).
    pub fn take(&self, id: UniqueIDType) -> Option<Handoff> {
        lock(&self.slots).remove(&id)
    }
}
