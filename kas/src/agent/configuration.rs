//! How an agent's `config.yaml` becomes the `AgentConfiguration` message agentk expects.

use kas_proto::agentcfg::{
    AgentConfiguration, CiAccessCf, CiAccessGroupCf, CiAccessProjectCf, GitopsCf, LogLevelEnum,
    LoggingCf, ManifestProjectCf, ObservabilityCf, PathCf,
};
use serde::Deserialize;

use crate::sources::{ConfigSourceError, MAX_CONFIG_FILE_BYTES};

/// The part of `config.yaml` this kas understands. Other sections (user_access,
/// remote_development, ...) are accepted and ignored, as an older kas would.
#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    gitops: Option<GitopsFile>,
    #[serde(default)]
    observability: Option<ObservabilityFile>,
    #[serde(default)]
    ci_access: Option<CiAccessFile>,
}

#[derive(Debug, Default, Deserialize)]
struct GitopsFile {
    #[serde(default)]
    manifest_projects: Vec<ManifestProjectFile>,
}

/// Settings for the agent's applier (reconcile_timeout, prune, ...) are accepted and not
/// modelled; `ref` is the agent's to send with its GetObjectsToSynchronize request.
#[derive(Debug, Deserialize)]
struct ManifestProjectFile {
    id: String,
    #[serde(default)]
    default_namespace: String,
    #[serde(default)]
    paths: Vec<PathFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathFile {
    glob: String,
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
    build_configuration_limited(file, agent, gitlab_external_url, MAX_CONFIG_FILE_BYTES)
}

/// [`build_configuration`] with the file size limit from kas's configuration.
pub fn build_configuration_limited(
    file: Option<&[u8]>,
    agent: &crate::gitlab::AgentInfo,
    gitlab_external_url: &str,
    max_file_bytes: usize,
) -> Result<AgentConfiguration, ConfigSourceError> {
    let parsed = match file {
        None => ConfigFile::default(),
        Some(bytes) if bytes.len() > max_file_bytes => {
            return Err(ConfigSourceError::InvalidFile(format!(
                "file is {} bytes, the limit is {max_file_bytes}",
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
    let gitops = match parsed.gitops {
        Some(g) => {
            let mut manifest_projects = Vec::with_capacity(g.manifest_projects.len());
            for (i, p) in g.manifest_projects.into_iter().enumerate() {
                if p.id.trim().is_empty() {
                    return Err(ConfigSourceError::InvalidFile(format!(
                        "gitops.manifest_projects[{i}].id must not be empty"
                    )));
                }
                for (j, path) in p.paths.iter().enumerate() {
                    crate::agent::gitops::ManifestGlob::new(&path.glob).map_err(|e| {
                        ConfigSourceError::InvalidFile(format!(
                            "gitops.manifest_projects[{i}].paths[{j}].glob: {e}"
                        ))
                    })?;
                }
                manifest_projects.push(ManifestProjectCf {
                    id: p.id,
                    default_namespace: p.default_namespace,
                    paths: p
                        .paths
                        .into_iter()
                        .map(|path| PathCf { glob: path.glob })
                        .collect(),
                });
            }
            Some(GitopsCf { manifest_projects })
        }
        None => None,
    };
    Ok(AgentConfiguration {
        gitops,
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
            gitaly: None,
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
        assert!(cfg.gitops.unwrap().manifest_projects.is_empty());
    }

    #[test]
    fn gitops_manifest_projects_are_mapped_and_checked() {
        let yaml = b"gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: apps\n    reconcile_timeout: 3600s\n    paths:\n    - glob: 'deploy/**/*.yaml'\n    - glob: base.yml\n";
        let cfg = build_configuration(Some(yaml), &agent(), "u").unwrap();
        let projects = cfg.gitops.unwrap().manifest_projects;
        assert_eq!(projects.len(), 1);
        assert_eq!(projects[0].id, "group/manifests");
        assert_eq!(projects[0].default_namespace, "apps");
        let globs: Vec<_> = projects[0].paths.iter().map(|p| p.glob.as_str()).collect();
        assert_eq!(globs, ["deploy/**/*.yaml", "base.yml"]);
        for bad in [
            &b"gitops:\n  manifest_projects:\n  - paths: []\n"[..],
            b"gitops:\n  manifest_projects:\n  - id: ' '\n",
            b"gitops:\n  manifest_projects:\n  - id: p\n    paths:\n    - glob: 'a/[b'\n",
        ] {
            let err = build_configuration(Some(bad), &agent(), "u").unwrap_err();
            assert!(matches!(err, ConfigSourceError::InvalidFile(_)), "{err}");
        }
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
