//! Identifiers: [`PeerId`] (an Ed25519 public key) and [`MessageId`] (128 random bits).

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// A peer's identity: its raw 32-byte Ed25519 public key.
///
/// Displays as full lowercase hex; [`PeerId::short`] gives the fingerprint
/// humans compare and logs print.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    /// The first 8 bytes as colon-separated hex pairs, e.g. `3f:a1:...`.
    pub fn short(&self) -> String {
        let parts: Vec<String> = self.0[..8].iter().map(|b| format!("{b:02x}")).collect();
        parts.join(":")
    }

    /// The key stored as raw bytes (a database column); `None` unless 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// Parses the 64-character hex form printed by `Display`.
    pub fn from_hex(s: &str) -> Result<Self, IdParseError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| IdParseError { want: 64 })?;
        Ok(Self(out))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

/// A message's identity: 128 random bits, chosen by the sender. The receiver
/// shows each id once; acknowledgements echo it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// A fresh id from the operating system's CSPRNG.
    pub fn random() -> Self {
        let mut out = [0u8; 16];
        // SystemRandom only fails when the OS has no entropy source at all,
        // which no supported platform lacks; fall back to zeros would be a
        // silent collision, so treat it as the bug it would be.
        SystemRandom::new()
            .fill(&mut out)
            .unwrap_or_else(|_| panic!("operating system random source unavailable"));
        Self(out)
    }

    /// The id stored as raw bytes (a database column); `None` unless 16 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(bytes).ok().map(Self)
    }

    /// Parses the 32-character hex form printed by `Display`.
    pub fn from_hex(s: &str) -> Result<Self, IdParseError> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| IdParseError { want: 32 })?;
        Ok(Self(out))
    }

    /// The first 4 bytes in hex, for display next to a message.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.short())
    }
}

/// A hex id of the wrong length or with non-hex characters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected {want} hexadecimal characters")]
pub struct IdParseError {
    want: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_hex_round_trips_and_short_form_is_eight_pairs() {
        let id = PeerId([0xab; 32]);
        assert_eq!(PeerId::from_hex(&id.to_string()), Ok(id));
        assert_eq!(id.short(), "ab:ab:ab:ab:ab:ab:ab:ab");
        assert!(PeerId::from_hex("abc").is_err());
    }

    #[test]
    fn random_message_ids_differ() {
        assert_ne!(MessageId::random(), MessageId::random());
        let id = MessageId::random();
        assert_eq!(MessageId::from_hex(&id.to_string()), Ok(id));
    }
}
