//! `highwater serve`: open the store, listen, serve until SIGTERM or Ctrl-C.

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::AppState;
use crate::config::ServeArgs;
use crate::{startup, store};

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let url = &args.database.database_url;
    let store = store::open(url, &args.database.open_options(args.migrate))
        .await
        .with_context(|| format!("cannot open the state store {url} (--database-url / HIGHWATER_DATABASE_URL)"))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen / HIGHWATER_LISTEN)", args.listen))?;
    let address = listener.local_addr().context("cannot read the listening address")?;
    tracing::info!(%address, database = %url, "highwater listening");
    let app = AppState { store, limits: args.limits() };
    startup::run(listener, app, startup::shutdown_signal()).await.context("the HTTP server failed")?;
    tracing::info!("highwater stopped");
    Ok(())
}
