//! Links to other peers: direct QUIC connections and relay circuits through
//! the tracker, the message streams on them, acknowledgements, and the
//! strategy that picks and upgrades the path.
//!
//! A link is one path to one peer. Each side sends its own messages on one
//! stream it owns (`Open{from}` first, then `Msg` frames; the other side
//! answers `Ack{id}` on the same stream). On a direct link that stream is a
//! QUIC stream opened lazily; on a relay link it is the circuit itself, with
//! TLS 1.3 inside (pinned keys both ways, see [`crate::relay`]).
//!
//! Strategy ([`Links::connect`]): a live direct link is used at once.
//! Otherwise the known addresses are dialed, the tracker is asked to
//! coordinate a hole punch (both sides dial at the same moment: at once when
//! the peer is behind a NAT, else when the plain dial has not got through
//! within about a round trip), and a relay circuit is requested, all in
//! parallel; the first that comes up carries the message. A relayed
//! conversation keeps trying to go direct in the background
//! ([`UPGRADE_ATTEMPTS`], with backoff); when it does, the relay link is
//! closed and what was unacknowledged on it is resent directly.
//!
//! Two peers that dial each other at the same moment end up with two
//! connections. Both sides keep the one dialed by the smaller peer id and
//! close the other after [`DUPLICATE_GRACE`], so what was in flight on it is
//! still acknowledged (and anything that is not is resent by the sender).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{
    FutureExt, SinkExt, StreamExt,
    future::{BoxFuture, select_ok},
    stream::FuturesUnordered,
};
use quinn::Connection;
use tincan_proto::{
    ALPN_PEER, Codec, MAX_BODY_LEN, MessageId, Name, PeerId, close,
    peer::{Refusal, ToReceiver, ToSender},
    tracker::{PeerInfo, ToTracker},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::{Notify, OnceCell},
    time::timeout,
};
use tokio_util::{
    codec::{FramedRead, FramedWrite},
    sync::CancellationToken,
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    event::{Event, Path},
    net,
    node::Inner,
    outbox::ACK_TIMEOUT,
    relay,
    tracker_client::Command,
};

/// Longest wait for a direct connection to come up.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the first frame of an incoming stream.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Incoming messages on one stream shown or being shown but not yet
/// acknowledged; past this the stream is not read until acks go out.
pub const RECEIVE_WINDOW: usize = 1024;
/// Most simultaneous direct links (connections) per peer process.
pub const MAX_LINKS: usize = 256;
/// Incoming handshakes in progress at once; more are refused, so a flood of
/// connection attempts cannot hold more than this many half-open ones.
pub const MAX_HANDSHAKING: usize = 64;
/// How long the losing connection of a simultaneous dial stays open.
pub const DUPLICATE_GRACE: Duration = Duration::from_secs(2);
/// How long a direct attempt gets before the relay is asked too.
pub const RELAY_HEAD_START: Duration = Duration::from_millis(50);
/// Least time a first dial gets before a hole punch is requested.
pub const MIN_PUNCH_DELAY: Duration = Duration::from_millis(30);
/// Background attempts to move a relayed conversation to a direct path.
pub const UPGRADE_ATTEMPTS: u32 = 6;
/// Delay before the first upgrade attempt; doubled after each.
pub const UPGRADE_FIRST_DELAY: Duration = Duration::from_millis(500);
/// How long one upgrade attempt waits for a direct link.
pub const PUNCH_WAIT: Duration = Duration::from_secs(3);
/// After a relay upgrade, how long the relay link stays open for acks.
pub const RELAY_GRACE: Duration = Duration::from_secs(1);
/// Hole punches the tracker asked for that may be dialing at once. Beyond
/// this, and for a peer already being punched, a punch request is ignored:
/// dials go to addresses another peer announced, so a flood of requests must
/// not turn this peer into a source of traffic at someone else's address.
pub const MAX_PUNCHES: usize = 16;

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
    #[error("no path to {name}: {reason}")]
    Unreachable { name: Name, reason: String },
    #[error("link lost: {0}")]
    Lost(String),
    #[error("refused by the receiver: {0}")]
    Refused(Refusal),
    #[error("no acknowledgement within {0:?}")]
    NoAck(Duration),
}

