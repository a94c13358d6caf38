//! The embedded backend: one SQLite file in WAL mode.
//!
//! One thread owns the only writing connection and commits writes in
//! groups: it takes every write waiting in its queue, applies each in turn
//! (a refused write has written nothing; other jobs run inside their own
//! savepoint) and commits once. A second thread syncs the WAL and only then
//! answers each of them (see `sync`), while the writer goes on with the
//! next group. Concurrent writers so share one fsync without any of them
//! being acknowledged before it is durable. Reads run on a small pool of
//! read-only connections and never wait for the writer.
//!
//! A serving process holds a lock on the file, so it is the file's only
//! writer: the writer thread reports every commit to the state cache in
//! commit order, and a read of a cached state touches no database at all.

mod checkpoint;
mod dump;
mod history;
mod queries;
mod schema;
mod sync;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Semaphore};
use uuid::Uuid;

pub use schema::OpenError;

use self::sync::{Durability, Finished, Syncer};
use super::cache::{GroupStates, StateCache, Update};
use super::dump::ConnectionDump;
use super::{Applied, LoadOutcome, Store, StoreError};
use crate::state::history::{History, Pruned, Retention};
use crate::state::ops::{Lease, LeaseOp, WriteRequest};
use crate::state::{Blob, ConnectionId, EntryKey, StoredState, StreamDescriptor};

/// How many writes one commit may carry.
const MAX_GROUP: usize = 256;
/// Writes that may wait for the writer before senders are made to wait.
const QUEUE_DEPTH: usize = 4096;
/// Read-only connections kept open.
const READERS: usize = 4;
/// The writer's page cache, in KiB. Twice SQLite's default keeps more of
/// the B-tree pages writes touch; larger costs more than it saves, because
/// SQLite scans the cache's hash table at the end of every transaction
/// (measured with bench/'s write loads: 2, 4, 8 and 16 MiB; 4 was best).
const WRITER_CACHE_KIB: i64 = 4 * 1024;

/// What a write job produces, type-erased so one queue carries every kind
/// of write; [`SqliteStore::submit`] restores the type.
type Output = Box<dyn Any + Send>;
type Reply = oneshot::Sender<Result<Output, StoreError>>;
type Work = Box<dyn FnOnce(&Connection, &GroupStates) -> Result<Done, StoreError> + Send>;

/// What a job did: its answer, and what its write does to the state cache
/// once committed.
struct Done {
    output: Output,
    cache: Option<(ConnectionId, Update)>,
}

/// One unit of work for the writer thread, answered after its group
/// commits.
struct WriteJob {
    run: Work,
    reply: Reply,
    isolation: Isolation,
}

/// How a job that fails is kept from leaving part of its work in the group.
#[derive(Clone, Copy)]
enum Isolation {
    /// The job runs inside a savepoint of its own, rolled back if it fails.
    Savepoint,
    /// The job refuses (`StoreError::Refused`) only before it writes
    /// anything, so a refusal needs no rollback; any other failure may have
    /// written part of it and fails the whole group. Saves a savepoint and
    /// its statement journal per write on the hot path (measured: bench/).
    RefusesBeforeWriting,
}

/// A [`Store`] on one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    writes: mpsc::Sender<WriteJob>,
    writer: Option<thread::JoinHandle<()>>,
    cache: Arc<StateCache>,
    /// The open file the lock is held on, kept for the store's lifetime;
    /// while it is held the cache is authoritative (see `StateCache`).
    lock: Option<std::fs::File>,
    readers: Arc<Mutex<Vec<Connection>>>,
    read_permits: Semaphore,
    /// Set when the background integrity check finds damage: from then on
    /// nothing is written and health reports the store unavailable.
    damaged: Arc<AtomicBool>,
    /// Which commits are durable; reads from the database wait on it.
    durability: Arc<Durability>,
}

