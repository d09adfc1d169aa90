//! Which idle reverse tunnels each agent holds on this pod, and who waits for one.
//!
//! Per agent: a set of ready tunnels and a FIFO of requests waiting for a tunnel that
//! serves their gRPC method. A request takes the newest ready tunnel whose descriptor names
//! its service and method exactly — an agent whose connection is being drained (its edge
//! or pod restarting, its connection's age) has reconnected and holds its newest tunnels on
//! its new connection, so requests go there and not to a tunnel about to close under them;
//! a tunnel that arrives while requests wait goes straight to the oldest request it can
//! serve. A taken tunnel that is never used (its taker dropped it)
//! comes back as ready, so a request that gave up costs the agent nothing.
//!
//! Everything is bounded — ready tunnels per agent and in total, waiting requests per
//! agent — because agents and callers choose how many of each they open.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::TunnelMetrics;
use super::tracker::{NoTracker, TunnelTracker};
use super::{Descriptor, Routed};

/// Limits of one registry.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    /// Ready tunnels one agent may hold here. agentk opens at most 500 tunnels.
    pub max_tunnels_per_agent: usize,
    /// Ready tunnels of all agents together.
    pub max_tunnels_total: usize,
    /// Requests for one agent waiting for a tunnel.
    pub max_waiting_per_agent: usize,
    /// How long a request waits for a tunnel (real kas: 20 s).
    pub find_timeout: Duration,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self {
            max_tunnels_per_agent: 500,
            max_tunnels_total: 1_000_000,
            max_waiting_per_agent: 1_000,
            find_timeout: Duration::from_secs(20),
        }
    }
}

/// Why no tunnel was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    /// No tunnel of the agent arrived within the find timeout.
    #[error("Agent connection not found. Is agent up to date and connected?")]
    NotConnected,
    /// Too many requests already wait for this agent's tunnels.
    #[error("too many requests are waiting for this agent's tunnels")]
    TooManyWaiting,
    /// The pod is shutting down.
    #[error("kas is shutting down")]
    ShuttingDown,
}

impl From<FindError> for tonic::Status {
    fn from(e: FindError) -> Self {
        match e {
            FindError::NotConnected => tonic::Status::deadline_exceeded(e.to_string()),
            FindError::TooManyWaiting => tonic::Status::resource_exhausted(e.to_string()),
            FindError::ShuttingDown => tonic::Status::unavailable(e.to_string()),
        }
    }
}

/// Why a tunnel could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("this agent already holds {0} idle tunnels on this kas")]
    AgentLimit(usize),
    #[error("this kas already holds {0} idle tunnels")]
    TotalLimit(usize),
    #[error("kas is shutting down")]
    ShuttingDown,
}

impl From<RegisterError> for tonic::Status {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::ShuttingDown => tonic::Status::unavailable(e.to_string()),
            _ => tonic::Status::resource_exhausted(e.to_string()),
        }
    }
}

/// An idle tunnel as the registry holds it: where to hand a request, and what it serves.
struct Ready {
    id: u64,
    descriptor: Arc<Descriptor>,
    handoff: oneshot::Sender<Routed>,
}

struct Waiter {
    id: u64,
    service: String,
    method: String,
    reply: oneshot::Sender<Tunnel>,
}

#[derive(Default)]
struct AgentTunnels {
    ready: VecDeque<Ready>,
    waiting: VecDeque<Waiter>,
}

impl AgentTunnels {
    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.waiting.is_empty()
    }
}

struct State {
    agents: HashMap<i64, AgentTunnels>,
    ready_total: usize,
    shutting_down: bool,
}

struct Inner {
    state: Mutex<State>,
    limits: RegistryLimits,
    next_id: AtomicU64,
    metrics: TunnelMetrics,
    /// Told when an agent's first ready tunnel arrives and its last one leaves.
    tracker: Arc<dyn TunnelTracker>,
}

