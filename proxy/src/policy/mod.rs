//! Operator policies, applied as layers from the outside in:
//! 1. at TCP accept, before TLS (`listener::accept`): the IP blocklist and the per-IP new
//!    connection rate — a refused client costs almost nothing;
//! 2. right after a PROXY protocol header from a trusted load balancer
//!    (`listener::proxy_protocol`): the same checks on the real client address, still
//!    before TLS;
//! 3. per connection after TLS (`connection`): concurrent connections per client;
//! 4. per request/stream ([`Policies::check_request`]): header rules, request rate, per-token
//!    stream rate.
//!
//! Every per-client limit (new connections, concurrency, requests, bans) counts the same
//! [`ClientKey`](crate::support::net::ClientKey): the client's IPv4 address or IPv6 /64 by
//! default, as `limits.toml` `[keys]` says. The blocklist matches addresses and networks as
//! written.
//!
//! Every policy file is watched; an edit takes effect within about a second, a bad edit is
//! rejected whole (the last good version stays, the error names file and line), and a
//! blocklist edit also closes the newly blocked clients' established connections. The
//! blocklist can also live in a ConfigMap watched through the Kubernetes API
//! ([`configmap`]), so an edit reaches every replica at once; both sources go through
//! [`Policies::apply_blocklist`], and [`edit`] is what `kas-edge block` does to either.

pub mod blocklist;
pub mod configmap;
pub mod edit;
mod file;
pub mod ratelimit;
pub mod rules;
pub mod sources;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::config::{PoliciesConfig, ProxyProtocolConfig};
use crate::policy::ratelimit::{AgentToken, Limiter, LimitsConfig, Refusal};
use crate::policy::rules::HeaderRules;
use crate::support::filewatch::{self, FileWatcher};
use crate::support::net::{ClientKey, KeyPrefixes, TrustedProxies};
use crate::telemetry::metrics::EdgeMetrics;
use blocklist::{Blocklist, BlocklistError, Verdict};
use sources::{BlocklistSource, Blocklists, SharedBlocklists};

const RELOAD_DEBOUNCE: Duration = Duration::from_millis(100);
const RELOAD_POLL: Duration = Duration::from_secs(10);
const EVICT_EVERY: Duration = Duration::from_secs(10);
/// How often the rate-limit gauges are brought up to date.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Why a policy refused a request or stream; the HTTP layer decides how to say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestRefusal {
    /// A header rule matched.
    HeaderRule { rule: String },
    /// A rate limit (request rate, per-token rate, or a ban after repeated violations).
    RateLimited {
        reason: &'static str,
        retry_after: Duration,
    },
}

impl RequestRefusal {
    fn limited(refusal: &Refusal) -> Self {
        Self::RateLimited {
            reason: refusal.reason,
            retry_after: refusal.retry_after,
        }
    }
}

/// The client connections policies judge (concurrency) and, after a blocklist edit, close.
/// The connection layer implements it, so policy decisions never depend on how
/// connections are kept.
pub trait ClientConnections: Send + Sync {
    /// Which part of an address is the client (from `limits.toml`); [`Self::open_from`]
    /// counts every connection whose address has the same key.
    fn set_key_prefixes(&self, prefixes: KeyPrefixes);
    /// Open connections from `ip`'s client (its key, not only that address).
    fn open_from(&self, ip: IpAddr) -> usize;
    /// Closes every open connection whose client matches; returns how many.
    fn close_matching(&self, matches: &dyn Fn(IpAddr) -> bool) -> usize;
}

