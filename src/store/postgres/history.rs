//! History pages, sync leases and retention pruning on PostgreSQL.

use deadpool_postgres::GenericClient;

use super::classify;
use super::queries::{decode_key, exec, header, header_now_and_lease};
use crate::state::history::{step_horizon, History, Pruned, Retention, RevisionInfo};
use crate::state::ops::{lease_transition, Lease, LeaseOp};
use crate::state::{ConnectionId, StateType};
use crate::store::StoreError;

/// A page of history, newest first, of revisions before `before`.
pub async fn history(
    client: &impl GenericClient,
    id: ConnectionId,
    limit: usize,
    before: Option<u64>,
) -> Result<History, StoreError> {
    let id_text = id.to_string();
    let Some(current) = header(client, id).await?.map(|h| h.revision) else {
        return Ok(History::default());
    };
    let oldest: Option<i64> = client
        .query_one("SELECT min(revision) FROM revisions WHERE connection_id = $1", &[&id_text])
        .await
        .map_err(classify)?
        .get(0);
    let before = before.unwrap_or(u64::MAX).min(i64::MAX as u64) as i64;
    let mut revisions: Vec<RevisionInfo> = client
        .query(
            "SELECT revision, created_at_ms, state_type, actor, reason FROM revisions \
             WHERE connection_id = $1 AND revision < $2 ORDER BY revision DESC LIMIT $3",
            &[&id_text, &before, &(limit as i64)],
        )
        .await
        .map_err(classify)?
        .iter()
        .map(|r| RevisionInfo {
            revision: r.get::<_, i64>(0) as u64,
            created_at_ms: r.get(1),
            state_type: r.get::<_, Option<String>>(2).as_deref().and_then(StateType::parse),
            actor: r.get(3),
            reason: r.get(4),
            changes: Vec::new(),
        })
        .collect();
    if let (Some(newest), Some(last)) = (revisions.first(), revisions.last()) {
        let (high, low) = (newest.revision as i64, last.revision as i64);
        let rows = client
            .query(
                "SELECT revision, entry_key, octet_length(blob)::bigint FROM changes \
                 WHERE connection_id = $1 AND revision BETWEEN $2 AND $3 ORDER BY revision, entry_key COLLATE \"C\"",
                &[&id_text, &low, &high],
            )
            .await
            .map_err(classify)?;
        for row in &rows {
            let revision = row.get::<_, i64>(0) as u64;
            if let Some(info) = revisions.iter_mut().find(|info| info.revision == revision) {
                let size = row.get::<_, Option<i64>>(2).map(|s| s as u64);
                info.changes.push((decode_key(row.get(1), id)?, size));
            }
        }
    }
    Ok(History { revision: current, oldest: oldest.map(|o| o as u64), revisions })
}

/// Applies a lease request in the caller's transaction (which holds the
/// connection's advisory lock), on the database's clock.
pub async fn lease(
    tx: &deadpool_postgres::Transaction<'_>,
    id: ConnectionId,
    op: &LeaseOp,
    token: String,
) -> Result<Option<Lease>, StoreError> {
    let id_text = id.to_string();
    let (_, now_ms, current) = header_now_and_lease(tx, id).await?;
    let next = lease_transition(op, current.as_ref(), now_ms, || token)?;
    match &next {
        Some(lease) => {
            exec(
                tx,
                "INSERT INTO leases (connection_id, holder, token, expires_at_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (connection_id) DO UPDATE SET holder = $2, token = $3, expires_at_ms = $4",
                &[&id_text, &lease.holder, &lease.token, &lease.expires_at_ms],
            )
            .await?
        }
        None => exec(tx, "DELETE FROM leases WHERE connection_id = $1", &[&id_text]).await?,
    }
    Ok(next)
}

/// Live leases, of one connection or all.
pub async fn leases(
    client: &impl GenericClient,
    id: Option<ConnectionId>,
) -> Result<Vec<(ConnectionId, Lease)>, StoreError> {
    let rows = client
        .query(
            "SELECT connection_id, holder, token, expires_at_ms FROM leases \
             WHERE expires_at_ms > (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
               AND ($1::text IS NULL OR connection_id = $1) ORDER BY connection_id COLLATE \"C\"",
            &[&id.map(|i| i.to_string())],
        )
        .await
        .map_err(classify)?;
    rows.iter()
        .map(|r| {
            let text: String = r.get(0);
            let id = ConnectionId::parse(&text)
                .ok_or_else(|| StoreError::Internal(format!("stored connection id {text:?}")))?;
            Ok((id, Lease { holder: r.get(1), token: r.get(2), expires_at_ms: r.get(3) }))
        })
        .collect()
}

/// What decides where pruning a connection `c` stops, after the columns
/// before it: its current revision, its first revision recent enough to
/// keep by age (`$2`, the policy's age in milliseconds, -1 for none: then
/// NULL and unused), and its oldest recorded revision.
const HORIZON_COLUMNS: &str = "c.revision, \
   (SELECT min(revision) FROM revisions r WHERE r.connection_id = c.connection_id AND $2::int8 >= 0 \
      AND r.created_at_ms >= (extract(epoch FROM clock_timestamp()) * 1000)::bigint - $2), \
   (SELECT min(revision) FROM revisions r WHERE r.connection_id = c.connection_id)";

