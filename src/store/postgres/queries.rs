//! The SQL of reading and writing one connection's state on PostgreSQL.
//! Multi-row changes go in one statement each (`unnest` of arrays), so a
//! write costs a fixed number of round trips whatever it touches. Time
//! (revisions, lease expiry) is the database's clock, shared by all nodes.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::GenericClient;

use super::classify;
use crate::state::ops::{check_guard, plan, Context, Lease, Needs, Operation, PastState, Refusal, WriteRequest};
use crate::state::{advance, changes, Blob, ConnectionId, EntryKey, StateType, StoredState};
use crate::store::cache::{Cached, Header, StateCache, Update};
use crate::store::{Applied, StoreError};

/// One statement, one snapshot: the header and every entry in order.
const READ_STATE: &str = "SELECT c.state_type, c.revision, c.epoch, e.entry_key, ch.blob, e.seq \
     FROM connections c \
     LEFT JOIN entries e ON e.connection_id = c.connection_id \
     LEFT JOIN changes ch ON ch.connection_id = e.connection_id \
       AND ch.revision = e.revision AND ch.entry_key = e.entry_key \
     WHERE c.connection_id = $1 ORDER BY e.seq";

/// The connection's row, the database clock in Unix milliseconds and the
/// connection's lease row, in one round trip.
const HEADER_NOW_AND_LEASE: &str = "SELECT c.state_type, c.revision, c.next_seq, c.epoch, \
     (extract(epoch FROM clock_timestamp()) * 1000)::bigint, l.holder, l.token, l.expires_at_ms \
     FROM (SELECT 1) one \
     LEFT JOIN connections c ON c.connection_id = $1 \
     LEFT JOIN leases l ON l.connection_id = $1";

const RECORD_CHANGES: &str = "INSERT INTO changes (connection_id, revision, entry_key, blob, seq) \
     SELECT $1, $2, k, b, s FROM unnest($3::text[], $4::text[], $5::int8[]) AS t(k, b, s)";
const DELETE_ENTRIES: &str = "DELETE FROM entries WHERE connection_id = $1 AND entry_key = ANY($2)";
const UPDATE_ENTRIES: &str = "UPDATE entries e SET revision = $2, seq = u.s \
     FROM unnest($3::text[], $4::int8[]) AS u(k, s) WHERE e.connection_id = $1 AND e.entry_key = u.k";
const ADD_ENTRIES: &str = "INSERT INTO entries (connection_id, entry_key, seq, revision) \
     SELECT $1, k, s, $2 FROM unnest($3::text[], $4::int8[]) AS t(k, s)";
