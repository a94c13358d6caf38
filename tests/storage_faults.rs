//! Storage faults on the SQLite backend, against the real `highwater serve`
//! binary on real (small) filesystems:
//!
//! - a full disk (a 4 MiB tmpfs): writes get 507 `StorageFull` with the
//!   documented body, reads keep working, writes resume once space returns
//!   (no restart), and the file is intact with every acknowledged write and
//!   no refused one;
//! - a read-only database: files that cannot be written while the server
//!   runs, a filesystem the kernel turns read-only after an error, and a
//!   database on a read-only mount at start-up;
//! - a foreign or corrupt file: refused at start-up with a message naming
//!   it, and never modified.
//!
//! These tests mount filesystems (tmpfs, loop-mounted ext4), so they need
//! root, as CI has. Every mount is lazily unmounted by a guard, also when a
//! test fails; every server is killed by its guard.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::server::{stream_items, stream_write, Launch, Server, EXIT_TIMEOUT};

/// Each test must finish within this.
const TEST_BUDGET: Duration = Duration::from_secs(30);
/// Every request must be answered within this: a fault is never a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long to wait for a failure's log line to be read from the pipe.
const LOG_WITHIN: Duration = Duration::from_secs(2);

const ENOSPC: i32 = 28;
const EROFS: i32 = 30;

const FULL_MESSAGE: &str = "The state store is out of space; nothing was written.";
const UNAVAILABLE_MESSAGE: &str = "The state store is unavailable; nothing was written. Retry later.";
const INTERNAL_MESSAGE: &str = "Internal error; the server log has the details under this errorId.";

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// Size of the tmpfs the full-disk test runs on.
const FULL_DISK_SIZE: &str = "4m";
/// Space left free once the filler file has taken the rest: room for one
/// large write, not for two.
const LEAVE_FREE: u64 = 300 * 1024;
/// Size of each large blob.
const BIG_BLOB: usize = 200 * 1000;
/// Large writes sent before giving up on seeing the disk full.
const MAX_BIG_WRITES: u64 = 40;
/// Large writes sent after the first refusal, to see refusals repeat.
const EXTRA_REFUSED: u64 = 2;

#[test]
fn a_full_disk_gives_507_keeps_reads_working_and_recovers_when_space_returns() {
    let started = Instant::now();
    let mount = Mount::tmpfs(FULL_DISK_SIZE);
    let db = mount.path().join("hw.db");
    let http = Http::new();
    let id = uuid::Uuid::new_v4().to_string();
    let mut server = serve(&db);

    // A known state, acknowledged before the disk fills.
    let mut expected = http.write_known(server.base_url(), &id, "2024-06-01");

    // Fill the filesystem, then give back a little.
    let filler = mount.path().join("filler");
    let filler_bytes = fill(&filler, LEAVE_FREE);

    // Large writes on distinct streams until one is refused, then a few more.
    let mut refused: Vec<(String, u16, String)> = Vec::new(); // (stream, status, errorId)
    let mut acked_while_filling = 0;
    let mut first_refusal = None;
    let mut statuses = Vec::new();
    for seq in 1..=MAX_BIG_WRITES {
        if first_refusal.is_some_and(|first| seq > first + EXTRA_REFUSED) {
            break;
        }
        let name = format!("big-{seq}");
        let blob = big_blob(seq);
        let (status, body) = http.write(server.base_url(), &id, &name, &blob);
        statuses.push(status);
        match status {
            200 => {
                acked_while_filling += 1;
                expected.push((name, blob));
            }
            507 | 503 => {
                let error_id = documented_error(status, &body);
                refused.push((name, status, error_id));
                first_refusal.get_or_insert(seq);
            }
            other => {
                panic!("write {seq} on a filling disk answered {other} (expected 200, 507 or 503): {}", excerpt(&body))
            }
        }
    }
    assert!(
        !refused.is_empty(),
        "{MAX_BIG_WRITES} writes of {BIG_BLOB} bytes on a full {FULL_DISK_SIZE} tmpfs were all acknowledged"
    );

    // A small write on the full disk: acknowledged or refused, never half.
    let small = json!({"cursor": "small"});
    let (small_status, body) = http.write(server.base_url(), &id, "small-while-full", &small);
    match small_status {
        200 => expected.push(("small-while-full".to_owned(), small)),
        507 | 503 => {
            let error_id = documented_error(small_status, &body);
            refused.push(("small-while-full".to_owned(), small_status, error_id));
        }
        other => panic!("a small write on the full disk answered {other}: {}", excerpt(&body)),
    }

    // Every refusal is in the log under its errorId, with its cause.
    let mut causes = BTreeSet::new();
    for (_, status, error_id) in &refused {
        causes.insert(format!("{status}: {}", logged_cause(&server, error_id, *status)));
    }
    assert!(server.is_running(), "the server died on a full disk; log:\n{}", server.last_log_lines(30));

    // Reads still answer, with the last acknowledged state.
    http.assert_state(server.base_url(), &id, &expected, "state/get on the full disk");
    let (health_status, health_full) = http.get(server.base_url(), "/api/v1/health");
    assert!(
        matches!(health_status, 200 | 503) && health_full["available"].is_boolean(),
        "health on the full disk answered {health_status} {health_full}"
    );

    // Space returns: the next write succeeds without a restart.
    let wal_when_full = file_len(&mount.path().join("hw.db-wal"));
    fs::remove_file(&filler).expect("remove the filler file");
    let after = big_blob(1_000);
    let (status, body) = http.write(server.base_url(), &id, "after-recovery", &after);
    assert_eq!(status, 200, "a write once space returned: {}", excerpt(&body));
    expected.push(("after-recovery".to_owned(), after));
    http.assert_state(server.base_url(), &id, &expected, "state/get after recovery");
    let (health_status_after, health_after) = http.get(server.base_url(), "/api/v1/health");
    assert_eq!(health_status_after, 200, "health after recovery: {health_after}");

    // Stop, check the file, and read it back through a fresh server.
    stop_cleanly(server);
    assert_eq!(integrity_check(&db), "ok", "PRAGMA integrity_check");
    server = serve(&db);
    let found = http.assert_state(server.base_url(), &id, &expected, "state/get after a restart");
    for (name, _, _) in &refused {
        assert!(!found.iter().any(|(n, _)| n == name), "refused write {name} is present");
    }
    stop_cleanly(server);

    eprintln!(
        "full disk: filler {filler_bytes} bytes leaving {LEAVE_FREE}; write statuses {statuses:?}; \
         {acked_while_filling} large writes acknowledged after filling; small write while full: {small_status}; \
         refused {:?}; logged causes {causes:?}; health while full: {health_status} {health_full}; \
         WAL when full {wal_when_full:?} bytes; elapsed {:.2?}",
        refused.iter().map(|(name, status, _)| format!("{name}={status}")).collect::<Vec<_>>(),
        started.elapsed()
    );
    // SQLite reports a full disk as SQLITE_FULL (507) or, depending on where
    // the write fails, as an I/O error (503); both bodies were checked above.
    let unavailable = refused.iter().filter(|(_, status, _)| *status == 503).count();
    if unavailable > 0 {
        eprintln!("full disk: NOTE {unavailable} refusals answered 503 rather than 507; causes {causes:?}");
    }
    assert!(started.elapsed() < TEST_BUDGET, "took {:.2?}", started.elapsed());
}

