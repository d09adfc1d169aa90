//! The `kas-edge` process of the faults scenario: its configuration (static discovery of
//! the stack's pods, the `/k8s-proxy/` route, a blocklist file, certificate files signed by
//! a CA of the run's own so a rotation changes the leaf and key but not what agents trust),
//! starting it, and the two ways it is restarted: graceful upgrade (the new process takes
//! the listening sockets, then SIGQUIT makes the old one hand over and drain) when the
//! binary has `run --upgrade`, else stop and start.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout, Instant};

use super::timeline::Watched;
use crate::probe::{http_get_status, read_body};
use crate::stack::{log_to, AGENT_PORT, K8S_PROXY_PORT, K8S_PROXY_PREFIX, OBSERVABILITY_PORT};

pub const HTTPS_PORT: u16 = 8443;
pub const ADMIN_PORT: u16 = 8081;
/// How long the edge's drain may last: open streams are closed spread over it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Bounds every wait for the edge (start, reload, exit).
const EDGE_WAIT: Duration = Duration::from_secs(30);

/// The certificate authority agents trust; the edge's leaf is signed by it.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating the CA key")?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .context("CA certificate parameters")?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kas-loadtest faults CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        write_atomically(&dir.join("ca.crt"), &cert.pem())?;
        Ok(Self {
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// A new key and a leaf for `localhost` and `ip`, written over `cert` and `key` (key
    /// first: the edge's watcher retries a reload that saw a pair that does not match).
    fn issue(&self, ip: IpAddr, cert: &Path, key: &Path) -> anyhow::Result<()> {
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating the edge's key")?;
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), ip.to_string()])
            .context("leaf certificate parameters")?;
        let leaf = params
            .signed_by(&leaf_key, &self.issuer)
            .context("signing the edge's certificate")?;
        write_atomically(key, &leaf_key.serialize_pem())?;
        write_atomically(cert, &leaf.pem())?;
        Ok(())
    }
}

