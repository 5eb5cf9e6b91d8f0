//! The peer's side of the tracker protocol: enroll (hello → welcome →
//! thanks → client list, or on a tracker in subscribe mode: the names this
//! peer follows and which of them are online), then follow presence and
//! answer lookups; when the connection drops, tell the user and enroll again
//! with capped exponential backoff. Direct conversations do not depend on
//! any of this.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use quinn::{Connection, RecvStream, SendStream};
use tincan_proto::{
    ALPN_TRACKER, Codec, MessageId, Name, PROTOCOL_VERSION, PeerId, close,
    tracker::{
        FromTracker, HoldResult, LIST_PAGE, PeerInfo, PresenceChange, RejectReason, SealKeyEntry,
        ToTracker,
    },
};
use tokio::{
    sync::{mpsc, oneshot},
    time::timeout,
};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, info, warn};

use crate::{directory::PresenceMode, event::Event, mail::Mail, net, node::Inner};

/// Longest wait to reach the tracker and for each enrollment step.
pub const TRACKER_TIMEOUT: Duration = Duration::from_secs(5);
/// First delay before enrolling again after losing the tracker.
pub const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// Longest delay between attempts to enroll again.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Longest wait for a lookup answer.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Lookups waiting for an answer at once.
pub const MAX_PENDING_LOOKUPS: usize = 256;
/// Commands queued for the tracker task.
pub const COMMAND_QUEUE: usize = 64;
/// Most names this peer follows on a tracker in subscribe mode, whatever the
/// tracker allows: its contacts (names with a pinned key) first. A
/// `Subscribe` of this many 32-character names fits one frame.
pub const MAX_FOLLOWED: usize = 1_024;

type Reader = FramedRead<RecvStream, Codec<FromTracker, ()>>;
type Writer = FramedWrite<SendStream, Codec<(), ToTracker>>;

/// The TLS alert a tracker sends when it offers none of our ALPNs.
const NO_APPLICATION_PROTOCOL: u8 = 120;

/// Why enrolling failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot resolve tracker address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("cannot reach the tracker at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error(
        "TRACKER KEY CHANGED: the tracker at {addr} presented key {found}, but this peer pinned {expected}. \
         Refusing to talk to it. If the tracker's key really changed, start with --tracker-key {found_full}"
    )]
    KeyChanged {
        addr: String,
        expected: String,
        found: String,
        found_full: String,
    },
    #[error("the tracker refused the name: {0}")]
    Rejected(RejectReason),
    #[error(
        "the tracker at {addr} speaks another protocol version than this peer ({}); \
         run the same tincan version on both",
        String::from_utf8_lossy(ALPN_TRACKER)
    )]
    OtherVersion { addr: String },
    #[error("the tracker broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Net(#[from] net::NetError),
}

/// Why a page of everyone online could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("the tracker is not reachable right now; try again later")]
    TrackerAway,
}

impl EnrollError {
    /// Errors that retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        match self {
            EnrollError::Rejected(reason) => !matches!(
                reason,
                RejectReason::Unavailable | RejectReason::TrackerFull
            ),
            EnrollError::OtherVersion { .. } => true,
            _ => false,
        }
    }
}

impl Enrolled {
    pub(crate) fn connection(&self) -> Connection {
        self.conn.clone()
    }
}

/// A finished enrollment.
pub struct Enrolled {
    conn: Connection,
    reader: Reader,
    writer: Writer,
    pub tracker_id: PeerId,
    pub observed: SocketAddr,
    /// Everyone online (broadcast), or this peer and the online ones among
    /// `followed` (subscribe).
    pub peers: Vec<PeerInfo>,
    pub presence: PresenceMode,
    /// Subscribe mode: the names this enrollment follows.
    pub followed: Vec<Name>,
}

