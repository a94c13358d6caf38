//! Writes on PostgreSQL, committed in batches: a few tasks each take every
//! write waiting (at most one per connection), apply them all in one
//! transaction with one multi-row statement per table, commit once, and
//! only then answer each of them.
//!
//! One transaction of N writes costs the database a fixed number of
//! statements and one commit instead of N of each, which is what the
//! database's CPU and WAL flushes were spent on (bench/: one write per
//! transaction made about 2.2k writes/s against pgbench's 7.7k upserts).
//! Each write is still checked on its own: a refused write is answered
//! with its refusal and the others go on; a write is answered only after the
//! commit that made it durable.
//!
//! Across nodes, each connection is serialised by its advisory lock, which
//! a batch takes for all its connections in one statement, in ascending key
//! order, so two batches cannot deadlock.
//!
//! A batch whose connections the cache holds goes to the server in one
//! round trip, as one statement checked there against what the cache
//! assumed; any other, or one the check refuses, in two, reading the
//! connections first ([`apply_batch`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_postgres::types::ToSql;

use super::keyed_lock::KeyedGuard;
use super::queries::{current_keys, decode_key, entries, header_now_and_lease_from, in_order, read_state, state_at};
use super::{bounded, classify, lock_key, pool_error, Guarded};
use crate::state::ops::{check_guard, plan, Context, Needs, Operation, Plan, WriteRequest};
use crate::state::{advance, changes, Blob, Change, ConnectionId, Effect, EntryKey, StoredState};
use crate::store::cache::{Cached, Header, StateCache, StoredEntries, Update, Version};
use crate::store::{Applied, Lease, StoreError};

/// Most writes one transaction carries.
const MAX_BATCH: usize = 64;
/// Writes that may wait for a batch before senders are made to wait.
const QUEUE_DEPTH: usize = 1024;
/// The largest cached state in whose entries a batch looks up the ones a
/// write touches, so that it may go in one round trip (on SQLite, whose
/// index is an in-process call, the limit is 256). Scanning a
/// 10,000-stream state for one stream takes ~70 us (benches/wire.rs,
/// `cache_stored`); reading the entries under the locks instead takes a
/// second round trip, which made `create_or_update` of one stream of a
/// 10,000-stream connection 540 / 578 writes/s against 641 / 722 scanned
/// (32 clients, alternated 5 s runs on the Intel Xeon host).
const SCANNED_ENTRIES: usize = 100_000;

// The statements take a row per connection (or per entry) as parallel
// arrays to `unnest`. Lookups go through LATERAL subqueries with LIMIT 1,
// which the planner cannot flatten into a join: a generic plan, which
// assumes ten array elements, would otherwise hash-join them against a
// sequential scan of the table (perf showed hashing and visibility checks
// of every `entries` row taking most of the database's time). A LIMIT 1
// that is not on the primary key's order is ordered by it as well: with
// stale statistics the planner expects many matches and would scan the
// table until it met the first.

/// Opens a batch's transaction. Its statements take arrays, and under the
/// default `plan_cache_mode` PostgreSQL keeps some such statements on
/// custom plans, planned afresh at every execution, because a plan for
/// the arrays given looks cheaper than the generic one (a prepared
/// `= ANY($1)` over one-element arrays: 10 custom plans in 10 executions,
/// `pg_prepared_statements`). The statements are written to run well on
/// a generic plan (above), so the transaction asks for it. Measured on
/// the Intel Xeon host, alternated 8-10 s runs at 32 clients, on a fresh
/// database with one connection written by all of them (one write per
/// batch): 891 / 919 -> 1710 / 1531 writes/s, the database's CPU per write
/// 920 / 892 -> 421 / 483 us. Once the tables hold the rows of some
/// thousands of writes the default's plans are as cheap: the same load
/// after 15 s of bench/'s write load made 2471 / 2578 writes/s before and
/// 2299 / 2739 after, and bench/'s write load over 1000 connections (~12
/// writes per batch) was no different through the noise (0.89-1.04x, 6
/// pairs). `SET LOCAL`, not a setting of the session: it holds for these
/// statements only, and a pooler in transaction mode passes it through.
/// A batch applied in one statement ([`WRITE`]) needs no BEGIN: its
/// function asks for generic plans itself.
const BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";
/// Every connection's advisory lock, in the order given (ascending), after
/// any other node's sole-node lease has ended (migrations/postgres/0005).
/// `$2` names this node, so that its own lease does not hold it back.
const LOCK_ALL: &str = "SELECT highwater_lock($1::int8[], $2::text)";
/// Per connection: its row, the database clock in Unix milliseconds, its
/// lease row, and its id (column 8).
const HEADERS: &str = "SELECT c.state_type, c.revision, c.next_seq, c.epoch, \
     (extract(epoch FROM clock_timestamp()) * 1000)::bigint, l.holder, l.token, l.expires_at_ms, t.id \
     FROM unnest($1::text[]) AS t(id) \
     LEFT JOIN LATERAL (SELECT state_type, revision, next_seq, epoch FROM connections \
       WHERE connection_id = t.id LIMIT 1) c ON true \
     LEFT JOIN LATERAL (SELECT holder, token, expires_at_ms FROM leases \
       WHERE connection_id = t.id LIMIT 1) l ON true";
/// A batch's changes in one statement (migrations/postgres/0006, which
/// says what each of its statements does): after [`LOCK_ALL`], a check
/// that each connection is as the cache assumed (its revision, epoch and
/// next position, and either a live lease with the token given or, with no
/// token and leases respected, no live lease; it fails with [`STALE`]
/// otherwise, and nothing is written), the entries deleted and set, and
/// each connection's row and the change rows written. Returns each written
/// connection's type after the write. Sent alone it is a transaction of
/// its own, committed before it answers: one result for PostgreSQL to
/// flush instead of six.
const WRITE: &str = "SELECT written_id, written_type FROM highwater_write($1, $2, $3, $4, $5, $6, $7, $8, $9, \
     $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)";
/// The SQLSTATE `highwater_expect` fails with (migrations/postgres/0003).
const STALE: &str = "HW001";
/// The stored blob and position of (connection, key) pairs.
const STORED: &str = "SELECT t.c, t.k, ch.blob, e.seq \
     FROM unnest($1::text[], $2::text[]) AS t(c, k) \
     CROSS JOIN LATERAL (SELECT seq, revision FROM entries \
       WHERE connection_id = t.c AND entry_key = t.k LIMIT 1) e \
     CROSS JOIN LATERAL (SELECT blob FROM changes \
       WHERE connection_id = t.c AND revision = e.revision AND entry_key = t.k LIMIT 1) ch";
/// What one write produces: the caller's answer and what to cache.
pub type Outcome = Result<(Applied, Option<Update>), StoreError>;

