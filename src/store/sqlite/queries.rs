//! The SQL of reading and writing one connection's state. Every function
//! runs inside a transaction (or savepoint) its caller holds.

use std::sync::Arc;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, MAIN_DB};

use super::classify;
use crate::state::ops::{check_guard, plan, Context, Lease, Meta, Needs, PastState, Refusal, WriteRequest};
use crate::state::{advance, changes, Blob, Change, ConnectionId, Entries, EntryKey, EntryOp, StateType, StoredState};
use crate::store::cache::{Cached, GroupStates, Header, StateCache, StoredEntries, Update, Version};
use crate::store::{Applied, StoreError};

/// The largest cached state the writer looks a write's entries up in
/// ([`StateCache::stored`]): beyond it SQLite's index, an in-process call,
/// is cheaper than scanning the entries (bench/: `stream/set` on a
/// 10,000-stream connection went from 16k to 10k writes/s when scanned).
const SCANNED_ENTRIES: usize = 256;

/// Reads the whole current state of a connection, from the cache when it
/// holds the current version. Returns what to cache when it was read from
/// the rows; the caller decides whether it may (see `StateCache`).
pub fn read_state(
    conn: &Connection,
    id: ConnectionId,
    known: impl Fn(Version) -> Option<Cached>,
) -> Result<(Cached, Option<Update>), StoreError> {
    let header = header(conn, id)?.unwrap_or_default();
    if let Some(cached) = known(header.version()) {
        return Ok((cached, None));
    }
    let cached = read_rows(conn, id, header)?;
    Ok((cached.clone(), Some(Update::Put(header.version(), cached))))
}

/// Reads the entries of a connection whose header was just read.
fn read_rows(conn: &Connection, id: ConnectionId, header: Header) -> Result<Cached, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            // CROSS JOIN keeps `entries` the outer loop: one lookup per
            // current entry. Left to itself SQLite walks every history row
            // of the connection instead, however long its history.
            "SELECT e.entry_key, c.blob, e.seq FROM entries e \
             CROSS JOIN changes c ON c.connection_id = e.connection_id \
              AND c.revision = e.revision AND c.entry_key = e.entry_key \
             WHERE e.connection_id = ?1",
        )
        .map_err(classify)?;
    let rows = stmt.query_map([id.to_bytes()], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, StoredText>(1)?.0, row.get::<_, i64>(2)?))
    });
    let mut read = Vec::new();
    for row in rows.map_err(classify)? {
        let (key, blob, seq) = row.map_err(classify)?;
        read.push((seq, decode_key(&key, id)?, Blob::from_stored(blob)));
    }
    // Sorted here, not by SQLite: its sorter would copy every blob.
    read.sort_unstable_by_key(|(seq, _, _)| *seq);
    let (positions, entries): (Vec<i64>, Entries) = read.into_iter().map(|(seq, key, blob)| (seq, (key, blob))).unzip();
    let state = StoredState { state_type: header.state_type, revision: header.revision, entries };
    Ok(Cached { state: Arc::new(state), positions: Arc::new(positions) })
}

