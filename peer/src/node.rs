//! [`Node`]: the cloneable handle a front end drives, and the state its
//! tasks share. Sending lives in [`crate::outbox`], receiving in
//! [`crate::links`] (direct) and [`crate::mail`] (held by the tracker).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use quinn::Endpoint;
use tincan_proto::{
    MAX_BODY_LEN, MessageId, Name, NameError, PeerId,
    seal::{SealKeys, sign_seal_key},
    tls::Identity,
    tracker::{PeerInfo, SignedSealKey},
};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    directory::{Directory, PresenceMode},
    event::{Event, Path, Shown},
    links::{self, Links},
    mail, net,
    outbox::{self, Conversation, Outgoing},
    store::{HistoryEntry, Incoming, KeyCheck, Pending, ShownMessage, Store, StoreError, now_ms},
    tracker_client::{self, Command, EnrollError, Enrolled, ListError},
};

/// Events waiting for the front end; when it falls behind, incoming
/// messages wait (QUIC flow control pushes back on the sender), nothing is dropped.
pub const EVENT_QUEUE: usize = 1024;
/// Messages of ours awaiting their final state at once; `send` waits beyond.
pub const MAX_IN_FLIGHT: usize = 4096;

/// How a node is set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    pub name: Name,
    /// `host:port` of the tracker, as the user gave it.
    pub tracker: String,
    /// The tracker key to insist on; otherwise the key pinned on first contact.
    pub tracker_key: Option<PeerId>,
    /// Holds `identity.key`, `seal.key` and `peer.db`.
    pub data_dir: PathBuf,
    /// Local UDP address of the node's one endpoint.
    pub bind: SocketAddr,
    /// Seal messages for offline (or unreachable) recipients and leave them
    /// with the tracker; when false, the classic immediate bounce.
    pub offline_delivery: bool,
    /// Send only through relay circuits: never dial peers directly (hides
    /// this peer's address from the people it writes to).
    pub relay_only: bool,
    /// Longest a write to `peer.db` waits to be committed with others.
    pub store_linger: Duration,
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
            offline_delivery: true,
            relay_only: false,
            store_linger: crate::store::STORE_LINGER,
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
    Seal(#[from] tincan_proto::seal::SealError),
    #[error(transparent)]
    Store(#[from] StoreError),
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
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// What this peer knows of a name's key (`/verify NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key trusted for the name (pinned at first contact, or accepted).
    pub pinned: Option<PeerId>,
    /// A different key the tracker announced, waiting for `/accept`.
    pub pending: Option<PeerId>,
    /// The key the tracker announces for the name now, if it is online.
    pub announced: Option<PeerId>,
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
    pub(crate) seal: SealKeys,
    pub(crate) signed_seal: SignedSealKey,
    pub(crate) endpoint: Endpoint,
    pub(crate) local_addr: SocketAddr,
    pub(crate) links: Links,
    pub(crate) tasks: TaskTracker,
    pub(crate) cancel: CancellationToken,
    pub(crate) store: Store,
    directory: Mutex<Directory>,
    events: mpsc::Sender<Event>,
    pub(crate) tracker: mpsc::Sender<Command>,
    tracker_pin: Mutex<Option<PeerId>>,
    /// Whether the node is enrolled with the tracker right now.
    pub(crate) tracker_up: watch::Sender<bool>,
    /// The current tracker connection (for relay circuits), if enrolled.
    pub(crate) tracker_conn: Mutex<Option<quinn::Connection>>,
    /// Where the tracker last saw our packets come from (`Welcome`).
    observed: Mutex<Option<SocketAddr>>,
    pub(crate) in_flight: Arc<Semaphore>,
    /// Destination name key → its conversation.
    pub(crate) conversations: Mutex<HashMap<String, Arc<Conversation>>>,
    pub(crate) next_generation: AtomicU64,
    /// Held messages and notices from the tracker, handled in order by one task.
    pub(crate) mail: mpsc::Sender<mail::Mail>,
}

impl Inner {
    pub(crate) fn directory(&self) -> MutexGuard<'_, Directory> {
        self.directory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the front end keeps up: at least half of [`EVENT_QUEUE`] free.
    pub(crate) fn front_end_keeps_up(&self) -> bool {
        self.events.capacity() >= EVENT_QUEUE / 2
    }

    pub(crate) async fn emit(&self, event: Event) {
        // Only fails when the front end is gone, and then nobody is listening.
        let _ = self.events.send(event).await;
    }

    /// An incoming message (direct, relayed or held): shown once. Hands it
    /// to the front end and returns what must complete before it is
    /// acknowledged: the user has seen it (its row is then written in the
    /// next group commit). A message shown before is acknowledged at once.
    pub(crate) async fn take_incoming(
        self: &Arc<Self>,
        from_id: PeerId,
        from: &Name,
        id: MessageId,
        text: String,
        sent_at_ms: u64,
        path: Path,
    ) -> Result<BoxFuture<'static, ()>, StoreError> {
        match self.store.receive(from_id, id)? {
            Incoming::Shown => return Ok(Box::pin(std::future::ready(()))),
            Incoming::Showing(first_copy) => {
                return Ok(Box::pin(async move {
                    let _ = first_copy.await;
                }));
            }
            Incoming::New | Incoming::NotShown => {}
        }
        let row = ShownMessage {
            from_id,
            from: from.clone(),
            id,
            body: text.clone(),
            sent_at_ms,
            received_ms: now_ms(),
            path: path.as_str(),
        };
        let recorder = self.clone();
        let (shown, on_screen) = Shown::new(move || recorder.store.mark_shown(row));
        self.emit(Event::Message {
            from: from.clone(),
            text,
            id,
            path,
            sent_at_ms,
            shown,
        })
        .await;
        Ok(Box::pin(async move {
            let _ = on_screen.await;
        }))
    }

    pub(crate) fn tracker_pin(&self) -> Option<PeerId> {
        *self.tracker_pin.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn tracker_conn(&self) -> Option<quinn::Connection> {
        self.tracker_conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|c| c.close_reason().is_none())
    }

    pub(crate) fn set_tracker_conn(&self, conn: Option<quinn::Connection>) {
        *self.tracker_conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }

    /// Our address as the tracker last saw it, once enrolled.
    pub(crate) fn observed(&self) -> Option<SocketAddr> {
        *self.observed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Round-trip time to the tracker, while enrolled.
    pub(crate) fn tracker_rtt(&self) -> Option<Duration> {
        self.tracker_conn().map(|c| c.rtt())
    }

    pub(crate) fn next_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Trust on first use: pins a name's first key, and warns (once per
    /// sighting) when the tracker announces another. Returns whether `key`
    /// is the trusted key for `name`.
    pub(crate) async fn observe_key(&self, name: &Name, key: PeerId) -> bool {
        if *name == self.config.name && key == self.identity.id() {
            return true;
        }
        match self.store.check_key(name, key) {
            KeyCheck::FirstSeen | KeyCheck::Known => true,
            KeyCheck::Changed { pinned } => {
                warn!(%name, pinned = %pinned.short(), announced = %key.short(), "key changed");
                self.emit(Event::KeyChanged {
                    name: name.clone(),
                    pinned,
                    announced: key,
                })
                .await;
                false
            }
        }
    }

    /// Whether `name` is bound to `key`: by the client list (or else by
    /// asking the tracker: a newcomer may dial before its join reaches us),
    /// and by the key this peer pinned for the name.
    pub(crate) async fn authorize(&self, name: &Name, key: PeerId) -> bool {
        let listed = self.directory().get(name).map(|i| i.id);
        let bound = match listed {
            Some(id) => id == key,
            None => match self.lookup(name).await {
                Ok(Some(info)) if info.id == key => {
                    self.learned(info).await;
                    true
                }
                Ok(_) => false,
                // The tracker is away: a key this peer pinned for the name
                // before is still good.
                Err(()) => self.store.pinned_key(name) == Some(key),
            },
        };
        bound && self.observe_key(name, key).await
    }

    /// A peer a lookup found online (from the lookup's answer, or from the
    /// `Subscribed` state that follows it, whichever comes first), put on
    /// the client list. If it was not there, the user is told it is online
    /// now, before anything it sends is shown (its `Joined` may still be on
    /// its way from the tracker, and will then not be announced twice).
    pub(crate) async fn learned(&self, info: PeerInfo) {
        let (name, id) = (info.name.clone(), info.id);
        let new = self.directory().insert(info);
        if new && name != self.config.name {
            self.emit(Event::Presence {
                name,
                id,
                online: true,
            })
            .await;
        }
    }

    /// Asks the tracker who `name` is; `Err` when the tracker is unavailable.
    pub(crate) async fn lookup(&self, name: &Name) -> Result<Option<PeerInfo>, ()> {
        if !*self.tracker_up.borrow() {
            return Err(());
        }
        let (reply, rx) = oneshot::channel();
        self.tracker
            .send(Command::Lookup {
                name: name.clone(),
                reply,
            })
            .await
            .map_err(|_| ())?;
        tokio::time::timeout(tracker_client::LOOKUP_TIMEOUT, rx)
            .await
            .map_err(|_| ())?
            .map_err(|_| ())
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
        if first_contact || self.config.tracker_key.is_some() {
            if let Err(e) = self
                .store
                .pin_tracker_key(&self.config.tracker, enrolled.tracker_id)
                .await
            {
                warn!(error = %e, "cannot save the tracker key");
            }
            info!(tracker = %self.config.tracker, key = %enrolled.tracker_id.short(), "pinned tracker key");
        }
        self.set_tracker_conn(Some(enrolled.connection()));
        *self.observed.lock().unwrap_or_else(|p| p.into_inner()) = Some(enrolled.observed);
        let changes = self.directory().replace(
            enrolled.presence,
            &enrolled.followed,
            enrolled.peers.clone(),
        );
        for peer in &enrolled.peers {
            self.observe_key(&peer.name, peer.id).await;
        }
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
        self.tracker_up.send_replace(true);
    }
}

/// A running peer. Cheap to clone; every clone drives the same node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// Loads the identity and database, binds the endpoint and enrolls with
    /// the tracker (bounded wait), then resumes any unfinished messages.
    /// Events arrive on the returned channel.
    pub async fn start(config: Config) -> Result<(Self, mpsc::Receiver<Event>), StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let store = Store::open(&config.data_dir.join("peer.db"), config.store_linger)?;
        let identity = Identity::load_or_create(&config.data_dir.join("identity.key"))?;
        let seal = SealKeys::load_or_create(&config.data_dir.join("seal.key"))?;
        let signed_seal = sign_seal_key(&identity, &seal)?;
        let pin = match config.tracker_key {
            Some(key) => Some(key),
            None => store.tracker_key(&config.tracker)?,
        };
        let endpoint = net::endpoint(&identity, config.bind)?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| net::NetError::Bind {
                addr: config.bind,
                source,
            })?;
        let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (tracker, commands) = mpsc::channel(tracker_client::COMMAND_QUEUE);
        let (mail_tx, mail_rx) = mpsc::channel(mail::MAIL_QUEUE);
        let inner = Arc::new(Inner {
            config,
            identity,
            seal,
            signed_seal,
            endpoint,
            local_addr,
            links: Links::default(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            store,
            directory: Mutex::default(),
            events,
            tracker,
            tracker_pin: Mutex::new(pin),
            tracker_up: watch::Sender::new(false),
            tracker_conn: Mutex::new(None),
            observed: Mutex::new(None),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            conversations: Mutex::default(),
            next_generation: AtomicU64::new(0),
            mail: mail_tx,
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
        inner.tasks.spawn(mail::run(inner.clone(), mail_rx));
        let pending = inner.store.outbox().await?;
        if !pending.is_empty() {
            info!(count = pending.len(), "resuming unfinished messages");
            inner.tasks.spawn(outbox::resume(inner.clone(), pending));
        }
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
    /// (sent, held, delivered, undeliverable) arrives as events. Its row
    /// (state `queued`) reaches `peer.db` in the next group commit, at most
    /// [`crate::store::STORE_LINGER`] later, while the message is already
    /// on its way. Waits only when [`MAX_IN_FLIGHT`] messages are on their way.
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
        let id = MessageId::generate();
        let sent_at_ms = now_ms();
        self.inner.store.queue(id, &to, text, sent_at_ms)?;
        let msg = Outgoing::new(id, to.clone(), text.to_owned(), sent_at_ms, permit);
        if let Err(msg) = self.inner.send_now(msg).await {
            self.inner.enqueue(&to, msg).await?;
        }
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

    /// How the tracker tells this peer who is online, and in subscribe
    /// mode the names it follows (`peers` holds the online ones among them).
    pub fn presence(&self) -> (PresenceMode, Vec<Name>) {
        let directory = self.inner.directory();
        (directory.mode(), directory.followed())
    }

    /// One page of everyone online after `after`, in name order: at most
    /// `limit` entries (capped at `LIST_PAGE`), and whether more follow.
    pub async fn list_page(
        &self,
        after: Option<Name>,
        limit: usize,
    ) -> Result<(Vec<PeerInfo>, bool), ListError> {
        tracker_client::list_page(&self.inner, after, limit).await
    }

    /// The last `limit` messages exchanged with `with`, oldest first.
    pub async fn history(&self, with: &str, limit: usize) -> Result<Vec<HistoryEntry>, SendError> {
        let with = Name::parse(with)?;
        Ok(self.inner.store.history(&with, limit).await?)
    }

    /// Messages not yet delivered or undeliverable.
    pub async fn outbox(&self) -> Result<Vec<Pending>, StoreError> {
        self.inner.store.outbox().await
    }

    /// The keys this peer knows for `name`: pinned, waiting, announced.
    pub fn key_info(&self, name: &str) -> Result<KeyInfo, NameError> {
        let name = Name::parse(name)?;
        let (pinned, pending) = self.inner.store.key_status(&name);
        let announced = self.inner.directory().get(&name).map(|i| i.id);
        Ok(KeyInfo {
            pinned,
            pending,
            announced,
        })
    }

    /// Trusts the new key the tracker announced for `name` (after the user
    /// checked it); returns it, or `None` if no change was pending.
    pub async fn accept_key(&self, name: &str) -> Result<Option<PeerId>, SendError> {
        let name = Name::parse(name)?;
        Ok(self.inner.store.accept_key(&name).await?)
    }

    /// Waits (at most `max`) until every message sent so far has reached a
    /// final state or was left with the tracker.
    pub async fn settle(&self, max: Duration) {
        let all = u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(max, self.inner.in_flight.acquire_many(all)).await;
    }

    /// Messages sent and not yet final or left with the tracker.
    pub fn unfinished(&self) -> usize {
        MAX_IN_FLIGHT.saturating_sub(self.inner.in_flight.available_permits())
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

    /// Stops everything without telling the tracker. Unfinished messages
    /// stay in `peer.db` and are resent at the next start.
    pub async fn shutdown(&self) {
        const TASKS_GRACE: Duration = Duration::from_secs(2);
        const CLOSE_GRACE: Duration = Duration::from_secs(1);
        let started = Instant::now();
        self.inner.cancel.cancel();
        self.inner.links.close_all();
        self.inner
            .endpoint
            .close(tincan_proto::close::NORMAL.into(), b"bye");
        self.inner.tasks.close();
        let _ = tokio::time::timeout(TASKS_GRACE, self.inner.tasks.wait()).await;
        let _ = tokio::time::timeout(CLOSE_GRACE, self.inner.endpoint.wait_idle()).await;
        // Everything recorded so far reaches the disk.
        self.inner.store.close().await;
        tracing::debug!(took = ?started.elapsed(), "stopped");
    }
}