/// The files of a running server become unwritable. On Linux a filesystem
/// cannot be remounted read-only while a process holds a file open for
/// writing (`mount -o remount,ro` fails with "mount point is busy"), and
/// SQLite keeps the database open; the test tries that first and, when the
/// kernel refuses, makes the database and WAL files immutable (`chattr +i`
/// on ext4: every write to them fails with EPERM, reads work), which is
/// undone with `chattr -i`. The `-shm` file is left writable: SQLite writes
/// it through a shared memory map, and a write fault on an immutable ext4
/// file is SIGBUS.
#[test]
fn a_read_only_database_gives_503_for_writes_and_keeps_serving_reads() {
    let started = Instant::now();
    let mount = Mount::ext4();
    let db = mount.path().join("hw.db");
    let http = Http::new();
    let id = uuid::Uuid::new_v4().to_string();
    let mut server = serve(&db);

    let mut expected = http.write_known(server.base_url(), &id, "before read-only");

    // Make the database read-only.
    let remount = run_output("mount", &["-o", "remount,ro", path_str(mount.path())]);
    let immutable = [db.clone(), mount.path().join("hw.db-wal")];
    let how = if remount.status.success() {
        "mount -o remount,ro"
    } else {
        for file in &immutable {
            run("chattr", &["+i", path_str(file)]);
        }
        "chattr +i on hw.db and hw.db-wal"
    };

    let (refusals, health_status, health) =
        refused_writes_and_served_reads(&http, &mut server, &id, &expected, "a read-only database");

    // Writable again: writes resume without a restart.
    if remount.status.success() {
        run("mount", &["-o", "remount,rw", path_str(mount.path())]);
    } else {
        for file in &immutable {
            run("chattr", &["-i", path_str(file)]);
        }
    }
    let after = json!({"cursor": "after read-only"});
    let (status, body) = http.write(server.base_url(), &id, "after", &after);
    assert_eq!(status, 200, "a write once the database is writable again: {body}");
    expected.push(("after".to_owned(), after));
    http.assert_state(server.base_url(), &id, &expected, "state/get after the database is writable again");

    stop_cleanly(server);
    assert_eq!(integrity_check(&db), "ok", "PRAGMA integrity_check");
    eprintln!(
        "read-only database: remount,ro while serving: {} ({}); made read-only with {how}; \
         refused writes {refusals:?}; health while read-only: {health_status} {health}; elapsed {:.2?}",
        remount.status,
        String::from_utf8_lossy(&remount.stderr).lines().next().unwrap_or_default(),
        started.elapsed()
    );
    assert!(started.elapsed() < TEST_BUDGET, "took {:.2?}", started.elapsed());
}

