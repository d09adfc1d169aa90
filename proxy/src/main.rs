use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kas_edge::operator::{Target, TargetArgs};
use kas_edge::policy::edit::{self, Edited};
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
        /// Take the listening sockets from the edge running with this configuration
        /// instead of binding them: start this, then send SIGQUIT to the running one,
        /// which hands its sockets over and drains (`shutdown.upgrade_socket`).
        #[arg(long, short)]
        upgrade: bool,
    },
    /// Validate a configuration file (and the files it names) and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Block an address or network on every replica: adds it to the blocklist with the
    /// reason, who and when. Against the ConfigMap the edge watches, every replica refuses
    /// it (and closes its open connections) within about a second.
    Block(BlockArgs),
    /// Remove an address's or network's own blocklist entries (and their reason lines).
    Unblock(UnblockArgs),
    /// The blocklist itself.
    Blocklist {
        #[command(subcommand)]
        command: BlocklistCommand,
    },
    /// Start the local stack: GitLab stand-in, 3 kas pods and the edge in front.
    #[cfg(feature = "dev")]
    Dev {
        /// Directory for generated secrets, token, certificate and demo repository.
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct BlockArgs {
    /// An IP address or a network in CIDR notation (canonical: 10.0.0.0/8).
    address: String,
    /// Why (an incident, a ticket); written as a comment with who and when.
    #[arg(long)]
    reason: String,
    /// Who blocks, for the comment (default: login name@host).
    #[arg(long)]
    by: Option<String>,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Args)]
struct UnblockArgs {
    /// The address or network, as its entries name it.
    address: String,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Subcommand)]
enum BlocklistCommand {
    /// Print the list in force, with its resourceVersion, entries and the content hash
    /// every replica that holds it shows in `edge_blocklist_content_hash`.
    Show {
        #[command(flatten)]
        list: ListArgs,
    },
}

/// What a blocklist command does, its arguments checked before anything is contacted.
enum Action {
    Show,
    Block {
        net: ipnet::IpNet,
        reason: String,
        stamp: edit::Stamp,
    },
    Unblock(ipnet::IpNet),
}

/// Which list: the ConfigMap the edge watches, a file, or what an edge configuration names.
#[derive(Args)]
struct ListArgs {
    /// The ConfigMap of `policies.blocklist_configmap`, as NAMESPACE/NAME.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    configmap: Option<String>,
    /// The ConfigMap key.
    #[arg(long, requires = "configmap", default_value = kas_edge::config::DEFAULT_BLOCKLIST_KEY)]
    key: String,
    /// A blocklist file (`policies.blocklist`).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// An edge configuration: its blocklist ConfigMap, else its blocklist file.
    #[arg(long, value_name = "EDGE.TOML")]
    config: Option<PathBuf>,
    /// Kubernetes credentials (default: KUBECONFIG, ~/.kube/config, or the pod's).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current one).
    #[arg(long)]
    context: Option<String>,
}

impl ListArgs {
    fn into_args(self) -> TargetArgs {
        TargetArgs {
            configmap: self.configmap,
            key: Some(self.key),
            file: self.file,
            config: self.config,
            kubeconfig: self.kubeconfig,
            context: self.context,
        }
    }
}

/// `block`, `unblock` and `blocklist show`, on a small runtime of their own.
fn blocklist_command(list: ListArgs, action: Action) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let target = list.into_args().resolve().await?;
        let what = target.describe();
        let outcome = match action {
            Action::Show => {
                let snapshot = target.read().await?;
                print!("{}", snapshot.text);
                eprintln!("# {what}: {}", snapshot.summary());
                return Ok(());
            }
            Action::Block { net, reason, stamp } => {
                target
                    .edit(|text| edit::block(text, net, &reason, &stamp))
                    .await?
            }
            Action::Unblock(net) => target.edit(|text| edit::unblock(text, net)).await?,
        };
        let summary = outcome.snapshot.summary();
        match outcome.edited {
            Edited::Changed { summary: done, .. } => {
                let when = match target {
                    Target::ConfigMap { .. } => {
                        "every replica watching it applies this within about a second"
                    }
                    Target::File(_) => "an edge watching this file applies it within a second",
                };
                println!("{done} in {what} ({summary}): {when}");
            }
            Edited::Unchanged(why) => println!("{why} in {what}; nothing changed ({summary})"),
        }
        Ok(())
    })
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
    if let Some(cm) = &config.policies.blocklist_configmap {
        println!(
            "blocklist ConfigMap {}/{} key {}: watched through the Kubernetes API at run time \
             (`kas-edge blocklist show --config …` reads it now)",
            cm.namespace.as_deref().unwrap_or("(the pod's namespace)"),
            cm.name,
            cm.key
        );
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
    let cli = Cli::parse();
    // The allocator: glibc's malloc set up for bursts (the edge starts itself again with
    // its settings, before any thread exists), and what bursts freed handed back
    // periodically.
    if matches!(cli.command, Command::Run { .. }) {
        kas_edge::support::memory::use_burst_friendly_malloc();
    }
    kas_edge::support::memory::return_freed_memory_periodically();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Block(BlockArgs {
            address,
            reason,
            by,
            list,
        }) => edit::parse_target(&address)
            .map_err(anyhow::Error::from)
            .and_then(|net| {
                let stamp = edit::Stamp::now(by);
                blocklist_command(list, Action::Block { net, reason, stamp })
            }),
        Command::Unblock(UnblockArgs { address, list }) => edit::parse_target(&address)
            .map_err(anyhow::Error::from)
            .and_then(|net| blocklist_command(list, Action::Unblock(net))),
        Command::Blocklist {
            command: BlocklistCommand::Show { list },
        } => blocklist_command(list, Action::Show),
        #[cfg(feature = "dev")]
        Command::Dev { dir } => {
            kas_common::logging::init_with_writer("info", log_writer::stdout());
            kas_edge::dev::run(dir)
        }
        Command::Run { config, upgrade } => {
            kas_edge::app::preflight::from_file(&config).and_then(|checked| {
                kas_common::logging::init_with_writer(
                    &checked.config.log.level,
                    log_writer::stdout(),
                );
                let start = if upgrade {
                    kas_edge::app::upgrade::Start::Upgrade
                } else {
                    kas_edge::app::upgrade::Start::Fresh
                };
                kas_edge::app::run_checked(checked, start, Box::new(|| {}))
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
