//! Direct links: mutually authenticated QUIC connections to other peers, the
//! message streams on them, and acknowledgements.
//!
//! A link is one connection to one peer. Each side sends its own messages on
//! one bidirectional stream it opens lazily (`Open{from}` first, then `Msg`
//! frames; the other side answers `Ack{id}` on the same stream). Every
//! connection, dialed or accepted, also serves the other side's streams.
//!
//! Two peers that dial each other at the same moment end up with two
//! connections. Both sides keep the one dialed by the smaller peer id and
//! close the other after [`DUPLICATE_GRACE`], so what was in flight on it is
//! still acknowledged (and anything that is not is resent by the sender).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt, future::select_ok};
use quinn::Connection;
use tincan_proto::{
    ALPN_PEER, Codec, MAX_BODY_LEN, MessageId, Name, PeerId, close,
    peer::{Refusal, ToReceiver, ToSender},
    tracker::PeerInfo,
};
use tokio::{
    sync::{OnceCell, mpsc, oneshot},
    time::timeout,
};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    event::{Event, Path, Shown},
    net,
    node::Inner,
    store::Incoming,
};

/// Longest wait for a direct connection to come up.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the first frame of an incoming stream.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued for one link's writer.
pub const OUT_QUEUE: usize = 1024;
/// Most simultaneous direct links (connections) per peer process.
pub const MAX_LINKS: usize = 256;
/// How long the losing connection of a simultaneous dial stays open.
pub const DUPLICATE_GRACE: Duration = Duration::from_secs(2);

/// The identity proven by a connection's TLS handshake.
pub fn remote_id(conn: &Connection) -> Option<PeerId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tincan_proto::tls::remote_id(&certs).ok()
}

/// A link broke or could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("no direct path to {name}: {reason}")]
    Unreachable { name: Name, reason: String },
    #[error("link lost: {0}")]
    Lost(String),
    #[error("refused by the receiver: {0}")]
    Refused(Refusal),
}

/// One connection to one peer.
#[derive(Clone)]
pub struct Link(Arc<LinkState>);

struct LinkState {
    conn: Connection,
    peer: PeerId,
    /// Who dialed this connection; decides which of two duplicates survives.
    dialed_by: PeerId,
    out: OnceCell<mpsc::Sender<ToReceiver>>,
    pending: Mutex<HashMap<MessageId, oneshot::Sender<Result<(), LinkError>>>>,
}

impl Link {
    fn new(conn: Connection, peer: PeerId, dialed_by: PeerId) -> Self {
        Self(Arc::new(LinkState {
            conn,
            peer,
            dialed_by,
            out: OnceCell::new(),
            pending: Mutex::default(),
        }))
    }

    pub fn rtt(&self) -> Duration {
        self.0.conn.rtt()
    }

    pub fn path(&self) -> Path {
        Path::Direct
    }

    fn alive(&self) -> bool {
        self.0.conn.close_reason().is_none()
    }

    fn pending(
        &self,
    ) -> MutexGuard<'_, HashMap<MessageId, oneshot::Sender<Result<(), LinkError>>>> {
        self.0.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails every unacknowledged message on this link (the sender retries).
    fn fail_pending(&self, error: LinkError) {
        for (_, tx) in self.pending().drain() {
            let _ = tx.send(Err(error.clone()));
        }
    }

