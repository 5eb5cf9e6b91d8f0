//! The registry of online peers, and presence: the one place that decides
//! who hears about a change.
//!
//! Every change (a join, a leave) is encoded once. Who receives it depends on
//! the tracker's [`PresenceMode`], chosen here and nowhere else:
//!
//! - **Broadcast** (the default, the classic behaviour): a newcomer gets the
//!   full list, and every change goes to every online peer, published on one
//!   bounded broadcast channel that each session reads.
//! - **Subscribe**: a newcomer gets no list; each peer follows the names it
//!   cares about (at most [`MAX_SUBSCRIPTIONS`]) and a change goes only to
//!   the followers of that name, into each one's own bounded queue. Anyone
//!   may still look a name up or page through everyone online ([`Registry::page`]).
//!
//! Either way a session that falls more than [`PRESENCE_BACKLOG`] changes
//! behind is disconnected: a slow peer never holds up the publisher or anyone
//! else. Snapshots (the newcomer's list, a subscription's current state) are
//! taken under the same short lock that records the join or the
//! subscription, so no change is missed or seen twice between the snapshot
//! and the deltas.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tincan_proto::{
    Name, PeerId,
    codec::{Encoded, FrameError},
    tracker::{FromTracker, LIST_PAGE, PeerInfo, PresenceChange, RejectReason},
};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio_util::sync::CancellationToken;

use crate::queue::{FrameQueue, NotQueued};

/// How many presence changes a session may fall behind before it is dropped.
pub const PRESENCE_BACKLOG: usize = 4096;
/// In broadcast mode, presence changes for one peer are gathered for this
/// long and then written with one flush. Without it, N peers joining cost
/// N × N packets (one per change per online peer) and as many task
/// wake-ups; with it, at most one packet burst per online peer per window,
/// whatever the join rate. It is also the most a presence change is delayed.
pub const PRESENCE_COALESCE: Duration = Duration::from_millis(200);
/// Frames addressed to one session (held messages, notices) waiting to be
/// written; past this they stay in the mailbox for the next enrollment.
pub const INBOX_QUEUE: usize = 256;
/// Names one peer may follow at once in subscribe mode (its contacts and
/// rooms). Announced to the peer in `SubscribeMode`; a `Subscribe` that would
/// go beyond it closes the connection. It also bounds the names in one
/// `Subscribe` in broadcast mode. There is no limit of followers per name:
/// all subscriptions together are bounded by `max_peers` × this.
pub const MAX_SUBSCRIPTIONS: usize = 1_024;

/// Identifies one enrollment (one connection's session), so that a late
/// leave from a replaced session cannot remove its successor.
pub type SessionId = u64;

/// Who hears about a change: the tracker's one presence switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PresenceMode {
    /// Full list at enrollment, every change to everyone.
    #[default]
    Broadcast,
    /// No list at enrollment; a change reaches only the followers of its name.
    Subscribe,
}

/// One published change in broadcast mode, encoded once for all recipients.
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
    fanout: Fanout,
    max_peers: usize,
}

/// Where published changes go.
enum Fanout {
    /// Broadcast mode: one channel that every session reads.
    All(broadcast::Sender<PresenceEvent>),
    /// Subscribe mode: the queues of the changed name's followers.
    Followers,
}

struct Inner<C> {
    /// Ordered by name key, so that the list can be paged by name.
    by_name: BTreeMap<String, Entry<C>>,
    by_id: HashMap<PeerId, String>,
    /// Subscribe mode: name key → the name keys of the online peers that
    /// follow it (the name need not be online, or even bound).
    followers: HashMap<String, Vec<String>>,
    next_session: SessionId,
}

struct Entry<C> {
    info: Arc<PeerInfo>,
    session: SessionId,
    /// Cancelled when a newer session of the same key replaces this one.
    replaced: CancellationToken,
    inbox: Arc<FrameQueue>,
    /// For circuits the tracker opens to this peer, and its RTT.
    conn: C,
    /// Subscribe mode: this session's presence queue (closed, which ends
    /// its [`Feed`], when the session falls behind or is replaced).
    feed: Option<Arc<FrameQueue>>,
    /// Subscribe mode: the name keys this session follows.
    following: HashSet<String>,
}

/// What a newcomer is told first about who is online (enrollment step 6).
pub enum FirstView {
    /// Broadcast mode: everyone online at the instant of joining, the
    /// newcomer included.
    FullList(Vec<Arc<PeerInfo>>),
    /// Subscribe mode: nothing yet; the peer names whom it follows.
    Subscribe,
}

