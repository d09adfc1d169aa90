//! The agent configuration read from Gitaly, as real kas does: the default branch's head
//! (RefService.FindBranch), then `.gitlab/agents/<agent>/config.yaml` at that commit
//! (CommitService.TreeEntry, bounded in size).

use std::sync::Arc;

use super::{GitalyError, GitalyPool};
use crate::auth::Agent;
use crate::gitlab::GitalyLocation;
use crate::sources::{config_file_path, ConfigSource, ConfigSourceError};

pub struct GitalyConfigSource {
    pool: Arc<GitalyPool>,
    max_file_bytes: usize,
}

impl GitalyConfigSource {
    pub fn new(pool: Arc<GitalyPool>, max_file_bytes: usize) -> Self {
        Self {
            pool,
            max_file_bytes,
        }
    }
}

fn location(agent: &Agent) -> Result<&GitalyLocation, ConfigSourceError> {
    agent
        .info
        .gitaly
        .as_ref()
        .ok_or(ConfigSourceError::NoGitalyLocation)
}

/// The head of `branch`; for an unset default branch (`HEAD`), `main` then `master`, as
/// real kas does. `None`: no such branch (an empty repository).
pub async fn branch_head(
    pool: &GitalyPool,
    location: &GitalyLocation,
    branch: &str,
) -> Result<Option<String>, GitalyError> {
    if !branch.is_empty() && branch != "HEAD" {
        return pool.find_branch(location, branch).await;
    }
    for fallback in ["main", "master"] {
        if let Some(head) = pool.find_branch(location, fallback).await? {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

#[tonic::async_trait]
impl ConfigSource for GitalyConfigSource {
    fn poll_key(&self, agent: &Agent) -> String {
        match &agent.info.gitaly {
            Some(location) => format!("gitaly|{}|{}", location.key(), agent.info.default_branch),
            None => format!("no-gitaly|{}", agent.info.project_id),
        }
    }

    async fn head_commit(&self, agent: &Agent) -> Result<Option<String>, ConfigSourceError> {
        Ok(branch_head(&self.pool, location(agent)?, &agent.info.default_branch).await?)
    }

    async fn config_file(
        &self,
        agent: &Agent,
        commit: &str,
    ) -> Result<Option<Vec<u8>>, ConfigSourceError> {
        let path = config_file_path(&agent.info.agent_name);
        match self
            .pool
            .tree_entry(location(agent)?, commit, &path, self.max_file_bytes)
            .await
        {
            Ok(file) => Ok(file),
            // The agent's own mistakes: reported to it as FAILED_PRECONDITION.
            Err(e @ (GitalyError::FileTooBig { .. } | GitalyError::NotAFile { .. })) => {
                Err(ConfigSourceError::InvalidFile(format!("{path}: {e}")))
            }
            Err(e) => Err(e.into()),
        }
    }
}