/// The realistic way a database turns read-only under a running service:
/// ext4 mounted `errors=remount-ro` hits an error (injected through
/// `/sys/fs/ext4/<dev>/trigger_fs_error`) and the kernel remounts it
/// read-only. Writes must be refused with the documented body while reads
/// keep working. The kernel offers no way back without unmounting (the
/// emergency read-only state survives `mount -o remount,rw`), so recovery
/// is a restart after `e2fsck`: every acknowledged write is there, no
/// refused one, and writes work.
#[test]
fn a_filesystem_the_kernel_remounts_read_only_gives_503_for_writes_and_keeps_serving_reads() {
    let started = Instant::now();
    let mount = Mount::ext4();
    let db = mount.path().join("hw.db");
    let http = Http::new();
    let id = uuid::Uuid::new_v4().to_string();
    let mut server = serve(&db);

    let expected = http.write_known(server.base_url(), &id, "before the error");

    mount.trigger_ext4_error();
    let probe = fs::write(mount.path().join("probe"), b"x");
    assert_eq!(
        probe.as_ref().map_err(std::io::Error::raw_os_error),
        Err(Some(EROFS)),
        "the filesystem should be read-only after the injected error: {probe:?}"
    );

    let (refusals, health_status, health) =
        refused_writes_and_served_reads(&http, &mut server, &id, &expected, "a read-only filesystem");

    // Recovery: stop, unmount, repair, mount, start.
    let exit = server.stop();
    assert!(exit.success(), "highwater exited with {exit} after SIGTERM on a read-only filesystem");
    let fsck = mount.fsck_and_remount();
    server = serve(&db);
    http.assert_state(server.base_url(), &id, &expected, "state/get after the repair");
    let after = json!({"cursor": "after the repair"});
    let (status, body) = http.write(server.base_url(), &id, "after", &after);
    assert_eq!(status, 200, "a write after the repair: {body}");
    stop_cleanly(server);
    assert_eq!(integrity_check(&db), "ok", "PRAGMA integrity_check");

    eprintln!(
        "kernel read-only: refused writes {refusals:?}; health while read-only: {health_status} {health}; \
         e2fsck: {fsck}; elapsed {:.2?}",
        started.elapsed()
    );
    assert!(started.elapsed() < TEST_BUDGET, "took {:.2?}", started.elapsed());
}

/// A database (without a `-wal` file, as after a checkpoint) on a mount
/// that is read-only when the server starts: the server either serves reads
/// and refuses writes with the documented body, or exits with a message
/// that names the file and says it is read-only. It must not call a
/// Highwater database "not a Highwater database".
#[test]
fn a_database_on_a_read_only_mount_at_start_up_is_served_read_only_or_refused_as_read_only() {
    read_only_at_start_up(Shutdown::Checkpointed);
}

/// The same with the `-wal` and `-shm` files a crash leaves behind.
#[test]
fn a_database_with_a_wal_on_a_read_only_mount_at_start_up_is_served_read_only_or_refused_as_read_only() {
    read_only_at_start_up(Shutdown::Killed);
}

/// Files that are not Highwater databases, and Highwater databases damaged
/// where SQLite looks at start-up: the server exits non-zero promptly, names
/// the file on standard error, and leaves the file byte for byte as it was,
/// with no `-wal`, `-shm` or `-journal` file beside it.
#[test]
fn a_foreign_or_corrupt_file_is_refused_at_start_up_and_left_untouched() {
    let started = Instant::now();
    let http = Http::new();
    let mut observed = Vec::new();

    // (a) A text file.
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("hw.db");
    fs::write(&db, "not a database, but important to someone\n".repeat(200)).expect("write the text file");
    let message = assert_refused_and_untouched(&db, Some("not a Highwater database"));
    observed.push(format!("(a) text file: {message}"));

    // (b) Another program's SQLite database.
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("hw.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("create the other database");
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES ('theirs');").expect("fill it");
    }
    let message = assert_refused_and_untouched(&db, Some("not a Highwater database"));
    observed.push(format!("(b) another program's SQLite file: {message}"));

    // (c1) A Highwater database whose 100-byte SQLite header is garbage.
    let dir = tempfile::tempdir().expect("temp dir");
    let db = make_highwater_db(dir.path(), &http).0;
    overwrite(&db, 0, 100, 1);
    let message = assert_refused_and_untouched(&db, None);
    observed.push(format!("(c1) garbage header: {message}"));

    // (c2) A Highwater database whose first page (the schema) is garbage
    // after the header.
    let dir = tempfile::tempdir().expect("temp dir");
    let db = make_highwater_db(dir.path(), &http).0;
    let page = page_size(&db);
    overwrite(&db, 100, page - 100, 2);
    let message = assert_refused_and_untouched(&db, None);
    observed.push(format!("(c2) garbage schema page: {message}"));

    for line in &observed {
        eprintln!("refused at start-up: {line}");
    }
    assert!(started.elapsed() < TEST_BUDGET, "took {:.2?}", started.elapsed());
}

