//! The routing role: a call for an agent (from the Kubernetes API proxy) goes to a tunnel on
//! this pod if one is ready, else to the first pod that has one — this pod's registry and
//! the pods Redis names are asked at once, and whichever offers a tunnel first is used:
//!
//! - this pod: a waiting find in the registry (a tunnel arriving here is handed over);
//! - every other pod the agent's poller ([`KasUrlQuerier`]) names: a private-API stream
//!   that answers `no_tunnel` (it waits for one) and `tunnel_ready`. The first ready pod
//!   gets `StartStreaming`; the other streams are dropped and their pods keep the tunnel.
//!   A stream that fails is retried after 100 ms doubling to 1 s while Redis still names
//!   its pod.
//!
//! The whole search is bounded by the routing timeout (real kas: 20 s), after which the
//! caller gets `DEADLINE_EXCEEDED` "Agent connection not found…" — with Redis's error
//! appended when the other pods could not be looked up.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use kas_proto::kasapp::gateway_kas_response::Msg;
use kas_proto::kasapp::{GatewayKasResponse, StartStreaming};

use super::codec::RawCodec;
use super::gateway::ROUTING_AGENT_ID;
use super::pool::KasPool;
use super::RoutingMetrics;
use crate::fleet::{jwt, KasUrlQuerier, Lookup};
use crate::gitlab::SharedSecret;
use crate::tunnel::{
    split_method, FindError, FromAgent, Meta, Routed, Router, ToAgent, TunnelCall, TunnelRegistry,
};

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Other pods asked at once for one call, at most.
const MAX_PODS_PER_CALL: usize = 64;

pub struct FleetRouter {
    pub(super) tunnels: TunnelRegistry,
    pub(super) querier: KasUrlQuerier,
    pub(super) own_url: String,
    pub(super) pool: KasPool,
    pub(super) secret: SharedSecret,
    pub(super) timeout: Duration,
    pub(super) metrics: RoutingMetrics,
}

/// A pod's stream that said `tunnel_ready`: where to send `StartStreaming` and the call.
struct Ready {
    url: String,
    requests: mpsc::Sender<Bytes>,
    responses: Streaming<Bytes>,
}

enum Attempt {
    Ready(Box<Ready>),
    Failed(String, Status),
}

#[tonic::async_trait]
impl Router for FleetRouter {
    async fn route(
        &self,
        agent_id: i64,
        full_method: &str,
        meta: Meta,
    ) -> Result<TunnelCall, Status> {
        let started = std::time::Instant::now();
        let result = self.find(agent_id, full_method, meta).await;
        let metrics = &self.metrics;
        let status = if result.is_ok() { "success" } else { "aborted" };
        metrics
            .routing_duration
            .with_label_values(&[status])
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok((_, pod)) => metrics.routed.with_label_values(&[pod]).inc(),
            Err(s) if s.code() == Code::DeadlineExceeded => metrics.routing_timeouts.inc(),
            Err(_) => {}
        }
        result.map(|(call, _)| call)
    }
}

