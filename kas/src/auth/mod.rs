//! Agent authentication: the bearer token in gRPC metadata is checked with GitLab, and
//! successful answers are cached briefly so a reconnect storm does not become a GitLab
//! storm. Tokens are only ever held as SHA-256 digests and never logged.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::gitlab::{AgentInfo, GitlabClient, GitlabError};
use crate::sync::ttl_cache::{Answered, TtlCache};
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

type Lookup = Result<Arc<AgentInfo>, GitlabError>;

pub struct Authenticator {
    gitlab: GitlabClient,
    metrics: Metrics,
    success_ttl: Duration,
    error_ttl: Duration,
    /// GitLab's answers by token digest; one lookup per token at a time, so a reconnect
    /// storm of one agent's streams waits for the first lookup instead of sending its own.
    cache: TtlCache<[u8; 32], Lookup>,
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
            cache: TtlCache::new(max_entries),
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
    /// streams notice a token GitLab has since revoked. Only a definite answer
    /// ([`GitlabError::is_definite`]: 401, 403, 404) should end a stream: when GitLab is
    /// unreachable, slow or answers 5xx the stream keeps running on the token's last good
    /// check and asks again one TTL later (counted as `deferred`), so a GitLab outage does
    /// not disconnect the fleet.
    pub async fn revalidate(&self, token: &AgentToken) -> Result<Arc<AgentInfo>, GitlabError> {
        let result = self.agent_info(token).await;
        let label = match &result {
            Ok(_) => "ok",
            Err(e) if e.is_definite() => "rejected",
            Err(_) => "deferred",
        };
        self.metrics
            .token_revalidations
            .with_label_values(&[label])
            .inc();
        result
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .auth_results
            .with_label_values(&[outcome])
            .inc();
    }

    async fn agent_info(&self, token: &AgentToken) -> Lookup {
        let (result, answered) = self
            .cache
            .get_or_lookup(
                &token.digest(),
                || self.lookup(token),
                |answer| match answer {
                    Ok(_) => self.success_ttl,
                    // Definite rejections briefly; GitLab being unreachable never.
                    Err(e) if e.is_definite() => self.error_ttl,
                    Err(_) => Duration::ZERO,
                },
            )
            .await;
        match answered {
            Answered::Cached => self.count(match &result {
                Ok(_) => "cached_ok",
                Err(_) => "cached_rejected",
            }),
            Answered::Coalesced => self.count("coalesced"),
            Answered::Looked => {}
        }
        result
    }

    /// Asks GitLab and counts the answer.
    async fn lookup(&self, token: &AgentToken) -> Lookup {
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
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