/// The bytes of the SQLite header a committed transaction rewrites even
/// when it changes nothing else: the file change counter (offsets 24..28)
/// and the version-valid-for number (92..96).
const HEADER_COUNTERS: [std::ops::Range<usize>; 2] = [24..28, 92..96];

/// A Highwater database with a garbage page that start-up does not read
/// (page 2, the `connections` table, and the root page of `entries`).
/// SQLite opens it; start-up's integrity check then refuses it. What this
/// test holds the server to, whichever way it goes: it refuses to start, or
/// it answers reads and writes with 500 or 503 and the documented body and
/// never crashes; and no page of the file changes.
#[test]
fn a_highwater_database_with_a_corrupt_page_answers_500_never_crashes_and_keeps_its_pages() {
    let started = Instant::now();
    let http = Http::new();
    let mut observed = Vec::new();
    // `heads` holds every connection's row and current entries.
    for target in ["page 2", "heads root page"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, id) = make_highwater_db(dir.path(), &http);
        let page_number = match target {
            "page 2" => 2,
            _ => root_page(&db, "heads"),
        };
        damage_page(&db, page_number);
        let before = fs::read(&db).expect("read the damaged file");
        let outcome = match launch(&db) {
            Launch::Exited { status, after, log } => {
                assert!(!status.success(), "{target}: highwater exited successfully on a corrupt file");
                assert!(log.contains(path_str(&db)), "{target}: the message does not name the file:\n{log}");
                format!("{target} (page {page_number}): refused at start-up after {after:.2?}: {}", error_message(&log))
            }
            Launch::Listening(mut server) => {
                let (read_status, body) = http.read(server.base_url(), &id);
                assert!(matches!(read_status, 500 | 503), "{target}: state/get answered {read_status}: {body}");
                let read_cause = logged_cause(&server, &documented_error(read_status, &body), read_status);
                let (write_status, body) = http.write(server.base_url(), &id, "more", &json!({"cursor": 2}));
                assert!(matches!(write_status, 500 | 503), "{target}: a write answered {write_status}: {body}");
                let write_cause = logged_cause(&server, &documented_error(write_status, &body), write_status);
                let (health_status, health) = http.get(server.base_url(), "/api/v1/health");
                assert!(server.is_running(), "{target}: the server died; log:\n{}", server.last_log_lines(30));
                let warnings = warnings(&server);
                let exit = server.stop();
                assert!(exit.success(), "{target}: highwater exited with {exit} after SIGTERM");
                format!(
                    "{target} (page {page_number}): STARTED; state/get {read_status} ({read_cause}); \
                     write {write_status} ({write_cause}); health {health_status} {health}; \
                     warnings {warnings:?}; files afterwards {:?}",
                    listing(dir.path())
                )
            }
        };
        let after = fs::read(&db).expect("read the file afterwards");
        let changed = changed_offsets(&before, &after);
        let outside_counters: Vec<usize> =
            changed.iter().copied().filter(|offset| !HEADER_COUNTERS.iter().any(|r| r.contains(offset))).collect();
        assert!(outside_counters.is_empty(), "{target}: bytes changed at offsets {outside_counters:?}");
        observed.push(format!("{outcome}; bytes changed at offsets {changed:?}"));
    }
    for line in &observed {
        eprintln!("corrupt page: {line}");
    }
    assert!(started.elapsed() < TEST_BUDGET, "took {:.2?}", started.elapsed());
}

/// What the issue asks of a corrupt Highwater database: refused at start-up
/// with a clear message, never written.
#[test]
fn a_highwater_database_with_a_corrupt_page_is_refused_at_start_up_and_never_written() {
    let http = Http::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = make_highwater_db(dir.path(), &http).0;
    damage_page(&db, 2);
    let before = fs::read(&db).expect("read the damaged file");
    let outcome = match launch(&db) {
        Launch::Exited { status, log, .. } => {
            assert!(!status.success(), "highwater exited successfully on a corrupt file");
            assert!(log.contains(path_str(&db)), "the message does not name the file:\n{log}");
            None
        }
        Launch::Listening(server) => {
            let exit = server.stop();
            Some(format!("highwater started on a corrupt file (and exited with {exit} after SIGTERM)"))
        }
    };
    let changed = changed_offsets(&before, &fs::read(&db).expect("read the file afterwards"));
    assert!(changed.is_empty(), "{outcome:?}; bytes changed at offsets {changed:?}");
    assert!(outcome.is_none(), "{}", outcome.unwrap_or_default());
}

