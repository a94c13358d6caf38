//! Opening SQLite files: connection settings, the guard against foreign or
//! newer files, and the migrations in `migrations/sqlite/`.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// Marks a file as Highwater's (`PRAGMA application_id`, "HWTR").
const APPLICATION_ID: i64 = 0x4857_5452;

/// The migrations, in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../migrations/sqlite/0002_fewer_write_indexes.sql"),
    include_str!("../../../migrations/sqlite/0003_checks_without_lists.sql"),
    include_str!("../../../migrations/sqlite/0004_revisions_beside_changes.sql"),
    include_str!("../../../migrations/sqlite/0005_binary_connection_ids.sql"),
    include_str!("../../../migrations/sqlite/0006_heads.sql"),
    include_str!("../../../migrations/sqlite/0007_revisions_on_changes.sql"),
];

/// Why a database file cannot be used. Shown at start-up, so it names the
/// file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the SQLite database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error(
        "{path} is not a Highwater database (it is not SQLite, or it holds other data); \
         refusing to touch it. Point --database-url at a new or Highwater file"
    )]
    Foreign { path: String },
    #[error(
        "{path} has schema version {found}, newer than this Highwater understands ({known}); \
         upgrade Highwater"
    )]
    TooNew { path: String, found: i64, known: usize },
    #[error(
        "{path} has schema version {found} but this Highwater needs {known}; \
         run `highwater migrate` or start without --migrate false"
    )]
    TooOld { path: String, found: i64, known: usize },
    #[error(
        "{path} is damaged ({first}); refusing to serve from it. Restore it from a backup \
         (highwater export / import) or repair it with the sqlite3 .recover command"
    )]
    Corrupt { path: String, first: String },
    #[error(
        "{path} is read-only (a read-only filesystem or no write permission); Highwater needs to write it \
         and its -wal and -shm files next to it"
    )]
    ReadOnly { path: String },
    #[error(
        "{path} is in use by another Highwater process (a server, or an import or migration); \
         one process at a time serves a SQLite database. Stop the other one, or use PostgreSQL \
         to run several nodes"
    )]
    InUse { path: String },
    #[error("cannot open {path} to lock it: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error("cannot start the SQLite writer thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot open the WAL {path} to sync it: {source}")]
    Wal { path: String, source: std::io::Error },
    #[error("cannot prepare the SQLite database {path}: {source}")]
    Setup { path: String, source: rusqlite::Error },
}

/// Opens the writer connection, checks the file is Highwater's and applies
/// pending migrations.
/// Files up to this size are checked page by page before serving; larger
/// ones are checked in the background (see `SqliteStore::open`), so that
/// start-up stays fast. The check reads ~1.7 ms per MB (bench/run's
/// start-up figure: 111 ms on a 50 MiB file when the bound was 64 MiB,
/// 31 ms on a 14 MiB one), so 16 MiB keeps it near 30 ms.
pub const SYNC_CHECK_BYTES: u64 = 16 * 1024 * 1024;

pub fn open_writer(path: &Path, apply: bool) -> Result<Connection, OpenError> {
    let shown = path.display().to_string();
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|source| not_writable(path, &shown, source))?;
    check_ownership(&conn, &shown).map_err(|error| match error {
        OpenError::Open { source, .. } => not_writable(path, &shown, source),
        other => other,
    })?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size <= SYNC_CHECK_BYTES {
        check_integrity(&conn, &shown)?;
    }
    let setup = |source| OpenError::Setup { path: shown.clone(), source };
    // WAL lets readers proceed beside the writer; FULL syncs the WAL on every
    // commit, so an acknowledged write survives a power cut.
    conn.pragma_update(None, "journal_mode", "WAL").map_err(setup)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(setup)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(setup)?;
    migrate(&mut conn, &shown, apply)?;
    Ok(conn)
}

/// Takes the lock that makes this process the file's only writer (see
/// `SqliteStore`), held while the returned file stays open. It is an `flock`
/// on the database file itself, which SQLite's own (POSIX) locks ignore.
/// `None`, with a warning, where the filesystem has no such locks: the
/// store then checks the database on every read instead of trusting its
/// cache.
pub fn lock(path: &Path) -> Result<Option<std::fs::File>, OpenError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| OpenError::Lock { path: shown.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::InUse { path: shown }),
        Err(std::fs::TryLockError::Error(error)) => {
            tracing::warn!(path = %shown, %error, "cannot lock the database file; reads check the database for changes");
            Ok(None)
        }
    }
}

