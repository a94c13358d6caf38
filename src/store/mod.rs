//! Storage: the [`Store`] trait every backend implements, the one error type
//! they all report, and [`open`], which picks the backend from the URL once.
//!
//! A store keeps each connection as one row per entry plus a numbered
//! revision per write that changed something (see `migrations/`). It applies
//! the domain's rules ([`crate::state::plan_write`]) inside its own
//! transaction, so the type check and the write are atomic. It knows nothing
//! of HTTP.

pub mod cache;
pub mod dump;
pub mod postgres;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::state::history::{History, Pruned, Retention, PRUNE_STEP};
use crate::state::ops::{Guard, Lease, LeaseOp, Meta, Operation, Refusal, WriteRequest};
use crate::state::{Blob, ConnectionId, StateWrite, StoredState, StreamDescriptor, TypeConflict};
use dump::ConnectionDump;

/// A backend holding connection states and their history.
#[async_trait]
pub trait Store: Send + Sync {
    /// The state of a connection now, or as it was at revision `at`. An
    /// unknown connection is empty at revision 0.
    async fn read_at(&self, id: ConnectionId, at: Option<u64>) -> Result<Arc<StoredState>, StoreError>;

    /// The current state of a connection.
    async fn read(&self, id: ConnectionId) -> Result<Arc<StoredState>, StoreError> {
        self.read_at(id, None).await
    }

    /// A plain `create_or_update`: merges `write` without guards and returns
    /// the state after it.
    async fn write(&self, id: ConnectionId, write: StateWrite) -> Result<Arc<StoredState>, StoreError> {
        let request = WriteRequest {
            operation: Operation::Merge(write),
            guard: Guard::default(),
            meta: Meta::default(),
            return_state: true,
        };
        Ok(self.apply(id, request).await?.state.unwrap_or_default())
    }

    /// One stream's blob and the connection's revision.
    async fn read_stream(&self, id: ConnectionId, stream: StreamDescriptor) -> Result<(u64, Option<Blob>), StoreError>;

    /// Applies one write atomically and durably, checks included. A write
    /// that changes nothing creates no revision.
    async fn apply(&self, id: ConnectionId, request: WriteRequest) -> Result<Applied, StoreError>;

    /// A page of history, newest first, of revisions before `before`.
    async fn history(&self, id: ConnectionId, limit: usize, before: Option<u64>) -> Result<History, StoreError>;

    /// Acquires, renews or releases a sync lease; `None` after a release.
    async fn lease(&self, id: ConnectionId, op: LeaseOp) -> Result<Option<Lease>, StoreError>;

    /// Live leases, of one connection or of all.
    async fn leases(&self, id: Option<ConnectionId>) -> Result<Vec<(ConnectionId, Lease)>, StoreError>;

    /// One step of pruning a connection: removes the oldest of its
    /// revisions that the policy no longer keeps, at most `most` of them
    /// ([`step_horizon`](crate::state::history::step_horizon)), as one
    /// short write of its own; nothing when the connection is busy.
    async fn prune_connection(&self, id: ConnectionId, policy: Retention, most: u64) -> Result<Pruned, StoreError>;

    /// Those of `ids` that may have history to remove under `policy`, in
    /// steps of `most`: all of them unless a backend can tell more cheaply
    /// in one go than [`Self::prune_connection`] one by one.
    async fn due_for_pruning(
        &self,
        ids: &[ConnectionId],
        _policy: Retention,
        _most: u64,
    ) -> Result<Vec<ConnectionId>, StoreError> {
        Ok(ids.to_vec())
    }

    /// Removes history the policy no longer keeps, a connection and
    /// [`PRUNE_STEP`] revisions at a time, never holding up writers for
    /// long. Returns the revisions removed.
    async fn prune(&self, policy: Retention) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut after = None;
        loop {
            let ids = self.list_connections(after, 500).await?;
            let Some(last) = ids.last().copied() else {
                return Ok(removed);
            };
            for id in self.due_for_pruning(&ids, policy, PRUNE_STEP).await? {
                loop {
                    let step = self.prune_connection(id, policy, PRUNE_STEP).await?;
                    removed += step.removed;
                    if !step.more {
                        break;
                    }
                }
            }
            after = Some(last);
        }
    }

    /// Checks that the storage answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Ids of connections ever written, ascending, after `after`.
    async fn list_connections(
        &self,
        after: Option<ConnectionId>,
        limit: usize,
    ) -> Result<Vec<ConnectionId>, StoreError>;

    /// A connection's whole record, read in one snapshot; `None` if it was
    /// never written.
    async fn dump(&self, id: ConnectionId) -> Result<Option<ConnectionDump>, StoreError>;

    /// Stores a whole record atomically. An existing connection is replaced
    /// only with `overwrite`; otherwise it is left alone.
    async fn load(&self, dump: ConnectionDump, overwrite: bool) -> Result<LoadOutcome, StoreError>;

    /// Lets go of what the store holds in the database for this process
    /// before it exits (PostgreSQL: the sole-node lease). Nothing to do by
    /// default.
    async fn close(&self) {}
}

