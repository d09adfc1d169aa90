//! The faults scenario, short (CI): the real `kas` and `kas-edge` binaries (debug builds,
//! as `cargo test --workspace` builds them), 200 agents, every fault once with windows of
//! a few seconds. Assertions are on outcomes — every agent back, every commit everywhere,
//! nothing lost outside the faults — never on how fast.

mod common;

use common::*;
use kas_loadtest::cli::FaultKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_faults_run_brings_every_agent_and_commit_back() {
    let edge = find_edge_binary().expect(
        "kas-edge binary not found: run the tests with `cargo test --workspace` (which builds \
         it) or point KAS_EDGE_BIN at it",
    );
    let kas = find_kas_binary().expect(
        "kas binary not found: run the tests with `cargo test --workspace` (which builds it) \
         or point KAS_BIN at it",
    );
    let (system, sources) = (
        kas_testkit::net::next_subnet(),
        kas_testkit::net::next_subnet(),
    );
    let dir = tempfile::tempdir().unwrap();
    let (json, html, markdown) = (
        dir.path().join("faults.json"),
        dir.path().join("faults.html"),
        dir.path().join("faults.md"),
    );
    let argv: Vec<String> = [
        "kas-loadtest",
        "--scenario",
        "faults",
        "--agents",
        "200",
        "--rate",
        "100",
        "--settle",
        "60s",
        "--kas-pods",
        "3",
        "--faults-ip-base",
        &ip(system, 1).to_string(),
        "--source-base",
        &ip(sources, 1).to_string(),
        "--kas-bin",
        kas.to_str().unwrap(),
        "--edge-bin",
        edge.to_str().unwrap(),
        "--faults-dir",
        dir.path().to_str().unwrap(),
        "--fault-window",
        "4s",
        "--fault-recovery",
        "5s",
        "--blocklist-edit-every",
        "1s",
        "--echo-interval",
        "1s",
        "--backoff-min",
        "200ms",
        "--backoff-max",
        "2s",
        "--k8s-rate",
        "20",
        "--sample-interval",
        "500ms",
        "--progress",
        "never",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args = <kas_loadtest::Args as clap::Parser>::try_parse_from(argv).unwrap();
    let report = kas_loadtest::run(args).await.unwrap();
    report.write_json(&json).unwrap();
    report.write_html(&html).unwrap();
    report.write_markdown(&markdown).unwrap();
    let table = report.summary_table();
    eprintln!("{table}");
    assert!(report.passed, "{table}");

    let faults = report.faults.as_ref().expect("a faults report");
    let kinds: Vec<&str> = faults.faults.iter().map(|f| f.kind.as_str()).collect();
    let all: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(kinds, all, "{table}");
    for f in &faults.faults {
        assert!(f.cost.back_within_budget && f.commits_missed == 0, "{f:?}");
        assert!(
            f.cost.requests_sent > 0,
            "no Kubernetes API request in {}: {f:?}",
            f.kind
        );
        assert!(f.end_s >= f.start_s && f.closed_s >= f.end_s, "{f:?}");
    }
    let fault = |kind: FaultKind| {
        faults
            .faults
            .iter()
            .find(|f| f.kind == kind.name())
            .unwrap()
    };
    // A killed pod and a rollout cut the agents on those pods; the edits cut nobody.
    assert!(
        fault(FaultKind::KillPod).cost.agents_disconnected > 0,
        "{table}"
    );
    assert!(
        fault(FaultKind::Rollout).cost.agents_disconnected > 0,
        "{table}"
    );
    assert_eq!(
        fault(FaultKind::Blocklist).cost.agents_disconnected,
        0,
        "{table}"
    );
    // Every fault committed a configuration of its own, and all of it reached everyone.
    let commits: std::collections::BTreeSet<_> = faults
        .faults
        .iter()
        .filter_map(|f| f.commit.clone())
        .collect();
    assert_eq!(commits.len(), faults.faults.len(), "{table}");
    assert_eq!(faults.agents_on_latest_commit, 200, "{table}");
    assert!(commits.contains(&faults.latest_commit));
    // The processes were sampled all along: the pods (never all down at once) and the
    // edge (but in the moment between two edges, when restarted by stop and start).
    assert!(faults.timeline.len() > 10);
    assert!(faults.timeline.iter().all(|s| s.kas_rss_bytes > 0));
    let edgeless = faults
        .timeline
        .iter()
        .filter(|s| s.edge_rss_bytes == 0)
        .count();
    assert!(edgeless <= 4, "{edgeless} samples without an edge");

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<h2>Faults</h2>") && page.contains("1 kill-pod"));
    assert!(page.matches("<svg").count() >= 4, "charts missing");
    assert!(
        !page.contains("<script") && !page.contains("src=\"http"),
        "the page must open offline"
    );
    let md = std::fs::read_to_string(&markdown).unwrap();
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| ")).count(),
        1 + 7,
        "{md}"
    );
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["faults"]["faults"].as_array().map(Vec::len), Some(7));
}
