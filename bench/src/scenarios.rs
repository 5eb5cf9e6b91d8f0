//! The figures, in order, each measured beside its raw-quinn baseline in the
//! same run: direct_rtt, direct_throughput (two nodes in this process),
//! tracker_enroll, tracker_memory, tracker_idle_cpu (a real `tracker` process
//! against a bare quinn server process, loaded by the swarm in this process),
//! presence_scaling (a fresh tracker per size), and relay_throughput (not
//! measurable until relaying exists).

use std::{
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tincan_proto::{PeerId, tls::Identity};

use crate::{
    BenchError,
    direct::{self, NodePair},
    procs::{self, Server, Usage},
    quic::QuicError,
    report::{Goal, Report, Target, bytes, us},
    swarm::{self, Enrollment, PeerReport, Swarm},
};

/// Growth of per-peer presence bytes allowed when N doubles ("at most ~doubles").
pub const PRESENCE_GROWTH_TARGET: f64 = 2.1;

/// The tracker's `--presence` mode in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Full list at enrollment, every change to everyone (the default).
    Broadcast,
    /// Each simulated peer follows [`swarm::CONTACTS`] others.
    Subscribe,
}

impl Presence {
    pub fn flag(self) -> &'static str {
        match self {
            Presence::Broadcast => "broadcast",
            Presence::Subscribe => "subscribe",
        }
    }

    /// Presence frames the `n` peers of a swarm read in all once every
    /// change of `enrolled` peers joining has reached them, given the
    /// `list_entries` they got in their lists at enrollment.
    fn expected_frames(self, n: usize, enrolled: usize, list_entries: u64) -> u64 {
        let m = enrolled as u64;
        match self {
            // Each joiner is announced to everyone already online.
            Presence::Broadcast => m * m.saturating_sub(1) / 2,
            // Each follow is answered once: in the follower's Subscribed
            // pages, or by a Joined once the followed peer comes.
            Presence::Subscribe => {
                let follows: usize = (0..n).map(|i| swarm::contacts(i, n).len()).sum();
                (follows as u64).saturating_sub(list_entries)
            }
        }
    }
}

/// What to run, and how big.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated peers for tracker_enroll, tracker_memory, tracker_idle_cpu.
    pub peers: usize,
    /// Sizes for presence_scaling, each double the one before.
    pub presence_sizes: Vec<usize>,
    /// Enrollments in flight at once (same for tracker and bare server).
    pub concurrency: usize,
    pub rtt_messages: usize,
    pub rtt_warmup: usize,
    pub tput_messages: usize,
    pub raw_tput_messages: usize,
    /// Wait after enrolling before reading memory.
    pub settle: Duration,
    /// Window over which idle CPU is measured.
    pub idle: Duration,
    /// Rounds of the tracker_enroll comparison. Each enrolls the whole swarm
    /// once with a bare server and once with a fresh tracker, in the order
    /// bare, tracker, then tracker, bare, and so on, so that a machine that
    /// gets busier or quieter during the run weighs on both sides alike.
    pub enroll_rounds: usize,
    /// Stop enrolling after this long (the rate reached is reported, short).
    pub deadline: Duration,
    /// After the last enrollment, wait at most this long for the presence
    /// fan-out to reach every peer.
    pub drain: Duration,
    pub tracker_bin: PathBuf,
    /// This executable, for `bare-server`.
    pub bench_bin: PathBuf,
    /// Which groups of figures to run (all by default).
    pub groups: Groups,
}

/// Groups of figures that can be run on their own while investigating.
#[derive(Debug, Clone, Copy)]
pub struct Groups {
    /// direct_rtt, direct_throughput
    pub direct: bool,
    /// tracker_enroll, tracker_memory, tracker_idle_cpu
    pub tracker: bool,
    /// presence_scaling
    pub presence: bool,
}

impl Default for Groups {
    fn default() -> Self {
        Self {
            direct: true,
            tracker: true,
            presence: true,
        }
    }
}

impl Options {
    pub fn full(peers: usize, tracker_bin: PathBuf, bench_bin: PathBuf) -> Self {
        Self {
            peers,
            presence_sizes: vec![1_000, 2_000, 4_000],
            concurrency: 64,
            rtt_messages: 10_000,
            rtt_warmup: 200,
            tput_messages: 20_000,
            raw_tput_messages: 1_000_000,
            settle: Duration::from_secs(2),
            idle: Duration::from_secs(6),
            enroll_rounds: 2,
            deadline: Duration::from_secs(120),
            drain: Duration::from_secs(60),
            tracker_bin,
            bench_bin,
            groups: Groups::default(),
        }
    }

