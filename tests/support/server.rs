//! One `highwater serve` child process, for the tests that run the binary.
//!
//! [`Server::start`] spawns `highwater serve <args> --log-format json
//! --log-level info` and waits (at most [`STARTUP_TIMEOUT`], never by
//! sleeping) for its `"highwater listening"` line. A thread reads its
//! standard error to the end: it keeps the last [`KEPT_LINES`] lines for
//! failure messages, every logged `error_id`'s line, and the notable lines
//! (warnings, errors, anything not JSON such as a panic) in a [`Notable`]
//! that several servers may share. A server is killed when dropped, so a
//! failing test leaves none running. [`stream_write`] and [`read_streams`]
//! write and read back a connection's streams.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The server must print its listening line (or exit) within this.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// A server that gave up starting, or was told to stop, exits within this.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Log lines kept per server for failure messages.
pub const KEPT_LINES: usize = 1000;
/// How often [`Server::wait_exit`] looks at the process.
const POLL: Duration = Duration::from_millis(10);

/// Log lines worth reporting: warnings, errors and anything not JSON (a
/// panic message). Clones share the lines, so one can gather those of
/// several servers ([`Server::start_noting`]).
#[derive(Clone, Default)]
pub struct Notable(Arc<Mutex<Vec<String>>>);

impl Notable {
    /// Every notable line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// The last `n` notable lines, one a line.
    pub fn last_lines(&self, n: usize) -> String {
        let lines = self.lock();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn push(&self, line: String) {
        self.lock().push(line);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<String>> {
        self.0.lock().expect("notable lock")
    }
}

/// What a started server did first.
pub enum Launch {
    Listening(Server),
    /// It exited without listening; `after` is the time from the spawn to
    /// the exit, `log` its log.
    Exited {
        status: ExitStatus,
        after: Duration,
        log: String,
    },
}

/// One running `highwater serve`; killed when dropped.
pub struct Server {
    child: Child,
    address: String,
    base_url: String,
    log: Arc<Log>,
    notable: Notable,
    drain: Option<JoinHandle<()>>,
}

/// What the reader thread has seen of a server's standard error.
#[derive(Default)]
struct Log {
    seen: Mutex<Seen>,
    /// Notified on every line and at the end of the pipe.
    changed: Condvar,
}

#[derive(Default)]
struct Seen {
    /// The last [`KEPT_LINES`] lines.
    tail: VecDeque<String>,
    /// The line of every `error_id` logged, by that id.
    errors: HashMap<String, Value>,
    /// From the listening line.
    address: Option<String>,
    /// The pipe has closed: no more lines will come.
    closed: bool,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().expect("log lock")
    }

    /// Waits until `done` holds or `within` has passed.
    fn wait(&self, within: Duration, done: impl Fn(&Seen) -> bool) -> MutexGuard<'_, Seen> {
        let (seen, _) = self.changed.wait_timeout_while(self.lock(), within, |seen| !done(seen)).expect("log lock");
        seen
    }
}

impl Server {
    /// Starts `highwater serve <args>`, which must come up.
    pub fn start(args: &[&str]) -> Server {
        Self::start_noting(args, &Notable::default())
    }

    /// As [`Server::start`], gathering the notable log lines in `notable`.
    pub fn start_noting(args: &[&str], notable: &Notable) -> Server {
        match Self::launch_noting(args, notable) {
            Launch::Listening(server) => server,
            Launch::Exited { status, log, .. } => {
                panic!("highwater serve {} exited ({status}) instead of listening; its log:\n{log}", args.join(" "))
            }
        }
    }

    /// Starts `highwater serve <args>` and waits for its listening line or
    /// its exit, whichever comes first.
    pub fn launch(args: &[&str]) -> Launch {
        Self::launch_noting(args, &Notable::default())
    }

