//! A tracker in subscribe mode (`tracker --presence subscribe`), with the
//! real binaries and with a raw client: a peer hears only about the names it
//! follows, messages still flow (a name never heard of is looked up), the
//! list of everyone can be paged, and the subscription limit is enforced by
//! closing that one connection.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, Result, bail};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tincan_proto::{
    Name, close,
    tls::Identity,
    tracker::{FromTracker, PresenceChange, ToTracker},
};
use tincan_tests::{
    Mode, Peer, PeerOpts, Tracker, WAIT, peer_names,
    raw::{
        Following, TrackerReader, closed_with, enroll_following, frame_where, hello_thanks,
        hello_thanks_ahead, next_frame, subscribed,
    },
};

/// The names in the `Subscribed` pages up to the last one.
async fn subscribed_names(reader: &mut TrackerReader) -> Result<Vec<String>> {
    Ok(subscribed(reader)
        .await?
        .iter()
        .map(|p| p.name.to_string())
        .collect())
}

async fn subscribe_tracker() -> Result<Tracker> {
    Tracker::start_with(&["--presence", "subscribe"]).await
}

/// Every line the peer printed that no expectation consumed yet, up to the
/// moment its output stays quiet for a moment. Only for lines that, if they
/// exist, were printed before a line already matched.
async fn unconsumed(peer: &mut Peer) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(v) = peer.next_json(Duration::from_millis(300)).await {
        out.push(v);
    }
    out
}

#[tokio::test]
async fn a_peer_hears_the_names_it_follows_and_no_others() -> Result<()> {
    let tracker = subscribe_tracker().await?;
    let bob_dir = tempfile::tempdir()?;
    let mut bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    let mut carol = Peer::start_json("carol", &tracker).await?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json).spawn()?;
    let list = alice.expect_event("client_list", |_| true).await?;
    assert_eq!(list["presence"], "subscribe");
    assert_eq!(
        peer_names(&list),
        ["alice"],
        "no full list in subscribe mode"
    );

    // A name alice never heard of: looked up, reached directly, and followed.
    let id = alice.send("bob", "hi bob").await?;
    bob.expect_event("message", |v| v["text"] == "hi bob")
        .await?;
    alice
        .expect_event("delivered", |v| {
            v["msg_id"] == id.as_str() && v["path"] == "direct"
        })
        .await?;
    let who = alice.command(json!({"cmd": "who"})).await?;
    assert_eq!(who["presence"], "subscribe");
    assert_eq!(who["following"], json!(["bob"]));

    // carol, whom alice does not follow, leaves; then bob leaves and comes back.
    carol.command(json!({"cmd": "logout"})).await?;
    carol.wait_exit(WAIT).await?;
    bob.command(json!({"cmd": "logout"})).await?;
    bob.wait_exit(WAIT).await?;
    alice
        .expect_event("presence", |v| v["name"] == "bob" && v["online"] == false)
        .await?;
    let _bob = PeerOpts::new("bob", &tracker, Mode::Json)
        .dir(bob_dir.path())
        .start()
        .await?;
    alice
        .expect_event("presence", |v| v["name"] == "bob" && v["online"] == true)
        .await?;
    // carol's leave was published before bob's return, so alice would have
    // printed it by now: she did not.
    let heard_of_carol: Vec<Value> = unconsumed(&mut alice)
        .await
        .into_iter()
        .filter(|v| v["event"] == "presence" && v["name"] == "carol")
        .collect();
    assert!(heard_of_carol.is_empty(), "{heard_of_carol:?}");
    Ok(())
}

#[tokio::test]
async fn a_stranger_is_told_online_once_and_before_its_first_message() -> Result<()> {
    let tracker = subscribe_tracker().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    alice.send("bob", "hi, stranger").await?;
    // bob follows nobody: he learns of alice from her message (a lookup,
    // then a subscription), and must say so before showing it.
    let mut before = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let v = bob
            .next_json(left)
            .await
            .context("bob's events up to the message")?;
        if v["event"] == "message" {
            assert_eq!(v["text"], "hi, stranger");
            break;
        }
        before.push(v);
    }
    let online =
        |v: &Value| v["event"] == "presence" && v["name"] == "alice" && v["online"] == true;
    assert_eq!(
        before.iter().filter(|v| online(v)).count(),
        1,
        "alice's arrival, once, before her message: {before:?}"
    );
    // Now that bob follows her, her leaving is told too (and no second arrival).
    alice.command(json!({"cmd": "logout"})).await?;
    alice.wait_exit(WAIT).await?;
    let mut after = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let v = bob.next_json(left).await.context("alice's leaving")?;
        if v["event"] == "presence" && v["name"] == "alice" && v["online"] == false {
            break;
        }
        after.push(v);
    }
    assert!(!after.iter().any(online), "{after:?}");
    Ok(())
}