/// What a newly joined session needs.
pub struct Joined {
    pub session: SessionId,
    pub first_view: FirstView,
    /// Every change this session hears after that instant.
    pub feed: Feed,
    /// Fires if the same key enrolls again elsewhere.
    pub replaced: CancellationToken,
    /// Frames addressed to this session alone, encoded (at most
    /// [`INBOX_QUEUE`]).
    pub inbox: Arc<FrameQueue>,
}

/// The presence changes one session forwards to its peer. Which changes
/// reach it was decided by the registry when each was published.
pub enum Feed {
    /// Broadcast mode: every change; the session's own are skipped.
    All {
        rx: broadcast::Receiver<PresenceEvent>,
        me: SessionId,
    },
    /// Subscribe mode: the changes of the names this session follows.
    Followed(Arc<FrameQueue>),
}

/// Why a [`Feed`] gives no more changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedEnd {
    /// The session fell more than [`PRESENCE_BACKLOG`] changes behind.
    Lagged,
    /// The registry let go of the session (it was replaced, or it lagged
    /// in subscribe mode: see [`Feed::Followed`]), or is shutting down.
    Closed,
}

impl Feed {
    /// How long a session gathers changes before it writes them with one
    /// flush. Broadcast: [`PRESENCE_COALESCE`], since every join reaches
    /// every peer and N joins would otherwise cost N² packets. Subscribe: no
    /// wait (a peer hears only the names it follows; whatever is queued when
    /// the session wakes still goes out in one flush).
    pub fn window(&self) -> Duration {
        match self {
            Feed::All { .. } => PRESENCE_COALESCE,
            Feed::Followed(_) => Duration::ZERO,
        }
    }

    /// The next change for this session, skipping its own.
    pub async fn recv(&mut self) -> Result<Encoded<FromTracker>, FeedEnd> {
        match self {
            Feed::All { rx, me } => loop {
                match rx.recv().await {
                    Ok(event) if event.origin == *me => {}
                    Ok(event) => return Ok(event.frame),
                    Err(RecvError::Lagged(_)) => return Err(FeedEnd::Lagged),
                    Err(RecvError::Closed) => return Err(FeedEnd::Closed),
                }
            },
            Feed::Followed(queue) => queue.recv().await.map_err(|_| FeedEnd::Closed),
        }
    }

    /// The next change already queued, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Encoded<FromTracker>, FeedEnd>> {
        match self {
            Feed::All { rx, me } => loop {
                match rx.try_recv() {
                    Ok(event) if event.origin == *me => {}
                    Ok(event) => return Some(Ok(event.frame)),
                    Err(TryRecvError::Empty) => return None,
                    Err(TryRecvError::Lagged(_)) => return Some(Err(FeedEnd::Lagged)),
                    Err(TryRecvError::Closed) => return Some(Err(FeedEnd::Closed)),
                }
            },
            Feed::Followed(queue) => queue.try_recv().map_err(|_| FeedEnd::Closed).transpose(),
        }
    }
}

/// A `Subscribe` the registry will not carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("more than {MAX_SUBSCRIPTIONS} names followed")]
    TooMany,
}

impl<C: Clone> Registry<C> {
    pub fn new(max_peers: usize, mode: PresenceMode) -> Self {
        let fanout = match mode {
            PresenceMode::Broadcast => Fanout::All(broadcast::channel(PRESENCE_BACKLOG).0),
            PresenceMode::Subscribe => Fanout::Followers,
        };
        Self {
            inner: Mutex::new(Inner {
                by_name: BTreeMap::new(),
                by_id: HashMap::new(),
                followers: HashMap::new(),
                next_session: 0,
            }),
            fanout,
            max_peers,
        }
    }

    pub fn mode(&self) -> PresenceMode {
        match self.fanout {
            Fanout::All(_) => PresenceMode::Broadcast,
            Fanout::Followers => PresenceMode::Subscribe,
        }
    }

