//! `highwater serve`: open the store, listen, serve until SIGTERM or Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::AppState;
use crate::auth::Authenticator;
use crate::config::ServeArgs;
use crate::state::history::Retention;
use crate::store::Store;
use crate::{startup, store};

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let authenticator = authenticator(&args)?;
    if authenticator.is_none() && !args.listen.ip().is_loopback() && !args.behind_auth_proxy {
        anyhow::bail!(
            "refusing to listen on {} without authentication: give credentials (--auth-file / HIGHWATER_AUTH_FILE), \
             or say an authenticating proxy stands in front (--behind-auth-proxy / HIGHWATER_BEHIND_AUTH_PROXY=true)",
            args.listen
        );
    }
    let url = &args.database.database_url;
    let store = store::open(url, &args.database.open_options(args.migrate))
        .await
        .with_context(|| format!("cannot open the state store {url} (--database-url / HIGHWATER_DATABASE_URL)"))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen / HIGHWATER_LISTEN)", args.listen))?;
    let address = listener.local_addr().context("cannot read the listening address")?;
    let auth = if authenticator.is_some() { "on" } else { "off" };
    tracing::info!(%address, database = %url, authentication = auth, "highwater listening");
    let pruner = tokio::spawn(prune_history(store.clone(), args.retention(), args.history_prune_interval_secs));
    let app = AppState::new(store.clone(), args.limits(), authenticator);

    // On a signal, stop accepting and let requests in flight finish, but
    // not for longer than the shutdown timeout.
    let signalled = Arc::new(tokio::sync::Notify::new());
    let notify = signalled.clone();
    let graceful = startup::run(listener, app, async move {
        startup::shutdown_signal().await;
        notify.notify_one();
    });
    let grace = Duration::from_secs(args.shutdown_timeout_secs);
    tokio::select! {
        served = graceful => served.context("the HTTP server failed")?,
        () = async { signalled.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(seconds = grace.as_secs(), "requests still in flight after the shutdown timeout; exiting");
        }
    }
    pruner.abort();
    let _ = pruner.await;
    store.close().await;
    tracing::info!("highwater stopped");
    Ok(())
}

/// The credentials, from the file or the environment; `None`: none given.
fn authenticator(args: &ServeArgs) -> anyhow::Result<Option<Arc<Authenticator>>> {
    let (json, source) = match (&args.auth_file, &args.auth_credentials) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the credentials file {} (--auth-file)", path.display()))?;
            (text, format!("{} (--auth-file)", path.display()))
        }
        (None, Some(text)) => (text.clone(), "HIGHWATER_AUTH_CREDENTIALS".to_owned()),
        (None, None) => return Ok(None),
    };
    let authenticator = Authenticator::from_json(&json).with_context(|| format!("invalid credentials in {source}"))?;
    Ok(Some(Arc::new(authenticator)))
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
            Ok(0) => tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "history pruning found nothing to remove"
            ),
            Ok(removed) => tracing::info!(removed, elapsed_ms = started.elapsed().as_millis() as u64, "pruned history"),
            Err(error) => tracing::warn!(%error, "history pruning failed; retrying at the next interval"),
        }
    }
}
