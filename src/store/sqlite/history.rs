//! History pages, sync leases and retention pruning on SQLite.

use rusqlite::{params, Connection};

use super::classify;
use super::queries::{decode_key, exec, header, lease_row};
use crate::state::history::{step_horizon, History, Pruned, Retention, RevisionInfo};
use crate::state::ops::{lease_transition, Lease, LeaseOp};
use crate::state::{ConnectionId, StateType};
use crate::store::StoreError;

/// A page of history, newest first, of revisions before `before`.
pub fn history(conn: &Connection, id: ConnectionId, limit: usize, before: Option<u64>) -> Result<History, StoreError> {
    let key = id.to_bytes();
    let Some(current) = header(conn, id)?.map(|h| h.revision) else {
        return Ok(History::default());
    };
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT min(revision) FROM revisions WHERE connection_id = ?1")
        .and_then(|mut s| s.query_row([&key], |r| r.get(0)))
        .map_err(classify)?;
    let before = before.unwrap_or(u64::MAX).min(i64::MAX as u64) as i64;
    let mut stmt = conn
        .prepare_cached(
            "SELECT revision, created_at_ms, state_type, actor, reason FROM revisions \
             WHERE connection_id = ?1 AND revision < ?2 ORDER BY revision DESC LIMIT ?3",
        )
        .map_err(classify)?;
    let rows = stmt
        .query_map(params![key, before, limit as i64], |r| {
            Ok(RevisionInfo {
                revision: r.get::<_, i64>(0)? as u64,
                created_at_ms: r.get(1)?,
                state_type: r.get::<_, Option<String>>(2)?.as_deref().and_then(StateType::parse),
                actor: r.get(3)?,
                reason: r.get(4)?,
                changes: Vec::new(),
            })
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(classify)?;
    let mut revisions = rows;
    if let (Some(newest), Some(last)) = (revisions.first(), revisions.last()) {
        let (high, low) = (newest.revision as i64, last.revision as i64);
        let mut stmt = conn
            .prepare_cached(
                "SELECT revision, entry_key, length(CAST(blob AS BLOB)) FROM changes \
                 WHERE connection_id = ?1 AND revision BETWEEN ?2 AND ?3 ORDER BY revision, entry_key",
            )
            .map_err(classify)?;
        let changes = stmt
            .query_map(params![key, low, high], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?, r.get::<_, Option<i64>>(2)?))
            })
            .map_err(classify)?;
        for change in changes {
            let (revision, key, size) = change.map_err(classify)?;
            if let Some(info) = revisions.iter_mut().find(|info| info.revision == revision) {
                info.changes.push((decode_key(&key, id)?, size.map(|s| s as u64)));
            }
        }
    }
    Ok(History { revision: current, oldest: oldest.map(|o| o as u64), revisions })
}

/// Applies a lease request at `now_ms` with `token` for a new lease.
pub fn lease(
    conn: &Connection,
    id: ConnectionId,
    op: &LeaseOp,
    now_ms: i64,
    token: String,
) -> Result<Option<Lease>, StoreError> {
    let key = id.to_bytes();
    let current = lease_row(conn, id)?;
    let next = lease_transition(op, current.as_ref(), now_ms, || token)?;
    match &next {
        Some(lease) => exec(
            conn,
            "INSERT INTO leases (connection_id, holder, token, expires_at_ms) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (connection_id) DO UPDATE SET holder = ?2, token = ?3, expires_at_ms = ?4",
            params![key, lease.holder, lease.token, lease.expires_at_ms],
        )?,
        None => exec(conn, "DELETE FROM leases WHERE connection_id = ?1", [&key])?,
    }
    Ok(next)
}

/// Live leases at `now_ms`, of one connection or all.
pub fn leases(
    conn: &Connection,
    id: Option<ConnectionId>,
    now_ms: i64,
) -> Result<Vec<(ConnectionId, Lease)>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT connection_id, holder, token, expires_at_ms FROM leases \
             WHERE expires_at_ms > ?1 AND (?2 IS NULL OR connection_id = ?2) ORDER BY connection_id",
        )
        .map_err(classify)?;
    let rows = stmt
        .query_map(params![now_ms, id.map(ConnectionId::to_bytes)], |r| {
            Ok((r.get::<_, [u8; 16]>(0)?, Lease { holder: r.get(1)?, token: r.get(2)?, expires_at_ms: r.get(3)? }))
        })
        .map_err(classify)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, lease) = row.map_err(classify)?;
        out.push((ConnectionId::from_bytes(id), lease));
    }
    Ok(out)
}

/// One step of pruning a connection: removes its history older than the
/// policy keeps, but at most `most` revisions, the oldest
/// ([`step_horizon`]). Change rows still visible at the oldest revision
/// left stay, so every revision left can still be read and restored.
pub fn prune(
    conn: &Connection,
    id: ConnectionId,
    policy: Retention,
    now_ms: i64,
    most: u64,
) -> Result<Pruned, StoreError> {
    let key = id.to_bytes();
    let Some(current) = header(conn, id)?.map(|h| h.revision) else {
        return Ok(Pruned { removed: 0, more: false });
    };
    let first_recent: Option<i64> = match policy.keep_for {
        None => None,
        Some(age) => conn
            .prepare_cached("SELECT min(revision) FROM revisions WHERE connection_id = ?1 AND created_at_ms >= ?2")
            .and_then(|mut s| s.query_row(params![key, now_ms - age.as_millis() as i64], |r| r.get(0)))
            .map_err(classify)?,
    };
    let keep_from = policy.oldest_kept(current, first_recent.map(|r| r as u64));
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT min(revision) FROM revisions WHERE connection_id = ?1")
        .and_then(|mut s| s.query_row(params![key], |r| r.get(0)))
        .map_err(classify)?;
    let Some(horizon) = step_horizon(keep_from, oldest.map(|r| r as u64), most) else {
        return Ok(Pruned { removed: 0, more: false });
    };
    let more = horizon < keep_from;
    let horizon = horizon as i64;
    let removed: i64 = conn
        .prepare_cached("SELECT count(*) FROM revisions WHERE connection_id = ?1 AND revision < ?2")
        .and_then(|mut s| s.query_row(params![key, horizon], |r| r.get(0)))
        .map_err(classify)?;
    // The views `changes` and `revisions` cannot be deleted from: the rows
    // go from `history` (migrations/sqlite/0004, 0007).
    exec(
        conn,
        // Older than the horizon and not a key's latest change up to it
        // (SQLite takes the bare rowid from the row of the max).
        "DELETE FROM history WHERE connection_id = ?1 AND revision < ?2 AND entry_key <> '' AND rowid NOT IN ( \
           SELECT rowid FROM (SELECT rowid, max(revision) FROM history \
             WHERE connection_id = ?1 AND revision <= ?2 AND entry_key <> '' GROUP BY entry_key))",
        params![key, horizon],
    )?;
    exec(
        conn,
        "DELETE FROM history WHERE connection_id = ?1 AND revision < ?2 AND entry_key <> '' AND blob IS NULL",
        params![key, horizon],
    )?;
    exec(
        conn,
        "DELETE FROM history WHERE connection_id = ?1 AND revision < ?2 AND entry_key = ''",
        params![key, horizon],
    )?;
    // A change row kept for its blob no longer stands for its revision.
    exec(
        conn,
        "UPDATE history SET created_at_ms = NULL, state_type = NULL, actor = NULL, reason = NULL \
         WHERE connection_id = ?1 AND revision < ?2 AND created_at_ms IS NOT NULL",
        params![key, horizon],
    )?;
    Ok(Pruned { removed: removed as u64, more })
}