/// Reads the state as it was at `revision`, with each entry's position.
pub fn state_at(conn: &Connection, id: ConnectionId, revision: u64) -> Result<PastState, StoreError> {
    let key = id.to_bytes();
    let current = header(conn, id)?.map_or(0, |h| h.revision);
    if revision > current {
        return Err(Refusal::RevisionNotFound { revision, current }.into());
    }
    if revision == 0 {
        return Ok((None, Vec::new()));
    }
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT min(revision) FROM revisions WHERE connection_id = ?1")
        .and_then(|mut s| s.query_row([&key], |r| r.get(0)))
        .map_err(classify)?;
    let oldest = oldest.unwrap_or(0) as u64;
    if revision < oldest {
        return Err(Refusal::RevisionPruned { revision, oldest }.into());
    }
    let state_type: Option<String> = conn
        .prepare_cached("SELECT state_type FROM revisions WHERE connection_id = ?1 AND revision = ?2")
        .and_then(|mut s| s.query_row(params![key, revision as i64], |r| r.get(0)))
        .map_err(classify)?;
    let mut stmt = conn
        .prepare_cached(
            // Each key's latest change up to the revision, found through the
            // primary key (connection, revision, key) without reading blobs.
            "WITH latest AS (SELECT entry_key, max(revision) AS revision FROM changes \
               WHERE connection_id = ?1 AND revision <= ?2 GROUP BY entry_key) \
             SELECT c.entry_key, c.seq, c.blob FROM latest JOIN changes c \
               ON c.connection_id = ?1 AND c.revision = latest.revision AND c.entry_key = latest.entry_key \
             WHERE c.blob IS NOT NULL",
        )
        .map_err(classify)?;
    let rows = stmt.query_map(params![key, revision as i64], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, StoredText>(2)?.0))
    });
    let mut entries = Vec::new();
    for row in rows.map_err(classify)? {
        let (key, seq, blob) = row.map_err(classify)?;
        entries.push((decode_key(&key, id)?, seq, Blob::from_stored(blob)));
    }
    // Sorted here, not by SQLite: its sorter would copy every blob.
    entries.sort_unstable_by_key(|(_, seq, _)| *seq);
    Ok((parse_type(state_type, id)?, entries))
}