/// Checks a large file page by page on a thread of its own, marking the
/// store damaged if the check fails.
fn check_in_background(path: &Path, damaged: Arc<AtomicBool>) {
    let path = path.to_owned();
    let spawned = thread::Builder::new().name("hw-integrity".to_owned()).spawn(move || {
        let shown = path.display().to_string();
        let started = std::time::Instant::now();
        let outcome = schema::open_reader(&path)
            .map_err(|e| e.to_string())
            .and_then(|conn| schema::check_integrity(&conn, &shown).map_err(|e| e.to_string()));
        match outcome {
            Ok(()) => tracing::info!(path = %shown, elapsed_ms = started.elapsed().as_millis() as u64, "integrity check passed"),
            Err(problem) => {
                damaged.store(true, Ordering::SeqCst);
                tracing::error!(path = %shown, %problem, "integrity check failed: refusing writes; restore from a backup");
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not start the background integrity check");
    }
}

impl SqliteStore {
    /// Opens the file, creating and migrating it when needed, and starts the
    /// writer thread. With `exclusive`, takes the file's lock first and
    /// fails if another process holds it. Blocks; call it off the async
    /// runtime.
    pub fn open(path: &Path, migrate: bool, cache_bytes: usize, exclusive: bool) -> Result<Self, OpenError> {
        // An existing file is locked before it is touched, so that it is
        // never migrated under another process serving it; a new one once
        // created (a process creating it beside this one migrates it too,
        // in a transaction of its own, and one of the two is refused here).
        let locked_first = exclusive && path.exists();
        let early = if locked_first { schema::lock(path)? } else { None };
        let writer = schema::open_writer(path, migrate)?;
        let lock = if exclusive && !locked_first { schema::lock(path)? } else { early };
        let setup = |source| OpenError::Setup { path: path.display().to_string(), source };
        writer.pragma_update(None, "cache_size", -WRITER_CACHE_KIB).map_err(setup)?;
        writer.pragma_update(None, "wal_autocheckpoint", checkpoint::WRITER_BACKSTOP_PAGES).map_err(setup)?;
        // The sync thread syncs the WAL after each commit (see `sync`).
        writer.pragma_update(None, "synchronous", "NORMAL").map_err(setup)?;
        let checkpointer = checkpoint::Checkpointer::start(path)?;
        let damaged = Arc::new(AtomicBool::new(false));
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size > schema::SYNC_CHECK_BYTES {
            check_in_background(path, damaged.clone());
        }
        let readers = (0..READERS)
            .map(|_| schema::open_reader(path))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| OpenError::Open { path: path.display().to_string(), source })?;
        let (writes, queue) = mpsc::channel(QUEUE_DEPTH);
        let cache = Arc::new(StateCache::new(cache_bytes));
        let durability = Arc::new(Durability::new());
        let states = Arc::new(GroupStates::default());
        let syncer = Syncer::start(path, durability.clone(), cache.clone(), states.clone())?;
        let begun = durability.clone();
        let writer = thread::Builder::new()
            .name("hw-sqlite-write".to_owned())
            .spawn(move || write_loop(writer, queue, checkpointer, syncer, &begun, &states))
            .map_err(OpenError::Thread)?;
        Ok(Self {
            path: path.to_owned(),
            writes,
            writer: Some(writer),
            cache,
            lock,
            readers: Arc::new(Mutex::new(readers)),
            read_permits: Semaphore::new(READERS),
            damaged,
            durability,
        })
    }

    /// Runs `f` on a pooled read-only connection, inside one read
    /// transaction so it sees a single committed snapshot.
    async fn with_reader<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let _permit = self
            .read_permits
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("the store is shutting down".to_owned()))?;
        let pooled = self.readers.lock().map_err(|_| poisoned())?.pop();
        let conn = match pooled {
            Some(conn) => conn,
            // A reader is lost only if a read panicked; replace it.
            None => schema::open_reader(&self.path).map_err(classify)?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = conn;
            let result =
                conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(classify).and_then(|tx| f(&tx));
            (conn, result)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("read task failed: {e}")))?;
        self.readers.lock().map_err(|_| poisoned())?.push(conn);
        // The snapshot may hold commits whose WAL is still being synced.
        self.durability.settle_reads().await;
        result
    }
}

impl SqliteStore {
    /// The current state from the cache, checked against the database with
    /// one point query run right here rather than on a blocking thread: it
    /// reads one page that is almost always in memory, which costs less
    /// than the hand-off (measured: see bench/). `None` when the state is
    /// not cached, is stale, or every reader is busy.
    fn cached_current(&self, id: ConnectionId) -> Result<Option<Arc<StoredState>>, StoreError> {
        if !self.cache.holds(id) {
            return Ok(None);
        }
        let Ok(_permit) = self.read_permits.try_acquire() else {
            return Ok(None);
        };
        let Some(conn) = self.readers.lock().map_err(|_| poisoned())?.pop() else {
            return Ok(None);
        };
        let header = queries::header(&conn, id);
        self.readers.lock().map_err(|_| poisoned())?.push(conn);
        let header = header?.unwrap_or_default();
        Ok(self.cache.get(id, header.version()).map(|cached| cached.state))
    }

