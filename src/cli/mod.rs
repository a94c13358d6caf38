//! The subcommands, one file each.

mod export;
mod hash_secret;
mod import;
mod migrate;
mod progress;
mod serve;

use crate::config::Command;

/// Runs a parsed subcommand.
pub async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Export(args) => export::run(args).await,
        Command::Import(args) => import::run(args).await,
        Command::HashSecret(args) => hash_secret::run(args),
    }
}