/// Opens a read-only connection to a file [`open_writer`] has prepared.
pub fn open_reader(path: &Path) -> Result<Connection, rusqlite::Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Says "read-only" when that is why SQLite cannot open the file (it needs
/// to write the file and its -wal and -shm companions).
fn not_writable(path: &Path, shown: &str, source: rusqlite::Error) -> OpenError {
    let probe = std::fs::OpenOptions::new().append(true).open(path);
    match probe.map_err(|e| e.kind()) {
        Err(std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied) => {
            OpenError::ReadOnly { path: shown.to_owned() }
        }
        _ => OpenError::Open { path: shown.to_owned(), source },
    }
}

/// Refuses files that are not SQLite, or SQLite files that hold someone
/// else's tables, before anything is written to them.
fn check_ownership(conn: &Connection, path: &str) -> Result<(), OpenError> {
    let foreign = || OpenError::Foreign { path: path.to_owned() };
    // Only "not a database" means foreign; a read-only or unreadable file
    // is reported as what it is.
    let classify = |source: rusqlite::Error| match source.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => foreign(),
        _ => OpenError::Open { path: path.to_owned(), source },
    };
    let app_id: i64 = conn.pragma_query_value(None, "application_id", |row| row.get(0)).map_err(classify)?;
    if app_id == APPLICATION_ID {
        return Ok(());
    }
    let objects: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0)).map_err(classify)?;
    if app_id == 0 && objects == 0 {
        return Ok(());
    }
    Err(foreign())
}

/// Checks every page of an existing database before serving from it, so a
/// damaged file is refused at start-up rather than failing requests later.
pub fn check_integrity(conn: &Connection, path: &str) -> Result<(), OpenError> {
    let setup = |source| OpenError::Setup { path: path.to_owned(), source };
    let mut stmt = conn.prepare("PRAGMA quick_check").map_err(setup)?;
    let problems: Vec<String> = stmt.query_map([], |row| row.get(0)).and_then(Iterator::collect).map_err(setup)?;
    match problems.as_slice() {
        [ok] if ok == "ok" => Ok(()),
        _ => Err(OpenError::Corrupt { path: path.to_owned(), first: problems.into_iter().next().unwrap_or_default() }),
    }
}