    /// A tiny run that proves every figure works, in well under a minute.
    pub fn smoke(tracker_bin: PathBuf, bench_bin: PathBuf) -> Self {
        Self {
            peers: 200,
            presence_sizes: vec![50, 100, 200],
            rtt_messages: 500,
            rtt_warmup: 20,
            tput_messages: 500,
            raw_tput_messages: 5_000,
            settle: Duration::from_millis(500),
            idle: Duration::from_secs(3),
            deadline: Duration::from_secs(60),
            drain: Duration::from_secs(30),
            ..Self::full(200, tracker_bin, bench_bin)
        }
    }
}

/// Runs every figure and returns the report (goal lines last).
pub async fn run(opts: &Options) -> Result<Report, BenchError> {
    let tmp = tempfile::tempdir()?;
    let mut report = Report::default();
    report.note(format!(
        "machine: {} CPUs; tracker and bare server are separate processes, the load generator \
         (simulated peers, nodes) is this process; all share the same CPUs (no pinning), and \
         each phase says how much CPU each side used",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    ));
    if opts.groups.direct {
        direct_figures(opts, tmp.path(), &mut report).await?;
    }
    if opts.groups.tracker {
        tracker_figures(opts, tmp.path(), &mut report).await?;
    }
    if opts.groups.presence {
        presence_figures(opts, tmp.path(), &mut report).await?;
    }
    Ok(report)
}

async fn start_tracker(
    opts: &Options,
    dir: &Path,
    label: &str,
    max_peers: usize,
    presence: Presence,
) -> Result<(Server, PeerId), BenchError> {
    let data = dir.join(label);
    let args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--max-peers".into(),
        max_peers.max(tincan_tracker::DEFAULT_MAX_PEERS).to_string(),
        "--presence".into(),
        presence.flag().into(),
    ];
    let log = dir.join(format!("{label}.log"));
    let server = Server::start(
        &opts.tracker_bin,
        &args,
        &log,
        "tracker listening on ",
        Some("tracker key "),
    )
    .await?;
    let key = server
        .key
        .as_deref()
        .and_then(|k| PeerId::from_hex(k).ok())
        .ok_or_else(|| BenchError::Protocol("tracker printed no usable key".into()))?;
    Ok((server, key))
}

/// The RTT samples are taken in this many rounds, each a block of tincan
/// and a block of raw quinn (which goes first alternates), so that a machine
/// getting busier or quieter during the run weighs on both alike.
pub const RTT_ROUNDS: usize = 10;

/// `opts.rtt_messages` round trips of each, interleaved in [`RTT_ROUNDS`]
/// rounds after `opts.rtt_warmup` of each; returns (tincan, raw quinn).
async fn interleaved_rtt(
    pair: &mut NodePair,
    echo: &mut direct::RawEcho,
    opts: &Options,
) -> Result<(direct::Latencies, direct::Latencies), BenchError> {
    pair.rtt(0, opts.rtt_warmup).await?;
    echo.rtt(0, opts.rtt_warmup).await?;
    let (mut tin, mut raw) = (Vec::new(), Vec::new());
    for round in 0..RTT_ROUNDS {
        // Round r takes the r-th share of the count, so the shares add up.
        let count =
            opts.rtt_messages * (round + 1) / RTT_ROUNDS - opts.rtt_messages * round / RTT_ROUNDS;
        if round % 2 == 0 {
            tin.extend(pair.rtt(count, 0).await?);
            raw.extend(echo.rtt(count, 0).await?);
        } else {
            raw.extend(echo.rtt(count, 0).await?);
            tin.extend(pair.rtt(count, 0).await?);
        }
    }
    Ok((tin.into(), raw.into()))
}

/// What the two SQLite rows of a message cost alone (see
/// [`tincan_peer::store::time_rows`]), and the rate of persisted messages
/// they leave room for on this machine.
struct StorageCeiling {
    sent_us: f64,
    received_us: f64,
    /// Messages per second: each side's rows on a thread of their own, and
    /// both within the machine's cores.
    ceiling: f64,
}

async fn storage_ceiling(dir: &Path, messages: usize) -> Result<StorageCeiling, BenchError> {
    let rows_dir = dir.join("storage-ceiling");
    std::fs::create_dir_all(&rows_dir)?;
    let (sent, received) = tokio::task::spawn_blocking(move || {
        tincan_peer::store::time_rows(&rows_dir, messages, direct::TPUT_BODY)
    })
    .await
    .map_err(|e| BenchError::Node(format!("storage ceiling: {e}")))?
    .map_err(|e| BenchError::Node(format!("storage ceiling: {e}")))?;
    let n = messages.max(1) as f64;
    let (s, r) = (sent.as_secs_f64(), received.as_secs_f64());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ceiling = (n / s.max(r)).min(cores * n / (s + r)).max(0.0);
    Ok(StorageCeiling {
        sent_us: s * 1e6 / n,
        received_us: r * 1e6 / n,
        ceiling: if ceiling.is_finite() { ceiling } else { 0.0 },
    })
}