impl FleetRouter {
    async fn find(
        &self,
        agent_id: i64,
        full_method: &str,
        meta: Meta,
    ) -> Result<(TunnelCall, &'static str), Status> {
        let (service, method) = split_method(full_method).ok_or_else(|| {
            Status::invalid_argument(format!("malformed method name {full_method:?}"))
        })?;
        // This pod first, at once.
        let mut routed = local_routed(full_method, &meta);
        while let Some(tunnel) = self.tunnels.find_now(agent_id, service, method)? {
            match tunnel.start(routed.0) {
                Ok(()) => return Ok((routed.1, "self")),
                Err(back) => routed.0 = back,
            }
        }
        let mut watch = self
            .querier
            .watch(agent_id)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let mut attempts = FuturesUnordered::new();
        // URL → when it may be tried again (absent: never tried).
        let mut tried: HashMap<String, Option<Instant>> = HashMap::new();
        let mut backoff: HashMap<String, Duration> = HashMap::new();
        let mut listed: HashSet<String> = HashSet::new();
        let mut redis_error: Option<String> = None;
        let mut retry_tick = tokio::time::interval(RETRY_MIN);
        let deadline = Instant::now() + self.timeout;
        let not_found = |redis_error: &Option<String>| match redis_error {
            Some(e) => Status::deadline_exceeded(format!(
                "{}; the other kas pods could not be looked up: {e}",
                FindError::NotConnected
            )),
            None => Status::from(FindError::NotConnected),
        };
        let local = self.tunnels.wait_for(agent_id, service, method);
        tokio::pin!(local);
        let mut local_done = false;
        loop {
            // Start attempts on the pods Redis names that are not being asked.
            match &*watch.rx.borrow_and_update() {
                Lookup::Urls(urls) => {
                    redis_error = None;
                    listed = urls.iter().cloned().collect();
                }
                // Redis is down: the pods it named last are still worth asking.
                Lookup::Failed { error, last } => {
                    redis_error = Some(error.clone());
                    listed.extend(last.iter().cloned());
                }
                Lookup::Pending => {}
            }
            let now = Instant::now();
            for url in &listed {
                if *url == self.own_url {
                    continue;
                }
                let due = match tried.get(url) {
                    None => true,
                    Some(Some(at)) => *at <= now,
                    Some(None) => false, // being asked
                };
                if due && attempts.len() < MAX_PODS_PER_CALL {
                    tried.insert(url.clone(), None);
                    attempts.push(self.attempt(url.clone(), agent_id, full_method, &meta));
                }
            }
            tokio::select! {
                found = &mut local, if !local_done => match found {
                    Ok(tunnel) => match tunnel.start(routed.0) {
                        Ok(()) => return Ok((routed.1, "self")),
                        Err(back) => {
                            routed.0 = back;
                            local.set(self.tunnels.wait_for(agent_id, service, method));
                        }
                    },
                    Err(FindError::NotConnected) => local_done = true,
                    Err(e) => return Err(e.into()),
                },
                Some(attempt) = attempts.next() => match attempt {
                    Attempt::Ready(ready) => {
                        let url = ready.url.clone();
                        match self.start_remote(*ready).await {
                            Ok(call) => return Ok((call, "other")),
                            // The pod went away between ready and start: ask it again later.
                            Err(_) => {
                                tried.insert(url, Some(Instant::now() + RETRY_MIN));
                            }
                        }
                    }
                    Attempt::Failed(url, status) => {
                        tracing::debug!(%url, agent_id, code = ?status.code(), message = status.message(), "routing: a pod's private API failed");
                        let delay = backoff.entry(url.clone()).or_insert(RETRY_MIN);
                        tried.insert(url, Some(Instant::now() + *delay));
                        *delay = (*delay * 2).min(RETRY_MAX);
                    }
                },
                changed = watch.rx.changed() => {
                    if changed.is_err() {
                        // The poller was replaced (cache eviction): watch again.
                        watch = self
                            .querier
                            .watch(agent_id)
                            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
                    }
                }
                _ = retry_tick.tick() => {}
                _ = tokio::time::sleep_until(deadline) => return Err(not_found(&redis_error)),
            }
        }
    }

