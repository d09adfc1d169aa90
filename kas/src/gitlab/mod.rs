//! Everything kas learns, it learns from GitLab: this module is the only place that talks
//! to GitLab's API, so the wire format and its error mapping live together.

mod client;
mod gitaly_location;
mod jwt;
mod proxy_auth;
mod secret;

pub use client::{AgentInfo, GitlabClient, GitlabError, ProjectInfo, RepoAuth};
pub use gitaly_location::{GitalyInfo, GitalyLocation, GitalyRepository};
pub use jwt::{verify_api_request_jwt, ApiRequestClaims, JWT_AUDIENCE, JWT_HEADER, JWT_ISSUER};
pub use proxy_auth::{
    AllowedAgent, AllowedAgentsForJob, AuthorizedProxyUser, CiAccessAs, ImpersonateAs,
    UserAccessAs, UserAccessType,
};
pub use secret::{SecretError, SharedSecret};
