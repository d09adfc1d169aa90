use std::process::ExitCode;

use clap::Parser;

use kas_loadtest::binary;
use kas_loadtest::stack::{self, StackArgs};

const PROGRAM: &str = "kas-loadtest-stack";

fn main() -> ExitCode {
    let args = StackArgs::parse();
    let runtime = match binary::start(PROGRAM, "loadtest-stack") {
        Ok(runtime) => runtime,
        Err(status) => return status,
    };
    match runtime.block_on(stack::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => binary::failed(PROGRAM, &e),
    }
}