/// The tunnels of every agent connected to this pod. Cheap to clone.
#[derive(Clone)]
pub struct TunnelRegistry {
    inner: Arc<Inner>,
}

impl TunnelRegistry {
    pub fn new(limits: RegistryLimits, metrics: TunnelMetrics) -> Self {
        Self::with_tracker(limits, metrics, Arc::new(NoTracker))
    }

    /// A registry that tells `tracker` which agents hold ready tunnels here.
    pub fn with_tracker(
        limits: RegistryLimits,
        metrics: TunnelMetrics,
        tracker: Arc<dyn TunnelTracker>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    agents: HashMap::new(),
                    ready_total: 0,
                    shutting_down: false,
                }),
                limits,
                next_id: AtomicU64::new(1),
                metrics,
                tracker,
            }),
        }
    }

    pub fn limits(&self) -> RegistryLimits {
        self.inner.limits
    }

    pub fn metrics(&self) -> &TunnelMetrics {
        &self.inner.metrics
    }

    /// Offers an agent's new idle tunnel: handed at once to the oldest request waiting for
    /// something it serves, else kept as ready. The returned [`Registration`] receives the
    /// request routed to the tunnel; dropping it withdraws the tunnel.
    pub fn register(
        &self,
        agent_id: i64,
        descriptor: Arc<Descriptor>,
    ) -> Result<Registration, RegisterError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (handoff, routed) = oneshot::channel();
        let ready = Ready {
            id,
            descriptor: descriptor.clone(),
            handoff,
        };
        self.inner.offer(agent_id, ready, true)?;
        Ok(Registration {
            registry: self.inner.clone(),
            agent_id,
            id,
            descriptor,
            routed,
        })
    }

    /// A ready tunnel of `agent_id` serving `service`/`method`, waiting up to the find
    /// timeout for one to arrive.
    pub async fn find(
        &self,
        agent_id: i64,
        service: &str,
        method: &str,
    ) -> Result<Tunnel, FindError> {
        let started = Instant::now();
        let result = self.wait_for(agent_id, service, method).await;
        self.count_routing(started, &result);
        result
    }

    /// The routing metrics of one find that ended with `result` (also for a caller whose
    /// own deadline ended the find first).
    pub(crate) fn count_routing<T>(&self, started: Instant, result: &Result<T, FindError>) {
        let metrics = &self.inner.metrics;
        let status = if result.is_ok() { "success" } else { "aborted" };
        metrics
            .routing_duration
            .with_label_values(&[status])
            .observe(started.elapsed().as_secs_f64());
        if matches!(result, Err(FindError::NotConnected)) {
            metrics.routing_timeouts.inc();
        }
    }

    /// A ready tunnel of `agent_id` serving `service`/`method` if there is one now; never
    /// waits.
    pub fn find_now(
        &self,
        agent_id: i64,
        service: &str,
        method: &str,
    ) -> Result<Option<Tunnel>, FindError> {
        let mut state = self.inner.lock();
        if state.shutting_down {
            return Err(FindError::ShuttingDown);
        }
        Ok(self.take_newest_ready(&mut state, agent_id, service, method))
    }

    /// Takes the newest ready tunnel of `agent_id` serving `service`/`method` (the module
    /// doc says why the newest), keeping the counts and the tracker right.
    fn take_newest_ready(
        &self,
        state: &mut State,
        agent_id: i64,
        service: &str,
        method: &str,
    ) -> Option<Tunnel> {
        let agent = state.agents.get_mut(&agent_id)?;
        let pos = agent
            .ready
            .iter()
            .rposition(|t| t.descriptor.supports(service, method) && !t.handoff.is_closed())?;
        let ready = agent.ready.remove(pos)?;
        if agent.ready.is_empty() {
            self.inner.tracker.set_has_tunnels(agent_id, false);
        }
        if agent.is_empty() {
            state.agents.remove(&agent_id);
        }
        state.ready_total -= 1;
        self.inner.metrics.ready.dec();
        Some(Tunnel { ready })
    }

    /// Like [`Self::find`], without the routing metrics: for callers that measure the whole
    /// routing themselves (the fleet's router, the private API's gateway).
    pub async fn wait_for(
        &self,
        agent_id: i64,
        service: &str,
        method: &str,
    ) -> Result<Tunnel, FindError> {
        let (id, reply) = {
            let mut state = self.inner.lock();
            if state.shutting_down {
                return Err(FindError::ShuttingDown);
            }
            if let Some(tunnel) = self.take_newest_ready(&mut state, agent_id, service, method) {
                return Ok(tunnel);
            }
            let agent = state.agents.entry(agent_id).or_default();
            if agent.waiting.len() >= self.inner.limits.max_waiting_per_agent {
                if agent.is_empty() {
                    state.agents.remove(&agent_id);
                }
                return Err(FindError::TooManyWaiting);
            }
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let (reply, answer) = oneshot::channel();
            agent.waiting.push_back(Waiter {
                id,
                service: service.to_owned(),
                method: method.to_owned(),
                reply,
            });
            (id, answer)
        };
        // Leaves the queue whatever ends the wait (timeout, or the caller going away).
        let _waiting = WaitingGuard {
            registry: &self.inner,
            agent_id,
            id,
        };
        match tokio::time::timeout(self.inner.limits.find_timeout, reply).await {
            Ok(Ok(tunnel)) => Ok(tunnel),
            // The sender went away without a tunnel: only shutdown drops waiters.
            Ok(Err(_)) => Err(FindError::ShuttingDown),
            Err(_) => Err(FindError::NotConnected),
        }
    }

    /// Stops handing out tunnels: waiting requests and later finds fail with
    /// [`FindError::ShuttingDown`], and no new tunnel is registered.
    pub fn shut_down(&self) {
        let mut state = self.inner.lock();
        state.shutting_down = true;
        for agent in state.agents.values_mut() {
            agent.waiting.clear();
        }
        state.agents.retain(|_, a| !a.is_empty());
    }

    /// Ready tunnels of one agent (for tests and diagnostics).
    pub fn ready_count(&self, agent_id: i64) -> usize {
        let state = self.inner.lock();
        state.agents.get(&agent_id).map_or(0, |a| a.ready.len())
    }

    /// Requests waiting for one agent's tunnels (for tests and diagnostics).
    pub fn waiting_count(&self, agent_id: i64) -> usize {
        let state = self.inner.lock();
        state.agents.get(&agent_id).map_or(0, |a| a.waiting.len())
    }

    /// Agents with tunnels or waiting requests (the table's size; it must shrink back).
    pub fn agent_count(&self) -> usize {
        self.inner.lock().agents.len()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing every tunnel; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `ready` to a waiting request or keeps it. `new` tunnels count against the
    /// limits; a returned (taken, unused) tunnel had its place already.
    fn offer(&self, agent_id: i64, mut ready: Ready, new: bool) -> Result<(), RegisterError> {
        let mut state = self.lock();
        if state.shutting_down {
            return Err(RegisterError::ShuttingDown);
        }
        let ready_total = state.ready_total;
        let agent = state.agents.entry(agent_id).or_default();
        // Oldest waiter first; waiters that gave up are skipped (their guard removes them).
        let mut i = 0;
        while i < agent.waiting.len() {
            let waiter = &agent.waiting[i];
            if waiter.reply.is_closed()
                || !ready.descriptor.supports(&waiter.service, &waiter.method)
            {
                i += 1;
                continue;
            }
            let waiter = agent.waiting.remove(i).expect("index is in range");
            match waiter.reply.send(Tunnel { ready }) {
                Ok(()) => {
                    if agent.is_empty() {
                        state.agents.remove(&agent_id);
                    }
                    return Ok(());
                }
                // The waiter left between the check and the send: try the next one.
                Err(tunnel) => ready = tunnel.ready,
            }
        }
        if new {
            if agent.ready.len() >= self.limits.max_tunnels_per_agent {
                let limit = self.limits.max_tunnels_per_agent;
                if agent.is_empty() {
                    state.agents.remove(&agent_id);
                }
                return Err(RegisterError::AgentLimit(limit));
            }
            if ready_total >= self.limits.max_tunnels_total {
                if agent.is_empty() {
                    state.agents.remove(&agent_id);
                }
                return Err(RegisterError::TotalLimit(self.limits.max_tunnels_total));
            }
        }
        if agent.ready.is_empty() {
            self.tracker.set_has_tunnels(agent_id, true);
        }
        agent.ready.push_back(ready);
        state.ready_total += 1;
        self.metrics.ready.inc();
        Ok(())
    }

    /// Removes a ready tunnel that left (its stream ended, or its registration dropped).
    fn withdraw(&self, agent_id: i64, id: u64) {
        let mut state = self.lock();
        let Some(agent) = state.agents.get_mut(&agent_id) else {
            return;
        };
        if let Some(pos) = agent.ready.iter().position(|t| t.id == id) {
            agent.ready.remove(pos);
            if agent.ready.is_empty() {
                self.tracker.set_has_tunnels(agent_id, false);
            }
            let empty = agent.is_empty();
            state.ready_total -= 1;
            self.metrics.ready.dec();
            if empty {
                state.agents.remove(&agent_id);
            }
        }
    }

    fn leave_queue(&self, agent_id: i64, id: u64) {
        let mut state = self.lock();
        let Some(agent) = state.agents.get_mut(&agent_id) else {
            return;
        };
        agent.waiting.retain(|w| w.id != id);
        if agent.is_empty() {
            state.agents.remove(&agent_id);
        }
    }
}

