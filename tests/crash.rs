//! Crash test: concurrent writers against a server that is killed with
//! SIGKILL at random moments and restarted on the same database, 100 times,
//! on the backend `HIGHWATER_TEST_BACKEND` names (`SQLite` by default,
//! `PostgreSQL` with `HIGHWATER_TEST_BACKEND=postgres`).
//!
//! The writes are mixed: new streams one or three at a time, updates of
//! existing streams, deletes, a merge that creates, updates and deletes at
//! once, the per-stream `state/stream/set` and `state/stream/delete` routes,
//! and compare-and-swap (`expectedRevision` / `If-Match`) whenever the
//! writer knows the connection's revision. Every write carries its own id as
//! its history `reason`, and is recorded whether acknowledged or not.
//!
//! At the end, per connection:
//! - every acknowledged write's effect is present unless a later write
//!   (acknowledged or not) to the same stream superseded it, and no stream
//!   holds anything but the last acknowledged value or a later attempt;
//! - no write is half applied, and no stream exists that nobody wrote;
//! - the history is revisions N, N-1, … 1 without gaps, N being the
//!   `ETag` of `state/get`; each revision is one write sent to that
//!   connection (by its `reason`), in the order they were sent, changing
//!   exactly that write's streams; every acknowledged write has the
//!   revision its `ETag` named; replaying those writes in revision order
//!   gives exactly the final state, values and stream order;
//!
//! and the database passes the backend's integrity check (`SQLite`:
//! `integrity_check`, `foreign_key_check`; `PostgreSQL`: `amcheck` on every
//! B-tree index) and cross-table consistency queries.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use highwater::store::DatabaseUrl;
use serde_json::{json, Value};
use support::server::{Notable, Server};

const WRITERS: usize = 4;
const CONNECTIONS_PER_WRITER: usize = 2;
const CYCLES: usize = 100;
/// Uptime before each kill, in milliseconds (inclusive range).
const UPTIME_MS: (u64, u64) = (20, 150);
/// Per request. A kill breaks the connection at once, so this only turns a
/// hang into an unacknowledged write; long, so that a slow write is not
/// abandoned while it may still land after the writer's next one.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before re-sending a write the server could not be reached for, so
/// a writer does not spin while the server is down.
const ERROR_BACKOFF: Duration = Duration::from_millis(5);
/// `state/history` page size (the most the server allows).
const HISTORY_PAGE: u64 = 1000;
/// Kept below the default so that the old server's `PostgreSQL` sessions,
/// which end only as their sockets close, leave room for the new server's.
const POOL_SIZE: &str = "8";

/// Starts a server on `db_url`.
fn start_server(db_url: &str, notable: &Notable) -> Server {
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        db_url,
        "--database-pool-size",
        POOL_SIZE,
        // The history check needs every revision: no pruning.
        "--history-keep-revisions",
        "0",
        "--history-keep-days",
        "0",
        // PostgreSQL: a server killed while holding the sole-node lease
        // leaves it to run out, and the next one's writes wait up to its
        // 2 s; killed every ~130 ms, almost no write would be acknowledged.
        // That wait is tests/pg_sole.rs's; this test is about what a kill
        // does to acknowledged writes.
        "--database-sole-node",
        "false",
    ];
    Server::start_noting(&args, notable)
}

/// A tiny xorshift64 generator; the seed comes from the clock (or
/// `HIGHWATER_CRASH_SEED`) and is printed so a failing run's choices can be
/// replayed (its timing cannot).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below n")
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What a write does, and through which route.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
enum Kind {
    /// `create_or_update` creating one new stream.
    NewStream,
    /// `create_or_update` creating three new streams at once.
    NewStreams,
    /// `create_or_update` setting one or two existing streams to new values.
    Update,
    /// `create_or_update` deleting an existing stream (item without blob).
    Delete,
    /// `create_or_update` creating one stream, updating one and deleting one.
    Mixed,
    /// `state/stream/set`, of a new or an existing stream.
    StreamSet,
    /// `state/stream/delete` of an existing stream.
    StreamDelete,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::NewStream,
        Kind::NewStreams,
        Kind::Update,
        Kind::Delete,
        Kind::Mixed,
        Kind::StreamSet,
        Kind::StreamDelete,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::NewStream => "new-stream",
            Kind::NewStreams => "3-new-streams",
            Kind::Update => "update",
            Kind::Delete => "delete",
            Kind::Mixed => "create+update+delete",
            Kind::StreamSet => "stream/set",
            Kind::StreamDelete => "stream/delete",
        }
    }
}

/// How a write ended, as far as the writer could tell.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// 200, with the revision its `ETag` named.
    Acked { revision: Option<u64> },
    /// Another status: not acknowledged.
    Status(u16),
    /// Sent, but no status came back (the server died, or the timeout).
    Lost { timeout: bool },
    /// Never sent: no server could be reached before the writers stopped.
    NotSent,
}

/// One write a writer sent, and how it ended.
struct WriteRecord {
    /// Index into the test's connections.
    connection: usize,
    /// The write's `reason`: unique over the whole test.
    id: String,
    /// Send order; a connection is written by one writer only, so this
    /// orders every write to a connection.
    seq: u64,
    kind: Kind,
    /// Stream name → the blob set, or `None` for a delete.
    items: Vec<(String, Option<Value>)>,
    expected_revision: Option<u64>,
    outcome: Outcome,
}

