//! A kubeconfig for `kubectl` against the Kubernetes API stand-in directly, or against the
//! Kubernetes API proxy (kas's, or the edge's `/k8s-proxy`) with a `ci:` token: tests and
//! the local stack's `.dev/kubeconfig` write it.

use std::path::Path;

/// A kubeconfig with one cluster `test` at `server` (e.g. `http://127.0.0.1:1234` or
/// `https://localhost:8443/k8s-proxy`), a bearer `token` if given, trusting `ca_file` if
/// given.
pub fn kubeconfig(server: &str, token: Option<&str>, ca_file: Option<&Path>) -> String {
    let ca = ca_file.map_or(String::new(), |f| {
        format!("    certificate-authority: {}\n", f.display())
    });
    let user = token.map_or("  user: {}\n".to_owned(), |t| {
        let quoted = t.replace('\\', "\\\\").replace('"', "\\\"");
        format!("  user:\n    token: \"{quoted}\"\n")
    });
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n{ca}\
         users:\n- name: test\n{user}\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
         current-context: test\npreferences: {{}}\n"
    )
}
