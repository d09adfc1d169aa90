//! Rate and connection limits from `policies/limits.toml`, so a flood from one client,
//! or one leaked agent token, cannot take kas down for everyone.
//!
//! Per client: new connections per second (checked at accept, before TLS), concurrent
//! connections, requests/streams per second. A client is a [`ClientKey`]: its IPv4
//! address or its IPv6 /64 by default (`[keys]`), so rotating through the addresses of one
//! IPv6 subscriber prefix gains nothing. Per agent token: new streams and requests per
//! minute, like kas's `connections_per_token_per_minute`, keyed by a salted hash of the
//! bearer token (parsed exactly as kas parses it, [`AgentToken`]) so the token itself is
//! never stored or logged and many agents behind one NAT address do not share a budget.
//! Optional ban: a client over its limits `violations` times within `window` is refused
//! for `duration`.
//!
//! Rates are GCRA (`governor`), exact per key, over one bounded state store ([`table`]):
//! every check is O(1) (one hash, one shard lock, one lookup) whatever the table holds,
//! and the table never holds more than `max_tracked_keys` entries in total. When it is
//! full, a new key takes the place of the least recently used one
//! (`edge_ratelimit_evictions_total` counts them). An evicted key starts fresh when it
//! comes back, so a client whose key was evicted can get one extra burst; that takes about
//! `max_tracked_keys` other keys used since the client's last check, so a client that keeps
//! sending (the one a limit is for) stays at the recent end and keeps its state.
//!
//! Bans are kept apart, in their own bounded table (a tenth of `max_tracked_keys`, carved
//! out of it), so a flood of fresh keys cannot push a banned client out of its ban. Only
//! more bans can: when the ban table is full, the ban that expires first goes (bans all
//! last `duration`, so that is the oldest). To get a ban evicted, an attacker needs more
//! misbehaving clients than the ban table holds, each of which is refused by its limits
//! anyway; the bound on memory wins over the last minutes of those bans.

mod table;

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use prometheus::IntCounter;
use serde::{de::Error as _, Deserialize, Deserializer};

use crate::policy::file::{self as policy_file, PolicyFileError};
use crate::support::net::{client_key, ClientKey, KeyPrefixes};
use table::Table;

/// The file's shape. Every limit is optional: absent means unlimited.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub keys: Keys,
    pub per_ip: PerIp,
    pub per_token: PerToken,
    pub ban: Ban,
    pub max_tracked_keys: Option<usize>,
    /// What parsing had to say about how the file is written.
    #[serde(skip)]
    notes: Notes,
}

/// Which part of a client's address is the client (see [`KeyPrefixes`]).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Keys {
    /// 16..=32; default 32 (one address).
    #[serde(deserialize_with = "ipv4_prefix")]
    pub ipv4_prefix: u8,
    /// 32..=128; default 64 (one subscriber prefix).
    #[serde(deserialize_with = "ipv6_prefix")]
    pub ipv6_prefix: u8,
}

impl Default for Keys {
    fn default() -> Self {
        Self {
            ipv4_prefix: KeyPrefixes::DEFAULT.ipv4(),
            ipv6_prefix: KeyPrefixes::DEFAULT.ipv6(),
        }
    }
}

impl Keys {
    pub fn prefixes(&self) -> KeyPrefixes {
        // Both were checked when the file was read; a `Keys` built in code that is out of
        // range falls back to the defaults rather than failing on the request path.
        KeyPrefixes::new(self.ipv4_prefix, self.ipv6_prefix).unwrap_or_default()
    }
}

// The errors become TOML errors at the value, so they carry file, line and column.
fn ipv4_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    KeyPrefixes::check_ipv4(u8::deserialize(d)?)
        .map_err(|e| D::Error::custom(format!("field `keys.ipv4_prefix`: {e}")))
}

fn ipv6_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    KeyPrefixes::check_ipv6(u8::deserialize(d)?)
        .map_err(|e| D::Error::custom(format!("field `keys.ipv6_prefix`: {e}")))
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

pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// Fewer tracked keys than this would make the limits forget clients constantly.
pub const MIN_MAX_KEYS: usize = 64;

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
        if config
            .max_tracked_keys
            .is_some_and(|max| max < MIN_MAX_KEYS)
        {
            return Err(invalid(format!(
                "field `max_tracked_keys`: must be at least {MIN_MAX_KEYS}"
            )));
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

    /// The bound on tracked keys, limiters and bans together.
    pub fn max_keys(&self) -> usize {
        self.max_tracked_keys.unwrap_or(DEFAULT_MAX_KEYS)
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

/// What the shared table holds a state for: one limit of one client or token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Connections(ClientKey),
    Requests(ClientKey),
    Token(u64),
    Violations(ClientKey),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connections,
    Requests,
    Token,
    Violations,
}

impl Key {
    fn kind(&self) -> Kind {
        match self {
            Key::Connections(_) => Kind::Connections,
            Key::Requests(_) => Kind::Requests,
            Key::Token(_) => Kind::Token,
            Key::Violations(_) => Kind::Violations,
        }
    }
}

/// A rate's theoretical arrival time (`at`, governor's nanoseconds), or a violation count
/// and the start of its window (nanoseconds since [`Limiter`]'s start).
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: u64,
    count: u32,
}

