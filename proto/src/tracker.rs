//! The peer ↔ tracker protocol, spoken on one bidirectional stream that the
//! peer opens right after the QUIC handshake (ALPN [`crate::ALPN_TRACKER`]).
//!
//! It follows the classic IM enrollment step by step:
//!
//! ```text
//! peer                                tracker
//!  |-- Hello{name, version, local, -->|  1. hello
//!  |         follow}                  |
//!  |-- Thanks ----------------------->|     sent ahead (the tracker reads it at 4)
//!  |                                  |  2. check name: syntax, online, bound to another key
//!  |<-- Welcome{observed} ------------|  3. welcome  (or Reject{reason}, then close)
//!  |                                  |  4. thanks: the peer accepts the welcome
//!  |                                  |  5. add to the list of online peers
//!  |<-- ClientList{peers, last} ------|  6. full list to the newcomer (paged),
//!  |                                  |     Presence(Joined) to everyone else
//!  |        ... Presence deltas, Lookup/LookupReply ...
//!  |-- Logout ----------------------->|
//!  |<-- Goodbye ----------------------|  the peer closes; Presence(Left) to everyone
//! ```
//!
//! A peer may also wait for `Welcome` before it sends `Thanks`. When `Thanks`
//! came ahead, `Welcome` leaves in the same packet as what follows it.
//!
//! A tracker in subscribe mode sends no full list: it follows `Welcome` with
//! `SubscribeMode`, and the names the peer follows (`Hello::follow`, or a
//! `Subscribe` right after `Thanks` when that is `None`) are the only ones
//! it hears about:
//!
//! ```text
//!  |-- Hello{.., follow: names} ----->|  1.
//!  |-- Thanks ----------------------->|
//!  |<-- Welcome{observed} ------------|  3. welcome
//!  |<-- SubscribeMode{max} -----------|     (same packet) no full list here
//!  |<-- Subscribed{peers, last} ------|     the online ones among `names` (paged)
//!  |        ... Presence deltas of followed names, Subscribe/Unsubscribe,
//!  |            ListPage/ListPageReply (everyone online, a page at a time) ...
//! ```

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{MessageId, Name, PeerId};

/// Most entries in one `ClientList`, `Subscribed` or `ListPageReply` page,
/// so that a page of peers with the maximum number of local addresses stays
/// under [`crate::MAX_FRAME_LEN`].
pub const LIST_PAGE: usize = 256;

