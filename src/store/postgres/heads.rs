//! The check a read of a cached state makes, batched.
//!
//! A node may hold a connection's state, but another node may have written
//! it since: every read first asks the database for the connection's row,
//! and answers from the cache only when the row shows the version held
//! (unless this node holds the sole-node lease, `sole`: then nothing else
//! writes, and the cache alone answers).
//! Asked one by one, that is a pooled client and a round trip per read, and
//! reads ran at the database's round-trip rate (bench/run, PostgreSQL `get`
//! of a 10-stream state: 13k req/s, 0.16x the HTTP floor). Here one task
//! takes every check waiting and answers them all with one query; the next
//! batch gathers while that query is out. One task beat two in four
//! alternated 8 s rounds of bench/'s PostgreSQL get (32 clients): 37.1k /
//! 39.6k / 41.0k / 45.2k req/s against 33.4k / 33.4k / 35.4k / 37.4k, p99
//! 3.2 / 1.9 / 1.8 / 1.5 ms against 2.8 / 2.7 / 2.4 / 1.5 ms, with ~35%
//! fewer queries and ~40% less of PostgreSQL's CPU.
//!
//! A check is answered only by a query sent after it was made: a query
//! already on its way when a check arrives does not answer it. So a read
//! sees every write acknowledged before the read began, whichever node
//! made it.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::queries::header_from;
use super::{classify, with_client};
use crate::state::ConnectionId;
use crate::store::cache::Header;
use crate::store::StoreError;

/// Most checks one query answers.
const MAX_BATCH: usize = 256;
/// Checks that may wait before readers are made to wait.
const QUEUE_DEPTH: usize = 4096;

/// The row, with its id (column 4), of each connection given that has one.
/// `= ANY` rather than `unnest` joined to a lookup per id: pgbench of both
/// forms for one id (8 clients, prepared) gave 37.7k-40.3k against
/// 28.2k-30.7k tps.
const HEADS: &str = "SELECT state_type, revision, next_seq, epoch, connection_id \
     FROM connections WHERE connection_id = ANY($1::text[])";

type Answer = Result<Option<Header>, StoreError>;

/// A read waiting for its connection's row.
struct Check {
    id: ConnectionId,
    reply: oneshot::Sender<Answer>,
}

/// Where checks wait for the task that answers them.
pub struct Heads {
    queue: mpsc::Sender<Check>,
}

impl Heads {
    /// Starts the task; it stops when `Heads` is dropped.
    pub fn start(pool: Pool, operation_timeout: Duration) -> Self {
        let (queue, mut checks) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(async move {
            while let Some(batch) = next_batch(&mut checks).await {
                answer(&pool, operation_timeout, batch).await;
            }
        });
        Self { queue }
    }

    /// The connection's row as the database holds it now (`None`: never
    /// written).
    pub async fn header(&self, id: ConnectionId) -> Answer {
        let stopped = || StoreError::Unavailable("the PostgreSQL reader has stopped".to_owned());
        let (reply, answer) = oneshot::channel();
        self.queue.send(Check { id, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The next check to arrive and every one waiting behind it.
async fn next_batch(checks: &mut mpsc::Receiver<Check>) -> Option<Vec<Check>> {
    let mut batch = vec![checks.recv().await?];
    while batch.len() < MAX_BATCH {
        let Ok(check) = checks.try_recv() else { break };
        batch.push(check);
    }
    Some(batch)
}

/// Answers every check of the batch with one query; a failure answers
/// them all with the error.
async fn answer(pool: &Pool, operation_timeout: Duration, batch: Vec<Check>) {
    let batch: Vec<Check> = batch.into_iter().filter(|check| !check.reply.is_closed()).collect();
    if batch.is_empty() {
        return;
    }
    let mut ids: Vec<String> = batch.iter().map(|check| check.id.to_string()).collect();
    ids.sort_unstable();
    ids.dedup();
    // An error, too, leaves the session as it was: there is no transaction.
    let rows = with_client(pool, operation_timeout, move |client| {
        Box::pin(async move {
            let statement = client.prepare_cached(HEADS).await.map_err(classify)?;
            client.query(&statement, &[&ids]).await.map_err(classify)
        })
    })
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => {
            for check in batch {
                let _ = check.reply.send(Err(error.clone()));
            }
            return;
        }
    };
    let heads: HashMap<String, &tokio_postgres::Row> = rows.iter().map(|row| (row.get(4), row)).collect();
    for check in batch {
        // No row: the connection was never written.
        let answer = match heads.get(&check.id.to_string()) {
            Some(row) => header_from(row, check.id),
            None => Ok(None),
        };
        let _ = check.reply.send(answer);
    }
}
