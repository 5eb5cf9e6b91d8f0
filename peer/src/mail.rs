//! Mail from the tracker, handled in arrival order by one task: sealed
//! messages held for us while we were away (open, verify, show once, send a
//! signed receipt) and notices about messages we left with the tracker
//! (delivered with a verified receipt, expired, rejected).

use std::sync::Arc;

use tincan_proto::{
    seal::{open, sign_receipt, verify_receipt},
    tracker::{HeldMessage, Notice, NoticeKind, ToTracker},
};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    delivery::State,
    event::{Event, Path},
    node::Inner,
    outbox::since_ms,
    tracker_client::Command,
};

/// Held messages and notices waiting for the mail task.
pub const MAIL_QUEUE: usize = 1024;

pub enum Mail {
    Held(HeldMessage),
    Notice(Notice),
}

pub async fn run(inner: Arc<Inner>, mut mail: mpsc::Receiver<Mail>) {
    loop {
        let item = tokio::select! {
            item = mail.recv() => match item {
                Some(item) => item,
                None => return,
            },
            () = inner.cancel.cancelled() => return,
        };
        match item {
            Mail::Held(held) => receive_held(&inner, held).await,
            Mail::Notice(notice) => on_notice(&inner, notice).await,
        }
    }
}

async fn tell_tracker(inner: &Inner, frame: ToTracker) {
    // If the tracker is away the frame is lost, and the tracker hands the
    // same held message or notice over again at the next enrollment.
    let _ = inner.tracker.send(Command::Send(frame)).await;
}

async fn receive_held(inner: &Arc<Inner>, held: HeldMessage) {
    let (from, id, from_id) = (held.from.clone(), held.id, held.from_id);
    let reject = |why: String| async move {
        inner
            .emit(Event::Warning {
                message: format!("a message held for you from {from} was refused: {why}"),
            })
            .await;
        tell_tracker(inner, ToTracker::HeldRejected { id, from_id }).await;
    };
    let letter = match open(&inner.seal, inner.identity.id(), &held.sealed) {
        Ok(letter) => letter,
        Err(e) => return reject(e.to_string()).await,
    };
    if letter.from_id != held.from_id
        || letter.from.key() != held.from.key()
        || letter.id != held.id
    {
        return reject("its sender is not the one the tracker named".into()).await;
    }
    if !inner.observe_key(&letter.from, letter.from_id).await {
        return reject(format!("{}'s key changed; see /verify", letter.from)).await;
    }
    let shown = inner
        .take_incoming(
            letter.from_id,
            &letter.from,
            letter.id,
            letter.body,
            letter.sent_at_ms,
            Path::Held,
        )
        .await;
    match shown {
        Ok(on_screen) => on_screen.await,
        Err(e) => {
            // No receipt: the tracker offers it again.
            warn!(error = %e, "cannot check a held message against the shown ones");
            return;
        }
    }
    match sign_receipt(&inner.identity, letter.from_id, letter.id) {
        Ok(receipt) => {
            tell_tracker(
                inner,
                ToTracker::HeldReceived {
                    id: letter.id,
                    from_id: letter.from_id,
                    receipt,
                },
            )
            .await
        }
        Err(e) => warn!(error = %e, "cannot sign a receipt"),
    }
}

async fn on_notice(inner: &Inner, notice: Notice) {
    let to = match inner.store.recipient(notice.id) {
        Ok(Some(to)) => to,
        Ok(None) => {
            // Not one of ours (or long gone): nothing to record.
            tell_tracker(inner, ToTracker::NoticeSeen { id: notice.id }).await;
            return;
        }
        Err(e) => {
            warn!(error = %e, "cannot look up a message");
            return;
        }
    };
    let state = match notice.kind {
        NoticeKind::Delivered { by, receipt } => {
            let pinned = inner.store.pinned_key(&to);
            let genuine = pinned.is_none_or(|k| k == by)
                && verify_receipt(by, inner.identity.id(), notice.id, &receipt);
            if !genuine {
                inner
                    .emit(Event::Warning {
                        message: format!(
                            "ignored a delivery receipt for a message to {to} that {to} did not sign"
                        ),
                    })
                    .await;
                tell_tracker(inner, ToTracker::NoticeSeen { id: notice.id }).await;
                return;
            }
            State::Delivered(Path::Held)
        }
        NoticeKind::Expired => State::Undeliverable(format!(
            "expired: {to} did not log on before the tracker's time limit for held messages"
        )),
        NoticeKind::Rejected => State::Undeliverable(format!("{to} could not open it")),
    };
    let since = std::time::Instant::now()
        .checked_sub(
            inner
                .store
                .sent_at(notice.id)
                .ok()
                .flatten()
                .map(since_ms)
                .unwrap_or_default(),
        )
        .unwrap_or_else(std::time::Instant::now);
    inner.record(notice.id, &to, &state, since).await;
    tell_tracker(inner, ToTracker::NoticeSeen { id: notice.id }).await;
}
