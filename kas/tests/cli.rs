//! The `kas` binary as operators run it: configuration errors name the field, SIGTERM
//! drains and exits 0.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kas() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kas"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn bad_configuration_exits_non_zero_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kas.toml");
    let cases = [
        (
            "[gitlab]\naddress = \"https://gitlab.example.com\"\nauth_cache_tll = \"5m\"\n",
            "auth_cache_tll",
        ),
        ("[agent]\nlisten = \"not an address\"\n", "listen"),
        (
            "[gitlab]\naddress = \"gitlab.example.com\"\n",
            "gitlab.address",
        ),
        (
            "[gitlab]\naddress = \"https://gitlab.example.com\"\n",
            "gitlab.authentication_secret_file",
        ),
        // The REST configuration source without an API token: refused with the reason.
        (
            "[gitlab]\naddress = \"https://gitlab.example.com\"\nauthentication_secret_file = \"/s\"\n\
             [agent_configuration]\nsource = \"gitlab_api\"\n",
            "agent_configuration.api_token_file",
        ),
    ];
    for (text, field) in cases {
        std::fs::write(&path, text).unwrap();
        for args in [vec!["check", "--config"], vec!["--config"]] {
            let out = kas().args(&args).arg(&path).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{text} accepted");
            assert!(stderr.contains(field), "{field} not named in: {stderr}");
        }
    }
    // A secret that does not decode to 32 bytes is named too.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "c2hvcnQ=").unwrap();
    std::fs::write(
        &path,
        format!(
            "[gitlab]\naddress = \"http://127.0.0.1:1\"\nauthentication_secret_file = {:?}\n",
            secret
        ),
    )
    .unwrap();
    let out = kas()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("32"), "{stderr}");
}

#[test]
fn sigterm_turns_readiness_off_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, kas::gitlab::SharedSecret::generate().to_base64()).unwrap();
    let (agent, obs) = (free_port(), free_port());
    let path = dir.path().join("kas.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{agent}\"\n[observability]\nlisten = \"127.0.0.1:{obs}\"\n\
             [gitlab]\naddress = \"http://127.0.0.1:1\"\nauthentication_secret_file = {secret:?}\n\
             [shutdown]\nreadiness_delay = \"1s\"\ndrain_deadline = \"2s\"\n"
        ),
    )
    .unwrap();
    let mut child = kas()
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let readiness = |expect: u16| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = probe::readiness_status(obs) {
                if r == expect {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("readiness never returned {expect}");
    };
    readiness(200);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    readiness(503);
    // The agent port is still open while readiness is 503.
    assert!(std::net::TcpStream::connect(("127.0.0.1", agent)).is_ok());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kas did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

mod probe {
    /// Minimal blocking GET /readiness (std only, to keep this test synchronous).
    pub fn readiness_status(port: u16) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET /readiness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        buf.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad response"))
    }
}

/// A kas.yaml shaped like the one the GitLab Helm chart renders (its kas ConfigMap), with
/// this kas's implemented keys added as an operator's `customConfig` would.
fn helm_chart_yaml(
    agent: u16,
    obs: u16,
    k8s_proxy: u16,
    api: u16,
    private: u16,
    secret: &std::path::Path,
) -> String {
    format!(
        r#"agent:
  listen:
    address: "127.0.0.1:{agent}"
    websocket: true
    max_connection_age: "1800s"
  configuration:
    poll_period: "20s"
    max_configuration_file_size: 131072
  info_cache_ttl: "300s"
  info_cache_error_ttl: "60s"
  kubernetes_api:
    listen:
      address: "127.0.0.1:{k8s_proxy}"
      websocket: true
    url_path_prefix: "/k8s-proxy"
gitlab:
  address: "http://127.0.0.1:1"
  external_url: "https://gitlab.example.com"
  authentication_secret_file: {secret:?}
  api_rate_limit:
    refill_rate_per_second: 50.0
    bucket_size: 250
api:
  listen:
    address: "127.0.0.1:{api}"
    authentication_secret_file: {secret:?}
private_api:
  listen:
    address: "127.0.0.1:{private}"
    authentication_secret_file: {secret:?}
observability:
  listen:
    address: "127.0.0.1:{obs}"
  logging:
    level: info
  liveness_probe:
    url_path: "/liveness"
  readiness_probe:
    url_path: "/readiness"
  prometheus:
    url_path: "/metrics"
redis:
  server:
    address: "gitlab-redis-master.default.svc:6379"
  password_file: "/etc/kas/redis/redis-password"
gitaly:
  global_api_rate_limit:
    refill_rate_per_second: 30.0
    bucket_size: 70
  per_server_api_rate_limit:
    refill_rate_per_second: 15.0
    bucket_size: 40
"#
    )
}

