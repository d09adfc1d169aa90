use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use kas::{BoundKas, Config};

/// A stateless GitLab agent server.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; flags override its values.
    #[arg(long, short, conflicts_with = "configuration_file")]
    config: Option<PathBuf>,
    /// Real kas's YAML configuration file (as the GitLab Helm chart writes it); keys this
    /// kas does not implement are reported as ignored. Flags override its values.
    #[arg(long)]
    configuration_file: Option<PathBuf>,
    /// Agent listener address (gRPC and websocket), e.g. 0.0.0.0:8150.
    #[arg(long)]
    agent_listen: Option<SocketAddr>,
    /// Observability listener address (/liveness, /readiness, /metrics).
    #[arg(long)]
    observability_listen: Option<SocketAddr>,
    /// GitLab base URL.
    #[arg(long)]
    gitlab_address: Option<String>,
    /// File with the base64 secret shared with GitLab.
    #[arg(long)]
    gitlab_secret_file: Option<PathBuf>,
    /// Name reported in logs and diagnostics (defaults to $POD_NAME or the host name).
    #[arg(long)]
    pod_name: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit.
    Check(ServeArgs),
    /// Start the local stack: a GitLab stand-in and three kas pods on loopback.
    #[cfg(feature = "dev")]
    Dev {
        /// Directory for the generated secret, demo token and demo repository.
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
    },
}

impl ServeArgs {
    /// The configuration and the keys of a real kas YAML file that were ignored.
    fn load(&self) -> anyhow::Result<(Config, Vec<String>)> {
        let (mut config, ignored) = match (&self.config, &self.configuration_file) {
            (Some(path), _) => (Config::from_file(path)?, Vec::new()),
            (None, Some(path)) => {
                let yaml = kas::config::kascfg::KasYaml::from_file(path)?;
                (yaml.config, yaml.ignored)
            }
            (None, None) => (Config::default(), Vec::new()),
        };
        if let Some(v) = self.agent_listen {
            config.agent.listen = v;
        }
        if let Some(v) = self.observability_listen {
            config.observability.listen = v;
        }
        if let Some(v) = &self.gitlab_address {
            config.gitlab.address = v.clone();
        }
        if let Some(v) = &self.gitlab_secret_file {
            config.gitlab.authentication_secret_file = v.clone();
        }
        config.validate()?;
        Ok((config, ignored))
    }

    fn pod_name(&self) -> String {
        self.pod_name
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "kas".into())
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Check(args)) => {
            let (config, ignored) = args.load()?;
            kas::gitlab::SharedSecret::from_file(&config.gitlab.authentication_secret_file)?;
            // What the fleet parts read at start: their secrets and Redis's password.
            if config.api.listen.is_some() {
                kas::gitlab::SharedSecret::from_file(&config.api.authentication_secret_file)
                    .context("api.authentication_secret_file")?;
            }
            if config.private_api.listen.is_some() {
                kas::gitlab::SharedSecret::from_file(
                    &config.private_api.authentication_secret_file,
                )
                .context("private_api.authentication_secret_file")?;
            }
            if config.redis.enabled() {
                kas::fleet::Redis::new(
                    &config.redis,
                    kas::fleet::RedisMetrics::new(&prometheus::Registry::new()),
                )?;
            }
            for key in &ignored {
                println!("ignored (not implemented by this kas): {key}");
            }
            println!("configuration is valid");
            Ok(())
        }
        #[cfg(feature = "dev")]
        Some(Command::Dev { dir }) => run_dev_stack(dir).await,
        None => {
            let (config, ignored) = cli.serve.load()?;
            kas::telemetry::logging::init(&config.log.level);
            for key in &ignored {
                tracing::warn!(key = %key, "configuration key ignored: not implemented by this kas");
            }
            let kas = BoundKas::bind(config, &cli.serve.pod_name())
                .await
                .context("kas cannot start")?;
            kas.run(termination()).await
        }
    }
}

/// `kas dev`: the GitLab and Gitaly stand-ins and three kas pods, until Ctrl-C.
#[cfg(feature = "dev")]
async fn run_dev_stack(dir: PathBuf) -> anyhow::Result<()> {
    use kas::dev::devstack::{DevStack, DevStackOptions};
    kas::telemetry::logging::init("info");
    let opts = DevStackOptions {
        dir,
        ..DevStackOptions::default()
    };
    let stack = DevStack::start(&opts).await?;
    println!(
        "\nkas local stack is up (Ctrl-C stops it)\n{}",
        stack.describe()
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        termination().await;
        let _ = tx.send(true);
    });
    stack.run(rx).await
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kas: {e:#}");
            ExitCode::FAILURE
        }
    }
}