/// The server restarts (a crash, a deploy) while the disk is full: it must
/// still serve reads, refusing writes with 507 (or 503) and the documented
/// body, as a running server does.
#[test]
fn a_restart_on_a_full_disk_serves_reads_and_refuses_writes() {
    let started = Instant::now();
    let mount = Mount::tmpfs(FULL_DISK_SIZE);
    let db = mount.path().join("hw.db");
    let http = Http::new();
    let id = uuid::Uuid::new_v4().to_string();
    let server = serve(&db);
    let expected = http.write_known(server.base_url(), &id, "before the disk filled");
    server.kill();
    let filler = mount.path().join("filler");
    fill(&filler, 0);

    let outcome = match launch(&db) {
        Launch::Exited { status, log, .. } => {
            panic!("highwater did not start on a full disk ({status}): {}", error_message(&log))
        }
        Launch::Listening(mut server) => {
            http.assert_state(server.base_url(), &id, &expected, "state/get after a restart on a full disk");
            let (status, body) = http.write(server.base_url(), &id, "refused", &json!({"n": 1}));
            assert!(matches!(status, 507 | 503), "a write on a full disk answered {status}: {body}");
            let cause = logged_cause(&server, &documented_error(status, &body), status);
            assert!(server.is_running(), "the server died on a full disk; log:\n{}", server.last_log_lines(30));
            stop_cleanly(server);
            format!("write {status} ({cause})")
        }
    };
    fs::remove_file(&filler).expect("remove the filler file");
    let server = serve(&db);
    http.assert_state(server.base_url(), &id, &expected, "state/get once space returned");
    stop_cleanly(server);
    assert_eq!(integrity_check(&db), "ok", "PRAGMA integrity_check");
    eprintln!("restart on a full disk: {outcome}; elapsed {:.2?}", started.elapsed());
    assert!(started.elapsed() < TEST_BUDGET, "took {:.2?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// Scenario helpers
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Shutdown {
    /// SIGTERM, then a checkpoint that removes the `-wal` and `-shm` files.
    Checkpointed,
    /// SIGKILL: the `-wal` and `-shm` files stay.
    Killed,
}

fn read_only_at_start_up(shutdown: Shutdown) {
    let started = Instant::now();
    let mount = Mount::tmpfs("8m");
    let db = mount.path().join("hw.db");
    let http = Http::new();
    let id = uuid::Uuid::new_v4().to_string();
    let server = serve(&db);
    let expected = http.write_known(server.base_url(), &id, "before read-only");
    match shutdown {
        Shutdown::Checkpointed => {
            stop_cleanly(server);
            checkpoint_and_close(&db);
        }
        Shutdown::Killed => server.kill(),
    }
    let files = listing(mount.path());
    let contents: Vec<Vec<u8>> = files.iter().map(|name| fs::read(mount.path().join(name)).expect("read")).collect();
    run("mount", &["-o", "remount,ro", path_str(mount.path())]);

    let outcome = match launch(&db) {
        Launch::Exited { status, after, log } => {
            assert!(!status.success(), "highwater exited successfully on a read-only mount:\n{log}");
            assert!(after < EXIT_TIMEOUT, "highwater took {after:.2?} to give up");
            let message = error_message(&log);
            assert!(message.contains(path_str(&db)), "the message does not name the file: {message}");
            assert!(
                !message.contains("not a Highwater database"),
                "a Highwater database on a read-only mount is called foreign: {message}"
            );
            let lower = message.to_lowercase();
            assert!(
                lower.contains("read-only") || lower.contains("readonly"),
                "the message does not say the database is read-only: {message}"
            );
            format!("refused after {after:.2?}: {message}")
        }
        Launch::Listening(server) => {
            http.assert_state(server.base_url(), &id, &expected, "state/get on a read-only mount");
            let (status, body) = http.write(server.base_url(), &id, "refused", &json!({"n": 1}));
            assert!(matches!(status, 503 | 507), "a write on a read-only mount answered {status}: {body}");
            let cause = logged_cause(&server, &documented_error(status, &body), status);
            let (health_status, health) = http.get(server.base_url(), "/api/v1/health");
            stop_cleanly(server);
            format!("served read-only: write {status} ({cause}); health {health_status} {health}")
        }
    };
    assert_eq!(listing(mount.path()), files, "files on the read-only mount");
    for (name, content) in files.iter().zip(&contents) {
        assert!(fs::read(mount.path().join(name)).expect("read") == *content, "{name} changed");
    }

    // Writable again: the database is intact.
    run("mount", &["-o", "remount,rw", path_str(mount.path())]);
    let server = serve(&db);
    http.assert_state(server.base_url(), &id, &expected, "state/get once the mount is writable");
    stop_cleanly(server);
    eprintln!("read-only at start-up ({shutdown:?}, files {files:?}): {outcome}; elapsed {:.2?}", started.elapsed());
    assert!(started.elapsed() < TEST_BUDGET, "took {:.2?}", started.elapsed());
}

/// On a database that cannot be written (`on` says how): three writes, each
/// refused with the documented body and its cause logged; the server keeps
/// running and reads answer with `expected`. Returns each refusal as
/// (stream, status, cause), and the health answer.
fn refused_writes_and_served_reads(
    http: &Http,
    server: &mut Server,
    id: &str,
    expected: &[(String, Value)],
    on: &str,
) -> (Vec<(String, u16, String)>, u16, Value) {
    let mut refusals = Vec::new();
    for n in 0..3 {
        let name = format!("while-read-only-{n}");
        let (status, body) = http.write(server.base_url(), id, &name, &json!({"n": n}));
        assert!(matches!(status, 503 | 507), "a write on {on} answered {status}: {body}");
        let error_id = documented_error(status, &body);
        refusals.push((name, status, logged_cause(server, &error_id, status)));
    }
    assert!(server.is_running(), "the server died on {on}; log:\n{}", server.last_log_lines(30));
    http.assert_state(server.base_url(), id, expected, &format!("state/get on {on}"));
    let (health_status, health) = http.get(server.base_url(), "/api/v1/health");
    assert!(matches!(health_status, 200 | 503), "health on {on}: {health_status} {health}");
    (refusals, health_status, health)
}

/// Starts a server on `db`, which must refuse to start: checks the exit,
/// the message and that the file and its directory are as they were.
/// Returns the message.
fn assert_refused_and_untouched(db: &Path, must_say: Option<&str>) -> String {
    let dir = db.parent().expect("a directory");
    let files = listing(dir);
    let before = fs::read(db).expect("read the file before");
    let log = match launch(db) {
        Launch::Exited { status, after, log } => {
            assert!(!status.success(), "highwater exited successfully on {}:\n{log}", db.display());
            assert!(after < EXIT_TIMEOUT, "highwater took {after:.2?} to refuse {}", db.display());
            log
        }
        Launch::Listening(server) => {
            let log = server.last_log_lines(20);
            drop(server);
            panic!("highwater started on {}; its log:\n{log}", db.display());
        }
    };
    let message = error_message(&log);
    assert!(message.contains(path_str(db)), "the message does not name the file: {message}");
    if let Some(text) = must_say {
        assert!(message.contains(text), "the message does not say {text:?}: {message}");
    }
    assert!(fs::read(db).expect("read the file after") == before, "{} was modified", db.display());
    assert_eq!(listing(dir), files, "files beside {}", db.display());
    message
}

/// Creates a Highwater database with one connection of three streams in
/// `dir`, checkpointed so that everything is in the main file (no `-wal`).
/// Returns its path and the connection id.
fn make_highwater_db(dir: &Path, http: &Http) -> (PathBuf, String) {
    let db = dir.join("hw.db");
    let id = uuid::Uuid::new_v4().to_string();
    let server = serve(&db);
    for name in ["users", "orders", "items"] {
        let (status, body) = http.write(server.base_url(), &id, name, &json!({"cursor": name}));
        assert_eq!(status, 200, "writing {name}: {body}");
    }
    stop_cleanly(server);
    checkpoint_and_close(&db);
    assert_eq!(listing(dir), ["hw.db"], "files after the checkpoint");
    (db, id)
}

fn checkpoint_and_close(db: &Path) {
    let conn = rusqlite::Connection::open(db).expect("open for a checkpoint");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).expect("checkpoint");
    // The last connection to close removes the -wal and -shm files.
}

/// The page size from the SQLite header.
fn page_size(db: &Path) -> u64 {
    let header = fs::read(db).expect("read the database");
    match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        size => u64::from(size),
    }
}

