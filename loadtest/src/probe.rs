//! What the edge itself says about the load: memory and CPU from `/proc/<pid>` and its
//! connection and stream gauges from the admin `/metrics` endpoint.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::target::check_loopback;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EdgeSample {
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_connections: Option<f64>,
    pub active_streams: Option<f64>,
}

pub struct EdgeProbe {
    pids: Vec<u32>,
    admin: Option<(SocketAddr, String)>,
    ticks_per_second: f64,
}

/// Plain HTTP/1.0 GET: enough for a Prometheus text endpoint, no client stack needed.
pub(crate) async fn read_body(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    // Metrics pages are small; cap what we read so a wrong address cannot flood us.
    (&mut stream)
        .take(8 * 1024 * 1024)
        .read_to_end(&mut raw)
        .await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("response without a header end")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("GET {path}: HTTP {status}");
    }
    Ok(body.to_owned())
}

/// The status code of `GET path` on `addr` (within 2 s), `None` when nothing answers.
pub async fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let get = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await.ok()?;
        let text = String::from_utf8_lossy(&head[..n]);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), get)
        .await
        .ok()
        .flatten()
}

/// Clock ticks per second, the unit of [`read_cpu_ticks`].
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant of the system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Parses `http://host:port[/path]` (path defaults to /metrics).
pub fn parse_admin(url: &str, allow_non_loopback: bool) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--edge-admin `{url}` must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) if i + 1 < rest.len() => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], "/metrics".to_owned()),
        None => (rest, "/metrics".to_owned()),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .with_context(|| format!("--edge-admin: cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("--edge-admin: {authority} resolves to nothing"))?;
    check_loopback(addr, allow_non_loopback, "--edge-admin")?;
    Ok((addr, path))
}

/// Resident set size from `/proc/<pid>/status`.
pub fn read_rss(pid: u32) -> Option<u64> {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime of every thread, in clock ticks, from `/proc/<pid>/stat`.
pub fn read_cpu_ticks(pid: u32) -> Option<u64> {
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Sums every sample of `name` (all label sets) in Prometheus text format.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

impl EdgeProbe {
    pub fn new(pids: Vec<u32>, admin: Option<(SocketAddr, String)>) -> anyhow::Result<Self> {
        for pid in &pids {
            if read_rss(*pid).is_none() {
                bail!("--edge-pid {pid}: no such process (cannot read /proc/{pid}/status)");
            }
        }
        Ok(Self {
            pids,
            admin,
            ticks_per_second: clock_ticks(),
        })
    }

    pub fn is_active(&self) -> bool {
        !self.pids.is_empty() || self.admin.is_some()
    }

    pub async fn sample(&self) -> EdgeSample {
        let mut s = EdgeSample::default();
        if !self.pids.is_empty() {
            // A process that exited makes the sum meaningless: report nothing then.
            s.rss_bytes = self.pids.iter().map(|p| read_rss(*p)).sum();
            s.cpu_seconds = self
                .pids
                .iter()
                .map(|p| read_cpu_ticks(*p))
                .sum::<Option<u64>>()
                .map(|t| t as f64 / self.ticks_per_second);
        }
        if let Some((addr, path)) = &self.admin {
            if let Ok(Ok(text)) =
                tokio::time::timeout(Duration::from_secs(2), read_body(*addr, path)).await
            {
                s.open_connections = metric_sum(&text, "edge_open_connections");
                s.active_streams = metric_sum(&text, "edge_active_streams");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_metrics_over_labels() {
        let text = "# HELP edge_active_streams x\n# TYPE edge_active_streams gauge\n\
                    edge_active_streams{protocol=\"grpc\"} 3\nedge_active_streams{protocol=\"websocket\"} 4\n\
                    edge_active_streams_other 100\nedge_open_connections 7\n";
        assert_eq!(metric_sum(text, "edge_active_streams"), Some(7.0));
        assert_eq!(metric_sum(text, "edge_open_connections"), Some(7.0));
        assert_eq!(metric_sum(text, "edge_missing"), None);
    }

    #[test]
    fn reads_our_own_process() {
        let pid = std::process::id();
        assert!(read_rss(pid).unwrap() > 0);
        assert!(read_cpu_ticks(pid).is_some());
    }

    #[test]
    fn admin_urls() {
        let (a, p) = parse_admin("http://127.0.0.1:8081/metrics", false).unwrap();
        assert_eq!((a.port(), p.as_str()), (8081, "/metrics"));
        let (_, p) = parse_admin("http://127.0.0.1:8081", false).unwrap();
        assert_eq!(p, "/metrics");
        assert!(parse_admin("http://10.0.0.1:8081/metrics", false).is_err());
        assert!(parse_admin("127.0.0.1:8081", false).is_err());
    }
}
