//! The Kubernetes API proxy end to end on one kas: real `kubectl` → kas's proxy → a tunnel
//! of the test agent → the Kubernetes API stand-in, and the errors a caller can meet.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use common::{eventually, Harness, TOKEN};
use kas::dev::gitlab_standin::{GitlabFault, StandinAllowedAgent, StandinCiJob, StandinProxyUser};
use kas_testkit::agent::{AgentOptions, Misbehaviour, TestAgent};
use kas_testkit::kube_api::KubeApi;
use kas_testkit::kubectl::{kubeconfig, Kubectl};

const JOB_TOKEN: &str = "ci-job-token-1";
/// A job GitLab knows, allowed no agent.
const OTHER_JOB_TOKEN: &str = "ci-job-token-2";
const PAT: &str = "glpat-proxy-user";
const AGENT_ID: i64 = 1;
const RUN: Duration = Duration::from_secs(30);

struct Stack {
    kas: Harness,
    kube: KubeApi,
    proxy: SocketAddr,
    /// The proxy's self-signed certificate, which clients trust.
    ca: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Stack {
    /// kas with its proxy under `/k8s-proxy/`, a CI job allowed the demo agent with
    /// `access_as`, and the API stand-in; no agent yet.
    async fn start(access_as: serde_json::Value) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = kas_testkit::tls::self_signed(dir.path());
        let (cert_file, key_file) = (cert.clone(), key);
        let kas = Harness::start_with(move |c| {
            c.kubernetes_api.listen = Some(([127, 0, 0, 1], 0).into());
            c.kubernetes_api.certificate_file = Some(cert_file);
            c.kubernetes_api.key_file = Some(key_file);
            c.kubernetes_api.url_path_prefix = "/k8s-proxy".into();
            c.reverse_tunnel.routing_timeout = Duration::from_secs(2);
        })
        .await;
        let agent = StandinAllowedAgent {
            agent_id: AGENT_ID,
            config_project_id: 1,
            access_as,
        };
        kas.gitlab.add_ci_job(StandinCiJob {
            job_token: JOB_TOKEN.into(),
            job_id: 42,
            pipeline_id: 41,
            project_id: 5,
            group_ids: vec![6],
            username: "ci-user".into(),
            environment: Some(("prod".into(), "production".into())),
            allowed_agents: vec![agent.clone()],
        });
        kas.gitlab.add_ci_job(StandinCiJob {
            job_token: OTHER_JOB_TOKEN.into(),
            job_id: 43,
            pipeline_id: 41,
            project_id: 5,
            group_ids: vec![],
            username: "ci-user".into(),
            environment: None,
            allowed_agents: vec![],
        });
        kas.gitlab.add_proxy_user(StandinProxyUser {
            access_key: PAT.into(),
            csrf_token: String::new(),
            user_id: 9,
            username: "alice".into(),
            agents: vec![StandinAllowedAgent {
                access_as: json!({"user": {"projects": [{"id": 5, "roles": ["developer"]}], "groups": []}}),
                ..agent
            }],
        });
        let kube = KubeApi::start(([127, 0, 0, 1], 0).into())
            .await
            .expect("API stand-in");
        let proxy = kas.k8s_proxy_addr.expect("the proxy listens");
        Self {
            kas,
            kube,
            proxy,
            ca: cert,
            dir,
        }
    }

    async fn agent(&self, misbehaviour: Misbehaviour) -> TestAgent {
        let mut options = AgentOptions::new(TOKEN, &self.kube.url());
        options.misbehaviour = misbehaviour;
        let agent = TestAgent::connect_h2c(self.kas.agent_addr, options)
            .await
            .expect("agent connects");
        self.wait_ready_tunnels(2).await;
        agent
    }

    async fn wait_ready_tunnels(&self, n: usize) {
        let want = format!("kas_reverse_tunnels{{state=\"ready\"}} {n}");
        eventually("the agent's idle tunnels", RUN, || async {
            self.kas.http_get("/metrics").await.1.contains(&want)
        })
        .await;
    }

    fn kubectl(&self, token: &str) -> Kubectl {
        let path = self.dir.path().join(format!("kubeconfig-{}", token.len()));
        let server = format!("https://localhost:{}/k8s-proxy", self.proxy.port());
        std::fs::write(&path, kubeconfig(&server, Some(token), Some(&self.ca)))
            .expect("kubeconfig");
        Kubectl::new(path)
    }

