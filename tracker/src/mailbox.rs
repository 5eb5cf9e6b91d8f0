//! The mailbox: sealed messages held for peers that are offline, the
//! sealing keys peers publish, and notices for senders (delivered, expired,
//! rejected). All in the tracker's SQLite file, so a tracker restart loses
//! nothing. The tracker stores only ciphertext it cannot read; what it does
//! see is who sent to whom and when (docs/delivery.md).

use std::{
    collections::HashSet,
    ops::Deref,
    path::Path,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use rusqlite::{Connection, OptionalExtension, params};
use tincan_proto::{
    MessageId, Name, PeerId,
    seal::MAX_SEALED_LEN,
    tracker::{HeldMessage, HoldResult, Notice, NoticeKind, SignedSealKey},
};

use crate::store::StoreError;

/// How long a held message waits for its recipient by default.
pub const HELD_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Most messages held for one recipient at once.
pub const MAX_HELD_PER_RECIPIENT: u32 = 1_000;
/// Most messages held in all.
pub const MAX_HELD_TOTAL: u32 = 1_000_000;
/// How long a notice waits for its sender to collect it.
pub const NOTICE_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);

fn sql_time(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

pub struct Mailbox {
    db: Mutex<Db>,
    path: String,
    ttl: Duration,
}

/// The connection, and what the mailbox knows of its tables without a
/// query: behind one lock, so the two always agree.
struct Db {
    conn: Connection,
    /// The keys that may have held messages or notices waiting; any other
    /// key enrolls without a query. As big as the tables at most.
    waiting: HashSet<PeerId>,
}

impl Deref for Db {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl Mailbox {
    pub fn open(path: &Path, ttl: Duration) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let err = |source| StoreError::new(&shown, source);
        let db = Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS seal_keys (
                 peer_id BLOB PRIMARY KEY,
                 key     BLOB NOT NULL,
                 sig     BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS held (
                 to_id      BLOB NOT NULL,
                 msg_id     BLOB NOT NULL,
                 to_name    TEXT NOT NULL,
                 from_id    BLOB NOT NULL,
                 from_name  TEXT NOT NULL,
                 sealed     BLOB NOT NULL,
                 stored_at  INTEGER NOT NULL,
                 expires_at INTEGER NOT NULL,
                 PRIMARY KEY (to_id, msg_id)
             );
             CREATE INDEX IF NOT EXISTS held_expiry ON held (expires_at);
             CREATE TABLE IF NOT EXISTS notices (
                 to_id      BLOB NOT NULL,
                 msg_id     BLOB NOT NULL,
                 notice     BLOB NOT NULL,
                 expires_at INTEGER NOT NULL,
                 PRIMARY KEY (to_id, msg_id)
             );
             CREATE INDEX IF NOT EXISTS notices_expiry ON notices (expires_at);",
        )
        .map_err(err)?;
        let waiting = db
            .prepare("SELECT to_id FROM held UNION SELECT to_id FROM notices")
            .and_then(|mut stmt| {
                stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(err)?
            .iter()
            .filter_map(|id| PeerId::from_bytes(id))
            .collect();
        Ok(Self {
            db: Mutex::new(Db { conn: db, waiting }),
            path: shown,
            ttl,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::new(&self.path, source)
    }

    /// How often expired messages should be swept: often enough that a
    /// short test TTL is honoured within a quarter of itself, at most a minute.
    pub fn sweep_interval(&self) -> Duration {
        (self.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
    }

    pub fn publish_seal_key(&self, id: PeerId, signed: &SignedSealKey) -> Result<(), StoreError> {
        self.lock()
            .prepare_cached(
                "INSERT INTO seal_keys (peer_id, key, sig) VALUES (?1, ?2, ?3)
                 ON CONFLICT(peer_id) DO UPDATE SET key = ?2, sig = ?3",
            )
            .and_then(|mut stmt| stmt.execute(params![&id.0[..], &signed.key[..], &signed.sig]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn seal_key(&self, id: PeerId) -> Result<Option<SignedSealKey>, StoreError> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .lock()
            .query_row(
                "SELECT key, sig FROM seal_keys WHERE peer_id = ?1",
                params![&id.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|(key, sig)| {
            Some(SignedSealKey {
                key: key.as_slice().try_into().ok()?,
                sig,
            })
        }))
    }

    /// Stores a sealed message for `to_id` (idempotent per message id).
    #[allow(clippy::too_many_arguments)]
    pub fn hold(
        &self,
        from: &Name,
        from_id: PeerId,
        to: &Name,
        to_id: PeerId,
        id: MessageId,
        sealed: &[u8],
        now: u64,
    ) -> Result<HoldResult, StoreError> {
        if sealed.len() > MAX_SEALED_LEN {
            return Ok(HoldResult::TooLarge);
        }
        let mut db = self.lock();
        let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<u32, StoreError> {
            db.query_row(sql, p, |r| r.get(0)).map_err(|e| self.err(e))
        };
        // A resend of a message already held is answered as before.
        let stored: Option<i64> = db
            .query_row(
                "SELECT expires_at FROM held WHERE to_id = ?1 AND msg_id = ?2",
                params![&to_id.0[..], &id.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(expires_at) = stored {
            return Ok(HoldResult::Held {
                expires_at: u64::try_from(expires_at).unwrap_or(0),
            });
        }
        let for_recipient = count(
            "SELECT COUNT(*) FROM held WHERE to_id = ?1",
            &[&&to_id.0[..]],
        )?;
        if for_recipient >= MAX_HELD_PER_RECIPIENT {
            return Ok(HoldResult::MailboxFull);
        }
        if count("SELECT COUNT(*) FROM held", &[])? >= MAX_HELD_TOTAL {
            return Ok(HoldResult::MailboxFull);
        }
        let expires_at = now.saturating_add(self.ttl.as_secs());
        db.execute(
            "INSERT OR IGNORE INTO held
             (to_id, msg_id, to_name, from_id, from_name, sealed, stored_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                &to_id.0[..],
                &id.0[..],
                to.as_str(),
                &from_id.0[..],
                from.as_str(),
                sealed,
                sql_time(now),
                sql_time(expires_at)
            ],
        )
        .map_err(|e| self.err(e))?;
        db.waiting.insert(to_id);
        Ok(HoldResult::Held { expires_at })
    }

    /// What waits for `id` as it enrolls: the messages held for it, oldest
    /// first, and its notices. No query for a key that has had none since
    /// it last found none.
    pub fn waiting_for(&self, id: PeerId) -> Result<(Vec<HeldMessage>, Vec<Notice>), StoreError> {
        let mut db = self.lock();
        if !db.waiting.contains(&id) {
            return Ok((Vec::new(), Vec::new()));
        }
        let held = self.held_in(&db, id)?;
        let notices = self.notices_in(&db, id)?;
        if held.is_empty() && notices.is_empty() {
            db.waiting.remove(&id);
        }
        Ok((held, notices))
    }

    /// Everything held for `to_id`, oldest first.
    #[cfg(test)]
    pub fn held_for(&self, to_id: PeerId) -> Result<Vec<HeldMessage>, StoreError> {
        self.held_in(&self.lock(), to_id)
    }

    fn held_in(&self, db: &Connection, to_id: PeerId) -> Result<Vec<HeldMessage>, StoreError> {
        // Sorted here, not with ORDER BY: this runs at every enrollment, and
        // SQLite (built with STAT4) prepares a statement with ORDER BY again
        // each time it is given another key (measured: most of the tracker's
        // SQLite time while peers enroll).
        let mut stmt = db
            .prepare_cached(
                "SELECT rowid, from_name, from_id, msg_id, stored_at, sealed FROM held
                 WHERE to_id = ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![&to_id.0[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut found = Vec::new();
        for row in rows {
            let (rowid, from, from_id, id, stored_at, sealed) = row.map_err(|e| self.err(e))?;
            if let (Ok(from), Some(from_id), Some(id)) = (
                Name::parse(&from),
                PeerId::from_bytes(&from_id),
                MessageId::from_bytes(&id),
            ) {
                let stored_at = u64::try_from(stored_at).unwrap_or(0);
                let message = HeldMessage {
                    from,
                    from_id,
                    id,
                    stored_at,
                    sealed,
                };
                found.push(((stored_at, rowid), message));
            }
        }
        // Oldest first, in the order they were stored.
        found.sort_unstable_by_key(|(order, _)| *order);
        Ok(found.into_iter().map(|(_, message)| message).collect())
    }

    /// Removes a held message its recipient has dealt with; returns its
    /// recipient name if it was there (so a notice can go to the sender).
    pub fn take(
        &self,
        to_id: PeerId,
        from_id: PeerId,
        id: MessageId,
    ) -> Result<Option<Name>, StoreError> {
        let db = self.lock();
        let name: Option<String> = db
            .query_row(
                "DELETE FROM held WHERE to_id = ?1 AND msg_id = ?2 AND from_id = ?3 RETURNING to_name",
                params![&to_id.0[..], &id.0[..], &from_id.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(name.and_then(|n| Name::parse(&n).ok()))
    }

    /// Keeps a notice for `sender` until it collects it.
    pub fn add_notice(&self, sender: PeerId, notice: &Notice, now: u64) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(notice)
            .map_err(|e| self.err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let mut db = self.lock();
        db.execute(
            "INSERT OR REPLACE INTO notices (to_id, msg_id, notice, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                &sender.0[..],
                &notice.id.0[..],
                bytes,
                sql_time(now.saturating_add(NOTICE_TTL.as_secs()))
            ],
        )
        .map_err(|e| self.err(e))?;
        db.waiting.insert(sender);
        Ok(())
    }

    #[cfg(test)]
    pub fn notices_for(&self, sender: PeerId) -> Result<Vec<Notice>, StoreError> {
        self.notices_in(&self.lock(), sender)
    }

    fn notices_in(&self, db: &Connection, sender: PeerId) -> Result<Vec<Notice>, StoreError> {
        // Sorted here, not with ORDER BY (see held_for).
        let mut stmt = db
            .prepare_cached("SELECT rowid, notice FROM notices WHERE to_id = ?1")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![&sender.0[..]], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut found = Vec::new();
        for row in rows {
            let (rowid, notice) = row.map_err(|e| self.err(e))?;
            if let Ok(notice) = postcard::from_bytes(&notice) {
                found.push((rowid, notice));
            }
        }
        found.sort_unstable_by_key(|(rowid, _)| *rowid);
        Ok(found.into_iter().map(|(_, notice)| notice).collect())
    }

    pub fn notice_seen(&self, sender: PeerId, id: MessageId) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "DELETE FROM notices WHERE to_id = ?1 AND msg_id = ?2",
                params![&sender.0[..], &id.0[..]],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Drops held messages past their time-to-live and records an
    /// `Expired` notice for each sender; returns those (sender, notice)
    /// pairs so the online senders can be told at once. Also forgets
    /// notices nobody collected.
    pub fn expire(&self, now: u64) -> Result<Vec<(PeerId, Notice)>, StoreError> {
        let expired: Vec<(Vec<u8>, Vec<u8>, String)> = {
            let db = self.lock();
            db.execute(
                "DELETE FROM notices WHERE expires_at <= ?1",
                params![sql_time(now)],
            )
            .map_err(|e| self.err(e))?;
            let mut stmt = db
                .prepare(
                    "DELETE FROM held WHERE expires_at <= ?1 RETURNING from_id, msg_id, to_name",
                )
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map(params![sql_time(now)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(|e| self.err(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.err(e))?
        };
        let mut out = Vec::new();
        for (from_id, id, to) in expired {
            if let (Some(sender), Some(id), Ok(to)) = (
                PeerId::from_bytes(&from_id),
                MessageId::from_bytes(&id),
                Name::parse(&to),
            ) {
                let notice = Notice {
                    id,
                    to,
                    kind: NoticeKind::Expired,
                };
                self.add_notice(sender, &notice, now)?;
                out.push((sender, notice));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    fn mailbox(dir: &tempfile::TempDir, ttl: Duration) -> Mailbox {
        Mailbox::open(&dir.path().join("t.db"), ttl).unwrap()
    }

    #[test]
    fn held_messages_survive_reopening_and_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob) = (PeerId([1; 32]), PeerId([2; 32]));
        let id = MessageId([7; 16]);
        {
            let m = mailbox(&dir, HELD_TTL);
            let r = m
                .hold(&name("alice"), alice, &name("bob"), bob, id, b"sealed", 100)
                .unwrap();
            assert_eq!(
                r,
                HoldResult::Held {
                    expires_at: 100 + HELD_TTL.as_secs()
                }
            );
            // Resending the same id is idempotent.
            m.hold(&name("alice"), alice, &name("bob"), bob, id, b"sealed", 101)
                .unwrap();
        }
        let m = mailbox(&dir, HELD_TTL);
        let held = m.held_for(bob).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].sealed, b"sealed");
        assert_eq!(held[0].from, name("alice"));
        // Only the right sender's id can take it.
        assert_eq!(m.take(bob, PeerId([9; 32]), id).unwrap(), None);
        assert_eq!(m.take(bob, alice, id).unwrap(), Some(name("bob")));
        assert_eq!(m.take(bob, alice, id).unwrap(), None);
        assert!(m.held_for(bob).unwrap().is_empty());
    }

    #[test]
    fn what_waits_at_enrollment_is_found_after_reopening_and_after_new_mail() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob, carol) = (PeerId([1; 32]), PeerId([2; 32]), PeerId([3; 32]));
        let id = MessageId([7; 16]);
        let notice = Notice {
            id,
            to: name("bob"),
            kind: NoticeKind::Expired,
        };
        {
            let m = mailbox(&dir, HELD_TTL);
            m.hold(&name("alice"), alice, &name("bob"), bob, id, b"sealed", 100)
                .unwrap();
            m.add_notice(alice, &notice, 100).unwrap();
        }
        // After a restart: what the tables hold is found.
        let m = mailbox(&dir, HELD_TTL);
        let (held, notices) = m.waiting_for(bob).unwrap();
        assert_eq!((held.len(), notices.len()), (1, 0));
        let (held, notices) = m.waiting_for(alice).unwrap();
        assert_eq!((held.len(), notices), (0, vec![notice.clone()]));
        assert_eq!(m.waiting_for(carol).unwrap(), (vec![], vec![]));
        // Once found empty, a key still gets what arrives later.
        m.take(bob, alice, id).unwrap();
        m.notice_seen(alice, id).unwrap();
        assert_eq!(m.waiting_for(bob).unwrap(), (vec![], vec![]));
        assert_eq!(m.waiting_for(alice).unwrap(), (vec![], vec![]));
        m.hold(
            &name("carol"),
            carol,
            &name("bob"),
            bob,
            MessageId([8; 16]),
            b"s",
            200,
        )
        .unwrap();
        m.add_notice(alice, &notice, 200).unwrap();
        assert_eq!(m.waiting_for(bob).unwrap().0.len(), 1);
        assert_eq!(m.waiting_for(alice).unwrap().1, vec![notice]);
    }

    #[test]
    fn a_full_mailbox_refuses_more() {
        let dir = tempfile::tempdir().unwrap();
        let m = mailbox(&dir, HELD_TTL);
        for i in 0..MAX_HELD_PER_RECIPIENT {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            m.hold(
                &name("a"),
                PeerId([1; 32]),
                &name("b"),
                PeerId([2; 32]),
                MessageId(id),
                b"x",
                1,
            )
            .unwrap();
        }
        let r = m
            .hold(
                &name("a"),
                PeerId([1; 32]),
                &name("b"),
                PeerId([2; 32]),
                MessageId([0xff; 16]),
                b"x",
                1,
            )
            .unwrap();
        assert_eq!(r, HoldResult::MailboxFull);
    }

    #[test]
    fn expiry_drops_the_message_and_leaves_the_sender_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let m = mailbox(&dir, Duration::from_secs(10));
        let (alice, bob) = (PeerId([1; 32]), PeerId([2; 32]));
        let id = MessageId([7; 16]);
        m.hold(&name("alice"), alice, &name("bob"), bob, id, b"s", 100)
            .unwrap();
        assert!(m.expire(109).unwrap().is_empty());
        let expired = m.expire(110).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, alice);
        assert_eq!(expired[0].1.kind, NoticeKind::Expired);
        assert!(m.held_for(bob).unwrap().is_empty());
        assert_eq!(m.notices_for(alice).unwrap(), vec![expired[0].1.clone()]);
        m.notice_seen(alice, id).unwrap();
        assert!(m.notices_for(alice).unwrap().is_empty());
    }
}
