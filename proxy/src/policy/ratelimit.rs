//! Rate and connection limits from `policies/limits.toml`, so a flood from one client,
//! or one leaked agent token, cannot take kas down for everyone.
//!
//! Per client IP: new connections per second (checked at accept, before TLS),
//! concurrent connections, requests/streams per second. Per agent token: new streams and
//! requests per minute, like kas's `connections_per_token_per_minute`, keyed by a salted
//! hash of the bearer token (parsed exactly as kas parses it, [`AgentToken`]) so the token
//! itself is never stored or logged and many agents behind one NAT address do not share a
//! budget. Optional ban: a client over its limits `violations`
//! times within `window` is refused for `duration`.
//!
//! Rates are GCRA (`governor`), exact per key. Memory is bounded: idle keys are evicted
//! periodically and whenever a table grows past `max_tracked_keys`.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use crate::policy::file::{self as policy_file, PolicyFileError};

/// The file's shape. Every limit is optional: absent means unlimited.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub per_ip: PerIp,
    pub per_token: PerToken,
    pub ban: Ban,
    pub max_tracked_keys: Option<usize>,
    /// What parsing had to say about how the file is written.
    #[serde(skip)]
    notes: Notes,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PerIp {
    pub new_connections_per_second: Option<u32>,
    pub new_connections_burst: Option<u32>,
    pub max_concurrent_connections: Option<usize>,
    pub requests_per_second: Option<u32>,
    pub requests_burst: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PerToken {
    /// New streams (gRPC calls, websocket upgrades) and other requests presenting one agent
    /// token, per minute.
    pub new_streams_per_minute: Option<u32>,
    /// The deprecated name of `new_streams_per_minute` (it never counted connections);
    /// [`LimitsConfig::parse`] moves it there with a warning.
    #[serde(rename = "new_connections_per_minute")]
    deprecated_new_connections_per_minute: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Ban {
    /// 0 disables banning.
    pub violations: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

impl Default for Ban {
    fn default() -> Self {
        Self {
            violations: 0,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(600),
        }
    }
}

/// Warnings about how a limits file is written (deprecated names), each naming file and
/// line; logged once when the file is loaded and printed by `kas-edge check`. They are not
/// limits: two files that differ only in spelling compare equal, so renaming a key does not
/// restart the counters on reload.
#[derive(Debug, Clone, Default)]
struct Notes(Vec<String>);

impl PartialEq for Notes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

const DEFAULT_MAX_KEYS: usize = 100_000;

impl LimitsConfig {
    pub fn parse(label: &str, text: &str) -> Result<Self, PolicyFileError> {
        let invalid = |message: String| policy_file::invalid(label, message);
        let mut config: LimitsConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if let Some(old) = config
            .per_token
            .deprecated_new_connections_per_minute
            .take()
        {
            const OLD: &str = "per_token.new_connections_per_minute";
            const NEW: &str = "per_token.new_streams_per_minute";
            let line = line_of(text, "new_connections_per_minute");
            let at = line.map_or_else(|| label.to_owned(), |line| format!("{label}:{line}"));
            if config.per_token.new_streams_per_minute.is_some() {
                return Err(invalid(format!(
                    "field `{OLD}`{}: the deprecated name of `{NEW}`, which is set too; \
                     keep only `{NEW}`",
                    line.map_or_else(String::new, |line| format!(" (line {line})"))
                )));
            }
            if old == 0 {
                return Err(invalid(format!(
                    "field `{OLD}`: 0 would refuse everything; remove the line for no limit"
                )));
            }
            config.per_token.new_streams_per_minute = Some(old);
            config.notes.0.push(format!(
                "{at}: field `{OLD}` is deprecated: it counts new streams and requests per \
                 token, not connections; rename it to `{NEW}`"
            ));
        }

        let zero_rates = [
            (
                "per_ip.new_connections_per_second",
                config.per_ip.new_connections_per_second,
            ),
            (
                "per_ip.new_connections_burst",
                config.per_ip.new_connections_burst,
            ),
            (
                "per_ip.requests_per_second",
                config.per_ip.requests_per_second,
            ),
            ("per_ip.requests_burst", config.per_ip.requests_burst),
            (
                "per_token.new_streams_per_minute",
                config.per_token.new_streams_per_minute,
            ),
        ];
        for (field, value) in zero_rates {
            if value == Some(0) {
                return Err(invalid(format!(
                    "field `{field}`: 0 would refuse everything; remove the line for no limit"
                )));
            }
        }
        if config.per_ip.max_concurrent_connections == Some(0) {
            return Err(invalid(
                "field `per_ip.max_concurrent_connections`: 0 would refuse everything".into(),
            ));
        }
        if config.ban.violations > 0
            && (config.ban.window.is_zero() || config.ban.duration.is_zero())
        {
            return Err(invalid(
                "field `ban`: window and duration must be > 0 when violations is set".into(),
            ));
        }
        if config.max_tracked_keys == Some(0) {
            return Err(invalid(
                "field `max_tracked_keys`: must be at least 1".into(),
            ));
        }
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, PolicyFileError> {
        policy_file::load(path, Self::parse)
    }

    /// Warnings about the file as written (deprecated names), for the log and `check`.
    pub fn warnings(&self) -> &[String] {
        &self.notes.0
    }
}

/// The 1-based line of the first `key = ...` assignment in `text`.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// An agent token, as kas reads it: the first `authorization` header, as text, through
/// [`kas_common::auth::bearer_token`] (scheme `Bearer` in any case, token trimmed). The
/// only way to a per-token key, so no spelling of the header that kas accepts gets a
/// budget of its own at the edge.
#[derive(Clone, Copy)]
pub struct AgentToken<'a>(&'a str);

impl<'a> AgentToken<'a> {
    pub fn from_headers(headers: &'a http::HeaderMap) -> Option<Self> {
        let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        kas_common::auth::bearer_token(value).ok().map(Self)
    }
}

impl std::fmt::Debug for AgentToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentToken(..)")
    }
}

/// Why a client was refused, and when it may try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub retry_after: Duration,
}

