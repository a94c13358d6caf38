//! The subcommands, one file each.

mod migrate;
mod serve;

use crate::config::Command;

/// Runs a parsed subcommand.
pub async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
    }
}
