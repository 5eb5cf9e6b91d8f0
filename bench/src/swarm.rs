//! The load generator: simulated peers over real QUIC. In tracker mode each
//! one is a full tincan client as far as the tracker can tell (its own
//! Ed25519 identity and TLS client certificate, Hello → Welcome → Thanks →
//! every `ClientList` page; or, when the tracker announces subscribe mode,
//! `Subscribe` to its contacts → every `Subscribed` page), and it keeps
//! reading presence frames for as long as it is held, as a real peer must or
//! be dropped as a laggard. In bare mode it does a handshake and a one-byte
//! exchange with the bare server.
//!
//! Enrollment is closed-loop: at most `concurrency` peers are between
//! "connect" and "enrolled" at once, the same for both servers.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tincan_proto::{
    Codec, Name, PROTOCOL_VERSION, PeerId,
    codec::{decode, length_delimited},
    tls::{Identity, SERVER_NAME},
    tracker::{FromTracker, ToTracker},
};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::timeout,
};
use tokio_util::{
    codec::{FramedRead, FramedWrite, LengthDelimitedCodec},
    sync::CancellationToken,
};

use crate::{BenchError, quic};

/// Client endpoints (UDP sockets) the simulated peers are spread over, so
/// that the load generator's packet handling is not one task on one core.
pub const CLIENT_ENDPOINTS: usize = 4;
/// Longest wait for any one enrollment step under load.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of the length prefix in front of every tincan frame.
pub const LENGTH_PREFIX: u64 = 4;
/// Names each simulated peer follows on a tracker in subscribe mode: a
/// small contact list spread over the swarm (see [`contacts`]), so that every
/// contact is mutual, about half of them are online before the peer (their
/// state comes in `Subscribed`) and half join after it (heard as presence).
pub const CONTACTS: usize = 8;

/// Which server the swarm talks to.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The real tracker, whose key the peers pin. In subscribe mode each
    /// peer follows [`CONTACTS`] others, or nobody when `follows` is false
    /// (then the tracker has no presence to send at all).
    Tracker { key: PeerId, follows: bool },
    /// The bare quinn server.
    Bare,
}

/// Totals the peers update as they go (relaxed atomics: read after the fact).
#[derive(Default)]
pub struct Counters {
    pub presence_frames: AtomicU64,
    pub presence_bytes: AtomicU64,
    pub list_bytes: AtomicU64,
    pub list_entries: AtomicU64,
    /// Peers whose connection ended before the swarm was stopped.
    pub dropped: AtomicUsize,
}

/// What one held peer saw, returned when the swarm stops.
#[derive(Debug, Default, Clone)]
pub struct PeerReport {
    pub list_bytes: u64,
    pub list_entries: u64,
    pub presence_bytes: u64,
    pub presence_frames: u64,
    /// Why the peer's connection ended early, if it did.
    pub dropped: Option<String>,
}

/// How the enrollment phase went.
#[derive(Debug)]
pub struct Enrollment {
    pub enrolled: usize,
    pub failed: usize,
    /// From the first connect to the last completed enrollment.
    pub elapsed: Duration,
    /// Per-peer time from connect to enrolled, sorted.
    pub latencies: Vec<Duration>,
    pub first_error: Option<String>,
}

