//! What a [`crate::Node`] tells its user, on a bounded channel.

use std::{net::SocketAddr, time::Duration};

use tincan_proto::{MessageId, Name, PeerId, tracker::PeerInfo};

/// Which path carried a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A QUIC connection straight to the other peer.
    Direct,
    /// A circuit through the tracker (not built yet: every path is direct today).
    Relay,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "relay",
        }
    }
}

/// Something the user should see.
#[derive(Debug, Clone)]
pub enum Event {
    /// Enrollment finished (at start and after every reconnection).
    Enrolled {
        name: Name,
        id: PeerId,
        tracker: String,
        observed: SocketAddr,
    },
    /// The full client list, right after enrolling.
    ClientList { peers: Vec<PeerInfo> },
    /// Someone came online or went away.
    Presence {
        name: Name,
        id: PeerId,
        online: bool,
    },
    /// A message for us, shown once per id.
    Message {
        from: Name,
        text: String,
        id: MessageId,
        path: Path,
        sent_at_ms: u64,
    },
    /// A message of ours left this machine.
    Sent { id: MessageId, to: Name, path: Path },
    /// The receiver acknowledged a message of ours.
    Delivered {
        id: MessageId,
        to: Name,
        path: Path,
        rtt: Duration,
    },
    /// A message of ours cannot be delivered (final).
    Undeliverable {
        id: MessageId,
        to: Name,
        reason: String,
    },
    /// The tracker connection is gone; direct conversations go on, and the
    /// node enrolls again after `retry_in`.
    TrackerLost { reason: String, retry_in: Duration },
    /// Something the user should know about but that needs no action now.
    Warning { message: String },
    /// The node cannot go on (e.g. the same identity enrolled elsewhere).
    Fatal { reason: String },
}
