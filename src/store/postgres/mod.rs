//! The PostgreSQL backend, for many stateless nodes on one database.
//!
//! Writes to one connection are serialised across nodes by a
//! transaction-scoped advisory lock keyed by the connection id, taken before
//! the stored type and revision are read; the revision number therefore
//! advances by exactly one per changing write, whichever node takes it.
//! Inside a node, writes to the same connection queue on an in-process lock
//! first, so they never hold more than one pooled connection while waiting
//! and writes to other connections are not starved of the pool; writes to
//! different connections are then committed together in batches
//! (`batch`). Reads are a single statement, hence a single snapshot.

mod batch;
mod dump;
mod heads;
mod history;
mod keyed_lock;
mod queries;
mod schema;
mod sole;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls};
use uuid::Uuid;

pub use schema::SchemaError;

use super::cache::{StateCache, Update};
use super::dump::ConnectionDump;
use super::{Applied, LoadOutcome, Store, StoreError};
use crate::state::history::{History, Pruned, Retention};
use crate::state::ops::{Lease, LeaseOp, WriteRequest};
use crate::state::{Blob, ConnectionId, EntryKey, StoredState, StreamDescriptor};
use batch::Batcher;
use heads::Heads;
use keyed_lock::KeyedLock;
use sole::Sole;

/// Write batches one node commits at once (see `batch`). With more, each
/// batch is smaller and the database does more work per write; measured
/// with bench/'s write load (32 clients): 1, 2 and 4 tasks made 4.97k,
/// 5.01k and 4.69k writes/s; again with one-round-trip batches, 2 and 4
/// tasks made 3.7k-4.8k and 3.4k-3.8k in paired runs; with batches that
/// wait for half of the one in flight, 3 tasks made 0.91× of 2.
/// (Batches now wait for as many writes as the one in flight.)
const BATCHING_TASKS: usize = 2;

/// Connection settings of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections one node keeps open.
    pub pool_size: usize,
    /// How long to wait for a connection (new or pooled) before answering
    /// 503.
    pub connect_timeout: Duration,
    /// Apply pending migrations at start-up.
    pub migrate: bool,
    /// The longest one store operation may take before it fails as
    /// unavailable (a silent server must not hang requests).
    pub operation_timeout: Duration,
    /// Memory for cached current states, in bytes.
    pub state_cache_bytes: usize,
    /// Take the sole-node lease when no other node runs, and then answer
    /// reads from the cache alone (`sole`).
    pub sole_node: bool,
}

