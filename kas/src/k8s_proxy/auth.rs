//! Who is calling the Kubernetes API proxy, and may they use the agent they name.
//!
//! Three credentials, as real kas: `Authorization: Bearer ci:<agent id>:<CI job token>`
//! (GitLab lists the agents the job may use), `Bearer pat:<agent id>:<personal access
//! token>` and GitLab's `_gitlab_kas` session cookie with its CSRF token (GitLab authorizes
//! the user for the agent). GitLab's answers are kept for `allowed_agent_cache_ttl` (its
//! refusals for `allowed_agent_cache_error_ttl`, its outages never) and asked once per
//! credential at a time. Credentials are only held as SHA-256 digests in the cache keys.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};

use kas_proto::kubernetes_api::ImpersonationConfig;

use super::impersonation;
use super::status::ProxyError;
use crate::gitlab::{
    AllowedAgentsForJob, AuthorizedProxyUser, GitlabClient, GitlabError, UserAccessType,
};
use crate::sync::ttl_cache::TtlCache;

/// The session cookie GitLab sets for kas's domain.
const SESSION_COOKIE: &str = "_gitlab_kas";
pub const AGENT_ID_HEADER: &str = "gitlab-agent-id";
pub const CSRF_HEADER: &str = "x-csrf-token";
pub const AGENT_ID_QUERY: &str = "gitlab-agent-id";
pub const CSRF_QUERY: &str = "gitlab-csrf-token";

/// A caller's credential for one agent.
#[derive(PartialEq, Eq)]
pub enum Credential {
    CiJob {
        agent_id: i64,
        job_token: String,
    },
    User {
        agent_id: i64,
        access_type: UserAccessType,
        access_key: String,
        csrf_token: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        match self {
            Credential::CiJob { agent_id, .. } => write!(f, "CiJob(agent {agent_id})"),
            Credential::User {
                agent_id,
                access_type,
                ..
            } => write!(f, "User(agent {agent_id}, {})", access_type.as_str()),
        }
    }
}

impl Credential {
    pub fn agent_id(&self) -> i64 {
        match self {
            Credential::CiJob { agent_id, .. } | Credential::User { agent_id, .. } => *agent_id,
        }
    }

    /// The credential of a request: its `Authorization` header, else the session cookie.
    /// `query` is the request's decoded query (for the browser forms of agent id and CSRF
    /// token).
    pub fn from_request(
        headers: &HeaderMap,
        query: &[(String, String)],
    ) -> Result<Self, ProxyError> {
        let mut authorizations = headers.get_all(header::AUTHORIZATION).iter();
        if let Some(value) = authorizations.next() {
            if authorizations.next().is_some() {
                return Err(ProxyError::unauthorized(
                    "more than one Authorization header",
                ));
            }
            let value = value
                .to_str()
                .map_err(|_| ProxyError::unauthorized("Authorization header is not text"))?;
            return Self::from_bearer(value);
        }
        let Some(cookie) = session_cookie(headers) else {
            return Err(ProxyError::unauthorized("no valid credentials provided"));
        };
        let agent_id =
            one_value(headers, AGENT_ID_HEADER, query, AGENT_ID_QUERY)?.ok_or_else(|| {
                ProxyError::bad_request(
                    "the Gitlab-Agent-Id header or gitlab-agent-id query parameter is required \
                     with the session cookie",
                )
            })?;
        let agent_id = parse_agent_id(&agent_id)?;
        let csrf_token = one_value(headers, CSRF_HEADER, query, CSRF_QUERY)?.unwrap_or_default();
        Ok(Credential::User {
            agent_id,
            access_type: UserAccessType::SessionCookie,
            access_key: cookie,
            csrf_token,
        })
    }

