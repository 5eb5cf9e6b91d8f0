//! Peer-to-peer figures: two real [`Node`]s in this process, enrolled with a
//! real tracker process and talking over a direct QUIC link, against raw
//! quinn doing the same job between two endpoints in this process.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use futures_util::StreamExt;
use tincan_peer::{Config, Event, Node, Path};
use tincan_proto::{Codec, MessageId, Name, PeerId, peer::ToReceiver, tls::SERVER_NAME};
use tokio::{sync::mpsc, time::timeout};
use tokio_util::codec::{Encoder, FramedRead};

use crate::{BenchError, quic};

/// Payload of each round trip, bytes.
pub const RTT_PAYLOAD: usize = 64;
/// Body of each throughput message, bytes.
pub const TPUT_BODY: usize = 100;
/// The raw baseline writes messages in batches of about this many bytes.
pub const RAW_BATCH_BYTES: usize = 64 * 1024;
/// Longest wait for any one event or reply.
pub const WAIT: Duration = Duration::from_secs(30);
/// Longest a whole throughput run may take.
pub const THROUGHPUT_DEADLINE: Duration = Duration::from_secs(300);

const ALPN_ECHO: &[u8] = b"tincan-bench/echo";

/// Round-trip samples, sorted.
pub struct Latencies(pub Vec<Duration>);

impl From<Vec<Duration>> for Latencies {
    fn from(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self(samples)
    }
}

impl Latencies {
    pub fn percentile(&self, p: f64) -> Duration {
        crate::report::percentile(&self.0, p)
    }
}

async fn within<T>(what: &'static str, fut: impl Future<Output = T>) -> Result<T, BenchError> {
    timeout(WAIT, fut)
        .await
        .map_err(|_| BenchError::Timeout { what, after: WAIT })
}

/// A raw quinn server endpoint, and a client endpoint with its configuration
/// for reaching it, in this process. The caller starts accepting, then dials.
struct RawPair {
    server: quinn::Endpoint,
    client: quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
}

impl RawPair {
    fn new() -> Result<Self, BenchError> {
        let (server, server_key) =
            quic::server_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), ALPN_ECHO)?;
        let client = quic::client_endpoint()?;
        let identity = tincan_proto::tls::Identity::generate().map_err(quic::QuicError::from)?;
        let config = quic::client_config(&identity, ALPN_ECHO, Some(server_key))?;
        let addr = server.local_addr()?;
        Ok(Self {
            server,
            client,
            config,
            addr,
        })
    }

    async fn connect(&self) -> Result<quinn::Connection, BenchError> {
        let connecting = self
            .client
            .connect_with(self.config.clone(), self.addr, SERVER_NAME)?;
        Ok(within("raw handshake", connecting).await??)
    }
}

/// Raw quinn: round trips of [`RTT_PAYLOAD`] bytes echoed on one long-lived
/// bidirectional stream between two endpoints in this process.
pub struct RawEcho {
    pair: RawPair,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    echo: tokio::task::JoinHandle<Option<()>>,
}

impl RawEcho {
    pub async fn start() -> Result<Self, BenchError> {
        let pair = RawPair::new()?;
        let server = pair.server.clone();
        let echo = tokio::spawn(async move {
            let conn = server.accept().await?.await.ok()?;
            let (mut send, mut recv) = conn.accept_bi().await.ok()?;
            let mut buf = [0u8; RTT_PAYLOAD];
            while recv.read_exact(&mut buf).await.is_ok() {
                send.write_all(&buf).await.ok()?;
            }
            Some(())
        });
        let conn = pair.connect().await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            pair,
            conn,
            send,
            recv,
            echo,
        })
    }

    /// `warmup + count` round trips; the last `count` are timed.
    pub async fn rtt(&mut self, count: usize, warmup: usize) -> Result<Vec<Duration>, BenchError> {
        let out = [7u8; RTT_PAYLOAD];
        let mut back = [0u8; RTT_PAYLOAD];
        let mut samples = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let t = Instant::now();
            self.send.write_all(&out).await?;
            within("raw echo", self.recv.read_exact(&mut back)).await??;
            if i >= warmup {
                samples.push(t.elapsed());
            }
        }
        Ok(samples)
    }

    pub async fn stop(mut self) {
        let _ = self.send.finish();
        self.conn.close(0u32.into(), b"done");
        let _ = timeout(WAIT, self.echo).await;
        self.pair.client.wait_idle().await;
    }
}

