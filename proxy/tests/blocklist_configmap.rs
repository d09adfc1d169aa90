//! The blocklist in a ConfigMap, watched through the Kubernetes API: real `kas-edge`
//! replicas against the Kubernetes API stand-in (`kas_testkit::kube_api`), edited with the
//! real `kas-edge block` command. Every replica takes an update and cuts the newly blocked
//! client's open tunnel; a watch cut mid-stream or an API outage does not leave a replica
//! on an old list; a bad edit is rejected everywhere with the last good list kept;
//! concurrent `block` commands all land.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use common::*;
use kas_edge::policy::blocklist::content_digest;
use kas_proto::diagnostics::PingRequest;
use kas_testkit::kube_api::KubeApi;
use kas_testkit::kubectl::kubeconfig_file;
use tempfile::TempPath;

const NS: &str = "kas";
const NAME: &str = "kas-edge-blocklist";
const KEY: &str = "blocklist.txt";
const WATCH_UP: &str = "edge_blocklist_watch_up{configmap=\"kas/kas-edge-blocklist\"}";

/// kas pods, the API stand-in with the blocklist ConfigMap holding `initial`, and `n` edge
/// replicas watching it.
struct Replicas {
    api: KubeApi,
    /// The stand-in's kubeconfig, which the replicas and `kas-edge block` use.
    kubeconfig: TempPath,
    edges: Vec<Edge>,
    cluster: Cluster,
}

impl Replicas {
    async fn start(n: u8, initial: &str) -> Self {
        let cluster = Cluster::start(1).await;
        let (api, kubeconfig) = start_api(ip(cluster.subnet, 240)).await;
        api.put_configmap(NS, NAME, &[(KEY, initial)]);
        let extra = format!(
            "[policies.blocklist_configmap]\nnamespace = \"{NS}\"\nname = \"{NAME}\"\n\
             kubeconfig = {:?}\n",
            &*kubeconfig
        );
        let mut edges = Vec::new();
        for i in 0..n {
            let host = ip(cluster.subnet, 250 + i);
            edges.push(Edge::start_at(host, &cluster.endpoints(), &extra).await);
        }
        for edge in &edges {
            edge.wait_healthy(1).await;
        }
        Self {
            api,
            kubeconfig,
            edges,
            cluster,
        }
    }

    fn client(&self, host: u8) -> IpAddr {
        ip(self.cluster.subnet, host)
    }

    /// The hash of the ConfigMap's value now, as the replicas should show it.
    fn expected_hash(&self) -> f64 {
        let text = self.api.configmap_value(NS, NAME, KEY).unwrap_or_default();
        content_digest(text.as_bytes()) as f64
    }

    /// Waits until every replica refuses (or, with `blocked = false`, admits) `client`.
    async fn wait_all(&self, client: IpAddr, blocked: bool) {
        for (i, edge) in self.edges.iter().enumerate() {
            eventually(
                &format!("replica {i}: {client} blocked = {blocked}"),
                STEP,
                || async move { tls_from(edge, client).await.is_err() == blocked },
            )
            .await;
        }
    }

    /// Waits until every replica's `edge_blocklist_content_hash{source="configmap"}` is
    /// that of the ConfigMap's value.
    async fn wait_in_step(&self) {
        let want = self.expected_hash();
        for (i, edge) in self.edges.iter().enumerate() {
            eventually(
                &format!("replica {i} on hash {want}"),
                STEP,
                || async move { configmap_hash(&edge.metrics().await) == want },
            )
            .await;
        }
    }
}

/// Waits until the edge's `edge_blocklist_watch_up` for the ConfigMap is `value`.
async fn wait_watch_up(edge: &Edge, value: f64) {
    eventually(&format!("{WATCH_UP} {value}"), STEP, || async {
        metric_value(&edge.metrics().await, WATCH_UP) == Some(value)
    })
    .await;
}

fn configmap_hash(metrics: &str) -> f64 {
    metric(metrics, "edge_blocklist_content_hash{source=\"configmap\"}")
}