/// A write waiting for a batch.
pub struct Job {
    id: ConnectionId,
    request: WriteRequest,
    reply: oneshot::Sender<Result<Applied, StoreError>>,
    /// The connection's in-process lock, shared with the caller: held until
    /// the batch is committed and cached even when the caller gives up
    /// ([`Batcher::apply`]).
    writer: Arc<KeyedGuard<ConnectionId>>,
}

/// Where writes wait, and the tasks that commit them.
pub struct Batcher {
    queue: mpsc::Sender<Job>,
}

/// The queue as the batching tasks share it: whoever holds the lock takes
/// the next batch. A job for a connection already in the batch being taken
/// is held back for the next one.
struct Waiting {
    jobs: mpsc::Receiver<Job>,
    held: Option<Job>,
}

/// Writes in batches being committed. A batch taken while another is in
/// flight waits for as many writes as that one carries, or for it to end:
/// taken at once, it would carry the one write that came first, and a
/// transaction of one write costs the database nearly what one of fifteen
/// does. bench/'s write load (2 tasks, 32 clients): half the batches held
/// a single write before; waiting for half as many made 1.23× the
/// writes/s (bench/compare, 3 alternated rounds), and as many 1.03× more
/// (5 rounds), 1.15× and 1.14× at 4 and 8 clients, 1.00× at 2.
struct InFlight(watch::Sender<usize>);

/// A batch's share of [`InFlight`], given back when dropped.
struct Flying<'a> {
    in_flight: &'a InFlight,
    writes: usize,
}

impl Drop for Flying<'_> {
    fn drop(&mut self) {
        self.in_flight.0.send_modify(|n| *n -= self.writes);
    }
}

/// What a batching task needs.
struct Committer {
    pool: Pool,
    cache: Arc<StateCache>,
    operation_timeout: Duration,
    waiting: Mutex<Waiting>,
    in_flight: InFlight,
    shared: Shared,
    /// This node's id in the sole-node lease (`sole`).
    node: String,
}