impl WriteRecord {
    fn acked(&self) -> bool {
        matches!(self.outcome, Outcome::Acked { .. })
    }
}

/// What a writer knows of one of its connections.
#[derive(Default)]
struct Model {
    /// Streams whose last write was an acknowledged set: they exist.
    live: Vec<String>,
    /// Streams whose last write was an unacknowledged set: they may exist.
    /// (A stream whose last write was an unacknowledged delete is not
    /// written again: a delete of a missing stream would change nothing.)
    limbo: Vec<String>,
    /// The connection's revision, when the last write to it was
    /// acknowledged (no other writer touches it).
    revision: Option<u64>,
}

impl Model {
    fn record(&mut self, items: &[(String, Option<Value>)], outcome: &Outcome) {
        let acked = matches!(outcome, Outcome::Acked { .. });
        for (name, blob) in items {
            self.live.retain(|n| n != name);
            self.limbo.retain(|n| n != name);
            match (blob.is_some(), acked) {
                (true, true) => self.live.push(name.clone()),
                (true, false) => self.limbo.push(name.clone()),
                (false, _) => {}
            }
        }
        self.revision = match outcome {
            Outcome::Acked { revision } => *revision,
            // A write that was never sent leaves the revision as it was.
            Outcome::NotSent => self.revision,
            _ => None,
        };
    }

    /// Streams a set may target: they exist or may exist.
    fn updatable(&self) -> Vec<String> {
        self.live.iter().chain(&self.limbo).cloned().collect()
    }
}

/// What the writers share with the killer.
struct Shared {
    base: RwLock<String>,
    stop: AtomicBool,
    acked: AtomicU64,
    /// Non-200 answers (not transport errors), by route and status code.
    statuses: Mutex<BTreeMap<(Kind, u16), u64>>,
}

/// A blob unique to this write; its size varies so that pages fill and split.
fn blob(rng: &mut XorShift, writer: usize, seq: u64, index: usize) -> Value {
    let pad = if rng.below(20) == 0 { rng.between(4000, 12000) } else { rng.between(0, 1500) };
    json!({ "writer": writer, "seq": seq, "item": index, "pad": "x".repeat(usize::try_from(pad).expect("pad")) })
}

/// Chooses the next write to a connection from what the writer knows of it.
fn plan(rng: &mut XorShift, model: &Model, writer: usize, seq: u64) -> (Kind, Vec<(String, Option<Value>)>) {
    let updatable = model.updatable();
    let roll = rng.below(100);
    let mut kind = match roll {
        0..=19 => Kind::NewStream,
        20..=34 => Kind::NewStreams,
        35..=52 => Kind::Update,
        53..=62 => Kind::Delete,
        63..=74 => Kind::Mixed,
        75..=89 => Kind::StreamSet,
        _ => Kind::StreamDelete,
    };
    let possible = match kind {
        Kind::Update => !updatable.is_empty(),
        Kind::Delete | Kind::StreamDelete => !model.live.is_empty(),
        Kind::Mixed => !model.live.is_empty() && updatable.len() >= 2,
        _ => true,
    };
    if !possible {
        kind = if roll.is_multiple_of(2) { Kind::NewStream } else { Kind::NewStreams };
    }
    let new = |suffix: &str| format!("s{seq}{suffix}");
    let items = match kind {
        Kind::NewStream => vec![(new(""), Some(blob(rng, writer, seq, 0)))],
        Kind::NewStreams => {
            ["a", "b", "c"].iter().enumerate().map(|(i, s)| (new(s), Some(blob(rng, writer, seq, i)))).collect()
        }
        Kind::Update => {
            let first = rng.pick(&updatable).clone();
            let mut items = vec![(first.clone(), Some(blob(rng, writer, seq, 0)))];
            if updatable.len() > 1 && rng.below(2) == 0 {
                let others: Vec<String> = updatable.iter().filter(|n| **n != first).cloned().collect();
                items.push((rng.pick(&others).clone(), Some(blob(rng, writer, seq, 1))));
            }
            items
        }
        Kind::Delete | Kind::StreamDelete => vec![(rng.pick(&model.live).clone(), None)],
        Kind::Mixed => {
            let deleted = rng.pick(&model.live).clone();
            let others: Vec<String> = updatable.iter().filter(|n| **n != deleted).cloned().collect();
            let updated = rng.pick(&others).clone();
            vec![
                (new("m"), Some(blob(rng, writer, seq, 0))),
                (updated, Some(blob(rng, writer, seq, 1))),
                (deleted, None),
            ]
        }
        Kind::StreamSet => {
            let name = if !updatable.is_empty() && rng.below(2) == 0 { rng.pick(&updatable).clone() } else { new("") };
            vec![(name, Some(blob(rng, writer, seq, 0)))]
        }
    };
    (kind, items)
}

