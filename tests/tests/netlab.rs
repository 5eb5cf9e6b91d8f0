//! The NAT lab (docs/netlab.md): the real `tracker` and `peer` binaries in a
//! topology of network namespaces with Linux NAT routers, 20 ms per router.
//!
//! For each pair of issue 3: messages are delivered both ways, and the
//! conversation's `path` event reaches "direct" where a direct path is
//! possible and "relay" where it is not. Plus a check of the lab itself, a
//! loss case, NAT mapping expiry against keep-alives, and a direct path that
//! dies. The ≥20-trial table for docs is the ignored `netlab_matrix` test.
//!
//! Needs root and nftables/iptables/conntrack: skipped with a printed reason
//! otherwise, except under CI=true, where that is a failure. Labs run one at a
//! time (the harness holds a lock), each torn down even when its test fails.

use std::{
    io::ErrorKind,
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tincan_tests::netlab::{
    self, DELIVERY_BOUND, Kind, Lab, Node, PAIRS, PATH_BOUND, Pair, Trial, TrialOpts, median,
};

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{} ms", d.as_millis()))
}

/// "median (max)" of the relay bytes before upgrade, or "–".
fn bytes_summary(bytes: &mut [u64]) -> String {
    if bytes.is_empty() {
        return "–".into();
    }
    bytes.sort_unstable();
    format!(
        "{} B (max {} B)",
        bytes[bytes.len() / 2],
        bytes[bytes.len() - 1]
    )
}

fn report(pair: &Pair, opts: &TrialOpts, t: &Trial) {
    println!(
        "netlab {}: delay {} ms, loss {} %: first delivery {} ({}), reply {} ({}), {} path {}",
        pair.label(),
        opts.delay_ms,
        opts.loss_pct,
        ms(t.first_delivery),
        t.first_path.as_deref().unwrap_or("-"),
        ms(t.reply_delivery),
        t.reply_path.as_deref().unwrap_or("-"),
        opts.await_path.unwrap_or("no"),
        ms(t.path_reached),
    );
}

/// Messages are shown both ways, on any path.
async fn delivers_both_ways(pair: Pair) -> Result<()> {
    let opts = TrialOpts::default();
    let Some(t) = netlab::trial(pair, &opts).await? else {
        return Ok(());
    };
    report(&pair, &opts, &t);
    if !t.delivered() {
        bail!("{}", t.failure.unwrap_or_default());
    }
    for p in [&t.first_path, &t.reply_path].into_iter().flatten() {
        ensure!(
            ["direct", "relay", "held"].contains(&p.as_str()),
            "unexpected message path {p:?}"
        );
    }
    Ok(())
}

/// The conversation reaches the pair's expected path within [`PATH_BOUND`],
/// and messages are shown both ways.
async fn reaches_expected_path(pair: Pair, loss_pct: u32) -> Result<()> {
    let want = pair.expected_path();
    let opts = TrialOpts {
        await_path: Some(want),
        loss_pct,
        ..TrialOpts::default()
    };
    let Some(t) = netlab::trial(pair, &opts).await? else {
        return Ok(());
    };
    report(&pair, &opts, &t);
    if let Some(f) = &t.failure {
        bail!("{f}");
    }
    ensure!(t.delivered() && t.path_reached.is_some());
    // With both peers online nothing should wait in the tracker's mailbox.
    for p in [&t.first_path, &t.reply_path].into_iter().flatten() {
        ensure!(
            p == "direct" || p == "relay",
            "a message between two online peers went {p:?}"
        );
    }
    if want == "relay" {
        ensure!(
            t.reply_path.as_deref() == Some("relay"),
            "{}: no direct path is possible, yet the reply went {:?}",
            pair.label(),
            t.reply_path
        );
    }
    Ok(())
}

macro_rules! pair_tests {
    ($($delivers:ident, $path:ident, $index:expr;)*) => {$(
        #[tokio::test]
        async fn $delivers() -> Result<()> {
            delivers_both_ways(PAIRS[$index]).await
        }

        #[tokio::test]
        async fn $path() -> Result<()> {
            reaches_expected_path(PAIRS[$index], 0).await
        }
    )*};
}

pair_tests! {
    public_public_delivers_both_ways, public_public_goes_direct, 0;
    cone_drop_public_delivers_both_ways, cone_drop_public_goes_direct, 1;
    cone_drop_cone_drop_delivers_both_ways, cone_drop_cone_drop_goes_direct, 2;
    cone_reject_cone_reject_delivers_both_ways, cone_reject_cone_reject_goes_direct, 3;
    public_symmetric_delivers_both_ways, public_symmetric_goes_direct, 4;
    cone_drop_symmetric_delivers_both_ways, cone_drop_symmetric_goes_relay, 5;
    udp_blocked_cone_drop_delivers_both_ways, udp_blocked_cone_drop_goes_relay, 6;
}