async fn direct_figures(opts: &Options, dir: &Path, report: &mut Report) -> Result<(), BenchError> {
    let (tracker, key) = start_tracker(opts, dir, "direct-tracker", 0, Presence::Broadcast).await?;
    let nodes = dir.join("nodes");
    let mut pair = NodePair::start(tracker.addr, key, &nodes, ("alice", "bob"), false).await?;
    let mut echo = direct::RawEcho::start().await?;
    let (tin, raw) = interleaved_rtt(&mut pair, &mut echo, opts).await?;
    echo.stop().await;
    let raw_rate = direct::raw_throughput(opts.raw_tput_messages).await?;
    let tin_rate = pair.throughput(opts.tput_messages).await?;
    let direct_relayed = pair.relayed;
    let shown = pair.stop().await;
    let rows = storage_ceiling(dir, opts.tput_messages).await?;
    // The same job over a relay circuit through the same tracker.
    let mut relay_pair =
        NodePair::start(tracker.addr, key, &nodes, ("carol", "dave"), true).await?;
    let relay_rate = relay_pair.throughput(opts.tput_messages).await;
    let relayed = relay_pair.relayed;
    let relay_shown = relay_pair.stop().await;
    tracker.stop().await;

    let (t50, r50) = (tin.percentile(50.0), raw.percentile(50.0));
    let (t99, r99) = (tin.percentile(99.0), raw.percentile(99.0));
    let ratio = t50.as_secs_f64() / r50.as_secs_f64().max(f64::EPSILON);
    report.row("direct_rtt p50", us(t50), us(r50), format!("{ratio:.2}"));
    report.row(
        "direct_rtt p99",
        us(t99),
        us(r99),
        format!(
            "{:.2}",
            t99.as_secs_f64() / r99.as_secs_f64().max(f64::EPSILON)
        ),
    );
    report.result("direct_rtt_p50_us", t50.as_secs_f64() * 1e6);
    report.result("direct_rtt_p99_us", t99.as_secs_f64() * 1e6);
    report.result("raw_rtt_p50_us", r50.as_secs_f64() * 1e6);
    report.result("raw_rtt_p99_us", r99.as_secs_f64() * 1e6);
    report.note(format!(
        "direct_rtt: two tincan Nodes in this process (alice → bob, direct link over loopback, \
         tracker in its own process), {} sequential {}-byte messages, send() → Delivered event; \
         raw: quinn {}-byte echo on one long-lived stream between two endpoints in this process, \
         same TLS; taken in {} interleaved rounds of both after {} warm-up round trips of each",
        opts.rtt_messages,
        direct::RTT_PAYLOAD,
        direct::RTT_PAYLOAD,
        RTT_ROUNDS,
        opts.rtt_warmup
    ));
    report.goal(Goal {
        name: "direct_rtt",
        measured: Some(ratio),
        unit: "",
        target: Target::AtMost(1.25),
        incomplete: false,
    });

    let ratio = tin_rate / raw_rate.max(f64::EPSILON);
    report.row(
        "direct_throughput msg/s",
        format!("{tin_rate:.0}"),
        format!("{raw_rate:.0}"),
        format!("{ratio:.3}"),
    );
    report.result("direct_throughput_msgs", tin_rate);
    report.result("raw_throughput_msgs", raw_rate);
    report.note(format!(
        "direct_throughput: {} pipelined {}-byte messages alice → bob, each acknowledged \
         (bob was shown {shown} messages in all, {direct_relayed} came back over a relay); each is \
         persisted on both sides (peer.journal at once, outbox and history in peer.db by group commit); raw: {} postcard ToReceiver::Msg frames with a {}-byte body written in \
         {} KiB batches on one stream, each decoded by the receiver, one reply at the end \
         ({:.0} MiB/s of frames)",
        opts.tput_messages,
        direct::TPUT_BODY,
        opts.raw_tput_messages,
        direct::TPUT_BODY,
        direct::RAW_BATCH_BYTES / 1024,
        raw_rate * (direct::TPUT_BODY + 4 + 1 + 16 + 5 + 1) as f64 / (1024.0 * 1024.0)
    ));
    report.goal(Goal {
        name: "direct_throughput",
        measured: Some(ratio),
        unit: "",
        target: Target::AtLeast(0.25),
        incomplete: false,
    });
    let ceiling_ratio = rows.ceiling / raw_rate.max(f64::EPSILON);
    report.row(
        "storage ceiling msg/s",
        format!("{:.0}", rows.ceiling),
        format!("{raw_rate:.0}"),
        format!("{ceiling_ratio:.3}"),
    );
    report.result("storage_sent_row_us", rows.sent_us);
    report.result("storage_received_row_us", rows.received_us);
    report.result("storage_ceiling_msgs", rows.ceiling);
    report.result("storage_ceiling_ratio", ceiling_ratio);
    report.note(format!(
        "storage ceiling: the two SQLite rows of a delivered message alone ({} `sent` rows into \
         one fresh database, {} `received` rows into another, {} per transaction, with the \
         statements and settings of the nodes' database threads) took {:.2} + {:.2} µs per \
         message on this machine; with each database thread on a core of its own and nothing \
         else running, direct_throughput could be no more than {:.0} messages/s, {:.3} of raw \
         quinn ({:.0}% of it reached)",
        opts.tput_messages,
        opts.tput_messages,
        tincan_peer::store::STORE_BATCH,
        rows.sent_us,
        rows.received_us,
        rows.ceiling,
        ceiling_ratio,
        100.0 * tin_rate / rows.ceiling.max(f64::EPSILON)
    ));

    // relay_throughput: the same pipelined job, relayed, against direct.
    match relay_rate {
        Ok(rate) => {
            let ratio = rate / tin_rate.max(f64::EPSILON);
            report.row(
                "relay_throughput msg/s",
                format!("{rate:.0}"),
                format!("direct {tin_rate:.0}"),
                format!("{ratio:.2}"),
            );
            report.result("relay_throughput_msgs", rate);
            report.note(format!(
                "relay_throughput: two more Nodes (carol → dave) with relay_only, {} pipelined \
                 {}-byte messages through a relay circuit spliced by the tracker process, each \
                 acknowledged ({relayed} deliveries reported the relay path; dave was shown \
                 {relay_shown}); baseline: direct_throughput of this run",
                opts.tput_messages,
                direct::TPUT_BODY
            ));
            report.goal(Goal {
                name: "relay_throughput",
                measured: Some(ratio),
                unit: "",
                target: Target::AtLeast(0.5),
                incomplete: relayed < opts.tput_messages,
            });
        }
        Err(e) => {
            report.note(format!("relay_throughput could not be measured: {e}"));
            report.goal(Goal {
                name: "relay_throughput",
                measured: None,
                unit: "",
                target: Target::AtLeast(0.5),
                incomplete: true,
            });
        }
    }
    Ok(())
}