    fn from_bearer(value: &str) -> Result<Self, ProxyError> {
        let rest = kas_common::auth::bearer_token(value).map_err(|_| {
            ProxyError::unauthorized(
                "Authorization header: expected Bearer <type>:<agent id>:<token>",
            )
        })?;
        let mut parts = rest.trim().splitn(3, ':');
        let (Some(kind), Some(agent_id), Some(token)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ProxyError::unauthorized(
                "Authorization header: expected Bearer <type>:<agent id>:<token>",
            ));
        };
        if token.is_empty() {
            return Err(ProxyError::unauthorized(
                "Authorization header: empty token",
            ));
        }
        let agent_id = parse_agent_id(agent_id)?;
        match kind {
            "ci" => Ok(Credential::CiJob {
                agent_id,
                job_token: token.to_owned(),
            }),
            "pat" => Ok(Credential::User {
                agent_id,
                access_type: UserAccessType::PersonalAccessToken,
                access_key: token.to_owned(),
                csrf_token: String::new(),
            }),
            _ => Err(ProxyError::unauthorized(format!(
                "Authorization header: unknown token type {kind:?}"
            ))),
        }
    }

    /// What keys this credential's GitLab answer in the cache.
    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        match self {
            Credential::CiJob { job_token, .. } => {
                // GitLab's answer lists every agent the job may use: one entry per job.
                h.update(b"ci\x0b");
                h.update(job_token.as_bytes());
            }
            Credential::User {
                agent_id,
                access_type,
                access_key,
                csrf_token,
            } => {
                h.update(b"user\x0b");
                h.update(agent_id.to_le_bytes());
                h.update(access_type.as_str().as_bytes());
                h.update(b"\x0b");
                h.update(access_key.as_bytes());
                h.update(b"\x0b");
                h.update(csrf_token.as_bytes());
            }
        }
        h.finalize().into()
    }
}

fn parse_agent_id(s: &str) -> Result<i64, ProxyError> {
    s.trim()
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ProxyError::unauthorized(format!("invalid agent id {s:?}")))
}

/// The header's value, else the query parameter's; more than one of either is an error.
fn one_value(
    headers: &HeaderMap,
    header_name: &str,
    query: &[(String, String)],
    query_name: &str,
) -> Result<Option<String>, ProxyError> {
    let mut values = headers.get_all(header_name).iter();
    if let Some(v) = values.next() {
        if values.next().is_some() {
            return Err(ProxyError::bad_request(format!(
                "more than one {header_name} header"
            )));
        }
        return v
            .to_str()
            .map(|s| Some(s.to_owned()))
            .map_err(|_| ProxyError::bad_request(format!("{header_name} header is not text")));
    }
    let mut values = query.iter().filter(|(k, _)| k == query_name);
    match (values.next(), values.next()) {
        (Some(_), Some(_)) => Err(ProxyError::bad_request(format!(
            "more than one {query_name} query parameter"
        ))),
        (Some((_, v)), None) => Ok(Some(v.clone())),
        _ => Ok(None),
    }
}

/// The `_gitlab_kas` cookie, URL-unescaped (Rails escapes it).
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| {
            percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|v| !v.is_empty())
}

/// A caller GitLab let through: which agent, and as whom its requests run.
#[derive(Debug, Clone, PartialEq)]
pub struct Authorized {
    pub agent_id: i64,
    /// `None`: as the agent's own service account.
    pub impersonation: Option<ImpersonationConfig>,
}

type JobLookup = Result<Arc<AllowedAgentsForJob>, GitlabError>;
type UserLookup = Result<Arc<AuthorizedProxyUser>, GitlabError>;

pub struct ProxyAuthorizer {
    gitlab: GitlabClient,
    ttl: Duration,
    error_ttl: Duration,
    jobs: TtlCache<[u8; 32], JobLookup>,
    users: TtlCache<[u8; 32], UserLookup>,
}

impl ProxyAuthorizer {
    pub fn new(
        gitlab: GitlabClient,
        ttl: Duration,
        error_ttl: Duration,
        max_entries: usize,
    ) -> Self {
        Self {
            gitlab,
            ttl,
            error_ttl,
            jobs: TtlCache::new(max_entries),
            users: TtlCache::new(max_entries),
        }
    }

    fn ttl_of<T>(&self, answer: &Result<T, GitlabError>) -> Duration {
        match answer {
            Ok(_) => self.ttl,
            Err(e) if e.is_definite() => self.error_ttl,
            Err(_) => Duration::ZERO,
        }
    }

