//! The bare quinn server: the baseline for the tracker's handshake rate and
//! memory. It runs with the tracker's own QUIC settings (tincan's TLS, the
//! tracker's transport config and its UDP socket with the same buffers,
//! from `tincan_tracker`), keeps one task per connection as the tracker
//! does, answers one byte on the first stream (so the client knows the
//! server finished the handshake) and holds the connection until the client
//! goes.

use std::{net::SocketAddr, sync::Arc};

use quinn::Endpoint;
use tincan_proto::tls::Identity;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    BenchError,
    quic::{self, QuicError},
};

/// Connections the bare server holds at most (the harness goes to 100 000).
pub const MAX_CONNECTIONS: usize = 200_000;

pub struct BareServer {
    endpoint: Endpoint,
}

impl BareServer {
    pub fn bind(listen: SocketAddr) -> Result<Self, BenchError> {
        let identity = Identity::generate().map_err(QuicError::from)?;
        let config = tincan_tracker::server_config(&identity, quic::ALPN_BARE)
            .map_err(|e| QuicError::Tls(e.to_string()))?;
        let bind_err = |source| QuicError::Bind {
            addr: listen,
            source,
        };
        let socket = tincan_tracker::udp_socket(listen).map_err(bind_err)?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        Ok(Self { endpoint })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, BenchError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Serves until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let open = Arc::new(());
        loop {
            let incoming = tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
                () = shutdown.cancelled() => break,
            };
            // Each task holds a clone: the count is the number of live connections.
            if Arc::strong_count(&open) > MAX_CONNECTIONS {
                incoming.refuse();
                continue;
            }
            let slot = open.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                serve(incoming, shutdown).await;
                drop(slot);
            });
        }
        self.endpoint.close(0u32.into(), b"bare server done");
        tasks.close();
        tasks.wait().await;
    }
}

async fn serve(incoming: quinn::Incoming, shutdown: CancellationToken) {
    let Ok(conn) = incoming.await else { return };
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let mut byte = [0u8; 1];
    if recv.read_exact(&mut byte).await.is_err() || send.write_all(&byte).await.is_err() {
        return;
    }
    // Hold the streams, as the tracker holds its control stream.
    tokio::select! {
        _ = conn.closed() => {}
        () = shutdown.cancelled() => {}
    }
    drop((send, recv));
}