/// 20 ms per router and 1 % loss each way: still delivered, still direct.
#[tokio::test]
async fn cone_drop_cone_drop_with_one_percent_loss_goes_direct() -> Result<()> {
    reaches_expected_path(PAIRS[2], 1).await
}

// ---------------------------------------------------------------------------
// The lab itself: no product involved.

/// An echo service in a namespace: answers each datagram with the sender's
/// address as text. Stops when the returned flag is set (or after a minute).
fn echo(lab: &Lab, ns: &str, bind: &str) -> Result<Arc<AtomicBool>> {
    let socket = lab.udp_socket(ns, bind)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let end = Instant::now() + Duration::from_secs(60);
        while !flag.load(Ordering::Relaxed) && Instant::now() < end {
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(from.to_string().as_bytes(), from);
            }
        }
    });
    Ok(stop)
}

/// Sends one datagram and returns the echo's answer and the round trip, or
/// `None` when nothing comes back within a second.
fn probe(socket: &UdpSocket, to: &str) -> Result<Option<(String, Duration)>> {
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let t0 = Instant::now();
    socket.send_to(b"probe", to)?;
    let mut buf = [0u8; 1500];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => Ok(Some((
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            t0.elapsed(),
        ))),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Each router kind behaves as the facts file says: port-preserving cone
/// mappings, address-and-port-dependent filtering, drop vs ICMP reject, a
/// new port per destination behind the symmetric NAT, UDP blocked except to
/// the tracker, 20 ms per router; and the lab is invisible from outside.
#[tokio::test]
async fn lab_routers_behave_as_documented() -> Result<()> {
    let nodes = [
        Node::new("p", Kind::Public).delay(20),
        Node::new("c", Kind::ConeDrop).delay(20),
        Node::new("r", Kind::ConeReject).delay(20),
        Node::new("s", Kind::Symmetric).delay(20),
        Node::new("u", Kind::UdpBlocked).delay(20),
    ];
    let Some(lab) = Lab::up(&nodes).await? else {
        return Ok(());
    };
    let tracker_echo = format!("{}:9000", netlab::TRACKER_IP);
    let public_echo = format!("{}:9001", lab.public_ip("p")?);
    let stops = [
        echo(&lab, &lab.host_ns("trk"), &tracker_echo)?,
        echo(&lab, &lab.host_ns("p"), &public_echo)?,
    ];
    let result = (|| -> Result<()> {
        // Cone NATs keep the source port; 20 ms each way through each router
        // (the tracker host adds none): RTT ≈ 40 ms.
        for node in ["c", "r", "u"] {
            let socket = lab.udp_socket(&lab.host_ns(node), "0.0.0.0:4000")?;
            let (seen, rtt) = probe(&socket, &tracker_echo)?
                .with_context(|| format!("{node}: no answer from the tracker host"))?;
            ensure!(
                seen == format!("{}:4000", lab.public_ip(node)?),
                "{node}: tracker saw {seen}"
            );
            ensure!(
                rtt >= Duration::from_millis(38) && rtt < Duration::from_millis(500),
                "{node}: RTT to the tracker {rtt:?}, expected about 40 ms"
            );
        }
        // The public host adds 20 ms each way itself.
        let socket = lab.udp_socket(&lab.host_ns("p"), "0.0.0.0:4000")?;
        let (seen, _) = probe(&socket, &tracker_echo)?.context("p: no answer")?;
        ensure!(seen == format!("{}:4000", lab.public_ip("p")?), "p: {seen}");

        // Only the tracker gets UDP out of u.
        let socket = lab.udp_socket(&lab.host_ns("u"), "0.0.0.0:4001")?;
        ensure!(
            probe(&socket, &public_echo)?.is_none(),
            "u reached the public host over UDP"
        );

        // c reaches the public host; the mapping is the same port (endpoint-
        // independent mapping)...
        let c = lab.udp_socket(&lab.host_ns("c"), "0.0.0.0:4000")?;
        let (seen, rtt) = probe(&c, &public_echo)?.context("c: no answer from p")?;
        ensure!(
            seen == format!("{}:4000", lab.public_ip("c")?),
            "c: p saw {seen}"
        );
        ensure!(
            rtt >= Duration::from_millis(78),
            "c ↔ p RTT {rtt:?}, expected ≈ 80 ms"
        );
        // ...but an unsolicited packet from another port of p is dropped
        // (address-and-port-dependent filtering), by c's router silently and
        // by r's router with ICMP port unreachable.
        let p = lab.udp_socket(&lab.host_ns("p"), "0.0.0.0:5000")?;
        p.set_read_timeout(Some(Duration::from_millis(800)))?;
        let mut buf = [0u8; 64];
        p.connect(format!("{}:4000", lab.public_ip("c")?))?;
        p.send(b"unsolicited")?;
        let got = p.recv(&mut buf);
        ensure!(
            matches!(&got, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "cone-drop router answered an unsolicited packet: {got:?}"
        );
        let r = lab.udp_socket(&lab.host_ns("r"), "0.0.0.0:4000")?;
        probe(&r, &tracker_echo)?.context("r: no answer")?;
        p.connect(format!("{}:4000", lab.public_ip("r")?))?;
        p.send(b"unsolicited")?;
        let got = p.recv(&mut buf);
        ensure!(
            matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
            "cone-reject router did not reject: {got:?}"
        );

        // The symmetric NAT maps one socket to a new port per destination.
        let s = lab.udp_socket(&lab.host_ns("s"), "0.0.0.0:4000")?;
        let (to_tracker, _) = probe(&s, &tracker_echo)?.context("s: no answer")?;
        let (to_public, _) = probe(&s, &public_echo)?.context("s: no answer from p")?;
        ensure!(
            to_tracker != to_public,
            "symmetric NAT reused {to_tracker} for a second destination"
        );
        Ok(())
    })();
    for stop in &stops {
        stop.store(true, Ordering::Relaxed);
    }
    result?;

    // Nothing of the lab is visible in the namespace the tests run in.
    let out = tokio::process::Command::new("ip")
        .args(["-o", "addr"])
        .output()
        .await?;
    let addrs = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !addrs.contains("203.0.113."),
        "a lab address leaked into the test's namespace:\n{addrs}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Keep-alives against NAT mapping expiry; a direct path that dies.

/// The cone router forgets idle UDP mappings after 5 s; the peers' 3 s
/// keep-alives hold the direct path open, so after 12 s of silence bob (public)
/// still reaches alice directly, at once.
#[tokio::test]
async fn keep_alives_hold_the_nat_mapping_open() -> Result<()> {
    let nodes = [
        Node::new("a", Kind::ConeDrop).delay(20).udp_timeout(5),
        Node::new("b", Kind::Public).delay(20),
    ];
    let Some(lab) = Lab::up(&nodes).await? else {
        return Ok(());
    };
    let tracker = lab.tracker(&[]).await?;
    let mut bob = lab.start_peer(lab.peer_opts("b", "bob", &tracker)).await?;
    let mut alice = lab
        .start_peer(lab.peer_opts("a", "alice", &tracker))
        .await?;
    alice.send("bob", "first").await?;
    let m = bob
        .expect_event_within("message", DELIVERY_BOUND, |v| v["text"] == "first")
        .await?;
    ensure!(m["path"] == "direct", "cone → public went {}", m["path"]);

    tokio::time::sleep(Duration::from_secs(12)).await;
    let t0 = Instant::now();
    bob.send("alice", "still there?").await?;
    let m = alice
        .expect_event_within("message", Duration::from_secs(5), |v| {
            v["text"] == "still there?"
        })
        .await?;
    println!(
        "netlab keep-alive: shown after {:?} via {}",
        t0.elapsed(),
        m["path"]
    );
    ensure!(
        m["path"] == "direct",
        "after 12 s idle the mapping was lost: {}",
        m["path"]
    );
    Ok(())
}

/// A direct conversation whose path dies (the router starts dropping every
/// packet between the two) falls back to the relay: the next message is
/// shown, and alice's `path` event says "relay".
#[tokio::test]
async fn dead_direct_path_falls_back_to_relay() -> Result<()> {
    let nodes = [
        Node::new("a", Kind::ConeDrop).delay(20),
        Node::new("b", Kind::Public).delay(20),
    ];
    let Some(lab) = Lab::up(&nodes).await? else {
        return Ok(());
    };
    let tracker = lab.tracker(&[]).await?;
    let mut bob = lab.start_peer(lab.peer_opts("b", "bob", &tracker)).await?;
    let mut alice = lab
        .start_peer(lab.peer_opts("a", "alice", &tracker))
        .await?;
    alice.send("bob", "before").await?;
    bob.expect_event_within("message", DELIVERY_BOUND, |v| v["text"] == "before")
        .await?;
    alice
        .expect_event_within("path", PATH_BOUND, |v| {
            v["name"] == "bob" && v["path"] == "direct"
        })
        .await?;

    // Cut a ↔ b at a's router; the tracker stays reachable.
    let router = lab.router_ns("a")?;
    let b_ip = lab.public_ip("b")?;
    lab.exec(&router, &["nft", "add", "table", "ip", "cut"])
        .await?;
    lab.exec(
        &router,
        &[
            "nft",
            "add",
            "chain",
            "ip",
            "cut",
            "block",
            "{ type filter hook forward priority -200 ; }",
        ],
    )
    .await?;
    for dir in ["saddr", "daddr"] {
        lab.exec(
            &router,
            &[
                "nft", "add", "rule", "ip", "cut", "block", "ip", dir, &b_ip, "drop",
            ],
        )
        .await?;
    }

    let t0 = Instant::now();
    alice.send("bob", "after the cut").await?;
    let m = bob
        .expect_event_within("message", Duration::from_secs(30), |v| {
            v["text"] == "after the cut"
        })
        .await?;
    println!(
        "netlab dead path: shown after {:?} via {}",
        t0.elapsed(),
        m["path"]
    );
    ensure!(
        m["path"] == "relay",
        "after the cut the message went {}",
        m["path"]
    );
    alice
        .expect_event_within("path", Duration::from_secs(30), |v| {
            v["name"] == "bob" && v["path"] == "relay"
        })
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The table for docs/reachability.md.

/// `NETLAB_TRIALS` (default 20) fresh labs per pair at 20 ms per router, plus
/// the 1 % loss case; prints a Markdown table (and writes it to the file
/// named by `NETLAB_TABLE`, if set). `NETLAB_PAIRS` (a substring of the
/// topology label) narrows it down.
///
/// cargo test -p tincan-tests --test netlab -- --ignored --nocapture netlab_matrix
#[tokio::test]
#[ignore = "about 11 minutes; regenerates the table in docs/reachability.md"]
async fn netlab_matrix() -> Result<()> {
    if !netlab::available()? {
        return Ok(());
    }
    let trials: usize = std::env::var("NETLAB_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .clamp(1, 1000);
    let filter = std::env::var("NETLAB_PAIRS").unwrap_or_default();
    let mut rows = vec![
        "| topology (a writes first) | trials | delivered | direct (≤10 s) | median time to first delivery | median time to direct | relay bytes before upgrade | direct possible |".to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut cases: Vec<(Pair, u32)> = PAIRS.iter().map(|p| (*p, 0)).collect();
    cases.push((PAIRS[2], 1));
    for (pair, loss) in cases {
        let label = if loss > 0 {
            format!("{}, {loss} % loss", pair.label())
        } else {
            pair.label()
        };
        if !label.contains(&filter) {
            continue;
        }
        let opts = TrialOpts {
            loss_pct: loss,
            await_path: Some("direct"),
            ..TrialOpts::default()
        };
        let (mut delivered, mut direct) = (0, 0);
        let (mut firsts, mut directs) = (Vec::new(), Vec::new());
        let mut relay_bytes: Vec<u64> = Vec::new();
        for i in 0..trials {
            let t = match netlab::trial(pair, &opts).await {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(()),
                Err(e) => {
                    println!("{label} trial {i}: set-up failed: {e:#}");
                    continue;
                }
            };
            report(&pair, &opts, &t);
            if t.delivered() {
                delivered += 1;
            }
            if let Some(d) = t.first_delivery {
                firsts.push(d);
            }
            if let Some(d) = t.path_reached {
                direct += 1;
                directs.push(d);
            }
            if let Some(b) = t.relay_bytes {
                relay_bytes.push(b);
            }
        }
        let pct = |n: usize| format!("{} %", n * 100 / trials);
        rows.push(format!(
            "| {label} | {trials} | {} | {} | {} | {} | {} | {} |",
            pct(delivered),
            pct(direct),
            ms(median(firsts)),
            ms(median(directs)),
            bytes_summary(&mut relay_bytes),
            if pair.direct_possible { "yes" } else { "no" },
        ));
    }
    let table = rows.join("\n");
    println!("\n{table}\n");
    if let Ok(path) = std::env::var("NETLAB_TABLE") {
        std::fs::write(&path, format!("{table}\n")).with_context(|| path.clone())?;
    }
    Ok(())
}
