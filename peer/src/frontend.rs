//! The two front ends of the `peer` binary, both line-based so that scripts
//! and tests can drive them through pipes:
//!
//! - text (default): `/msg NAME TEXT`, `/who [all [AFTER]]`, `/history NAME [N]`,
//!   `/verify [NAME]`, `/accept NAME`, `/help`, `/quit`; incoming messages
//!   print as `Message from alice: ...`, and each outgoing message's state
//!   prints as it changes (`[1a2b3c4d] to bob: delivered (direct, 3 ms)`).
//! - JSON Lines (`--json`): one command object per input line, one reply or
//!   event object per output line; stdout carries nothing else (docs/json-api.md).
//!
//! Both read commands from stdin and events from the node until the user
//! quits, stdin ends, or the node stops.

use std::{io::Write, time::Duration};

use bytes::BytesMut;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tincan_proto::{MessageId, Name, PeerId, tracker::LIST_PAGE};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, FramedRead, LinesCodec, LinesCodecError};

use crate::{
    Event, KeyInfo, Node, Path, PeerStatus, directory::PresenceMode, links::DIAL_TIMEOUT,
    outbox::ACK_TIMEOUT, store::HistoryEntry,
};

/// Longest input line accepted: a maximal message plus its command, with
/// room for JSON to escape every byte of the text (`\u00XX`, six bytes). A
/// longer line is refused with an error and discarded without being held in
/// memory whole; the lines after it are read as usual.
pub const MAX_LINE: usize = 6 * tincan_proto::MAX_BODY_LEN + 1024;
/// History lines shown when `/history NAME` gives no count.
pub const DEFAULT_HISTORY: usize = 20;
/// Most history lines one command returns.
pub const MAX_HISTORY: usize = 10_000;
/// Names `/who all` shows at a time (it says how to see the next ones).
pub const WHO_ALL_PAGE: usize = 50;
/// On `/quit`, JSON `logout`, Ctrl-C, SIGTERM or SIGHUP: how long the
/// messages on their way get to reach a final state (or the tracker) before
/// the peer logs out. What is still on its way then stays in the outbox, and
/// the user is told. A second Ctrl-C or signal leaves at once. (At the end
/// of input the wait is `DIAL_TIMEOUT + ACK_TIMEOUT`: a script that pipes
/// messages in expects them sent.)
pub const QUIT_SETTLE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Text,
    Json,
}

/// How the front end ended.
pub enum Exit {
    /// The user quit (or stdin ended) and the node logged out.
    Quit,
    /// The node stopped on its own; the reason was printed.
    Failed,
}

/// Runs the front end until quit, end of input, or the node stops.
pub async fn run(node: Node, mut events: mpsc::Receiver<Event>, mode: Mode) -> Exit {
    let mut out = Output { mode };
    if mode == Mode::Text {
        out.line(&format!(
            "tincan peer {} - fingerprint {} (full key: /verify). Type /help for commands.",
            node.name(),
            node.id().short()
        ));
    }
    let mut lines = FramedRead::new(tokio::io::stdin(), InputLines::default());
    let stop = stop_requested();
    tokio::pin!(stop);
    let end = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Fatal { reason }) => {
                    out.event(&node, Event::Fatal { reason });
                    break End::Failed;
                }
                Some(event) => out.event(&node, event),
                None => break End::NodeStopped,
            },
            line = lines.next() => match line {
                Some(Ok(Input::Line(line))) => {
                    if out.command(&node, &line).await == Flow::Quit {
                        break End::Quit;
                    }
                }
                Some(Ok(Input::TooLong)) => {
                    out.error(None, &format!("input line longer than {MAX_LINE} bytes ignored"));
                }
                Some(Ok(Input::NotText)) => {
                    out.error(None, "input line is not UTF-8 text; ignored");
                }
                None | Some(Err(_)) => break End::InputClosed,
            },
            () = &mut stop => break End::Quit,
        }
    };
    let wait = match end {
        End::Failed => {
            node.shutdown().await;
            return Exit::Failed;
        }
        End::NodeStopped => Duration::ZERO,
        End::Quit => QUIT_SETTLE,
        End::InputClosed => DIAL_TIMEOUT + ACK_TIMEOUT,
    };
    // Let what was sent reach its final state (bounded), showing how it
    // goes; then say what is left for the next start.
    if !wait.is_zero() {
        let settle = node.settle(wait);
        let again = stop_requested();
        tokio::pin!(settle, again);
        loop {
            tokio::select! {
                () = &mut settle => break,
                () = &mut again => break,
                Some(event) = events.recv() => out.event(&node, event),
            }
        }
    }
    let unfinished = node.unfinished();
    if unfinished > 0 {
        let message = format!(
            "{} not delivered yet: kept in the outbox, sent when this peer starts again",
            counted(unfinished, "message")
        );
        out.event(&node, Event::Warning { message });
    }
    node.logout().await;
    while let Ok(event) = events.try_recv() {
        out.event(&node, event);
    }
    if mode == Mode::Text {
        out.line("logged out. Goodbye.");
    }
    Exit::Quit
}

