//! The classic IM flows (enroll, send with bounce, logout) between the real
//! `tracker` and `peer` binaries over real QUIC on 127.0.0.1.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tincan_tests::{Mode, Peer, PeerOpts, Tracker, WAIT, peer_names};

#[tokio::test]
async fn enroll_gives_newcomer_the_full_list_and_others_one_delta() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json).spawn()?;
    let enrolled = alice.expect_event("enrolled", |_| true).await?;
    assert_eq!(enrolled["name"], "alice");
    assert_eq!(enrolled["peer_id"].as_str().map(str::len), Some(64));
    let list = alice.expect_event("client_list", |_| true).await?;
    assert_eq!(peer_names(&list), ["alice"]);

    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json).spawn()?;
    bob.expect_event("enrolled", |_| true).await?;
    let list = bob.expect_event("client_list", |_| true).await?;
    assert_eq!(peer_names(&list), ["alice", "bob"]);

    let delta = alice
        .expect_event("presence", |v| v["name"] == "bob")
        .await?;
    assert_eq!(delta["online"], true);

    // /who agrees on both sides.
    let who = alice.command(json!({"cmd": "who"})).await?;
    assert_eq!(peer_names(&who), ["alice", "bob"]);
    Ok(())
}

#[tokio::test]
async fn message_is_delivered_directly_and_shown_with_the_seed_wording() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_text("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;

    let id = alice.send("bob", "hello bob, it's alice").await?;
    bob.expect_line("the seed's message line", |l| {
        l == "Message from alice: hello bob, it's alice"
    })
    .await?;
    let delivered = alice
        .expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    assert_eq!(delivered["path"], "direct");
    assert_eq!(delivered["to"], "bob");

    // And back, text mode to JSON mode.
    bob.type_line("/msg alice and hello to you").await?;
    let msg = alice
        .expect_event("message", |v| v["from"] == "bob")
        .await?;
    assert_eq!(msg["text"], "and hello to you");
    assert_eq!(msg["path"], "direct");
    assert_eq!(msg["msg_id"].as_str().map(str::len), Some(32));
    bob.expect_line("the delivered status", |l| {
        l.contains("to alice: delivered (direct")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_newcomer_that_writes_at_once_is_shown_online_before_its_message() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    // bob has been online a while: carol's arrival reached him.
    let _carol = Peer::start_json("carol", &tracker).await?;
    bob.expect_event("presence", |v| v["name"] == "carol" && v["online"] == true)
        .await?;
    // alice's message is typed before she has even enrolled: it goes out
    // (direct) as soon as she has, and can outrun the tracker's presence push.
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Text).spawn()?;
    alice.type_line("/msg bob hi, just arrived").await?;
    // bob's events in the order he got them, up to the message.
    let mut online_first = false;
    for _ in 0..100 {
        let event = bob.next_json(WAIT).await?;
        if event["event"] == "presence" && event["name"] == "alice" {
            online_first = event["online"] == true;
        }
        if event["event"] == "message" {
            assert_eq!(event["text"], "hi, just arrived");
            break;
        }
    }
    assert!(
        online_first,
        "bob was shown alice's message before alice online"
    );
    // The tracker's own announcement of alice, when it comes, is not a second one.
    let again = bob
        .expect_event_within("presence", Duration::from_secs(1), |v| v["name"] == "alice")
        .await;
    assert!(again.is_err(), "alice was announced twice: {again:?}");
    Ok(())
}

#[tokio::test]
async fn peers_reach_an_ipv6_only_tracker_without_being_told_how() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tracker = Tracker::start_at("[::1]:0", dir.path()).await?;
    // No --bind: the peer binds IPv6 because the tracker has no IPv4 address.
    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .default_bind()
        .start()
        .await?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .default_bind()
        .start()
        .await?;
    let id = alice.send("bob", "over IPv6").await?;
    alice
        .expect_event("delivered", |v| {
            v["msg_id"] == id.as_str() && v["path"] == "direct"
        })
        .await?;
    bob.expect_event("message", |v| v["text"] == "over IPv6")
        .await?;
    Ok(())
}

#[tokio::test]
async fn many_messages_each_arrive_once_in_order() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    const N: usize = 200;
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(alice.send("bob", &format!("m{i}")).await?);
    }
    for (i, id) in ids.iter().enumerate() {
        let msg = bob.expect_event("message", |_| true).await?;
        assert_eq!(msg["text"], format!("m{i}"), "message {i} out of order");
        assert_eq!(msg["msg_id"], id.as_str());
    }
    let mut delivered = 0;
    while delivered < N {
        alice.expect_event("delivered", |_| true).await?;
        delivered += 1;
    }
    // Nothing more arrives: each id was shown once.
    let extra = bob
        .expect_event_within("message", Duration::from_millis(500), |_| true)
        .await;
    assert!(extra.is_err(), "a message was shown twice: {extra:?}");
    Ok(())
}

