//! The `highwater` binary: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use highwater::config::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logging = match highwater::telemetry::init(&cli.log) {
        Ok(logging) => logging,
        Err(error) => {
            eprintln!("highwater: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    match highwater::cli::dispatch(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
