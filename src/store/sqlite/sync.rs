//! Making commits durable off the writer's path.
//!
//! With `synchronous = FULL` the writer thread waited out every commit's
//! fsync of the WAL before it could start on the next group, and the
//! writes queued meanwhile waited with it. Instead the writer commits with
//! `synchronous = NORMAL` (SQLite writes the WAL frames but does not sync
//! them) and hands the finished group to this thread, which syncs the WAL
//! file and only then reports the group's commits to the state cache and
//! answers its writes. The writer applies the next group during that
//! fsync, and one fsync covers every group committed before it started.
//!
//! Durability is unchanged: nobody is answered before the WAL holding
//! their write is synced, and SQLite still syncs the WAL header whenever
//! it starts the WAL over, and the WAL before every checkpoint copies from
//! it. Neither is anything shown before it is durable: the cache is told
//! of a commit only after its sync, and a read that went to the database
//! waits, through [`Durability`], until every commit it may have seen is
//! synced.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};
use std::thread;

use tokio::sync::watch;

use super::schema::OpenError;
use super::Answers;
use crate::store::cache::{GroupStates, StateCache};
use crate::store::StoreError;

/// Finished groups that may wait for the sync thread before the writer
/// waits for it: enough for the writer to run a group or two ahead.
const IN_FLIGHT: usize = 4;

/// Which commits are durable, shared by the writer, the sync thread and
/// readers.
pub struct Durability {
    /// The last group whose commit the writer has begun (groups count from 1).
    begun: AtomicU64,
    /// The last group whose fate is settled: synced, or known to have
    /// committed nothing.
    settled: watch::Sender<u64>,
    /// Set, with the reason, once a sync fails: from then on nothing more
    /// is written (see `SqliteStore`).
    failed: OnceLock<String>,
}

impl Durability {
    pub fn new() -> Self {
        Self { begun: AtomicU64::new(0), settled: watch::Sender::new(0), failed: OnceLock::new() }
    }

    /// Why writes are refused, once a sync of the WAL has failed.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Called by the writer just before it commits group `seq`.
    pub fn begin(&self, seq: u64) {
        self.begun.store(seq, Ordering::SeqCst);
    }

    /// Waits until every commit a read transaction that has already taken
    /// its snapshot can see is durable. Call it after the read: a commit
    /// the snapshot holds was begun, and so counted, before the snapshot
    /// was taken.
    pub async fn settle_reads(&self) {
        let seen = self.begun.load(Ordering::SeqCst);
        let mut settled = self.settled.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = settled.wait_for(|settled| *settled >= seen).await;
    }
}

/// A group the writer has finished: its answers wait for the WAL sync.
pub struct Finished {
    /// The group's place in commit order.
    pub seq: u64,
    pub answers: Answers,
    /// The commit's outcome; on `Err` nothing of the group was committed.
    pub committed: Result<(), StoreError>,
}

/// Makes everything written to the WAL so far durable.
type SyncWal = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// The sync thread; stopped by [`Syncer::stop`] once the writer is done.
pub struct Syncer {
    finished: SyncSender<Finished>,
    thread: thread::JoinHandle<()>,
}

impl Syncer {
    /// Opens the WAL of the database at `path` (the writer has created it)
    /// and starts the thread.
    pub fn start(
        path: &Path,
        durability: Arc<Durability>,
        cache: Arc<StateCache>,
        states: Arc<GroupStates>,
    ) -> Result<Self, OpenError> {
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        let wal_path = PathBuf::from(wal_path);
        let shown = wal_path.display().to_string();
        // fsync applies to the file, whichever descriptor it is called on.
        let wal = File::open(&wal_path).map_err(|source| OpenError::Wal { path: shown.clone(), source })?;
        Self::with(shown, Box::new(move || wal.sync_data()), durability, cache, states).map_err(OpenError::Thread)
    }

    fn with(
        shown: String,
        sync: SyncWal,
        durability: Arc<Durability>,
        cache: Arc<StateCache>,
        states: Arc<GroupStates>,
    ) -> std::io::Result<Self> {
        let (finished, queue) = mpsc::sync_channel(IN_FLIGHT);
        let thread = thread::Builder::new()
            .name("hw-sqlite-sync".to_owned())
            .spawn(move || run(sync, &shown, &queue, &durability, &cache, &states))?;
        Ok(Self { finished, thread })
    }