    /// Asks one pod for a tunnel; resolves when it has one ready (or fails).
    fn attempt(
        &self,
        url: String,
        agent_id: i64,
        full_method: &str,
        meta: &Meta,
    ) -> impl std::future::Future<Output = Attempt> + Send + 'static {
        let channel = self.pool.channel(&url);
        let secret = self.secret.clone();
        let path = full_method.to_owned();
        let meta = meta.clone();
        async move {
            let fail = |status: Status| Attempt::Failed(url.clone(), status);
            let channel = match channel {
                Ok(c) => c,
                Err(e) => return fail(Status::unavailable(e)),
            };
            let jwt = match jwt::sign_private_api(&secret) {
                Ok(j) => j,
                Err(e) => return fail(Status::internal(e)),
            };
            let (requests, rx) = mpsc::channel::<Bytes>(8);
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            let md = request.metadata_mut();
            for (key, values) in &meta {
                let Ok(key) = key.parse::<tonic::metadata::MetadataKey<_>>() else {
                    continue;
                };
                for v in &values.value {
                    if let Ok(v) = v.parse() {
                        md.append(key.clone(), v);
                    }
                }
            }
            match (
                format!("Bearer {jwt}").parse(),
                agent_id.to_string().parse(),
            ) {
                (Ok(auth), Ok(id)) => {
                    md.insert("authorization", auth);
                    md.insert(ROUTING_AGENT_ID, id);
                }
                _ => return fail(Status::internal("cannot build the routing metadata")),
            }
            let Ok(path) = http::uri::PathAndQuery::try_from(path.as_str()) else {
                return fail(Status::invalid_argument("bad method path"));
            };
            let mut grpc = tonic::client::Grpc::new(channel);
            if let Err(e) = grpc.ready().await {
                return fail(Status::unavailable(format!(
                    "cannot reach the kas pod: {e}"
                )));
            }
            let mut responses = match grpc.streaming(request, path, RawCodec).await {
                Ok(r) => r.into_inner(),
                Err(status) => return fail(status),
            };
            // no_tunnel (at most once) then tunnel_ready; anything else is a protocol error.
            loop {
                let msg = match responses.message().await {
                    Ok(Some(bytes)) => match GatewayKasResponse::decode(bytes) {
                        Ok(m) => m.msg,
                        Err(e) => {
                            return fail(Status::internal(format!("bad gateway message: {e}")))
                        }
                    },
                    Ok(None) => {
                        return fail(Status::unavailable("the gateway kas ended the stream"))
                    }
                    Err(status) => return fail(status),
                };
                match msg {
                    Some(Msg::NoTunnel(_)) => continue,
                    Some(Msg::TunnelReady(_)) => {
                        return Attempt::Ready(Box::new(Ready {
                            url,
                            requests,
                            responses,
                        }))
                    }
                    _ => {
                        return fail(Status::internal(
                            "the gateway kas answered before its tunnel was ready",
                        ))
                    }
                }
            }
        }
    }

    /// Picks `ready`: sends `StartStreaming` and carries the call over its stream.
    async fn start_remote(&self, ready: Ready) -> Result<TunnelCall, Status> {
        let Ready {
            url,
            requests,
            mut responses,
        } = ready;
        let start: Bytes = StartStreaming {}.encode_to_vec().into();
        if requests.send(start).await.is_err() {
            return Err(Status::unavailable(format!(
                "the kas pod {url} closed the stream before it started"
            )));
        }
        let (call, mut to_agent, from_agent) = TunnelCall::pair();
        let cancel = tokio_util::sync::CancellationToken::new();
        let writer_cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                match to_agent.recv().await {
                    Some(ToAgent::Message(data)) => {
                        if requests.send(data).await.is_err() {
                            return;
                        }
                    }
                    // Dropping the sender ends the request stream: the half-close.
                    Some(ToAgent::CloseSend) => return,
                    None => {
                        writer_cancel.cancel();
                        return;
                    }
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = responses.message() => next,
                    _ = from_agent.closed() => return,
                    _ = cancel.cancelled() => return,
                };
                let event = match next {
                    Ok(Some(bytes)) => match GatewayKasResponse::decode(bytes).map(|m| m.msg) {
                        Ok(Some(Msg::Header(h))) => FromAgent::Header(h.meta),
                        Ok(Some(Msg::Message(m))) => FromAgent::Message(m.data.into()),
                        Ok(Some(Msg::Trailer(t))) => FromAgent::Trailer(t.meta),
                        Ok(Some(Msg::Error(e))) => {
                            let s = e.status.unwrap_or_default();
                            FromAgent::Error(Status::new(Code::from(s.code), s.message))
                        }
                        _ => FromAgent::Error(Status::internal(format!(
                            "the kas pod {url} broke the gateway message order"
                        ))),
                    },
                    Ok(None) => return,
                    Err(status) => FromAgent::Error(Status::unavailable(format!(
                        "the kas pod {url} holding the agent's tunnel failed: {}",
                        status.message()
                    ))),
                };
                let last = matches!(event, FromAgent::Error(_));
                if from_agent.send(event).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(call)
    }
}

/// A call for a tunnel of this pod, with the caller's end.
fn local_routed(full_method: &str, meta: &Meta) -> (Routed, TunnelCall) {
    let (call, to_rx, from_tx) = TunnelCall::pair();
    (
        Routed {
            method_name: full_method.to_owned(),
            meta: meta.clone(),
            to_agent: to_rx,
            from_agent: from_tx,
        },
        call,
    )
}