/// One limit's view of the shared table: governor's state store for it.
struct View<K> {
    table: Arc<Table<Key, Slot>>,
    kind: Kind,
    key: fn(K) -> Key,
}

impl<K: Copy> StateStore for View<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.table.update((self.key)(*key), |slot| {
            let (outcome, tat) = f(slot.map(|s| Nanos::new(s.at)))?;
            *slot = Some(Slot {
                at: tat.as_u64(),
                count: 0,
            });
            Ok(outcome)
        })
    }
}

impl<K: Copy + Eq + Hash> ShrinkableKeyedStateStore<K> for View<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let kind = self.kind;
        let drop_below = drop_below.as_u64();
        self.table
            .retain(|key, slot| key.kind() != kind || slot.at > drop_below);
    }

    /// The shared table's keys (all limits').
    fn len(&self) -> usize {
        self.table.len()
    }

    fn is_empty(&self) -> bool {
        self.table.len() == 0
    }
}

type Gcra<K> = RateLimiter<K, View<K>, DefaultClock>;

fn per_second(rate: Option<u32>, burst: Option<u32>) -> Option<Quota> {
    let rate = NonZeroU32::new(rate?)?;
    let burst = burst.and_then(NonZeroU32::new).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The live limits. Rebuilt from the file on reload (counters restart).
pub struct Limiter {
    config: LimitsConfig,
    prefixes: KeyPrefixes,
    clock: DefaultClock,
    /// The time base of violations and bans.
    start: Instant,
    /// Rate states and violation counts, all limits together.
    table: Arc<Table<Key, Slot>>,
    connections: Option<Gcra<ClientKey>>,
    requests: Option<Gcra<ClientKey>>,
    tokens: Option<Gcra<u64>>,
    /// Banned clients and when their ban ends; present when banning is on.
    bans: Option<Table<ClientKey, u64>>,
    /// Keys token hashes so the table cannot be precomputed against.
    salt: RandomState,
}

impl Limiter {
    /// Limits whose evictions are counted nowhere (tests, benches).
    pub fn new(config: LimitsConfig) -> Self {
        Self::with_evictions(
            config,
            IntCounter::new("evictions", "evictions").expect("valid metric"),
        )
    }

    /// Limits that count the keys they evict to make room in `evictions`.
    pub fn with_evictions(config: LimitsConfig, evictions: IntCounter) -> Self {
        let max = config.max_keys().max(MIN_MAX_KEYS);
        let ban_capacity = if config.ban.violations > 0 {
            (max / 10).max(1)
        } else {
            0
        };
        let table = Arc::new(Table::new(max - ban_capacity, evictions.clone()));
        let gcra = |quota: Option<Quota>, kind, key| {
            quota.map(|quota| {
                RateLimiter::new(
                    quota,
                    View {
                        table: table.clone(),
                        kind,
                        key,
                    },
                    DefaultClock::default(),
                )
            })
        };
        let per_ip = &config.per_ip;
        Self {
            connections: gcra(
                per_second(
                    per_ip.new_connections_per_second,
                    per_ip.new_connections_burst,
                ),
                Kind::Connections,
                Key::Connections,
            ),
            requests: gcra(
                per_second(per_ip.requests_per_second, per_ip.requests_burst),
                Kind::Requests,
                Key::Requests,
            ),
            tokens: config
                .per_token
                .new_streams_per_minute
                .and_then(NonZeroU32::new)
                .map(|n| {
                    RateLimiter::new(
                        Quota::per_minute(n),
                        View {
                            table: table.clone(),
                            kind: Kind::Token,
                            key: Key::Token,
                        },
                        DefaultClock::default(),
                    )
                }),
            bans: (ban_capacity > 0).then(|| Table::new(ban_capacity, evictions)),
            table,
            prefixes: config.keys.prefixes(),
            config,
            clock: DefaultClock::default(),
            start: Instant::now(),
            salt: RandomState::new(),
        }
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// The key every per-client limit of this configuration counts `ip` by.
    pub fn key(&self, ip: IpAddr) -> ClientKey {
        client_key(ip, self.prefixes)
    }

    fn now(&self) -> u64 {
        nanos(self.start.elapsed())
    }

    fn check<K: Copy + Eq + Hash>(
        &self,
        limiter: &Option<Gcra<K>>,
        key: K,
        reason: &'static str,
    ) -> Result<(), Refusal> {
        let Some(limiter) = limiter else {
            return Ok(());
        };
        limiter.check_key(&key).map_err(|not_until| Refusal {
            reason,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// The ban `client` is serving, if any.
    fn banned(&self, client: ClientKey) -> Result<(), Refusal> {
        let Some(bans) = &self.bans else {
            return Ok(());
        };
        if bans.len() == 0 {
            // Nobody is banned: no hash, no lock. (A ban being recorded this very moment
            // applies from the client's next check.)
            return Ok(());
        }
        let Some(until) = bans.peek(client) else {
            return Ok(());
        };
        let now = self.now();
        if until > now {
            return Err(Refusal {
                reason: "banned",
                retry_after: Duration::from_nanos(until - now),
            });
        }
        bans.remove_if(client, |until| *until <= now);
        Ok(())
    }

    /// Counts a refusal towards a ban.
    fn note(&self, client: ClientKey, result: Result<(), Refusal>) -> Result<(), Refusal> {
        let Err(refusal) = result else { return Ok(()) };
        let Some(bans) = &self.bans else {
            return Err(refusal);
        };
        let ban = &self.config.ban;
        let now = self.now();
        let window = nanos(ban.window);
        let ban_now = self.table.update(Key::Violations(client), |slot| {
            let mut v = match *slot {
                Some(v) if now.saturating_sub(v.at) <= window => v,
                _ => Slot { at: now, count: 0 },
            };
            v.count = v.count.saturating_add(1);
            if v.count >= ban.violations {
                // The ban table takes over; the count starts again after it.
                *slot = None;
                true
            } else {
                *slot = Some(v);
                false
            }
        });
        if !ban_now {
            return Err(refusal);
        }
        bans.update(client, |until| {
            *until = Some(now.saturating_add(nanos(ban.duration)))
        });
        tracing::warn!(client = %client, duration = ?ban.duration, "client banned after repeated limit violations");
        Err(Refusal {
            reason: "banned",
            retry_after: ban.duration,
        })
    }

    /// A new TCP connection from `ip`, before TLS.
    pub fn check_connection(&self, ip: IpAddr) -> Result<(), Refusal> {
        let client = self.key(ip);
        self.banned(client)?;
        let result = self.check(&self.connections, client, "connection_rate");
        self.note(client, result)
    }

    /// Whether one more concurrent connection from `ip`'s client (which has `open` now,
    /// counted by [`Limiter::key`]) is allowed.
    pub fn check_concurrency(&self, ip: IpAddr, open: usize) -> Result<(), Refusal> {
        let client = self.key(ip);
        self.banned(client)?;
        let result = match self.config.per_ip.max_concurrent_connections {
            Some(max) if open >= max => Err(Refusal {
                reason: "concurrent_connections",
                retry_after: Duration::from_secs(1),
            }),
            _ => Ok(()),
        };
        self.note(client, result)
    }

    /// A request or stream from `ip`.
    pub fn check_request(&self, ip: IpAddr) -> Result<(), Refusal> {
        let client = self.key(ip);
        self.banned(client)?;
        let result = self.check(&self.requests, client, "request_rate");
        self.note(client, result)
    }

    /// A new stream or request from `ip` presenting `token` (hashed here, never kept).
    /// Refused as `token_connection_rate`, the reason's name before the limit was renamed
    /// (dashboards and the runbook know it by that name).
    pub fn check_token(&self, ip: IpAddr, token: AgentToken<'_>) -> Result<(), Refusal> {
        if self.tokens.is_none() {
            return Ok(());
        }
        let client = self.key(ip);
        self.banned(client)?;
        let mut hasher = self.salt.build_hasher();
        hasher.write(token.0.as_bytes());
        let result = self.check(&self.tokens, hasher.finish(), "token_connection_rate");
        self.note(client, result)
    }

    /// Drops keys whose state is back to fresh and bans that are over: memory returns after
    /// a flood. Called periodically; O(keys), one shard locked at a time. The bound on keys
    /// does not depend on it.
    pub fn evict_idle(&self) {
        for limiter in [&self.connections, &self.requests].into_iter().flatten() {
            limiter.retain_recent();
        }
        if let Some(tokens) = &self.tokens {
            tokens.retain_recent();
        }
        let now = self.now();
        let window = nanos(self.config.ban.window);
        self.table.retain(|key, slot| {
            key.kind() != Kind::Violations || now.saturating_sub(slot.at) <= window
        });
        if let Some(bans) = &self.bans {
            bans.retain(|_, until| *until > now);
        }
    }

    /// Keys tracked now: rate states, violation counts and bans. Never more than
    /// `max_tracked_keys`. O(1), takes no lock.
    pub fn tracked_keys(&self) -> usize {
        self.table.len() + self.bans.as_ref().map_or(0, Table::len)
    }

    /// The most keys this limiter tracks (`max_tracked_keys`, rounded down to whole
    /// shards).
    pub fn capacity(&self) -> usize {
        self.table.capacity() + self.bans.as_ref().map_or(0, Table::capacity)
    }
}

#[cfg(test)]
mod tests;