/// The route and body of a write.
fn request(kind: Kind, connection_id: &str, id: &str, items: &[(String, Option<Value>)]) -> (&'static str, Value) {
    match kind {
        Kind::StreamSet => (
            "state/stream/set",
            json!({
                "connectionId": connection_id,
                "streamDescriptor": {"name": items[0].0},
                "streamState": items[0].1,
                "reason": id,
            }),
        ),
        Kind::StreamDelete => (
            "state/stream/delete",
            json!({"connectionId": connection_id, "streamDescriptor": {"name": items[0].0}, "reason": id}),
        ),
        _ => {
            let stream_state: Vec<Value> = items
                .iter()
                .map(|(name, blob)| match blob {
                    Some(blob) => json!({"streamDescriptor": {"name": name}, "streamState": blob}),
                    None => json!({"streamDescriptor": {"name": name}}),
                })
                .collect();
            (
                "state/create_or_update",
                json!({
                    "connectionId": connection_id,
                    "connectionState": {"stateType": "stream", "streamState": stream_state},
                    "reason": id,
                }),
            )
        }
    }
}

/// `"7"` → 7.
fn etag_revision(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers.get(reqwest::header::ETAG)?.to_str().ok()?.trim_matches('"').parse().ok()
}

/// Sends writes until told to stop; each write is recorded once, as
/// acknowledged only on a 200. A write that could not be delivered at all
/// (connection refused: the server is down) is re-sent, to the newest
/// server, as the same write.
async fn writer(writer: usize, connections: Vec<(usize, String)>, shared: Arc<Shared>, seed: u64) -> Vec<WriteRecord> {
    let client = reqwest::Client::builder().timeout(CLIENT_TIMEOUT).build().expect("build HTTP client");
    let mut rng = XorShift::new(seed ^ (writer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut models: Vec<Model> = connections.iter().map(|_| Model::default()).collect();
    let mut records = Vec::new();
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        seq += 1;
        let slot = rng.below(connections.len());
        let (connection, connection_id) = &connections[slot];
        let model = &mut models[slot];
        let (kind, items) = plan(&mut rng, model, writer, seq);
        let id = format!("w{writer}-{seq}");
        let expected_revision = model.revision.filter(|_| rng.below(3) == 0);
        let (route, mut body) = request(kind, connection_id, &id, &items);
        // Compare-and-swap: in the body for merges, as If-Match for the
        // per-stream routes.
        let if_match = match (expected_revision, route) {
            (Some(revision), "state/create_or_update") => {
                body["expectedRevision"] = json!(revision);
                None
            }
            (Some(revision), _) => Some(format!("\"{revision}\"")),
            (None, _) => None,
        };
        let outcome = loop {
            if shared.stop.load(Ordering::SeqCst) {
                break Outcome::NotSent;
            }
            let base = shared.base.read().expect("base lock").clone();
            let mut sending = client.post(format!("{base}/api/v1/{route}")).json(&body);
            if let Some(if_match) = &if_match {
                sending = sending.header(reqwest::header::IF_MATCH, if_match);
            }
            match sending.send().await {
                // The status line is the acknowledgement: the server sends it
                // only after the commit, so the body need not arrive.
                Ok(response) if response.status() == reqwest::StatusCode::OK => {
                    let revision = etag_revision(response.headers());
                    let _ = response.bytes().await;
                    break Outcome::Acked { revision };
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    *shared.statuses.lock().expect("statuses lock").entry((kind, status)).or_default() += 1;
                    break Outcome::Status(status);
                }
                Err(error) if error.is_connect() => tokio::time::sleep(ERROR_BACKOFF).await,
                Err(error) => break Outcome::Lost { timeout: error.is_timeout() },
            }
        };
        if matches!(outcome, Outcome::Acked { .. }) {
            shared.acked.fetch_add(1, Ordering::SeqCst);
        }
        model.record(&items, &outcome);
        let failed = !matches!(outcome, Outcome::Acked { .. });
        records.push(WriteRecord { connection: *connection, id, seq, kind, items, expected_revision, outcome });
        if failed {
            tokio::time::sleep(ERROR_BACKOFF).await;
        }
    }
    records
}

/// A connection as the final server reads it.
struct FinalState {
    /// The `ETag` of `state/get`.
    revision: u64,
    /// Streams in the order served, with their blobs.
    streams: Vec<(String, Value)>,
}

/// Reads a connection's state.
async fn read_state(client: &reqwest::Client, base: &str, connection_id: &str) -> FinalState {
    let response = client
        .post(format!("{base}/api/v1/state/get"))
        .json(&json!({ "connectionId": connection_id }))
        .send()
        .await
        .expect("state/get on the final server");
    assert_eq!(response.status(), reqwest::StatusCode::OK, "state/get");
    let revision = etag_revision(response.headers()).expect("state/get carries an ETag revision");
    let state: Value = response.json().await.expect("state/get body");
    assert_eq!(state["connectionId"], connection_id);
    let mut streams = Vec::new();
    // A connection with no surviving entry reads as not_set; the checks of
    // the writes then report what is missing.
    if state["stateType"] == "not_set" {
        return FinalState { revision, streams };
    }
    assert_eq!(state["stateType"], "stream", "state of {connection_id}");
    let mut seen = HashSet::new();
    for item in state["streamState"].as_array().expect("streamState array") {
        let name = item["streamDescriptor"]["name"].as_str().expect("stream name").to_owned();
        assert!(seen.insert(name.clone()), "stream {name} listed twice in {connection_id}");
        streams.push((name, item["streamState"].clone()));
    }
    FinalState { revision, streams }
}

/// One revision of `state/history`.
struct Revision {
    revision: u64,
    reason: Option<String>,
    /// (entry kind, stream name, op) per change.
    changes: Vec<(String, String, String)>,
}

/// A connection's history as `state/history` pages it, newest first.
struct History {
    /// The response's `revision` (of the first page).
    revision: u64,
    oldest: Option<u64>,
    revisions: Vec<Revision>,
}

async fn read_history(client: &reqwest::Client, base: &str, connection_id: &str) -> History {
    let mut history = History { revision: 0, oldest: None, revisions: Vec::new() };
    let mut before: Option<u64> = None;
    for page in 0.. {
        let mut body = json!({ "connectionId": connection_id, "limit": HISTORY_PAGE });
        if let Some(before) = before {
            body["beforeRevision"] = json!(before);
        }
        let response =
            client.post(format!("{base}/api/v1/state/history")).json(&body).send().await.expect("state/history");
        let status = response.status();
        let text = response.text().await.expect("state/history body");
        assert_eq!(status, reqwest::StatusCode::OK, "state/history of {connection_id}: {text}");
        let page_body: Value = serde_json::from_str(&text).expect("state/history answers JSON");
        if page == 0 {
            history.revision = page_body["revision"].as_u64().expect("history revision");
            history.oldest = page_body["oldestRevision"].as_u64();
        }
        for revision in page_body["revisions"].as_array().expect("revisions array") {
            history.revisions.push(Revision {
                revision: revision["revision"].as_u64().expect("revision number"),
                reason: revision["reason"].as_str().map(str::to_owned),
                changes: revision["changes"]
                    .as_array()
                    .expect("changes array")
                    .iter()
                    .map(|change| {
                        (
                            change["kind"].as_str().unwrap_or("?").to_owned(),
                            change["streamDescriptor"]["name"].as_str().unwrap_or("?").to_owned(),
                            change["op"].as_str().unwrap_or("?").to_owned(),
                        )
                    })
                    .collect(),
            });
        }
        match page_body["nextBeforeRevision"].as_u64() {
            Some(next) => before = Some(next),
            None => break,
        }
        assert!(page < 1000, "state/history of {connection_id} does not end");
    }
    history
}

/// A short account of where a newest-first revision list departs from
/// N, N-1, … 1.
fn describe_revisions(revisions: &[u64]) -> String {
    let mut oldest_first: Vec<u64> = revisions.to_vec();
    oldest_first.reverse();
    let mut gaps = Vec::new();
    let mut out_of_place = Vec::new();
    let mut previous = 0;
    for &revision in &oldest_first {
        if revision <= previous {
            out_of_place.push(revision);
        } else if revision != previous + 1 {
            gaps.push(format!("{}..{}", previous + 1, revision - 1));
        }
        previous = previous.max(revision);
    }
    format!(
        "{} revisions, newest {:?}, oldest {:?}, gaps [{}], duplicated or out of order {:?}",
        revisions.len(),
        revisions.first(),
        revisions.last(),
        gaps.join(", "),
        out_of_place
    )
}

/// A write to one stream: its place in send order, whether it was
/// acknowledged, and its effect (the blob set, `None` for a delete).
type StreamWrite<'a> = (usize, bool, Option<&'a Value>);

