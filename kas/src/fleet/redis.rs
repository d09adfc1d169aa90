//! One Redis connection per pod: connected lazily (kas starts and serves agents while Redis
//! is down), then kept by redis-rs's `ConnectionManager`, which reconnects by itself. Every
//! operation has a deadline and is counted by name and result, so a slow Redis shows up as
//! errors, not as stuck requests.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use prometheus::{IntCounterVec, Opts, Registry};
use prost::Message as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ConnectionInfo, RedisConnectionInfo};

use kas_common::metrics::register;
use kas_proto::redistool::ExpiringValue;

use crate::config::{RedisConfig, RedisNetwork};

/// After a failed connect or operation, operations fail at once for this long instead of
/// each waiting for its own timeout: agents' calls (the per-token limit) never queue
/// behind a Redis that is down.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct RedisMetrics {
    /// Redis operations by name (`tunnel_register`, `tunnel_lookup`, …) and result (`ok`, `error`).
    pub operations: IntCounterVec,
}

impl RedisMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            operations: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "kas_redis_operations_total",
                        "Redis operations by name and result (ok, error: failed or timed out).",
                    ),
                    &["op", "result"],
                )
                .expect("valid metric"),
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis is unreachable (last attempt {0:?} ago): {1}")]
    Unreachable(Duration, String),
}

struct ConnState {
    /// The connection, and the client it came from (the master's, with Sentinel).
    conn: Option<(ConnectionManager, redis::Client)>,
    failed: Option<(Instant, String)>,
}

/// Where the server is: one address, or whatever master the sentinels name now.
enum Source {
    Direct(redis::Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

pub struct Redis {
    source: Source,
    conn: tokio::sync::Mutex<ConnState>,
    key_prefix: String,
    dial_timeout: Duration,
    op_timeout: Duration,
    metrics: RedisMetrics,
    /// Failed operations so far: writers compare it to know that Redis failed since their
    /// last look, and rewrite their state once it works again (a restarted Redis is empty).
    errors: AtomicU64,
    /// The `run_id` of the Redis server last probed: a new one means a restarted (empty)
    /// or failed-over server.
    run_id: std::sync::Mutex<Option<String>>,
    /// When an operation last failed (the breaker above).
    last_failure: std::sync::Mutex<Option<Instant>>,
}

impl Redis {
    /// Checks the settings and reads the password file; does not connect.
    pub fn new(config: &RedisConfig, metrics: RedisMetrics) -> anyhow::Result<Self> {
        let source = match &config.sentinel {
            Some(sentinel) => {
                Source::Sentinel(tokio::sync::Mutex::new(sentinel_client(config, sentinel)?))
            }
            None => Source::Direct(direct_client(config)?),
        };
        Ok(Self {
            source,
            conn: tokio::sync::Mutex::new(ConnState {
                conn: None,
                failed: None,
            }),
            key_prefix: config.key_prefix.clone(),
            dial_timeout: config.dial_timeout,
            op_timeout: config.operation_timeout,
            metrics,
            errors: AtomicU64::new(0),
            run_id: std::sync::Mutex::new(None),
            last_failure: std::sync::Mutex::new(None),
        })
    }
}

fn read_password(path: &std::path::Path, field: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("{field}: cannot read {}", path.display()))?
        .trim_end_matches(['\r', '\n'])
        .to_owned())
}

fn redis_info(config: &RedisConfig) -> anyhow::Result<RedisConnectionInfo> {
    let password = match &config.password_file {
        Some(path) => Some(read_password(path, "redis.password_file")?),
        None => None,
    };
    Ok(RedisConnectionInfo {
        db: config.database,
        username: config.username.clone(),
        password,
        ..RedisConnectionInfo::default()
    })
}