type Keyed<K> = DefaultKeyedRateLimiter<K>;

fn keyed<K: std::hash::Hash + Eq + Clone>(quota: Option<Quota>) -> Option<Keyed<K>> {
    quota.map(RateLimiter::keyed)
}

fn per_second(rate: Option<u32>, burst: Option<u32>) -> Option<Quota> {
    let rate = NonZeroU32::new(rate?)?;
    let burst = burst.and_then(NonZeroU32::new).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

struct Violations {
    window_start: Instant,
    count: u32,
    banned_until: Option<Instant>,
}

/// The live limits. Rebuilt from the file on reload (counters restart).
pub struct Limiter {
    config: LimitsConfig,
    clock: DefaultClock,
    connections: Option<Keyed<IpAddr>>,
    requests: Option<Keyed<IpAddr>>,
    tokens: Option<Keyed<u64>>,
    violations: Mutex<HashMap<IpAddr, Violations>>,
    max_keys: usize,
    /// Keys token hashes so the table cannot be precomputed against.
    salt: std::collections::hash_map::RandomState,
}

impl Limiter {
    pub fn new(config: LimitsConfig) -> Self {
        let per_ip = &config.per_ip;
        Self {
            connections: keyed(per_second(
                per_ip.new_connections_per_second,
                per_ip.new_connections_burst,
            )),
            requests: keyed(per_second(
                per_ip.requests_per_second,
                per_ip.requests_burst,
            )),
            tokens: keyed(
                config
                    .per_token
                    .new_streams_per_minute
                    .and_then(NonZeroU32::new)
                    .map(Quota::per_minute),
            ),
            max_keys: config.max_tracked_keys.unwrap_or(DEFAULT_MAX_KEYS),
            config,
            clock: DefaultClock::default(),
            violations: Mutex::new(HashMap::new()),
            salt: std::collections::hash_map::RandomState::new(),
        }
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    fn check<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: &Option<Keyed<K>>,
        key: &K,
        reason: &'static str,
    ) -> Result<(), Refusal> {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        if limiter.len() > self.max_keys {
            limiter.retain_recent();
        }
        limiter.check_key(key).map_err(|not_until| Refusal {
            reason,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Records a refusal towards a ban, and checks an existing one.
    fn note(&self, ip: IpAddr, result: Result<(), Refusal>) -> Result<(), Refusal> {
        let ban = &self.config.ban;
        if ban.violations == 0 {
            return result;
        }
        let now = Instant::now();
        let mut violations = crate::support::sync::lock(&self.violations);
        if let Some(v) = violations.get(&ip) {
            if let Some(until) = v.banned_until.filter(|u| *u > now) {
                return Err(Refusal {
                    reason: "banned",
                    retry_after: until - now,
                });
            }
        }
        let Err(refusal) = result else { return Ok(()) };
        if violations.len() >= self.max_keys {
            violations.retain(|_, v| v.banned_until.is_some_and(|u| u > now));
        }
        let v = violations.entry(ip).or_insert(Violations {
            window_start: now,
            count: 0,
            banned_until: None,
        });
        if now.duration_since(v.window_start) > ban.window {
            v.window_start = now;
            v.count = 0;
        }
        v.count += 1;
        if v.count >= ban.violations {
            v.banned_until = Some(now + ban.duration);
            tracing::warn!(client = %ip, duration = ?ban.duration, "client banned after repeated limit violations");
            return Err(Refusal {
                reason: "banned",
                retry_after: ban.duration,
            });
        }
        Err(refusal)
    }

    /// A new TCP connection from `ip`, before TLS.
    pub fn check_connection(&self, ip: IpAddr) -> Result<(), Refusal> {
        let result = self.check(&self.connections, &ip, "connection_rate");
        self.note(ip, result)
    }

    /// Whether one more concurrent connection from `ip` (which has `open` now) is allowed.
    pub fn check_concurrency(&self, ip: IpAddr, open: usize) -> Result<(), Refusal> {
        let result = match self.config.per_ip.max_concurrent_connections {
            Some(max) if open >= max => Err(Refusal {
                reason: "concurrent_connections",
                retry_after: Duration::from_secs(1),
            }),
            _ => Ok(()),
        };
        self.note(ip, result)
    }

    /// A request or stream from `ip`.
    pub fn check_request(&self, ip: IpAddr) -> Result<(), Refusal> {
        let result = self.check(&self.requests, &ip, "request_rate");
        self.note(ip, result)
    }

    /// A new stream or request from `ip` presenting `token` (hashed here, never kept).
    /// Refused as `token_connection_rate`, the reason's name before the limit was renamed
    /// (dashboards and the runbook know it by that name).
    pub fn check_token(&self, ip: IpAddr, token: AgentToken<'_>) -> Result<(), Refusal> {
        if self.tokens.is_none() {
            return Ok(());
        }
        let mut hasher = self.salt.build_hasher();
        hasher.write(token.0.as_bytes());
        let result = self.check(&self.tokens, &hasher.finish(), "token_connection_rate");
        self.note(ip, result)
    }

    /// Drops keys whose state is back to fresh. Called periodically.
    pub fn evict_idle(&self) {
        for limiter in [&self.connections, &self.requests].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(tokens) = &self.tokens {
            tokens.retain_recent();
            tokens.shrink_to_fit();
        }
        let now = Instant::now();
        let window = self.config.ban.window;
        let mut violations = crate::support::sync::lock(&self.violations);
        violations.retain(|_, v| {
            v.banned_until.is_some_and(|u| u > now) || now.duration_since(v.window_start) <= window
        });
        violations.shrink_to_fit();
    }

    /// Tracked keys across all tables (for metrics and the flood test).
    pub fn tracked_keys(&self) -> usize {
        let tables = [&self.connections, &self.requests]
            .into_iter()
            .flatten()
            .map(|l| l.len())
            .sum::<usize>();
        tables
            + self.tokens.as_ref().map_or(0, |t| t.len())
            + self.violations.lock().map(|v| v.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x7f00_0000 + n))
    }

    fn limiter(text: &str) -> Limiter {
        Limiter::new(LimitsConfig::parse("limits.toml", text).unwrap())
    }
    fn headers(authorization: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(authorization).unwrap(),
        );
        h
    }

    fn check_token(limiter: &Limiter, ip: IpAddr, authorization: &str) -> Result<(), Refusal> {
        let h = headers(authorization);
        limiter.check_token(ip, AgentToken::from_headers(&h).expect("a bearer token"))
    }

    #[test]
    fn parse_errors_name_the_field_and_line() {
        let err =
            LimitsConfig::parse("limits.toml", "[per_ip]\nrequests_per_secnd = 5\n").unwrap_err();
        assert!(
            err.to_string().contains("requests_per_secnd") && err.to_string().contains("line 2"),
            "{err}"
        );
        let err =
            LimitsConfig::parse("limits.toml", "[per_ip]\nrequests_per_second = 0\n").unwrap_err();
        assert!(
            err.to_string().contains("per_ip.requests_per_second"),
            "{err}"
        );
        assert_eq!(
            LimitsConfig::parse("l", "").unwrap(),
            LimitsConfig::default()
        );
    }

    #[test]
    fn the_per_token_limit_is_named_for_streams_and_the_old_name_still_works() {
        let new = LimitsConfig::parse("l", "[per_token]\nnew_streams_per_minute = 7\n").unwrap();
        assert_eq!(new.per_token.new_streams_per_minute, Some(7));
        assert!(new.warnings().is_empty());

        let old = LimitsConfig::parse(
            "policies/limits.toml",
            "# limits\n[per_token]\nnew_connections_per_minute = 7\n",
        )
        .unwrap();
        assert_eq!(old.per_token.new_streams_per_minute, Some(7));
        assert_eq!(old, new, "the same limits, only spelled differently");
        let [warning] = old.warnings() else {
            panic!("one warning: {:?}", old.warnings())
        };
        assert!(
            warning.starts_with("policies/limits.toml:3: ")
                && warning.contains("deprecated")
                && warning.contains("per_token.new_streams_per_minute"),
            "{warning}"
        );

        let both = LimitsConfig::parse(
            "l",
            "[per_token]\nnew_streams_per_minute = 7\nnew_connections_per_minute = 9\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            both.contains("new_connections_per_minute") && both.contains("line 3"),
            "{both}"
        );
        let zero = LimitsConfig::parse("l", "[per_token]\nnew_connections_per_minute = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            zero.contains("per_token.new_connections_per_minute"),
            "{zero}"
        );
    }

    #[test]
    fn connection_rate_refuses_with_retry_after() {
        let limiter = Limiter::new(
            LimitsConfig::parse(
                "l",
                "[per_ip]\nnew_connections_per_second = 1\nnew_connections_burst = 2\n",
            )
            .unwrap(),
        );
        assert!(limiter.check_connection(ip(1)).is_ok());
        assert!(limiter.check_connection(ip(1)).is_ok());
        let refusal = limiter.check_connection(ip(1)).unwrap_err();
        assert_eq!(refusal.reason, "connection_rate");
        assert!(
            refusal.retry_after > Duration::ZERO && refusal.retry_after <= Duration::from_secs(1)
        );
        assert!(
            limiter.check_connection(ip(2)).is_ok(),
            "other clients are unaffected"
        );
    }

    #[test]
    fn tokens_are_isolated_from_each_other() {
        let limiter = limiter("[per_token]\nnew_streams_per_minute = 2\n");
        let same_ip = ip(9);
        assert!(check_token(&limiter, same_ip, "Bearer token-a").is_ok());
        assert!(check_token(&limiter, same_ip, "Bearer token-a").is_ok());
        assert_eq!(
            check_token(&limiter, same_ip, "Bearer token-a")
                .unwrap_err()
                .reason,
            "token_connection_rate"
        );
        assert!(check_token(&limiter, same_ip, "Bearer token-b").is_ok());
    }

    #[test]
    fn every_spelling_kas_accepts_is_the_same_token() {
        let limiter = limiter("[per_token]\nnew_streams_per_minute = 3\n");
        for (n, spelling) in ["Bearer t0k", "bearer  t0k ", "BEARER \tt0k"]
            .into_iter()
            .enumerate()
        {
            assert!(
                check_token(&limiter, ip(n as u32), spelling).is_ok(),
                "{spelling:?}"
            );
        }
        assert!(check_token(&limiter, ip(7), "BeArEr t0k").is_err());
        for not_a_token in ["Basic t0k", "Bearer", "Bearer   ", "t0k"] {
            assert!(
                AgentToken::from_headers(&headers(not_a_token)).is_none(),
                "{not_a_token:?}"
            );
        }
        assert!(AgentToken::from_headers(&http::HeaderMap::new()).is_none());
        let mut non_text = http::HeaderMap::new();
        non_text.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_bytes(b"Bearer t\xff").unwrap(),
        );
        assert!(
            AgentToken::from_headers(&non_text).is_none(),
            "kas refuses it too"
        );
    }

    #[test]
    fn repeated_violations_ban_the_client() {
        let limiter = Limiter::new(
            LimitsConfig::parse(
                "l",
                "[per_ip]\nrequests_per_second = 1\n[ban]\nviolations = 3\nwindow = \"1m\"\nduration = \"10m\"\n",
            )
            .unwrap(),
        );
        assert!(limiter.check_request(ip(3)).is_ok());
        for _ in 0..2 {
            assert_eq!(
                limiter.check_request(ip(3)).unwrap_err().reason,
                "request_rate"
            );
        }
        let ban = limiter.check_request(ip(3)).unwrap_err();
        assert_eq!(ban.reason, "banned");
        assert!(ban.retry_after > Duration::from_secs(500));
        assert_eq!(
            limiter.check_connection(ip(3)).unwrap_err().reason,
            "banned"
        );
    }

    #[test]
    fn concurrency_limit() {
        let limiter = Limiter::new(
            LimitsConfig::parse("l", "[per_ip]\nmax_concurrent_connections = 2\n").unwrap(),
        );
        assert!(limiter.check_concurrency(ip(1), 1).is_ok());
        assert_eq!(
            limiter.check_concurrency(ip(1), 2).unwrap_err().reason,
            "concurrent_connections"
        );
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_bounded() {
        let limiter = Limiter::new(
            LimitsConfig::parse(
                "l",
                "max_tracked_keys = 1000\n[per_ip]\nnew_connections_per_second = 1000\nrequests_per_second = 1000\n",
            )
            .unwrap(),
        );
        for n in 0..50_000 {
            let _ = limiter.check_connection(ip(n));
            let _ = limiter.check_request(ip(n));
        }
        // Every key was used once at a high rate, so each returns to fresh within 1 ms;
        // the size bound evicts them as the flood goes on.
        std::thread::sleep(Duration::from_millis(5));
        limiter.evict_idle();
        assert!(
            limiter.tracked_keys() <= 2_000,
            "{}",
            limiter.tracked_keys()
        );
    }
}
