//! The two front ends of the `peer` binary, both line-based so that scripts
//! and tests can drive them through pipes:
//!
//! - text (default): `/msg NAME TEXT`, `/who`, `/verify [NAME]`, `/help`, `/quit`;
//!   incoming messages print as `Message from alice: ...`.
//! - JSON Lines (`--json`): one command object per input line, one reply or
//!   event object per output line; stdout carries nothing else (docs/json-api.md).
//!
//! Both read commands from stdin and events from the node until the user
//! quits, stdin ends, or the node stops.

use std::{io::Write, time::Duration};

use serde_json::{Value, json};
use tincan_proto::MessageId;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};

use crate::{Event, Node, Path, PeerStatus, links::DIAL_TIMEOUT, node::ACK_TIMEOUT};

/// Longest input line accepted (a maximal message plus its command).
pub const MAX_LINE: usize = tincan_proto::MAX_BODY_LEN + 1024;

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
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut failed = false;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Fatal { reason }) => {
                    out.event(&node, Event::Fatal { reason });
                    failed = true;
                    break;
                }
                Some(event) => out.event(&node, event),
                None => break,
            },
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if line.len() > MAX_LINE {
                        out.error(None, &format!("input line longer than {MAX_LINE} bytes ignored"));
                        continue;
                    }
                    if out.command(&node, &line).await == Flow::Quit {
                        break;
                    }
                }
                // End of input: let what was sent reach its final state, then leave.
                Ok(None) | Err(_) => {
                    let settle = node.settle(DIAL_TIMEOUT + ACK_TIMEOUT);
                    tokio::pin!(settle);
                    loop {
                        tokio::select! {
                            () = &mut settle => break,
                            Some(event) = events.recv() => out.event(&node, event),
                        }
                    }
                    break;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    if failed {
        node.shutdown().await;
        return Exit::Failed;
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

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

struct Output {
    mode: Mode,
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
        match cmd {
            "/msg" | "/m" => {
                let rest = rest.trim_start();
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
            "/who" => {
                let peers = node.peers();
                self.line(&format!("{} online:", peers.len()));
                for p in peers {
                    self.line(&who_line(&p));
                }
            }
            "/verify" => match rest.trim() {
                "" => self.line(&format!("your key: {}", node.id())),
                name => match node
                    .peers()
                    .into_iter()
                    .find(|p| p.info.name.key() == name.to_ascii_lowercase())
                {
                    Some(p) => self.line(&format!("{}'s key: {}", p.info.name, p.info.id)),
                    None => self.line(&format!("{name} is not on the client list")),
                },
            },
            "/help" | "/?" => self.line(HELP),
            "/quit" | "/exit" | "/logout" => return Flow::Quit,
            other if other.starts_with('/') => {
                self.line(&format!("unknown command {other}; type /help for the list"))
            }
            _ => self.line("to send a message type /msg NAME TEXT (/help for more)"),
        }
        Flow::Continue
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
                self.json(json!({"id": id, "ok": true, "peers": peers}));
            }
            Some("verify") => {
                self.json(json!({"id": id, "ok": true, "peer_id": node.id().to_string()}))
            }
            Some("logout") => {
                self.json(json!({"id": id, "ok": true}));
                return Flow::Quit;
            }
            Some(other) => self.error(
                Some(&id),
                &format!("unknown command {other:?}; commands: send, who, verify, logout"),
            ),
            None => self.error(
                Some(&id),
                "missing \"cmd\"; commands: send, who, verify, logout",
            ),
        }
        Flow::Continue
    }

    fn event(&mut self, node: &Node, event: Event) {
        match self.mode {
            Mode::Json => self.json(event_json(&event)),
            Mode::Text => {
                if let Some(line) = event_text(node, &event) {
                    self.line(&line);
                }
            }
        }
    }
}

const HELP: &str = "commands:
  /msg NAME TEXT   send TEXT to NAME (directly, peer to peer)
  /who             who is online, and our link to each
  /verify [NAME]   show your full key, or NAME's
  /help            this list
  /quit            log out and exit";

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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

fn event_json(event: &Event) -> Value {
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
        } => json!({
            "event": "message", "from": from.as_str(), "text": text, "msg_id": msg_id(id),
            "path": path.as_str(), "sent_at_ms": sent_at_ms,
        }),
        Event::Sent { id, to, path } => json!({
            "event": "sent", "msg_id": msg_id(id), "to": to.as_str(), "path": path.as_str(),
        }),
        Event::Delivered { id, to, path, rtt } => json!({
            "event": "delivered", "msg_id": msg_id(id), "to": to.as_str(), "path": path.as_str(), "rtt_ms": ms(*rtt),
        }),
        Event::Undeliverable { id, to, reason } => json!({
            "event": "undeliverable", "msg_id": msg_id(id), "to": to.as_str(), "reason": reason,
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
            if others.is_empty() {
                "* nobody else is online".to_string()
            } else {
                format!("* online: {}", others.join(", "))
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
        } => match path {
            Path::Direct => format!("Message from {from}: {text}"),
            Path::Relay => format!("Message from {from} (relayed): {text}"),
        },
        Event::Sent { .. } => return None,
        Event::Delivered { id, to, path, rtt } => format!(
            "[{}] to {to}: delivered ({}, {} ms)",
            id.short(),
            path.as_str(),
            ms(*rtt)
        ),
        Event::Undeliverable { id, to, reason } => {
            format!("[{}] to {to}: NOT delivered: {reason}", id.short())
        }
        Event::TrackerLost { reason, retry_in } => format!(
            "! lost the tracker ({reason}); direct conversations go on; enrolling again in {} s",
            retry_in.as_secs()
        ),
        Event::Warning { message } => format!("! warning: {message}"),
        Event::Fatal { reason } => format!("! fatal: {reason}"),
    })
}