fn sentinel_client(
    config: &RedisConfig,
    sentinel: &crate::config::SentinelConfig,
) -> anyhow::Result<redis::sentinel::SentinelClient> {
    let sentinel_password = match &sentinel.password_file {
        Some(path) => Some(read_password(path, "redis.sentinel.password_file")?),
        None => None,
    };
    let mut nodes = Vec::with_capacity(sentinel.addresses.len());
    for address in &sentinel.addresses {
        nodes.push(ConnectionInfo {
            addr: tcp_addr(address, config.tls, "redis.sentinel.addresses")?,
            redis: RedisConnectionInfo {
                password: sentinel_password.clone(),
                ..RedisConnectionInfo::default()
            },
        });
    }
    let node = redis::sentinel::SentinelNodeConnectionInfo {
        tls_mode: config.tls.then_some(redis::TlsMode::Secure),
        redis_connection_info: Some(redis_info(config)?),
    };
    redis::sentinel::SentinelClient::build(
        nodes,
        sentinel.master_name.clone(),
        Some(node),
        redis::sentinel::SentinelServerType::Master,
    )
    .context("redis.sentinel")
}

/// A `host:port` (IPv6 hosts in brackets) from the configuration's `field`, over TLS if
/// `tls`: the Redis server's address and each Sentinel's are written the same way.
fn tcp_addr(address: &str, tls: bool, field: &str) -> anyhow::Result<ConnectionAddr> {
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("{field}: expected host:port"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{field}: bad port in {address:?}"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(if tls {
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host, port)
    })
}

fn direct_client(config: &RedisConfig) -> anyhow::Result<redis::Client> {
    let address = config
        .address
        .as_deref()
        .context("redis.address is not set")?;
    let addr = match config.network {
        RedisNetwork::Tcp => tcp_addr(address, config.tls, "redis.address")?,
        RedisNetwork::Unix => ConnectionAddr::Unix(address.into()),
    };
    let info = ConnectionInfo {
        addr,
        redis: redis_info(config)?,
    };
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("{field}: cannot read {}", path.display()))
    };
    let root_cert = match &config.ca_certificate_file {
        Some(path) => Some(read("redis.ca_certificate_file", path)?),
        None => None,
    };
    let client_tls = match (&config.certificate_file, &config.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.certificate_file", cert)?,
            client_key: read("redis.key_file", key)?,
        }),
        _ => None,
    };
    let client = if root_cert.is_some() || client_tls.is_some() {
        redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .context("redis.ca_certificate_file / redis.certificate_file")?
    } else {
        redis::Client::open(info).context("redis.address")?
    };
    Ok(client)
}

impl Redis {
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// `<prefix>:<name>:` followed by the id as 8 little-endian bytes (real kas's
    /// `PrefixedInt64Key`): binary, not decimal.
    pub fn int64_key(&self, name: &str, id: i64) -> Vec<u8> {
        int64_key(&self.key_prefix, name, id)
    }

