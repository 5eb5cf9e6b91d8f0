//! The tincan peer: a [`Node`] that enrolls with a tracker under a name and
//! exchanges messages with other peers directly over QUIC.
//!
//! Layout:
//! - [`node`]: the [`Node`] handle (send, who, logout) and the state its tasks share;
//!   the per-message delivery task (resend on a fresh link, final state).
//! - [`tracker_client`]: enrollment (hello → welcome → thanks → list), presence,
//!   lookups, and re-enrollment with backoff when the tracker goes away.
//! - [`links`]: links to peers (direct QUIC and relay circuits), the path
//!   strategy (dial + punch + relay in parallel, background upgrade), message
//!   streams and acknowledgements.
//! - [`relay`]: relay circuits through the tracker with TLS 1.3 inside.
//! - [`outbox`]: the send path: one ordered conversation per destination, routes, resends.
//! - [`mail`]: held messages and notices from the tracker.
//! - [`delivery`]: the message state machine.
//! - [`directory`]: the client list as this peer knows it.
//! - [`net`]: the single QUIC endpoint and transport settings.
//! - [`store`]: `peer.db` (outbox, history, shown-once set, pinned keys),
//!   written in group commits by its own thread.
//! - [`journal`]: `peer.journal`, the records that must survive a crash at
//!   once (a message just sent, a message just shown), ahead of `peer.db`.
//! - [`event`]: what the node tells its front end.
//!
//! Every task is spawned on the node's `TaskTracker` and stops with its
//! `CancellationToken`; the front end only talks to [`Node`] and reads [`Event`]s.

pub mod delivery;
pub mod directory;
pub mod event;
pub mod frontend;
pub mod journal;
pub mod links;
pub mod mail;
pub mod net;
pub mod node;
pub mod outbox;
pub mod relay;
pub mod store;
pub mod tracker_client;

pub use event::{Event, Path};
pub use node::{Config, KeyInfo, Node, PeerStatus, SendError, StartError};
pub use tracker_client::default_bind;
