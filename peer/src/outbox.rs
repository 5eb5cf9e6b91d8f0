//! Sending: one conversation task per destination takes messages in the
//! order they were queued and carries each to a final state.
//!
//! The route for each message, decided when it is its turn:
//! 1. the recipient is online (client list, else a tracker lookup) and its
//!    key is the pinned one → a direct link (dialed if needed); written
//!    there it is `sent`, and a waiter turns the acknowledgement into
//!    `delivered`;
//! 2. the recipient is not logged on, or no direct path came up, or the
//!    link broke under it [`SEND_ATTEMPTS`] times → sealed to the
//!    recipient's published key and left with the tracker (`held`), unless
//!    offline delivery is off, in which case it is `undeliverable` (the
//!    classic bounce);
//! 3. the tracker is needed but away → the message waits in the outbox
//!    (nothing is lost) and the conversation retries when it is back.
//!
//! Every state change is written to `peer.db` before it is announced.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use tincan_proto::{
    MessageId, Name,
    peer::{Refusal, ToReceiver},
    seal::{seal, verify_seal_key},
    tracker::{HoldResult, SealKeyEntry},
};
use tokio::sync::{Mutex as TurnLock, OwnedSemaphorePermit, mpsc, oneshot};
use tracing::{debug, warn};

use crate::{
    delivery::State,
    event::{Event, Path},
    links::{Link, LinkError, OnAck},
    node::{Inner, SendError},
    store::{KeyCheck, Pending, now_ms},
    tracker_client::{Command, TRACKER_TIMEOUT},
};

/// Messages queued for one destination before `send` waits.
pub const CONVERSATION_QUEUE: usize = 1024;
/// A conversation with nothing to send for this long stops its task.
pub const CONVERSATION_IDLE: Duration = Duration::from_secs(60);
/// Longest wait for a message's acknowledgement once it was written to a link.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Direct links one message is written to before it is left with the tracker.
pub const SEND_ATTEMPTS: usize = 3;
/// While the tracker is needed but away, how often a waiting message retries.
pub const TRACKER_RETRY: Duration = Duration::from_secs(5);

/// A message on its way: queued, written to a link, or awaiting its ack.
pub struct Outgoing {
    id: MessageId,
    to: Name,
    body: String,
    sent_at_ms: u64,
    queued_at: Instant,
    /// Links it has been written to so far.
    attempts: usize,
    /// Skip direct attempts: they failed, leave it with the tracker.
    hold_next: bool,
    /// Counts toward `MAX_IN_FLIGHT` until the message leaves the outbox's hands.
    _in_flight: OwnedSemaphorePermit,
}

impl Outgoing {
    pub fn new(
        id: MessageId,
        to: Name,
        body: String,
        sent_at_ms: u64,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            id,
            to,
            body,
            sent_at_ms,
            queued_at: Instant::now(),
            attempts: 0,
            hold_next: false,
            _in_flight: permit,
        }
    }
}

/// What became of one turn of a message.
enum Turn {
    /// Reached a state where this task is done with it.
    Done,
    /// Needs the tracker, which is away: try again later.
    Wait(Outgoing),
}

/// One destination's conversation: its queue, served by its task, and the
/// turn that routes one message at a time.
pub(crate) struct Conversation {
    generation: u64,
    queue: mpsc::Sender<Outgoing>,
    /// Messages put on the queue and not yet through their turn.
    waiting: AtomicUsize,
    /// Held while a message is routed. Holds the link the previous message
    /// went out on: before the first message on another link, what is in
    /// flight on this one is let through, so the receiver sees the
    /// conversation in order.
    turn: TurnLock<Option<Link>>,
}

