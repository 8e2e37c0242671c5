//! `whist`: the Whist webserver's one binary. This file only parses the command line and hands over to the
//! library crates; see ARCHITECTURE.md for the map.

mod bench;
mod bench_fleet;
mod cli;
mod loadtest;

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    cli::main().await
}