/// CPU and wall time of one phase, for "how CPU was shared".
struct Phase {
    wall: Instant,
    server: Usage,
    own: Usage,
}

impl Phase {
    fn begin(server: &Server) -> Result<Self, BenchError> {
        Ok(Self {
            wall: Instant::now(),
            server: server.usage()?,
            own: Usage::own()?,
        })
    }

    /// (wall seconds, server cores, load generator cores)
    fn end(&self, server: &Server) -> Result<(f64, f64, f64), BenchError> {
        let wall = self.wall.elapsed().as_secs_f64().max(f64::EPSILON);
        let s = server.usage()?.cpu_secs - self.server.cpu_secs;
        let o = Usage::own()?.cpu_secs - self.own.cpu_secs;
        Ok((wall, s / wall, o / wall))
    }
}

/// What one server (tracker or bare) did with `n` simulated peers.
struct Served {
    enrollment: Enrollment,
    /// (wall, server cores, load generator cores) while enrolling.
    enroll_cpu: (f64, f64, f64),
    /// Presence fan-out finished this long after the last enrollment.
    presence_drain: Option<Duration>,
    rss_before: u64,
    rss_held: u64,
    /// (server cores, load generator cores) while idle.
    idle_cpu: (f64, f64),
    /// Datagrams the kernel dropped at the server's socket while enrolling.
    server_drops: u64,
    /// UDP datagrams sent on this machine (both directions) while enrolling.
    datagrams: u64,
    reports: Vec<PeerReport>,
}

