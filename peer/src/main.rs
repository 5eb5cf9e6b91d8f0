//! `peer`: parses arguments, sets up logging, starts a [`tincan_peer::Node`]
//! and hands it to the text or JSON front end.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use tincan_peer::{
    Config, Node,
    frontend::{self, Exit, Mode},
};
use tincan_proto::{Name, PeerId};

/// `--store-linger-ms` by default: the store's own default.
const STORE_LINGER_MS: u64 = tincan_peer::store::STORE_LINGER.as_millis() as u64;

/// A tincan peer: enrolls with a tracker under NAME and talks to other peers directly.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Your name: 1-32 characters of A-Z a-z 0-9 _ -
    #[arg(long)]
    name: Name,
    /// The tracker, as HOST:PORT.
    #[arg(long, value_parser = parse_tracker)]
    tracker: String,
    /// Where this peer keeps its key and database
    /// [default: the platform data directory, e.g. ~/.local/share/tincan/peers/NAME].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// JSON Lines on stdin/stdout instead of text (see docs/json-api.md).
    #[arg(long)]
    json: bool,
    /// The tracker's key (64 hex characters), instead of trusting it on first contact.
    #[arg(long, value_parser = parse_key)]
    tracker_key: Option<PeerId>,
    /// Local UDP address for this peer's endpoint [default: 0.0.0.0:0, or
    /// [::]:0 when the tracker has only IPv6 addresses].
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Do not leave messages for offline peers with the tracker: bounce
    /// them at once, as the classic IM server did.
    #[arg(long)]
    no_offline: bool,
    /// Send only through the tracker's relay, never directly: the people you
    /// write to do not learn your address.
    #[arg(long)]
    relay_only: bool,
    /// Longest a write to peer.db may wait to be committed with others, in
    /// milliseconds (messages just sent or shown are journaled at once anyway).
    #[arg(long, default_value_t = STORE_LINGER_MS, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    store_linger_ms: u64,
}

fn parse_key(s: &str) -> Result<PeerId, String> {
    PeerId::from_hex(s).map_err(|e| e.to_string())
}

/// `HOST:PORT`, an IPv6 host in brackets; the host is looked up when enrolling.
fn parse_tracker(s: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected HOST:PORT, e.g. tracker.example.org:7777";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("no port: {EXPECTED}"));
    };
    match port.parse::<u16>() {
        Ok(1..) => {}
        _ => return Err(format!("{port:?} is not a port (1-65535): {EXPECTED}")),
    }
    if host.is_empty() {
        return Err(format!("no host: {EXPECTED}"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("an IPv6 address goes in brackets, e.g. [2001:db8::1]:7777".into());
    }
    Ok(s.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Built by hand so that shutdown does not wait for the blocking thread
    // parked in a read on stdin (tokio's stdin cannot be cancelled).
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    runtime.shutdown_background();
    match result {
        Ok(Exit::Quit) => ExitCode::SUCCESS,
        Ok(Exit::Failed) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("peer: {}", tincan_proto::error_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Exit> {
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => directories::ProjectDirs::from("org", "tincan", "tincan")
            .context("no home directory; pass --data-dir")?
            .data_dir()
            .join("peers")
            .join(args.name.key()),
    };
    let mut config = Config::new(args.name, args.tracker, data_dir);
    config.tracker_key = args.tracker_key;
    config.bind = match args.bind {
        Some(bind) => bind,
        None => tincan_peer::default_bind(&config.tracker).await,
    };
    config.offline_delivery = !args.no_offline;
    config.relay_only = args.relay_only;
    config.store_linger = std::time::Duration::from_millis(args.store_linger_ms);
    let (node, events) = Node::start(config).await?;
    let mode = if args.json { Mode::Json } else { Mode::Text };
    Ok(frontend::run(node, events, mode).await)
}
