//! QUIC settings shared by the baselines and the simulated peers. Every
//! baseline uses tincan's own TLS (Ed25519 keys, mutual authentication,
//! TLS 1.3) and the tracker's transport limits, so that the ratio to tincan
//! measures tincan's logic and not a cheaper handshake.

use std::{net::SocketAddr, sync::Arc};

use quinn::{
    Endpoint, TransportConfig,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use tincan_peer::net::KEEP_ALIVE;
use tincan_proto::{PeerId, tls::Identity};
use tincan_tracker::{IDLE_TIMEOUT, MAX_STREAMS_PER_PEER};

/// ALPN of the bare baselines (nothing tincan-specific is spoken on them).
pub const ALPN_BARE: &[u8] = b"tincan-bench/bare";

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
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

/// The transport every benchmark connection uses: the tracker's idle timeout
/// and the peers' keep-alive interval.
pub fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok())
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_concurrent_bidi_streams(MAX_STREAMS_PER_PEER.into())
        .max_concurrent_uni_streams(MAX_STREAMS_PER_PEER.into());
    Arc::new(t)
}

pub fn server_config(identity: &Identity, alpn: &[u8]) -> Result<quinn::ServerConfig, QuicError> {
    let tls = tincan_proto::tls::server_config(identity, &[alpn])?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport());
    Ok(server)
}

pub fn client_config(
    identity: &Identity,
    alpn: &[u8],
    expected: Option<PeerId>,
) -> Result<quinn::ClientConfig, QuicError> {
    let tls = tincan_proto::tls::client_config(identity, alpn, expected)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// A server endpoint on `bind` speaking `alpn` with a fresh identity.
pub fn server_endpoint(bind: SocketAddr, alpn: &[u8]) -> Result<(Endpoint, PeerId), QuicError> {
    let identity = Identity::generate()?;
    let endpoint = Endpoint::server(server_config(&identity, alpn)?, bind)
        .map_err(|source| QuicError::Bind { addr: bind, source })?;
    Ok((endpoint, identity.id()))
}

/// Socket buffers of the load generator's client endpoints. Thousands of
/// connections on one socket overflow the kernel default (~208 KiB) on
/// loopback; the drops would be the load generator's fault, not the server's.
pub const CLIENT_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// A client-only endpoint on an ephemeral loopback port, with
/// [`CLIENT_SOCKET_BUFFER`]-byte socket buffers (as far as the kernel allows).
pub fn client_endpoint() -> Result<Endpoint, QuicError> {
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let err = |source| QuicError::Bind { addr: bind, source };
    let socket = std::net::UdpSocket::bind(bind).map_err(err)?;
    let sock = socket2::SockRef::from(&socket);
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(CLIENT_SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(CLIENT_SOCKET_BUFFER);
    Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(err)
}
