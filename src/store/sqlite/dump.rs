//! Whole-record reads and writes for export and import.

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::classify;
use super::queries::{insert_change, StoredText, ADD_REVISION};
use crate::state::{Blob, ConnectionId, StateType};
use crate::store::dump::{ChangeDump, ConnectionDump, RevisionDump};
use crate::store::{LoadOutcome, StoreError};

/// Connection ids in ascending order after `after`.
pub fn list(conn: &Connection, after: Option<ConnectionId>, limit: usize) -> Result<Vec<ConnectionId>, StoreError> {
    // Ids are 16-byte blobs, ordered as their text is; the empty blob
    // sorts before all of them.
    let after = after.map(|id| id.to_bytes().to_vec()).unwrap_or_default();
    let mut stmt = conn
        .prepare_cached(
            "SELECT connection_id FROM connections WHERE connection_id > ?1 ORDER BY connection_id LIMIT ?2",
        )
        .map_err(classify)?;
    let rows = stmt.query_map(params![after, limit as i64], |row| row.get::<_, [u8; 16]>(0)).map_err(classify)?;
    rows.map(|row| row.map(ConnectionId::from_bytes).map_err(classify)).collect()
}

/// The whole record of one connection, read in the caller's transaction.
pub fn read(conn: &Connection, id: ConnectionId) -> Result<Option<ConnectionDump>, StoreError> {
    let key = id.to_bytes();
    let header = conn
        .prepare_cached("SELECT state_type, revision, next_seq FROM connections WHERE connection_id = ?1")
        .and_then(|mut s| {
            s.query_row([&key], |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
                .optional()
        })
        .map_err(classify)?;
    let Some((state_type, revision, next_seq)) = header else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached("SELECT entry_key, seq, revision FROM entries WHERE connection_id = ?1 ORDER BY seq")
        .map_err(classify)?;
    let entries = stmt
        .query_map([&key], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)? as u64)))
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(classify)?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT revision, created_at_ms, state_type, actor, reason FROM revisions \
             WHERE connection_id = ?1 ORDER BY revision",
        )
        .map_err(classify)?;
    let revisions = stmt
        .query_map([&key], |r| {
            Ok(RevisionDump {
                revision: r.get::<_, i64>(0)? as u64,
                created_at_ms: r.get(1)?,
                state_type: r.get::<_, Option<String>>(2)?.as_deref().and_then(StateType::parse),
                actor: r.get(3)?,
                reason: r.get(4)?,
            })
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(classify)?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT revision, entry_key, blob, seq FROM changes WHERE connection_id = ?1 ORDER BY revision, entry_key",
        )
        .map_err(classify)?;
    let changes = stmt
        .query_map([&key], |r| {
            Ok(ChangeDump {
                revision: r.get::<_, i64>(0)? as u64,
                key: r.get(1)?,
                blob: r.get::<_, Option<StoredText>>(2)?.map(|text| Blob::from_stored(text.0)),
                seq: r.get(3)?,
            })
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(classify)?;
    Ok(Some(ConnectionDump {
        id,
        state_type: state_type.as_deref().and_then(StateType::parse),
        revision: revision as u64,
        next_seq,
        entries,
        revisions,
        changes,
    }))
}

/// Stores a whole record, replacing an existing one only when asked.
pub fn load(conn: &Connection, dump: &ConnectionDump, overwrite: bool) -> Result<LoadOutcome, StoreError> {
    let id = dump.id.to_bytes();
    let exists: bool = conn
        .query_row("SELECT EXISTS (SELECT 1 FROM connections WHERE connection_id = ?1)", [&id], |r| r.get(0))
        .map_err(classify)?;
    if exists && !overwrite {
        return Ok(LoadOutcome::Exists);
    }
    // `changes` and `revisions` are views of `history`, `connections` and
    // `entries` of `heads` (migrations/sqlite/0004, 0006).
    for table in ["heads", "history"] {
        conn.execute(&format!("DELETE FROM {table} WHERE connection_id = ?1"), [&id]).map_err(classify)?;
    }
    let state_type = dump.state_type.map(StateType::as_str);
    // A new epoch: anything cached about the connection it replaces is stale.
    let epoch = i64::from_le_bytes(Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or_default());
    conn.execute(
        "INSERT INTO heads (connection_id, entry_key, state_type, revision, next_seq, epoch) \
         VALUES (?1, '', ?2, ?3, ?4, ?5)",
        params![id, state_type, dump.revision as i64, dump.next_seq, epoch],
    )
    .map_err(classify)?;
    let mut revision_row = conn.prepare_cached(ADD_REVISION).map_err(classify)?;
    for r in &dump.revisions {
        let state_type = r.state_type.map(StateType::as_str);
        revision_row
            .execute(params![id, r.revision as i64, r.created_at_ms, state_type, r.actor, r.reason])
            .map_err(classify)?;
    }
    for c in &dump.changes {
        insert_change(conn, &id, c.revision as i64, &c.key, c.blob.as_ref().map(Blob::as_str), c.seq, None)?;
    }
    let mut entry_row = conn
        .prepare_cached("INSERT INTO heads (connection_id, entry_key, seq, revision) VALUES (?1, ?2, ?3, ?4)")
        .map_err(classify)?;
    for (key, seq, revision) in &dump.entries {
        entry_row.execute(params![id, key, seq, *revision as i64]).map_err(classify)?;
    }
    Ok(LoadOutcome::Loaded)
}
