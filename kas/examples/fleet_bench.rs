//! The kas fleet's costs, measured with a real `redis-server` and real kas pods:
//!
//! 1. Redis operations per second in steady state with `AGENTS` agents (default 10,000),
//!    each holding tunnels on one pod and one configuration stream: the tunnel tracker and
//!    the agent tracker of that pod, refreshing every `REFRESH_S` seconds (default 5, a
//!    stand-in for the 240 s of production; commands scale as 1 / refresh), counted by Redis
//!    itself (`INFO commandstats`). Requests add none: lookups happen only for agents
//!    whose tunnel is not on the receiving pod, once per 50 ms per agent while requests wait.
//! 2. The latency a cross-pod Kubernetes API proxy request adds: `REQUESTS` (default 300)
//!    sequential `GET /version` through pod A (the agent's tunnels are there) and through
//!    pod B (routed over the private API to A).
//!
//!   cargo run -p kas --example fleet_bench            (AGENTS=…, REFRESH_S=…, REQUESTS=…)
//!
//! Prints one JSON line last (what loadtest/bench.sh records).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use kas::config::RedisConfig;
use kas::dev::gitlab_standin::{StandinAllowedAgent, StandinCiJob};
use kas::fleet::{AgentTracker, Redis, RedisMetrics, RedisTunnelTracker};
use kas::gitlab::SharedSecret;
use kas::tunnel::TunnelTracker;
use kas_testkit::agent::{AgentOptions, TestAgent};
use kas_testkit::kube_api::KubeApi;
use kas_testkit::pods::Cluster;
use kas_testkit::redis::RedisServer;
use kas_testkit::Profile;

const TOKEN: &str = "glagent-bench-token";
const JOB_TOKEN: &str = "ci-job-token-bench";

struct Bench;