/// Requests to the tracker task. While the tracker is away, replies are
/// dropped (the caller sees its oneshot close) and `Send` frames are lost.
pub enum Command {
    Lookup {
        name: Name,
        reply: oneshot::Sender<Option<PeerInfo>>,
    },
    SealKeyOf {
        name: Name,
        reply: oneshot::Sender<Option<SealKeyEntry>>,
    },
    Hold {
        to: Name,
        to_id: PeerId,
        id: MessageId,
        sealed: Vec<u8>,
        reply: oneshot::Sender<HoldResult>,
    },
    /// A frame that needs no answer (receipts, notice acknowledgements).
    Send(ToTracker),
    /// One page of everyone online (subscribe mode).
    ListPage {
        after: Option<Name>,
        limit: u32,
        reply: oneshot::Sender<(Vec<PeerInfo>, bool)>,
    },
    Logout {
        reply: oneshot::Sender<()>,
    },
}

/// Runs the enrollment flow once; `pin` is the tracker key to insist on.
pub async fn enroll(inner: &Inner, pin: Option<PeerId>) -> Result<Enrolled, EnrollError> {
    let tracker = inner.config.tracker.clone();
    let addr = resolve(&tracker, inner.local_addr.is_ipv4()).await?;
    let unreachable = |reason: String| EnrollError::Unreachable {
        addr: tracker.clone(),
        reason,
    };
    let config = net::client_config(&inner.identity, ALPN_TRACKER, None)?;
    let connecting = inner
        .endpoint
        .connect_with(config, addr, tincan_proto::tls::SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?;
    let conn = match timeout(TRACKER_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        // TLS alert no_application_protocol: the tracker does not offer our
        // ALPN, that is, it speaks another protocol version. Retrying cannot
        // help.
        Ok(Err(quinn::ConnectionError::ConnectionClosed(close)))
            if close.error_code == quinn::TransportErrorCode::crypto(NO_APPLICATION_PROTOCOL) =>
        {
            return Err(EnrollError::OtherVersion { addr: tracker });
        }
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer within {TRACKER_TIMEOUT:?}"))),
    };
    let tracker_id = crate::links::remote_id(&conn)
        .ok_or_else(|| EnrollError::Protocol("no usable tracker certificate".into()))?;
    if let Some(expected) = pin
        && expected != tracker_id
    {
        conn.close(close::UNAUTHORIZED.into(), b"tracker key changed");
        return Err(EnrollError::KeyChanged {
            addr: tracker,
            expected: expected.short(),
            found: tracker_id.short(),
            found_full: tracker_id.to_string(),
        });
    }

    let step = |what: &'static str| EnrollError::Protocol(format!("timed out waiting for {what}"));
    let (send, recv) = timeout(TRACKER_TIMEOUT, conn.open_bi())
        .await
        .map_err(|_| step("a stream"))?
        .map_err(|e| unreachable(e.to_string()))?;
    let mut reader: Reader = FramedRead::new(recv, Codec::default());
    let mut writer: Writer = FramedWrite::new(send, Codec::default());
    let proto_err = |e: tincan_proto::FrameError| EnrollError::Protocol(e.to_string());

    // 1. hello, and 4. thanks behind it without waiting for the welcome
    //    (a rejected Hello makes the tracker drop it), with the names we
    //    follow in case the tracker is in subscribe mode: its welcome and
    //    the state of those names then come back together.
    let local_addrs = net::local_addrs(inner.local_addr);
    let mut followed = names_to_follow(inner, MAX_FOLLOWED);
    writer
        .feed(ToTracker::Hello {
            name: inner.config.name.clone(),
            version: PROTOCOL_VERSION,
            local_addrs: local_addrs.clone(),
            follow: Some(followed.clone()),
        })
        .await
        .map_err(proto_err)?;
    writer.send(ToTracker::Thanks).await.map_err(proto_err)?;
    // 3. welcome (or reject)
    let observed = match next_step(&conn, &mut reader, "Welcome").await? {
        FromTracker::Welcome { observed, .. } => observed,
        other => return Err(unexpected(&conn, Some(Ok(other)))),
    };
    // 6. who is online: everyone, in pages; or, on a tracker in subscribe
    //    mode (it said so right after Welcome), the online ones among the
    //    names we follow (the first `max_subscriptions` of them).
    let (presence, followed, peers) = match next_step(&conn, &mut reader, "the client list").await?
    {
        first @ FromTracker::ClientList { .. } => {
            let peers = read_pages(&conn, &mut reader, first, client_list_page).await?;
            (PresenceMode::Broadcast, Vec::new(), peers)
        }
        FromTracker::SubscribeMode { max_subscriptions } => {
            let max_subscriptions =
                usize::try_from(max_subscriptions).map_or(MAX_FOLLOWED, |m| m.min(MAX_FOLLOWED));
            followed.truncate(max_subscriptions);
            let first = next_step(&conn, &mut reader, "the followed names").await?;
            let mut peers = read_pages(&conn, &mut reader, first, subscribed_page).await?;
            peers.push(PeerInfo {
                name: inner.config.name.clone(),
                id: inner.identity.id(),
                observed,
                local_addrs,
            });
            (
                PresenceMode::Subscribe { max_subscriptions },
                followed,
                peers,
            )
        }
        other => return Err(unexpected(&conn, Some(Ok(other)))),
    };
    // So that others can seal messages for us while we are away.
    writer
        .send(ToTracker::PublishSealKey(inner.signed_seal.clone()))
        .await
        .map_err(proto_err)?;
    Ok(Enrolled {
        conn,
        reader,
        writer,
        tracker_id,
        observed,
        peers,
        presence,
        followed,
    })
}

/// The next frame of an enrollment step, within [`TRACKER_TIMEOUT`]; a
/// `Reject` ends the enrollment.
async fn next_step(
    conn: &Connection,
    reader: &mut Reader,
    what: &'static str,
) -> Result<FromTracker, EnrollError> {
    match timeout(TRACKER_TIMEOUT, reader.next()).await {
        Err(_) => Err(EnrollError::Protocol(format!(
            "timed out waiting for {what}"
        ))),
        Ok(Some(Ok(FromTracker::Reject { reason }))) => {
            conn.close(close::NORMAL.into(), b"rejected");
            Err(EnrollError::Rejected(reason))
        }
        Ok(Some(Ok(frame))) => Ok(frame),
        Ok(other) => Err(unexpected(conn, other)),
    }
}

/// A page of a list, split by `page` into its entries and whether it is the
/// last; any other frame is given back.
type PageOf = fn(FromTracker) -> Result<(Vec<PeerInfo>, bool), FromTracker>;

fn client_list_page(frame: FromTracker) -> Result<(Vec<PeerInfo>, bool), FromTracker> {
    match frame {
        FromTracker::ClientList { peers, last } => Ok((peers, last)),
        other => Err(other),
    }
}

fn subscribed_page(frame: FromTracker) -> Result<(Vec<PeerInfo>, bool), FromTracker> {
    match frame {
        FromTracker::Subscribed { peers, last } => Ok((peers, last)),
        other => Err(other),
    }
}

/// Reads a paged list, `first` being its first page, up to its last page.
async fn read_pages(
    conn: &Connection,
    reader: &mut Reader,
    first: FromTracker,
    page: PageOf,
) -> Result<Vec<PeerInfo>, EnrollError> {
    let mut peers = Vec::new();
    let mut frame = first;
    loop {
        let (entries, last) = page(frame).map_err(|other| unexpected(conn, Some(Ok(other))))?;
        peers.extend(entries);
        if last {
            return Ok(peers);
        }
        frame = next_step(conn, reader, "the next page of the list").await?;
    }
}

/// Whom this peer follows on a tracker in subscribe mode: the names it has
/// dealt with (a pinned key), then the others on its client list, at most
/// `max` (see [`follow_order`]).
fn names_to_follow(inner: &Inner, max: usize) -> Vec<Name> {
    let known = inner.store.known_names(max).unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the known names");
        Vec::new()
    });
    let listed = inner.directory().all().into_iter().map(|p| p.name);
    follow_order(&inner.config.name, known, listed, max)
}

