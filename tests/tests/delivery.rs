//! Never lose a message: held (sealed) delivery through the tracker for
//! offline peers, expiry, the outbox surviving restarts, trust on first use,
//! and a database that cannot be read.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tincan_tests::{Mode, Peer, PeerOpts, Tracker, WAIT};

async fn logged_out(mut peer: Peer) -> Result<()> {
    let reply = peer.command(json!({"cmd": "logout"})).await?;
    assert_eq!(reply["ok"], true);
    assert!(peer.wait_exit(WAIT).await?.success());
    Ok(())
}

/// bob enrolls once and logs out (so his name and sealing key are known),
/// then alice leaves `text` for him with the tracker. Returns bob's data
/// directory, alice, and the message's id.
async fn held_for_absent_bob(
    tracker: &Tracker,
    text: &str,
) -> Result<(tempfile::TempDir, Peer, String)> {
    let bob_dir = tempfile::tempdir()?;
    let bob = PeerOpts::new("bob", tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    logged_out(bob).await?;
    let mut alice = Peer::start_json("alice", tracker).await?;
    let id = alice.send("bob", text).await?;
    alice
        .expect_event("held", |v| v["msg_id"] == id.as_str())
        .await?;
    Ok((bob_dir, alice, id))
}

#[tokio::test]
async fn messages_to_an_offline_peer_are_held_and_shown_once_when_it_logs_on() -> Result<()> {
    let tracker = Tracker::start().await?;
    let bob_dir = tempfile::tempdir()?;
    // bob has been here before (his name and sealing key are known), then left.
    let bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    logged_out(bob).await?;

    let alice_dir = tempfile::tempdir()?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(alice_dir.path())
        .start()
        .await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = alice
            .send("bob", &format!("while you were out {i}"))
            .await?;
        alice
            .expect_event("held", |v| v["msg_id"] == id.as_str())
            .await?;
        ids.push(id);
    }

    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    for (i, id) in ids.iter().enumerate() {
        let msg = bob
            .expect_event("message", |v| v["msg_id"] == id.as_str())
            .await?;
        assert_eq!(msg["text"], format!("while you were out {i}"));
        assert_eq!(msg["from"], "alice");
        assert_eq!(msg["path"], "held");
        let delivered = alice
            .expect_event("delivered", |v| v["msg_id"] == id.as_str())
            .await?;
        assert_eq!(delivered["path"], "held");
    }
    // Shown once: a restart of bob does not show them again.
    logged_out(bob).await?;
    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    let again = bob
        .expect_event_within("message", Duration::from_secs(2), |_| true)
        .await;
    assert!(again.is_err(), "a held message was shown twice: {again:?}");

    // The receipt waits for a sender who has gone offline too.
    logged_out(bob).await?;
    let late = alice.send("bob", "see you later").await?;
    alice
        .expect_event("held", |v| v["msg_id"] == late.as_str())
        .await?;
    logged_out(alice).await?;
    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    bob.expect_event("message", |v| v["msg_id"] == late.as_str())
        .await?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(alice_dir.path())
        .start()
        .await?;
    let delivered = alice
        .expect_event("delivered", |v| v["msg_id"] == late.as_str())
        .await?;
    assert_eq!(delivered["path"], "held");
    let outbox = alice.command(json!({"cmd": "outbox"})).await?;
    assert_eq!(outbox["pending"], 0, "{outbox}");
    Ok(())
}

/// The receipt of a held message comes from a recipient who just logged on:
/// the sender hears that the recipient is online before it hears the
/// message was delivered. In broadcast mode the tracker holds presence back
/// for up to `PRESENCE_COALESCE` while the receipt is forwarded at once; in
/// subscribe mode the two travel through separate queues of the session.
#[tokio::test]
async fn the_sender_sees_the_recipient_come_online_before_its_held_message_is_delivered()
-> Result<()> {
    for mode in [&[][..], &["--presence", "subscribe"][..]] {
        let tracker = Tracker::start_with(mode).await?;
        let (bob_dir, mut alice, id) = held_for_absent_bob(&tracker, "while you were out").await?;
        let _bob = PeerOpts::new("bob", &tracker, Mode::Json)
            .dir(bob_dir.path())
            .start()
            .await?;
        let first = alice
            .expect_json("bob online, or the delivery", WAIT, |v| {
                (v["event"] == "presence" && v["name"] == "bob" && v["online"] == true)
                    || (v["event"] == "delivered" && v["msg_id"] == id.as_str())
            })
            .await?;
        assert_eq!(
            first["event"], "presence",
            "tracker {mode:?}: delivered before bob was seen online: {first}"
        );
        let delivered = alice
            .expect_event("delivered", |v| v["msg_id"] == id.as_str())
            .await?;
        assert_eq!(delivered["path"], "held");
    }
    Ok(())
}