/// A command's optional `limit`: `default` when absent or `null`, at most
/// `max`; `None` when it is not a whole number from 1.
fn limit_of(cmd: &Value, default: usize, max: usize) -> Option<usize> {
    match cmd.get("limit") {
        None | Some(Value::Null) => Some(default),
        Some(n) => n
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| usize::try_from(n).map_or(max, |n| n.min(max))),
    }
}

/// One line of input, or why one could not be taken.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Line(String),
    /// A line past [`MAX_LINE`]; its bytes are skipped up to its newline.
    TooLong,
    /// A line that is not UTF-8 (e.g. from a Latin-1 terminal).
    NotText,
}

/// [`LinesCodec`] with an over-long or non-UTF-8 line as an item, not an
/// error: a `FramedRead` ends its stream after any error, which would take
/// every line after it (and the session) along. Errors reading stdin itself
/// still end the input.
struct InputLines(LinesCodec);

impl Default for InputLines {
    fn default() -> Self {
        Self(LinesCodec::new_with_max_length(MAX_LINE))
    }
}

impl InputLines {
    fn item(
        decoded: Result<Option<String>, LinesCodecError>,
    ) -> Result<Option<Input>, LinesCodecError> {
        match decoded {
            Ok(line) => Ok(line.map(Input::Line)),
            Err(LinesCodecError::MaxLineLengthExceeded) => Ok(Some(Input::TooLong)),
            // The codec's only I/O error: the line (already consumed) is
            // not UTF-8.
            Err(LinesCodecError::Io(_)) => Ok(Some(Input::NotText)),
        }
    }
}