#[tokio::test]
async fn a_restarted_peer_follows_the_names_it_knows_and_both_directions_work() -> Result<()> {
    let tracker = subscribe_tracker().await?;
    let mut bob = Peer::start_text("bob", &tracker).await?;
    let alice_dir = tempfile::tempdir()?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(alice_dir.path())
        .start()
        .await?;
    let id = alice.send("bob", "first contact").await?;
    alice
        .expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    alice.command(json!({"cmd": "logout"})).await?;
    alice.wait_exit(WAIT).await?;

    // At its next enrollment alice follows bob (his key is pinned): he is on
    // her list at once, and his going away reaches her.
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(alice_dir.path())
        .spawn()?;
    let list = alice.expect_event("client_list", |_| true).await?;
    assert_eq!(peer_names(&list), ["alice", "bob"]);

    // bob heard alice's message, so he follows her: he sees her come back,
    // and can write to her (text front end).
    bob.expect_line("alice back online", |l| l == "* alice is online")
        .await?;
    bob.type_line("/msg alice hello again").await?;
    alice
        .expect_event("message", |v| {
            v["from"] == "bob" && v["text"] == "hello again"
        })
        .await?;
    bob.type_line("/who").await?;
    bob.expect_line("the /who header", |l| {
        l.starts_with("1 online among the 1 name you follow")
    })
    .await?;
    bob.expect_line("the hint", |l| l.contains("/who all"))
        .await?;

    bob.type_line("/quit").await?;
    alice
        .expect_event("presence", |v| v["name"] == "bob" && v["online"] == false)
        .await?;
    Ok(())
}

