//! The NAT lab harness: builds a topology of network namespaces with
//! `tests/netlab/netlab.sh`, starts the real `tracker` and `peer` binaries
//! inside it (`ip netns exec NS <binary>`, so each child's pid is the
//! binary's), and tears everything down when the [`Lab`] is dropped, even
//! when a test fails: first every process the lab started (SIGKILL by pid),
//! then the namespaces.
//!
//! Labs run one at a time (a process-wide lock), and each gets its own
//! namespace prefix `tcnl<pid>x<n>`, so labs of a test process that was killed
//! can be recognised and removed (`netlab.sh gc`, run before each lab).
//!
//! Needs root and `ip`, `nft`, `iptables`, `conntrack`. Without them a lab
//! test prints why and passes, except under `CI=true`, where it fails.
//! See docs/netlab.md.

use std::{
    fs::File,
    net::{SocketAddr, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tokio::{
    process::Command,
    time::{Instant, timeout},
};

use crate::{Mode, Peer, PeerOpts, Tracker, binary};

/// The tracker host's address inside the lab.
pub const TRACKER_IP: &str = "203.0.113.1";
/// Where the lab's tracker listens.
pub const TRACKER_ADDR: &str = "203.0.113.1:7000";
/// Longest `netlab.sh up` or `down` may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest any command run inside the lab may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(20);

/// One lab at a time in this process.
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static SERIAL: AtomicU32 = AtomicU32::new(0);

/// What stands between a node's host and the lab's internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An address on the internet, no NAT.
    Public,
    /// Port-preserving NAT (`masquerade`); unsolicited inbound dropped.
    ConeDrop,
    /// The same NAT; unsolicited inbound rejected with ICMP.
    ConeReject,
    /// `masquerade fully-random`: a new random port per flow; drops.
    Symmetric,
    /// Cone NAT that lets no UDP out except to the tracker.
    UdpBlocked,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::ConeDrop => "cone-drop",
            Kind::ConeReject => "cone-reject",
            Kind::Symmetric => "symmetric",
            Kind::UdpBlocked => "udp-blocked",
        }
    }
}

/// One node of the lab: a host, behind a router unless it is public.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub kind: Kind,
    /// Added by the node's router (or the public host) in each direction.
    pub delay_ms: u32,
    /// Share of packets the router drops in each direction, in percent.
    pub loss_pct: u32,
    /// The router's conntrack UDP timeouts (default: the kernel's 30 s/120 s).
    pub udp_timeout_s: Option<u32>,
}

impl Node {
    pub fn new(name: &str, kind: Kind) -> Self {
        Self {
            name: name.into(),
            kind,
            delay_ms: 0,
            loss_pct: 0,
            udp_timeout_s: None,
        }
    }

    pub fn delay(mut self, ms: u32) -> Self {
        self.delay_ms = ms;
        self
    }

    pub fn loss(mut self, pct: u32) -> Self {
        self.loss_pct = pct;
        self
    }

    pub fn udp_timeout(mut self, secs: u32) -> Self {
        self.udp_timeout_s = Some(secs);
        self
    }

    fn spec(&self) -> String {
        let mut s = format!(
            "{}:{}:delay={}:loss={}",
            self.name,
            self.kind.as_str(),
            self.delay_ms,
            self.loss_pct
        );
        if let Some(t) = self.udp_timeout_s {
            s.push_str(&format!(":udp_timeout={t}"));
        }
        s
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("netlab/netlab.sh")
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Finds a program in PATH or the usual sbin directories.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Why the lab cannot run here, if it cannot.
fn missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("the NAT lab needs root (network namespaces)".into());
    }
    let absent: Vec<&str> = ["ip", "nft", "iptables", "conntrack", "sysctl"]
        .into_iter()
        .filter(|t| tool(t).is_none())
        .collect();
    if !absent.is_empty() {
        return Some(format!(
            "the NAT lab needs {} (apt-get install iproute2 nftables iptables conntrack procps)",
            absent.join(", ")
        ));
    }
    if let Err(e) = binary("netlab-delay") {
        return Some(format!("{e:#}"));
    }
    None
}

