//! `netlab-delay`: the NAT lab's stand-in for `tc netem delay` (missing from
//! this kernel). It binds an NFQUEUE queue and holds every packet queued there
//! for a fixed delay before accepting it; optionally it drops a share of them.
//! Order is kept (the delay is the same for every packet).
//!
//! ```text
//! netlab-delay --queue 0 --delay-ms 20 [--loss PCT] [--max-queue 4096]
//! ```
//!
//! Packets reach it through `iptables -t raw -A PREROUTING -j NFQUEUE
//! --queue-num 0 --queue-bypass` (tests/netlab/netlab.sh). It prints `ready`
//! once bound and runs until killed. At most `--max-queue` packets are held;
//! beyond that new packets are dropped, as a full router buffer would.

use std::{
    collections::VecDeque,
    io::Write,
    process::ExitCode,
    time::{Duration, Instant},
};

use nfq::{Queue, Verdict};

/// Longest a blocking-free pass sleeps while packets are held.
const TICK: Duration = Duration::from_micros(500);

struct Opts {
    queue: u16,
    delay: Duration,
    loss_pct: u32,
    max_queue: usize,
}

fn parse() -> Result<Opts, String> {
    let mut opts = Opts {
        queue: 0,
        delay: Duration::ZERO,
        loss_pct: 0,
        max_queue: 4096,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: std::num::ParseIntError| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--queue" => opts.queue = value.parse().map_err(bad)?,
            "--delay-ms" => opts.delay = Duration::from_millis(value.parse().map_err(bad)?),
            "--loss" => opts.loss_pct = value.parse().map_err(bad)?,
            "--max-queue" => opts.max_queue = value.parse().map_err(bad)?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if opts.loss_pct > 100 {
        return Err("--loss is a percentage".into());
    }
    if opts.max_queue == 0 || opts.max_queue > 1_000_000 {
        return Err("--max-queue must be 1..=1000000".into());
    }
    Ok(opts)
}

/// xorshift64*: enough randomness for dropping packets, no dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9);
        Self((t ^ u64::from(std::process::id())) | 1)
    }

    fn percent(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as u32 % 100
    }
}

fn run(opts: &Opts) -> std::io::Result<()> {
    let mut queue = Queue::open()?;
    queue.bind(opts.queue)?;
    queue.set_queue_max_len(opts.queue, opts.max_queue as u32)?;
    println!(
        "ready queue={} delay_ms={} loss_pct={}",
        opts.queue,
        opts.delay.as_millis(),
        opts.loss_pct
    );
    std::io::stdout().flush()?;

    let mut rng = Rng::seeded();
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        // Nothing held: sleep in the kernel until a packet comes.
        queue.set_nonblocking(!held.is_empty());
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    let now = Instant::now();
                    if opts.loss_pct > 0 && rng.percent() < opts.loss_pct
                        || held.len() >= opts.max_queue
                    {
                        msg.set_verdict(Verdict::Drop);
                        queue.verdict(msg)?;
                    } else if opts.delay.is_zero() {
                        msg.set_verdict(Verdict::Accept);
                        queue.verdict(msg)?;
                    } else {
                        held.push_back((now + opts.delay, msg));
                    }
                    // Keep reading whatever else is waiting, without blocking.
                    queue.set_nonblocking(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, mut msg)) = held.pop_front() {
                msg.set_verdict(Verdict::Accept);
                queue.verdict(msg)?;
            }
        }
        if let Some((due, _)) = held.front() {
            std::thread::sleep(due.saturating_duration_since(now).min(TICK));
        }
    }
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("netlab-delay: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netlab-delay: {e}");
            ExitCode::FAILURE
        }
    }
}
