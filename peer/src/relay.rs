//! Relay circuits, the peer's side: ask the tracker to splice a stream to
//! another peer, then run TLS 1.3 inside it with the same pinned keys as a
//! direct connection (the dialer pins the target's key; the target checks
//! the dialer's key against the name the tracker says it has). The tracker
//! only forwards the bytes of that TLS session.

use std::{
    io::Cursor,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use quinn::{RecvStream, SendStream};
use rustls::pki_types::ServerName;
use tincan_proto::{
    ALPN_PEER, Codec,
    tls::{SERVER_NAME, client_config, peer_id_of, server_config},
    tracker::{FromTracker, PeerInfo, ToTracker},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, info};

use crate::{
    event::{Event, Path},
    links::{Link, LinkError, serve_stream},
    node::Inner,
};

/// A stream that counts the bytes through it both ways (what a circuit
/// costs the tracker, TLS included).
struct Counted<S> {
    inner: S,
    bytes: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.bytes.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Longest wait for the tracker to set up a circuit, and for the TLS
/// handshake inside it.
pub const CIRCUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a relay circuit to `info`'s peer and makes it a link.
pub async fn open_circuit(inner: &Arc<Inner>, info: &PeerInfo) -> Result<Link, LinkError> {
    let unreachable = |reason: String| LinkError::Unreachable {
        name: info.name.clone(),
        reason,
    };
    let tracker = inner
        .tracker_conn()
        .ok_or_else(|| unreachable("the tracker is away, so no relay either".into()))?;
    let (send, recv) = timeout(CIRCUIT_TIMEOUT, tracker.open_bi())
        .await
        .map_err(|_| unreachable("the tracker did not open a circuit stream in time".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let mut writer = FramedWrite::new(send, Codec::<(), ToTracker>::default());
    let mut reader = FramedRead::new(recv, Codec::<FromTracker, ()>::default());
    writer
        .send(ToTracker::Circuit {
            to: info.name.clone(),
        })
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    match timeout(CIRCUIT_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(FromTracker::CircuitReady))) => {}
        Ok(Some(Ok(FromTracker::CircuitRefused { reason }))) => {
            return Err(unreachable(format!("relay refused: {reason}")));
        }
        Ok(_) => return Err(unreachable("the tracker broke off the circuit".into())),
        Err(_) => return Err(unreachable("the relay did not answer in time".into())),
    }
    let parts = reader.into_parts();
    let carried = Arc::new(AtomicU64::new(0));
    let stream = Counted {
        inner: tokio::io::join(
            Cursor::new(parts.read_buf).chain(parts.io),
            writer.into_inner(),
        ),
        bytes: carried.clone(),
    };
    let tls = client_config(&inner.identity, ALPN_PEER, Some(info.id))
        .map_err(|e| unreachable(e.to_string()))?;
    let server = ServerName::try_from(SERVER_NAME).map_err(|e| unreachable(e.to_string()))?;
    let tls = match timeout(
        CIRCUIT_TIMEOUT,
        TlsConnector::from(Arc::new(tls)).connect(server, stream),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if let Some(refused) = tls_error(&e) {
                inner
                    .emit(Event::Warning {
                        message: format!(
                            "the relayed peer claiming to be {} failed authentication ({refused}); nothing was sent",
                            info.name
                        ),
                    })
                    .await;
                return Err(unreachable(format!("TLS inside the circuit failed: {e}")));
            }
            return Err(unreachable(format!(
                "the circuit closed during its TLS handshake: {e}"
            )));
        }
        Err(_) => return Err(unreachable("TLS inside the circuit timed out".into())),
    };
    let (recv, send) = tokio::io::split(tls);
    // Through the tracker: about our RTT to it plus the other side's.
    let rtt = inner.tracker_rtt().unwrap_or_default() * 2;
    let link = Link::relay(info.id, rtt, carried);
    link.attach_outbound(inner, recv, send).await?;
    info!(peer = %info.name, "relay circuit up");
    Ok(link)
}

/// The TLS failure inside a circuit, if that is what ended its handshake
/// (a key or certificate refused, a broken handshake); `None` when the
/// circuit itself closed or failed underneath it.
fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Serves a circuit the tracker offers: check who wants it, accept, run
/// the TLS server, then serve the message stream inside.
pub async fn accept_circuit(inner: Arc<Inner>, send: SendStream, recv: RecvStream) {
    let mut reader = FramedRead::new(recv, Codec::<FromTracker, ()>::default());
    let (from, from_id) = match timeout(CIRCUIT_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(FromTracker::CircuitOffer { from, from_id }))) => (from, from_id),
        _ => return,
    };
    if !inner.authorize(&from, from_id).await {
        debug!(%from, "declined a circuit from an unknown key");
        return;
    }
    let mut writer = FramedWrite::new(send, Codec::<(), ToTracker>::default());
    if writer.send(ToTracker::CircuitAccept).await.is_err() {
        return;
    }
    let parts = reader.into_parts();
    let stream = tokio::io::join(
        Cursor::new(parts.read_buf).chain(parts.io),
        writer.into_inner(),
    );
    let Ok(tls) = server_config(&inner.identity, &[ALPN_PEER]) else {
        return;
    };
    let tls = match timeout(
        CIRCUIT_TIMEOUT,
        TlsAcceptor::from(Arc::new(tls)).accept(stream),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if let Some(refused) = tls_error(&e) {
                inner
                    .emit(Event::Warning {
                        message: format!(
                            "a relayed connection claiming to be {from} failed authentication ({refused}); nothing was shown"
                        ),
                    })
                    .await;
            } else {
                // What a requester does when its direct dial came up first:
                // it drops the circuit it asked for in parallel.
                info!(%from, error = %e, "relay circuit closed before its TLS handshake finished");
            }
            return;
        }
        Err(_) => {
            info!(%from, "relay circuit: no TLS handshake within the time allowed");
            return;
        }
    };
    // The key inside the circuit must be the one the tracker named.
    let proven = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| peer_id_of(cert).ok());
    if proven != Some(from_id) {
        inner
            .emit(Event::Warning {
                message: format!(
                    "a relayed connection claiming to be {from} presented another key; nothing was shown"
                ),
            })
            .await;
        return;
    }
    let (recv, send) = tokio::io::split(tls);
    let close = |_code: u32, _why: &'static [u8]| {};
    if let Err(reason) = serve_stream(&inner, from_id, Path::Relay, &close, recv, send).await {
        debug!(%reason, "relayed message stream ended");
    }
}