    /// The frame that follows `Welcome`, if any: how this tracker will tell
    /// the peer who is online when that is not the classic full list.
    pub fn announcement(&self) -> Option<FromTracker> {
        match self.fanout {
            Fanout::All(_) => None,
            Fanout::Followers => Some(FromTracker::SubscribeMode {
                max_subscriptions: u32::try_from(MAX_SUBSCRIPTIONS).unwrap_or(u32::MAX),
            }),
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
    /// same key, and publishes the change (step 6).
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
            if let Some(feed) = &old.feed {
                feed.close();
            }
            inner.unfollow(&old_key, old.following.iter());
            if old_key != key {
                self.publish(&mut inner, session, &old_key, left_frame(&old.info));
            }
        }

        let replaced = CancellationToken::new();
        let inbox = Arc::new(FrameQueue::new(INBOX_QUEUE));
        let (feed, feed_queue) = self.feed(session);
        inner.by_id.insert(info.id, key.clone());
        inner.by_name.insert(
            key.clone(),
            Entry {
                info: Arc::new(info),
                session,
                replaced: replaced.clone(),
                inbox: inbox.clone(),
                conn,
                feed: feed_queue,
                following: HashSet::new(),
            },
        );
        let first_view = match self.fanout {
            Fanout::All(_) => {
                FirstView::FullList(inner.by_name.values().map(|e| e.info.clone()).collect())
            }
            Fanout::Followers => FirstView::Subscribe,
        };
        self.publish(&mut inner, session, &key, Some(joined_frame));
        Ok(Joined {
            session,
            first_view,
            feed,
            replaced,
            inbox,
        })
    }

    /// A new session's feed, and in subscribe mode the queue the registry fills.
    fn feed(&self, session: SessionId) -> (Feed, Option<Arc<FrameQueue>>) {
        match &self.fanout {
            Fanout::All(tx) => (
                Feed::All {
                    rx: tx.subscribe(),
                    me: session,
                },
                None,
            ),
            Fanout::Followers => {
                let queue = Arc::new(FrameQueue::new(PRESENCE_BACKLOG));
                (Feed::Followed(queue.clone()), Some(queue))
            }
        }
    }

    /// Hands a change of the name `about` to whoever hears it: everyone
    /// (broadcast), or the name's followers (subscribe). Never waits.
    fn publish(
        &self,
        inner: &mut Inner<C>,
        origin: SessionId,
        about: &str,
        frame: Option<Encoded<FromTracker>>,
    ) {
        let Some(frame) = frame else { return };
        match &self.fanout {
            // No receivers is not an error: nobody else is online.
            Fanout::All(tx) => {
                let _ = tx.send(PresenceEvent { origin, frame });
            }
            Fanout::Followers => inner.notify_followers(about, &frame),
        }
    }

