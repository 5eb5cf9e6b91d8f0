//! A small bounded queue of encoded frames for one session, with one
//! producer side (the registry) and one consumer (the session task).
//!
//! Every online session has one for the frames addressed to it alone (held
//! messages, notices, hole punches) and, in subscribe mode, one for the
//! presence changes of the names it follows. Both are empty nearly all the
//! time, so this queue allocates nothing for frames until one waits, and
//! gives the room back once drained. A tokio `mpsc` channel allocates a
//! block of 32 slots and a cache-padded channel up front: about 1.5 KiB per
//! queue, measured with heaptrack, two per online peer.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
};

use tincan_proto::{codec::Encoded, tracker::FromTracker};
use tokio::sync::Notify;

/// Slots a drained queue may keep for the next burst; beyond, they are freed.
const KEEP_SLOTS: usize = 8;

pub struct FrameQueue {
    state: Mutex<State>,
    /// Woken on every push and on close; holds a permit when nobody waits,
    /// so a push between the consumer's check and its wait is not missed.
    ready: Notify,
}

struct State {
    frames: VecDeque<Encoded<FromTracker>>,
    /// Most frames waiting at once.
    limit: usize,
    closed: bool,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQueued {
    /// `limit` frames wait already.
    Full,
    /// The queue was closed.
    Closed,
}

/// The consumer's view of a queue that will give no more frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl FrameQueue {
    /// An empty queue holding at most `limit` frames.
    pub fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                limit,
                closed: false,
            }),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame` unless the queue is full or closed. Never waits.
    pub fn push(&self, frame: Encoded<FromTracker>) -> Result<(), NotQueued> {
        {
            let mut state = self.lock();
            if state.closed {
                return Err(NotQueued::Closed);
            }
            if state.frames.len() >= state.limit {
                return Err(NotQueued::Full);
            }
            state.frames.push_back(frame);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Drops whatever waits; the consumer gets [`Closed`] from now on.
    pub fn close(&self) {
        {
            let mut state = self.lock();
            state.closed = true;
            state.frames = VecDeque::new();
        }
        self.ready.notify_one();
    }

    /// The next frame if one waits, without waiting.
    pub fn try_recv(&self) -> Result<Option<Encoded<FromTracker>>, Closed> {
        let mut state = self.lock();
        if state.closed {
            return Err(Closed);
        }
        let frame = state.frames.pop_front();
        if state.frames.is_empty() && state.frames.capacity() > KEEP_SLOTS {
            state.frames = VecDeque::new();
        }
        Ok(frame)
    }

    /// Waits for the next frame.
    pub async fn recv(&self) -> Result<Encoded<FromTracker>, Closed> {
        loop {
            if let Some(frame) = self.try_recv()? {
                return Ok(frame);
            }
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    fn frame() -> Encoded<FromTracker> {
        Encoded::new(&FromTracker::Goodbye).unwrap()
    }

    #[test]
    fn holds_up_to_its_limit_in_order() {
        let q = FrameQueue::new(2);
        let (a, b) = (
            Encoded::new(&FromTracker::Goodbye).unwrap(),
            Encoded::new(&FromTracker::Replaced).unwrap(),
        );
        assert_eq!(q.push(a.clone()), Ok(()));
        assert_eq!(q.push(b.clone()), Ok(()));
        assert_eq!(q.push(frame()), Err(NotQueued::Full));
        assert_eq!(q.try_recv().unwrap().unwrap().body(), a.body());
        assert_eq!(q.try_recv().unwrap().unwrap().body(), b.body());
        assert!(q.try_recv().unwrap().is_none());
    }

    #[test]
    fn a_closed_queue_drops_its_frames_and_refuses_more() {
        let q = FrameQueue::new(4);
        q.push(frame()).unwrap();
        q.close();
        assert_eq!(q.try_recv().err(), Some(Closed));
        assert_eq!(q.push(frame()), Err(NotQueued::Closed));
    }

    #[test]
    fn a_drained_queue_gives_its_room_back() {
        let q = FrameQueue::new(100);
        for _ in 0..50 {
            q.push(frame()).unwrap();
        }
        while q.try_recv().unwrap().is_some() {}
        assert_eq!(q.lock().frames.capacity(), 0);
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_for_a_push_and_for_close() {
        let q = Arc::new(FrameQueue::new(4));
        let consumer = tokio::spawn({
            let q = q.clone();
            async move { (q.recv().await.is_ok(), q.recv().await.err()) }
        });
        // Let the consumer run until it waits (the test runtime has one
        // thread); the outcome does not depend on it.
        tokio::task::yield_now().await;
        q.push(frame()).unwrap();
        tokio::task::yield_now().await;
        q.close();
        let got = tokio::time::timeout(Duration::from_secs(5), consumer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, (true, Some(Closed)));
    }
}
