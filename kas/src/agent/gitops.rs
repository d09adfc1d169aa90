//! GitOps manifests: which files of a manifest project an agent's path globs select at a
//! commit, and reading them through Gitaly within bounds (number of paths and files, size
//! of one file and of all together), as real kas does for
//! `gitlab.agent.gitops.rpc.Gitops/GetObjectsToSynchronize`.

use std::collections::BTreeSet;
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};

use crate::auth::AgentToken;
use crate::gitlab::GitalyLocation;
use crate::gitlab::{GitlabClient, GitlabError, ProjectInfo};
use crate::sources::gitaly::{GitalyError, GitalyPool};
use crate::sync::ttl_cache::TtlCache;

/// Bounds on one batch of manifests (real kas's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GitopsLimits {
    /// Paths (globs or files) in one request.
    pub max_number_of_paths: usize,
    /// Files in one batch.
    pub max_number_of_files: usize,
    pub max_manifest_file_size: usize,
    pub max_total_manifest_file_size: usize,
}

impl Default for GitopsLimits {
    fn default() -> Self {
        Self {
            max_number_of_paths: 100,
            max_number_of_files: 1000,
            max_manifest_file_size: 5 * 1024 * 1024,
            max_total_manifest_file_size: 20 * 1024 * 1024,
        }
    }
}

/// Entries one directory listing may return before it is refused: far above any sane
/// manifest directory, low enough that a huge repository cannot exhaust memory.
const MAX_LISTED_ENTRIES: usize = 100_000;

/// Why a batch could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum GitopsError {
    /// The request or the project breaks a bound or names something invalid: the agent's
    /// (or its project's) problem, FAILED_PRECONDITION with the reason.
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Gitaly(#[from] GitalyError),
}

impl GitopsError {
    /// Gitaly unreachable, overloaded or too slow: worth trying again later on the same
    /// stream, rather than ending it (the agent would only reconnect to meet the same
    /// outage).
    pub fn is_passing(&self) -> bool {
        matches!(self, GitopsError::Gitaly(GitalyError::Unavailable(_)))
    }
}

impl From<GitopsError> for tonic::Status {
    fn from(e: GitopsError) -> Self {
        match e {
            GitopsError::Precondition(reason) => tonic::Status::failed_precondition(reason),
            GitopsError::Gitaly(
                e @ (GitalyError::FailedPrecondition(_)
                | GitalyError::FileTooBig { .. }
                | GitalyError::NotAFile { .. }),
            ) => tonic::Status::failed_precondition(e.to_string()),
            GitopsError::Gitaly(e) => {
                tonic::Status::unavailable(format!("cannot read the manifest project: {e}"))
            }
        }
    }
}

type ProjectLookup = Result<ProjectInfo, GitlabError>;
/// (token digest, project as the agent named it).
type ProjectKey = ([u8; 32], String);

/// GitLab's `project_info` answers per (agent token, project), kept for a while as real
/// kas does (`project_info_cache_ttl`), so agents asking again after every batch and every
/// connection rotation do not become a GitLab load. Definite refusals are kept for the
/// error TTL; GitLab being unreachable is never cached.
pub struct ProjectInfoCache {
    ttl: Duration,
    error_ttl: Duration,
    entries: TtlCache<ProjectKey, ProjectLookup>,
}

impl ProjectInfoCache {
    pub fn new(ttl: Duration, error_ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            error_ttl,
            entries: TtlCache::new(max_entries),
        }
    }

    pub async fn get(
        &self,
        gitlab: &GitlabClient,
        token: &AgentToken,
        project: &str,
    ) -> ProjectLookup {
        let key = (token.digest(), project.to_owned());
        let (answer, _) = self
            .entries
            .get_or_lookup(
                &key,
                || gitlab.project_info(token.expose(), project),
                |answer| match answer {
                    Ok(_) => self.ttl,
                    Err(e) if e.is_definite() => self.error_ttl,
                    Err(_) => Duration::ZERO,
                },
            )
            .await;
        answer
    }
}

/// One `paths[].glob` of a manifest project: `*` stays within a directory, `**` crosses
/// directories, `?`, `[...]` and `{a,b}` as usual; directories whose names start with a
/// dot are skipped below the glob's literal part.
#[derive(Debug, Clone)]
pub struct ManifestGlob {
    matcher: GlobMatcher,
    /// The leading directories without wildcards: where listing starts (`.`: the root).
    prefix: String,
    /// Whether the wildcard part may match below the prefix's direct children.
    recursive: bool,
}

fn has_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{', '\\'])
}

impl ManifestGlob {
    pub fn new(glob: &str) -> Result<Self, String> {
        let glob = glob.trim_start_matches('/');
        if glob.is_empty() {
            return Err("the glob is empty".into());
        }
        let matcher = GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map_err(|e| e.to_string())?
            .compile_matcher();
        let parts: Vec<&str> = glob.split('/').collect();
        let literal = parts[..parts.len() - 1]
            .iter()
            .take_while(|p| !has_meta(p))
            .count();
        let prefix = if literal == 0 {
            ".".to_owned()
        } else {
            parts[..literal].join("/")
        };
        let rest = parts[literal..].join("/");
        let recursive = rest.contains('/') || rest.contains("**") || rest.contains('[');
        Ok(Self {
            matcher,
            prefix,
            recursive,
        })
    }