/// Enrolls the swarm with `server`; with `hold`, then also waits for the
/// presence fan-out and measures memory and idle CPU with every peer held.
async fn serve_swarm(
    opts: &Options,
    server: &Server,
    configs: Vec<quinn::ClientConfig>,
    target: swarm::Target,
    presence: Presence,
    hold: bool,
) -> Result<Served, BenchError> {
    let n = configs.len();
    let rss_before = server.usage()?.rss_bytes;
    let drops = || procs::udp_drops(server.addr.port()).unwrap_or(0);
    let drops_before = drops();
    let datagrams = || procs::udp_datagrams_out().unwrap_or(0);
    let datagrams_before = datagrams();
    let phase = Phase::begin(server)?;
    let (swarm, enrollment) = Swarm::enroll(
        configs,
        server.addr,
        target,
        opts.concurrency,
        opts.deadline,
    )
    .await?;
    let enroll_cpu = phase.end(server)?;
    let server_drops = drops().saturating_sub(drops_before);
    let datagrams = datagrams().saturating_sub(datagrams_before);
    if !hold {
        let reports = swarm.stop().await;
        return Ok(Served {
            enrollment,
            enroll_cpu,
            presence_drain: None,
            rss_before,
            rss_held: rss_before,
            idle_cpu: (0.0, 0.0),
            server_drops,
            datagrams,
            reports,
        });
    }
    let presence_drain = match target {
        swarm::Target::Tracker { .. } => {
            let t = Instant::now();
            let entries = swarm.counters.list_entries.load(Ordering::Relaxed);
            let expected = presence.expected_frames(n, enrollment.enrolled, entries);
            swarm
                .wait_presence(expected, opts.drain)
                .await
                .then(|| t.elapsed())
        }
        swarm::Target::Bare => None,
    };
    tokio::time::sleep(opts.settle).await;
    let rss_held = server.usage()?.rss_bytes;
    let phase = Phase::begin(server)?;
    tokio::time::sleep(opts.idle).await;
    let (_, idle_server, idle_own) = phase.end(server)?;
    let reports = swarm.stop().await;
    tracing::info!(n, enrolled = enrollment.enrolled, "swarm stopped");
    Ok(Served {
        enrollment,
        enroll_cpu,
        presence_drain,
        rss_before,
        rss_held,
        idle_cpu: (idle_server, idle_own),
        server_drops,
        datagrams,
        reports,
    })
}

