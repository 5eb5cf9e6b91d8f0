//! The peer's SQLite database (`peer.db` in its data directory):
//!
//! - `sent`: every message this peer sent, with its state. A message is
//!   written here when it is accepted; the outbox is the rows not yet final
//!   (`queued`, `sent`, `held`), and is resent after a restart.
//! - `received`: every message shown to this user, keyed by (sender key,
//!   id): the durable "shown once" set, and the other half of the history.
//! - `known_keys`: the identity key first seen for each name (trust on
//!   first use), and a changed key waiting for the user's decision.
//! - `tracker_keys`: the pinned key of each tracker.
//!
//! One thread (`peer-db`) owns the writing connection and applies every
//! write in the order it was submitted, many to a transaction (group
//! commit). Nothing on the message path waits for SQLite: the states of
//! unfinished outgoing messages (the ledger), the received ids whose row
//! is not yet committed, and the pinned keys live in memory and decide;
//! the database follows within [`STORE_LINGER`] (a clean stop commits
//! everything: [`Store::close`]). So a crash of the process (or of the
//! machine: WAL with `synchronous = NORMAL`) can take back at most the last
//! `STORE_LINGER` of rows: a message sent in them is resent or, if it
//! never left, gone with the text the user just typed; a message received
//! in them was on screen and acknowledged, and misses from the history.
//! Reads of committed rows use a second connection (WAL readers do not
//! block the writer); an entry leaves the in-memory maps only after its
//! last write committed and the read connection's snapshot was let go, so
//! "memory, else the read connection" never misses a write, and reads that
//! need every write so far (history, the outbox) run on the database thread
//! itself ([`Store::call`]). The dedupe lookup, once per incoming message,
//! keeps a read transaction open between commits: beginning one costs file
//! locks (system calls) that a lookup in an open one does not. The database
//! thread ends it after each commit, so it never holds an old snapshot
//! (nor keeps the WAL from being checkpointed) past the next commit.
//!
//! Opening a file that is not a tincan database is an error naming the
//! file; nothing is ever silently reset.

use std::{
    collections::HashMap,
    collections::VecDeque,
    path::Path,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};
use tincan_proto::{MessageId, Name, PeerId};
use tokio::sync::oneshot;
use tracing::warn;

use crate::{
    delivery::State,
    event::Path as Carried,
    journal::{Journal, Record},
};

/// Jobs waiting for the database thread; past this, submitting blocks
/// until it catches up (back-pressure, never an unbounded queue).
pub const STORE_QUEUE: usize = 8192;
/// Most jobs committed in one transaction.
pub const STORE_BATCH: usize = 1024;
/// Default for how long a write nobody waits for (a state change, a
/// pinned key, a row already in the journal) stays uncommitted when no
/// waited-for write comes along to carry it (`Config::store_linger`).
/// 50 ms rather than 5: with a commit every 5 ms on each side the direct
/// RTT's p99 was ~1 ms instead of ~0.3 ms (benchmarks.md, finding 7; most
/// likely WAL checkpoints and journal truncations, not profiled).
pub const STORE_LINGER: Duration = Duration::from_millis(50);
/// How often the database thread looks for journal files that no running
/// process holds (one left by a process that was killed while another ran
/// on the same data directory; see [`Journal::take_orphans`]) and applies
/// them.
pub const JOURNAL_RECONCILE: Duration = Duration::from_secs(1);
/// Senders whose newest received id is kept in memory (the dedupe rule's
/// shortcut); past this the memory is cleared and filled again as they write.
pub const NEWEST_SENDERS: usize = 4096;
/// Memory-mapped reads (the dedupe lookups): no copies, and no cache to
/// rebuild after every commit.
const MMAP_BYTES: u64 = 64 << 20;
/// The writer's page cache, KiB: message ids are random, so each insert
/// touches a random index page; keeping them cached saves re-reading them.
const CACHE_KIB: u64 = 16 << 10;
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 32;

#[derive(Debug, Clone, thiserror::Error)]
#[error("database {path}: {reason}")]
pub struct StoreError {
    path: String,
    reason: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A message in the outbox (not yet in a final state).
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: MessageId,
    pub to: Name,
    pub body: String,
    pub sent_at_ms: u64,
    pub state: State,
}

/// One line of a conversation's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub id: MessageId,
    /// True for messages this peer sent.
    pub outgoing: bool,
    /// The other party.
    pub with: String,
    pub body: String,
    pub at_ms: u64,
    /// `sent`: the message's state; `received`: "received".
    pub state: String,
    pub path: Option<String>,
    pub reason: Option<String>,
}

/// An incoming message the user was shown, as recorded in `received`.
pub struct ShownMessage {
    pub from_id: PeerId,
    pub from: Name,
    pub id: MessageId,
    pub body: String,
    pub sent_at_ms: u64,
    pub received_ms: u64,
    pub path: &'static str,
}

/// What the dedupe rule says about an incoming message id.
#[derive(Debug)]
pub enum Incoming {
    /// Never seen: show it.
    New,
    /// Recorded but not shown (a database of an older version, whose
    /// process stopped before showing it): show it.
    NotShown,
    /// Another copy (a resend on a new link, or the held copy) is on its
    /// way to the front end right now: do not show this one; acknowledge
    /// it once this resolves, when the first copy is on screen.
    Showing(oneshot::Receiver<()>),
    /// Shown already: acknowledge only.
    Shown,
}

/// A received id whose row is not committed yet.
enum Fresh {
    /// Handed to the front end, not yet on screen; copies that arrived
    /// meanwhile wait for it here.
    Showing(Vec<oneshot::Sender<()>>),
    /// On screen; its row follows in the next commit.
    Shown,
}

/// What trust on first use says about a key announced for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// First time this name is seen; the key is now pinned.
    FirstSeen,
    /// The pinned key.
    Known,
    /// A different key than the pinned one; it waits for `/accept`.
    Changed { pinned: PeerId },
}

/// Runs after the transaction holding its job ended; `true` if it committed.
type AfterCommit = Box<dyn FnOnce(bool) + Send>;
/// A unit of work for the database thread, inside the open transaction.
type Job = Box<dyn FnOnce(&Connection) -> Option<AfterCommit> + Send>;

/// An unfinished outgoing message (or a finished one whose final state is
/// not committed yet).
struct Entry {
    to: Name,
    sent_at_ms: u64,
    state: State,
    /// Its row is written (or being written). Until then a state change
    /// needs no write of its own: the insert takes the latest state.
    inserted: bool,
}

/// A pinned key and a changed one waiting for `/accept`.
#[derive(Clone)]
struct Known {
    /// The name as first seen (its case), for the names this user follows.
    name: Name,
    key: PeerId,
    pending: Option<PeerId>,
}

type ReceivedKey = (PeerId, MessageId);