    /// Refuses once the file failed its integrity check or a commit could
    /// not be made durable.
    fn writable(&self) -> Result<(), StoreError> {
        if self.damaged.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(format!("{} failed its integrity check", self.path.display())));
        }
        match self.durability.failure() {
            Some(failure) => Err(StoreError::Unavailable(failure.to_owned())),
            None => Ok(()),
        }
    }

    /// Runs `f` on the writer thread, inside its own savepoint of the next
    /// group commit, and answers once that commit is durable. For jobs that
    /// do not change any connection's current state.
    async fn submit<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit_with(Isolation::Savepoint, move |conn, _| Ok((f(conn)?, None))).await
    }

    /// [`Self::submit`] with the job's [`Isolation`] chosen by the caller,
    /// for a job that also says what its write does to the state cache.
    async fn submit_with<T, F>(&self, isolation: Isolation, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &GroupStates) -> Result<(T, Option<(ConnectionId, Update)>), StoreError>
            + Send
            + 'static,
    {
        self.writable()?;
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the SQLite writer has stopped".to_owned());
        let run: Work = Box::new(move |conn: &Connection, group: &GroupStates| {
            f(conn, group).map(|(value, cache)| Done { output: Box::new(value) as Output, cache })
        });
        self.writes.send(WriteJob { run, reply, isolation }).await.map_err(|_| stopped())?;
        let output = answer.await.map_err(|_| stopped())??;
        output
            .downcast::<T>()
            .map(|value| *value)
            .map_err(|_| StoreError::Internal("a write job answered with the wrong type".to_owned()))
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn read_at(&self, id: ConnectionId, at: Option<u64>) -> Result<Arc<StoredState>, StoreError> {
        if at.is_none() {
            let cached = if self.lock.is_some() {
                self.cache.current(id).map(|cached| cached.state)
            } else {
                self.cached_current(id)?
            };
            if let Some(state) = cached {
                return Ok(state);
            }
        }
        // Read before the read transaction starts (see `StateCache`).
        let mark = self.cache.mark();
        let cache = self.cache.clone();
        let (state, update) = self
            .with_reader(move |conn| match at {
                None => {
                    let (current, update) = queries::read_state(conn, id, |version| cache.get(id, version))?;
                    Ok((current.state, update))
                }
                Some(revision) => {
                    let (state_type, entries) = queries::state_at(conn, id, revision)?;
                    let entries = entries.into_iter().map(|(key, _, blob)| (key, blob)).collect();
                    Ok((Arc::new(StoredState { state_type, revision, entries }), None))
                }
            })
            .await?;
        if let Some(Update::Put(version, cached)) = update {
            // Strict when the cache is authoritative: this process locks the file.
            self.cache.put_unless_changed(id, version, cached, mark, self.lock.is_some());
        }
        Ok(state)
    }

    async fn read_stream(&self, id: ConnectionId, stream: StreamDescriptor) -> Result<(u64, Option<Blob>), StoreError> {
        self.with_reader(move |conn| {
            let revision = queries::header(conn, id)?.map_or(0, |h| h.revision);
            Ok((revision, queries::entry_blob(conn, id, &EntryKey::stream(stream))?))
        })
        .await
    }

    async fn apply(&self, id: ConnectionId, request: WriteRequest) -> Result<Applied, StoreError> {
        let cache = self.cache.clone();
        // `queries::apply` checks everything that can refuse before its first write.
        // The writer thread hands the cache update to the cache after the commit.
        self.submit_with(Isolation::RefusesBeforeWriting, move |conn, group| {
            let (applied, update) = queries::apply(conn, id, &request, now_ms(), &cache, group)?;
            Ok((applied, update.map(|update| (id, update))))
        })
        .await
    }

    async fn history(&self, id: ConnectionId, limit: usize, before: Option<u64>) -> Result<History, StoreError> {
        self.with_reader(move |conn| history::history(conn, id, limit, before)).await
    }

    async fn lease(&self, id: ConnectionId, op: LeaseOp) -> Result<Option<Lease>, StoreError> {
        let token = Uuid::new_v4().to_string();
        self.submit(move |conn| history::lease(conn, id, &op, now_ms(), token)).await
    }

    async fn leases(&self, id: Option<ConnectionId>) -> Result<Vec<(ConnectionId, Lease)>, StoreError> {
        self.with_reader(move |conn| history::leases(conn, id, now_ms())).await
    }

    async fn prune_connection(&self, id: ConnectionId, policy: Retention, most: u64) -> Result<Pruned, StoreError> {
        // One short writer job per step: writers queue behind at most one.
        self.submit(move |conn| history::prune(conn, id, policy, now_ms(), most)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.writable()?;
        if self.writes.is_closed() {
            return Err(StoreError::Unavailable("the SQLite writer has stopped".to_owned()));
        }
        // Reads a page of the database, in constant time however large it is.
        self.with_reader(|conn| conn.query_row("SELECT EXISTS (SELECT 1 FROM heads)", [], |_| Ok(())).map_err(classify))
            .await
    }

    async fn list_connections(
        &self,
        after: Option<ConnectionId>,
        limit: usize,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        self.with_reader(move |conn| dump::list(conn, after, limit)).await
    }

    async fn dump(&self, id: ConnectionId) -> Result<Option<ConnectionDump>, StoreError> {
        self.with_reader(move |conn| dump::read(conn, id)).await
    }

    async fn load(&self, record: ConnectionDump, overwrite: bool) -> Result<LoadOutcome, StoreError> {
        let id = record.id;
        self.submit_with(Isolation::Savepoint, move |conn, _| {
            Ok((dump::load(conn, &record, overwrite)?, Some((id, Update::Forget))))
        })
        .await
    }
}

impl Drop for SqliteStore {
    /// Lets the writer finish what is queued, fold the WAL back into the
    /// database file, and stop, before the process goes.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writes, closed));
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("the SQLite writer thread panicked");
            }
        }
    }
}