/// Runs `kas-edge ARGS… --kubeconfig <stand-in>` to completion; its exit status and output.
async fn kas_edge(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kas-edge"));
    command.args(args).arg("--kubeconfig").arg(kubeconfig);
    let output = tokio::time::timeout(STEP, command.output())
        .await
        .expect("kas-edge finished within a step")
        .expect("kas-edge runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

const CONFIGMAP: &str = "kas/kas-edge-blocklist";

/// Waits (a step at most) for a line of `edge`'s log that holds every one of `parts`: the
/// edge writes its log from a thread of its own, so a line may land a little after the
/// event the test already saw.
async fn wait_for_log_line(edge: &Edge, parts: &[&str], what: &str) {
    eventually(what, STEP, || async {
        edge.log()
            .lines()
            .any(|line| parts.iter().all(|part| line.contains(part)))
    })
    .await;
}

/// The Kubernetes API stand-in on `host` (a port the system picks) and a kubeconfig for it.
async fn start_api(host: IpAddr) -> (KubeApi, TempPath) {
    let api = KubeApi::start((host, 0).into()).await.unwrap();
    let kubeconfig = kubeconfig_file(&api.url());
    (api, kubeconfig)
}

async fn block(kubeconfig: &Path, address: &str, reason: &str) -> String {
    let (ok, out) = kas_edge(
        kubeconfig,
        &[
            "block",
            address,
            "--reason",
            reason,
            "--configmap",
            CONFIGMAP,
        ],
    )
    .await;
    assert!(ok, "kas-edge block {address} failed: {out}");
    out
}

#[tokio::test]
async fn a_block_reaches_every_replica_and_cuts_the_clients_tunnel_on_each() {
    let replicas = Replicas::start(3, "# incident blocks\n").await;
    let (victim, bystander) = (replicas.client(66), replicas.client(67));
    replicas.wait_in_step().await;
    let mut victims = Vec::new();
    let mut bystanders = Vec::new();
    for edge in &replicas.edges {
        victims.push(tunnel(edge, victim).await);
        bystanders.push(tunnel(edge, bystander).await);
    }

    let started = Instant::now();
    let out = block(
        &replicas.kubeconfig,
        &victim.to_string(),
        "INC-22 credential stuffing",
    )
    .await;
    assert!(
        out.contains(&format!(
            "blocked {victim} in ConfigMap kas/kas-edge-blocklist"
        )),
        "{out}"
    );
    for (i, tunnel) in victims.iter_mut().enumerate() {
        let took = cut_after(tunnel, started, &format!("replica {i}")).await;
        println!("replica {i}: the blocked client's tunnel closed {took:?} after `kas-edge block` started");
    }
    replicas.wait_all(victim, true).await;
    for (i, (edge, bystander_tunnel)) in replicas.edges.iter().zip(&mut bystanders).enumerate() {
        bystander_tunnel
            .ping(with_token(PingRequest::default()))
            .await
            .unwrap_or_else(|e| panic!("replica {i}: another client's tunnel was cut: {e}"));
        assert!(ping_from(edge, bystander).await.is_ok(), "replica {i}");
        let metrics = edge.metrics().await;
        assert!(
            metric(&metrics, "edge_policy_closed_connections_total") >= 1.0,
            "replica {i}"
        );
        assert!(
            metric(
                &metrics,
                "edge_policy_reloads_total{file=\"blocklist\",result=\"ok\"}"
            ) >= 2.0
        );
        assert_eq!(
            metric_value(&metrics, "edge_blocklist_entries"),
            Some(1.0),
            "replica {i}"
        );
        assert_eq!(metric_value(&metrics, WATCH_UP), Some(1.0), "replica {i}");
        let victim_tunnel = format!("\"client\":\"{victim}\"");
        wait_for_log_line(
            edge,
            &[&victim_tunnel, "\"tunnel_end\":\"closed_by_edge\""],
            &format!("replica {i}: an access line for the cut tunnel"),
        )
        .await;
    }
    replicas.wait_in_step().await;

    // The list as written: the reason with who and when, then the entry.
    let text = replicas.api.configmap_value(NS, NAME, KEY).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[1].starts_with("# kas-edge block ")
            && lines[1].ends_with(": INC-22 credential stuffing"),
        "{text}"
    );
    assert_eq!(lines[2], format!("{victim}  # INC-22 credential stuffing"));
    // `blocklist show` prints the same hash the replicas export.
    let (ok, shown) = kas_edge(
        &replicas.kubeconfig,
        &["blocklist", "show", "--configmap", CONFIGMAP],
    )
    .await;
    assert!(ok, "{shown}");
    let hash = replicas.expected_hash();
    assert!(
        shown.contains(&format!("edge_blocklist_content_hash {hash}\n")),
        "{shown}"
    );
    assert!(shown.contains("1 entry,"), "{shown}");

    // And back: unblock admits it again everywhere.
    let (ok, out) = kas_edge(
        &replicas.kubeconfig,
        &["unblock", &victim.to_string(), "--configmap", CONFIGMAP],
    )
    .await;
    assert!(ok && out.contains(&format!("unblocked {victim}")), "{out}");
    assert_eq!(
        replicas.api.configmap_value(NS, NAME, KEY).unwrap(),
        "# incident blocks\n"
    );
    replicas.wait_all(victim, false).await;
    replicas.wait_in_step().await;
}

#[tokio::test]
async fn an_edge_is_not_ready_before_it_has_read_the_configmap() {
    let cluster = Cluster::start(1).await;
    let (api, kubeconfig) = start_api(ip(cluster.subnet, 240)).await;
    api.put_configmap(NS, NAME, &[(KEY, "192.0.2.1\n")]);
    api.set_outage(true);
    let extra = format!(
        "[policies.blocklist_configmap]\nnamespace = \"{NS}\"\nname = \"{NAME}\"\n\
         kubeconfig = {:?}\n",
        &*kubeconfig
    );
    let host = ip(cluster.subnet, 250);
    let admin = std::net::SocketAddr::new(host, 8081);
    let endpoints = cluster.endpoints();
    let starting = Edge::start_at(host, &endpoints, &extra);
    let api = &api;
    let check = async move {
        eventually("/readyz says what it waits for", STEP, || async {
            http_get(admin, "/readyz").await.is_some_and(|(code, body)| {
                code == 503
                    && body.contains("waiting for the first blocklist ConfigMap kas/kas-edge-blocklist result")
                    && body.contains("503")
            })
        })
        .await;
        api.set_outage(false);
    };
    let (edge, ()) = tokio::join!(starting, check);
    assert!(tls_from(&edge, ip(cluster.subnet, 66)).await.is_ok());
    assert_eq!(
        configmap_hash(&edge.metrics().await),
        content_digest(b"192.0.2.1\n") as f64
    );
}

#[tokio::test]
async fn a_cut_watch_and_an_api_outage_do_not_leave_a_replica_on_an_old_list() {
    let replicas = Replicas::start(2, "").await;
    let api = &replicas.api;
    let (first, second) = (replicas.client(66), replicas.client(68));
    let watching = || async {
        eventually("a watch per replica", STEP, || async {
            api.configmap_counts().open_watches >= replicas.edges.len()
        })
        .await
    };
    watching().await;

    // Every watch connection cut mid-stream, and a change right after: each replica lists
    // again and applies it.
    let lists = api.configmap_counts().lists;
    assert_eq!(api.drop_configmap_watches(), 2);
    api.put_configmap(NS, NAME, &[(KEY, &format!("{first}\n"))]);
    replicas.wait_all(first, true).await;
    replicas.wait_in_step().await;
    assert!(
        api.configmap_counts().lists >= lists + 2,
        "every replica relisted after its watch was cut: {:?}",
        api.configmap_counts()
    );
    watching().await;

    // The API away, a change made meanwhile: the replicas keep their list and stay ready,
    // say the watch is down, and take the change as soon as the API answers again.
    api.set_outage(true);
    api.put_configmap(NS, NAME, &[(KEY, &format!("{first}\n{second}\n"))]);
    for edge in &replicas.edges {
        wait_watch_up(edge, 0.0).await;
        assert!(
            tls_from(edge, first).await.is_err(),
            "the last list stays in force"
        );
        assert!(
            tls_from(edge, second).await.is_ok(),
            "nothing could tell it about the change"
        );
        assert!(matches!(
            http_get(edge.admin, "/readyz").await,
            Some((200, _))
        ));
        assert!(
            metric(
                &edge.metrics().await,
                "edge_blocklist_watch_errors_total{configmap=\"kas/kas-edge-blocklist\"}"
            ) >= 1.0
        );
    }
    api.set_outage(false);
    replicas.wait_all(second, true).await;
    replicas.wait_in_step().await;
    for edge in &replicas.edges {
        wait_watch_up(edge, 1.0).await;
    }
    // The watches ask for bookmarks, and a watch that got some still applies the next change.
    watching().await;
    eventually("a bookmark on the open watches", STEP, || async {
        api.configmap_counts().bookmarks >= replicas.edges.len()
    })
    .await;
    let third = replicas.client(70);
    api.put_configmap(NS, NAME, &[(KEY, &format!("{first}\n{second}\n{third}\n"))]);
    replicas.wait_all(third, true).await;
}

#[tokio::test]
async fn an_invalid_edit_is_rejected_on_every_replica_and_the_last_good_list_stays() {
    let replicas = Replicas::start(2, "").await;
    let (blocked, added) = (replicas.client(66), replicas.client(69));
    replicas
        .api
        .put_configmap(NS, NAME, &[(KEY, &format!("{blocked}  # INC-1\n"))]);
    replicas.wait_all(blocked, true).await;
    replicas.wait_in_step().await;
    let good_hash = replicas.expected_hash();

    // As `kubectl edit` could leave it: one good new line, one bad.
    replicas.api.put_configmap(
        NS,
        NAME,
        &[(KEY, &format!("# new version\n{added}\n10.0.0.300\n"))],
    );
    for (i, edge) in replicas.edges.iter().enumerate() {
        eventually(&format!("replica {i} rejects the edit"), STEP, || async {
            let m = edge.metrics().await;
            metric(&m, "edge_blocklist_reload_errors_total") >= 1.0
                && metric(
                    &m,
                    "edge_policy_reloads_total{file=\"blocklist\",result=\"error\"}",
                ) >= 1.0
        })
        .await;
        assert!(
            tls_from(edge, blocked).await.is_err(),
            "replica {i}: the old list is enforced"
        );
        assert!(
            tls_from(edge, added).await.is_ok(),
            "replica {i}: nothing of the bad edit is"
        );
        assert_eq!(
            configmap_hash(&edge.metrics().await),
            good_hash,
            "replica {i}"
        );
        wait_for_log_line(
            edge,
            &["configmap:kas/kas-edge-blocklist/blocklist.txt:3: \\\"10.0.0.300\\\" is not an IP address or CIDR"],
            &format!("replica {i}: the log names the ConfigMap key and line"),
        )
        .await;
    }
    // `block` refuses to build on a list that does not parse.
    let (ok, out) = kas_edge(
        &replicas.kubeconfig,
        &[
            "block",
            "192.0.2.1",
            "--reason",
            "x",
            "--configmap",
            CONFIGMAP,
        ],
    )
    .await;
    assert!(!ok && out.contains("fix it first"), "{out}");

    // Fixed: applied everywhere.
    replicas
        .api
        .put_configmap(NS, NAME, &[(KEY, &format!("# new version\n{added}\n"))]);
    replicas.wait_all(added, true).await;
    replicas.wait_all(blocked, false).await;
    replicas.wait_in_step().await;
}

#[tokio::test]
async fn concurrent_blocks_all_land_in_the_configmap_and_in_a_file() {
    let subnet = next_subnet();
    let (api, kubeconfig) = start_api(ip(subnet, 240)).await;
    api.put_configmap(NS, NAME, &[(KEY, "# incident blocks\n")]);
    // All three read the same resourceVersion: two updates are refused and made again.
    api.gather_configmap_gets(3);
    let addresses = ["192.0.2.10", "192.0.2.11", "2001:db8::/48"];
    let runs = addresses
        .iter()
        .map(|a| block(&kubeconfig, a, "INC-22 concurrent"));
    futures_util::future::join_all(runs).await;
    let text = api.configmap_value(NS, NAME, KEY).unwrap();
    let list = kas_edge::policy::blocklist::Blocklist::parse("cm", &text).unwrap();
    assert_eq!(list.len(), 3, "{text}");
    for a in ["192.0.2.10", "192.0.2.11", "2001:db8::1"] {
        assert!(
            list.check(a.parse().unwrap()).is_deny(),
            "{a} lost:\n{text}"
        );
    }
    assert!(
        api.configmap_counts().conflicts >= 2,
        "the writers collided: {:?}",
        api.configmap_counts()
    );
    assert_eq!(api.configmap_counts().updates, 3);

    // The same against a plain file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blocklist.txt");
    std::fs::write(&file, "# blocks\n").unwrap();
    let path = file.to_str().unwrap();
    let kubeconfig = &kubeconfig;
    let runs = addresses.iter().map(|a| async move {
        let (ok, out) = kas_edge(
            kubeconfig,
            &["block", a, "--reason", "INC-22", "--file", path],
        )
        .await;
        assert!(ok, "{out}");
    });
    futures_util::future::join_all(runs).await;
    let text = std::fs::read_to_string(&file).unwrap();
    let list = kas_edge::policy::blocklist::Blocklist::parse("file", &text).unwrap();
    assert_eq!(list.len(), 3, "{text}");
}