/// The database thread's queue. A job someone waits for wakes the thread;
/// the others ride along with the next commit, or wait [`STORE_LINGER`]:
/// fewer wake-ups and fewer, larger transactions.
struct Jobs {
    linger: Duration,
    queue: Mutex<Queue>,
    /// The thread waits here for work.
    work: Condvar,
    /// Submitters wait here while the queue is full.
    room: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// A waited-for job is queued: commit without lingering.
    urgent: bool,
    closed: bool,
}

impl Jobs {
    fn new(linger: Duration) -> Self {
        Self {
            linger,
            queue: Mutex::default(),
            work: Condvar::new(),
            room: Condvar::new(),
        }
    }

    /// False once the queue is closed.
    fn push(&self, job: Job, urgent: bool) -> bool {
        let mut q = locked(&self.queue);
        while q.jobs.len() >= STORE_QUEUE && !q.closed {
            q = self.room.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.closed {
            return false;
        }
        q.jobs.push_back(job);
        let commit_now = urgent || q.jobs.len() >= STORE_BATCH;
        q.urgent |= commit_now;
        // The first job into an empty queue wakes the thread too, to start
        // the STORE_LINGER clock (not to commit at once); else it would
        // sleep on until some urgent job came.
        let wake = commit_now || q.jobs.len() == 1;
        drop(q);
        if wake {
            self.work.notify_one();
        }
        true
    }

    /// The next batch to commit; `None` once closed and empty.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut q = locked(&self.queue);
        loop {
            if q.urgent || q.closed {
                break;
            }
            if q.jobs.is_empty() {
                q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let (guard, waited) = self
                .work
                .wait_timeout(q, self.linger)
                .unwrap_or_else(|p| p.into_inner());
            q = guard;
            if waited.timed_out() {
                break;
            }
        }
        // Only `close` ends the wait with nothing queued: `urgent` is set
        // with a job, and only this thread takes jobs out.
        if q.jobs.is_empty() {
            return None;
        }
        let n = q.jobs.len().min(STORE_BATCH);
        let batch: Vec<Job> = q.jobs.drain(..n).collect();
        // Whatever is left goes in the next transaction at once.
        q.urgent = !q.jobs.is_empty();
        drop(q);
        self.room.notify_all();
        Some(batch)
    }

    fn close(&self) {
        locked(&self.queue).closed = true;
        self.work.notify_one();
        self.room.notify_all();
    }
}

pub struct Store {
    path: String,
    jobs: Arc<Jobs>,
    journal: Arc<Journal>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Shared with the database thread, which ends its read transaction
    /// after every commit.
    read: Arc<Mutex<Connection>>,
    ledger: Arc<Mutex<HashMap<MessageId, Entry>>>,
    /// Received ids being shown, or shown and not yet committed.
    fresh: Arc<Mutex<HashMap<ReceivedKey, Fresh>>>,
    /// Per sender, the greatest id ever received from it (`None`: nothing),
    /// in `received` or in `fresh`. Locked inside `fresh`.
    newest: Mutex<HashMap<PeerId, Option<MessageId>>>,
    keys: Mutex<HashMap<String, Known>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `sent.seq` is a plain rowid: rows are never deleted, so it only grows, as
/// with `AUTOINCREMENT` but without a `sqlite_sequence` write per row. The
/// outbox's partial index names the two final states: SQLite evaluates an
/// `IN` list of three or more with a temporary b-tree, opened at every insert
/// and update of `sent` (a pager and a b-tree per row in a profile of the
/// database thread); `sent_open`, which had that form, is dropped from older
/// databases.
const SCHEMA: &str = "PRAGMA journal_mode = WAL;
     PRAGMA synchronous = NORMAL;
     PRAGMA busy_timeout = 5000;
     CREATE TABLE IF NOT EXISTS tracker_keys (
         tracker TEXT PRIMARY KEY,
         key     BLOB NOT NULL
     );
     CREATE TABLE IF NOT EXISTS sent (
         seq        INTEGER PRIMARY KEY,
         id         BLOB NOT NULL UNIQUE,
         to_name    TEXT NOT NULL,
         to_key     TEXT NOT NULL,
         body       TEXT NOT NULL,
         sent_at_ms INTEGER NOT NULL,
         state      TEXT NOT NULL,
         path       TEXT,
         reason     TEXT,
         updated_ms INTEGER NOT NULL
     );
     DROP INDEX IF EXISTS sent_open;
     CREATE INDEX IF NOT EXISTS sent_unfinished ON sent (seq)
         WHERE state NOT IN ('delivered', 'undeliverable');
     CREATE INDEX IF NOT EXISTS sent_with ON sent (to_key, seq);
     CREATE TABLE IF NOT EXISTS received (
         from_id     BLOB NOT NULL,
         id          BLOB NOT NULL,
         from_name   TEXT NOT NULL,
         from_key    TEXT NOT NULL,
         body        TEXT NOT NULL,
         sent_at_ms  INTEGER NOT NULL,
         received_ms INTEGER NOT NULL,
         path        TEXT NOT NULL,
         shown       INTEGER NOT NULL,
         PRIMARY KEY (from_id, id)
     );
     CREATE INDEX IF NOT EXISTS received_with ON received (from_key, received_ms);
     CREATE TABLE IF NOT EXISTS known_keys (
         name_key    TEXT PRIMARY KEY,
         name        TEXT NOT NULL,
         key         BLOB NOT NULL,
         pending_key BLOB
     );";

/// The unfinished outgoing messages, oldest first.
fn open_messages(db: &Connection) -> rusqlite::Result<Vec<Pending>> {
    let mut stmt = db.prepare_cached(
        "SELECT id, to_name, body, sent_at_ms, state, path, reason FROM sent
         WHERE state NOT IN ('delivered', 'undeliverable') ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, to, body, sent_at_ms, state, path, reason) = row?;
        let (Some(id), Ok(to), Some(state)) = (
            MessageId::from_bytes(&id),
            Name::parse(&to),
            State::from_columns(&state, path.as_deref(), reason.as_deref()),
        ) else {
            continue;
        };
        out.push(Pending {
            id,
            to,
            body,
            sent_at_ms: u64::try_from(sent_at_ms).unwrap_or(0),
            state,
        });
    }
    Ok(out)
}

fn known_keys(db: &Connection) -> rusqlite::Result<HashMap<String, Known>> {
    let mut stmt = db.prepare("SELECT name_key, name, key, pending_key FROM known_keys")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Vec<u8>>(2)?,
            r.get::<_, Option<Vec<u8>>>(3)?,
        ))
    })?;
    let mut out = HashMap::new();
    for row in rows {
        let (name_key, name, key, pending) = row?;
        // A row this peer wrote holds a valid name and key; skip anything else.
        if let (Ok(name), Some(key)) = (Name::parse(&name), PeerId::from_bytes(&key)) {
            let pending = pending.as_deref().and_then(PeerId::from_bytes);
            out.insert(name_key, Known { name, key, pending });
        }
    }
    Ok(out)
}