enum Transport {
    Quic {
        conn: Connection,
        /// Who dialed it; decides which of two duplicates survives.
        dialed_by: PeerId,
    },
    Relay {
        closed: CancellationToken,
        rtt: Duration,
        /// Bytes through the circuit both ways, TLS included.
        carried: Arc<AtomicU64>,
    },
}

/// What to do once a message's fate on a link is known: acknowledged,
/// refused, lost with the link, or no ack within [`ACK_TIMEOUT`]. The
/// future it returns is awaited by the link's ack reader (an ack is
/// settled right there, no task in between) or spawned (a failure).
pub type OnAck = Box<dyn FnOnce(Result<(), LinkError>) -> BoxFuture<'static, ()> + Send>;

/// Messages written to a link and not yet acknowledged.
#[derive(Default)]
struct Pending {
    waiting: HashMap<MessageId, OnAck>,
    /// When each one times out, oldest first (settled ones are skipped).
    deadlines: VecDeque<(Instant, MessageId)>,
}

impl Pending {
    /// The callbacks of messages whose ack is overdue at `now`.
    fn overdue(&mut self, now: Instant) -> Vec<OnAck> {
        let mut due = Vec::new();
        while let Some((at, id)) = self.deadlines.front().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            due.extend(self.waiting.remove(&id));
        }
        due
    }

    /// The next deadline of a message still waiting.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some((at, id)) = self.deadlines.front() {
            if self.waiting.contains_key(id) {
                return Some(*at);
            }
            self.deadlines.pop_front();
        }
        None
    }
}

/// Our message stream's sending half. Messages are written into it by the
/// task that routes them (under the conversation's turn), not handed to a
/// writer task: one task hop less per message. Taken away when the link ends.
type Outbound = tokio::sync::Mutex<
    Option<FramedWrite<Box<dyn AsyncWrite + Unpin + Send>, Codec<(), ToReceiver>>>,
>;

/// One path to one peer.
#[derive(Clone)]
pub struct Link(Arc<LinkState>);

struct LinkState {
    transport: Transport,
    peer: PeerId,
    out: OnceCell<Outbound>,
    pending: Mutex<Pending>,
    /// Woken whenever the last pending message is settled.
    drained: Notify,
}

impl Link {
    fn quic(conn: Connection, peer: PeerId, dialed_by: PeerId) -> Self {
        Self::with(Transport::Quic { conn, dialed_by }, peer)
    }

    pub(crate) fn relay(peer: PeerId, rtt: Duration, carried: Arc<AtomicU64>) -> Self {
        Self::with(
            Transport::Relay {
                closed: CancellationToken::new(),
                rtt,
                carried,
            },
            peer,
        )
    }

    /// Bytes this link carried through the tracker (0 for a direct link).
    fn relayed_bytes(&self) -> u64 {
        match &self.0.transport {
            Transport::Relay { carried, .. } => carried.load(Ordering::Relaxed),
            Transport::Quic { .. } => 0,
        }
    }

    fn with(transport: Transport, peer: PeerId) -> Self {
        Self(Arc::new(LinkState {
            transport,
            peer,
            out: OnceCell::new(),
            pending: Mutex::default(),
            drained: Notify::new(),
        }))
    }

    pub fn rtt(&self) -> Duration {
        match &self.0.transport {
            Transport::Quic { conn, .. } => conn.rtt(),
            Transport::Relay { rtt, .. } => *rtt,
        }
    }

    pub fn path(&self) -> Path {
        match self.0.transport {
            Transport::Quic { .. } => Path::Direct,
            Transport::Relay { .. } => Path::Relay,
        }
    }

    fn alive(&self) -> bool {
        match &self.0.transport {
            Transport::Quic { conn, .. } => conn.close_reason().is_none(),
            Transport::Relay { closed, .. } => !closed.is_cancelled(),
        }
    }

    fn close(&self, code: u32, reason: &'static [u8]) {
        match &self.0.transport {
            Transport::Quic { conn, .. } => conn.close(code.into(), reason),
            Transport::Relay { closed, .. } => closed.cancel(),
        }
    }

    /// Resolves when the link is closed (by either side).
    async fn closed(&self) {
        match &self.0.transport {
            Transport::Quic { conn, .. } => {
                conn.closed().await;
            }
            Transport::Relay { closed, .. } => closed.cancelled().await,
        }
    }

