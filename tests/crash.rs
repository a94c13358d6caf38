//! Crash test: concurrent writers against a server that is killed with
//! SIGKILL and restarted on the same `SQLite` file, over and over. Every write
//! the server acknowledged (200) must survive with exactly its value, no
//! multi-stream write may be half applied, and the file must pass `SQLite`'s
//! integrity check at the end.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

const WRITERS: usize = 4;
const CONNECTIONS_PER_WRITER: usize = 2;
const CYCLES: usize = 20;
/// Every this-many-th write sets three streams at once.
const MULTI_EVERY: u64 = 5;
const MULTI_SUFFIXES: [&str; 3] = ["a", "b", "c"];
/// Uptime before each kill, in milliseconds (inclusive range).
const UPTIME_MS: (u64, u64) = (50, 250);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause after a failed write, so a writer does not spin while the server
/// is down.
const ERROR_BACKOFF: Duration = Duration::from_millis(5);
/// Log lines kept to explain a server that fails to start.
const TAIL_LINES: usize = 50;

/// Server log lines worth reporting: warnings, errors, anything not JSON
/// (a panic message).
type Notable = Arc<Mutex<Vec<String>>>;

/// One running `highwater serve`.
struct Server {
    child: Child,
    base: String,
    drain: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts the server on `db_url` and waits for its listening line.
    fn start(db_url: &str, notable: &Notable) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_highwater"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                db_url,
                "--log-format",
                "json",
                "--log-level",
                "info",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn highwater");
        let stderr = child.stderr.take().expect("piped stderr");
        let (address_tx, address_rx) = mpsc::channel::<String>();
        let tail = Arc::new(Mutex::new(Vec::<String>::new()));
        let drain = {
            let tail = Arc::clone(&tail);
            let notable = Arc::clone(notable);
            thread::spawn(move || drain_stderr(stderr, &address_tx, &tail, &notable))
        };
        match address_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(address) => Server { child, base: format!("http://{address}"), drain: Some(drain) },
            Err(error) => {
                let _ = child.kill();
                let status = child.wait();
                let _ = drain.join();
                let tail = tail.lock().expect("tail lock").join("\n");
                panic!(
                    "highwater did not report its address ({error}); exit: {status:?}; \
                     its last log lines:\n{tail}"
                );
            }
        }
    }

    /// SIGKILL (on unix, `Child::kill` sends SIGKILL), reap, and wait for
    /// the log reader to see the end of the pipe.
    fn kill(mut self) {
        self.child.kill().expect("kill highwater");
        self.child.wait().expect("wait for highwater");
        if let Some(drain) = self.drain.take() {
            drain.join().expect("stderr reader thread");
        }
    }
}

/// A failing test must not leave a server running.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the server's stderr to the end: sends the address from the
/// listening line, keeps a tail for diagnostics and collects notable lines.
fn drain_stderr(
    stderr: std::process::ChildStderr,
    address_tx: &mpsc::Sender<String>,
    tail: &Mutex<Vec<String>>,
    notable: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    let mut announced = false;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        {
            let mut tail = tail.lock().expect("tail lock");
            if tail.len() == TAIL_LINES {
                tail.remove(0);
            }
            tail.push(line.clone());
        }
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            if !line.is_empty() {
                notable.lock().expect("notable lock").push(line);
            }
            continue;
        };
        if matches!(event["level"].as_str(), Some("WARN" | "ERROR")) {
            notable.lock().expect("notable lock").push(line.clone());
        }
        if !announced && event["message"] == "highwater listening" {
            if let Some(address) = event["address"].as_str() {
                announced = true;
                let _ = address_tx.send(address.to_owned());
            }
        }
    }
}

/// A tiny xorshift64 generator; the seed comes from the clock and is
/// printed so a failing run can be replayed.
struct XorShift(u64);

impl XorShift {
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
}

/// One write a writer sent, and whether the server acknowledged it.
struct WriteRecord {
    connection: usize,
    seq: u64,
    streams: Vec<String>,
    acked: bool,
}

/// What the writers share with the killer.
struct Shared {
    base: RwLock<String>,
    stop: AtomicBool,
    acked: AtomicU64,
    unacked: AtomicU64,
    /// Non-200 answers (not transport errors), by status code.
    statuses: Mutex<HashMap<u16, u64>>,
}

fn stream_names(writer: usize, seq: u64) -> Vec<String> {
    if seq % MULTI_EVERY == 0 {
        MULTI_SUFFIXES.iter().map(|suffix| format!("w{writer}-{seq}-{suffix}")).collect()
    } else {
        vec![format!("w{writer}-{seq}")]
    }
}

