//! What a [`crate::Node`] tells its user, on a bounded channel.

use std::{net::SocketAddr, time::Duration};

use tincan_proto::{MessageId, Name, PeerId, tracker::PeerInfo};

/// Which path carried a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A QUIC connection straight to the other peer.
    Direct,
    /// A TLS session inside a circuit spliced by the tracker.
    Relay,
    /// Sealed and stored by the tracker until the recipient collected it.
    Held,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "relay",
            Path::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(Path::Direct),
            "relay" => Some(Path::Relay),
            "held" => Some(Path::Held),
            _ => None,
        }
    }
}

/// Handed out with every incoming message: the front end calls
/// [`Shown::done`] (or drops it) right after the message is on the user's
/// screen. That queues the "shown" mark for the next commit of `peer.db`,
/// and lets the acknowledgement go (once the message's row is committed):
/// a crash before showing makes the sender resend instead of the message
/// being lost.
pub struct Shown {
    record: Option<Box<dyn FnOnce() + Send>>,
    ack: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Shown {
    pub(crate) fn new(
        record: impl FnOnce() + Send + 'static,
    ) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shown = Self {
            record: Some(Box::new(record)),
            ack: Some(tx),
        };
        (shown, rx)
    }

    /// The message is on screen.
    pub fn done(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(record) = self.record.take() {
            record();
        }
        if let Some(tx) = self.ack.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Shown {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shown")
    }
}

/// Something the user should see.
#[derive(Debug)]
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
        /// Drop it once the message is shown.
        shown: Shown,
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
    /// A message of ours was sealed and left with the tracker, because its
    /// recipient is not logged on (or not reachable directly).
    Held { id: MessageId, to: Name },
    /// A message of ours cannot be delivered (final).
    Undeliverable {
        id: MessageId,
        to: Name,
        reason: String,
    },
    /// The path of the conversation with a peer was established or changed.
    Path {
        name: Name,
        path: Path,
        rtt: Duration,
        /// On an upgrade from relay to direct: the bytes the conversation
        /// sent and received through the relay circuit, TLS included.
        relay_bytes: Option<u64>,
    },
    /// The tracker connection is gone; direct conversations go on, and the
    /// node enrolls again after `retry_in`.
    TrackerLost { reason: String, retry_in: Duration },
    /// The tracker announced a different key for a name than the one this
    /// peer pinned: nothing goes to or comes from that name until the user
    /// accepts the new key.
    KeyChanged {
        name: Name,
        pinned: PeerId,
        announced: PeerId,
    },
    /// Something the user should know about but that needs no action now.
    Warning { message: String },
    /// The node cannot go on (e.g. the same identity enrolled elsewhere).
    Fatal { reason: String },
}
