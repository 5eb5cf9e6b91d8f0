//! One task per connection: enrollment (hello → welcome → thanks), then
//! forwarding presence to the peer and answering its lookups (and, in
//! subscribe mode, its subscriptions) until it logs out, is replaced, falls
//! behind, or goes silent. Who hears which change is the registry's decision;
//! a session forwards whatever its [`Feed`] gives it.

use std::{ops::ControlFlow, pin::Pin, sync::Arc, time::Duration};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use quinn::{Connection, RecvStream, SendStream};
use tincan_proto::{
    Codec, FrameError, MessageId, Name, PROTOCOL_VERSION, PeerId, close,
    codec::Encoded,
    tracker::{
        FromTracker, HeldMessage, HoldResult, LIST_PAGE, Notice, NoticeKind, PeerInfo,
        RejectReason, SealKeyEntry, ToTracker,
    },
};
use tokio::{
    task::JoinSet,
    time::{Sleep, timeout},
};
use tokio_util::{
    codec::{FramedRead, FramedWrite},
    sync::CancellationToken,
};
use tracing::{Instrument, debug, info, warn};

use crate::{
    bucket::Bucket,
    mailbox::Mailbox,
    queue::FrameQueue,
    registry::{Feed, FeedEnd, FirstView, JoinError, MAX_SUBSCRIPTIONS, Registry, SessionId},
    relay::{Relay, punch_delays, serve_circuit},
    store::{NameStore, Verdict, now_secs},
};

/// Longest wait for each enrollment step (handshake, Hello, Thanks).
pub const ENROLL_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Initial room in a session's framing buffers. Enrollment frames are small
/// (a page of the client list grows the buffer for itself), and the
/// framing's default of 8 KiB each, allocated for every connection, showed
/// up in the tracker's profile while thousands of peers enrolled.
pub const FRAME_BUFFER: usize = 512;
/// Bytes of frames gathered before a write goes to the stream without a
/// flush (presence fan-out feeds several frames, then flushes once).
pub const WRITE_BATCH: usize = 8 * 1024;
/// Longest a write to one peer may block before the peer is dropped as a laggard.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests an enrolled peer may make per second (lookups, list pages,
/// subscriptions, hole-punch and mailbox requests), after a burst of
/// [`REQUEST_BURST`]. A peer that asks faster is served at this rate: its
/// session reads its next frame only when the request is due, so QUIC flow
/// control slows the sender and nobody else waits. Receipts for what the
/// tracker pushed (held messages, notices) are not counted.
pub const REQUEST_RATE: u64 = 100;
/// Requests an enrolled peer may make at once before [`REQUEST_RATE`] applies.
pub const REQUEST_BURST: u64 = 500;
/// After Reject or Goodbye, how long the tracker waits for the peer to close
/// the connection itself (so the last frame is not cut off) before closing it.
pub const LINGER: Duration = Duration::from_secs(2);

type Reader = FramedRead<RecvStream, Codec<ToTracker, ()>>;
type Writer = FramedWrite<SendStream, Codec<(), FromTracker>>;

/// What an enrolled session keeps for as long as its peer is online.
struct Online {
    reader: Reader,
    writer: Writer,
    name: Name,
    session: SessionId,
    feed: Feed,
    replaced: CancellationToken,
    inbox: Arc<FrameQueue>,
    /// Paces this peer's requests to [`REQUEST_RATE`].
    requests: Bucket,
}

/// Why [`Session::serve_online`] woke up with work to do.
enum Wake {
    /// A frame from the peer (or the end of its stream).
    Frame(Option<Result<ToTracker, FrameError>>),
    /// A presence window closed: forward this change and those behind it.
    Presence(Result<Encoded<FromTracker>, FeedEnd>),
    /// A frame other sessions addressed to this peer alone.
    Direct(Encoded<FromTracker>),
    /// A newer session of the same key took over.
    Replaced,
}

/// What every session shares.
pub struct Shared {
    pub registry: Registry,
    pub names: Box<dyn NameStore>,
    pub mailbox: Mailbox,
    pub relay: Relay,
    pub max_peers: u32,
}

