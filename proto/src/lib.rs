//! Wire types and framing shared by the tincan `tracker` and `peer`.
//!
//! Layout:
//! - [`ids`]: validated newtypes for what crosses the wire: [`PeerId`], [`MessageId`].
//! - [`name`]: [`Name`], the human-readable handle a peer enrolls under.
//! - [`tracker`]: the peer ↔ tracker protocol (ALPN [`ALPN_TRACKER`]).
//! - [`peer`]: the peer ↔ peer protocol (ALPN [`ALPN_PEER`]).
//! - [`codec`]: length-prefixed postcard frames with a hard size cap.
//! - [`tls`]: identities (Ed25519, self-signed certificates) and the rustls
//!   verifiers that pin a public key instead of trusting a CA.
//!
//! This crate owns no sockets: tracker and peer bring their own QUIC endpoints.
//! Every wire enum is append-only, because postcard encodes variant indices;
//! incompatible changes bump the version inside the ALPN string instead.

pub mod codec;
pub mod ids;
pub mod name;
pub mod peer;
pub mod seal;
pub mod tls;
pub mod tracker;

pub use codec::{Codec, FrameError};
pub use ids::{MessageId, PeerId};
pub use name::{Name, NameError};

/// ALPN of the peer ↔ tracker protocol; the trailing number is the protocol version.
pub const ALPN_TRACKER: &[u8] = b"tincan-tracker/2";
/// ALPN of the peer ↔ peer protocol.
pub const ALPN_PEER: &[u8] = b"tincan-peer/1";
/// Protocol version carried in `Hello`, for messages that outlive an ALPN bump.
pub const PROTOCOL_VERSION: u16 = 2;

/// Largest encoded frame, in bytes, either direction. A larger length prefix
/// closes the stream with an error before the body is read.
pub const MAX_FRAME_LEN: usize = 96 * 1024;
/// Largest message body, in bytes of UTF-8 text.
pub const MAX_BODY_LEN: usize = 64 * 1024;
/// Most local addresses a peer may announce in `Hello`.
pub const MAX_LOCAL_ADDRS: usize = 8;

/// QUIC application close codes, shared by tracker and peer so that each side
/// can tell the user why the other closed.
pub mod close {
    /// Orderly close (logout, shutdown, idle link).
    pub const NORMAL: u32 = 0;
    /// A frame could not be decoded or exceeded [`crate::MAX_FRAME_LEN`].
    pub const BAD_FRAME: u32 = 1;
    /// A valid frame arrived where the protocol does not allow it.
    pub const PROTOCOL: u32 = 2;
    /// Enrollment was refused; the reason was sent in `Reject`.
    pub const REJECTED: u32 = 3;
    /// The same key enrolled again; this older session ends.
    pub const REPLACED: u32 = 4;
    /// The peer fell too far behind on presence updates or stopped reading.
    pub const LAGGING: u32 = 5;
    /// The server is at its connection limit.
    pub const FULL: u32 = 6;
    /// The remote key is not allowed here (unknown, or not bound to the name it claims).
    pub const UNAUTHORIZED: u32 = 7;
    /// A timer ran out waiting for the other side.
    pub const TIMEOUT: u32 = 8;
    /// Two connections to the same peer: this is the one both sides drop.
    pub const DUPLICATE: u32 = 9;
}

/// An error and its causes on one line, for a program's last words. A cause
/// is added only when the text so far does not already say it: most of our
/// errors put their source in their own message, and a wrapper such as
/// anyhow's `context` does not.
pub fn error_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on here: {source}")]
    struct Says {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting up")]
    struct Wraps {
        #[source]
        inner: Says,
    }

    #[test]
    fn error_line_names_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        assert_eq!(
            error_line(&Says { source: io() }),
            "cannot listen on here: address in use"
        );
        assert_eq!(
            error_line(&Wraps {
                inner: Says { source: io() }
            }),
            "starting up: cannot listen on here: address in use"
        );
    }
}
