//! The `highwater` binary as an operator meets it: refusing an unsafe
//! configuration, credentials made by `hash-secret`, and a SIGTERM that
//! finishes requests in flight and exits 0 without losing anything.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::server::Server;

const BIN: &str = env!("CARGO_BIN_EXE_highwater");

fn db_arg(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("hw.db").display())
}

#[test]
fn serving_beyond_loopback_without_credentials_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_arg(&dir);
    let output = Command::new(BIN).args(["serve", "--listen", "0.0.0.0:0", "--database-url", &db]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing to listen on 0.0.0.0:0 without authentication"), "{stderr}");
    // Text logs to a pipe carry no terminal colours.
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    assert!(stderr.contains("--behind-auth-proxy"), "{stderr}");
    // Told that a proxy authenticates, it serves.
    Server::start(&["--listen", "0.0.0.0:0", "--database-url", &db, "--behind-auth-proxy"]).kill();
}

#[tokio::test]
async fn credentials_made_by_hash_secret_are_accepted_and_others_refused() {
    let mut hasher = Command::new(BIN).arg("hash-secret").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    hasher.stdin.take().unwrap().write_all(b"correct horse\n").unwrap();
    let password_hash = String::from_utf8(hasher.wait_with_output().unwrap().stdout).unwrap().trim().to_owned();
    assert!(password_hash.starts_with("$argon2id$"), "{password_hash}");
    let tokens =
        String::from_utf8(Command::new(BIN).args(["hash-secret", "--new-token"]).output().unwrap().stdout).unwrap();
    let field = |name: &str| {
        tokens.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).expect("hash-secret output")
    };
    let (token, token_hash) = (field("token:"), field("secretHash:"));

    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.json");
    std::fs::write(
        &credentials,
        format!(
            r#"{{"credentials":[{{"name":"airbyte","role":"admin","secretHash":"{password_hash}"}},
                {{"name":"pyairbyte","role":"reader","secretHash":"{token_hash}"}}]}}"#
        ),
    )
    .unwrap();
    let db = db_arg(&dir);
    let server = Server::start(&[
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &db,
        "--auth-file",
        credentials.to_str().unwrap(),
    ]);
    let address = server.address();
    let client = reqwest::Client::new();
    let get = |auth: Option<(&str, Option<&str>)>, bearer: Option<&str>| {
        let mut request = client
            .post(format!("http://{address}/api/v1/state/get"))
            .header("content-type", "application/json")
            .body(r#"{"connectionId":"5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e77"}"#);
        if let Some((user, password)) = auth {
            request = request.basic_auth(user, password);
        }
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(get(Some(("airbyte", Some("correct horse"))), None).await.unwrap().status(), 200);
    assert_eq!(get(None, Some(&token)).await.unwrap().status(), 200);
    assert_eq!(get(Some(("airbyte", Some("wrong"))), None).await.unwrap().status(), 401);
    assert_eq!(get(None, None).await.unwrap().status(), 401);
    let health = client.get(format!("http://{address}/api/v1/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "health stays open");
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_exits_zero_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_arg(&dir);
    let mut server = Server::start(&["--listen", "127.0.0.1:0", "--database-url", &db]);
    let address = server.address().to_owned();
    let id = "5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e77";
    let client = reqwest::Client::new();
    let writers: Vec<_> = (0..32)
        .map(|i| {
            let (client, address) = (client.clone(), address.clone());
            tokio::spawn(async move {
                // Big enough to still be in flight when the signal comes.
                let blob = format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(512 * 1024));
                let body = format!(
                    r#"{{"connectionId":"{id}","connectionState":{{"stateType":"stream","streamState":[{{"streamDescriptor":{{"name":"s{i}"}},"streamState":{blob}}}]}}}}"#
                );
                let sent = client
                    .post(format!("http://{address}/api/v1/state/create_or_update"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                matches!(sent, Ok(response) if response.status() == 200).then_some(i)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    server.terminate();
    let mut acknowledged = Vec::new();
    for writer in writers {
        if let Some(i) = writer.await.unwrap() {
            acknowledged.push(i);
        }
    }
    let status = server.wait_exit(Duration::from_secs(30)).expect("highwater did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    // The WAL was folded back into the database file on the way out.
    let wal = dir.path().join("hw.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0, "WAL left behind");

    let server = Server::start(&["--listen", "127.0.0.1:0", "--database-url", &db]);
    let address = server.address();
    let state: serde_json::Value = client
        .post(format!("http://{address}/api/v1/state/get"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"connectionId":"{id}"}}"#))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let present: Vec<String> = state["streamState"]
        .as_array()
        .map(|s| s.iter().map(|s| s["streamDescriptor"]["name"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    for i in &acknowledged {
        assert!(present.contains(&format!("s{i}")), "acknowledged write s{i} lost");
    }
    eprintln!("{} of 32 writes acknowledged around SIGTERM, all present", acknowledged.len());
    server.kill();
}

#[test]
fn a_second_process_on_the_same_sqlite_file_is_refused_but_export_runs_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_arg(&dir);
    let first = Server::start(&["--listen", "127.0.0.1:0", "--database-url", &db]);
    // The first server is the file's only writer (its state cache relies on
    // it): a second server, or an import, is refused and told why.
    let output = Command::new(BIN).args(["serve", "--listen", "127.0.0.1:0", "--database-url", &db]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another Highwater process"), "{stderr}");
    let import = dir.path().join("empty.ndjson");
    std::fs::write(&import, "").unwrap();
    let output = Command::new(BIN)
        .args(["import", "--database-url", &db, "--input", import.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use by another Highwater process"));
    // An export only reads, so it runs beside the server.
    let output = Command::new(BIN).args(["export", "--database-url", &db]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // Once the first has stopped, the file is free again.
    assert!(first.stop().success());
    Server::start(&["--listen", "127.0.0.1:0", "--database-url", &db]).kill();
}

/// A server process, killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_does_not_stop_the_answers() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let db = db_arg(&dir);
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &db])
        .args(["--log-format", "json", "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let _server = Killed(child);
    let (mut line, mut address) = (String::new(), String::new());
    while address.is_empty() {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "highwater exited before listening");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if event["message"] == "highwater listening" {
            address = event["address"].as_str().unwrap().to_owned();
        }
    }

    // One log line a request, which nobody reads from here on: the pipe
    // holds 64 KiB, the server's queue of lines 16,384 more.
    let client = reqwest::Client::new();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (client, address) = (client.clone(), address.clone());
            tokio::spawn(async move {
                for _ in 0..2500 {
                    let answer = client
                        .post(format!("http://{address}/api/v1/state/get"))
                        .header("content-type", "application/json")
                        .body(r#"{"connectionId":"5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e77"}"#)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("a request was not answered while the log went unread: {e}"));
                    assert_eq!(answer.status(), 200);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }

    // Read again, the log says how many lines it had to drop.
    let (report, reported) = std::sync::mpsc::channel();
    std::thread::spawn(move || loop {
        line.clear();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if event["message"].as_str().is_some_and(|m| m.starts_with("log lines dropped")) {
            let _ = report.send(event["dropped"].as_u64());
            return;
        }
    });
    let dropped = reported.recv_timeout(Duration::from_secs(30)).expect("no report of dropped log lines within 30 s");
    assert!(dropped.is_some_and(|n| n > 0), "{dropped:?}");
}
