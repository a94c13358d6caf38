//! The SQL of reading and writing one connection's state on PostgreSQL.
//! Multi-row changes go in one statement each (`unnest` of arrays), so a
//! write costs a fixed number of round trips whatever it touches.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;

use super::classify;
use crate::state::{changes, plan_write, Blob, ConnectionId, EntryKey, StateType, StateWrite, StoredState};
use crate::store::StoreError;

/// One statement, one snapshot: the header and every entry in order.
const READ_STATE: &str = "SELECT c.state_type, c.revision, e.entry_key, ch.blob \
     FROM connections c \
     LEFT JOIN entries e ON e.connection_id = c.connection_id \
     LEFT JOIN changes ch ON ch.connection_id = e.connection_id \
       AND ch.revision = e.revision AND ch.entry_key = e.entry_key \
     WHERE c.connection_id = $1 ORDER BY e.seq";

/// Reads the whole current state of a connection.
pub async fn read_state(client: &impl GenericClient, id: ConnectionId) -> Result<StoredState, StoreError> {
    let id_text = id.to_string();
    let statement = client.prepare_cached(READ_STATE).await.map_err(classify)?;
    let rows = client.query(&statement, &[&id_text]).await.map_err(classify)?;
    let Some(first) = rows.first() else {
        return Ok(StoredState::default());
    };
    let state_type = parse_type(first.get(0), id)?;
    let revision: i64 = first.get(1);
    let mut entries = Vec::with_capacity(rows.len());
    for row in &rows {
        let (Some(key), Some(blob)) = (row.get::<_, Option<String>>(2), row.get::<_, Option<String>>(3)) else {
            continue;
        };
        let key = EntryKey::decode(&key)
            .ok_or_else(|| StoreError::Internal(format!("undecodable entry key {key:?} for {id}")))?;
        entries.push((key, Blob::from_stored(blob)));
    }
    Ok(StoredState { state_type, revision: revision as u64, entries })
}

/// Applies a write inside the caller's transaction, which already holds the
/// connection's advisory lock. Returns the new state.
pub async fn apply_write(
    tx: &deadpool_postgres::Transaction<'_>,
    id: ConnectionId,
    write: &StateWrite,
) -> Result<StoredState, StoreError> {
    let id_text = id.to_string();
    let header = tx
        .prepare_cached("SELECT state_type, revision, next_seq FROM connections WHERE connection_id = $1")
        .await
        .map_err(classify)?;
    let header = tx.query_opt(&header, &[&id_text]).await.map_err(classify)?;
    let (stored_type, revision, mut next_seq) = match &header {
        Some(row) => (parse_type(row.get(0), id)?, row.get::<_, i64>(1), row.get::<_, i64>(2)),
        None => (None, 0, 0),
    };
    let ops = plan_write(stored_type, write)?;
    let keys: Vec<String> = ops.iter().map(|op| op.key.encode()).collect();
    let current = tx
        .prepare_cached(
            "SELECT e.entry_key, ch.blob FROM entries e \
             JOIN changes ch ON ch.connection_id = e.connection_id \
              AND ch.revision = e.revision AND ch.entry_key = e.entry_key \
             WHERE e.connection_id = $1 AND e.entry_key = ANY($2)",
        )
        .await
        .map_err(classify)?;
    let stored: HashMap<String, String> = tx
        .query(&current, &[&id_text, &keys])
        .await
        .map_err(classify)?
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let changed = changes(&ops, &stored);
    if changed.is_empty() {
        return read_state(tx, id).await;
    }

    let revision = revision + 1;
    let changed_keys: Vec<&str> = changed.iter().map(|c| c.key.as_str()).collect();
    let blobs: Vec<Option<&str>> = changed.iter().map(|c| c.blob.map(Blob::as_str)).collect();
    exec(
        tx,
        "INSERT INTO changes (connection_id, revision, entry_key, blob) \
         SELECT $1, $2, k, b FROM unnest($3::text[], $4::text[]) AS t(k, b)",
        &[&id_text, &revision, &changed_keys, &blobs],
    )
    .await?;
    let mut added = Vec::new();
    let mut seqs = Vec::new();
    let mut updated = Vec::new();
    let mut deleted = Vec::new();
    for change in &changed {
        match (change.blob.is_some(), change.existed) {
            (true, false) => {
                added.push(change.key.as_str());
                seqs.push(next_seq);
                next_seq += 1;
            }
            (true, true) => updated.push(change.key.as_str()),
            (false, _) => deleted.push(change.key.as_str()),
        }
    }
    if !added.is_empty() {
        let sql = "INSERT INTO entries (connection_id, entry_key, seq, revision) \
                   SELECT $1, k, s, $2 FROM unnest($3::text[], $4::int8[]) AS t(k, s)";
        exec(tx, sql, &[&id_text, &revision, &added, &seqs]).await?;
    }
    if !updated.is_empty() {
        let sql = "UPDATE entries SET revision = $2 WHERE connection_id = $1 AND entry_key = ANY($3)";
        exec(tx, sql, &[&id_text, &revision, &updated]).await?;
    }
    if !deleted.is_empty() {
        let sql = "DELETE FROM entries WHERE connection_id = $1 AND entry_key = ANY($2)";
        exec(tx, sql, &[&id_text, &deleted]).await?;
    }
    let remaining =
        tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM entries WHERE connection_id = $1)").await.map_err(classify)?;
    let remaining: bool = tx.query_one(&remaining, &[&id_text]).await.map_err(classify)?.get(0);
    let new_type = remaining.then_some(write.state_type).map(StateType::as_str);
    exec(
        tx,
        "INSERT INTO connections (connection_id, state_type, revision, next_seq) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (connection_id) DO UPDATE SET state_type = $2, revision = $3, next_seq = $4",
        &[&id_text, &new_type, &revision, &next_seq],
    )
    .await?;
    exec(
        tx,
        "INSERT INTO revisions (connection_id, revision, created_at_ms, state_type) \
         VALUES ($1, $2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint, $3)",
        &[&id_text, &revision, &new_type],
    )
    .await?;
    read_state(tx, id).await
}

async fn exec(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(classify)?;
    client.execute(&statement, params).await.map(drop).map_err(classify)
}

fn parse_type(text: Option<String>, id: ConnectionId) -> Result<Option<StateType>, StoreError> {
    match text {
        None => Ok(None),
        Some(text) => StateType::parse(&text)
            .map(Some)
            .ok_or_else(|| StoreError::Internal(format!("unknown state type {text:?} for {id}"))),
    }
}