    fn ci(&self) -> Kubectl {
        self.kubectl(&format!("ci:{AGENT_ID}:{JOB_TOKEN}"))
    }

    /// A raw request to the proxy (for what kubectl does not show: status objects, headers).
    fn client(&self) -> reqwest::Client {
        let ca = std::fs::read(&self.ca).expect("the proxy's certificate");
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("PEM"))
            .build()
            .expect("client")
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.proxy.port())
    }

    async fn raw(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client().get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the proxy answers")
    }
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn kubectl_get_reaches_the_cluster_as_the_ci_job_without_its_credentials() {
    let stack = Stack::start(json!({"ci_job": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;
    let out = stack.ci().run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("web-0"), "{}", stdout(&out));
    assert!(stdout(&out).contains("coredns-0"), "{}", stdout(&out));

    let seen = stack
        .kube
        .last_request("/api/v1/pods")
        .expect("the cluster got the list");
    assert_eq!(seen.header("impersonate-user"), Some("gitlab:ci_job:42"));
    let groups = seen.header_all("impersonate-group");
    for g in [
        "gitlab:ci_job",
        "gitlab:group:6",
        "gitlab:project:5",
        "gitlab:project_env:5:prod",
    ] {
        assert!(groups.contains(&g), "{g} in {groups:?}");
    }
    assert_eq!(
        seen.header("impersonate-extra-agent.gitlab.com%2fci_job_id")
            .or_else(|| seen.header("impersonate-extra-agent.gitlab.com%2Fci_job_id")),
        Some("42")
    );
    assert!(
        seen.header("authorization").is_none(),
        "credentials never reach the cluster"
    );
    assert!(seen.header("cookie").is_none());
    let via = seen.header_all("via").join(", ");
    assert!(via.contains("gitlab-kas"), "{via}");
}

#[tokio::test]
async fn watch_and_logs_stream_while_they_are_open() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;
    let kubectl = stack.ci();

    let mut watch = kubectl.spawn(&["get", "pods", "-n", "default", "-w", "--no-headers"]);
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(RUN, lines.next_line()).await;
    assert!(
        matches!(&first, Ok(Ok(Some(l))) if l.contains("web-0")),
        "{first:?}"
    );
    eventually("the watch is open at the cluster", RUN, || async {
        stack.kube.open_watches() == 1
    })
    .await;
    // An event after the call started arrives while the stream is open.
    stack.kube.add_pod("default", "late-1");
    let event = tokio::time::timeout(RUN, async {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) if line.contains("late-1") => return Some(line),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    })
    .await;
    assert!(
        matches!(event, Ok(Some(_))),
        "the late pod arrives through the watch"
    );
    drop(watch);

    let mut logs = kubectl.spawn(&["logs", "-f", "web-0"]);
    let mut lines = BufReader::new(logs.stdout.take().expect("stdout")).lines();
    eventually("the log follow is open at the cluster", RUN, || async {
        stack.kube.open_log_follows() == 1
    })
    .await;
    stack.kube.log("default", "web-0", "streamed line 7");
    let line = tokio::time::timeout(RUN, async {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) if line.contains("streamed line 7") => return true,
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    })
    .await;
    assert_eq!(
        line,
        Ok(true),
        "a log line written later arrives while following"
    );
    stack.kube.end_log("default", "web-0");
    let status = tokio::time::timeout(RUN, logs.wait())
        .await
        .expect("ends")
        .expect("exit");
    assert!(status.success());
}

#[tokio::test]
async fn exec_pipes_stdin_and_returns_the_exit_code() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;
    let kubectl = stack.ci();
    let out = kubectl
        .run(
            &["exec", "-i", "web-0", "--", "cat"],
            b"hello through the tunnel\n",
            RUN,
        )
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello through the tunnel\n");
    let out = kubectl
        .run(&["exec", "web-0", "--", "sh", "-c", "exit 3"], b"", RUN)
        .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[tokio::test]
async fn a_post_with_a_body_reaches_the_cluster() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;
    let manifest = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-ci\n  namespace: default\ndata:\n  k: v\n";
    let out = stack.ci().run(&["create", "-f", "-"], manifest, RUN).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let created = stack
        .kube
        .object("configmaps", "default", "from-ci")
        .expect("created in the cluster");
    assert_eq!(created["data"]["k"], "v");
}

