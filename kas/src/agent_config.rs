//! Where an agent's configuration comes from, and how its `config.yaml` becomes the
//! `AgentConfiguration` message agentk expects.
//!
//! The source is a trait so the GitLab REST API implementation here can later be joined by
//! a Gitaly-backed one without touching the streaming logic.

use std::path::Path;

use kas_proto::agentcfg::{
    AgentConfiguration, CiAccessCf, CiAccessGroupCf, CiAccessProjectCf, LogLevelEnum, LoggingCf,
    ObservabilityCf,
};
use serde::Deserialize;

use crate::auth::Agent;
use crate::gitlab::{GitlabClient, GitlabError, RepoAuth};

/// Upstream kas refuses configuration files above this size.
pub const MAX_CONFIG_FILE_BYTES: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigSourceError {
    #[error(transparent)]
    Gitlab(#[from] GitlabError),
    #[error("invalid agent configuration file: {0}")]
    InvalidFile(String),
}

impl From<ConfigSourceError> for tonic::Status {
    fn from(e: ConfigSourceError) -> Self {
        match e {
            ConfigSourceError::Gitlab(e) => e.into(),
            ConfigSourceError::InvalidFile(msg) => tonic::Status::failed_precondition(msg),
        }
    }
}

/// Path of an agent's configuration file inside its project.
pub fn config_file_path(agent_name: &str) -> String {
    format!(".gitlab/agents/{agent_name}/config.yaml")
}

#[tonic::async_trait]
pub trait ConfigSource: Send + Sync + 'static {
    /// The commit the agent's configuration is currently at. Cheap: it is polled.
    async fn head_commit(&self, agent: &Agent) -> Result<String, ConfigSourceError>;
    /// The raw `config.yaml` at `commit`, or `None` if the agent has no file (empty config).
    async fn config_file(
        &self,
        agent: &Agent,
        commit: &str,
    ) -> Result<Option<Vec<u8>>, ConfigSourceError>;
}

/// Reads `config.yaml` through GitLab's repository REST API (branch head, then the file).
pub struct GitlabApiSource {
    gitlab: GitlabClient,
    api_token: Option<String>,
}

impl GitlabApiSource {
    pub fn new(gitlab: GitlabClient, api_token_file: Option<&Path>) -> anyhow::Result<Self> {
        let api_token = match api_token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read agent_configuration.api_token_file {}: {e}",
                        path.display()
                    )
                })?;
                Some(token.trim().to_owned())
            }
            None => None,
        };
        Ok(Self { gitlab, api_token })
    }

    fn auth<'a>(&'a self, agent: &'a Agent) -> RepoAuth<'a> {
        match &self.api_token {
            Some(token) => RepoAuth::ApiToken(token),
            None => RepoAuth::AgentToken(agent.token.expose()),
        }
    }
}

#[tonic::async_trait]
impl ConfigSource for GitlabApiSource {
    async fn head_commit(&self, agent: &Agent) -> Result<String, ConfigSourceError> {
        let auth = self.auth(agent);
        Ok(self
            .gitlab
            .branch_head(auth, agent.info.project_id, &agent.info.default_branch)
            .await?)
    }

    async fn config_file(
        &self,
        agent: &Agent,
        commit: &str,
    ) -> Result<Option<Vec<u8>>, ConfigSourceError> {
        let auth = self.auth(agent);
        let path = config_file_path(&agent.info.agent_name);
        Ok(self
            .gitlab
            .repository_file(auth, agent.info.project_id, &path, commit)
            .await?)
    }
}

