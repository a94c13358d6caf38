//! Whole-record reads and writes for export and import. Text is ordered
//! with `COLLATE "C"` so both backends list in the same (byte) order.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;

use super::classify;
use crate::state::{Blob, ConnectionId, StateType};
use crate::store::dump::{ChangeDump, ConnectionDump, RevisionDump};
use crate::store::{LoadOutcome, StoreError};

/// Connection ids in ascending order after `after`.
pub async fn list(
    client: &impl GenericClient,
    after: Option<ConnectionId>,
    limit: usize,
) -> Result<Vec<ConnectionId>, StoreError> {
    let after = after.map(|id| id.to_string()).unwrap_or_default();
    let statement = client
        .prepare_cached(
            "SELECT connection_id FROM connections WHERE connection_id > $1 COLLATE \"C\" \
             ORDER BY connection_id COLLATE \"C\" LIMIT $2",
        )
        .await
        .map_err(classify)?;
    let rows = client.query(&statement, &[&after, &(limit as i64)]).await.map_err(classify)?;
    rows.iter()
        .map(|row| {
            let text: String = row.get(0);
            ConnectionId::parse(&text).ok_or_else(|| StoreError::Internal(format!("stored connection id {text:?}")))
        })
        .collect()
}

/// The whole record of one connection; run it in a repeatable-read
/// transaction so the four reads share a snapshot.
pub async fn read(client: &impl GenericClient, id: ConnectionId) -> Result<Option<ConnectionDump>, StoreError> {
    let id_text = id.to_string();
    let header = client
        .query_opt("SELECT state_type, revision, next_seq FROM connections WHERE connection_id = $1", &[&id_text])
        .await
        .map_err(classify)?;
    let Some(header) = header else {
        return Ok(None);
    };
    let entries = client
        .query("SELECT entry_key, seq, revision FROM entries WHERE connection_id = $1 ORDER BY seq", &[&id_text])
        .await
        .map_err(classify)?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1), r.get::<_, i64>(2) as u64))
        .collect();
    let revisions = client
        .query(
            "SELECT revision, created_at_ms, state_type, actor, reason FROM revisions \
             WHERE connection_id = $1 ORDER BY revision",
            &[&id_text],
        )
        .await
        .map_err(classify)?
        .iter()
        .map(|r| RevisionDump {
            revision: r.get::<_, i64>(0) as u64,
            created_at_ms: r.get(1),
            state_type: r.get::<_, Option<String>>(2).as_deref().and_then(StateType::parse),
            actor: r.get(3),
            reason: r.get(4),
        })
        .collect();
    let changes = client
        .query(
            "SELECT revision, entry_key, blob, seq FROM changes WHERE connection_id = $1 \
             ORDER BY revision, entry_key COLLATE \"C\"",
            &[&id_text],
        )
        .await
        .map_err(classify)?
        .iter()
        .map(|r| ChangeDump {
            revision: r.get::<_, i64>(0) as u64,
            key: r.get(1),
            blob: r.get::<_, Option<String>>(2).map(Blob::from_stored),
            seq: r.get(3),
        })
        .collect();
    Ok(Some(ConnectionDump {
        id,
        state_type: header.get::<_, Option<String>>(0).as_deref().and_then(StateType::parse),
        revision: header.get::<_, i64>(1) as u64,
        next_seq: header.get(2),
        entries,
        revisions,
        changes,
    }))
}