/// What an applied write did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The connection's revision after the write.
    pub revision: u64,
    /// Whether the write created that revision (false: it changed nothing).
    pub changed: bool,
    /// The whole state after the write, when asked for.
    pub state: Option<Arc<StoredState>>,
}

/// What [`Store::load`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOutcome {
    /// The record was stored.
    Loaded,
    /// The connection exists and `overwrite` was not given: nothing changed.
    Exists,
}

impl From<TypeConflict> for StoreError {
    fn from(conflict: TypeConflict) -> Self {
        Self::Refused(Refusal::TypeConflict(conflict))
    }
}

/// What can go wrong in a store, classified once from the driver's error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The rules refuse the request (type change, revision mismatch,
    /// lease); nothing was written.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The storage cannot be reached or is locked or read-only; retrying
    /// later may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The storage has no room left for the write.
    #[error("storage full: {0}")]
    Full(String),
    /// Anything else: a bug or damaged data. The text is for logs only.
    #[error("storage error: {0}")]
    Internal(String),
}

/// Where the state lives, parsed from `--database-url`. `Debug` and
/// `Display` never show a password.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH`: an embedded SQLite file (relative paths are relative
    /// to the working directory; `sqlite:///abs/path` is absolute).
    Sqlite(PathBuf),
    /// `postgres://user:password@host:port/database?options`.
    Postgres(String),
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("a sqlite:// URL needs a file path, e.g. sqlite://highwater.db".to_owned());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.parse::<tokio_postgres::Config>().map_err(|e| format!("invalid PostgreSQL URL: {e}"))?;
            return Ok(Self::Postgres(url.to_owned()));
        }
        Err("unsupported database URL: expected sqlite://PATH or postgres://…".to_owned())
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

/// Replaces the password of a URL with `***`, for logs and messages.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// How to open a store, beyond its URL.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Apply pending migrations; when false, a schema that is not current
    /// is refused.
    pub migrate: bool,
    /// Most database connections one node keeps (PostgreSQL).
    pub pool_size: usize,
    /// How long to wait for a database connection before failing (PostgreSQL).
    pub connect_timeout: Duration,
    /// The longest one store operation may take before failing as
    /// unavailable (PostgreSQL).
    pub operation_timeout: Duration,
    /// Memory for cached current states, in bytes.
    pub state_cache_bytes: usize,
    /// Take the SQLite file's lock, so that no other process writes it while
    /// this one runs (every command but `export`, which only reads).
    pub exclusive: bool,
    /// PostgreSQL: take the sole-node lease when no other node runs, and
    /// then answer reads from memory (`postgres::sole`).
    pub sole_node: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            migrate: true,
            pool_size: 16,
            connect_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(30),
            state_cache_bytes: 32 * 1024 * 1024,
            exclusive: true,
            sole_node: true,
        }
    }
}

/// Opens (creating and migrating when allowed) the store a URL names.
pub async fn open(url: &DatabaseUrl, options: &OpenOptions) -> anyhow::Result<Arc<dyn Store>> {
    match url {
        DatabaseUrl::Sqlite(path) => {
            let path = path.clone();
            let (migrate, cache_bytes, exclusive) = (options.migrate, options.state_cache_bytes, options.exclusive);
            let store =
                tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&path, migrate, cache_bytes, exclusive))
                    .await??;
            Ok(Arc::new(store))
        }
        DatabaseUrl::Postgres(url) => {
            let options = postgres::PostgresOptions {
                pool_size: options.pool_size,
                connect_timeout: options.connect_timeout,
                migrate: options.migrate,
                operation_timeout: options.operation_timeout,
                state_cache_bytes: options.state_cache_bytes,
                sole_node: options.sole_node,
            };
            Ok(Arc::new(postgres::PostgresStore::open(url, &options).await?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_relative_and_absolute_paths() {
        assert_eq!("sqlite://hw.db".parse(), Ok(DatabaseUrl::Sqlite("hw.db".into())));
        assert_eq!("sqlite:///tmp/hw.db".parse(), Ok(DatabaseUrl::Sqlite("/tmp/hw.db".into())));
    }

    #[test]
    fn postgres_urls_are_accepted_and_shown_without_password() {
        let url: DatabaseUrl = "postgres://hw:s3cret@db:5432/state?sslmode=disable".parse().unwrap();
        assert_eq!(url.to_string(), "postgres://hw:***@db:5432/state?sslmode=disable");
        assert!(!format!("{url:?}").contains("s3cret"));
        let plain: DatabaseUrl = "postgresql://root@127.0.0.1/x".parse().unwrap();
        assert_eq!(plain.to_string(), "postgresql://root@127.0.0.1/x");
    }

    #[test]
    fn other_urls_are_refused_with_a_hint() {
        assert!("sqlite://".parse::<DatabaseUrl>().unwrap_err().contains("file path"));
        assert!("mysql://x".parse::<DatabaseUrl>().unwrap_err().contains("sqlite://PATH"));
    }
}
