//! Folding the WAL back into the database file off the writer's path.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses the
//! threshold, so one writer in every few hundred commits pays for copying
//! pages and an fsync of the database file while every write queued behind
//! it waits. Here a thread of its own runs a passive checkpoint (it never
//! blocks the writer or readers) a short while after commits, and the
//! writer keeps SQLite's own checkpoint only as a backstop for a WAL that
//! grows past [`WRITER_BACKSTOP_PAGES`] because this thread cannot keep up
//! or keeps failing.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::schema::OpenError;

/// How long the checkpointer lets commits accumulate before folding them in:
/// a page written by many commits in that time is copied once.
const INTERVAL: Duration = Duration::from_millis(100);

/// The writer checkpoints by itself only when the WAL holds this many pages
/// (32 MiB at 4 KiB pages).
pub const WRITER_BACKSTOP_PAGES: i64 = 8192;

/// The checkpoint thread; stopped by [`Checkpointer::stop`] (or on drop of
/// the writer that owns it).
pub struct Checkpointer {
    wake: SyncSender<()>,
    thread: thread::JoinHandle<()>,
}

impl Checkpointer {
    /// Opens a connection of its own to `path` and starts the thread.
    pub fn start(path: &Path) -> Result<Self, OpenError> {
        let shown = path.display().to_string();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)
            .and_then(|conn| conn.busy_timeout(Duration::from_secs(5)).map(|()| conn))
            .map_err(|source| OpenError::Open { path: shown.clone(), source })?;
        let (wake, woken) = mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name("hw-checkpoint".to_owned())
            .spawn(move || run(&conn, &woken, &shown))
            .map_err(OpenError::Thread)?;
        Ok(Self { wake, thread })
    }

    /// Tells the thread that a commit added to the WAL. Never blocks.
    pub fn poke(&self) {
        // Full: a wake-up is already pending. Disconnected: cannot happen
        // while `self` holds the sender.
        let _ = self.wake.try_send(());
    }

    /// Stops the thread once its current checkpoint, if any, is done.
    pub fn stop(self) {
        drop(self.wake);
        if self.thread.join().is_err() {
            tracing::error!("the SQLite checkpoint thread panicked");
        }
    }
}

fn run(conn: &Connection, woken: &Receiver<()>, path: &str) {
    let mut failing = false;
    while woken.recv().is_ok() {
        thread::sleep(INTERVAL);
        // Commits made while sleeping are folded in by this checkpoint.
        let _ = woken.try_recv();
        let outcome = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)));
        match outcome {
            Ok((wal_pages, copied)) => {
                if failing {
                    tracing::info!(path, wal_pages, copied, "WAL checkpoints work again");
                    failing = false;
                }
                tracing::trace!(path, wal_pages, copied, "WAL checkpoint");
            }
            // Said once per run of failures: a full or read-only disk makes
            // every attempt fail until it is fixed, and the writer reports it.
            Err(error) if !failing => {
                tracing::warn!(path, %error, "WAL checkpoint failed; the WAL grows until it works again");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
