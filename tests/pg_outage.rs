//! A PostgreSQL outage, simulated without stopping the (shared) server: a TCP
//! proxy written here sits between Highwater and PostgreSQL, and a switch
//! cuts it, aborting every proxied connection and closing new ones at once.
//!
//! Phases, with writers running throughout:
//! - (a) up: every write is acknowledged;
//! - (b) cut for about two seconds: writes get 503 `StorageUnavailable`
//!   promptly (never 500, never a hang) and health is 503
//!   `{"available":false}`;
//! - (c) restored: health and writes come back within a bounded time without
//!   restarting Highwater.
//!
//! At the end every acknowledged write is present with its value, and each
//! connection's revisions are 1..=M without gaps, M being the number of
//! streams present (each write adds one new stream, so each committed write
//! is one revision). A write answered 503 may or may not have committed.
//!
//! PostgreSQL only, whatever `HIGHWATER_TEST_BACKEND` says.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use highwater::state::ConnectionId;
use serde_json::{json, Value};
use support::server::{read_streams, stream_write, Server};
use support::TestDatabase;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const WRITERS: usize = 4;
const CONNECTIONS: usize = 2;
const DATABASE_TIMEOUT_MS: &str = "500";
const POOL_SIZE: &str = "8";
/// Chaos schedule: how long each phase lasts.
const UP_FOR: Duration = Duration::from_millis(1500);
const DOWN_FOR: Duration = Duration::from_secs(2);
const RECOVERED_FOR: Duration = Duration::from_millis(1500);
/// Generous bounds: an answer to any request, and recovery after the restore.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
const RECOVER_WITHIN: Duration = Duration::from_secs(10);
const HEALTH_POLL: Duration = Duration::from_millis(50);
const HEALTH_SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Pause after a refused write, so writers do not spin while PostgreSQL is away.
const BACKOFF: Duration = Duration::from_millis(20);
const TEST_TIMEOUT: Duration = Duration::from_secs(50);

