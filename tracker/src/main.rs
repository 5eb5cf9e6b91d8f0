//! `tracker`: parses arguments, sets up logging, runs [`tincan_tracker::Tracker`].

use std::{io::Write, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use tincan_tracker::{Config, DEFAULT_MAX_PEERS, Tracker, registry::PresenceMode};
use tokio_util::sync::CancellationToken;

/// tincan's rendezvous server: enrolls peers by name and tells them who is online.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address and UDP port to listen on.
    #[arg(long, default_value = "0.0.0.0:7777")]
    listen: SocketAddr,
    /// Where the tracker keeps its key and name bindings
    /// [default: the platform data directory, e.g. ~/.local/share/tincan/tracker].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Most peers online at once (at least 1).
    #[arg(long, default_value_t = DEFAULT_MAX_PEERS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_peers: u64,
    /// How long sealed messages wait for an offline recipient (e.g. 7d, 12h,
    /// 30s; at least 1s).
    #[arg(long, default_value = "7d", value_parser = held_ttl)]
    held_ttl: Duration,
    /// How long a name stays bound to its key after its last use (e.g. 30d).
    #[arg(long, default_value = "30d", value_parser = name_retention)]
    name_retention: Duration,
    /// Who hears about a peer coming and going: everyone (broadcast: the
    /// full list at enrollment, every change to every peer), or only the
    /// peers that follow its name (subscribe: for large trackers).
    #[arg(long, value_enum, default_value_t = Presence::Broadcast)]
    presence: Presence,
}

/// Longest `--held-ttl` and `--name-retention`: far past any use, and well
/// within the second counts the databases store.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `--held-ttl`: a time to live of zero would expire every held message at
/// once.
fn held_ttl(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_secs(1))
}

/// `--name-retention`: zero frees a name as soon as its peer logs out.
fn name_retention(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::ZERO)
}

fn duration_within(s: &str, least: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < least {
        return Err(format!("at least {}", humantime::format_duration(least)));
    }
    if d > MAX_DURATION {
        return Err("at most 100 years".into());
    }
    Ok(d)
}

/// The values of `--presence`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Presence {
    Broadcast,
    Subscribe,
}

impl From<Presence> for PresenceMode {
    fn from(p: Presence) -> Self {
        match p {
            Presence::Broadcast => PresenceMode::Broadcast,
            Presence::Subscribe => PresenceMode::Subscribe,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracker: {}", tincan_proto::error_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => directories::ProjectDirs::from("org", "tincan", "tincan")
            .context("no home directory; pass --data-dir")?
            .data_dir()
            .join("tracker"),
    };
    let mut config = Config::new(args.listen, data_dir);
    config.max_peers = usize::try_from(args.max_peers).unwrap_or(usize::MAX);
    config.held_ttl = args.held_ttl;
    config.name_retention = args.name_retention;
    config.presence = args.presence.into();
    let tracker = Tracker::bind(config)?;
    let addr = tracker.local_addr().context("reading the bound address")?;
    // Not println!, which panics when stdout is a pipe whose reader has
    // gone (`tracker | grep -m1 listening`): the tracker runs on without it.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "tracker listening on {addr}")
        .and_then(|()| writeln!(stdout, "tracker key {}", tracker.id()))
        .and_then(|()| stdout.flush());
    drop(stdout);

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        tincan_tracker::stop_signal().await;
        signal.cancel();
    });
    tracker.run(shutdown).await;
    Ok(())
}