/// The connection row and the revision row, the type set only if an entry
/// remains (the statement sees the entry changes sent before it).
const FINISH_REVISION: &str = "WITH remaining AS ( \
       SELECT EXISTS (SELECT 1 FROM entries WHERE connection_id = $1) AS present), \
     header AS ( \
       INSERT INTO connections (connection_id, state_type, revision, next_seq) \
       SELECT $1, CASE WHEN present THEN $4 END, $2, $3 FROM remaining \
       ON CONFLICT (connection_id) DO UPDATE SET state_type = excluded.state_type, \
         revision = excluded.revision, next_seq = excluded.next_seq \
       RETURNING state_type) \
     INSERT INTO revisions (connection_id, revision, created_at_ms, state_type, actor, reason) \
     SELECT $1, $2, $5, state_type, $6, $7 FROM header RETURNING state_type";

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
    let statement = client.prepare_cached(READ_STATE).await.map_err(classify)?;
    let rows = client.query(&statement, &[&id.to_string()]).await.map_err(classify)?;
    let Some(first) = rows.first() else {
        return Ok(Cached { state: Arc::default(), positions: Arc::default() });
    };
    let header = Header {
        state_type: parse_type(first.get(0), id)?,
        revision: first.get::<_, i64>(1) as u64,
        next_seq: 0,
        epoch: first.get(2),
    };
    let mut entries = Vec::with_capacity(rows.len());
    let mut positions = Vec::with_capacity(rows.len());
    for row in &rows {
        let (Some(key), Some(blob), Some(seq)) =
            (row.get::<_, Option<String>>(3), row.get::<_, Option<String>>(4), row.get::<_, Option<i64>>(5))
        else {
            continue;
        };
        entries.push((decode_key(&key, id)?, Blob::from_stored(blob)));
        positions.push(seq);
    }
    let state = StoredState { state_type: header.state_type, revision: header.revision, entries };
    let cached = Cached { state: Arc::new(state), positions: Arc::new(positions) };
    cache.put(id, header.version(), cached.clone());
    Ok(cached)
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
fn header_from(row: &tokio_postgres::Row, id: ConnectionId) -> Result<Option<Header>, StoreError> {
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
fn header_now_and_lease_from(
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
            "SELECT DISTINCT ON (entry_key) entry_key, seq, blob FROM changes \
             WHERE connection_id = $1 AND revision <= $2 ORDER BY entry_key, revision DESC",
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

/// The stored blob and position of the listed keys of one connection.
const STORED_ENTRIES: &str = "SELECT e.entry_key, ch.blob, e.seq FROM entries e \
     JOIN changes ch ON ch.connection_id = e.connection_id \
      AND ch.revision = e.revision AND ch.entry_key = e.entry_key \
     WHERE e.connection_id = $1 AND e.entry_key = ANY($2)";

/// The keys a write will look up, when they are known before the stored
/// type is: those of its plan against an empty connection, and the legacy
/// entry a typed write may replace.
fn likely_keys(operation: &Operation) -> Option<Vec<String>> {
    if operation.needs() != Needs::Nothing {
        return None;
    }
    let plan = plan(operation, None, &Context::default()).ok()?;
    Some(plan.ops.iter().map(|op| op.key.encode()).chain([EntryKey::Legacy.encode()]).collect())
}

/// Applies a write in a transaction of its own on `client`, which must not
/// be in one, taking the connection's advisory lock (`lock_key`) first, and
/// commits it. Returns what to tell the caller and, when the new state is
/// known, what to cache (the transaction has committed by then).
///
/// Statements are pipelined: BEGIN, the lock, the header and the stored
/// entries of the keys the write will most likely touch go in one round
/// trip; the entry changes, the revision and COMMIT in another. A refusal
/// returns `StoreError::Refused` with the transaction still open and
/// nothing written: the caller rolls it back. After any other error the
/// client's session is in an unknown state and must not be reused.
pub async fn apply(
    client: &impl GenericClient,
    id: ConnectionId,
    lock_key: i64,
    request: &WriteRequest,
    cache: &StateCache,
) -> Result<(Applied, Option<Update>), StoreError> {
    let id_text = id.to_string();
    let lock = prepare(client, "SELECT pg_advisory_xact_lock($1)").await?;
    let header_statement = prepare(client, HEADER_NOW_AND_LEASE).await?;
    let entries_statement = prepare(client, STORED_ENTRIES).await?;
    let likely = likely_keys(&request.operation);
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&lock_key];
    let id_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id_text];
    let (_, _, header_row, likely_rows) = tokio::try_join!(
        biased;
        client.batch_execute("BEGIN"),
        client.execute(&lock, &lock_params),
        client.query_one(&header_statement, &id_params),
        async {
            match &likely {
                Some(keys) => client.query(&entries_statement, &[&id_text, keys]).await.map(Some),
                None => Ok(None),
            }
        },
    )
    .map_err(classify)?;
    let (before, now_ms, lease) = header_now_and_lease_from(&header_row, id)?;
    let before = before.unwrap_or_default();
    let (stored_type, revision, mut next_seq) = (before.state_type, before.revision, before.next_seq);
    check_guard(&request.guard, revision, lease.as_ref().filter(|l| l.is_live(now_ms)))?;
    let context = match request.operation.needs() {
        Needs::Nothing => Context::default(),
        Needs::CurrentKeys => Context { current_keys: current_keys(client, id).await?, target: None },
        Needs::Revision(at) => {
            Context { target: Some(state_at(client, id, at).await?), current_keys: current_keys(client, id).await? }
        }
    };
    let plan = plan(&request.operation, stored_type, &context)?;
    let keys: Vec<String> = plan.ops.iter().map(|op| op.key.encode()).collect();
    let rows = match (likely_rows, &likely) {
        (Some(rows), Some(likely)) if keys.iter().all(|key| likely.contains(key)) => rows,
        _ => client.query(&entries_statement, &[&id_text, &keys]).await.map_err(classify)?,
    };
    let stored: HashMap<String, (String, i64)> =
        rows.into_iter().map(|row| (row.get(0), (row.get(1), row.get(2)))).collect();
    let changed = changes(&plan.ops, &plan.pinned_seqs, &stored);
    if changed.is_empty() {
        let state = if request.return_state { Some(read_state(client, id, cache).await?.state) } else { None };
        client.batch_execute("COMMIT").await.map_err(classify)?;
        return Ok((Applied { revision, changed: false, state }, None));
    }

    let revision = (revision + 1) as i64;
    let mut seqs: Vec<Option<i64>> = Vec::with_capacity(changed.len());
    let mut effects = Vec::with_capacity(changed.len());
    let (mut added, mut added_seqs, mut updated, mut updated_seqs, mut deleted) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for change in &changed {
        let key = decode_key(&change.key, id)?;
        let Some(blob) = change.blob else {
            seqs.push(None);
            effects.push((key, None));
            deleted.push(change.key.as_str());
            continue;
        };
        let seq = change.seq.unwrap_or_else(|| {
            next_seq += 1;
            next_seq - 1
        });
        seqs.push(Some(seq));
        effects.push((key, Some((blob.clone(), seq))));
        if change.existed {
            updated.push(change.key.as_str());
            updated_seqs.push(seq);
        } else {
            added.push(change.key.as_str());
            added_seqs.push(seq);
        }
    }
    let changed_keys: Vec<&str> = changed.iter().map(|c| c.key.as_str()).collect();
    let blobs: Vec<Option<&str>> = changed.iter().map(|c| c.blob.map(Blob::as_str)).collect();
    let state_type = plan.state_type.map(StateType::as_str);
    // Prepared first (cached per connection), then sent together: one round
    // trip, and the server runs them in the order sent. Deletes come before
    // inserts: a restore may give a kept entry the place of one it removes.
    let record = prepare(client, RECORD_CHANGES).await?;
    let delete = prepare(client, DELETE_ENTRIES).await?;
    let update = prepare(client, UPDATE_ENTRIES).await?;
    let add = prepare(client, ADD_ENTRIES).await?;
    let finish = prepare(client, FINISH_REVISION).await?;
    let skip = || async { Ok::<u64, tokio_postgres::Error>(0) };
    let record_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&id_text, &revision, &changed_keys, &blobs, &seqs];
    let finish_params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
        [&id_text, &revision, &next_seq, &state_type, &now_ms, &request.meta.actor, &request.meta.reason];
    // COMMIT goes with the changes unless the new state must be read back
    // inside the transaction first (not cached, and the caller wants it).
    let base = if request.return_state { cache.get(id, before.version()) } else { None };
    let commit_now = !request.return_state || base.is_some();
    let (_, _, _, _, row, ()) = tokio::try_join!(
        biased;
        client.execute(&record, &record_params),
        async {
            if deleted.is_empty() { skip().await } else { client.execute(&delete, &[&id_text, &deleted]).await }
        },
        async {
            if updated.is_empty() {
                skip().await
            } else {
                client.execute(&update, &[&id_text, &revision, &updated, &updated_seqs]).await
            }
        },
        async {
            if added.is_empty() { skip().await } else { client.execute(&add, &[&id_text, &revision, &added, &added_seqs]).await }
        },
        client.query_one(&finish, &finish_params),
        async { if commit_now { client.batch_execute("COMMIT").await } else { Ok(()) } },
    )
    .map_err(classify)?;
    let state_type = parse_type(row.get(0), id)?;
    let after = Header { state_type, revision: revision as u64, next_seq, epoch: before.epoch };
    let (state, update) = if request.return_state {
        let next = match base {
            Some(base) => {
                let (state, positions) = advance(&base.state, &base.positions, &effects, after.revision, state_type);
                Cached { state: Arc::new(state), positions: Arc::new(positions) }
            }
            None if all_set(client, &id_text, &effects).await? => {
                // Every remaining entry was set by this write (a legacy write,
                // say): the new state is known without reading it back.
                let (state, positions) = advance(&StoredState::default(), &[], &effects, after.revision, state_type);
                Cached { state: Arc::new(state), positions: Arc::new(positions) }
            }
            None => {
                // Read inside the transaction: the state this write made.
                let rows = client.query(READ_STATE, &[&id_text]).await.map_err(classify)?;
                let mut entries = Vec::with_capacity(rows.len());
                let mut positions = Vec::with_capacity(rows.len());
                for row in &rows {
                    if let (Some(key), Some(blob), Some(seq)) =
                        (row.get::<_, Option<String>>(3), row.get::<_, Option<String>>(4), row.get::<_, Option<i64>>(5))
                    {
                        entries.push((decode_key(&key, id)?, Blob::from_stored(blob)));
                        positions.push(seq);
                    }
                }
                let state = StoredState { state_type, revision: after.revision, entries };
                Cached { state: Arc::new(state), positions: Arc::new(positions) }
            }
        };
        (Some(next.state.clone()), Update::Put(after.version(), next))
    } else {
        (None, Update::Defer { from: before.version(), to: after.version(), effects, state_type })
    };
    if !commit_now {
        client.batch_execute("COMMIT").await.map_err(classify)?;
    }
    Ok((Applied { revision: after.revision, changed: true, state }, Some(update)))
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

/// Whether every entry the connection has now was set by these effects.
async fn all_set(tx: &impl GenericClient, id: &str, effects: &[crate::state::Effect]) -> Result<bool, StoreError> {
    let sets = effects.iter().filter(|(_, effect)| effect.is_some()).count() as i64;
    let row = tx.query_one("SELECT count(*) FROM entries WHERE connection_id = $1", &[&id]).await.map_err(classify)?;
    Ok(row.get::<_, i64>(0) == sets)
}

async fn prepare(client: &impl GenericClient, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
    client.prepare_cached(sql).await.map_err(classify)
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
