//! Child processes under measurement (the real `tracker`, the bare quinn
//! server) and what `/proc` says about them: resident memory and CPU time.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
    time::timeout,
};

/// Longest wait for a child to print its listening address.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Kernel clock ticks per second in `/proc/*/stat` (`USER_HZ`, 100 on Linux).
pub const CLOCK_TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not print `{prefix}` within {STARTUP_TIMEOUT:?}")]
    Startup { what: String, prefix: &'static str },
    #[error("{what} printed an unreadable line: {line}")]
    BadLine { what: String, line: String },
    #[error("cannot read {path}: {source}")]
    Proc {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has no {field}")]
    ProcField { path: String, field: &'static str },
}

/// A child process that is killed when dropped.
pub struct Server {
    what: String,
    child: Child,
    pid: u32,
    pub addr: SocketAddr,
    /// The last value of each `key VALUE` line read at startup.
    pub key: Option<String>,
    _stdout: Lines<BufReader<ChildStdout>>,
}

impl Server {
    /// Starts `program args...`, its stderr going to `log`, and waits for a
    /// stdout line `<listen_prefix> ADDR` (then, if `key_prefix` is given, a
    /// line `<key_prefix> HEX`).
    pub async fn start(
        program: &Path,
        args: &[String],
        log: &Path,
        listen_prefix: &'static str,
        key_prefix: Option<&'static str>,
    ) -> Result<Self, ProcError> {
        let what = program.display().to_string();
        let spawn_err = |source| ProcError::Spawn {
            what: what.clone(),
            source,
        };
        let log = std::fs::File::create(log).map_err(spawn_err)?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let pid = child.id().ok_or_else(|| ProcError::Startup {
            what: what.clone(),
            prefix: listen_prefix,
        })?;
        let stdout = child.stdout.take().ok_or_else(|| ProcError::Startup {
            what: what.clone(),
            prefix: listen_prefix,
        })?;
        let mut lines = BufReader::new(stdout).lines();
        let addr_text = wait_line(&mut lines, &what, listen_prefix).await?;
        let addr = addr_text.parse().map_err(|_| ProcError::BadLine {
            what: what.clone(),
            line: addr_text.clone(),
        })?;
        let key = match key_prefix {
            Some(prefix) => Some(wait_line(&mut lines, &what, prefix).await?),
            None => None,
        };
        Ok(Self {
            what,
            child,
            pid,
            addr,
            key,
            _stdout: lines,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn usage(&self) -> Result<Usage, ProcError> {
        Usage::of(&format!("/proc/{}", self.pid))
    }

    /// Kills the process and reaps it.
    pub async fn stop(mut self) {
        if let Err(e) = self.child.kill().await {
            tracing::warn!(what = %self.what, error = %e, "cannot kill child");
        }
    }
}

async fn wait_line(
    lines: &mut Lines<BufReader<ChildStdout>>,
    what: &str,
    prefix: &'static str,
) -> Result<String, ProcError> {
    let startup = || ProcError::Startup {
        what: what.to_string(),
        prefix,
    };
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.trim().to_string());
            }
        }
        None
    };
    timeout(STARTUP_TIMEOUT, read)
        .await
        .map_err(|_| startup())?
        .ok_or_else(startup)
}

/// CPU time and resident memory of one process at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User + system CPU seconds since the process started.
    pub cpu_secs: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

impl Usage {
    /// This process (the load generator).
    pub fn own() -> Result<Self, ProcError> {
        Self::of("/proc/self")
    }

    fn of(dir: &str) -> Result<Self, ProcError> {
        let read = |path: String| {
            std::fs::read_to_string(&path).map_err(|source| ProcError::Proc { path, source })
        };
        let stat_path = format!("{dir}/stat");
        let stat = read(stat_path.clone())?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after =
            stat.rsplit_once(')')
                .map(|(_, rest)| rest)
                .ok_or_else(|| ProcError::ProcField {
                    path: stat_path.clone(),
                    field: "comm",
                })?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5); `after` starts at field 3.
        let tick = |i: usize, field| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| ProcError::ProcField {
                    path: stat_path.clone(),
                    field,
                })
        };
        let ticks = tick(11, "utime")? + tick(12, "stime")?;

        let status_path = format!("{dir}/status");
        let status = read(status_path.clone())?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or(ProcError::ProcField {
                path: status_path,
                field: "VmRSS",
            })?;
        Ok(Self {
            cpu_secs: ticks as f64 / CLOCK_TICKS_PER_SEC,
            rss_bytes: rss_kib * 1024,
        })
    }
}

/// Where the `tracker` binary is: beside this executable (both are built into
/// the same `target/<profile>/`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join(name);
    path.is_file().then_some(path)
}

/// Datagrams the kernel dropped on the UDP socket bound to local `port`
/// (receive buffer full), from the `drops` column of `/proc/net/udp`.
pub fn udp_drops(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let want = format!(":{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = fields.get(1)?;
        local
            .ends_with(&want)
            .then(|| fields.last()?.parse().ok())
            .flatten()
    })
}

/// UDP datagrams sent by every process on this machine so far (`OutDatagrams`
/// in `/proc/net/snmp`): on loopback that is both the server's and the load
/// generator's packets.
pub fn udp_datagrams_out() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let header: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let at = header.iter().position(|h| *h == "OutDatagrams")?;
    values.get(at)?.parse().ok()
}