pub struct Policies {
    blocklist: SharedBlocklists,
    limiter: ArcSwap<Limiter>,
    rules: ArcSwap<HeaderRules>,
    pub(crate) trusted: TrustedProxies,
    pub(crate) proxy_header_timeout: Duration,
    connections: Arc<dyn ClientConnections>,
    metrics: EdgeMetrics,
    global_preview: bool,
    close_established: bool,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `edge_blocklist_entries` (every source) and `source`'s content hash, for `lists` now in
/// force.
fn publish_blocklist(metrics: &EdgeMetrics, source: BlocklistSource, lists: &Blocklists) {
    metrics.blocklist_entries.set(lists.len() as i64);
    let digest = lists.get(source).map_or(0, Blocklist::digest);
    metrics
        .blocklist_content_hash
        .with_label_values(&[source.label()])
        .set(i64::try_from(digest).unwrap_or(i64::MAX));
}

/// The policy files as loaded at start; each is empty when not configured.
pub struct PolicyFiles {
    pub blocklist: Blocklist,
    pub limits: LimitsConfig,
    pub rules: HeaderRules,
}

impl PolicyFiles {
    /// Loads every configured policy file; the first error is returned with its file and
    /// line. `kas-edge check` and start-up both go through here.
    pub fn load(cfg: &PoliciesConfig) -> anyhow::Result<Self> {
        Ok(Self {
            blocklist: match &cfg.blocklist {
                Some(path) => blocklist::load_file(path)?,
                None => Blocklist::default(),
            },
            limits: match &cfg.limits {
                Some(path) => LimitsConfig::load(path)?,
                None => LimitsConfig::default(),
            },
            rules: match &cfg.rules {
                Some(path) => HeaderRules::load(path)?,
                None => HeaderRules::default(),
            },
        })
    }
}

impl Policies {
    pub fn new(
        files: PolicyFiles,
        cfg: &PoliciesConfig,
        proxy_protocol: &ProxyProtocolConfig,
        connections: Arc<dyn ClientConnections>,
        metrics: EdgeMetrics,
    ) -> anyhow::Result<Arc<Self>> {
        let PolicyFiles {
            blocklist,
            limits,
            rules,
        } = files;
        let trusted = TrustedProxies::parse(&proxy_protocol.trusted)
            .map_err(|e| anyhow::anyhow!("proxy_protocol.trusted: {e}"))?;
        let lists = SharedBlocklists::default();
        if cfg.blocklist.is_some() {
            lists.replace(BlocklistSource::File, blocklist, |_, new| {
                publish_blocklist(&metrics, BlocklistSource::File, new);
            });
        }
        metrics.blocklist_last_reload.set(now_secs());
        let limiter = Self::limiter(limits, &connections, &metrics);
        Ok(Arc::new(Self {
            blocklist: lists,
            limiter: ArcSwap::from_pointee(limiter),
            rules: ArcSwap::from_pointee(rules),
            trusted,
            proxy_header_timeout: proxy_protocol.header_timeout,
            connections,
            metrics,
            global_preview: cfg.preview,
            close_established: cfg.close_established,
        }))
    }

    /// Live limits from `limits`: the connection registry counts by their keys from now
    /// on, and the file's warnings (deprecated names) are logged, once per load.
    fn limiter(
        limits: LimitsConfig,
        connections: &Arc<dyn ClientConnections>,
        metrics: &EdgeMetrics,
    ) -> Limiter {
        for warning in limits.warnings() {
            tracing::warn!("{warning}");
        }
        connections.set_key_prefixes(limits.keys.prefixes());
        Limiter::with_evictions(limits, metrics.ratelimit_evictions.clone())
    }

    /// The key every per-client limit counts `ip` by, under the limits in force now.
    pub fn client_key(&self, ip: IpAddr) -> ClientKey {
        self.limiter.load().key(ip)
    }

    pub(crate) fn blocked(&self, reason: &str, source: &str) {
        self.metrics
            .policy_blocked
            .with_label_values(&[reason, source])
            .inc();
    }

