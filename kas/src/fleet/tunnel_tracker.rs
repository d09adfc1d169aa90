//! Which pods hold ready tunnels of which agent, in Redis as real kas v16 writes it
//! (`tunnel_tracker2`): per agent the hash `<prefix>:tunnel_tracker2:kas_by_agent_id:<le64 id>`,
//! per pod the field `<its private API URL>`, valued `ExpiringValue{expires_at}`.
//!
//! The registry tells [`RedisTunnelTracker`] when an agent's first ready tunnel arrives and
//! its last one leaves; one task turns that into Redis writes:
//!
//! - register (first tunnel): `MULTI; HSET key url value; PEXPIRE key ttl; EXEC`;
//! - unregister (no ready tunnel left): `HDEL key url`, 5 s later — agentk replaces a used
//!   tunnel at once, so an agent under load costs no write per request;
//! - refresh: every agent with tunnels rewritten every `conn_info_refresh` (240 s) in one
//!   MULTI/EXEC per batch: steady state costs agents / 240 s operations;
//! - failed writes are retried (1 s doubling to 30 s), and after any Redis error (anyone's:
//!   a lookup that failed means Redis may have restarted empty) everything is rewritten
//!   once Redis works again, so an outage is repaired in seconds, not at the next refresh;
//! - stop (drain): HDEL of every registered agent within 5 s.
//!
//! Nothing here ever blocks the registry or an agent's stream.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::redis::{expiring_value, live_value, unix_now, Redis, RedisError};
use crate::tunnel::TunnelTracker;

/// The key's name between prefix and agent id (real kas's, byte for byte).
pub const KEY_NAME: &str = "tunnel_tracker2:kas_by_agent_id";
/// How long an agent without ready tunnels stays registered (real kas: 5 s).
pub const UNREGISTRATION_DELAY: Duration = Duration::from_secs(5);
/// Agents written per MULTI/EXEC.
const BATCH: usize = 200;
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the task checks whether Redis failed or restarted since it last wrote
/// everything (one `INFO server` per period while this pod holds tunnels).
const HEALTH_CHECK: Duration = Duration::from_secs(2);
/// How long the drain's HDELs may take together.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Fields read per lookup at most: more pods than this holding one agent is not a fleet.
pub const MAX_URLS: usize = 1000;

#[derive(Default)]
struct Changes {
    /// Latest state per agent since the task last looked (bounded by the agents with
    /// tunnels on this pod: the registry's own bounds).
    latest: HashMap<i64, bool>,
}

struct Shared {
    changes: Mutex<Changes>,
    notify: Notify,
}

/// The Redis [`TunnelTracker`]: cheap to notify, writes in its own task ([`Self::run`]).
pub struct RedisTunnelTracker {
    shared: Arc<Shared>,
}

/// The task's side: started by [`RedisTunnelTracker::new`], run by the server.
pub struct TrackerTask {
    shared: Arc<Shared>,
    redis: Arc<Redis>,
    own_url: String,
    ttl: Duration,
    refresh: Duration,
}

impl TunnelTracker for RedisTunnelTracker {
    fn set_has_tunnels(&self, agent_id: i64, has_tunnels: bool) {
        let mut changes = self
            .shared
            .changes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        changes.latest.insert(agent_id, has_tunnels);
        drop(changes);
        self.shared.notify.notify_one();
    }
}

impl RedisTunnelTracker {
    pub fn new(
        redis: Arc<Redis>,
        own_url: String,
        ttl: Duration,
        refresh: Duration,
    ) -> (Self, TrackerTask) {
        let shared = Arc::new(Shared {
            changes: Mutex::new(Changes::default()),
            notify: Notify::new(),
        });
        (
            Self {
                shared: shared.clone(),
            },
            TrackerTask {
                shared,
                redis,
                own_url,
                ttl,
                refresh,
            },
        )
    }
}