impl Batcher {
    /// Starts `tasks` batching tasks; they stop when the batcher is dropped
    /// and the queue is empty.
    pub fn start(pool: Pool, cache: Arc<StateCache>, operation_timeout: Duration, tasks: usize, node: String) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE_DEPTH);
        let committer = Arc::new(Committer {
            pool,
            cache,
            operation_timeout,
            waiting: Mutex::new(Waiting { jobs, held: None }),
            in_flight: InFlight(watch::Sender::new(0)),
            shared: Shared::default(),
            node,
        });
        for _ in 0..tasks.max(1) {
            let committer = committer.clone();
            tokio::spawn(async move { while committer.commit_next().await {} });
        }
        Self { queue }
    }

    /// Applies one write in the next batch and answers once it committed.
    /// `writer` is the connection's in-process lock, which the job holds
    /// too: a write whose caller gives up (its client went away) keeps the
    /// connection until its batch is committed and the cache has learnt of
    /// it, so the next write of the connection is planned on what that one
    /// left, and a batch meets at most one write per connection.
    ///
    /// Before, the lock went with the caller. When a client went away
    /// mid-write (reproduced with clients that give up after 10 ms; in
    /// bench/ the drops came as a wrk run started, after the previous run's
    /// end left requests in flight), the next write of the connection went
    /// in the other batch, on the head as it was before the abandoned one:
    /// the database refused it as stale, and the connection was taken for
    /// one written by another node ([`Shared`]), every later write of it
    /// reading the heads first: bench/'s `create_or_update` of one stream
    /// of a 10,000-stream connection on PostgreSQL fell from ~1200 to ~880
    /// writes/s and stayed there (in 3 of 5 by-hand runs, and in the last
    /// round of two bench/run runs).
    pub async fn apply(
        &self,
        id: ConnectionId,
        request: WriteRequest,
        writer: Arc<KeyedGuard<ConnectionId>>,
    ) -> Result<Applied, StoreError> {
        let stopped = || StoreError::Unavailable("the PostgreSQL writer has stopped".to_owned());
        let (reply, answer) = oneshot::channel();
        self.queue.send(Job { id, request, reply, writer }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Committer {
    /// Takes the next batch, commits it and answers it; false once the
    /// queue is closed and empty.
    async fn commit_next(&self) -> bool {
        let Some((jobs, _flying)) = self.next_batch().await else {
            return false;
        };
        // A caller that went away no longer waits: its write is not made.
        let jobs: Vec<Job> = jobs.into_iter().filter(|job| !job.reply.is_closed()).collect();
        if jobs.is_empty() {
            return true;
        }
        let writes: Vec<(ConnectionId, &WriteRequest)> = jobs.iter().map(|job| (job.id, &job.request)).collect();
        let started = std::time::Instant::now();
        let mark = self.cache.mark();
        let outcome = bounded(self.operation_timeout, async {
            let mut client = Guarded(Some(self.pool.get().await.map_err(pool_error)?), false);
            let outcome = apply_batch(client.object()?, &writes, &self.cache, &self.shared, &self.node).await;
            // Any failure may leave the session inside the transaction.
            client.1 = outcome.is_ok();
            outcome
        })
        .await;
        let path = outcome.as_ref().ok().map(|(_, path)| *path);
        tracing::debug!(writes = jobs.len(), elapsed_us = started.elapsed().as_micros() as u64, ?path, "write batch");
        match outcome.map(|(outcomes, _)| outcomes) {
            Ok(outcomes) => {
                // Committed: the cache learns of it, in one step, before
                // anyone is answered.
                let mut answers = Vec::with_capacity(jobs.len());
                let mut updates = Vec::with_capacity(jobs.len());
                let mut writers = Vec::with_capacity(jobs.len());
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    writers.push(job.writer);
                    answers.push((
                        job.reply,
                        outcome.map(|(applied, update)| {
                            updates.extend(update.map(|update| (job.id, update)));
                            applied
                        }),
                    ));
                }
                self.cache.committed_since(mark, updates);
                // Only now may a connection's next write be planned. A
                // caller still waiting lets go of its share after its answer.
                drop(writers);
                for (reply, answer) in answers {
                    let _ = reply.send(answer);
                }
            }
            Err(error) => {
                // Every write of the batch is answered with the error. Only a
                // batch lost at its COMMIT may still have been committed: its
                // writers see the same error as for a single lost commit, and
                // the cache forgets their connections.
                tracing::warn!(%error, writes = jobs.len(), "a PostgreSQL write batch failed");
                self.cache.committed_since(mark, jobs.iter().map(|job| (job.id, Update::Forget)));
                for job in jobs {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
        true
    }

    async fn next_batch(&self) -> Option<(Vec<Job>, Flying<'_>)> {
        self.waiting.lock().await.next_batch(&self.in_flight).await
    }
}

impl Waiting {
    /// The job held back, or the next to arrive, and every job already
    /// waiting behind it up to the first for a connection the batch has;
    /// while other batches are in flight, also those that arrive until
    /// the batch holds as many writes as they do, or they end. The
    /// batch's writes are counted in flight until the guard returned with
    /// it is dropped.
    async fn next_batch<'f>(&mut self, in_flight: &'f InFlight) -> Option<(Vec<Job>, Flying<'f>)> {
        let first = match self.held.take() {
            Some(job) => job,
            None => self.jobs.recv().await?,
        };
        let mut batch = vec![first];
        let mut others = in_flight.0.subscribe();
        loop {
            while batch.len() < MAX_BATCH && self.held.is_none() {
                let Ok(job) = self.jobs.try_recv() else { break };
                Self::add(&mut batch, &mut self.held, job);
            }
            let enough = batch.len() >= MAX_BATCH || batch.len() >= *others.borrow_and_update();
            if enough || self.held.is_some() {
                break;
            }
            tokio::select! {
                job = self.jobs.recv() => match job {
                    Some(job) => Self::add(&mut batch, &mut self.held, job),
                    None => break,
                },
                // The sender lives as long as the caller's borrow of it.
                _ = others.changed() => {}
            }
        }
        in_flight.0.send_modify(|n| *n += batch.len());
        let flying = Flying { in_flight, writes: batch.len() };
        Some((batch, flying))
    }

    /// Adds `job` to the batch, or holds it back for the next one when the
    /// batch already has its connection.
    fn add(batch: &mut Vec<Job>, held: &mut Option<Job>, job: Job) {
        if batch.iter().any(|queued| queued.id == job.id) {
            *held = Some(job);
        } else {
            batch.push(job);
        }
    }
}

/// The keys a write will look up, when they are known before the stored
/// type is: those of its plan against an empty connection, and the legacy
/// entry a typed write may replace.
fn likely_keys(operation: &Operation) -> Vec<EntryKey> {
    if operation.needs() != Needs::Nothing {
        return Vec::new();
    }
    let Ok(plan) = plan(operation, None, &Context::default()) else {
        return Vec::new();
    };
    plan.ops.into_iter().map(|op| op.key).chain([EntryKey::Legacy]).collect()
}

/// Keeps a refusal as the write's own answer; any other error fails the
/// batch (the transaction may be unusable).
fn own<T>(result: Result<T, StoreError>) -> Result<Result<T, StoreError>, StoreError> {
    match result {
        Err(refused @ StoreError::Refused(_)) => Ok(Err(refused)),
        Err(error) => Err(error),
        Ok(value) => Ok(Ok(value)),
    }
}

/// A write checked and planned against its connection's head.
struct Checked<'r> {
    before: Header,
    request: &'r WriteRequest,
    plan: Plan,
}

/// A changing write: its changes, numbered.
struct Written<'p> {
    changed: Vec<Change<'p>>,
    before: Header,
    revision: i64,
    next_seq: i64,
    effects: Vec<Effect>,
}

/// What is known of one write's stored entries: (blob, position) by
/// encoded key, for the keys in `covered` (a covered key not in `stored`
/// has no entry).
#[derive(Default)]
struct Known {
    covered: HashSet<String>,
    stored: StoredEntries,
}

/// Applies the writes, which are to distinct connections, in one
/// transaction on `client`, which must not be in one, and commits it.
/// Returns each write's outcome: a refusal refuses that write alone. An
/// `Err` fails the whole batch: nothing was committed unless the batch was
/// lost at its COMMIT, and the client's session is in an unknown state.
///
/// When the cache holds every connection, and none is known to be
/// written through other nodes too, the batch is first tried in one round
/// trip ([`apply_assumed`]); otherwise, or when the database turns out to
/// hold something else, in two ([`apply_locked`]).
pub async fn apply_batch(
    client: &impl GenericClient,
    writes: &[(ConnectionId, &WriteRequest)],
    cache: &StateCache,
    shared: &Shared,
    node: &str,
) -> Result<(Vec<Outcome>, Path), StoreError> {
    let ids: Vec<String> = writes.iter().map(|(id, _)| id.to_string()).collect();
    let (assumed, path) = match apply_assumed(client, writes, &ids, cache, shared, node).await? {
        Assumed::Applied(outcomes) => return Ok((outcomes, Path::Assumed)),
        Assumed::Stale(assumed) => (Some(assumed), Path::Stale),
        Assumed::Skipped => (None, Path::Locked),
    };
    // What the cache holds of the shared connections, to learn whether
    // the database still holds something else. The connections' locks are
    // held: nothing on this node changes them meanwhile.
    let held: Vec<Option<Version>> = match &assumed {
        Some(_) => Vec::new(),
        None => writes
            .iter()
            .map(|(id, _)| match shared.holds(*id) {
                true => cache.stored(*id, &[], usize::MAX).map(|(header, _)| header.version()),
                false => None,
            })
            .collect(),
    };
    let (outcomes, read) = apply_locked(client, writes, &ids, cache, node).await?;
    match assumed {
        Some(assumed) => shared
            .learn(writes.iter().zip(assumed.iter().zip(&read)).filter(|(_, (a, r))| a != r).map(|((id, _), _)| *id)),
        None => {
            for (((id, _), held), read) in writes.iter().zip(&held).zip(&read) {
                if let Some(held) = held {
                    shared.saw(*id, held == read);
                }
            }
        }
    }
    Ok((outcomes, path))
}

/// The connections this node found written by another node since it last
/// wrote them: their cached heads are likely stale again next time, and a
/// failed assumption costs a round trip, so their writes read the heads
/// first. A connection is let go once [`AGREEING`] of its writes in a row
/// found the database holding what the cache did, i.e. no other node wrote
/// it in between (after traffic moved to this node, say, or another node
/// stopped). Forgotten all at once beyond [`SHARED_LIMIT`], then learnt
/// again.
///
/// Before, nothing let a connection go: a node that took over another's
/// connections read the heads first on every write of them until 10,000
/// were marked. Measured by hand (two nodes on one database; node B writes
/// 1000 connections, A writes them all, then B takes bench/'s write load,
/// four 6 s runs): B made 12.5k-13.0k writes/s with ~80% of its batches
/// reading first, and 14.7k-15.9k once it let the connections go (~95% in
/// one round trip; 14.2k-14.9k before A's writes).
#[derive(Default)]
pub struct Shared(std::sync::Mutex<HashMap<ConnectionId, u32>>);

/// Most connections [`Shared`] remembers.
const SHARED_LIMIT: usize = 10_000;

/// Writes in a row that must find a shared connection as this node left it
/// before it is let go. Keeping one costs each of its writes a round trip.
/// Letting one go while another node still writes it costs the batch that
/// meets the other node's write a round trip more than reading first would
/// have (the assumption fails, and the batch is applied again on the heads
/// read), and delays that batch's other writes with it. Sixteen is a
/// judgement between the two, not a measurement.
const AGREEING: u32 = 16;

impl Shared {
    fn holds(&self, id: ConnectionId) -> bool {
        self.0.lock().is_ok_and(|shared| shared.contains_key(&id))
    }

    fn learn(&self, ids: impl Iterator<Item = ConnectionId>) {
        if let Ok(mut shared) = self.0.lock() {
            for id in ids {
                if shared.len() >= SHARED_LIMIT {
                    shared.clear();
                }
                shared.insert(id, 0);
            }
        }
    }

    /// A write of a shared connection read its head first: `agreed` when
    /// the database held what the cache did.
    fn saw(&self, id: ConnectionId, agreed: bool) {
        if let Ok(mut shared) = self.0.lock() {
            let Some(agreeing) = shared.get_mut(&id) else { return };
            *agreeing = if agreed { *agreeing + 1 } else { 0 };
            if *agreeing >= AGREEING {
                shared.remove(&id);
            }
        }
    }
}

/// How a batch was applied, for the log.
#[derive(Debug, Clone, Copy)]
pub enum Path {
    /// In one round trip, on heads taken from the cache.
    Assumed,
    /// Reading the heads under the locks first.
    Locked,
    /// Reading the heads under the locks after the database showed the
    /// cached heads stale (another node wrote, or a lease changed).
    Stale,
}

/// What became of a batch tried in one round trip.
enum Assumed {
    Applied(Vec<Outcome>),
    /// A write cannot be applied from the cache alone, or its connection
    /// is [`Shared`]; nothing was sent.
    Skipped,
    /// The database did not hold what the cache did (the versions assumed,
    /// by write); nothing was written.
    Stale(Vec<Version>),
}

/// Applies the batch in one round trip, taking each connection's head,
/// lease and touched entries from the cache instead of reading them: the
/// changes go to the database in one statement ([`WRITE`]), which takes
/// the locks and writes nothing unless every head and lease is as assumed. The
/// batch's outcomes are then exactly those [`apply_locked`] would give.
///
/// The cache holds a connection's head as of this node's last commit or
/// read of it, so the assumption fails only when another node wrote the
/// connection, or a lease was taken, renewed or released, since. Only
/// writes that read nothing beyond their own entries (not restores or
/// resets) and whose new state, when returned, follows from the cache can
/// go this way.
async fn apply_assumed(
    client: &impl GenericClient,
    writes: &[(ConnectionId, &WriteRequest)],
    ids: &[String],
    cache: &StateCache,
    shared: &Shared,
    node: &str,
) -> Result<Assumed, StoreError> {
    let mut heads = Vec::with_capacity(writes.len());
    let mut known = Vec::with_capacity(writes.len());
    for (id, request) in writes {
        if request.operation.needs() != Needs::Nothing || shared.holds(*id) {
            return Ok(Assumed::Skipped);
        }
        let likely = likely_keys(&request.operation);
        let Some((before, stored)) = cache.stored(*id, &likely.iter().collect::<Vec<_>>(), SCANNED_ENTRIES) else {
            return Ok(Assumed::Skipped);
        };
        // The lease the guard needs, verified by WRITE: the one its token
        // names, else (when leases are respected) none.
        let lease = request.guard.lease_token.as_ref().map(|token| Lease {
            holder: String::new(),
            token: token.clone(),
            expires_at_ms: i64::MAX,
        });
        heads.push(Head { before, lease });
        known.push(Known { covered: likely.iter().map(EntryKey::encode).collect(), stored });
    }
    let expected = Expected::of(writes, ids, &heads, node);
    let assumed: Vec<Version> = heads.iter().map(|head| head.before.version()).collect();
    let mut checked = Vec::with_capacity(writes.len());
    for (((_, request), head), known) in writes.iter().zip(heads).zip(&known) {
        let one = check_guard(&request.guard, head.before.revision, head.lease.as_ref())
            .map_err(StoreError::from)
            .and_then(|()| planned(request, head.before, &Context::default()));
        if let Ok(check) = &one {
            if check.plan.ops.iter().any(|op| !known.covered.contains(&op.key.encode())) {
                return Ok(Assumed::Skipped);
            }
        }
        checked.push(one);
    }
    let (decided, states) = decide_all(writes, &checked, &known, cache);
    if reads_back(&checked, &states) {
        return Ok(Assumed::Skipped);
    }
    let statement = prepare(client, WRITE).await?;
    let Some(remaining) = rows(ids, &checked, &decided, &states).write(client, &statement, &expected).await? else {
        return Ok(Assumed::Stale(assumed));
    };
    Ok(Assumed::Applied(answer(client, cache, writes, &checked, decided, states, &remaining).await?))
}

/// Applies the batch in two round trips: read under the connections' locks
/// (the first), check and plan each write, decide what each changes, send
/// every change with the COMMIT (the second), then answer each write.
async fn apply_locked(
    client: &impl GenericClient,
    writes: &[(ConnectionId, &WriteRequest)],
    ids: &[String],
    cache: &StateCache,
    node: &str,
) -> Result<(Vec<Outcome>, Vec<Version>), StoreError> {
    let Locked { heads, mut known, position } = read_locked(client, writes, ids, cache, node).await?;
    let read = heads.iter().map(|head| head.before.version()).collect();
    let checked = check_and_plan(client, writes, ids, heads, &mut known, &position).await?;
    let (decided, states) = decide_all(writes, &checked, &known, cache);
    let rows = rows(ids, &checked, &decided, &states);
    // The locks are held and the heads read: nothing to check again.
    let nothing = Expected::nothing(node);
    // Prepared before the changes and the COMMIT are pipelined: a session
    // that has not prepared it yet would send COMMIT while waiting for the
    // statement, and the changes would follow it in a transaction of their
    // own, without the locks (two nodes then numbered one revision twice).
    let statement = prepare(client, WRITE).await?;
    let write = rows.write(client, &statement, &nothing);
    let commit = || async { client.batch_execute("COMMIT").await.map_err(classify) };
    // A new state read back is read inside the transaction, before COMMIT;
    // otherwise COMMIT goes in the same round trip as the changes.
    let reads_back = reads_back(&checked, &states);
    let remaining = if reads_back { write.await? } else { tokio::try_join!(biased; write, commit())?.0 };
    let outcomes = answer(client, cache, writes, &checked, decided, states, &remaining.unwrap_or_default()).await?;
    if reads_back {
        commit().await?;
    }
    Ok((outcomes, read))
}

type Decided<'p> = Result<Option<Written<'p>>, StoreError>;

/// What each checked write changes, and its states before and after when
/// it returns the state: the new state is computed from the state before
/// the write when that is cached, else read back inside the transaction
/// (COMMIT then waits for it; otherwise it goes with the changes).
fn decide_all<'p>(
    writes: &[(ConnectionId, &WriteRequest)],
    checked: &'p [Result<Checked<'_>, StoreError>],
    known: &[Known],
    cache: &StateCache,
) -> (Vec<Decided<'p>>, Vec<States>) {
    let decided: Vec<Decided<'p>> =
        writes.iter().zip(checked).zip(known).map(|(((id, _), check), known)| decide(*id, check, known)).collect();
    let states = writes
        .iter()
        .zip(checked)
        .zip(&decided)
        .map(|(((id, _), check), decision)| {
            let Ok(check) = check else { return States::default() };
            let base = if check.request.return_state { cache.get(*id, check.before.version()) } else { None };
            let next = match (decision, &base) {
                (Ok(Some(written)), Some(base)) => {
                    let revision = written.revision as u64;
                    Some(advance(&base.state, &base.positions, &written.effects, revision, check.plan.state_type))
                }
                _ => None,
            };
            States { base, next }
        })
        .collect();
    (decided, states)
}

