//! `bulk`: how fast bytes cross one long-lived stream, the way a big configuration push or
//! a busy reverse tunnel moves them. One connection (websocket or gRPC over HTTP/2, by
//! `--ws-fraction`), one `Diagnostics/Echo` stream, `--bulk-bytes` sent in
//! `--bulk-chunk-bytes` messages while the echoes are read back concurrently. The rate is
//! the payload bytes echoed per second; each byte crossed the proxy twice.

use anyhow::{bail, Context};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;

use crate::agent::{self, authed};
use crate::transport::Transport;
use crate::Ctx;

/// Largest chunk: tonic's default message limit (4 MiB) with room for framing.
const MAX_CHUNK: usize = 4 * 1024 * 1024 - 1024;
/// Messages in flight between the sender and the stream; the stream's own flow control
/// does the rest.
const SEND_QUEUE: usize = 8;

pub async fn bulk(ctx: &mut Ctx) -> anyhow::Result<()> {
    let total = ctx.args.bulk_bytes;
    let chunk = ctx.args.bulk_chunk_bytes;
    if chunk == 0 || chunk > MAX_CHUNK {
        bail!("--bulk-chunk-bytes must be 1..={MAX_CHUNK}");
    }
    let target = ctx.targets.first().context("bulk needs a --target")?.addr;
    let transport = agent::transport_for(0, ctx.args.ws_fraction());
    ctx.set_phase("connect");
    let connector = crate::scenarios::connector(ctx)?;
    let stats = ctx.stats.clone();
    let Some((grpc, conn)) = crate::scenarios::open_counted(ctx, &connector, 0).await? else {
        bail!("cannot connect to {target} (the error is in the report)");
    };
    let driver = tokio::spawn(conn);

    ctx.set_phase("bulk");
    let (tx, rx) = mpsc::channel::<PingRequest>(SEND_QUEUE);
    let mut client = DiagnosticsClient::with_origin(grpc.service, grpc.origin);
    let begin = Instant::now();
    let stop_at = begin + ctx.args.duration;
    let payload = Bytes::from(vec![b'k'; chunk]);
    let messages = total.div_ceil(chunk as u64);
    let sender = tokio::spawn(async move {
        let mut left = total;
        for _ in 0..messages {
            let n = left.min(chunk as u64) as usize;
            left -= n as u64;
            let message = PingRequest {
                payload: payload.slice(..n).to_vec(),
            };
            if tx.send(message).await.is_err() {
                break;
            }
        }
    });
    let (received, failure) = match timeout_at(
        stop_at,
        client.echo(authed(&ctx.token, agent::receiver_stream(rx))),
    )
    .await
    {
        Ok(Ok(response)) => read_echoes(response.into_inner(), total, stop_at).await,
        Ok(Err(status)) => (0, Some(format!("Echo refused: {status}"))),
        Err(_) => (0, Some("Echo did not open in time".to_owned())),
    };
    let secs = begin.elapsed().as_secs_f64().max(1e-6);
    sender.abort();
    driver.abort();

    ctx.fact(
        "bulk_transport",
        match transport {
            Transport::Websocket => "websocket",
            Transport::Grpc => "grpc",
        },
    );
    ctx.fact("bulk_bytes", total);
    ctx.fact("bulk_chunk_bytes", chunk as u64);
    ctx.fact("bulk_echoed_bytes", received);
    ctx.fact("bulk_seconds", crate::scenarios::round3(secs));
    ctx.fact(
        "bulk_mb_per_s",
        crate::scenarios::round3(received as f64 / secs / 1e6),
    );
    match failure {
        None => {
            stats.inc(&stats.connects_ok);
            ctx.check(
                "all bytes echoed",
                true,
                format!("{received} bytes in {secs:.3} s"),
            );
        }
        Some(why) => {
            stats.errors.add("bulk", || why.clone());
            ctx.check("all bytes echoed", false, why);
        }
    }
    Ok(())
}

/// Reads echoes until `total` payload bytes came back, the stream ended or `stop_at`:
/// the bytes received, and why it stopped short if it did.
async fn read_echoes(
    mut stream: tonic::Streaming<kas_proto::diagnostics::PingResponse>,
    total: u64,
    stop_at: Instant,
) -> (u64, Option<String>) {
    let mut received = 0u64;
    while received < total {
        let why = match timeout_at(stop_at, stream.message()).await {
            Ok(Ok(Some(echo))) => {
                received += echo.payload.len() as u64;
                continue;
            }
            Ok(Ok(None)) => format!("the stream ended after {received} bytes"),
            Ok(Err(status)) => format!("after {received} bytes: {status}"),
            Err(_) => format!("--duration ran out after {received} bytes"),
        };
        return (received, Some(why));
    }
    (received, None)
}