fn history_rows(db: &Connection, with: &str, limit: usize) -> rusqlite::Result<Vec<HistoryEntry>> {
    let mut stmt = db.prepare_cached(
        "SELECT * FROM (
             SELECT id, 1 AS outgoing, to_name AS party, body, sent_at_ms AS at_ms, state, path, reason
               FROM sent WHERE to_key = ?1
             UNION ALL
             SELECT id, 0, from_name, body, received_ms, 'received', path, NULL
               FROM received WHERE from_key = ?1
         ) ORDER BY at_ms DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![with, i64::try_from(limit).unwrap_or(i64::MAX)],
        |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (id, outgoing, with, body, at_ms, state, path, reason) = row?;
        let Some(id) = MessageId::from_bytes(&id) else {
            continue;
        };
        out.push(HistoryEntry {
            id,
            outgoing,
            with,
            body,
            at_ms: u64::try_from(at_ms).unwrap_or(0),
            state,
            path,
            reason,
        });
    }
    out.reverse();
    Ok(out)
}

/// Writes one journal record to the database; idempotent, so a record
/// replayed at start after it was committed changes nothing.
fn apply(db: &Connection, record: &Record) -> rusqlite::Result<()> {
    match record {
        Record::Queued { .. } => insert_sent(db, record, &State::Queued),
        Record::Shown {
            from_id,
            from,
            id,
            body,
            sent_at_ms,
            received_ms,
            path,
        } => db
            .prepare_cached(
                "INSERT INTO received (from_id, id, from_name, from_key, body, sent_at_ms, received_ms, path, shown)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1)
                 ON CONFLICT (from_id, id) DO UPDATE SET shown = 1",
            )?
            .execute(params![
                &from_id.0[..],
                &id.0[..],
                from.as_str(),
                from.key(),
                body,
                sql_int(*sent_at_ms),
                sql_int(*received_ms),
                path
            ])
            .map(drop),
    }
}

/// The row of a message this peer sent, in `state` (a `Queued` record;
/// anything else is ignored). Kept if it exists already.
fn insert_sent(db: &Connection, record: &Record, state: &State) -> rusqlite::Result<()> {
    let Record::Queued {
        id,
        to,
        body,
        sent_at_ms,
    } = record
    else {
        return Ok(());
    };
    let (state, path, reason) = state.columns();
    db.prepare_cached(
        "INSERT OR IGNORE INTO sent (id, to_name, to_key, body, sent_at_ms, state, path, reason, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        &id.0[..],
        to.as_str(),
        to.key(),
        body,
        sql_int(*sent_at_ms),
        state,
        path,
        reason,
        sql_int(now_ms())
    ])
    .map(drop)
}

/// Ends the read transaction `read` may have open (see the module docs).
fn end_read(read: &Connection) {
    if !read.is_autocommit() {
        let _ = read.execute_batch("COMMIT");
    }
}