#[tokio::test]
async fn message_to_a_name_not_logged_on_bounces_to_the_sender() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let id = alice.send("carol", "are you there?").await?;
    let bounce = alice
        .expect_event("undeliverable", |v| v["msg_id"] == id.as_str())
        .await?;
    assert_eq!(bounce["to"], "carol");
    assert!(
        bounce["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not logged on"),
        "{bounce}"
    );

    let mut text = Peer::start_text("dave", &tracker).await?;
    text.type_line("/msg carol hi").await?;
    text.expect_line("the bounce line", |l| {
        l.contains("to carol: NOT delivered: carol is not logged on")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn logout_says_goodbye_and_everyone_sees_it() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_text("alice", &tracker).await?;
    bob.expect_event("presence", |v| v["name"] == "alice" && v["online"] == true)
        .await?;
    alice.type_line("/quit").await?;
    alice
        .expect_line("the goodbye line", |l| l == "logged out. Goodbye.")
        .await?;
    assert!(alice.wait_exit(WAIT).await?.success());
    bob.expect_event("presence", |v| v["name"] == "alice" && v["online"] == false)
        .await?;
    let who = bob.command(json!({"cmd": "who"})).await?;
    assert_eq!(peer_names(&who), ["bob"]);

    // JSON logout replies, then the process exits 0.
    let reply = bob.command(json!({"cmd": "logout"})).await?;
    assert_eq!(reply["ok"], true);
    assert!(bob.wait_exit(WAIT).await?.success());
    Ok(())
}

#[tokio::test]
async fn sigterm_and_sighup_log_out_as_quit_does() -> Result<()> {
    use rustix::process::Signal;
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let alice_dir = tempfile::tempdir()?;
    for signal in [Signal::TERM, Signal::HUP] {
        let mut alice = PeerOpts::new("alice", &tracker, Mode::Text)
            .dir(alice_dir.path())
            .start()
            .await?;
        bob.expect_event("presence", |v| v["name"] == "alice" && v["online"] == true)
            .await?;
        alice.signal(signal)?;
        alice
            .expect_line("the goodbye line", |l| l == "logged out. Goodbye.")
            .await
            .with_context(|| format!("after {signal:?}"))?;
        assert!(alice.wait_exit(WAIT).await?.success(), "after {signal:?}");
        // A logout, not the idle timeout (10 s) noticing a vanished peer.
        bob.expect_event_within("presence", Duration::from_secs(5), |v| {
            v["name"] == "alice" && v["online"] == false
        })
        .await
        .with_context(|| format!("bob did not see alice leave after {signal:?}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn killed_peer_is_dropped_within_the_idle_timeout() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    bob.expect_event("presence", |v| v["name"] == "alice" && v["online"] == true)
        .await?;
    let killed = std::time::Instant::now();
    alice.kill().await?;
    // Idle timeout is 10 s; allow scheduling slack on a loaded machine.
    bob.expect_event_within("presence", Duration::from_secs(20), |v| {
        v["name"] == "alice" && v["online"] == false
    })
    .await?;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(5),
        "dropped suspiciously early: {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn known_peer_still_gets_messages_directly_when_the_tracker_dies() -> Result<()> {
    let mut tracker = Tracker::start().await?;
    let mut bob = Peer::start_text("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    alice
        .expect_event("client_list", |v| {
            peer_names(v).contains(&"bob".to_string())
        })
        .await?;
    // Both know each other (bob has heard of alice) before the tracker dies.
    bob.expect_line("alice's arrival", |l| l == "* alice is online")
        .await?;
    tracker.kill().await?;

    let id = alice.send("bob", "still here without the tracker").await?;
    bob.expect_line("the message", |l| {
        l == "Message from alice: still here without the tracker"
    })
    .await?;
    alice
        .expect_event("delivered", |v| {
            v["msg_id"] == id.as_str() && v["path"] == "direct"
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn restarted_tracker_gets_peers_back_and_kept_the_name_bindings() -> Result<()> {
    let mut tracker = Tracker::start().await?;
    let carol_dir = tempfile::tempdir()?;
    let mut carol = PeerOpts::new("carol", &tracker, Mode::Json)
        .dir(carol_dir.path())
        .start()
        .await?;
    carol.command(json!({"cmd": "logout"})).await?;
    carol.wait_exit(WAIT).await?;

    let mut bob = Peer::start_json("bob", &tracker).await?;
    tracker.kill().await?;
    bob.expect_event_within("tracker_lost", Duration::from_secs(20), |_| true)
        .await?;
    let mut tracker = tracker.restart().await?;

    // bob enrolls again by himself, with the same key.
    let again = bob
        .expect_event_within("enrolled", Duration::from_secs(30), |_| true)
        .await?;
    assert_eq!(again["name"], "bob");

    // carol's name is still bound to carol's key: an impostor is refused...
    let mut impostor = PeerOpts::new("carol", &tracker, Mode::Json).spawn()?;
    let status = impostor.wait_exit(WAIT).await?;
    assert!(!status.success());
    assert!(
        impostor.stderr().contains("belongs to another key"),
        "{}",
        impostor.stderr()
    );
    // ...and carol herself gets back in.
    let mut carol = PeerOpts::new("carol", &tracker, Mode::Json)
        .dir(carol_dir.path())
        .start()
        .await?;
    bob.expect_event("presence", |v| v["name"] == "carol" && v["online"] == true)
        .await?;
    carol.command(json!({"cmd": "logout"})).await?;
    tracker.kill().await?;
    Ok(())
}

#[tokio::test]
async fn same_identity_enrolling_again_replaces_the_old_session() -> Result<()> {
    let tracker = Tracker::start().await?;
    let dir = tempfile::tempdir()?;
    let mut first = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(dir.path())
        .start()
        .await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let _second = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(dir.path())
        .start()
        .await?;
    let fatal = first.expect_event("fatal", |_| true).await?;
    assert!(
        fatal["reason"]
            .as_str()
            .unwrap_or("")
            .contains("enrolled again")
    );
    assert!(!first.wait_exit(WAIT).await?.success());
    // bob can reach the new alice.
    let id = bob.send("alice", "which alice?").await?;
    bob.expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    Ok(())
}
