//! `peer.journal`: the few records that must survive a crash the instant
//! they happen, written ahead of the database.
//!
//! `peer.db` is written in group commits ([`crate::store`]), a few
//! milliseconds behind. Two facts cannot wait that long:
//! - a message the user just sent (`Queued`): otherwise a crash right after
//!   `send` could lose it;
//! - a message the user was just shown (`Shown`): otherwise a crash before
//!   its acknowledgement left would show it again when the sender resends.
//!
//! Each is copied into a memory-mapped file (a length-prefixed postcard
//! record, the length written last) and then written to `peer.db` as usual.
//! The mapping is shared with the page cache, so once the copy is done the
//! record outlives a killed process exactly as a `write` would, without a
//! system call per record (two per round trip were a tenth of the direct
//! round trip: docs/benchmarks.md, finding 12). At start the records are
//! applied to the database again (idempotent) and the file is emptied;
//! while running it is emptied whenever every record in it is committed.
//!
//! Each process journals in a file of its own, held with an exclusive
//! lock: `peer.journal`, or `peer.journal.1` … when another peer process
//! on the same data directory (for the moment until the tracker replaces
//! one of them) holds that one. A file whose lock can be taken belongs to
//! no running process: its records are applied and it is emptied, at start
//! and then at most every `JOURNAL_RECONCILE` ([`Journal::take_orphans`]).

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{ErrorKind, Read},
    ops::Range,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{Ordering, compiler_fence},
    },
};

use memmap2::MmapMut;
use serde::{Deserialize, Serialize};
use tincan_proto::{
    MAX_FRAME_LEN, MessageId, Name, PeerId,
    codec::{decode, encode_to_slice},
};
use tracing::warn;

/// The journal is emptied once all its records are committed and it has
/// grown past this (not after every commit: its bytes are zeroed then).
pub const JOURNAL_TRUNCATE: usize = 64 * 1024;
/// Bytes mapped at start; doubled (up to [`JOURNAL_MAX`]) when a record does
/// not fit. Written as zeros first (not sparse), so a full disk is an error
/// when the file is extended, never a SIGBUS when a record is copied in.
pub const JOURNAL_MAP: usize = 1024 * 1024;
/// Most bytes of records whose rows are not committed yet: past this the
/// database is not keeping up, and a new record is refused (the send fails).
pub const JOURNAL_MAX: usize = 256 * 1024 * 1024;
/// Peer processes that can journal on one data directory at once, a file
/// each.
pub const JOURNAL_SLOTS: usize = 8;

/// Bytes of a record's length prefix.
const LENGTH: usize = 4;
/// The largest record: a message body and its few fields fit in a frame.
const MAX_RECORD: usize = MAX_FRAME_LEN;
/// The file is extended by writing zeros, this many bytes per write.
const ZERO_CHUNK: usize = 64 * 1024;

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
    /// `peer.journal`; the other slots are named after it.
    base: PathBuf,
    /// The slot this process holds.
    slot: usize,
    state: Mutex<State>,
}

struct State {
    /// Locked for as long as this journal lives.
    file: File,
    pages: Pages,
    /// Bytes of records in the file; everything after is zero.
    len: usize,
    /// Records appended since the file was last emptied, and how many of
    /// them are committed to the database.
    appended: u64,
    committed: u64,
    /// Files of processes that ended without emptying theirs, whose records
    /// [`Journal::open`] returned: emptied by [`Journal::clear`].
    orphans: Vec<File>,
}