/// The phases, as stored in [`Shared::phase`].
const UP: u8 = 0;
const DOWN: u8 = 1;
/// The proxy is back, health has not yet answered 200.
const RESTORING: u8 = 2;
/// Health has answered 200 again.
const RECOVERED: u8 = 3;
const PHASE_NAMES: [&str; 4] = ["(a) up", "(b) down", "(c) restoring", "(c) recovered"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: run with HIGHWATER_TEST_BACKEND=postgres and --include-ignored (as .ci/run does)"]
async fn a_database_outage_gives_503_then_recovers_without_losing_acknowledged_writes() {
    let database = TestDatabase::postgres_always().await;
    match tokio::time::timeout(TEST_TIMEOUT, run(&database)).await {
        Ok(()) => {}
        Err(_) => panic!("the test did not finish within {TEST_TIMEOUT:?} (a hang?)"),
    }
}

async fn run(database: &TestDatabase) {
    let url = database.url_text();
    let proxy = Proxy::start(upstream_of(&url)).await;
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &url_via(&url, proxy.address),
        "--database-timeout-ms",
        DATABASE_TIMEOUT_MS,
        "--database-pool-size",
        POOL_SIZE,
    ];
    let server = Server::start(&args);
    let notable = server.notable();
    let base = server.base_url().to_owned();
    let connections: Vec<String> = (0..CONNECTIONS).map(|_| ConnectionId::random().to_string()).collect();
    let shared = Arc::new(Shared { phase: AtomicU8::new(UP), stop: AtomicBool::new(false) });

    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(writer(w, base.clone(), connections.clone(), Arc::clone(&shared)))).collect();
    let sampler = tokio::spawn(health_sampler(base.clone(), Arc::clone(&shared)));

    // (a) up.
    tokio::time::sleep(UP_FOR).await;
    // (b) down.
    proxy.cut();
    shared.phase.store(DOWN, Ordering::SeqCst);
    tokio::time::sleep(DOWN_FOR).await;
    // (c) restored: poll health until it answers 200.
    shared.phase.store(RESTORING, Ordering::SeqCst);
    proxy.restore();
    let restored = Instant::now();
    let http = reqwest::Client::builder().timeout(ANSWER_WITHIN).build().expect("HTTP client");
    let mut polls = 0u32;
    let recovered_after = loop {
        polls += 1;
        if let Ok(response) = http.get(format!("{base}/api/v1/health")).send().await {
            if response.status().as_u16() == 200 {
                break restored.elapsed();
            }
        }
        if restored.elapsed() > RECOVER_WITHIN {
            shared.stop.store(true, Ordering::SeqCst);
            panic!(
                "health did not answer 200 within {RECOVER_WITHIN:?} of the proxy's restore ({polls} polls); \
                 notable log lines:\n{}",
                notable.last_lines(20)
            );
        }
        tokio::time::sleep(HEALTH_POLL).await;
    };
    shared.phase.store(RECOVERED, Ordering::SeqCst);
    tokio::time::sleep(RECOVERED_FOR).await;
    shared.stop.store(true, Ordering::SeqCst);

    let mut outcomes: Vec<Outcome> = Vec::new();
    for task in writers {
        outcomes.extend(task.await.expect("writer task"));
    }
    let health = sampler.await.expect("health sampler task");
    println!(
        "pg_outage: health answered 200 {:.0} ms after the restore ({polls} polls); proxy: {}",
        recovered_after.as_secs_f64() * 1000.0,
        proxy.summary()
    );

    // What happened in each phase, by the phase a request started in.
    for (phase, name) in PHASE_NAMES.iter().enumerate() {
        let started: Vec<&Outcome> = outcomes.iter().filter(|o| o.start == phase as u8).collect();
        let count = |f: &dyn Fn(&Outcome) -> bool| started.iter().filter(|o| f(o)).count();
        let slowest = started.iter().map(|o| o.elapsed).max().unwrap_or_default();
        let health_here: Vec<&Sample> = health.iter().filter(|s| s.start == phase as u8).collect();
        println!(
            "pg_outage: {name}: writes started {} (200: {}, 503: {}, other: {}; {} ended in a later phase), \
             slowest {:.0} ms; health samples {} (200: {}, 503: {})",
            started.len(),
            count(&|o| o.status() == Some(200)),
            count(&|o| o.status() == Some(503)),
            count(&|o| !matches!(o.status(), Some(200 | 503))),
            count(&|o| o.end != o.start),
            slowest.as_secs_f64() * 1000.0,
            health_here.len(),
            health_here.iter().filter(|s| s.status == Some(200)).count(),
            health_here.iter().filter(|s| s.status == Some(503)).count(),
        );
    }

    // Every answer came, in time, and was a 200 or a proper 503.
    let mut problems: Vec<String> = Vec::new();
    for o in &outcomes {
        let label = format!(
            "write {} (started {}, ended {})",
            o.stream, PHASE_NAMES[o.start as usize], PHASE_NAMES[o.end as usize]
        );
        match &o.result {
            Err(error) => problems.push(format!("{label}: no answer within {ANSWER_WITHIN:?}: {error}")),
            Ok((200, _)) => {}
            Ok((503, body)) => {
                let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                if parsed["exceptionClassName"] != "StorageUnavailable"
                    || !parsed["message"].is_string()
                    || !parsed["errorId"].is_string()
                {
                    problems.push(format!("{label}: 503 with an unexpected body {body}"));
                }
            }
            Ok((status, body)) => problems.push(format!("{label}: {status} {body}")),
        }
        if o.elapsed > ANSWER_WITHIN {
            problems.push(format!("{label}: answered after {:?}", o.elapsed));
        }
        // Phase expectations, for requests entirely inside one phase.
        let status = o.status();
        if o.start == UP && o.end == UP && status != Some(200) {
            problems.push(format!("{label}: {status:?} while PostgreSQL was reachable"));
        }
        if o.start == DOWN && o.end == DOWN && status == Some(200) {
            problems.push(format!("{label}: 200 while the proxy was cut"));
        }
        if o.start == RECOVERED && status != Some(200) {
            problems.push(format!("{label}: {status:?} after health had recovered"));
        }
    }
    for s in &health {
        let label =
            format!("health (started {}, ended {})", PHASE_NAMES[s.start as usize], PHASE_NAMES[s.end as usize]);
        match (s.status, s.body.as_str()) {
            (None, _) => problems.push(format!("{label}: no answer within {ANSWER_WITHIN:?}: {}", s.body)),
            (Some(200), r#"{"available":true}"#) | (Some(503), r#"{"available":false}"#) => {}
            (Some(status), body) => problems.push(format!("{label}: {status} {body}")),
        }
        if s.start == UP && s.end == UP && s.status != Some(200) {
            problems.push(format!("{label}: {:?} while PostgreSQL was reachable", s.status));
        }
        if s.start == DOWN && s.end == DOWN && s.status != Some(503) {
            problems.push(format!("{label}: {:?} while the proxy was cut", s.status));
        }
        if s.start == RECOVERED && s.status != Some(200) {
            problems.push(format!("{label}: {:?} after health had recovered", s.status));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}\nlast notable log lines:\n{}",
        problems.len(),
        problems.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
        notable.last_lines(20)
    );
    let inside = |o: &&Outcome, phase: u8| o.start == phase && o.end == phase;
    assert!(outcomes.iter().any(|o| inside(&o, UP) && o.status() == Some(200)), "no write acknowledged in phase (a)");
    assert!(outcomes.iter().any(|o| inside(&o, DOWN) && o.status() == Some(503)), "no write refused in phase (b)");
    assert!(health.iter().any(|s| s.start == DOWN && s.end == DOWN), "no health sample during phase (b)");
    assert!(
        outcomes.iter().any(|o| o.start == RECOVERED && o.status() == Some(200)),
        "no write acknowledged after the recovery"
    );

    // Nothing acknowledged is lost; revisions have no gaps.
    let db = support::connect(&url).await;
    let mut maybe_committed = 0usize;
    for (index, id) in connections.iter().enumerate() {
        let streams = read_streams(&http, &base, id).await;
        let acked: Vec<&Outcome> =
            outcomes.iter().filter(|o| o.connection == index && o.status() == Some(200)).collect();
        let missing: Vec<String> = acked
            .iter()
            .filter(|o| streams.get(&o.stream) != Some(&json!({ "seq": o.seq })))
            .map(|o| {
                format!("{} acked in {} (read: {:?})", o.stream, PHASE_NAMES[o.start as usize], streams.get(&o.stream))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "connection {id}: {} of {} acknowledged writes lost or wrong: {}",
            missing.len(),
            acked.len(),
            missing.join(", ")
        );
        let refused_present = outcomes
            .iter()
            .filter(|o| o.connection == index && o.status() != Some(200) && streams.contains_key(&o.stream))
            .count();
        maybe_committed += refused_present;
        let sent = outcomes.iter().filter(|o| o.connection == index).count();
        let revisions = support::postgres_revisions(&db, id).await;
        let expected: Vec<i64> = (1..=streams.len() as i64).collect();
        assert_eq!(
            revisions,
            expected,
            "connection {id}: {} streams present ({} acked, {sent} sent) but these revisions",
            streams.len(),
            acked.len()
        );
        assert!(streams.len() <= sent, "connection {id}: more streams than writes sent");
        println!(
            "pg_outage: connection {id}: {sent} writes sent, {} acknowledged, {} present \
             ({refused_present} of them answered 503), revisions 1..={}",
            acked.len(),
            streams.len(),
            streams.len()
        );
    }
    println!(
        "pg_outage: {} writes in all, every acknowledged one present; {maybe_committed} refused ones had committed; \
         {} warning/error log lines",
        outcomes.len(),
        notable.lines().len()
    );
    server.kill();
}

/// What the writers and the health sampler share with the schedule.
struct Shared {
    phase: AtomicU8,
    stop: AtomicBool,
}

/// One write: stream `stream` set to `{"seq": seq}` on connection number
/// `connection`; the phases it started and ended in; status and body, or
/// the transport error.
struct Outcome {
    connection: usize,
    stream: String,
    seq: u64,
    start: u8,
    end: u8,
    elapsed: Duration,
    result: Result<(u16, String), String>,
}

impl Outcome {
    fn status(&self) -> Option<u16> {
        self.result.as_ref().ok().map(|(status, _)| *status)
    }
}

/// Writes one new stream at a time until told to stop, alternating over the
/// connections; each write is sent once.
async fn writer(writer: usize, base: String, connections: Vec<String>, shared: Arc<Shared>) -> Vec<Outcome> {
    let http = reqwest::Client::builder().timeout(ANSWER_WITHIN).build().expect("HTTP client");
    let mut outcomes = Vec::new();
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let connection = (writer + seq as usize) % connections.len();
        let stream = format!("w{writer}-{seq}");
        let body = stream_write(&connections[connection], &stream, &json!({ "seq": seq }));
        let start = shared.phase.load(Ordering::SeqCst);
        let began = Instant::now();
        let result = match http.post(format!("{base}/api/v1/state/create_or_update")).json(&body).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.text().await {
                    Ok(text) => Ok((status, text)),
                    Err(error) => Err(format!("{status} with an unreadable body: {error}")),
                }
            }
            Err(error) => Err(error.to_string()),
        };
        let elapsed = began.elapsed();
        let end = shared.phase.load(Ordering::SeqCst);
        let refused = !matches!(result, Ok((200, _)));
        outcomes.push(Outcome { connection, stream, seq, start, end, elapsed, result });
        seq += 1;
        if refused {
            tokio::time::sleep(BACKOFF).await;
        }
    }
    outcomes
}