/// What one connection's check found besides violations.
#[derive(Default)]
struct ConnectionReport {
    /// Ids of unacknowledged writes the history shows applied.
    landed_unacked: HashSet<String>,
    revisions: u64,
}

/// Checks one connection's final state and history against the writes sent
/// to it (`records`, in send order). Pushes violations.
fn check_connection(
    connection_id: &str,
    records: &[&WriteRecord],
    state: &FinalState,
    history: &History,
    violations: &mut Vec<String>,
) -> ConnectionReport {
    let mut report = ConnectionReport { revisions: state.revision, ..Default::default() };
    let mut fail = |message: String| violations.push(format!("{connection_id}: {message}"));
    let final_value: HashMap<&str, &Value> = state.streams.iter().map(|(n, v)| (n.as_str(), v)).collect();

    // 1. Per stream: the final blob is the last acknowledged write's effect
    //    or that of a later (unacknowledged) write; nothing else.
    let mut per_stream: BTreeMap<&str, Vec<StreamWrite<'_>>> = BTreeMap::new();
    for (position, record) in records.iter().enumerate() {
        if record.outcome == Outcome::NotSent {
            continue;
        }
        for (name, blob) in &record.items {
            per_stream.entry(name.as_str()).or_default().push((position, record.acked(), blob.as_ref()));
        }
    }
    for (name, writes) in &per_stream {
        let last_acked = writes.iter().rposition(|(_, acked, _)| *acked);
        let base: Option<&Value> = last_acked.and_then(|i| writes[i].2);
        let later = &writes[last_acked.map_or(0, |i| i + 1)..];
        let found = final_value.get(name).copied();
        let allowed = found == base || later.iter().any(|(_, _, effect)| *effect == found);
        if !allowed {
            let acked_text = match last_acked {
                Some(i) => {
                    let record = records[writes[i].0];
                    match writes[i].2 {
                        Some(_) => format!("acknowledged write {} ({}) set it", record.id, record.kind.name()),
                        None => format!("acknowledged write {} ({}) deleted it", record.id, record.kind.name()),
                    }
                }
                None => "no write to it was acknowledged".to_owned(),
            };
            let found_text = match found {
                None => "absent".to_owned(),
                Some(value) => {
                    match records.iter().find(|r| r.items.iter().any(|(n, b)| n == name && b.as_ref() == Some(value))) {
                        Some(record) => format!("the value of write {} ({})", record.id, record.kind.name()),
                        None => format!("a value nobody wrote: {}", truncate(&value.to_string())),
                    }
                }
            };
            fail(format!(
                "stream {name}: {acked_text}, {} later unacknowledged write(s) to it; it is {found_text}",
                later.len()
            ));
        }
    }
    for (name, _) in &state.streams {
        if !per_stream.contains_key(name.as_str()) {
            fail(format!("stream {name} was never written to this connection"));
        }
    }

    // 2. No write half applied, judged from the final state: a write whose
    //    blob is visible on one stream must not be provably absent on
    //    another (that stream still showing a value from before it).
    for (position, record) in records.iter().enumerate() {
        if record.items.len() < 2 || record.outcome == Outcome::NotSent {
            continue;
        }
        let mut visible = Vec::new();
        let mut missing = Vec::new();
        for (name, blob) in &record.items {
            let found = final_value.get(name.as_str()).copied();
            if blob.is_some() && found == blob.as_ref() {
                visible.push(name.as_str());
                continue;
            }
            let writes = &per_stream[name.as_str()];
            let earlier_value =
                found.is_some_and(|value| writes.iter().any(|(p, _, effect)| *p < position && *effect == Some(value)));
            let set_but_absent = blob.is_some()
                && found.is_none()
                && !writes.iter().any(|(p, _, effect)| *p > position && effect.is_none());
            if earlier_value || set_but_absent {
                missing.push(name.as_str());
            }
        }
        if !visible.is_empty() && !missing.is_empty() {
            fail(format!(
                "partial write {} ({}, {}): applied to {visible:?} but not to {missing:?}",
                record.id,
                record.kind.name(),
                if record.acked() { "acked" } else { "unacked" }
            ));
        }
    }

    // 3. The history: N, N-1, … 1 without gaps, N = the state's revision.
    let numbers: Vec<u64> = history.revisions.iter().map(|r| r.revision).collect();
    let expected: Vec<u64> = (1..=state.revision).rev().collect();
    if numbers != expected {
        fail(format!(
            "state/get says revision {} but the history has {}",
            state.revision,
            describe_revisions(&numbers)
        ));
    }
    if history.revision != state.revision {
        fail(format!("state/history says revision {}, state/get {}", history.revision, state.revision));
    }
    if state.revision > 0 && history.oldest != Some(1) {
        fail(format!("oldestRevision {:?}, expected 1 (nothing is pruned)", history.oldest));
    }
    let acked = records.iter().filter(|r| r.acked()).count() as u64;
    if state.revision < acked {
        fail(format!("revision {} but {acked} acknowledged writes, each of which changed something", state.revision));
    }

    // 4. Each revision is one write to this connection, in send order,
    //    changing exactly that write's streams; every acknowledged write has
    //    a revision, the one its ETag named.
    let by_id: HashMap<&str, usize> = records.iter().enumerate().map(|(i, r)| (r.id.as_str(), i)).collect();
    let mut applied: Vec<usize> = Vec::new();
    let mut revision_of: HashMap<usize, u64> = HashMap::new();
    for revision in history.revisions.iter().rev() {
        let Some(position) = revision.reason.as_deref().and_then(|reason| by_id.get(reason)).copied() else {
            fail(format!(
                "revision {} has reason {:?}: no write to this connection",
                revision.revision, revision.reason
            ));
            continue;
        };
        let record = records[position];
        if let Some(previous) = revision_of.insert(position, revision.revision) {
            fail(format!("write {} is both revision {previous} and {}", record.id, revision.revision));
            continue;
        }
        if let Some(&last) = applied.last() {
            if last > position {
                fail(format!(
                    "revision {} is write {}, sent before write {} which an earlier revision holds",
                    revision.revision, record.id, records[last].id
                ));
            }
        }
        if matches!(record.outcome, Outcome::NotSent) {
            fail(format!("revision {} is write {}, which was never sent", revision.revision, record.id));
        }
        let mut changed: Vec<(String, String, String)> = revision.changes.clone();
        changed.sort();
        let mut wanted: Vec<(String, String, String)> = record
            .items
            .iter()
            .map(|(name, blob)| {
                ("stream".to_owned(), name.clone(), if blob.is_some() { "set" } else { "delete" }.to_owned())
            })
            .collect();
        wanted.sort();
        if changed != wanted {
            fail(format!(
                "revision {} (write {}, {}) changed {changed:?}, the write was {wanted:?}",
                revision.revision,
                record.id,
                record.kind.name()
            ));
        }
        if !record.acked() {
            report.landed_unacked.insert(record.id.clone());
        }
        applied.push(position);
    }
    for (position, record) in records.iter().enumerate() {
        let Outcome::Acked { revision } = record.outcome else {
            continue;
        };
        match (revision_of.get(&position), revision) {
            (None, _) => fail(format!(
                "acknowledged write {} ({}, ETag {revision:?}) is in no revision",
                record.id,
                record.kind.name()
            )),
            (Some(found), Some(acked)) if *found != acked => fail(format!(
                "acknowledged write {} ({}) answered revision {acked} but the history has it as {found}",
                record.id,
                record.kind.name()
            )),
            (Some(_), None) => fail(format!("acknowledged write {} answered without an ETag revision", record.id)),
            _ => {}
        }
    }

    // 5. Replaying the applied writes in revision order gives the final
    //    state exactly: the same streams, blobs and order.
    let mut replayed: Vec<(String, Value)> = Vec::new();
    for &position in &applied {
        for (name, blob) in &records[position].items {
            let existing = replayed.iter().position(|(n, _)| n == name);
            match (blob, existing) {
                (Some(blob), Some(i)) => replayed[i].1 = blob.clone(),
                (Some(blob), None) => replayed.push((name.clone(), blob.clone())),
                (None, Some(i)) => {
                    replayed.remove(i);
                }
                (None, None) => {}
            }
        }
    }
    if replayed != state.streams {
        let names = |streams: &[(String, Value)]| streams.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let (replayed_names, final_names) = (names(&replayed), names(&state.streams));
        let detail = if replayed_names == final_names {
            let differing: Vec<&String> =
                replayed.iter().zip(&state.streams).filter(|(a, b)| a.1 != b.1).map(|(a, _)| &a.0).collect();
            format!("same streams in the same order, different blobs on {differing:?}")
        } else {
            let mut sorted_replayed = replayed_names.clone();
            let mut sorted_final = final_names.clone();
            sorted_replayed.sort();
            sorted_final.sort();
            if sorted_replayed == sorted_final {
                let first = replayed_names.iter().zip(&final_names).position(|(a, b)| a != b).unwrap_or(0);
                let window = |names: &[String]| names[first..names.len().min(first + 5)].to_vec();
                format!(
                    "same streams in another order: from position {first}, replayed {:?}…, served {:?}…",
                    window(&replayed_names),
                    window(&final_names)
                )
            } else {
                let replayed_set: HashSet<&String> = replayed_names.iter().collect();
                let final_set: HashSet<&String> = final_names.iter().collect();
                format!(
                    "streams only in the replay: {:?}; only served: {:?}",
                    replayed_set.difference(&final_set).collect::<Vec<_>>(),
                    final_set.difference(&replayed_set).collect::<Vec<_>>()
                )
            }
        };
        fail(format!("replaying the history's {} writes does not give the served state: {detail}", applied.len()));
    }
    report
}