impl Conversation {
    fn done(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Requeues the unfinished messages found in `peer.db` at start, in order.
/// Held ones stay with the tracker: its notice will finish them.
pub async fn resume(inner: Arc<Inner>, pending: Vec<Pending>) {
    for p in pending {
        if p.state == State::Held {
            continue;
        }
        let Ok(permit) = inner.in_flight.clone().acquire_owned().await else {
            return;
        };
        let to = p.to.clone();
        let msg = Outgoing::new(p.id, p.to, p.body, p.sent_at_ms, permit);
        if inner.enqueue(&to, msg).await.is_err() {
            return;
        }
    }
}

impl Inner {
    /// Puts a message on its destination's conversation queue, starting
    /// the conversation task if there is none.
    pub(crate) async fn enqueue(
        self: &Arc<Self>,
        to: &Name,
        mut msg: Outgoing,
    ) -> Result<(), SendError> {
        // A conversation task may stop (idle) between our lookup and our
        // send; then the message comes back and a fresh task is started.
        for _ in 0..3 {
            let conversation = {
                let mut map = self.conversations.lock().unwrap_or_else(|p| p.into_inner());
                map.entry(to.key())
                    .or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(CONVERSATION_QUEUE);
                        let conversation = Arc::new(Conversation {
                            generation: self.next_generation(),
                            queue: tx,
                            waiting: AtomicUsize::new(0),
                            turn: TurnLock::new(None),
                        });
                        self.tasks.spawn(self.clone().conversation(
                            to.clone(),
                            conversation.clone(),
                            rx,
                        ));
                        conversation
                    })
                    .clone()
            };
            conversation.waiting.fetch_add(1, Ordering::AcqRel);
            match conversation.queue.send(msg).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => {
                    conversation.done();
                    msg = back;
                    self.forget_conversation(to, &conversation);
                }
            }
        }
        Err(SendError::ShuttingDown)
    }

    /// The quick way for a new message, taken from the sender's own task:
    /// when its conversation has nothing queued or in hand, and the direct
    /// link its last message took is still the one to use, the message is
    /// written there at once, as the conversation task would have done it,
    /// without the hop to that task. Anything else is handed back for the
    /// queue.
    pub(crate) async fn send_now(self: &Arc<Self>, msg: Outgoing) -> Result<(), Outgoing> {
        // It announces `sent` from the caller's task: a front end that sends
        // and reads the events in one task, and has fallen behind, must not
        // come to wait there on itself.
        if !self.front_end_keeps_up() {
            return Err(msg);
        }
        let conversation = self
            .conversations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&msg.to.key())
            .cloned();
        let Some(conversation) = conversation else {
            return Err(msg);
        };
        let Ok(last_link) = conversation.turn.try_lock() else {
            return Err(msg);
        };
        // Checked under the turn: nothing queued can be overtaken.
        if conversation.waiting.load(Ordering::Acquire) != 0 {
            return Err(msg);
        }
        let Some(link) = last_link.as_ref() else {
            return Err(msg);
        };
        let info = self.directory().get(&msg.to).cloned();
        let usable = info.is_some_and(|info| {
            self.links.is_current_direct(link, &info)
                && matches!(self.store.check_key(&info.name, info.id), KeyCheck::Known)
        });
        if !usable {
            return Err(msg);
        }
        self.write_to(link, msg).await;
        Ok(())
    }

    fn forget_conversation(&self, to: &Name, conversation: &Arc<Conversation>) {
        let mut map = self.conversations.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&to.key())
            .is_some_and(|c| c.generation == conversation.generation)
        {
            map.remove(&to.key());
        }
    }

    /// One task per destination sends its messages in the order they were
    /// queued, so a conversation reads in order on the other side.
    async fn conversation(
        self: Arc<Self>,
        to: Name,
        conversation: Arc<Conversation>,
        mut queue: mpsc::Receiver<Outgoing>,
    ) {
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(CONVERSATION_IDLE, queue.recv()) => next,
                () = self.cancel.cancelled() => return,
            };
            let mut msg = match next {
                Ok(Some(msg)) => msg,
                Ok(None) => return,
                Err(_idle) => {
                    self.forget_conversation(&to, &conversation);
                    // Whatever raced in before the close is still sent.
                    queue.close();
                    continue;
                }
            };
            let mut last_link = conversation.turn.lock().await;
            // A message that needs the absent tracker holds up the ones
            // behind it: the conversation stays in order.
            loop {
                match self
                    .turn(msg, &mut queue, &conversation, &mut last_link)
                    .await
                {
                    Turn::Done => break,
                    Turn::Wait(back) => {
                        msg = back;
                        // Retry when the tracker comes back, or after
                        // TRACKER_RETRY if it is up but could not help.
                        let mut up = self.tracker_up.subscribe();
                        let was_up = *up.borrow_and_update();
                        let back_up = async {
                            if was_up {
                                std::future::pending::<()>().await;
                            }
                            let _ = up.wait_for(|up| *up).await;
                        };
                        tokio::select! {
                            () = back_up => {}
                            () = tokio::time::sleep(TRACKER_RETRY) => {}
                            () = self.cancel.cancelled() => return,
                        }
                    }
                }
            }
            conversation.done();
        }
    }

    /// Routes one message (see the module docs).
    async fn turn(
        self: &Arc<Self>,
        msg: Outgoing,
        queue: &mut mpsc::Receiver<Outgoing>,
        conversation: &Conversation,
        last_link: &mut Option<Link>,
    ) -> Turn {
        let listed = self.directory().get(&msg.to).cloned();
        let info = match listed {
            Some(info) => Some(info),
            None => match self.lookup(&msg.to).await {
                Ok(Some(info)) => {
                    self.learned(info.clone()).await;
                    Some(info)
                }
                Ok(None) => None,
                Err(()) => return Turn::Wait(msg),
            },
        };
        let Some(info) = info else {
            let reason = format!("{} is not logged on", msg.to);
            return self.offline(msg, reason).await;
        };
        if !self.observe_key(&info.name, info.id).await {
            return self.settle(&msg, key_changed(&info.name)).await;
        }
        if msg.hold_next {
            return self.hold(msg).await;
        }
        let link = match self.links.connect(self, &info).await {
            Ok(link) => link,
            Err(e) => {
                if !self.config.offline_delivery {
                    // Everything queued behind it would meet the same fate:
                    // report it now rather than one dial timeout each.
                    let reason = e.to_string();
                    while let Ok(queued) = queue.try_recv() {
                        self.settle(&queued, State::Undeliverable(reason.clone()))
                            .await;
                        conversation.done();
                    }
                    return self.settle(&msg, State::Undeliverable(reason)).await;
                }
                debug!(error = %e, "no direct path; leaving the message with the tracker");
                return self.hold(msg).await;
            }
        };
        if let Some(previous) = last_link.replace(link.clone())
            && !previous.same(&link)
        {
            let _ = tokio::time::timeout(ACK_TIMEOUT, previous.drained()).await;
        }
        self.write_to(&link, msg).await;
        Turn::Done
    }

    /// Writes a message to a link: `sent` once handed to it, so it is always
    /// reported before `delivered`; a failed write puts it back to `queued`.
    async fn write_to(self: &Arc<Self>, link: &Link, mut msg: Outgoing) {
        msg.attempts += 1;
        let frame = ToReceiver::Msg {
            id: msg.id,
            sent_at_ms: msg.sent_at_ms,
            body: msg.body.clone(),
        };
        let path = link.path();
        self.settle(&msg, State::Sent(path)).await;
        let inner = self.clone();
        let on_ack: OnAck = Box::new(move |result| Box::pin(inner.acknowledged(msg, path, result)));
        link.send(self, frame, on_ack).await;
    }

    /// What the link said of a message written to it.
    async fn acknowledged(
        self: Arc<Self>,
        msg: Outgoing,
        path: Path,
        result: Result<(), LinkError>,
    ) {
        match result {
            Ok(()) => {
                self.settle(&msg, State::Delivered(path)).await;
            }
            Err(LinkError::Refused(Refusal::UnknownSender)) => {
                // The receiver could not yet tell that this key is ours
                // (its list is behind, its tracker away): try again, and
                // in the end through the tracker, which vouches for us.
                let reason = format!("{} does not know this key yet", msg.to);
                self.retry(msg, reason).await;
            }
            Err(LinkError::Refused(reason)) => {
                let reason = format!("refused by {}: {reason}", msg.to);
                self.settle(&msg, State::Undeliverable(reason)).await;
            }
            Err(e) => self.retry(msg, e.to_string()).await,
        }
    }

    /// A link broke under a message: send it again on a fresh link, or,
    /// after [`SEND_ATTEMPTS`], leave it with the tracker. Resending is safe:
    /// the receiver shows each id once. Boxed because it re-enters
    /// `enqueue`, which leads back here.
    fn retry(self: Arc<Self>, mut msg: Outgoing, error: String) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            debug!(%error, attempts = msg.attempts, "resending");
            if msg.attempts >= SEND_ATTEMPTS {
                if !self.config.offline_delivery {
                    let reason = format!("unreachable: {error}");
                    self.settle(&msg, State::Undeliverable(reason)).await;
                    return;
                }
                msg.hold_next = true;
            }
            if let Ok(true) = self.store.transition(msg.id, &State::Queued) {
                debug!("requeued");
            }
            let to = msg.to.clone();
            if let Err(e) = self.enqueue(&to, msg).await {
                warn!(error = %e, "cannot requeue; the message stays in the outbox");
            }
        })
    }

    /// The recipient is not logged on: seal and hold, or bounce.
    async fn offline(self: &Arc<Self>, msg: Outgoing, reason: String) -> Turn {
        if self.config.offline_delivery {
            self.hold(msg).await
        } else {
            self.settle(&msg, State::Undeliverable(reason)).await
        }
    }

    /// Seals the message to the recipient's published, verified key and
    /// leaves it with the tracker.
    async fn hold(self: &Arc<Self>, msg: Outgoing) -> Turn {
        if !*self.tracker_up.borrow() {
            return Turn::Wait(msg);
        }
        let entry = match self.seal_key_of(&msg.to).await {
            Ok(Some(entry)) => entry,
            Ok(None) => {
                let reason = format!(
                    "{} is not logged on and the tracker has no sealing key for that name",
                    msg.to
                );
                return self.settle(&msg, State::Undeliverable(reason)).await;
            }
            Err(()) => return Turn::Wait(msg),
        };
        if !self.observe_key(&entry.name, entry.id).await {
            return self.settle(&msg, key_changed(&entry.name)).await;
        }
        if !verify_seal_key(entry.id, &entry.seal) {
            let reason = format!("{}'s sealing key is not signed by its key", msg.to);
            return self.settle(&msg, State::Undeliverable(reason)).await;
        }
        let sealed = match seal(
            &self.identity,
            &self.config.name,
            entry.id,
            &entry.seal.key,
            msg.id,
            msg.sent_at_ms,
            &msg.body,
        ) {
            Ok(sealed) => sealed,
            Err(e) => {
                return self.settle(&msg, State::Undeliverable(e.to_string())).await;
            }
        };
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Hold {
            to: entry.name.clone(),
            to_id: entry.id,
            id: msg.id,
            sealed,
            reply,
        };
        if self.tracker.send(cmd).await.is_err() {
            return Turn::Wait(msg);
        }
        let result = match tokio::time::timeout(TRACKER_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            _ => return Turn::Wait(msg),
        };
        let to = &entry.name;
        match result {
            HoldResult::Held { .. } => self.settle(&msg, State::Held).await,
            HoldResult::UnknownName => {
                let reason = format!("{to} is not logged on and is not known to the tracker");
                self.settle(&msg, State::Undeliverable(reason)).await
            }
            HoldResult::KeyMismatch => {
                let reason = format!("{to} is now bound to another key than the one sealed to");
                self.settle(&msg, State::Undeliverable(reason)).await
            }
            HoldResult::MailboxFull => {
                let reason =
                    format!("{to} is not logged on and its mailbox on the tracker is full");
                self.settle(&msg, State::Undeliverable(reason)).await
            }
            HoldResult::TooLarge => {
                let reason = "too large for the tracker to hold".to_string();
                self.settle(&msg, State::Undeliverable(reason)).await
            }
            HoldResult::Unavailable => Turn::Wait(msg),
        }
    }

    async fn seal_key_of(&self, name: &Name) -> Result<Option<SealKeyEntry>, ()> {
        let (reply, rx) = oneshot::channel();
        self.tracker
            .send(Command::SealKeyOf {
                name: name.clone(),
                reply,
            })
            .await
            .map_err(|_| ())?;
        tokio::time::timeout(TRACKER_TIMEOUT, rx)
            .await
            .map_err(|_| ())?
            .map_err(|_| ())
    }

    /// Records and announces a state; this task is done with the message.
    async fn settle(&self, msg: &Outgoing, state: State) -> Turn {
        self.record(msg.id, &msg.to, &state, msg.queued_at).await;
        Turn::Done
    }

    /// Writes a state change to `peer.db` and, if it was one, tells the user.
    pub(crate) async fn record(&self, id: MessageId, to: &Name, state: &State, since: Instant) {
        match self.store.transition(id, state) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(error = %e, "cannot record a message state");
                return;
            }
        }
        let to = to.clone();
        let event = match state {
            State::Queued => return,
            State::Sent(path) => Event::Sent {
                id,
                to,
                path: *path,
            },
            State::Held => Event::Held { id, to },
            State::Delivered(path) => Event::Delivered {
                id,
                to,
                path: *path,
                rtt: since.elapsed(),
            },
            State::Undeliverable(reason) => Event::Undeliverable {
                id,
                to,
                reason: reason.clone(),
            },
        };
        self.emit(event).await;
    }
}

fn key_changed(name: &Name) -> State {
    State::Undeliverable(format!(
        "{name}'s key changed since you first talked; check it with /verify {name}, then /accept {name}"
    ))
}

/// Milliseconds from `sent_at_ms` to now, as a duration.
pub(crate) fn since_ms(sent_at_ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(sent_at_ms))
}