/// Applies a write: guard, plan, then each entry change that really
/// changes something, all recorded under the connection's next revision.
/// Returns what to tell the caller and, when the new state is known, what
/// to cache once the write has committed.
pub fn apply(
    conn: &Connection,
    id: ConnectionId,
    request: &WriteRequest,
    now_ms: i64,
    cache: &StateCache,
    group: &GroupStates,
) -> Result<(Applied, Option<Update>), StoreError> {
    let known = |version| group.get(id, version).or_else(|| cache.get(id, version));
    let key = id.to_bytes();
    let before = header(conn, id)?.unwrap_or_default();
    let lease = live_lease(conn, id, now_ms)?;
    check_guard(&request.guard, before.revision, lease.as_ref())?;
    let context = match request.operation.needs() {
        Needs::Nothing => Context::default(),
        Needs::CurrentKeys => Context { current_keys: current_keys(conn, id)?, target: None },
        Needs::Revision(at) => Context { target: Some(state_at(conn, id, at)?), current_keys: current_keys(conn, id)? },
    };
    let plan = plan(&request.operation, before.state_type, &context)?;
    // The state before the write, when held, answers what the write needs
    // to know of it without a query. It is taken whole only when the new
    // state is to be returned: folding deferred effects into a large state
    // on every one-stream write would cost more than the queries.
    let base = if request.return_state { known(before.version()) } else { None };
    let keys: Vec<&EntryKey> = plan.ops.iter().map(|op| &op.key).collect();
    let stored = match base.clone().or_else(|| group.get(id, before.version())) {
        Some(state) => state.stored(&keys),
        None => match cache.stored(id, &keys, SCANNED_ENTRIES) {
            Some((held, stored)) if held.version() == before.version() => stored,
            _ => stored_entries(conn, id, &plan.ops)?,
        },
    };
    let changed = changes(&plan.ops, &plan.pinned_seqs, &stored);
    if changed.is_empty() {
        if !request.return_state {
            return Ok((Applied { revision: before.revision, changed: false, state: None }, None));
        }
        let (current, update) = read_state(conn, id, known)?;
        return Ok((Applied { revision: before.revision, changed: false, state: Some(current.state) }, update));
    }
    // Everything that can refuse has been checked: from here on only the
    // storage can fail (see `Isolation::RefusesBeforeWriting`).
    let keys = changed.iter().map(|change| decode_key(&change.key, id)).collect::<Result<Vec<_>, _>>()?;
    let revision = before.revision + 1;
    let mut next_seq = before.next_seq;
    let mut effects = Vec::with_capacity(changed.len());
    for (change, key) in changed.iter().zip(keys) {
        let seq = set_head(conn, id, revision, change, &mut next_seq)?;
        effects.push((key, change.blob.cloned().zip(seq)));
    }
    let next = base.map(|base| advance(&base.state, &base.positions, &effects, revision, plan.state_type));
    let remaining = match &next {
        Some((state, _)) => !state.entries.is_empty(),
        None => conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM entries WHERE connection_id = ?1)")
            .and_then(|mut s| s.query_row([&key], |r| r.get(0)))
            .map_err(classify)?,
    };
    let state_type = plan.state_type.filter(|_| remaining);
    let new_type = state_type.map(StateType::as_str);
    exec(conn, SET_HEADER, params![key, new_type, revision as i64, next_seq])?;
    // The revision's own columns go on its first change row that is not
    // written in place (migrations/sqlite/0007): no row of its own to
    // insert, unless every change is such a blob.
    let revision_row = RevisionRow { created_at_ms: now_ms, state_type: new_type, meta: &request.meta };
    let carrier = changed.iter().position(|change| !in_place(change.blob.map(Blob::as_str)));
    for (i, (change, (_, effect))) in changed.iter().zip(&effects).enumerate() {
        let blob = change.blob.map(Blob::as_str);
        let seq = effect.as_ref().map(|(_, seq)| *seq);
        let carried = (carrier == Some(i)).then_some(&revision_row);
        insert_change(conn, &key, revision as i64, change.key.as_str(), blob, seq, carried)?;
    }
    if carrier.is_none() {
        let RevisionRow { created_at_ms, state_type, meta } = revision_row;
        exec(conn, ADD_REVISION, params![key, revision as i64, created_at_ms, state_type, meta.actor, meta.reason])?;
    }
    let after = Header { state_type, revision, next_seq, epoch: before.epoch };
    let (state, update) = if request.return_state {
        let next = match next {
            Some((mut state, positions)) => {
                state.state_type = state_type;
                Cached { state: Arc::new(state), positions: Arc::new(positions) }
            }
            None => {
                // When every remaining entry was set by this write (a legacy
                // write, say), the new state is known without reading it back.
                let sets = effects.iter().filter(|(_, effect)| effect.is_some()).count();
                let count: i64 = conn
                    .prepare_cached("SELECT count(*) FROM entries WHERE connection_id = ?1")
                    .and_then(|mut s| s.query_row([&key], |r| r.get(0)))
                    .map_err(classify)?;
                if count as usize == sets {
                    let (state, positions) = advance(&StoredState::default(), &[], &effects, revision, state_type);
                    Cached { state: Arc::new(state), positions: Arc::new(positions) }
                } else {
                    read_rows(conn, id, after)?
                }
            }
        };
        (Some(next.state.clone()), Update::Put(after.version(), next))
    } else {
        (None, Update::Defer { from: before.version(), to: after.version(), effects, state_type })
    };
    Ok((Applied { revision, changed: true, state }, Some(update)))
}

/// A written connection's row: type, revision and next position. It is
/// the row of `heads` with the entry key '' (migrations/sqlite/0006).
pub const SET_HEADER: &str = "INSERT INTO heads (connection_id, entry_key, state_type, revision, next_seq, epoch) \
     VALUES (?1, '', ?2, ?3, ?4, 0) \
     ON CONFLICT (connection_id, entry_key) DO UPDATE SET state_type = ?2, revision = ?3, next_seq = ?4";
/// A revision's own row, for a revision without a change row to carry its
/// columns (an imported one without changes, or one whose changes are all
/// written in place): the row of `history` with the entry key ''
/// (migrations/sqlite/0004, 0007).
pub const ADD_REVISION: &str =
    "INSERT INTO history (connection_id, revision, entry_key, created_at_ms, state_type, actor, reason) \
     VALUES (?1, ?2, '', ?3, ?4, ?5, ?6)";

/// A revision's own columns, stored on one of its rows of `history`.
pub struct RevisionRow<'a> {
    pub created_at_ms: i64,
    /// The state's type after the write.
    pub state_type: Option<&'a str>,
    pub meta: &'a Meta,
}