/// Replaces `path` in one rename, so a watcher never reads half of it.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)
        .with_context(|| format!("cannot write {}", Path::new(&tmp).display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// The running edge (one process; two during a graceful upgrade).
pub struct EdgeProcess {
    binary: PathBuf,
    dir: PathBuf,
    ip: IpAddr,
    pods: usize,
    ca: Ca,
    pub config: PathBuf,
    pub blocklist: PathBuf,
    child: Option<Child>,
    /// Whether the binary has `run --upgrade` (graceful upgrade).
    pub can_upgrade: bool,
    upgrade_socket: PathBuf,
    starts: u32,
}

impl EdgeProcess {
    /// Writes the configuration, the certificates and an empty blocklist, starts the edge
    /// on `ip` in front of `pods`, and waits until it is ready with every pod healthy.
    pub async fn start(
        binary: &Path,
        dir: &Path,
        ip: IpAddr,
        pods: &[IpAddr],
    ) -> anyhow::Result<Self> {
        if !binary.exists() {
            bail!(
                "{} not found: build it (cargo build --release -p kas-edge) or give --edge-bin",
                binary.display()
            );
        }
        let ca = Ca::new(dir)?;
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        ca.issue(ip, &cert, &key)?;
        let blocklist = dir.join("blocklist.txt");
        write_atomically(&blocklist, "# kas-loadtest faults: nothing blocked\n")?;
        let can_upgrade = supports_upgrade(binary).await;
        // Short (a Unix socket path has 107 bytes), absolute, one per edge address.
        let upgrade_socket = std::env::temp_dir().join(format!("kas-loadtest-edge-{ip}.sock"));
        let config = dir.join("edge.toml");
        let text = edge_config(EdgeFiles {
            ip,
            pods,
            cert: &cert,
            key: &key,
            blocklist: &blocklist,
            upgrade_socket: can_upgrade.then_some(upgrade_socket.as_path()),
        });
        write_atomically(&config, &text)?;
        let mut edge = Self {
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            ip,
            pods: pods.len(),
            ca,
            config,
            blocklist,
            child: None,
            can_upgrade,
            upgrade_socket,
            starts: 0,
        };
        let child = edge.spawn(false)?;
        edge.child = Some(child);
        edge.wait_ready().await?;
        Ok(edge)
    }

    pub fn https(&self) -> SocketAddr {
        SocketAddr::new(self.ip, HTTPS_PORT)
    }

    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.ip, ADMIN_PORT)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    fn spawn(&mut self, upgrade: bool) -> anyhow::Result<Child> {
        self.starts += 1;
        let mut command = Command::new(&self.binary);
        log_to(&mut command, &self.dir.join("edge.log"))?;
        command.arg("run").arg("--config").arg(&self.config);
        if upgrade {
            command.arg("--upgrade");
        }
        command
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))
    }

    /// Where the new process takes the edge's own listeners (admin): the upgrade socket's
    /// path + `.listeners`.
    fn own_listeners_socket(&self) -> PathBuf {
        let mut path = self.upgrade_socket.as_os_str().to_owned();
        path.push(".listeners");
        PathBuf::from(path)
    }

    /// The admin port's metrics page, within 2 s.
    pub async fn metrics(&self) -> Option<String> {
        timeout(Duration::from_secs(2), read_body(self.admin(), "/metrics"))
            .await
            .ok()?
            .ok()
    }

    /// Pods the edge reports healthy.
    pub async fn healthy_pods(&self) -> usize {
        self.metrics().await.map_or(0, |text| count_healthy(&text))
    }

    /// Waits (bounded) until `/readyz` answers 200 and every pod is healthy.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.wait_pods_healthy(self.pods).await
    }

    /// Waits (bounded) until the edge is ready and reports `want` pods healthy.
    pub async fn wait_pods_healthy(&mut self, want: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + EDGE_WAIT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "kas-edge exited ({status}); see {}/edge.log",
                        self.dir.display()
                    );
                }
            }
            if http_get_status(self.admin(), "/readyz").await == Some(200)
                && self.healthy_pods().await >= want
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "kas-edge not ready with {want} healthy pods within {EDGE_WAIT:?}; see {}/edge.log",
                    self.dir.display()
                );
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// Successful certificate reloads so far (`edge_tls_reloads_total{result="ok"}`).
    pub async fn tls_reloads(&self) -> Option<f64> {
        series(
            &self.metrics().await?,
            "edge_tls_reloads_total{result=\"ok\"}",
        )
    }

    /// A new key and leaf from the same CA over the configured files; waits (bounded)
    /// until the edge says it reloaded them. Returns how long that took.
    pub async fn rotate_certificate(&self) -> anyhow::Result<Duration> {
        let before = self.tls_reloads().await.unwrap_or(0.0);
        let begin = Instant::now();
        self.ca.issue(
            self.ip,
            &self.dir.join("tls.crt"),
            &self.dir.join("tls.key"),
        )?;
        let deadline = begin + EDGE_WAIT;
        while Instant::now() < deadline {
            if self.tls_reloads().await.unwrap_or(0.0) > before {
                return Ok(begin.elapsed());
            }
            sleep(Duration::from_millis(100)).await;
        }
        bail!("the edge did not reload its certificate within {EDGE_WAIT:?}")
    }

    /// Restarts the edge: by graceful upgrade when the binary has it (the new process
    /// first, then SIGQUIT to the old one, which hands its sockets over and drains), else
    /// SIGTERM, wait, start. Waits until the new one is ready with every pod healthy and
    /// the old one has exited. Returns how it was done.
    /// `watched` hears of both processes while they overlap.
    pub async fn restart(&mut self, watched: &Watched) -> anyhow::Result<&'static str> {
        let Some(mut old) = self.child.take() else {
            bail!("the edge is not running");
        };
        let how = if self.can_upgrade {
            let own = self.own_listeners_socket();
            let _ = std::fs::remove_file(&self.upgrade_socket);
            let _ = std::fs::remove_file(&own);
            let new = self.spawn(true)?;
            // The new process waits on the upgrade sockets for the listeners.
            let socket_deadline = Instant::now() + Duration::from_secs(10);
            while !(self.upgrade_socket.exists() && own.exists())
                && Instant::now() < socket_deadline
            {
                sleep(Duration::from_millis(50)).await;
            }
            watched.set_edge(old.id().into_iter().chain(new.id()).collect());
            signal(&old, libc::SIGQUIT);
            self.child = Some(new);
            "graceful upgrade (run --upgrade, SIGQUIT)"
        } else {
            signal(&old, libc::SIGTERM);
            "stop and start (this kas-edge has no run --upgrade)"
        };
        let exited = timeout(DRAIN_DEADLINE + EDGE_WAIT, old.wait()).await;
        if exited.is_err() {
            let _ = old.kill().await;
        }
        if self.child.is_none() {
            self.child = Some(self.spawn(false)?);
        }
        self.wait_ready().await?;
        if exited.is_err() {
            bail!("the old edge did not exit within its drain deadline");
        }
        Ok(how)
    }

    /// SIGTERM, then waits (bounded) for the edge to exit; removes the upgrade sockets.
    pub async fn stop(mut self) {
        let _ = std::fs::remove_file(&self.upgrade_socket);
        let _ = std::fs::remove_file(self.own_listeners_socket());
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if timeout(DRAIN_DEADLINE + Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with the pid of a child we started and have not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
    }
}

