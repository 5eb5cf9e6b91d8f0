//! [`Node`]: the cloneable handle a front end drives, and the state its
//! tasks share.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::future::BoxFuture;
use quinn::Endpoint;
use tincan_proto::{
    MAX_BODY_LEN, MessageId, Name, NameError, PeerId, peer::ToReceiver, tls::Identity,
    tracker::PeerInfo,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    directory::Directory,
    event::{Event, Path},
    links::{self, LinkError, Links, Seen},
    net,
    store::Store,
    tracker_client::{self, Command, EnrollError, Enrolled},
};

/// Events waiting for the front end; when it falls behind, incoming
/// messages wait (QUIC flow control pushes back on the sender), nothing is dropped.
pub const EVENT_QUEUE: usize = 1024;
/// Messages of ours awaiting their final state at once; `send` waits beyond.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Longest wait for a message's acknowledgement once it was sent.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Links one message is written to, at most, when links break under it.
pub const SEND_ATTEMPTS: usize = 3;

/// Messages queued for one destination before `send` waits.
pub const CONVERSATION_QUEUE: usize = 1024;
/// A conversation with nothing to send for this long stops its task.
pub const CONVERSATION_IDLE: Duration = Duration::from_secs(60);

/// A message on its way: queued, written to a link, or awaiting its ack.
struct Outgoing {
    id: MessageId,
    body: String,
    sent_at_ms: u64,
    queued_at: Instant,
    /// Links it has been written to so far.
    attempts: usize,
    /// Whether the user was told it left this machine.
    announced: bool,
    /// Counts toward [`MAX_IN_FLIGHT`] until the message's final state.
    _in_flight: OwnedSemaphorePermit,
}

/// How a node is set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    pub name: Name,
    /// `host:port` of the tracker, as the user gave it.
    pub tracker: String,
    /// The tracker key to insist on; otherwise the key pinned on first contact.
    pub tracker_key: Option<PeerId>,
    /// Holds `identity.key` and `peer.db`.
    pub data_dir: PathBuf,
    /// Local UDP address of the node's one endpoint.
    pub bind: SocketAddr,
}

impl Config {
    /// A node named `name` using the tracker at `tracker` (`host:port`),
    /// keeping its files in `data_dir`, on an ephemeral UDP port.
    pub fn new(name: Name, tracker: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            name,
            tracker: tracker.into(),
            tracker_key: None,
            data_dir: data_dir.into(),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

/// The node could not start.
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
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

/// A message was not accepted for sending; nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    #[error("message is {len} bytes; the limit is {MAX_BODY_LEN}")]
    TooLarge { len: usize },
    #[error("message is empty")]
    Empty,
    #[error("that is your own name")]
    ToSelf,
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// One row of `/who`.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub info: PeerInfo,
    pub me: bool,
    /// The live direct link, if any: its path and round-trip time.
    pub link: Option<(Path, Duration)>,
}

/// State shared by the node's tasks.
pub struct Inner {
    pub(crate) config: Config,
    pub(crate) identity: Identity,
    pub(crate) endpoint: Endpoint,
    pub(crate) local_addr: SocketAddr,
    pub(crate) links: Links,
    pub(crate) tasks: TaskTracker,
    pub(crate) cancel: CancellationToken,
    store: Store,
    directory: Mutex<Directory>,
    seen: Mutex<Seen>,
    events: mpsc::Sender<Event>,
    tracker: mpsc::Sender<Command>,
    tracker_pin: Mutex<Option<PeerId>>,
    in_flight: Arc<Semaphore>,
    /// Destination name key → (task generation, its queue).
    conversations: Mutex<HashMap<String, (u64, mpsc::Sender<Outgoing>)>>,
    next_generation: AtomicU64,
}

impl Inner {
    pub(crate) fn directory(&self) -> MutexGuard<'_, Directory> {
        self.directory.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) async fn emit(&self, event: Event) {
        // Only fails when the front end is gone, and then nobody is listening.
        let _ = self.events.send(event).await;
    }

