//! `tincan-bench`: parses arguments, sets up logging, runs the figures (or
//! the bare quinn server, when started as `tincan-bench bare-server`).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tincan_bench::{
    bare::BareServer,
    procs,
    scenarios::{self, Groups, Options},
};
use tokio_util::sync::CancellationToken;

/// Most simulated peers a run may ask for.
const MAX_PEERS: usize = 100_000;
/// Most enrollments in flight at once.
const MAX_CONCURRENCY: u64 = 10_000;
/// Most round trips direct_rtt may take (of each side).
const MAX_RTT_MESSAGES: u64 = 1_000_000;
/// Most messages direct_throughput may send.
const MAX_TPUT_MESSAGES: u64 = 10_000_000;
/// Longest enrollment deadline.
const MAX_DEADLINE_SECS: u64 = 3_600;

/// Measures tincan beside raw quinn in the same run and prints one
/// `GOAL <name> measured=<value> target=<value> met|short` line per goal.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Simulated peers for tracker_enroll, tracker_memory and tracker_idle_cpu.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(2..=MAX_PEERS as u64))]
    peers: u64,
    /// Tiny sizes (200 peers, 500 messages): proves every figure works, no timing value.
    #[arg(long)]
    smoke: bool,
    /// Enrollments in flight at once [default: 64].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_CONCURRENCY))]
    concurrency: Option<u64>,
    /// Messages for direct_rtt [default: 10000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_RTT_MESSAGES))]
    rtt_messages: Option<u64>,
    /// Messages for direct_throughput (tincan side) [default: 20000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TPUT_MESSAGES))]
    tput_messages: Option<u64>,
    /// Run only these groups of figures (comma-separated: direct, tracker, presence).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Group>,
    /// Sizes for presence_scaling (comma-separated) [default: 1000,2000,4000].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(2..=MAX_PEERS as u64))]
    presence_sizes: Vec<u64>,
    /// Rounds of tracker_enroll, each enrolling the whole swarm with the bare
    /// server, with a tracker, and with a tracker while the peers follow
    /// nobody (the order mirrored every other round) [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=8))]
    enroll_rounds: Option<u64>,
    /// Stop enrolling after this many seconds [default: 120, smoke: 60].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_DEADLINE_SECS))]
    deadline: Option<u64>,
    /// The tracker binary [default: `tracker` beside this executable, built if missing].
    #[arg(long)]
    tracker_bin: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Group {
    Direct,
    Tracker,
    Presence,
}

#[derive(Subcommand)]
enum Command {
    /// The bare quinn server baseline (started by the harness itself).
    BareServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tincan_bench=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tincan-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::BareServer { listen }) = args.command {
        return bare_server(listen).await;
    }
    let bench_bin = std::env::current_exe().context("locating this executable")?;
    let tracker_bin = match args.tracker_bin {
        Some(path) => path,
        None => find_or_build_tracker()?,
    };
    let peers = usize::try_from(args.peers).context("--peers")?;
    let mut opts = if args.smoke {
        Options::smoke(tracker_bin, bench_bin)
    } else {
        Options::full(peers, tracker_bin, bench_bin)
    };
    if let Some(c) = args.concurrency {
        opts.concurrency = usize::try_from(c).context("--concurrency")?;
    }
    if let Some(m) = args.rtt_messages {
        opts.rtt_messages = usize::try_from(m).context("--rtt-messages")?;
    }
    if let Some(m) = args.tput_messages {
        opts.tput_messages = usize::try_from(m).context("--tput-messages")?;
    }
    if let Some(r) = args.enroll_rounds {
        opts.enroll_rounds = usize::try_from(r).context("--enroll-rounds")?;
    }
    if let Some(secs) = args.deadline {
        opts.deadline = std::time::Duration::from_secs(secs);
    }
    if !args.only.is_empty() {
        opts.groups = Groups {
            direct: args.only.contains(&Group::Direct),
            tracker: args.only.contains(&Group::Tracker),
            presence: args.only.contains(&Group::Presence),
        };
    }
    if !args.presence_sizes.is_empty() {
        opts.presence_sizes = args
            .presence_sizes
            .iter()
            .map(|&n| usize::try_from(n).context("--presence-sizes"))
            .collect::<anyhow::Result<_>>()?;
    }
    // A signal drops the run: every server it started is killed on drop
    // and its temporary directory removed.
    let report = tokio::select! {
        report = scenarios::run(&opts) => report?,
        () = tincan_tracker::stop_signal() => bail!("stopped by a signal before the run ended"),
    };
    print!("{}", report.render());
    Ok(())
}

async fn bare_server(listen: SocketAddr) -> anyhow::Result<()> {
    let server = BareServer::bind(listen)?;
    println!("bare listening on {}", server.local_addr()?);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    let run = tokio::spawn(server.run(shutdown));
    tincan_tracker::stop_signal().await;
    signal.cancel();
    run.await.context("bare server task")?;
    Ok(())
}

/// `tracker` beside this executable; when it is missing (e.g. `cargo run -p
/// tincan-bench` builds only this package), build it with the same profile.
fn find_or_build_tracker() -> anyhow::Result<PathBuf> {
    if let Some(path) = procs::sibling_binary("tracker") {
        return Ok(path);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--locked",
        "-p",
        "tincan-tracker",
        "--bin",
        "tracker",
        "--manifest-path",
    ])
    .arg(&manifest);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo to build the tracker")?;
    if !status.success() {
        bail!("building the tracker failed ({status}); pass --tracker-bin");
    }
    procs::sibling_binary("tracker")
        .context("the tracker binary is still not beside tincan-bench; pass --tracker-bin")
}