/// Raw quinn: `count` postcard messages with a [`TPUT_BODY`]-byte body, framed
/// as tincan frames them, written in batches on one stream; the receiver
/// decodes every one and replies once at the end. Returns messages per second.
pub async fn raw_throughput(count: usize) -> Result<f64, BenchError> {
    let pair = RawPair::new()?;
    let server = pair.server.clone();
    let sink = tokio::spawn(async move {
        let conn = server.accept().await?.await.ok()?;
        let (mut send, recv) = conn.accept_bi().await.ok()?;
        let mut reader = FramedRead::new(recv, Codec::<ToReceiver, ()>::default());
        let mut seen = 0usize;
        while seen < count {
            match reader.next().await {
                Some(Ok(ToReceiver::Msg { .. })) => seen += 1,
                _ => return None,
            }
        }
        send.write_all(b"done").await.ok()?;
        let _ = send.finish();
        conn.closed().await;
        Some(())
    });
    let conn = pair.connect().await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let body = "m".repeat(TPUT_BODY);
    let mut codec = Codec::<(), ToReceiver>::default();
    let mut buf = BytesMut::with_capacity(2 * RAW_BATCH_BYTES);
    let start = Instant::now();
    for i in 0..count {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let msg = ToReceiver::Msg {
            id: MessageId(id),
            sent_at_ms: i as u64,
            body: body.clone(),
        };
        codec.encode(msg, &mut buf)?;
        if buf.len() >= RAW_BATCH_BYTES {
            send.write_chunk(buf.split().freeze()).await?;
        }
    }
    if !buf.is_empty() {
        send.write_chunk(buf.split().freeze()).await?;
    }
    let mut done = [0u8; 4];
    within("raw throughput reply", recv.read_exact(&mut done)).await??;
    let elapsed = start.elapsed();
    conn.close(0u32.into(), b"done");
    let _ = timeout(WAIT, sink).await;
    pair.client.wait_idle().await;
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// Two real nodes, `alice` and `bob`, enrolled with the same tracker and
/// each knowing the other.
pub struct NodePair {
    /// The receiver's name.
    to: String,
    /// Deliveries that came back over a relay circuit.
    pub relayed: usize,
    alice: Node,
    alice_events: mpsc::Receiver<Event>,
    bob: Node,
    bob_drain: tokio::task::JoinHandle<()>,
    /// Messages bob's front end was shown.
    bob_shown: Arc<AtomicUsize>,
}

impl NodePair {
    /// Starts `from` and `to`; with `relay_only` both use relay circuits
    /// through the tracker and never a direct link.
    pub async fn start(
        tracker: SocketAddr,
        key: PeerId,
        dir: &std::path::Path,
        (from, to): (&str, &str),
        relay_only: bool,
    ) -> Result<Self, BenchError> {
        let node = |name: &str| -> Result<Config, BenchError> {
            let name = Name::parse(name).map_err(|e| BenchError::Node(e.to_string()))?;
            let mut config =
                Config::new(name.clone(), tracker.to_string(), dir.join(name.as_str()));
            config.tracker_key = Some(key);
            config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
            config.relay_only = relay_only;
            Ok(config)
        };
        let (alice, mut alice_events) = Node::start(node(from)?)
            .await
            .map_err(|e| BenchError::Node(e.to_string()))?;
        let (bob, mut bob_events) = Node::start(node(to)?)
            .await
            .map_err(|e| BenchError::Node(e.to_string()))?;
        // alice hears of bob's arrival before she writes to him.
        within("alice to hear of bob", async {
            while let Some(event) = alice_events.recv().await {
                if let Event::Presence {
                    name, online: true, ..
                } = event
                    && name.as_str() == to
                {
                    return;
                }
            }
        })
        .await?;
        // bob's front end: reads every event so the node never waits on it.
        let bob_shown = Arc::new(AtomicUsize::new(0));
        let shown = bob_shown.clone();
        let bob_drain = tokio::spawn(async move {
            while let Some(event) = bob_events.recv().await {
                if matches!(event, Event::Message { .. }) {
                    shown.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Self {
            to: to.to_string(),
            relayed: 0,
            alice,
            alice_events,
            bob,
            bob_drain,
            bob_shown,
        })
    }

    /// Send → delivered for `warmup + count` messages of [`RTT_PAYLOAD`] bytes,
    /// one at a time (the first ones also bring the direct link up).
    pub async fn rtt(&mut self, count: usize, warmup: usize) -> Result<Vec<Duration>, BenchError> {
        let text = "r".repeat(RTT_PAYLOAD);
        let mut samples = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let t = Instant::now();
            let id = self
                .alice
                .send(&self.to, &text)
                .await
                .map_err(|e| BenchError::Node(e.to_string()))?;
            wait_delivered(&mut self.alice_events, id).await?;
            if i >= warmup {
                samples.push(t.elapsed());
            }
        }
        Ok(samples)
    }

    /// `count` messages of [`TPUT_BODY`] bytes sent back to back (pipelined);
    /// returns messages delivered (acknowledged) per second.
    pub async fn throughput(&mut self, count: usize) -> Result<f64, BenchError> {
        let text = "t".repeat(TPUT_BODY);
        let Self {
            alice,
            alice_events,
            to,
            relayed,
            ..
        } = self;
        let start = Instant::now();
        let counting = async {
            let mut delivered = 0;
            while delivered < count {
                match alice_events.recv().await {
                    Some(Event::Delivered { path, .. }) => {
                        delivered += 1;
                        if path == Path::Relay {
                            *relayed += 1;
                        }
                    }
                    Some(Event::Undeliverable { reason, .. }) => {
                        return Err(BenchError::Node(format!("undeliverable: {reason}")));
                    }
                    Some(_) => {}
                    None => return Err(BenchError::Node("alice stopped".into())),
                }
            }
            Ok(Instant::now())
        };
        let sending = async {
            for _ in 0..count {
                alice
                    .send(to, &text)
                    .await
                    .map_err(|e| BenchError::Node(e.to_string()))?;
            }
            Ok::<_, BenchError>(())
        };
        let (end, sent) = timeout(THROUGHPUT_DEADLINE, async {
            tokio::join!(counting, sending)
        })
        .await
        .map_err(|_| BenchError::Timeout {
            what: "a throughput run",
            after: THROUGHPUT_DEADLINE,
        })?;
        sent?;
        let end = end?;
        Ok(count as f64 / (end - start).as_secs_f64())
    }

    /// Stops both nodes; returns how many messages bob was shown.
    pub async fn stop(self) -> usize {
        self.alice.shutdown().await;
        self.bob.shutdown().await;
        self.bob_drain.abort();
        let _ = self.bob_drain.await;
        self.bob_shown.load(Ordering::Relaxed)
    }
}

async fn wait_delivered(
    events: &mut mpsc::Receiver<Event>,
    id: MessageId,
) -> Result<(), BenchError> {
    within("a delivery", async {
        while let Some(event) = events.recv().await {
            match event {
                Event::Delivered { id: d, .. } if d == id => return Ok(()),
                Event::Undeliverable { id: d, reason, .. } if d == id => {
                    return Err(BenchError::Node(format!("undeliverable: {reason}")));
                }
                _ => {}
            }
        }
        Err(BenchError::Node("alice stopped".into()))
    })
    .await?
}