/// Applies what the journal holds (a previous run's last moments).
fn replay(db: &Connection, records: &[Record]) -> rusqlite::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    db.execute_batch("BEGIN")?;
    for record in records {
        if let Err(e) = apply(db, record) {
            let _ = db.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    db.execute_batch("COMMIT")
}

/// The writing connection to `path`, with the schema in place.
fn open_writer(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.execute_batch(SCHEMA)?;
    db.execute_batch(&format!(
        "PRAGMA mmap_size = {MMAP_BYTES}; PRAGMA cache_size = -{CACHE_KIB};"
    ))?;
    db.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(db)
}

/// What the rows of `messages` delivered messages cost this machine's
/// SQLite alone, for `tincan-bench`: a fresh sender database in `dir` gets
/// their `sent` rows (written once, as delivered, as most are) and a fresh
/// receiver database their `received` rows, [`STORE_BATCH`] per transaction,
/// through the statements the database thread runs, with a `body` of
/// `body_len` bytes. Returns the time each side took. The nodes do this and
/// everything else besides, so a node's rate of persisted messages can be
/// no higher than what these times allow.
pub fn time_rows(
    dir: &Path,
    messages: usize,
    body_len: usize,
) -> Result<(Duration, Duration), StoreError> {
    let body = "t".repeat(body_len);
    let name = |n: &str| {
        Name::parse(n).map_err(|e| StoreError {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })
    };
    let (to, from) = (name("bob")?, name("alice")?);
    let from_id = PeerId([7; 32]);
    let ids: Vec<MessageId> = (0..messages).map(|_| MessageId::generate()).collect();
    // Only the database work is timed: the records are made first.
    let time = |file: &str, row: &dyn Fn(MessageId) -> Record| {
        let records: Vec<Record> = ids.iter().map(|&id| row(id)).collect();
        let path = dir.join(file);
        let err = |e: rusqlite::Error| StoreError {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let db = open_writer(&path).map_err(err)?;
        let delivered = State::Delivered(Carried::Direct);
        let started = Instant::now();
        for batch in records.chunks(STORE_BATCH) {
            db.execute_batch("BEGIN").map_err(err)?;
            for record in batch {
                match record {
                    Record::Queued { .. } => insert_sent(&db, record, &delivered),
                    Record::Shown { .. } => apply(&db, record),
                }
                .map_err(err)?;
            }
            db.execute_batch("COMMIT").map_err(err)?;
        }
        Ok(started.elapsed())
    };
    let at = now_ms();
    let sender = time("sender.db", &|id| Record::Queued {
        id,
        to: to.clone(),
        body: body.clone(),
        sent_at_ms: at,
    })?;
    let receiver = time("receiver.db", &|id| Record::Shown {
        from_id,
        from: from.clone(),
        id,
        body: body.clone(),
        sent_at_ms: at,
        received_ms: at,
        path: Carried::Direct.as_str().to_owned(),
    })?;
    Ok((sender, receiver))
}

/// The database thread: takes a batch of jobs (see [`Jobs`]), runs them
/// in one transaction, commits, ends the read connection's transaction (its
/// next read sees the commit), and only then tells the jobs' waiters.
fn run_writer(
    db: Connection,
    jobs: Arc<Jobs>,
    read: &Mutex<Connection>,
    journal: &Journal,
    path: String,
) {
    let mut after: Vec<AfterCommit> = Vec::new();
    let mut orphans_checked: Option<Instant> = None;
    while let Some(batch) = jobs.next_batch() {
        let began = db.execute_batch("BEGIN");
        for job in batch {
            after.extend(job(&db));
        }
        let committed = began.and_then(|()| db.execute_batch("COMMIT"));
        if let Err(e) = &committed {
            warn!(path, error = %e, "cannot commit to the database");
            let _ = db.execute_batch("ROLLBACK");
        }
        let ok = committed.is_ok();
        end_read(&locked(read));
        for done in after.drain(..) {
            done(ok);
        }
        // Another process on this data directory ended without emptying
        // its journal: its records go to the database, then it is emptied.
        if orphans_checked.is_none_or(|at| at.elapsed() >= JOURNAL_RECONCILE) {
            orphans_checked = Some(Instant::now());
            let result = journal.take_orphans(|records| match replay(&db, records) {
                Ok(()) => true,
                Err(e) => {
                    warn!(path, error = %e, "cannot apply the journal to the database");
                    false
                }
            });
            if let Err(e) = result {
                warn!(path, error = %e, "cannot read the journal");
            }
            end_read(&locked(read));
        }
    }
}

impl Store {
    /// Opens `path` (and `peer.journal` beside it); writes nobody waits
    /// for are committed at most `linger` after they were queued.
    pub fn open(path: &Path, linger: Duration) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let err = |e: rusqlite::Error| StoreError {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let db = open_writer(path).map_err(err)?;
        let (journal, records) =
            Journal::open(&path.with_extension("journal")).map_err(|e| StoreError {
                path: shown.clone(),
                reason: format!("journal: {e}"),
            })?;
        replay(&db, &records).map_err(err)?;
        journal.clear();
        let read = Connection::open(path).map_err(err)?;
        read.execute_batch(&format!(
            "PRAGMA busy_timeout = 5000; PRAGMA mmap_size = {MMAP_BYTES};"
        ))
        .map_err(err)?;
        read.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let read = Arc::new(Mutex::new(read));
        let ledger = open_messages(&db)
            .map_err(err)?
            .into_iter()
            .map(|p| {
                let entry = Entry {
                    to: p.to,
                    sent_at_ms: p.sent_at_ms,
                    state: p.state,
                    inserted: true,
                };
                (p.id, entry)
            })
            .collect();
        let keys = known_keys(&db).map_err(err)?;
        let jobs = Arc::new(Jobs::new(linger));
        let journal = Arc::new(journal);
        let (thread_jobs, thread_read, thread_journal, thread_path) =
            (jobs.clone(), read.clone(), journal.clone(), shown.clone());
        let thread = std::thread::Builder::new()
            .name("peer-db".into())
            .spawn(move || run_writer(db, thread_jobs, &thread_read, &thread_journal, thread_path))
            .map_err(|e| StoreError {
                path: shown.clone(),
                reason: format!("cannot start the database thread: {e}"),
            })?;
        Ok(Self {
            path: shown,
            jobs,
            journal,
            thread: Mutex::new(Some(thread)),
            read,
            ledger: Arc::new(Mutex::new(ledger)),
            fresh: Arc::default(),
            newest: Mutex::default(),
            keys: Mutex::new(keys),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Hands a job to the database thread (blocks while [`STORE_QUEUE`]
    /// jobs wait); `urgent` when someone waits for its commit. False once
    /// the store is closed.
    fn submit(&self, job: Job, urgent: bool) -> bool {
        self.jobs.push(job, urgent)
    }

    /// Runs `f` on the writing connection after every job submitted before
    /// it, and resolves with its result once its transaction committed.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let path = self.path.clone();
        let job: Job = Box::new(move |db| {
            let result = f(db).map_err(|e| e.to_string());
            Some(Box::new(move |committed| {
                let result = match result {
                    Ok(_) if !committed => Err("the transaction did not commit".to_string()),
                    other => other,
                };
                let _ = tx.send(result.map_err(|reason| StoreError { path, reason }));
            }))
        });
        if !self.submit(job, true) {
            return Err(self.err("the database thread stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(self.err("the database thread stopped")))
    }

    /// A write nobody waits for; a failure is logged.
    fn write_behind(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
        after: impl FnOnce(bool) + Send + 'static,
    ) {
        let path = self.path.clone();
        let job: Job = Box::new(move |db| {
            let result = f(db);
            if let Err(e) = &result {
                warn!(path, error = %e, "cannot write to the database");
            }
            let ok = result.is_ok();
            Some(Box::new(move |committed| after(committed && ok)))
        });
        if !self.submit(job, false) {
            warn!(
                path = self.path,
                "the database thread stopped; a write is lost"
            );
        }
    }

    /// Waits until everything submitted so far is committed, then stops the
    /// database thread. Later writes fail.
    pub async fn close(&self) {
        if self.call(|_| Ok(())).await.is_ok() {
            self.journal.clear();
        }
        self.jobs.close();
        let thread = locked(&self.thread).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn read(&self) -> MutexGuard<'_, Connection> {
        locked(&self.read)
    }

    /// The key pinned for the tracker at `tracker` (as given on the command line).
    pub fn tracker_key(&self, tracker: &str) -> Result<Option<PeerId>, StoreError> {
        let key: Option<Vec<u8>> = self
            .read()
            .prepare_cached("SELECT key FROM tracker_keys WHERE tracker = ?1")
            .and_then(|mut s| s.query_row(params![tracker], |row| row.get(0)).optional())
            .map_err(|e| self.err(e))?;
        Ok(key.as_deref().and_then(PeerId::from_bytes))
    }

    pub async fn pin_tracker_key(&self, tracker: &str, key: PeerId) -> Result<(), StoreError> {
        let tracker = tracker.to_owned();
        self.call(move |db| {
            db.prepare_cached(
                "INSERT INTO tracker_keys (tracker, key) VALUES (?1, ?2)
                 ON CONFLICT(tracker) DO UPDATE SET key = ?2",
            )?
            .execute(params![tracker, &key.0[..]])
            .map(drop)
        })
        .await
    }

    // ---- outgoing ----------------------------------------------------------

    /// Records a new outgoing message as `queued`: at once in memory (its
    /// state changes are accepted from now on), on disk in the next group
    /// commit, at most [`STORE_LINGER`] later.
    pub fn queue(
        &self,
        id: MessageId,
        to: &Name,
        body: &str,
        sent_at_ms: u64,
    ) -> Result<(), StoreError> {
        let record = Record::Queued {
            id,
            to: to.clone(),
            body: body.to_owned(),
            sent_at_ms,
        };
        self.journal
            .append(&record)
            .map_err(|e| self.err(format!("journal: {e}")))?;
        locked(&self.ledger).insert(
            id,
            Entry {
                to: to.clone(),
                sent_at_ms,
                state: State::Queued,
                inserted: false,
            },
        );
        let (ledger, journal, path) =
            (self.ledger.clone(), self.journal.clone(), self.path.clone());
        let job: Job = Box::new(move |db| {
            // Most messages are delivered before their row is written:
            // one insert with the final state instead of insert + update.
            let state = locked(&ledger)
                .get_mut(&id)
                .map(|e| {
                    e.inserted = true;
                    e.state.clone()
                })
                .unwrap_or(State::Queued);
            let result = insert_sent(db, &record, &state);
            if let Err(e) = &result {
                warn!(path, error = %e, "cannot write to the database");
            }
            let written = result.is_ok();
            Some(Box::new(move |committed| {
                if committed && written {
                    journal.committed();
                    if state.is_final() {
                        locked(&ledger).remove(&id);
                    }
                }
            }))
        });
        if !self.submit(job, false) {
            warn!(
                path = self.path,
                "the database thread stopped; a write is lost"
            );
        }
        Ok(())
    }

    /// The current state of an outgoing message.
    #[cfg(test)]
    pub fn state(&self, id: MessageId) -> Result<Option<State>, StoreError> {
        if let Some(e) = locked(&self.ledger).get(&id) {
            return Ok(Some(e.state.clone()));
        }
        let row: Option<(String, Option<String>, Option<String>)> = self
            .read()
            .prepare_cached("SELECT state, path, reason FROM sent WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row(params![&id.0[..]], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
            })
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|(s, p, r)| State::from_columns(&s, p.as_deref(), r.as_deref())))
    }

    /// Moves an outgoing message to `next` if the state machine allows it;
    /// returns whether it moved (a late or repeated event changes nothing).
    /// The move is immediate; its row follows in the next commit.
    pub fn transition(&self, id: MessageId, next: &State) -> Result<bool, StoreError> {
        let previous = {
            let mut ledger = locked(&self.ledger);
            // Not in the ledger: final (and committed) or not ours.
            let Some(entry) = ledger.get_mut(&id) else {
                return Ok(false);
            };
            if !entry.state.may_become(next) {
                return Ok(false);
            }
            if !entry.inserted {
                // Its insert, still queued, will write this state.
                entry.state = next.clone();
                return Ok(true);
            }
            std::mem::replace(&mut entry.state, next.clone())
        };
        // `queued` and `sent` mean the same after a restart (send it
        // again): moving between them is not worth a write.
        let unsent = |s: &State| matches!(s, State::Queued | State::Sent(_));
        if unsent(&previous) && unsent(next) {
            return Ok(true);
        }
        let (state, path, reason) = next.columns();
        let reason = reason.map(str::to_owned);
        let done = next.is_final();
        let ledger = self.ledger.clone();
        self.write_behind(
            move |db| {
                db.prepare_cached(
                    "UPDATE sent SET state = ?2, path = COALESCE(?3, path), reason = ?4, updated_ms = ?5
                     WHERE id = ?1",
                )?
                .execute(params![&id.0[..], state, path, reason, sql_int(now_ms())])
                .map(drop)
            },
            move |_| {
                if done {
                    locked(&ledger).remove(&id);
                }
            },
        );
        Ok(true)
    }

    /// Messages not yet in a final state, oldest first (after every write
    /// submitted so far).
    pub async fn outbox(&self) -> Result<Vec<Pending>, StoreError> {
        self.call(open_messages).await
    }

    /// When an outgoing message was written (sender's clock, ms since the epoch).
    pub fn sent_at(&self, id: MessageId) -> Result<Option<u64>, StoreError> {
        if let Some(e) = locked(&self.ledger).get(&id) {
            return Ok(Some(e.sent_at_ms));
        }
        let at: Option<i64> = self
            .read()
            .prepare_cached("SELECT sent_at_ms FROM sent WHERE id = ?1")
            .and_then(|mut s| s.query_row(params![&id.0[..]], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        Ok(at.and_then(|a| u64::try_from(a).ok()))
    }

    /// The recipient's name of an outgoing message.
    pub fn recipient(&self, id: MessageId) -> Result<Option<Name>, StoreError> {
        if let Some(e) = locked(&self.ledger).get(&id) {
            return Ok(Some(e.to.clone()));
        }
        let name: Option<String> = self
            .read()
            .prepare_cached("SELECT to_name FROM sent WHERE id = ?1")
            .and_then(|mut s| s.query_row(params![&id.0[..]], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        Ok(name.and_then(|n| Name::parse(&n).ok()))
    }

    // ---- incoming ----------------------------------------------------------

    /// Applies the dedupe rule to an incoming message. A message to show is
    /// remembered at once (a resend in this run is recognised); its row is
    /// written by [`Store::mark_shown`], once it is on screen.
    pub fn receive(&self, from_id: PeerId, id: MessageId) -> Result<Incoming, StoreError> {
        let key = (from_id, id);
        let mut fresh = locked(&self.fresh);
        // Memory first: an entry leaves it only after its row committed,
        // so a miss here means the read connection sees every write.
        match fresh.get_mut(&key) {
            Some(Fresh::Shown) => return Ok(Incoming::Shown),
            Some(Fresh::Showing(waiting)) => {
                let (tx, rx) = oneshot::channel();
                waiting.push(tx);
                return Ok(Incoming::Showing(rx));
            }
            None => {}
        }
        // Ids start with their time, so a sender's new message is nearly
        // always newer than anything it sent before: then it cannot be a
        // copy, and the lookup is skipped.
        let mut newest = locked(&self.newest);
        let before = match newest.get(&from_id) {
            Some(before) => *before,
            None => {
                let max: Option<Vec<u8>> = self.in_read_tx(|read| {
                    read.prepare_cached("SELECT max(id) FROM received WHERE from_id = ?1")?
                        .query_row(params![&from_id.0[..]], |r| r.get(0))
                })?;
                let before = max.as_deref().and_then(MessageId::from_bytes);
                if newest.len() >= NEWEST_SENDERS {
                    newest.clear();
                }
                newest.insert(from_id, before);
                before
            }
        };
        if before.is_none_or(|before| id > before) {
            newest.insert(from_id, Some(id));
            fresh.insert(key, Fresh::Showing(Vec::new()));
            return Ok(Incoming::New);
        }
        drop(newest);
        let shown: Option<bool> = self.in_read_tx(|read| {
            read.prepare_cached("SELECT shown FROM received WHERE from_id = ?1 AND id = ?2")?
                .query_row(params![&from_id.0[..], &id.0[..]], |r| r.get(0))
                .optional()
        })?;
        if shown == Some(true) {
            return Ok(Incoming::Shown);
        }
        fresh.insert(key, Fresh::Showing(Vec::new()));
        Ok(match shown {
            Some(_) => Incoming::NotShown,
            None => Incoming::New,
        })
    }

    /// Runs a query on the read connection, inside its read transaction,
    /// which stays open until the next commit (see the module docs).
    fn in_read_tx<T>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let read = self.read();
        let run = || {
            if read.is_autocommit() {
                read.execute_batch("BEGIN")?;
            }
            query(&read)
        };
        run().map_err(|e| self.err(e))
    }

    /// Records an incoming message that is on the user's screen (its row,
    /// marked shown), in the next commit: at most [`STORE_LINGER`] later.
    pub fn mark_shown(&self, msg: ShownMessage) {
        let key = (msg.from_id, msg.id);
        // The journal first, before any lock that a lookup may hold: until
        // this write, a crash shows the message again after the restart.
        let record = Record::Shown {
            from_id: msg.from_id,
            from: msg.from,
            id: msg.id,
            body: msg.body,
            sent_at_ms: msg.sent_at_ms,
            received_ms: msg.received_ms,
            path: msg.path.to_owned(),
        };
        let journaled = match self.journal.append(&record) {
            Ok(()) => true,
            Err(e) => {
                warn!(path = self.path, error = %e, "cannot journal a shown message");
                false
            }
        };
        if let Some(Fresh::Showing(waiting)) = locked(&self.fresh).insert(key, Fresh::Shown) {
            for copy in waiting {
                let _ = copy.send(());
            }
        }
        let (fresh, journal) = (self.fresh.clone(), self.journal.clone());
        self.write_behind(
            move |db| apply(db, &record),
            move |ok| {
                if ok && journaled {
                    journal.committed();
                }
                forget_fresh(&fresh, key);
            },
        );
    }

    /// The last `limit` messages exchanged with `with`, oldest first.
    pub async fn history(
        &self,
        with: &Name,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let with = with.key();
        let mut rows = self.call(move |db| history_rows(db, &with, limit)).await?;
        // A message on its way may be `sent` in memory, `queued` on disk.
        let ledger = locked(&self.ledger);
        for row in rows.iter_mut().filter(|r| r.outgoing) {
            if let Some(entry) = ledger.get(&row.id) {
                let (state, path, _) = entry.state.columns();
                row.state = state.to_owned();
                if let Some(path) = path {
                    row.path = Some(path.to_owned());
                }
            }
        }
        Ok(rows)
    }

    // ---- trust on first use -----------------------------------------------

    /// Checks the key announced for `name` against the pinned one, pinning
    /// it if the name is new and remembering it if it differs.
    pub fn check_key(&self, name: &Name, key: PeerId) -> KeyCheck {
        let name_key = name.key();
        let mut keys = locked(&self.keys);
        match keys.get_mut(&name_key) {
            Some(known) if known.key == key => KeyCheck::Known,
            Some(known) => {
                let pinned = known.key;
                if known.pending != Some(key) {
                    known.pending = Some(key);
                    self.write_behind(
                        move |db| {
                            db.prepare_cached(
                                "UPDATE known_keys SET pending_key = ?2 WHERE name_key = ?1",
                            )?
                            .execute(params![name_key, &key.0[..]])
                            .map(drop)
                        },
                        drop,
                    );
                }
                KeyCheck::Changed { pinned }
            }
            None => {
                keys.insert(
                    name_key.clone(),
                    Known {
                        name: name.clone(),
                        key,
                        pending: None,
                    },
                );
                let name = name.as_str().to_owned();
                self.write_behind(
                    move |db| {
                        db.prepare_cached(
                            "INSERT OR REPLACE INTO known_keys (name_key, name, key, pending_key)
                             VALUES (?1, ?2, ?3, NULL)",
                        )?
                        .execute(params![name_key, name, &key.0[..]])
                        .map(drop)
                    },
                    drop,
                );
                KeyCheck::FirstSeen
            }
        }
    }

    /// The pinned key for `name`, if any.
    pub fn pinned_key(&self, name: &Name) -> Option<PeerId> {
        locked(&self.keys).get(&name.key()).map(|k| k.key)
    }

    /// The names with a pinned key, in name order, at most `limit`: the
    /// peers this user has dealt with, whom it follows on a tracker in
    /// subscribe mode.
    pub fn known_names(&self, limit: usize) -> Result<Vec<Name>, StoreError> {
        let keys = locked(&self.keys);
        let mut names: Vec<&Name> = keys.values().map(|k| &k.name).collect();
        names.sort_by_key(|n| n.key());
        Ok(names.into_iter().take(limit).cloned().collect())
    }

    /// The pinned key for `name` and a changed one waiting for `/accept`.
    pub fn key_status(&self, name: &Name) -> (Option<PeerId>, Option<PeerId>) {
        match locked(&self.keys).get(&name.key()) {
            Some(k) => (Some(k.key), k.pending),
            None => (None, None),
        }
    }

    /// The user accepts the changed key announced for `name`; returns it.
    pub async fn accept_key(&self, name: &Name) -> Result<Option<PeerId>, StoreError> {
        let name_key = name.key();
        let accepted = {
            let mut keys = locked(&self.keys);
            let Some(known) = keys.get_mut(&name_key) else {
                return Ok(None);
            };
            let Some(new) = known.pending.take() else {
                return Ok(None);
            };
            known.key = new;
            new
        };
        self.call(move |db| {
            db.prepare_cached(
                "UPDATE known_keys SET key = pending_key, pending_key = NULL WHERE name_key = ?1",
            )?
            .execute(params![name_key])
            .map(drop)
        })
        .await?;
        Ok(Some(accepted))
    }
}

impl Drop for Store {
    /// The database thread commits what is queued and stops.
    fn drop(&mut self) {
        self.jobs.close();
    }
}

/// After a shown message's row was written: the database answers for it
/// from now on (if the write failed, the journal still has it for the next
/// start; in this run a resend is shown again: twice rather than lost).
fn forget_fresh(fresh: &Mutex<HashMap<ReceivedKey, Fresh>>, key: ReceivedKey) {
    let mut fresh = locked(fresh);
    if matches!(fresh.get(&key), Some(Fresh::Shown)) {
        fresh.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Path;

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("peer.db"), STORE_LINGER).unwrap()
    }

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[tokio::test]
    async fn tracker_pin_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.pin_tracker_key("t:1", PeerId([7; 32])).await.unwrap();
        s.close().await;
        let store = open(&dir);
        assert_eq!(store.tracker_key("t:1").unwrap(), Some(PeerId([7; 32])));
        assert_eq!(store.tracker_key("t:2").unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.db");
        std::fs::write(&path, vec![0x42u8; 4096]).unwrap();
        let err = Store::open(&path, STORE_LINGER).err().unwrap().to_string();
        assert!(err.contains("peer.db"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 4096]);
    }

    #[tokio::test]
    async fn outbox_keeps_unfinished_messages_across_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (MessageId([1; 16]), MessageId([2; 16]), MessageId([3; 16]));
        {
            let s = open(&dir);
            s.queue(a, &name("bob"), "one", 1).unwrap();
            s.queue(b, &name("bob"), "two", 2).unwrap();
            s.queue(c, &name("carol"), "three", 3).unwrap();
            assert!(s.transition(a, &State::Sent(Path::Direct)).unwrap());
            assert!(s.transition(a, &State::Delivered(Path::Direct)).unwrap());
            assert!(s.transition(c, &State::Held).unwrap());
            s.close().await;
        }
        let s = open(&dir);
        let outbox: Vec<MessageId> = s.outbox().await.unwrap().iter().map(|p| p.id).collect();
        assert_eq!(outbox, [b, c]);
        assert_eq!(s.state(a).unwrap(), Some(State::Delivered(Path::Direct)));
        assert_eq!(s.state(c).unwrap(), Some(State::Held));
    }

    #[tokio::test]
    async fn a_final_state_never_changes_again_in_memory_or_after_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let id = MessageId([1; 16]);
        s.queue(id, &name("bob"), "x", 1).unwrap();
        assert!(
            s.transition(id, &State::Undeliverable("gone".into()))
                .unwrap()
        );
        // Before the commit (the ledger decides) ...
        assert!(!s.transition(id, &State::Delivered(Path::Direct)).unwrap());
        s.outbox().await.unwrap();
        // ... and after it (the row decides).
        assert!(!s.transition(id, &State::Delivered(Path::Direct)).unwrap());
        assert_eq!(
            s.state(id).unwrap(),
            Some(State::Undeliverable("gone".into()))
        );
        assert_eq!(s.recipient(id).unwrap(), Some(name("bob")));
        assert_eq!(s.sent_at(id).unwrap(), Some(1));
    }

    fn shown(from_id: PeerId, from: &str, id: MessageId, body: &str) -> ShownMessage {
        ShownMessage {
            from_id,
            from: name(from),
            id,
            body: body.into(),
            sent_at_ms: 1,
            received_ms: 2,
            path: "direct",
        }
    }

    #[tokio::test]
    async fn dedupe_shows_an_id_once_per_sender_even_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, mallory) = (PeerId([1; 32]), PeerId([2; 32]));
        let id = MessageId([9; 16]);
        {
            let s = open(&dir);
            assert!(matches!(s.receive(alice, id).unwrap(), Incoming::New));
            // A second copy while the first is on its way to the front end:
            // not shown; its ack waits for the first copy's screen.
            let Incoming::Showing(mut first_copy) = s.receive(alice, id).unwrap() else {
                panic!("a second copy must wait for the first");
            };
            assert!(first_copy.try_recv().is_err());
            s.mark_shown(shown(alice, "alice", id, "hi"));
            assert!(first_copy.try_recv().is_ok());
            // Before its row is committed (memory) ...
            assert!(matches!(s.receive(alice, id).unwrap(), Incoming::Shown));
            s.outbox().await.unwrap();
            // ... and after (the row).
            assert!(matches!(s.receive(alice, id).unwrap(), Incoming::Shown));
            s.close().await;
        }
        let s = open(&dir);
        assert!(matches!(s.receive(alice, id).unwrap(), Incoming::Shown));
        // Another sender reusing the id cannot suppress alice's message or be suppressed.
        assert!(matches!(s.receive(mallory, id).unwrap(), Incoming::New));
    }

    #[tokio::test]
    async fn dedupe_skips_the_lookup_only_for_ids_newer_than_all_from_that_sender() {
        let dir = tempfile::tempdir().unwrap();
        let alice = PeerId([1; 32]);
        // Ids made at these times (ms), their other bits random.
        let (older, shown_before, newer) =
            (MessageId::at(100), MessageId::at(200), MessageId::at(300));
        {
            let s = open(&dir);
            assert!(matches!(
                s.receive(alice, shown_before).unwrap(),
                Incoming::New
            ));
            s.mark_shown(shown(alice, "alice", shown_before, "hi"));
            s.close().await;
        }
        let s = open(&dir);
        // The newest id from alice is read back from the rows: the one shown
        // in the last run is not taken for new ...
        assert!(matches!(
            s.receive(alice, shown_before).unwrap(),
            Incoming::Shown
        ));
        // ... an older id never seen (the sender's clock went back) is
        // looked up, and is new ...
        assert!(matches!(s.receive(alice, older).unwrap(), Incoming::New));
        // ... and a newer one is new, once.
        assert!(matches!(s.receive(alice, newer).unwrap(), Incoming::New));
        assert!(matches!(
            s.receive(alice, newer).unwrap(),
            Incoming::Showing(_)
        ));
    }

    #[tokio::test]
    async fn a_message_seen_but_never_shown_is_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let alice = PeerId([1; 32]);
        let id = MessageId([9; 16]);
        {
            let s = open(&dir);
            assert!(matches!(s.receive(alice, id).unwrap(), Incoming::New));
            s.close().await;
        }
        // The process stopped before showing it: the resend is new.
        let s = open(&dir);
        assert!(matches!(s.receive(alice, id).unwrap(), Incoming::New));
        assert!(s.history(&name("alice"), 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn what_the_journal_holds_is_in_the_database_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, id) = (PeerId([1; 32]), MessageId([7; 16]));
        // A run that stopped right after journaling: the records, no rows.
        {
            let (journal, _) = Journal::open(&dir.path().join("peer.journal")).unwrap();
            journal
                .append(&Record::Queued {
                    id: MessageId([1; 16]),
                    to: name("bob"),
                    body: "typed just before the crash".into(),
                    sent_at_ms: 1,
                })
                .unwrap();
            journal
                .append(&Record::Shown {
                    from_id: alice,
                    from: name("alice"),
                    id,
                    body: "shown just before the crash".into(),
                    sent_at_ms: 1,
                    received_ms: 2,
                    path: "direct".into(),
                })
                .unwrap();
        }
        let s = open(&dir);
        let outbox = s.outbox().await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].body, "typed just before the crash");
        // The resend of the shown message is recognised: not shown again.
        assert!(matches!(s.receive(alice, id).unwrap(), Incoming::Shown));
        s.close().await;
        drop(s);
        assert_eq!(
            std::fs::metadata(dir.path().join("peer.journal"))
                .unwrap()
                .len(),
            0
        );
        // Applied once, whatever the number of restarts.
        assert_eq!(open(&dir).outbox().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn what_a_second_process_on_the_same_directory_journaled_before_it_was_killed_is_applied()
    {
        let dir = tempfile::tempdir().unwrap();
        let first = open(&dir);
        // A second process started on the same directory (until the tracker
        // replaces one of them) journals a message in its own file, and is
        // killed before its commit.
        let typed = MessageId([2; 16]);
        {
            let (second, _) = Journal::open(&dir.path().join("peer.journal")).unwrap();
            second
                .append(&Record::Queued {
                    id: typed,
                    to: name("bob"),
                    body: "typed in the second window".into(),
                    sent_at_ms: 2,
                })
                .unwrap();
        }
        // The first one's database thread applies it at a commit, at most
        // JOURNAL_RECONCILE after the last look.
        let body = || -> Option<String> {
            first
                .read()
                .query_row(
                    "SELECT body FROM sent WHERE id = ?1",
                    params![&typed.0[..]],
                    |row| row.get(0),
                )
                .optional()
                .unwrap()
        };
        let until = Instant::now() + 5 * JOURNAL_RECONCILE;
        while body().is_none() {
            assert!(
                Instant::now() < until,
                "the killed process's journal was not applied within {:?}",
                5 * JOURNAL_RECONCILE
            );
            first.outbox().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(body().as_deref(), Some("typed in the second window"));
        first.close().await;
        drop(first);
        // And it is not applied again: its file was emptied.
        let outbox = open(&dir).outbox().await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert!(
            std::fs::metadata(dir.path().join("peer.journal.1"))
                .unwrap()
                .len()
                == 0
        );
    }

    #[tokio::test]
    async fn an_older_database_keeps_its_outbox_and_gets_the_cheaper_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.db");
        {
            // The schema of session 7 and before, with one unfinished message.
            let db = Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE sent (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,
                     to_name TEXT NOT NULL, to_key TEXT NOT NULL, body TEXT NOT NULL,
                     sent_at_ms INTEGER NOT NULL, state TEXT NOT NULL, path TEXT,
                     reason TEXT, updated_ms INTEGER NOT NULL);
                 CREATE INDEX sent_open ON sent (state) WHERE state IN ('queued', 'sent', 'held');
                 INSERT INTO sent (id, to_name, to_key, body, sent_at_ms, state, updated_ms)
                     VALUES (x'01010101010101010101010101010101', 'bob', 'bob', 'still on its way', 1, 'queued', 1),
                            (x'02020202020202020202020202020202', 'bob', 'bob', 'done', 2, 'delivered', 2);",
            )
            .unwrap();
        }
        let s = Store::open(&path, STORE_LINGER).unwrap();
        let outbox = s.outbox().await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].body, "still on its way");
        let indexes: Vec<String> = s
            .read()
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sent' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            indexes.contains(&"sent_unfinished".to_string()),
            "{indexes:?}"
        );
        assert!(!indexes.contains(&"sent_open".to_string()), "{indexes:?}");
        // The outbox is read through it, not by scanning every message sent.
        let plan: String = s
            .read()
            .query_row(
                "EXPLAIN QUERY PLAN SELECT id FROM sent
                 WHERE state NOT IN ('delivered', 'undeliverable') ORDER BY seq",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("sent_unfinished"), "{plan}");
    }

    #[tokio::test]
    async fn a_write_nobody_waits_for_is_committed_within_the_linger() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        // A commit first, then time for the thread to fall asleep on an
        // empty queue: the case where nothing else would wake it. (Too
        // short a pause can only make this test pass without its case.)
        s.outbox().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.queue(MessageId([3; 16]), &name("bob"), "m", 1).unwrap();
        let rows = || -> i64 {
            s.read()
                .query_row("SELECT count(*) FROM sent", [], |r| r.get(0))
                .unwrap()
        };
        // Polled on the read connection: nothing here waits for the commit.
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while rows() == 0 {
            assert!(
                std::time::Instant::now() < until,
                "a lazy write was not committed within 2 s (STORE_LINGER is {STORE_LINGER:?})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn many_writes_are_committed_in_order_in_few_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let ids: Vec<MessageId> = (0..2000u16)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..2].copy_from_slice(&i.to_le_bytes());
                MessageId(id)
            })
            .collect();
        for id in &ids {
            s.queue(*id, &name("bob"), "m", 1).unwrap();
        }
        for id in &ids[..1000] {
            assert!(s.transition(*id, &State::Sent(Path::Direct)).unwrap());
            assert!(s.transition(*id, &State::Delivered(Path::Direct)).unwrap());
        }
        let outbox: Vec<MessageId> = s.outbox().await.unwrap().iter().map(|p| p.id).collect();
        assert_eq!(outbox, ids[1000..]);
    }

    #[test]
    fn the_timed_rows_are_the_rows_a_delivered_message_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (sent, received) = time_rows(dir.path(), 2500, 100).unwrap();
        assert!(sent > Duration::ZERO && received > Duration::ZERO);
        let count = |file: &str, sql: &str| -> i64 {
            Connection::open(dir.path().join(file))
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap()
        };
        let sent_rows = "SELECT count(*) FROM sent WHERE state = 'delivered' AND path = 'direct' AND length(body) = 100";
        assert_eq!(count("sender.db", sent_rows), 2500);
        let received_rows = "SELECT count(*) FROM received WHERE shown = 1 AND path = 'direct' AND length(body) = 100";
        assert_eq!(count("receiver.db", received_rows), 2500);
        // Delivered, so none of them is in the outbox.
        let open = Connection::open(dir.path().join("sender.db")).unwrap();
        assert!(open_messages(&open).unwrap().is_empty());
    }

    #[tokio::test]
    async fn history_interleaves_both_directions_and_honours_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.queue(MessageId([1; 16]), &name("bob"), "hi bob", 1)
            .unwrap();
        s.mark_shown(shown(
            PeerId([2; 32]),
            "Bob",
            MessageId([2; 16]),
            "hi alice",
        ));
        s.queue(MessageId([3; 16]), &name("carol"), "not bob", 3)
            .unwrap();
        // No wait for the commits: history sees every write submitted before it.
        let h = s.history(&name("BOB"), 10).await.unwrap();
        let bodies: Vec<&str> = h.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies.len(), 2);
        assert!(bodies.contains(&"hi bob") && bodies.contains(&"hi alice"));
        assert_eq!(s.history(&name("bob"), 1).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn trust_on_first_use_pins_then_flags_a_change_until_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = (PeerId([1; 32]), PeerId([2; 32]));
        {
            let s = open(&dir);
            assert_eq!(s.check_key(&name("bob"), k1), KeyCheck::FirstSeen);
            assert_eq!(s.check_key(&name("Bob"), k1), KeyCheck::Known);
            assert_eq!(
                s.check_key(&name("bob"), k2),
                KeyCheck::Changed { pinned: k1 }
            );
            s.close().await;
        }
        // Pins and the pending change survive a restart.
        let s = open(&dir);
        assert_eq!(s.pinned_key(&name("bob")), Some(k1));
        assert_eq!(s.accept_key(&name("bob")).await.unwrap(), Some(k2));
        assert_eq!(s.check_key(&name("bob"), k2), KeyCheck::Known);
        assert_eq!(s.accept_key(&name("bob")).await.unwrap(), None);
        s.close().await;
        assert_eq!(open(&dir).pinned_key(&name("bob")), Some(k2));
    }
}

// ---- names to follow (subscribe mode) -------------------------------------

#[cfg(test)]
mod known_names_tests {
    use super::*;

    #[test]
    fn known_names_are_the_pinned_ones_in_name_order_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("peer.db"), STORE_LINGER).unwrap();
        for (n, k) in [("carol", 3), ("Alice", 1), ("bob", 2)] {
            s.check_key(&Name::parse(n).unwrap(), PeerId([k; 32]));
        }
        let names: Vec<String> = s
            .known_names(2)
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["Alice", "bob"]);
        assert_eq!(s.known_names(10).unwrap().len(), 3);
    }
}
