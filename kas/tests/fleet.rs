//! A kas fleet: pods on their own loopback addresses sharing one real `redis-server`. An
//! agent's tunnels are on one pod, `kubectl` (the real client) talks to another, and the
//! call goes through the private API; the Redis keys are read with a plain client and
//! compared byte for byte with what real kas v16 writes.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use prost::Message as _;
use serde_json::json;

use common::{eventually, KasTests, TOKEN};
use kas::dev::gitlab_standin::{StandinAllowedAgent, StandinCiJob};
use kas::gitlab::SharedSecret;
use kas_proto::redistool::ExpiringValue;
use kas_testkit::agent::{AgentOptions, TestAgent};
use kas_testkit::kube_api::KubeApi;
use kas_testkit::kubectl::Kubectl;
use kas_testkit::pods::Cluster;
use kas_testkit::redis::{RedisSentinel, RedisServer};

const JOB_TOKEN: &str = "ci-job-token-fleet";
const PRIVATE_API_PORT: u16 = 8155;
const PROXY_PORT: u16 = 8154;
const API_PORT: u16 = 8153;
const RUN: Duration = Duration::from_secs(30);

struct Fleet {
    cluster: Cluster<KasTests>,
    redis: RedisServer,
    kube: KubeApi,
    ca: PathBuf,
    /// The secret GitLab signs its calls to the API port with.
    api_secret: PathBuf,
    dir: tempfile::TempDir,
}

fn private_url(pod: SocketAddr) -> String {
    format!("grpc://{}:{PRIVATE_API_PORT}", pod.ip())
}

/// The tunnel tracker's key for an agent: prefix, name, then the id as 8 little-endian bytes.
fn tracker_key(agent_id: i64) -> Vec<u8> {
    let mut key = b"gitlab-kas:tunnel_tracker2:kas_by_agent_id:".to_vec();
    key.extend_from_slice(&agent_id.to_le_bytes());
    key
}

impl Fleet {
    async fn start(pods: u8) -> Self {
        Self::start_with(pods, |_| {}).await
    }

    /// Like [`Fleet::start`], each pod's configuration changed by `extra` last.
    async fn start_with(pods: u8, extra: impl Fn(&mut kas::Config) + 'static) -> Self {
        Self::start_on(RedisServer::start().await, pods, extra).await
    }