/// Whether `kas-edge run` takes `--upgrade` (graceful upgrade), from its help.
async fn supports_upgrade(binary: &Path) -> bool {
    let help = Command::new(binary)
        .args(["run", "--help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    match timeout(Duration::from_secs(10), help).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).contains("--upgrade"),
        _ => false,
    }
}

/// The value of one series (name and labels exactly as the edge writes them).
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Pods with `edge_upstream_healthy{...} 1`.
fn count_healthy(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("edge_upstream_healthy{") && l.trim_end().ends_with(" 1"))
        .count()
}

/// The files the edge's configuration names.
struct EdgeFiles<'a> {
    ip: IpAddr,
    pods: &'a [IpAddr],
    cert: &'a Path,
    key: &'a Path,
    blocklist: &'a Path,
    upgrade_socket: Option<&'a Path>,
}

/// The edge's TOML: the stack's pods by static discovery (a restarted pod comes back on
/// its address, as the local stack's pods do), health on their observability port, the
/// Kubernetes API proxy's route, a short drain.
fn edge_config(f: EdgeFiles<'_>) -> String {
    let path = |p: &Path| format!("{:?}", p.display().to_string());
    let endpoints: Vec<String> = f
        .pods
        .iter()
        .map(|ip| format!("\"{}\"", SocketAddr::new(*ip, AGENT_PORT)))
        .collect();
    let upgrade = f
        .upgrade_socket
        .map_or(String::new(), |s| format!("upgrade_socket = {}\n", path(s)));
    format!(
        "[listen]\nhttps = \"{https}\"\nadmin = \"{admin}\"\nthreads = 2\n\n\
         [[tls.certificates]]\ncert = {cert}\nkey = {key}\n\n\
         [discovery]\nkind = \"static\"\nendpoints = [{endpoints}]\n\n\
         [health]\nport = {OBSERVABILITY_PORT}\n\n\
         [[upstream.routes]]\npath_prefix = {K8S_PROXY_PREFIX:?}\nport = {K8S_PROXY_PORT}\n\n\
         [policies]\nblocklist = {blocklist}\n\n\
         [shutdown]\nreadiness_delay = \"0s\"\ndrain_deadline = \"{drain}s\"\n{upgrade}\n\
         [log]\nlevel = \"warn\"\n",
        https = SocketAddr::new(f.ip, HTTPS_PORT),
        admin = SocketAddr::new(f.ip, ADMIN_PORT),
        cert = path(f.cert),
        key = path(f.key),
        endpoints = endpoints.join(", "),
        blocklist = path(f.blocklist),
        drain = DRAIN_DEADLINE.as_secs(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_and_healthy_pods() {
        let text = "# TYPE x counter\nedge_tls_reloads_total{result=\"error\"} 2\n\
                    edge_tls_reloads_total{result=\"ok\"} 3\n\
                    edge_upstream_healthy{endpoint=\"127.0.9.1:8150\"} 1\n\
                    edge_upstream_healthy{endpoint=\"127.0.9.2:8150\"} 0\n\
                    edge_upstream_healthy{endpoint=\"127.0.9.3:8150\"} 1\n";
        assert_eq!(
            series(text, "edge_tls_reloads_total{result=\"ok\"}"),
            Some(3.0)
        );
        assert_eq!(
            series(text, "edge_tls_reloads_total{result=\"none\"}"),
            None
        );
        assert_eq!(count_healthy(text), 2);
    }
}
