//! The Kubernetes API stand-in on odd input and raw upgrades, over real sockets: errors are
//! `Status` answers (never a panic or a hang), an upgrade it does not serve gets a non-101
//! answer, `/upgrade-echo` carries raw bytes both ways after its 101, and ConfigMaps keep
//! resourceVersions (409 on a stale update, watches that resume).

use kas_testkit::clients::read_http_head;
use kas_testkit::kube_api::KubeApi;
use kas_testkit::net::LOCALHOST_ANY_PORT;
use kas_testkit::wait::STEP;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn request(
    kube: &KubeApi,
    method: reqwest::Method,
    path: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let response = reqwest::Client::new()
        .request(method, format!("{}{path}", kube.url()))
        .body(body)
        .timeout(STEP)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn odd_requests_get_status_errors() {
    let kube = KubeApi::start(LOCALHOST_ANY_PORT).await.unwrap();
    let post = reqwest::Method::POST;
    let cms = "/api/v1/namespaces/default/configmaps";
    for (method, path, body, code) in [
        (post.clone(), cms, b"{not json".to_vec(), 400),
        (post.clone(), cms, br#"{"metadata":{}}"#.to_vec(), 422),
        (post.clone(), cms, vec![b' '; (1 << 20) + 1], 413),
        (
            reqwest::Method::GET,
            "/api/v1/namespaces/default/pods/nope",
            vec![],
            404,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/namespaces/default/pods/nope/log",
            vec![],
            404,
        ),
        (reqwest::Method::GET, "/no/such/%zz/thing", vec![], 404),
        (reqwest::Method::PUT, "/version", vec![], 404),
    ] {
        let (status, text) = request(&kube, method, path, body).await;
        assert_eq!(status, code, "{path}: {text}");
        assert!(text.contains("\"kind\":\"Status\""), "{text}");
    }
    // Still serving.
    assert_eq!(
        request(&kube, reqwest::Method::GET, "/version", vec![])
            .await
            .0,
        200
    );
}

async fn upgrade(kube: &KubeApi, path: &str, protocol: &str) -> (String, TcpStream) {
    let mut sock = TcpStream::connect(kube.addr()).await.unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: kube\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(STEP, read_http_head(&mut sock))
        .await
        .unwrap()
        .unwrap();
    (String::from_utf8_lossy(&answer).into_owned(), sock)
}

#[tokio::test]
async fn upgrades_echo_or_are_refused_without_101() {
    let kube = KubeApi::start(LOCALHOST_ANY_PORT).await.unwrap();
    // SPDY to exec: not served, a plain answer.
    let (head, _) = upgrade(
        &kube,
        "/api/v1/namespaces/default/pods/web-0/exec?command=ls",
        "SPDY/3.1",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Any protocol to the echo: 101, then the bytes come back.
    let (head, mut sock) = upgrade(&kube, "/upgrade-echo", "SPDY/3.1").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: spdy/3.1"),
        "{head}"
    );
    sock.write_all(b"raw bytes both ways").await.unwrap();
    let mut buf = [0u8; 19];
    tokio::time::timeout(STEP, sock.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"raw bytes both ways");
    sock.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(STEP, sock.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the echo ends with its client");
    let recorded = kube.last_request("/upgrade-echo").unwrap();
    assert_eq!(recorded.header("upgrade"), Some("SPDY/3.1"));
}

/// ConfigMaps keep resourceVersions as the API server does: a stale update is refused with
/// 409, and a watch from a version replays only what came after it, in order.
#[tokio::test]
async fn configmaps_refuse_stale_updates_and_watches_resume_after_a_version() {
    let kube = KubeApi::start(LOCALHOST_ANY_PORT).await.unwrap();
    let first = kube.put_configmap("kas", "list", &[("k", "one")]);
    let second = kube.put_configmap("kas", "list", &[("k", "two")]);
    assert!(
        first.parse::<u64>().unwrap() < second.parse::<u64>().unwrap(),
        "{first} then {second}"
    );
    let path = "/api/v1/namespaces/kas/configmaps/list";
    let update = |version: &str, value: &str| {
        format!(
            r#"{{"metadata":{{"name":"list","resourceVersion":"{version}"}},"data":{{"k":"{value}"}}}}"#
        )
        .into_bytes()
    };
    let (status, text) = request(&kube, reqwest::Method::PUT, path, update(&first, "stale")).await;
    assert_eq!(status, 409, "{text}");
    assert_eq!(
        kube.configmap_value("kas", "list", "k").as_deref(),
        Some("two")
    );
    let (status, text) = request(&kube, reqwest::Method::PUT, path, update(&second, "three")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(kube.configmap_counts().conflicts, 1);
    assert_eq!(kube.configmap_counts().updates, 1);

    // From the first version: the two later changes, then nothing more until the timeout.
    let watch = format!(
        "{}/api/v1/namespaces/kas/configmaps?watch=true&resourceVersion={first}&timeoutSeconds=1",
        kube.url()
    );
    let events = reqwest::Client::new()
        .get(watch)
        .timeout(STEP)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let values: Vec<String> = events
        .lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(event["type"], "MODIFIED", "{line}");
            event["object"]["data"]["k"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(values, ["two", "three"]);
}