    /// `<prefix>:<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.key_prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let mut state = self.conn.lock().await;
        if let Some((conn, _)) = &state.conn {
            return Ok(conn.clone());
        }
        if let Some((at, error)) = &state.failed {
            if at.elapsed() < RECONNECT_PAUSE {
                return Err(RedisError::Unreachable(at.elapsed(), error.clone()));
            }
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.dial_timeout)
            .set_response_timeout(self.op_timeout)
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let result = tokio::time::timeout(self.dial_timeout + self.op_timeout, async {
            let client = self.client().await?;
            let conn = client.get_connection_manager_with_config(config).await?;
            Ok::<_, redis::RedisError>((conn, client))
        })
        .await;
        match result {
            Ok(Ok((conn, client))) => {
                state.conn = Some((conn.clone(), client));
                state.failed = None;
                Ok(conn)
            }
            Ok(Err(e)) => {
                state.failed = Some((Instant::now(), e.to_string()));
                Err(e.into())
            }
            Err(_) => {
                let timeout = self.dial_timeout + self.op_timeout;
                state.failed = Some((
                    Instant::now(),
                    format!("connect timed out after {timeout:?}"),
                ));
                Err(RedisError::Timeout(timeout))
            }
        }
    }

    /// The server's client: the configured one, or the master's the sentinels name now.
    async fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.source {
            Source::Direct(client) => Ok(client.clone()),
            Source::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }

    /// Runs one operation on the shared connection within the operation timeout, counted
    /// as `op`.
    pub async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, RedisError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let result = async {
            let failed_at = *self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = failed_at.filter(|at| at.elapsed() < RECONNECT_PAUSE) {
                return Err(RedisError::Unreachable(
                    at.elapsed(),
                    "an operation failed just before".into(),
                ));
            }
            let conn = self.connection().await?;
            match tokio::time::timeout(self.op_timeout, f(conn)).await {
                Ok(result) => result.map_err(RedisError::from),
                Err(_) => Err(RedisError::Timeout(self.op_timeout)),
            }
        }
        .await;
        let label = if result.is_ok() {
            "ok"
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            {
                let mut last = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
                if !matches!(result, Err(RedisError::Unreachable(..))) || last.is_none() {
                    *last = Some(Instant::now());
                }
            }
            // With Sentinel a failure may be a failover: ask the sentinels again next time.
            if matches!(self.source, Source::Sentinel(_))
                && !matches!(result, Err(RedisError::Unreachable(..)))
            {
                self.conn.lock().await.conn = None;
            }
            "error"
        };
        self.metrics
            .operations
            .with_label_values(&[op, label])
            .inc();
        result
    }

    /// A dedicated pub/sub connection (pub/sub cannot share the multiplexed one).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, RedisError> {
        let pubsub = async { self.client().await?.get_async_pubsub().await };
        match tokio::time::timeout(self.dial_timeout, pubsub).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout(self.dial_timeout)),
        }
    }

    /// Asks the server who it is (`INFO server`); a changed `run_id` counts as an error, so
    /// writers rewrite their state into the new server. Failures count as errors too.
    pub async fn probe(&self) {
        let info = self
            .run("probe", |mut conn| async move {
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut conn)
                    .await
            })
            .await;
        let Ok(info) = info else {
            return;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
        else {
            return;
        };
        let mut last = self.run_id.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref().is_some_and(|old| *old != id) {
            tracing::warn!(
                "Redis restarted or failed over (new run_id); rewriting this pod's entries"
            );
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        *last = Some(id);
    }

    /// Failed operations since start (see the field).
    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn metrics(&self) -> &RedisMetrics {
        &self.metrics
    }
}

pub fn int64_key(prefix: &str, name: &str, id: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + name.len() + 10);
    key.extend_from_slice(prefix.as_bytes());
    key.push(b':');
    key.extend_from_slice(name.as_bytes());
    key.push(b':');
    key.extend_from_slice(&id.to_le_bytes());
    key
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `ExpiringValue{expires_at = now + ttl, value}`, protobuf-encoded.
pub fn expiring_value(ttl: Duration, value: Vec<u8>) -> Vec<u8> {
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    ExpiringValue {
        expires_at: unix_now().saturating_add(ttl),
        value,
    }
    .encode_to_vec()
}

/// The value inside an `ExpiringValue` if it has not expired; `None` if it has or does not
/// decode (both are garbage to collect).
pub fn live_value(bytes: &[u8], now: i64) -> Option<Vec<u8>> {
    let v = ExpiringValue::decode(bytes).ok()?;
    (v.expires_at >= now).then_some(v.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_binary_little_endian_ids() {
        assert_eq!(
            int64_key("gitlab-kas", "tunnel_tracker2:kas_by_agent_id", 123),
            b"gitlab-kas:tunnel_tracker2:kas_by_agent_id:\x7b\0\0\0\0\0\0\0".to_vec()
        );
    }

    #[test]
    fn expiring_values_round_trip_and_expire() {
        let bytes = expiring_value(Duration::from_secs(300), Vec::new());
        let now = unix_now();
        assert_eq!(live_value(&bytes, now), Some(Vec::new()));
        assert_eq!(live_value(&bytes, now + 301), None);
        assert_eq!(live_value(b"\xff\xff", now), None);
        // Field 1 (varint) only: an empty value is not written, as Go's proto.Marshal.
        assert_eq!(bytes[0], 0x08);
    }
}