fn root_page(db: &Path, table: &str) -> u64 {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open read-only");
    conn.query_row("SELECT rootpage FROM sqlite_master WHERE name = ?1", [table], |row| row.get(0))
        .unwrap_or_else(|e| panic!("root page of {table}: {e}"))
}

/// Overwrites page `number` (1-based) with garbage.
fn damage_page(db: &Path, number: u64) {
    let page = page_size(db);
    overwrite(db, (number - 1) * page, page, number);
}

/// Offsets at which two files differ (a length difference counts from the
/// shorter one's end).
fn changed_offsets(before: &[u8], after: &[u8]) -> Vec<usize> {
    let mut changed: Vec<usize> =
        before.iter().zip(after).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
    changed.extend(before.len().min(after.len())..before.len().max(after.len()));
    changed
}

/// Overwrites `len` bytes at `offset` with deterministic garbage.
fn overwrite(path: &Path, offset: u64, len: u64, seed: u64) {
    let mut bytes = fs::read(path).expect("read the file to damage");
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed;
    let start = usize::try_from(offset).expect("offset");
    let end = start + usize::try_from(len).expect("len");
    assert!(end <= bytes.len(), "{} has only {} bytes", path.display(), bytes.len());
    for byte in &mut bytes[start..end] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x.to_le_bytes()[0];
    }
    fs::write(path, bytes).expect("write the damaged file");
}

fn integrity_check(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).expect("open the database after the run");
    let mut statement = conn.prepare("PRAGMA integrity_check").expect("prepare integrity_check");
    let rows = statement
        .query_map([], |row| row.get::<_, String>(0))
        .expect("run integrity_check")
        .collect::<Result<Vec<_>, _>>()
        .expect("read integrity_check");
    rows.join("\n")
}

