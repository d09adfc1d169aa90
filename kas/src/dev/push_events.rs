//! GitLab's push notifications to kas, as the GitLab stand-in sends them: after a commit,
//! `Notifications/GitPushEvent` on each kas API port it knows (GitLab's `internal_url`),
//! with the JWT GitLab signs (audience `gitlab-kas`). The local stack's repositories get a
//! `post-commit` hook that asks the stand-in to do so, so a `git commit` in `.dev/repos`
//! reaches the demo agent at once.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kas_proto::event::{GitPushEvent, Project};
use kas_proto::notifications::notifications_client::NotificationsClient;
use kas_proto::notifications::GitPushEventRequest;

use crate::fleet::jwt;
use crate::gitlab::SharedSecret;

/// The issuer GitLab puts in its JWTs (its host; kas does not check it).
const ISSUER: &str = "gitlab-standin";

/// Sends one push event of project `id`/`full_path` to the kas API port at `kas_api`.
pub async fn send(
    kas_api: SocketAddr,
    secret: &SharedSecret,
    id: i64,
    full_path: &str,
) -> Result<(), String> {
    let token = jwt::sign(secret, ISSUER)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{kas_api}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot reach kas's API port {kas_api}: {e}"))?;
    let mut request = tonic::Request::new(GitPushEventRequest {
        event: Some(GitPushEvent {
            project: Some(Project {
                id,
                full_path: full_path.to_owned(),
            }),
        }),
    });
    let auth = format!("Bearer {token}")
        .parse()
        .map_err(|_| "bad JWT header".to_owned())?;
    request.metadata_mut().insert("authorization", auth);
    NotificationsClient::new(channel)
        .git_push_event(request)
        .await
        .map(|_| ())
        .map_err(|s| format!("GitPushEvent to {kas_api}: {}", s.message()))
}

/// The hook the local stack installs in a repository: after each commit, the stand-in at
/// `gitlab` is told (`POST /-/push/<project path>`), and it notifies kas.
pub fn install_post_commit_hook(
    repo: &Path,
    gitlab: &str,
    project_path: &str,
) -> std::io::Result<()> {
    let hooks = repo.join(".git").join("hooks");
    std::fs::create_dir_all(&hooks)?;
    let hook = hooks.join("post-commit");
    let script = format!(
        "#!/bin/sh\n# Installed by `kas dev`: tells the GitLab stand-in about the commit, which sends\n\
         # kas a GitPushEvent (as GitLab does), so agents get the change at once.\n\
         curl -s -m 2 -X POST '{gitlab}/-/push/{project_path}' >/dev/null 2>&1 || true\n"
    );
    std::fs::write(&hook, script)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}