    pub async fn authorize(&self, credential: &Credential) -> Result<Authorized, ProxyError> {
        let key = credential.digest();
        match credential {
            Credential::CiJob {
                agent_id,
                job_token,
            } => {
                let (job, _) = self
                    .jobs
                    .get_or_lookup(
                        &key,
                        || async {
                            self.gitlab
                                .allowed_agents_for_job(job_token)
                                .await
                                .map(Arc::new)
                        },
                        |a| self.ttl_of(a),
                    )
                    .await;
                let job = job.map_err(|e| match e {
                    GitlabError::Unauthenticated => {
                        ProxyError::unauthorized("Unauthorized: CI job token")
                    }
                    GitlabError::PermissionDenied => {
                        ProxyError::forbidden("Forbidden: CI job token")
                    }
                    GitlabError::NotFound => ProxyError::new(
                        http::StatusCode::NOT_FOUND,
                        "Not found: agents for CI job token",
                    ),
                    GitlabError::Unavailable(_) => gitlab_unavailable(),
                })?;
                let agent = job
                    .allowed_agents
                    .iter()
                    .find(|a| a.id == *agent_id)
                    .ok_or_else(|| ProxyError::forbidden("Forbidden: agentId is not allowed"))?;
                Ok(Authorized {
                    agent_id: *agent_id,
                    impersonation: impersonation::for_ci_job(&job, agent),
                })
            }
            Credential::User {
                agent_id,
                access_type,
                access_key,
                csrf_token,
            } => {
                let (user, _) = self
                    .users
                    .get_or_lookup(
                        &key,
                        || async {
                            self.gitlab
                                .authorize_proxy_user(
                                    *agent_id,
                                    *access_type,
                                    access_key,
                                    csrf_token,
                                )
                                .await
                                .map(Arc::new)
                        },
                        |a| self.ttl_of(a),
                    )
                    .await;
                // 401, 403 and 404 all read 401: the answer must not tell which agents exist.
                let user = user.map_err(|e| match e {
                    GitlabError::Unavailable(_) => gitlab_unavailable(),
                    _ => ProxyError::unauthorized("Unauthorized"),
                })?;
                Ok(Authorized {
                    agent_id: *agent_id,
                    impersonation: impersonation::for_user(&user, *access_type),
                })
            }
        }
    }
}

fn gitlab_unavailable() -> ProxyError {
    ProxyError::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "GitLab is unavailable, try again later",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    #[test]
    fn bearer_credentials_name_their_kind_and_agent() {
        let c =
            Credential::from_request(&headers(&[("authorization", "Bearer ci:7:job:tok")]), &[]);
        assert_eq!(
            c.expect("valid"),
            Credential::CiJob {
                agent_id: 7,
                job_token: "job:tok".into()
            }
        );
        let c =
            Credential::from_request(&headers(&[("authorization", "Bearer pat:7:glpat-x")]), &[]);
        assert!(matches!(
            c,
            Ok(Credential::User {
                agent_id: 7,
                access_type: UserAccessType::PersonalAccessToken,
                ..
            })
        ));
        for bad in [
            "Bearer ci:7:",
            "Bearer xx:7:t",
            "Bearer ci:x:t",
            "Basic abc",
            "Bearer ci:-1:t",
        ] {
            let e =
                Credential::from_request(&headers(&[("authorization", bad)]), &[]).expect_err(bad);
            assert_eq!(e.code, http::StatusCode::UNAUTHORIZED, "{bad}");
        }
        let two = headers(&[
            ("authorization", "Bearer ci:7:a"),
            ("authorization", "Bearer ci:7:b"),
        ]);
        assert!(Credential::from_request(&two, &[]).is_err());
        let none = Credential::from_request(&HeaderMap::new(), &[]).expect_err("none");
        assert!(none.message.contains("no valid credentials"));
    }

    #[test]
    fn the_session_cookie_takes_agent_and_csrf_from_headers_or_query() {
        let h = headers(&[
            ("cookie", "a=b; _gitlab_kas=se%3Dss; c=d"),
            ("gitlab-agent-id", "9"),
        ]);
        let query = vec![(CSRF_QUERY.to_owned(), "tok".to_owned())];
        match Credential::from_request(&h, &query).expect("valid") {
            Credential::User {
                agent_id,
                access_type,
                access_key,
                csrf_token,
            } => {
                assert_eq!(agent_id, 9);
                assert_eq!(access_type, UserAccessType::SessionCookie);
                assert_eq!(access_key, "se=ss");
                assert_eq!(csrf_token, "tok");
            }
            other => panic!("{other:?}"),
        }
        let no_agent = headers(&[("cookie", "_gitlab_kas=x")]);
        assert!(Credential::from_request(&no_agent, &[]).is_err());
    }
}