/// The URLs of the pods that hold ready tunnels of `agent_id`, expired fields left out
/// (and deleted, as real kas does: the tracker has no other garbage collection).
pub async fn kas_urls(redis: &Redis, agent_id: i64) -> Result<Vec<String>, RedisError> {
    let key = redis.int64_key(KEY_NAME, agent_id);
    let (fields, expired) = redis
        .run("tunnel_lookup", |mut conn| {
            let key = key.clone();
            async move {
                let now = unix_now();
                let mut cursor = 0u64;
                let mut live = Vec::new();
                let mut expired = Vec::new();
                // Bounded: at most MAX_URLS fields, each scan step returns some.
                for _ in 0..MAX_URLS {
                    let (next, flat): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                        .arg(&key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(100)
                        .query_async(&mut conn)
                        .await?;
                    for pair in flat.chunks_exact(2) {
                        match live_value(&pair[1], now) {
                            Some(_) => live.push(pair[0].clone()),
                            None => expired.push(pair[0].clone()),
                        }
                    }
                    cursor = next;
                    if cursor == 0 || live.len() >= MAX_URLS {
                        break;
                    }
                }
                Ok((live, expired))
            }
        })
        .await?;
    if !expired.is_empty() {
        let _ = redis
            .run("tunnel_gc", |mut conn| async move {
                redis::cmd("HDEL")
                    .arg(&key)
                    .arg(&expired)
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await;
    }
    Ok(fields
        .into_iter()
        .filter_map(|f| String::from_utf8(f).ok())
        .collect())
}

impl TrackerTask {
    /// Runs until `stop`, then unregisters everything this pod registered.
    pub async fn run(self, stop: CancellationToken) {
        let mut registered: HashSet<i64> = HashSet::new();
        let mut unregister_at: HashMap<i64, Instant> = HashMap::new();
        let mut retry: HashSet<i64> = HashSet::new();
        let mut retry_delay = RETRY_MIN;
        let mut retry_at: Option<Instant> = None;
        let mut refresh = tokio::time::interval_at(Instant::now() + self.refresh, self.refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health = tokio::time::interval(HEALTH_CHECK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_errors = self.redis.error_count();
        loop {
            let next_unregister = unregister_at.values().min().copied();
            let mut write: Vec<i64> = Vec::new();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.shared.notify.notified() => {
                    let latest = std::mem::take(
                        &mut self.shared.changes.lock().unwrap_or_else(|p| p.into_inner()).latest,
                    );
                    for (agent_id, has) in latest {
                        if has {
                            unregister_at.remove(&agent_id);
                            if registered.insert(agent_id) {
                                write.push(agent_id);
                            }
                        } else if registered.contains(&agent_id) {
                            unregister_at
                                .entry(agent_id)
                                .or_insert_with(|| Instant::now() + UNREGISTRATION_DELAY);
                        }
                    }
                }
                _ = sleep_until(next_unregister) => {
                    let now = Instant::now();
                    let due: Vec<i64> = unregister_at
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in &due {
                        unregister_at.remove(id);
                        registered.remove(id);
                        retry.remove(id);
                    }
                    // A failed HDEL is left to the field's expiry (and lookups skip it).
                    let _ = self.unregister(&due).await;
                }
                _ = refresh.tick() => write.extend(registered.iter().copied()),
                _ = health.tick() => {
                    if !registered.is_empty() {
                        self.redis.probe().await;
                    }
                    let errors = self.redis.error_count();
                    if errors != seen_errors {
                        seen_errors = errors;
                        write.extend(registered.iter().copied());
                    }
                }
                _ = sleep_until(retry_at) => {
                    retry_at = None;
                    write.extend(retry.drain().filter(|id| registered.contains(id)));
                }
            }
            if write.is_empty() {
                continue;
            }
            write.sort_unstable();
            write.dedup();
            let mut failed = false;
            for batch in write.chunks(BATCH) {
                if let Err(e) = self.register(batch).await {
                    if !failed {
                        tracing::warn!(error = %e, agents = batch.len(), "tunnel tracker: cannot write to Redis; retrying");
                    }
                    failed = true;
                    retry.extend(batch.iter().copied());
                }
            }
            if failed {
                retry_at = Some(Instant::now() + retry_delay);
                retry_delay = (retry_delay * 2).min(RETRY_MAX);
            } else if retry.is_empty() {
                retry_delay = RETRY_MIN;
            }
        }
        let all: Vec<i64> = registered.into_iter().collect();
        let unregister = async {
            for batch in all.chunks(BATCH) {
                if let Err(e) = self.unregister(batch).await {
                    tracing::warn!(error = %e, "tunnel tracker: cannot unregister at drain; entries expire by themselves");
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(STOP_TIMEOUT, unregister).await;
    }

    async fn register(&self, agents: &[i64]) -> Result<(), RedisError> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for &agent_id in agents {
            let key = self.redis.int64_key(KEY_NAME, agent_id);
            pipe.cmd("HSET")
                .arg(&key)
                .arg(&self.own_url)
                .arg(expiring_value(self.ttl, Vec::new()))
                .ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
        }
        self.redis
            .run("tunnel_register", |mut conn| async move {
                pipe.query_async::<()>(&mut conn).await
            })
            .await
    }

    async fn unregister(&self, agents: &[i64]) -> Result<(), RedisError> {
        if agents.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for &agent_id in agents {
            pipe.cmd("HDEL")
                .arg(self.redis.int64_key(KEY_NAME, agent_id))
                .arg(&self.own_url)
                .ignore();
        }
        self.redis
            .run("tunnel_unregister", |mut conn| async move {
                pipe.query_async::<()>(&mut conn).await
            })
            .await
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
