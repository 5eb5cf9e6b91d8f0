//! The peer's SQLite database (`peer.db` in its data directory):
//!
//! - `sent`: every message this peer sent, with its state. A message is
//!   written here *before* it is sent; the outbox is the rows not yet final
//!   (`queued`, `sent`, `held`), and is resent after a restart.
//! - `received`: every message shown to this user, keyed by (sender key,
//!   id): the durable "shown once" set, and the other half of the history.
//! - `known_keys`: the identity key first seen for each name (trust on
//!   first use), and a changed key waiting for the user's decision.
//! - `tracker_keys`: the pinned key of each tracker.
//!
//! Opening a file that is not a tincan database is an error naming the
//! file; nothing is ever silently reset. Each call is a few indexed
//! statements on a WAL database (synchronous=NORMAL), done inline.

use std::{
    path::Path,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};
use tincan_proto::{MessageId, Name, PeerId};

use crate::delivery::State;

#[derive(Debug, thiserror::Error)]
#[error("database {path}: {source}")]
pub struct StoreError {
    path: String,
    source: rusqlite::Error,
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

/// What the dedupe rule says about an incoming message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Never seen: show it.
    New,
    /// Recorded but the process stopped before it was shown: show it.
    NotShown,
    /// Shown already: acknowledge only.
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
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS tracker_keys (
                 tracker TEXT PRIMARY KEY,
                 key     BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS sent (
                 seq        INTEGER PRIMARY KEY AUTOINCREMENT,
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
             CREATE INDEX IF NOT EXISTS sent_open ON sent (state) WHERE state IN ('queued', 'sent', 'held');
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

    // ---- outgoing ----------------------------------------------------------

    /// Records a new outgoing message as `queued`, before anything is sent.
    pub fn queue(
        &self,
        id: MessageId,
        to: &Name,
        body: &str,
        sent_at_ms: u64,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO sent (id, to_name, to_key, body, sent_at_ms, state, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)",
                params![
                    &id.0[..],
                    to.as_str(),
                    to.key(),
                    body,
                    sql_int(sent_at_ms),
                    sql_int(now_ms())
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The current state of an outgoing message.
    pub fn state(&self, id: MessageId) -> Result<Option<State>, StoreError> {
        let row: Option<(String, Option<String>, Option<String>)> = self
            .lock()
            .query_row(
                "SELECT state, path, reason FROM sent WHERE id = ?1",
                params![&id.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|(s, p, r)| State::from_columns(&s, p.as_deref(), r.as_deref())))
    }

    /// Moves an outgoing message to `next` if the state machine allows it;
    /// returns whether it moved (a late or repeated event changes nothing).
    pub fn transition(&self, id: MessageId, next: &State) -> Result<bool, StoreError> {
        let db = self.lock();
        let row: Option<(String, Option<String>, Option<String>)> = db
            .query_row(
                "SELECT state, path, reason FROM sent WHERE id = ?1",
                params![&id.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(current) =
            row.and_then(|(s, p, r)| State::from_columns(&s, p.as_deref(), r.as_deref()))
        else {
            return Ok(false);
        };
        if !current.may_become(next) {
            return Ok(false);
        }
        let (state, path, reason) = next.columns();
        db.execute(
            "UPDATE sent SET state = ?2, path = COALESCE(?3, path), reason = ?4, updated_ms = ?5 WHERE id = ?1",
            params![&id.0[..], state, path, reason, sql_int(now_ms())],
        )
        .map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Messages not yet in a final state, oldest first.
    pub fn outbox(&self) -> Result<Vec<Pending>, StoreError> {
        let db = self.lock();
        let mut stmt = db
            .prepare(
                "SELECT id, to_name, body, sent_at_ms, state, path, reason FROM sent
                 WHERE state IN ('queued', 'sent', 'held') ORDER BY seq",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, to, body, sent_at_ms, state, path, reason) = row.map_err(|e| self.err(e))?;
            let (Ok(id), Ok(to), Some(state)) = (
                <[u8; 16]>::try_from(id.as_slice()),
                Name::parse(&to),
                State::from_columns(&state, path.as_deref(), reason.as_deref()),
            ) else {
                continue;
            };
            out.push(Pending {
                id: MessageId(id),
                to,
                body,
                sent_at_ms: u64::try_from(sent_at_ms).unwrap_or(0),
                state,
            });
        }
        Ok(out)
    }

    /// When an outgoing message was written (sender's clock, ms since the epoch).
    pub fn sent_at(&self, id: MessageId) -> Result<Option<u64>, StoreError> {
        let at: Option<i64> = self
            .lock()
            .query_row(
                "SELECT sent_at_ms FROM sent WHERE id = ?1",
                params![&id.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(at.and_then(|a| u64::try_from(a).ok()))
    }

    /// The recipient's name of an outgoing message.
    pub fn recipient(&self, id: MessageId) -> Result<Option<Name>, StoreError> {
        let name: Option<String> = self
            .lock()
            .query_row(
                "SELECT to_name FROM sent WHERE id = ?1",
                params![&id.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(name.and_then(|n| Name::parse(&n).ok()))
    }

    // ---- incoming ----------------------------------------------------------

    /// Applies the dedupe rule to an incoming message and records it if new.
    #[allow(clippy::too_many_arguments)]
    pub fn receive(
        &self,
        from_id: PeerId,
        from: &Name,
        id: MessageId,
        body: &str,
        sent_at_ms: u64,
        path: &str,
    ) -> Result<Incoming, StoreError> {
        let db = self.lock();
        let shown: Option<bool> = db
            .query_row(
                "SELECT shown FROM received WHERE from_id = ?1 AND id = ?2",
                params![&from_id.0[..], &id.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        match shown {
            Some(true) => Ok(Incoming::Shown),
            Some(false) => Ok(Incoming::NotShown),
            None => {
                db.execute(
                    "INSERT INTO received (from_id, id, from_name, from_key, body, sent_at_ms, received_ms, path, shown)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0)",
                    params![
                        &from_id.0[..],
                        &id.0[..],
                        from.as_str(),
                        from.key(),
                        body,
                        sql_int(sent_at_ms),
                        sql_int(now_ms()),
                        path
                    ],
                )
                .map_err(|e| self.err(e))?;
                Ok(Incoming::New)
            }
        }
    }

    /// Records that an incoming message was shown to the user.
    pub fn mark_shown(&self, from_id: PeerId, id: MessageId) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE received SET shown = 1 WHERE from_id = ?1 AND id = ?2",
                params![&from_id.0[..], &id.0[..]],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The last `limit` messages exchanged with `with`, oldest first.
    pub fn history(&self, with: &Name, limit: usize) -> Result<Vec<HistoryEntry>, StoreError> {
        let db = self.lock();
        let mut stmt = db
            .prepare(
                "SELECT * FROM (
                     SELECT id, 1 AS outgoing, to_name AS party, body, sent_at_ms AS at_ms, state, path, reason
                       FROM sent WHERE to_key = ?1
                     UNION ALL
                     SELECT id, 0, from_name, body, received_ms, 'received', path, NULL
                       FROM received WHERE from_key = ?1
                 ) ORDER BY at_ms DESC LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![with.key(), i64::try_from(limit).unwrap_or(i64::MAX)],
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
            )
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, outgoing, with, body, at_ms, state, path, reason) =
                row.map_err(|e| self.err(e))?;
            let Ok(id) = <[u8; 16]>::try_from(id.as_slice()) else {
                continue;
            };
            out.push(HistoryEntry {
                id: MessageId(id),
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

    // ---- trust on first use -----------------------------------------------

    /// Checks the key announced for `name` against the pinned one, pinning
    /// it if the name is new and remembering it if it differs.
    pub fn check_key(&self, name: &Name, key: PeerId) -> Result<KeyCheck, StoreError> {
        let db = self.lock();
        let pinned: Option<Vec<u8>> = db
            .query_row(
                "SELECT key FROM known_keys WHERE name_key = ?1",
                params![name.key()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        match pinned.and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok()) {
            None => {
                db.execute(
                    "INSERT OR REPLACE INTO known_keys (name_key, name, key, pending_key) VALUES (?1, ?2, ?3, NULL)",
                    params![name.key(), name.as_str(), &key.0[..]],
                )
                .map_err(|e| self.err(e))?;
                Ok(KeyCheck::FirstSeen)
            }
            Some(k) if k == key.0 => Ok(KeyCheck::Known),
            Some(k) => {
                db.execute(
                    "UPDATE known_keys SET pending_key = ?2 WHERE name_key = ?1",
                    params![name.key(), &key.0[..]],
                )
                .map_err(|e| self.err(e))?;
                Ok(KeyCheck::Changed { pinned: PeerId(k) })
            }
        }
    }

    /// The pinned key for `name`, if any.
    pub fn pinned_key(&self, name: &Name) -> Result<Option<PeerId>, StoreError> {
        let key: Option<Vec<u8>> = self
            .lock()
            .query_row(
                "SELECT key FROM known_keys WHERE name_key = ?1",
                params![name.key()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(key.and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok().map(PeerId)))
    }

    /// The user accepts the changed key announced for `name`; returns it.
    pub fn accept_key(&self, name: &Name) -> Result<Option<PeerId>, StoreError> {
        let db = self.lock();
        let pending: Option<Option<Vec<u8>>> = db
            .query_row(
                "SELECT pending_key FROM known_keys WHERE name_key = ?1",
                params![name.key()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(Some(key)) = pending else {
            return Ok(None);
        };
        db.execute(
            "UPDATE known_keys SET key = pending_key, pending_key = NULL WHERE name_key = ?1",
            params![name.key()],
        )
        .map_err(|e| self.err(e))?;
        Ok(<[u8; 32]>::try_from(key.as_slice()).ok().map(PeerId))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Path;

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("peer.db")).unwrap()
    }

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[test]
    fn tracker_pin_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        open(&dir).pin_tracker_key("t:1", PeerId([7; 32])).unwrap();
        let store = open(&dir);
        assert_eq!(store.tracker_key("t:1").unwrap(), Some(PeerId([7; 32])));
        assert_eq!(store.tracker_key("t:2").unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.db");
        std::fs::write(&path, vec![0x42u8; 4096]).unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("peer.db"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 4096]);
    }

    #[test]
    fn outbox_keeps_unfinished_messages_across_reopening_in_order() {
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
        }
        let s = open(&dir);
        let outbox: Vec<MessageId> = s.outbox().unwrap().iter().map(|p| p.id).collect();
        assert_eq!(outbox, [b, c]);
        assert_eq!(s.state(a).unwrap(), Some(State::Delivered(Path::Direct)));
    }

    #[test]
    fn a_final_state_never_changes_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let id = MessageId([1; 16]);
        s.queue(id, &name("bob"), "x", 1).unwrap();
        assert!(
            s.transition(id, &State::Undeliverable("gone".into()))
                .unwrap()
        );
        assert!(!s.transition(id, &State::Delivered(Path::Direct)).unwrap());
        assert_eq!(
            s.state(id).unwrap(),
            Some(State::Undeliverable("gone".into()))
        );
    }

    #[test]
    fn dedupe_shows_an_id_once_per_sender_even_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, mallory) = (PeerId([1; 32]), PeerId([2; 32]));
        let id = MessageId([9; 16]);
        {
            let s = open(&dir);
            assert_eq!(
                s.receive(alice, &name("alice"), id, "hi", 1, "direct")
                    .unwrap(),
                Incoming::New
            );
            // Recorded, not yet shown (the process could stop here): shown again.
            assert_eq!(
                s.receive(alice, &name("alice"), id, "hi", 1, "direct")
                    .unwrap(),
                Incoming::NotShown
            );
            s.mark_shown(alice, id).unwrap();
        }
        let s = open(&dir);
        assert_eq!(
            s.receive(alice, &name("alice"), id, "hi", 1, "held")
                .unwrap(),
            Incoming::Shown
        );
        // Another sender reusing the id cannot suppress alice's message or be suppressed.
        assert_eq!(
            s.receive(mallory, &name("mallory"), id, "x", 1, "direct")
                .unwrap(),
            Incoming::New
        );
    }

    #[test]
    fn history_interleaves_both_directions_and_honours_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.queue(MessageId([1; 16]), &name("bob"), "hi bob", 1)
            .unwrap();
        s.receive(
            PeerId([2; 32]),
            &name("Bob"),
            MessageId([2; 16]),
            "hi alice",
            2,
            "direct",
        )
        .unwrap();
        s.queue(MessageId([3; 16]), &name("carol"), "not bob", 3)
            .unwrap();
        let h = s.history(&name("BOB"), 10).unwrap();
        let bodies: Vec<&str> = h.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies.len(), 2);
        assert!(bodies.contains(&"hi bob") && bodies.contains(&"hi alice"));
        assert_eq!(s.history(&name("bob"), 1).unwrap().len(), 1);
    }

    #[test]
    fn trust_on_first_use_pins_then_flags_a_change_until_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let (k1, k2) = (PeerId([1; 32]), PeerId([2; 32]));
        assert_eq!(s.check_key(&name("bob"), k1).unwrap(), KeyCheck::FirstSeen);
        assert_eq!(s.check_key(&name("Bob"), k1).unwrap(), KeyCheck::Known);
        assert_eq!(
            s.check_key(&name("bob"), k2).unwrap(),
            KeyCheck::Changed { pinned: k1 }
        );
        assert_eq!(s.pinned_key(&name("bob")).unwrap(), Some(k1));
        assert_eq!(s.accept_key(&name("bob")).unwrap(), Some(k2));
        assert_eq!(s.check_key(&name("bob"), k2).unwrap(), KeyCheck::Known);
        assert_eq!(s.accept_key(&name("bob")).unwrap(), None);
    }
}

// ---- names to follow (subscribe mode) -------------------------------------

impl Store {
    /// The names with a pinned key, in name order, at most `limit`: the
    /// peers this user has dealt with, whom it follows on a tracker in
    /// subscribe mode.
    pub fn known_names(&self, limit: usize) -> Result<Vec<Name>, StoreError> {
        let db = self.lock();
        let mut stmt = db
            .prepare("SELECT name FROM known_keys ORDER BY name_key LIMIT ?1")
            .map_err(|e| self.err(e))?;
        let names = stmt
            .query_map(
                params![sql_int(u64::try_from(limit).unwrap_or(u64::MAX))],
                |r| r.get::<_, String>(0),
            )
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        // A row this peer wrote holds a valid name; skip anything else.
        Ok(names.iter().filter_map(|n| Name::parse(n).ok()).collect())
    }
}

#[cfg(test)]
mod known_names_tests {
    use super::*;

    #[test]
    fn known_names_are_the_pinned_ones_in_name_order_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("peer.db")).unwrap();
        for (n, k) in [("carol", 3), ("Alice", 1), ("bob", 2)] {
            s.check_key(&Name::parse(n).unwrap(), PeerId([k; 32]))
                .unwrap();
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