/// The stored blob and position of each key the ops touch.
fn stored_entries(conn: &Connection, id: ConnectionId, ops: &[EntryOp]) -> Result<StoredEntries, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT c.blob, e.seq FROM entries e \
             JOIN changes c ON c.connection_id = e.connection_id \
              AND c.revision = e.revision AND c.entry_key = e.entry_key \
             WHERE e.connection_id = ?1 AND e.entry_key = ?2",
        )
        .map_err(classify)?;
    let mut stored = StoredEntries::with_capacity(ops.len());
    for op in ops {
        let key = op.key.encode();
        let row = stmt
            .query_row(params![id.to_bytes(), key], |r| {
                Ok((Blob::from_stored(r.get::<_, StoredText>(0)?.0), r.get(1)?))
            })
            .optional()
            .map_err(classify)?;
        if let Some(row) = row {
            stored.insert(key, row);
        }
    }
    Ok(stored)
}

/// Sets the current entry a change makes (or removes it); returns the
/// entry's position, `None` when removed. The change's `history` row is
/// inserted by the caller.
fn set_head(
    conn: &Connection,
    id: ConnectionId,
    revision: u64,
    change: &Change<'_>,
    next_seq: &mut i64,
) -> Result<Option<i64>, StoreError> {
    let id = &id.to_bytes();
    let (key, revision) = (change.key.as_str(), revision as i64);
    if change.blob.is_none() {
        exec(conn, "DELETE FROM heads WHERE connection_id = ?1 AND entry_key = ?2", params![id, key])?;
        return Ok(None);
    }
    let seq = change.seq.unwrap_or_else(|| {
        *next_seq += 1;
        *next_seq - 1
    });
    let sql = if change.existed {
        "UPDATE heads SET revision = ?3, seq = ?4 WHERE connection_id = ?1 AND entry_key = ?2"
    } else {
        "INSERT INTO heads (connection_id, entry_key, revision, seq) VALUES (?1, ?2, ?3, ?4)"
    };
    exec(conn, sql, params![id, key, revision, seq])?;
    Ok(Some(seq))
}

/// Blobs at least this long are written in place through SQLite's
/// incremental blob I/O. Bound as a parameter, a blob is copied twice inside
/// SQLite (the bound value, then the record) while it is written: a 100 MiB
/// legacy state peaked at 305 MiB of heap (massif, bench/profile blob).
const IN_PLACE_BLOB_BYTES: usize = 1 << 20;

/// Whether a blob is written in place. Its row then carries no revision:
/// SQLite leaves the zeroblob unmade only when it ends the record, and
/// columns after it would make SQLite build all of it in memory (a 100 MiB
/// blob's write peaked at 314 MiB instead of 213).
fn in_place(blob: Option<&str>) -> bool {
    blob.is_some_and(|text| text.len() >= IN_PLACE_BLOB_BYTES)
}

/// Inserts one change row into `history`, with the revision's own columns
/// when given (not for a blob written in place, see [`in_place`]). Small
/// blobs are stored as TEXT; large ones are written in place and so stored
/// as BLOB holding the same UTF-8 (read back through [`StoredText`]).
pub fn insert_change(
    conn: &Connection,
    id: &[u8; 16],
    revision: i64,
    key: &str,
    blob: Option<&str>,
    seq: Option<i64>,
    revision_row: Option<&RevisionRow<'_>>,
) -> Result<(), StoreError> {
    let (created_at_ms, state_type, actor, reason) = match revision_row {
        Some(row) => (Some(row.created_at_ms), row.state_type, row.meta.actor.as_deref(), row.meta.reason.as_deref()),
        None => (None, None, None, None),
    };
    let Some(text) = blob.filter(|_| in_place(blob)) else {
        return exec(
            conn,
            "INSERT INTO history (connection_id, revision, entry_key, blob, seq, created_at_ms, state_type, actor, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![id, revision, key, blob, seq, created_at_ms, state_type, actor, reason],
        );
    };
    if revision_row.is_some() {
        return Err(StoreError::Internal("a blob written in place cannot carry its revision".to_owned()));
    }
    exec(
        conn,
        "INSERT INTO history (connection_id, revision, entry_key, blob, seq) VALUES (?1, ?2, ?3, zeroblob(?4), ?5)",
        params![id, revision, key, text.len() as i64, seq],
    )?;
    let mut handle = conn.blob_open(MAIN_DB, "history", "blob", conn.last_insert_rowid(), false).map_err(classify)?;
    handle.write_all_at(text.as_bytes(), 0).map_err(classify)
}

