//! Connected agents (GitLab's UI lists them through the API port), in Redis as real kas
//! v16 writes them (`agent_tracker2`):
//!
//! - `<prefix>:agent_tracker2:conn_by_agent_id:<le64 agent id>` and
//!   `…:conn_by_project_id:<le64 project id>`: field = connection id in decimal, value =
//!   `ExpiringValue{expires_at, value = ConnectedAgentInfo}`;
//! - `<prefix>:agent_tracker2:connected_agents`: field = agent id in decimal, value =
//!   `ExpiringValue{expires_at}` (for counting).
//!
//! Written by configuration streams (a random connection id, removed when the stream
//! ends) and by `AgentRegistrar/Register` (the agent pod's id, left to expire: agentk calls
//! it every 5 minutes). Every key gets `PEXPIRE ttl`; this pod's entries are rewritten every
//! refresh period and expired fields of the keys it wrote are removed every GC period.
//!
//! Without Redis the tracker keeps this pod's streams only and answers from them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use kas_proto::agent_tracker::ConnectedAgentInfo;

use super::redis::{expiring_value, live_value, unix_now, Redis, RedisError};

pub const BY_AGENT: &str = "agent_tracker2:conn_by_agent_id";
pub const BY_PROJECT: &str = "agent_tracker2:conn_by_project_id";
pub const CONNECTED_AGENTS: &str = "agent_tracker2:connected_agents";
/// Connections one answer lists at most.
const MAX_ANSWER: usize = 10_000;
const BATCH: usize = 200;
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    /// This pod's connections (bounded by its streams, themselves bounded by connections).
    local: HashMap<i64, ConnectedAgentInfo>,
    /// Connections to write, and entries to delete, since the task last looked.
    to_write: HashSet<i64>,
    to_delete: Vec<ConnectedAgentInfo>,
}

struct Inner {
    redis: Option<Arc<Redis>>,
    state: Mutex<State>,
    notify: Notify,
    ttl: Duration,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct AgentTracker {
    inner: Arc<Inner>,
}

/// A tracked connection; dropping it removes the entry.
pub struct Tracked {
    inner: Arc<Inner>,
    connection_id: i64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(info) = state.local.remove(&self.connection_id) {
            state.to_write.remove(&self.connection_id);
            if self.inner.redis.is_some() {
                state.to_delete.push(info);
            }
        }
        drop(state);
        self.inner.notify.notify_one();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AgentTracker {
    pub fn new(redis: Option<Arc<Redis>>, ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                state: Mutex::new(State::default()),
                notify: Notify::new(),
                ttl,
            }),
        }
    }

    /// Tracks a connection (a configuration stream) while the returned value lives.
    pub fn track(&self, info: ConnectedAgentInfo) -> Tracked {
        let connection_id = info.connection_id;
        let mut state = self.inner.lock();
        state.local.insert(connection_id, info);
        if self.inner.redis.is_some() {
            state.to_write.insert(connection_id);
        }
        drop(state);
        self.inner.notify.notify_one();
        Tracked {
            inner: self.inner.clone(),
            connection_id,
        }
    }

    /// Writes an entry once, left to expire (`AgentRegistrar/Register`).
    pub async fn register_once(&self, info: &ConnectedAgentInfo) -> Result<(), RedisError> {
        match &self.inner.redis {
            Some(redis) => write(redis, self.inner.ttl, std::slice::from_ref(info)).await,
            None => Ok(()),
        }
    }

    /// Connected agents by agent id.
    pub async fn by_agent(&self, agent_id: i64) -> Result<Vec<ConnectedAgentInfo>, RedisError> {
        match &self.inner.redis {
            Some(redis) => read(redis, redis.int64_key(BY_AGENT, agent_id)).await,
            None => Ok(self.local(|i| i.agent_id == agent_id)),
        }
    }

    /// Connected agents of a project.
    pub async fn by_project(&self, project_id: i64) -> Result<Vec<ConnectedAgentInfo>, RedisError> {
        match &self.inner.redis {
            Some(redis) => read(redis, redis.int64_key(BY_PROJECT, project_id)).await,
            None => Ok(self.local(|i| i.project_id == project_id)),
        }
    }

    fn local(&self, keep: impl Fn(&ConnectedAgentInfo) -> bool) -> Vec<ConnectedAgentInfo> {
        let state = self.inner.lock();
        let mut out: Vec<_> = state.local.values().filter(|i| keep(i)).cloned().collect();
        out.sort_by_key(|i| i.connection_id);
        out.truncate(MAX_ANSWER);
        out
    }

    /// Writes, refreshes and garbage-collects this pod's entries until `stop`.
    pub async fn run(self, refresh: Duration, gc: Duration, stop: CancellationToken) {
        let Some(redis) = self.inner.redis.clone() else {
            return;
        };
        let ttl = self.inner.ttl;
        let mut refresh = tokio::time::interval_at(Instant::now() + refresh, refresh);
        let mut gc = tokio::time::interval_at(Instant::now() + gc, gc);
        let mut retry_at: Option<Instant> = None;
        let mut retry_delay = RETRY_MIN;
        // Keys this pod wrote to, for the GC (bounded by the agents and projects it served
        // within one GC period).
        let mut written_keys: HashSet<Vec<u8>> = HashSet::new();
        // After any Redis error, everything is rewritten once Redis works again (it may
        // have restarted empty).
        let mut health = tokio::time::interval(Duration::from_secs(2));
        let mut seen_errors = redis.error_count();
        loop {
            let mut all = false;
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = health.tick() => {
                    if !self.inner.lock().local.is_empty() {
                        redis.probe().await;
                    }
                    let errors = redis.error_count();
                    if errors == seen_errors {
                        continue;
                    }
                    seen_errors = errors;
                    all = true;
                }
                _ = self.inner.notify.notified() => {}
                _ = refresh.tick() => all = true,
                _ = sleep_until(retry_at) => { retry_at = None; all = true; }
                _ = gc.tick() => {
                    for key in std::mem::take(&mut written_keys) {
                        let _ = collect_garbage(&redis, key).await;
                    }
                    continue;
                }
            }
            let (writes, deletes) = {
                let mut state = self.inner.lock();
                let ids: Vec<i64> = if all {
                    state.to_write.clear();
                    state.local.keys().copied().collect()
                } else {
                    state.to_write.drain().collect()
                };
                let writes: Vec<ConnectedAgentInfo> = ids
                    .iter()
                    .filter_map(|id| state.local.get(id).cloned())
                    .collect();
                (writes, std::mem::take(&mut state.to_delete))
            };
            let mut failed = false;
            for batch in writes.chunks(BATCH) {
                for info in batch {
                    written_keys.insert(redis.int64_key(BY_AGENT, info.agent_id));
                    written_keys.insert(redis.int64_key(BY_PROJECT, info.project_id));
                }
                if let Err(e) = write(&redis, ttl, batch).await {
                    if !failed {
                        tracing::warn!(error = %e, "agent tracker: cannot write to Redis; retrying");
                    }
                    failed = true;
                }
            }
            for batch in deletes.chunks(BATCH) {
                // A failed delete is left to the entries' expiry.
                let _ = delete(&redis, batch).await;
            }
            if failed {
                retry_at = Some(Instant::now() + retry_delay);
                retry_delay = (retry_delay * 2).min(RETRY_MAX);
            } else if retry_at.is_none() {
                retry_delay = RETRY_MIN;
            }
        }
        // The drain: this pod's streams are ending; remove their entries.
        let infos: Vec<ConnectedAgentInfo> = self.inner.lock().local.values().cloned().collect();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            for batch in infos.chunks(BATCH) {
                if delete(&redis, batch).await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
}