impl Enrollment {
    pub fn rate(&self) -> f64 {
        self.enrolled as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Simulated peers, each held by a task this swarm owns.
pub struct Swarm {
    pub counters: Arc<Counters>,
    endpoints: Vec<Endpoint>,
    tasks: JoinSet<PeerReport>,
    cancel: CancellationToken,
}

type Reader = FramedRead<RecvStream, LengthDelimitedCodec>;
type Writer = FramedWrite<SendStream, Codec<(), ToTracker>>;

/// Pre-built client configurations, one per identity, so that key and
/// certificate generation is not part of any timing.
pub fn client_configs(
    identities: &[Identity],
    target: Target,
) -> Result<Vec<quinn::ClientConfig>, BenchError> {
    identities
        .iter()
        .map(|id| {
            Ok(match target {
                Target::Tracker { key, .. } => {
                    quic::client_config(id, tincan_proto::ALPN_TRACKER, Some(key))?
                }
                Target::Bare => quic::client_config(id, quic::ALPN_BARE, None)?,
            })
        })
        .collect()
}

impl Swarm {
    /// Enrolls one peer per configuration with the server at `server`, at
    /// most `concurrency` at a time, giving up on the rest after `deadline`.
    /// Enrolled peers stay connected (and reading) until [`Swarm::stop`].
    pub async fn enroll(
        configs: Vec<quinn::ClientConfig>,
        server: SocketAddr,
        target: Target,
        concurrency: usize,
        deadline: Duration,
    ) -> Result<(Self, Enrollment), BenchError> {
        let endpoints = (0..CLIENT_ENDPOINTS)
            .map(|_| quic::client_endpoint())
            .collect::<Result<Vec<_>, _>>()?;
        let n = configs.len();
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        let (done_tx, mut done_rx) = mpsc::channel::<Result<Duration, String>>(n.max(1));
        let latencies = Arc::new(Mutex::new(Vec::with_capacity(n)));

        let start = Instant::now();
        let stop_at = tokio::time::Instant::now() + deadline;
        let mut configs = configs.into_iter().enumerate();
        let mut pending = configs.len();
        let (mut enrolled, mut failed, mut first_error) = (0, 0, None);
        let mut last_done = start;
        while enrolled + failed < n {
            tokio::select! {
                permit = gate.clone().acquire_owned(), if pending > 0 => {
                    let Ok(permit) = permit else { break };
                    let Some((i, config)) = configs.next() else { break };
                    pending -= 1;
                    let endpoint = endpoints[i % endpoints.len()].clone();
                    let peer = SimPeer {
                        index: i,
                        swarm_size: n,
                        server,
                        target,
                        counters: counters.clone(),
                        cancel: cancel.clone(),
                    };
                    let done = done_tx.clone();
                    tasks.spawn(async move {
                        let began = Instant::now();
                        match peer.enroll(&endpoint, config).await {
                            Ok(session) => {
                                drop(permit);
                                let _ = done.send(Ok(began.elapsed())).await;
                                peer.hold(session).await
                            }
                            Err(e) => {
                                drop(permit);
                                let why = tincan_proto::error_line(&e);
                                let _ = done.send(Err(why.clone())).await;
                                PeerReport { dropped: Some(why), ..PeerReport::default() }
                            }
                        }
                    });
                }
                Some(done) = done_rx.recv() => {
                    last_done = Instant::now();
                    match done {
                        Ok(latency) => {
                            enrolled += 1;
                            latencies.lock().unwrap_or_else(|p| p.into_inner()).push(latency);
                        }
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                () = tokio::time::sleep_until(stop_at) => {
                    first_error.get_or_insert_with(|| format!("deadline of {deadline:?} reached"));
                    break;
                }
            }
        }
        let mut latencies =
            std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
        latencies.sort_unstable();
        let swarm = Self {
            counters,
            endpoints,
            tasks,
            cancel,
        };
        let enrollment = Enrollment {
            enrolled,
            failed: n - enrolled,
            elapsed: last_done - start,
            latencies,
            first_error,
        };
        Ok((swarm, enrollment))
    }

    /// Waits until the peers together have read `frames` presence frames, or
    /// `max` has passed. Returns whether they got there.
    pub async fn wait_presence(&self, frames: u64, max: Duration) -> bool {
        let until = Instant::now() + max;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            if self.counters.presence_frames.load(Ordering::Relaxed) >= frames {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tick.tick().await;
        }
    }

    /// Disconnects every peer and returns what each saw.
    pub async fn stop(mut self) -> Vec<PeerReport> {
        self.cancel.cancel();
        let mut reports = Vec::new();
        while let Some(report) = self.tasks.join_next().await {
            match report {
                Ok(report) => reports.push(report),
                Err(e) => reports.push(PeerReport {
                    dropped: Some(format!("peer task failed: {e}")),
                    ..PeerReport::default()
                }),
            }
        }
        for endpoint in &self.endpoints {
            endpoint.close(0u32.into(), b"bench done");
        }
        for endpoint in &self.endpoints {
            let _ = timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        reports
    }
}

/// One simulated peer's connection after enrollment.
enum Session {
    Tracker {
        conn: Connection,
        reader: Box<Reader>,
        /// Kept open: dropping it would finish the stream and end the session.
        _writer: Box<Writer>,
        report: PeerReport,
    },
    Bare {
        conn: Connection,
        _streams: (SendStream, RecvStream),
    },
}

struct SimPeer {
    index: usize,
    /// How many peers the swarm has (their names are p0 … p{n-1}).
    swarm_size: usize,
    server: SocketAddr,
    target: Target,
    counters: Arc<Counters>,
    cancel: CancellationToken,
}

impl SimPeer {
    async fn enroll(
        &self,
        endpoint: &Endpoint,
        config: quinn::ClientConfig,
    ) -> Result<Session, BenchError> {
        let conn = step(
            "handshake",
            endpoint.connect_with(config, self.server, SERVER_NAME)?,
        )
        .await??;
        let (mut send, mut recv) = step("a stream", conn.open_bi()).await??;
        match self.target {
            Target::Bare => {
                send.write_all(&[1]).await?;
                let mut byte = [0u8; 1];
                step("the echo byte", recv.read_exact(&mut byte)).await??;
                Ok(Session::Bare {
                    conn,
                    _streams: (send, recv),
                })
            }
            Target::Tracker { .. } => {
                let mut writer: Writer = FramedWrite::new(send, Codec::default());
                let mut reader: Reader = FramedRead::new(recv, length_delimited());
                let name = Name::parse(&format!("p{}", self.index))
                    .map_err(|e| BenchError::Protocol(e.to_string()))?;
                // Like a real peer: Hello, the names it follows and Thanks
                // in one flight (the tracker ignores the names in broadcast
                // mode), then Welcome (or Reject).
                writer
                    .feed(ToTracker::Hello {
                        name,
                        version: PROTOCOL_VERSION,
                        local_addrs: vec![],
                        follow: Some(self.contacts()?),
                    })
                    .await?;
                writer.send(ToTracker::Thanks).await?;
                match next_frame(&mut reader, "Welcome").await? {
                    (FromTracker::Welcome { .. }, _) => {}
                    (FromTracker::Reject { reason }, _) => {
                        return Err(BenchError::Protocol(format!("rejected: {reason}")));
                    }
                    (other, _) => {
                        return Err(BenchError::Protocol(format!(
                            "expected Welcome, got {other:?}"
                        )));
                    }
                }
                let mut report = PeerReport::default();
                let mut frame = next_frame(&mut reader, "ClientList").await?;
                if let (FromTracker::SubscribeMode { .. }, _) = frame {
                    frame = next_frame(&mut reader, "Subscribed").await?;
                }
                loop {
                    match frame {
                        (
                            FromTracker::ClientList { peers, last }
                            | FromTracker::Subscribed { peers, last },
                            len,
                        ) => {
                            report.list_bytes += len;
                            report.list_entries += peers.len() as u64;
                            if last {
                                break;
                            }
                        }
                        (FromTracker::Presence(_), len) => self.count_presence(&mut report, len),
                        (other, _) => {
                            return Err(BenchError::Protocol(format!(
                                "expected ClientList or Subscribed, got {other:?}"
                            )));
                        }
                    }
                    frame = next_frame(&mut reader, "the next page of the list").await?;
                }
                self.counters
                    .list_bytes
                    .fetch_add(report.list_bytes, Ordering::Relaxed);
                self.counters
                    .list_entries
                    .fetch_add(report.list_entries, Ordering::Relaxed);
                Ok(Session::Tracker {
                    conn,
                    reader: Box::new(reader),
                    _writer: Box::new(writer),
                    report,
                })
            }
        }
    }

    /// The names this peer follows in subscribe mode (see [`CONTACTS`]).
    fn contacts(&self) -> Result<Vec<Name>, BenchError> {
        if let Target::Tracker { follows: false, .. } = self.target {
            return Ok(Vec::new());
        }
        contacts(self.index, self.swarm_size)
            .into_iter()
            .map(|j| Name::parse(&format!("p{j}")).map_err(|e| BenchError::Protocol(e.to_string())))
            .collect()
    }

    fn count_presence(&self, report: &mut PeerReport, len: u64) {
        report.presence_frames += 1;
        report.presence_bytes += len;
        self.counters
            .presence_frames
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .presence_bytes
            .fetch_add(len, Ordering::Relaxed);
    }

    /// Stays online, reading everything the server sends, until cancelled.
    async fn hold(&self, session: Session) -> PeerReport {
        match session {
            Session::Bare { conn, _streams } => {
                let dropped = tokio::select! {
                    e = conn.closed() => Some(e.to_string()),
                    () = self.cancel.cancelled() => None,
                };
                if dropped.is_some() {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                conn.close(0u32.into(), b"bench done");
                PeerReport {
                    dropped,
                    ..PeerReport::default()
                }
            }
            Session::Tracker {
                conn,
                mut reader,
                _writer,
                mut report,
            } => {
                loop {
                    let frame = tokio::select! {
                        frame = next_frame(&mut reader, "presence") => frame,
                        () = self.cancel.cancelled() => break,
                    };
                    match frame {
                        Ok((FromTracker::Presence(_), len)) => {
                            self.count_presence(&mut report, len);
                        }
                        Ok((other, _)) => {
                            report.dropped = Some(format!("unexpected frame {other:?}"));
                            break;
                        }
                        // Quiet is fine: an idle peer may hear nothing for long.
                        Err(BenchError::Timeout { .. }) => {}
                        Err(e) => {
                            report.dropped = Some(tincan_proto::error_line(&e));
                            break;
                        }
                    }
                }
                if report.dropped.is_some() {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                conn.close(0u32.into(), b"bench done");
                report
            }
        }
    }
}

/// The indices of peer `i`'s contacts in a swarm of `n`: i ± k·s (wrapping)
/// for k = 1 … [`CONTACTS`]/2 and a stride s = n / (2·[`CONTACTS`]) (at
/// least 1), itself excluded, each once. Peers enroll in index order, so the
/// stride puts half the contacts well ahead of the enrollments in flight.
pub fn contacts(i: usize, n: usize) -> Vec<usize> {
    let n = n.max(1);
    let stride = (n / (2 * CONTACTS)).max(1);
    let mut out: Vec<usize> = (1..=CONTACTS / 2)
        .map(|k| (k * stride) % n)
        .flat_map(|d| [(i + d) % n, (i + n - d) % n])
        .filter(|&j| j != i)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Reads one frame and decodes it as the real client does; also returns its
/// size on the wire (length prefix included).
async fn next_frame(
    reader: &mut Reader,
    what: &'static str,
) -> Result<(FromTracker, u64), BenchError> {
    match step(what, reader.next()).await? {
        Some(Ok(body)) => {
            let frame = decode::<FromTracker>(&body)?;
            Ok((frame, body.len() as u64 + LENGTH_PREFIX))
        }
        Some(Err(e)) => Err(e.into()),
        None => Err(BenchError::Protocol(format!(
            "stream ended while waiting for {what}"
        ))),
    }
}

async fn step<T>(what: &'static str, fut: impl Future<Output = T>) -> Result<T, BenchError> {
    timeout(STEP_TIMEOUT, fut)
        .await
        .map_err(|_| BenchError::Timeout {
            what,
            after: STEP_TIMEOUT,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacts_are_spread_mutual_and_each_once() {
        assert_eq!(contacts(0, 100), [6, 12, 18, 24, 76, 82, 88, 94]);
        assert_eq!(contacts(50, 100), [26, 32, 38, 44, 56, 62, 68, 74]);
        assert_eq!(contacts(0, 20), [1, 2, 3, 4, 16, 17, 18, 19]);
        assert_eq!(contacts(2, 5), [0, 1, 3, 4]);
        assert_eq!(contacts(0, 2), [1]);
        assert!(contacts(0, 1).is_empty());
        // Mutual: j follows i whenever i follows j.
        for n in [20, 100, 10_000] {
            for i in 0..n {
                let c = contacts(i, n);
                assert_eq!(c.len(), CONTACTS);
                for j in c {
                    assert!(contacts(j, n).contains(&i));
                }
            }
        }
    }

    #[test]
    fn a_swarm_that_follows_nobody_names_no_contacts_in_its_hello() {
        let peer = |follows| SimPeer {
            index: 0,
            swarm_size: 100,
            server: SocketAddr::from(([127, 0, 0, 1], 1)),
            target: Target::Tracker {
                key: PeerId([1; 32]),
                follows,
            },
            counters: Arc::default(),
            cancel: CancellationToken::new(),
        };
        let names = |p: SimPeer| -> Vec<String> {
            let names = p.contacts().unwrap();
            names.iter().map(|n| n.as_str().to_owned()).collect()
        };
        assert_eq!(
            names(peer(true)),
            ["p6", "p12", "p18", "p24", "p76", "p82", "p88", "p94"]
        );
        assert!(names(peer(false)).is_empty());
    }
}
