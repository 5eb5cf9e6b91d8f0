//! The registry of online peers, and presence: the one place that decides
//! who hears about a change.
//!
//! Every change (a join, a leave) is encoded once and published on a bounded
//! broadcast channel; each session task forwards what it receives to its
//! peer. A session that falls more than [`PRESENCE_BACKLOG`] changes behind
//! is told so by the channel and disconnected: a slow peer never holds up the
//! publisher or anyone else. Taking the newcomer's snapshot and subscribing
//! happen under the same short lock as the insert, so no change is missed or
//! seen twice between the full list and the deltas.
//!
//! Today every online peer hears every change (the classic behaviour, with a
//! one-entry delta instead of the full list). A subscription mode (peers that
//! only hear about the names they follow) belongs here and in the session's
//! filter, nowhere else.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tincan_proto::{
    Name, PeerId,
    codec::{Encoded, FrameError},
    tracker::{FromTracker, PeerInfo, PresenceChange, RejectReason},
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// How many presence changes a session may fall behind before it is dropped.
pub const PRESENCE_BACKLOG: usize = 4096;
/// Frames addressed to one session (held messages, notices) waiting to be
/// written; past this they stay in the mailbox for the next enrollment.
pub const INBOX_QUEUE: usize = 256;

/// Identifies one enrollment (one connection's session), so that a late
/// leave from a replaced session cannot remove its successor.
pub type SessionId = u64;

/// One published change, encoded once for all recipients.
#[derive(Clone)]
pub struct PresenceEvent {
    /// The session whose change this is; it does not hear its own.
    pub origin: SessionId,
    pub frame: Encoded<FromTracker>,
}

/// `C` is what the registry keeps to reach each online peer (its QUIC
/// connection in the tracker; nothing in unit tests).
pub struct Registry<C = quinn::Connection> {
    inner: Mutex<Inner<C>>,
    presence: broadcast::Sender<PresenceEvent>,
    max_peers: usize,
}

struct Inner<C> {
    by_name: HashMap<String, Entry<C>>,
    by_id: HashMap<PeerId, String>,
    next_session: SessionId,
}

struct Entry<C> {
    info: Arc<PeerInfo>,
    session: SessionId,
    /// Cancelled when a newer session of the same key replaces this one.
    replaced: CancellationToken,
    inbox: mpsc::Sender<FromTracker>,
    /// For circuits the tracker opens to this peer, and its RTT.
    conn: C,
}

/// What a newly joined session needs.
pub struct Joined {
    pub session: SessionId,
    /// Everyone online at the instant of joining, the newcomer included.
    pub snapshot: Vec<Arc<PeerInfo>>,
    /// Every change after that instant.
    pub presence: broadcast::Receiver<PresenceEvent>,
    /// Fires if the same key enrolls again elsewhere.
    pub replaced: CancellationToken,
    /// Frames addressed to this session alone.
    pub inbox: mpsc::Receiver<FromTracker>,
}

