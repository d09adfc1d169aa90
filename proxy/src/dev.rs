//! `kas-edge dev`: the whole local system in one command — a GitLab stand-in, three kas
//! pods on their own loopback addresses, and this edge in front of them with a generated
//! self-signed certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use kas::dev::devstack::{DevStack, DevStackOptions};

use crate::config::{DiscoveryConfig, EdgeConfig};

pub const HTTPS: &str = "127.0.0.1:8443";
pub const HTTP: &str = "127.0.0.1:8080";
pub const ADMIN: &str = "127.0.0.1:8081";

fn addr(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse().with_context(|| format!("bad address {s}"))
}

pub fn run(dir: PathBuf) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dev-stack")
        .enable_all()
        .build()?;
    let opts = DevStackOptions {
        dir: dir.clone(),
        ..DevStackOptions::default()
    };
    let stack = rt.block_on(DevStack::start(&opts))?;
    let pods: Vec<SocketAddr> = stack.pods.iter().map(|p| p.agent_addr()).collect();
    let description = stack.describe();
    let token = stack.token.clone();
    let ci_token = stack.ci_token.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stack_task = rt.spawn(stack.run(stop_rx));

    let mut config = EdgeConfig::default();
    config.listen.https = addr(HTTPS)?;
    config.listen.http = Some(addr(HTTP)?);
    config.listen.admin = addr(ADMIN)?;
    config.tls.hosts = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "kas.gitlab.localhost".into(),
    ];
    let tls_dir = dir.join("tls");
    config.tls.self_signed = true;
    config.tls.self_signed_dir = Some(tls_dir.clone());
    config.discovery = DiscoveryConfig::Static { endpoints: pods };
    config.health.port = kas::dev::devstack::OBSERVABILITY_PORT;
    // kubectl's requests go to the pods' Kubernetes API proxy (.dev/kubeconfig).
    config.upstream.routes = vec![crate::config::PathRoute {
        path_prefix: kas::dev::devstack::K8S_PROXY_PREFIX.into(),
        port: kas::dev::devstack::K8S_PROXY_PORT,
    }];
    config.shutdown.readiness_delay = Duration::ZERO;
    config.shutdown.drain_deadline = Duration::from_secs(5);
    config.validate(std::path::Path::new("(dev defaults)"))?;

    // kubectl through the edge's /k8s-proxy/ route to the demo agent's cluster.
    let kubeconfig_path = dir.join("kubeconfig");
    let ca =
        std::path::absolute(tls_dir.join("tls.crt")).unwrap_or_else(|_| tls_dir.join("tls.crt"));
    std::fs::write(
        &kubeconfig_path,
        kas::dev::kubeconfig::kubeconfig(
            &format!(
                "https://localhost:8443{}",
                kas::dev::devstack::K8S_PROXY_PREFIX.trim_end_matches('/')
            ),
            Some(&ci_token),
            Some(&ca),
        ),
    )
    .with_context(|| format!("cannot write {}", kubeconfig_path.display()))?;

    println!(
        "\nkas-edge local stack (Ctrl-C stops everything)\n{description}\
         edge:             https://localhost:8443  (wss:// and grpcs://, certificate {tls}/tls.crt)\n\
         edge admin:       http://{ADMIN}/metrics  /readyz  /healthz\n\n\
         try: python3 kas/tests/python/get_configuration.py localhost:8443 {token} --tls {tls}/tls.crt\n\
         and: kubectl --kubeconfig {kubeconfig} get pods -A   (also get -w, logs -f, exec)\n",
        tls = tls_dir.display(),
        kubeconfig = kubeconfig_path.display(),
    );

    let stop = move || {
        let _ = stop_tx.send(true);
        // Give the pods their drain; they are local, so it is short.
        let _ =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), stack_task).await });
        println!("local stack stopped");
    };
    crate::app::run_checked(
        crate::app::preflight::check(config)?,
        crate::app::upgrade::Start::Fresh,
        Box::new(stop),
    )
}