/// Why the PostgreSQL store cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid PostgreSQL URL: {0}")]
    Url(tokio_postgres::Error),
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(StoreError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

/// A [`Store`] on a PostgreSQL database.
pub struct PostgresStore {
    pool: Pool,
    writers: KeyedLock<ConnectionId>,
    operation_timeout: Duration,
    cache: Arc<StateCache>,
    batcher: Batcher,
    heads: Heads,
    sole: Sole,
    /// This node's name in the sole-node lease.
    node: String,
    warming: Arc<Warming>,
}

/// Reads that put in the cache a connection this node wrote without
/// reading it whole ([`PostgresStore::warm`]).
struct Warming {
    /// One such read at a time: they are a convenience, never a load.
    permit: Arc<tokio::sync::Semaphore>,
    /// Connections read so that proved too large for the cache to keep:
    /// not read again. Forgotten all at once beyond [`TOO_LARGE_LIMIT`].
    too_large: std::sync::Mutex<std::collections::HashSet<ConnectionId>>,
}

/// Most connections [`Warming`] remembers as too large to keep.
const TOO_LARGE_LIMIT: usize = 10_000;

impl PostgresStore {
    /// Connects, migrates (unless told not to) and checks the schema.
    pub async fn open(url: &str, options: &PostgresOptions) -> Result<Self, OpenError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(OpenError::Url)?;
        config.connect_timeout(options.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("highwater");
        }
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| OpenError::Pool(e.to_string()))?;
        let mut client = pool.get().await.map_err(|e| OpenError::Connect(pool_error(e)))?;
        schema::prepare(&mut client, options.migrate).await?;
        drop(client);
        let cache = Arc::new(StateCache::new(options.state_cache_bytes));
        // This node's name in the sole-node lease, which its writes give
        // `highwater_lock` (sole.rs).
        let node = Uuid::new_v4().to_string();
        let batcher =
            Batcher::start(pool.clone(), cache.clone(), options.operation_timeout, BATCHING_TASKS, node.clone());
        let heads = Heads::start(pool.clone(), options.operation_timeout);
        let sole = Sole::start(config, node.clone(), cache.clone(), options.sole_node);
        Ok(Self {
            pool,
            writers: KeyedLock::default(),
            operation_timeout: options.operation_timeout,
            cache,
            batcher,
            heads,
            sole,
            node,
            warming: Arc::new(Warming {
                permit: Arc::new(tokio::sync::Semaphore::new(1)),
                too_large: std::sync::Mutex::default(),
            }),
        })
    }

    /// Puts in the cache, in the background, a connection this node has
    /// just written but does not hold: the state of a write that does not
    /// return it (`state/stream/set`, for one) is never read whole, and
    /// without it every later write of the connection read its head first,
    /// two round trips instead of one (docs/performance.md: 1525 against
    /// 2172-2263 writes/s for one connection written only so). Skipped
    /// when another such read is under way, and for a connection too large
    /// to keep.
    fn warm(&self, id: ConnectionId) {
        if !self.cache.enabled()
            || self.cache.holds(id)
            || self.warming.too_large.lock().map_or(true, |too_large| too_large.contains(&id))
        {
            return;
        }
        let Ok(permit) = self.warming.permit.clone().try_acquire_owned() else {
            return;
        };
        let (pool, timeout) = (self.pool.clone(), self.operation_timeout);
        let (cache, writers, warming) = (self.cache.clone(), self.writers.clone(), self.warming.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // Held from before the mark to the put: no write of the
            // connection on this node goes by meanwhile, so what is read is
            // current (`StateCache::put_locked`).
            let _writer = writers.lock(id).await;
            if cache.holds(id) {
                return;
            }
            let mark = cache.mark();
            let read = with_client(&pool, timeout, move |client| {
                Box::pin(async move { queries::read_whole(&*client, id).await })
            })
            .await;
            match read {
                Ok(Some((version, cached))) if cache.fits(&cached) => cache.put_locked(id, version, cached, mark),
                Ok(Some(_)) => {
                    if let Ok(mut too_large) = warming.too_large.lock() {
                        if too_large.len() >= TOO_LARGE_LIMIT {
                            too_large.clear();
                        }
                        too_large.insert(id);
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(connection = %id, %error, "could not read a written connection into the cache")
                }
            }
        });
    }

    /// Runs `work` on a pooled client within the operation timeout. A
    /// client whose work did not finish (timed out, or the request was
    /// dropped) may be mid-transaction or stuck on a silent server, so it
    /// is closed rather than pooled again.
    async fn with_client<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(&'c mut Object) -> Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'c>>,
    {
        with_client(&self.pool, self.operation_timeout, work).await
    }
}

/// [`PostgresStore::with_client`], for the tasks that hold the pool and the
/// timeout themselves.
async fn with_client<T, F>(pool: &Pool, operation_timeout: Duration, work: F) -> Result<T, StoreError>
where
    F: for<'c> FnOnce(&'c mut Object) -> Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'c>>,
{
    bounded(operation_timeout, async {
        let mut client = Guarded(Some(pool.get().await.map_err(pool_error)?), false);
        let result = work(client.object()?).await;
        client.1 = true;
        result
    })
    .await
}

/// Runs `operation` within `timeout`; a silent server must not hang requests.
async fn bounded<T>(
    timeout: Duration,
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, operation)
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable(format!("PostgreSQL did not answer within {timeout:?}"))))
}

/// A pooled client and whether its work finished.
struct Guarded(Option<Object>, bool);

impl Guarded {
    fn object(&mut self) -> Result<&mut Object, StoreError> {
        self.0.as_mut().ok_or_else(|| StoreError::Internal("pooled client already released".to_owned()))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let (Some(object), false) = (self.0.take(), self.1) {
            drop(Object::take(object));
        }
    }
}

type Work<'t, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 't>>;