/// Why a session ended other than by logout.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("stream closed during enrollment")]
    Eof,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("rejected: {0}")]
    Rejected(RejectReason),
    #[error("replaced by a newer session of the same key")]
    Replaced,
    #[error("fell behind on presence updates")]
    Lagging,
    #[error("{0}")]
    Subscribe(#[from] crate::registry::SubscribeError),
    #[error("tracker shutting down")]
    Shutdown,
}

/// Why forwarding presence stopped.
#[derive(Debug)]
enum Forward {
    /// The feed ended (see [`FeedEnd`]).
    Feed(FeedEnd),
    /// Writing to the peer failed or blocked.
    Write(End),
}

impl From<FeedEnd> for Forward {
    fn from(end: FeedEnd) -> Self {
        Forward::Feed(end)
    }
}

impl From<Forward> for End {
    /// A feed ends while its session lives only when the session fell too
    /// far behind (the replaced case is handled before this).
    fn from(f: Forward) -> Self {
        match f {
            Forward::Feed(_) => End::Lagging,
            Forward::Write(end) => end,
        }
    }
}

impl End {
    fn close_code(&self) -> u32 {
        match self {
            End::Frame(_) => close::BAD_FRAME,
            End::Protocol(_) | End::Subscribe(_) => close::PROTOCOL,
            End::Rejected(_) => close::REJECTED,
            End::Replaced => close::REPLACED,
            End::Lagging => close::LAGGING,
            End::Timeout(_) => close::TIMEOUT,
            End::Connection(_) | End::Eof | End::Shutdown => close::NORMAL,
        }
    }
}

/// Serves one accepted connection until it ends; never panics on peer input.
///
/// This future lives as long as the connection, once per online peer, so
/// the parts of a session that are only needed for a while (the handshake,
/// enrollment, the work of each wake-up) run in futures of their own on the
/// heap and are freed when done (memory per peer: docs/benchmarks.md).
pub async fn serve(incoming: quinn::Incoming, shared: Arc<Shared>, shutdown: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match Box::pin(timeout(ENROLL_STEP_TIMEOUT, incoming)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return debug!(%remote, error = %e, "handshake failed"),
        Err(_) => return debug!(%remote, "handshake timed out"),
    };
    let id = match conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .map(|certs| tincan_proto::tls::remote_id(&certs))
    {
        Some(Ok(id)) => id,
        _ => {
            conn.close(close::UNAUTHORIZED.into(), b"no usable client certificate");
            return;
        }
    };
    let span = tracing::info_span!("peer", id = %id.short(), %remote);
    async move {
        let mut session = Session {
            conn: conn.clone(),
            id,
            shared,
            name: None,
        };
        match session.run(shutdown).await {
            Ok(()) => {}
            Err(End::Connection(e)) => info!(reason = %e, "connection ended"),
            Err(end) => {
                info!(reason = %end, "closing session");
                conn.close(end.close_code().into(), end.to_string().as_bytes());
            }
        }
    }
    .instrument(span)
    .await
}

struct Session {
    conn: Connection,
    id: PeerId,
    shared: Arc<Shared>,
    /// Set once the peer is on the online list; cleared when it leaves.
    name: Option<(Name, u64)>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some((name, session)) = self.name.take() {
            self.leave(&name, session);
        }
    }
}

impl Session {
    fn leave(&self, name: &Name, session: u64) {
        if self.shared.registry.leave(name, session) {
            info!(name = %name, "left");
            self.shared.names.touch(name, self.id, now_secs());
        }
    }

    async fn run(&mut self, shutdown: CancellationToken) -> Result<(), End> {
        // Enrollment runs in a future of its own, freed once it is done:
        // what stays for the life of the session is only the (much smaller)
        // loop that serves an online peer.
        let online = Box::pin(self.enroll()).await?;
        Box::pin(self.serve_online(online, shutdown)).await
    }