/// `Ok(true)` if a lab can run; `Ok(false)` (with the reason printed) if the
/// test should be skipped; an error under CI, where skipping is not allowed.
pub fn available() -> Result<bool> {
    match missing() {
        None => Ok(true),
        Some(why) if under_ci() => bail!("CI=true but the NAT lab cannot run: {why}"),
        Some(why) => {
            eprintln!("skipping NAT lab test: {why}");
            Ok(false)
        }
    }
}

/// A running lab. Dropping it stops every process it started and deletes
/// its namespaces.
pub struct Lab {
    prefix: String,
    nodes: Vec<Node>,
    ip: PathBuf,
    /// Processes started in the lab: pid and the binary it runs.
    pids: Mutex<Vec<(u32, PathBuf)>>,
    tmp: tempfile::TempDir,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

impl Lab {
    /// Builds a lab with these nodes (plus the tracker host). `None` when
    /// the lab cannot run here and the test should pass as skipped.
    pub async fn up(nodes: &[Node]) -> Result<Option<Lab>> {
        if !available()? {
            return Ok(None);
        }
        let lock = LOCK.lock().await;
        let _ = run_script(&["gc".to_string()]).await;
        let prefix = format!(
            "tcnl{}x{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Lab {
            prefix: prefix.clone(),
            nodes: nodes.to_vec(),
            ip: tool("ip").context("ip")?,
            pids: Mutex::new(Vec::new()),
            tmp: tempfile::tempdir()?,
            _lock: lock,
        };
        let delay_bin = binary("netlab-delay")?;
        let mut args = vec![
            "up".to_string(),
            "--prefix".into(),
            prefix,
            "--delay-bin".into(),
            delay_bin.display().to_string(),
        ];
        args.extend(nodes.iter().map(Node::spec));
        // On failure `lab` is dropped here, which runs `down`.
        run_script(&args).await?;
        Ok(Some(lab))
    }

    fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name} in this lab"))
    }

    /// The namespace of a node's host (`"trk"` is the tracker host).
    pub fn host_ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// The namespace of a node's NAT router.
    pub fn router_ns(&self, node: &str) -> Result<String> {
        match self.node(node)?.kind {
            Kind::Public => bail!("{node} is public: it has no router"),
            _ => Ok(format!("{}-{node}-r", self.prefix)),
        }
    }

    /// A node's address on the lab's internet (its router's, behind a NAT).
    pub fn public_ip(&self, node: &str) -> Result<String> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| anyhow!("no node {node} in this lab"))?;
        Ok(format!("203.0.113.{}", 11 + i))
    }

    /// A node's host address (its LAN address behind a NAT).
    pub fn host_ip(&self, node: &str) -> Result<String> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| anyhow!("no node {node} in this lab"))?;
        match self.nodes[i].kind {
            Kind::Public => self.public_ip(node),
            _ => Ok(format!("10.{}.0.2", i + 1)),
        }
    }

    fn wrapper(&self, ns: &str) -> Vec<String> {
        vec![
            self.ip.display().to_string(),
            "netns".into(),
            "exec".into(),
            ns.into(),
        ]
    }

    fn register(&self, pid: Option<u32>, program: &str) -> Result<()> {
        let pid = pid.context("the child has no pid")?;
        let exe = binary(program)?;
        let exe = exe.canonicalize().unwrap_or(exe);
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((pid, exe));
        Ok(())
    }

    /// Starts the tracker on its host, listening on [`TRACKER_ADDR`].
    pub async fn tracker(&self, extra: &[&str]) -> Result<Tracker> {
        let dir = self.tmp.path().join("tracker");
        std::fs::create_dir_all(&dir)?;
        let wrapper = self.wrapper(&self.host_ns("trk"));
        let tracker = Tracker::start_wrapped(&wrapper, TRACKER_ADDR, &dir, extra).await?;
        self.register(tracker.pid(), "tracker")?;
        Ok(tracker)
    }

    /// Options for a JSON peer named `name` on `node`'s host.
    pub fn peer_opts(&self, node: &str, name: &str, tracker: &Tracker) -> PeerOpts {
        PeerOpts::new(name, tracker, Mode::Json)
            .wrapper(&self.wrapper(&self.host_ns(node)))
            .bind("0.0.0.0:0")
    }

    /// Starts a peer from `opts` and waits until it has enrolled.
    pub async fn start_peer(&self, opts: PeerOpts) -> Result<Peer> {
        let mut peer = opts.spawn()?;
        self.register(peer.pid(), "peer")?;
        peer.expect_event("enrolled", |_| true).await?;
        Ok(peer)
    }

    /// Runs a command inside a namespace of the lab; returns its stdout.
    pub async fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", ns]).args(args);
        run(cmd, &format!("{args:?} in {ns}"), EXEC_TIMEOUT).await
    }

    /// A UDP socket bound to `bind` inside namespace `ns`.
    pub fn udp_socket(&self, ns: &str, bind: &str) -> Result<UdpSocket> {
        let path = Path::new("/run/netns").join(ns);
        let bind: SocketAddr = bind.parse()?;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<UdpSocket> {
                let file = File::open(&path).with_context(|| format!("{}", path.display()))?;
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .with_context(|| format!("entering {ns}"))?;
                Ok(UdpSocket::bind(bind)?)
            })
            .join()
            .map_err(|_| anyhow!("the namespace thread panicked"))?
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // 1. Every process we started, by pid, if that pid still runs our binary.
        let pids = std::mem::take(&mut *self.pids.lock().unwrap_or_else(|p| p.into_inner()));
        for (pid, exe) in pids {
            let running = std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe);
            let pid = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw);
            if let (true, Some(p)) = (running, pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        // 2. The namespaces (and the delay processes the script started).
        let args = ["down", "--prefix", &self.prefix];
        let done = std::process::Command::new("bash")
            .arg(script())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                let deadline = std::time::Instant::now() + SCRIPT_TIMEOUT;
                loop {
                    if let Some(status) = child.try_wait()? {
                        return Ok(status.success());
                    }
                    if std::time::Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Ok(false);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        if !matches!(done, Ok(true)) {
            eprintln!("netlab: tearing down lab {} failed: {done:?}", self.prefix);
        }
    }
}

async fn run_script(args: &[String]) -> Result<String> {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(args);
    run(cmd, &format!("netlab.sh {args:?}"), SCRIPT_TIMEOUT).await
}

/// Runs `cmd` (no stdin, killed if the wait is dropped) for at most `limit`;
/// its stdout, or an error naming `what` with everything it printed.
async fn run(mut cmd: Command, what: &str, limit: Duration) -> Result<String> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = timeout(limit, cmd.output())
        .await
        .with_context(|| format!("{what} took over {limit:?}"))??;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------
// One trial of a topology pair.

/// Longest a message may take to be shown (held delivery included).
pub const DELIVERY_BOUND: Duration = Duration::from_secs(20);
/// Longest a conversation may take to reach the path a test expects.
pub const PATH_BOUND: Duration = Duration::from_secs(10);

/// Two nodes, `a` (alice, who writes first) and `b` (bob).
#[derive(Clone, Copy, Debug)]
pub struct Pair {
    pub a: Kind,
    pub b: Kind,
    /// Whether a direct path between them is possible.
    pub direct_possible: bool,
}

impl Pair {
    pub const fn new(a: Kind, b: Kind, direct_possible: bool) -> Self {
        Self {
            a,
            b,
            direct_possible,
        }
    }

