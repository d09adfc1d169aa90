//! The GitLab stand-in with a profile's demo agent, and the shared secret in a file that
//! pods read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kas::dev::gitlab_standin::{GitlabStandin, StandinAgent};
use kas::gitlab::SharedSecret;
use kas::Config;

use crate::Profile;

/// A running stand-in and what pods need to talk to it. Dropping it stops the stand-in
/// and removes its directory.
pub struct Standin {
    pub gitlab: GitlabStandin,
    pub secret: SharedSecret,
    pub secret_file: PathBuf,
    /// The profile's demo agent, with [`Profile::TOKEN`].
    pub agent: StandinAgent,
    /// Holds the secret and the agents' repositories.
    pub dir: tempfile::TempDir,
}

impl Standin {
    /// Starts the stand-in on `listen` (port 0: any) knowing the profile's agents, with the
    /// demo agent's configuration file written.
    pub async fn start<P: Profile>(listen: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = SharedSecret::generate();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, secret.to_base64()).unwrap();
        let gitlab = GitlabStandin::start(listen, secret.clone(), &dir.path().join("repos"))
            .await
            .unwrap();
        let agent = StandinAgent::demo(P::TOKEN);
        gitlab.add_agent(agent.clone());
        for &token in P::FORBIDDEN_TOKENS {
            gitlab.add_agent(StandinAgent {
                forbidden: true,
                ..StandinAgent::demo(token)
            });
        }
        let level = P::AGENT_LOG_LEVEL;
        gitlab
            .write_agent_config(
                &agent,
                &format!("observability:\n  logging:\n    level: {level}\n"),
            )
            .unwrap();
        Self {
            gitlab,
            secret,
            secret_file,
            agent,
            dir,
        }
    }
}

/// A pod's configuration: agents on `agent`, observability on `observability`, `gitlab` as
/// its GitLab with the secret in `secret_file`, then the profile's settings.
pub fn pod_config<P: Profile>(
    gitlab: &GitlabStandin,
    secret_file: &Path,
    agent: SocketAddr,
    observability: SocketAddr,
) -> Config {
    let mut config = Config::default();
    config.agent.listen = agent;
    config.observability.listen = observability;
    config.gitlab.address = gitlab.url();
    config.gitlab.authentication_secret_file = secret_file.to_owned();
    P::pod_config(&mut config);
    config
}