/// Whether a write returns a state that must be read back.
fn reads_back(checked: &[Result<Checked<'_>, StoreError>], states: &[States]) -> bool {
    checked
        .iter()
        .zip(states)
        .any(|(check, states)| matches!(check, Ok(c) if c.request.return_state && states.base.is_none()))
}

/// A write's state before it, when it returns the state and that is
/// cached, and the state after it, computed from that.
#[derive(Default)]
struct States {
    base: Option<Cached>,
    next: Option<(StoredState, Vec<i64>)>,
}

/// A write's connection: its row (the default for a connection never
/// written) and its live lease.
struct Head {
    before: Header,
    lease: Option<Lease>,
}

/// What the first round trip establishes, by write.
struct Locked<'i> {
    heads: Vec<Head>,
    known: Vec<Known>,
    /// Each write's index, by connection id: where a row of [`STORED`] goes.
    position: HashMap<&'i str, usize>,
}

/// Every connection's advisory-lock key, ascending, as [`LOCK_ALL`] takes them.
fn lock_keys(writes: &[(ConnectionId, &WriteRequest)]) -> Vec<i64> {
    let mut keys: Vec<i64> = writes.iter().map(|(id, _)| lock_key(*id)).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Opens the transaction, takes every connection's lock and reads each
/// connection's head, with the entries its write will likely touch unless
/// the cache holds them at the version the head shows.
async fn read_locked<'i>(
    client: &impl GenericClient,
    writes: &[(ConnectionId, &WriteRequest)],
    ids: &'i [String],
    cache: &StateCache,
    node: &str,
) -> Result<Locked<'i>, StoreError> {
    let position: HashMap<&str, usize> = ids.iter().enumerate().map(|(at, id)| (id.as_str(), at)).collect();
    let lock_keys = lock_keys(writes);
    // The entries a write will likely touch, from the cache when it holds
    // the connection (used if the head shows it is current), else read with
    // the head.
    let mut from_cache = Vec::with_capacity(writes.len());
    let mut queried: Vec<Vec<String>> = Vec::with_capacity(writes.len());
    for (id, request) in writes {
        let likely = likely_keys(&request.operation);
        let held = if likely.is_empty() {
            None
        } else {
            cache.stored(*id, &likely.iter().collect::<Vec<_>>(), SCANNED_ENTRIES)
        };
        let covered: Vec<String> = likely.iter().map(EntryKey::encode).collect();
        queried.push(if held.is_some() { Vec::new() } else { covered.clone() });
        from_cache
            .push(held.map(|(version, stored)| (version, Known { covered: covered.into_iter().collect(), stored })));
    }
    let (pair_ids, pair_keys) = pairs(ids, queried.iter().map(|keys| keys.iter()));
    let lock = prepare(client, LOCK_ALL).await?;
    let headers = prepare(client, HEADERS).await?;
    let stored_statement = prepare(client, STORED).await?;
    let lock_params: [&(dyn ToSql + Sync); 2] = [&lock_keys, &node];
    let id_params: [&(dyn ToSql + Sync); 1] = [&ids];
    let pair_params: [&(dyn ToSql + Sync); 2] = [&pair_ids, &pair_keys];
    let (_, _, header_rows, likely_rows) = tokio::try_join!(
        biased;
        client.batch_execute(BEGIN),
        client.execute(&lock, &lock_params),
        client.query(&headers, &id_params),
        async {
            if pair_ids.is_empty() { Ok(Vec::new()) } else { client.query(&stored_statement, &pair_params).await }
        },
    )
    .map_err(classify)?;
    let rows: HashMap<String, &tokio_postgres::Row> = header_rows.iter().map(|row| (row.get(8), row)).collect();
    let mut known: Vec<Known> =
        queried.into_iter().map(|keys| Known { covered: keys.into_iter().collect(), stored: HashMap::new() }).collect();
    add_stored(&mut known, &position, likely_rows);
    let mut heads = Vec::with_capacity(writes.len());
    for (((id, _), id_text), (held, known)) in writes.iter().zip(ids).zip(from_cache.into_iter().zip(&mut known)) {
        let row =
            rows.get(id_text).ok_or_else(|| StoreError::Internal(format!("no header row for connection {id}")))?;
        let (before, now_ms, lease) = header_now_and_lease_from(row, *id)?;
        let before = before.unwrap_or_default();
        if let Some((held_at, held)) = held {
            if held_at.version() == before.version() {
                *known = held;
            }
        }
        heads.push(Head { before, lease: lease.filter(|lease| lease.is_live(now_ms)) });
    }
    Ok(Locked { heads, known, position })
}

