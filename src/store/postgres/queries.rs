//! The SQL of reading and writing one connection's state on PostgreSQL.
//! Multi-row changes go in one statement each (`unnest` of arrays), so a
//! write costs a fixed number of round trips whatever it touches. Time
//! (revisions, lease expiry) is the database's clock, shared by all nodes.

use std::sync::Arc;

use deadpool_postgres::GenericClient;

use super::classify;
use crate::state::ops::{Lease, PastState, Refusal};
use crate::state::{Blob, ConnectionId, EntryKey, StateType, StoredState};
use crate::store::cache::{Cached, Header, StateCache, Version};
use crate::store::StoreError;

/// One statement, one snapshot: the header and every entry (in no order).
const READ_STATE: &str = "SELECT c.state_type, c.revision, c.epoch, c.next_seq, e.entry_key, ch.blob, e.seq \
     FROM connections c \
     LEFT JOIN entries e ON e.connection_id = c.connection_id \
     LEFT JOIN changes ch ON ch.connection_id = e.connection_id \
       AND ch.revision = e.revision AND ch.entry_key = e.entry_key \
     WHERE c.connection_id = $1";

/// Every entry of a connection (in no order).
const READ_ENTRIES: &str = "SELECT e.entry_key, ch.blob, e.seq FROM entries e \
     JOIN changes ch ON ch.connection_id = e.connection_id \
      AND ch.revision = e.revision AND ch.entry_key = e.entry_key \
     WHERE e.connection_id = $1";

/// The connection's row, the database clock in Unix milliseconds and the
/// connection's lease row, in one round trip.
const HEADER_NOW_AND_LEASE: &str = "SELECT c.state_type, c.revision, c.next_seq, c.epoch, \
     (extract(epoch FROM clock_timestamp()) * 1000)::bigint, l.holder, l.token, l.expires_at_ms \
     FROM (SELECT 1) one \
     LEFT JOIN connections c ON c.connection_id = $1 \
     LEFT JOIN leases l ON l.connection_id = $1";

/// Reads the whole current state of a connection: when the cache may hold
/// it, a look at the header first; otherwise one statement for everything.
pub async fn read_state(
    client: &impl GenericClient,
    id: ConnectionId,
    cache: &StateCache,
) -> Result<Cached, StoreError> {
    if cache.holds(id) {
        let header = header(client, id).await?.unwrap_or_default();
        if let Some(cached) = cache.get(id, header.version()) {
            return Ok(cached);
        }
    }
    // Inside a write's transaction, under the connection's locks: nothing
    // else writes it before that transaction ends.
    read_whole_state(client, id, cache, false).await
}

/// Reads the whole current state of a connection in one statement, and
/// caches it unless the cache was reset meanwhile or, when `strict` (the
/// cache is trusted as current, `sole`), a commit was reported meanwhile.
pub async fn read_whole_state(
    client: &impl GenericClient,
    id: ConnectionId,
    cache: &StateCache,
    strict: bool,
) -> Result<Cached, StoreError> {
    let mark = cache.mark();
    let Some((version, cached)) = read_whole(client, id).await? else {
        return Ok(Cached { state: Arc::default(), positions: Arc::default() });
    };
    cache.put_unless_changed(id, version, cached.clone(), mark, strict);
    Ok(cached)
}

/// The whole current state of a connection and its version, in one
/// statement; `None` for a connection never written.
pub async fn read_whole(
    client: &impl GenericClient,
    id: ConnectionId,
) -> Result<Option<(Version, Cached)>, StoreError> {
    let statement = client.prepare_cached(READ_STATE).await.map_err(classify)?;
    let rows = client.query(&statement, &[&id.to_string()]).await.map_err(classify)?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    // The whole version, next position included: a header check compares
    // all of it, and with a position of 0 a state read here never matched
    // one, so every later read of it read it whole again.
    let header = Header {
        state_type: parse_type(first.get(0), id)?,
        revision: first.get::<_, i64>(1) as u64,
        next_seq: first.get(3),
        epoch: first.get(2),
    };
    let cached = in_order(entries_from(rows, 4, id)?, header.state_type, header.revision);
    Ok(Some((header.version(), cached)))
}

