//! New agent calls per token and minute, counted across the fleet in Redis as real kas
//! counts them (`redistool.TokenLimiter`): the key is
//! `<prefix>:agent_limit:<SHA-256 of the token's first half>:<minute of the hour, u16 LE>`;
//! a call reads the count (`GET`) and, under the limit, counts itself
//! (`MULTI; INCR; EXPIRE 59; EXEC`). Real kas refuses calls when Redis fails; this kas lets
//! them through (an outage must not take agents down) and counts them in
//! `kas_token_limiter_fail_open_total`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, Registry};
use sha2::{Digest, Sha256};

use kas_common::metrics::register;

use super::redis::Redis;

pub const KEY_NAME: &str = "agent_limit";

pub struct TokenLimiter {
    redis: Arc<Redis>,
    limit_per_minute: u64,
    refused: IntCounter,
    fail_open: IntCounter,
}

/// The key of `token` in `minute` (0–59).
pub fn key(prefix: &str, token: &str, minute: u16) -> Vec<u8> {
    let half = &token.as_bytes()[..token.len() / 2];
    let mut key = format!("{prefix}:{KEY_NAME}:").into_bytes();
    key.extend_from_slice(&Sha256::digest(half));
    key.push(b':');
    key.extend_from_slice(&minute.to_le_bytes());
    key
}

fn minute_now() -> u16 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u16::try_from((secs / 60) % 60).unwrap_or(0)
}

impl TokenLimiter {
    pub fn new(redis: Arc<Redis>, limit_per_minute: u64, registry: &Registry) -> Self {
        Self {
            redis,
            limit_per_minute,
            refused: register(
                registry,
                IntCounter::new(
                    "kas_token_limiter_refused_total",
                    "Agent calls refused: their token made more than agent.connections_per_token_per_minute calls this minute (counted in Redis across the fleet).",
                )
                .expect("valid metric"),
            ),
            fail_open: register(
                registry,
                IntCounter::new(
                    "kas_token_limiter_fail_open_total",
                    "Agent calls let through uncounted because Redis failed.",
                )
                .expect("valid metric"),
            ),
        }
    }

    /// Whether a new call with `token` is within the limit (and counts it).
    pub async fn allow(&self, token: &str) -> bool {
        let key = key(self.redis.key_prefix(), token, minute_now());
        let limit = self.limit_per_minute;
        let result = self
            .redis
            .run("token_limit", |mut conn| async move {
                let count: Option<u64> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                if count.unwrap_or(0) >= limit {
                    return Ok(false);
                }
                redis::pipe()
                    .atomic()
                    .cmd("INCR")
                    .arg(&key)
                    .ignore()
                    .cmd("EXPIRE")
                    .arg(&key)
                    .arg(59)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(true)
            })
            .await;
        match result {
            Ok(true) => true,
            Ok(false) => {
                self.refused.inc();
                false
            }
            Err(e) => {
                self.fail_open.inc();
                tracing::debug!(error = %e, "token limiter: Redis failed; letting the call through");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_hashes_the_first_half_and_ends_with_the_minute() {
        let k = key("gitlab-kas", "abcdefgh", 7);
        let mut want = b"gitlab-kas:agent_limit:".to_vec();
        want.extend_from_slice(&Sha256::digest(b"abcd"));
        want.extend_from_slice(b":\x07\x00");
        assert_eq!(k, want);
    }
}