/// Keys of [`helm_chart_yaml`] this kas does not implement.
const HELM_IGNORED: &[&str] = &[
    "agent.kubernetes_api.listen.websocket",
    "agent.listen.websocket",
];

#[test]
fn a_real_kas_yaml_is_accepted_and_unimplemented_keys_are_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, kas::gitlab::SharedSecret::generate().to_base64()).unwrap();
    let (agent, obs, k8s_proxy) = (free_port(), free_port(), free_port());
    let path = dir.path().join("kas.yaml");
    let redis_password = dir.path().join("redis-password");
    std::fs::write(&redis_password, "p").unwrap();
    let yaml = helm_chart_yaml(agent, obs, k8s_proxy, free_port(), free_port(), &secret).replace(
        "/etc/kas/redis/redis-password",
        redis_password.to_str().unwrap(),
    );
    std::fs::write(&path, &yaml).unwrap();

    // `check` lists every ignored key and accepts the file.
    let out = kas()
        .args(["check", "--configuration-file"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ignored (not implemented by this kas): "))
        .map(|k| k.split(' ').next().unwrap_or(k))
        .collect();
    assert_eq!(listed, HELM_IGNORED, "{stdout}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");

    // Serving: the file's addresses are used, and the log names each ignored key once.
    let mut child = kas()
        .arg("--configuration-file")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe::readiness_status(obs).ok() != Some(200) {
        assert!(
            Instant::now() < deadline,
            "kas never became ready on the YAML's observability address"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", agent)).is_ok());
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "kas did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut log).unwrap();
    for key in HELM_IGNORED {
        let lines = log
            .lines()
            .filter(|l| l.contains("configuration key ignored") && l.contains(&format!("\"{key}")))
            .count();
        assert_eq!(lines, 1, "{key} reported {lines} times in:\n{log}");
    }

    // A value kas refuses names the key.
    for (from, to, key) in [
        (
            "bucket_size: 250",
            "bucket_size: 0",
            "gitlab.api_rate_limit.bucket_size",
        ),
        (
            "refill_rate_per_second: 50.0",
            "refill_rate_per_second: -1",
            "gitlab.api_rate_limit.refill_rate_per_second",
        ),
        (
            "url_path: \"/metrics\"",
            "url_path: \"/readiness\"",
            "observability.prometheus.url_path",
        ),
    ] {
        assert!(yaml.contains(from), "{from}");
        std::fs::write(&path, yaml.replace(from, to)).unwrap();
        let out = kas()
            .args(["check", "--configuration-file"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(key),
            "{to}: {stderr}"
        );
    }

    // A bad value names the file and the key; a TOML flag and the YAML flag conflict.
    std::fs::write(&path, "agent:\n  listen:\n    max_connection_age: soon\n").unwrap();
    let out = kas()
        .args(["check", "--configuration-file"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("agent.listen.max_connection_age") && stderr.contains("kas.yaml"),
        "{stderr}"
    );
    let out = kas()
        .args(["check", "--config", "a.toml", "--configuration-file"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
