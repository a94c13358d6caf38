//! `highwater migrate`: create or upgrade the schema, then exit.

use anyhow::Context;

use crate::config::DatabaseArgs;
use crate::store;

pub async fn run(args: DatabaseArgs) -> anyhow::Result<()> {
    let url = &args.database_url;
    store::open(url, &store::OpenOptions { sole_node: false, ..args.open_options(true) })
        .await
        .with_context(|| format!("cannot migrate {url} (--database-url / HIGHWATER_DATABASE_URL)"))?;
    tracing::info!(database = %url, "schema is up to date");
    Ok(())
}
