//! Serving: the router on a listener until a shutdown signal. Taking the
//! listener lets tests bind port 0 and know the address before serving.
//!
//! The accept loop is axum's `serve` with one thing added: a client must
//! send a request's headers within `--header-read-timeout-secs` (60 s) of
//! the server starting to wait for them, on a new connection or on a kept-
//! alive one after its last answer, or the connection is closed (so idle
//! connections are closed after it too, as by nginx's `keepalive_timeout`,
//! 75 s). Without it a client that opens connections and sends nothing, or
//! a header a byte at a time, holds each connection and its file
//! descriptor for ever; axum's `serve` cannot set the timer hyper's
//! timeout needs.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::api::{router, AppState};

/// Serves the API on `listener` until `shutdown` completes, then finishes
/// the requests in flight and closes idle connections.
pub async fn run(
    listener: TcpListener,
    app: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(app.limits.header_read_timeout);
    let router = router(app);
    let connections = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers go out as soon as they are written, not held back by
        // Nagle's algorithm until the client acknowledges what went
        // before. Alternated 6 s wrk runs of `get` (SQLite): the 10-stream
        // state 77.7k/71.5k/82.4k -> 82.3k/89.5k/85.8k req/s, the
        // 10,000-stream one 3.00k/3.06k/3.21k -> 3.15k/3.31k/3.53k with a
        // lower p99 in each; writes 1.01x.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
        }
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            // Who is asking, for the log of refused credentials (api/auth.rs).
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(request)
        });
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// Waits out a failed accept: at once for one connection's own failure,
/// a second for anything else (most likely the process's limit of open
/// files, which connections closing will free).
async fn accept_failed(error: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(%error, "cannot accept connections; trying again in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received; finishing requests in flight");
}
