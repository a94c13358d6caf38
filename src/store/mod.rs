//! Storage: the [`Store`] trait every backend implements, the one error type
//! they all report, and [`open`], which picks the backend from the URL once.
//!
//! A store keeps each connection as one row per entry plus a numbered
//! revision per write that changed something (see `migrations/`). It applies
//! the domain's rules ([`crate::state::plan_write`]) inside its own
//! transaction, so the type check and the write are atomic. It knows nothing
//! of HTTP.

pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::state::{ConnectionId, StateWrite, StoredState, TypeConflict};

/// A backend holding connection states.
#[async_trait]
pub trait Store: Send + Sync {
    /// The current state of a connection; an unknown one is empty.
    async fn read(&self, id: ConnectionId) -> Result<StoredState, StoreError>;

    /// Applies one write atomically and durably, and returns the state after
    /// it. A write that changes nothing creates no revision.
    async fn write(&self, id: ConnectionId, write: StateWrite) -> Result<StoredState, StoreError>;

    /// Checks that the storage answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// What can go wrong in a store, classified once from the driver's error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The write breaks the state type rules; nothing was written.
    #[error(transparent)]
    TypeConflict(#[from] TypeConflict),
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

/// Where the state lives, parsed from `--database-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH`: an embedded SQLite file (relative paths are relative
    /// to the working directory; `sqlite:///abs/path` is absolute).
    Sqlite(PathBuf),
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(
                    "a sqlite:// URL needs a file path, e.g. sqlite://highwater.db".to_owned(),
                );
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Err(
                "PostgreSQL is not supported by this version yet; use sqlite://PATH".to_owned(),
            );
        }
        Err("unsupported database URL: expected sqlite://PATH".to_owned())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
        }
    }
}

/// Opens (creating and migrating when needed) the store a URL names.
pub async fn open(url: &DatabaseUrl) -> anyhow::Result<Arc<dyn Store>> {
    match url {
        DatabaseUrl::Sqlite(path) => {
            let path = path.clone();
            let store =
                tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&path)).await??;
            Ok(Arc::new(store))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_relative_and_absolute_paths() {
        assert_eq!(
            "sqlite://hw.db".parse(),
            Ok(DatabaseUrl::Sqlite("hw.db".into()))
        );
        assert_eq!(
            "sqlite:///tmp/hw.db".parse(),
            Ok(DatabaseUrl::Sqlite("/tmp/hw.db".into()))
        );
    }

    #[test]
    fn other_urls_are_refused_with_a_hint() {
        assert!("sqlite://"
            .parse::<DatabaseUrl>()
            .unwrap_err()
            .contains("file path"));
        assert!("mysql://x"
            .parse::<DatabaseUrl>()
            .unwrap_err()
            .contains("sqlite://PATH"));
    }
}