/// The writer thread: commits queued writes in groups, handing each to the
/// sync thread, until every sender is gone; then checkpoints the WAL.
fn write_loop(
    mut conn: Connection,
    mut queue: mpsc::Receiver<WriteJob>,
    checkpointer: checkpoint::Checkpointer,
    syncer: Syncer,
    durability: &Durability,
    states: &GroupStates,
) {
    let mut seq = 0;
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if checkpointer.tail_wanted() {
            checkpoint::tail(&conn);
        }
        seq += 1;
        states.begin(seq);
        let (writes, started) = (group.len(), std::time::Instant::now());
        let (answers, committed) = commit_group(&mut conn, group, states, || durability.begin(seq));
        tracing::debug!(writes, elapsed_us = started.elapsed().as_micros() as u64, "write group");
        if committed.is_err() {
            // What the group noted was rolled back.
            states.clear();
        }
        syncer.send(Finished { seq, answers, committed });
        checkpointer.poke();
    }
    syncer.stop();
    checkpointer.stop();
    if let Err(error) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(%error, "could not checkpoint the WAL at shutdown; it will be replayed at the next start");
    }
}

/// Each job of a group with its result, waiting to be answered.
type Answers = Vec<(Reply, Result<Done, StoreError>)>;

/// Applies a group's jobs in one transaction and commits it, calling
/// `begin` just before the commit. Answers nothing: returns each job's
/// result and the commit's outcome.
fn commit_group(
    conn: &mut Connection,
    group: Vec<WriteJob>,
    states: &GroupStates,
    begin: impl FnOnce(),
) -> (Answers, Result<(), StoreError>) {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let error = classify(e);
            let answers = group.into_iter().map(|job| (job.reply, Err(error.clone()))).collect();
            return (answers, Err(error));
        }
    };
    let mut answers: Answers = Vec::with_capacity(group.len());
    let mut broken = None;
    let mut jobs = group.into_iter();
    for job in jobs.by_ref() {
        let run = job.run;
        let result = match job.isolation {
            Isolation::Savepoint => tx.savepoint().map_err(classify).and_then(|savepoint| {
                let output = run(&savepoint, states)?;
                savepoint.commit().map_err(classify)?;
                Ok(output)
            }),
            Isolation::RefusesBeforeWriting => run(&tx, states),
        };
        if let Ok(Done { cache: Some((id, update)), .. }) = &result {
            states.note(*id, update);
        }
        // A failure other than a refusal may have left part of the job written.
        let failed_midway = match (&result, job.isolation) {
            (Err(error), Isolation::RefusesBeforeWriting) if !matches!(error, StoreError::Refused(_)) => {
                Some(error.clone())
            }
            _ => None,
        };
        answers.push((job.reply, result));
        if failed_midway.is_some() {
            broken = failed_midway;
            break;
        }
    }
    // A job that failed after writing part of its work takes the group down:
    // the transaction rolls back and every write in it gets that error (such
    // failures are a full or failing disk, which the others would meet too).
    let committed = match broken {
        None => {
            begin();
            tx.commit().map_err(classify)
        }
        Some(error) => {
            drop(tx);
            answers.extend(jobs.map(|job| (job.reply, Err(error.clone()))));
            Err(error)
        }
    };
    (answers, committed)
}

/// Classifies a SQLite error once, for every caller.
fn classify(error: rusqlite::Error) -> StoreError {
    let code = match &error {
        rusqlite::Error::SqliteFailure(failure, _) => Some(failure.code),
        _ => None,
    };
    match code {
        Some(ErrorCode::DiskFull) => StoreError::Full(error.to_string()),
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::ReadOnly
            | ErrorCode::CannotOpen
            | ErrorCode::SystemIoFailure
            | ErrorCode::PermissionDenied,
        ) => StoreError::Unavailable(error.to_string()),
        _ => StoreError::Internal(error.to_string()),
    }
}

/// Unix time in milliseconds, the clock of revisions and leases.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn poisoned() -> StoreError {
    StoreError::Internal("the SQLite reader pool lock is poisoned".to_owned())
}