/// Each round's rate of `runs` against `base`'s, for a note.
fn per_round(runs: &[Served], base: &[Served]) -> String {
    runs.iter()
        .zip(base)
        .map(|(t, b)| {
            let (t, b) = (t.enrollment.rate(), b.enrollment.rate());
            format!("{t:.0}/{b:.0} = {:.2}", t / b.max(f64::EPSILON))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Enrollments per second over all of `runs`.
fn rate(runs: &[Served]) -> f64 {
    let enrolled: usize = runs.iter().map(|s| s.enrollment.enrolled).sum();
    let secs: f64 = runs
        .iter()
        .map(|s| s.enrollment.elapsed.as_secs_f64())
        .sum();
    enrolled as f64 / secs.max(f64::EPSILON)
}

/// One enrollment of the swarm with a bare quinn server process.
async fn serve_bare(
    opts: &Options,
    dir: &Path,
    ids: &[Identity],
    hold: bool,
) -> Result<Served, BenchError> {
    let args = vec![
        "bare-server".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    let bare = Server::start(
        &opts.bench_bin,
        &args,
        &dir.join("bare.log"),
        "bare listening on ",
        None,
    )
    .await?;
    let configs = swarm::client_configs(ids, swarm::Target::Bare)?;
    let served = serve_swarm(
        opts,
        &bare,
        configs,
        swarm::Target::Bare,
        Presence::Subscribe,
        hold,
    )
    .await;
    bare.stop().await;
    served
}

/// One enrollment of the swarm with a fresh tracker (data dir `label`).
async fn serve_tracker(
    opts: &Options,
    dir: &Path,
    label: &str,
    ids: &[Identity],
    presence: Presence,
    follows: bool,
    hold: bool,
) -> Result<Served, BenchError> {
    let (tracker, key) = start_tracker(opts, dir, label, ids.len(), presence).await?;
    let target = swarm::Target::Tracker { key, follows };
    let configs = swarm::client_configs(ids, target)?;
    let served = serve_swarm(opts, &tracker, configs, target, presence, hold).await;
    tracker.stop().await;
    served
}

fn identities(n: usize) -> Result<Vec<Identity>, BenchError> {
    (0..n)
        .map(|_| Identity::generate().map_err(|e| QuicError::from(e).into()))
        .collect()
}

async fn tracker_figures(
    opts: &Options,
    dir: &Path,
    report: &mut Report,
) -> Result<(), BenchError> {
    let n = opts.peers;
    let t = Instant::now();
    let ids = identities(n)?;
    tracing::info!(n, took = ?t.elapsed(), "identities generated");

    // A tracker as big as this is run in subscribe mode (docs/operations.md).
    let presence = Presence::Subscribe;
    let rounds = opts.enroll_rounds.max(1);
    let (mut bare_runs, mut tracker_runs, mut quiet_runs) = (Vec::new(), Vec::new(), Vec::new());
    #[derive(Clone, Copy)]
    enum Kind {
        Bare,
        Tracker,
        /// The tracker with a swarm that follows nobody: no presence.
        Quiet,
    }
    for round in 0..rounds {
        // Memory and idle CPU are read in the first round only.
        let hold = round == 0;
        // Mirrored every other round, so that a machine getting busier or
        // quieter weighs on the three alike.
        let mut order = [Kind::Bare, Kind::Tracker, Kind::Quiet];
        if round % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            match kind {
                Kind::Bare => bare_runs.push(serve_bare(opts, dir, &ids, hold).await?),
                Kind::Tracker => {
                    let label = format!("enroll-tracker-{round}");
                    let served = serve_tracker(opts, dir, &label, &ids, presence, true, hold);
                    tracker_runs.push(served.await?);
                }
                Kind::Quiet => {
                    let label = format!("enroll-quiet-{round}");
                    let served = serve_tracker(opts, dir, &label, &ids, presence, false, false);
                    quiet_runs.push(served.await?);
                }
            }
        }
    }
    let (tin, base) = (&tracker_runs[0], &bare_runs[0]);
    report.note(format!(
        "tracker_enroll, tracker_memory, tracker_idle_cpu: the tracker ran with --presence {}; \
         each simulated peer follows {} others spread over the swarm (p(i±k·{}), k = 1…{}) and \
         reads their state (Subscribed) and then their presence changes; the bare server runs \
         with the tracker's own QUIC server config and UDP socket (tincan_tracker::server_config, \
         udp_socket)",
        presence.flag(),
        swarm::CONTACTS,
        (n / (2 * swarm::CONTACTS)).max(1),
        swarm::CONTACTS / 2
    ));

    // tracker_enroll: all rounds together (enrollments / time enrolling).
    let (tr, br) = (rate(&tracker_runs), rate(&bare_runs));
    // An incomplete run (deadline, failures) still gives the rate it
    // reached; it is said so in a note and can only be short.
    let enrolled: Vec<usize> = tracker_runs.iter().map(|s| s.enrollment.enrolled).collect();
    let complete = enrolled.iter().all(|&e| e == n);
    let ratio = tr / br.max(f64::EPSILON);
    if !complete {
        report.note(format!(
            "tracker_enroll is INCOMPLETE: {enrolled:?} of {n} peers enrolled (per round) before \
             the deadline or failed; the ratio is the rate reached until then, and the goal is \
             short"
        ));
    }
    report.row(
        &format!("tracker_enroll /s (N={n})"),
        format!("{tr:.0}"),
        format!("{br:.0}"),
        format!("{ratio:.2}"),
    );
    let lat = |e: &Enrollment, p| us(crate::report::percentile(&e.latencies, p));
    report.row(
        "  enroll latency p50",
        lat(&tin.enrollment, 50.0),
        lat(&base.enrollment, 50.0),
        String::new(),
    );
    report.result("tracker_enroll_per_s", tr);
    report.result("bare_handshake_per_s", br);
    // The same tracker with nobody followed: what presence costs.
    let qr = rate(&quiet_runs);
    let quiet_ratio = qr / br.max(f64::EPSILON);
    report.row(
        "  without presence /s",
        format!("{qr:.0}"),
        format!("{br:.0}"),
        format!("{quiet_ratio:.2}"),
    );
    report.result("tracker_enroll_no_presence_per_s", qr);
    report.result("tracker_enroll_no_presence_ratio", quiet_ratio);
    // CPU per enrollment, server and load generator together: on a machine
    // both phases saturate, the rate ratio is the inverse of this ratio, and
    // it is less at the mercy of other work on the machine.
    for (key, runs) in [
        ("tracker_cpu_us_per_enroll", &tracker_runs),
        ("tracker_no_presence_cpu_us_per_enroll", &quiet_runs),
        ("bare_cpu_us_per_enroll", &bare_runs),
    ] {
        let cpu: f64 = runs
            .iter()
            .map(|s| (s.enroll_cpu.1 + s.enroll_cpu.2) * s.enroll_cpu.0)
            .sum();
        let enrolled: usize = runs.iter().map(|s| s.enrollment.enrolled).sum();
        report.result(key, cpu / enrolled.max(1) as f64 * 1e6);
    }
    report.note(format!(
        "tracker_enroll: {rounds} round(s), each enrolling all {n} peers with the bare server, \
         with a fresh tracker, and with a fresh tracker while the peers follow nobody (order: \
         bare, tracker, no presence, then the reverse, ...); each rate is all enrollments over \
         all the time spent enrolling; per round, tracker/bare: {}; without presence, \
         tracker/bare: {} (over all rounds {quiet_ratio:.2}: the goal is taken with presence, \
         which the bare server does not do)",
        per_round(&tracker_runs, &bare_runs),
        per_round(&quiet_runs, &bare_runs),
    ));
    let phases = tracker_runs
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("tracker, round {}", i + 1), s))
        .chain(
            quiet_runs
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("tracker without presence, round {}", i + 1), s)),
        )
        .chain(
            bare_runs
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("bare server, round {}", i + 1), s)),
        );
    for (who, s) in phases {
        let (wall, server, own) = s.enroll_cpu;
        report.note(format!(
            "enroll phase, {who}: {}/{n} enrolled ({} failed{}) in {wall:.2} s, {} at a time; CPU: \
             server {server:.2} cores, load generator {own:.2} cores; {:.1} UDP datagrams per \
             enrollment (both directions); kernel dropped {} datagrams at the server's socket \
             (receive buffer full); enroll latency p90 {}, max {}",
            s.enrollment.enrolled,
            s.enrollment.failed,
            s.enrollment
                .first_error
                .as_deref()
                .map(|e| format!(", first error: {e}"))
                .unwrap_or_default(),
            opts.concurrency,
            s.datagrams as f64 / s.enrollment.enrolled.max(1) as f64,
            s.server_drops,
            us(crate::report::percentile(&s.enrollment.latencies, 90.0)),
            us(crate::report::percentile(&s.enrollment.latencies, 100.0)),
        ));
    }
    let list_bytes: u64 = tin.reports.iter().map(|r| r.list_bytes).sum();
    let presence_bytes: u64 = tin.reports.iter().map(|r| r.presence_bytes).sum();
    report.note(format!(
        "tracker_enroll counts a peer enrolled when its last ClientList (broadcast) or Subscribed \
         (subscribe) page arrives; baseline: handshake + a one-byte exchange on a stream with the \
         bare server. Bringing N={n} peers online moved {} of lists ({} per enrollment) and {} of \
         presence deltas to the load generator; presence fan-out finished {} after the last \
         enrollment",
        bytes(list_bytes as f64),
        bytes(list_bytes as f64 / n.max(1) as f64),
        bytes(presence_bytes as f64),
        tin.presence_drain
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "NOT (deadline)".into()),
    ));
    // Both servers: at sizes this machine cannot carry, the bare server
    // loses peers too, and the two counts say which side gave way.
    for (server, phase) in [("tracker", tin), ("bare server", base)] {
        let dropped = phase.reports.iter().filter(|r| r.dropped.is_some()).count();
        if let Some(reason) = phase.reports.iter().find_map(|r| r.dropped.clone()) {
            report.note(format!(
                "{server} (first round) dropped or failed {dropped} simulated peers; first \
                 reason: {reason}"
            ));
        }
    }
    report.goal(Goal {
        name: "tracker_enroll",
        measured: Some(ratio),
        unit: "",
        target: Target::AtLeast(0.8),
        incomplete: !complete,
    });

    // tracker_memory
    // Per peer actually held (an incomplete run holds fewer than N).
    let per = |s: &Served| {
        s.rss_held.saturating_sub(s.rss_before) as f64 / s.enrollment.enrolled.max(1) as f64
    };
    let (tm, bm) = (per(tin), per(base));
    let ratio = tm / bm.max(f64::EPSILON);
    report.row(
        "tracker_memory / peer",
        bytes(tm),
        bytes(bm),
        format!("{ratio:.2}"),
    );
    report.result("tracker_rss_per_peer_bytes", tm);
    report.result("bare_rss_per_conn_bytes", bm);
    report.note(format!(
        "tracker_memory: (VmRSS with the enrolled peers held − VmRSS before) / enrolled peers; \
         tracker {} → {}, bare server {} → {}",
        bytes(tin.rss_before as f64),
        bytes(tin.rss_held as f64),
        bytes(base.rss_before as f64),
        bytes(base.rss_held as f64)
    ));
    report.goal(Goal {
        name: "tracker_memory",
        measured: Some(ratio),
        unit: "",
        target: Target::AtMost(1.3),
        incomplete: false,
    });

    // tracker_idle_cpu
    let (ti, ls) = tin.idle_cpu;
    let (bi, _) = base.idle_cpu;
    report.row(
        &format!("tracker_idle_cpu (N={n})"),
        format!("{:.2} %", ti * 100.0),
        format!("{:.2} %", bi * 100.0),
        format!("{:.2}", ti / bi.max(f64::EPSILON)),
    );
    report.result("tracker_idle_cpu_pct", ti * 100.0);
    report.result("bare_idle_cpu_pct", bi * 100.0);
    report.note(format!(
        "tracker_idle_cpu: % of one core over {:.0} s with N={n} idle peers sending keep-alives \
         every {:?} (load generator used {:.2} cores meanwhile)",
        opts.idle.as_secs_f64(),
        tincan_peer::net::KEEP_ALIVE,
        ls
    ));
    report.goal(Goal {
        name: "tracker_idle_cpu",
        measured: Some(ti * 100.0),
        unit: "%",
        target: Target::Report,
        incomplete: false,
    });
    Ok(())
}

