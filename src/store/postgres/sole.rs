//! The sole-node lease: a node alone on the database answers reads from
//! its cache without asking the database first.
//!
//! Every read of a cached state asks the database for the connection's row
//! first (`heads`), because another node may have written it. When no
//! other node runs, that question is wasted, and it was most of what a
//! read cost: bench/'s PostgreSQL `get` ran at ~0.4x the HTTP floor with
//! it. A node that finds itself alone takes a lease in the database
//! (`highwater_sole`, migrations/postgres/0005) and, while it holds it,
//! treats its cache as the current state, as the SQLite store does.
//!
//! - **Nothing else writes while the lease is live.** Every write
//!   transaction calls `highwater_lock`, which waits while a live lease
//!   names another node (or none, for a session that is not a node).
//! - **A lease never starts while another node's write runs.** Writes hold
//!   the advisory lock `(CLASS, WRITES)` shared; taking the lease takes it
//!   exclusively, so it waits for them, and what they wrote is in the
//!   database before the holder empties its cache and starts reading.
//! - **The holder stops trusting before the lease ends.** It trusts its
//!   cache until [`MARGIN`] before the lease ends, counted from when it
//!   sent the renewal (the lease is counted by the database's clock from
//!   when the database ran it, which is later), and renews only a lease
//!   that has not lapsed, so a lapsed one is taken again with an emptied
//!   cache. A holder whose session is cut, or which is frozen, therefore
//!   stops answering from memory before another node can write.
//! - **A renewal counts only if it is answered in time.** A writer judges
//!   the lease by what is committed, so a renewal that ran before the
//!   lease ended but committed after it (a slow flush) may have let a
//!   write in. A holder whose trust lapsed before the renewal's answer
//!   came (the lease may have ended) gives the lease up instead, and takes
//!   it again with an emptied cache, after the writes in flight.
//! - **A node that joins is seen.** Each node holds `(CLASS, MEMBERS)`
//!   shared on a session of its own; the holder holds it exclusively, so a
//!   joining node waits for it, and the holder, seeing a waiter when it
//!   renews, gives the lease up. Until then the joining node's reads ask
//!   the database as always, and its writes wait in `highwater_lock`.
//! - **So is any other writer.** A statement that writes the state's tables
//!   outside `highwater_lock` (a node of an older version during an
//!   upgrade, psql) fires a trigger that makes its session join the same
//!   way, then waits.
//!
//! A node that stops without giving the lease up (killed, or its session
//! cut) leaves it to run out: other nodes' writes wait up to [`LEASE`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_postgres::{Client, Config, NoTls};

use super::classify;
use crate::store::cache::StateCache;
use crate::store::StoreError;

/// The advisory-lock class of the two keys (two-int keys: a space apart
/// from the connections' one-bigint keys). "HW" in its high bytes.
const CLASS: i32 = 0x4857_0000;
/// Held shared by every write transaction, exclusively while taking the
/// lease. (The value `highwater_lock` takes.)
const WRITES: i32 = 1;
/// Held shared by every node's lease session while it runs, exclusively by
/// the holder.
const MEMBERS: i32 = 2;

/// How long a lease lasts unless renewed.
const LEASE: Duration = Duration::from_secs(2);
/// How often the holder renews it, and how often a node alone tries to
/// take it.
const RENEW_EVERY: Duration = Duration::from_millis(500);
/// How long before the lease ends the holder stops trusting it: room for
/// the two clocks running at slightly different rates.
const MARGIN: Duration = Duration::from_millis(200);
/// The pause before the lease session connects again after it failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Takes the lease when this node is the only one on the database.
const ACQUIRE: &str = "UPDATE highwater_sole \
     SET node = $1, lease_until = clock_timestamp() + $2 * interval '1 millisecond' \
     WHERE node = $1 OR lease_until <= clock_timestamp() RETURNING lease_until";