    /// The blocklist and connection-rate decision for a new connection from `ip`.
    pub fn admit(&self, ip: IpAddr) -> bool {
        match self.blocklist.load().check(ip) {
            Verdict::Deny(entry) if !self.global_preview => {
                self.blocked("blocklist", "blocklist");
                tracing::debug!(client = %ip, entry = %entry.net, line = entry.line, "connection refused by the blocklist");
                return false;
            }
            Verdict::Deny(entry) | Verdict::Preview(entry) => {
                self.metrics
                    .policy_preview
                    .with_label_values(&["blocklist"])
                    .inc();
                tracing::info!(client = %ip, entry = %entry.net, line = entry.line, note = ?entry.note, "blocklist preview match (not blocked)");
            }
            Verdict::Allow => {}
        }
        match self.limiter.load().check_connection(ip) {
            Ok(()) => true,
            Err(refusal) => {
                self.blocked(refusal.reason, "limits");
                tracing::debug!(client = %ip, reason = refusal.reason, "connection refused by a limit");
                false
            }
        }
    }

    /// Whether the blocklist (as it stands now) refuses `ip`. For connections that were
    /// admitted before an edit and registered after it: the edit's sweep missed them.
    pub fn blocklisted(&self, ip: IpAddr) -> bool {
        !self.global_preview && matches!(self.blocklist.load().check(ip), Verdict::Deny(_))
    }

    /// Whether `ip`'s client may open one more concurrent connection.
    pub fn admit_concurrent(&self, ip: IpAddr) -> bool {
        let open = self.connections.open_from(ip);
        match self.limiter.load().check_concurrency(ip, open) {
            Ok(()) => true,
            Err(refusal) => {
                self.blocked(refusal.reason, "limits");
                false
            }
        }
    }

    /// Header rules, request rate and per-token rate for one request or stream.
    pub fn check_request(
        &self,
        ip: Option<IpAddr>,
        headers: &http::HeaderMap,
    ) -> Option<RequestRefusal> {
        if let Some(rule) = self.rules.load().check(headers) {
            if rule.preview {
                self.metrics
                    .policy_preview
                    .with_label_values(&["rules"])
                    .inc();
                tracing::info!(client = ?ip, rule = %rule.name, "header rule preview match (not blocked)");
            } else {
                self.blocked("header_rule", "rules");
                return Some(RequestRefusal::HeaderRule {
                    rule: rule.name.clone(),
                });
            }
        }
        let ip = ip?;
        let limiter = self.limiter.load();
        if let Err(refusal) = limiter.check_request(ip) {
            self.blocked(refusal.reason, "limits");
            return Some(RequestRefusal::limited(&refusal));
        }
        // Parsed exactly as kas parses it, so no spelling of the header slips past the
        // per-token limit that kas would still accept.
        if let Some(token) = AgentToken::from_headers(headers) {
            if let Err(refusal) = limiter.check_token(ip, token) {
                self.blocked(refusal.reason, "limits");
                return Some(RequestRefusal::limited(&refusal));
            }
        }
        None
    }

    fn reload_blocklist(&self, path: &Path) {
        self.apply_blocklist(
            BlocklistSource::File,
            &path.display().to_string(),
            blocklist::load_file(path),
        );
    }

    /// Puts a blocklist read from `source` (`origin` names the file or ConfigMap) in force
    /// and, in the same step, closes the established connections of the clients it newly
    /// blocks; or, for a list that did not parse, keeps the last good one and says why.
    /// File edits and ConfigMap updates alike come through here: same errors, same
    /// metrics.
    pub fn apply_blocklist(
        &self,
        source: BlocklistSource,
        origin: &str,
        loaded: Result<Blocklist, BlocklistError>,
    ) {
        match loaded {
            Ok(new) => {
                let entries = new.len();
                let hash = format!("{:013x}", new.digest());
                let closed = self.blocklist.replace(source, new, |old, new| {
                    publish_blocklist(&self.metrics, source, new);
                    self.metrics.blocklist_last_reload.set(now_secs());
                    self.metrics
                        .policy_reloads
                        .with_label_values(&["blocklist", "ok"])
                        .inc();
                    if self.close_established && !self.global_preview {
                        self.connections
                            .close_matching(&|ip| sources::newly_blocked(old, new, ip))
                    } else {
                        0
                    }
                });
                self.metrics.established_closed.inc_by(closed as u64);
                tracing::info!(%source, %origin, entries, %hash, closed_connections = closed, "blocklist reloaded");
            }
            Err(e) => {
                self.metrics.blocklist_reload_errors.inc();
                self.metrics
                    .policy_reloads
                    .with_label_values(&["blocklist", "error"])
                    .inc();
                tracing::error!(%source, %origin, error = %e, "blocklist edit rejected; the previous version stays in force");
            }
        }
    }