/// One health answer (status `None`: no answer; the body is then the error).
struct Sample {
    start: u8,
    end: u8,
    status: Option<u16>,
    body: String,
}

/// Asks for health every [`HEALTH_SAMPLE_EVERY`] until told to stop.
async fn health_sampler(base: String, shared: Arc<Shared>) -> Vec<Sample> {
    let http = reqwest::Client::builder().timeout(ANSWER_WITHIN).build().expect("HTTP client");
    let mut samples = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        let start = shared.phase.load(Ordering::SeqCst);
        let (status, body) = match http.get(format!("{base}/api/v1/health")).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (Some(status), response.text().await.unwrap_or_else(|e| format!("<unreadable: {e}>")))
            }
            Err(error) => (None, error.to_string()),
        };
        let end = shared.phase.load(Ordering::SeqCst);
        samples.push(Sample { start, end, status, body });
        tokio::time::sleep(HEALTH_SAMPLE_EVERY).await;
    }
    samples
}

/// A TCP proxy to PostgreSQL with an off switch.
struct Proxy {
    address: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    accept: AbortHandle,
}

#[derive(Default)]
struct ProxyState {
    down: bool,
    /// The copying task of every live proxied connection.
    links: Vec<AbortHandle>,
    accepted: u64,
    refused: u64,
    aborted: u64,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let accept = {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    // Decided and registered under the lock, so a cut never
                    // misses a connection accepted just before it.
                    let mut state = state.lock().expect("proxy lock");
                    if state.down {
                        state.refused += 1;
                        drop(inbound);
                        continue;
                    }
                    state.accepted += 1;
                    state.links.retain(|link| !link.is_finished());
                    let upstream = upstream.clone();
                    let link = tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                    state.links.push(link.abort_handle());
                }
            })
            .abort_handle()
        };
        Proxy { address, state, accept }
    }

    /// Aborts every proxied connection and closes new ones at once.
    fn cut(&self) {
        let mut state = self.state.lock().expect("proxy lock");
        state.down = true;
        for link in std::mem::take(&mut state.links) {
            if !link.is_finished() {
                state.aborted += 1;
            }
            link.abort();
        }
    }

    fn restore(&self) {
        self.state.lock().expect("proxy lock").down = false;
    }

    fn summary(&self) -> String {
        let state = self.state.lock().expect("proxy lock");
        format!(
            "{} connections proxied, {} cut by the outage, {} refused while down",
            state.accepted, state.aborted, state.refused
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut state) = self.state.lock() {
            for link in state.links.drain(..) {
                link.abort();
            }
        }
    }
}

/// `url` with its host and port replaced by `address`.
fn url_via(url: &str, address: SocketAddr) -> String {
    let hosts = host_range(url);
    format!("{}{address}{}", &url[..hosts.start], &url[hosts.end..])
}

/// Where the `host:port` of a `postgres://user@host:port/db` URL is.
fn host_range(url: &str) -> std::ops::Range<usize> {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..].find(['/', '?']).map_or(url.len(), |i| authority_start + i);
    let host_start =
        url[authority_start..authority_end].rfind('@').map_or(authority_start, |i| authority_start + i + 1);
    host_start..authority_end
}

/// The `host:port` of a `postgres://` URL, with PostgreSQL's default port.
fn upstream_of(url: &str) -> String {
    let host = &url[host_range(url)];
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    }
}