/// Sends writes until told to stop; each write is sent once and recorded as
/// acknowledged only on a 200.
async fn writer(writer: usize, connections: Vec<(usize, String)>, shared: Arc<Shared>) -> Vec<WriteRecord> {
    let client = reqwest::Client::builder().timeout(CLIENT_TIMEOUT).build().expect("build HTTP client");
    let mut records = Vec::new();
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        seq += 1;
        let (connection, connection_id) =
            &connections[usize::try_from(seq).expect("seq fits usize") % connections.len()];
        let streams = stream_names(writer, seq);
        let body = json!({
            "connectionId": connection_id,
            "connectionState": {
                "stateType": "stream",
                "streamState": streams
                    .iter()
                    .map(|name| json!({
                        "streamDescriptor": {"name": name},
                        "streamState": {"seq": seq},
                    }))
                    .collect::<Vec<_>>(),
            },
        });
        let base = shared.base.read().expect("base lock").clone();
        let answer = client.post(format!("{base}/api/v1/state/create_or_update")).json(&body).send().await;
        // The status line is the acknowledgement: the server sends it only
        // after the commit, so the body need not arrive for the write to count.
        let acked = match answer {
            Ok(response) if response.status() == reqwest::StatusCode::OK => {
                let _ = response.bytes().await;
                true
            }
            Ok(response) => {
                *shared.statuses.lock().expect("statuses lock").entry(response.status().as_u16()).or_default() += 1;
                false
            }
            Err(_) => false,
        };
        if acked {
            shared.acked.fetch_add(1, Ordering::SeqCst);
        } else {
            shared.unacked.fetch_add(1, Ordering::SeqCst);
        }
        records.push(WriteRecord { connection: *connection, seq, streams, acked });
        if !acked {
            tokio::time::sleep(ERROR_BACKOFF).await;
        }
    }
    records
}

/// Reads a connection's streams as name → blob.
async fn read_streams(client: &reqwest::Client, base: &str, connection_id: &str) -> HashMap<String, Value> {
    let response = client
        .post(format!("{base}/api/v1/state/get"))
        .json(&json!({ "connectionId": connection_id }))
        .send()
        .await
        .expect("state/get on the final server");
    assert_eq!(response.status(), reqwest::StatusCode::OK, "state/get");
    let state: Value = response.json().await.expect("state/get body");
    assert_eq!(state["connectionId"], connection_id);
    let mut streams = HashMap::new();
    // A connection with no surviving entry reads as not_set; the checks of
    // the writes then report what is missing.
    if state["stateType"] == "not_set" {
        return streams;
    }
    assert_eq!(state["stateType"], "stream", "state of {connection_id}");
    for item in state["streamState"].as_array().expect("streamState array") {
        let name = item["streamDescriptor"]["name"].as_str().expect("stream name").to_owned();
        let previous = streams.insert(name.clone(), item["streamState"].clone());
        assert!(previous.is_none(), "stream {name} listed twice");
    }
    streams
}

fn integrity_check(db_path: &Path) -> String {
    let conn = rusqlite::Connection::open(db_path).expect("open the database after the run");
    let mut statement = conn.prepare("PRAGMA integrity_check").expect("prepare integrity_check");
    let rows = statement
        .query_map([], |row| row.get::<_, String>(0))
        .expect("run integrity_check")
        .collect::<Result<Vec<_>, _>>()
        .expect("read integrity_check");
    rows.join("\n")
}