fn truncate(text: &str) -> String {
    if text.len() > 80 {
        format!("{}…", &text[..80])
    } else {
        text.to_owned()
    }
}

/// Cross-table consistency, the same SQL on both backends: each query
/// counts rows that must not exist.
const CONSISTENCY_QUERIES: [(&str, &str); 6] = [
    (
        "entries whose blob row (changes at the entry's revision, non-null blob) is missing",
        "SELECT count(*) FROM entries e WHERE NOT EXISTS (SELECT 1 FROM changes c \
         WHERE c.connection_id = e.connection_id AND c.revision = e.revision \
         AND c.entry_key = e.entry_key AND c.blob IS NOT NULL)",
    ),
    (
        "changes rows without their revision",
        "SELECT count(*) FROM changes c WHERE NOT EXISTS (SELECT 1 FROM revisions r \
         WHERE r.connection_id = c.connection_id AND r.revision = c.revision)",
    ),
    (
        "revisions without their connection, or newer than it",
        "SELECT count(*) FROM revisions r WHERE NOT EXISTS (SELECT 1 FROM connections c \
         WHERE c.connection_id = r.connection_id AND c.revision >= r.revision)",
    ),
    (
        "connections whose revision count is not their revision (gaps)",
        "SELECT count(*) FROM connections c WHERE c.revision <> (SELECT count(*) FROM revisions r \
         WHERE r.connection_id = c.connection_id)",
    ),
    (
        "revisions that changed nothing",
        "SELECT count(*) FROM revisions r WHERE NOT EXISTS (SELECT 1 FROM changes c \
         WHERE c.connection_id = r.connection_id AND c.revision = r.revision)",
    ),
    (
        "entries whose latest change is not the one they point at",
        "SELECT count(*) FROM entries e WHERE e.revision <> (SELECT max(c.revision) FROM changes c \
         WHERE c.connection_id = e.connection_id AND c.entry_key = e.entry_key)",
    ),
];

