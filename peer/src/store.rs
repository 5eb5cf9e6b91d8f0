//! The peer's SQLite database (`peer.db` in its data directory): the keys it
//! has pinned. Opening a file that is not a tincan database is an error that
//! names the file; nothing is ever silently reset.

use std::{path::Path, sync::Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tincan_proto::PeerId;

#[derive(Debug, thiserror::Error)]
#[error("database {path}: {source}")]
pub struct StoreError {
    path: String,
    source: rusqlite::Error,
}

pub struct Store {
    db: Mutex<Connection>,
    path: String,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let err = |source| StoreError {
            path: shown.clone(),
            source,
        };
        let db = Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS tracker_keys (
                 tracker TEXT PRIMARY KEY,
                 key     BLOB NOT NULL
             );",
        )
        .map_err(err)?;
        Ok(Self {
            db: Mutex::new(db),
            path: shown,
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key pinned for the tracker at `tracker` (as given on the command line).
    pub fn tracker_key(&self, tracker: &str) -> Result<Option<PeerId>, StoreError> {
        let key: Option<Vec<u8>> = self
            .lock()
            .query_row(
                "SELECT key FROM tracker_keys WHERE tracker = ?1",
                params![tracker],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(key.and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok().map(PeerId)))
    }

    pub fn pin_tracker_key(&self, tracker: &str, key: PeerId) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO tracker_keys (tracker, key) VALUES (?1, ?2)
                 ON CONFLICT(tracker) DO UPDATE SET key = ?2",
                params![tracker, &key.0[..]],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_pin_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.db");
        Store::open(&path)
            .unwrap()
            .pin_tracker_key("t:1", PeerId([7; 32]))
            .unwrap();
        let store = Store::open(&path).unwrap();
        assert_eq!(store.tracker_key("t:1").unwrap(), Some(PeerId([7; 32])));
        assert_eq!(store.tracker_key("t:2").unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.db");
        std::fs::write(&path, vec![0x42u8; 4096]).unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("peer.db"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 4096]);
    }
}
