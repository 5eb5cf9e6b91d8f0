//! The name store: which key each name is bound to, persisted in SQLite so
//! bindings survive a tracker restart.
//!
//! [`NameStore`] is the narrow interface the rest of the tracker uses; the
//! SQLite file is one implementation (a NATS key-value one can sit beside it).

use std::{
    path::Path,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};
use tincan_proto::{Name, PeerId};

/// How long a name stays bound to the key that last used it: within this
/// window after its last session, another key cannot take it.
pub const NAME_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Why a key may not have a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("name is bound to another key")]
    BoundToOtherKey,
}

/// The store itself failed (I/O, corruption).
#[derive(Debug, thiserror::Error)]
#[error("tracker database {path}: {source}")]
pub struct StoreError {
    path: String,
    source: rusqlite::Error,
}

impl StoreError {
    pub fn new(path: &str, source: rusqlite::Error) -> Self {
        Self {
            path: path.to_string(),
            source,
        }
    }
}

/// Name → key bindings.
pub trait NameStore: Send + Sync + 'static {
    /// Binds `name` to `id` at time `now` (seconds since the epoch), unless
    /// another key used it within the retention window.
    fn bind(&self, name: &Name, id: PeerId, now: u64) -> Result<Result<(), BindError>, StoreError>;
    /// Whether `bind` would succeed, without binding.
    fn check(&self, name: &Name, id: PeerId, now: u64)
    -> Result<Result<(), BindError>, StoreError>;
    /// Records that `id` was last seen with `name` at `now`.
    fn touch(&self, name: &Name, id: PeerId, now: u64) -> Result<(), StoreError>;
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

/// The SQLite-backed [`NameStore`]. Each call is one indexed statement on a
/// WAL database (microseconds), so it runs inline under a short lock.
pub struct SqliteNames {
    db: Mutex<Connection>,
    path: String,
    retention: Duration,
}

impl SqliteNames {
    pub fn open(path: &Path, retention: Duration) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let err = |source| StoreError {
            path: shown.clone(),
            source,
        };
        let db = Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS bindings (
                 name_key  TEXT PRIMARY KEY,
                 name      TEXT NOT NULL,
                 peer_id   BLOB NOT NULL,
                 last_seen INTEGER NOT NULL
             );",
        )
        .map_err(err)?;
        Ok(Self {
            db: Mutex::new(db),
            path: shown,
            retention,
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    fn check_locked(
        &self,
        db: &Connection,
        name: &Name,
        id: PeerId,
        now: u64,
    ) -> Result<Result<(), BindError>, StoreError> {
        let existing: Option<(Vec<u8>, i64)> = db
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding this lock cannot leave the connection in a
        // half-written state (SQLite statements are atomic), so keep going.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl NameStore for SqliteNames {
    fn check(
        &self,
        name: &Name,
        id: PeerId,
        now: u64,
    ) -> Result<Result<(), BindError>, StoreError> {
        self.check_locked(&self.lock(), name, id, now)
    }

    fn bind(&self, name: &Name, id: PeerId, now: u64) -> Result<Result<(), BindError>, StoreError> {
        // The check and the write in one statement (one per enrollment): a
        // row bound to another key and used within the retention time is
        // left alone, and then no row changes.
        let unused_since = sql_time(now.saturating_sub(self.retention.as_secs()));
        let changed = self
            .lock()
            .prepare_cached(
                "INSERT INTO bindings (name_key, name, peer_id, last_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name_key) DO UPDATE SET name = ?2, peer_id = ?3, last_seen = ?4
                 WHERE bindings.peer_id = ?3 OR bindings.last_seen <= ?5",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    name.key(),
                    name.as_str(),
                    &id.0[..],
                    sql_time(now),
                    unused_since
                ])
            })
            .map_err(|e| self.err(e))?;
        Ok(if changed == 1 {
            Ok(())
        } else {
            Err(BindError::BoundToOtherKey)
        })
    }

    fn bound(&self, name: &Name) -> Result<Option<(Name, PeerId)>, StoreError> {
        let row: Option<(String, Vec<u8>)> = self
            .lock()
            .query_row(
                "SELECT name, peer_id FROM bindings WHERE name_key = ?1",
                params![name.key()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|(n, key)| Some((Name::parse(&n).ok()?, PeerId::from_bytes(&key)?))))
    }

    fn touch(&self, name: &Name, id: PeerId, now: u64) -> Result<(), StoreError> {
        self.lock()
            .prepare_cached(
                "UPDATE bindings SET last_seen = ?3 WHERE name_key = ?1 AND peer_id = ?2",
            )
            .and_then(|mut stmt| stmt.execute(params![name.key(), &id.0[..], sql_time(now)]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }
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

    #[test]
    fn first_key_binds_a_free_name_and_may_use_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        assert_eq!(s.bind(&name("bob"), PeerId([1; 32]), 100).unwrap(), Ok(()));
        assert_eq!(s.bind(&name("bob"), PeerId([1; 32]), 200).unwrap(), Ok(()));
    }

    #[test]
    fn another_key_is_refused_within_retention_in_any_case() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.bind(&name("bob"), PeerId([1; 32]), 100).unwrap().unwrap();
        let later = 100 + NAME_RETENTION.as_secs() - 1;
        assert_eq!(
            s.bind(&name("BOB"), PeerId([2; 32]), later).unwrap(),
            Err(BindError::BoundToOtherKey)
        );
    }

    #[test]
    fn another_key_may_take_a_name_unused_for_the_whole_retention() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.bind(&name("bob"), PeerId([1; 32]), 100).unwrap().unwrap();
        let later = 100 + NAME_RETENTION.as_secs();
        assert_eq!(
            s.bind(&name("bob"), PeerId([2; 32]), later).unwrap(),
            Ok(())
        );
        // ...and now the old key is the stranger.
        assert_eq!(
            s.bind(&name("bob"), PeerId([1; 32]), later + 1).unwrap(),
            Err(BindError::BoundToOtherKey)
        );
    }

    #[test]
    fn touch_extends_the_binding_and_it_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(&dir);
            s.bind(&name("bob"), PeerId([1; 32]), 100).unwrap().unwrap();
            s.touch(&name("bob"), PeerId([1; 32]), 1_000_000).unwrap();
        }
        let s = store(&dir);
        let within = 1_000_000 + NAME_RETENTION.as_secs() - 1;
        assert_eq!(
            s.bind(&name("bob"), PeerId([2; 32]), within).unwrap(),
            Err(BindError::BoundToOtherKey)
        );
    }
}