/// Frames a peer sends to the tracker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToTracker {
    /// Step 1 of enrollment. The peer's key is not here: it is the TLS client
    /// certificate's key, which the handshake has already proven.
    Hello {
        name: Name,
        version: u16,
        /// Addresses of the peer's own interfaces (at most [`crate::MAX_LOCAL_ADDRS`]),
        /// for peers on the same LAN.
        local_addrs: Vec<SocketAddr>,
        /// The names this peer follows, sent ahead (pipelined) with `Hello`
        /// and `Thanks`: a tracker in subscribe mode takes them as the first
        /// `Subscribe` (keeping the first `max_subscriptions` it announces)
        /// and answers `Subscribed` right behind `Welcome` and
        /// `SubscribeMode`, one round trip sooner. A tracker in broadcast
        /// mode ignores them. `None`: the peer sends `Subscribe` itself once
        /// it has read `SubscribeMode`.
        follow: Option<Vec<Name>>,
    },
    /// Step 4: the peer accepts the welcome and joins the list.
    Thanks,
    /// Asks for one peer's entry; answered by [`FromTracker::LookupReply`] with the same `req`.
    Lookup { req: u32, name: Name },
    /// Leave cleanly; answered by [`FromTracker::Goodbye`].
    Logout,
    /// Publishes this peer's sealing key (X25519), signed by its identity
    /// key, so others can seal messages for it while it is offline.
    PublishSealKey(SignedSealKey),
    /// Asks for the sealing key of whoever `name` is bound to, online or not.
    SealKeyOf { req: u32, name: Name },
    /// A sealed message for a peer that is not logged on; the tracker keeps
    /// it until the recipient enrolls or it expires. Answered by `HoldReply`.
    Hold {
        to: Name,
        /// The key the sender sealed to; refused if `to` is bound to another.
        to_id: PeerId,
        id: MessageId,
        sealed: Vec<u8>,
    },
    /// The recipient showed a held message; `receipt` is its signature over
    /// (sender id, message id), which the sender checks.
    HeldReceived {
        id: MessageId,
        from_id: PeerId,
        receipt: Vec<u8>,
    },
    /// The recipient could not open or verify a held message; it is dropped.
    HeldRejected { id: MessageId, from_id: PeerId },
    /// The sender has recorded a notice; the tracker may forget it.
    NoticeSeen { id: MessageId },
    /// First frame of a NEW stream (not the control stream): asks the
    /// tracker to splice this stream to one it opens to `to`. Answered on
    /// the same stream by `CircuitReady` (after which the stream carries
    /// TLS between the two peers, opaque to the tracker) or `CircuitRefused`.
    Circuit { to: Name },
    /// On a stream the tracker opened with `CircuitOffer`: the peer takes it.
    CircuitAccept,
    /// Asks the tracker to coordinate a simultaneous dial (hole punch) with
    /// `to`; both sides then receive `Punch`.
    Connect { to: Name },
    /// Follow these names (online or not): their joins and leaves reach this
    /// peer. Answered by `Subscribed` with the online ones. Only sent to a
    /// tracker that announced [`FromTracker::SubscribeMode`], whose
    /// `max_subscriptions` bounds the names followed in all.
    Subscribe { names: Vec<Name> },
    /// Stop following these names. No answer.
    Unsubscribe { names: Vec<Name> },
    /// One page of everyone online, in name order (without regard to case),
    /// starting after `after` (from the start when `None`), at most `limit`
    /// entries (capped at [`LIST_PAGE`]). Answered by `ListPageReply`.
    ListPage {
        req: u32,
        after: Option<Name>,
        limit: u32,
    },
}

/// Frames the tracker sends to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromTracker {
    /// Step 3: the name is the peer's. `observed` is the address the peer's
    /// packets came from, as the tracker sees it (its public NAT mapping).
    Welcome {
        observed: SocketAddr,
        /// Most online peers this tracker will hold, so clients can size caches.
        max_peers: u32,
    },
    /// Step 3, refused: the reason is shown to the user; the tracker then closes.
    Reject { reason: RejectReason },
    /// Step 6, to the newcomer only: everyone online, the newcomer included,
    /// in pages of at most [`LIST_PAGE`] entries; `last` marks the final page.
    ClientList { peers: Vec<PeerInfo>, last: bool },
    /// One change to the list, pushed to every other online peer.
    Presence(PresenceChange),
    /// Reply to [`ToTracker::Lookup`]; `None` when the name is not online.
    LookupReply { req: u32, peer: Option<PeerInfo> },
    /// Reply to [`ToTracker::Logout`]; the tracker has removed the peer.
    Goodbye,
    /// The same key enrolled again from elsewhere; this session is over.
    Replaced,
    /// Reply to [`ToTracker::SealKeyOf`].
    SealKeyReply {
        req: u32,
        entry: Option<SealKeyEntry>,
    },
    /// Reply to [`ToTracker::Hold`].
    HoldReply { id: MessageId, result: HoldResult },
    /// A sealed message held for this peer (sent after the client list, and
    /// live if one arrives while the peer is online).
    Held(HeldMessage),
    /// What became of a message this peer handed to the tracker.
    Notice(Notice),
    /// First frame of a stream the tracker opened: `from` wants a relay
    /// circuit. Answer `CircuitAccept`, then act as the TLS server.
    CircuitOffer { from: Name, from_id: PeerId },
    /// The circuit is spliced: from now on this stream carries the TLS bytes.
    CircuitReady,
    /// No circuit; the stream ends.
    CircuitRefused { reason: CircuitRefusal },
    /// Dial `peer` (from this peer's one endpoint) after `delay_ms`, so that
    /// both sides' first packets leave at about the same moment.
    Punch { peer: PeerInfo, delay_ms: u32 },
    /// Sent right after `Welcome` by a tracker in subscribe mode: it sends
    /// no `ClientList` and pushes only changes of followed names. After
    /// `Thanks` the peer sends `Subscribe` (its first, possibly empty, list
    /// of names; step 6), following at most `max_subscriptions` names in all.
    SubscribeMode { max_subscriptions: u32 },
    /// Reply to `Subscribe`: the followed names that are online now, in
    /// pages of at most [`LIST_PAGE`] entries; `last` marks the final page.
    Subscribed { peers: Vec<PeerInfo>, last: bool },
    /// Reply to `ListPage`: `more` is true when names follow the last entry.
    ListPageReply {
        req: u32,
        peers: Vec<PeerInfo>,
        more: bool,
    },
}

