//! A flood of the public `:80` listener cannot starve the control plane: thousands of
//! connections dribbling request heads and a few pipelining requests as fast as the edge
//! answers, while pod health checks keep passing and every `/readyz` answers within
//! 100 ms. Its own test binary, so no other test of this suite shares the machine with it.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// The value of the first metric line starting with `prefix`, 0 if absent.
/// Sum of every sample of metric `name` (all label sets).
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The flood stands for clients on other machines: its threads run at a lower priority
/// so the CPU it burns generating traffic is not taken from the edge or the prober.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread, no memory handed over.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

/// One `/readyz` from a plain thread (not the flood's runtime, so the measurement is the
/// edge's latency, not the test's): status and time from connect to the last byte.
fn probe(admin: SocketAddr, path: &str) -> (u16, Duration, String) {
    let started = Instant::now();
    let attempt = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    };
    let answer = attempt().unwrap_or_default();
    let status = answer.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, started.elapsed(), answer)
}

/// What the probe thread saw during the flood.
#[derive(Default)]
struct Probes {
    readyz: Vec<(u16, Duration)>,
    /// Healthy pods in each `/metrics` sample, and the open `:80` connections.
    samples: Vec<(usize, f64)>,
}

/// Floods `:80` for `window` with `per_ip` connections from each of `sources`: every
/// connection dribbles a request head one byte at a time and never finishes it; one the
/// edge closes (refused, header deadline) is reopened after a pause. Bounded: a fixed
/// number of tasks, each ending at the deadline.
async fn flood(target: SocketAddr, sources: Vec<IpAddr>, per_ip: usize, window: Duration) {
    let deadline = tokio::time::Instant::now() + window;
    let mut tasks = Vec::new();
    for source in sources {
        for _ in 0..per_ip {
            tasks.push(tokio::spawn(async move {
                let head = b"GET /slowly HTTP/1.1\r\nHost: kas.test\r\nX-Padding: ";
                while tokio::time::Instant::now() < deadline {
                    let Ok(mut s) = connect_from(source, target).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let mut sent = 0usize;
                    while tokio::time::Instant::now() < deadline {
                        let byte = head.get(sent).copied().unwrap_or(b'a');
                        if s.write_all(&[byte]).await.is_err() {
                            break;
                        }
                        sent += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    // Closed by the edge (or the window is over): pause before the next.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }));
        }
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Keeps `:80` busy for `window` with `per_ip` connections from each of `sources`, each
/// sending pipelined requests as fast as the edge answers them (and reading the answers
/// as fast as they come): cheap for the client, real work for the listener. Returns the
/// bytes of answers read.
async fn hammer(target: SocketAddr, sources: Vec<IpAddr>, per_ip: usize, window: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + window;
    let batch = b"GET /hammer HTTP/1.1\r\nHost: kas.test\r\n\r\n".repeat(64);
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for source in sources {
        for _ in 0..per_ip {
            let batch = batch.clone();
            let answered = answered.clone();
            tasks.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    let Ok(s) = connect_from(source, target).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let (mut read, mut write) = s.into_split();
                    let answered = answered.clone();
                    let reader = tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = read.read(&mut buf).await {
                            answered.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    });
                    while tokio::time::Instant::now() < deadline {
                        let sent = tokio::time::timeout_at(deadline, write.write_all(&batch)).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            break;
                        }
                    }
                    drop(write);
                    reader.abort();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }));
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    answered.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_80_flood_does_not_delay_health_checks_or_readiness() {
    const PER_IP: usize = 15;
    const SOURCES: u8 = 200;
    const WINDOW: Duration = Duration::from_secs(8);
    const READYZ_BUDGET: Duration = Duration::from_millis(100);
    const HEAD_START: Duration = Duration::from_millis(300);

    let cluster = Cluster::start(2).await;
    // The fixture checks pods every 200 ms with a 150 ms timeout: a control plane held up
    // by the flood shows as failed checks.
    let edge = Edge::start(
        cluster.subnet,
        &cluster.endpoints(),
        "[public_http]\nmax_connections = 1024\nmax_connections_per_ip = 16\n",
    )
    .await;
    edge.wait_healthy(2).await;
    let before = edge.metrics().await;
    let failures_before = metric_sum(&before, "edge_health_check_failures_total");

    // Probe /readyz every 20 ms and /metrics every 10th time, from a thread of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let admin = edge.admin;
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = Probes::default();
            let give_up = Instant::now() + WINDOW * 4;
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) && Instant::now() < give_up {
                let (status, took, _) = probe(admin, "/readyz");
                seen.readyz.push((status, took));
                if i.is_multiple_of(10) {
                    let (_, _, m) = probe(admin, "/metrics");
                    let healthy = m
                        .lines()
                        .filter(|l| l.starts_with("edge_upstream_healthy{") && l.ends_with(" 1"))
                        .count();
                    let open = metric(&m, "edge_plain_http_connections{listener=\"http\"}");
                    seen.samples.push((healthy, open));
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        })
    };

    let sources = (0..SOURCES).map(|i| ip(cluster.subnet, 30 + i)).collect();
    let busy = (0..8).map(|i| ip(cluster.subnet, 20 + i)).collect();
    let target = edge.http;
    let flooding = std::thread::spawn(move || {
        lower_priority();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(lower_priority)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // The busy clients first, so the slow ones cannot crowd them out of the cap.
            let busy = tokio::spawn(hammer(target, busy, 16, WINDOW));
            tokio::time::sleep(HEAD_START).await;
            flood(target, sources, PER_IP, WINDOW - HEAD_START).await;
            busy.await.unwrap()
        })
    });
    let hammered = tokio::task::spawn_blocking(move || flooding.join())
        .await
        .unwrap()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    let seen = prober.join().unwrap();
    let after = edge.metrics().await;

    // The flood was real: the listener was full and refusing.
    let peak = seen.samples.iter().map(|s| s.1).fold(0.0, f64::max);
    assert!(peak >= 1000.0, "the flood never filled :80 (peak {peak})");
    assert!(
        hammered > 1 << 20,
        "the busy clients got {hammered} bytes of answers"
    );
    let refused = metric(
        &after,
        "edge_plain_http_dropped_total{listener=\"http\",reason=\"max_connections\"}",
    );
    assert!(refused > 0.0, "no connection refused at the global cap");

    // And the control plane did not notice.
    assert!(
        seen.readyz.len() >= 100,
        "only {} probes",
        seen.readyz.len()
    );
    let slowest = seen.readyz.iter().map(|p| p.1).max().unwrap();
    let late: Vec<_> = seen
        .readyz
        .iter()
        .filter(|(status, took)| *status != 200 || *took > READYZ_BUDGET)
        .collect();
    assert!(
        late.is_empty(),
        "{} of {} /readyz probes failed or took over {READYZ_BUDGET:?} (slowest {slowest:?}): {late:?}",
        late.len(),
        seen.readyz.len()
    );
    assert!(
        seen.samples.iter().all(|s| s.0 == 2),
        "a pod looked unhealthy during the flood: {:?}",
        seen.samples
    );
    let failures_after = metric_sum(&after, "edge_health_check_failures_total");
    assert_eq!(
        failures_after, failures_before,
        "health checks failed during the flood"
    );
    eprintln!(
        "flood: {} /readyz probes, slowest {slowest:?}; peak {peak} open on :80, {refused} refused at the cap, {} MiB answered to the busy clients",
        seen.readyz.len(),
        hammered >> 20
    );
}
