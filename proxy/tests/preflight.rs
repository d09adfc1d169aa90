//! Bad configuration is caught before serving: `kas-edge check` and `kas-edge run` stop
//! on each bad setting with the same message, and a discovery source that cannot produce
//! a first result at run time keeps the edge unready (`/readyz` 503), says why in the log
//! and shows it in `edge_discovery_up` / `edge_discovery_errors_total`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{eventually, http_get, ip, metric_value, next_subnet};
use kas_edge::listener::tls::certs::write_self_signed;

fn kas_edge(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kas-edge"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "off")
        // The Kubernetes cases must not depend on where the tests run.
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("kas-edge runs")
}

/// The `kas-edge: ...` error line of a failed command.
fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "expected failure: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr
        .lines()
        .find(|l| l.starts_with("kas-edge: "))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"))
        .to_owned()
}

const LISTEN: &str =
    "[listen]\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n";
const SELF_SIGNED: &str = "[tls]\nself_signed = true\n";
const STATIC: &str = "[discovery]\nkind = \"static\"\nendpoints = [\"127.0.0.1:8150\"]\n";

#[test]
fn check_and_run_reject_each_bad_setting_with_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_self_signed(&dir.path().join("a"), &["kas.a.test".into()]).unwrap();
    let b = write_self_signed(&dir.path().join("b"), &["kas.b.test".into()]).unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let bad_blocklist = dir.path().join("blocklist.txt");
    std::fs::write(&bad_blocklist, "203.0.113.7\n10.1.2.3/8\n").unwrap();
    let (garbage_cert, garbage_key) = (
        dir.path().join("garbage.crt"),
        dir.path().join("garbage.key"),
    );
    std::fs::write(&garbage_cert, "not a certificate\n").unwrap();
    std::fs::write(&garbage_key, "not a key\n").unwrap();
    let acme = |extra: &str| {
        format!(
            "{LISTEN}[tls.acme]\ndomains = [\"kas.example.test\"]\ncache_dir = {:?}\n{extra}{STATIC}",
            dir.path().join("acme")
        )
    };
    let k8s =
        |lines: &str| format!("{LISTEN}{SELF_SIGNED}[discovery]\nkind = \"kubernetes\"\n{lines}");
    let dns = |lines: &str| format!("{LISTEN}{SELF_SIGNED}[discovery]\nkind = \"dns\"\n{lines}");
    let cases: Vec<(String, Vec<&str>)> = vec![
        // No certificate source: an error, never a silent self-signed certificate.
        (format!("{LISTEN}{STATIC}"), vec!["tls.certificates"]),
        (
            format!(
                "{LISTEN}[tls]\nself_signed = true\n[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n{STATIC}",
                a.cert, a.key
            ),
            vec!["tls.self_signed"],
        ),
        (
            format!("{LISTEN}[tls]\nself_signed = true\nhosts = [\"kas.\u{e9}xample\"]\n{STATIC}"),
            vec!["tls.hosts"],
        ),
        (
            format!("{LISTEN}[tls]\nself_signed = true\nself_signed_dir = {:?}\n{STATIC}", not_a_dir.join("tls")),
            vec!["tls.self_signed_dir"],
        ),
        // Certificate files: a key that belongs to another certificate, a missing key.
        (
            format!(
                "{LISTEN}[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n{STATIC}",
                a.cert, b.key
            ),
            vec!["does not belong", "tls.crt"],
        ),
        (
            format!(
                "{LISTEN}[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n{STATIC}",
                a.cert,
                dir.path().join("missing.key")
            ),
            vec!["missing.key"],
        ),
        // ACME: names HTTP-01 cannot validate, directory URLs that are not https URLs.
        (acme("domains = [\"*.example.test\"]\n").replace("domains = [\"kas.example.test\"]\n", ""), vec!["tls.acme", "wildcard"]),
        (acme("directory = \"http://ca.example.test/dir\"\n"), vec!["tls.acme", "directory"]),
        (acme("directory = \"https://\"\n"), vec!["tls.acme", "directory"]),
        (acme("contact = [\"ops@example.test\"]\n"), vec!["tls.acme", "mailto"]),
        // Discovery: names Kubernetes or DNS could never accept.
        (k8s("service = \"kas_svc\"\n"), vec!["discovery.service"]),
        (k8s("service = \"kas\"\nnamespace = \"Kas\"\n"), vec!["discovery.namespace"]),
        (k8s("service = \"kas\"\nnamespace = \"kas\"\nport_name = \"agent port\"\n"), vec!["discovery.port_name"]),
        (k8s("service = \"kas\"\nnamespace = \"kas\"\nport = 0\n"), vec!["discovery.port"]),
        // A valid Kubernetes source outside a cluster: no credentials.
        (k8s("service = \"kas\"\nnamespace = \"kas\"\n"), vec!["KUBERNETES_SERVICE_HOST", "not running inside a Kubernetes pod"]),
        (dns("name = \"kas.svc:8150\"\nport = 8150\n"), vec!["discovery.name", "discovery.port"]),
        (dns("name = \"kas..svc\"\nport = 8150\n"), vec!["discovery.name"]),
        (dns("name = \"kas.svc\"\nport = 0\n"), vec!["discovery.port"]),
        (
            format!("{LISTEN}{SELF_SIGNED}[discovery]\nkind = \"static\"\nendpoints = [\"0.0.0.0:8150\"]\n"),
            vec!["discovery.endpoints"],
        ),
        // Policy files are loaded by check exactly as run loads them.
        (
            format!("{LISTEN}{SELF_SIGNED}{STATIC}[policies]\nblocklist = {bad_blocklist:?}\n"),
            vec!["blocklist.txt:2", "host bits"],
        ),
        (
            format!(
                "{LISTEN}[[tls.certificates]]\ncert = {garbage_cert:?}\nkey = {garbage_key:?}\n{STATIC}"
            ),
            vec!["garbage.crt"],
        ),
        (
            format!(
                "{LISTEN}[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n{STATIC}",
                dir.path().join("missing.crt"),
                a.key
            ),
            vec!["missing.crt"],
        ),
        (
            format!("{LISTEN}{SELF_SIGNED}{STATIC}[health]\ntimeout = \"9s\"\n"),
            vec!["health.timeout"],
        ),
        // Trusted PROXY-protocol ranges and the :80 listener's limits.
        (
            format!("{LISTEN}{SELF_SIGNED}{STATIC}[proxy_protocol]\ntrusted = [\"10.0.0.0/33\"]\n"),
            vec!["proxy_protocol.trusted"],
        ),
        (
            format!("{LISTEN}{SELF_SIGNED}{STATIC}[public_http]\nmax_connections = 0\n"),
            vec!["public_http.max_connections"],
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("edge-{i}.toml"));
        std::fs::write(&config, text).unwrap();
        let check = error_line(&kas_edge(&["check"], &config));
        let run = error_line(&kas_edge(&["run"], &config));
        assert_eq!(check, run, "check and run disagree for\n{text}");
        for word in expected {
            assert!(check.contains(word), "{check}\nfor\n{text}");
        }
    }

    // And the good twins of those settings pass.
    for text in [
        format!("{LISTEN}{SELF_SIGNED}{STATIC}"),
        format!(
            "{LISTEN}[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n{STATIC}",
            a.cert, a.key
        ),
        acme(""),
        dns("name = \"kas.gitlab.svc.cluster.local.\"\nport = 8150\n"),
    ] {
        let config = dir.path().join("good.toml");
        std::fs::write(&config, &text).unwrap();
        let out = kas_edge(&["check"], &config);
        assert!(out.status.success(), "{text}\n{out:?}");
    }
}

