//! Where GitLab says a project's repository lives: the `gitaly_info` and
//! `gitaly_repository` objects of its internal API answers (`agent_info`, `project_info`).
//! Plain data; the Gitaly client (`sources::gitaly`) connects to it.

use std::collections::BTreeMap;

use serde::Deserialize;

/// How to reach a Gitaly server (`gitaly_info` in GitLab's internal API answers).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GitalyInfo {
    /// `tcp://host:port`, `tls://host:port` or `unix:/path`.
    pub address: String,
    /// The raw shared secret; kas signs v2 tokens with it and never sends it.
    #[serde(default)]
    pub token: String,
    /// `gitaly-feature-*` flags GitLab wants set on every call.
    #[serde(default)]
    pub features: BTreeMap<String, String>,
}

impl std::fmt::Debug for GitalyInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitalyInfo")
            .field("address", &self.address)
            .field("token", &"..")
            .field("features", &self.features)
            .finish()
    }
}

/// A repository on a Gitaly server (`gitaly_repository`), copied one-to-one into
/// Gitaly's `Repository` message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
pub struct GitalyRepository {
    #[serde(default)]
    pub storage_name: String,
    #[serde(default)]
    pub relative_path: String,
    #[serde(default)]
    pub git_object_directory: String,
    #[serde(default)]
    pub git_alternate_object_directories: Vec<String>,
    #[serde(default)]
    pub gl_repository: String,
    #[serde(default)]
    pub gl_project_path: String,
}

impl GitalyRepository {
    pub fn to_proto(&self) -> kas_proto::gitaly::Repository {
        kas_proto::gitaly::Repository {
            storage_name: self.storage_name.clone(),
            relative_path: self.relative_path.clone(),
            git_object_directory: self.git_object_directory.clone(),
            git_alternate_object_directories: self.git_alternate_object_directories.clone(),
            gl_repository: self.gl_repository.clone(),
            gl_project_path: self.gl_project_path.clone(),
        }
    }
}

/// Where a project's repository lives: a Gitaly server and the repository on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitalyLocation {
    pub info: GitalyInfo,
    pub repository: GitalyRepository,
}

impl GitalyLocation {
    /// Identifies the repository across agents and pods' streams (not secret).
    pub fn key(&self) -> String {
        format!(
            "{}|{}|{}",
            self.info.address, self.repository.storage_name, self.repository.relative_path
        )
    }
}