#[tokio::test]
async fn a_held_message_that_expires_becomes_undeliverable_for_the_sender() -> Result<()> {
    let tracker = Tracker::start_with(&["--held-ttl", "2s"]).await?;
    let (bob_dir, mut alice, id) = held_for_absent_bob(&tracker, "too late").await?;
    let gone = alice
        .expect_event("undeliverable", |v| v["msg_id"] == id.as_str())
        .await?;
    assert!(
        gone["reason"].as_str().unwrap_or("").contains("expired"),
        "{gone}"
    );

    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    let shown = bob
        .expect_event_within("message", Duration::from_secs(2), |_| true)
        .await;
    assert!(
        shown.is_err(),
        "an expired message was delivered: {shown:?}"
    );
    Ok(())
}

#[tokio::test]
async fn with_no_offline_a_message_to_an_absent_peer_bounces_at_once() -> Result<()> {
    let tracker = Tracker::start().await?;
    let bob = Peer::start_json("bob", &tracker).await?;
    logged_out(bob).await?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .arg("--no-offline")
        .start()
        .await?;
    let id = alice.send("bob", "anyone?").await?;
    let bounce = alice
        .expect_event("undeliverable", |v| v["msg_id"] == id.as_str())
        .await?;
    assert!(
        bounce["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not logged on"),
        "{bounce}"
    );
    Ok(())
}

#[tokio::test]
async fn unsent_messages_survive_a_sender_crash_and_are_sent_after_restart() -> Result<()> {
    let mut tracker = Tracker::start().await?;
    let alice_dir = tempfile::tempdir()?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(alice_dir.path())
        .start()
        .await?;
    // With the tracker gone, a message to someone alice has never seen can
    // go nowhere yet: it must wait in the outbox, not fail, not vanish.
    tracker.kill().await?;
    let id = alice.send("carol", "wait for me").await?;
    let outbox = alice.command(json!({"cmd": "outbox"})).await?;
    assert_eq!(outbox["pending"], 1, "{outbox}");
    alice.kill().await?;

    let tracker = tracker.restart().await?;
    let mut carol = Peer::start_json("carol", &tracker).await?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(alice_dir.path())
        .start()
        .await?;
    let msg = carol
        .expect_event("message", |v| v["msg_id"] == id.as_str())
        .await?;
    assert_eq!(msg["text"], "wait for me");
    alice
        .expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    let history = alice
        .command(json!({"cmd": "history", "with": "carol", "limit": 5}))
        .await?;
    let messages = history["messages"].as_array().context("messages")?;
    assert_eq!(messages.len(), 1, "{history}");
    assert_eq!(messages[0]["state"], "delivered");
    Ok(())
}

#[tokio::test]
async fn messages_sent_the_instant_before_a_crash_are_not_lost() -> Result<()> {
    // The rows of peer.db follow a few milliseconds behind; peer.journal
    // must carry what the user sent in between.
    let mut tracker = Tracker::start().await?;
    let alice_dir = tempfile::tempdir()?;
    // peer.db lags a minute behind: only the journal can have them.
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(alice_dir.path())
        .arg("--store-linger-ms")
        .arg("60000")
        .start()
        .await?;
    tracker.kill().await?;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(alice.send("carol", &format!("last words {i}")).await?);
    }
    // No other command in between: killed right after the last reply.
    alice.kill().await?;

    let tracker = tracker.restart().await?;
    let mut carol = Peer::start_json("carol", &tracker).await?;
    let _alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(alice_dir.path())
        .start()
        .await?;
    for (i, id) in ids.iter().enumerate() {
        let msg = carol
            .expect_event("message", |v| v["msg_id"] == id.as_str())
            .await?;
        assert_eq!(msg["text"], format!("last words {i}"));
    }
    Ok(())
}

