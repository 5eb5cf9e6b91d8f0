//! Identifiers: [`PeerId`] (an Ed25519 public key) and [`MessageId`] (128 random bits).

use std::{fmt, sync::Mutex};

use rand::Rng;
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

/// A message's identity, chosen by the sender: the time it was made (48
/// bits of milliseconds since the Unix epoch, big-endian) and 80 random bits.
/// The receiver shows each id once; acknowledgements echo it. The time comes
/// first so that the ids a peer stores arrive in nearly ascending order:
/// each one lands next to the last in the database's indexes instead of at
/// a random page. It tells the receiver nothing the message's `sent_at_ms`
/// does not already say; what it tells the tracker: docs/delivery.md.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

/// The last id [`MessageId::generate`] made in this process.
static LAST_ID: Mutex<u128> = Mutex::new(0);

/// Bytes of a [`MessageId`] that hold its time.
const ID_TIME_BYTES: usize = 6;

impl MessageId {
    /// A fresh id: the current time and 80 bits from a CSPRNG that the
    /// operating system seeds, and greater than every id this process made
    /// before. Two in one millisecond (a few per round trip on loopback)
    /// would otherwise be in random order half the time; in order, a
    /// receiver knows a sender's new message from a resend without looking
    /// it up (the dedupe shortcut, docs/delivery.md). Then the id is the
    /// last one plus a random 32-bit step: still unique, and its short form
    /// still unlike the last one's.
    pub fn generate() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let fresh = u128::from_be_bytes(Self::at(ms).0);
        let mut last = LAST_ID.lock().unwrap_or_else(|p| p.into_inner());
        let id = if fresh > *last {
            fresh
        } else {
            let step = 1 + u128::from(rand::rng().next_u32());
            last.saturating_add(step)
        };
        *last = id;
        Self(id.to_be_bytes())
    }

    /// An id made at `ms` (milliseconds since the Unix epoch; only the low
    /// 48 bits are kept, enough until the year 10889).
    pub fn at(ms: u64) -> Self {
        let mut out = [0u8; 16];
        out[..ID_TIME_BYTES].copy_from_slice(&ms.to_be_bytes()[8 - ID_TIME_BYTES..]);
        // The thread's CSPRNG (ChaCha, seeded and reseeded from the
        // operating system): no system call per id, unlike asking the
        // operating system each time (about 2 µs here, on every send).
        rand::rng().fill_bytes(&mut out[ID_TIME_BYTES..]);
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

    /// The last 4 bytes in hex (random ones: ids made in the same minute
    /// share their first bytes), for display next to a message.
    pub fn short(&self) -> String {
        hex::encode(&self.0[12..])
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
    fn message_ids_differ_and_are_ordered_by_the_time_they_were_made() {
        assert_ne!(MessageId::generate(), MessageId::generate());
        let id = MessageId::generate();
        assert_eq!(MessageId::from_hex(&id.to_string()), Ok(id));
        // Time first, big-endian: later ids sort after earlier ones.
        let t = 1_764_000_000_000u64;
        let (a, b, c) = (MessageId::at(t), MessageId::at(t), MessageId::at(t + 1));
        assert_eq!(a.0[..6], t.to_be_bytes()[2..]);
        assert_eq!(a.0[..6], b.0[..6]);
        assert_ne!(a.0[6..], b.0[6..], "80 random bits each");
        assert!(a < c && b < c);
        // The short form is of the random part: ids of the same minute differ.
        assert_eq!(a.short(), hex::encode(&a.0[12..]));
        assert_ne!(a.short(), b.short());
    }

    #[test]
    fn ids_made_in_the_same_millisecond_still_grow_and_look_different() {
        // Thousands per millisecond here: most share their time.
        let ids: Vec<MessageId> = (0..20_000).map(|_| MessageId::generate()).collect();
        let same_ms = ids
            .windows(2)
            .filter(|w| w[0].0[..6] == w[1].0[..6])
            .count();
        assert!(same_ms > 1_000, "only {same_ms} pairs shared a millisecond");
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "{} then {}", w[0], w[1]);
            assert_ne!(w[0].short(), w[1].short());
        }
    }
}
