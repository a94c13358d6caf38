//! PostgreSQL migrations (`migrations/postgres/`), applied under an advisory
//! lock so that nodes starting together apply each one once.

use tokio_postgres::Client;

use super::classify;
use crate::store::StoreError;

/// The migrations, in order; `highwater_migrations` records those applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/postgres/0001_init.sql"),
    include_str!("../../../migrations/postgres/0002_fewer_write_indexes.sql"),
    include_str!("../../../migrations/postgres/0003_expect.sql"),
    include_str!("../../../migrations/postgres/0004_revisions_on_changes.sql"),
    include_str!("../../../migrations/postgres/0005_sole_node.sql"),
    include_str!("../../../migrations/postgres/0006_write_in_one_statement.sql"),
];

/// Serialises migrations across nodes.
const MIGRATION_LOCK: i64 = 0x4857_5452_4d49_4752;

/// Why the schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the database has schema version {found}, newer than this Highwater understands ({known}); upgrade Highwater"
    )]
    TooNew { found: i64, known: usize },
    #[error(
        "the database has schema version {found} but this Highwater needs {known}; \
         run `highwater migrate` or start without --migrate false"
    )]
    TooOld { found: i64, known: usize },
    #[error("cannot migrate the database: {0}")]
    Store(#[from] StoreError),
}

/// Applies pending migrations (when `apply`) and checks the schema version.
pub async fn prepare(client: &mut Client, apply: bool) -> Result<(), SchemaError> {
    let tx = client.transaction().await.map_err(classify)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(classify)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS highwater_migrations (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(classify)?;
    let found: i64 = tx
        .query_one("SELECT COALESCE(max(version), 0)::bigint FROM highwater_migrations", &[])
        .await
        .map_err(classify)?
        .get(0);
    let known = MIGRATIONS.len();
    if found > known as i64 {
        return Err(SchemaError::TooNew { found, known });
    }
    if found < known as i64 && !apply {
        return Err(SchemaError::TooOld { found, known });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = (index + 1) as i32;
        tx.batch_execute(sql).await.map_err(classify)?;
        tx.execute("INSERT INTO highwater_migrations (version) VALUES ($1)", &[&version]).await.map_err(classify)?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    tx.commit().await.map_err(classify)?;
    Ok(())
}
