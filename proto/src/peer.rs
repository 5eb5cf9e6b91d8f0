//! The peer ↔ peer protocol (ALPN [`crate::ALPN_PEER`]), over mutually
//! authenticated QUIC where each side pins the other's key.
//!
//! Each side sends its own messages on one bidirectional stream that it opens:
//!
//! ```text
//! sender                               receiver
//!  |-- Open{from} ------------------->|  receiver checks `from` is bound to the TLS key
//!  |-- Msg{id, body} ---------------->|  shows "Message from <from>: <body>" (once per id)
//!  |<-- Ack{id} ----------------------|  sender marks the message delivered
//!  |-- Msg ... (pipelined) ---------->|
//! ```

use serde::{Deserialize, Serialize};

use crate::{MessageId, Name};

/// Frames on a message stream, sender to receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToReceiver {
    /// First frame of every stream: who is speaking. The receiver accepts the
    /// stream only if its list binds `from` to the key the TLS handshake proved.
    Open { from: Name },
    /// One message; `body` is at most [`crate::MAX_BODY_LEN`] bytes.
    Msg {
        id: MessageId,
        /// Sender's clock, milliseconds since the Unix epoch.
        sent_at_ms: u64,
        body: String,
    },
}

/// Frames on a message stream, receiver to sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToSender {
    /// The message with this id was shown (now or earlier: acks are idempotent).
    Ack { id: MessageId },
    /// The stream was refused; nothing on it was shown.
    Refused { reason: Refusal },
}

/// Why a receiver refused a message stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the receiver does not know that name under this key")]
    UnknownSender,
    #[error("the message is larger than the receiver accepts")]
    TooLarge,
}
