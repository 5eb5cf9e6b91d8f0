//! Bad input gets a clear error and nothing crashes: from the command line,
//! from the user's commands, and from the network.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tincan_tests::{Mode, Peer, PeerOpts, Tracker, WAIT, binary};

/// Runs a binary to completion (bounded) and returns (exit code, stderr).
async fn run_to_end(program: &str, args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(binary(program)?)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("process did not finish in time")??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs a peer `alice` with a fresh data directory against the tracker
/// address `addr` until it exits; returns (exit code, stderr).
async fn alice_against(addr: &str) -> Result<(Option<i32>, String)> {
    let dir = tempfile::tempdir()?;
    run_to_end(
        "peer",
        &[
            "--name",
            "alice",
            "--tracker",
            addr,
            "--data-dir",
            dir.path().to_str().context("path")?,
        ],
    )
    .await
}

#[tokio::test]
async fn taken_name_is_refused_while_its_owner_is_online() -> Result<()> {
    let tracker = Tracker::start().await?;
    let _alice = Peer::start_json("alice", &tracker).await?;
    let mut other = PeerOpts::new("ALICE", &tracker, Mode::Text).spawn()?;
    let status = other.wait_exit(WAIT).await?;
    assert!(!status.success());
    let stderr = other.stderr();
    assert!(stderr.contains("in use"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("peer:")).count(),
        1,
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn unreachable_tracker_is_a_clear_error_after_a_bounded_wait() -> Result<()> {
    // A UDP port nobody listens on: the tracker is simply not there.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = socket.local_addr()?.to_string();
    drop(socket);
    let started = Instant::now();
    let (code, stderr) = alice_against(&addr).await?;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("cannot reach the tracker"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(12));
    Ok(())
}

#[tokio::test]
async fn oversized_message_is_refused_and_nothing_is_sent() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut bob = Peer::start_json("bob", &tracker).await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let big = "x".repeat(64 * 1024 + 1);
    let reply = alice
        .command(json!({"cmd": "send", "to": "bob", "text": big}))
        .await?;
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap_or("").contains("limit"),
        "{reply}"
    );
    // Exactly at the limit is fine.
    let max = "y".repeat(64 * 1024);
    let id = alice.send("bob", &max).await?;
    let msg = bob.expect_event("message", |_| true).await?;
    assert_eq!(
        msg["msg_id"],
        id.as_str(),
        "the oversized message must not arrive"
    );
    Ok(())
}

#[tokio::test]
async fn an_overlong_or_non_utf8_input_line_is_refused_and_the_next_lines_still_run() -> Result<()>
{
    let tracker = Tracker::start().await?;
    let mut text = Peer::start_text("alice", &tracker).await?;
    // Past the line limit (six times the body limit, for JSON escapes).
    text.type_line(&format!("/msg bob {}", "x".repeat(6 * 64 * 1024 + 1024)))
        .await?;
    text.expect_line("the refusal", |l| l.contains("input line longer than"))
        .await?;
    text.type_bytes(b"/msg bob caf\xe9").await?;
    text.expect_line("the refusal", |l| l.contains("not UTF-8"))
        .await?;
    text.type_line("/help").await?;
    text.expect_line("the help after both", |l| l.contains("/msg NAME TEXT"))
        .await?;

    let mut json = Peer::start_json("bob", &tracker).await?;
    json.type_line(&format!(
        r#"{{"id":1,"cmd":"send","to":"alice","text":"{}"}}"#,
        "y".repeat(6 * 64 * 1024 + 1024)
    ))
    .await?;
    let err = json
        .expect_json("the refusal", WAIT, |v| v["ok"] == false)
        .await?;
    assert!(
        err["error"].as_str().unwrap_or("").contains("longer than"),
        "{err}"
    );
    // A maximal body with every byte escaped still fits in a line.
    let escaped = "\\u0041".repeat(64 * 1024);
    json.type_line(&format!(
        r#"{{"id":2,"cmd":"send","to":"alice","text":"{escaped}"}}"#
    ))
    .await?;
    let sent = json
        .expect_json("the reply to the escaped send", WAIT, |v| v["id"] == 2)
        .await?;
    assert_eq!(sent["ok"], true, "{sent}");
    let who = json.command(json!({"cmd": "who"})).await?;
    assert_eq!(who["ok"], true);
    Ok(())
}

#[tokio::test]
async fn unknown_commands_get_a_help_hint() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut text = Peer::start_text("alice", &tracker).await?;
    text.type_line("/frobnicate").await?;
    text.expect_line("the hint", |l| {
        l.contains("unknown command /frobnicate") && l.contains("/help")
    })
    .await?;
    text.type_line("/help").await?;
    text.expect_line("the help", |l| l.contains("/msg NAME TEXT"))
        .await?;
    // A known command without its argument gets its usage.
    text.type_line("/accept").await?;
    text.expect_line("the usage", |l| l == "usage: /accept NAME")
        .await?;

    let mut json = Peer::start_json("bob", &tracker).await?;
    let reply = json.command(json!({"cmd": "frobnicate"})).await?;
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap_or("").contains("send"),
        "{reply}"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_json_gets_an_error_line_and_the_peer_keeps_going() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json).start().await?;
    alice.type_line("{not json").await?;
    let err = alice
        .expect_json("an error line", WAIT, |v| v["ok"] == false)
        .await?;
    assert!(
        err["error"].as_str().unwrap_or("").contains("invalid JSON"),
        "{err}"
    );
    let who = alice.command(json!({"cmd": "who"})).await?;
    assert_eq!(who["ok"], true);
    Ok(())
}