    /// True the first time `id` is seen: the message should be shown.
    pub(crate) fn seen(&self, id: MessageId) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
    }

    pub(crate) fn tracker_pin(&self) -> Option<PeerId> {
        *self.tracker_pin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` is bound to `key`: by the client list, or else by
    /// asking the tracker (a newcomer may dial before its join reaches us).
    pub(crate) async fn authorize(&self, name: &Name, key: PeerId) -> bool {
        if let Some(info) = self.directory().get(name) {
            return info.id == key;
        }
        match self.lookup(name).await {
            Some(info) if info.id == key => {
                self.directory().insert(info);
                true
            }
            _ => false,
        }
    }

    async fn lookup(&self, name: &Name) -> Option<PeerInfo> {
        let (reply, rx) = oneshot::channel();
        self.tracker
            .send(Command::Lookup {
                name: name.clone(),
                reply,
            })
            .await
            .ok()?;
        tokio::time::timeout(tracker_client::LOOKUP_TIMEOUT, rx)
            .await
            .ok()?
            .ok()?
    }

    /// Records a (re-)enrollment: pins the tracker key on first contact,
    /// replaces the client list, tells the user what changed.
    pub(crate) async fn on_enrolled(&self, enrolled: &Enrolled, again: bool) {
        let first_contact = {
            let mut pin = self.tracker_pin.lock().unwrap_or_else(|p| p.into_inner());
            let first = pin.is_none();
            *pin = Some(enrolled.tracker_id);
            first
        };
        if first_contact {
            if let Err(e) = self
                .store
                .pin_tracker_key(&self.config.tracker, enrolled.tracker_id)
            {
                warn!(error = %e, "cannot save the tracker key");
            }
            info!(tracker = %self.config.tracker, key = %enrolled.tracker_id.short(), "pinned tracker key");
        }
        let changes = self.directory().replace(enrolled.peers.clone());
        self.emit(Event::Enrolled {
            name: self.config.name.clone(),
            id: self.identity.id(),
            tracker: self.config.tracker.clone(),
            observed: enrolled.observed,
        })
        .await;
        self.emit(Event::ClientList {
            peers: enrolled.peers.clone(),
        })
        .await;
        // After a reconnection, say who came and went while we were away.
        for (name, id, online) in changes.into_iter().filter(|_| again) {
            if name == self.config.name {
                continue;
            }
            if !online {
                self.links.forget(&id);
            }
            self.emit(Event::Presence { name, id, online }).await;
        }
    }

    /// Puts a message on its destination's conversation queue, starting
    /// the conversation task if there is none.
    async fn enqueue(self: &Arc<Self>, to: &Name, mut msg: Outgoing) -> Result<(), SendError> {
        // A conversation task may stop (idle) between our lookup and our
        // send; then the message comes back and a fresh task is started.
        for _ in 0..3 {
            let (generation, tx) = {
                let mut map = self.conversations.lock().unwrap_or_else(|p| p.into_inner());
                let (generation, tx) = map.entry(to.key()).or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(CONVERSATION_QUEUE);
                    let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                    self.tasks
                        .spawn(self.clone().conversation(to.clone(), generation, rx));
                    (generation, tx)
                });
                (*generation, tx.clone())
            };
            match tx.send(msg).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => {
                    msg = back;
                    let mut map = self.conversations.lock().unwrap_or_else(|p| p.into_inner());
                    if map.get(&to.key()).is_some_and(|(g, _)| *g == generation) {
                        map.remove(&to.key());
                    }
                }
            }
        }
        Err(SendError::ShuttingDown)
    }

    /// One task per destination sends its messages in the order they were
    /// queued, so a conversation reads in order on the other side.
    async fn conversation(
        self: Arc<Self>,
        to: Name,
        generation: u64,
        mut queue: mpsc::Receiver<Outgoing>,
    ) {
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(CONVERSATION_IDLE, queue.recv()) => next,
                () = self.cancel.cancelled() => return,
            };
            match next {
                Ok(Some(msg)) => self.transmit(&to, msg, &mut queue).await,
                Ok(None) => return,
                Err(_idle) => {
                    let mut map = self.conversations.lock().unwrap_or_else(|p| p.into_inner());
                    if map.get(&to.key()).is_some_and(|(g, _)| *g == generation) {
                        map.remove(&to.key());
                    }
                    // Whatever raced in before the close is still sent.
                    queue.close();
                }
            }
        }
    }

    /// Writes one message to a direct link and leaves its acknowledgement
    /// to a waiter, so the next message goes out without waiting.
    async fn transmit(
        self: &Arc<Self>,
        to: &Name,
        mut msg: Outgoing,
        queue: &mut mpsc::Receiver<Outgoing>,
    ) {
        let Some(info) = self.resolve(to).await else {
            return self
                .undeliverable(to, msg.id, format!("{to} is not logged on"))
                .await;
        };
        let link = match self.links.get_or_dial(self, &info).await {
            Ok(link) => link,
            Err(e) => {
                // Everything already queued behind it would meet the same
                // fate: report it now rather than one dial timeout each.
                let reason = e.to_string();
                self.undeliverable(to, msg.id, reason.clone()).await;
                while let Ok(queued) = queue.try_recv() {
                    self.undeliverable(to, queued.id, reason.clone()).await;
                }
                return;
            }
        };
        msg.attempts += 1;
        let frame = ToReceiver::Msg {
            id: msg.id,
            sent_at_ms: msg.sent_at_ms,
            body: msg.body.clone(),
        };
        let acked = match link.send(self, frame).await {
            Ok(acked) => acked,
            Err(e) => {
                return self
                    .clone()
                    .retry_or_fail(to.clone(), msg, e.to_string())
                    .await;
            }
        };
        if !msg.announced {
            msg.announced = true;
            self.emit(Event::Sent {
                id: msg.id,
                to: to.clone(),
                path: link.path(),
            })
            .await;
        }
        let inner = self.clone();
        let to = to.clone();
        self.tasks.spawn(async move {
            match tokio::time::timeout(ACK_TIMEOUT, acked).await {
                Ok(Ok(Ok(()))) => {
                    inner
                        .emit(Event::Delivered {
                            id: msg.id,
                            to,
                            path: link.path(),
                            rtt: msg.queued_at.elapsed(),
                        })
                        .await;
                }
                Ok(Ok(Err(LinkError::Refused(reason)))) => {
                    inner
                        .undeliverable(&to, msg.id, format!("refused by {to}: {reason}"))
                        .await;
                }
                Ok(Ok(Err(e))) => inner.retry_or_fail(to, msg, e.to_string()).await,
                Ok(Err(_)) => inner.retry_or_fail(to, msg, "link dropped".into()).await,
                Err(_) => {
                    let reason = format!("no acknowledgement within {ACK_TIMEOUT:?}");
                    inner.undeliverable(&to, msg.id, reason).await;
                }
            }
        });
    }

    /// A link broke under a message: send it again (on a fresh link) unless
    /// it has had all its attempts. The receiver shows each id once.
    ///
    /// Boxed: it re-enters `enqueue`, which (through the conversation task)
    /// leads back here, and a recursive future needs a known size.
    fn retry_or_fail(
        self: Arc<Self>,
        to: Name,
        msg: Outgoing,
        error: String,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if msg.attempts >= SEND_ATTEMPTS {
                return self
                    .undeliverable(&to, msg.id, format!("unreachable: {error}"))
                    .await;
            }
            let id = msg.id;
            if self.enqueue(&to, msg).await.is_err() {
                self.undeliverable(&to, id, "the node is shutting down".into())
                    .await;
            }
        })
    }

    async fn undeliverable(&self, to: &Name, id: MessageId, reason: String) {
        self.emit(Event::Undeliverable {
            id,
            to: to.clone(),
            reason,
        })
        .await;
    }

    /// The destination's entry if it is logged on: the client list first,
    /// the tracker if the list does not have it.
    async fn resolve(&self, to: &Name) -> Option<PeerInfo> {
        if let Some(info) = self.directory().get(to).cloned() {
            return Some(info);
        }
        let info = self.lookup(to).await?;
        self.directory().insert(info.clone());
        Some(info)
    }
}

/// A running peer. Cheap to clone; every clone drives the same node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// Loads the identity, binds the endpoint and enrolls with the tracker
    /// (bounded wait). Events arrive on the returned channel.
    pub async fn start(config: Config) -> Result<(Self, mpsc::Receiver<Event>), StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let identity = Identity::load_or_create(&config.data_dir.join("identity.key"))?;
        let store = Store::open(&config.data_dir.join("peer.db"))?;
        let pin = match config.tracker_key {
            Some(key) => Some(key),
            None => store.tracker_key(&config.tracker)?,
        };
        if let Some(key) = config.tracker_key {
            store.pin_tracker_key(&config.tracker, key)?;
        }
        let endpoint = net::endpoint(&identity, config.bind)?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| net::NetError::Bind {
                addr: config.bind,
                source,
            })?;
        let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (tracker, commands) = mpsc::channel(tracker_client::COMMAND_QUEUE);
        let inner = Arc::new(Inner {
            config,
            identity,
            endpoint,
            local_addr,
            links: Links::default(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            store,
            directory: Mutex::default(),
            seen: Mutex::new(Seen::new(links::SEEN_CAPACITY)),
            events,
            tracker,
            tracker_pin: Mutex::new(pin),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            conversations: Mutex::default(),
            next_generation: AtomicU64::new(0),
        });

        let enrolled = match tracker_client::enroll(&inner, pin).await {
            Ok(enrolled) => enrolled,
            Err(e) => {
                inner.endpoint.close(0u32.into(), b"");
                return Err(e.into());
            }
        };
        inner.on_enrolled(&enrolled, false).await;
        inner
            .tasks
            .spawn(tracker_client::run(inner.clone(), enrolled, commands));
        inner.tasks.spawn(links::accept_loop(inner.clone()));
        Ok((Self { inner }, events_rx))
    }

    pub fn id(&self) -> PeerId {
        self.inner.identity.id()
    }

    pub fn name(&self) -> &Name {
        &self.inner.config.name
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Accepts a message for `to` and returns its id at once; its fate
    /// (sent, delivered, undeliverable) arrives as events. Waits only when
    /// [`MAX_IN_FLIGHT`] messages are already on their way.
    pub async fn send(&self, to: &str, text: &str) -> Result<MessageId, SendError> {
        let to = Name::parse(to)?;
        if text.is_empty() {
            return Err(SendError::Empty);
        }
        if text.len() > MAX_BODY_LEN {
            return Err(SendError::TooLarge { len: text.len() });
        }
        if to.key() == self.inner.config.name.key() {
            return Err(SendError::ToSelf);
        }
        if self.inner.cancel.is_cancelled() {
            return Err(SendError::ShuttingDown);
        }
        let permit = self
            .inner
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SendError::ShuttingDown)?;
        let id = MessageId::random();
        let msg = Outgoing {
            id,
            body: text.to_owned(),
            sent_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            queued_at: Instant::now(),
            attempts: 0,
            announced: false,
            _in_flight: permit,
        };
        self.inner.enqueue(&to, msg).await?;
        Ok(id)
    }

    /// Everyone on the client list, with the state of our link to each.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let all = self.inner.directory().all();
        all.into_iter()
            .map(|info| PeerStatus {
                me: info.id == self.id(),
                link: self.inner.links.get(&info.id).map(|l| (l.path(), l.rtt())),
                info,
            })
            .collect()
    }

    /// Waits (at most `max`) until every message sent so far has reached a
    /// final state.
    pub async fn settle(&self, max: Duration) {
        let all = u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(max, self.inner.in_flight.acquire_many(all)).await;
    }

    /// Resolves when the node has stopped (after logout or a fatal event).
    pub async fn stopped(&self) {
        self.inner.cancel.cancelled().await;
    }

    /// Logout → Goodbye with the tracker (bounded), then closes every link
    /// and the endpoint.
    pub async fn logout(&self) {
        let (reply, rx) = oneshot::channel();
        if self
            .inner
            .tracker
            .send(Command::Logout { reply })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(2 * tracker_client::TRACKER_TIMEOUT, rx).await;
        }
        self.shutdown().await;
    }

    /// Stops everything without telling the tracker.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.links.close_all();
        self.inner
            .endpoint
            .close(tincan_proto::close::NORMAL.into(), b"bye");
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.tasks.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }
}
