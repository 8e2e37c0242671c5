//! `whist`: the Whist webserver's one binary. This file only parses the command line and hands over to the
//! library crates; see ARCHITECTURE.md for the map.

mod bench;
mod bench_fleet;
mod bench_memory;
mod cli;
mod loadtest;

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the server allocates per request, per event and per row, and glibc's
/// allocator took about a tenth of the machine's CPU under `whist loadtest`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    cli::main().await
}
