//! Test support: start the real `tracker` and `peer` binaries as child
//! processes on 127.0.0.1 with their own temporary data directories, drive
//! them through stdin, and wait (always with a timeout) for what they print.
//!
//! The binaries are the ones `cargo test --workspace` builds next to this
//! test executable (target/<profile>/). Every child is started with
//! `kill_on_drop`, so a failing test still stops every process it started.

pub mod netlab;
pub mod raw;

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::mpsc,
    time::{Instant, timeout},
};

/// Default wait for anything a test expects to see.
pub const WAIT: Duration = Duration::from_secs(15);
/// Lines of output kept per process for failure messages.
const KEEP_LINES: usize = 200;
/// Unmatched lines kept per process for later expectations.
const MAX_BACKLOG: usize = 100_000;

/// The names in a JSON reply or event's `peers` array, sorted.
pub fn peer_names(v: &Value) -> Vec<String> {
    let mut names: Vec<String> = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Path of a workspace binary built alongside the running test.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: run the tests with `cargo test --workspace`, which builds the binaries",
            path.display()
        );
    }
    Ok(path)
}

/// Output lines of a child, kept for assertions and failure messages.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: String) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() >= KEEP_LINES {
            v.remove(0);
        }
        v.push(line);
    }

    fn dump(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }
}

/// A running child whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stdout_log: Log,
    stderr_log: Log,
    label: String,
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// Lines read but not yet matched by any expectation.
    backlog: VecDeque<String>,
}