#[tokio::test]
async fn json_fields_of_the_wrong_kind_are_named_in_the_error() -> Result<()> {
    let tracker = Tracker::start().await?;
    let mut alice = Peer::start_json("alice", &tracker).await?;
    let error_of = |v: &serde_json::Value| {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().unwrap_or("").to_string()
    };
    let reply = alice.command(json!({"cmd": 42})).await?;
    assert!(
        error_of(&reply).contains("\"cmd\" must be a string"),
        "{reply}"
    );
    for limit in [json!(-1), json!(0), json!(2.5), json!("ten")] {
        let reply = alice
            .command(json!({"cmd": "history", "with": "bob", "limit": limit}))
            .await?;
        assert!(error_of(&reply).contains("\"limit\""), "{reply}");
        let reply = alice
            .command(json!({"cmd": "list", "limit": limit}))
            .await?;
        assert!(error_of(&reply).contains("\"limit\""), "{reply}");
    }
    // Too large is capped, not refused.
    let reply = alice
        .command(json!({"cmd": "history", "with": "bob", "limit": u64::MAX}))
        .await?;
    assert_eq!(reply["ok"], true, "{reply}");

    let mut text = Peer::start_text("bob", &tracker).await?;
    text.type_line("/history alice 0").await?;
    text.expect_line("the usage", |l| l.starts_with("usage: /history NAME [N]"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_tracker_whose_key_changed_is_refused_loudly() -> Result<()> {
    let mut tracker = Tracker::start().await?;
    let dir = tempfile::tempdir()?;
    let mut alice = PeerOpts::new("alice", &tracker, Mode::Json)
        .dir(dir.path())
        .start()
        .await?;
    alice.command(json!({"cmd": "logout"})).await?;
    alice.wait_exit(WAIT).await?;
    // Same address, new identity (a fresh data directory).
    let addr = tracker.addr.clone();
    tracker.kill().await?;
    let other_dir = tempfile::tempdir()?;
    let impostor = Tracker::start_at(&addr, other_dir.path()).await?;
    let mut alice = PeerOpts::new("alice", &impostor, Mode::Text)
        .dir(dir.path())
        .spawn()?;
    let status = alice.wait_exit(WAIT).await?;
    assert!(!status.success());
    let stderr = alice.stderr();
    assert!(stderr.contains("TRACKER KEY CHANGED"), "{stderr}");
    assert!(
        stderr.contains(&impostor.key),
        "the new key is shown in full: {stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_tracker_key_given_on_the_command_line_is_insisted_on() -> Result<()> {
    let tracker = Tracker::start().await?;
    let wrong = "ab".repeat(32);
    let mut refused = PeerOpts::new("alice", &tracker, Mode::Text)
        .arg("--tracker-key")
        .arg(&wrong)
        .spawn()?;
    assert!(!refused.wait_exit(WAIT).await?.success());
    assert!(
        refused.stderr().contains("TRACKER KEY CHANGED"),
        "{}",
        refused.stderr()
    );
    let _ok = PeerOpts::new("alice", &tracker, Mode::Json)
        .arg("--tracker-key")
        .arg(&tracker.key)
        .start()
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_peer_of_an_older_protocol_version_is_refused_at_the_handshake() -> Result<()> {
    // Version 2 changed Hello; a version-1 peer offers ALPN tincan-tracker/1.
    let tracker = Tracker::start().await?;
    let old = tincan_tests::raw::connect_as(
        &tincan_proto::tls::Identity::generate()?,
        &tracker.addr,
        b"tincan-tracker/1",
        None,
    )
    .await;
    let err = old.err().context("an old peer completed a handshake")?;
    // TLS alert 120, no_application_protocol: "peer doesn't support any
    // known protocol".
    assert!(format!("{err:#}").contains("error 120"), "{err:#}");
    // The current version is welcome.
    tincan_tests::raw::enroll(
        &tincan_proto::tls::Identity::generate()?,
        &tracker.addr,
        "new",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_tracker_of_another_protocol_version_is_a_clear_final_error() -> Result<()> {
    // A QUIC server with tincan's TLS that offers only the version-1 ALPN,
    // as a tracker from before version 2 does.
    let identity = tincan_proto::tls::Identity::generate()?;
    let server = quinn::Endpoint::server(
        tincan_tracker::server_config(&identity, b"tincan-tracker/1")?,
        "127.0.0.1:0".parse()?,
    )?;
    let addr = server.local_addr()?.to_string();
    let accepting = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        }
    });
    let (code, stderr) = alice_against(&addr).await?;
    server.close(0u32.into(), b"done");
    accepting.abort();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("protocol version"), "{stderr}");
    Ok(())
}