    /// Steps 1 to 6 of enrollment, then what waited for this peer.
    async fn enroll(&mut self) -> Result<Online, End> {
        let (send, recv) = step("the control stream", self.conn.accept_bi()).await??;
        let mut reader: Reader = FramedRead::with_capacity(recv, Codec::default(), FRAME_BUFFER);
        let mut writer: Writer = FramedWrite::with_capacity(send, Codec::default(), FRAME_BUFFER);
        writer.set_backpressure_boundary(WRITE_BATCH);

        // 1. hello
        let (name, local_addrs, follow) = match step("Hello", reader.next()).await? {
            Some(Ok(ToTracker::Hello {
                name,
                version,
                local_addrs,
                follow,
            })) => {
                if version != PROTOCOL_VERSION {
                    return self
                        .reject(&mut writer, RejectReason::UnsupportedVersion)
                        .await;
                }
                if local_addrs.len() > tincan_proto::MAX_LOCAL_ADDRS {
                    return self
                        .reject(&mut writer, RejectReason::ProtocolViolation)
                        .await;
                }
                (name, local_addrs, follow)
            }
            Some(Ok(_)) => return Err(End::Protocol("expected Hello")),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(End::Eof),
        };

        // 2. is the name free for this key: not online under another key,
        //    not bound to another key within the retention window.
        if let Err(reason) = self.shared.registry.check(&name, self.id) {
            return self.reject(&mut writer, reason).await;
        }
        // Checked now, bound only once the peer has said thanks, so a
        // peer that never finishes enrolling does not keep the name.
        let free = self.shared.names.check(&name, self.id, now_secs());
        if let Err(reason) = name_verdict(free) {
            return self.reject(&mut writer, reason).await;
        }

        // 3. welcome, with the address the peer's packets come from, and in
        //    the same packet how this tracker tells who is online (subscribe
        //    mode), so that the peer can answer Thanks and Subscribe at once.
        let observed = self.conn.remote_address();
        let welcome = FromTracker::Welcome {
            observed,
            max_peers: self.shared.max_peers,
        };
        let announcement = self.shared.registry.announcement();
        // When the peer sent more behind Hello (Thanks sent ahead), Welcome
        // is held back to leave with what answers those.
        let flush = reader.read_buffer().is_empty();
        let frames = std::iter::once(welcome).chain(announcement);
        self.write_all(&mut writer, frames, flush).await?;

        // 4. thanks
        match step("Thanks", reader.next()).await? {
            Some(Ok(ToTracker::Thanks)) => {}
            Some(Ok(_)) => return Err(End::Protocol("expected Thanks")),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(End::Eof),
        }

        let bound = step(
            "the name binding",
            self.shared.names.bind(&name, self.id, now_secs()),
        )
        .await?;
        if let Err(reason) = name_verdict(bound) {
            return self.reject(&mut writer, reason).await;
        }

        // 5. onto the list (and whoever hears of it is told)
        let info = PeerInfo {
            name: name.clone(),
            id: self.id,
            observed,
            local_addrs,
        };
        let joined = match self.shared.registry.join(info, self.conn.clone()) {
            Ok(joined) => joined,
            Err(JoinError::Rejected(reason)) => return self.reject(&mut writer, reason).await,
            Err(JoinError::Encode(e)) => return Err(e.into()),
        };
        let session = joined.session;
        self.name = Some((name.clone(), session));
        info!(name = %name, %observed, online = self.shared.registry.online(), "enrolled");

        // 6. the newcomer's first view of who is online
        match joined.first_view {
            FirstView::FullList(list) => {
                let peers = list.iter().map(|p| PeerInfo::clone(p)).collect();
                self.write_pages(&mut writer, peers, |peers, last| FromTracker::ClientList {
                    peers,
                    last,
                })
                .await?;
            }
            FirstView::Subscribe => {
                let names = match follow {
                    // Sent ahead with Hello: the first ones, up to the limit
                    // SubscribeMode announced.
                    Some(mut names) => {
                        names.truncate(MAX_SUBSCRIPTIONS);
                        names
                    }
                    None => match step("Subscribe", async {
                        // Welcome may still be held back (above); the peer
                        // waits for it before it sends Subscribe.
                        SinkExt::<FromTracker>::flush(&mut writer).await?;
                        Ok::<_, FrameError>(reader.next().await)
                    })
                    .await??
                    {
                        Some(Ok(ToTracker::Subscribe { names })) => names,
                        Some(Ok(_)) => return Err(End::Protocol("expected Subscribe")),
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err(End::Eof),
                    },
                };
                self.subscribe(&mut writer, (&name, session), &names)
                    .await?;
            }
        }

        // Then whatever waited for this peer while it was away.
        let waiting = self.shared.mailbox.waiting_for(self.id);
        match waiting {
            Ok((held, notices)) => {
                for message in held {
                    self.write(&mut writer, FromTracker::Held(message)).await?;
                }
                for notice in notices {
                    self.write(&mut writer, FromTracker::Notice(notice)).await?;
                }
            }
            Err(e) => warn!(error = %e, "cannot read the mailbox"),
        }

        // The list pages may have grown the write buffer to a page's size;
        // from here on an online peer only gets small presence frames and
        // sends small requests, so give that memory back.
        *writer.write_buffer_mut() = BytesMut::new();
        if reader.read_buffer().is_empty() {
            *reader.read_buffer_mut() = BytesMut::new();
        }
        Ok(Online {
            reader,
            writer,
            name,
            session,
            feed: joined.feed,
            replaced: joined.replaced,
            inbox: joined.inbox,
            requests: Bucket::new(REQUEST_RATE, REQUEST_BURST),
        })
    }

