//! The tincan tracker: a rendezvous server that enrolls peers by unique name,
//! keeps who is online, and pushes presence. It never carries messages.
//!
//! Layout:
//! - [`Tracker`] (this file): the QUIC endpoint, its identity, the accept
//!   loop with its connection limit, and shutdown. It owns every task.
//! - [`session`]: one task per connection: enrollment, then presence
//!   forwarding and lookups until logout or disconnect.
//! - [`registry`]: who is online, and presence fan-out (the one place that
//!   decides who hears about a change).
//! - [`queue`]: the small per-session queues the registry fills.
//! - [`store`]: name → key bindings in SQLite, behind the [`store::NameStore`] trait.
//! - [`mailbox`]: sealed messages held for offline peers, notices, sealing keys.
//! - [`relay`]: relay circuits (spliced streams, quotas) and hole-punch timing.

pub mod bucket;
pub mod mailbox;
pub mod queue;
pub mod registry;
pub mod relay;
pub mod session;
pub mod store;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use quinn::{Endpoint, crypto::rustls::QuicServerConfig};
use tincan_proto::{ALPN_TRACKER, PeerId, close, tls::Identity};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    mailbox::Mailbox,
    registry::{PresenceMode, Registry},
    session::Shared,
    store::{NAME_RETENTION, SqliteNames},
};

/// Default for [`Config::max_peers`]: the most peers online at once.
pub const DEFAULT_MAX_PEERS: usize = 100_000;
/// UDP socket buffer size asked of the kernel, each way.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Connections still in their handshake or enrollment, beyond `max_peers`.
pub const MAX_ENROLLING: usize = 1_024;
/// A connection with no packets for this long is dropped (peers send
/// keep-alives every 3 s, so only a vanished peer goes this quiet).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a peer may have open to the tracker at once: the control
/// stream, its relay circuits, and one spare.
pub const MAX_STREAMS_PER_PEER: u32 = 2 + relay::MAX_CIRCUITS_PER_PEER as u32;

/// How a tracker is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Holds `tracker.key` (identity) and `tracker.db` (name bindings).
    pub data_dir: PathBuf,
    pub max_peers: usize,
    pub name_retention: Duration,
    /// How long sealed messages wait for an offline recipient.
    pub held_ttl: Duration,
    /// Who hears about a change: everyone, or the followers of its name.
    pub presence: PresenceMode,
}

impl Config {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            max_peers: DEFAULT_MAX_PEERS,
            name_retention: NAME_RETENTION,
            held_ttl: mailbox::HELD_TTL,
            presence: PresenceMode::default(),
        }
    }
}

/// The tracker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] tincan_proto::tls::IdentityError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound, not yet running tracker.
pub struct Tracker {
    endpoint: Endpoint,
    id: PeerId,
    shared: Arc<Shared>,
    max_connections: usize,
}

impl Tracker {
    /// Loads (or creates) the identity and name store and binds the socket.
    /// Must be called inside a tokio runtime.
    pub fn bind(config: Config) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let identity = Identity::load_or_create(&config.data_dir.join("tracker.key"))?;
        let db_path = config.data_dir.join("tracker.db");
        let names = SqliteNames::open(&db_path, config.name_retention)?;
        let mailbox = Mailbox::open(&db_path, config.held_ttl)?;

        let server = server_config(&identity, ALPN_TRACKER)?;
        let socket = udp_socket(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let runtime = quinn::default_runtime().ok_or_else(|| StartError::Bind {
            addr: config.listen,
            source: std::io::Error::other("no async runtime"),
        })?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;

        Ok(Self {
            endpoint,
            id: identity.id(),
            shared: Arc::new(Shared {
                registry: Registry::new(config.max_peers, config.presence),
                names: Box::new(names),
                mailbox,
                relay: relay::Relay::default(),
                max_peers: u32::try_from(config.max_peers).unwrap_or(u32::MAX),
            }),
            max_connections: config.max_peers.saturating_add(MAX_ENROLLING),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The tracker's key, which peers pin.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// Accepts and serves peers until `shutdown` fires, then closes every
    /// connection and waits for the session tasks to finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let open = Arc::new(AtomicUsize::new(0));
        info!(presence = ?self.shared.registry.mode(), "accepting peers");
        tasks.spawn(expire_held(self.shared.clone(), shutdown.clone()));
        loop {
            let incoming = tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
                () = shutdown.cancelled() => break,
            };
            if open.load(Ordering::Relaxed) >= self.max_connections {
                warn!(remote = %incoming.remote_address(), "connection limit reached, refusing");
                incoming.refuse();
                continue;
            }
            let guard = ConnectionSlot::take(open.clone());
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                session::serve(incoming, shared, shutdown).await;
                drop(guard);
            });
        }
        info!("shutting down");
        self.endpoint
            .close(close::NORMAL.into(), b"tracker shutting down");
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
        // The sessions that ended recorded their names' last use.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.names.flush()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (`kill`, a service manager
/// stopping the process): how the tracker, and the benchmark that starts
/// it, learn to stop.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The tracker's QUIC server settings for `alpn`: tincan's TLS with this
/// identity and the tracker's transport limits. Public so that benchmarks
/// can hold a bare quinn server to exactly the same settings.
pub fn server_config(identity: &Identity, alpn: &[u8]) -> Result<quinn::ServerConfig, StartError> {
    let tls = tincan_proto::tls::server_config(identity, &[alpn])?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| StartError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config()));
    Ok(server)
}

/// The tracker's transport limits: [`IDLE_TIMEOUT`] (the peers send the
/// keep-alives), [`MAX_STREAMS_PER_PEER`] bidirectional streams, no
/// unidirectional ones.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // 10 s always fits quinn's VarInt range.
    transport
        .max_idle_timeout(IDLE_TIMEOUT.try_into().ok())
        .max_concurrent_bidi_streams(MAX_STREAMS_PER_PEER.into())
        .max_concurrent_uni_streams(0u32.into());
    transport
}

/// Sweeps held messages past their time-to-live and tells their senders.
async fn expire_held(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(shared.mailbox.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match shared.mailbox.expire(store::now_secs()) {
            Ok(expired) => {
                for (sender, notice) in expired {
                    info!("a held message expired");
                    shared
                        .registry
                        .push(&sender, tincan_proto::tracker::FromTracker::Notice(notice));
                }
            }
            Err(e) => warn!(error = %e, "cannot expire held messages"),
        }
    }
}

/// The tracker's UDP socket, with kernel buffers of [`SOCKET_BUFFER`]: every
/// join sends a packet to every online peer and their acknowledgements come
/// back in one burst; at the default (~208 KiB) the kernel drops them, and
/// newcomers' handshake packets with them (measured: 400k+ drops while
/// 2 000 peers enroll, none at 4 MiB). The kernel caps the size at
/// `net.core.rmem_max`/`wmem_max` (docs/operations.md).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: a smaller buffer than asked for still works.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Counts a connection as open for as long as it lives.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