impl Decoder for InputLines {
    type Item = Input;
    type Error = LinesCodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Input>, LinesCodecError> {
        Self::item(self.0.decode(buf))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Input>, LinesCodecError> {
        Self::item(self.0.decode_eof(buf))
    }
}

/// Why the front end's loop ended.
enum End {
    /// `/quit`, JSON `logout`, or a stop signal.
    Quit,
    InputClosed,
    /// The node's event channel closed.
    NodeStopped,
    /// A fatal event (already printed).
    Failed,
}

/// Resolves when the user or the system asks the peer to stop: Ctrl-C
/// (SIGINT), or on Unix SIGTERM (`kill PID`, a service manager) or SIGHUP
/// (its terminal closed). Each way the peer logs out cleanly.
async fn stop_requested() {
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM and SIGHUP");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// "1 name", "3 names": a count and its noun.
fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

struct Output {
    mode: Mode,
}

/// Text from the network, made safe for a terminal line: control
/// characters (newlines, escapes) are shown escaped, so a message cannot
/// fake other lines or move the cursor.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

impl Output {
    fn line(&mut self, s: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{s}");
        let _ = stdout.flush();
    }

    fn json(&mut self, v: Value) {
        self.line(&v.to_string());
    }

    fn error(&mut self, id: Option<&Value>, msg: &str) {
        match self.mode {
            Mode::Json => self
                .json(json!({"id": id.cloned().unwrap_or(Value::Null), "ok": false, "error": msg})),
            Mode::Text => self.line(&format!("error: {msg}")),
        }
    }

    async fn command(&mut self, node: &Node, line: &str) -> Flow {
        match self.mode {
            Mode::Text => self.text_command(node, line).await,
            Mode::Json => self.json_command(node, line).await,
        }
    }

    async fn text_command(&mut self, node: &Node, line: &str) -> Flow {
        let line = line.trim();
        if line.is_empty() {
            return Flow::Continue;
        }
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match cmd {
            "/msg" | "/m" => {
                let (to, text) = rest.split_once(' ').unwrap_or((rest, ""));
                if to.is_empty() || text.trim().is_empty() {
                    self.line("usage: /msg NAME TEXT");
                    return Flow::Continue;
                }
                match node.send(to, text).await {
                    Ok(id) => self.line(&format!("[{}] to {to}: queued", id.short())),
                    Err(e) => self.error(None, &format!("{e}; nothing was sent")),
                }
            }
            "/who" => match rest.split_once(' ').unwrap_or((rest, "")) {
                ("", _) => self.who(node),
                ("all", after) => self.who_all(node, after.trim()).await,
                _ => self.line("usage: /who [all [AFTER]]"),
            },
            "/history" | "/h" => {
                let mut words = rest.split_whitespace();
                let Some(with) = words.next() else {
                    self.line("usage: /history NAME [N]");
                    return Flow::Continue;
                };
                let limit = match words.next().map(str::parse::<usize>) {
                    None => DEFAULT_HISTORY,
                    Some(Ok(n)) if n > 0 => n.min(MAX_HISTORY),
                    Some(_) => {
                        self.line("usage: /history NAME [N], N a whole number from 1");
                        return Flow::Continue;
                    }
                };
                match node.history(with, limit).await {
                    Ok(entries) if entries.is_empty() => {
                        self.line(&format!("no messages with {with} yet"))
                    }
                    Ok(entries) => {
                        for e in entries {
                            self.line(&history_line(node, &e));
                        }
                    }
                    Err(e) => self.error(None, &e.to_string()),
                }
            }
            "/verify" => match rest {
                "" => self.line(&format!("your key: {}", node.id())),
                name => match node.key_info(name) {
                    Ok(keys) => {
                        for line in verify_lines(name, &keys) {
                            self.line(&line);
                        }
                    }
                    Err(e) => self.error(None, &e.to_string()),
                },
            },
            "/accept" if rest.is_empty() => self.line("usage: /accept NAME"),
            "/accept" => match node.accept_key(rest).await {
                Ok(Some(key)) => self.line(&format!("now trusting {rest}'s new key {key}")),
                Ok(None) => self.line(&format!("no changed key is waiting for {rest}")),
                Err(e) => self.error(None, &e.to_string()),
            },
            "/help" | "/?" => self.line(HELP),
            "/quit" | "/exit" | "/logout" => return Flow::Quit,
            other if other.starts_with('/') => self.line(&format!(
                "unknown command {}; type /help for the list",
                printable(other)
            )),
            _ => self.line("to send a message type /msg NAME TEXT (/help for more)"),
        }
        Flow::Continue
    }

    /// `/who`: the client list; in subscribe mode, the names followed.
    fn who(&mut self, node: &Node) {
        let peers = node.peers();
        match node.presence() {
            (PresenceMode::Broadcast, _) => self.line(&format!("{} online:", peers.len())),
            (PresenceMode::Subscribe { .. }, followed) => self.line(&format!(
                "{} online among the {} you follow (and you):",
                peers.iter().filter(|p| !p.me).count(),
                counted(followed.len(), "name")
            )),
        }
        for p in &peers {
            self.line(&who_line(p));
        }
        if let (PresenceMode::Subscribe { .. }, followed) = node.presence() {
            let offline: Vec<&str> = followed
                .iter()
                .filter(|n| !peers.iter().any(|p| p.info.name.key() == n.key()))
                .map(Name::as_str)
                .collect();
            if !offline.is_empty() {
                self.line(&format!("  not online: {}", offline.join(", ")));
            }
            self.line("  (this tracker only tells you about names you follow; /who all lists everyone online)");
        }
    }

    /// `/who all [AFTER]`: one page of everyone online, from the tracker.
    async fn who_all(&mut self, node: &Node, after: &str) {
        let after = match after {
            "" => None,
            name => match Name::parse(name) {
                Ok(name) => Some(name),
                Err(e) => return self.error(None, &format!("invalid name: {e}")),
            },
        };
        match node.list_page(after, WHO_ALL_PAGE).await {
            Ok((peers, more)) => {
                self.line(&format!("everyone online, {} from here:", peers.len()));
                for p in &peers {
                    let me = p.id == node.id();
                    self.line(&format!(
                        "  {:<20} {}{}",
                        p.name.as_str(),
                        p.id.short(),
                        if me { "  (you)" } else { "" }
                    ));
                }
                match peers.last().filter(|_| more) {
                    Some(last) => self.line(&format!("  more: /who all {}", last.name)),
                    None => self.line("  (end of the list)"),
                }
            }
            Err(e) => self.error(None, &e.to_string()),
        }
    }

    async fn json_command(&mut self, node: &Node, line: &str) -> Flow {
        if line.trim().is_empty() {
            return Flow::Continue;
        }
        let cmd: Value = match serde_json::from_str(line) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                self.error(None, "a command must be a JSON object");
                return Flow::Continue;
            }
            Err(e) => {
                self.error(None, &format!("invalid JSON: {e}"));
                return Flow::Continue;
            }
        };
        let id = cmd.get("id").cloned().unwrap_or(Value::Null);
        let str_field = |k: &str| cmd.get(k).and_then(Value::as_str);
        match str_field("cmd") {
            Some("send") => {
                let (Some(to), Some(text)) = (str_field("to"), str_field("text")) else {
                    self.error(Some(&id), "send needs string fields \"to\" and \"text\"");
                    return Flow::Continue;
                };
                match node.send(to, text).await {
                    Ok(msg_id) => {
                        self.json(json!({"id": id, "ok": true, "msg_id": msg_id.to_string()}))
                    }
                    Err(e) => self.error(Some(&id), &format!("{e}; nothing was sent")),
                }
            }
            Some("who") => {
                let peers: Vec<Value> = node.peers().iter().map(peer_json).collect();
                let mut reply = json!({"id": id, "ok": true, "peers": peers});
                let (mode, followed) = node.presence();
                reply["presence"] = json!(mode_name(mode));
                if let PresenceMode::Subscribe { .. } = mode {
                    reply["following"] =
                        json!(followed.iter().map(Name::as_str).collect::<Vec<_>>());
                }
                self.json(reply);
            }
            Some("list") => self.list(node, &id, &cmd).await,
            Some("history") => {
                let Some(with) = str_field("with") else {
                    self.error(Some(&id), "history needs a string field \"with\"");
                    return Flow::Continue;
                };
                let Some(limit) = limit_of(&cmd, DEFAULT_HISTORY, MAX_HISTORY) else {
                    self.error(
                        Some(&id),
                        "history: \"limit\" must be a whole number from 1",
                    );
                    return Flow::Continue;
                };
                match node.history(with, limit).await {
                    Ok(entries) => {
                        let messages: Vec<Value> =
                            entries.iter().map(|e| history_json(node, e)).collect();
                        self.json(json!({"id": id, "ok": true, "messages": messages}));
                    }
                    Err(e) => self.error(Some(&id), &e.to_string()),
                }
            }
            Some("outbox") => match node.outbox().await {
                Ok(pending) => {
                    let messages: Vec<Value> = pending
                        .iter()
                        .map(|p| json!({"msg_id": p.id.to_string(), "to": p.to.as_str(), "state": p.state.name()}))
                        .collect();
                    self.json(json!({"id": id, "ok": true, "pending": pending.len(), "messages": messages}));
                }
                Err(e) => self.error(Some(&id), &e.to_string()),
            },
            Some("accept_key") => {
                let Some(name) = str_field("name") else {
                    self.error(Some(&id), "accept_key needs a string field \"name\"");
                    return Flow::Continue;
                };
                match node.accept_key(name).await {
                    Ok(Some(key)) => {
                        self.json(json!({"id": id, "ok": true, "peer_id": key.to_string()}))
                    }
                    Ok(None) => {
                        self.error(Some(&id), &format!("no changed key is waiting for {name}"))
                    }
                    Err(e) => self.error(Some(&id), &e.to_string()),
                }
            }
            Some("verify") => match str_field("name") {
                None => self.json(json!({"id": id, "ok": true, "peer_id": node.id().to_string()})),
                Some(name) => match node.key_info(name) {
                    Ok(keys) => {
                        let hex = |k: Option<PeerId>| k.map(|k| k.to_string());
                        self.json(json!({
                            "id": id,
                            "ok": true,
                            "name": name,
                            "pinned": hex(keys.pinned),
                            "pending": hex(keys.pending),
                            "announced": hex(keys.announced),
                        }))
                    }
                    Err(e) => self.error(Some(&id), &e.to_string()),
                },
            },
            Some("logout") => {
                self.json(json!({"id": id, "ok": true}));
                return Flow::Quit;
            }
            Some(other) => self.error(Some(&id), &format!("unknown command {other:?}; {COMMANDS}")),
            None if cmd.get("cmd").is_some() => {
                self.error(Some(&id), &format!("\"cmd\" must be a string; {COMMANDS}"))
            }
            None => self.error(Some(&id), &format!("missing \"cmd\"; {COMMANDS}")),
        }
        Flow::Continue
    }