const TABLES: [&str; 5] = ["connections", "revisions", "changes", "entries", "leases"];

/// `SQLite`: `integrity_check`, `foreign_key_check`, and the consistency
/// queries. Returns the problems and a one-line account.
fn sqlite_integrity(path: &std::path::Path) -> (Vec<String>, String) {
    let conn = rusqlite::Connection::open(path).expect("open the database after the run");
    let mut problems = Vec::new();
    let rows = |sql: &str| -> Vec<String> {
        let mut statement = conn.prepare(sql).unwrap_or_else(|e| panic!("prepare {sql}: {e}"));
        let columns = statement.column_count();
        statement
            .query_map([], |row| {
                (0..columns)
                    .map(|i| row.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}")))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|values| values.join(" "))
            })
            .unwrap_or_else(|e| panic!("run {sql}: {e}"))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("read {sql}: {e}"))
    };
    let integrity: Vec<String> = {
        let mut statement = conn.prepare("PRAGMA integrity_check").expect("prepare integrity_check");
        statement
            .query_map([], |row| row.get::<_, String>(0))
            .expect("run integrity_check")
            .collect::<Result<Vec<_>, _>>()
            .expect("read integrity_check")
    };
    if integrity != ["ok"] {
        problems.push(format!("PRAGMA integrity_check: {}", integrity.join("; ")));
    }
    let foreign = rows("PRAGMA foreign_key_check");
    if !foreign.is_empty() {
        problems.push(format!("PRAGMA foreign_key_check: {}", foreign.join("; ")));
    }
    for (what, sql) in CONSISTENCY_QUERIES {
        let count: i64 = conn.query_row(sql, [], |row| row.get(0)).unwrap_or_else(|e| panic!("{sql}: {e}"));
        if count != 0 {
            problems.push(format!("{count} {what}"));
        }
    }
    let mut counts = Vec::new();
    for table in TABLES {
        let count: i64 =
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| row.get(0)).expect("count rows");
        counts.push(format!("{table} {count}"));
    }
    (problems, format!("integrity_check ok, foreign_key_check empty; rows: {}", counts.join(", ")))
}