/// Per-peer bytes at one size.
struct PresenceAt {
    n: usize,
    delta_per_peer: f64,
    list_per_peer: f64,
    classic_per_peer: f64,
    complete: bool,
    dropped: usize,
}

async fn presence_figures(
    opts: &Options,
    dir: &Path,
    report: &mut Report,
) -> Result<(), BenchError> {
    let largest = opts.presence_sizes.iter().copied().max().unwrap_or(0);
    let ids = identities(largest)?;
    let mut at = Vec::new();
    // presence_scaling measures the default, full-list mode.
    let presence = Presence::Broadcast;
    report.note(format!(
        "presence_scaling: the tracker ran with --presence {} (full list at enrollment, every \
         change to every peer); presence_enroll_per_s_N is that mode's enrollment rate (no goal)",
        presence.flag()
    ));
    for &n in &opts.presence_sizes {
        let (tracker, key) =
            start_tracker(opts, dir, &format!("presence-{n}"), n, presence).await?;
        let target = swarm::Target::Tracker { key, follows: true };
        let configs = swarm::client_configs(&ids[..n], target)?;
        let phase = Phase::begin(&tracker)?;
        let (swarm, enrollment) = Swarm::enroll(
            configs,
            tracker.addr,
            target,
            opts.concurrency,
            opts.deadline,
        )
        .await?;
        let entries = swarm.counters.list_entries.load(Ordering::Relaxed);
        let expected = presence.expected_frames(n, enrollment.enrolled, entries);
        let complete = swarm.wait_presence(expected, opts.drain).await;
        let (wall, server, own) = phase.end(&tracker)?;
        let reports = swarm.stop().await;
        tracker.stop().await;

        let count = reports.len().max(1) as f64;
        let list: u64 = reports.iter().map(|r| r.list_bytes).sum();
        let entries: u64 = reports.iter().map(|r| r.list_entries).sum();
        let delta: u64 = reports.iter().map(|r| r.presence_bytes).sum();
        let frames: u64 = reports.iter().map(|r| r.presence_frames).sum();
        // Classic: every join sends the whole list (k entries) to the k-1
        // peers already online: Σ k(k-1) entries = (n-1)n(n+1)/3, over n peers.
        let entry = list as f64 / entries.max(1) as f64;
        let nf = n as f64;
        let classic = entry * (nf - 1.0) * (nf + 1.0) / 3.0;
        let p = PresenceAt {
            n,
            delta_per_peer: delta as f64 / count,
            list_per_peer: list as f64 / count,
            classic_per_peer: classic + list as f64 / count,
            complete,
            dropped: reports.iter().filter(|r| r.dropped.is_some()).count(),
        };
        report.note(format!(
            "presence N={n}: {} enrolled, per peer {} of deltas ({:.1} frames of {:.1} B) + {} of \
             client list ({entry:.1} B per entry); the classic full-list broadcast would cost {} \
             per peer; deltas {}; {} peers dropped; {wall:.2} s, tracker {server:.2} cores, \
             load generator {own:.2} cores",
            enrollment.enrolled,
            bytes(p.delta_per_peer),
            frames as f64 / count,
            delta as f64 / frames.max(1) as f64,
            bytes(p.list_per_peer),
            bytes(p.classic_per_peer),
            if complete {
                "all delivered"
            } else {
                "NOT all delivered"
            },
            p.dropped,
        ));
        report.row(
            &format!("presence bytes/peer N={n}"),
            bytes(p.delta_per_peer + p.list_per_peer),
            format!("classic {}", bytes(p.classic_per_peer)),
            format!("deltas {}", bytes(p.delta_per_peer)),
        );
        report.result(
            &format!("presence_delta_bytes_per_peer_{n}"),
            p.delta_per_peer,
        );
        report.result(
            &format!("presence_list_bytes_per_peer_{n}"),
            p.list_per_peer,
        );
        report.result(
            &format!("presence_classic_bytes_per_peer_{n}"),
            p.classic_per_peer,
        );
        report.result(&format!("presence_enroll_per_s_{n}"), enrollment.rate());
        at.push(p);
    }
    // Largest growth of (deltas + list) per peer from one size to the next,
    // normalised to a doubling.
    let growth = at
        .windows(2)
        .map(|w| {
            let a = w[0].delta_per_peer + w[0].list_per_peer;
            let b = w[1].delta_per_peer + w[1].list_per_peer;
            let doublings = (w[1].n as f64 / w[0].n as f64).log2().max(f64::EPSILON);
            (b / a.max(f64::EPSILON)).powf(1.0 / doublings)
        })
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))));
    let sound = at.iter().all(|p| p.complete && p.dropped == 0);
    report.goal(Goal {
        name: "presence_scaling",
        measured: growth,
        unit: "",
        target: Target::AtMost(PRESENCE_GROWTH_TARGET),
        incomplete: !sound,
    });
    Ok(())
}
