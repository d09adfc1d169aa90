//! A real `redis-server` (Debian's package; `$KAS_REDIS_SERVER` overrides the binary) on a
//! loopback subnet of this test process's own (so concurrent test binaries never meet),
//! with its data in a temporary directory, killed when dropped. It can be killed and
//! started again on the same address, as a Redis outage. With TLS ([`RedisServer::start_tls`])
//! kas talks TLS on the usual port and tests read through a plain port beside it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::net::{ip, next_subnet};
use crate::wait::eventually;

pub const REDIS_PORT: u16 = 6379;

pub struct RedisServer {
    /// Where kas connects (TLS with [`RedisServer::start_tls`]).
    pub addr: SocketAddr,
    /// A plain port for the tests' own client (the same as `addr` without TLS).
    plain: SocketAddr,
    /// The server's certificate (which a client trusts), with TLS.
    pub certificate: Option<std::path::PathBuf>,
    /// The master this one replicates, for a replica.
    replica_of: Option<SocketAddr>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

fn binary() -> String {
    std::env::var("KAS_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

impl RedisServer {
    /// Starts on `127.A.B.2:6379` of a fresh subnet and waits until it answers PING.
    pub async fn start() -> Self {
        let addr = SocketAddr::new(ip(next_subnet(), 2), REDIS_PORT);
        let mut server = Self {
            addr,
            plain: addr,
            certificate: None,
            replica_of: None,
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        server.restart().await;
        server
    }

    /// Like [`RedisServer::start`], speaking TLS on `addr` with a self-signed certificate
    /// for its IP ([`RedisServer::certificate`]), and plain on the port after it.
    pub async fn start_tls() -> Self {
        let addr = SocketAddr::new(ip(next_subnet(), 2), REDIS_PORT);
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, _) = crate::tls::self_signed_for(dir.path(), "redis", &[addr.ip().to_string()]);
        let mut server = Self {
            addr,
            plain: SocketAddr::new(addr.ip(), REDIS_PORT + 1),
            certificate: Some(cert),
            replica_of: None,
            child: None,
            dir,
        };
        server.restart().await;
        server
    }

    /// `host:port`, as `redis.address` takes it.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// A replica of `master` (plain, on a subnet of its own), which Sentinel can promote.
    pub async fn start_replica_of(master: &RedisServer) -> Self {
        let addr = SocketAddr::new(ip(next_subnet(), 2), REDIS_PORT);
        let mut server = Self {
            addr,
            plain: addr,
            certificate: None,
            replica_of: Some(master.addr),
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        server.restart().await;
        server
    }

    /// Kills the server (SIGKILL): connections drop at once, nothing is saved.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same address, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let mut command = Command::new(binary());
        if let Some(cert) = &self.certificate {
            let key = cert.with_extension("key");
            command
                .args([
                    "--tls-port",
                    &self.addr.port().to_string(),
                    "--tls-cert-file",
                ])
                .arg(cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(cert)
                .args(["--tls-auth-clients", "no"]);
        }
        if let Some(master) = self.replica_of {
            // Announced as its own address (its connection to the master may come from
            // another loopback address), so the sentinel can promote it.
            command
                .arg("--replicaof")
                .arg(master.ip().to_string())
                .arg(master.port().to_string())
                .arg("--replica-announce-ip")
                .arg(self.addr.ip().to_string());
        }
        let child = command
            .args([
                "--bind",
                &self.addr.ip().to_string(),
                "--port",
                &self.plain.port().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): install Redis (apt-get install redis-server, as \
                     .ci/install does) or set KAS_REDIS_SERVER",
                    binary()
                )
            });
        self.child = Some(child);
        wait_for_ping(self.plain, "redis-server answers PING").await;
    }

    async fn connect_to(addr: SocketAddr) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://{addr}/")).ok()?;
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()
    }

    /// A plain client connection, for tests that read what kas wrote.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        Self::connect_to(self.plain)
            .await
            .expect("connect to the test redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real Redis Sentinel (`redis-server --sentinel`) watching one master with quorum 1 and
/// short timeouts (down after 500 ms), so a killed master fails over within seconds.
pub struct RedisSentinel {
    pub addr: SocketAddr,
    pub master_name: String,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

pub const SENTINEL_PORT: u16 = 26379;

impl RedisSentinel {
    pub async fn start(master: &RedisServer, master_name: &str) -> Self {
        let addr = SocketAddr::new(ip(next_subnet(), 3), SENTINEL_PORT);
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind {ip}\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {name} {mip} {mport} 1\n\
                 sentinel down-after-milliseconds {name} 500\n\
                 sentinel failover-timeout {name} 2000\n\
                 sentinel parallel-syncs {name} 1\n",
                port = addr.port(),
                ip = addr.ip(),
                dir = dir.path().display(),
                name = master_name,
                mip = master.addr.ip(),
                mport = master.addr.port(),
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new(binary())
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let sentinel = Self {
            addr,
            master_name: master_name.to_owned(),
            child: Some(child),
            _dir: dir,
        };
        wait_for_ping(addr, "the sentinel answers PING").await;
        sentinel
    }

    /// The master's address as the sentinel names it now.
    pub async fn master(&self) -> Option<SocketAddr> {
        let mut c = RedisServer::connect_to(self.addr).await?;
        let (host, port): (String, String) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut c)
            .await
            .ok()?;
        format!("{host}:{port}").parse().ok()
    }

    /// How many replicas the sentinel knows of the master.
    pub async fn replicas(&self) -> usize {
        let Some(mut c) = RedisServer::connect_to(self.addr).await else {
            return 0;
        };
        redis::cmd("SENTINEL")
            .arg("replicas")
            .arg(&self.master_name)
            .query_async::<Vec<redis::Value>>(&mut c)
            .await
            .map(|v| v.len())
            .unwrap_or(0)
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (bounded, 10 s) until the Redis server or sentinel at `addr` answers PING.
async fn wait_for_ping(addr: SocketAddr, what: &str) {
    eventually(what, Duration::from_secs(10), || async move {
        match RedisServer::connect_to(addr).await {
            Some(mut c) => redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok(),
            None => false,
        }
    })
    .await;
}
