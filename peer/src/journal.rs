//! `peer.journal`: the few records that must survive a crash the instant
//! they happen, appended with one `write` each, ahead of the database.
//!
//! `peer.db` is written in group commits ([`crate::store`]), a few
//! milliseconds behind. Two facts cannot wait that long:
//! - a message the user just sent (`Queued`): otherwise a crash right after
//!   `send` could lose it;
//! - a message the user was just shown (`Shown`): otherwise a crash before
//!   its acknowledgement left would show it again when the sender resends.
//!
//! Each is appended here (a length-prefixed postcard record; in the page
//! cache once `write` returns, so a killed process loses nothing) and then
//! written to `peer.db` as usual. At start, the records are applied to the
//! database again (idempotent) and the file is emptied; while running it is
//! emptied whenever every record in it is committed. Another peer process on
//! the same data directory (for the moment until the tracker replaces one
//! of them) may append here too: then the file is applied whole to the
//! database before it is emptied ([`Journal::reconcile`]).

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};
use tincan_proto::{
    MessageId, Name, PeerId,
    codec::{decode, encode},
};
use tracing::warn;

/// The journal is emptied once all its records are committed and it has
/// grown past this (not after every commit: one syscall saved per commit).
pub const JOURNAL_TRUNCATE: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A message accepted for sending.
    Queued {
        id: MessageId,
        to: Name,
        body: String,
        sent_at_ms: u64,
    },
    /// A message that is on the user's screen.
    Shown {
        from_id: PeerId,
        from: Name,
        id: MessageId,
        body: String,
        sent_at_ms: u64,
        received_ms: u64,
        path: String,
    },
}

pub struct Journal {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: File,
    len: u64,
    /// Records appended since the file was last emptied, and how many of
    /// them are committed to the database.
    appended: u64,
    committed: u64,
    /// The file holds records another process appended.
    foreign: bool,
}

impl Journal {
    /// Opens (creating) the journal and returns the records it holds, up
    /// to the first incomplete one (a write cut short by a power loss).
    pub fn open(path: &Path) -> std::io::Result<(Self, Vec<Record>)> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let records = parse(&bytes, path);
        let journal = Self {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                file,
                len: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
                appended: 0,
                committed: 0,
                foreign: false,
            }),
        };
        Ok((journal, records))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one record; it survives a crash of this process once this
    /// returns.
    pub fn append(&self, record: &Record) -> std::io::Result<()> {
        let body = encode(record).map_err(std::io::Error::other)?;
        let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&body);
        let mut state = self.lock();
        state.file.write_all(&frame)?;
        state.len += u64::try_from(frame.len()).unwrap_or(u64::MAX);
        state.appended += 1;
        Ok(())
    }

    /// One appended record is now committed to the database.
    pub fn committed(&self) {
        let mut state = self.lock();
        state.committed += 1;
        if state.committed >= state.appended && state.len >= JOURNAL_TRUNCATE {
            state.empty();
        }
    }

    /// Empties the journal: everything in it is in the database (after
    /// start-up replay, or when the store closes).
    pub fn clear(&self) {
        self.lock().empty();
    }

    /// Whether another process appended records that are not known to be
    /// in the database; [`Journal::reconcile`] applies them.
    pub fn has_foreign(&self) -> bool {
        self.lock().foreign
    }

    /// Hands every record in the file, whoever wrote it, to `apply` (which
    /// writes them to the database, idempotently, and says whether that
    /// was committed), then empties the file if nothing was appended
    /// meanwhile. Appends wait until this returns.
    pub fn reconcile(&self, apply: impl FnOnce(&[Record]) -> bool) -> std::io::Result<()> {
        let mut state = self.lock();
        let mut bytes = Vec::new();
        state.file.seek(SeekFrom::Start(0))?;
        state.file.read_to_end(&mut bytes)?;
        if !apply(&parse(&bytes, &self.path)) {
            return Ok(());
        }
        // Everything in the file is in the database now, ours included.
        state.len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        state.foreign = false;
        state.committed = state.appended;
        state.empty();
        Ok(())
    }
}

