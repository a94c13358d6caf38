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
//!
//! A passive checkpoint cannot start the WAL over: SQLite writes from the
//! WAL's beginning again only when a write transaction begins with every
//! frame already copied, and under a steady load the writer has always
//! appended more by the time this thread is done. So once this thread has
//! copied a large WAL, it asks the writer to copy the few frames that came
//! since, between two groups (see [`Checkpointer::tail_wanted`]): with no
//! write in between, that checkpoint copies everything and the next group
//! starts the WAL over.
//!
//! Before that, bench/'s write load (32 clients, ~19k writes/s) filled the
//! WAL to the backstop every ~140 ms, and the writer then copied it and
//! synced the database file itself: 61 groups in 8 s took 10-20 ms instead
//! of ~0.3 ms, ~7% of the writer's time. With it, 5 took over 3 ms, the
//! writer's own checkpoints take 1-5 ms every ~110 ms, and the writes' p99
//! fell from 17.2-17.9 ms to 13.3-13.9 ms in three alternated 8 s runs
//! (writes/s unchanged). The p99 left is mostly this thread's sync of the
//! database file (5-8 ms), which the WAL's syncs wait behind.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
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

/// The WAL, in pages, from which this thread asks the writer to copy the
/// rest (4 MiB at 4 KiB pages). A smaller WAL is left to start over when
/// the writer next finds everything copied, as it does whenever writes
/// pause; a checkpoint on the writer costs two fsyncs between groups.
const TAIL_PAGES: i64 = 1024;

/// The checkpoint thread; stopped by [`Checkpointer::stop`] (or on drop of
/// the writer that owns it).
pub struct Checkpointer {
    wake: SyncSender<()>,
    tail: Arc<AtomicBool>,
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
        let tail = Arc::new(AtomicBool::new(false));
        let wanted = tail.clone();
        let thread = thread::Builder::new()
            .name("hw-checkpoint".to_owned())
            .spawn(move || run(&conn, &woken, &wanted, &shown))
            .map_err(OpenError::Thread)?;
        Ok(Self { wake, tail, thread })
    }

    /// Whether the writer should checkpoint now, between two groups: this
    /// thread has just copied a large WAL, and only what was committed
    /// meanwhile is left. Asked once, answers true once.
    pub fn tail_wanted(&self) -> bool {
        self.tail.swap(false, Ordering::Relaxed)
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

fn run(conn: &Connection, woken: &Receiver<()>, tail: &AtomicBool, path: &str) {
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
                if wal_pages >= TAIL_PAGES && copied == wal_pages {
                    tail.store(true, Ordering::Relaxed);
                }
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

/// The writer's checkpoint of what was committed since the last one
/// ([`Checkpointer::tail_wanted`]); a failure is the next one's to fix.
/// Safe as this thread's are: SQLite syncs the WAL before a checkpoint
/// copies from it, and the database file before the WAL may start over.
pub fn tail(writer: &Connection) {
    let started = std::time::Instant::now();
    let outcome = writer
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)));
    match outcome {
        Ok((wal_pages, copied)) => {
            tracing::trace!(
                wal_pages,
                copied,
                elapsed_us = started.elapsed().as_micros() as u64,
                "WAL tail checkpoint"
            );
        }
        Err(error) => tracing::debug!(%error, "the writer's WAL checkpoint failed; the checkpoint thread goes on"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (frames in the WAL since it last started over, frames copied), as a
    /// passive checkpoint on `conn` leaves them.
    fn checkpoint(conn: &Connection) -> (i64, i64) {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(1)?, row.get(2)?))).unwrap()
    }

    const WRITE: &str = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20) \
                         INSERT INTO t (v) SELECT zeroblob(3000) FROM n";

    /// As under a steady load: the checkpoint thread copies the WAL while
    /// the writer is in a transaction, which it then commits.
    fn write_across_a_checkpoint(writer: &Connection, other: &Connection) {
        writer.execute_batch(&format!("BEGIN IMMEDIATE; {WRITE}")).unwrap();
        let (wal, copied) = checkpoint(other);
        assert_eq!(copied, wal);
        writer.execute_batch("COMMIT").unwrap();
    }

    #[test]
    fn the_writers_checkpoint_of_the_tail_lets_the_wal_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = Connection::open(&path).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer.execute_batch(&format!("CREATE TABLE t (v BLOB); {WRITE}")).unwrap();
        let other = Connection::open(&path).unwrap();
        checkpoint(&other);

        // Each round begins with everything copied, so its first write
        // starts the WAL over; the WAL then holds what followed.
        writer.execute_batch(WRITE).unwrap();
        write_across_a_checkpoint(&writer, &other);
        writer.execute_batch(WRITE).unwrap();
        let (grown, _) = checkpoint(&other);

        writer.execute_batch(WRITE).unwrap();
        write_across_a_checkpoint(&writer, &other);
        tail(&writer);
        writer.execute_batch(WRITE).unwrap();
        let (started_over, _) = checkpoint(&other);

        assert!(
            started_over * 2 < grown,
            "after the tail's checkpoint the WAL held only the last write: {started_over} frames against {grown}"
        );
    }
}