/// The policy's age limit as `$2` of [`HORIZON_COLUMNS`].
fn age_ms(policy: Retention) -> i64 {
    policy.keep_for.map_or(-1, |age| age.as_millis() as i64)
}

/// [`step_horizon`] and the revision the policy keeps from, from the
/// [`HORIZON_COLUMNS`] of `row` starting at column `at`.
fn horizon_from(row: &tokio_postgres::Row, at: usize, policy: Retention, most: u64) -> Option<(u64, u64)> {
    let current: i64 = row.get(at);
    let first_recent: Option<i64> = row.get(at + 1);
    let oldest: Option<i64> = row.get(at + 2);
    let keep_from = policy.oldest_kept(current as u64, first_recent.map(|r| r as u64));
    step_horizon(keep_from, oldest.map(|r| r as u64), most).map(|horizon| (horizon, keep_from))
}

/// Where one step of pruning a connection would stop ([`step_horizon`]),
/// and the revision the policy keeps from; `None` when nothing is to be
/// removed. One round trip. The pruning pass asks [`due`] first, for a
/// page of connections at once, so that connections under their limits
/// (the common case) are passed over without a transaction.
async fn horizon(
    client: &impl GenericClient,
    id: ConnectionId,
    policy: Retention,
    most: u64,
) -> Result<Option<(u64, u64)>, StoreError> {
    let row = client
        .query_opt(
            &format!("SELECT {HORIZON_COLUMNS} FROM connections c WHERE c.connection_id = $1"),
            &[&id.to_string(), &age_ms(policy)],
        )
        .await
        .map_err(classify)?;
    Ok(row.and_then(|row| horizon_from(&row, 0, policy, most)))
}

/// Those of `ids` with history to remove ([`horizon`]), in one round trip
/// for all of them.
pub async fn due(
    client: &impl GenericClient,
    ids: &[ConnectionId],
    policy: Retention,
    most: u64,
) -> Result<Vec<ConnectionId>, StoreError> {
    let texts: Vec<String> = ids.iter().map(ConnectionId::to_string).collect();
    let rows = client
        .query(
            &format!(
                "SELECT c.connection_id, {HORIZON_COLUMNS} FROM connections c \
                 WHERE c.connection_id = ANY($1::text[])"
            ),
            &[&texts, &age_ms(policy)],
        )
        .await
        .map_err(classify)?;
    let mut due = Vec::new();
    for row in rows.iter().filter(|row| horizon_from(row, 1, policy, most).is_some()) {
        let text: String = row.get(0);
        due.push(
            ConnectionId::parse(&text).ok_or_else(|| StoreError::Internal(format!("stored connection id {text:?}")))?,
        );
    }
    // Ascending, as the pass lists them.
    due.sort_unstable();
    Ok(due)
}

/// One step of pruning a connection, in the caller's transaction: removes
/// its history older than the policy keeps, but at most `most` revisions,
/// the oldest ([`step_horizon`]).
pub async fn prune(
    tx: &deadpool_postgres::Transaction<'_>,
    id: ConnectionId,
    policy: Retention,
    most: u64,
) -> Result<Pruned, StoreError> {
    let id_text = id.to_string();
    let Some((horizon, keep_from)) = horizon(tx, id, policy, most).await? else {
        return Ok(Pruned { removed: 0, more: false });
    };
    let more = horizon < keep_from;
    let horizon = horizon as i64;
    let removed: i64 = tx
        .query_one("SELECT count(*) FROM revisions WHERE connection_id = $1 AND revision < $2", &[&id_text, &horizon])
        .await
        .map_err(classify)?
        .get(0);
    exec(
        tx,
        // Every change older than its key's latest at or before the
        // horizon: that one is still visible there.
        "DELETE FROM changes c USING ( \
           SELECT entry_key, max(revision) AS latest FROM changes \
           WHERE connection_id = $1 AND revision <= $2 GROUP BY entry_key) m \
         WHERE c.connection_id = $1 AND c.entry_key = m.entry_key AND c.revision < m.latest",
        &[&id_text, &horizon],
    )
    .await?;
    exec(tx, "DELETE FROM changes WHERE connection_id = $1 AND revision < $2 AND blob IS NULL", &[&id_text, &horizon])
        .await?;
    // The revisions' own rows, and the metadata of the change rows kept
    // because they hold a current blob (migrations/postgres/0004).
    exec(
        tx,
        "DELETE FROM history WHERE connection_id = $1 AND revision < $2 AND entry_key = ''",
        &[&id_text, &horizon],
    )
    .await?;
    exec(
        tx,
        "UPDATE history SET created_at_ms = NULL, state_type = NULL, actor = NULL, reason = NULL \
         WHERE connection_id = $1 AND revision < $2 AND created_at_ms IS NOT NULL",
        &[&id_text, &horizon],
    )
    .await?;
    Ok(Pruned { removed: removed as u64, more })
}
