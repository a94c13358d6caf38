//! `highwater serve`: open the store, listen, serve until SIGTERM or Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::AppState;
use crate::config::ServeArgs;
use crate::state::history::Retention;
use crate::store::Store;
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
    let pruner = tokio::spawn(prune_history(store.clone(), args.retention(), args.history_prune_interval_secs));
    let app = AppState { store, limits: args.limits() };
    startup::run(listener, app, startup::shutdown_signal()).await.context("the HTTP server failed")?;
    pruner.abort();
    tracing::info!("highwater stopped");
    Ok(())
}

/// Prunes history the retention policy no longer keeps, every
/// `interval_secs`. Failures are logged and retried at the next tick.
async fn prune_history(store: Arc<dyn Store>, policy: Retention, interval_secs: u64) {
    let mut ticks = tokio::time::interval(Duration::from_secs(interval_secs));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = std::time::Instant::now();
        match store.prune(policy).await {
            Ok(0) => tracing::debug!("history pruning found nothing to remove"),
            Ok(removed) => tracing::info!(removed, elapsed_ms = started.elapsed().as_millis() as u64, "pruned history"),
            Err(error) => tracing::warn!(%error, "history pruning failed; retrying at the next interval"),
        }
    }
}