    /// Removes `session` from the online list if it is still the current
    /// session for its name, and tells whoever hears it. Returns whether it was.
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
        inner.unfollow(&key, entry.following.iter());
        self.publish(&mut inner, session, &key, left_frame(&entry.info));
        true
    }

    /// `session` (online as `me`) follows `names` from now on; returns the
    /// online entries among them, taken under the same lock. In broadcast
    /// mode the session hears everyone anyway: nothing is recorded.
    pub fn subscribe(
        &self,
        me: &Name,
        session: SessionId,
        names: &[Name],
    ) -> Result<Vec<PeerInfo>, SubscribeError> {
        if names.len() > MAX_SUBSCRIPTIONS {
            return Err(SubscribeError::TooMany);
        }
        let mut keys: Vec<String> = names.iter().map(Name::key).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut inner = self.lock();
        if let Fanout::Followers = self.fanout {
            inner.follow(&me.key(), session, &keys)?;
        }
        Ok(keys
            .iter()
            .filter_map(|k| inner.by_name.get(k))
            .map(|e| PeerInfo::clone(&e.info))
            .collect())
    }

    /// `session` (online as `me`) stops following `names`.
    pub fn unsubscribe(&self, me: &Name, session: SessionId, names: &[Name]) {
        let mut inner = self.lock();
        let me = me.key();
        let Some(entry) = inner.by_name.get_mut(&me).filter(|e| e.session == session) else {
            return;
        };
        let dropped: Vec<String> = names
            .iter()
            .map(Name::key)
            .filter(|k| entry.following.remove(k))
            .collect();
        inner.unfollow(&me, dropped.iter());
    }

    /// One page of everyone online, in name-key order, after `after`: at
    /// most `limit` entries (capped at [`LIST_PAGE`]), and whether more follow.
    pub fn page(&self, after: Option<&Name>, limit: usize) -> (Vec<PeerInfo>, bool) {
        let inner = self.lock();
        let from = match after {
            Some(name) => Bound::Excluded(name.key()),
            None => Bound::Unbounded,
        };
        let mut rest = inner.by_name.range((from, Bound::Unbounded));
        let peers = rest
            .by_ref()
            .take(limit.min(LIST_PAGE))
            .map(|(_, e)| PeerInfo::clone(&e.info))
            .collect();
        (peers, rest.next().is_some())
    }

    /// Hands `frame` to the online session of `id`, if any, without
    /// waiting; false if it is offline or its inbox is full.
    pub fn push(&self, id: &PeerId, frame: FromTracker) -> bool {
        // A held message is at most MAX_SEALED_LEN: it always fits a frame.
        let Ok(frame) = Encoded::new(&frame) else {
            return false;
        };
        let inner = self.lock();
        let Some(entry) = inner.by_id.get(id).and_then(|k| inner.by_name.get(k)) else {
            return false;
        };
        entry.inbox.push(frame).is_ok()
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

impl<C> Inner<C> {
    /// Records that the session online as `me` follows `keys` (subscribe
    /// mode), unless that would exceed [`MAX_SUBSCRIPTIONS`]. A session that
    /// is no longer current follows nothing.
    fn follow(
        &mut self,
        me: &str,
        session: SessionId,
        keys: &[String],
    ) -> Result<(), SubscribeError> {
        let Some(entry) = self.by_name.get_mut(me).filter(|e| e.session == session) else {
            return Ok(());
        };
        let new: Vec<&String> = keys
            .iter()
            .filter(|k| !entry.following.contains(*k))
            .collect();
        if entry.following.len() + new.len() > MAX_SUBSCRIPTIONS {
            return Err(SubscribeError::TooMany);
        }
        for key in new {
            entry.following.insert(key.clone());
            self.followers
                .entry(key.clone())
                .or_default()
                .push(me.to_string());
        }
        Ok(())
    }

    /// Removes the follower `me` from the followers of each of `keys`.
    fn unfollow<'a>(&mut self, me: &str, keys: impl Iterator<Item = &'a String>) {
        for key in keys {
            if let Some(list) = self.followers.get_mut(key) {
                list.retain(|f| f != me);
                if list.is_empty() {
                    self.followers.remove(key);
                }
            }
        }
    }

    /// Queues `frame` (a change of the name `about`) for each online follower
    /// of `about`, never for `about` itself. A follower whose queue is full
    /// has its feed closed, which ends its session as a laggard.
    fn notify_followers(&mut self, about: &str, frame: &Encoded<FromTracker>) {
        let Some(followers) = self.followers.get(about) else {
            return;
        };
        for follower in followers.iter().filter(|f| *f != about) {
            let Some(entry) = self.by_name.get_mut(follower) else {
                continue;
            };
            if let Some(feed) = &entry.feed
                && feed.push(frame.clone()) == Err(NotQueued::Full)
            {
                feed.close();
                entry.feed = None;
            }
        }
    }
}