async fn write(
    redis: &Redis,
    ttl: Duration,
    infos: &[ConnectedAgentInfo],
) -> Result<(), RedisError> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let connected = redis.key(CONNECTED_AGENTS);
    let mut pipe = redis::pipe();
    pipe.atomic();
    for info in infos {
        let value = expiring_value(ttl, info.encode_to_vec());
        let field = info.connection_id.to_string();
        for key in [
            redis.int64_key(BY_AGENT, info.agent_id),
            redis.int64_key(BY_PROJECT, info.project_id),
        ] {
            pipe.cmd("HSET").arg(&key).arg(&field).arg(&value).ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
        }
        pipe.cmd("HSET")
            .arg(&connected)
            .arg(info.agent_id.to_string())
            .arg(expiring_value(ttl, Vec::new()))
            .ignore();
    }
    pipe.cmd("PEXPIRE").arg(&connected).arg(ttl_ms).ignore();
    redis
        .run("agent_tracker_write", |mut conn| async move {
            pipe.query_async::<()>(&mut conn).await
        })
        .await
}

async fn delete(redis: &Redis, infos: &[ConnectedAgentInfo]) -> Result<(), RedisError> {
    let mut pipe = redis::pipe();
    for info in infos {
        let field = info.connection_id.to_string();
        pipe.cmd("HDEL")
            .arg(redis.int64_key(BY_AGENT, info.agent_id))
            .arg(&field)
            .ignore();
        pipe.cmd("HDEL")
            .arg(redis.int64_key(BY_PROJECT, info.project_id))
            .arg(&field)
            .ignore();
    }
    redis
        .run("agent_tracker_delete", |mut conn| async move {
            pipe.query_async::<()>(&mut conn).await
        })
        .await
}

/// The live fields of one hash (HSCAN, bounded), each decoded.
async fn scan(
    redis: &Redis,
    op: &'static str,
    key: Vec<u8>,
) -> Result<(Vec<Vec<u8>>, Vec<Vec<u8>>), RedisError> {
    redis
        .run(op, |mut conn| async move {
            let now = unix_now();
            let (mut live, mut expired) = (Vec::new(), Vec::new());
            let mut cursor = 0u64;
            for _ in 0..MAX_ANSWER {
                let (next, flat): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                    .arg(&key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut conn)
                    .await?;
                for pair in flat.chunks_exact(2) {
                    match live_value(&pair[1], now) {
                        Some(v) => live.push(v),
                        None => expired.push(pair[0].clone()),
                    }
                }
                cursor = next;
                if cursor == 0 || live.len() >= MAX_ANSWER {
                    break;
                }
            }
            Ok((live, expired))
        })
        .await
}

async fn read(redis: &Redis, key: Vec<u8>) -> Result<Vec<ConnectedAgentInfo>, RedisError> {
    let (live, _) = scan(redis, "agent_tracker_read", key).await?;
    let mut out: Vec<ConnectedAgentInfo> = live
        .iter()
        .filter_map(|v| ConnectedAgentInfo::decode(v.as_slice()).ok())
        .collect();
    out.sort_by_key(|i| i.connection_id);
    Ok(out)
}

async fn collect_garbage(redis: &Redis, key: Vec<u8>) -> Result<(), RedisError> {
    let (_, expired) = scan(redis, "agent_tracker_gc", key.clone()).await?;
    if expired.is_empty() {
        return Ok(());
    }
    redis
        .run("agent_tracker_gc", |mut conn| async move {
            redis::cmd("HDEL")
                .arg(&key)
                .arg(&expired)
                .query_async::<i64>(&mut conn)
                .await
                .map(|_| ())
        })
        .await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
