//! The peer ↔ tracker protocol, spoken on one bidirectional stream that the
//! peer opens right after the QUIC handshake (ALPN [`crate::ALPN_TRACKER`]).
//!
//! It follows the classic IM enrollment step by step:
//!
//! ```text
//! peer                                tracker
//!  |-- Hello{name, version, local} -->|  1. hello
//!  |                                  |  2. check name: syntax, online, bound to another key
//!  |<-- Welcome{observed} ------------|  3. welcome  (or Reject{reason}, then close)
//!  |-- Thanks ----------------------->|  4. thanks
//!  |                                  |  5. add to the list of online peers
//!  |<-- ClientList{peers, last} ------|  6. full list to the newcomer (paged),
//!  |                                  |     Presence(Joined) to everyone else
//!  |        ... Presence deltas, Lookup/LookupReply ...
//!  |-- Logout ----------------------->|
//!  |<-- Goodbye ----------------------|  the peer closes; Presence(Left) to everyone
//! ```

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{Name, PeerId};

/// Most entries in one `ClientList` page, so that a page of peers with the
/// maximum number of local addresses stays under [`crate::MAX_FRAME_LEN`].
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
    },
    /// Step 4: the peer accepts the welcome and joins the list.
    Thanks,
    /// Asks for one peer's entry; answered by [`FromTracker::LookupReply`] with the same `req`.
    Lookup { req: u32, name: Name },
    /// Leave cleanly; answered by [`FromTracker::Goodbye`].
    Logout,
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
}