/// The part of `config.yaml` this kas understands. Other sections (gitops, user_access,
/// remote_development, ...) are accepted and ignored, as an older kas would.
#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    observability: Option<ObservabilityFile>,
    #[serde(default)]
    ci_access: Option<CiAccessFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObservabilityFile {
    #[serde(default)]
    logging: Option<LoggingFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoggingFile {
    #[serde(default)]
    level: Option<String>,
    #[serde(default)]
    grpc_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct CiAccessFile {
    #[serde(default)]
    projects: Vec<CiAccessEntry>,
    #[serde(default)]
    groups: Vec<CiAccessEntry>,
}

#[derive(Debug, Deserialize)]
struct CiAccessEntry {
    id: String,
    #[serde(default)]
    default_namespace: String,
}

fn log_level(field: &str, value: &str) -> Result<LogLevelEnum, ConfigSourceError> {
    LogLevelEnum::from_str_name(value).ok_or_else(|| {
        ConfigSourceError::InvalidFile(format!(
            "{field}: unknown level {value:?} (expected debug, info, warn or error)"
        ))
    })
}

/// Builds the message for agentk from the file bytes (or their absence) and the agent's
/// identity from GitLab.
pub fn build_configuration(
    file: Option<&[u8]>,
    agent: &crate::gitlab::AgentInfo,
    gitlab_external_url: &str,
) -> Result<AgentConfiguration, ConfigSourceError> {
    let parsed = match file {
        None => ConfigFile::default(),
        Some(bytes) if bytes.len() > MAX_CONFIG_FILE_BYTES => {
            return Err(ConfigSourceError::InvalidFile(format!(
                "file is {} bytes, the limit is {MAX_CONFIG_FILE_BYTES}",
                bytes.len()
            )))
        }
        Some(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => ConfigFile::default(),
        Some(bytes) => serde_yaml::from_slice::<Option<ConfigFile>>(bytes)
            .map_err(|e| ConfigSourceError::InvalidFile(e.to_string()))?
            .unwrap_or_default(),
    };
    let observability = match parsed.observability.and_then(|o| o.logging) {
        Some(logging) => {
            let level = match logging.level.as_deref() {
                Some(v) => log_level("observability.logging.level", v)?,
                None => LogLevelEnum::Info,
            };
            let grpc_level = match logging.grpc_level.as_deref() {
                Some(v) => Some(log_level("observability.logging.grpc_level", v)? as i32),
                None => None,
            };
            Some(ObservabilityCf {
                logging: Some(LoggingCf {
                    level: level as i32,
                    grpc_level,
                }),
            })
        }
        None => None,
    };
    let ci_access = parsed.ci_access.map(|ci| CiAccessCf {
        projects: ci
            .projects
            .into_iter()
            .map(|p| CiAccessProjectCf {
                id: p.id,
                default_namespace: p.default_namespace,
            })
            .collect(),
        groups: ci
            .groups
            .into_iter()
            .map(|g| CiAccessGroupCf {
                id: g.id,
                default_namespace: g.default_namespace,
            })
            .collect(),
    });
    Ok(AgentConfiguration {
        observability,
        agent_id: agent.agent_id,
        project_id: agent.project_id,
        ci_access,
        project_path: agent.project_path.clone(),
        gitlab_external_url: gitlab_external_url.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitlab::AgentInfo;

    fn agent() -> AgentInfo {
        AgentInfo {
            agent_id: 7,
            agent_name: "demo".into(),
            project_id: 42,
            project_path: "group/project".into(),
            default_branch: "main".into(),
        }
    }

    #[test]
    fn missing_or_empty_file_is_an_empty_configuration() {
        for file in [None, Some(&b""[..]), Some(&b"\n  \n"[..])] {
            let cfg = build_configuration(file, &agent(), "https://gl").unwrap();
            assert_eq!(cfg.agent_id, 7);
            assert_eq!(cfg.project_id, 42);
            assert_eq!(cfg.project_path, "group/project");
            assert_eq!(cfg.gitlab_external_url, "https://gl");
            assert!(cfg.observability.is_none());
        }
    }

    #[test]
    fn known_sections_are_mapped_and_others_ignored() {
        let yaml = b"observability:\n  logging:\n    level: debug\n    grpc_level: warn\nci_access:\n  projects:\n    - id: group/app\n      default_namespace: app\ngitops:\n  manifest_projects: []\n";
        let cfg = build_configuration(Some(yaml), &agent(), "https://gl").unwrap();
        let logging = cfg.observability.unwrap().logging.unwrap();
        assert_eq!(logging.level, LogLevelEnum::Debug as i32);
        assert_eq!(logging.grpc_level, Some(LogLevelEnum::Warn as i32));
        let ci = cfg.ci_access.unwrap();
        assert_eq!(ci.projects[0].id, "group/app");
        assert_eq!(ci.projects[0].default_namespace, "app");
    }

    #[test]
    fn bad_files_are_rejected_with_a_reason() {
        let cases: [&[u8]; 3] = [
            b"observability: [unclosed",
            b"observability:\n  logging:\n    level: loud\n",
            b"ci_access:\n  projects:\n    - default_namespace: x\n",
        ];
        for yaml in cases {
            let err = build_configuration(Some(yaml), &agent(), "u").unwrap_err();
            assert!(matches!(err, ConfigSourceError::InvalidFile(_)), "{err}");
        }
        let big = vec![b'#'; MAX_CONFIG_FILE_BYTES + 1];
        assert!(build_configuration(Some(&big), &agent(), "u").is_err());
    }
}
