//! A hand-driven client of the real tracker protocol (real QUIC, a real
//! identity), for tests that play a hostile or unusual peer.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use quinn::{Connection, Endpoint, crypto::rustls::QuicClientConfig};
use tincan_proto::{
    ALPN_TRACKER, Codec, Name, PeerId,
    tls::{Identity, SERVER_NAME, client_config},
    tracker::{FromTracker, PeerInfo, ToTracker},
};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::WAIT;

pub type TrackerReader = FramedRead<quinn::RecvStream, Codec<FromTracker, ()>>;
pub type TrackerWriter = FramedWrite<quinn::SendStream, Codec<(), ToTracker>>;

/// Waits for the remote to close `conn` and returns its application code.
pub async fn closed_with(conn: &Connection) -> Result<u64> {
    match tokio::time::timeout(WAIT, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Ok(c.error_code.into_inner()),
        Ok(other) => bail!("closed, but not by the application: {other}"),
        Err(_) => bail!("the remote did not close the connection within {WAIT:?}"),
    }
}

/// A quinn client configuration presenting `identity`, speaking `alpn`,
/// accepting only `expected` as the server's key (any key when `None`).
pub fn quinn_client_config(
    identity: &Identity,
    alpn: &[u8],
    expected: Option<PeerId>,
) -> Result<quinn::ClientConfig> {
    let tls = client_config(identity, alpn, expected)?;
    Ok(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )))
}

/// Connects to `addr` with `identity`, speaking `alpn`, accepting only
/// `expected` as the server's key (any key when `None`).
pub async fn connect_as(
    identity: &Identity,
    addr: &str,
    alpn: &[u8],
    expected: Option<PeerId>,
) -> Result<Connection> {
    let config = quinn_client_config(identity, alpn, expected)?;
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(config);
    let addr: SocketAddr = addr.parse()?;
    let conn = tokio::time::timeout(WAIT, endpoint.connect(addr, SERVER_NAME)?)
        .await
        .context("handshake timed out")??;
    Ok(conn)
}

/// Enrolls `name` with the real tracker protocol; returns the connection
/// and its control stream.
pub async fn enroll(
    identity: &Identity,
    addr: &str,
    name: &str,
) -> Result<(Connection, TrackerReader, TrackerWriter)> {
    enroll_announcing(identity, addr, name, vec![]).await
}

/// [`enroll`], announcing `local_addrs` as this peer's own addresses (the
/// tracker passes them on to peers that want to reach it).
pub async fn enroll_announcing(
    identity: &Identity,
    addr: &str,
    name: &str,
    local_addrs: Vec<SocketAddr>,
) -> Result<(Connection, TrackerReader, TrackerWriter)> {
    let (conn, mut reader, writer) = hello_thanks_from(identity, addr, name, local_addrs).await?;
    loop {
        if let FromTracker::ClientList { last: true, .. } = next_frame(&mut reader).await? {
            break;
        }
    }
    Ok((conn, reader, writer))
}

/// Connects and sends `Hello`, reads `Welcome`, sends `Thanks`: what is
/// left of enrollment is step 6, which depends on the tracker's mode.
pub async fn hello_thanks(
    identity: &Identity,
    addr: &str,
    name: &str,
) -> Result<(Connection, TrackerReader, TrackerWriter)> {
    hello_thanks_from(identity, addr, name, vec![]).await
}

async fn hello_thanks_from(
    identity: &Identity,
    addr: &str,
    name: &str,
    local_addrs: Vec<SocketAddr>,
) -> Result<(Connection, TrackerReader, TrackerWriter)> {
    let (conn, mut reader, mut writer) = control_stream(identity, addr).await?;
    writer.send(hello(name, local_addrs, None)?).await?;
    welcome(&mut reader).await?;
    writer.send(ToTracker::Thanks).await?;
    Ok((conn, reader, writer))
}

/// A connection to the tracker and its control stream.
async fn control_stream(
    identity: &Identity,
    addr: &str,
) -> Result<(Connection, TrackerReader, TrackerWriter)> {
    let conn = connect_as(identity, addr, ALPN_TRACKER, None).await?;
    let (send, recv) = conn.open_bi().await?;
    Ok((
        conn,
        FramedRead::new(recv, Codec::default()),
        FramedWrite::new(send, Codec::default()),
    ))
}