/// The names to follow, at most `max`: the contacts (`known`, names with a
/// pinned key) first, then the others this peer has seen (`listed`), each
/// group in name order, each name once, never `me`.
fn follow_order(
    me: &Name,
    known: Vec<Name>,
    listed: impl Iterator<Item = Name>,
    max: usize,
) -> Vec<Name> {
    let mut seen = std::collections::HashSet::from([me.key()]);
    let mut sorted_unseen = |names: &mut Vec<Name>| {
        names.sort_by_key(Name::key);
        names.retain(|n| seen.insert(n.key()));
    };
    let mut contacts = known;
    sorted_unseen(&mut contacts);
    let mut others: Vec<Name> = listed.collect();
    sorted_unseen(&mut others);
    contacts.into_iter().chain(others).take(max).collect()
}

/// One page of everyone online after `after`, in name order (at most
/// `limit`, capped at [`LIST_PAGE`]), and whether more follow: from the
/// tracker in subscribe mode, from the client list (which is everyone) in
/// broadcast mode.
pub(crate) async fn list_page(
    inner: &Inner,
    after: Option<Name>,
    limit: usize,
) -> Result<(Vec<PeerInfo>, bool), ListError> {
    let limit = limit.min(LIST_PAGE);
    if inner.directory().mode() == PresenceMode::Broadcast {
        return Ok(inner.directory().page(after.as_ref(), limit));
    }
    if !*inner.tracker_up.borrow() {
        return Err(ListError::TrackerAway);
    }
    let (reply, rx) = oneshot::channel();
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    inner
        .tracker
        .send(Command::ListPage {
            after,
            limit,
            reply,
        })
        .await
        .map_err(|_| ListError::TrackerAway)?;
    match timeout(LOOKUP_TIMEOUT, rx).await {
        Ok(Ok(page)) => Ok(page),
        _ => Err(ListError::TrackerAway),
    }
}

