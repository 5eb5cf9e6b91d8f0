//! The name store: which key each name is bound to, persisted in SQLite so
//! bindings survive a tracker restart.
//!
//! [`NameStore`] is the narrow interface the rest of the tracker uses; the
//! SQLite file is one implementation (a NATS key-value one can sit beside it).
//!
//! Reads (may this key take this name, who holds it) are one indexed lookup
//! on a read connection, inline. Writes (a binding at enrollment, the last
//! use at logout) go to the store's own thread, which commits them in
//! batches: no session waits for the disk on an async worker (a WAL
//! checkpoint `fsync`s), and enrollments that arrive together share one
//! commit instead of paying a WAL append and its file locks each.

use std::{
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};
use tincan_proto::{Name, PeerId};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How long a name stays bound to the key that last used it: within this
/// window after its last session, another key cannot take it.
pub const NAME_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Writes waiting for the store's thread. A binding that finds the queue
/// full is refused as `Unavailable` (the peer tries again later); a
/// last-use record is dropped with a warning (the name then counts as last
/// used at its binding).
pub const WRITE_QUEUE: usize = 4096;
/// Most writes in one transaction.
pub const WRITE_BATCH: usize = 256;
/// After the first write of a batch, how long the thread waits for more
/// before it commits: enrollments that arrive together share a commit. An
/// enrollment waits for its binding's commit, so this is added to it once.
pub const WRITE_LINGER: Duration = Duration::from_millis(2);
/// The read connection maps this much of the main file, so its lookups
/// read checkpointed pages without a `pread` each (pages still in the WAL
/// are read with `pread` whatever this is).
const READ_MMAP_BYTES: u64 = 64 << 20;

/// Why a key may not have a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("name is bound to another key")]
    BoundToOtherKey,
}

/// The store itself failed (I/O, corruption, its thread gone). Cloneable:
/// a failed commit fails every binding in it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("tracker database {path}: {source}")]
pub struct StoreError {
    path: String,
    source: Arc<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    pub fn new(path: &str, source: rusqlite::Error) -> Self {
        Self {
            path: path.to_string(),
            source: Arc::new(source),
        }
    }

    /// A failure that is not SQLite's (the store's thread, its queue).
    fn other(path: &str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            path: path.to_string(),
            source: Arc::new(source),
        }
    }

    fn busy(path: &str, why: &'static str) -> Self {
        Self::other(path, std::io::Error::other(why))
    }
}

/// What the store says of a key taking a name.
pub type Verdict = Result<Result<(), BindError>, StoreError>;

/// A write that completes later, on the store's own time.
pub type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Name → key bindings.
pub trait NameStore: Send + Sync + 'static {
    /// Binds `name` to `id` at time `now` (seconds since the epoch), unless
    /// another key used it within the retention window. Resolves once the
    /// binding is committed.
    fn bind(&self, name: &Name, id: PeerId, now: u64) -> Pending<Verdict>;
    /// Whether `bind` would succeed, without binding.
    fn check(&self, name: &Name, id: PeerId, now: u64) -> Verdict;
    /// Records that `id` was last seen with `name` at `now`, in the background.
    fn touch(&self, name: &Name, id: PeerId, now: u64);
    /// Resolves once every write queued before it is committed.
    fn flush(&self) -> Pending<()>;
    /// The key `name` is bound to (online or not), with the name's
    /// enrolled spelling.
    fn bound(&self, name: &Name) -> Result<Option<(Name, PeerId)>, StoreError>;
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// SQLite integers are signed; seconds since the epoch fit for 292 billion years.
fn sql_time(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// A write for the store's thread.
enum Write {
    Bind {
        name: Name,
        id: PeerId,
        now: u64,
        reply: oneshot::Sender<Verdict>,
    },
    Touch {
        name: Name,
        id: PeerId,
        now: u64,
    },
    Flush(oneshot::Sender<()>),
}

/// The SQLite-backed [`NameStore`] (WAL mode): a read connection used
/// inline under a short lock, and a thread that owns the write connection.
pub struct SqliteNames {
    read: Mutex<Connection>,
    /// `None` only while dropping.
    writes: Option<SyncSender<Write>>,
    thread: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
    path: String,
    retention: Duration,
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA busy_timeout = 5000;",
    )?;
    Ok(db)
}

