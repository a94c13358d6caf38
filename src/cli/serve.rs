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
    warn_of_a_low_open_files_limit(args.max_concurrent_requests);
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

/// Files this process keeps open besides its clients' connections: the
/// store's (SQLite's file, WAL and readers, or PostgreSQL's pool), the
/// listener, the log and the runtime's own, with room to spare.
const FILES_BESIDES_CONNECTIONS: u64 = 64;

/// Warns when the process may not open a file for every request it may
/// serve at once: beyond the limit, new connections fail (`EMFILE`) until
/// others close. Under systemd the limit is 1024 unless `LimitNOFILE`
/// raises it. Linux only (`/proc/self/limits`); elsewhere nothing is said.
fn warn_of_a_low_open_files_limit(max_concurrent_requests: u64) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let Some(limit) = open_files_limit(&limits) else {
        return;
    };
    let needed = max_concurrent_requests.saturating_add(FILES_BESIDES_CONNECTIONS);
    if limit < needed {
        tracing::warn!(
            open_files_limit = limit,
            max_concurrent_requests,
            "the open-files limit is lower than --max-concurrent-requests needs: connections beyond it fail until \
             others close; raise it (systemd LimitNOFILE=, ulimit -n) or lower --max-concurrent-requests"
        );
    }
}

/// The soft limit on open files from the text of `/proc/self/limits`;
/// `None` for "unlimited" or text it cannot read.
fn open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
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

#[cfg(test)]
mod tests {
    use super::open_files_limit;

    #[test]
    fn the_soft_open_files_limit_is_read_from_proc_self_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(open_files_limit(limits), Some(1024));
        assert_eq!(open_files_limit("Max open files            unlimited            unlimited            files"), None);
        assert_eq!(open_files_limit(""), None);
    }
}