#[tokio::test]
async fn history_shows_both_directions_in_text_and_json() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_text("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let id = alice.send("bob", "first").await?;
    alice
        .expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    bob.type_line("/msg alice second").await?;
    alice
        .expect_event("message", |v| v["text"] == "second")
        .await?;
    bob.expect_line("bob's delivered status", |l| {
        l.contains("to alice: delivered")
    })
    .await?;
    let h = alice
        .command(json!({"cmd": "history", "with": "bob"}))
        .await?;
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["first", "second"]);
    bob.type_line("/history alice").await?;
    bob.expect_line("the history line", |l| {
        l.starts_with("  ") && l.contains("alice: first")
    })
    .await?;
    bob.expect_line("the history line", |l| {
        l.contains("bob: second") && l.contains("delivered")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_changed_key_is_refused_until_the_user_accepts_it() -> Result<()> {
    // No retention: a new key may take a name as soon as its owner leaves.
    let tracker = Tracker::start_with(&["--name-retention", "0s"]).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let bob = Peer::start_json("bob", &tracker).await?;
    alice
        .expect_event("presence", |v| v["name"] == "bob" && v["online"] == true)
        .await?;
    logged_out(bob).await?;

    // Someone else (a new key) is "bob" now.
    let mut new_bob = Peer::start_json("bob", &tracker).await?;
    let changed = alice
        .expect_event("key_changed", |v| v["name"] == "bob")
        .await?;
    assert_ne!(changed["pinned"], changed["announced"]);
    // /verify shows the trusted key, and the new one apart from it.
    let keys = alice
        .command(json!({"cmd": "verify", "name": "bob"}))
        .await?;
    assert_eq!(keys["pinned"], changed["pinned"], "{keys}");
    assert_eq!(keys["pending"], changed["announced"], "{keys}");
    assert_eq!(keys["announced"], changed["announced"], "{keys}");
    let id = alice.send("bob", "is that you?").await?;
    let refused = alice
        .expect_event("undeliverable", |v| v["msg_id"] == id.as_str())
        .await?;
    assert!(
        refused["reason"]
            .as_str()
            .unwrap_or("")
            .contains("key changed"),
        "{refused}"
    );

    let accepted = alice
        .command(json!({"cmd": "accept_key", "name": "bob"}))
        .await?;
    assert_eq!(accepted["ok"], true, "{accepted}");
    assert_eq!(accepted["peer_id"], changed["announced"]);
    let keys = alice
        .command(json!({"cmd": "verify", "name": "bob"}))
        .await?;
    assert_eq!(keys["pinned"], changed["announced"], "{keys}");
    assert_eq!(keys["pending"], Value::Null, "{keys}");
    let id = alice.send("bob", "welcome, new bob").await?;
    alice
        .expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    new_bob
        .expect_event("message", |v| v["msg_id"] == id.as_str())
        .await?;
    Ok(())
}

#[tokio::test]
async fn an_unreadable_database_is_a_clear_error_and_is_left_untouched() -> Result<()> {
    let tracker = Tracker::start().await?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("peer.db");
    let garbage = vec![0x5au8; 8192];
    std::fs::write(&db, &garbage)?;
    let mut peer = PeerOpts::new("alice", &tracker, Mode::Text)
        .dir(dir.path())
        .spawn()?;
    let status = peer.wait_exit(WAIT).await?;
    assert!(!status.success());
    let stderr = peer.stderr();
    assert!(stderr.contains("peer.db"), "{stderr}");
    assert_eq!(std::fs::read(&db)?, garbage, "the database was modified");
    Ok(())
}

#[tokio::test]
async fn quit_right_after_sending_lets_the_message_be_delivered_first() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_text("alice", &tracker).await?;
    alice.type_line("/msg bob see you tomorrow").await?;
    alice.type_line("/quit").await?;
    alice
        .expect_line("the delivered line", |l| l.contains("to bob: delivered ("))
        .await?;
    alice
        .expect_line("the goodbye line", |l| l == "logged out. Goodbye.")
        .await?;
    assert!(alice.wait_exit(WAIT).await?.success());
    bob.expect_event("message", |v| v["text"] == "see you tomorrow")
        .await?;
    Ok(())
}

#[tokio::test]
async fn what_is_still_on_its_way_at_quit_stays_in_the_outbox_and_the_user_is_told() -> Result<()> {
    use rustix::process::Signal;
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let alice_dir = tempfile::tempdir()?;
    let alice_opts = || PeerOpts::new("alice", &tracker, Mode::Text).dir(alice_dir.path());
    let mut alice = alice_opts().start().await?;
    // bob is frozen: still online for the tracker (for a few seconds), but
    // neither a dial nor a relay circuit reaches him.
    bob.signal(Signal::STOP)?;
    alice.type_line("/msg bob are you there").await?;
    alice.type_line("/quit").await?;
    let quit = std::time::Instant::now();
    let warned = alice
        .expect_line("the outbox warning", |l| {
            l.contains("1 message not delivered yet: kept in the outbox")
        })
        .await;
    bob.signal(Signal::CONT)?;
    warned?;
    alice
        .expect_line("the goodbye line", |l| l == "logged out. Goodbye.")
        .await?;
    assert!(alice.wait_exit(WAIT).await?.success());
    assert!(
        quit.elapsed() < Duration::from_secs(8),
        "quitting took {:?}",
        quit.elapsed()
    );
    // At the next start the message goes out, and bob sees it.
    let _alice = alice_opts().start().await?;
    bob.expect_event("message", |v| v["text"] == "are you there")
        .await?;
    Ok(())
}

/// The `Node` API, in this process: a front end that sends from the task
/// that also reads the events, and has fallen behind on them, is not made to
/// wait on itself by `send` while the conversation queue has room.
#[tokio::test]
async fn send_does_not_wait_on_a_front_end_that_has_fallen_behind() -> Result<()> {
    use tincan_peer::{Config, Event, Node};
    use tincan_proto::{Name, PeerId};
    let tracker = Tracker::start().await?;
    let key = PeerId::from_hex(&tracker.key)?;
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let node = |name: &str, dir: &std::path::Path| {
        let mut config = Config::new(Name::parse(name)?, tracker.addr.clone(), dir);
        config.tracker_key = Some(key);
        config.bind = "127.0.0.1:0".parse()?;
        anyhow::Ok(config)
    };
    let (bob, mut bob_events) = Node::start(node("bob", dirs.1.path())?).await?;
    // bob's front end keeps up.
    let shown = tokio::spawn(async move {
        let mut shown = 0;
        while let Some(event) = bob_events.recv().await {
            if matches!(event, Event::Message { .. }) {
                shown += 1;
            }
        }
        shown
    });
    let (alice, mut alice_events) = Node::start(node("alice", dirs.0.path())?).await?;
    tokio::time::timeout(WAIT, async {
        while let Some(event) = alice_events.recv().await {
            let heard = match &event {
                Event::ClientList { peers } => peers.iter().any(|p| p.name.as_str() == "bob"),
                Event::Presence { name, online, .. } => *online && name.as_str() == "bob",
                _ => false,
            };
            if heard {
                return;
            }
        }
    })
    .await
    .context("alice never heard of bob")?;
    // A first message brings the direct link up; then the conversation is
    // idle, and the next messages take the quick path.
    let first = alice.send("bob", "hello").await?;
    tokio::time::timeout(WAIT, async {
        while let Some(event) = alice_events.recv().await {
            if matches!(event, Event::Delivered { id, .. } if id == first) {
                return;
            }
        }
    })
    .await
    .context("the first message was not delivered")?;
    // alice's front end reads no event while it sends: each message makes
    // `sent` and `delivered`, so the event queue fills after about half of
    // EVENT_QUEUE messages.
    const N: usize = tincan_peer::node::EVENT_QUEUE;
    for i in 0..N {
        tokio::time::timeout(Duration::from_secs(10), alice.send("bob", &format!("m{i}")))
            .await
            .with_context(|| format!("send {i} of {N} waited on the unread events"))??;
    }
    // It catches up: every message is delivered and shown.
    let mut delivered = 0;
    tokio::time::timeout(WAIT, async {
        while delivered < N {
            match alice_events.recv().await {
                Some(Event::Delivered { .. }) => delivered += 1,
                Some(_) => {}
                None => break,
            }
        }
    })
    .await
    .with_context(|| format!("only {delivered} of {N} delivered"))?;
    assert_eq!(delivered, N);
    alice.shutdown().await;
    bob.shutdown().await;
    drop(bob);
    let shown = tokio::time::timeout(WAIT, shown).await??;
    assert_eq!(shown, N + 1);
    Ok(())
}