#[tokio::test]
async fn a_get_whose_tunnel_is_lost_before_the_answer_goes_through_another_tunnel() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let agent = stack.agent(Misbehaviour::None).await;
    let replayed = |n: u32| format!("kas_k8s_proxy_requests_replayed_total {n}");

    // kubectl's GET: the tunnel kas picked is reset before answering (the agent's
    // connection cut under it); the request goes through the agent's other tunnel.
    agent.set_misbehaviour(Misbehaviour::ResetNextRequestUnanswered);
    let out = stack
        .ci()
        .run(&["get", "pods", "-A", "-o", "name"], b"", RUN)
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("pod/"), "{}", stdout(&out));
    let metrics = stack.kas.http_get("/metrics").await.1;
    assert!(metrics.contains(&replayed(1)), "{metrics}");

    // A POST could change the cluster twice: never sent again, its caller gets the 502.
    stack.wait_ready_tunnels(2).await;
    agent.set_misbehaviour(Misbehaviour::ResetNextRequestUnanswered);
    let manifest =
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: once\n  namespace: default\n";
    let r = stack
        .client()
        .post(stack.url("/k8s-proxy/api/v1/namespaces/default/configmaps"))
        .bearer_auth(format!("ci:{AGENT_ID}:{JOB_TOKEN}"))
        .header("content-type", "application/yaml")
        .body(manifest.to_vec())
        .send()
        .await
        .expect("the proxy answers");
    assert_eq!(r.status(), 502);
    assert!(stack.kube.object("configmaps", "default", "once").is_none());
    let metrics = stack.kas.http_get("/metrics").await.1;
    assert!(metrics.contains(&replayed(1)), "{metrics}");
}

#[tokio::test]
async fn a_personal_access_token_runs_as_the_user() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;
    let out = stack
        .kubectl(&format!("pat:{AGENT_ID}:{PAT}"))
        .run(&["get", "pods", "-n", "kube-system"], b"", RUN)
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = stack
        .kube
        .last_request("/api/v1/namespaces/kube-system/pods")
        .expect("the cluster got the list");
    assert_eq!(seen.header("impersonate-user"), Some("gitlab:user:alice"));
    assert!(seen
        .header_all("impersonate-group")
        .contains(&"gitlab:project_role:5:developer"));
}

#[tokio::test]
async fn refusals_are_status_objects_with_the_right_codes() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;

    let r = stack
        .raw("/k8s-proxy/api/v1/pods", Some("ci:1:not-a-job"))
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["gitlab-unauthorized"], "true");
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["code"], 401);

    let r = stack.raw("/k8s-proxy/api/v1/pods", None).await;
    assert_eq!(r.status(), 401);

    let r = stack
        .raw(
            "/k8s-proxy/api/v1/pods",
            Some(&format!("ci:{AGENT_ID}:{OTHER_JOB_TOKEN}")),
        )
        .await;
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("agentId is not allowed")),
        "{body}"
    );

    let r = stack
        .raw(
            "/elsewhere/api/v1/pods",
            Some(&format!("ci:{AGENT_ID}:{JOB_TOKEN}")),
        )
        .await;
    assert_eq!(r.status(), 400);

    // kubectl shows the refusal as such (its discovery step prints the reason only).
    let out = stack
        .kubectl(&format!("ci:{AGENT_ID}:{OTHER_JOB_TOKEN}"))
        .run(&["get", "pods"], b"", RUN)
        .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("(Forbidden)"), "{}", stderr(&out));
}