    pub fn label(&self) -> String {
        format!("{}↔{}", self.a.as_str(), self.b.as_str())
    }

    /// The path a conversation between them should settle on.
    pub fn expected_path(&self) -> &'static str {
        if self.direct_possible {
            "direct"
        } else {
            "relay"
        }
    }
}

/// The pairs of issue 3, with 20 ms per router in the tests.
pub const PAIRS: [Pair; 7] = [
    Pair::new(Kind::Public, Kind::Public, true),
    Pair::new(Kind::ConeDrop, Kind::Public, true),
    Pair::new(Kind::ConeDrop, Kind::ConeDrop, true),
    Pair::new(Kind::ConeReject, Kind::ConeReject, true),
    Pair::new(Kind::Public, Kind::Symmetric, true),
    Pair::new(Kind::ConeDrop, Kind::Symmetric, false),
    Pair::new(Kind::UdpBlocked, Kind::ConeDrop, false),
];

/// What a trial saw. Times run from the `send` command.
#[derive(Debug, Default)]
pub struct Trial {
    /// alice → bob shown at bob, and on which path.
    pub first_delivery: Option<Duration>,
    pub first_path: Option<String>,
    /// bob → alice (sent once bob has alice's message) shown at alice.
    pub reply_delivery: Option<Duration>,
    pub reply_path: Option<String>,
    /// alice's `path` event for bob with the awaited path.
    pub path_reached: Option<Duration>,
    pub path_rtt_ms: Option<u64>,
    /// Bytes alice's conversation sent and received through a relay circuit
    /// before the path went direct (0 when no relay carried anything).
    pub relay_bytes: Option<u64>,
    /// Whether a router saw packets flow between the two public addresses
    /// (checked when the path is reported direct; `None` for public↔public).
    pub direct_flow_seen: Option<bool>,
    /// What went wrong, with the peers' last output.
    pub failure: Option<String>,
}

impl Trial {
    pub fn delivered(&self) -> bool {
        self.first_delivery.is_some() && self.reply_delivery.is_some()
    }
}

/// Options of a trial.
#[derive(Clone, Debug)]
pub struct TrialOpts {
    pub delay_ms: u32,
    pub loss_pct: u32,
    /// Wait (within `path_bound`) for alice's `path` event with this path.
    pub await_path: Option<&'static str>,
    pub path_bound: Duration,
}

impl Default for TrialOpts {
    fn default() -> Self {
        Self {
            delay_ms: 20,
            loss_pct: 0,
            await_path: None,
            path_bound: PATH_BOUND,
        }
    }
}

fn path_of(v: &Value) -> Option<String> {
    v["path"].as_str().map(str::to_string)
}