/// The `Left` change for `info` (a name and a key: it always fits a frame).
fn left_frame(info: &PeerInfo) -> Option<Encoded<FromTracker>> {
    Encoded::new(&FromTracker::Presence(PresenceChange::Left {
        name: info.name.clone(),
        id: info.id,
    }))
    .ok()
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

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    fn broadcast(max: usize) -> Registry<()> {
        Registry::new(max, PresenceMode::Broadcast)
    }

    fn subscribe(max: usize) -> Registry<()> {
        Registry::new(max, PresenceMode::Subscribe)
    }

    /// The next change already queued for a session, decoded.
    fn recv(feed: &mut Feed) -> FromTracker {
        let frame = feed.try_recv().expect("a queued change").unwrap();
        decode(frame.body()).unwrap()
    }

    fn full_list(joined: &Joined) -> usize {
        match &joined.first_view {
            FirstView::FullList(list) => list.len(),
            FirstView::Subscribe => panic!("no full list in subscribe mode"),
        }
    }

    fn names_of(peers: &[PeerInfo]) -> Vec<String> {
        peers.iter().map(|p| p.name.to_string()).collect()
    }

    #[test]
    fn newcomer_gets_everyone_and_others_get_one_delta() {
        let reg = broadcast(10);
        let mut alice = reg.join(info("alice", 1), ()).unwrap();
        let bob = reg.join(info("bob", 2), ()).unwrap();
        assert_eq!(full_list(&bob), 2);
        // alice's own join is skipped by her feed; bob's arrives as a single entry.
        assert_eq!(
            recv(&mut alice.feed),
            FromTracker::Presence(PresenceChange::Joined(info("bob", 2)))
        );
        assert!(alice.feed.try_recv().is_none());
    }

    #[test]
    fn name_online_under_another_key_is_in_use_in_any_case() {
        let reg = broadcast(10);
        let _alice = reg.join(info("alice", 1), ()).unwrap();
        let err = reg.join(info("ALICE", 2), ()).err().unwrap();
        assert!(matches!(err, JoinError::Rejected(RejectReason::NameInUse)));
        assert_eq!(
            reg.check(&name("Alice"), PeerId([2; 32])),
            Err(RejectReason::NameInUse)
        );
    }

    #[test]
    fn same_key_replaces_its_old_session_and_stale_leave_is_ignored() {
        let reg = broadcast(10);
        let first = reg.join(info("alice", 1), ()).unwrap();
        let second = reg.join(info("alice", 1), ()).unwrap();
        assert!(first.replaced.is_cancelled());
        assert!(!second.replaced.is_cancelled());
        assert!(!reg.leave(&name("alice"), first.session));
        assert_eq!(reg.online(), 1);
        assert!(reg.leave(&name("alice"), second.session));
        assert_eq!(reg.online(), 0);
    }

    #[test]
    fn leave_publishes_one_left_change() {
        let reg = broadcast(10);
        let alice = reg.join(info("alice", 1), ()).unwrap();
        let mut bob = reg.join(info("bob", 2), ()).unwrap();
        assert!(reg.leave(&name("alice"), alice.session));
        assert_eq!(
            recv(&mut bob.feed),
            FromTracker::Presence(PresenceChange::Left {
                name: name("alice"),
                id: PeerId([1; 32])
            })
        );
    }

    #[test]
    fn full_registry_refuses_new_keys() {
        let reg = broadcast(1);
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
        let reg = broadcast(PRESENCE_BACKLOG + 10);
        let mut slow = reg.join(info("slow", 0), ()).unwrap();
        for i in 0..PRESENCE_BACKLOG + 1 {
            let mut p = info(&format!("p{i}"), 0);
            p.id = numbered_id(i);
            let _ = reg.join(p, ()).unwrap();
        }
        assert_eq!(
            slow.feed.try_recv().map(|r| r.err()),
            Some(Some(FeedEnd::Lagged))
        );
    }

    fn numbered_id(i: usize) -> PeerId {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        PeerId(id)
    }

    #[test]
    fn subscribe_mode_gives_no_list_and_changes_reach_only_followers() {
        let reg = subscribe(10);
        let mut alice = reg.join(info("alice", 1), ()).unwrap();
        assert!(matches!(alice.first_view, FirstView::Subscribe));
        assert_eq!(
            reg.announcement(),
            Some(FromTracker::SubscribeMode {
                max_subscriptions: MAX_SUBSCRIPTIONS as u32
            })
        );
        assert_eq!(broadcast(1).announcement(), None);
        let mut carol = reg.join(info("carol", 3), ()).unwrap();
        // alice follows bob (not online yet) and carol (online, in any case).
        let now = reg
            .subscribe(&name("alice"), alice.session, &[name("bob"), name("CAROL")])
            .unwrap();
        assert_eq!(names_of(&now), ["carol"]);
        let bob = reg.join(info("bob", 2), ()).unwrap();
        let _dave = reg.join(info("dave", 4), ()).unwrap();
        assert_eq!(
            recv(&mut alice.feed),
            FromTracker::Presence(PresenceChange::Joined(info("bob", 2)))
        );
        assert!(alice.feed.try_recv().is_none(), "dave is not followed");
        // carol follows nobody: she heard nothing at all.
        assert!(carol.feed.try_recv().is_none());
        assert!(reg.leave(&name("bob"), bob.session));
        assert!(matches!(
            recv(&mut alice.feed),
            FromTracker::Presence(PresenceChange::Left { .. })
        ));
        // Lookups and pages still see everyone.
        assert!(reg.lookup(&name("dave")).is_some());
    }

    #[test]
    fn unsubscribe_and_leaving_stop_the_changes() {
        let reg = subscribe(10);
        let mut alice = reg.join(info("alice", 1), ()).unwrap();
        reg.subscribe(&name("alice"), alice.session, &[name("bob")])
            .unwrap();
        reg.unsubscribe(&name("alice"), alice.session, &[name("bob")]);
        let _bob = reg.join(info("bob", 2), ()).unwrap();
        assert!(alice.feed.try_recv().is_none());
        assert!(reg.lock().followers.is_empty());
        // A follower that leaves is forgotten by the names it followed.
        reg.subscribe(&name("alice"), alice.session, &[name("bob")])
            .unwrap();
        assert!(reg.leave(&name("alice"), alice.session));
        assert!(reg.lock().followers.is_empty());
    }

    #[test]
    fn a_replaced_session_follows_nothing_and_its_feed_closes() {
        let reg = subscribe(10);
        let mut first = reg.join(info("alice", 1), ()).unwrap();
        reg.subscribe(&name("alice"), first.session, &[name("bob")])
            .unwrap();
        let second = reg.join(info("alice", 1), ()).unwrap();
        assert_eq!(
            first.feed.try_recv().map(|r| r.err()),
            Some(Some(FeedEnd::Closed))
        );
        assert!(reg.lock().followers.is_empty());
        // The stale session cannot subscribe on behalf of the new one.
        reg.subscribe(&name("alice"), first.session, &[name("bob")])
            .unwrap();
        assert!(reg.lock().followers.is_empty());
        reg.subscribe(&name("alice"), second.session, &[name("bob")])
            .unwrap();
        assert_eq!(reg.lock().followers.len(), 1);
    }

    #[test]
    fn following_more_than_the_limit_is_refused_whole() {
        let reg = subscribe(10);
        let alice = reg.join(info("alice", 1), ()).unwrap();
        let names: Vec<Name> = (0..MAX_SUBSCRIPTIONS)
            .map(|i| name(&format!("n{i}")))
            .collect();
        reg.subscribe(&name("alice"), alice.session, &names)
            .unwrap();
        // Names already followed do not count twice...
        reg.subscribe(&name("alice"), alice.session, &names[..10])
            .unwrap();
        // ...one more does.
        assert_eq!(
            reg.subscribe(&name("alice"), alice.session, &[name("one-more")]),
            Err(SubscribeError::TooMany)
        );
        assert_eq!(reg.lock().followers.len(), MAX_SUBSCRIPTIONS);
    }

    #[test]
    fn a_follower_too_far_behind_loses_its_feed() {
        let reg = subscribe(PRESENCE_BACKLOG + 10);
        let mut slow = reg.join(info("slow", 0), ()).unwrap();
        reg.subscribe(&name("slow"), slow.session, &[name("flappy")])
            .unwrap();
        for _ in 0..PRESENCE_BACKLOG / 2 + 1 {
            let flappy = reg.join(info("flappy", 9), ()).unwrap();
            assert!(reg.leave(&name("flappy"), flappy.session));
        }
        // What it had not read yet is dropped with it.
        assert_eq!(
            slow.feed.try_recv().map(|r| r.err()),
            Some(Some(FeedEnd::Closed))
        );
        assert!(reg.lock().by_name["slow"].feed.is_none());
    }

    #[test]
    fn pages_return_everyone_once_in_name_order() {
        let reg = subscribe(100);
        for i in 0..25 {
            let mut p = info(&format!("Peer{i:02}"), 0);
            p.id = numbered_id(i);
            let _ = reg.join(p, ()).unwrap();
        }
        let mut seen = Vec::new();
        let mut after: Option<Name> = None;
        loop {
            let (peers, more) = reg.page(after.as_ref(), 10);
            assert!(peers.len() <= 10);
            after = peers.last().map(|p| p.name.clone());
            seen.extend(names_of(&peers));
            if !more {
                break;
            }
        }
        let expected: Vec<String> = (0..25).map(|i| format!("Peer{i:02}")).collect();
        assert_eq!(seen, expected);
        assert_eq!(reg.page(None, usize::MAX).0.len(), 25);
        assert_eq!(reg.page(Some(&name("peer24")), 10), (vec![], false));
    }

    #[test]
    fn broadcast_mode_answers_a_subscribe_but_records_nothing() {
        let reg = broadcast(10);
        let alice = reg.join(info("alice", 1), ()).unwrap();
        let _bob = reg.join(info("bob", 2), ()).unwrap();
        let now = reg
            .subscribe(&name("alice"), alice.session, &[name("bob"), name("bob")])
            .unwrap();
        assert_eq!(names_of(&now), ["bob"]);
        assert!(reg.lock().followers.is_empty());
    }
}