/// Stores a whole record in the caller's transaction, which holds the
/// connection's advisory lock.
pub async fn load(
    tx: &deadpool_postgres::Transaction<'_>,
    dump: &ConnectionDump,
    overwrite: bool,
) -> Result<LoadOutcome, StoreError> {
    let id = dump.id.to_string();
    let exists: bool = tx
        .query_one("SELECT EXISTS (SELECT 1 FROM connections WHERE connection_id = $1)", &[&id])
        .await
        .map_err(classify)?
        .get(0);
    if exists && !overwrite {
        return Ok(LoadOutcome::Exists);
    }
    for table in ["entries", "changes", "revisions", "connections"] {
        tx.execute(&format!("DELETE FROM {table} WHERE connection_id = $1"), &[&id]).await.map_err(classify)?;
    }
    let state_type = dump.state_type.map(StateType::as_str);
    // A new epoch: anything cached about the connection it replaces is stale.
    let epoch = i64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or_default());
    tx.execute(
        "INSERT INTO connections (connection_id, state_type, revision, next_seq, epoch) VALUES ($1, $2, $3, $4, $5)",
        &[&id, &state_type, &(dump.revision as i64), &dump.next_seq, &epoch],
    )
    .await
    .map_err(classify)?;
    // Each revision's metadata goes on its first change row, or on a row
    // of its own under '' when it has none (migrations/postgres/0004).
    let mut meta: HashMap<u64, &RevisionDump> = dump.revisions.iter().map(|r| (r.revision, r)).collect();
    let mut rows = Vec::with_capacity(dump.changes.len());
    for c in &dump.changes {
        let blob = c.blob.as_ref().map(Blob::as_str);
        rows.push(HistoryRow { revision: c.revision, key: &c.key, blob, seq: c.seq, meta: meta.remove(&c.revision) });
    }
    for r in &dump.revisions {
        if meta.remove(&r.revision).is_some() {
            rows.push(HistoryRow { revision: r.revision, key: "", blob: None, seq: None, meta: Some(r) });
        }
    }
    let revisions: Vec<i64> = rows.iter().map(|row| row.revision as i64).collect();
    let keys: Vec<&str> = rows.iter().map(|row| row.key).collect();
    let blobs: Vec<Option<&str>> = rows.iter().map(|row| row.blob).collect();
    let seqs: Vec<Option<i64>> = rows.iter().map(|row| row.seq).collect();
    let times: Vec<Option<i64>> = rows.iter().map(|row| row.meta.map(|r| r.created_at_ms)).collect();
    let types: Vec<Option<&str>> =
        rows.iter().map(|row| row.meta.and_then(|r| r.state_type.map(StateType::as_str))).collect();
    let actors: Vec<Option<&str>> = rows.iter().map(|row| row.meta.and_then(|r| r.actor.as_deref())).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|row| row.meta.and_then(|r| r.reason.as_deref())).collect();
    tx.execute(
        "INSERT INTO history (connection_id, revision, entry_key, blob, seq, created_at_ms, state_type, actor, reason) \
         SELECT $1, r, k, b, s, t, y, a, w \
         FROM unnest($2::int8[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::text[], $8::text[], $9::text[]) \
         AS u(r, k, b, s, t, y, a, w)",
        &[&id, &revisions, &keys, &blobs, &seqs, &times, &types, &actors, &reasons],
    )
    .await
    .map_err(classify)?;
    let keys: Vec<&str> = dump.entries.iter().map(|(k, _, _)| k.as_str()).collect();
    let seqs: Vec<i64> = dump.entries.iter().map(|(_, s, _)| *s).collect();
    let revisions: Vec<i64> = dump.entries.iter().map(|(_, _, r)| *r as i64).collect();
    tx.execute(
        "INSERT INTO entries (connection_id, entry_key, seq, revision) \
         SELECT $1, k, s, r FROM unnest($2::text[], $3::int8[], $4::int8[]) AS u(k, s, r)",
        &[&id, &keys, &seqs, &revisions],
    )
    .await
    .map_err(classify)?;
    Ok(LoadOutcome::Loaded)
}

/// A row of `history` an import writes: a change, or a revision's own row
/// (key ''), with the revision's metadata when it is the revision's first.
struct HistoryRow<'a> {
    revision: u64,
    key: &'a str,
    blob: Option<&'a str>,
    seq: Option<i64>,
    meta: Option<&'a RevisionDump>,
}