impl PostgresStore {
    /// Runs `work` in a transaction holding the connection's advisory lock,
    /// after queueing on this node's lock for the same connection, and
    /// commits it.
    async fn locked<T, F>(&self, id: ConnectionId, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t Transaction<'t>) -> Work<'t, T> + Send + 'static,
    {
        let _queued = self.writers.lock(id).await;
        let node = self.node.clone();
        self.with_client(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(classify)?;
                // The connection's lock, after any other node's sole-node
                // lease has ended (sole.rs).
                tx.execute("SELECT highwater_lock(ARRAY[$1::int8], $2)", &[&lock_key(id), &node])
                    .await
                    .map_err(classify)?;
                let output = work(&tx).await?;
                tx.commit().await.map_err(classify)?;
                Ok(output)
            })
        })
        .await
    }

    /// Runs `work` in a read-only repeatable-read transaction: one snapshot
    /// for several statements.
    async fn snapshot<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t Transaction<'t>) -> Work<'t, T> + Send + 'static,
    {
        self.with_client(move |client| {
            Box::pin(async move {
                let tx = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(classify)?;
                let output = work(&tx).await?;
                tx.commit().await.map_err(classify)?;
                Ok(output)
            })
        })
        .await
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn read_at(&self, id: ConnectionId, at: Option<u64>) -> Result<Arc<StoredState>, StoreError> {
        let Some(revision) = at else {
            // When this node alone writes (sole.rs), what the cache holds is
            // current. Otherwise a state the cache holds is answered from it
            // once the database shows it current; the check is batched
            // (heads.rs).
            let sole = self.sole.holds();
            let cached = if sole {
                self.cache.current(id)
            } else if self.cache.holds(id) {
                let header = self.heads.header(id).await?.unwrap_or_default();
                self.cache.get(id, header.version())
            } else {
                None
            };
            if let Some(cached) = cached {
                return Ok(cached.state);
            }
            let cache = self.cache.clone();
            return self
                .with_client(move |client| {
                    Box::pin(async move { Ok(queries::read_whole_state(&*client, id, &cache, sole).await?.state) })
                })
                .await;
        };
        self.snapshot(move |tx| {
            Box::pin(async move {
                let (state_type, entries) = queries::state_at(tx, id, revision).await?;
                let entries = entries.into_iter().map(|(key, _, blob)| (key, blob)).collect();
                Ok(Arc::new(StoredState { state_type, revision, entries }))
            })
        })
        .await
    }

    async fn read_stream(&self, id: ConnectionId, stream: StreamDescriptor) -> Result<(u64, Option<Blob>), StoreError> {
        self.snapshot(move |tx| {
            Box::pin(async move {
                let revision = queries::header(tx, id).await?.map_or(0, |h| h.revision);
                Ok((revision, queries::entry_blob(tx, id, &EntryKey::stream(stream)).await?))
            })
        })
        .await
    }

    async fn apply(&self, id: ConnectionId, request: WriteRequest) -> Result<Applied, StoreError> {
        // A write that returns the state has it whole, and the cache with it
        // unless it is too large to keep.
        let returns_state = request.return_state;
        let applied = {
            // Shared with the write's job (batch.rs, `Batcher::apply`).
            let writer = Arc::new(self.writers.lock(id).await);
            self.batcher.apply(id, request, writer.clone()).await
        };
        // Letting go of the lock woke its next waiter, if any, into this
        // worker's LIFO slot, where it runs only once this task yields; the
        // caller goes on to render the answer (about 0.3 ms for a 1.3 MB
        // state), so the next write of the connection goes first. 32 clients
        // writing one 10,000-stream connection, alternated 8 s runs:
        // 652 / 571 -> 929 / 818 writes/s; writes to 1000 connections did
        // not move.
        tokio::task::yield_now().await;
        if applied.is_ok() && !returns_state {
            self.warm(id);
        }
        applied
    }

    async fn history(&self, id: ConnectionId, limit: usize, before: Option<u64>) -> Result<History, StoreError> {
        self.snapshot(move |tx| Box::pin(async move { history::history(tx, id, limit, before).await })).await
    }

    async fn lease(&self, id: ConnectionId, op: LeaseOp) -> Result<Option<Lease>, StoreError> {
        let token = Uuid::new_v4().to_string();
        self.locked(id, move |tx| Box::pin(async move { history::lease(tx, id, &op, token).await })).await
    }

    async fn leases(&self, id: Option<ConnectionId>) -> Result<Vec<(ConnectionId, Lease)>, StoreError> {
        self.with_client(move |client| Box::pin(async move { history::leases(&*client, id).await })).await
    }

    async fn prune_connection(&self, id: ConnectionId, policy: Retention, most: u64) -> Result<Pruned, StoreError> {
        // Skip a connection being written now rather than wait for it.
        let node = self.node.clone();
        self.with_client(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(classify)?;
                // A Highwater write, to the triggers of schema 5 (sole.rs),
                // that changes no current state: no connection lock needed.
                tx.execute("SELECT highwater_lock('{}', $1)", &[&node]).await.map_err(classify)?;
                let row =
                    tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&lock_key(id)]).await.map_err(classify)?;
                if !row.get::<_, bool>(0) {
                    return Ok(Pruned { removed: 0, more: false });
                }
                let pruned = history::prune(&tx, id, policy, most).await?;
                tx.commit().await.map_err(classify)?;
                Ok(pruned)
            })
        })
        .await
    }

    async fn due_for_pruning(
        &self,
        ids: &[ConnectionId],
        policy: Retention,
        most: u64,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        // Most connections have nothing to remove: one query for a page of
        // them, outside any transaction, and only those named are pruned
        // (each asked again under its lock). A pass over 1000 connections
        // with nothing to remove: 2.7 s when each opened a transaction and
        // ran the deletes, 0.25-0.39 s when each was asked on its own first
        // (on another host), 11-18 ms asked a page at a time (325-352 ms one
        // by one, on the same host).
        let ids = ids.to_vec();
        self.with_client(move |client| Box::pin(async move { history::due(&*client, &ids, policy, most).await })).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with_client(|client| {
            Box::pin(async move { client.simple_query("SELECT 1").await.map(drop).map_err(classify) })
        })
        .await
    }

    async fn list_connections(
        &self,
        after: Option<ConnectionId>,
        limit: usize,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        self.with_client(move |client| Box::pin(async move { dump::list(&*client, after, limit).await })).await
    }

    async fn dump(&self, id: ConnectionId) -> Result<Option<ConnectionDump>, StoreError> {
        self.snapshot(move |tx| Box::pin(async move { dump::read(tx, id).await })).await
    }

    async fn load(&self, record: ConnectionDump, overwrite: bool) -> Result<LoadOutcome, StoreError> {
        let id = record.id;
        let outcome =
            self.locked(id, move |tx| Box::pin(async move { dump::load(tx, &record, overwrite).await })).await;
        // Counted as a commit: a read that began before must not keep
        // what it read.
        self.cache.committed([(id, Update::Forget)]);
        outcome
    }

    async fn close(&self) {
        self.sole.close().await;
    }
}

