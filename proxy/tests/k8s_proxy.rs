//! `kubectl` through the edge: `/k8s-proxy/` is routed to the kas pods' Kubernetes API proxy
//! port (`upstream.routes`), over HTTP/2 for ordinary calls and HTTP/1.1 upgrades for
//! `exec`, while agents keep using the agent port of the same pods.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use common::{eventually, Cluster, Edge, TOKEN};
use kas::dev::gitlab_standin::{StandinAllowedAgent, StandinCiJob};
use kas_testkit::agent::{AgentOptions, TestAgent};
use kas_testkit::kube_api::KubeApi;
use kas_testkit::kubectl::Kubectl;

const K8S_PORT: u16 = 8154;
const JOB_TOKEN: &str = "edge-ci-job-token";
const RUN: Duration = Duration::from_secs(30);
const ROUTE: &str = "[[upstream.routes]]\npath_prefix = \"/k8s-proxy/\"\nport = 8154\n";

struct Stack {
    cluster: Cluster,
    edge: Edge,
    kube: KubeApi,
    _agents: Vec<TestAgent>,
    kubectl: Kubectl,
    _dir: tempfile::TempDir,
}

/// Two kas pods with their proxies, the demo agent holding tunnels on each (tunnels are
/// not shared between pods yet), a CI job allowed the agent, and the edge routing
/// `/k8s-proxy/` to port 8154.
async fn stack() -> Stack {
    let cluster = Cluster::start_with(2, |c| {
        c.kubernetes_api.listen = Some(SocketAddr::new(c.agent.listen.ip(), K8S_PORT));
        c.kubernetes_api.url_path_prefix = "/k8s-proxy/".into();
        c.reverse_tunnel.routing_timeout = Duration::from_secs(2);
    })
    .await;
    cluster.gitlab.add_ci_job(StandinCiJob {
        job_token: JOB_TOKEN.into(),
        job_id: 7,
        pipeline_id: 6,
        project_id: cluster.agent.project_id,
        group_ids: vec![],
        username: "ci".into(),
        environment: None,
        allowed_agents: vec![StandinAllowedAgent {
            agent_id: cluster.agent.agent_id,
            config_project_id: cluster.agent.project_id,
            access_as: json!({"ci_job": {}}),
        }],
    });
    let kube = KubeApi::start(SocketAddr::new(common::ip(cluster.subnet, 2), 0))
        .await
        .expect("API stand-in");
    let mut agents = Vec::new();
    for pod in &cluster.pods {
        let options = AgentOptions::new(TOKEN, &kube.url());
        agents.push(
            TestAgent::connect_h2c(pod.addr, options)
                .await
                .expect("agent connects"),
        );
    }
    for agent in &agents {
        assert!(agent.wait_idle(2, RUN).await, "the agent holds its tunnels");
    }
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), ROUTE).await;
    edge.wait_healthy(2).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: edge\n  cluster:\n    \
             server: https://{}/k8s-proxy\n    certificate-authority: {}\n    \
             tls-server-name: localhost\nusers:\n- name: ci\n  user:\n    \
             token: \"ci:{}:{JOB_TOKEN}\"\ncontexts:\n- name: edge\n  context:\n    \
             cluster: edge\n    user: ci\ncurrent-context: edge\n",
            edge.https,
            edge.ca_file.display(),
            cluster.agent.agent_id,
        ),
    )
    .expect("kubeconfig");
    Stack {
        cluster,
        edge,
        kube,
        _agents: agents,
        kubectl: Kubectl::new(kubeconfig),
        _dir: dir,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn kubectl_get_watch_and_exec_go_through_the_edge_to_the_cluster() {
    let stack = stack().await;
    let out = stack.kubectl.run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("coredns-0"),
        "{}",
        text(&out.stdout)
    );
    let seen = stack
        .kube
        .last_request("/api/v1/pods")
        .expect("the cluster got the list");
    assert_eq!(seen.header("impersonate-user"), Some("gitlab:ci_job:7"));
    assert!(seen.header("authorization").is_none());

    // A watch stays open through the edge and carries an event emitted later.
    let mut watch = stack
        .kubectl
        .spawn(&["get", "pods", "-n", "default", "-w", "--no-headers"]);
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(RUN, lines.next_line()).await;
    assert!(
        matches!(&first, Ok(Ok(Some(l))) if l.contains("web-0")),
        "{first:?}"
    );
    eventually("the watch reached the cluster", RUN, || async {
        stack.kube.open_watches() == 1
    })
    .await;
    stack.kube.add_pod("default", "through-the-edge");
    let arrived = tokio::time::timeout(RUN, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("through-the-edge") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        arrived,
        Ok(true),
        "the later event arrived through the edge"
    );
    drop(watch);

    // exec: an HTTP/1.1 upgrade (websocket) through the edge to port 8154.
    let mut exec = stack.kubectl.spawn(&["exec", "-i", "web-0", "--", "cat"]);
    let mut stdin = exec.stdin.take().expect("stdin");
    let mut out = BufReader::new(exec.stdout.take().expect("stdout")).lines();
    stdin.write_all(b"via the edge\n").await.expect("write");
    let echoed = tokio::time::timeout(RUN, out.next_line()).await;
    assert!(
        matches!(&echoed, Ok(Ok(Some(l))) if l == "via the edge"),
        "{echoed:?}"
    );
    drop(stdin);
    let status = tokio::time::timeout(RUN, exec.wait())
        .await
        .expect("ends")
        .expect("exit");
    assert!(status.success());

    // Agents still reach the agent port of the same pods.
    let log = stack.edge.log();
    assert!(
        log.contains("/k8s-proxy/"),
        "the access log names the route's requests"
    );
    let _ = &stack.cluster;
}

#[tokio::test]
async fn a_refusal_from_kas_reaches_kubectl_through_the_edge() {
    let stack = stack().await;
    let r = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&stack.edge.ca_file).expect("ca"))
                .expect("pem"),
        )
        .resolve("localhost", stack.edge.https)
        .build()
        .expect("client")
        .get(format!(
            "https://localhost:{}/k8s-proxy/version",
            stack.edge.https.port()
        ))
        .bearer_auth("ci:1:not-a-job")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["gitlab-unauthorized"], "true");
}