    /// JSON `list`: one page of everyone online.
    async fn list(&mut self, node: &Node, id: &Value, cmd: &Value) {
        let after = match cmd.get("after") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => match Name::parse(name) {
                Ok(name) => Some(name),
                Err(e) => return self.error(Some(id), &format!("invalid name: {e}")),
            },
            Some(_) => return self.error(Some(id), "list: \"after\" must be a name"),
        };
        let Some(limit) = limit_of(cmd, LIST_PAGE, LIST_PAGE) else {
            return self.error(Some(id), "list: \"limit\" must be a whole number from 1");
        };
        match node.list_page(after, limit).await {
            Ok((peers, more)) => {
                let peers: Vec<Value> = peers
                    .iter()
                    .map(|p| {
                        json!({
                            "name": p.name.as_str(), "peer_id": p.id.to_string(),
                            "fingerprint": p.id.short(), "observed": p.observed.to_string(),
                            "me": p.id == node.id(),
                        })
                    })
                    .collect();
                self.json(json!({"id": id, "ok": true, "peers": peers, "more": more}));
            }
            Err(e) => self.error(Some(id), &e.to_string()),
        }
    }

    fn event(&mut self, node: &Node, event: Event) {
        match self.mode {
            Mode::Json => self.json(event_json(node, &event)),
            Mode::Text => {
                if let Some(line) = event_text(node, &event) {
                    self.line(&line);
                }
            }
        }
        // Written and flushed: the message is on screen.
        if let Event::Message { shown, .. } = event {
            shown.done();
        }
    }
}