impl Profile for Bench {
    const TOKEN: &'static str = TOKEN;
    fn pod_config(config: &mut kas::Config) {
        config.shutdown.readiness_delay = Duration::from_millis(100);
        config.shutdown.drain_deadline = Duration::from_secs(1);
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn commands(redis: &RedisServer) -> u64 {
    let mut c = redis.client().await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .expect("INFO commandstats");
    stats
        .lines()
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}

async fn steady_state(agents: u64, refresh: Duration) -> (f64, f64) {
    let server = RedisServer::start().await;
    let config = RedisConfig {
        address: Some(server.address()),
        conn_info_ttl: refresh * 2,
        conn_info_refresh: refresh,
        ..RedisConfig::default()
    };
    let redis = Arc::new(
        Redis::new(&config, RedisMetrics::new(&prometheus::Registry::new())).expect("redis"),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let (tunnels, task) = RedisTunnelTracker::new(
        redis.clone(),
        "grpc://10.0.0.1:8155".into(),
        config.conn_info_ttl,
        refresh,
    );
    tokio::spawn(task.run(stop.clone()));
    let connected = AgentTracker::new(Some(redis.clone()), config.conn_info_ttl);
    tokio::spawn(connected.clone().run(refresh, refresh * 100, stop.clone()));
    let mut tracked = Vec::new();
    for id in 1..=agents as i64 {
        tunnels.set_has_tunnels(id, true);
        tracked.push(
            connected.track(kas_proto::agent_tracker::ConnectedAgentInfo {
                agent_id: id,
                project_id: id,
                connection_id: id,
                ..Default::default()
            }),
        );
    }
    // Registered: one tunnel hash per agent and two agent-tracker hashes, plus connected_agents.
    let want = agents * 3 + 1;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut c = server.client().await;
        let keys: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap_or(0);
        if keys >= want || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Steady state: three refresh periods.
    let before = commands(&server).await;
    let started = Instant::now();
    tokio::time::sleep(refresh * 3).await;
    let after = commands(&server).await;
    let secs = started.elapsed().as_secs_f64();
    stop.cancel();
    drop(tracked);
    // The two INFO calls of this measurement are not kas's.
    let per_second = (after.saturating_sub(before).saturating_sub(1)) as f64 / secs;
    let at_240s = per_second * refresh.as_secs_f64() / 240.0;
    (per_second, at_240s)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn latency(requests: u64) -> serde_json::Value {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = kas_testkit::tls::self_signed(dir.path());
    let private_secret = dir.path().join("private-api-secret");
    std::fs::write(&private_secret, SharedSecret::generate().to_base64()).expect("secret");
    let address = redis.address();
    let (cert_file, key_file) = (cert.clone(), key);
    let cluster = Cluster::<Bench>::start_with(2, move |c| {
        let ip = c.agent.listen.ip();
        c.redis.address = Some(address.clone());
        c.private_api.listen = Some(SocketAddr::new(ip, 8155));
        c.private_api.authentication_secret_file = private_secret.clone();
        c.kubernetes_api.listen = Some(SocketAddr::new(ip, 8154));
        c.kubernetes_api.certificate_file = Some(cert_file.clone());
        c.kubernetes_api.key_file = Some(key_file.clone());
        c.log.level = "warn".into();
    })
    .await;
    cluster.gitlab.add_ci_job(StandinCiJob {
        job_token: JOB_TOKEN.into(),
        job_id: 1,
        pipeline_id: 1,
        project_id: 1,
        group_ids: vec![],
        username: "bench".into(),
        environment: None,
        allowed_agents: vec![StandinAllowedAgent {
            agent_id: cluster.agent.agent_id,
            config_project_id: 1,
            access_as: json!({"agent": {}}),
        }],
    });
    let kube = KubeApi::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("API stand-in");
    let agent = TestAgent::connect_h2c(cluster.pods[0].addr, AgentOptions::new(TOKEN, &kube.url()))
        .await
        .expect("agent");
    assert!(agent.wait_idle(2, Duration::from_secs(30)).await);
    let ca = std::fs::read(&cert).expect("certificate");
    let token = format!("ci:{}:{JOB_TOKEN}", cluster.agent.agent_id);
    let mut out = serde_json::Map::new();
    for (name, i) in [("same_pod", 0usize), ("cross_pod", 1)] {
        let pod = SocketAddr::new(cluster.pods[i].addr.ip(), 8154);
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("PEM"))
            .resolve("localhost", pod)
            .build()
            .expect("client");
        let url = "https://localhost:8154/version";
        // Warm-up: connections, the CI job's cache, the private API channel, Redis lookup.
        for _ in 0..20 {
            let _ = client.get(url).bearer_auth(&token).send().await;
        }
        let mut ms = Vec::new();
        for _ in 0..requests {
            let started = Instant::now();
            let response = client
                .get(url)
                .bearer_auth(&token)
                .send()
                .await
                .expect("answer");
            assert_eq!(response.status(), 200);
            let _ = response.bytes().await;
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        out.insert(
            name.into(),
            json!({"p50_ms": percentile(&ms, 0.5), "p90_ms": percentile(&ms, 0.9), "p99_ms": percentile(&ms, 0.99)}),
        );
    }
    drop(agent);
    serde_json::Value::Object(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let agents = env("AGENTS", 10_000);
    let refresh = Duration::from_secs(env("REFRESH_S", 5));
    let requests = env("REQUESTS", 300);
    let (ops, at_240s) = steady_state(agents, refresh).await;
    eprintln!(
        "steady state, {agents} agents (tunnels + a configuration stream each), refresh {refresh:?}: \
         {ops:.0} Redis commands/s; at the production refresh of 240 s: {at_240s:.1} commands/s"
    );
    let latency = latency(requests).await;
    let (same, cross) = (&latency["same_pod"], &latency["cross_pod"]);
    eprintln!(
        "GET /version through the Kubernetes API proxy, {requests} sequential: same pod p50 {:.2} ms p99 {:.2} ms; \
         cross pod p50 {:.2} ms p99 {:.2} ms",
        same["p50_ms"].as_f64().unwrap_or(0.0),
        same["p99_ms"].as_f64().unwrap_or(0.0),
        cross["p50_ms"].as_f64().unwrap_or(0.0),
        cross["p99_ms"].as_f64().unwrap_or(0.0),
    );
    println!(
        "{}",
        json!({
            "agents": agents,
            "refresh_s": refresh.as_secs(),
            "redis_commands_per_s": ops,
            "redis_commands_per_s_at_240s_refresh": at_240s,
            "k8s_proxy_latency": latency,
        })
    );
}
