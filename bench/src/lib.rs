//! `tincan-bench`: measures tincan beside raw quinn in the same run, on the
//! same machine, and reports every figure as a ratio to that baseline.
//!
//! Layout:
//! - [`quic`]: the QUIC settings both sides of every baseline share (the same
//!   Ed25519 mutual TLS and keep-alive as tincan, so a ratio measures tincan's
//!   own logic, not a different handshake).
//! - [`procs`]: child processes (the real `tracker`, the bare quinn server),
//!   and their CPU and memory read from `/proc`.
//! - [`bare`]: the bare quinn server, run as `tincan-bench bare-server` in a
//!   process of its own so its memory compares with the tracker's.
//! - [`swarm`]: the load generator: simulated peers that speak the real
//!   tracker protocol (or the bare baseline) over real QUIC and keep reading.
//! - [`direct`]: peer-to-peer figures: two real `Node`s against raw quinn.
//! - [`scenarios`]: the figures themselves, in order, each with its baseline.
//! - [`report`]: percentiles, the table, and the `GOAL` lines.

pub mod bare;
pub mod direct;
pub mod procs;
pub mod quic;
pub mod report;
pub mod scenarios;
pub mod swarm;

use std::time::Duration;

/// Anything that stops a measurement.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Quic(#[from] quic::QuicError),
    #[error(transparent)]
    Proc(#[from] procs::ProcError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error(transparent)]
    Frame(#[from] tincan_proto::FrameError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("node: {0}")]
    Node(String),
}