    fn launch_noting(args: &[&str], notable: &Notable) -> Launch {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_highwater"))
            .arg("serve")
            .args(args)
            .args(["--log-format", "json", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn highwater");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Log::default());
        let drain = {
            let (log, notable) = (Arc::clone(&log), notable.clone());
            thread::spawn(move || drain(stderr, &log, &notable))
        };
        let (address, closed) = {
            let seen = log.wait(STARTUP_TIMEOUT, |seen| seen.address.is_some() || seen.closed);
            (seen.address.clone(), seen.closed)
        };
        let mut server = Server {
            child,
            base_url: address.as_ref().map(|address| format!("http://{address}")).unwrap_or_default(),
            address: address.unwrap_or_default(),
            log,
            notable: notable.clone(),
            drain: Some(drain),
        };
        if !server.address.is_empty() {
            return Launch::Listening(server);
        }
        if !closed {
            // Dropping the server kills it.
            panic!(
                "highwater serve {} neither listened nor exited within {STARTUP_TIMEOUT:?}; its last log lines:\n{}",
                args.join(" "),
                server.last_log_lines(50)
            );
        }
        // The pipe closed without a listening line: the process is exiting.
        let status = server
            .wait_exit(EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("highwater closed its standard error but did not exit within {EXIT_TIMEOUT:?}"));
        Launch::Exited { status, after: started.elapsed(), log: server.last_log_lines(KEPT_LINES) }
    }

    /// `host:port` from the listening line.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `http://host:port`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of its log (of the last [`KEPT_LINES`]), one a line.
    pub fn last_log_lines(&self, n: usize) -> String {
        let seen = self.log.lock();
        let skip = seen.tail.len().saturating_sub(n);
        seen.tail.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    /// Its notable log lines (shared with other servers if started so).
    pub fn notable(&self) -> &Notable {
        &self.notable
    }

    /// The log line that names `error_id`, waiting up to `within` for it to
    /// be read from the pipe; `None` if it did not come.
    pub fn logged_error(&self, error_id: &str, within: Duration) -> Option<Value> {
        let seen = self.log.wait(within, |seen| seen.errors.contains_key(error_id) || seen.closed);
        seen.errors.get(error_id).cloned()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, then reaps it and waits for the log reader to see the end
    /// of the pipe.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL highwater");
        self.child.wait().expect("wait for highwater");
        self.join_drain();
    }

    /// Sends SIGTERM (with `kill -TERM`); does not wait.
    pub fn terminate(&self) {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {pid}: {status}");
    }

    /// SIGTERM, then waits up to [`EXIT_TIMEOUT`] for the exit.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate();
        self.wait_exit(EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("highwater did not exit within {EXIT_TIMEOUT:?} of SIGTERM"))
    }

    /// Waits up to `within` for the process to exit (and its log to be
    /// read to the end); `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll highwater") {
                self.join_drain();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    fn join_drain(&mut self) {
        if let Some(drain) = self.drain.take() {
            drain.join().expect("the stderr reader thread");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads a server's standard error to the end.
fn drain(stderr: ChildStderr, log: &Log, notable: &Notable) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        let event = serde_json::from_str::<Value>(&line).ok();
        let warning = event.as_ref().map(|event| matches!(event["level"].as_str(), Some("WARN" | "ERROR")));
        if warning.unwrap_or(!line.is_empty()) {
            notable.push(line.clone());
        }
        let mut seen = log.lock();
        if let Some(event) = event {
            if seen.address.is_none() && event["message"] == "highwater listening" {
                seen.address = event["address"].as_str().map(str::to_owned);
            }
            if let Some(error_id) = event["error_id"].as_str() {
                seen.errors.insert(error_id.to_owned(), event);
            }
        }
        if seen.tail.len() == KEPT_LINES {
            seen.tail.pop_front();
        }
        seen.tail.push_back(line);
        drop(seen);
        log.changed.notify_all();
    }
    log.lock().closed = true;
    log.changed.notify_all();
}

/// The body of a `state/create_or_update` setting stream `stream` of
/// connection `id` to `blob`.
pub fn stream_write(id: &str, stream: &str, blob: &Value) -> Value {
    serde_json::json!({
        "connectionId": id,
        "connectionState": {
            "stateType": "stream",
            "streamState": [{"streamDescriptor": {"name": stream}, "streamState": blob}],
        },
    })
}

/// `state/get` of connection `id` through `base`, which must answer 200 with
/// a stream-type state: its streams, name → blob.
pub async fn read_streams(http: &reqwest::Client, base: &str, id: &str) -> HashMap<String, Value> {
    let response = http
        .post(format!("{base}/api/v1/state/get"))
        .json(&serde_json::json!({ "connectionId": id }))
        .send()
        .await
        .expect("state/get");
    let status = response.status().as_u16();
    let text = response.text().await.expect("state/get body");
    assert_eq!(status, 200, "state/get {id} via {base}: {text}");
    let state: Value = serde_json::from_str(&text).expect("state/get answers JSON");
    assert_eq!(state["stateType"], "stream", "state/get {id} via {base}: {text}");
    stream_items(&state).into_iter().collect()
}

/// The streams of a stream-type `state/get` answer, as (name, blob) in the
/// order served.
pub fn stream_items(state: &Value) -> Vec<(String, Value)> {
    state["streamState"]
        .as_array()
        .expect("streamState array")
        .iter()
        .map(|item| {
            let name = item["streamDescriptor"]["name"].as_str().expect("stream name").to_owned();
            (name, item["streamState"].clone())
        })
        .collect()
}
