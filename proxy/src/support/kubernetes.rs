//! The Kubernetes API client the edge uses: EndpointSlice discovery, and publishing the
//! ACME certificate to a Secret.

/// Builds a client from the pod's service account.
///
/// Async because building a kube client spawns its request-buffer task, which
/// needs a running Tokio runtime.
pub async fn in_cluster_client(purpose: &str) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;

    // kube's own error here is a bare "environment variable not found", which
    // does not tell an operator that the edge simply is not running in a pod.
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        if std::env::var_os(var).is_none() {
            anyhow::bail!(
                "{purpose} needs the Kubernetes API, but {var} is not set: \
                 the edge is not running inside a Kubernetes pod"
            );
        }
    }
    let config = kube::Config::incluster().context(
        "loading the in-cluster service account (token, CA and namespace under \
         /var/run/secrets/kubernetes.io/serviceaccount; is automountServiceAccountToken off?)",
    )?;
    kube::Client::try_from(config).context("building a Kubernetes client from the service account")
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
}