/// `PostgreSQL`: `amcheck`'s `bt_index_check` (with `heapallindexed`) on
/// every B-tree index of the schema, and the consistency queries.
async fn postgres_integrity(url: &str) -> (Vec<String>, String) {
    let client = support::connect(url).await;
    let mut problems = Vec::new();
    let mut account = Vec::new();
    match client.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck").await {
        Ok(()) => {
            let checked = client
                .simple_query(
                    "SELECT c.relname, bt_index_check(c.oid, true) FROM pg_index i \
                     JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam \
                     WHERE a.amname = 'btree' AND c.relnamespace = 'public'::regnamespace",
                )
                .await;
            match checked {
                Ok(messages) => {
                    let indexes =
                        messages.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
                    if indexes == 0 {
                        problems.push("amcheck found no B-tree index to check".to_owned());
                    }
                    account.push(format!("bt_index_check passed on {indexes} B-tree indexes"));
                }
                Err(error) => problems.push(format!("bt_index_check: {error}")),
            }
        }
        Err(error) => account.push(format!("amcheck unavailable ({error}): only the consistency queries ran")),
    }
    for (what, sql) in CONSISTENCY_QUERIES {
        let count: i64 = client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0);
        if count != 0 {
            problems.push(format!("{count} {what}"));
        }
    }
    let mut counts = Vec::new();
    for table in TABLES {
        let count: i64 =
            client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.expect("count rows").get(0);
        counts.push(format!("{table} {count}"));
    }
    account.push(format!("rows: {}", counts.join(", ")));
    (problems, account.join("; "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_repeated_sigkill() {
    let started = Instant::now();
    let backend = support::backend();
    let database = support::TestDatabase::new().await;
    let db_url = database.url_text();
    let notable = Notable::default();

    let seed = match std::env::var("HIGHWATER_CRASH_SEED") {
        Ok(text) => {
            let text = text.trim_start_matches("0x");
            u64::from_str_radix(text, 16).expect("HIGHWATER_CRASH_SEED: a hex number")
        }
        Err(_) => SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64 | 1,
    };
    let mut rng = XorShift::new(seed);

    let server = {
        let (db_url, notable) = (db_url.clone(), notable.clone());
        tokio::task::spawn_blocking(move || start_server(&db_url, &notable)).await.expect("start the first server")
    };
    let shared = Arc::new(Shared {
        base: RwLock::new(server.base_url().to_owned()),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        statuses: Mutex::default(),
    });

    let connection_ids: Vec<String> =
        (0..WRITERS * CONNECTIONS_PER_WRITER).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let connections = (0..CONNECTIONS_PER_WRITER)
                .map(|c| {
                    let index = w * CONNECTIONS_PER_WRITER + c;
                    (index, connection_ids[index].clone())
                })
                .collect();
            tokio::spawn(writer(w, connections, Arc::clone(&shared), seed))
        })
        .collect();

    // The killer: let the server run a moment, SIGKILL it, restart it on the
    // same database, publish its new address.
    let mut server = Some(server);
    let mut acked_per_cycle = Vec::with_capacity(CYCLES);
    let mut acked_before = 0;
    let mut downtime = Duration::ZERO;
    let mut total_downtime = Duration::ZERO;
    for _ in 0..CYCLES {
        tokio::time::sleep(Duration::from_millis(rng.between(UPTIME_MS.0, UPTIME_MS.1))).await;
        let running = server.take().expect("a running server");
        let (db_url, notable) = (db_url.clone(), notable.clone());
        let down = Instant::now();
        let restarted = tokio::task::spawn_blocking(move || {
            running.kill();
            start_server(&db_url, &notable)
        })
        .await
        .expect("kill and restart the server");
        let acked_now = shared.acked.load(Ordering::SeqCst);
        acked_per_cycle.push(acked_now - acked_before);
        acked_before = acked_now;
        *shared.base.write().expect("base lock") = restarted.base_url().to_owned();
        downtime = downtime.max(down.elapsed());
        total_downtime += down.elapsed();
        server = Some(restarted);
    }
    // A last stretch of uptime, so writes also land on the final server.
    tokio::time::sleep(Duration::from_millis(rng.between(UPTIME_MS.0, UPTIME_MS.1))).await;
    shared.stop.store(true, Ordering::SeqCst);
    let mut records = Vec::new();
    for handle in writers {
        records.extend(handle.await.expect("writer task"));
    }
    let server = server.expect("the final server");
    let writing = started.elapsed();

    // Check every connection on the final server.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("build HTTP client");
    let mut violations = Vec::new();
    let mut landed_unacked = HashSet::new();
    let mut revisions = 0u64;
    for (index, connection_id) in connection_ids.iter().enumerate() {
        let state = read_state(&client, server.base_url(), connection_id).await;
        let history = read_history(&client, server.base_url(), connection_id).await;
        let mut mine: Vec<&WriteRecord> = records.iter().filter(|r| r.connection == index).collect();
        mine.sort_by_key(|r| r.seq);
        let report = check_connection(connection_id, &mine, &state, &history, &mut violations);
        landed_unacked.extend(report.landed_unacked);
        revisions += report.revisions;
    }
    server.kill();

    let (integrity_problems, integrity_account) = match &database.url {
        DatabaseUrl::Sqlite(path) => sqlite_integrity(path),
        DatabaseUrl::Postgres(url) => postgres_integrity(url).await,
    };

    // CAS at a revision the writer knew for certain must not be refused, and
    // the test sends no invalid request: no 4xx at all.
    let statuses = shared.statuses.lock().expect("statuses lock").clone();
    for ((kind, status), count) in &statuses {
        if (400..500).contains(status) {
            violations.push(format!("{count} {} write(s) answered {status}", kind.name()));
        }
    }

    // The summary.
    let acked = records.iter().filter(|r| r.acked()).count();
    let mut by_kind = Vec::new();
    for kind in Kind::ALL {
        let of_kind: Vec<&WriteRecord> = records.iter().filter(|r| r.kind == kind).collect();
        let acked = of_kind.iter().filter(|r| r.acked()).count();
        let landed = of_kind.iter().filter(|r| landed_unacked.contains(&r.id)).count();
        let sent = of_kind.iter().filter(|r| r.outcome != Outcome::NotSent).count();
        by_kind.push(format!("{} {acked}/{} ({landed} landed)", kind.name(), sent - acked));
    }
    let cas = records.iter().filter(|r| r.expected_revision.is_some()).count();
    let cas_acked = records.iter().filter(|r| r.expected_revision.is_some() && r.acked()).count();
    let lost = records.iter().filter(|r| matches!(r.outcome, Outcome::Lost { .. })).count();
    let timeouts = records.iter().filter(|r| r.outcome == Outcome::Lost { timeout: true }).count();
    let not_sent = records.iter().filter(|r| r.outcome == Outcome::NotSent).count();
    let unacked = records.len() - acked - not_sent;
    let cycles_with_acks = acked_per_cycle.iter().filter(|&&n| n > 0).count();
    let notable = notable.lines();
    eprintln!(
        "crash test ({backend}): seed {seed:#x}, {CYCLES} SIGKILL cycles, {} writes sent: {acked} acked, \
         {unacked} unacked ({} of them applied anyway; {lost} lost in flight of which {timeouts} timeouts, \
         {} answered non-200), {not_sent} never sent; acked/unacked by kind: {}; \
         compare-and-swap {cas_acked}/{}; {revisions} revisions in all; non-200 answers {statuses:?}; \
         acked per cycle {acked_per_cycle:?}; kill-to-ready longest {downtime:.2?}, total {total_downtime:.2?}; \
         {} notable server log lines; writing {writing:.2?}, elapsed {:.2?}",
        records.len() - not_sent,
        landed_unacked.len(),
        unacked - lost,
        by_kind.join(", "),
        cas - cas_acked,
        notable.len(),
        started.elapsed()
    );
    eprintln!("crash test ({backend}): database check: {integrity_account}");
    for line in notable.iter().take(10) {
        eprintln!("  server: {line}");
    }

    assert!(
        violations.is_empty(),
        "{} violations ({backend}, seed {seed:#x}), first ones:\n{}",
        violations.len(),
        violations.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(integrity_problems.is_empty(), "database integrity ({backend}): {}", integrity_problems.join("\n"));
    assert!(acked > 300, "only {acked} writes were acknowledged: the test proved little");
    for kind in Kind::ALL {
        assert!(
            records.iter().any(|r| r.kind == kind && r.acked()),
            "no {} write was acknowledged: the mix is not exercised",
            kind.name()
        );
    }
    assert!(cas_acked > 0, "no compare-and-swap write was acknowledged");
    assert!(
        cycles_with_acks * 2 > CYCLES,
        "only {cycles_with_acks} of {CYCLES} cycles acknowledged a write: {acked_per_cycle:?}"
    );
}