#[tokio::test]
async fn paging_the_list_returns_everyone_exactly_once() -> Result<()> {
    let tracker = subscribe_tracker().await?;
    let mut raw = Vec::new();
    for i in 0..7 {
        raw.push(
            enroll_following(&Identity::generate()?, &tracker.addr, &format!("P{i}"), &[]).await?,
        );
    }
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let mut everyone: BTreeSet<String> = (0..7).map(|i| format!("P{i}")).collect();
    everyone.insert("alice".into());

    // The JSON front end, two at a time.
    let mut seen = Vec::new();
    let mut after = Value::Null;
    for page in 0.. {
        let reply = alice
            .command(json!({"cmd": "list", "after": after, "limit": 2}))
            .await?;
        assert_eq!(reply["ok"], true, "{reply}");
        let peers = reply["peers"].as_array().context("peers")?;
        assert!(peers.len() <= 2, "{reply}");
        seen.extend(
            peers
                .iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string)),
        );
        after = peers.last().map_or(Value::Null, |p| p["name"].clone());
        if reply["more"] == false {
            break;
        }
        assert!(page < 10, "paging does not end");
    }
    assert_eq!(seen.len(), everyone.len(), "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), everyone);

    // The raw protocol, three at a time.
    let Following { reader, writer, .. } = &mut raw[0];
    let mut seen = Vec::new();
    let mut after: Option<Name> = None;
    for req in 0.. {
        writer
            .send(ToTracker::ListPage {
                req,
                after: after.clone(),
                limit: 3,
            })
            .await?;
        let reply = frame_where(
            reader,
            "a ListPageReply",
            |f| matches!(f, FromTracker::ListPageReply { req: r, .. } if *r == req),
        )
        .await?;
        let FromTracker::ListPageReply { peers, more, .. } = reply else {
            bail!("not a ListPageReply: {reply:?}");
        };
        assert!(peers.len() <= 3);
        after = peers.last().map(|p| p.name.clone());
        seen.extend(peers.into_iter().map(|p| p.name.to_string()));
        if !more {
            break;
        }
        assert!(req < 10, "paging does not end");
    }
    assert_eq!(seen.len(), everyone.len(), "{seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), everyone);
    Ok(())
}

#[tokio::test]
async fn a_raw_follower_hears_its_names_in_order_and_can_unsubscribe() -> Result<()> {
    let tracker = subscribe_tracker().await?;
    let _bob = Peer::start_json("bob", &tracker).await?;
    let mut me = enroll_following(
        &Identity::generate()?,
        &tracker.addr,
        "me",
        &["bob", "carol"],
    )
    .await?;
    let online: Vec<String> = me.online.iter().map(|p| p.name.to_string()).collect();
    assert_eq!(online, ["bob"]);
    assert!(me.max_subscriptions >= 8, "{}", me.max_subscriptions);

    // dave is not followed, carol is: only carol's join arrives (dave's
    // would have come first).
    let mut dave = Peer::start_json("dave", &tracker).await?;
    let mut carol = Peer::start_json("carol", &tracker).await?;
    let joined = next_frame(&mut me.reader).await?;
    assert!(
        matches!(&joined, FromTracker::Presence(PresenceChange::Joined(p)) if p.name.as_str() == "carol"),
        "{joined:?}"
    );

    // Unsubscribed from carol and subscribed to dave (answered with his
    // state): dave's leave arrives, carol's (earlier) does not.
    me.writer
        .send(ToTracker::Unsubscribe {
            names: vec![Name::parse("carol")?],
        })
        .await?;
    // Unsubscribe has no answer; the tracker reads a peer's frames in order,
    // so once a lookup sent after it is answered, it has been done.
    me.writer
        .send(ToTracker::Lookup {
            req: 1,
            name: Name::parse("carol")?,
        })
        .await?;
    frame_where(&mut me.reader, "the lookup reply", |f| {
        matches!(f, FromTracker::LookupReply { req: 1, .. })
    })
    .await?;
    carol.command(json!({"cmd": "logout"})).await?;
    carol.wait_exit(WAIT).await?;
    me.writer
        .send(ToTracker::Subscribe {
            names: vec![Name::parse("DAVE")?],
        })
        .await?;
    // Nothing else comes in between (no word of carol).
    let reply = next_frame(&mut me.reader).await?;
    let FromTracker::Subscribed { peers, last: true } = reply else {
        bail!("expected the Subscribed reply, got {reply:?}");
    };
    assert_eq!(
        peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["dave"]
    );
    dave.command(json!({"cmd": "logout"})).await?;
    dave.wait_exit(WAIT).await?;
    let left = frame_where(&mut me.reader, "a presence change", |f| {
        matches!(f, FromTracker::Presence(_))
    })
    .await?;
    assert!(
        matches!(&left, FromTracker::Presence(PresenceChange::Left { name, .. }) if name.as_str() == "dave"),
        "{left:?}"
    );
    Ok(())
}

#[tokio::test]
async fn following_beyond_the_limit_closes_that_connection_only() -> Result<()> {
    let tracker = subscribe_tracker().await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;

    // Up to the announced limit is fine, even in several requests...
    let mut me = enroll_following(&Identity::generate()?, &tracker.addr, "greedy", &[]).await?;
    let max = usize::try_from(me.max_subscriptions)?;
    let all: Vec<Name> = (0..max)
        .map(|i| Name::parse(&format!("n{i}")))
        .collect::<Result<_, _>>()?;
    for chunk in all.chunks(max / 2 + 1) {
        me.writer
            .send(ToTracker::Subscribe {
                names: chunk.to_vec(),
            })
            .await?;
        subscribed(&mut me.reader).await?;
    }
    // ...one name more is not.
    me.writer
        .send(ToTracker::Subscribe {
            names: vec![Name::parse("one-more")?],
        })
        .await?;
    assert_eq!(closed_with(&me.conn).await?, u64::from(close::PROTOCOL));

    // So is a first Subscribe over the limit, during enrollment.
    let (conn, mut reader, mut writer) =
        hello_thanks(&Identity::generate()?, &tracker.addr, "greedier").await?;
    let mode = next_frame(&mut reader).await?;
    assert!(
        matches!(mode, FromTracker::SubscribeMode { .. }),
        "{mode:?}"
    );
    let mut too_many = all.clone();
    too_many.push(Name::parse("one-more")?);
    writer
        .send(ToTracker::Subscribe { names: too_many })
        .await?;
    assert_eq!(closed_with(&conn).await?, u64::from(close::PROTOCOL));

    // And an enrollment that skips its Subscribe.
    let (conn, mut reader, mut writer) =
        hello_thanks(&Identity::generate()?, &tracker.addr, "skipper").await?;
    next_frame(&mut reader).await?;
    writer.send(ToTracker::Logout).await?;
    assert_eq!(closed_with(&conn).await?, u64::from(close::PROTOCOL));

    // Everyone else is still served: a message between two peers goes through.
    let _bob = Peer::start_json("bob", &tracker).await?;
    let id = alice.send("bob", "still here").await?;
    alice
        .expect_event("delivered", |v| v["msg_id"] == id.as_str())
        .await?;
    Ok(())
}

#[tokio::test]
async fn who_all_pages_through_everyone_in_the_text_front_end() -> Result<()> {
    let tracker = subscribe_tracker().await?;
    let _bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_text("alice", &tracker).await?;
    alice
        .expect_line("the empty list", |l| {
            l.starts_with("* you follow nobody yet")
        })
        .await?;
    alice.type_line("/who all").await?;
    alice
        .expect_line("the page header", |l| l == "everyone online, 2 from here:")
        .await?;
    alice
        .expect_line("bob's line", |l| l.trim_start().starts_with("bob "))
        .await?;
    alice
        .expect_line("the end of the list", |l| l.contains("(end of the list)"))
        .await?;
    alice.type_line("/who all alice").await?;
    alice
        .expect_line("the second page", |l| l == "everyone online, 1 from here:")
        .await?;
    Ok(())
}

#[tokio::test]
async fn names_sent_ahead_with_hello_are_followed_without_a_subscribe() -> Result<()> {
    let tracker = subscribe_tracker().await?;
    let _bob = Peer::start_json("bob", &tracker).await?;
    let names = |list: &[&str]| {
        list.iter()
            .map(|n| Name::parse(n))
            .collect::<Result<Vec<_>, _>>()
    };

    // Hello (following bob and carol) and Thanks in one flight: Welcome,
    // SubscribeMode and the state of bob and carol come back, and no
    // Subscribe is needed.
    let (_conn, mut reader, _writer) = hello_thanks_ahead(
        &Identity::generate()?,
        &tracker.addr,
        "me",
        Some(names(&["bob", "carol"])?),
    )
    .await?;
    let mode = next_frame(&mut reader).await?;
    let FromTracker::SubscribeMode { max_subscriptions } = mode else {
        bail!("expected SubscribeMode, got {mode:?}");
    };
    assert_eq!(subscribed_names(&mut reader).await?, ["bob"]);
    // carol is followed, dave is not: only carol's join arrives.
    let _dave = Peer::start_json("dave", &tracker).await?;
    let _carol = Peer::start_json("carol", &tracker).await?;
    let joined = next_frame(&mut reader).await?;
    assert!(
        matches!(&joined, FromTracker::Presence(PresenceChange::Joined(p)) if p.name.as_str() == "carol"),
        "{joined:?}"
    );

    // More names than the limit: the first max_subscriptions are followed
    // (bob, last, is not) and the enrollment goes on.
    let mut many: Vec<Name> = (0..max_subscriptions)
        .map(|i| Name::parse(&format!("n{i}")))
        .collect::<Result<_, _>>()?;
    many.push(Name::parse("bob")?);
    let (_conn, mut reader, _writer) =
        hello_thanks_ahead(&Identity::generate()?, &tracker.addr, "many", Some(many)).await?;
    let mode = next_frame(&mut reader).await?;
    assert!(
        matches!(mode, FromTracker::SubscribeMode { .. }),
        "{mode:?}"
    );
    assert_eq!(subscribed(&mut reader).await?, []);
    Ok(())
}

#[tokio::test]
async fn thanks_sent_ahead_without_names_is_welcomed_before_the_tracker_waits_for_subscribe()
-> Result<()> {
    // The tracker holds Welcome back while more of the peer's frames are
    // buffered; it must still send it before it waits for a Subscribe
    // that the peer sends only once it has seen SubscribeMode.
    let tracker = subscribe_tracker().await?;
    let _bob = Peer::start_json("bob", &tracker).await?;
    let (_conn, mut reader, mut writer) =
        hello_thanks_ahead(&Identity::generate()?, &tracker.addr, "me", None).await?;
    let mode = next_frame(&mut reader).await?;
    assert!(
        matches!(mode, FromTracker::SubscribeMode { .. }),
        "{mode:?}"
    );
    writer
        .send(ToTracker::Subscribe {
            names: vec![Name::parse("bob")?],
        })
        .await?;
    assert_eq!(subscribed_names(&mut reader).await?, ["bob"]);
    Ok(())
}

#[tokio::test]
async fn a_tracker_in_broadcast_mode_ignores_names_sent_ahead() -> Result<()> {
    let tracker = Tracker::start().await?;
    let _bob = Peer::start_json("bob", &tracker).await?;
    let (_conn, mut reader, mut writer) = hello_thanks_ahead(
        &Identity::generate()?,
        &tracker.addr,
        "me",
        Some(vec![Name::parse("carol")?]),
    )
    .await?;
    // The classic full list (everyone, not just the names followed)...
    let mut listed = BTreeSet::new();
    loop {
        match next_frame(&mut reader).await? {
            FromTracker::ClientList { peers, last } => {
                listed.extend(peers.iter().map(|p| p.name.to_string()));
                if last {
                    break;
                }
            }
            other => bail!("expected the client list, got {other:?}"),
        }
    }
    assert_eq!(
        listed,
        BTreeSet::from(["bob".to_string(), "me".to_string()])
    );
    // ...and nothing else: the next frame answers a lookup sent now.
    writer
        .send(ToTracker::Lookup {
            req: 7,
            name: Name::parse("bob")?,
        })
        .await?;
    let reply = next_frame(&mut reader).await?;
    assert!(
        matches!(
            reply,
            FromTracker::LookupReply {
                req: 7,
                peer: Some(_)
            }
        ),
        "{reply:?}"
    );
    Ok(())
}