fn migrate(conn: &mut Connection, path: &str, apply: bool) -> Result<(), OpenError> {
    let setup = |source| OpenError::Setup { path: path.to_owned(), source };
    let read = |name: &str| conn.pragma_query_value(None, name, |row| row.get::<_, i64>(0));
    let (version, app_id) = (read("user_version").map_err(setup)?, read("application_id").map_err(setup)?);
    // Nothing to do: write nothing, so a full or read-only disk can still
    // serve reads after a restart.
    if version == MIGRATIONS.len() as i64 && app_id == APPLICATION_ID {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(setup)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(setup)?;
    let known = MIGRATIONS.len();
    if version > known as i64 {
        return Err(OpenError::TooNew { path: path.to_owned(), found: version, known });
    }
    if version < known as i64 && !apply {
        return Err(OpenError::TooOld { path: path.to_owned(), found: version, known });
    }
    if version > 0 {
        // Said before, not only after: some migrations copy every table, and
        // a start-up that takes a minute should say why while it does.
        tracing::info!(
            path,
            from = version,
            to = known,
            "upgrading the SQLite schema in one transaction; on a large file this takes a while \
             (about a minute per GB measured), and an interruption leaves the file as it was"
        );
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql).map_err(setup)?;
        // DDL moves the schema cookie by itself; an edit of a table's text
        // (schema 3) does not, and every connection, this one included,
        // must see that the schema changed.
        let cookie: i64 = tx.pragma_query_value(None, "schema_version", |row| row.get(0)).map_err(setup)?;
        tx.pragma_update(None, "schema_version", cookie + 1).map_err(setup)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64).map_err(setup)?;
        tracing::info!(path, version = index + 1, "applied SQLite migration");
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(setup)?;
    tx.commit().map_err(setup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_is_created_and_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hw.db");
        let conn = open_writer(&path, true).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        drop(conn);
        // Opening again applies nothing and succeeds.
        open_writer(&path, true).unwrap();
    }

    /// The connection [`file_at_schema`] holds, in the text form schemas
    /// before 5 stored.
    const C: &str = "0000000c-0000-4000-8000-00000000000c";

    /// A Highwater file at an older schema `version`, as that version made
    /// it, holding one stream connection [`C`]; with its directory, its path
    /// and a connection to it.
    fn file_at_schema(version: usize) -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hw.db");
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64).unwrap();
        conn.pragma_update(None, "application_id", APPLICATION_ID).unwrap();
        conn.execute(
            "INSERT INTO connections (connection_id, state_type, revision, next_seq) VALUES (?1, 'stream', 1, 1)",
            [C],
        )
        .unwrap();
        (dir, path, conn)
    }

    #[test]
    fn a_file_another_process_serves_is_not_migrated() {
        let (_dir, path, conn) = file_at_schema(5);
        drop(conn);
        // flock conflicts between two opens of the file in one process too.
        let other = lock(&path).unwrap();
        let opened = crate::store::sqlite::SqliteStore::open(&path, true, 1 << 20, true);
        assert!(matches!(opened, Err(OpenError::InUse { .. })), "{:?}", opened.err());
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 5, "the file was migrated under the process serving it");
        drop(other);
        assert!(crate::store::sqlite::SqliteStore::open(&path, true, 1 << 20, true).is_ok());
    }

    #[test]
    fn a_file_at_schema_1_is_upgraded_in_place() {
        let (_dir, path, conn) = file_at_schema(1);
        drop(conn);
        let conn = open_writer(&path, true).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let dropped = "SELECT count(*) FROM sqlite_master WHERE name IN ('changes_by_key', 'entries_in_order')";
        assert_eq!(conn.query_row(dropped, [], |r| r.get::<_, i64>(0)).unwrap(), 0);
        let kept: i64 = conn.query_row("SELECT count(*) FROM connections", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, 1);
    }

    /// The opcodes SQLite compiles `statements` to, on `conn`.
    fn opcodes(conn: &Connection, statements: &[&str]) -> Vec<String> {
        let mut opcodes = Vec::new();
        for sql in statements {
            let mut explain = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
            let count = explain.parameter_count();
            let rows = explain.query_map(rusqlite::params_from_iter(vec![None::<i64>; count]), |r| r.get(1)).unwrap();
            opcodes.extend(rows.map(Result::unwrap));
        }
        opcodes
    }

    #[test]
    fn a_file_at_schema_2_gets_its_type_checks_without_temporary_tables() {
        use crate::store::sqlite::queries::{ADD_REVISION, SET_HEADER};
        let (_dir, path, conn) = file_at_schema(2);
        // The write path's statements on the connection's row and the
        // revision's row, as schema 2 had them.
        let schema_2 = [
            "INSERT INTO connections (connection_id, state_type, revision, next_seq) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (connection_id) DO UPDATE SET state_type = ?2, revision = ?3, next_seq = ?4",
            "INSERT INTO revisions (connection_id, revision, created_at_ms, state_type, actor, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        ];
        assert!(opcodes(&conn, &schema_2).iter().any(|op| op == "OpenEphemeral"), "schema 2 was expected to use them");
        drop(conn);

        // The connection that migrated is the one that goes on to write.
        let conn = open_writer(&path, true).unwrap();
        let ephemeral: Vec<String> =
            opcodes(&conn, &[SET_HEADER, ADD_REVISION]).into_iter().filter(|op| op == "OpenEphemeral").collect();
        assert!(ephemeral.is_empty(), "the write statements still build temporary tables");
        // The tables holding the connection's row and the revision's row.
        let insert = |table: &str, state_type: Option<&str>| {
            let sql = match table {
                "heads" => "INSERT INTO heads (connection_id, entry_key, state_type, revision) VALUES (?1, '', ?2, 1)",
                _ => {
                    "INSERT INTO history (connection_id, revision, entry_key, created_at_ms, state_type) \
                     VALUES (?1, 1, '', 0, ?2)"
                }
            };
            conn.execute(sql, rusqlite::params![format!("{table}-{state_type:?}"), state_type])
        };
        for table in ["heads", "history"] {
            for allowed in [Some("legacy"), Some("global"), Some("stream"), None] {
                insert(table, allowed).unwrap_or_else(|e| panic!("{table} refused {allowed:?}: {e}"));
            }
            for refused in [Some("not_set"), Some("Stream"), Some("")] {
                assert!(insert(table, refused).is_err(), "{table} accepted {refused:?}");
            }
        }
        let id = crate::state::ConnectionId::parse(C).unwrap();
        let kept = crate::store::sqlite::queries::header(&conn, id).unwrap().unwrap();
        assert_eq!(kept.state_type, Some(crate::state::StateType::Stream));
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }

    /// Every row of `table` (a table or view), in order, as text, with
    /// the connection id as `id` gives it.
    fn rows_of(conn: &Connection, table: &str, id: &str) -> Vec<String> {
        let sql = format!("SELECT {id}, * FROM {table} ORDER BY 1, revision");
        let mut stmt = conn.prepare(&sql).unwrap();
        let columns = stmt.column_count();
        let rows = stmt
            .query_map([], |row| {
                // Column 1 is the stored id itself, whose form changed.
                let values: Vec<String> = (0..columns)
                    .filter(|&i| i != 1)
                    .map(|i| row.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}")))
                    .collect::<Result<_, _>>()?;
                Ok(values.join("|"))
            })
            .unwrap();
        rows.map(Result::unwrap).collect()
    }

    #[test]
    fn a_file_at_schema_3_keeps_its_connections_history_entries_and_leases() {
        use crate::store::sqlite::queries::{header, lease_row};
        let (_dir, path, conn) = file_at_schema(3);
        conn.execute_batch(&format!(
            "UPDATE connections SET revision = 3, next_seq = 2 WHERE connection_id = '{C}';
             INSERT INTO revisions VALUES ('{C}', 1, 1000, 'stream', 'orchestrator', NULL);
             INSERT INTO revisions VALUES ('{C}', 2, 2000, NULL, NULL, 'reset');
             INSERT INTO revisions VALUES ('{C}', 3, 3000, 'stream', NULL, NULL);
             INSERT INTO changes VALUES ('{C}', 1, 's[\"a\",null]', '{{\"cursor\":1}}', 0);
             INSERT INTO changes VALUES ('{C}', 2, 's[\"a\",null]', NULL, NULL);
             INSERT INTO changes VALUES ('{C}', 3, 's[\"b\",null]', '{{\"cursor\":2}}', 1);
             INSERT INTO entries VALUES ('{C}', 's[\"b\",null]', 1, 3);
             INSERT INTO leases VALUES ('{C}', 'worker-1', 'token-1', 4102444800000);"
        ))
        .unwrap();
        let text_id = "replace(connection_id, '-', '')";
        let before: Vec<Vec<String>> = ["connections", "revisions", "changes", "entries"]
            .iter()
            .map(|table| rows_of(&conn, table, text_id))
            .collect();
        drop(conn);

        let conn = open_writer(&path, true).unwrap();
        let blob_id = "lower(hex(connection_id))";
        let after: Vec<Vec<String>> = ["connections", "revisions", "changes", "entries"]
            .iter()
            .map(|table| rows_of(&conn, table, blob_id))
            .collect();
        assert_eq!(after, before);
        assert_eq!(before.iter().map(Vec::len).collect::<Vec<_>>(), [1, 3, 3, 1]);
        let id = crate::state::ConnectionId::parse(C).unwrap();
        let head = header(&conn, id).unwrap().unwrap();
        assert_eq!((head.revision, head.next_seq), (3, 2));
        assert_eq!(lease_row(&conn, id).unwrap().unwrap().token, "token-1");
        let revision_rows: i64 =
            conn.query_row("SELECT count(*) FROM history WHERE entry_key = ''", [], |r| r.get(0)).unwrap();
        assert_eq!(revision_rows, 3);
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        let text = "not a database, but important to someone ".repeat(100);
        std::fs::write(&path, &text).unwrap();
        assert!(matches!(open_writer(&path, true), Err(OpenError::Foreign { .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn another_programs_sqlite_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path).unwrap().execute_batch("CREATE TABLE t (x)").unwrap();
        assert!(matches!(open_writer(&path, true), Err(OpenError::Foreign { .. })));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hw.db");
        let conn = open_writer(&path, true).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(open_writer(&path, true), Err(OpenError::TooNew { found: 99, .. })));
    }
}