    /// Hands a finished group over; waits only when [`IN_FLIGHT`] groups
    /// are already waiting for their sync.
    pub fn send(&self, group: Finished) {
        if let Err(mpsc::SendError(group)) = self.finished.send(group) {
            // The thread is gone (it never returns early, so it panicked):
            // nothing can be made durable any more.
            let error = StoreError::Internal("the SQLite sync thread has stopped".to_owned());
            for (reply, _) in group.answers {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }

    /// Waits for every group handed over to be answered, then stops.
    pub fn stop(self) {
        drop(self.finished);
        if self.thread.join().is_err() {
            tracing::error!("the SQLite sync thread panicked");
        }
    }
}

fn run(
    mut sync: SyncWal,
    path: &str,
    queue: &Receiver<Finished>,
    durability: &Durability,
    cache: &StateCache,
    states: &GroupStates,
) {
    while let Ok(first) = queue.recv() {
        let mut groups = vec![first];
        groups.extend(queue.try_iter());
        let any_committed = groups.iter().any(|group| group.committed.is_ok());
        let synced = match durability.failure() {
            Some(failure) => Err(failure.to_owned()),
            None if any_committed => sync().map_err(|error| {
                let failure = format!("syncing {path} failed: {error}");
                // A failed fsync may have dropped the pages it did not write
                // (the kernel marks them clean), and later syncs would report
                // success: the store must not go on as if they were on disk.
                tracing::error!(
                    path,
                    %error,
                    "could not make committed writes durable: refusing writes from now on; \
                     restart Highwater to recover from what is on disk"
                );
                let _ = durability.failed.set(failure.clone());
                failure
            }),
            None => Ok(()),
        };
        let last = groups.last().map_or(0, |group| group.seq);
        for group in groups {
            answer(group, synced.clone(), cache);
        }
        states.settle(last);
        durability.settled.send_replace(last);
    }
}

/// Reports a group's commit to the cache, when it is durable, and answers
/// its writes.
fn answer(group: Finished, synced: Result<(), String>, cache: &StateCache) {
    let Finished { mut answers, committed, .. } = group;
    let committed = committed.and_then(|()| synced.map_err(StoreError::Internal));
    if committed.is_ok() {
        // Before anyone is answered, and in the order the writes were made.
        cache.committed(answers.iter_mut().filter_map(|(_, result)| result.as_mut().ok()?.cache.take()));
    }
    for (reply, result) in answers {
        let result = match (&committed, result) {
            (Err(error), Ok(_)) => Err(error.clone()),
            (_, result) => result.map(|done| done.output),
        };
        // A client that went away no longer waits for its answer.
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::state::{ConnectionId, StoredState};
    use crate::store::cache::{Cached, Update, Version};
    use crate::store::sqlite::Done;

    /// A write job's answer channel, and a finished group of that one job.
    fn group(
        seq: u64,
        committed: Result<(), StoreError>,
    ) -> (Finished, oneshot::Receiver<Result<super::super::Output, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let done = Done { output: Box::new(seq), cache: None };
        (Finished { seq, answers: vec![(reply, Ok(done))], committed }, answer)
    }

    fn syncer(sync: SyncWal) -> (Syncer, Arc<Durability>, Arc<StateCache>) {
        let (syncer, durability, cache, _) = syncer_with_states(sync);
        (syncer, durability, cache)
    }

    /// A sync that counts its calls and answers `outcome`, and the count.
    fn counted(outcome: fn() -> std::io::Result<()>) -> (SyncWal, Arc<AtomicUsize>) {
        let syncs = Arc::new(AtomicUsize::new(0));
        let counter = syncs.clone();
        let sync = Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            outcome()
        });
        (sync, syncs)
    }

    fn syncer_with_states(sync: SyncWal) -> (Syncer, Arc<Durability>, Arc<StateCache>, Arc<GroupStates>) {
        let durability = Arc::new(Durability::new());
        let cache = Arc::new(StateCache::new(1 << 20));
        let states = Arc::new(GroupStates::default());
        let syncer = Syncer::with("test-wal".to_owned(), sync, durability.clone(), cache.clone(), states.clone())
            .expect("thread");
        (syncer, durability, cache, states)
    }

    #[tokio::test]
    async fn the_writer_lets_go_of_a_state_once_it_is_durable() {
        let (syncer, durability, _cache, states) = syncer_with_states(Box::new(|| Ok(())));
        let id = ConnectionId::random();
        let version = Version { revision: 1, epoch: 0, next_seq: 1 };
        let cached = Cached { state: Arc::new(StoredState::default()), positions: Arc::new(Vec::new()) };
        states.begin(1);
        states.note(id, &Update::Put(version, cached.clone()));
        assert!(states.get(id, version).is_some());

        durability.begin(1);
        let (finished, answer) = group(1, Ok(()));
        syncer.send(finished);
        answer.await.expect("answered").expect("the write succeeds");
        tokio::time::timeout(Duration::from_secs(5), durability.settle_reads()).await.expect("settled");
        // A large state would otherwise stay in memory until the next write.
        assert!(states.get(id, version).is_none(), "a settled group's state is still held");
        assert_eq!(Arc::strong_count(&cached.state), 1);
        syncer.stop();
    }

    #[tokio::test]
    async fn nobody_is_answered_and_the_cache_learns_nothing_before_the_wal_is_synced() {
        let (entered, syncing) = mpsc::channel();
        let (release, gate) = mpsc::channel::<()>();
        let (syncer, durability, cache) = syncer(Box::new(move || {
            entered.send(()).expect("test waits");
            gate.recv().map_err(std::io::Error::other)
        }));
        durability.begin(1);
        let (finished, mut answer) = group(1, Ok(()));
        syncer.send(finished);
        syncing.recv_timeout(Duration::from_secs(5)).expect("the sync starts");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(answer.try_recv().is_err(), "answered before the sync returned");
        assert_eq!(cache.commits(), 0, "the cache was told before the sync returned");
        assert_eq!(*durability.settled.borrow(), 0);

        release.send(()).expect("sync waits");
        let output = answer.await.expect("answered").expect("the write succeeds");
        assert_eq!(output.downcast::<u64>().map(|seq| *seq).ok(), Some(1));
        assert_eq!(cache.commits(), 1);
        tokio::time::timeout(Duration::from_secs(5), durability.settle_reads()).await.expect("settled");
        syncer.stop();
    }

    #[tokio::test]
    async fn a_read_waits_for_every_commit_begun_before_it_finished() {
        let durability = Durability::new();
        durability.settle_reads().await;
        durability.begin(1);
        durability.begin(2);
        let waiting = tokio::time::timeout(Duration::from_millis(50), durability.settle_reads()).await;
        assert!(waiting.is_err(), "a read went on before the commits it may show were durable");
        durability.settled.send_replace(1);
        let waiting = tokio::time::timeout(Duration::from_millis(50), durability.settle_reads()).await;
        assert!(waiting.is_err(), "a read went on with one of its commits not yet durable");
        durability.settled.send_replace(2);
        tokio::time::timeout(Duration::from_secs(5), durability.settle_reads()).await.expect("settled");
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_writes_and_every_one_after_it() {
        let (sync, syncs) = counted(|| Err(std::io::Error::other("injected EIO")));
        let (syncer, durability, cache) = syncer(sync);
        durability.begin(1);
        let (finished, answer) = group(1, Ok(()));
        syncer.send(finished);
        let error = answer.await.expect("answered").expect_err("the write fails");
        assert!(matches!(error, StoreError::Internal(_)), "{error:?}");
        assert!(durability.failure().is_some_and(|why| why.contains("injected EIO")), "{:?}", durability.failure());

        // Committed after the failure: never trusted to a later sync, whose
        // success would mean nothing.
        durability.begin(2);
        let (finished, answer) = group(2, Ok(()));
        syncer.send(finished);
        assert!(answer.await.expect("answered").is_err(), "a write after a failed sync succeeded");
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        assert_eq!(cache.commits(), 0);
        // Reads are not left waiting.
        tokio::time::timeout(Duration::from_secs(5), durability.settle_reads()).await.expect("settled");
        syncer.stop();
    }

    #[tokio::test]
    async fn a_group_that_did_not_commit_is_answered_without_a_sync() {
        let (sync, syncs) = counted(|| Ok(()));
        let (syncer, durability, cache) = syncer(sync);
        durability.begin(1);
        let (finished, answer) = group(1, Err(StoreError::Full("injected".to_owned())));
        syncer.send(finished);
        let error = answer.await.expect("answered").expect_err("the write fails");
        assert!(matches!(error, StoreError::Full(_)), "{error:?}");
        tokio::time::timeout(Duration::from_secs(5), durability.settle_reads()).await.expect("settled");
        assert_eq!(syncs.load(Ordering::SeqCst), 0);
        assert_eq!(cache.commits(), 0);
        assert!(durability.failure().is_none());
        syncer.stop();
    }
}