/// Every entry of a connection, in no order, read with the statement's
/// snapshot (inside a transaction: as the transaction left it).
pub(super) async fn entries(
    client: &impl GenericClient,
    id: ConnectionId,
) -> Result<Vec<(i64, EntryKey, Blob)>, StoreError> {
    let statement = client.prepare_cached(READ_ENTRIES).await.map_err(classify)?;
    let rows = client.query(&statement, &[&id.to_string()]).await.map_err(classify)?;
    entries_from(rows, 0, id)
}

/// The entries in rows holding key, blob and position from column `at`
/// on; rows without an entry (a connection with none) are skipped.
fn entries_from(
    rows: Vec<tokio_postgres::Row>,
    at: usize,
    id: ConnectionId,
) -> Result<Vec<(i64, EntryKey, Blob)>, StoreError> {
    let mut read = Vec::with_capacity(rows.len());
    for row in rows {
        let (Some(key), Some(blob), Some(seq)) =
            (row.get::<_, Option<&str>>(at), row.get::<_, Option<String>>(at + 1), row.get::<_, Option<i64>>(at + 2))
        else {
            continue;
        };
        read.push((seq, decode_key(key, id)?, Blob::from_stored(blob)));
    }
    Ok(read)
}

/// A state from its entries as read, with their positions, in no order.
/// Sorted here: the database's sorter would copy every blob.
pub(super) fn in_order(mut read: Vec<(i64, EntryKey, Blob)>, state_type: Option<StateType>, revision: u64) -> Cached {
    read.sort_unstable_by_key(|(seq, _, _)| *seq);
    let (positions, entries) = read.into_iter().map(|(seq, key, blob)| (seq, (key, blob))).unzip();
    Cached { state: Arc::new(StoredState { state_type, revision, entries }), positions: Arc::new(positions) }
}

/// The connection's row, if it was ever written.
pub async fn header(client: &impl GenericClient, id: ConnectionId) -> Result<Option<Header>, StoreError> {
    let statement = client
        .prepare_cached("SELECT state_type, revision, next_seq, epoch FROM connections WHERE connection_id = $1")
        .await
        .map_err(classify)?;
    let row = client.query_opt(&statement, &[&id.to_string()]).await.map_err(classify)?;
    row.map_or(Ok(None), |row| header_from(&row, id))
}

/// Reads `state_type, revision, next_seq, epoch` from a row's first
/// columns; `None` when the connection has no row (a NULL revision).
pub(super) fn header_from(row: &tokio_postgres::Row, id: ConnectionId) -> Result<Option<Header>, StoreError> {
    let Some(revision) = row.get::<_, Option<i64>>(1) else {
        return Ok(None);
    };
    Ok(Some(Header {
        state_type: parse_type(row.get(0), id)?,
        revision: revision as u64,
        next_seq: row.get(2),
        epoch: row.get(3),
    }))
}

/// The connection's row, the database clock (Unix ms) and the lease row
/// (live or not), in one round trip.
pub async fn header_now_and_lease(
    client: &impl GenericClient,
    id: ConnectionId,
) -> Result<(Option<Header>, i64, Option<Lease>), StoreError> {
    let statement = client.prepare_cached(HEADER_NOW_AND_LEASE).await.map_err(classify)?;
    let row = client.query_one(&statement, &[&id.to_string()]).await.map_err(classify)?;
    header_now_and_lease_from(&row, id)
}

/// Reads a row of [`HEADER_NOW_AND_LEASE`].
pub(super) fn header_now_and_lease_from(
    row: &tokio_postgres::Row,
    id: ConnectionId,
) -> Result<(Option<Header>, i64, Option<Lease>), StoreError> {
    let lease = match (row.get::<_, Option<String>>(5), row.get::<_, Option<String>>(6), row.get(7)) {
        (Some(holder), Some(token), Some(expires_at_ms)) => Some(Lease { holder, token, expires_at_ms }),
        _ => None,
    };
    Ok((header_from(row, id)?, row.get(4), lease))
}