/// Checks each write against its head and plans it, reading what a plan
/// needs beyond what is known. A refusal is that write's result.
async fn check_and_plan<'r>(
    client: &impl GenericClient,
    writes: &[(ConnectionId, &'r WriteRequest)],
    ids: &[String],
    heads: Vec<Head>,
    known: &mut [Known],
    position: &HashMap<&str, usize>,
) -> Result<Vec<Result<Checked<'r>, StoreError>>, StoreError> {
    let mut checked = Vec::with_capacity(writes.len());
    let mut missing: Vec<(&str, String)> = Vec::new();
    for ((((id, request), id_text), head), known) in writes.iter().zip(ids).zip(heads).zip(known.iter()) {
        let one = match check_guard(&request.guard, head.before.revision, head.lease.as_ref()) {
            Err(refusal) => Err(refusal.into()),
            Ok(()) => own(context(client, *id, &request.operation).await)?
                .and_then(|context| planned(request, head.before, &context)),
        };
        if let Ok(check) = &one {
            missing.extend(
                check
                    .plan
                    .ops
                    .iter()
                    .map(|op| op.key.encode())
                    .filter(|key| !known.covered.contains(key))
                    .map(|key| (id_text.as_str(), key)),
            );
        }
        checked.push(one);
    }
    if !missing.is_empty() {
        let stored = prepare(client, STORED).await?;
        let (pair_ids, pair_keys): (Vec<&str>, Vec<&str>) = missing.iter().map(|(id, key)| (*id, key.as_str())).unzip();
        let rows = client.query(&stored, &[&pair_ids, &pair_keys]).await.map_err(classify)?;
        add_stored(known, position, rows);
    }
    Ok(checked)
}

