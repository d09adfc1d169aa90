//! The k8s-proxy scenario, briefly: a few agents holding tunnels into kas pods with the
//! Kubernetes API proxy on, callers sending GETs, creating pods and holding watches through
//! it, the Kubernetes API stand-in at the end of the tunnels. Assertions are on counts and
//! outcomes, never on how fast something was.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use kas::dev::gitlab_standin::{StandinAllowedAgent, StandinCiJob};
use kas_loadtest::report::Report;
use kas_testkit::kube_api::KubeApi;

const JOB_TOKEN: &str = "ci-job-token-loadtest";
const PROXY_PORT: u16 = 8154;

fn fact_u64(report: &Report, key: &str) -> u64 {
    report
        .facts
        .get(key)
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("no fact {key}: {:?}", report.facts))
}

/// Two pods with the proxy on their own address — over TLS when `certs` is given, each pod
/// with a self-signed certificate of its own written there (trust them all with
/// [`ca_file`]) — a CI job allowed the demo agent (id 1), and the API stand-in.
async fn stack(certs: Option<&std::path::Path>) -> (Stack, KubeApi) {
    let certs = certs.map(std::path::Path::to_owned);
    let stack = Stack::start_with(2, move |c| {
        let ip = c.agent.listen.ip();
        c.kubernetes_api.listen = Some(SocketAddr::new(ip, PROXY_PORT));
        c.kubernetes_api.url_path_prefix = "/k8s-proxy/".into();
        if let Some(dir) = &certs {
            let dir = dir.join(ip.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            let (cert, key) = kas_loadtest::stack::self_signed(&dir, &[ip]).unwrap();
            c.kubernetes_api.certificate_file = Some(cert);
            c.kubernetes_api.key_file = Some(key);
        }
        c.reverse_tunnel.routing_timeout = Duration::from_secs(3);
    })
    .await;
    stack.gitlab.add_ci_job(StandinCiJob {
        job_token: JOB_TOKEN.into(),
        job_id: 7,
        pipeline_id: 6,
        project_id: 1,
        group_ids: vec![],
        username: "loadtest".into(),
        environment: None,
        allowed_agents: vec![StandinAllowedAgent {
            agent_id: 1,
            config_project_id: 1,
            access_as: serde_json::json!({"agent": {}}),
        }],
    });
    let kube = KubeApi::start(SocketAddr::new(ip(stack.subnet, 200), 0))
        .await
        .expect("the Kubernetes API stand-in");
    (stack, kube)
}

/// Every pod's certificate in one PEM file.
fn ca_file(stack: &Stack, certs: &std::path::Path) -> std::path::PathBuf {
    let mut pem = String::new();
    for pod in &stack.pods {
        let cert = certs.join(pod.addr.ip().to_string()).join("tls.crt");
        pem.push_str(&std::fs::read_to_string(cert).unwrap());
    }
    let path = certs.join("ca.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

/// The pods' proxy URLs, in the pods' order.
fn proxy_urls(stack: &Stack, scheme: &str) -> Vec<String> {
    stack
        .pods
        .iter()
        .map(|p| format!("{scheme}://{}:{PROXY_PORT}/k8s-proxy/", p.addr.ip()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_answer_requests_and_watches_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, kube) = stack(Some(dir.path())).await;
    let cert = ca_file(&stack, dir.path());
    let urls = proxy_urls(&stack, "https");
    let (ws, grpc) = (stack.pod_url(0, true), stack.pod_url(1, false));
    let token = format!("ci:1:{JOB_TOKEN}");
    let kube_url = kube.url();
    let json = dir.path().join("k8s.json");
    let html = dir.path().join("k8s.html");
    let args = stack.args(
        "k8s-proxy",
        &[
            "--target",
            &ws,
            "--target",
            &grpc,
            "--ws-fraction",
            "0.5",
            "--agents",
            "6",
            "--echo-interval",
            "0",
            "--kube-api-url",
            &kube_url,
            "--k8s-proxy-url",
            &urls[0],
            "--k8s-proxy-url",
            &urls[1],
            "--k8s-token",
            &token,
            "--k8s-ca-file",
            cert.to_str().unwrap(),
            "--k8s-rate",
            "40",
            "--k8s-watches",
            "2",
            "--k8s-write-rate",
            "4",
            "--duration",
            "2s",
        ],
    );
    let report = kas_loadtest::run(args).await.unwrap();
    assert!(
        report.passed && report.totals.errors == 0,
        "{}",
        report.summary_table()
    );
    // Every agent held its two tunnels before the load; every GET went through one.
    assert_eq!(fact_u64(&report, "tunnels_idle_after_ramp"), 12);
    let gets = fact_u64(&report, "k8s_gets_sent");
    assert_eq!(gets, 80);
    assert_eq!(report.latency["k8s GET"].count, gets);
    let writes = fact_u64(&report, "k8s_writes");
    assert!(writes >= 4, "{writes} pods created");
    // GETs, creates and deletes, and the two watches: each took a tunnel of its own.
    let used = fact_u64(&report, "tunnels_used");
    assert!(used >= gets + 2 * writes - 1 + 2, "{used} tunnels used");
    assert!(fact_u64(&report, "tunnels_busy_peak") >= 2);
    assert_eq!(fact_u64(&report, "watches_open_at_end"), 2);
    // Both watches saw pods created during the run, through their tunnels.
    assert!(fact_u64(&report, "watch_events_of_writes") >= 2);
    assert!(report.latency.contains_key("watch event delay"));
    assert_eq!(report.totals.k8s_sent, report.totals.k8s_ok);
    // The cluster saw the agents' replays: no credentials, the agents' Via.
    let seen = kube
        .last_request("/api/v1/namespaces/default/pods")
        .expect("the list reached the cluster");
    assert!(seen.header("authorization").is_none());
    assert!(
        seen.header_all("via").join(",").contains("kas-loadtest"),
        "{:?}",
        seen.headers
    );
    assert!(report.timeline.iter().any(|s| s.tunnels_busy.is_some()));

    report.write_json(&json).unwrap();
    report.write_html(&html).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("Tunnels carrying a request"));
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["scenario"], "k8s-proxy");
    assert_eq!(parsed["passed"], true);
}

/// Without a fleet, the same callers against the API server itself (the bench's
/// baseline), closed loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_alone_reach_the_api_server_directly() {
    let (stack, kube) = stack(None).await;
    let url = format!("{}/", kube.url());
    let args = stack.args(
        "k8s-proxy",
        &[
            "--agents",
            "0",
            "--k8s-proxy-url",
            &url,
            "--k8s-concurrency",
            "2",
            "--k8s-watches",
            "1",
            "--k8s-write-rate",
            "5",
            "--duration",
            "1s",
        ],
    );
    let report = kas_loadtest::run(args).await.unwrap();
    assert!(
        report.passed && report.totals.errors == 0,
        "{}",
        report.summary_table()
    );
    let gets = fact_u64(&report, "k8s_gets_sent");
    assert!(gets > 0 && report.latency["k8s GET"].count == gets);
    assert!(!report.facts.contains_key("tunnels_used"));
}

/// An agent token GitLab does not know: the agent never connects, requests with no agent
/// behind them fail with the proxy's 502, and the run fails and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_tunnels_fails_the_run_with_its_errors() {
    let (stack, kube) = stack(None).await;
    let urls = proxy_urls(&stack, "http");
    let grpc = stack.pod_url(0, false);
    let kube_url = kube.url();
    let token = format!("ci:1:{JOB_TOKEN}");
    let args = stack.args(
        "k8s-proxy",
        &[
            "--target",
            &grpc,
            "--ws-fraction",
            "0",
            "--agents",
            "1",
            "--token",
            "glagent-nobody",
            "--settle",
            "1s",
            "--kube-api-url",
            &kube_url,
            "--k8s-proxy-url",
            &urls[0],
            "--k8s-token",
            &token,
            "--k8s-rate",
            "2",
            "--k8s-watches",
            "0",
            "--k8s-write-rate",
            "0",
            "--duration",
            "1s",
        ],
    );
    let report = kas_loadtest::run(args).await.unwrap();
    assert!(!report.passed);
    let kinds: Vec<&str> = report.errors.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.iter().any(|k| k.starts_with("configuration: grpc")),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"k8s GET: HTTP 502"), "{kinds:?}");
}

