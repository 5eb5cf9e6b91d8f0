//! The peer's single QUIC endpoint and its transport settings.
//!
//! One endpoint (one UDP socket) is both client and server: it dials the
//! tracker, dials peers and accepts peers. The address the tracker observes
//! for it is therefore the very mapping other peers must reach, which is what
//! hole punching will rely on.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use quinn::{
    Endpoint, TransportConfig,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use tincan_proto::{ALPN_PEER, PeerId, tls::Identity};

/// A connection with no packets for this long is gone (the other side sends
/// keep-alives, so only a vanished peer or tracker goes this quiet).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval on every connection: well inside [`IDLE_TIMEOUT`]
/// and inside the ~30 s that NAT mappings last.
pub const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// quinn's default first RTT estimate (RFC 9002).
const DEFAULT_INITIAL_RTT: Duration = Duration::from_millis(333);
/// Lowest first RTT estimate we set, so a bad guess cannot flood a path.
const MIN_INITIAL_RTT: Duration = Duration::from_millis(10);
/// Message streams the other side may have open on one peer connection.
pub const MAX_STREAMS_PER_LINK: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Identity(#[from] tincan_proto::tls::IdentityError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn transport() -> Arc<TransportConfig> {
    transport_with_rtt(None)
}

fn transport_with_rtt(initial_rtt: Option<Duration>) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    if let Some(rtt) = initial_rtt {
        t.initial_rtt(rtt.clamp(MIN_INITIAL_RTT, DEFAULT_INITIAL_RTT));
    }
    // 10 s always fits quinn's VarInt range.
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok())
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_concurrent_bidi_streams(MAX_STREAMS_PER_LINK.into())
        .max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

/// Binds the endpoint; it accepts peer connections (ALPN `tincan-peer/1`).
pub fn endpoint(identity: &Identity, bind: SocketAddr) -> Result<Endpoint, NetError> {
    let tls = tincan_proto::tls::server_config(identity, &[ALPN_PEER])?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport());
    Endpoint::server(server, bind).map_err(|source| NetError::Bind { addr: bind, source })
}

/// Dialing configuration: present `identity`, speak `alpn`, and accept only
/// a remote holding `expected` (any key when `None`).
pub fn client_config(
    identity: &Identity,
    alpn: &[u8],
    expected: Option<PeerId>,
) -> Result<quinn::ClientConfig, NetError> {
    client_config_with_rtt(identity, alpn, expected, None)
}

/// Like [`client_config`], with the first RTT estimate set from what the
/// tracker measured: a lost first packet (common when punching through a
/// NAT) is then resent after a few RTTs instead of after about a second.
pub fn client_config_with_rtt(
    identity: &Identity,
    alpn: &[u8],
    expected: Option<PeerId>,
    initial_rtt: Option<Duration>,
) -> Result<quinn::ClientConfig, NetError> {
    let tls = tincan_proto::tls::client_config(identity, alpn, expected)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_with_rtt(initial_rtt));
    Ok(config)
}

/// This machine's non-loopback interface addresses of the endpoint's family,
/// with the endpoint's port: where peers on the same LAN can reach us.
pub fn local_addrs(bound: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let Ok(ifaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    ifaces
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && ip.is_ipv4() == bound.is_ipv4())
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .take(tincan_proto::MAX_LOCAL_ADDRS)
        .collect()
}