/// The text of a `history.blob` value, stored as TEXT or, when it was
/// written in place, as BLOB.
pub struct StoredText(pub String);

impl FromSql for StoredText {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value {
            ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
                String::from_utf8(bytes.to_vec()).map(Self).map_err(|e| FromSqlError::Other(Box::new(e)))
            }
            _ => Err(FromSqlError::InvalidType),
        }
    }
}

/// The keys of the current entries, in order.
pub fn current_keys(conn: &Connection, id: ConnectionId) -> Result<Vec<EntryKey>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT entry_key FROM entries WHERE connection_id = ?1 ORDER BY seq").map_err(classify)?;
    let rows = stmt.query_map([id.to_bytes()], |r| r.get::<_, String>(0)).map_err(classify)?;
    rows.map(|row| decode_key(&row.map_err(classify)?, id)).collect()
}

/// The current blob of one entry.
pub fn entry_blob(conn: &Connection, id: ConnectionId, key: &EntryKey) -> Result<Option<Blob>, StoreError> {
    conn.prepare_cached(
        "SELECT c.blob FROM entries e JOIN changes c ON c.connection_id = e.connection_id \
          AND c.revision = e.revision AND c.entry_key = e.entry_key \
         WHERE e.connection_id = ?1 AND e.entry_key = ?2",
    )
    .and_then(|mut s| s.query_row(params![id.to_bytes(), key.encode()], |r| r.get::<_, StoredText>(0)).optional())
    .map(|blob| blob.map(|text| Blob::from_stored(text.0)))
    .map_err(classify)
}

/// The connection's lease, if it is live at `now_ms`.
pub fn live_lease(conn: &Connection, id: ConnectionId, now_ms: i64) -> Result<Option<Lease>, StoreError> {
    Ok(lease_row(conn, id)?.filter(|lease| lease.is_live(now_ms)))
}

/// The connection's lease row, live or not.
pub fn lease_row(conn: &Connection, id: ConnectionId) -> Result<Option<Lease>, StoreError> {
    conn.prepare_cached("SELECT holder, token, expires_at_ms FROM leases WHERE connection_id = ?1")
        .and_then(|mut s| {
            s.query_row([id.to_bytes()], |r| {
                Ok(Lease { holder: r.get(0)?, token: r.get(1)?, expires_at_ms: r.get(2)? })
            })
            .optional()
        })
        .map_err(classify)
}

/// The connection's row, or `None` for a connection never written.
pub fn header(conn: &Connection, id: ConnectionId) -> Result<Option<Header>, StoreError> {
    let row = conn
        .prepare_cached("SELECT state_type, revision, next_seq, epoch FROM connections WHERE connection_id = ?1")
        .and_then(|mut s| {
            s.query_row([id.to_bytes()], |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
            })
            .optional()
        })
        .map_err(classify)?;
    row.map(|(state_type, revision, next_seq, epoch)| {
        Ok(Header { state_type: parse_type(state_type, id)?, revision: revision as u64, next_seq, epoch })
    })
    .transpose()
}

pub fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<(), StoreError> {
    conn.prepare_cached(sql).and_then(|mut stmt| stmt.execute(params)).map(drop).map_err(classify)
}

pub fn decode_key(text: &str, id: impl std::fmt::Display) -> Result<EntryKey, StoreError> {
    EntryKey::decode(text).ok_or_else(|| StoreError::Internal(format!("undecodable entry key {text:?} for {id}")))
}

