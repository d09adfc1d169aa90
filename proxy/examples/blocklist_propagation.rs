//! Benchmark (not a test): how long from `kas-edge block ADDRESS` until the last of three
//! edge replicas refuses that address.
//!
//! ```sh
//! cargo build --release -p kas-edge --bins --examples
//! target/release/examples/blocklist_propagation [ROUNDS]     # default 20
//! ```
//!
//! It starts what the integration tests start (a GitLab stand-in and a kas pod, the
//! Kubernetes API stand-in of `kas_testkit::kube_api`, three `kas-edge run` replicas watching
//! the blocklist ConfigMap through it, all on a loopback subnet of its own), then, per round,
//! runs `kas-edge block` for a new address and probes every replica with TLS handshakes from
//! that address every 2 ms until each refuses it. It prints, per round and summarised, the
//! time until the command returned and until the last replica refused. The `kas-edge`
//! binary is the one next to this example's directory (same profile).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kas_testkit::clients::tls_connect;
use kas_testkit::edge::{Edge, EdgeOptions, EdgeStdout};
use kas_testkit::kube_api::KubeApi;
use kas_testkit::kubectl::kubeconfig_file;
use kas_testkit::net::ip;
use kas_testkit::pods::Cluster;

struct Bench;

impl kas_testkit::Profile for Bench {
    const TOKEN: &'static str = "glagent-blocklist-bench-token";
}

/// Longest a round may take before the benchmark gives up.
const ROUND_LIMIT: Duration = Duration::from_secs(10);
const PROBE_EVERY: Duration = Duration::from_millis(2);

fn edge_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the example's own path");
    // target/<profile>/examples/blocklist_propagation -> target/<profile>/kas-edge
    let dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .expect("target/<profile>/examples");
    dir.join("kas-edge")
}

/// Whether `edge` refuses a TLS handshake from `client` now.
async fn refuses(edge: &Edge<()>, client: IpAddr) -> bool {
    let tls = edge.tls_client(&[b"h2"]);
    let attempt = tokio::time::timeout(
        Duration::from_secs(2),
        tls_connect(edge.https, &tls, Some(client)),
    );
    !matches!(attempt.await, Ok(Ok(_)))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let rounds: u8 = std::env::args()
        .nth(1)
        .map(|r| r.parse().expect("ROUNDS: a number up to 100"))
        .unwrap_or(20)
        .min(100);
    let binary = edge_binary();
    assert!(
        binary.exists(),
        "{} is missing: cargo build -p kas-edge --bins (same profile)",
        binary.display()
    );
    let cluster = Cluster::<Bench>::start(1).await;
    let subnet = cluster.subnet;
    let api = KubeApi::start((ip(subnet, 240), 0).into())
        .await
        .expect("the Kubernetes API stand-in starts");
    let kubeconfig = kubeconfig_file(&api.url());
    api.put_configmap(
        "kas",
        "kas-edge-blocklist",
        &[("blocklist.txt", "# bench\n")],
    );
    let extra = format!(
        "[policies.blocklist_configmap]\nnamespace = \"kas\"\nname = \"kas-edge-blocklist\"\n\
         kubeconfig = {:?}\n",
        &*kubeconfig
    );
    let mut options = EdgeOptions::new(&binary);
    options.stdout = EdgeStdout::Null;
    options.rust_log = "warn";
    let mut edges = Vec::new();
    for host in [250, 251, 252] {
        edges.push(
            Edge::<()>::launch(&options, ip(subnet, host), &cluster.endpoints(), &extra).await,
        );
    }
    println!(
        "3 replicas of {} watching ConfigMap kas/kas-edge-blocklist on a Kubernetes API stand-in",
        binary.display()
    );

    let mut command_times = Vec::new();
    let mut last_refusals = Vec::new();
    for round in 0..rounds {
        let client = ip(subnet, 100 + round);
        for edge in &edges {
            assert!(
                !refuses(edge, client).await,
                "{client} refused before the block"
            );
        }
        let started = Instant::now();
        let mut command = tokio::process::Command::new(&binary);
        command
            .args(["block", &client.to_string(), "--reason", "benchmark"])
            .args(["--configmap", "kas/kas-edge-blocklist", "--kubeconfig"])
            .arg(&kubeconfig);
        let command = async move {
            let output = command.output().await.expect("kas-edge block runs");
            (output, started.elapsed())
        };
        let probes = edges.iter().map(|edge| async move {
            loop {
                if refuses(edge, client).await {
                    return started.elapsed();
                }
                assert!(
                    started.elapsed() < ROUND_LIMIT,
                    "{client} never refused by {}",
                    edge.https
                );
                tokio::time::sleep(PROBE_EVERY).await;
            }
        });
        let ((output, command_done), per_replica) =
            tokio::join!(command, futures_util::future::join_all(probes));
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let last = per_replica.iter().max().copied().unwrap_or_default();
        println!(
            "round {round:>2}: {client}: command returned after {:>7.1} ms (incl. its own start), \
             replicas refused after {} ms",
            ms(command_done),
            per_replica
                .iter()
                .map(|d| format!("{:.1}", ms(*d)))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        command_times.push(command_done);
        last_refusals.push(last);
    }
    command_times.sort();
    last_refusals.sort();
    println!(
        "\n{rounds} rounds, `kas-edge block` to the LAST of 3 replicas refusing: median {:.1} ms, \
         p90 {:.1} ms, max {:.1} ms (the command itself returned after median {:.1} ms)",
        ms(percentile(&last_refusals, 0.5)),
        ms(percentile(&last_refusals, 0.9)),
        ms(*last_refusals.last().unwrap_or(&Duration::ZERO)),
        ms(percentile(&command_times, 0.5)),
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