/// Renews a lease that has not lapsed, unless another node waits to join
/// (the members' key is `(CLASS, MEMBERS)`: classid, objid, objsubid 2).
/// Returns the nodes waiting and whether the lease was renewed.
const RENEW: &str = "WITH waiting AS ( \
       SELECT count(*) AS n FROM pg_locks \
       WHERE locktype = 'advisory' AND NOT granted AND classid = 1213661184 AND objid = 2 AND objsubid = 2 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())), \
     renewed AS ( \
       UPDATE highwater_sole SET lease_until = clock_timestamp() + $2 * interval '1 millisecond' \
       WHERE node = $1 AND lease_until > clock_timestamp() AND (SELECT n FROM waiting) = 0 \
       RETURNING 1) \
     SELECT (SELECT n FROM waiting), EXISTS (SELECT 1 FROM renewed)";
/// Ends the lease now, for the node that joins.
const RELEASE: &str =
    "UPDATE highwater_sole SET lease_until = clock_timestamp() WHERE node = $1 AND lease_until > clock_timestamp()";

/// Whether this node holds the lease; the task keeping it gives it up and
/// stops when this is dropped, or when [`Sole::close`] is awaited.
pub struct Sole {
    shared: Arc<Held>,
    /// What stops the task, and the task; taken by [`Sole::close`].
    task: std::sync::Mutex<Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

/// Until when the cache may be trusted: nanoseconds after `start`, 0 for
/// not at all.
struct Held {
    start: Instant,
    until: AtomicU64,
}

impl Held {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn holds(&self) -> bool {
        let until = self.until.load(Ordering::SeqCst);
        until != 0 && self.now() < until
    }

    /// Trusts the cache until `MARGIN` before a lease of `LEASE` counted
    /// from `sent`, the instant before the request that took or renewed it.
    fn trust_from(&self, sent: u64) {
        let until = sent + (LEASE - MARGIN).as_nanos() as u64;
        self.until.store(until.max(1), Ordering::SeqCst);
    }

    fn lapse(&self) {
        self.until.store(0, Ordering::SeqCst);
    }
}

/// Stops answering from memory: the node no longer trusts its cache, and
/// the cache checks every use again ([`StateCache::distrust`]).
fn stop_trusting(held: &Held, cache: &StateCache) {
    held.lapse();
    cache.distrust();
}

impl Sole {
    /// Starts the lease session of node `node` (the name its writes give
    /// `highwater_lock`). With `take`, the node takes the lease whenever it
    /// is alone; without, it only joins, so that a holder gives it up.
    pub fn start(config: Config, node: String, cache: Arc<StateCache>, take: bool) -> Self {
        let shared = Arc::new(Held { start: Instant::now(), until: AtomicU64::new(0) });
        let (stop, mut stopped) = oneshot::channel();
        let held = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Err(error) = session(&config, &node, &cache, &held, take, &mut stopped).await else {
                    return;
                };
                stop_trusting(&held, &cache);
                tracing::warn!(%error, "the sole-node lease session failed; reads ask the database until it is back");
                tokio::select! {
                    () = tokio::time::sleep(RECONNECT_AFTER) => {}
                    _ = &mut stopped => return,
                }
            }
        });
        Self { shared, task: std::sync::Mutex::new(Some((stop, task))) }
    }

    /// Gives the lease up, so that the next node need not wait for it to
    /// run out, and stops the task (waiting at most a second for both).
    pub async fn close(&self) {
        self.shared.lapse();
        let taken = self.task.lock().ok().and_then(|mut task| task.take());
        if let Some((stop, task)) = taken {
            drop(stop);
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
    }

    /// Whether the cache holds the current state of every connection: this
    /// node holds a live lease.
    pub fn holds(&self) -> bool {
        self.shared.holds()
    }
}