impl Journal {
    /// Takes the first free journal file at `base` (`peer.journal`, then
    /// `peer.journal.1` …) and returns the records it holds together with
    /// those of every file no running process holds, each up to its first
    /// incomplete record (a copy cut short by a power loss).
    pub fn open(base: &Path) -> std::io::Result<(Self, Vec<Record>)> {
        let mut own = None;
        let mut records = Vec::new();
        let mut orphans = Vec::new();
        for slot in 0..JOURNAL_SLOTS {
            let path = slot_path(base, slot);
            let Some(file) = lock_slot(&path, own.is_none())? else {
                continue;
            };
            let (found, end) = read_records(&file, &path)?;
            if own.is_none() {
                records.extend(found);
                own = Some((slot, file, end));
            } else if !found.is_empty() {
                records.extend(found);
                orphans.push(file);
            }
        }
        let Some((slot, file, end)) = own else {
            return Err(std::io::Error::other(format!(
                "{JOURNAL_SLOTS} other peer processes are using this data directory"
            )));
        };
        let on_disk = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
        let mut pages = Pages::new(&file, on_disk.max(JOURNAL_MAP))?;
        // Bytes after the last whole record (a torn one) are zeroed, so
        // that records appended over them end where they should.
        let tail = on_disk.min(pages.size());
        if end < tail {
            pages.zero(&file, end..tail)?;
        }
        let journal = Self {
            base: base.to_path_buf(),
            slot,
            state: Mutex::new(State {
                file,
                pages,
                len: end,
                appended: 0,
                committed: 0,
                orphans,
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
        let mut state = self.lock();
        let State {
            file, pages, len, ..
        } = &mut *state;
        let at = *len;
        // Room for the largest record, and the zero length after it that
        // marks the end.
        let room = at + LENGTH + MAX_RECORD;
        if room + LENGTH > pages.size() {
            pages.grow(file, room + LENGTH)?;
        }
        let body = pages.put(file, at + LENGTH..room, record)?;
        let prefix = u32::try_from(body).map_err(std::io::Error::other)?;
        // The length goes in last: a record counts once it is there whole.
        compiler_fence(Ordering::SeqCst);
        pages.write(file, at, &prefix.to_le_bytes())?;
        *len = at + LENGTH + body;
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

    /// Empties the journal, and the files of ended processes that
    /// [`Journal::open`] returned the records of: everything in them is in
    /// the database (after start-up replay, or when the store closes).
    pub fn clear(&self) {
        let mut state = self.lock();
        state.empty();
        for orphan in state.orphans.drain(..) {
            if let Err(e) = orphan.set_len(0) {
                // Harmless: its records are applied again later.
                warn!(error = %e, "cannot empty another process's journal");
            }
        }
    }

    /// Hands the records of each journal file that no running process
    /// holds to `apply` (which writes them to the database, idempotently,
    /// and says whether that was committed), and empties the files applied.
    pub fn take_orphans(&self, mut apply: impl FnMut(&[Record]) -> bool) -> std::io::Result<()> {
        for slot in (0..JOURNAL_SLOTS).filter(|slot| *slot != self.slot) {
            let path = slot_path(&self.base, slot);
            let Some(file) = lock_slot(&path, false)? else {
                continue;
            };
            if file.metadata()?.len() == 0 {
                continue;
            }
            let (records, _) = read_records(&file, &path)?;
            if records.is_empty() || apply(&records) {
                file.set_len(0)?;
            }
        }
        Ok(())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // A journal left empty is cut to nothing, so that the next process
        // has no file to read and `take_orphans` no bytes to look at.
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if state.len == 0 {
            let _ = state.file.set_len(0);
        }
    }
}

impl State {
    fn empty(&mut self) {
        // The first length first: from then on the file reads as empty,
        // whatever a crash leaves of the rest.
        let len = self.len.min(self.pages.size());
        let zeroed = self
            .pages
            .zero(&self.file, 0..LENGTH.min(len))
            .and_then(|()| {
                compiler_fence(Ordering::SeqCst);
                self.pages.zero(&self.file, 0..len)
            });
        if let Err(e) = zeroed {
            // Harmless: its records are applied again at the next start.
            warn!(error = %e, "cannot empty the journal");
            return;
        }
        self.len = 0;
        self.appended = 0;
        self.committed = 0;
    }
}

#[cfg(test)]
thread_local! {
    /// Tests set it to open journals as on a file system that cannot map.
    static NO_MAP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Where records are written: a shared mapping of the file (no system call
/// per record), or, on a file system that cannot map it, the file itself
/// with `pwrite`. The bytes in the file are the same either way.
enum Pages {
    Mapped(MmapMut),
    Written {
        size: usize,
        /// A record is serialized here, then written.
        scratch: Vec<u8>,
    },
}

impl Pages {
    /// Extends `file` to `size` bytes and maps it, or falls back to writing.
    fn new(file: &File, size: usize) -> std::io::Result<Self> {
        let size = extend(file, size)?;
        #[cfg(test)]
        if NO_MAP.get() {
            return Ok(Self::Written {
                size,
                scratch: Vec::new(),
            });
        }
        match map(file) {
            Ok(map) => Ok(Self::Mapped(map)),
            Err(e) => {
                warn!(error = %e, "cannot map the journal; writing it record by record instead");
                Ok(Self::Written {
                    size,
                    scratch: Vec::new(),
                })
            }
        }
    }

    fn size(&self) -> usize {
        match self {
            Self::Mapped(map) => map.len(),
            Self::Written { size, .. } => *size,
        }
    }

    /// Makes room for at least `needed` bytes.
    fn grow(&mut self, file: &File, needed: usize) -> std::io::Result<()> {
        if needed > JOURNAL_MAX {
            return Err(std::io::Error::other(format!(
                "more than {} MiB of records are not in the database yet",
                JOURNAL_MAX >> 20
            )));
        }
        let size = extend(file, needed.max(self.size() * 2).min(JOURNAL_MAX))?;
        match self {
            Self::Mapped(old) => *old = map(file)?,
            Self::Written { size: old, .. } => *old = size,
        }
        Ok(())
    }

    /// Serializes `record` at the start of `room`; returns its length. One
    /// that does not fit is refused, and what it wrote of itself zeroed.
    fn put(&mut self, file: &File, room: Range<usize>, record: &Record) -> std::io::Result<usize> {
        match self {
            // In place: no allocation, no copy.
            Self::Mapped(map) => encode_to_slice(record, &mut map[room.clone()]).map_err(|e| {
                map[room].fill(0);
                std::io::Error::other(e)
            }),
            Self::Written { scratch, .. } => {
                // Sized once: the room is always `MAX_RECORD`.
                scratch.resize(room.len(), 0);
                let len = encode_to_slice(record, scratch).map_err(std::io::Error::other)?;
                file.write_all_at(&scratch[..len], room.start as u64)?;
                Ok(len)
            }
        }
    }

    fn write(&mut self, file: &File, at: usize, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Mapped(map) => {
                map[at..at + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            Self::Written { .. } => file.write_all_at(bytes, at as u64),
        }
    }

    fn zero(&mut self, file: &File, range: Range<usize>) -> std::io::Result<()> {
        match self {
            Self::Mapped(map) => {
                map[range].fill(0);
                Ok(())
            }
            Self::Written { .. } => write_zeros(file, range.start as u64, range.end as u64),
        }
    }
}

/// `peer.journal` for slot 0, `peer.journal.<slot>` for the others.
fn slot_path(base: &Path, slot: usize) -> PathBuf {
    if slot == 0 {
        return base.to_path_buf();
    }
    let mut name = base.as_os_str().to_owned();
    name.push(format!(".{slot}"));
    PathBuf::from(name)
}

/// Opens the journal file at `path` (creating it if `create`) and locks
/// it; `None` when it does not exist or another process holds it.
fn lock_slot(path: &Path, create: bool) -> std::io::Result<Option<File>> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Extends `file` to at least `size` bytes (never shrinks it); returns its
/// size. Zeros are written, not a sparse extension: the blocks are the
/// file's from now on, so that a full disk is an error here (the send
/// fails) rather than a SIGBUS when a record is copied into a page with no
/// block.
fn extend(file: &File, size: usize) -> std::io::Result<usize> {
    let size = u64::try_from(size).map_err(std::io::Error::other)?;
    let on_disk = file.metadata()?.len();
    write_zeros(file, on_disk, size)?;
    usize::try_from(size.max(on_disk)).map_err(std::io::Error::other)
}

/// Writes zeros over `from..to` of `file`.
fn write_zeros(file: &File, mut from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK];
    while from < to {
        let n = usize::try_from(to - from).map_or(ZERO_CHUNK, |left| left.min(ZERO_CHUNK));
        file.write_all_at(&zeros[..n], from)?;
        from += n as u64;
    }
    Ok(())
}

/// Maps all of `file`.
#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<MmapMut> {
    // SAFETY: the mapping is valid while the file is not cut shorter than
    // it. The caller holds the file's exclusive lock for as long as the
    // mapping lives, and tincan cuts a journal file only while holding that
    // lock: at drop, when the mapping is not used any more, or as an orphan,
    // which nobody maps. SQLite maps `peer.db` on the same terms.
    unsafe { MmapMut::map_mut(file) }
}

/// The records in `file`, and the offset where the last whole one ends.
fn read_records(mut file: &File, path: &Path) -> std::io::Result<(Vec<Record>, usize)> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(parse(&bytes, path))
}

fn parse(bytes: &[u8], path: &Path) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + LENGTH) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        // A zero length is the end; so is a record cut short.
        let Some(body) = bytes
            .get(at + LENGTH..at + LENGTH + len)
            .filter(|_| len > 0)
        else {
            break;
        };
        match decode::<Record>(body) {
            Ok(record) => records.push(record),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "journal record unreadable; ignoring the rest");
                break;
            }
        }
        at += LENGTH + len;
    }
    (records, at)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

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
            body: "x".repeat(JOURNAL_TRUNCATE),
            sent_at_ms: 1,
        }
    }

    /// What a file holds, read as the next start would (without a lock).
    fn on_disk(path: &Path) -> Vec<Record> {
        parse(&std::fs::read(path).unwrap(), path).0
    }

    #[test]
    fn records_survive_a_crash_in_order_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (j, old) = Journal::open(&path).unwrap();
        assert!(old.is_empty());
        j.append(&queued(1)).unwrap();
        j.append(&queued(2)).unwrap();
        // A process killed now: the records are in the file, as they were
        // the moment `append` returned.
        assert_eq!(on_disk(&path), [queued(1), queued(2)]);
        let end = u64::try_from(j.lock().len).unwrap();
        drop(j);
        // A record cut short after them: a length with part of its body.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[200, 0, 0, 0, 1, 2, 3], end).unwrap();
        let (j, records) = Journal::open(&path).unwrap();
        assert_eq!(records, [queued(1), queued(2)]);
        // What comes next is appended over the torn record, and read back.
        j.append(&queued(3)).unwrap();
        drop(j);
        assert_eq!(
            Journal::open(&path).unwrap().1,
            [queued(1), queued(2), queued(3)]
        );
    }

    #[test]
    fn a_second_process_journals_in_its_own_file_and_what_a_dead_one_left_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (ours, _) = Journal::open(&path).unwrap();
        // A second process on the same data directory gets the next file.
        let (theirs, _) = Journal::open(&path).unwrap();
        assert_eq!((ours.slot, theirs.slot), (0, 1));
        ours.append(&big()).unwrap();
        theirs.append(&queued(2)).unwrap();
        // Ours is all committed: emptied, theirs untouched.
        ours.committed();
        assert!(on_disk(&path).is_empty());
        assert_eq!(on_disk(&slot_path(&path, 1)), [queued(2)]);
        // While it runs, its file is its own.
        let mut applied = Vec::new();
        ours.take_orphans(|records| {
            applied.extend_from_slice(records);
            true
        })
        .unwrap();
        assert!(applied.is_empty(), "took a running process's records");

        // It is killed: a failed apply empties nothing, a good one empties it.
        drop(theirs);
        ours.take_orphans(|_| false).unwrap();
        assert_eq!(on_disk(&slot_path(&path, 1)), [queued(2)]);
        ours.take_orphans(|records| {
            applied.extend_from_slice(records);
            true
        })
        .unwrap();
        assert_eq!(applied, [queued(2)]);
        assert!(on_disk(&slot_path(&path, 1)).is_empty());
    }

    #[test]
    fn a_start_returns_what_every_ended_process_left_and_clears_it_once_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (a, _) = Journal::open(&path).unwrap();
        let (b, _) = Journal::open(&path).unwrap();
        a.append(&queued(1)).unwrap();
        b.append(&queued(2)).unwrap();
        drop((a, b));
        let (j, records) = Journal::open(&path).unwrap();
        assert_eq!(records, [queued(1), queued(2)]);
        // Until `clear`, the ended process's file stays held: another start
        // neither takes it as its own nor returns its records again.
        let (other, again) = Journal::open(&path).unwrap();
        assert_eq!((other.slot, again.len()), (2, 0));
        drop(other);
        j.clear();
        assert!(on_disk(&path).is_empty());
        assert!(on_disk(&slot_path(&path, 1)).is_empty());
        drop(j);
        assert!(Journal::open(&path).unwrap().1.is_empty());
    }

    #[test]
    fn emptied_once_every_record_is_committed_and_cut_to_nothing_at_a_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (j, _) = Journal::open(&path).unwrap();
        let big = big();
        j.append(&big).unwrap();
        j.append(&queued(2)).unwrap();
        j.committed();
        // One record is not committed yet: kept.
        assert_eq!(on_disk(&path), [big, queued(2)]);
        j.committed();
        assert!(on_disk(&path).is_empty());
        j.append(&queued(3)).unwrap();
        j.committed();
        // Small: not emptied yet; a clean end (the store closing) does.
        assert_eq!(on_disk(&path), [queued(3)]);
        j.clear();
        drop(j);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_record_too_large_is_refused_and_leaves_the_journal_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (j, _) = Journal::open(&path).unwrap();
        j.append(&queued(1)).unwrap();
        let huge = Record::Queued {
            id: MessageId([9; 16]),
            to: Name::parse("bob").unwrap(),
            body: "x".repeat(MAX_RECORD),
            sent_at_ms: 9,
        };
        assert!(j.append(&huge).is_err());
        j.append(&queued(2)).unwrap();
        assert_eq!(on_disk(&path), [queued(1), queued(2)]);
    }

    #[test]
    fn the_file_has_its_blocks_so_a_full_disk_is_an_error_and_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (j, _) = Journal::open(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.len() >= JOURNAL_MAP as u64);
        // Not sparse: every byte mapped has a block on disk.
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "{} of {} bytes allocated",
            meta.blocks() * 512,
            meta.len()
        );
        drop(j);
    }

    #[test]
    fn the_map_grows_for_records_past_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        let (j, _) = Journal::open(&path).unwrap();
        assert!(matches!(j.lock().pages, Pages::Mapped(_)));
        let n = JOURNAL_MAP / JOURNAL_TRUNCATE + 2;
        for _ in 0..n {
            j.append(&big()).unwrap();
        }
        assert!(j.lock().pages.size() > JOURNAL_MAP);
        assert_eq!(on_disk(&path).len(), n);
    }

    #[test]
    fn where_the_file_cannot_be_mapped_the_same_records_are_written_with_pwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.journal");
        NO_MAP.set(true);
        let (j, _) = Journal::open(&path).unwrap();
        assert!(matches!(j.lock().pages, Pages::Written { .. }));
        let big = big();
        j.append(&big).unwrap();
        j.append(&queued(2)).unwrap();
        assert_eq!(on_disk(&path), [big.clone(), queued(2)]);
        // Emptied once all committed, then appended to from the start.
        j.committed();
        j.committed();
        assert!(on_disk(&path).is_empty());
        j.append(&queued(3)).unwrap();
        // It grows too.
        let n = JOURNAL_MAP / JOURNAL_TRUNCATE + 2;
        for _ in 0..n {
            j.append(&big).unwrap();
        }
        assert!(j.lock().pages.size() > JOURNAL_MAP);
        drop(j);
        // A mapped journal reads what the written one left.
        NO_MAP.set(false);
        let (_, records) = Journal::open(&path).unwrap();
        assert_eq!(records.len(), n + 1);
        assert_eq!(records[0], queued(3));
    }
}