/// Plans a write whose guard passed against its connection's head.
fn planned<'r>(request: &'r WriteRequest, before: Header, context: &Context) -> Result<Checked<'r>, StoreError> {
    let plan = plan(&request.operation, before.state_type, context)?;
    Ok(Checked { before, request, plan })
}

/// What a checked write changes, numbered: `None` when it changes nothing
/// (or was refused, which its check answers).
fn decide<'p>(
    id: ConnectionId,
    check: &'p Result<Checked<'_>, StoreError>,
    known: &Known,
) -> Result<Option<Written<'p>>, StoreError> {
    let Ok(check) = check else {
        return Ok(None);
    };
    let changed = changes(&check.plan.ops, &check.plan.pinned_seqs, &known.stored);
    if changed.is_empty() {
        return Ok(None);
    }
    lay_out(id, &check.before, changed)
}

/// The changes of every changing write, laid out in the rows of each
/// statement.
fn rows<'a>(
    ids: &'a [String],
    checked: &'a [Result<Checked<'_>, StoreError>],
    decided: &'a [Result<Option<Written<'_>>, StoreError>],
    states: &[States],
) -> Rows<'a> {
    let mut rows = Rows::default();
    for (((decision, check), id_text), states) in decided.iter().zip(checked).zip(ids).zip(states) {
        let (Ok(Some(written)), Ok(check)) = (decision, check) else { continue };
        for (change, (_, effect)) in written.changed.iter().zip(&written.effects) {
            let seq = effect.as_ref().map(|(_, seq)| *seq);
            rows.changes.push(id_text, written.revision, &change.key, change.blob.map(Blob::as_str), seq);
            match seq {
                None => rows.deleted.push((id_text, &change.key)),
                Some(seq) => rows.set.push(id_text, &change.key, written.revision, seq),
            }
        }
        let meta = &check.request.meta;
        rows.revisions.push(Revision {
            id: id_text,
            revision: written.revision,
            next_seq: written.next_seq,
            state_type: check.plan.state_type.map(|t| t.as_str()),
            actor: &meta.actor,
            reason: &meta.reason,
            remaining: states.next.as_ref().map(|(state, _)| !state.entries.is_empty()),
        });
    }
    rows
}

/// Each write's answer and what its commit does to the cache, once its
/// changes are sent. `remaining`: the written connections that still have
/// an entry. A write that changed nothing and returns the state reads it
/// through `cache`.
async fn answer(
    client: &impl GenericClient,
    cache: &StateCache,
    writes: &[(ConnectionId, &WriteRequest)],
    checked: &[Result<Checked<'_>, StoreError>],
    decided: Vec<Result<Option<Written<'_>>, StoreError>>,
    states: Vec<States>,
    remaining: &HashSet<String>,
) -> Result<Vec<Outcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(writes.len());
    for (((check, decision), States { base, next }), (id, _)) in checked.iter().zip(decided).zip(states).zip(writes) {
        let outcome = match (check, decision) {
            (Err(refused), _) => Err(refused.clone()),
            (Ok(_), Err(refused)) => Err(refused),
            (Ok(check), Ok(None)) => {
                let state = match (check.request.return_state, base) {
                    (false, _) => None,
                    (true, Some(base)) => Some(base.state),
                    (true, None) => Some(read_state(client, *id, cache).await?.state),
                };
                Ok((Applied { revision: check.before.revision, changed: false, state }, None))
            }
            (Ok(check), Ok(Some(written))) => {
                // The plan's type holds if an entry remains.
                let state_type = check.plan.state_type.filter(|_| remaining.contains(&id.to_string()));
                let after = Header {
                    state_type,
                    revision: written.revision as u64,
                    next_seq: written.next_seq,
                    epoch: written.before.epoch,
                };
                if check.request.return_state {
                    let next = match next {
                        Some((mut state, positions)) => {
                            state.state_type = state_type;
                            Cached { state: Arc::new(state), positions: Arc::new(positions) }
                        }
                        None => read_back(client, *id, &written.effects, after).await?,
                    };
                    Ok((
                        Applied { revision: after.revision, changed: true, state: Some(next.state.clone()) },
                        Some(Update::Put(after.version(), next)),
                    ))
                } else {
                    let update = Update::Defer {
                        from: written.before.version(),
                        to: after.version(),
                        effects: written.effects,
                        state_type,
                    };
                    Ok((Applied { revision: after.revision, changed: true, state: None }, Some(update)))
                }
            }
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// What an operation needs read before it can be planned.
async fn context(client: &impl GenericClient, id: ConnectionId, operation: &Operation) -> Result<Context, StoreError> {
    Ok(match operation.needs() {
        Needs::Nothing => Context::default(),
        Needs::CurrentKeys => Context { current_keys: current_keys(client, id).await?, target: None },
        Needs::Revision(at) => {
            Context { target: Some(state_at(client, id, at).await?), current_keys: current_keys(client, id).await? }
        }
    })
}

/// The state a write just made, read inside its transaction; when every
/// remaining entry was set by the write (a legacy write, say) it is known
/// without reading the blobs back.
async fn read_back(
    client: &impl GenericClient,
    id: ConnectionId,
    effects: &[Effect],
    after: Header,
) -> Result<Cached, StoreError> {
    let sets = effects.iter().filter(|(_, effect)| effect.is_some()).count() as i64;
    let id_text = id.to_string();
    let row = client
        .query_one("SELECT count(*) FROM entries WHERE connection_id = $1", &[&id_text])
        .await
        .map_err(classify)?;
    if row.get::<_, i64>(0) == sets {
        return Ok(cached(advance(&StoredState::default(), &[], effects, after.revision, after.state_type)));
    }
    Ok(in_order(entries(client, id).await?, after.state_type, after.revision))
}

/// Numbers a write's changes: the next revision, and positions for new
/// entries after the connection's last.
fn lay_out<'p>(id: ConnectionId, before: &Header, changed: Vec<Change<'p>>) -> Result<Option<Written<'p>>, StoreError> {
    let revision = (before.revision + 1) as i64;
    let mut next_seq = before.next_seq;
    let mut effects = Vec::with_capacity(changed.len());
    for change in &changed {
        let key = decode_key(&change.key, id)?;
        let effect = change.blob.map(|blob| {
            let seq = change.seq.unwrap_or_else(|| {
                next_seq += 1;
                next_seq - 1
            });
            (blob.clone(), seq)
        });
        effects.push((key, effect));
    }
    Ok(Some(Written { changed, before: *before, revision, next_seq, effects }))
}

fn cached((state, positions): (StoredState, Vec<i64>)) -> Cached {
    Cached { state: Arc::new(state), positions: Arc::new(positions) }
}

/// The (connection, key) pairs to look up, as two parallel arrays.
fn pairs<'a, K>(ids: &'a [String], keys: impl Iterator<Item = K>) -> (Vec<&'a str>, Vec<&'a str>)
where
    K: Iterator<Item = &'a String>,
{
    let mut pair_ids = Vec::new();
    let mut pair_keys = Vec::new();
    for (id, keys) in ids.iter().zip(keys) {
        for key in keys {
            pair_ids.push(id.as_str());
            pair_keys.push(key.as_str());
        }
    }
    (pair_ids, pair_keys)
}