impl State {
    fn empty(&mut self) {
        // Another peer process on this data directory (briefly: the one a
        // new start replaces, until the tracker tells it so) appends here
        // too, and its records may not be in the database yet. Then the
        // file is left as it is, for the database thread to apply it whole
        // first (`Journal::reconcile`).
        match self.file.metadata() {
            Ok(meta) if meta.len() != self.len => {
                self.foreign = true;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot read the journal's size; not emptying it");
                return;
            }
        }
        if let Err(e) = self.file.set_len(0) {
            // Harmless: its records are applied again at the next start.
            warn!(error = %e, "cannot empty the journal");
            return;
        }
        self.len = 0;
        self.appended = 0;
        self.committed = 0;
    }
}

fn parse(mut bytes: &[u8], path: &Path) -> Vec<Record> {
    let mut records = Vec::new();
    while bytes.len() >= 4 {
        let (head, rest) = bytes.split_at(4);
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if rest.len() < len {
            break;
        }
        let (body, rest) = rest.split_at(len);
        match decode::<Record>(body) {
            Ok(record) => records.push(record),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "journal record unreadable; ignoring the rest");
                break;
            }
        }
        bytes = rest;
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(n: u8) -> Record {
        Record::Queued {
            id: MessageId([n; 16]),
            to: Name::parse("bob").unwrap(),
            body: format!("message {n}"),
            sent_at_ms: u64::from(n),
        }
    }

    /// A record that on its own takes the journal past `JOURNAL_TRUNCATE`.
    fn big() -> Record {
        Record::Queued {
            id: MessageId([1; 16]),
            to: Name::parse("bob").unwrap(),
            body: "x".repeat(JOURNAL_TRUNCATE as usize),
            sent_at_ms: 1,
        }
    }

    #[test]
    fn records_survive_reopening_in_order_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        {
            let (j, old) = Journal::open(&path).unwrap();
            assert!(old.is_empty());
            j.append(&queued(1)).unwrap();
            j.append(&queued(2)).unwrap();
        }
        // A write cut short: a length with only part of its body.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        let (_, records) = Journal::open(&path).unwrap();
        assert_eq!(records, [queued(1), queued(2)]);
    }

    #[test]
    fn what_another_process_appended_is_applied_before_it_is_emptied_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (ours, _) = Journal::open(&path).unwrap();
        // A second process on the same data directory.
        let (theirs, _) = Journal::open(&path).unwrap();
        let big = big();
        ours.append(&big).unwrap();
        theirs.append(&queued(2)).unwrap();
        let kept = || Journal::open(&path).unwrap().1 == [big.clone(), queued(2)];
        // All of ours is committed and past the size that empties it, and
        // the store closing empties it: theirs is not committed, so both
        // leave the file alone.
        assert!(!ours.has_foreign());
        ours.committed();
        assert!(kept(), "emptied with another process's record in it");
        ours.clear();
        assert!(
            kept(),
            "emptied at close with another process's record in it"
        );
        assert!(ours.has_foreign());

        // The database thread applies the whole file, then it is emptied.
        let mut applied = Vec::new();
        ours.reconcile(|records| {
            applied = records.to_vec();
            true
        })
        .unwrap();
        assert!(
            applied == [big.clone(), queued(2)],
            "not every record was applied"
        );
        assert!(!ours.has_foreign());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // A failed apply empties nothing.
        theirs.append(&queued(3)).unwrap();
        ours.clear();
        ours.reconcile(|_| false).unwrap();
        assert_eq!(Journal::open(&path).unwrap().1, [queued(3)]);
    }

    #[test]
    fn emptied_once_every_record_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (j, _) = Journal::open(&path).unwrap();
        let big = big();
        j.append(&big).unwrap();
        j.append(&queued(2)).unwrap();
        j.committed();
        // One record is not committed yet: kept.
        assert!(std::fs::metadata(&path).unwrap().len() > JOURNAL_TRUNCATE);
        j.committed();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        j.append(&queued(3)).unwrap();
        drop(j);
        assert_eq!(Journal::open(&path).unwrap().1, [queued(3)]);
    }
}
