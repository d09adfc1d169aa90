use std::process::ExitCode;

use clap::Parser;

use kas_loadtest::stack::{self, StackArgs};

fn main() -> ExitCode {
    let args = StackArgs::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("loadtest-stack")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kas-loadtest-stack: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(stack::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kas-loadtest-stack: {e:#}");
            ExitCode::from(2)
        }
    }
}