impl SqliteNames {
    pub fn open(path: &Path, retention: Duration) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let err = |source| StoreError::new(&shown, source);
        let db = connect(path).map_err(err)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS bindings (
                 name_key  TEXT PRIMARY KEY,
                 name      TEXT NOT NULL,
                 peer_id   BLOB NOT NULL,
                 last_seen INTEGER NOT NULL
             );",
        )
        .map_err(err)?;
        let read = connect(path).map_err(err)?;
        read.execute_batch(&format!("PRAGMA mmap_size = {READ_MMAP_BYTES};"))
            .map_err(err)?;
        let (writes, queue) = mpsc::sync_channel(WRITE_QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        let thread = {
            let (path, commits) = (shown.clone(), commits.clone());
            std::thread::Builder::new()
                .name("name-store".into())
                .spawn(move || run_writer(&db, &queue, retention, &path, &commits))
                .map_err(|e| StoreError::other(&shown, e))?
        };
        Ok(Self {
            read: Mutex::new(read),
            writes: Some(writes),
            thread: Some(thread),
            commits,
            path: shown,
            retention,
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::new(&self.path, source)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding this lock cannot leave the connection in a
        // half-written state (SQLite statements are atomic), so keep going.
        self.read.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `write` to the store's thread without blocking.
    fn queue(&self, write: Write) -> Result<(), &'static str> {
        let Some(writes) = &self.writes else {
            return Err("the name store is closed");
        };
        writes.try_send(write).map_err(|e| match e {
            TrySendError::Full(_) => "too many name store writes waiting",
            TrySendError::Disconnected(_) => "the name store's thread has stopped",
        })
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

impl Drop for SqliteNames {
    /// Commits what is still queued before the store goes.
    fn drop(&mut self) {
        drop(self.writes.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        debug!(commits = self.commits(), "name store closed");
    }
}

impl NameStore for SqliteNames {
    fn check(&self, name: &Name, id: PeerId, now: u64) -> Verdict {
        let existing: Option<(Vec<u8>, i64)> = self
            .lock()
            .prepare_cached("SELECT peer_id, last_seen FROM bindings WHERE name_key = ?1")
            .and_then(|mut stmt| {
                stmt.query_row(params![name.key()], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(|e| self.err(e))?;
        if let Some((key, last_seen)) = existing
            && key.as_slice() != id.0.as_slice()
            && now.saturating_sub(u64::try_from(last_seen).unwrap_or(0)) < self.retention.as_secs()
        {
            return Ok(Err(BindError::BoundToOtherKey));
        }
        Ok(Ok(()))
    }

    fn bind(&self, name: &Name, id: PeerId, now: u64) -> Pending<Verdict> {
        let (reply, verdict) = oneshot::channel();
        let write = Write::Bind {
            name: name.clone(),
            id,
            now,
            reply,
        };
        let path = self.path.clone();
        if let Err(why) = self.queue(write) {
            return Box::pin(std::future::ready(Err(StoreError::busy(&path, why))));
        }
        Box::pin(async move {
            verdict.await.unwrap_or_else(|_| {
                Err(StoreError::busy(
                    &path,
                    "the name store's thread has stopped",
                ))
            })
        })
    }

    fn touch(&self, name: &Name, id: PeerId, now: u64) {
        let write = Write::Touch {
            name: name.clone(),
            id,
            now,
        };
        if let Err(why) = self.queue(write) {
            warn!(path = self.path, %name, "cannot record the last use of a name: {why}");
        }
    }

    fn flush(&self) -> Pending<()> {
        let (done, flushed) = oneshot::channel();
        if self.queue(Write::Flush(done)).is_err() {
            return Box::pin(std::future::ready(()));
        }
        Box::pin(async move {
            let _ = flushed.await;
        })
    }

    fn bound(&self, name: &Name) -> Result<Option<(Name, PeerId)>, StoreError> {
        let row: Option<(String, Vec<u8>)> = self
            .lock()
            .prepare_cached("SELECT name, peer_id FROM bindings WHERE name_key = ?1")
            .and_then(|mut stmt| {
                stmt.query_row(params![name.key()], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|(n, key)| Some((Name::parse(&n).ok()?, PeerId::from_bytes(&key)?))))
    }
}

/// The store's thread: takes the writes queued within [`WRITE_LINGER`] of
/// the first (at most [`WRITE_BATCH`]; the rest go in the next batch), runs
/// them in one transaction, and only once it is committed answers the
/// bindings. Ends when the store is dropped, after committing what was
/// queued.
fn run_writer(
    db: &Connection,
    queue: &mpsc::Receiver<Write>,
    retention: Duration,
    path: &str,
    commits: &AtomicU64,
) {
    while let Ok(first) = queue.recv() {
        // Sleeping (rather than waiting on the queue) through the linger
        // means the writes queued meanwhile do not wake this thread each.
        std::thread::sleep(WRITE_LINGER);
        let mut batch = vec![first];
        batch.extend(queue.try_iter().take(WRITE_BATCH - 1));
        let mut verdicts = match commit(db, &batch, retention) {
            Ok(verdicts) => {
                commits.fetch_add(1, Ordering::Relaxed);
                Ok(verdicts.into_iter())
            }
            Err(e) => {
                warn!(path, error = %e, "cannot commit name bindings");
                let _ = db.execute_batch("ROLLBACK");
                Err(StoreError::new(path, e))
            }
        };
        for write in batch {
            match write {
                Write::Bind { reply, .. } => {
                    let verdict = match &mut verdicts {
                        // One verdict per binding, in order (`commit`).
                        Ok(each) => each
                            .next()
                            .ok_or_else(|| StoreError::busy(path, "a binding lost its verdict")),
                        Err(e) => Err(e.clone()),
                    };
                    let _ = reply.send(verdict);
                }
                Write::Touch { .. } => {}
                Write::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

/// One transaction for `batch`: the verdict of each binding, in order.
fn commit(
    db: &Connection,
    batch: &[Write],
    retention: Duration,
) -> rusqlite::Result<Vec<Result<(), BindError>>> {
    db.execute_batch("BEGIN")?;
    let mut verdicts = Vec::new();
    for write in batch {
        match write {
            Write::Bind { name, id, now, .. } => {
                // The check and the write in one statement: a row bound to
                // another key and used within the retention time is left
                // alone, and then no row changes.
                let unused_since = sql_time(now.saturating_sub(retention.as_secs()));
                let changed = db
                    .prepare_cached(
                        "INSERT INTO bindings (name_key, name, peer_id, last_seen)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(name_key) DO UPDATE SET name = ?2, peer_id = ?3, last_seen = ?4
                         WHERE bindings.peer_id = ?3 OR bindings.last_seen <= ?5",
                    )?
                    .execute(params![
                        name.key(),
                        name.as_str(),
                        &id.0[..],
                        sql_time(*now),
                        unused_since
                    ])?;
                verdicts.push(if changed == 1 {
                    Ok(())
                } else {
                    Err(BindError::BoundToOtherKey)
                });
            }
            Write::Touch { name, id, now } => {
                db.prepare_cached(
                    "UPDATE bindings SET last_seen = ?3 WHERE name_key = ?1 AND peer_id = ?2",
                )?
                .execute(params![name.key(), &id.0[..], sql_time(*now)])?;
            }
            Write::Flush(_) => {}
        }
    }
    db.execute_batch("COMMIT")?;
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir) -> SqliteNames {
        SqliteNames::open(&dir.path().join("t.db"), NAME_RETENTION).unwrap()
    }

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    /// The store's verdict on key `[k; 32]` binding `n` at `at`, once committed.
    async fn bind(s: &SqliteNames, n: &str, k: u8, at: u64) -> Result<(), BindError> {
        s.bind(&name(n), PeerId([k; 32]), at).await.unwrap()
    }

    fn check(s: &SqliteNames, n: &str, k: u8, at: u64) -> Result<(), BindError> {
        s.check(&name(n), PeerId([k; 32]), at).unwrap()
    }

    #[tokio::test]
    async fn first_key_binds_a_free_name_and_may_use_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        assert_eq!(bind(&s, "bob", 1, 100).await, Ok(()));
        assert_eq!(bind(&s, "bob", 1, 200).await, Ok(()));
    }

    #[tokio::test]
    async fn another_key_is_refused_within_retention_in_any_case() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        bind(&s, "bob", 1, 100).await.unwrap();
        let later = 100 + NAME_RETENTION.as_secs() - 1;
        assert_eq!(check(&s, "BOB", 2, later), Err(BindError::BoundToOtherKey));
        assert_eq!(
            bind(&s, "BOB", 2, later).await,
            Err(BindError::BoundToOtherKey)
        );
    }

    #[tokio::test]
    async fn another_key_may_take_a_name_unused_for_the_whole_retention() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        bind(&s, "bob", 1, 100).await.unwrap();
        let later = 100 + NAME_RETENTION.as_secs();
        assert_eq!(check(&s, "bob", 2, later), Ok(()));
        assert_eq!(bind(&s, "bob", 2, later).await, Ok(()));
        // ...and now the old key is the stranger.
        assert_eq!(
            bind(&s, "bob", 1, later + 1).await,
            Err(BindError::BoundToOtherKey)
        );
    }

    #[tokio::test]
    async fn touch_extends_the_binding_and_it_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(&dir);
            bind(&s, "bob", 1, 100).await.unwrap();
            // Not waited for: dropping the store commits it.
            s.touch(&name("bob"), PeerId([1; 32]), 1_000_000);
        }
        let s = store(&dir);
        let within = 1_000_000 + NAME_RETENTION.as_secs() - 1;
        assert_eq!(
            bind(&s, "bob", 2, within).await,
            Err(BindError::BoundToOtherKey)
        );
    }

    #[tokio::test]
    async fn bindings_that_arrive_together_share_a_commit_and_each_gets_its_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        // 200 names, each asked for by two keys at once: one key wins each.
        let mut binds = Vec::new();
        for i in 0..200u8 {
            for key in [1u8, 2] {
                let mut id = [key; 32];
                id[0] = i;
                binds.push(s.bind(&name(&format!("p{i}")), PeerId(id), 100));
            }
        }
        let before = s.commits();
        let verdicts = futures_util::future::join_all(binds).await;
        let won = verdicts.iter().filter(|v| matches!(v, Ok(Ok(())))).count();
        let refused = verdicts
            .iter()
            .filter(|v| matches!(v, Ok(Err(BindError::BoundToOtherKey))))
            .count();
        assert_eq!((won, refused), (200, 200), "one key wins each name");
        let commits = s.commits() - before;
        assert!(commits <= 10, "400 bindings took {commits} commits");
        // Every winner is committed: a fresh store sees them.
        drop(s);
        let s = store(&dir);
        for i in 0..200u8 {
            assert!(s.bound(&name(&format!("p{i}"))).unwrap().is_some(), "p{i}");
        }
    }

    #[tokio::test]
    async fn flush_waits_for_the_writes_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        bind(&s, "bob", 1, 100).await.unwrap();
        s.touch(&name("bob"), PeerId([1; 32]), 5_000_000);
        s.flush().await;
        // The read connection sees the touch: a stranger is refused at a
        // time that only the touch keeps within the retention window.
        let within = 5_000_000 + NAME_RETENTION.as_secs() - 1;
        assert_eq!(check(&s, "bob", 2, within), Err(BindError::BoundToOtherKey));
    }
}
