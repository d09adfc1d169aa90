//! Command-line options. Every scenario is bounded: each phase has a duration or a
//! deadline, so a run ends by itself even when the system under test misbehaves.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Ramp to N connected agents and hold; edge memory and CPU per connection.
    Idle,
    /// Connect N agents, then make all of them reconnect at once.
    Storm,
    /// Open-loop unary Ping requests at a fixed rate; latency histogram.
    Rpc,
    /// Hold N agents while cycling them (disconnect + reconnect) at a fixed rate.
    Churn,
    /// Block part of a connected fleet through the blocklist file; time until cut.
    Blocklist,
    /// Push --bulk-bytes through one Echo stream on one connection; MB/s.
    Bulk,
    /// Hold a fleet while attackers (slowloris, floods, silent and stalled clients) hit the
    /// edge from other addresses; the fleet's error rate and the edge's memory and CPU.
    Hostile,
    /// Agents holding reverse tunnels, and callers sending Kubernetes API requests and
    /// holding watches through kas's Kubernetes API proxy; latency, errors, tunnels in use.
    #[value(name = "k8s-proxy")]
    #[serde(rename = "k8s-proxy")]
    K8sProxy,
    /// Start kas pods and kas-edge, hold a fleet (configuration, Echo, reverse tunnels and
    /// Kubernetes API requests through the edge) and inject faults one after another: pod
    /// killed, rollout, GitLab and Gitaly down or slow, blocklist edits, certificate
    /// rotation, edge restart; per fault, who was cut and how soon they were back.
    Faults,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Storm => "storm",
            Scenario::Rpc => "rpc",
            Scenario::Churn => "churn",
            Scenario::Blocklist => "blocklist",
            Scenario::Bulk => "bulk",
            Scenario::Hostile => "hostile",
            Scenario::K8sProxy => "k8s-proxy",
            Scenario::Faults => "faults",
        }
    }

    /// The error budget when `--max-error-rate` is not given: none at all, except under
    /// attack, where the 0.1 % applies (a legitimate agent caught in an overloaded
    /// moment is tolerated, a pattern is not).
    pub fn default_error_budget(self) -> f64 {
        match self {
            Scenario::Hostile => 0.001,
            _ => 0.0,
        }
    }
}

impl Args {
    /// `--ws-fraction`, or the scenario's default share.
    pub fn ws_fraction(&self) -> f64 {
        self.ws_fraction_arg.unwrap_or(match self.scenario {
            Scenario::Hostile | Scenario::Faults => 0.5,
            _ => 1.0,
        })
    }

    /// `--max-error-rate`, or the scenario's default budget.
    pub fn error_budget(&self) -> f64 {
        self.max_error_rate
            .unwrap_or_else(|| self.scenario.default_error_budget())
    }
}

/// One fault of the faults scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` of a kas pod, restarted at once.
    KillPod,
    /// SIGTERM to each kas pod in turn, each replaced and ready before the next.
    Rollout,
    /// GitLab answers 503 for --fault-window, then slowly (--gitlab-slow) for as long.
    Gitlab,
    /// The Gitaly stand-in stopped for --fault-window.
    Gitaly,
    /// The edge's blocklist rewritten every --blocklist-edit-every for --fault-window,
    /// with entries none of the fleet's addresses match.
    Blocklist,
    /// New certificate and key files, hot-reloaded by the edge.
    CertRotation,
    /// The edge restarted by graceful upgrade (the new process takes the sockets).
    EdgeRestart,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::KillPod,
        FaultKind::Rollout,
        FaultKind::Gitlab,
        FaultKind::Gitaly,
        FaultKind::Blocklist,
        FaultKind::CertRotation,
        FaultKind::EdgeRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillPod => "kill-pod",
            FaultKind::Rollout => "rollout",
            FaultKind::Gitlab => "gitlab",
            FaultKind::Gitaly => "gitaly",
            FaultKind::Blocklist => "blocklist",
            FaultKind::CertRotation => "cert-rotation",
            FaultKind::EdgeRestart => "edge-restart",
        }
    }
}

/// Parses `1500ms`, `2s`, `3m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 10s, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit `{other}` in `{s}`")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("`{s}` must be between 0 and 1"))
    }
}