/// The state as it was at `revision`, with each entry's position.
pub async fn state_at(client: &impl GenericClient, id: ConnectionId, revision: u64) -> Result<PastState, StoreError> {
    let id_text = id.to_string();
    let current = header(client, id).await?.map_or(0, |h| h.revision);
    if revision > current {
        return Err(Refusal::RevisionNotFound { revision, current }.into());
    }
    if revision == 0 {
        return Ok((None, Vec::new()));
    }
    let at = revision as i64;
    let row = client
        .query_one(
            "SELECT (SELECT min(revision) FROM revisions WHERE connection_id = $1), \
                    (SELECT state_type FROM revisions WHERE connection_id = $1 AND revision = $2)",
            &[&id_text, &at],
        )
        .await
        .map_err(classify)?;
    let oldest = row.get::<_, Option<i64>>(0).unwrap_or(0) as u64;
    if revision < oldest {
        return Err(Refusal::RevisionPruned { revision, oldest }.into());
    }
    let state_type = parse_type(row.get(1), id)?;
    let statement = client
        .prepare_cached(
            // Each key's latest change up to the revision, found through the
            // primary key (connection, revision, key) without sorting blobs.
            "WITH latest AS (SELECT entry_key, max(revision) AS revision FROM changes \
               WHERE connection_id = $1 AND revision <= $2 GROUP BY entry_key) \
             SELECT c.entry_key, c.seq, c.blob FROM latest JOIN changes c \
               ON c.connection_id = $1 AND c.revision = latest.revision AND c.entry_key = latest.entry_key \
             WHERE c.blob IS NOT NULL",
        )
        .await
        .map_err(classify)?;
    let rows = client.query(&statement, &[&id_text, &at]).await.map_err(classify)?;
    let mut entries = Vec::with_capacity(rows.len());
    for row in &rows {
        if let (Some(seq), Some(blob)) = (row.get::<_, Option<i64>>(1), row.get::<_, Option<String>>(2)) {
            entries.push((decode_key(row.get(0), id)?, seq, Blob::from_stored(blob)));
        }
    }
    entries.sort_by_key(|(_, seq, _)| *seq);
    Ok((state_type, entries))
}

/// The keys of the current entries, in order.
pub async fn current_keys(client: &impl GenericClient, id: ConnectionId) -> Result<Vec<EntryKey>, StoreError> {
    let rows = client
        .query("SELECT entry_key FROM entries WHERE connection_id = $1 ORDER BY seq", &[&id.to_string()])
        .await
        .map_err(classify)?;
    rows.iter().map(|row| decode_key(row.get(0), id)).collect()
}

/// The current blob of one entry.
pub async fn entry_blob(
    client: &impl GenericClient,
    id: ConnectionId,
    key: &EntryKey,
) -> Result<Option<Blob>, StoreError> {
    let statement = client
        .prepare_cached(
            "SELECT ch.blob FROM entries e JOIN changes ch ON ch.connection_id = e.connection_id \
              AND ch.revision = e.revision AND ch.entry_key = e.entry_key \
             WHERE e.connection_id = $1 AND e.entry_key = $2",
        )
        .await
        .map_err(classify)?;
    let row = client.query_opt(&statement, &[&id.to_string(), &key.encode()]).await.map_err(classify)?;
    Ok(row.map(|row| Blob::from_stored(row.get(0))))
}

pub async fn exec(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<(), StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(classify)?;
    client.execute(&statement, params).await.map(drop).map_err(classify)
}

pub fn decode_key(text: &str, id: ConnectionId) -> Result<EntryKey, StoreError> {
    EntryKey::decode(text).ok_or_else(|| StoreError::Internal(format!("undecodable entry key {text:?} for {id}")))
}

fn parse_type(text: Option<String>, id: ConnectionId) -> Result<Option<StateType>, StoreError> {
    text.map(|t| StateType::parse(&t).ok_or_else(|| StoreError::Internal(format!("unknown state type {t:?} for {id}"))))
        .transpose()
}
