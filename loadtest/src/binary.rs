//! What the crate's two programs (`kas-loadtest`, `kas-loadtest-stack`) do alike around
//! their work: logs on stderr, a multi-thread runtime, and an error that ends the program
//! with status 2 (status 1 is `kas-loadtest`'s "ran, but missed its thresholds"). Written
//! once so both programs report set-up failures the same way.

use std::process::ExitCode;

use tokio::runtime::Runtime;

/// Exit status for "could not run" (bad options, set-up failed, an error mid-run).
const COULD_NOT_RUN: u8 = 2;

/// Logs to stderr (`RUST_LOG`, `warn` when unset) and starts the runtime; on failure the
/// error is printed under `program`'s name and the status to exit with is returned.
pub fn start(program: &str, thread_name: &str) -> Result<Runtime, ExitCode> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(thread_name)
        .build()
        .map_err(|e| {
            failed(
                program,
                &anyhow::Error::new(e).context("cannot start the runtime"),
            )
        })
}

/// Prints `error` (with its causes) under `program`'s name; the status to exit with.
pub fn failed(program: &str, error: &anyhow::Error) -> ExitCode {
    eprintln!("{program}: {error:#}");
    ExitCode::from(COULD_NOT_RUN)
}