fn hello(name: &str, local_addrs: Vec<SocketAddr>, follow: Option<Vec<Name>>) -> Result<ToTracker> {
    Ok(ToTracker::Hello {
        name: Name::parse(name)?,
        version: tincan_proto::PROTOCOL_VERSION,
        local_addrs,
        follow,
    })
}

/// Reads the next frame, which must be `Welcome`.
async fn welcome(reader: &mut TrackerReader) -> Result<()> {
    match next_frame(reader).await? {
        FromTracker::Welcome { .. } => Ok(()),
        other => bail!("expected Welcome, got {other:?}"),
    }
}

/// A peer enrolled with a tracker in subscribe mode.
pub struct Following {
    pub conn: Connection,
    pub reader: TrackerReader,
    pub writer: TrackerWriter,
    /// What `SubscribeMode` announced.
    pub max_subscriptions: u32,
    /// The online ones among the names followed at enrollment.
    pub online: Vec<PeerInfo>,
}

/// Enrolls `name` with a tracker in subscribe mode, following `follow`.
pub async fn enroll_following(
    identity: &Identity,
    addr: &str,
    name: &str,
    follow: &[&str],
) -> Result<Following> {
    let (conn, mut reader, mut writer) = hello_thanks(identity, addr, name).await?;
    let max_subscriptions = match next_frame(&mut reader).await? {
        FromTracker::SubscribeMode { max_subscriptions } => max_subscriptions,
        other => bail!("expected SubscribeMode, got {other:?}"),
    };
    let names = follow
        .iter()
        .map(|n| Name::parse(n))
        .collect::<Result<_, _>>()?;
    writer.send(ToTracker::Subscribe { names }).await?;
    let online = subscribed(&mut reader).await?;
    Ok(Following {
        conn,
        reader,
        writer,
        max_subscriptions,
        online,
    })
}

/// Connects and sends `Hello` (with `follow`) and `Thanks` together, as
/// the real peer does, without waiting for `Welcome`; then reads `Welcome`.
pub async fn hello_thanks_ahead(
    identity: &Identity,
    addr: &str,
    name: &str,
    follow: Option<Vec<Name>>,
) -> Result<(Connection, TrackerReader, TrackerWriter)> {
    let (conn, mut reader, mut writer) = control_stream(identity, addr).await?;
    writer.feed(hello(name, vec![], follow)?).await?;
    writer.send(ToTracker::Thanks).await?;
    welcome(&mut reader).await?;
    Ok((conn, reader, writer))
}

/// Reads `Subscribed` pages up to the last one (skipping other frames,
/// e.g. presence); returns their entries.
pub async fn subscribed(reader: &mut TrackerReader) -> Result<Vec<PeerInfo>> {
    let mut online = Vec::new();
    loop {
        let page = frame_where(reader, "a Subscribed page", |f| {
            matches!(f, FromTracker::Subscribed { .. })
        })
        .await?;
        if let FromTracker::Subscribed { peers, last } = page {
            online.extend(peers);
            if last {
                return Ok(online);
            }
        }
    }
}

/// The next frame from the tracker (within [`WAIT`]).
pub async fn next_frame(reader: &mut TrackerReader) -> Result<FromTracker> {
    Ok(tokio::time::timeout(WAIT, reader.next())
        .await
        .context("no frame from the tracker in time")?
        .context("tracker stream ended")??)
}

/// Reads frames until one matches `pred` (skipping presence and the like).
pub async fn frame_where(
    reader: &mut TrackerReader,
    what: &str,
    mut pred: impl FnMut(&FromTracker) -> bool,
) -> Result<FromTracker> {
    for _ in 0..1000 {
        let frame = next_frame(reader)
            .await
            .with_context(|| format!("waiting for {what}"))?;
        if pred(&frame) {
            return Ok(frame);
        }
    }
    bail!("no {what} within 1000 frames")
}