/// Writes zeros to `path` until the filesystem is full, then shrinks the
/// file to leave `leave` bytes free. Returns the file's final size.
fn fill(path: &Path, leave: u64) -> u64 {
    let mut file = fs::File::create(path).expect("create the filler file");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(ENOSPC) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let full = file.metadata().expect("filler metadata").len();
    assert!(full > leave, "the filler holds only {full} bytes");
    file.set_len(full - leave).expect("shrink the filler");
    full - leave
}

fn big_blob(seq: u64) -> Value {
    json!({"seq": seq, "pad": "x".repeat(BIG_BLOB)})
}

fn file_len(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.len())
}

/// The file names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list the directory")
        .map(|entry| entry.expect("directory entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name != "lost+found")
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------
// Wire checks
// ---------------------------------------------------------------------------

/// Checks a 500/503/507 body is exactly the documented one and returns its
/// errorId.
fn documented_error(status: u16, body: &Value) -> String {
    let (message, class) = match status {
        507 => (FULL_MESSAGE, "StorageFull"),
        503 => (UNAVAILABLE_MESSAGE, "StorageUnavailable"),
        500 => (INTERNAL_MESSAGE, "InternalError"),
        other => panic!("no documented storage error for status {other}: {body}"),
    };
    let keys: BTreeSet<&str> =
        body.as_object().expect("an error body is an object").keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["message", "exceptionClassName", "errorId"]), "error body {body}");
    assert_eq!(body["message"], message, "error body {body}");
    assert_eq!(body["exceptionClassName"], class, "error body {body}");
    let error_id = body["errorId"].as_str().expect("errorId is a string");
    uuid::Uuid::parse_str(error_id).unwrap_or_else(|e| panic!("errorId {error_id} is not a UUID: {e}"));
    error_id.to_owned()
}

/// Finds the server's log line for `error_id` and returns its cause.
fn logged_cause(server: &Server, error_id: &str, status: u16) -> String {
    let Some(event) = server.logged_error(error_id, LOG_WITHIN) else {
        panic!("errorId {error_id} is not in the server log; its tail:\n{}", server.last_log_lines(20))
    };
    assert_eq!(event["status"], status, "log line {event}");
    assert_eq!(event["level"], "ERROR", "log line {event}");
    let cause = event["cause"].as_str().unwrap_or_default();
    assert!(!cause.is_empty(), "the log line for {error_id} has no cause: {event}");
    cause.to_owned()
}

/// A state/get body as (stream name, blob), in the order served.
fn streams_of(body: &Value) -> Vec<(String, Value)> {
    if body["stateType"] == "not_set" {
        return Vec::new();
    }
    assert_eq!(body["stateType"], "stream", "state {}", excerpt(body));
    stream_items(body)
}

fn assert_streams(found: &[(String, Value)], expected: &[(String, Value)], context: &str) {
    let names = |streams: &[(String, Value)]| streams.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>();
    assert_eq!(names(found), names(expected), "{context}: streams");
    for ((name, value), (_, wanted)) in found.iter().zip(expected) {
        assert!(value == wanted, "{context}: stream {name} holds {}", excerpt(value));
    }
}

