//! The Kubernetes API client the edge uses: EndpointSlice discovery, the blocklist
//! ConfigMap, and publishing the ACME certificate to a Secret; and the one `kas-edge
//! block` uses.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

/// Where Kubernetes mounts the pod's namespace.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The namespace this pod runs in, for `field` (a namespace setting) left unset.
pub fn own_namespace(field: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
        .map(|ns| ns.trim().to_owned())
        .with_context(|| format!("{field} is not set and the pod's own namespace is unknown"))
}

/// kube's own error without these is a bare "environment variable not found", which does
/// not tell an operator that the edge simply is not running in a pod.
fn check_in_pod(purpose: &str) -> anyhow::Result<()> {
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        if std::env::var_os(var).is_none() {
            anyhow::bail!(
                "{purpose} needs the Kubernetes API, but {var} is not set: \
                 the edge is not running inside a Kubernetes pod"
            );
        }
    }
    Ok(())
}

fn in_cluster_config(purpose: &str) -> anyhow::Result<kube::Config> {
    check_in_pod(purpose)?;
    kube::Config::incluster().with_context(|| {
        format!(
            "{purpose}: loading the in-cluster service account (token, CA and namespace under \
             /var/run/secrets/kubernetes.io/serviceaccount; is automountServiceAccountToken off?)"
        )
    })
}

fn read_kubeconfig(purpose: &str, path: &Path) -> anyhow::Result<kube::config::Kubeconfig> {
    kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("{purpose}: reading the kubeconfig {}", path.display()))
}

/// What a client for `purpose` needs, checked without contacting anything: the kubeconfig
/// file when one is named, else in-cluster credentials. `kas-edge check` and start-up
/// share it.
pub fn preflight(purpose: &str, kubeconfig: Option<&Path>) -> anyhow::Result<()> {
    match kubeconfig {
        Some(path) => read_kubeconfig(purpose, path).map(drop),
        None => in_cluster_config(purpose).map(drop),
    }
}

/// Builds a client from the pod's service account.
///
/// Async because building a kube client spawns its request-buffer task, which
/// needs a running Tokio runtime.
pub async fn in_cluster_client(purpose: &str) -> anyhow::Result<kube::Client> {
    let config = in_cluster_config(purpose)?;
    kube::Client::try_from(config).context("building a Kubernetes client from the service account")
}

/// A client for a watch with its own back-off: from `kubeconfig` (its current context) when
/// one is named, else from the pod's service account. kube's default retry of 503/504/429
/// answers is off: it retries a request for minutes, during which the caller can neither
/// report the API as down nor retry on its own, shorter schedule.
pub async fn watch_client(
    purpose: &str,
    kubeconfig: Option<&Path>,
) -> anyhow::Result<kube::Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = read_kubeconfig(purpose, path)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("{purpose}: using the kubeconfig {}", path.display()))?
        }
        None => in_cluster_config(purpose)?,
    };
    config.default_retry = false;
    kube::Client::try_from(config)
        .with_context(|| format!("{purpose}: building a Kubernetes client"))
}

/// How long one request of an operator command may take.
const OPERATOR_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The client of an operator command (`kas-edge block`): the kubeconfig named, else what
/// kubectl would use (`KUBECONFIG`, `~/.kube/config`, then a pod's service account), in
/// `context` when one is named. Its requests give up after 15 s and are not retried (an
/// operator sees the error at once and runs the command again).
pub async fn operator_client(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let mut config = match kubeconfig {
        Some(path) => {
            let file = read_kubeconfig("--kubeconfig", path)?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("reading the kubeconfig (KUBECONFIG or ~/.kube/config)")?,
        None => kube::Config::infer().await.context(
            "no Kubernetes credentials: no KUBECONFIG, no ~/.kube/config and not in a pod \
             (or name one with --kubeconfig)",
        )?,
    };
    config.connect_timeout = Some(OPERATOR_REQUEST_TIMEOUT);
    config.read_timeout = Some(OPERATOR_REQUEST_TIMEOUT);
    config.write_timeout = Some(OPERATOR_REQUEST_TIMEOUT);
    config.default_retry = false;
    kube::Client::try_from(config).context("building a Kubernetes client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_cluster_client_explains_missing_cluster() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return; // Running in a pod: nothing to check here.
        }
        let Err(err) = in_cluster_client("kas EndpointSlice discovery").await else {
            panic!("built a client outside a cluster");
        };
        let err = err.to_string();
        assert!(err.contains("not running inside a Kubernetes pod"), "{err}");
    }

    #[tokio::test]
    async fn a_kubeconfig_is_read_and_a_bad_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("kubeconfig");
        std::fs::write(
            &good,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:9\n\
             users:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
             current-context: x\n",
        )
        .unwrap();
        preflight("blocklist", Some(&good)).unwrap();
        watch_client("blocklist", Some(&good)).await.unwrap();
        operator_client(Some(&good), Some("x")).await.unwrap();
        let missing = dir.path().join("missing");
        let err = format!(
            "{:#}",
            preflight("the blocklist ConfigMap", Some(&missing)).unwrap_err()
        );
        assert!(
            err.starts_with("the blocklist ConfigMap: reading the kubeconfig ")
                && err.contains("missing"),
            "{err}"
        );
    }
}