fn parse_type(text: Option<String>, id: ConnectionId) -> Result<Option<StateType>, StoreError> {
    text.map(|t| StateType::parse(&t).ok_or_else(|| StoreError::Internal(format!("unknown state type {t:?} for {id}"))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use crate::state::ops::{Guard, Meta, Operation, WriteRequest};
    use crate::state::{Blob, ConnectionId, EntryKey, EntryOp, StateType, StateWrite, StreamDescriptor};
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;

    fn request(operation: Operation, actor: Option<&str>, reason: Option<&str>) -> WriteRequest {
        let meta = Meta { actor: actor.map(str::to_owned), reason: reason.map(str::to_owned) };
        WriteRequest { operation, guard: Guard::default(), meta, return_state: false }
    }

    fn set(name: &str) -> EntryOp {
        let key = EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: None });
        EntryOp { key, blob: Some(Blob::from_json(r#"{"cursor":1}"#)) }
    }

    /// A store on a file of its own, and a connection to read its rows.
    fn store() -> (tempfile::TempDir, SqliteStore, rusqlite::Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hw.db");
        let store = SqliteStore::open(&path, true, 1 << 20, true).unwrap();
        let rows = rusqlite::Connection::open(&path).unwrap();
        (dir, store, rows)
    }

    fn count(conn: &rusqlite::Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[tokio::test]
    async fn a_revision_is_stored_on_its_first_change_row_without_a_row_of_its_own() {
        let (_dir, store, conn) = store();
        let id = ConnectionId::random();
        let write = StateWrite { state_type: StateType::Stream, ops: vec![set("a"), set("b")] };
        store.apply(id, request(Operation::Merge(write), Some("orchestrator"), None)).await.unwrap();
        let reset = Operation::Reset { streams: None, include_shared: true };
        store.apply(id, request(reset, None, Some("bad cursor"))).await.unwrap();

        // Two changes per revision, each a row; the revision adds none.
        assert_eq!(count(&conn, "SELECT count(*) FROM history"), 4);
        assert_eq!(count(&conn, "SELECT count(*) FROM history WHERE entry_key = ''"), 0);
        assert_eq!(count(&conn, "SELECT count(*) FROM history WHERE created_at_ms IS NOT NULL"), 2);

        let history = store.history(id, 10, None).await.unwrap();
        let seen: Vec<_> = history
            .revisions
            .iter()
            .map(|r| (r.revision, r.state_type, r.actor.as_deref(), r.reason.as_deref(), r.changes.len()))
            .collect();
        assert_eq!(
            seen,
            [(2, None, None, Some("bad cursor"), 2), (1, Some(StateType::Stream), Some("orchestrator"), None, 2)]
        );
        assert_eq!(history.oldest, Some(1));
    }

    #[tokio::test]
    async fn a_revision_whose_changes_are_all_written_in_place_has_a_row_of_its_own() {
        let (_dir, store, conn) = store();
        let id = ConnectionId::random();
        let large = format!("\"{}\"", "x".repeat(super::IN_PLACE_BLOB_BYTES));
        let op = EntryOp { key: EntryKey::Legacy, blob: Some(Blob::from_json(&large)) };
        let write = StateWrite { state_type: StateType::Legacy, ops: vec![op] };
        store.apply(id, request(Operation::Merge(write), Some("orchestrator"), None)).await.unwrap();

        // The blob's row ends with it, so SQLite need not build it in memory.
        assert_eq!(count(&conn, "SELECT count(*) FROM history WHERE entry_key <> '' AND created_at_ms IS NULL"), 1);
        assert_eq!(count(&conn, "SELECT count(*) FROM history WHERE entry_key = ''"), 1);
        let history = store.history(id, 10, None).await.unwrap();
        let seen: Vec<_> =
            history.revisions.iter().map(|r| (r.revision, r.actor.as_deref(), r.changes.len())).collect();
        assert_eq!(seen, [(1, Some("orchestrator"), 1)]);
        assert_eq!(store.read(id).await.unwrap().entries[0].1.as_str(), large);
    }
}
