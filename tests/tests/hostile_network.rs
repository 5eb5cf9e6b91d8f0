//! Malformed, oversized or unauthorized input from the network closes that
//! one connection with an error code; the process keeps serving everyone
//! else. The hostile client here is real QUIC with a real (self-made) identity.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use quinn::Connection;
use tincan_proto::{
    ALPN_PEER, ALPN_TRACKER, Codec, MessageId, Name, PeerId, close,
    peer::{Refusal, ToReceiver, ToSender},
    seal::{seal, verify_receipt, verify_seal_key},
    tls::Identity,
    tracker::{FromTracker, HoldResult, NoticeKind, ToTracker},
};
use tincan_tests::{
    Mode, Peer, PeerOpts, Tracker, WAIT,
    raw::{closed_with, connect_as, enroll, enroll_announcing, frame_where},
};
use tokio_util::codec::{FramedRead, FramedWrite};

async fn connect(addr: &str, alpn: &[u8], expected: Option<PeerId>) -> Result<Connection> {
    connect_as(&Identity::generate()?, addr, alpn, expected).await
}

#[tokio::test]
async fn tracker_closes_a_connection_that_sends_an_oversized_length_and_serves_others() -> Result<()>
{
    let tracker = Tracker::start().await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;

    let conn = connect(&tracker.addr, ALPN_TRACKER, None).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(&u32::MAX.to_be_bytes()).await?;
    send.write_all(b"never read").await?;
    assert_eq!(closed_with(&conn).await?, u64::from(close::BAD_FRAME));

    // Everyone else is still served: a newcomer enrolls, alice hears of it.
    let _bob = Peer::start_json("bob", &tracker).await?;
    alice
        .expect_event("presence", |v| v["name"] == "bob" && v["online"] == true)
        .await?;
    Ok(())
}

#[tokio::test]
async fn tracker_closes_a_connection_that_sends_garbage_or_skips_hello() -> Result<()> {
    let tracker = Tracker::start().await?;

    // A frame of the right size holding bytes that are no ToTracker value.
    let conn = connect(&tracker.addr, ALPN_TRACKER, None).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(&5u32.to_be_bytes()).await?;
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 0xff]).await?;
    assert_eq!(closed_with(&conn).await?, u64::from(close::BAD_FRAME));

    // A valid frame, but Thanks before Hello.
    let conn = connect(&tracker.addr, ALPN_TRACKER, None).await?;
    let (send, _recv) = conn.open_bi().await?;
    let mut writer = FramedWrite::new(
        send,
        Codec::<(), tincan_proto::tracker::ToTracker>::default(),
    );
    writer
        .send(tincan_proto::tracker::ToTracker::Thanks)
        .await?;
    assert_eq!(closed_with(&conn).await?, u64::from(close::PROTOCOL));

    let _alice = Peer::start_json("alice", &tracker).await?;
    Ok(())
}

#[tokio::test]
async fn peer_refuses_a_sender_whose_key_is_not_bound_to_the_claimed_name() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let (bob_addr, bob_key) = bob.own_address_and_key().await?;

    // An impostor (a fresh key) claims to be alice.
    let conn = connect(&bob_addr, ALPN_PEER, Some(bob_key)).await?;
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FramedWrite::new(send, Codec::<(), ToReceiver>::default());
    let mut reader = FramedRead::new(recv, Codec::<ToSender, ()>::default());
    writer
        .send(ToReceiver::Open {
            from: Name::parse("alice")?,
        })
        .await?;
    writer
        .send(ToReceiver::Msg {
            id: MessageId::generate(),
            sent_at_ms: 0,
            body: "I am alice, honest".into(),
        })
        .await?;
    let answer = tokio::time::timeout(WAIT, reader.next())
        .await
        .context("no answer to the impostor")?;
    assert!(
        matches!(
            answer,
            Some(Ok(ToSender::Refused {
                reason: Refusal::UnknownSender
            }))
        ),
        "{answer:?}"
    );
    bob.expect_event("warning", |v| {
        v["message"].as_str().unwrap_or("").contains("alice")
    })
    .await?;

    // The real alice still gets through, and the impostor's text never showed.
    let id = alice.send("bob", "the real alice").await?;
    let msg = bob.expect_event("message", |_| true).await?;
    assert_eq!(msg["text"], "the real alice");
    assert_eq!(msg["msg_id"], id.as_str());
    Ok(())
}