const COMMANDS: &str = "commands: send, who, list, history, outbox, accept_key, verify, logout";

const HELP: &str = "commands:
  /msg NAME TEXT     send TEXT to NAME (directly; held by the tracker if NAME is away)
  /who               who is online (on a big tracker: among the names you follow),
                     and our link to each
  /who all [AFTER]   everyone online, a page at a time (after the name AFTER)
  /history NAME [N]  the last N messages with NAME (default 20)
  /verify [NAME]     show your full key, or NAME's
  /accept NAME       trust NAME's new key after it changed (check it first)
  /help              this list
  /quit              log out and exit";

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `/verify NAME`: the trusted key first, then what differs from it.
fn verify_lines(name: &str, keys: &KeyInfo) -> Vec<String> {
    match (keys.pinned, keys.pending, keys.announced) {
        (Some(pinned), None, _) => vec![format!(
            "{name}'s key: {pinned} (trusted since your first contact; compare it with what {name}'s /verify shows)"
        )],
        (Some(pinned), Some(new), _) => vec![
            format!("{name}'s trusted key: {pinned}"),
            format!(
                "{name}'s key CHANGED: the tracker now announces {new}; check it with {name}, then /accept {name}"
            ),
        ],
        (None, _, Some(announced)) => vec![format!(
            "{name}'s key as the tracker announces it: {announced} (not trusted yet: your first exchange pins it)"
        )],
        (None, _, None) => vec![format!("no key known for {name}: never seen, not online")],
    }
}

fn who_line(p: &PeerStatus) -> String {
    let link = match (&p.link, p.me) {
        (_, true) => "(you)".to_string(),
        (Some((path, rtt)), _) => format!("{} link, rtt {} ms", path.as_str(), ms(*rtt)),
        (None, _) => "no link yet".to_string(),
    };
    format!(
        "  {:<20} {}  {}",
        p.info.name.as_str(),
        p.info.id.short(),
        link
    )
}

