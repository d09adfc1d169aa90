use std::process::ExitCode;

use clap::Parser;

use kas_loadtest::{binary, Args};

const PROGRAM: &str = "kas-loadtest";

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match binary::start(PROGRAM, "loadtest") {
        Ok(runtime) => runtime,
        Err(status) => return status,
    };
    let (json, html, markdown) = (args.json.clone(), args.html.clone(), args.markdown.clone());
    let report = match runtime.block_on(kas_loadtest::run(args)) {
        Ok(report) => report,
        Err(e) => return binary::failed(PROGRAM, &e),
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
                Err(e) => status = binary::failed(PROGRAM, &e),
            }
        }
    }
    status
}