    fn conn(&self) -> Option<&Connection> {
        match &self.0.transport {
            Transport::Quic { conn, .. } => Some(conn),
            Transport::Relay { .. } => None,
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.0.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails every unacknowledged message on this link (the sender retries).
    fn fail_pending(&self, inner: &Inner, error: LinkError) {
        let failed: Vec<OnAck> = {
            let mut pending = self.pending();
            pending.deadlines.clear();
            pending.waiting.drain().map(|(_, f)| f).collect()
        };
        self.0.drained.notify_waiters();
        for on_ack in failed {
            inner.tasks.spawn(on_ack(Err(error.clone())));
        }
    }

    /// Fails the messages whose ack is overdue.
    fn expire(&self, inner: &Inner) {
        let (due, empty) = {
            let mut pending = self.pending();
            let due = pending.overdue(Instant::now());
            (due, pending.waiting.is_empty())
        };
        if empty {
            self.0.drained.notify_waiters();
        }
        for on_ack in due {
            inner
                .tasks
                .spawn(on_ack(Err(LinkError::NoAck(ACK_TIMEOUT))));
        }
    }

    /// Takes one message's callback; wakes `drained` waiters when none are left.
    fn settle(&self, id: &MessageId) -> Option<OnAck> {
        let (on_ack, empty) = {
            let mut pending = self.pending();
            let on_ack = pending.waiting.remove(id);
            (on_ack, pending.waiting.is_empty())
        };
        if empty {
            self.0.drained.notify_waiters();
        }
        on_ack
    }

    /// Resolves when no message on this link awaits its acknowledgement.
    pub(crate) async fn drained(&self) {
        loop {
            let notified = self.0.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending().waiting.is_empty() || !self.alive() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn same(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Queues one message; `on_ack` runs once its fate on this link is
    /// known (at once, with the error, if it cannot be written).
    pub async fn send(&self, inner: &Arc<Inner>, msg: ToReceiver, on_ack: OnAck) {
        let ToReceiver::Msg { id, .. } = &msg else {
            return on_ack(Err(LinkError::Lost("only messages can be queued".into()))).await;
        };
        let id = *id;
        let out = match self
            .0
            .out
            .get_or_try_init(|| self.open_outbound(inner))
            .await
        {
            Ok(out) => out,
            Err(e) => return on_ack(Err(e)).await,
        };
        {
            let mut pending = self.pending();
            pending.waiting.insert(id, on_ack);
            pending
                .deadlines
                .push_back((Instant::now() + ACK_TIMEOUT, id));
        }
        let written = {
            let mut out = out.lock().await;
            match out.as_mut() {
                Some(writer) => tokio::select! {
                    written = writer.send(msg) => written.map_err(|e| e.to_string()),
                    () = self.closed() => Err("link closed".into()),
                },
                None => Err("link closed".into()),
            }
        };
        if let Err(e) = written {
            debug!(error = %e, "message stream write failed");
            self.close(close::BAD_FRAME, b"write failed");
            // Spawned: a retry queues the message again, maybe behind the
            // very turn that is calling us.
            if let Some(on_ack) = self.settle(&id) {
                inner.tasks.spawn(on_ack(Err(LinkError::Lost(e))));
            }
        }
    }

    /// Drops our message stream's sending half, once the link has ended.
    async fn drop_outbound(&self) {
        if let Some(out) = self.0.out.get() {
            out.lock().await.take();
        }
    }

    /// Opens our message stream on a direct link.
    async fn open_outbound(&self, inner: &Arc<Inner>) -> Result<Outbound, LinkError> {
        let Some(conn) = self.conn() else {
            return Err(LinkError::Lost("relay circuit closed".into()));
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| LinkError::Lost(e.to_string()))?;
        start_outbound(inner, self, recv, send).await
    }

    /// For a relay link: its circuit is the message stream.
    pub(crate) async fn attach_outbound<R, W>(
        &self,
        inner: &Arc<Inner>,
        recv: R,
        send: W,
    ) -> Result<(), LinkError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let out = start_outbound(inner, self, recv, send).await?;
        self.0
            .out
            .set(out)
            .map_err(|_| LinkError::Lost("link already has a stream".into()))
    }
}

/// Sends `Open` on a message stream, then starts its acknowledgement
/// reader; returns the stream's sending half.
async fn start_outbound<R, W>(
    inner: &Arc<Inner>,
    link: &Link,
    recv: R,
    send: W,
) -> Result<Outbound, LinkError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let send: Box<dyn AsyncWrite + Unpin + Send> = Box::new(send);
    let mut writer = FramedWrite::new(send, Codec::<(), ToReceiver>::default());
    writer
        .send(ToReceiver::Open {
            from: inner.config.name.clone(),
        })
        .await
        .map_err(|e| LinkError::Lost(e.to_string()))?;

    let link = link.clone();
    let events = inner.clone();
    inner.tasks.spawn(async move {
        let mut reader = FramedRead::new(recv, Codec::<ToSender, ()>::default());
        let end = loop {
            let deadline = link.pending().next_deadline();
            let overdue = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let frame = tokio::select! {
                frame = reader.next() => frame,
                () = overdue => {
                    link.expire(&events);
                    continue;
                }
                () = link.closed() => break LinkError::Lost("link closed".into()),
            };
            match frame {
                Some(Ok(ToSender::Ack { id })) => {
                    if let Some(on_ack) = link.settle(&id) {
                        on_ack(Ok(())).await;
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
                    link.close(close::BAD_FRAME, b"bad frame");
                    break LinkError::Lost(e.to_string());
                }
                None => break LinkError::Lost("message stream closed".into()),
            }
        };
        if link.path() == Path::Relay {
            link.close(close::NORMAL, b"circuit ended");
        }
        link.drop_outbound().await;
        link.fail_pending(&events, end);
    });
    Ok(tokio::sync::Mutex::new(Some(writer)))
}

/// All links of this node.
#[derive(Default)]
pub struct Links {
    direct: Mutex<HashMap<PeerId, Link>>,
    relays: Mutex<HashMap<PeerId, Link>>,
    dialing: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>,
    /// The path last announced for each peer, to announce only changes.
    paths: Mutex<HashMap<PeerId, Path>>,
    upgrading: Mutex<HashSet<PeerId>>,
    /// Peers a hole punch is dialing now (at most [`MAX_PUNCHES`]).
    punching: Mutex<HashSet<PeerId>>,
    /// Woken whenever a direct link is registered.
    registered: Notify,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Links {
    /// The best live link to a peer: direct, else relay.
    pub fn get(&self, id: &PeerId) -> Option<Link> {
        self.direct_link(id)
            .or_else(|| locked(&self.relays).get(id).filter(|l| l.alive()).cloned())
    }

    fn direct_link(&self, id: &PeerId) -> Option<Link> {
        locked(&self.direct).get(id).filter(|l| l.alive()).cloned()
    }

    pub fn count(&self) -> usize {
        locked(&self.direct).len()
    }

    /// Whether `link` is the live direct link to `info`'s peer, announced as
    /// its path: what [`Links::connect`] would hand out, with nothing to say.
    pub(crate) fn is_current_direct(&self, link: &Link, info: &PeerInfo) -> bool {
        link.0.peer == info.id
            && self.direct_link(&info.id).is_some_and(|l| l.same(link))
            && locked(&self.paths).get(&info.id) == Some(&Path::Direct)
    }

    /// Closes and forgets every link to a peer that went offline or moved.
    pub fn forget(&self, id: &PeerId) {
        if let Some(link) = locked(&self.direct).remove(id) {
            link.close(close::NORMAL, b"peer went offline");
        }
        if let Some(link) = locked(&self.relays).remove(id) {
            link.close(close::NORMAL, b"peer went offline");
        }
        locked(&self.dialing).remove(id);
        locked(&self.paths).remove(id);
    }

    pub fn close_all(&self) {
        for (_, link) in locked(&self.direct).drain() {
            link.close(close::NORMAL, b"logout");
        }
        for (_, link) in locked(&self.relays).drain() {
            link.close(close::NORMAL, b"logout");
        }
    }

    /// Adds a new direct connection, applying the duplicate rule; starts
    /// serving the other side's streams on it either way.
    fn register(&self, inner: &Arc<Inner>, link: Link) {
        let Transport::Quic { dialed_by, .. } = &link.0.transport else {
            return;
        };
        let preferred_dialer = inner.identity.id().min(link.0.peer);
        let loser = {
            let mut map = locked(&self.direct);
            match map.get(&link.0.peer) {
                Some(existing) if existing.alive() => {
                    let existing_preferred = matches!(
                        &existing.0.transport,
                        Transport::Quic { dialed_by, .. } if *dialed_by == preferred_dialer
                    );
                    if *dialed_by == preferred_dialer && !existing_preferred {
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
        self.registered.notify_waiters();
        if let Some(loser) = loser {
            debug!(peer = %link.0.peer.short(), "duplicate connection; closing one after grace");
            inner.tasks.spawn(async move {
                tokio::time::sleep(DUPLICATE_GRACE).await;
                loser.close(close::DUPLICATE, b"duplicate connection");
            });
        }
        let span = info_span!("link", peer = %link.0.peer.short());
        inner
            .tasks
            .spawn(serve_connection(inner.clone(), link).instrument(span));
    }

    fn remove_if(&self, link: &Link) {
        let mut map = locked(&self.direct);
        let same = map
            .get(&link.0.peer)
            .is_some_and(|l| Arc::ptr_eq(&l.0, &link.0));
        if same {
            map.remove(&link.0.peer);
        }
    }

    /// Resolves when a live direct link to `id` exists.
    async fn direct_appears(&self, id: PeerId) -> Link {
        loop {
            let notified = self.registered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(link) = self.direct_link(&id) {
                return link;
            }
            notified.await;
        }
    }

    /// Announces the path to a peer if it changed; `relay_bytes` is what
    /// the conversation sent through the relay before it went direct.
    async fn note_path(&self, inner: &Inner, info: &PeerInfo, link: &Link) {
        self.note_path_after(inner, info, link, None).await;
    }

    async fn note_path_after(
        &self,
        inner: &Inner,
        info: &PeerInfo,
        link: &Link,
        relay_bytes: Option<u64>,
    ) {
        let changed = locked(&self.paths).insert(info.id, link.path()) != Some(link.path());
        if changed {
            info!(peer = %info.name, path = link.path().as_str(), "path");
            inner
                .emit(Event::Path {
                    name: info.name.clone(),
                    path: link.path(),
                    rtt: link.rtt(),
                    relay_bytes,
                })
                .await;
        }
    }

    /// A live link to `info`'s peer, making one if there is none (see the
    /// module docs for the strategy).
    pub async fn connect(&self, inner: &Arc<Inner>, info: &PeerInfo) -> Result<Link, LinkError> {
        if let Some(link) = self.direct_link(&info.id) {
            self.note_path(inner, info, &link).await;
            return Ok(link);
        }
        let lock = locked(&self.dialing).entry(info.id).or_default().clone();
        let _one_attempt_at_a_time = lock.lock().await;
        if let Some(link) = self.get(&info.id) {
            if link.path() == Path::Relay {
                self.upgrade_later(inner, info);
            }
            self.note_path(inner, info, &link).await;
            return Ok(link);
        }
        let link = if inner.config.relay_only {
            self.open_relay(inner, info).await?
        } else {
            // A peer behind a NAT of its own drops a plain dial until it
            // dials us too: ask for the punch at once. Otherwise only if
            // the plain dial has not got through quickly: on an open path
            // the punch would just make a second connection.
            let punch_after = if behind_another_nat(info, inner.observed()) {
                Duration::ZERO
            } else {
                punch_delay(inner)
            };
            let direct = async {
                let punch_later = async {
                    tokio::time::sleep(punch_after).await;
                    request_punch(inner, &info.name);
                    std::future::pending::<Result<Link, LinkError>>().await
                };
                tokio::select! {
                    never = punch_later => never,
                    dialed = dial(inner, info, None) => {
                        let conn = dialed?;
                        let link = Link::quic(conn, info.id, inner.identity.id());
                        self.register(inner, link);
                        // The duplicate rule may have kept another one.
                        self.direct_link(&info.id)
                            .ok_or_else(|| LinkError::Lost("direct link closed at once".into()))
                    }
                    link = self.direct_appears(info.id) => Ok(link),
                }
            };
            let relayed = async {
                tokio::time::sleep(RELAY_HEAD_START).await;
                self.open_relay(inner, info).await
            };
            match select_ok([direct.boxed(), relayed.boxed()]).await {
                Ok((link, _)) => link,
                Err(e) => return Err(e),
            }
        };
        if link.path() == Path::Relay {
            self.upgrade_later(inner, info);
        }
        self.note_path(inner, info, &link).await;
        Ok(link)
    }

    async fn open_relay(&self, inner: &Arc<Inner>, info: &PeerInfo) -> Result<Link, LinkError> {
        let link = relay::open_circuit(inner, info).await?;
        locked(&self.relays).insert(info.id, link.clone());
        Ok(link)
    }

    /// Starts (once per peer) the background attempts to go direct.
    fn upgrade_later(&self, inner: &Arc<Inner>, info: &PeerInfo) {
        if inner.config.relay_only || !locked(&self.upgrading).insert(info.id) {
            return;
        }
        let (inner2, info) = (inner.clone(), info.clone());
        inner.tasks.spawn(async move {
            let links = &inner2.links;
            let mut delay = UPGRADE_FIRST_DELAY;
            for attempt in 1..=UPGRADE_ATTEMPTS {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = inner2.cancel.cancelled() => break,
                }
                delay *= 2;
                if links.direct_link(&info.id).is_none() {
                    debug!(peer = %info.name, attempt, "trying to go direct");
                    request_punch(&inner2, &info.name);
                    let direct = async {
                        tokio::select! {
                            Ok(conn) = dial(&inner2, &info, None) => {
                                links.register(&inner2, Link::quic(conn, info.id, inner2.identity.id()));
                            }
                            _ = links.direct_appears(info.id) => {}
                        }
                    };
                    let _ = timeout(PUNCH_WAIT, direct).await;
                }
                if let Some(link) = links.direct_link(&info.id) {
                    let relay = locked(&links.relays).remove(&info.id);
                    let relayed = relay.as_ref().map(Link::relayed_bytes);
                    links.note_path_after(&inner2, &info, &link, relayed).await;
                    // Unacknowledged messages on the relay fail over and are
                    // resent on the direct link; the receiver shows each once.
                    if let Some(relay) = relay {
                        tokio::time::sleep(RELAY_GRACE).await;
                        relay.close(close::NORMAL, b"upgraded to direct");
                    }
                    break;
                }
            }
            locked(&links.upgrading).remove(&info.id);
        });
    }
}

/// How long a first dial to a peer that is not behind a NAT gets before a
/// hole punch is requested: three times the RTT to the tracker (twice that
/// is about the RTT to the peer, and a handshake takes a round trip and a
/// little more), at least [`MIN_PUNCH_DELAY`]. A punch that comes while the
/// dial is still completing makes a second connection, and a message sent
/// on the one the duplicate rule closes waits a round trip longer.
fn punch_delay(inner: &Inner) -> Duration {
    inner
        .tracker_rtt()
        .map_or(MIN_PUNCH_DELAY, |rtt| (rtt * 3).max(MIN_PUNCH_DELAY))
}

/// Whether `peer` sits behind a NAT that is not ours: the tracker saw it at
/// an address that is none of the peer's own, and at another public address
/// than ours. Such a NAT drops our plain dial until the peer dials us too
/// (a punch). Behind the same NAT as us, its local addresses answer a plain
/// dial. Unknown (no local addresses announced, or seen on loopback, which
/// no NAT makes): no.
fn behind_another_nat(peer: &PeerInfo, ours: Option<SocketAddr>) -> bool {
    let seen = peer.observed;
    !seen.ip().is_loopback()
        && !peer.local_addrs.is_empty()
        && !peer.local_addrs.contains(&seen)
        && ours.is_none_or(|ours| ours.ip() != seen.ip())
}

/// Asks the tracker to have `name` dial us while we dial it.
fn request_punch(inner: &Inner, name: &Name) {
    // Best effort: when the tracker is away there is nobody to coordinate.
    let _ = inner
        .tracker
        .try_send(Command::Send(ToTracker::Connect { to: name.clone() }));
}

/// The tracker says: dial `peer` after `delay_ms` (it dials us too).
pub async fn punch(inner: Arc<Inner>, peer: PeerInfo, delay_ms: u32) {
    if peer.id == inner.identity.id() || !inner.observe_key(&peer.name, peer.id).await {
        return;
    }
    if inner.config.relay_only || inner.links.direct_link(&peer.id).is_some() {
        return;
    }
    let Some(_punching) = Punching::start(&inner.links, peer.id) else {
        debug!(peer = %peer.name, "punch request ignored: already punching it, or too many");
        return;
    };
    debug!(peer = %peer.name, delay_ms, "hole punch requested by the tracker");
    tokio::time::sleep(Duration::from_millis(delay_ms.into())).await;
    // Our first packet opens our NAT for theirs; start retransmitting as
    // fast as the path allows rather than after quinn's default 1 s.
    let rtt = inner
        .tracker_rtt()
        .map(|r| r * 2)
        .unwrap_or(Duration::from_millis(100));
    if let Ok(conn) = dial(&inner, &peer, Some(rtt)).await {
        inner
            .links
            .register(&inner, Link::quic(conn, peer.id, inner.identity.id()));
    }
}

/// A hole punch in progress: holds its peer's place in [`Links::punching`]
/// until dropped.
struct Punching<'a> {
    links: &'a Links,
    id: PeerId,
}

impl<'a> Punching<'a> {
    fn start(links: &'a Links, id: PeerId) -> Option<Self> {
        let mut punching = locked(&links.punching);
        // Not `then_some`: it would build (and drop) a guard whose Drop
        // takes the lock held here.
        (punching.len() < MAX_PUNCHES && punching.insert(id)).then(|| Self { links, id })
    }
}

impl Drop for Punching<'_> {
    fn drop(&mut self) {
        locked(&self.links.punching).remove(&self.id);
    }
}

/// Dials every known address of the peer at once; the first handshake that
/// completes (with the pinned key) wins.
async fn dial(
    inner: &Arc<Inner>,
    info: &PeerInfo,
    initial_rtt: Option<Duration>,
) -> Result<Connection, LinkError> {
    let unreachable = |reason: String| LinkError::Unreachable {
        name: info.name.clone(),
        reason,
    };
    let config =
        net::client_config_with_rtt(&inner.identity, ALPN_PEER, Some(info.id), initial_rtt)
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
    let handshaking = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKING));
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
        let Ok(permit) = handshaking.clone().try_acquire_owned() else {
            debug!(remote = %incoming.remote_address(), "too many handshakes at once, refusing");
            incoming.refuse();
            continue;
        };
        let inner2 = inner.clone();
        inner.tasks.spawn(async move {
            let remote = incoming.remote_address();
            let handshake = timeout(DIAL_TIMEOUT, incoming).await;
            drop(permit);
            let conn = match handshake {
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
            inner2.links.register(&inner2, Link::quic(conn, peer, peer));
        });
    }
}

/// Serves the other side's message streams on one connection until it closes.
async fn serve_connection(inner: Arc<Inner>, link: Link) {
    let Some(conn) = link.conn().cloned() else {
        return;
    };
    let error = loop {
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => break e,
            },
            () = inner.cancel.cancelled() => return,
        };
        let inner2 = inner.clone();
        let conn2 = conn.clone();
        let peer = link.0.peer;
        inner.tasks.spawn(async move {
            let close = move |code: u32, why: &'static [u8]| conn2.close(code.into(), why);
            if let Err(reason) = serve_stream(&inner2, peer, Path::Direct, &close, recv, send).await
            {
                debug!(%reason, "message stream ended");
            }
        });
    };
    debug!(reason = %error, "link closed");
    inner.links.remove_if(&link);
    link.fail_pending(&inner, LinkError::Lost(error.to_string()));
}

/// One incoming message stream (direct or relayed): authenticate the
/// claimed name against the key the TLS handshake proved, then show each
/// new message once and acknowledge every one. `close` ends the whole link
/// on a protocol violation.
pub(crate) async fn serve_stream<R, W>(
    inner: &Arc<Inner>,
    peer: PeerId,
    path: Path,
    close: &(dyn Fn(u32, &'static [u8]) + Send + Sync),
    recv: R,
    send: W,
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = FramedRead::new(recv, Codec::<ToReceiver, ()>::default());
    let mut writer = FramedWrite::new(send, Codec::<(), ToSender>::default());
    let from = match timeout(OPEN_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(ToReceiver::Open { from }))) => from,
        Ok(Some(Ok(_))) => {
            close(close::PROTOCOL, b"expected Open");
            return Err("stream did not start with Open".into());
        }
        Ok(Some(Err(e))) => {
            close(close::BAD_FRAME, b"bad frame");
            return Err(e.to_string());
        }
        Ok(None) => return Err("stream closed before Open".into()),
        Err(_) => return Err("no Open frame in time".into()),
    };
    if !inner.authorize(&from, peer).await {
        inner
            .emit(Event::Warning {
                message: format!(
                    "refused messages from a peer calling itself {from} whose key {} is not the one known for that name",
                    peer.short()
                ),
            })
            .await;
        let _ = writer
            .send(ToSender::Refused {
                reason: Refusal::UnknownSender,
            })
            .await;
        let _ = writer.get_mut().shutdown().await;
        return Err(format!("unauthorized sender claiming {from}"));
    }
    // Messages shown (or being shown) whose ack waits for the user's
    // screen and the commit of their row; acks go out as those complete,
    // many per flush, while the next messages are read.
    let mut unacked = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(shown) = unacked.next(), if !unacked.is_empty() => {
                let mut id: MessageId = shown;
                loop {
                    writer.feed(ToSender::Ack { id }).await.map_err(|e| e.to_string())?;
                    match unacked.next().now_or_never() {
                        Some(Some(next)) => id = next,
                        _ => break,
                    }
                }
                SinkExt::<ToSender>::flush(&mut writer).await.map_err(|e| e.to_string())?;
            }
            frame = reader.next(), if unacked.len() < RECEIVE_WINDOW => match frame {
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
                        close(close::PROTOCOL, b"message too large");
                        return Err("oversized message".into());
                    }
                    let acknowledge = match inner
                        .take_incoming(peer, &from, id, body, sent_at_ms, path)
                        .await
                    {
                        Ok(acknowledge) => acknowledge,
                        Err(e) => {
                            warn!(error = %e, "cannot record an incoming message");
                            close(close::NORMAL, b"storage failure");
                            return Err(e.to_string());
                        }
                    };
                    unacked.push(acknowledge.map(move |()| id));
                }
                Some(Ok(ToReceiver::Open { .. })) => {
                    close(close::PROTOCOL, b"second Open");
                    return Err("second Open on one stream".into());
                }
                Some(Err(e)) => {
                    close(close::BAD_FRAME, b"bad frame");
                    return Err(e.to_string());
                }
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(observed: &str, local: &[&str]) -> PeerInfo {
        PeerInfo {
            name: Name::parse("bob").unwrap(),
            id: PeerId([2; 32]),
            observed: observed.parse().unwrap(),
            local_addrs: local.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn at(addr: &str) -> Option<SocketAddr> {
        Some(addr.parse().unwrap())
    }

    #[test]
    fn a_peer_seen_at_an_address_not_its_own_is_behind_a_nat() {
        // Port-preserving NAT: another address, the same port.
        let cone = peer("203.0.113.2:4000", &["10.0.2.2:4000"]);
        assert!(behind_another_nat(&cone, at("203.0.113.9:5000")));
        // Symmetric NAT: another port too.
        let symmetric = peer("203.0.113.3:61234", &["10.0.3.2:4000"]);
        assert!(behind_another_nat(&symmetric, at("203.0.113.9:5000")));
        // Before we know our own address.
        assert!(behind_another_nat(&cone, None));
    }

    #[test]
    fn a_peer_seen_at_its_own_address_is_not_behind_a_nat() {
        let public = peer("203.0.113.5:4000", &["203.0.113.5:4000", "10.9.0.1:4000"]);
        assert!(!behind_another_nat(&public, at("198.51.100.7:5000")));
    }

    #[test]
    fn a_peer_behind_our_own_nat_is_dialed_first() {
        // Same public address as ours: its local addresses answer a dial.
        let neighbour = peer("203.0.113.2:4001", &["10.0.2.3:4001"]);
        assert!(!behind_another_nat(&neighbour, at("203.0.113.2:4000")));
    }

    #[test]
    fn without_evidence_a_peer_is_not_taken_for_natted() {
        // Seen on loopback: the tracker runs on its machine; no NAT does that.
        let same_host = peer("127.0.0.1:4000", &["192.168.1.5:4000"]);
        assert!(!behind_another_nat(&same_host, at("127.0.0.1:5000")));
        // Announced no addresses of its own.
        let silent = peer("203.0.113.2:4000", &[]);
        assert!(!behind_another_nat(&silent, at("203.0.113.9:5000")));
    }
}