/// `kas-loadtest-stack`'s stack (real kas processes, distinct agents) serves the scenario
/// it is for: agents with their own tokens on both pods, callers with their `ci:` tokens
/// on the proxy of each agent's pod; SIGTERM then ends the pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_stack_serves_the_scenario() {
    let kas = find_kas_binary().expect(
        "kas binary not found: run the tests with `cargo test --workspace` (which builds it) or \
         point KAS_BIN at it",
    );
    let (subnet, sources) = (
        kas_testkit::net::next_subnet(),
        kas_testkit::net::next_subnet(),
    );
    let dir = tempfile::tempdir().unwrap();
    let ip_base = ip(subnet, 10).to_string();
    let standin_ip = ip(subnet, 200).to_string();
    let stack_args = <kas_loadtest::stack::StackArgs as clap::Parser>::try_parse_from([
        "kas-loadtest-stack",
        "--dir",
        dir.path().to_str().unwrap(),
        "--pods",
        "2",
        "--agents",
        "4",
        "--ip-base",
        &ip_base,
        "--standin-ip",
        &standin_ip,
        "--kas-bin",
        kas.to_str().unwrap(),
    ])
    .unwrap();
    let stack = kas_loadtest::stack::Stack::start(&stack_args)
        .await
        .unwrap();
    let info = &stack.info;
    assert_eq!((info.kas_pids.len(), info.proxy_urls.len()), (2, 2));
    let env = std::fs::read_to_string(dir.path().join("stack.env")).unwrap();
    assert!(env.contains("K8S_PROXY_URLS="), "{env}");

    let source_base = ip(sources, 1).to_string();
    let (token_file, ci_file) = (
        info.token_file.to_str().unwrap().to_owned(),
        info.ci_token_file.to_str().unwrap().to_owned(),
    );
    let mut argv: Vec<String> = [
        "kas-loadtest",
        "--scenario",
        "k8s-proxy",
        "--progress",
        "never",
        "--source-base",
        &source_base,
        "--agents",
        "8",
        "--ws-fraction",
        "0.5",
        "--echo-interval",
        "0",
        "--token-file",
        &token_file,
        "--k8s-token-file",
        &ci_file,
        "--kube-api-url",
        &info.kube_api_url,
        "--k8s-rate",
        "20",
        "--k8s-watches",
        "2",
        "--k8s-write-rate",
        "2",
        "--duration",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (target, url) in info.agent_targets.iter().zip(&info.proxy_urls) {
        argv.extend([
            "--target".into(),
            target.clone(),
            "--k8s-proxy-url".into(),
            url.clone(),
        ]);
    }
    let args = <kas_loadtest::Args as clap::Parser>::try_parse_from(argv).unwrap();
    let report = kas_loadtest::run(args).await.unwrap();
    assert!(
        report.passed && report.totals.errors == 0,
        "{}",
        report.summary_table()
    );
    assert_eq!(fact_u64(&report, "k8s_gets_sent"), 40);
    assert_eq!(report.params["agent_tokens"], 4);
    let pids = info.kas_pids.clone();
    stack.stop().await;
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "kas {pid} still runs"
        );
    }
}
