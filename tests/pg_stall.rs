//! A PostgreSQL server that stops answering without closing its
//! connections (a partition, a frozen host) must not hang requests: each
//! store operation is bounded, the stuck connections are discarded, and the
//! store works again once the server answers.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use highwater::state::ops::{Guard, Meta, Operation, WriteRequest};
use highwater::state::{Blob, ConnectionId, EntryKey, EntryOp, StateType, StateWrite, StreamDescriptor};
use highwater::store::{self, DatabaseUrl, OpenOptions, StoreError};
use support::TestDatabase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards bytes to PostgreSQL; while stalled it holds every connection
/// open and forwards nothing.
async fn stalling_proxy(upstream: String, stalled: watch::Receiver<bool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else { continue };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pump(client_read, server_write, stalled.clone()));
            tokio::spawn(pump(server_read, client_write, stalled.clone()));
        }
    });
    address
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let Ok(n) = from.read(&mut buffer).await else { return };
        if n == 0 {
            return;
        }
        // Hold the bytes while stalled, as a frozen peer would.
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

fn write(name: &str) -> WriteRequest {
    let stream = StreamDescriptor { name: name.to_owned(), namespace: None };
    WriteRequest {
        operation: Operation::Merge(StateWrite {
            state_type: StateType::Stream,
            ops: vec![EntryOp { key: EntryKey::stream(stream), blob: Some(Blob::from_json("1")) }],
        }),
        guard: Guard::default(),
        meta: Meta::default(),
        return_state: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run with HIGHWATER_TEST_BACKEND=postgres and --include-ignored (as .ci/run does)"]
async fn a_silent_database_gives_503_within_the_timeout_and_the_store_recovers() {
    assert_eq!(support::backend(), "postgres", "run this with HIGHWATER_TEST_BACKEND=postgres");
    let database = TestDatabase::new().await;
    let DatabaseUrl::Postgres(url) = &database.url else { unreachable!("a postgres test database") };
    let (stall, stalled) = watch::channel(false);
    let proxy = stalling_proxy("127.0.0.1:5432".to_owned(), stalled).await;
    let via_proxy = url.replace("127.0.0.1:5432", &proxy);
    assert_ne!(&via_proxy, url, "the test database URL must name 127.0.0.1:5432");
    let options = OpenOptions {
        operation_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        ..OpenOptions::default()
    };
    let store = store::open(&via_proxy.parse().unwrap(), &options).await.unwrap();
    let id = ConnectionId::random();
    store.apply(id, write("before")).await.unwrap();

    stall.send(true).unwrap();
    let started = Instant::now();
    let stuck = store.apply(id, write("during")).await;
    assert!(matches!(stuck, Err(StoreError::Unavailable(_))), "{stuck:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));

    stall.send(false).unwrap();
    let recovered = Arc::new(AtomicBool::new(false));
    for _ in 0..50 {
        if store.apply(id, write("after")).await.is_ok() {
            recovered.store(true, Ordering::SeqCst);
            break;
        }
    }
    assert!(recovered.load(Ordering::SeqCst), "the store did not recover");
    let names: Vec<String> = store
        .read(id)
        .await
        .unwrap()
        .entries
        .iter()
        .filter_map(|(key, _)| match key {
            EntryKey::Stream(d) => Some(d.name.clone()),
            _ => None,
        })
        .collect();
    assert!(names.contains(&"before".to_owned()) && names.contains(&"after".to_owned()), "{names:?}");
}
