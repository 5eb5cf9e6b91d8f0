//! Relay circuits through the tracker, on loopback: messages go through a
//! TLS session inside a tracker-spliced stream; the tracker refuses circuits
//! to absent peers at once and throttles a peer that opens them in a loop;
//! a peer that presents another key inside a circuit is refused; a circuit
//! its requester drops before TLS is done (a direct path won the race) is no
//! authentication failure.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde_json::json;
use tincan_proto::{
    ALPN_PEER, Codec, Name,
    peer::{ToReceiver, ToSender},
    tls::{Identity, SERVER_NAME, client_config},
    tracker::{CircuitRefusal, FromTracker, ToTracker},
};
use tincan_tests::{
    Mode, Peer, PeerOpts, Tracker, WAIT,
    raw::{TrackerReader, TrackerWriter, enroll},
};
use tokio_util::codec::{FramedRead, FramedWrite};

#[tokio::test]
async fn relay_only_messages_go_through_the_tracker_and_are_marked_relayed() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_text("bob", &tracker).await?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .arg("--relay-only")
        .start()
        .await?;
    let id = alice.send("bob", "through the relay").await?;
    let path = alice.expect_event("path", |v| v["name"] == "bob").await?;
    assert_eq!(path["path"], "relay");
    let delivered = alice
        .expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    assert_eq!(delivered["path"], "relay");
    bob.expect_line("the relayed message", |l| {
        l == "Message from alice (relayed): through the relay"
    })
    .await?;
    // Many more on the same circuit, in order, each once.
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(alice.send("bob", &format!("r{i}")).await?);
    }
    for i in 0..50 {
        bob.expect_line("a relayed message", |l| {
            l == format!("Message from alice (relayed): r{i}")
        })
        .await?;
    }
    for id in &ids {
        alice
            .expect_event("delivered", |v| {
                v["msg_id"] == id.as_str() && v["path"] == "relay"
            })
            .await?;
    }
    let who = alice.command(json!({"cmd": "who"})).await?;
    let bob_row = who["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "bob"))
        .context("bob in who")?
        .clone();
    assert_eq!(bob_row["path"], "relay", "{who}");
    Ok(())
}

async fn open_circuit(
    conn: &quinn::Connection,
    to: &str,
) -> Result<(TrackerReader, TrackerWriter, FromTracker)> {
    let (send, recv) = conn.open_bi().await?;
    let mut writer: TrackerWriter = FramedWrite::new(send, Codec::default());
    let mut reader: TrackerReader = FramedRead::new(recv, Codec::default());
    writer
        .send(ToTracker::Circuit {
            to: Name::parse(to)?,
        })
        .await?;
    let answer = tokio::time::timeout(WAIT, reader.next())
        .await
        .context("no answer to a circuit request")?
        .context("circuit stream ended")??;
    Ok((reader, writer, answer))
}