/// A value's text, cut short (blobs here are large).
fn excerpt(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 300 {
        format!("{}… ({} bytes)", &text[..300], text.len())
    } else {
        text
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// A blocking façade over reqwest: every request is answered within
/// [`ANSWER_WITHIN`] or the test fails.
struct Http {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Self {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("build a tokio runtime");
        let client = reqwest::Client::builder().timeout(ANSWER_WITHIN).build().expect("build the HTTP client");
        Self { runtime, client }
    }

    fn write(&self, base: &str, id: &str, stream: &str, blob: &Value) -> (u16, Value) {
        self.post(base, "/api/v1/state/create_or_update", &stream_write(id, stream, blob))
    }

    /// Writes stream `known` as `{"cursor": cursor}`, which must be
    /// acknowledged; returns it as the streams expected.
    fn write_known(&self, base: &str, id: &str, cursor: &str) -> Vec<(String, Value)> {
        let known = json!({ "cursor": cursor });
        let (status, body) = self.write(base, id, "known", &known);
        assert_eq!(status, 200, "the first write: {body}");
        vec![("known".to_owned(), known)]
    }

    /// `state/get` of `id`, which must answer 200 with exactly the streams
    /// `expected` (`context` says when); returns the streams read.
    fn assert_state(&self, base: &str, id: &str, expected: &[(String, Value)], context: &str) -> Vec<(String, Value)> {
        let (status, body) = self.read(base, id);
        assert_eq!(status, 200, "{context}: {}", excerpt(&body));
        let found = streams_of(&body);
        assert_streams(&found, expected, context);
        found
    }

    fn read(&self, base: &str, id: &str) -> (u16, Value) {
        self.post(base, "/api/v1/state/get", &json!({ "connectionId": id }))
    }

    fn post(&self, base: &str, route: &str, body: &Value) -> (u16, Value) {
        self.send(route, self.client.post(format!("{base}{route}")).json(body))
    }

    fn get(&self, base: &str, route: &str) -> (u16, Value) {
        self.send(route, self.client.get(format!("{base}{route}")))
    }

    fn send(&self, route: &str, request: reqwest::RequestBuilder) -> (u16, Value) {
        self.runtime.block_on(async {
            let response = request
                .send()
                .await
                .unwrap_or_else(|e| panic!("{route}: no answer within {ANSWER_WITHIN:?} (a hang or a crash?): {e}"));
            let status = response.status().as_u16();
            let bytes = response.bytes().await.unwrap_or_else(|e| panic!("{route}: reading the body: {e}"));
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            (status, body)
        })
    }
}

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// Starts a server on `db` that must come up.
fn serve(db: &Path) -> Server {
    Server::start(&["--listen", "127.0.0.1:0", "--database-url", &format!("sqlite://{}", db.display())])
}

/// Starts a server on `db`; it may listen or exit.
fn launch(db: &Path) -> Launch {
    Server::launch(&["--listen", "127.0.0.1:0", "--database-url", &format!("sqlite://{}", db.display())])
}

/// SIGTERM; the server must exit 0.
fn stop_cleanly(server: Server) {
    let exit = server.stop();
    assert!(exit.success(), "highwater exited with {exit} after SIGTERM");
}

/// A server's log lines at WARN or ERROR.
fn warnings(server: &Server) -> Vec<String> {
    server
        .notable()
        .lines()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| matches!(event["level"].as_str(), Some("WARN" | "ERROR")))
        .map(|event| {
            let mut text = event["message"].as_str().unwrap_or_default().to_owned();
            for key in ["error", "cause"] {
                if let Some(detail) = event[key].as_str() {
                    text = format!("{text}: {detail}");
                }
            }
            text
        })
        .collect()
}

/// The text of the ERROR lines of a log (the start-up failure), or the
/// whole log when there is none.
fn error_message(log: &str) -> String {
    let errors: Vec<String> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["level"] == "ERROR")
        .map(|event| event["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    if errors.is_empty() {
        log.to_owned()
    } else {
        errors.join(" | ")
    }
}

// ---------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------

/// A filesystem mounted on a temp dir; lazily unmounted when dropped, even
/// when the test fails (declare it before any server using it, so the
/// server is dropped first).
struct Mount {
    dir: tempfile::TempDir,
    /// For a loop-mounted ext4: the directory holding its image file.
    image: Option<tempfile::TempDir>,
}

/// Size of the ext4 images, in MiB.
const EXT4_MIB: u64 = 16;

impl Mount {
    fn tmpfs(size: &str) -> Mount {
        let dir = tempfile::tempdir().expect("temp dir");
        run("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", path_str(dir.path())]);
        Mount { dir, image: None }
    }

    /// A fresh ext4 image, loop-mounted with `errors=remount-ro`.
    fn ext4() -> Mount {
        let dir = tempfile::tempdir().expect("temp dir");
        let image_dir = tempfile::tempdir().expect("temp dir");
        let image = image_dir.path().join("fs.img");
        fs::File::create(&image).expect("create the image").set_len(EXT4_MIB << 20).expect("size the image");
        run("mkfs.ext4", &["-q", "-F", path_str(&image)]);
        let mount = Mount { dir, image: Some(image_dir) };
        mount.mount_image();
        mount
    }

    fn image_path(&self) -> PathBuf {
        self.image.as_ref().expect("an ext4 mount").path().join("fs.img")
    }

    fn mount_image(&self) {
        run("mount", &["-o", "loop,errors=remount-ro", path_str(&self.image_path()), path_str(self.path())]);
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Injects an ext4 error, which makes the kernel remount it read-only.
    fn trigger_ext4_error(&self) {
        let source = run("findmnt", &["-n", "-o", "SOURCE", path_str(self.path())]);
        let device = Path::new(source.trim()).file_name().expect("a device name").to_string_lossy().into_owned();
        let trigger = format!("/sys/fs/ext4/{device}/trigger_fs_error");
        fs::write(&trigger, b"1\n").unwrap_or_else(|e| panic!("writing {trigger}: {e}"));
    }

    /// Unmounts, repairs the image with `e2fsck -fy` and mounts it again.
    /// Returns e2fsck's exit status.
    fn fsck_and_remount(&self) -> String {
        run("umount", &[path_str(self.path())]);
        let fsck = run_output("e2fsck", &["-fy", path_str(&self.image_path())]);
        // 0: clean; 1: errors corrected.
        assert!(
            matches!(fsck.status.code(), Some(0 | 1)),
            "e2fsck failed ({}): {}{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        self.mount_image();
        fsck.status.to_string()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// Runs a command that must succeed; returns its standard output.
fn run(program: &str, args: &[&str]) -> String {
    let output = run_output(program, args);
    assert!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn run_output(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}