fn history_line(node: &Node, e: &HistoryEntry) -> String {
    let (who, state) = if e.outgoing {
        let mut state = e.state.clone();
        if let Some(path) = &e.path {
            state = format!("{state}, {path}");
        }
        if let Some(reason) = &e.reason {
            state = format!("{state}: {reason}");
        }
        (node.name().to_string(), format!(" [{state}]"))
    } else {
        (e.with.clone(), String::new())
    };
    format!(
        "  {} {}: {}{}",
        clock(e.at_ms),
        who,
        printable(&e.body),
        state
    )
}

/// UTC wall-clock time of day, HH:MM:SS.
fn clock(at_ms: u64) -> String {
    let secs = at_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

fn history_json(node: &Node, e: &HistoryEntry) -> Value {
    let (from, to) = if e.outgoing {
        (node.name().to_string(), e.with.clone())
    } else {
        (e.with.clone(), node.name().to_string())
    };
    json!({
        "msg_id": e.id.to_string(), "from": from, "to": to, "text": e.body,
        "at_ms": e.at_ms, "state": e.state, "path": e.path, "reason": e.reason,
    })
}

fn peer_json(p: &PeerStatus) -> Value {
    json!({
        "name": p.info.name.as_str(),
        "peer_id": p.info.id.to_string(),
        "fingerprint": p.info.id.short(),
        "observed": p.info.observed.to_string(),
        "me": p.me,
        "path": p.link.map(|(path, _)| path.as_str()),
        "rtt_ms": p.link.map(|(_, rtt)| ms(rtt)),
    })
}

fn msg_id(id: &MessageId) -> String {
    id.to_string()
}

fn mode_name(mode: PresenceMode) -> &'static str {
    match mode {
        PresenceMode::Broadcast => "broadcast",
        PresenceMode::Subscribe { .. } => "subscribe",
    }
}

fn event_json(node: &Node, event: &Event) -> Value {
    match event {
        Event::Enrolled {
            name,
            id,
            tracker,
            observed,
        } => json!({
            "event": "enrolled", "name": name.as_str(), "peer_id": id.to_string(),
            "fingerprint": id.short(), "tracker": tracker, "observed": observed.to_string(),
        }),
        Event::ClientList { peers } => json!({
            "event": "client_list",
            "peers": peers.iter().map(|p| json!({"name": p.name.as_str(), "peer_id": p.id.to_string()})).collect::<Vec<_>>(),
            "presence": mode_name(node.presence().0),
        }),
        Event::Presence { name, id, online } => json!({
            "event": "presence", "name": name.as_str(), "peer_id": id.to_string(), "online": online,
        }),
        Event::Message {
            from,
            text,
            id,
            path,
            sent_at_ms,
            ..
        } => json!({
            "event": "message", "from": from.as_str(), "text": text, "msg_id": msg_id(id),
            "path": path.as_str(), "sent_at_ms": sent_at_ms,
        }),
        Event::Sent { id, to, path } => json!({
            "event": "sent", "msg_id": msg_id(id), "to": to.as_str(), "path": path.as_str(),
        }),
        Event::Held { id, to } => json!({
            "event": "held", "msg_id": msg_id(id), "to": to.as_str(),
        }),
        Event::Delivered { id, to, path, rtt } => json!({
            "event": "delivered", "msg_id": msg_id(id), "to": to.as_str(), "path": path.as_str(), "rtt_ms": ms(*rtt),
        }),
        Event::Undeliverable { id, to, reason } => json!({
            "event": "undeliverable", "msg_id": msg_id(id), "to": to.as_str(), "reason": reason,
        }),
        Event::KeyChanged {
            name,
            pinned,
            announced,
        } => json!({
            "event": "key_changed", "name": name.as_str(), "pinned": pinned.to_string(),
            "announced": announced.to_string(),
        }),
        Event::Path {
            name,
            path,
            rtt,
            relay_bytes,
        } => json!({
            "event": "path", "name": name.as_str(), "path": path.as_str(), "rtt_ms": ms(*rtt),
            "relay_bytes": relay_bytes,
        }),
        Event::TrackerLost { reason, retry_in } => json!({
            "event": "tracker_lost", "reason": reason, "retry_in_ms": ms(*retry_in),
        }),
        Event::Warning { message } => json!({"event": "warning", "message": message}),
        Event::Fatal { reason } => json!({"event": "fatal", "reason": reason}),
    }
}