    /// Serves an enrolled peer until the session ends. This future lives as
    /// long as the peer is online, so it stays small: it only waits, and the
    /// work each wake-up brings runs in a short-lived future of its own.
    async fn serve_online(
        &mut self,
        mut online: Online,
        shutdown: CancellationToken,
    ) -> Result<(), End> {
        // Presence is coalesced: the first change opens a window (the
        // feed's, see Feed::window) during which this task does not wake for
        // presence at all; then everything queued goes out in one flush.
        let coalesce = online.feed.window();
        let mut first = None;
        let mut window: Option<Pin<Box<Sleep>>> = None;
        // Relay circuits this peer asked for; they end with the session.
        let mut circuits = JoinSet::new();
        loop {
            let wake = tokio::select! {
                frame = online.reader.next() => Wake::Frame(frame),
                change = online.feed.recv(), if window.is_none() => {
                    if coalesce.is_zero() {
                        Wake::Presence(change)
                    } else {
                        window = Some(Box::pin(tokio::time::sleep(coalesce)));
                        first = Some(change);
                        continue;
                    }
                }
                () = elapsed(&mut window) => {
                    window = None;
                    match first.take() {
                        Some(change) => Wake::Presence(change),
                        None => continue,
                    }
                }
                // Closed only when the session ends anyway.
                Ok(frame) = online.inbox.recv() => {
                    // A frame from another session may follow from a change
                    // still queued for this peer (a receipt from a peer whose
                    // arrival it has not heard yet): the queued presence goes
                    // first, the window closing early.
                    window = None;
                    if let Some(change) = first.take().or_else(|| online.feed.try_recv()) {
                        let presence = Wake::Presence(change);
                        if let ControlFlow::Break(()) =
                            Box::pin(self.handle(&mut online, presence)).await?
                        {
                            return Ok(());
                        }
                    }
                    Wake::Direct(frame)
                }
                stream = self.conn.accept_bi() => {
                    let (send, recv) = stream?;
                    let me = (online.name.clone(), self.id);
                    circuits.spawn(serve_circuit(self.shared.clone(), me, send, recv));
                    continue;
                }
                Some(_) = circuits.join_next(), if !circuits.is_empty() => continue,
                () = online.replaced.cancelled() => Wake::Replaced,
                () = shutdown.cancelled() => return Err(End::Shutdown),
                e = self.conn.closed() => return Err(e.into()),
            };
            if let ControlFlow::Break(()) = Box::pin(self.handle(&mut online, wake)).await? {
                return Ok(());
            }
        }
    }