/// The `kas-edge` binary with a configuration of our own (the common fixture waits for
/// readiness, which is what these tests expect not to come).
struct Edge {
    admin: SocketAddr,
    log_file: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Edge {
    fn start(discovery: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = ip(next_subnet(), 250);
        let admin = SocketAddr::new(host, 8081);
        let config = dir.path().join("edge.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nhttps = \"{}\"\nhttp = \"{}\"\nadmin = \"{admin}\"\n\
                 [tls]\nself_signed = true\nself_signed_dir = {:?}\n{discovery}",
                SocketAddr::new(host, 8443),
                SocketAddr::new(host, 8080),
                dir.path().join("tls"),
            ),
        )
        .unwrap();
        let log_file = dir.path().join("edge.log");
        let child = Command::new(env!("CARGO_BIN_EXE_kas-edge"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log_file).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self {
            admin,
            log_file,
            child,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn check_reports_what_it_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let blocklist = dir.path().join("blocklist.txt");
    std::fs::write(&blocklist, "203.0.113.7\n").unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!("{LISTEN}{SELF_SIGNED}{STATIC}[policies]\nblocklist = {blocklist:?}\n"),
    )
    .unwrap();
    let output = kas_edge(&["check"], &config);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(stdout.contains("1 entries"), "{stdout}");
}

#[tokio::test]
async fn a_dns_name_that_never_resolves_keeps_the_edge_unready() {
    // `.invalid` never resolves (RFC 6761).
    let edge = Edge::start(
        "[discovery]\nkind = \"dns\"\nname = \"kas.invalid\"\nport = 8150\ninterval = \"200ms\"\n",
    );
    let admin = edge.admin;
    eventually("admin port up", Duration::from_secs(30), || async move {
        http_get(admin, "/healthz").await.is_some()
    })
    .await;
    // Long enough for the TLS listener to accept and several lookups to fail.
    eventually(
        "failed lookups counted",
        Duration::from_secs(30),
        || async move {
            let m = http_get(admin, "/metrics")
                .await
                .map(|r| r.1)
                .unwrap_or_default();
            metric_value(&m, "edge_discovery_errors_total").is_some_and(|n| n >= 3.0)
        },
    )
    .await;
    for _ in 0..10 {
        let (status, body) = http_get(admin, "/readyz").await.unwrap();
        assert_eq!(status, 503, "ready with no discovery result: {body}");
        assert!(body.contains("kas.invalid"), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = http_get(admin, "/metrics").await.unwrap().1;
    assert_eq!(metric_value(&m, "edge_discovery_up"), Some(0.0), "{m}");
    assert_eq!(metric_value(&m, "edge_ready"), Some(0.0), "{m}");
    let log = edge.log();
    assert!(
        log.lines()
            .any(|l| l.contains("DNS discovery failed") && l.contains("kas.invalid")),
        "no log line says why:\n{log}"
    );
}

#[tokio::test]
async fn a_dns_name_that_resolves_makes_the_edge_ready_even_without_pods() {
    // The same edge with a name that resolves (nothing listens there): ready, since
    // readiness reflects the edge, not kas.
    let edge = Edge::start(
        "[discovery]\nkind = \"dns\"\nname = \"localhost\"\nport = 8150\ninterval = \"200ms\"\n\
         [health]\nport = 1\n",
    );
    let admin = edge.admin;
    eventually("edge ready", Duration::from_secs(30), || async move {
        matches!(http_get(admin, "/readyz").await, Some((200, _)))
    })
    .await;
    let m = http_get(admin, "/metrics").await.unwrap().1;
    assert_eq!(metric_value(&m, "edge_discovery_up"), Some(1.0), "{m}");
    assert_eq!(metric_value(&m, "edge_ready"), Some(1.0), "{m}");
    let pods: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("edge_upstream_healthy{"))
        .collect();
    assert!(!pods.is_empty(), "discovery found localhost: {m}");
    assert!(pods.iter().all(|l| l.ends_with(" 0")), "{pods:?}");
}
