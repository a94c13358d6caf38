//! The SQL of reading and writing one connection's state. Every function
//! runs inside a transaction its caller holds.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use super::classify;
use crate::state::{changes, plan_write, Blob, Change, ConnectionId, EntryKey, StateType, StateWrite, StoredState};
use crate::store::StoreError;

/// Reads the whole current state of a connection.
pub fn read_state(conn: &Connection, id: ConnectionId) -> Result<StoredState, StoreError> {
    let id_text = id.to_string();
    let Some((state_type, revision)) = header(conn, &id_text)? else {
        return Ok(StoredState::default());
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT e.entry_key, c.blob FROM entries e \
             JOIN changes c ON c.connection_id = e.connection_id \
              AND c.revision = e.revision AND c.entry_key = e.entry_key \
             WHERE e.connection_id = ?1 ORDER BY e.seq",
        )
        .map_err(classify)?;
    let rows =
        stmt.query_map([&id_text], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))).map_err(classify)?;
    let mut entries = Vec::new();
    for row in rows {
        let (key, blob) = row.map_err(classify)?;
        let key = EntryKey::decode(&key)
            .ok_or_else(|| StoreError::Internal(format!("undecodable entry key {key:?} for {id}")))?;
        entries.push((key, Blob::from_stored(blob)));
    }
    Ok(StoredState { state_type, revision, entries })
}

/// Applies a write: type rules, then each op that really changes something,
/// all recorded under the connection's next revision. Returns the new state.
pub fn apply_write(conn: &Connection, id: ConnectionId, write: &StateWrite) -> Result<StoredState, StoreError> {
    let id_text = id.to_string();
    let current = header(conn, &id_text)?;
    let (stored_type, revision) = current.unwrap_or((None, 0));
    let ops = plan_write(stored_type, write)?;

    let mut stored = HashMap::with_capacity(ops.len());
    for op in &ops {
        let key = op.key.encode();
        if let Some(blob) = current_blob(conn, &id_text, &key)? {
            stored.insert(key, blob);
        }
    }
    let changed = changes(&ops, &stored);
    if changed.is_empty() {
        return read_state(conn, id);
    }

    let revision = revision + 1;
    let mut next_seq: i64 = conn
        .prepare_cached("SELECT next_seq FROM connections WHERE connection_id = ?1")
        .and_then(|mut s| s.query_row([&id_text], |r| r.get(0)).optional())
        .map_err(classify)?
        .unwrap_or(0);
    for change in changed {
        record_change(conn, &id_text, revision, &change, &mut next_seq)?;
    }
    let remaining: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM entries WHERE connection_id = ?1)")
        .and_then(|mut s| s.query_row([&id_text], |r| r.get(0)))
        .map_err(classify)?;
    let new_type = remaining.then_some(write.state_type).map(StateType::as_str);
    exec(
        conn,
        "INSERT INTO connections (connection_id, state_type, revision, next_seq) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (connection_id) DO UPDATE SET state_type = ?2, revision = ?3, next_seq = ?4",
        params![id_text, new_type, revision as i64, next_seq],
    )?;
    exec(
        conn,
        "INSERT INTO revisions (connection_id, revision, created_at_ms, state_type) VALUES (?1, ?2, ?3, ?4)",
        params![id_text, revision as i64, now_ms(), new_type],
    )?;
    read_state(conn, id)
}

fn record_change(
    conn: &Connection,
    id: &str,
    revision: u64,
    change: &Change<'_>,
    next_seq: &mut i64,
) -> Result<(), StoreError> {
    let (key, blob) = (change.key.as_str(), change.blob);
    let revision = revision as i64;
    exec(
        conn,
        "INSERT INTO changes (connection_id, revision, entry_key, blob) VALUES (?1, ?2, ?3, ?4)",
        params![id, revision, key, blob.map(Blob::as_str)],
    )?;
    match (blob.is_some(), change.existed) {
        (true, true) => exec(
            conn,
            "UPDATE entries SET revision = ?3 WHERE connection_id = ?1 AND entry_key = ?2",
            params![id, key, revision],
        ),
        (true, false) => {
            let seq = *next_seq;
            *next_seq += 1;
            exec(
                conn,
                "INSERT INTO entries (connection_id, entry_key, revision, seq) VALUES (?1, ?2, ?3, ?4)",
                params![id, key, revision, seq],
            )
        }
        (false, _) => exec(conn, "DELETE FROM entries WHERE connection_id = ?1 AND entry_key = ?2", params![id, key]),
    }
}

fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<(), StoreError> {
    conn.prepare_cached(sql).and_then(|mut stmt| stmt.execute(params)).map(drop).map_err(classify)
}

/// The stored type and revision, or `None` for a connection never written.
fn header(conn: &Connection, id: &str) -> Result<Option<(Option<StateType>, u64)>, StoreError> {
    let row = conn
        .prepare_cached("SELECT state_type, revision FROM connections WHERE connection_id = ?1")
        .and_then(|mut s| s.query_row([id], |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)?))).optional())
        .map_err(classify)?;
    let Some((state_type, revision)) = row else {
        return Ok(None);
    };
    let state_type = match state_type {
        None => None,
        Some(text) => Some(
            StateType::parse(&text)
                .ok_or_else(|| StoreError::Internal(format!("unknown state type {text:?} for {id}")))?,
        ),
    };
    Ok(Some((state_type, revision as u64)))
}

fn current_blob(conn: &Connection, id: &str, key: &str) -> Result<Option<String>, StoreError> {
    conn.prepare_cached(
        "SELECT c.blob FROM entries e \
         JOIN changes c ON c.connection_id = e.connection_id \
          AND c.revision = e.revision AND c.entry_key = e.entry_key \
         WHERE e.connection_id = ?1 AND e.entry_key = ?2",
    )
    .and_then(|mut s| s.query_row([id, key], |r| r.get(0)).optional())
    .map_err(classify)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
