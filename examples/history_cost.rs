//! Measures what history costs for a 10,000-stream connection: one write of
//! 10,000 streams, then N revisions that each change one stream; prints the
//! storage used before and after, per revision, against a full copy.
//!
//! ```text
//! cargo run --release --example history_cost -- sqlite:///tmp/hc.db 1000
//! cargo run --release --example history_cost -- postgres://postgres@127.0.0.1/hc 1000
//! ```

use highwater::state::{Blob, ConnectionId, EntryKey, EntryOp, StateType, StateWrite, StreamDescriptor};
use highwater::store::{self, DatabaseUrl};

const STREAMS: usize = 10_000;

fn blob(i: usize, version: usize) -> Blob {
    Blob::from_json(&format!(
        r#"{{"cursor":"2024-06-{:02}T00:00:00Z","offset":{},"stream":{i}}}"#,
        version % 28 + 1,
        version * 1000
    ))
}

fn op(i: usize, version: usize) -> EntryOp {
    let key =
        EntryKey::stream(StreamDescriptor { name: format!("table_{i:05}"), namespace: Some("public".to_owned()) });
    EntryOp { key, blob: Some(blob(i, version)) }
}

async fn size(url: &DatabaseUrl) -> anyhow::Result<u64> {
    match url {
        DatabaseUrl::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path)?;
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
            let pages: u64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let free: u64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            let page: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok((pages - free) * page)
        }
        DatabaseUrl::Postgres(url) => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client.batch_execute("VACUUM ANALYZE").await?;
            let row = client
                .query_one(
                    "SELECT (pg_total_relation_size('changes') + pg_total_relation_size('entries') \
                     + pg_total_relation_size('revisions') + pg_total_relation_size('connections'))::bigint",
                    &[],
                )
                .await?;
            Ok(row.get::<_, i64>(0) as u64)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url: DatabaseUrl = args
        .next()
        .unwrap_or_else(|| "sqlite:///tmp/history_cost.db".to_owned())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let revisions: usize = args.next().map_or(Ok(1000), |n| n.parse())?;
    let store = store::open(&url, &Default::default()).await?;
    let id = ConnectionId::random();
    let all: Vec<EntryOp> = (0..STREAMS).map(|i| op(i, 0)).collect();
    let state_bytes: usize = all.iter().map(|o| o.blob.as_ref().map_or(0, Blob::len) + 40).sum();
    let before = size(&url).await?;
    store.write(id, StateWrite { state_type: StateType::Stream, ops: all }).await?;
    let with_state = size(&url).await?;
    let started = std::time::Instant::now();
    for r in 1..=revisions {
        let write = StateWrite { state_type: StateType::Stream, ops: vec![op(r * 7 % STREAMS, r)] };
        store.write(id, write).await?;
    }
    let elapsed = started.elapsed();
    let after = size(&url).await?;
    let per_revision = (after.saturating_sub(with_state)) as f64 / revisions as f64;
    println!("backend: {}", if matches!(url, DatabaseUrl::Sqlite(_)) { "sqlite" } else { "postgres" });
    println!("streams: {STREAMS}, state JSON ≈ {:.2} MB", state_bytes as f64 / 1e6);
    println!("storage for the first revision (all streams): {:.2} MB", (with_state - before) as f64 / 1e6);
    println!("one-stream revisions: {revisions} in {:.2?}", elapsed);
    println!(
        "storage per one-stream revision: {per_revision:.0} bytes ({:.4}% of a full copy)",
        per_revision / state_bytes as f64 * 100.0
    );
    Ok(())
}
