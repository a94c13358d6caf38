//! Whole-record reads and writes for export and import. Text is ordered
//! with `COLLATE "C"` so both backends list in the same (byte) order.

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
    let numbers: Vec<i64> = dump.revisions.iter().map(|r| r.revision as i64).collect();
    let times: Vec<i64> = dump.revisions.iter().map(|r| r.created_at_ms).collect();
    let types: Vec<Option<&str>> = dump.revisions.iter().map(|r| r.state_type.map(StateType::as_str)).collect();
    let actors: Vec<Option<&str>> = dump.revisions.iter().map(|r| r.actor.as_deref()).collect();
    let reasons: Vec<Option<&str>> = dump.revisions.iter().map(|r| r.reason.as_deref()).collect();
    tx.execute(
        "INSERT INTO revisions (connection_id, revision, created_at_ms, state_type, actor, reason) \
         SELECT $1, r, t, s, a, w FROM unnest($2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[]) \
         AS u(r, t, s, a, w)",
        &[&id, &numbers, &times, &types, &actors, &reasons],
    )
    .await
    .map_err(classify)?;
    let revisions: Vec<i64> = dump.changes.iter().map(|c| c.revision as i64).collect();
    let keys: Vec<&str> = dump.changes.iter().map(|c| c.key.as_str()).collect();
    let blobs: Vec<Option<&str>> = dump.changes.iter().map(|c| c.blob.as_ref().map(Blob::as_str)).collect();
    let seqs: Vec<Option<i64>> = dump.changes.iter().map(|c| c.seq).collect();
    tx.execute(
        "INSERT INTO changes (connection_id, revision, entry_key, blob, seq) \
         SELECT $1, r, k, b, s FROM unnest($2::int8[], $3::text[], $4::text[], $5::int8[]) AS u(r, k, b, s)",
        &[&id, &revisions, &keys, &blobs, &seqs],
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