/// Builds a fresh lab for `pair`, starts a tracker and two peers, sends
/// alice → bob and then bob → alice, and measures. `None` if the lab cannot
/// run here (skipped). Set-up failures are errors; a missing delivery or path
/// is recorded in the [`Trial`].
pub async fn trial(pair: Pair, opts: &TrialOpts) -> Result<Option<Trial>> {
    let nodes = [
        Node::new("a", pair.a)
            .delay(opts.delay_ms)
            .loss(opts.loss_pct),
        Node::new("b", pair.b)
            .delay(opts.delay_ms)
            .loss(opts.loss_pct),
    ];
    let Some(lab) = Lab::up(&nodes).await? else {
        return Ok(None);
    };
    let tracker = lab.tracker(&[]).await?;
    let mut bob = lab.start_peer(lab.peer_opts("b", "bob", &tracker)).await?;
    let mut alice = lab
        .start_peer(lab.peer_opts("a", "alice", &tracker))
        .await?;
    alice
        .expect_event("client_list", |v| {
            v["peers"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == "bob"))
        })
        .await?;

    let mut t = Trial::default();
    let mut problems = Vec::new();
    let text = "hello bob, from alice in the lab";
    let t0 = Instant::now();
    alice.send("bob", text).await?;
    let wait_path = async {
        match opts.await_path {
            Some(want) => Some(
                alice
                    .expect_event_within("path", opts.path_bound, |v| {
                        v["name"] == "bob" && v["path"] == want
                    })
                    .await
                    .map(|v| (t0.elapsed(), v)),
            ),
            None => None,
        }
    };
    let wait_message = async {
        bob.expect_event_within("message", DELIVERY_BOUND, |v| {
            v["from"] == "alice" && v["text"] == text
        })
        .await
        .map(|v| (t0.elapsed(), v))
    };
    let (message, path) = tokio::join!(wait_message, wait_path);
    match message {
        Ok((at, v)) => {
            t.first_delivery = Some(at);
            t.first_path = path_of(&v);
        }
        Err(e) => problems.push(format!("alice → bob not shown: {}", first_line(&e))),
    }
    match path {
        Some(Ok((at, v))) => {
            t.path_reached = Some(at);
            t.path_rtt_ms = v["rtt_ms"].as_u64();
            t.relay_bytes = Some(v["relay_bytes"].as_u64().unwrap_or(0));
        }
        Some(Err(e)) => problems.push(format!(
            "no {:?} path event: {}",
            opts.await_path.unwrap_or_default(),
            first_line(&e)
        )),
        None => {}
    }

    if t.first_delivery.is_some() {
        let reply = "hello alice, bob here";
        let t1 = Instant::now();
        bob.send("alice", reply).await?;
        match alice
            .expect_event_within("message", DELIVERY_BOUND, |v| {
                v["from"] == "bob" && v["text"] == reply
            })
            .await
        {
            Ok(v) => {
                t.reply_delivery = Some(t1.elapsed());
                t.reply_path = path_of(&v);
            }
            Err(e) => problems.push(format!("bob → alice not shown: {}", first_line(&e))),
        }
    }

    // Honest path: a "direct" conversation through a NAT leaves a conntrack
    // entry between the two public addresses in the router.
    if opts.await_path == Some("direct") && t.path_reached.is_some() {
        match direct_flow(&lab, pair).await {
            Ok(seen) => {
                t.direct_flow_seen = seen;
                if seen == Some(false) {
                    problems.push("the path is reported direct, but no router saw a flow between the two peers".into());
                }
            }
            Err(e) => problems.push(format!("conntrack check failed: {e:#}")),
        }
    }

    if !problems.is_empty() {
        t.failure = Some(format!(
            "{}: {}\n--- alice stdout ---\n{}\n--- alice stderr ---\n{}\n--- bob stdout ---\n{}\n--- bob stderr ---\n{}\n--- tracker stderr ---\n{}",
            pair.label(),
            problems.join("; "),
            alice.stdout(),
            tail(&alice.stderr(), 40),
            bob.stdout(),
            tail(&bob.stderr(), 40),
            tail(&tracker.stderr(), 40),
        ));
    }
    drop((alice, bob, tracker));
    drop(lab);
    Ok(Some(t))
}

/// Whether a router between alice and bob has a UDP conntrack entry between
/// their public addresses; `None` when neither is behind a router.
async fn direct_flow(lab: &Lab, pair: Pair) -> Result<Option<bool>> {
    let (router, other) = if pair.a != Kind::Public {
        (lab.router_ns("a")?, lab.public_ip("b")?)
    } else if pair.b != Kind::Public {
        (lab.router_ns("b")?, lab.public_ip("a")?)
    } else {
        return Ok(None);
    };
    let out = lab.exec(&router, &["conntrack", "-L", "-p", "udp"]).await?;
    let (src, dst) = (format!("src={other} "), format!("dst={other} "));
    Ok(Some(
        out.lines().any(|l| l.contains(&src) || l.contains(&dst)),
    ))
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The median of some durations, if any.
pub fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2),
    }
}