#[tokio::test]
async fn peer_closes_a_connection_that_sends_garbage_and_keeps_serving() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let (bob_addr, bob_key) = bob.own_address_and_key().await?;

    let conn = connect(&bob_addr, ALPN_PEER, Some(bob_key)).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(&(200_000u32).to_be_bytes()).await?;
    send.write_all(&[0u8; 64]).await?;
    assert_eq!(closed_with(&conn).await?, u64::from(close::BAD_FRAME));

    // Dialing bob with the wrong pinned key fails the handshake.
    let wrong = connect(&bob_addr, ALPN_PEER, Some(PeerId([9; 32]))).await;
    assert!(
        wrong.is_err(),
        "handshake with a wrong pinned key succeeded"
    );

    let id = alice.send("bob", "still working").await?;
    alice
        .expect_event_within("delivered", Duration::from_secs(10), |v| {
            v["msg_id"] == id.as_str()
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn tampered_or_forged_held_messages_are_refused_and_never_shown() -> Result<()> {
    let tracker = Tracker::start().await?;
    let bob_dir = tempfile::tempdir()?;
    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    bob.command(serde_json::json!({"cmd": "logout"})).await?;
    bob.wait_exit(WAIT).await?;

    // mallory speaks the tracker protocol by hand.
    let mallory = Identity::generate()?;
    let (_conn, mut reader, mut writer) = enroll(&mallory, &tracker.addr, "mallory").await?;
    writer
        .send(ToTracker::SealKeyOf {
            req: 1,
            name: Name::parse("bob")?,
        })
        .await?;
    let FromTracker::SealKeyReply {
        entry: Some(entry), ..
    } = frame_where(&mut reader, "bob's sealing key", |f| {
        matches!(f, FromTracker::SealKeyReply { .. })
    })
    .await?
    else {
        bail!("the tracker has no sealing key for bob");
    };
    assert!(verify_seal_key(entry.id, &entry.seal));
    let bob_id = entry.id;
    let me = Name::parse("mallory")?;
    let sealed = |from: &Name, id: MessageId, body: &str| {
        seal(&mallory, from, bob_id, &entry.seal.key, id, 1, body)
    };

    let garbage = MessageId::generate();
    let flipped = MessageId::generate();
    let claims_alice = MessageId::generate();
    let honest = MessageId::generate();
    let mut tampered = sealed(&me, flipped, "tampered in transit")?;
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let holds = [
        (garbage, vec![0x42u8; 200]),
        (flipped, tampered),
        (
            claims_alice,
            sealed(&Name::parse("alice")?, claims_alice, "it's alice, honest")?,
        ),
        (honest, sealed(&me, honest, "an honest note")?),
    ];
    for (id, sealed) in holds {
        writer
            .send(ToTracker::Hold {
                to: Name::parse("bob")?,
                to_id: bob_id,
                id,
                sealed,
            })
            .await?;
        let reply = frame_where(
            &mut reader,
            "the hold reply",
            |f| matches!(f, FromTracker::HoldReply { id: i, .. } if *i == id),
        )
        .await?;
        assert!(
            matches!(
                reply,
                FromTracker::HoldReply {
                    result: HoldResult::Held { .. },
                    ..
                }
            ),
            "{reply:?}"
        );
    }

    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    let shown = bob.expect_event("message", |_| true).await?;
    assert_eq!(
        shown["msg_id"],
        honest.to_string(),
        "only the honest note is shown"
    );
    assert_eq!(shown["text"], "an honest note");
    for _ in 0..3 {
        bob.expect_event("warning", |v| {
            v["message"].as_str().unwrap_or("").contains("was refused")
        })
        .await?;
    }

    // mallory hears: three rejected, one delivered with bob's valid receipt.
    let mut rejected = Vec::new();
    let mut receipt_ok = false;
    while rejected.len() < 3 || !receipt_ok {
        let FromTracker::Notice(notice) = frame_where(&mut reader, "a notice", |f| {
            matches!(f, FromTracker::Notice(_))
        })
        .await?
        else {
            continue;
        };
        match notice.kind {
            NoticeKind::Rejected => rejected.push(notice.id),
            NoticeKind::Delivered { by, receipt } => {
                assert_eq!(notice.id, honest);
                assert_eq!(by, bob_id);
                assert!(verify_receipt(bob_id, mallory.id(), honest, &receipt));
                receipt_ok = true;
            }
            NoticeKind::Expired => bail!("unexpected expiry"),
        }
    }
    rejected.sort();
    let mut want = vec![garbage, flipped, claims_alice];
    want.sort();
    assert_eq!(rejected, want);
    let extra = bob
        .expect_event_within("message", Duration::from_millis(500), |_| true)
        .await;
    assert!(extra.is_err(), "a refused message was shown: {extra:?}");
    Ok(())
}

#[tokio::test]
async fn tracker_paces_a_peer_that_floods_requests_and_serves_others_meanwhile() -> Result<()> {
    use tincan_tracker::session::{REQUEST_BURST, REQUEST_RATE};
    let tracker = Tracker::start().await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let (_conn, mut reader, mut writer) =
        enroll(&Identity::generate()?, &tracker.addr, "flooder").await?;

    // 300 lookups past the burst: at REQUEST_RATE they take 3 s to answer.
    let past_burst = 3 * REQUEST_RATE;
    let count = u32::try_from(REQUEST_BURST + past_burst)?;
    let start = std::time::Instant::now();
    for req in 0..count {
        writer
            .feed(ToTracker::Lookup {
                req,
                name: Name::parse("alice")?,
            })
            .await?;
    }
    SinkExt::<ToTracker>::flush(&mut writer).await?;

    // Meanwhile everyone else is served as usual.
    let _bob = Peer::start_json("bob", &tracker).await?;
    alice
        .expect_event("presence", |v| v["name"] == "bob" && v["online"] == true)
        .await?;

    // Every lookup is answered, in order, none dropped; just not faster.
    for want in 0..count {
        match frame_where(&mut reader, "a LookupReply", |f| {
            matches!(f, FromTracker::LookupReply { .. })
        })
        .await?
        {
            FromTracker::LookupReply { req, peer } => {
                assert_eq!(req, want, "lookup replies out of order");
                assert_eq!(
                    peer.map(|p| p.name.to_string()).as_deref(),
                    Some("alice"),
                    "lookup {req} answered wrongly"
                );
            }
            _ => unreachable!(),
        }
    }
    let took = start.elapsed();
    let floor = Duration::from_secs_f64(past_burst as f64 / REQUEST_RATE as f64 * 0.8);
    assert!(
        took >= floor,
        "{count} lookups answered in {took:?}: faster than REQUEST_RATE allows (at least {floor:?})"
    );
    Ok(())
}

#[tokio::test]
async fn a_flood_of_hole_punch_requests_makes_the_target_dial_once_not_once_per_request()
-> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    // Someone else's address, announced as the flooder's own: every dial bob
    // makes to the flooder also sends QUIC Initials (1 200 bytes) here.
    let victim = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let (_conn, _reader, mut writer) = enroll_announcing(
        &Identity::generate()?,
        &tracker.addr,
        "mallory",
        vec![victim.local_addr()?],
    )
    .await?;
    bob.expect_event("presence", |v| {
        v["name"] == "mallory" && v["online"] == true
    })
    .await?;

    const REQUESTS: usize = 200;
    for _ in 0..REQUESTS {
        writer
            .feed(ToTracker::Connect {
                to: Name::parse("bob")?,
            })
            .await?;
    }
    SinkExt::<ToTracker>::flush(&mut writer).await?;

    // Count what reaches the victim for 3 s (bob's dial gives up after 5).
    let mut datagrams = 0usize;
    let mut buf = [0u8; 2048];
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(_)) = tokio::time::timeout_at(until, victim.recv_from(&mut buf)).await {
        datagrams += 1;
    }
    // One dial retransmits its Initial a dozen times or so as its timer
    // backs off; a dial per request would be thousands.
    assert!(
        datagrams > 0,
        "bob never dialed the announced address: the test proves nothing; bob's log:\n{}",
        bob.stderr()
    );
    assert!(
        datagrams <= 40,
        "{REQUESTS} punch requests made bob send {datagrams} datagrams to an address the \
         requester chose: more than one dial's worth"
    );

    // And bob is still fully at work.
    newcomer_reaches(&tracker, "bob")
        .await
        .context("bob stopped serving after the punch flood")
}