    fn reload_limits(&self, path: &Path) {
        match LimitsConfig::load(path) {
            Ok(limits) if &limits == self.limiter.load().config() => {}
            Ok(limits) => {
                let limiter = Self::limiter(limits, &self.connections, &self.metrics);
                self.limiter.store(Arc::new(limiter));
                self.metrics
                    .policy_reloads
                    .with_label_values(&["limits", "ok"])
                    .inc();
                tracing::info!(file = %path.display(), "limits reloaded");
            }
            Err(e) => {
                self.metrics
                    .policy_reloads
                    .with_label_values(&["limits", "error"])
                    .inc();
                tracing::error!(error = %e, "limits edit rejected; the previous version stays in force");
            }
        }
    }

    fn reload_rules(&self, path: &Path) {
        match HeaderRules::load(path) {
            Ok(rules) => {
                let n = rules.len();
                self.rules.store(Arc::new(rules));
                self.metrics
                    .policy_reloads
                    .with_label_values(&["rules", "ok"])
                    .inc();
                tracing::info!(file = %path.display(), rules = n, "header rules reloaded");
            }
            Err(e) => {
                self.metrics
                    .policy_reloads
                    .with_label_values(&["rules", "error"])
                    .inc();
                tracing::error!(error = %e, "rules edit rejected; the previous version stays in force");
            }
        }
    }

    /// Watches every configured file; keep the returned watchers alive.
    pub fn watch(self: &Arc<Self>, cfg: &PoliciesConfig) -> anyhow::Result<Vec<FileWatcher>> {
        type Reload = fn(&Policies, &Path);
        let files: [(&Option<PathBuf>, Reload); 3] = [
            (&cfg.blocklist, Policies::reload_blocklist),
            (&cfg.limits, Policies::reload_limits),
            (&cfg.rules, Policies::reload_rules),
        ];
        let mut watchers = Vec::new();
        for (path, reload) in files {
            let Some(path) = path.clone() else { continue };
            let this = Arc::downgrade(self);
            let watched = path.clone();
            watchers.push(filewatch::watch_files_with_poll(
                vec![path],
                RELOAD_DEBOUNCE,
                RELOAD_POLL,
                move || {
                    if let Some(this) = this.upgrade() {
                        reload(&this, &watched);
                    }
                },
            )?);
        }
        Ok(watchers)
    }

    /// Forever: keeps `edge_ratelimit_tracked_keys` current (every second) and sweeps
    /// rate-limit keys that are fresh again (every ten), so memory returns after a flood.
    /// The bound on keys holds without it: the limiter evicts as it goes.
    pub async fn evict_idle_keys(self: Arc<Self>) {
        let mut sweep_due = tokio::time::Instant::now() + EVICT_EVERY;
        loop {
            tokio::time::sleep(PUBLISH_EVERY).await;
            let limiter = self.limiter.load();
            if tokio::time::Instant::now() >= sweep_due {
                limiter.evict_idle();
                sweep_due += EVICT_EVERY;
            }
            self.metrics
                .ratelimit_keys
                .set(i64::try_from(limiter.tracked_keys()).unwrap_or(i64::MAX));
        }
    }
}
