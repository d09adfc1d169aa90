use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kas_edge::telemetry::log_writer;

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
    #[cfg(feature = "dev")]
    Dev {
        /// Directory for generated secrets, token, certificate and demo repository.
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
    },
}

/// Validates the configuration and every file it names, exactly as `run` would load them.
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let checked = kas_edge::app::preflight::from_file(path)?;
    let config = &checked.config;
    let files = &checked.policy_files;
    println!("{}: configuration is valid", path.display());
    if let Some(file) = &config.policies.blocklist {
        println!("{}: {} entries", file.display(), files.blocklist.len());
    }
    if let Some(file) = &config.policies.limits {
        println!("{}: valid", file.display());
        for warning in files.limits.warnings() {
            println!("warning: {warning}");
        }
    }
    if let Some(file) = &config.policies.rules {
        println!("{}: {} rules", file.display(), files.rules.len());
    }
    for cert in &checked.certificates {
        let days_left = cert
            .not_after
            .duration_since(std::time::SystemTime::now())
            .map(|left| left.as_secs() / 86_400)
            .unwrap_or(0);
        println!(
            "{}: certificate for {} ({days_left} days left)",
            cert.file.display(),
            cert.names.join(", ")
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Check { config } => check(&config),
        #[cfg(feature = "dev")]
        Command::Dev { dir } => {
            kas_common::logging::init_with_writer("info", log_writer::stdout());
            kas_edge::dev::run(dir)
        }
        Command::Run { config } => {
            kas_edge::app::preflight::from_file(&config).and_then(|checked| {
                kas_common::logging::init_with_writer(
                    &checked.config.log.level,
                    log_writer::stdout(),
                );
                kas_edge::app::run_checked(checked, Box::new(|| {}))
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kas-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}