fn event_text(node: &Node, event: &Event) -> Option<String> {
    Some(match event {
        Event::Enrolled {
            name,
            tracker,
            observed,
            ..
        } => {
            format!("enrolled with tracker {tracker} as {name} (the tracker sees us at {observed})")
        }
        Event::ClientList { peers } => {
            let others: Vec<&str> = peers
                .iter()
                .filter(|p| p.id != node.id())
                .map(|p| p.name.as_str())
                .collect();
            match (node.presence(), others.is_empty()) {
                ((PresenceMode::Broadcast, _), true) => "* nobody else is online".to_string(),
                ((PresenceMode::Broadcast, _), false) => format!("* online: {}", others.join(", ")),
                ((PresenceMode::Subscribe { .. }, followed), true) if followed.is_empty() => {
                    "* you follow nobody yet: you will see the people you write to or hear from (/who all lists everyone online)".to_string()
                }
                ((PresenceMode::Subscribe { .. }, followed), true) => format!(
                    "* none of the {} you follow is online (/who all lists everyone online)",
                    counted(followed.len(), "name")
                ),
                ((PresenceMode::Subscribe { .. }, followed), false) => format!(
                    "* online among the {} you follow: {}",
                    counted(followed.len(), "name"),
                    others.join(", ")
                ),
            }
        }
        Event::Presence {
            name, online: true, ..
        } => format!("* {name} is online"),
        Event::Presence {
            name,
            online: false,
            ..
        } => format!("* {name} went offline"),
        Event::Message {
            from, text, path, ..
        } => {
            let text = printable(text);
            match path {
                Path::Direct => format!("Message from {from}: {text}"),
                Path::Relay => format!("Message from {from} (relayed): {text}"),
                Path::Held => format!("Message from {from} (held while you were away): {text}"),
            }
        }
        Event::Sent { id, to, path } => {
            format!("[{}] to {to}: sent ({})", id.short(), path.as_str())
        }
        Event::Held { id, to } => format!(
            "[{}] to {to}: held (sealed) by the tracker until {to} can collect it",
            id.short()
        ),
        Event::Delivered { id, to, path, rtt } => format!(
            "[{}] to {to}: delivered ({}, {} ms)",
            id.short(),
            path.as_str(),
            ms(*rtt)
        ),
        Event::Undeliverable { id, to, reason } => {
            format!("[{}] to {to}: NOT delivered: {reason}", id.short())
        }
        Event::KeyChanged {
            name,
            pinned,
            announced,
        } => format!(
            "!!! WARNING: {name}'s KEY CHANGED. Pinned {}, the tracker now announces {}. \
             Nothing goes to or comes from {name} until you check the new key with {name} \
             and type /accept {name}",
            pinned.short(),
            announced.short()
        ),
        Event::Path {
            name, path, rtt, ..
        } => format!(
            "* talking to {name} {} now (rtt {} ms)",
            match path {
                Path::Direct => "directly",
                Path::Relay => "through the tracker's relay",
                Path::Held => "through the tracker's mailbox",
            },
            ms(*rtt)
        ),
        Event::TrackerLost { reason, retry_in } => format!(
            "! lost the tracker ({reason}); direct conversations go on; enrolling again in {} s",
            retry_in.as_secs()
        ),
        Event::Warning { message } => format!("! warning: {}", printable(message)),
        Event::Fatal { reason } => format!("! fatal: {reason}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_goes_on_after_an_overlong_or_non_utf8_line() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"first\n");
        buf.extend_from_slice(&vec![b'x'; MAX_LINE + 10]);
        buf.extend_from_slice(b"\ncaf\xe9\nlast\n");
        let mut codec = InputLines::default();
        let mut items = Vec::new();
        while let Some(item) = codec.decode(&mut buf).expect("no decoder error") {
            items.push(item);
        }
        assert_eq!(
            items,
            [
                Input::Line("first".into()),
                Input::TooLong,
                Input::NotText,
                Input::Line("last".into())
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn network_text_cannot_fake_lines_or_escape_sequences() {
        assert_eq!(
            printable("hi\nMessage from carol: x"),
            "hi\\nMessage from carol: x"
        );
        assert_eq!(printable("\u{1b}[2J"), "\\u{1b}[2J");
        assert_eq!(printable("plain ünïcode ok"), "plain ünïcode ok");
    }

    #[test]
    fn clock_shows_utc_time_of_day() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock((13 * 3600 + 5 * 60 + 9) * 1000 + 999), "13:05:09");
    }
}
