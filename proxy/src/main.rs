use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kas_edge::EdgeConfig;

/// The edge in front of GitLab's agent server (kas).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file (and the files it names) and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start the local stack: GitLab stand-in, 3 kas pods and the edge in front.
    Dev {
        /// Directory for generated secrets, token, certificate and demo repository.
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
    },
}

/// Validates the configuration and every policy file it names, as the edge would load them.
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = EdgeConfig::from_file(path)?;
    let (blocklist, _limits, rules) = kas_edge::policy::load_files(&config.policies)?;
    println!("{}: configuration is valid", path.display());
    if let Some(file) = &config.policies.blocklist {
        println!("{}: {} entries", file.display(), blocklist.len());
    }
    if let Some(file) = &config.policies.limits {
        println!("{}: valid", file.display());
    }
    if let Some(file) = &config.policies.rules {
        println!("{}: {} rules", file.display(), rules.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Check { config } => check(&config),
        Command::Dev { dir } => {
            kas::logging::init("info");
            kas_edge::dev::run(dir)
        }
        Command::Run { config } => EdgeConfig::from_file(&config)
            .map_err(anyhow::Error::from)
            .and_then(|cfg| {
                kas::logging::init(&cfg.log.level);
                kas_edge::edge::run(cfg)
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kas-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}