    /// Like [`Fleet::start_with`], on `redis` (over TLS when it speaks TLS).
    async fn start_on(
        redis: RedisServer,
        pods: u8,
        extra: impl Fn(&mut kas::Config) + 'static,
    ) -> Self {
        let redis_ca = redis.certificate.clone();
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = kas_testkit::tls::self_signed(dir.path());
        let private_secret = dir.path().join("private-api-secret");
        std::fs::write(&private_secret, SharedSecret::generate().to_base64()).expect("secret");
        let api_secret = dir.path().join("api-secret");
        std::fs::write(&api_secret, SharedSecret::generate().to_base64()).expect("secret");
        let api_secret_file = api_secret.clone();
        let address = redis.address();
        let (cert_file, key_file) = (cert.clone(), key);
        let cluster = Cluster::<KasTests>::start_with(pods, move |c| {
            let ip = c.agent.listen.ip();
            c.redis.address = Some(address.clone());
            if let Some(ca) = &redis_ca {
                c.redis.tls = true;
                c.redis.ca_certificate_file = Some(ca.clone());
            }
            c.private_api.listen = Some(SocketAddr::new(ip, PRIVATE_API_PORT));
            c.private_api.authentication_secret_file = private_secret.clone();
            c.kubernetes_api.listen = Some(SocketAddr::new(ip, PROXY_PORT));
            c.kubernetes_api.certificate_file = Some(cert_file.clone());
            c.kubernetes_api.key_file = Some(key_file.clone());
            c.kubernetes_api.url_path_prefix = "/k8s-proxy".into();
            c.reverse_tunnel.routing_timeout = Duration::from_secs(5);
            c.api.listen = Some(SocketAddr::new(ip, API_PORT));
            c.api.authentication_secret_file = api_secret_file.clone();
            // As real kas: only a push event makes a change reach agents early.
            c.agent_configuration.poll_interval = Duration::from_secs(300);
            extra(c);
        })
        .await;
        cluster.gitlab.add_ci_job(StandinCiJob {
            job_token: JOB_TOKEN.into(),
            job_id: 42,
            pipeline_id: 41,
            project_id: 5,
            group_ids: vec![],
            username: "ci-user".into(),
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
        Self {
            cluster,
            redis,
            kube,
            ca: cert,
            api_secret,
            dir,
        }
    }

    /// The test agent, connected to pod `i`, with its idle tunnels registered there.
    async fn agent_on(&self, i: usize) -> TestAgent {
        let options = AgentOptions::new(TOKEN, &self.kube.url());
        let agent = TestAgent::connect_h2c(self.cluster.pods[i].addr, options)
            .await
            .expect("agent connects");
        assert!(agent.wait_idle(2, RUN).await, "the agent opens its tunnels");
        agent
    }

    /// kubectl against pod `i`'s proxy, as the CI job.
    fn kubectl(&self, i: usize) -> Kubectl {
        let pod = self.cluster.pods[i].addr.ip();
        let server = format!("https://{pod}:{PROXY_PORT}/k8s-proxy");
        let token = format!("ci:{}:{JOB_TOKEN}", self.cluster.agent.agent_id);
        let config = kas::dev::kubeconfig::kubeconfig(&server, Some(&token), Some(&self.ca))
            // The certificate names localhost; the pods have addresses of their own.
            .replace(
                "    certificate-authority:",
                "    tls-server-name: localhost\n    certificate-authority:",
            );
        let path = self.dir.path().join(format!("kubeconfig-{i}"));
        std::fs::write(&path, config).expect("kubeconfig");
        Kubectl::new(path)
    }

    /// GitLab's call to pod `i`'s API port, by Python grpcio (`kas/tests/python/kas_api.py`).
    async fn gitlab_calls(&self, i: usize, secret: &str, args: &[&str]) -> serde_json::Value {
        let target = SocketAddr::new(self.cluster.pods[i].addr.ip(), API_PORT).to_string();
        let script = format!("{}/tests/python/kas_api.py", env!("CARGO_MANIFEST_DIR"));
        let mut command = std::process::Command::new("python3");
        command.arg(script).arg(target).arg(secret).args(args);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            panic!(
                "kas_api.py printed no JSON (is grpcio installed? .ci/install)\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    fn api_secret(&self) -> &str {
        self.api_secret.to_str().expect("UTF-8 path")
    }

    /// A configuration stream of the demo agent on pod `i`, as agentk opens it.
    async fn config_stream(
        &self,
        i: usize,
    ) -> tonic::Streaming<kas_proto::agent_configuration::ConfigurationResponse> {
        use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
        use kas_proto::agent_configuration::ConfigurationRequest;
        let channel = kas_testkit::clients::h2c_channel(self.cluster.pods[i].addr).await;
        AgentConfigurationClient::new(channel)
            .get_configuration(common::with_token(
                ConfigurationRequest {
                    agent_meta: Some(kas_proto::entity::AgentMeta {
                        version: "v16.5.0".into(),
                        commit_id: "abc123".into(),
                        pod_namespace: "gitlab-agent".into(),
                        pod_name: "agentk-7f9c".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                TOKEN,
            ))
            .await
            .expect("GetConfiguration accepted")
            .into_inner()
    }

    /// A raw GET through pod `i`'s proxy as the CI job: status and body.
    async fn proxy_get(&self, i: usize, path: &str) -> (u16, String) {
        let ca = std::fs::read(&self.ca).expect("certificate");
        let pod = SocketAddr::new(self.cluster.pods[i].addr.ip(), PROXY_PORT);
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("PEM"))
            .resolve("localhost", pod)
            .build()
            .expect("client");
        let token = format!("ci:{}:{JOB_TOKEN}", self.cluster.agent.agent_id);
        let response = client
            .get(format!("https://localhost:{PROXY_PORT}/k8s-proxy{path}"))
            .bearer_auth(token)
            .send()
            .await
            .expect("the proxy answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    async fn metrics(&self, i: usize) -> String {
        kas_testkit::clients::http_get(self.cluster.pods[i].obs_addr, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The fields of the agent's tunnel-tracker hash: pod URL → raw value.
    async fn tracked(&self) -> Vec<(String, Vec<u8>)> {
        let mut redis = self.redis.client().await;
        let mut fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(tracker_key(self.cluster.agent.agent_id))
            .query_async(&mut redis)
            .await
            .expect("HGETALL");
        fields.sort();
        fields
    }

    async fn wait_tracked(&self, urls: &[String]) {
        let want: Vec<String> = urls.to_vec();
        eventually("the tunnel tracker lists the pods", RUN, || {
            let want = want.clone();
            async move {
                let mut got: Vec<String> =
                    self.tracked().await.into_iter().map(|(u, _)| u).collect();
                got.sort();
                got == want
            }
        })
        .await;
    }
}

/// The value of `name` (a full series, labels included) in a metrics page; 0 when absent.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

const TO_OTHER: &str = "kas_routed_calls_total{to=\"other\"}";
const TO_SELF: &str = "kas_routed_calls_total{to=\"self\"}";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn out(o: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn kubectl_on_one_pod_reaches_the_agent_on_another_through_redis_and_the_private_api() {
    let fleet = Fleet::start(2).await;
    let _agent = fleet.agent_on(0).await;
    let pod_a = private_url(fleet.cluster.pods[0].addr);
    fleet.wait_tracked(std::slice::from_ref(&pod_a)).await;

    // The key and value bytes are real kas v16's.
    let fields = fleet.tracked().await;
    let (url, value) = &fields[0];
    assert_eq!(url, &pod_a);
    let decoded = ExpiringValue::decode(value.as_slice()).expect("an ExpiringValue");
    assert!(decoded.value.is_empty());
    let ttl_left = decoded.expires_at - now();
    assert!((290..=301).contains(&ttl_left), "expires in {ttl_left} s");
    assert_eq!(
        value,
        &ExpiringValue {
            expires_at: decoded.expires_at,
            value: vec![]
        }
        .encode_to_vec()
    );
    assert_eq!(
        value[0], 0x08,
        "field 1, varint; the empty value is not written"
    );
    let mut redis = fleet.redis.client().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(tracker_key(fleet.cluster.agent.agent_id))
        .query_async(&mut redis)
        .await
        .expect("PTTL");
    assert!((250_000..=300_000).contains(&pttl), "PTTL {pttl}");

    // kubectl talks to pod B; the agent is on pod A.
    let kubectl = fleet.kubectl(1);
    let o = kubectl.run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("web-0"), "{}", out(&o));
    // kubectl's discovery and the list: every call went to pod A.
    let b = fleet.metrics(1).await;
    assert!(metric(&b, TO_OTHER) >= 1.0, "{b}");
    assert_eq!(metric(&b, TO_SELF), 0.0, "{b}");
    // A request on pod A is served by its own tunnel.
    let o = fleet.kubectl(0).run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
    let a = fleet.metrics(0).await;
    assert!(metric(&a, TO_SELF) >= 1.0, "{a}");
    assert_eq!(metric(&a, TO_OTHER), 0.0, "{a}");
    // Pod B never registered: it holds no tunnel.
    fleet.wait_tracked(&[pod_a]).await;
}

#[tokio::test]
async fn the_next_request_follows_the_agent_to_another_pod() {
    let fleet = Fleet::start(3).await;
    let agent = fleet.agent_on(0).await;
    let (pod_a, pod_c) = (
        private_url(fleet.cluster.pods[0].addr),
        private_url(fleet.cluster.pods[2].addr),
    );
    fleet.wait_tracked(std::slice::from_ref(&pod_a)).await;
    let kubectl = fleet.kubectl(1);
    let o = kubectl.run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(agent.used() >= 1, "pod A's tunnel carried the call");

    // The agent moves to pod C.
    agent.stop();
    drop(agent);
    let moved = fleet.agent_on(2).await;
    let o = kubectl.run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("web-0"), "{}", out(&o));
    assert!(moved.used() >= 1, "pod C's tunnel carried the call");
    // Pod A's field goes after the unregistration delay; C's stays.
    fleet.wait_tracked(&[pod_c]).await;
    let b = fleet.metrics(1).await;
    assert_eq!(metric(&b, TO_SELF), 0.0, "{b}");
}

#[tokio::test]
async fn the_private_api_refuses_calls_without_a_valid_jwt() {
    let fleet = Fleet::start(1).await;
    let addr = SocketAddr::new(fleet.cluster.pods[0].addr.ip(), PRIVATE_API_PORT);
    let channel = kas_testkit::clients::h2c_channel(addr).await;
    for token in [None, Some("not-a-jwt")] {
        let mut client = kas_proto::kubernetes_api::kubernetes_api_client::KubernetesApiClient::new(
            channel.clone(),
        );
        let mut request = tonic::Request::new(futures_util::stream::iter(Vec::<
            kas_proto::grpctool::HttpRequest,
        >::new()));
        request
            .metadata_mut()
            .insert("kas-hop-routing-agent-id", "1".parse().unwrap());
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let status = client.make_request(request).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
}

#[tokio::test]
async fn a_push_event_from_gitlab_reaches_the_agent_on_another_pod_at_once() {
    let fleet = Fleet::start(2).await;
    let mut stream = fleet.config_stream(0).await;
    let first = tokio::time::timeout(RUN, stream.message())
        .await
        .expect("first configuration in time")
        .expect("stream ok")
        .expect("a configuration");
    // A commit, then GitLab's push event to the *other* pod. The poll period is 300 s:
    // only the event can bring the commit now.
    let agent = &fleet.cluster.agent;
    fleet
        .cluster
        .gitlab
        .write_agent_config(agent, "observability:\n  logging:\n    level: warn\n")
        .expect("commit");
    // The subscription on pod A is up once Redis counts a subscriber on kas_events.
    let mut redis = fleet.redis.client().await;
    eventually("every pod subscribes to kas_events", RUN, || {
        let mut redis = redis.clone();
        async move {
            let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("kas_events")
                .query_async(&mut redis)
                .await
                .unwrap_or_default();
            counts.first().is_some_and(|(_, n)| *n >= 2)
        }
    })
    .await;
    let _ = &mut redis;
    let sent = std::time::Instant::now();
    let answer = fleet
        .gitlab_calls(
            1,
            fleet.api_secret(),
            &["push", &agent.project_id.to_string(), &agent.project_path],
        )
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    let next = tokio::time::timeout(RUN, stream.message())
        .await
        .expect("the new configuration arrives long before the next poll")
        .expect("stream ok")
        .expect("a configuration");
    eprintln!(
        "push event → new configuration on the other pod: {:?}",
        sent.elapsed()
    );
    assert_ne!(next.commit_id, first.commit_id);
}

#[tokio::test]
async fn connected_agents_are_listed_for_gitlab_from_any_pod() {
    let fleet = Fleet::start(2).await;
    let agent = fleet.cluster.agent.clone();
    let mut stream = fleet.config_stream(0).await;
    tokio::time::timeout(RUN, stream.message())
        .await
        .expect("first configuration in time")
        .expect("stream ok");
    let by_agent = ["agents", "--agent-id", &agent.agent_id.to_string()];
    let mut listed = serde_json::Value::Null;
    for _ in 0..100 {
        listed = fleet.gitlab_calls(1, fleet.api_secret(), &by_agent).await;
        if listed["agents"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agents = listed["agents"].as_array().expect("a list");
    assert_eq!(agents.len(), 1, "{listed}");
    let a = &agents[0];
    assert_eq!(a["agent_id"], agent.agent_id);
    assert_eq!(a["project_id"], agent.project_id);
    assert_eq!(a["version"], "v16.5.0");
    assert_eq!(a["pod_name"], "agentk-7f9c");
    assert_eq!(a["pod_namespace"], "gitlab-agent");
    assert!(
        (now() - a["connected_at"].as_i64().unwrap()).abs() < 60,
        "{a}"
    );
    let by_project = fleet
        .gitlab_calls(
            0,
            fleet.api_secret(),
            &["agents", "--project-id", &agent.project_id.to_string()],
        )
        .await;
    assert_eq!(by_project["agents"], listed["agents"], "{by_project}");

    // The keys are real kas's: le64 ids, decimal connection id, ExpiringValue around
    // ConnectedAgentInfo.
    let mut redis = fleet.redis.client().await;
    let mut key = b"gitlab-kas:agent_tracker2:conn_by_agent_id:".to_vec();
    key.extend_from_slice(&agent.agent_id.to_le_bytes());
    let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("HGETALL");
    assert_eq!(fields.len(), 1);
    assert_eq!(fields[0].0, a["connection_id"].to_string());
    let value = ExpiringValue::decode(fields[0].1.as_slice()).expect("ExpiringValue");
    let info = kas_proto::agent_tracker::ConnectedAgentInfo::decode(value.value.as_slice())
        .expect("ConnectedAgentInfo");
    assert_eq!(info.agent_id, agent.agent_id);
    assert_eq!(info.agent_meta.expect("meta").version, "v16.5.0");
    let connected: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg("gitlab-kas:agent_tracker2:connected_agents")
        .query_async(&mut redis)
        .await
        .expect("HGETALL");
    assert_eq!(connected[0].0, agent.agent_id.to_string());

    // The stream ends: the agent is no longer listed.
    drop(stream);
    eventually("the entry is removed when the stream ends", RUN, || async {
        let listed = fleet.gitlab_calls(1, fleet.api_secret(), &by_agent).await;
        listed["agents"].as_array().is_some_and(|a| a.is_empty())
    })
    .await;
}

#[tokio::test]
async fn the_api_port_refuses_calls_without_gitlabs_jwt() {
    let fleet = Fleet::start(1).await;
    for secret in ["-", "bad"] {
        let answer = fleet
            .gitlab_calls(0, secret, &["agents", "--agent-id", "1"])
            .await;
        assert_eq!(answer["error"], "UNAUTHENTICATED", "{answer}");
        let answer = fleet.gitlab_calls(0, secret, &["push", "1", "x/y"]).await;
        assert_eq!(answer["error"], "UNAUTHENTICATED", "{answer}");
    }
}

#[tokio::test]
async fn a_redis_outage_keeps_agents_and_same_pod_routing_and_heals_by_itself() {
    let mut fleet = Fleet::start(3).await;
    let agent = fleet.agent_on(0).await;
    let pod_a = private_url(fleet.cluster.pods[0].addr);
    fleet.wait_tracked(std::slice::from_ref(&pod_a)).await;
    // Pod B has looked the agent up once, and a watch runs through it to pod A's tunnel.
    assert_eq!(fleet.proxy_get(1, "/version").await.0, 200);
    let mut watch = fleet
        .kubectl(1)
        .spawn(&["get", "pods", "-n", "default", "-w", "--no-headers"]);
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        watch.stdout.take().expect("stdout"),
    ));
    let first = tokio::time::timeout(RUN, lines.next_line()).await;
    assert!(
        matches!(&first, Ok(Ok(Some(l))) if l.contains("web-0")),
        "{first:?}"
    );
    eventually("the watch is open at the cluster", RUN, || async {
        fleet.kube.open_watches() == 1
    })
    .await;

    fleet.redis.kill();
    // The running cross-pod watch goes on: an event after the outage began arrives.
    fleet.kube.add_pod("default", "during-outage");
    let event = tokio::time::timeout(RUN, async {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) if line.contains("during-outage") => return true,
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    })
    .await;
    assert_eq!(
        event,
        Ok(true),
        "the watch through pod B continues without Redis"
    );
    drop(watch);
    // The agent stays, same-pod routing works.
    assert_eq!(fleet.proxy_get(0, "/version").await.0, 200);
    let o = fleet.kubectl(0).run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
    // Pod B still knows where the agent was.
    assert_eq!(fleet.proxy_get(1, "/version").await.0, 200);
    // Pod C never looked it up: a clear error after the routing timeout.
    let (status, body) = fleet.proxy_get(2, "/version").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("Agent connection not found"), "{body}");
    assert!(body.contains("could not be looked up"), "{body}");
    assert!(body.contains("Redis"), "{body}");
    for pod in &fleet.cluster.pods {
        let (status, _) = kas_testkit::clients::http_get(pod.obs_addr, "/readiness")
            .await
            .expect("readiness answers");
        assert_eq!(status, 200, "{} stays ready without Redis", pod.name);
    }
    assert!(agent.idle() >= 1, "the agent keeps its tunnels");
    // The tunnels the agent opened meanwhile passed the per-token limit uncounted.
    let a = fleet.metrics(0).await;
    assert!(
        metric(&a, "kas_token_limiter_fail_open_total") >= 1.0,
        "{a}"
    );
    let errors = fleet.metrics(2).await;
    assert!(
        metric(
            &errors,
            "kas_redis_operations_total{op=\"tunnel_lookup\",result=\"error\"}"
        ) >= 1.0,
        "{errors}"
    );

    // Redis comes back empty; pod A writes its state again without waiting for the refresh.
    fleet.redis.restart().await;
    fleet.wait_tracked(&[pod_a]).await;
    eventually("pod C reaches the agent again", RUN, || async {
        fleet.proxy_get(2, "/version").await.0 == 200
    })
    .await;
    let o = fleet.kubectl(2).run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
}

#[tokio::test]
async fn the_per_token_limit_is_counted_across_the_fleet_in_redis() {
    use kas_proto::agent_registrar::agent_registrar_client::AgentRegistrarClient;
    use kas_proto::agent_registrar::RegisterRequest;
    let fleet = Fleet::start_with(2, |c| c.agent.connections_per_token_per_minute = 4).await;
    // Clear of a minute's end, so all calls count in one minute.
    let second = now() % 60;
    if second > 50 {
        tokio::time::sleep(Duration::from_secs((61 - second) as u64)).await;
    }
    let register = |i: usize| {
        let addr = fleet.cluster.pods[i].addr;
        async move {
            let channel = kas_testkit::clients::h2c_channel(addr).await;
            AgentRegistrarClient::new(channel)
                .register(common::with_token(
                    RegisterRequest {
                        pod_id: 77,
                        ..Default::default()
                    },
                    TOKEN,
                ))
                .await
        }
    };
    // Two calls on each pod: the fleet's four.
    for i in [0, 1, 0, 1] {
        register(i).await.expect("within the limit");
    }
    for i in [0, 1] {
        let status = register(i).await.expect_err("over the limit");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("rate limit"), "{status:?}");
    }
    // Real kas's key: prefix, SHA-256 of the token's first half, the minute as u16 LE.
    use sha2::Digest;
    let minute = ((now() / 60) % 60) as u16;
    let mut key = b"gitlab-kas:agent_limit:".to_vec();
    key.extend_from_slice(&sha2::Sha256::digest(&TOKEN.as_bytes()[..TOKEN.len() / 2]));
    key.push(b':');
    key.extend_from_slice(&minute.to_le_bytes());
    let mut redis = fleet.redis.client().await;
    let count: u64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("the minute's count");
    assert_eq!(count, 4);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("TTL");
    assert!((1..=59).contains(&ttl), "TTL {ttl}");
    assert!(metric(&fleet.metrics(0).await, "kas_token_limiter_refused_total") >= 1.0);
}

#[tokio::test]
async fn requests_waiting_for_an_absent_agent_share_one_redis_poller() {
    let fleet = Fleet::start_with(2, |c| {
        c.reverse_tunnel.routing_timeout = Duration::from_secs(2);
    })
    .await;
    const REQUESTS: usize = 30;
    let answers =
        futures_util::future::join_all((0..REQUESTS).map(|_| fleet.proxy_get(1, "/version"))).await;
    for (status, body) in &answers {
        assert_eq!(*status, 502, "{body}");
        assert!(body.contains("Agent connection not found"), "{body}");
    }
    // One poller for the agent on pod B: about one HSCAN per 50 ms of waiting (2 s: ~40),
    // where a poller per request would make ~1,200.
    let b = fleet.metrics(1).await;
    let lookups = metric(
        &b,
        "kas_redis_operations_total{op=\"tunnel_lookup\",result=\"ok\"}",
    );
    assert!((5.0..=150.0).contains(&lookups), "{lookups} lookups\n{b}");
    let mut redis = fleet.redis.client().await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis)
        .await
        .expect("INFO");
    let hscans: f64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_hscan:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("HSCAN calls in INFO commandstats");
    assert!(
        hscans <= 150.0,
        "Redis counted {hscans} HSCANs for {REQUESTS} waiting requests"
    );
    eprintln!("{REQUESTS} requests waiting 2 s for an absent agent: {hscans} HSCANs in Redis");
}

/// Without Redis (one pod, `kas dev`): GitLab's push event wakes this pod's pollers directly;
/// the GitLab stand-in sends it after every commit, as GitLab does.
#[tokio::test]
async fn without_redis_a_push_from_the_gitlab_stand_in_wakes_the_pod_itself() {
    use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
    use kas_proto::agent_configuration::ConfigurationRequest;
    let api = SocketAddr::new(
        kas_testkit::net::ip(kas_testkit::net::next_subnet(), 10),
        API_PORT,
    );
    let kas = common::Harness::start_with(move |c| {
        c.api.listen = Some(api);
        c.api.authentication_secret_file = c.gitlab.authentication_secret_file.clone();
        c.agent_configuration.poll_interval = Duration::from_secs(300);
    })
    .await;
    kas.gitlab.set_kas_apis(vec![api]);
    let mut stream = AgentConfigurationClient::new(kas.h2c_channel().await)
        .get_configuration(common::with_token(ConfigurationRequest::default(), TOKEN))
        .await
        .expect("GetConfiguration accepted")
        .into_inner();
    let first = tokio::time::timeout(RUN, stream.message())
        .await
        .expect("first configuration in time")
        .expect("stream ok")
        .expect("a configuration");
    kas.gitlab
        .write_agent_config(&kas.agent, "observability:\n  logging:\n    level: error\n")
        .expect("commit");
    let next = tokio::time::timeout(RUN, stream.message())
        .await
        .expect("the new configuration arrives long before the next poll")
        .expect("stream ok")
        .expect("a configuration");
    assert_ne!(next.commit_id, first.commit_id);
}

#[tokio::test]
async fn a_draining_pod_removes_its_tunnel_entries_at_once() {
    let mut fleet = Fleet::start(2).await;
    let _agent = fleet.agent_on(0).await;
    let pod_a = private_url(fleet.cluster.pods[0].addr);
    fleet.wait_tracked(std::slice::from_ref(&pod_a)).await;
    // Drain: readiness 503, then (with the listener) the tracker stops and unregisters —
    // long before the entry's 300 s TTL.
    fleet.cluster.pods[0].begin_shutdown();
    fleet.wait_tracked(&[]).await;
}

#[tokio::test]
async fn the_fleet_works_with_redis_over_tls() {
    let fleet = Fleet::start_on(RedisServer::start_tls().await, 2, |_| {}).await;
    let _agent = fleet.agent_on(0).await;
    fleet
        .wait_tracked(&[private_url(fleet.cluster.pods[0].addr)])
        .await;
    let o = fleet.kubectl(1).run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
    let b = fleet.metrics(1).await;
    assert!(metric(&b, TO_OTHER) >= 1.0, "{b}");
    assert_eq!(
        metric(
            &b,
            "kas_redis_operations_total{op=\"tunnel_lookup\",result=\"error\"}"
        ),
        0.0,
        "{b}"
    );
}

#[tokio::test]
async fn with_sentinel_the_fleet_follows_a_failover() {
    let master = RedisServer::start().await;
    let replica = RedisServer::start_replica_of(&master).await;
    let sentinel = RedisSentinel::start(&master, "kas-test").await;
    eventually("the sentinel knows the replica", RUN, || async {
        sentinel.replicas().await == 1
    })
    .await;
    let sentinel_addr = sentinel.addr.to_string();
    let mut fleet = Fleet::start_on(master, 2, move |c| {
        c.redis.address = None;
        c.redis.sentinel = Some(kas::config::SentinelConfig {
            master_name: "kas-test".into(),
            addresses: vec![sentinel_addr.clone()],
            password_file: None,
        });
    })
    .await;
    let _agent = fleet.agent_on(0).await;
    fleet
        .wait_tracked(&[private_url(fleet.cluster.pods[0].addr)])
        .await;
    let o = fleet.kubectl(1).run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));

    // The master dies; the sentinel promotes the replica; kas asks the sentinel again.
    fleet.redis.kill();
    eventually("the sentinel names the replica as master", RUN, || async {
        sentinel.master().await == Some(replica.addr)
    })
    .await;
    let registers_before = metric(
        &fleet.metrics(0).await,
        "kas_redis_operations_total{op=\"tunnel_register\",result=\"ok\"}",
    );
    eventually(
        "pod A writes its entries to the new master",
        RUN,
        || async {
            metric(
                &fleet.metrics(0).await,
                "kas_redis_operations_total{op=\"tunnel_register\",result=\"ok\"}",
            ) > registers_before
        },
    )
    .await;
    let mut new_master = replica.client().await;
    let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(tracker_key(fleet.cluster.agent.agent_id))
        .query_async(&mut new_master)
        .await
        .expect("HGETALL");
    assert_eq!(fields.len(), 1, "{fields:?}");
    // A pod that never asked the old master finds the agent through the new one.
    let o = fleet.kubectl(1).run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
}

#[tokio::test]
async fn the_private_api_works_over_tls_with_a_shared_server_name() {
    let certs = tempfile::tempdir().expect("temp dir");
    // One certificate for every pod, for the name they check each other for (pods are
    // dialled by IP): real kas's OWN_PRIVATE_API_HOST.
    let (cert, key) =
        kas_testkit::tls::self_signed_for(certs.path(), "private", &["kas-private.test".into()]);
    let fleet = Fleet::start_with(2, move |c| {
        c.private_api.certificate_file = Some(cert.clone());
        c.private_api.key_file = Some(key.clone());
        c.private_api.ca_certificate_file = Some(cert.clone());
        c.private_api.tls_server_name = Some("kas-private.test".into());
    })
    .await;
    let _agent = fleet.agent_on(0).await;
    let pod_a = fleet.cluster.pods[0].addr.ip();
    fleet
        .wait_tracked(&[format!("grpcs://{pod_a}:{PRIVATE_API_PORT}")])
        .await;
    let o = fleet.kubectl(1).run(&["get", "pods", "-A"], b"", RUN).await;
    assert!(o.status.success(), "{}", out(&o));
    assert!(metric(&fleet.metrics(1).await, TO_OTHER) >= 1.0);
}