/// A peer that starts now (carol) writes to `to` and sees it delivered.
async fn newcomer_reaches(tracker: &Tracker, to: &str) -> Result<()> {
    let mut carol = Peer::start_json("carol", tracker).await?;
    let id = carol.send(to, "still there?").await?;
    carol
        .expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    Ok(())
}

/// The destination connection id of a QUIC long-header packet.
fn long_header_dcid(datagram: &[u8]) -> Option<Vec<u8>> {
    if datagram.first()? & 0x80 == 0 {
        return None;
    }
    let len = usize::from(*datagram.get(5)?);
    datagram.get(6..6 + len).map(<[u8]>::to_vec)
}

#[tokio::test]
async fn a_peer_holds_at_most_max_handshaking_half_open_handshakes_and_refuses_the_rest()
-> Result<()> {
    use tincan_peer::links::MAX_HANDSHAKING;
    const ATTEMPTS: usize = MAX_HANDSHAKING + 36;
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let (bob_addr, _) = bob.own_address_and_key().await?;

    // Real first packets of ATTEMPTS handshakes (each its own connection
    // id), caught on a socket that never answers.
    let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let config = tincan_tests::raw::quinn_client_config(&Identity::generate()?, ALPN_PEER, None)?;
    let mut connecting = Vec::new();
    for _ in 0..ATTEMPTS {
        connecting.push(client.connect_with(
            config.clone(),
            trap.local_addr()?,
            tincan_proto::tls::SERVER_NAME,
        )?);
    }
    let mut initials: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut buf = [0u8; 2048];
    while initials.len() < ATTEMPTS {
        let (n, _) = tokio::time::timeout(WAIT, trap.recv_from(&mut buf))
            .await
            .context("the client's Initials did not arrive")??;
        if let Some(dcid) = long_header_dcid(&buf[..n]) {
            initials.entry(dcid).or_insert_with(|| buf[..n].to_vec());
        }
    }
    drop(connecting);

    // Each replayed at bob from a socket of its own that never completes
    // it: half-open. (One socket for all would overflow with the replies.)
    // bob answers an accepted one with its first flight (≥ 1 200 bytes), a
    // refused one with a short close; each connection is classified by its
    // first reply, however late a loaded machine makes it.
    let mut replies = tokio::task::JoinSet::new();
    for initial in initials.into_values() {
        let raw = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        raw.send_to(&initial, &bob_addr).await?;
        replies.spawn(async move {
            let mut buf = [0u8; 2048];
            tokio::time::timeout(WAIT, async {
                loop {
                    let n = raw.recv(&mut buf).await.ok()?;
                    if let Some(dcid) = long_header_dcid(&buf[..n]) {
                        return Some((dcid, n >= 1_000));
                    }
                }
            })
            .await
            .ok()
            .flatten()
        });
    }
    let (mut accepted, mut refused) = (HashSet::new(), HashSet::new());
    for (dcid, first_flight) in replies.join_all().await.into_iter().flatten() {
        if first_flight {
            accepted.insert(dcid);
        } else {
            refused.insert(dcid);
        }
    }
    eprintln!(
        "handshakes: {} accepted, {} refused",
        accepted.len(),
        refused.len()
    );
    assert!(
        accepted.len() <= MAX_HANDSHAKING,
        "bob took {} half-open handshakes at once (limit {MAX_HANDSHAKING})",
        accepted.len()
    );
    assert!(
        refused.len() >= ATTEMPTS - MAX_HANDSHAKING,
        "bob refused only {} of {ATTEMPTS} handshakes ({} accepted)",
        refused.len(),
        accepted.len()
    );

    // Meanwhile bob still gets his messages (through the tracker's relay
    // or his own dial, if his slots are full).
    newcomer_reaches(&tracker, "bob")
        .await
        .context("bob stopped receiving during the handshake flood")
}