impl Proc {
    /// Runs `wrapper... program args...`; the wrapper must exec the program
    /// (as `ip netns exec NS` does) so that the child's pid is the program's.
    fn spawn_wrapped(
        label: &str,
        wrapper: &[String],
        program: &Path,
        args: &[String],
    ) -> Result<Self> {
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        let mut child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, lines) = mpsc::channel(100_000);
        let stdout_log = Log::default();
        let stderr_log = Log::default();
        let log = stdout_log.clone();
        let stdout_done = tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                log.push(line.clone());
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        let log = stderr_log.clone();
        let stderr_done = tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                log.push(line);
            }
        });
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            lines,
            stdout_log,
            stderr_log,
            label: label.to_string(),
            readers: vec![stdout_done, stderr_done],
            backlog: VecDeque::new(),
        })
    }

    /// After the child exited: waits (bounded) until its output is fully read.
    async fn drain(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = timeout(WAIT, reader).await;
        }
    }

    fn context(&self) -> String {
        format!(
            "--- {} stdout (last lines) ---\n{}\n--- {} stderr ---\n{}",
            self.label,
            self.stdout_log.dump(),
            self.label,
            self.stderr_log.dump()
        )
    }

    /// Waits for the first not yet consumed line that satisfies `pred` and
    /// consumes it; lines that do not match stay for later expectations.
    async fn expect_line(
        &mut self,
        what: &str,
        wait: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        if let Some(pos) = self.backlog.iter().position(|l| pred(l)) {
            return Ok(self.backlog.remove(pos).unwrap_or_default());
        }
        self.expect_new_line(what, wait, pred).await
    }

    /// Like `expect_line`, but only looks at lines not read yet (for the
    /// reply to a command just written, which cannot be in the backlog).
    async fn expect_new_line(
        &mut self,
        what: &str,
        wait: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if pred(&line) => return Ok(line),
                Ok(Some(line)) => {
                    if self.backlog.len() >= MAX_BACKLOG {
                        self.backlog.pop_front();
                    }
                    self.backlog.push_back(line);
                }
                Ok(None) => bail!(
                    "{}: output ended while waiting for {what}\n{}",
                    self.label,
                    self.context()
                ),
                Err(_) => bail!(
                    "{}: timed out after {wait:?} waiting for {what}\n{}",
                    self.label,
                    self.context()
                ),
            }
        }
    }

    async fn write_line(&mut self, line: &str) -> Result<()> {
        self.write_raw_line(line.as_bytes()).await
    }

    async fn write_raw_line(&mut self, line: &[u8]) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(line).await?;
        stdin.write_all(b"\n").await?;
        stdin.flush().await?;
        Ok(())
    }

    async fn wait_exit(&mut self, wait: Duration) -> Result<ExitStatus> {
        match timeout(wait, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                self.drain().await;
                Ok(status)
            }
            Err(_) => bail!(
                "{}: did not exit within {wait:?}\n{}",
                self.label,
                self.context()
            ),
        }
    }

    /// Every line not yet consumed, reading until the process's output ends
    /// (bounded by `wait`); for a process that was killed.
    async fn rest(&mut self, wait: Duration) -> Vec<String> {
        let mut out: Vec<String> = self.backlog.drain(..).collect();
        let deadline = Instant::now() + wait;
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            out.push(line);
        }
        out
    }

    /// SIGKILL by pid: no logout, no goodbye.
    async fn kill(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// A running `tracker`.
pub struct Tracker {
    proc: Proc,
    pub addr: String,
    pub key: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Tracker {
    /// A tracker on 127.0.0.1, random port, fresh data directory.
    pub async fn start() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_path_buf();
        let mut t = Self::start_at("127.0.0.1:0", &dir).await?;
        t._tmp = Some(tmp);
        Ok(t)
    }

    /// A tracker on a random port with extra arguments (e.g. a short `--held-ttl`).
    pub async fn start_with(extra: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_path_buf();
        let mut t = Self::start_full("127.0.0.1:0", &dir, extra).await?;
        t._tmp = Some(tmp);
        Ok(t)
    }

    /// A tracker on `listen` with data directory `dir` (for restarts).
    pub async fn start_at(listen: &str, dir: &Path) -> Result<Self> {
        Self::start_full(listen, dir, &[]).await
    }

    async fn start_full(listen: &str, dir: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_wrapped(&[], listen, dir, extra).await
    }

    /// A tracker started through `wrapper` (e.g. `ip netns exec NS`), on
    /// `listen`, with data directory `dir` and extra arguments.
    pub async fn start_wrapped(
        wrapper: &[String],
        listen: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec![
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut proc = Proc::spawn_wrapped("tracker", wrapper, &binary("tracker")?, &args)?;
        let line = proc
            .expect_line("the listening line", WAIT, |l| {
                l.starts_with("tracker listening on ")
            })
            .await?;
        let addr = line.trim_start_matches("tracker listening on ").to_string();
        let line = proc
            .expect_line("the key line", WAIT, |l| l.starts_with("tracker key "))
            .await?;
        let key = line.trim_start_matches("tracker key ").to_string();
        Ok(Self {
            proc,
            addr,
            key,
            dir: dir.to_path_buf(),
            _tmp: None,
        })
    }

    /// Restarts a killed tracker on the same address and data directory,
    /// keeping the temporary directory alive.
    pub async fn restart(mut self) -> Result<Self> {
        let tmp = self._tmp.take();
        let mut next = Self::start_at(&self.addr, &self.dir).await?;
        next._tmp = tmp;
        Ok(next)
    }

    pub async fn kill(&mut self) -> Result<()> {
        self.proc.kill().await
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn stderr(&self) -> String {
        self.proc.stderr_log.dump()
    }
}

/// Which front end a peer runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Text,
    Json,
}

/// A running `peer`.
pub struct Peer {
    proc: Proc,
    pub name: String,
    pub dir: PathBuf,
    next_id: u64,
    _tmp: Option<Arc<tempfile::TempDir>>,
}

/// How to start a peer.
pub struct PeerOpts {
    pub name: String,
    pub tracker: String,
    pub mode: Mode,
    /// Reuse this data directory (same identity); a fresh one otherwise.
    pub dir: Option<PathBuf>,
    pub extra: Vec<String>,
    /// Command the binary is started through (e.g. `ip netns exec NS`).
    pub wrapper: Vec<String>,
    /// `--bind` address; `None`: the flag is left out (the peer's default).
    pub bind: Option<String>,
}

impl PeerOpts {
    pub fn new(name: &str, tracker: &Tracker, mode: Mode) -> Self {
        Self {
            name: name.into(),
            tracker: tracker.addr.clone(),
            mode,
            dir: None,
            extra: Vec::new(),
            wrapper: Vec::new(),
            bind: Some("127.0.0.1:0".into()),
        }
    }

    /// Starts the binary through this command, which must exec it.
    pub fn wrapper(mut self, wrapper: &[String]) -> Self {
        self.wrapper = wrapper.to_vec();
        self
    }

    /// The local address to bind (default 127.0.0.1:0).
    pub fn bind(mut self, addr: &str) -> Self {
        self.bind = Some(addr.into());
        self
    }

    /// No `--bind`: the peer chooses its own address.
    pub fn default_bind(mut self) -> Self {
        self.bind = None;
        self
    }

    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// An extra command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_string());
        self
    }

    /// Starts the process without waiting for enrollment.
    pub fn spawn(self) -> Result<Peer> {
        let (dir, tmp) = match self.dir {
            Some(dir) => (dir, None),
            None => {
                let tmp = tempfile::tempdir()?;
                (tmp.path().to_path_buf(), Some(Arc::new(tmp)))
            }
        };
        let mut args = vec![
            "--name".to_string(),
            self.name.clone(),
            "--tracker".into(),
            self.tracker,
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        if let Some(bind) = self.bind {
            args.extend(["--bind".into(), bind]);
        }
        if self.mode == Mode::Json {
            args.push("--json".into());
        }
        args.extend(self.extra);
        let proc = Proc::spawn_wrapped(
            &format!("peer {}", self.name),
            &self.wrapper,
            &binary("peer")?,
            &args,
        )?;
        Ok(Peer {
            proc,
            name: self.name,
            dir,
            next_id: 0,
            _tmp: tmp,
        })
    }

    /// Starts the process and waits until it has enrolled.
    pub async fn start(self) -> Result<Peer> {
        let mode = self.mode;
        let mut peer = self.spawn()?;
        match mode {
            Mode::Json => {
                peer.expect_event("enrolled", |_| true).await?;
            }
            Mode::Text => {
                peer.expect_line("the enrolled line", |l| {
                    l.starts_with("enrolled with tracker")
                })
                .await?;
            }
        }
        Ok(peer)
    }
}

impl Peer {
    pub async fn start_json(name: &str, tracker: &Tracker) -> Result<Self> {
        PeerOpts::new(name, tracker, Mode::Json).start().await
    }

    pub async fn start_text(name: &str, tracker: &Tracker) -> Result<Self> {
        PeerOpts::new(name, tracker, Mode::Text).start().await
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Sends a signal to the process (by its pid).
    pub fn signal(&self, signal: rustix::process::Signal) -> Result<()> {
        let pid = self
            .pid()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| anyhow!("peer {} has no pid", self.name))?;
        Ok(rustix::process::kill_process(pid, signal)?)
    }

    /// Sends a text-mode line.
    pub async fn type_line(&mut self, line: &str) -> Result<()> {
        self.proc.write_line(line).await
    }

    /// Sends a line of raw bytes (which need not be UTF-8).
    pub async fn type_bytes(&mut self, line: &[u8]) -> Result<()> {
        self.proc.write_raw_line(line).await
    }

    /// Sends a JSON command (an `id` is added) and returns its reply.
    pub async fn command(&mut self, mut cmd: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = Value::from(id);
        self.proc.write_line(&cmd.to_string()).await?;
        let id_field = format!("\"id\":{id}");
        let line = self
            .proc
            .expect_new_line(&format!("the reply to {cmd}"), WAIT, |line| {
                line.contains(&id_field)
                    && serde_json::from_str::<Value>(line)
                        .is_ok_and(|v| v.get("id") == Some(&Value::from(id)))
            })
            .await?;
        Ok(serde_json::from_str(&line)?)
    }

    /// This peer's own row of `who` (JSON mode): its address as the tracker
    /// observed it, and its key.
    pub async fn own_address_and_key(&mut self) -> Result<(String, tincan_proto::PeerId)> {
        let who = self.command(serde_json::json!({"cmd": "who"})).await?;
        let me = who["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["me"] == true))
            .ok_or_else(|| anyhow!("{} not in its own list: {who}", self.name))?;
        let addr = me["observed"].as_str().context("observed")?.to_string();
        let key = tincan_proto::PeerId::from_hex(me["peer_id"].as_str().context("peer_id")?)?;
        Ok((addr, key))
    }

    /// Sends a message in JSON mode; returns its msg_id.
    pub async fn send(&mut self, to: &str, text: &str) -> Result<String> {
        let reply = self
            .command(serde_json::json!({"cmd": "send", "to": to, "text": text}))
            .await?;
        if reply["ok"] != Value::Bool(true) {
            bail!("send refused: {reply}");
        }
        reply["msg_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no msg_id in {reply}"))
    }

    /// Waits for the next JSON line satisfying `pred`.
    pub async fn expect_json(
        &mut self,
        what: &str,
        wait: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let mut parsed = None;
        self.proc
            .expect_line(what, wait, |line| {
                match serde_json::from_str::<Value>(line) {
                    Ok(v) if pred(&v) => {
                        parsed = Some(v);
                        true
                    }
                    _ => false,
                }
            })
            .await?;
        parsed.ok_or_else(|| anyhow!("unreachable: matched line without value"))
    }

    /// Waits for an event of this type satisfying `pred` (within [`WAIT`]).
    pub async fn expect_event(
        &mut self,
        event: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.expect_event_within(event, WAIT, pred).await
    }

    pub async fn expect_event_within(
        &mut self,
        event: &str,
        wait: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.expect_json(&format!("a {event:?} event"), wait, |v| {
            v["event"] == event && pred(v)
        })
        .await
    }

    /// Waits for a text-mode line satisfying `pred` (within [`WAIT`]).
    pub async fn expect_line(
        &mut self,
        what: &str,
        pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        self.proc.expect_line(what, WAIT, pred).await
    }

    pub async fn expect_line_within(
        &mut self,
        what: &str,
        wait: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        self.proc.expect_line(what, wait, pred).await
    }

    pub async fn wait_exit(&mut self, wait: Duration) -> Result<ExitStatus> {
        self.proc.wait_exit(wait).await
    }

    pub async fn kill(&mut self) -> Result<()> {
        self.proc.kill().await
    }

    /// The next JSON line not yet consumed (oldest first), whatever it is;
    /// for tests that sift through many events themselves.
    pub async fn next_json(&mut self, wait: Duration) -> Result<Value> {
        let line = match self.proc.backlog.pop_front() {
            Some(line) => line,
            None => {
                self.proc
                    .expect_new_line("any line", wait, |_| true)
                    .await?
            }
        };
        Ok(serde_json::from_str(&line)?)
    }

    /// After the peer died: every JSON line it printed that no expectation
    /// consumed.
    pub async fn rest_json(&mut self) -> Vec<Value> {
        self.proc
            .rest(WAIT)
            .await
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Everything the peer wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.proc.stderr_log.dump()
    }

    /// Everything the peer wrote to stdout so far (last lines).
    pub fn stdout(&self) -> String {
        self.proc.stdout_log.dump()
    }
}