/// Adds rows of [`STORED`] to what is known of each write.
fn add_stored(known: &mut [Known], position: &HashMap<&str, usize>, rows: Vec<tokio_postgres::Row>) {
    for row in rows {
        if let Some(at) = position.get(row.get::<_, &str>(0)) {
            known[*at].stored.insert(row.get(1), (Blob::from_stored(row.get(2)), row.get(3)));
        }
    }
}

async fn prepare(client: &impl GenericClient, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
    client.prepare_cached(sql).await.map_err(classify)
}

/// The rows every changing write of a batch adds to each statement, as the
/// parallel arrays the statements `unnest`.
#[derive(Default)]
struct Rows<'a> {
    changes: ChangeRows<'a>,
    deleted: Vec<(&'a str, &'a str)>,
    set: EntryRows<'a>,
    revisions: RevisionRows<'a>,
}

#[derive(Default)]
struct ChangeRows<'a> {
    ids: Vec<&'a str>,
    revisions: Vec<i64>,
    keys: Vec<&'a str>,
    blobs: Vec<Option<&'a str>>,
    seqs: Vec<Option<i64>>,
    /// Whether the row is its revision's first, which carries the
    /// revision's metadata.
    firsts: Vec<bool>,
}

impl<'a> ChangeRows<'a> {
    /// Adds a change; a write's changes come one after another.
    fn push(&mut self, id: &'a str, revision: i64, key: &'a str, blob: Option<&'a str>, seq: Option<i64>) {
        let previous = self.ids.last().copied().zip(self.revisions.last().copied());
        self.firsts.push(previous != Some((id, revision)));
        self.ids.push(id);
        self.revisions.push(revision);
        self.keys.push(key);
        self.blobs.push(blob);
        self.seqs.push(seq);
    }
}

#[derive(Default)]
struct EntryRows<'a> {
    ids: Vec<&'a str>,
    keys: Vec<&'a str>,
    revisions: Vec<i64>,
    seqs: Vec<i64>,
}

impl<'a> EntryRows<'a> {
    fn push(&mut self, id: &'a str, key: &'a str, revision: i64, seq: i64) {
        self.ids.push(id);
        self.keys.push(key);
        self.revisions.push(revision);
        self.seqs.push(seq);
    }
}

#[derive(Default)]
struct RevisionRows<'a> {
    ids: Vec<&'a str>,
    revisions: Vec<i64>,
    next_seqs: Vec<i64>,
    types: Vec<Option<&'static str>>,
    actors: Vec<&'a Option<String>>,
    reasons: Vec<&'a Option<String>>,
    remaining: Vec<Option<bool>>,
}

/// One changing write's revision, for [`RevisionRows`].
struct Revision<'a> {
    id: &'a str,
    revision: i64,
    next_seq: i64,
    /// The type the plan gives, kept only if an entry remains.
    state_type: Option<&'static str>,
    actor: &'a Option<String>,
    reason: &'a Option<String>,
    /// Whether an entry remains, when known without asking the database.
    remaining: Option<bool>,
}

impl<'a> RevisionRows<'a> {
    fn push(&mut self, revision: Revision<'a>) {
        self.ids.push(revision.id);
        self.revisions.push(revision.revision);
        self.next_seqs.push(revision.next_seq);
        self.types.push(revision.state_type);
        self.actors.push(revision.actor);
        self.reasons.push(revision.reason);
        self.remaining.push(revision.remaining);
    }
}

/// The locks and the checked rows of [`WRITE`] for a batch applied
/// without reading first.
struct Expected<'a> {
    lock_keys: Vec<i64>,
    node: &'a str,
    ids: &'a [String],
    revisions: Vec<i64>,
    epochs: Vec<i64>,
    next_seqs: Vec<i64>,
    tokens: Vec<Option<&'a str>>,
    respect: Vec<bool>,
}

impl<'a> Expected<'a> {
    /// No lock and no check, for a batch whose transaction holds the locks
    /// and read the heads.
    fn nothing(node: &'a str) -> Self {
        Self {
            lock_keys: Vec::new(),
            node,
            ids: &[],
            revisions: Vec::new(),
            epochs: Vec::new(),
            next_seqs: Vec::new(),
            tokens: Vec::new(),
            respect: Vec::new(),
        }
    }