/// Compares what the final server holds with what was written: every
/// acknowledged write present with its value, no write half applied, no
/// stream that nobody wrote. Returns the violations and how many
/// unacknowledged writes were applied anyway.
fn check_writes(
    records: &[WriteRecord],
    states: &[HashMap<String, Value>],
    connection_ids: &[String],
) -> (Vec<String>, u64) {
    let mut violations = Vec::new();
    let mut expected_names: Vec<HashSet<&str>> = vec![HashSet::new(); connection_ids.len()];
    let mut unacked_but_applied = 0u64;
    for record in records {
        let state = &states[record.connection];
        let expected = json!({ "seq": record.seq });
        let mut present = 0;
        for name in &record.streams {
            expected_names[record.connection].insert(name);
            match state.get(name) {
                Some(value) => {
                    present += 1;
                    if *value != expected {
                        violations.push(format!(
                            "stream {name} on {}: expected {expected}, found {value}",
                            connection_ids[record.connection]
                        ));
                    }
                }
                None if record.acked => violations.push(format!(
                    "acknowledged write seq {} lost stream {name} on {}",
                    record.seq, connection_ids[record.connection]
                )),
                None => {}
            }
        }
        if present != 0 && present != record.streams.len() {
            violations.push(format!(
                "partial write seq {} ({}) on {}: {present} of {} streams present: {:?}",
                record.seq,
                if record.acked { "acked" } else { "unacked" },
                connection_ids[record.connection],
                record.streams.len(),
                record.streams.iter().filter(|name| state.contains_key(*name)).collect::<Vec<_>>()
            ));
        }
        if !record.acked && present == record.streams.len() {
            unacked_but_applied += 1;
        }
    }
    for (index, state) in states.iter().enumerate() {
        for name in state.keys() {
            if !expected_names[index].contains(name.as_str()) {
                violations.push(format!("stream {name} on {} was never written there", connection_ids[index]));
            }
        }
    }

    (violations, unacked_but_applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_repeated_sigkill() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("crash.db");
    let db_url = format!("sqlite://{}", db_path.display());
    let notable: Notable = Arc::default();

    let seed = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64 | 1;
    let mut rng = XorShift(seed);

    let server = {
        let (db_url, notable) = (db_url.clone(), Arc::clone(&notable));
        tokio::task::spawn_blocking(move || Server::start(&db_url, &notable)).await.expect("start the first server")
    };
    let shared = Arc::new(Shared {
        base: RwLock::new(server.base.clone()),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        unacked: AtomicU64::new(0),
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
            tokio::spawn(writer(w, connections, Arc::clone(&shared)))
        })
        .collect();

    // The killer: let the server run a moment, SIGKILL it, restart it on the
    // same file, publish its new address.
    let mut server = Some(server);
    let mut acked_per_cycle = Vec::with_capacity(CYCLES);
    let mut acked_before = 0;
    let mut downtime = Duration::ZERO;
    for _ in 0..CYCLES {
        tokio::time::sleep(Duration::from_millis(rng.between(UPTIME_MS.0, UPTIME_MS.1))).await;
        let running = server.take().expect("a running server");
        let (db_url, notable) = (db_url.clone(), Arc::clone(&notable));
        let down = Instant::now();
        let restarted = tokio::task::spawn_blocking(move || {
            running.kill();
            Server::start(&db_url, &notable)
        })
        .await
        .expect("kill and restart the server");
        let acked_now = shared.acked.load(Ordering::SeqCst);
        acked_per_cycle.push(acked_now - acked_before);
        acked_before = acked_now;
        *shared.base.write().expect("base lock") = restarted.base.clone();
        downtime = downtime.max(down.elapsed());
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

    // Check every connection on the final server.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("build HTTP client");
    let mut states = Vec::new();
    for connection_id in &connection_ids {
        states.push(read_streams(&client, &server.base, connection_id).await);
    }

    let (violations, unacked_but_applied) = check_writes(&records, &states, &connection_ids);

    server.kill();
    let integrity = integrity_check(&db_path);

    let acked = records.iter().filter(|r| r.acked).count();
    let unacked = records.len() - acked;
    let multi = records.iter().filter(|r| r.streams.len() > 1).count();
    let cycles_with_acks = acked_per_cycle.iter().filter(|&&n| n > 0).count();
    let statuses = shared.statuses.lock().expect("statuses lock").clone();
    let notable = notable.lock().expect("notable lock").clone();
    eprintln!(
        "crash test: seed {seed:#x}, {CYCLES} cycles, {} writes ({multi} multi-stream), \
         {acked} acked, {unacked} unacked ({unacked_but_applied} of them applied anyway), \
         non-200 answers {statuses:?}, acked per cycle {acked_per_cycle:?}, longest kill-to-ready {downtime:.2?}, \
         {} notable server log lines, elapsed {:.2?}",
        records.len(),
        notable.len(),
        started.elapsed()
    );
    for line in notable.iter().take(10) {
        eprintln!("  server: {line}");
    }

    assert!(
        violations.is_empty(),
        "{} violations (seed {seed:#x}), first ones:\n{}",
        violations.len(),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(integrity, "ok", "PRAGMA integrity_check");
    assert!(acked > 100, "only {acked} writes were acknowledged: the test proved little");
    assert!(
        cycles_with_acks * 2 > CYCLES,
        "only {cycles_with_acks} of {CYCLES} cycles acknowledged a write: {acked_per_cycle:?}"
    );
}
