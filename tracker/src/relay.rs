//! Relay circuits and hole-punch coordination.
//!
//! A circuit is two QUIC streams spliced by the tracker: one the requester
//! opened (first frame `Circuit{to}`) and one the tracker opens to the
//! target (first frame `CircuitOffer`). Once both sides agreed, the tracker
//! answers `CircuitReady` and copies bytes both ways; the peers run TLS 1.3
//! with pinned keys inside, so the tracker forwards bytes it cannot read.
//!
//! Quotas, all named below: circuits in all, circuits per peer, circuit
//! requests per peer per window, bytes per second per circuit direction
//! (token bucket with a burst), bytes per circuit in all, and one bucket
//! for everything the tracker relays. Relaying runs in its own tasks and
//! waits on its own buckets, so it never holds up enrollment or presence.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use quinn::{Connection, RecvStream, SendStream};
use tincan_proto::{
    Codec, Name, PeerId,
    tracker::{CircuitRefusal, FromTracker, ToTracker},
};
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, info};

use crate::{bucket::Bucket, session::Shared};

/// Circuits open through this tracker at once.
pub const MAX_CIRCUITS: usize = 1024;
/// Circuits one peer may have open (as requester) at once.
pub const MAX_CIRCUITS_PER_PEER: usize = 8;
/// Circuit requests one peer may make per [`REQUEST_WINDOW`].
pub const MAX_REQUESTS_PER_WINDOW: usize = 30;
pub const REQUEST_WINDOW: Duration = Duration::from_secs(10);
/// Sustained relay rate per circuit and direction, bytes per second.
pub const CIRCUIT_RATE: u64 = 8 * 1024 * 1024;
/// Burst per circuit and direction, bytes.
pub const CIRCUIT_BURST: u64 = 1024 * 1024;
/// Bytes one circuit may carry in all (both directions) before it is closed.
pub const CIRCUIT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Everything the tracker relays, bytes per second (and the same burst).
pub const TOTAL_RATE: u64 = 64 * 1024 * 1024;
/// Longest wait for the target to accept a circuit.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A circuit with no bytes either way for this long is closed.
pub const CIRCUIT_IDLE: Duration = Duration::from_secs(120);
/// Largest chunk moved in one read.
const CHUNK: usize = 16 * 1024;

/// The tracker's relay state: counts and the shared bucket.
pub struct Relay {
    open: AtomicUsize,
    per_peer: Mutex<HashMap<PeerId, usize>>,
    requests: Mutex<HashMap<PeerId, VecDeque<Instant>>>,
    total: Mutex<Bucket>,
}

impl Default for Relay {
    fn default() -> Self {
        Self {
            open: AtomicUsize::new(0),
            per_peer: Mutex::default(),
            requests: Mutex::default(),
            total: Mutex::new(Bucket::new(TOTAL_RATE, TOTAL_RATE)),
        }
    }
}

/// Holds a circuit's place in the quotas while it lives.
struct Slot<'a> {
    relay: &'a Relay,
    peer: PeerId,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.relay.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_peer = self
            .relay
            .per_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

impl Relay {
    /// Counts a request and checks every quota; a slot on success.
    fn admit(&self, peer: PeerId) -> Result<Slot<'_>, CircuitRefusal> {
        {
            let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let recent = requests.entry(peer).or_default();
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > REQUEST_WINDOW)
            {
                recent.pop_front();
            }
            if recent.len() >= MAX_REQUESTS_PER_WINDOW {
                return Err(CircuitRefusal::Throttled);
            }
            recent.push_back(now);
            // Forget peers with no recent requests, so the map stays bounded.
            requests.retain(|_, r| !r.is_empty());
        }
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let mine = per_peer.get(&peer).copied().unwrap_or(0);
        if mine >= MAX_CIRCUITS_PER_PEER {
            return Err(CircuitRefusal::TooManyCircuits);
        }
        if self.open.fetch_add(1, Ordering::Relaxed) >= MAX_CIRCUITS {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(CircuitRefusal::TrackerBusy);
        }
        per_peer.insert(peer, mine + 1);
        Ok(Slot { relay: self, peer })
    }

    pub fn open_circuits(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn total_wait(&self, n: usize) -> Duration {
        self.total.lock().unwrap_or_else(|p| p.into_inner()).take(n)
    }
}

type ReqReader = FramedRead<RecvStream, Codec<ToTracker, ()>>;
type ReqWriter = FramedWrite<SendStream, Codec<(), FromTracker>>;

/// Serves one stream a peer opened after enrolling: a circuit request.
pub async fn serve_circuit(
    shared: Arc<Shared>,
    me: (Name, PeerId),
    send: SendStream,
    recv: RecvStream,
) {
    let mut reader: ReqReader = FramedRead::new(recv, Codec::default());
    let mut writer: ReqWriter = FramedWrite::new(send, Codec::default());
    let to = match timeout(SETUP_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(ToTracker::Circuit { to }))) => to,
        _ => return,
    };
    let relay = &shared.relay;
    let admitted = relay.admit(me.1).and_then(|slot| {
        shared
            .registry
            .connection(&to)
            .map(|target| (slot, target))
            .ok_or(CircuitRefusal::NotOnline)
    });
    let (slot, target) = match admitted {
        Ok(admitted) => admitted,
        Err(reason) => return refuse(writer, reason).await,
    };
    let offered = timeout(SETUP_TIMEOUT, offer(&target, &me)).await;
    let Ok(Some((t_send, t_recv, t_leftover))) = offered else {
        return refuse(writer, CircuitRefusal::Declined).await;
    };
    if writer.send(FromTracker::CircuitReady).await.is_err() {
        return;
    }
    let parts = reader.into_parts();
    let r_leftover = parts.read_buf.freeze();
    let r_send = writer.into_inner();
    info!(from = %me.0, %to, open = relay.open_circuits(), "circuit up");
    let carried = splice(
        relay,
        (r_send, parts.io, r_leftover),
        (t_send, t_recv, t_leftover),
    )
    .await;
    info!(from = %me.0, %to, bytes = carried, "circuit closed");
    drop(slot);
}