/// Joins, then holds the lease whenever this node is alone, until an error
/// or until `stop` ends (then gives the lease up).
async fn session(
    config: &Config,
    node: &str,
    cache: &StateCache,
    held: &Held,
    take: bool,
    stop: &mut oneshot::Receiver<()>,
) -> Result<(), StoreError> {
    let (mut client, connection) = config.connect(NoTls).await.map_err(classify)?;
    tokio::spawn(async move {
        // Ends with an error when the session is cut, which the next
        // statement reports.
        let _ = connection.await;
    });
    // A lease the database forgot in a crash could let another node write
    // while this one still trusts it: its changes are always flushed.
    client.batch_execute("SET synchronous_commit = on").await.map_err(classify)?;
    // Waits while a holder has the key exclusively; it sees the wait.
    tokio::select! {
        joined = client.execute("SELECT pg_advisory_lock_shared($1, $2)", &[&CLASS, &MEMBERS]) => {
            joined.map_err(classify)?;
        }
        _ = &mut *stop => return Ok(()),
    }
    tracing::debug!("joined the nodes on this database");
    // The first tick is at once: a node alone takes the lease as it starts.
    let mut ticks = tokio::time::interval(RENEW_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut holding = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut *stop => {
                if holding {
                    stop_trusting(held, cache);
                    let released = tokio::time::timeout(RENEW_EVERY, client.execute(RELEASE, &[&node])).await;
                    if released.is_ok_and(|released| released.is_ok()) {
                        tracing::info!("gave up the sole-node lease on the way out");
                    }
                }
                return Ok(());
            }
        }
        let step = async {
            if holding {
                renew(&client, node, cache, held).await
            } else if take {
                acquire(&mut client, node, cache, held).await
            } else {
                Ok(false)
            }
        };
        // A silent server must not keep this session waiting: the lease
        // lapses meanwhile anyway.
        holding = tokio::time::timeout(LEASE, step)
            .await
            .map_err(|_| StoreError::Unavailable(format!("PostgreSQL did not answer within {LEASE:?}")))??;
    }
}

/// Takes the lease if no other node holds the members' key and no other
/// lease is live; then empties the cache and trusts it.
async fn acquire(client: &mut Client, node: &str, cache: &StateCache, held: &Held) -> Result<bool, StoreError> {
    let alone: bool =
        client.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&CLASS, &MEMBERS]).await.map_err(classify)?.get(0);
    if !alone {
        return Ok(false);
    }
    let sent = held.now();
    let tx = client.transaction().await.map_err(classify)?;
    // Waits for every write in flight; later ones wait for this.
    tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&CLASS, &WRITES]).await.map_err(classify)?;
    let taken = tx.query_opt(ACQUIRE, &[&node, &lease_ms()]).await.map_err(classify)?.is_some();
    tx.commit().await.map_err(classify)?;
    if !taken {
        // The lease of a node that stopped without giving it up: wait for
        // it to run out, and let others join meanwhile.
        client.execute("SELECT pg_advisory_unlock($1, $2)", &[&CLASS, &MEMBERS]).await.map_err(classify)?;
        tracing::debug!("another node's sole-node lease is still live");
        return Ok(false);
    }
    // What the cache holds may predate writes of other nodes, and so may
    // what reads begun before now are about to keep.
    cache.trust();
    held.trust_from(sent);
    tracing::info!(
        "this node is the only one on the database: it holds the sole-node lease and answers reads from memory"
    );
    Ok(true)
}

/// Renews the lease; gives it up when another node waits to join, when the
/// lease has lapsed, or when the renewal was answered only after this node
/// stopped trusting its cache. Returns whether it is still held.
async fn renew(client: &Client, node: &str, cache: &StateCache, held: &Held) -> Result<bool, StoreError> {
    let sent = held.now();
    let row = client.query_one(RENEW, &[&node, &lease_ms()]).await.map_err(classify)?;
    let (waiting, renewed): (i64, bool) = (row.get(0), row.get(1));
    // Answered while trusted, the renewal committed before the lease it
    // extends ended: no other writer got in between.
    let in_time = held.holds();
    if renewed && in_time {
        held.trust_from(sent);
        return Ok(true);
    }
    // First stop trusting the cache, then let the others write.
    stop_trusting(held, cache);
    client.execute(RELEASE, &[&node]).await.map_err(classify)?;
    client.execute("SELECT pg_advisory_unlock($1, $2)", &[&CLASS, &MEMBERS]).await.map_err(classify)?;
    if waiting > 0 {
        tracing::info!("another node joined: gave up the sole-node lease; reads ask the database again");
    } else if renewed {
        tracing::warn!(
            "the sole-node lease's renewal was answered after this node stopped trusting it: gave it up, \
             to take it again with an emptied cache"
        );
    } else {
        tracing::warn!(
            "the sole-node lease lapsed before it was renewed; reads ask the database until it is taken again"
        );
    }
    Ok(false)
}

fn lease_ms() -> f64 {
    LEASE.as_secs_f64() * 1000.0
}