#[tokio::test]
async fn gitlab_down_is_a_503_status_not_a_401() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;
    stack.kas.gitlab.set_fault(GitlabFault::Unavailable);
    // Neither credential can be checked: the caller is told to retry, not that it is
    // refused (kubectl and CI scripts must not read an outage as bad credentials).
    for token in [
        format!("ci:{AGENT_ID}:{JOB_TOKEN}"),
        format!("pat:{AGENT_ID}:{PAT}"),
    ] {
        let r = stack.raw("/k8s-proxy/api/v1/pods", Some(&token)).await;
        assert_eq!(r.status(), 503, "{token}");
        assert!(r.headers().get("gitlab-unauthorized").is_none());
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["code"], 503);
        assert_eq!(body["reason"], "ServiceUnavailable");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("GitLab is unavailable")),
            "{body}"
        );
    }
    // The outage is not remembered: GitLab back, the same job gets through at once.
    stack.kas.gitlab.set_fault(GitlabFault::None);
    let r = stack
        .raw(
            "/k8s-proxy/api/v1/pods",
            Some(&format!("ci:{AGENT_ID}:{JOB_TOKEN}")),
        )
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn no_agent_means_502_after_the_routing_timeout_and_a_late_agent_is_served() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let token = format!("ci:{AGENT_ID}:{JOB_TOKEN}");
    let started = std::time::Instant::now();
    let r = stack.raw("/k8s-proxy/version", Some(&token)).await;
    assert_eq!(r.status(), 502);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "waited the routing timeout: {waited:?}"
    );
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("Agent connection not found")),
        "{body}"
    );
    let metrics = stack.kas.http_get("/metrics").await.1;
    assert!(
        metrics.contains("k8s_api_proxy_routing_timeout_total 1"),
        "{metrics}"
    );

    // A request that waits is served by an agent that connects meanwhile.
    let waiting = tokio::spawn({
        let (client, url) = (stack.client(), stack.url("/k8s-proxy/version"));
        let token = token.clone();
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent = TestAgent::connect_h2c(
        stack.kas.agent_addr,
        AgentOptions::new(TOKEN, &stack.kube.url()),
    )
    .await;
    let status = waiting.await.expect("joined").expect("answered");
    assert_eq!(status, 200);
    drop(agent);
}

#[tokio::test]
async fn a_tunnel_message_out_of_order_fails_the_call_with_502() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let agent = stack.agent(Misbehaviour::MessageBeforeHeader).await;
    let r = stack
        .raw(
            "/k8s-proxy/version",
            Some(&format!("ci:{AGENT_ID}:{JOB_TOKEN}")),
        )
        .await;
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("out of order")),
        "{body}"
    );
    eventually(
        "the agent's tunnel ended with INVALID_ARGUMENT",
        RUN,
        || async {
            agent
                .last_error()
                .is_some_and(|s| s.code() == tonic::Code::InvalidArgument)
        },
    )
    .await;
}

#[tokio::test]
async fn a_drain_ends_an_open_exec_cleanly() {
    use tokio::io::AsyncWriteExt;
    let mut stack = Stack::start(json!({"agent": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;
    let kubectl = stack.ci();
    let mut exec = kubectl.spawn(&["exec", "-i", "web-0", "--", "cat"]);
    let mut stdin = exec.stdin.take().expect("stdin");
    let mut lines = BufReader::new(exec.stdout.take().expect("stdout")).lines();
    stdin.write_all(b"before the drain\n").await.expect("write");
    let echoed = tokio::time::timeout(RUN, lines.next_line()).await;
    assert!(
        matches!(&echoed, Ok(Ok(Some(l))) if l == "before the drain"),
        "{echoed:?}"
    );
    // The pod drains: readiness 503, listeners close, and at the drain deadline (3 s) the
    // tunnel carrying the exec ends; kubectl's exec ends instead of hanging, and kas exits.
    stack.kas.begin_shutdown();
    let ended = tokio::time::timeout(RUN, exec.wait()).await;
    assert!(ended.is_ok(), "the exec ended with the drain");
    let task = stack.kas.task.take().expect("kas task");
    let result = tokio::time::timeout(RUN, task).await.expect("kas exits");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
}

#[tokio::test]
async fn browsers_are_answered_only_from_gitlabs_origin() {
    let stack = Stack::start(json!({"agent": {}})).await;
    let _agent = stack.agent(Misbehaviour::None).await;
    let gitlab = stack.kas.gitlab.url();
    let client = stack.client();
    // A preflight needs no credentials and echoes what the browser asked for.
    let r = client
        .request(
            reqwest::Method::OPTIONS,
            stack.url("/k8s-proxy/api/v1/pods"),
        )
        .header("origin", &gitlab)
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], gitlab.as_str());
    assert_eq!(r.headers()["access-control-allow-headers"], "authorization");
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    // A real request from GitLab's origin carries the CORS headers; another origin is refused.
    let r = client
        .get(stack.url("/k8s-proxy/version"))
        .header("origin", &gitlab)
        .bearer_auth(format!("ci:{AGENT_ID}:{JOB_TOKEN}"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], gitlab.as_str());
    let r = client
        .get(stack.url("/k8s-proxy/version"))
        .header("origin", "https://evil.example")
        .bearer_auth(format!("ci:{AGENT_ID}:{JOB_TOKEN}"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