#[tokio::test]
async fn a_circuit_to_an_absent_name_is_refused_at_once() -> Result<()> {
    let tracker = Tracker::start().await?;
    let me = Identity::generate()?;
    let (conn, _r, _w) = enroll(&me, &tracker.addr, "mallory").await?;
    let started = std::time::Instant::now();
    let (_, _, answer) = open_circuit(&conn, "nobody").await?;
    assert_eq!(
        answer,
        FromTracker::CircuitRefused {
            reason: CircuitRefusal::NotOnline
        }
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_peer_opening_circuits_in_a_loop_is_throttled_and_others_are_unaffected() -> Result<()> {
    let tracker = Tracker::start().await?;
    let _bob = Peer::start_json("bob", &tracker).await?;
    let me = Identity::generate()?;
    let (conn, _r, _w) = enroll(&me, &tracker.addr, "mallory").await?;
    let mut refusals = Vec::new();
    // Bounded: the throttle must answer well within this many attempts.
    for _ in 0..100 {
        let (_, _, answer) = open_circuit(&conn, "bob").await?;
        if let FromTracker::CircuitRefused { reason } = answer {
            refusals.push(reason);
            if reason == CircuitRefusal::Throttled {
                break;
            }
        }
    }
    assert_eq!(
        refusals.last(),
        Some(&CircuitRefusal::Throttled),
        "{refusals:?}"
    );

    // carol's relayed conversation with bob still works meanwhile.
    let mut carol = PeerOpts::new("carol", &tracker, Mode::Json)
        .arg("--relay-only")
        .start()
        .await?;
    let id = carol.send("bob", "still served").await?;
    carol
        .expect_event("delivered", |v| {
            v["msg_id"] == id.as_str() && v["path"] == "relay"
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_relayed_peer_presenting_another_key_is_refused_and_nothing_is_shown() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let (_, bob_key) = bob.own_address_and_key().await?;
    // mallory enrolls with one key, then speaks TLS inside the circuit with another.
    let enrolled_key = Identity::generate()?;
    let other_key = Identity::generate()?;
    let (conn, _r, _w) = enroll(&enrolled_key, &tracker.addr, "mallory").await?;
    let (reader, writer, answer) = open_circuit(&conn, "bob").await?;
    if answer != FromTracker::CircuitReady {
        bail!("circuit not ready: {answer:?}");
    }
    let stream = tokio::io::join(reader.into_inner(), writer.into_inner());
    let tls = client_config(&other_key, ALPN_PEER, Some(bob_key))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let result = tokio::time::timeout(
        WAIT,
        connector.connect(ServerName::try_from(SERVER_NAME)?, stream),
    )
    .await
    .context("TLS inside the circuit did not finish")?;
    if let Ok(tls) = result {
        // If the handshake completed on our side, bob must still refuse us.
        let (r, w) = tokio::io::split(tls);
        let mut w = FramedWrite::new(w, Codec::<(), ToReceiver>::default());
        let mut r = FramedRead::new(r, Codec::<ToSender, ()>::default());
        let _ = w
            .send(ToReceiver::Open {
                from: Name::parse("mallory")?,
            })
            .await;
        let _ = w
            .send(ToReceiver::Msg {
                id: tincan_proto::MessageId::generate(),
                sent_at_ms: 0,
                body: "should never show".into(),
            })
            .await;
        let ack = tokio::time::timeout(Duration::from_secs(2), r.next()).await;
        assert!(
            !matches!(ack, Ok(Some(Ok(ToSender::Ack { .. })))),
            "bob acknowledged a message over a circuit with the wrong key"
        );
    }
    bob.expect_event("warning", |v| {
        v["message"].as_str().unwrap_or("").contains("mallory")
    })
    .await?;
    let shown = bob
        .expect_event_within("message", Duration::from_millis(500), |_| true)
        .await;
    assert!(shown.is_err(), "a message was shown: {shown:?}");
    Ok(())
}

/// TLS inside a circuit from `me` to the peer holding `target`: the frames
/// of a relayed message stream, as a real peer speaks them.
async fn circuit_tls(
    me: &Identity,
    target: tincan_proto::PeerId,
    reader: TrackerReader,
    writer: TrackerWriter,
) -> Result<(
    FramedRead<impl tokio::io::AsyncRead, Codec<ToSender, ()>>,
    FramedWrite<impl tokio::io::AsyncWrite, Codec<(), ToReceiver>>,
)> {
    let stream = tokio::io::join(reader.into_inner(), writer.into_inner());
    let tls = client_config(me, ALPN_PEER, Some(target))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tls = tokio::time::timeout(
        WAIT,
        connector.connect(ServerName::try_from(SERVER_NAME)?, stream),
    )
    .await
    .context("TLS inside the circuit did not finish")??;
    let (r, w) = tokio::io::split(tls);
    Ok((
        FramedRead::new(r, Codec::default()),
        FramedWrite::new(w, Codec::default()),
    ))
}

#[tokio::test]
async fn a_circuit_dropped_before_its_tls_handshake_is_no_authentication_failure() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let (_, bob_key) = bob.own_address_and_key().await?;
    let alice = Identity::generate()?;
    let (conn, _r, _w) = enroll(&alice, &tracker.addr, "alice").await?;
    // alice asks for a circuit, then hangs up before TLS starts, as a peer
    // does when its direct dial comes up first.
    let (reader, writer, answer) = open_circuit(&conn, "bob").await?;
    if answer != FromTracker::CircuitReady {
        bail!("circuit not ready: {answer:?}");
    }
    drop((reader, writer));
    // A second circuit carries a message: bob still serves alice's circuits.
    let (reader, writer, answer) = open_circuit(&conn, "bob").await?;
    if answer != FromTracker::CircuitReady {
        bail!("second circuit not ready: {answer:?}");
    }
    let (mut r, mut w) = circuit_tls(&alice, bob_key, reader, writer).await?;
    let id = tincan_proto::MessageId::generate();
    w.send(ToReceiver::Open {
        from: Name::parse("alice")?,
    })
    .await?;
    w.send(ToReceiver::Msg {
        id,
        sent_at_ms: 0,
        body: "after the dropped circuit".into(),
    })
    .await?;
    let ack = tokio::time::timeout(WAIT, r.next())
        .await
        .context("no ack over the second circuit")?;
    assert!(
        matches!(ack, Some(Ok(ToSender::Ack { id: acked })) if acked == id),
        "{ack:?}"
    );
    bob.expect_event("message", |v| v["text"] == "after the dropped circuit")
        .await?;
    let stdout = bob.stdout();
    assert!(
        !stdout.contains(r#""event":"warning""#),
        "bob warned about a circuit its requester only dropped:\n{stdout}"
    );
    Ok(())
}