    /// Whether `path` (from the repository root) is selected.
    pub fn matches(&self, path: &str) -> bool {
        if !self.matcher.is_match(path) {
            return false;
        }
        let below = if self.prefix == "." {
            path
        } else {
            match path
                .strip_prefix(self.prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
            {
                Some(below) => below,
                None => return false,
            }
        };
        let mut dirs = below.split('/').collect::<Vec<_>>();
        dirs.pop();
        !dirs.iter().any(|d| d.starts_with('.'))
    }
}

/// One path of a request.
#[derive(Debug, Clone)]
pub enum ManifestPath {
    Glob(ManifestGlob),
    File(String),
}

/// Lists and reads the files `paths` select at `commit`, sorted by path, each once.
pub async fn read_manifests(
    pool: &GitalyPool,
    location: &GitalyLocation,
    commit: &str,
    paths: &[ManifestPath],
    limits: GitopsLimits,
) -> Result<Vec<(String, Vec<u8>)>, GitopsError> {
    if paths.len() > limits.max_number_of_paths {
        return Err(GitopsError::Precondition(format!(
            "{} paths requested, the limit is {} (max_number_of_paths)",
            paths.len(),
            limits.max_number_of_paths
        )));
    }
    let mut selected = BTreeSet::new();
    for path in paths {
        match path {
            ManifestPath::File(file) => {
                selected.insert(file.trim_start_matches('/').to_owned());
            }
            ManifestPath::Glob(glob) => {
                let entries = pool
                    .get_tree_entries(
                        location,
                        commit,
                        &glob.prefix,
                        glob.recursive,
                        MAX_LISTED_ENTRIES,
                    )
                    .await?;
                for entry in entries {
                    if entry.is_blob && glob.matches(&entry.path) {
                        selected.insert(entry.path);
                    }
                }
            }
        }
        if selected.len() > limits.max_number_of_files {
            return Err(GitopsError::Precondition(format!(
                "more than {} manifest files match the paths (max_number_of_files)",
                limits.max_number_of_files
            )));
        }
    }
    let mut total = 0usize;
    let mut objects = Vec::with_capacity(selected.len());
    for path in selected {
        let left = limits.max_total_manifest_file_size - total;
        let limit = limits.max_manifest_file_size.min(left);
        let data = match pool.tree_entry(location, commit, &path, limit).await {
            Ok(Some(data)) => data,
            Ok(None) => {
                return Err(GitopsError::Precondition(format!(
                    "manifest file {path} does not exist at commit {commit}"
                )))
            }
            Err(GitalyError::FileTooBig { .. }) if limit < limits.max_manifest_file_size => {
                return Err(GitopsError::Precondition(format!(
                    "manifest files together are larger than {} bytes \
                     (max_total_manifest_file_size), reached at {path}",
                    limits.max_total_manifest_file_size
                )))
            }
            Err(GitalyError::FileTooBig { .. }) => {
                return Err(GitopsError::Precondition(format!(
                    "manifest file {path} is larger than {} bytes (max_manifest_file_size)",
                    limits.max_manifest_file_size
                )))
            }
            Err(e) => return Err(e.into()),
        };
        total += data.len();
        objects.push((path, data));
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(g: &str) -> ManifestGlob {
        ManifestGlob::new(g).unwrap()
    }

    #[test]
    fn literal_prefix_and_recursion_follow_the_wildcards() {
        for (g, prefix, recursive) in [
            ("*.yaml", ".", false),
            ("/deploy/*.yaml", "deploy", false),
            ("deploy/**/*.yaml", "deploy", true),
            ("deploy/*/app.yaml", "deploy", true),
            ("a/b/c.yaml", "a/b", false),
            ("**/*.{yaml,yml}", ".", true),
        ] {
            let m = glob(g);
            assert_eq!((m.prefix.as_str(), m.recursive), (prefix, recursive), "{g}");
        }
    }

    #[test]
    fn stars_stay_in_their_directory_and_hidden_directories_are_skipped() {
        let m = glob("deploy/*.yaml");
        assert!(m.matches("deploy/app.yaml"));
        assert!(!m.matches("deploy/sub/app.yaml"));
        assert!(!m.matches("deploy/app.yml"));
        let m = glob("deploy/**/*.yaml");
        assert!(m.matches("deploy/a/b/app.yaml"));
        assert!(m.matches("deploy/app.yaml"));
        assert!(!m.matches("deploy/.hidden/app.yaml"));
        assert!(!m.matches("other/app.yaml"));
        // Named explicitly, a dot directory is the user's choice.
        assert!(glob(".gitlab/manifests/*.yaml").matches(".gitlab/manifests/a.yaml"));
        assert!(ManifestGlob::new("a/[b").is_err());
        assert!(ManifestGlob::new("").is_err());
    }
}