    fn of(writes: &[(ConnectionId, &'a WriteRequest)], ids: &'a [String], heads: &[Head], node: &'a str) -> Self {
        let guards = writes.iter().map(|(_, request)| &request.guard);
        Self {
            lock_keys: lock_keys(writes),
            node,
            ids,
            revisions: heads.iter().map(|head| head.before.revision as i64).collect(),
            epochs: heads.iter().map(|head| head.before.epoch).collect(),
            next_seqs: heads.iter().map(|head| head.before.next_seq).collect(),
            tokens: guards.clone().map(|guard| guard.lease_token.as_deref()).collect(),
            respect: guards.map(|guard| guard.respect_lease).collect(),
        }
    }
}

impl Rows<'_> {
    /// Applies the batch with `write`, [`WRITE`] prepared on `client`,
    /// checked against `x`: in a transaction of its own when the client is
    /// not in one, else in that one. Returns the written connections that
    /// still have an entry, or `None` when the check failed (nothing was
    /// written; a transaction the client was in is then aborted). Sends the
    /// statement when first polled, so that what is pipelined after it
    /// follows it.
    async fn write(
        &self,
        client: &impl GenericClient,
        write: &tokio_postgres::Statement,
        x: &Expected<'_>,
    ) -> Result<Option<HashSet<String>>, StoreError> {
        let (deleted_ids, deleted_keys): (Vec<&str>, Vec<&str>) = self.deleted.iter().copied().unzip();
        let (c, e, r) = (&self.changes, &self.set, &self.revisions);
        // Grouped as highwater_write's parameters: the check, the deleted
        // entries, the set entries, the connections' rows, the change rows.
        #[rustfmt::skip]
        let params: [&(dyn ToSql + Sync); 27] = [
            &x.lock_keys, &x.node, &x.ids, &x.revisions, &x.epochs, &x.next_seqs, &x.tokens, &x.respect,
            &deleted_ids, &deleted_keys, &e.ids, &e.keys, &e.revisions, &e.seqs,
            &r.ids, &r.revisions, &r.next_seqs, &r.types, &r.actors, &r.reasons, &r.remaining,
            &c.ids, &c.revisions, &c.keys, &c.blobs, &c.seqs, &c.firsts,
        ];
        match client.query(write, &params).await {
            Ok(rows) => Ok(Some(
                rows.into_iter().filter(|row| row.get::<_, Option<&str>>(1).is_some()).map(|row| row.get(0)).collect(),
            )),
            Err(error) if error.code().is_some_and(|code| code.code() == STALE) => Ok(None),
            Err(error) => Err(classify(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ops::{Guard, Meta};
    use crate::state::StreamDescriptor;
    use crate::store::postgres::keyed_lock::KeyedLock;

    async fn job(id: ConnectionId) -> Job {
        let stream = StreamDescriptor { name: "s".to_owned(), namespace: None };
        let request = WriteRequest {
            operation: Operation::StreamDelete { stream },
            guard: Guard::default(),
            meta: Meta::default(),
            return_state: false,
        };
        // A lock of its own: these tests queue two writes of one connection.
        let writer = Arc::new(KeyedLock::default().lock(id).await);
        Job { id, request, reply: oneshot::channel().0, writer }
    }

    #[test]
    fn a_shared_connection_is_let_go_after_enough_writes_in_a_row_find_it_as_left() {
        let (id, other) = (ConnectionId::random(), ConnectionId::random());
        let shared = Shared::default();
        shared.learn([id, other].into_iter());
        for _ in 1..AGREEING {
            shared.saw(id, true);
        }
        // Another node wrote it once more: the count starts again.
        shared.saw(id, false);
        for _ in 1..AGREEING {
            shared.saw(id, true);
        }
        assert!(shared.holds(id));
        shared.saw(id, true);
        assert!(!shared.holds(id));
        assert!(shared.holds(other), "only the connection seen so often is let go");
        // Found written elsewhere again: shared again, from the start.
        shared.learn([id].into_iter());
        shared.saw(id, true);
        assert!(shared.holds(id));
    }

    #[tokio::test]
    async fn a_batch_stops_before_a_second_write_to_the_same_connection() {
        let (queue, jobs) = mpsc::channel(16);
        let mut waiting = Waiting { jobs, held: None };
        let in_flight = InFlight(watch::Sender::new(0));
        let (a, b, c) = (ConnectionId::random(), ConnectionId::random(), ConnectionId::random());
        for id in [a, b, a, c] {
            queue.send(job(id).await).await.unwrap();
        }
        let ids = |(batch, _): (Vec<Job>, Flying)| batch.into_iter().map(|job| job.id).collect::<Vec<_>>();
        assert_eq!(ids(waiting.next_batch(&in_flight).await.unwrap()), [a, b]);
        assert_eq!(ids(waiting.next_batch(&in_flight).await.unwrap()), [a, c]);
        drop(queue);
        assert!(waiting.next_batch(&in_flight).await.is_none());
    }

    #[tokio::test]
    async fn a_batch_taken_beside_others_waits_for_as_many_writes_or_their_end() {
        let (queue, jobs) = mpsc::channel(16);
        let mut waiting = Waiting { jobs, held: None };
        let in_flight = InFlight(watch::Sender::new(2));
        let short = Duration::from_millis(20);

        queue.send(job(ConnectionId::random()).await).await.unwrap();
        let (batch, flying) = {
            let mut next = std::pin::pin!(waiting.next_batch(&in_flight));
            assert!(tokio::time::timeout(short, &mut next).await.is_err(), "one write is fewer than two");
            queue.send(job(ConnectionId::random()).await).await.unwrap();
            next.await.unwrap()
        };
        assert_eq!(batch.len(), 2);
        assert_eq!(*in_flight.0.borrow(), 4, "the batch is counted in flight");
        drop(flying);
        assert_eq!(*in_flight.0.borrow(), 2, "and given back with its guard");

        queue.send(job(ConnectionId::random()).await).await.unwrap();
        let mut next = std::pin::pin!(waiting.next_batch(&in_flight));
        assert!(tokio::time::timeout(short, &mut next).await.is_err());
        // The others end: the batch goes with what it has.
        in_flight.0.send_modify(|n| *n = 0);
        assert_eq!(next.await.unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn a_write_whose_caller_gave_up_keeps_its_connection_until_its_job_is_done() {
        let (queue, mut jobs) = mpsc::channel(16);
        let batcher = Batcher { queue };
        let writers = KeyedLock::default();
        let id = ConnectionId::random();
        let short = Duration::from_millis(20);
        let waiting = job(id).await;
        {
            // The caller queues its write, then goes away before an answer.
            let writer = Arc::new(writers.lock(id).await);
            let apply = batcher.apply(id, waiting.request, writer.clone());
            assert!(tokio::time::timeout(short, apply).await.is_err());
        }
        // The write is still to be committed: the connection's next writer waits.
        let queued = jobs.recv().await.unwrap();
        assert!(tokio::time::timeout(short, writers.lock(id)).await.is_err(), "the lock went with the caller");
        // Its batch done, the job lets go.
        drop(queued);
        tokio::time::timeout(short, writers.lock(id)).await.unwrap();
    }

    #[test]
    fn pairs_lists_every_key_of_every_connection_in_order() {
        let ids = vec!["a".to_owned(), "b".to_owned()];
        let keys = [vec!["k1".to_owned(), "k2".to_owned()], vec![]];
        let (pair_ids, pair_keys) = pairs(&ids, keys.iter().map(|k| k.iter()));
        assert_eq!(pair_ids, ["a", "a"]);
        assert_eq!(pair_keys, ["k1", "k2"]);
    }
}
