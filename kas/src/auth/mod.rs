//! Agent authentication: the bearer token in gRPC metadata is checked with GitLab, and
//! successful answers are cached briefly so a reconnect storm does not become a GitLab
//! storm. Tokens are only ever held as SHA-256 digests and never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::gitlab::{AgentInfo, GitlabClient, GitlabError};
use crate::sync::single_flight::SingleFlight;
use crate::telemetry::metrics::Metrics;

/// An agent token taken from `authorization: Bearer ...`. Debug output hides it.
#[derive(Clone)]
pub struct AgentToken(String);

impl AgentToken {
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self, Status> {
        let value = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization metadata is not text"))?;
        let token = kas_common::auth::bearer_token(value)
            .map_err(|_| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        Ok(Self(token.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The token's SHA-256: the only form caches keep.
    pub(crate) fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentToken(..)")
    }
}

/// An authenticated agent: what GitLab said about it, plus the token for follow-up calls.
#[derive(Debug, Clone)]
pub struct Agent {
    pub info: Arc<AgentInfo>,
    pub token: AgentToken,
}

struct CacheEntry {
    expires: Instant,
    result: Result<Arc<AgentInfo>, GitlabError>,
}

type Lookup = Result<Arc<AgentInfo>, GitlabError>;

/// When the cache is full of live entries, this share of them (those expiring first) is
/// dropped at once, so eviction costs a scan per tenth of the capacity, not per insert.
const EVICT_FRACTION: usize = 10;

pub struct Authenticator {
    gitlab: GitlabClient,
    metrics: Metrics,
    success_ttl: Duration,
    error_ttl: Duration,
    max_entries: usize,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
    /// One GitLab lookup per token at a time: a reconnect storm of one agent's streams
    /// waits for the first lookup instead of sending its own.
    in_flight: SingleFlight<[u8; 32], Lookup>,
}

impl Authenticator {
    pub fn new(
        gitlab: GitlabClient,
        metrics: Metrics,
        success_ttl: Duration,
        error_ttl: Duration,
        max_entries: usize,
    ) -> Self {
        Self {
            gitlab,
            metrics,
            success_ttl,
            error_ttl,
            max_entries,
            cache: Mutex::new(HashMap::new()),
            in_flight: SingleFlight::new(),
        }
    }

    pub fn gitlab(&self) -> &GitlabClient {
        &self.gitlab
    }

    /// Authenticates the caller of an RPC from its metadata.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Agent, Status> {
        let token = match AgentToken::from_metadata(metadata) {
            Ok(token) => token,
            Err(status) => {
                self.count("missing_token");
                return Err(status);
            }
        };
        let info = self.agent_info(&token).await.map_err(Status::from)?;
        Ok(Agent { info, token })
    }

    /// How long a successful check is trusted; long streams check again this often.
    pub fn success_ttl(&self) -> Duration {
        self.success_ttl
    }

    /// Checks an already authenticated agent's token again (through the cache), so long
    /// streams notice a token GitLab has since revoked.
    pub async fn revalidate(&self, token: &AgentToken) -> Result<Arc<AgentInfo>, GitlabError> {
        self.agent_info(token).await
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .auth_results
            .with_label_values(&[outcome])
            .inc();
    }

    async fn agent_info(&self, token: &AgentToken) -> Result<Arc<AgentInfo>, GitlabError> {
        let key = token.digest();
        if let Some(cached) = self.cached(&key) {
            self.count(match &cached {
                Ok(_) => "cached_ok",
                Err(_) => "cached_rejected",
            });
            return cached;
        }
        let (result, ran) = self.in_flight.run(&key, || self.lookup(key, token)).await;
        if !ran {
            self.count("coalesced");
        }
        result
    }

    /// Asks GitLab, counts and caches the answer.
    async fn lookup(&self, key: [u8; 32], token: &AgentToken) -> Lookup {
        let result = self.gitlab.agent_info(token.expose()).await.map(Arc::new);
        match &result {
            Ok(info) => {
                self.count("ok");
                tracing::debug!(agent_id = info.agent_id, "agent authenticated");
            }
            Err(e) => {
                self.count(e.outcome_label());
                tracing::info!(outcome = e.outcome_label(), error = %e, "agent authentication failed");
            }
        }
        let ttl = match &result {
            Ok(_) => Some(self.success_ttl),
            Err(e) if e.is_definite() => Some(self.error_ttl),
            Err(_) => None,
        };
        if let Some(ttl) = ttl.filter(|t| !t.is_zero()) {
            self.store(key, result.clone(), ttl);
        }
        result
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<Arc<AgentInfo>, GitlabError>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|e| e.expires > Instant::now())
            .map(|e| e.result.clone())
    }

    fn store(&self, key: [u8; 32], result: Result<Arc<AgentInfo>, GitlabError>, ttl: Duration) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.max_entries {
            let now = Instant::now();
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= self.max_entries {
                // Still full of live entries: drop the tenth that expires first. Forgetting
                // is safe (GitLab is asked again), growing without bound is not, and
                // clearing everything would send every agent back to GitLab at once.
                let mut expiries: Vec<Instant> = cache.values().map(|e| e.expires).collect();
                let cut = (expiries.len() / EVICT_FRACTION).max(1) - 1;
                let (_, threshold, _) = expiries.select_nth_unstable(cut);
                let threshold = *threshold;
                cache.retain(|_, e| e.expires > threshold);
            }
        }
        cache.insert(
            key,
            CacheEntry {
                expires: Instant::now() + ttl,
                result,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: i64) -> Lookup {
        Ok(Arc::new(AgentInfo {
            agent_id: id,
            agent_name: "a".into(),
            project_id: 1,
            project_path: "p".into(),
            default_branch: "main".into(),
            gitaly: None,
        }))
    }

    #[test]
    fn a_full_cache_evicts_the_entries_expiring_first_not_everything() {
        let secret = crate::gitlab::SharedSecret::generate();
        let gitlab = GitlabClient::new(
            "http://127.0.0.1:1",
            secret,
            Duration::from_secs(1),
            Metrics::new().gitlab_api_latency.clone(),
        )
        .unwrap();
        let auth = Authenticator::new(
            gitlab,
            Metrics::new(),
            Duration::from_secs(60),
            Duration::from_secs(10),
            100,
        );
        for i in 0..100u8 {
            let mut key = [0u8; 32];
            key[0] = i;
            auth.store(
                key,
                info(i64::from(i)),
                Duration::from_secs(60 + u64::from(i)),
            );
        }
        auth.store([255; 32], info(255), Duration::from_secs(600));
        let cache = auth.cache.lock().unwrap();
        assert!((85..=100).contains(&cache.len()), "{}", cache.len());
        assert!(cache.contains_key(&[255; 32]));
        let mut oldest = [0u8; 32];
        oldest[0] = 0;
        assert!(
            !cache.contains_key(&oldest),
            "the entry expiring first went"
        );
        let mut newest = [0u8; 32];
        newest[0] = 99;
        assert!(cache.contains_key(&newest));
    }

    fn md(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn bearer_token_is_parsed() {
        assert_eq!(
            AgentToken::from_metadata(&md("Bearer abc"))
                .unwrap()
                .expose(),
            "abc"
        );
        assert_eq!(
            AgentToken::from_metadata(&md("bearer  abc "))
                .unwrap()
                .expose(),
            "abc"
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            let err = AgentToken::from_metadata(&md(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        assert!(AgentToken::from_metadata(&MetadataMap::new()).is_err());
        assert_eq!(
            format!("{:?}", AgentToken("secret".into())),
            "AgentToken(..)"
        );
    }
}