    /// Queues one message; the receiver resolves when its ack arrives.
    pub async fn send(
        &self,
        inner: &Arc<Inner>,
        msg: ToReceiver,
    ) -> Result<oneshot::Receiver<Result<(), LinkError>>, LinkError> {
        let ToReceiver::Msg { id, .. } = &msg else {
            return Err(LinkError::Lost("only messages can be queued".into()));
        };
        let id = *id;
        let out = self
            .0
            .out
            .get_or_try_init(|| self.open_outbound(inner))
            .await?;
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id, tx);
        if out.send(msg).await.is_err() {
            self.pending().remove(&id);
            return Err(LinkError::Lost("link writer stopped".into()));
        }
        Ok(rx)
    }

    /// Opens our message stream on this link, sends `Open`, and starts its
    /// writer and acknowledgement reader.
    async fn open_outbound(
        &self,
        inner: &Arc<Inner>,
    ) -> Result<mpsc::Sender<ToReceiver>, LinkError> {
        let lost = |e: &dyn std::fmt::Display| LinkError::Lost(e.to_string());
        let (send, recv) = self.0.conn.open_bi().await.map_err(|e| lost(&e))?;
        let mut writer = FramedWrite::new(send, Codec::<(), ToReceiver>::default());
        writer
            .send(ToReceiver::Open {
                from: inner.config.name.clone(),
            })
            .await
            .map_err(|e| lost(&e))?;
        let (tx, mut rx) = mpsc::channel::<ToReceiver>(OUT_QUEUE);

        let conn = self.0.conn.clone();
        inner.tasks.spawn(async move {
            // Feed everything queued, then flush once: one write per burst.
            while let Some(first) = rx.recv().await {
                let mut result = writer.feed(first).await;
                while result.is_ok() {
                    match rx.try_recv() {
                        Ok(next) => result = writer.feed(next).await,
                        Err(_) => break,
                    }
                }
                if let Err(e) = match result {
                    Ok(()) => SinkExt::<ToReceiver>::flush(&mut writer).await,
                    Err(e) => Err(e),
                } {
                    debug!(error = %e, "message stream write failed");
                    conn.close(close::BAD_FRAME.into(), b"write failed");
                    return;
                }
            }
            let _ = writer.get_mut().finish();
        });

        let link = self.clone();
        let events = inner.clone();
        inner.tasks.spawn(async move {
            let mut reader = FramedRead::new(recv, Codec::<ToSender, ()>::default());
            let end = loop {
                match reader.next().await {
                    Some(Ok(ToSender::Ack { id })) => {
                        if let Some(tx) = link.pending().remove(&id) {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Some(Ok(ToSender::Refused { reason })) => {
                        events
                            .emit(Event::Warning {
                                message: format!("a peer refused our messages: {reason}"),
                            })
                            .await;
                        break LinkError::Refused(reason);
                    }
                    Some(Err(e)) => {
                        link.0.conn.close(close::BAD_FRAME.into(), b"bad frame");
                        break LinkError::Lost(e.to_string());
                    }
                    None => break LinkError::Lost("message stream closed".into()),
                }
            };
            link.fail_pending(end);
        });
        Ok(tx)
    }
}

/// All direct links of this node.
#[derive(Default)]
pub struct Links {
    map: Mutex<HashMap<PeerId, Link>>,
    dialing: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Links {
    fn map(&self) -> MutexGuard<'_, HashMap<PeerId, Link>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &PeerId) -> Option<Link> {
        self.map().get(id).filter(|l| l.alive()).cloned()
    }

    pub fn count(&self) -> usize {
        self.map().len()
    }

    /// Closes and forgets the link to a peer that went offline.
    pub fn forget(&self, id: &PeerId) {
        if let Some(link) = self.map().remove(id) {
            link.0
                .conn
                .close(close::NORMAL.into(), b"peer went offline");
        }
        self.dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub fn close_all(&self) {
        for (_, link) in self.map().drain() {
            link.0.conn.close(close::NORMAL.into(), b"logout");
        }
    }

    /// Adds a new connection, applying the duplicate rule; starts serving
    /// the other side's streams on it either way.
    fn register(&self, inner: &Arc<Inner>, link: Link) {
        let me = inner.identity.id();
        let preferred_dialer = me.min(link.0.peer);
        let loser = {
            let mut map = self.map();
            match map.get(&link.0.peer) {
                Some(existing) if existing.alive() => {
                    let new_wins = link.0.dialed_by == preferred_dialer
                        && existing.0.dialed_by != preferred_dialer;
                    if new_wins {
                        map.insert(link.0.peer, link.clone())
                    } else {
                        Some(link.clone())
                    }
                }
                _ => {
                    map.insert(link.0.peer, link.clone());
                    None
                }
            }
        };
        if let Some(loser) = loser {
            debug!(peer = %link.0.peer.short(), "duplicate connection; closing one after grace");
            inner.tasks.spawn(async move {
                tokio::time::sleep(DUPLICATE_GRACE).await;
                loser
                    .0
                    .conn
                    .close(close::DUPLICATE.into(), b"duplicate connection");
            });
        }
        let span = info_span!("link", peer = %link.0.peer.short());
        inner
            .tasks
            .spawn(serve_connection(inner.clone(), link).instrument(span));
    }

    fn remove_if(&self, link: &Link) {
        let mut map = self.map();
        if map
            .get(&link.0.peer)
            .is_some_and(|l| l.0.conn.stable_id() == link.0.conn.stable_id())
        {
            map.remove(&link.0.peer);
        }
    }

    /// The live link to `info`'s peer, dialing it if there is none.
    pub async fn get_or_dial(
        &self,
        inner: &Arc<Inner>,
        info: &PeerInfo,
    ) -> Result<Link, LinkError> {
        if let Some(link) = self.get(&info.id) {
            return Ok(link);
        }
        let lock = self
            .dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(info.id)
            .or_default()
            .clone();
        let _one_dial_at_a_time = lock.lock().await;
        if let Some(link) = self.get(&info.id) {
            return Ok(link);
        }
        let conn = dial(inner, info).await?;
        let link = Link::new(conn, info.id, inner.identity.id());
        self.register(inner, link.clone());
        Ok(link)
    }
}

/// Dials every known address of the peer at once; the first handshake that
/// completes (with the pinned key) wins.
async fn dial(inner: &Arc<Inner>, info: &PeerInfo) -> Result<Connection, LinkError> {
    let unreachable = |reason: String| LinkError::Unreachable {
        name: info.name.clone(),
        reason,
    };
    let config = net::client_config(&inner.identity, ALPN_PEER, Some(info.id))
        .map_err(|e| unreachable(e.to_string()))?;
    let mut candidates: Vec<SocketAddr> = vec![info.observed];
    for addr in &info.local_addrs {
        if !candidates.contains(addr) {
            candidates.push(*addr);
        }
    }
    candidates.retain(|a| a.is_ipv4() == inner.local_addr.is_ipv4());
    let attempts = candidates.into_iter().map(|addr| {
        let config = config.clone();
        Box::pin(async move {
            let connecting = inner
                .endpoint
                .connect_with(config, addr, tincan_proto::tls::SERVER_NAME)
                .map_err(|e| format!("{addr}: {e}"))?;
            match timeout(DIAL_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(format!("{addr}: {e}")),
                Err(_) => Err(format!("{addr}: no answer within {DIAL_TIMEOUT:?}")),
            }
        })
    });
    match select_ok(attempts).await {
        Ok((conn, _rest)) => {
            info!(peer = %info.name, addr = %conn.remote_address(), "direct link up");
            Ok(conn)
        }
        Err(last) => Err(unreachable(last)),
    }
}

/// Accepts peer connections until the node shuts down.
pub async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            incoming = inner.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
            () = inner.cancel.cancelled() => return,
        };
        if inner.links.count() >= MAX_LINKS {
            warn!(remote = %incoming.remote_address(), "link limit reached, refusing");
            incoming.refuse();
            continue;
        }
        let inner2 = inner.clone();
        inner.tasks.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match timeout(DIAL_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return debug!(%remote, error = %e, "incoming handshake failed"),
                Err(_) => return debug!(%remote, "incoming handshake timed out"),
            };
            let Some(peer) = remote_id(&conn) else {
                conn.close(close::UNAUTHORIZED.into(), b"no usable certificate");
                return;
            };
            if peer == inner2.identity.id() {
                conn.close(close::UNAUTHORIZED.into(), b"that is me");
                return;
            }
            debug!(%remote, peer = %peer.short(), "accepted link");
            inner2.links.register(&inner2, Link::new(conn, peer, peer));
        });
    }
}

