//! The `highwater` binary: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use highwater::config::Cli;

// mimalloc instead of glibc's malloc: allocation was ~15% of Highwater's
// samples under bench/'s PostgreSQL get load (perf), and in alternated runs
// against the same build with glibc's, SQLite get went from 68.3k/76.0k to
// 81.1k/77.7k req/s and SQLite writes rose 4.3% (bench/compare, 5 rounds).
// It costs ~9 MiB more resident when idle (9.8 -> 19.2 MiB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = highwater::telemetry::init(&cli.log) {
        eprintln!("highwater: {error:#}");
        return ExitCode::FAILURE;
    }
    match highwater::cli::dispatch(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