async fn refuse(mut writer: ReqWriter, reason: CircuitRefusal) {
    debug!(%reason, "circuit refused");
    let _ = writer.send(FromTracker::CircuitRefused { reason }).await;
    let _ = writer.get_mut().finish();
}

/// Opens the tracker's half of a circuit to `target` and waits for its
/// acceptance; returns the raw stream (and any bytes read past the frame).
async fn offer(
    target: &Connection,
    from: &(Name, PeerId),
) -> Option<(SendStream, RecvStream, Bytes)> {
    let (send, recv) = target.open_bi().await.ok()?;
    let mut writer: ReqWriter = FramedWrite::new(send, Codec::default());
    writer
        .send(FromTracker::CircuitOffer {
            from: from.0.clone(),
            from_id: from.1,
        })
        .await
        .ok()?;
    let mut reader: ReqReader = FramedRead::new(recv, Codec::default());
    match reader.next().await {
        Some(Ok(ToTracker::CircuitAccept)) => {}
        _ => return None,
    }
    let parts = reader.into_parts();
    Some((writer.into_inner(), parts.io, parts.read_buf.freeze()))
}

/// Copies both ways until either side ends, a quota runs out, or the
/// circuit idles; returns the bytes carried.
async fn splice(
    relay: &Relay,
    a: (SendStream, RecvStream, Bytes),
    b: (SendStream, RecvStream, Bytes),
) -> u64 {
    let carried = AtomicUsize::new(0);
    let (mut a_send, a_recv, a_left) = a;
    let (mut b_send, b_recv, b_left) = b;
    // Whichever direction ends first ends the circuit.
    tokio::select! {
        () = pump(relay, a_recv, &mut b_send, a_left, &carried) => {}
        () = pump(relay, b_recv, &mut a_send, b_left, &carried) => {}
    }
    let _ = a_send.finish();
    let _ = b_send.finish();
    carried.load(Ordering::Relaxed) as u64
}

async fn pump(
    relay: &Relay,
    mut from: RecvStream,
    to: &mut SendStream,
    leftover: Bytes,
    carried: &AtomicUsize,
) {
    let mut bucket = Bucket::new(CIRCUIT_RATE, CIRCUIT_BURST);
    if !leftover.is_empty() && to.write_chunk(leftover).await.is_err() {
        return;
    }
    loop {
        let chunk = match timeout(CIRCUIT_IDLE, from.read_chunk(CHUNK, true)).await {
            Ok(Ok(Some(chunk))) => chunk.bytes,
            _ => return,
        };
        let n = chunk.len();
        if carried.fetch_add(n, Ordering::Relaxed) as u64 + n as u64 > CIRCUIT_MAX_BYTES {
            return;
        }
        let wait = bucket.take(n).max(relay.total_wait(n));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if to.write_chunk(chunk).await.is_err() {
            return;
        }
    }
}

/// How long each side of a hole punch waits before dialing, so both first
/// packets leave at about the same moment: each side hears of the punch
/// half its RTT after the tracker sent it.
pub fn punch_delays(rtt_a: Duration, rtt_b: Duration) -> (u32, u32) {
    let (ha, hb) = (rtt_a / 2, rtt_b / 2);
    let latest = ha.max(hb);
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    (ms(latest - ha), ms(latest - hb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punch_delays_make_both_dials_leave_together() {
        let (a, b) = punch_delays(Duration::from_millis(10), Duration::from_millis(90));
        // a hears at 5 ms, b at 45 ms: a waits 40 ms, b not at all.
        assert_eq!((a, b), (40, 0));
        assert_eq!(
            punch_delays(Duration::from_millis(30), Duration::from_millis(30)),
            (0, 0)
        );
    }

    #[test]
    fn quotas_throttle_a_looping_requester_and_cap_its_circuits() {
        let relay = Relay::default();
        let peer = PeerId([1; 32]);
        let mut slots = Vec::new();
        for _ in 0..MAX_CIRCUITS_PER_PEER {
            slots.push(relay.admit(peer).unwrap());
        }
        assert_eq!(
            relay.admit(peer).err(),
            Some(CircuitRefusal::TooManyCircuits)
        );
        drop(slots);
        // Another peer is unaffected.
        assert!(relay.admit(PeerId([2; 32])).is_ok());
        let mut last = Ok(());
        for _ in 0..MAX_REQUESTS_PER_WINDOW {
            last = relay.admit(peer).map(drop);
        }
        assert_eq!(last, Err(CircuitRefusal::Throttled));
        assert!(relay.admit(PeerId([3; 32])).is_ok());
    }
}