fn unexpected(
    conn: &Connection,
    got: Option<Result<FromTracker, tincan_proto::FrameError>>,
) -> EnrollError {
    let what = match got {
        None => match conn.close_reason() {
            Some(reason) => format!("connection closed: {reason}"),
            None => "stream ended during enrollment".to_string(),
        },
        Some(Err(e)) => e.to_string(),
        Some(Ok(frame)) => format!("unexpected {frame:?}"),
    };
    conn.close(close::PROTOCOL.into(), b"unexpected frame");
    EnrollError::Protocol(what)
}

/// The endpoint address a peer binds when not told: any IPv4 address, or
/// any IPv6 address when the tracker has IPv6 addresses only. (If the lookup
/// fails, IPv4, and enrolling then says why the tracker cannot be reached.)
pub async fn default_bind(tracker: &str) -> SocketAddr {
    const V4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    const V6: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
    match timeout(TRACKER_TIMEOUT, tokio::net::lookup_host(tracker)).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if !addrs.is_empty() && addrs.iter().all(SocketAddr::is_ipv6) {
                V6
            } else {
                V4
            }
        }
        _ => V4,
    }
}

async fn resolve(tracker: &str, want_v4: bool) -> Result<SocketAddr, EnrollError> {
    let failed = |reason: String| EnrollError::Resolve {
        addr: tracker.to_string(),
        reason,
    };
    let addrs = timeout(TRACKER_TIMEOUT, tokio::net::lookup_host(tracker))
        .await
        .map_err(|_| failed(format!("no answer within {TRACKER_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    addrs
        .into_iter()
        .find(|a| a.is_ipv4() == want_v4)
        .ok_or_else(|| {
            failed(if want_v4 {
                "it has no IPv4 address (to reach an IPv6 tracker, use --bind [::]:0)".into()
            } else {
                "it has no IPv6 address, and --bind is an IPv6 address".into()
            })
        })
}

/// Follows the tracker for the node's lifetime: presence, lookups, logout,
/// and enrolling again after a loss.
pub async fn run(inner: Arc<Inner>, first: Enrolled, mut commands: mpsc::Receiver<Command>) {
    let mut session = first;
    loop {
        let lost = follow(&inner, &mut session, &mut commands).await;
        let reason = match lost {
            Ended::LoggedOut | Ended::Cancelled => return,
            Ended::Replaced => {
                inner
                    .emit(Event::Fatal {
                        reason: "this identity enrolled again from another process; \
                                 this one stops"
                            .into(),
                    })
                    .await;
                inner.cancel.cancel();
                return;
            }
            Ended::Lost(reason) => reason,
        };
        inner.tracker_up.send_replace(false);
        inner.set_tracker_conn(None);
        match reconnect(&inner, reason, &mut commands).await {
            Some(next) => session = next,
            None => return,
        }
    }
}

enum Ended {
    LoggedOut,
    Cancelled,
    Replaced,
    Lost(String),
}

async fn follow(
    inner: &Arc<Inner>,
    session: &mut Enrolled,
    commands: &mut mpsc::Receiver<Command>,
) -> Ended {
    let mut lookups: HashMap<u32, oneshot::Sender<Option<PeerInfo>>> = HashMap::new();
    let mut seal_keys: HashMap<u32, oneshot::Sender<Option<SealKeyEntry>>> = HashMap::new();
    let mut holds: HashMap<MessageId, oneshot::Sender<HoldResult>> = HashMap::new();
    let mut pages: HashMap<u32, oneshot::Sender<(Vec<PeerInfo>, bool)>> = HashMap::new();
    let mut next_req: u32 = 0;
    loop {
        tokio::select! {
            frame = session.reader.next() => match frame {
                Some(Ok(FromTracker::Presence(change))) => on_presence(inner, change).await,
                Some(Ok(FromTracker::Subscribed { peers, .. })) => {
                    // The state of a name just followed, after a lookup
                    // (which checked its key): told here or by the lookup's
                    // caller, whichever comes first, and once.
                    for info in peers {
                        inner.learned(info).await;
                    }
                }
                Some(Ok(FromTracker::ListPageReply { req, peers, more })) => {
                    if let Some(reply) = pages.remove(&req) {
                        let _ = reply.send((peers, more));
                    }
                }
                Some(Ok(FromTracker::SealKeyReply { req, entry })) => {
                    if let Some(reply) = seal_keys.remove(&req) {
                        let _ = reply.send(entry);
                    }
                }
                Some(Ok(FromTracker::HoldReply { id, result })) => {
                    if let Some(reply) = holds.remove(&id) {
                        let _ = reply.send(result);
                    }
                }
                Some(Ok(FromTracker::Held(held))) => {
                    if inner.mail.send(Mail::Held(held)).await.is_err() {
                        return Ended::Cancelled;
                    }
                }
                Some(Ok(FromTracker::Notice(notice))) => {
                    if inner.mail.send(Mail::Notice(notice)).await.is_err() {
                        return Ended::Cancelled;
                    }
                }
                Some(Ok(FromTracker::Punch { peer, delay_ms })) => {
                    inner.tasks.spawn(crate::links::punch(inner.clone(), peer, delay_ms));
                }
                Some(Ok(FromTracker::LookupReply { req, peer })) => {
                    if let Some(reply) = lookups.remove(&req) {
                        let _ = reply.send(peer);
                    }
                }
                Some(Ok(FromTracker::Replaced)) => return Ended::Replaced,
                Some(Ok(other)) => {
                    warn!(frame = ?other, "unexpected frame from tracker");
                    session.conn.close(close::PROTOCOL.into(), b"unexpected frame");
                    return Ended::Lost("the tracker sent an unexpected frame".into());
                }
                Some(Err(e)) => {
                    if session.conn.close_reason().is_some() {
                        return connection_ended(&session.conn);
                    }
                    session.conn.close(close::BAD_FRAME.into(), b"bad frame");
                    return Ended::Lost(format!("bad frame from tracker: {e}"));
                }
                None => return connection_ended(&session.conn),
            },
            stream = session.conn.accept_bi() => {
                // The tracker opens streams only to offer relay circuits.
                if let Ok((send, recv)) = stream {
                    inner.tasks.spawn(crate::relay::accept_circuit(inner.clone(), send, recv));
                }
            }
            cmd = commands.recv() => match cmd {
                Some(Command::Lookup { name, reply }) => {
                    if lookups.len() >= MAX_PENDING_LOOKUPS {
                        let _ = reply.send(None);
                        continue;
                    }
                    lookups.retain(|_, r| !r.is_closed());
                    next_req = next_req.wrapping_add(1);
                    lookups.insert(next_req, reply);
                    let follow = subscription_for(inner, &name);
                    let frames = std::iter::once(ToTracker::Lookup { req: next_req, name }).chain(follow);
                    for frame in frames {
                        if let Err(e) = session.writer.send(frame).await {
                            return Ended::Lost(format!("cannot write to tracker: {e}"));
                        }
                    }
                }
                Some(Command::ListPage { after, limit, reply }) => {
                    pages.retain(|_, r| !r.is_closed());
                    if pages.len() >= MAX_PENDING_LOOKUPS {
                        continue;
                    }
                    next_req = next_req.wrapping_add(1);
                    pages.insert(next_req, reply);
                    if let Err(e) = session.writer.send(ToTracker::ListPage { req: next_req, after, limit }).await {
                        return Ended::Lost(format!("cannot write to tracker: {e}"));
                    }
                }
                Some(Command::SealKeyOf { name, reply }) => {
                    seal_keys.retain(|_, r| !r.is_closed());
                    if seal_keys.len() >= MAX_PENDING_LOOKUPS {
                        continue;
                    }
                    next_req = next_req.wrapping_add(1);
                    seal_keys.insert(next_req, reply);
                    if let Err(e) = session.writer.send(ToTracker::SealKeyOf { req: next_req, name }).await {
                        return Ended::Lost(format!("cannot write to tracker: {e}"));
                    }
                }
                Some(Command::Hold { to, to_id, id, sealed, reply }) => {
                    holds.retain(|_, r| !r.is_closed());
                    if holds.len() >= MAX_PENDING_LOOKUPS {
                        continue;
                    }
                    holds.insert(id, reply);
                    if let Err(e) = session.writer.send(ToTracker::Hold { to, to_id, id, sealed }).await {
                        return Ended::Lost(format!("cannot write to tracker: {e}"));
                    }
                }
                Some(Command::Send(frame)) => {
                    if let Err(e) = session.writer.send(frame).await {
                        return Ended::Lost(format!("cannot write to tracker: {e}"));
                    }
                }
                Some(Command::Logout { reply }) => {
                    logout(session).await;
                    let _ = reply.send(());
                    return Ended::LoggedOut;
                }
                None => return Ended::Cancelled,
            },
            () = inner.cancel.cancelled() => return Ended::Cancelled,
        }
    }
}

/// Applies one change to the client list and tells the user (unless it
/// changes nothing the user was not told: a join that a lookup found first).
async fn on_presence(inner: &Arc<Inner>, change: PresenceChange) {
    let mut known = false;
    if let PresenceChange::Joined(info) = &change {
        let old = inner
            .directory()
            .get(&info.name)
            .map(|old| (old.id, old.observed));
        // The same peer back from another address (it restarted): the old
        // link is dead, drop it now rather than after its idle timeout.
        if old.is_some_and(|(id, observed)| id == info.id && observed != info.observed) {
            inner.links.forget(&info.id);
        }
        known = old == Some((info.id, info.observed));
        inner.observe_key(&info.name, info.id).await;
    }
    let (name, id, online) = inner.directory().apply(change);
    if name != inner.config.name && !known {
        if !online {
            inner.links.forget(&id);
        }
        inner.emit(Event::Presence { name, id, online }).await;
    }
}

/// In subscribe mode, the `Subscribe` that follows a name this peer looks up
/// (one it sends to, or hears from) if it does not follow it yet and may
/// follow more; it is recorded as followed.
fn subscription_for(inner: &Inner, name: &Name) -> Option<ToTracker> {
    if *name == inner.config.name || !inner.directory().follow(name.clone()) {
        return None;
    }
    Some(ToTracker::Subscribe {
        names: vec![name.clone()],
    })
}

/// Why the tracker connection ended, from its close reason.
fn connection_ended(conn: &Connection) -> Ended {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == close::REPLACED.into() =>
        {
            Ended::Replaced
        }
        Some(e) => Ended::Lost(e.to_string()),
        None => Ended::Lost("the tracker closed the stream".into()),
    }
}

/// Logout → Goodbye → close, each step bounded.
async fn logout(session: &mut Enrolled) {
    if session.writer.send(ToTracker::Logout).await.is_ok() {
        let wait = async {
            while let Some(frame) = session.reader.next().await {
                if matches!(frame, Ok(FromTracker::Goodbye)) {
                    return true;
                }
            }
            false
        };
        match timeout(TRACKER_TIMEOUT, wait).await {
            Ok(true) => debug!("goodbye received"),
            _ => warn!("no goodbye from tracker; closing anyway"),
        }
    }
    session.conn.close(close::NORMAL.into(), b"logout");
}

/// Enrolls again with capped exponential backoff, answering commands in the
/// meantime. `None` when the node is shutting down or cannot go on.
async fn reconnect(
    inner: &Arc<Inner>,
    mut reason: String,
    commands: &mut mpsc::Receiver<Command>,
) -> Option<Enrolled> {
    let mut delay = RECONNECT_MIN;
    loop {
        info!(%reason, retry_in = ?delay, "tracker connection lost");
        inner
            .emit(Event::TrackerLost {
                reason: reason.clone(),
                retry_in: delay,
            })
            .await;
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                cmd = commands.recv() => match cmd {
                    // Dropping a reply tells the caller the tracker is away.
                    Some(
                        Command::Lookup { .. }
                        | Command::SealKeyOf { .. }
                        | Command::Hold { .. }
                        | Command::Send(_)
                        | Command::ListPage { .. },
                    ) => {}
                    Some(Command::Logout { reply }) => { let _ = reply.send(()); return None; }
                    None => return None,
                },
                () = inner.cancel.cancelled() => return None,
            }
        }
        let attempt = tokio::select! {
            r = enroll(inner, inner.tracker_pin()) => r,
            () = inner.cancel.cancelled() => return None,
        };
        match attempt {
            Ok(enrolled) => {
                inner.on_enrolled(&enrolled, true).await;
                return Some(enrolled);
            }
            Err(e) if e.is_permanent() => {
                inner
                    .emit(Event::Fatal {
                        reason: e.to_string(),
                    })
                    .await;
                inner.cancel.cancel();
                return None;
            }
            Err(e) => {
                if matches!(e, EnrollError::KeyChanged { .. }) {
                    inner
                        .emit(Event::Warning {
                            message: e.to_string(),
                        })
                        .await;
                }
                reason = e.to_string();
                delay = (delay * 2).min(RECONNECT_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<Name> {
        list.iter().map(|n| Name::parse(n).unwrap()).collect()
    }

    #[test]
    fn contacts_are_followed_first_then_others_each_once_never_oneself() {
        let me = Name::parse("me").unwrap();
        let known = names(&["zoe", "Bob"]);
        let listed = names(&["alice", "bob", "ME", "carol", "alice"]);
        let all = follow_order(&me, known.clone(), listed.clone().into_iter(), 10);
        assert_eq!(all, names(&["Bob", "zoe", "alice", "carol"]));
        // At the limit, the contacts stay and the others give way.
        let two = follow_order(&me, known, listed.into_iter(), 2);
        assert_eq!(two, names(&["Bob", "zoe"]));
    }
}