struct WaitingGuard<'a> {
    registry: &'a Inner,
    agent_id: i64,
    id: u64,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.registry.leave_queue(self.agent_id, self.id);
    }
}

/// The agent side of a registered idle tunnel: receives the request routed to it.
/// Dropping it withdraws the tunnel from the registry.
pub struct Registration {
    registry: Arc<Inner>,
    agent_id: i64,
    id: u64,
    descriptor: Arc<Descriptor>,
    routed: oneshot::Receiver<Routed>,
}

impl Registration {
    /// The agent whose tunnel this is.
    pub fn agent_id(&self) -> i64 {
        self.agent_id
    }

    /// Resolves with the request routed to this tunnel. Pending forever if none is (the
    /// caller selects it against the stream's end).
    pub async fn routed(&mut self) -> Routed {
        loop {
            if let Ok(routed) = (&mut self.routed).await {
                return routed;
            }
            // Taken and dropped unused (a request that gave up at the last moment): the
            // tunnel is still idle, so it offers itself again.
            let (handoff, routed) = oneshot::channel();
            self.routed = routed;
            let ready = Ready {
                id: self.id,
                descriptor: self.descriptor.clone(),
                handoff,
            };
            if self.registry.offer(self.agent_id, ready, false).is_err() {
                // Shutting down: the stream's end (drain) will come.
                return std::future::pending().await;
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.routed.close();
        self.registry.withdraw(self.agent_id, self.id);
    }
}

/// A tunnel taken for one request. [`Tunnel::start`] routes the request through it; a
/// tunnel dropped unused offers itself again (see [`Registration::routed`]).
pub struct Tunnel {
    ready: Ready,
}

impl Tunnel {
    /// What the agent said the tunnel serves.
    pub fn descriptor(&self) -> &Descriptor {
        &self.ready.descriptor
    }

    /// Hands `routed` to the agent's tunnel stream. Fails (giving `routed` back) if that
    /// stream ended meanwhile; the caller then finds another tunnel.
    pub fn start(self, routed: Routed) -> Result<(), Routed> {
        self.ready.handoff.send(routed)
    }
}