impl<C: Clone> Registry<C> {
    pub fn new(max_peers: usize) -> Self {
        let (presence, _) = broadcast::channel(PRESENCE_BACKLOG);
        Self {
            inner: Mutex::new(Inner {
                by_name: HashMap::new(),
                by_id: HashMap::new(),
                next_session: 0,
            }),
            presence,
            max_peers,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<C>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` may take `name` as far as who is online is concerned.
    pub fn check(&self, name: &Name, id: PeerId) -> Result<(), RejectReason> {
        let inner = self.lock();
        match inner.by_name.get(&name.key()) {
            Some(e) if e.info.id != id => Err(RejectReason::NameInUse),
            Some(_) => Ok(()),
            None if inner.by_name.len() >= self.max_peers && !inner.by_id.contains_key(&id) => {
                Err(RejectReason::TrackerFull)
            }
            None => Ok(()),
        }
    }

    /// Adds `info` to the online list (step 5), replacing any session of the
    /// same key, and publishes the change to everyone else (step 6).
    pub fn join(&self, info: PeerInfo, conn: C) -> Result<Joined, JoinError> {
        let joined_frame =
            Encoded::new(&FromTracker::Presence(PresenceChange::Joined(info.clone())))?;
        let mut inner = self.lock();
        let key = info.name.key();
        if let Some(e) = inner.by_name.get(&key)
            && e.info.id != info.id
        {
            return Err(JoinError::Rejected(RejectReason::NameInUse));
        }
        if !inner.by_id.contains_key(&info.id) && inner.by_name.len() >= self.max_peers {
            return Err(JoinError::Rejected(RejectReason::TrackerFull));
        }
        inner.next_session += 1;
        let session = inner.next_session;

        // One session per key: the old one (same or another name) ends.
        if let Some(old_key) = inner.by_id.remove(&info.id)
            && let Some(old) = inner.by_name.remove(&old_key)
        {
            old.replaced.cancel();
            if old_key != key {
                self.publish_left(session, &old.info);
            }
        }

        let replaced = CancellationToken::new();
        let (inbox_tx, inbox) = mpsc::channel(INBOX_QUEUE);
        inner.by_id.insert(info.id, key.clone());
        inner.by_name.insert(
            key,
            Entry {
                info: Arc::new(info),
                session,
                replaced: replaced.clone(),
                inbox: inbox_tx,
                conn,
            },
        );
        let snapshot = inner.by_name.values().map(|e| e.info.clone()).collect();
        let presence = self.presence.subscribe();
        // No receivers is not an error: nobody else is online.
        let _ = self.presence.send(PresenceEvent {
            origin: session,
            frame: joined_frame,
        });
        Ok(Joined {
            session,
            snapshot,
            presence,
            replaced,
            inbox,
        })
    }

    /// Removes `session` from the online list if it is still the current
    /// session for its name, and tells everyone. Returns whether it was.
    pub fn leave(&self, name: &Name, session: SessionId) -> bool {
        let mut inner = self.lock();
        let key = name.key();
        match inner.by_name.get(&key) {
            Some(e) if e.session == session => {}
            _ => return false,
        }
        let Some(entry) = inner.by_name.remove(&key) else {
            return false;
        };
        inner.by_id.remove(&entry.info.id);
        self.publish_left(session, &entry.info);
        true
    }

    fn publish_left(&self, origin: SessionId, info: &PeerInfo) {
        let change = FromTracker::Presence(PresenceChange::Left {
            name: info.name.clone(),
            id: info.id,
        });
        // A Left frame is a name and a key: it always fits a frame.
        if let Ok(frame) = Encoded::new(&change) {
            let _ = self.presence.send(PresenceEvent { origin, frame });
        }
    }

    /// Hands `frame` to the online session of `id`, if any, without
    /// waiting; false if it is offline or its inbox is full.
    pub fn push(&self, id: &PeerId, frame: FromTracker) -> bool {
        let inner = self.lock();
        let Some(entry) = inner.by_id.get(id).and_then(|k| inner.by_name.get(k)) else {
            return false;
        };
        entry.inbox.try_send(frame).is_ok()
    }

    /// The connection of the peer online as `name` (for relay circuits).
    pub fn connection(&self, name: &Name) -> Option<C> {
        self.lock().by_name.get(&name.key()).map(|e| e.conn.clone())
    }

    /// The entry and connection of the peer online as `name`.
    pub fn online_peer(&self, name: &Name) -> Option<(PeerInfo, C)> {
        self.lock()
            .by_name
            .get(&name.key())
            .map(|e| (PeerInfo::clone(&e.info), e.conn.clone()))
    }

    pub fn lookup(&self, name: &Name) -> Option<PeerInfo> {
        self.lock()
            .by_name
            .get(&name.key())
            .map(|e| PeerInfo::clone(&e.info))
    }

    pub fn online(&self) -> usize {
        self.lock().by_name.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Rejected(RejectReason),
    #[error("cannot encode presence change: {0}")]
    Encode(#[from] FrameError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tincan_proto::codec::decode;

    fn info(name: &str, key: u8) -> PeerInfo {
        PeerInfo {
            name: Name::parse(name).unwrap(),
            id: PeerId([key; 32]),
            observed: "203.0.113.1:4000".parse().unwrap(),
            local_addrs: vec![],
        }
    }

    fn recv(rx: &mut broadcast::Receiver<PresenceEvent>) -> (SessionId, FromTracker) {
        let ev = rx.try_recv().unwrap();
        (ev.origin, decode(ev.frame.body()).unwrap())
    }

    #[test]
    fn newcomer_gets_everyone_and_others_get_one_delta() {
        let reg = Registry::<()>::new(10);
        let mut alice = reg.join(info("alice", 1), ()).unwrap();
        let bob = reg.join(info("bob", 2), ()).unwrap();
        assert_eq!(bob.snapshot.len(), 2);
        // alice's receiver sees her own join (filtered by origin in the
        // session) and then bob's join, as a single entry.
        let (origin, _) = recv(&mut alice.presence);
        assert_eq!(origin, alice.session);
        let (origin, change) = recv(&mut alice.presence);
        assert_eq!(origin, bob.session);
        assert_eq!(
            change,
            FromTracker::Presence(PresenceChange::Joined(info("bob", 2)))
        );
        assert!(alice.presence.try_recv().is_err());
    }

    #[test]
    fn name_online_under_another_key_is_in_use_in_any_case() {
        let reg = Registry::<()>::new(10);
        let _alice = reg.join(info("alice", 1), ()).unwrap();
        let err = reg.join(info("ALICE", 2), ()).err().unwrap();
        assert!(matches!(err, JoinError::Rejected(RejectReason::NameInUse)));
        assert_eq!(
            reg.check(&Name::parse("Alice").unwrap(), PeerId([2; 32])),
            Err(RejectReason::NameInUse)
        );
    }

    #[test]
    fn same_key_replaces_its_old_session_and_stale_leave_is_ignored() {
        let reg = Registry::<()>::new(10);
        let first = reg.join(info("alice", 1), ()).unwrap();
        let second = reg.join(info("alice", 1), ()).unwrap();
        assert!(first.replaced.is_cancelled());
        assert!(!second.replaced.is_cancelled());
        assert!(!reg.leave(&Name::parse("alice").unwrap(), first.session));
        assert_eq!(reg.online(), 1);
        assert!(reg.leave(&Name::parse("alice").unwrap(), second.session));
        assert_eq!(reg.online(), 0);
    }

    #[test]
    fn leave_publishes_one_left_change() {
        let reg = Registry::<()>::new(10);
        let alice = reg.join(info("alice", 1), ()).unwrap();
        let mut bob = reg.join(info("bob", 2), ()).unwrap();
        let _ = recv(&mut bob.presence); // bob's own join
        assert!(reg.leave(&Name::parse("alice").unwrap(), alice.session));
        let (_, change) = recv(&mut bob.presence);
        assert_eq!(
            change,
            FromTracker::Presence(PresenceChange::Left {
                name: Name::parse("alice").unwrap(),
                id: PeerId([1; 32])
            })
        );
    }

    #[test]
    fn full_registry_refuses_new_keys() {
        let reg = Registry::<()>::new(1);
        let _a = reg.join(info("alice", 1), ()).unwrap();
        let err = reg.join(info("bob", 2), ()).err().unwrap();
        assert!(matches!(
            err,
            JoinError::Rejected(RejectReason::TrackerFull)
        ));
        // but the same key may still reconnect
        assert!(reg.join(info("alice", 1), ()).is_ok());
    }

    #[test]
    fn a_session_too_far_behind_is_told_it_lagged() {
        let reg = Registry::<()>::new(PRESENCE_BACKLOG + 10);
        let mut slow = reg.join(info("slow", 0), ()).unwrap();
        for i in 0..PRESENCE_BACKLOG + 1 {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            let mut p = info(&format!("p{i}"), 0);
            p.id = PeerId(id);
            let _ = reg.join(p, ()).unwrap();
        }
        assert!(matches!(
            slow.presence.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }
}