/// Why the tracker would not relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CircuitRefusal {
    #[error("that peer is not logged on")]
    NotOnline,
    #[error("only enrolled peers may open circuits")]
    NotEnrolled,
    #[error("too many relay circuits open for this peer")]
    TooManyCircuits,
    #[error("the tracker is relaying as many circuits as it can")]
    TrackerBusy,
    #[error("the other peer did not accept the circuit")]
    Declined,
    #[error("circuit requests too frequent; slow down")]
    Throttled,
}

/// A sealing key and the identity key's signature over it
/// (see `tincan_proto::seal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSealKey {
    pub key: [u8; 32],
    pub sig: Vec<u8>,
}

/// Who a name is bound to, and the sealing key that identity published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealKeyEntry {
    pub name: Name,
    pub id: PeerId,
    pub seal: SignedSealKey,
}

/// The tracker's answer to `Hold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldResult {
    /// Kept until `expires_at` (seconds since the Unix epoch).
    Held { expires_at: u64 },
    /// The name is not bound to any key, or its key published no sealing key.
    UnknownName,
    /// The name is bound to a different key than the one sealed to.
    KeyMismatch,
    /// The recipient has too many held messages already.
    MailboxFull,
    /// The sealed message is larger than the tracker keeps.
    TooLarge,
    /// The tracker could not store it (its storage failed).
    Unavailable,
}

/// A held message, as the recipient receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMessage {
    pub from: Name,
    pub from_id: PeerId,
    pub id: MessageId,
    /// When the tracker took it, seconds since the Unix epoch.
    pub stored_at: u64,
    pub sealed: Vec<u8>,
}

/// The fate of a held message, told to its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub id: MessageId,
    /// The recipient's name.
    pub to: Name,
    pub kind: NoticeKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    /// Shown by the recipient, who signed `receipt`.
    Delivered { by: PeerId, receipt: Vec<u8> },
    /// Not collected before the tracker's time-to-live ran out.
    Expired,
    /// The recipient could not open it.
    Rejected,
}

/// What everyone else learns about an online peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: Name,
    pub id: PeerId,
    /// Where the tracker sees the peer's packets come from.
    pub observed: SocketAddr,
    /// The peer's own interface addresses, as it announced them.
    pub local_addrs: Vec<SocketAddr>,
}

/// One change to the online list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresenceChange {
    Joined(PeerInfo),
    Left { name: Name, id: PeerId },
}

/// Why the tracker refused an enrollment. Shown to the user as one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    #[error("the name is not valid (1-32 characters of A-Z a-z 0-9 _ -)")]
    InvalidName,
    #[error("the name is in use by another peer that is logged on")]
    NameInUse,
    #[error("the name belongs to another key (it was used recently by a different peer)")]
    NameBound,
    #[error("the tracker does not speak this protocol version")]
    UnsupportedVersion,
    #[error("the tracker is full")]
    TrackerFull,
    #[error("the enrollment did not follow the protocol")]
    ProtocolViolation,
    #[error("the tracker cannot record enrollments right now; try again later")]
    Unavailable,
}