/// The advisory-lock key of a connection: its 128 bits folded to 64.
fn lock_key(id: ConnectionId) -> i64 {
    let bits = id.as_u128();
    ((bits >> 64) as u64 ^ bits as u64) as i64
}

fn pool_error(error: PoolError) -> StoreError {
    match error {
        PoolError::Backend(error) => classify(error),
        PoolError::Timeout(kind) => {
            StoreError::Unavailable(format!("no PostgreSQL connection within the timeout ({kind:?})"))
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Classifies a PostgreSQL error once, for every caller.
fn classify(error: tokio_postgres::Error) -> StoreError {
    let Some(db) = error.as_db_error() else {
        // No server answer: the connection broke, timed out or was refused.
        return StoreError::Unavailable(error.to_string());
    };
    let code = db.code();
    // tokio-postgres shows a server error only as "db error"; the log needs
    // the server's own words.
    let text = match db.detail() {
        Some(detail) => format!("PostgreSQL {}: {} ({detail})", code.code(), db.message()),
        None => format!("PostgreSQL {}: {}", code.code(), db.message()),
    };
    if *code == SqlState::DISK_FULL || *code == SqlState::OUT_OF_MEMORY {
        return StoreError::Full(text);
    }
    let transient = code.code().starts_with("08") // connection exceptions
        || code.code().starts_with("57P") // operator intervention: shutdown, cannot connect now
        || code.code().starts_with("53") // insufficient resources
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || *code == SqlState::LOCK_NOT_AVAILABLE;
    if transient {
        StoreError::Unavailable(text)
    } else {
        StoreError::Internal(text)
    }
}