fn parse_attack_kind(s: &str) -> Result<String, String> {
    if crate::attacks::KINDS.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "unknown attack {s:?} (one of {})",
            crate::attacks::KINDS.join(", ")
        ))
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("`{s}` must be a positive number"))
    }
}

/// A fleet of GitLab agents for load-testing kas-edge and kas.
#[derive(Debug, Clone, Parser)]
#[command(name = "kas-loadtest", version, args_override_self = true)]
pub struct Args {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value = "idle")]
    pub scenario: Scenario,

    /// Where agents connect: wss://127.0.0.1:8443/, grpcs://127.0.0.1:8443 (edge, TLS) or
    /// ws://127.0.1.1:8150/, grpc://127.0.1.1:8150 (a pod, plaintext). Repeat for
    /// round-robin; the scheme only says TLS or not, --ws-fraction picks the transport.
    /// Default: the local stack's edge, wss://127.0.0.1:8443/.
    #[arg(long = "target")]
    pub targets: Vec<String>,

    /// Allow targets outside 127.0.0.0/8 and ::1. Load is traffic: off by default.
    #[arg(long)]
    pub allow_non_loopback: bool,

    /// Number of agents (connections) in the fleet.
    #[arg(long, default_value_t = 100)]
    pub agents: usize,

    /// Ramp rate: new agents started per second.
    #[arg(long, default_value_t = 500.0, value_parser = parse_rate)]
    pub rate: f64,

    /// Main phase length: hold (idle, blocklist), churn, request run (rpc), reconnect
    /// deadline (storm).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,

    /// How long to wait after the ramp for every agent to be connected.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Share of agents using the websocket transport; the rest use gRPC over HTTP/2.
    /// Default: 1, or 0.5 for hostile (whose attacks on the edge's shared pod connections
    /// aim at the gRPC agents) and faults.
    #[arg(long = "ws-fraction", value_parser = parse_fraction)]
    pub ws_fraction_arg: Option<f64>,

    /// Agent token (`authorization: Bearer`). Default: .dev/demo-agent-token if present.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,

    /// File holding the agent token (e.g. .dev/demo-agent-token), or one token per line:
    /// agent i then uses line i mod lines (distinct GitLab agents, as kas-loadtest-stack
    /// writes them).
    #[arg(long)]
    pub token_file: Option<PathBuf>,

    /// PEM certificate(s) to trust for TLS targets. Default: .dev/tls/tls.crt if present.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,

    /// TLS server name (SNI and certificate check) and HTTP authority.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,

    /// Let reconnecting agents resume TLS sessions. Off: every connection is a full
    /// handshake, as a fleet of separate agent processes produces.
    #[arg(long)]
    pub tls_resumption: bool,

    /// Interval between Echo messages on each agent's held stream; 0: no Echo stream (as
    /// agentk, which holds its configuration stream and tunnels only).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub echo_interval: Duration,

    /// Also hold --tunnels idle ReverseTunnel/Connect streams per agent, as agentk does:
    /// each used one is replaced, and requests routed through them are replayed against
    /// --kube-api-url. Always on in the k8s-proxy scenario.
    #[arg(long)]
    pub reverse_tunnel: bool,

    /// Idle reverse tunnels per agent (agentk: 2).
    #[arg(long, default_value_t = 2)]
    pub tunnels: usize,

    /// The Kubernetes API server the agents replay tunnelled requests against (the local
    /// stack's stand-in by default).
    #[arg(long, default_value = "http://127.0.0.1:8182")]
    pub kube_api_url: String,

    /// k8s-proxy: where callers send Kubernetes API requests: kas's proxy
    /// (http://127.0.7.1:8154/k8s-proxy/), the edge's route (https://<edge>/k8s-proxy/) or,
    /// with --agents 0, the API server itself. Repeat one per --target, in the same order,
    /// when agents go straight to pods.
    #[arg(long = "k8s-proxy-url")]
    pub k8s_proxy_urls: Vec<String>,

    /// k8s-proxy: the callers' bearer token, `ci:<agent id>:<job token>`. Repeatable.
    #[arg(long = "k8s-token")]
    pub k8s_tokens: Vec<String>,

    /// k8s-proxy: callers' tokens, one per line, line i for the agents of --token-file's
    /// line i (kas-loadtest-stack writes both).
    #[arg(long)]
    pub k8s_token_file: Option<PathBuf>,

    /// k8s-proxy: PEM certificate(s) to trust for https proxy URLs. Default: --ca-file.
    #[arg(long)]
    pub k8s_ca_file: Option<PathBuf>,

    /// k8s-proxy: accept any certificate from https proxy URLs (loopback URLs only).
    #[arg(long)]
    pub k8s_insecure: bool,

    /// k8s-proxy: GET requests per second (open loop; latency from the scheduled time).
    #[arg(long, default_value_t = 100.0, value_parser = parse_rate)]
    pub k8s_rate: f64,

    /// k8s-proxy: instead of --k8s-rate, this many callers each sending their next GET
    /// when the last is answered (closed loop: the most the path carries).
    #[arg(long, default_value_t = 0)]
    pub k8s_concurrency: usize,

    /// k8s-proxy: paths the GETs ask for, in turn (default /api/v1/namespaces/default/pods).
    #[arg(long = "k8s-path")]
    pub k8s_paths: Vec<String>,

    /// k8s-proxy: watch streams (pods in namespace default) held for the whole run.
    #[arg(long, default_value_t = 2)]
    pub k8s_watches: usize,

    /// k8s-proxy: pods created (and deleted again) per second, so the watches carry
    /// events; 0: none.
    #[arg(long, default_value_t = 1.0)]
    pub k8s_write_rate: f64,

    /// k8s-proxy: a request (or a watch's answer) not there within this is an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub k8s_timeout: Duration,

    /// k8s-proxy: GETs allowed in flight (open loop); when full, sends wait.
    #[arg(long, default_value_t = 1000)]
    pub k8s_max_in_flight: usize,

    /// Time allowed for connect + TLS + websocket + HTTP/2 + first configuration.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// First reconnect back-off (jittered, doubling up to --backoff-max).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub backoff_min: Duration,

    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub backoff_max: Duration,

    /// First client source address; agents get consecutive 127.x.y.z addresses from here
    /// so thousands of connections never run out of ephemeral ports.
    #[arg(long, default_value = "127.0.2.1")]
    pub source_base: Ipv4Addr,

    /// Agents sharing one source address.
    #[arg(long, default_value_t = 1)]
    pub agents_per_ip: usize,

    /// Do not bind client sockets to spread source addresses (needed for non-loopback).
    #[arg(long)]
    pub no_source_spread: bool,

    /// PID of the edge, for its memory and CPU from /proc. Repeat for a proxy with several
    /// processes (e.g. nginx workers): their memory and CPU are added up.
    #[arg(long = "edge-pid")]
    pub edge_pids: Vec<u32>,

    /// The edge's admin address (http://127.0.0.1:8081/metrics) for its gauges.
    #[arg(long)]
    pub edge_admin: Option<String>,

    /// Seconds between timeline samples.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub sample_interval: Duration,

    /// Write the result as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// faults: write the per-fault table as Markdown.
    #[arg(long)]
    pub markdown: Option<PathBuf>,

    /// Write an HTML report with charts (self-contained, no network at view time).
    #[arg(long)]
    pub html: Option<PathBuf>,

    /// Highest tolerated error rate (errors / operations); exceeding it fails the run.
    /// Default: 0, or 0.001 for hostile (where only the legitimate agents' count). For
    /// faults it applies outside the fault windows.
    #[arg(long, value_parser = parse_fraction)]
    pub max_error_rate: Option<f64>,

    /// rpc: target requests per second (open loop).
    #[arg(long, default_value_t = 500.0, value_parser = parse_rate)]
    pub rpc_rate: f64,

    /// rpc: connections the requests are spread over.
    #[arg(long, default_value_t = 8)]
    pub rpc_connections: usize,

    /// rpc: requests allowed in flight; when full, sends wait (and their latency,
    /// measured from the scheduled time, shows it).
    #[arg(long, default_value_t = 10_000)]
    pub rpc_max_in_flight: usize,

    /// rpc: a request not answered within this is an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub rpc_timeout: Duration,

    /// Payload bytes of Ping and Echo messages.
    #[arg(long, default_value_t = 32)]
    pub payload_bytes: usize,

    /// `bulk`: payload bytes to send through the Echo stream (and read back).
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub bulk_bytes: u64,

    /// `bulk`: payload bytes per message.
    #[arg(long, default_value_t = 64 * 1024)]
    pub bulk_chunk_bytes: usize,

    /// churn: agent reconnections per second.
    #[arg(long, default_value_t = 20.0, value_parser = parse_rate)]
    pub churn_rate: f64,

    /// storm: each agent waits a random time up to this before reconnecting.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub storm_jitter: Duration,

    /// blocklist: the edge's blocklist file; our lines are appended and removed after.
    #[arg(long)]
    pub blocklist_file: Option<PathBuf>,

    /// blocklist: block every Nth source address (N = 10 blocks a tenth of the fleet).
    #[arg(long, default_value_t = 10)]
    pub block_every: usize,

    /// blocklist: longest acceptable time from writing the file to a blocked agent's cut
    /// (the edge reloads within 1 s and closes within 2 s).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub block_deadline: Duration,

    /// blocklist: how long to watch for cuts after writing the file.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub block_wait: Duration,

    /// hostile: multiplies every attack's size (300 silent TCP, 50 slowloris, 100 idle
    /// HTTP/2, 4 request-flood and 20 stalled-reader connections, 2,000 unique sources, 3
    /// flooding addresses at 1).
    #[arg(long, default_value_t = 1.0, value_parser = parse_rate)]
    pub attack_scale: f64,

    /// hostile: run only these attacks (comma-separated names as in the report, e.g.
    /// `conn_flood,unique_sources`); all nine when not given. For finding which attack
    /// costs what (memory, CPU); the verdict then checks only the attacks chosen.
    #[arg(long, value_delimiter = ',', value_parser = parse_attack_kind)]
    pub attack_kinds: Vec<String>,

    /// hostile: first attacker source address; the attacks take consecutive addresses
    /// from here (about 2,013 at scale 1), which must not overlap the fleet's.
    #[arg(long, default_value = "127.0.6.1")]
    pub attack_source_base: Ipv4Addr,

    /// hostile: how long the connected fleet runs its normal traffic (Echo rounds,
    /// configuration) before the "before" sample. Sampled right after the ramp, the edge's
    /// RSS still lacks what the fleet's first rounds of traffic touch, and still holds what
    /// the ramp's handshakes freed until the next trim: neither is the level an attack
    /// should be compared with.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub attack_warmup: Duration,

    /// hostile: after the attacks stop, how long to wait before the "after" sample.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub attack_settle: Duration,

    /// faults: the faults to inject, in this order (default: all, in the order listed).
    #[arg(long = "fault", value_enum)]
    pub faults: Vec<FaultKind>,

    /// faults: kas pods (processes) the edge spreads the fleet over.
    #[arg(long, default_value_t = 3)]
    pub kas_pods: u8,

    /// faults: the `kas` binary. Default: `kas` next to this program.
    #[arg(long)]
    pub kas_bin: Option<PathBuf>,

    /// faults: the `kas-edge` binary. Default: `kas-edge` next to this program.
    #[arg(long)]
    pub edge_bin: Option<PathBuf>,

    /// faults: directory for the stack's and the edge's files and logs.
    #[arg(long, default_value = ".loadtest-faults")]
    pub faults_dir: PathBuf,

    /// faults: loopback address of pod 1; pod n gets the n-th from here, the stand-ins
    /// this /24's .200 and the edge its .250.
    #[arg(long, default_value = "127.0.9.1")]
    pub faults_ip_base: Ipv4Addr,

    /// faults: how long GitLab answers 503 (and then how long it is slow), Gitaly is
    /// down and the blocklist is edited.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub fault_window: Duration,

    /// faults: quiet time after each fault (its recovery and the observation that nothing
    /// else goes wrong), also before the first.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub fault_recovery: Duration,

    /// faults: GitLab's answer time while it is slow.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub gitlab_slow: Duration,

    /// faults: time between blocklist edits in the blocklist fault.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub blocklist_edit_every: Duration,

    /// faults: how long after a fault ends every agent cut by it must be back. Default:
    /// 2 × --backoff-max + --connect-timeout (a failed retry at the longest back-off, then
    /// a connect).
    #[arg(long, value_parser = parse_duration)]
    pub backoff_budget: Option<Duration>,

    /// Progress bar: auto (only when stderr is a terminal), always, never.
    #[arg(long, default_value = "auto")]
    pub progress: String,
}