/// Serves the other side's message streams on one connection until it closes.
async fn serve_connection(inner: Arc<Inner>, link: Link) {
    let error = loop {
        let (send, recv) = tokio::select! {
            s = link.0.conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => break e,
            },
            () = inner.cancel.cancelled() => return,
        };
        let inner2 = inner.clone();
        let link2 = link.clone();
        inner.tasks.spawn(async move {
            if let Err(reason) = serve_stream(&inner2, &link2, send, recv).await {
                debug!(%reason, "message stream ended");
            }
        });
    };
    debug!(reason = %error, "link closed");
    inner.links.remove_if(&link);
    link.fail_pending(LinkError::Lost(error.to_string()));
}

/// One incoming message stream: authenticate the claimed name against the
/// TLS key, then show each new message once and acknowledge every one.
async fn serve_stream(
    inner: &Arc<Inner>,
    link: &Link,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), String> {
    let mut reader = FramedRead::new(recv, Codec::<ToReceiver, ()>::default());
    let mut writer = FramedWrite::new(send, Codec::<(), ToSender>::default());
    let from = match timeout(OPEN_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(ToReceiver::Open { from }))) => from,
        Ok(Some(Ok(_))) => {
            link.0.conn.close(close::PROTOCOL.into(), b"expected Open");
            return Err("stream did not start with Open".into());
        }
        Ok(Some(Err(e))) => {
            link.0.conn.close(close::BAD_FRAME.into(), b"bad frame");
            return Err(e.to_string());
        }
        Ok(None) => return Err("stream closed before Open".into()),
        Err(_) => return Err("no Open frame in time".into()),
    };
    if !inner.authorize(&from, link.0.peer).await {
        inner
            .emit(Event::Warning {
                message: format!(
                    "refused messages from a peer calling itself {from} whose key {} is not the one the tracker announced for that name",
                    link.0.peer.short()
                ),
            })
            .await;
        let _ = writer
            .send(ToSender::Refused {
                reason: Refusal::UnknownSender,
            })
            .await;
        let _ = writer.get_mut().finish();
        return Err(format!("unauthorized sender claiming {from}"));
    }
    loop {
        match reader.next().await {
            Some(Ok(ToReceiver::Msg {
                id,
                sent_at_ms,
                body,
            })) => {
                if body.len() > MAX_BODY_LEN {
                    let _ = writer
                        .send(ToSender::Refused {
                            reason: Refusal::TooLarge,
                        })
                        .await;
                    link.0
                        .conn
                        .close(close::PROTOCOL.into(), b"message too large");
                    return Err("oversized message".into());
                }
                // Record, show, then mark shown: a crash in between makes
                // the sender resend, and the message is shown (not lost).
                let path = link.path();
                match inner
                    .store
                    .receive(link.0.peer, &from, id, &body, sent_at_ms, path.as_str())
                {
                    Ok(Incoming::New | Incoming::NotShown) => {
                        let (recorder, peer) = (inner.clone(), link.0.peer);
                        let (shown, on_screen) = Shown::new(move || {
                            if let Err(e) = recorder.store.mark_shown(peer, id) {
                                warn!(error = %e, "cannot record a shown message");
                            }
                        });
                        inner
                            .emit(Event::Message {
                                from: from.clone(),
                                text: body,
                                id,
                                path,
                                sent_at_ms,
                                shown,
                            })
                            .await;
                        let _ = on_screen.await;
                    }
                    Ok(Incoming::Shown) => {}
                    Err(e) => {
                        // Not recorded, so not acknowledged: the sender resends.
                        warn!(error = %e, "cannot record an incoming message");
                        link.0.conn.close(close::NORMAL.into(), b"storage failure");
                        return Err(e.to_string());
                    }
                }
                writer
                    .send(ToSender::Ack { id })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Some(Ok(ToReceiver::Open { .. })) => {
                link.0.conn.close(close::PROTOCOL.into(), b"second Open");
                return Err("second Open on one stream".into());
            }
            Some(Err(e)) => {
                link.0.conn.close(close::BAD_FRAME.into(), b"bad frame");
                return Err(e.to_string());
            }
            None => return Ok(()),
        }
    }
}
