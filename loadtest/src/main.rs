use std::process::ExitCode;

use clap::Parser;

use kas_loadtest::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("loadtest")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kas-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let (json, html, markdown) = (args.json.clone(), args.html.clone(), args.markdown.clone());
    let report = match runtime.block_on(kas_loadtest::run(args)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("kas-loadtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Agents' tasks may still be parked on sockets; do not wait for them.
    runtime.shutdown_background();
    print!("{}", report.summary_table());
    let mut status = if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    for (path, write) in [
        (
            json,
            kas_loadtest::report::Report::write_json as fn(&_, &_) -> _,
        ),
        (html, kas_loadtest::report::Report::write_html),
        (markdown, kas_loadtest::report::Report::write_markdown),
    ] {
        if let Some(path) = path {
            match write(&report, &path) {
                Ok(()) => println!("wrote {}", path.display()),
                Err(e) => {
                    eprintln!("kas-loadtest: {e:#}");
                    status = ExitCode::from(2);
                }
            }
        }
    }
    status
}