    /// Does what one wake-up of [`Session::serve_online`] brought; `Break`
    /// when the peer logged out.
    async fn handle(&mut self, online: &mut Online, wake: Wake) -> Result<ControlFlow<()>, End> {
        let writer = &mut online.writer;
        match wake {
            Wake::Frame(Some(Ok(frame))) => return self.request(online, frame).await,
            Wake::Frame(Some(Err(e))) => return Err(e.into()),
            Wake::Frame(None) => return Err(End::Eof),
            Wake::Presence(first) => {
                let forwarded = self.forward_presence(writer, &mut online.feed, first).await;
                if let Err(Forward::Feed(FeedEnd::Closed)) = forwarded
                    && online.replaced.is_cancelled()
                {
                    return self.replaced(writer).await;
                }
                forwarded.map_err(End::from)?;
            }
            Wake::Direct(frame) => self.write(writer, frame).await?,
            Wake::Replaced => return self.replaced(writer).await,
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Answers one request of an enrolled peer; `Break` after `Logout`.
    async fn request(
        &mut self,
        online: &mut Online,
        frame: ToTracker,
    ) -> Result<ControlFlow<()>, End> {
        let receipt = matches!(
            frame,
            ToTracker::HeldReceived { .. }
                | ToTracker::HeldRejected { .. }
                | ToTracker::NoticeSeen { .. }
        );
        if !receipt {
            let wait = online.requests.take(1);
            if !wait.is_zero() {
                debug!(?wait, "pacing a peer that asks faster than REQUEST_RATE");
                tokio::time::sleep(wait).await;
            }
        }
        let (name, session, writer) = (&online.name, online.session, &mut online.writer);
        let reply = match frame {
            ToTracker::Lookup { req, name } => {
                let peer = self.shared.registry.lookup(&name);
                Some(FromTracker::LookupReply { req, peer })
            }
            ToTracker::Subscribe { names } => {
                self.subscribe(writer, (name, session), &names).await?;
                None
            }
            ToTracker::Unsubscribe { names } => {
                self.shared.registry.unsubscribe(name, session, &names);
                None
            }
            ToTracker::ListPage { req, after, limit } => {
                let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                let (peers, more) = self.shared.registry.page(after.as_ref(), limit);
                Some(FromTracker::ListPageReply { req, peers, more })
            }
            ToTracker::Logout => {
                self.goodbye(writer).await?;
                return Ok(ControlFlow::Break(()));
            }
            ToTracker::Connect { to } => self.punch(name, &to),
            frame @ (ToTracker::PublishSealKey(_)
            | ToTracker::SealKeyOf { .. }
            | ToTracker::Hold { .. }
            | ToTracker::HeldReceived { .. }
            | ToTracker::HeldRejected { .. }
            | ToTracker::NoticeSeen { .. }) => self.mail(name, frame)?,
            _ => return Err(End::Protocol("enrollment frame after enrollment")),
        };
        if let Some(reply) = reply {
            self.write(writer, reply).await?;
        }
        Ok(ControlFlow::Continue(()))
    }

    /// The mailbox requests of an enrolled peer: sealing keys, held
    /// messages, receipts and notices. Returns the reply, if there is one.
    fn mail(&self, me: &Name, frame: ToTracker) -> Result<Option<FromTracker>, End> {
        let mailbox = &self.shared.mailbox;
        let now = now_secs();
        let logged = |e: crate::store::StoreError| warn!(error = %e, "mailbox storage failed");
        match frame {
            ToTracker::PublishSealKey(signed) => {
                if !tincan_proto::seal::verify_seal_key(self.id, &signed) {
                    return Err(End::Protocol("sealing key not signed by the peer's key"));
                }
                mailbox
                    .publish_seal_key(self.id, &signed)
                    .unwrap_or_else(logged);
                Ok(None)
            }
            ToTracker::SealKeyOf { req, name } => {
                let entry = match self.shared.names.bound(&name) {
                    Ok(Some((name, id))) => mailbox
                        .seal_key(id)
                        .unwrap_or_else(|e| {
                            logged(e);
                            None
                        })
                        .map(|seal| SealKeyEntry { name, id, seal }),
                    Ok(None) => None,
                    Err(e) => {
                        logged(e);
                        None
                    }
                };
                Ok(Some(FromTracker::SealKeyReply { req, entry }))
            }
            ToTracker::Hold {
                to,
                to_id,
                id,
                sealed,
            } => {
                let result = match self.shared.names.bound(&to) {
                    Ok(None) => HoldResult::UnknownName,
                    Ok(Some((_, bound))) if bound != to_id => HoldResult::KeyMismatch,
                    Ok(Some((to, _))) => mailbox
                        .hold(me, self.id, &to, to_id, id, &sealed, now)
                        .unwrap_or_else(|e| {
                            logged(e);
                            HoldResult::Unavailable
                        }),
                    Err(e) => {
                        logged(e);
                        HoldResult::Unavailable
                    }
                };
                if let HoldResult::Held { .. } = result {
                    debug!(to = %to, "holding a sealed message");
                    // The recipient may have come online meanwhile.
                    let held = HeldMessage {
                        from: me.clone(),
                        from_id: self.id,
                        id,
                        stored_at: now,
                        sealed,
                    };
                    self.shared.registry.push(&to_id, FromTracker::Held(held));
                }
                Ok(Some(FromTracker::HoldReply { id, result }))
            }
            ToTracker::HeldReceived {
                id,
                from_id,
                receipt,
            } => {
                self.settle_held(
                    from_id,
                    id,
                    NoticeKind::Delivered {
                        by: self.id,
                        receipt,
                    },
                );
                Ok(None)
            }
            ToTracker::HeldRejected { id, from_id } => {
                self.settle_held(from_id, id, NoticeKind::Rejected);
                Ok(None)
            }
            ToTracker::NoticeSeen { id } => {
                mailbox.notice_seen(self.id, id).unwrap_or_else(logged);
                Ok(None)
            }
            _ => Err(End::Protocol("not a mailbox request")),
        }
    }

    /// The recipient dealt with a held message: drop it, and tell its
    /// sender (now if online, else at its next enrollment).
    fn settle_held(&self, sender: PeerId, id: MessageId, kind: NoticeKind) {
        let mailbox = &self.shared.mailbox;
        match mailbox.take(self.id, sender, id) {
            Ok(Some(to)) => {
                let notice = Notice { id, to, kind };
                if let Err(e) = mailbox.add_notice(sender, &notice, now_secs()) {
                    warn!(error = %e, "cannot store a notice");
                }
                self.shared
                    .registry
                    .push(&sender, FromTracker::Notice(notice));
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "mailbox storage failed"),
        }
    }

    /// Coordinates a hole punch between this peer and `to`: tells `to` to
    /// dial us and returns the frame that tells us to dial it, each delayed
    /// so both first packets leave together.
    fn punch(&self, me: &Name, to: &Name) -> Option<FromTracker> {
        let (target, target_conn) = self.shared.registry.online_peer(to)?;
        if target.id == self.id {
            return None;
        }
        let me = self
            .shared
            .registry
            .lookup(me)
            .filter(|me| me.id == self.id)?;
        let (mine, theirs) = punch_delays(self.conn.rtt(), target_conn.rtt());
        debug!(%to, mine, theirs, "coordinating a hole punch");
        let tell_them = FromTracker::Punch {
            peer: me,
            delay_ms: theirs,
        };
        if !self.shared.registry.push(&target.id, tell_them) {
            return None;
        }
        Some(FromTracker::Punch {
            peer: target,
            delay_ms: mine,
        })
    }

    /// Writes `frames`, and with `flush` sends them with a single flush
    /// (without, they leave with the next write that flushes), bounded by
    /// [`WRITE_TIMEOUT`].
    async fn write_all(
        &self,
        writer: &mut Writer,
        frames: impl IntoIterator<Item = FromTracker>,
        flush: bool,
    ) -> Result<(), End> {
        let write = async {
            for frame in frames {
                writer.feed(frame).await?;
            }
            if flush {
                SinkExt::<FromTracker>::flush(writer).await?;
            }
            Ok::<_, FrameError>(())
        };
        match timeout(WRITE_TIMEOUT, write).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(End::Lagging),
        }
    }

    /// Writes one frame (or an already encoded one), bounded by [`WRITE_TIMEOUT`].
    async fn write<T>(&self, writer: &mut Writer, frame: T) -> Result<(), End>
    where
        Writer: futures_util::Sink<T, Error = FrameError>,
    {
        match timeout(WRITE_TIMEOUT, writer.send(frame)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(End::Lagging),
        }
    }

    /// Forwards `first` and every change queued behind it with a single
    /// flush: one QUIC write (and usually one packet) per peer per
    /// coalescing window ([`Feed::window`]), however many peers joined in it.
    async fn forward_presence(
        &self,
        writer: &mut Writer,
        feed: &mut Feed,
        first: Result<Encoded<FromTracker>, FeedEnd>,
    ) -> Result<(), Forward> {
        let mut next = Some(first);
        let mut fed = 0;
        while let Some(frame) = next.take() {
            let frame = frame.inspect_err(|end| {
                if *end == FeedEnd::Lagged {
                    warn!("peer fell behind on presence");
                }
            })?;
            match timeout(WRITE_TIMEOUT, writer.feed(frame)).await {
                Ok(result) => result.map_err(|e| Forward::Write(e.into()))?,
                Err(_) => return Err(Forward::Write(End::Lagging)),
            }
            fed += 1;
            // Bounded by PRESENCE_BACKLOG: past it the feed reports the end.
            next = feed.try_recv();
        }
        if fed > 0 {
            let flush = SinkExt::<Encoded<FromTracker>>::flush(writer);
            match timeout(WRITE_TIMEOUT, flush).await {
                Ok(result) => result.map_err(|e| Forward::Write(e.into()))?,
                Err(_) => return Err(Forward::Write(End::Lagging)),
            }
        }
        Ok(())
    }

    /// Registers what `me` (its name and session) now follows, and answers
    /// with the online entries among `names`, in pages.
    async fn subscribe(
        &self,
        writer: &mut Writer,
        me: (&Name, SessionId),
        names: &[Name],
    ) -> Result<(), End> {
        let online = self.shared.registry.subscribe(me.0, me.1, names)?;
        self.write_pages(writer, online, |peers, last| FromTracker::Subscribed {
            peers,
            last,
        })
        .await
    }

    /// Writes `peers` in pages of at most [`LIST_PAGE`] entries (one empty
    /// page when there are none), the last one marked.
    async fn write_pages(
        &self,
        writer: &mut Writer,
        mut peers: Vec<PeerInfo>,
        page: impl Fn(Vec<PeerInfo>, bool) -> FromTracker,
    ) -> Result<(), End> {
        loop {
            let rest = peers.split_off(peers.len().min(LIST_PAGE));
            let last = rest.is_empty();
            self.write(writer, page(peers, last)).await?;
            if last {
                return Ok(());
            }
            peers = rest;
        }
    }

    /// A newer session of the same key took over: say so (best effort: the
    /// peer may already be gone; the close code says it too) and end.
    async fn replaced<T>(&mut self, writer: &mut Writer) -> Result<T, End> {
        self.name = None;
        let _ = self.finish(writer, FromTracker::Replaced).await;
        Err(End::Replaced)
    }

    /// Sends the last frame, then gives the peer [`LINGER`] to read it and
    /// close the connection itself.
    async fn finish(&self, writer: &mut Writer, last: FromTracker) -> Result<(), End> {
        self.write(writer, last).await?;
        let _ = writer.get_mut().finish();
        let _ = timeout(LINGER, self.conn.closed()).await;
        Ok(())
    }

    /// Refuses the enrollment: sends `Reject` and ends the session.
    async fn reject<T>(&self, writer: &mut Writer, reason: RejectReason) -> Result<T, End> {
        info!(%reason, "enrollment rejected");
        self.finish(writer, FromTracker::Reject { reason }).await?;
        Err(End::Rejected(reason))
    }

    async fn goodbye(&mut self, writer: &mut Writer) -> Result<(), End> {
        if let Some((name, session)) = self.name.take() {
            self.leave(&name, session);
        }
        self.finish(writer, FromTracker::Goodbye).await?;
        self.conn.close(close::NORMAL.into(), b"goodbye");
        Ok(())
    }
}

/// Waits for `timer` to fire, or forever when there is none.
async fn elapsed(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => std::future::pending().await,
    }
}

/// What the name store said of this key taking a name, as the peer is told.
fn name_verdict(verdict: Verdict) -> Result<(), RejectReason> {
    match verdict {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(RejectReason::NameBound),
        Err(e) => {
            warn!(error = %e, "name store failed");
            Err(RejectReason::Unavailable)
        }
    }
}

/// One enrollment step, bounded by [`ENROLL_STEP_TIMEOUT`].
async fn step<T>(what: &'static str, fut: impl Future<Output = T>) -> Result<T, End> {
    timeout(ENROLL_STEP_TIMEOUT, fut)
        .await
        .map_err(|_| End::Timeout(what))
}
