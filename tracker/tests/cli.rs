//! The `tracker` binary's command line: bad input gets one clear line and a
//! non-zero exit. (Having an integration test here also makes
//! `cargo test --workspace` build the binary the tests/ crate starts.)

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[test]
fn bad_listen_address_exits_2_naming_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_tracker"))
        .args(["--listen", "not-an-address"])
        .output()
        .expect("run tracker");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().next().unwrap_or("").contains("--listen"),
        "{stderr}"
    );
}

#[test]
fn values_out_of_range_are_refused_naming_the_flag() {
    for (flag, value) in [
        ("--max-peers", "0"),
        ("--held-ttl", "0s"),
        ("--held-ttl", "1000years"),
        ("--name-retention", "1000years"),
    ] {
        // Spawned and waited for with a deadline: a tracker that accepted the
        // value would run until stopped.
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tracker"))
            .args(["--listen", "127.0.0.1:0", flag, value, "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tracker");
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("wait for tracker").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tracker {flag} {value} was still running after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("tracker output");
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.lines().next().unwrap_or("").contains(flag),
            "{flag} {value}: {stderr}"
        );
    }
}

#[test]
fn bad_presence_mode_exits_2_naming_the_flag_and_the_choices() {
    let out = Command::new(env!("CARGO_BIN_EXE_tracker"))
        .args(["--listen", "127.0.0.1:0", "--presence", "everyone"])
        .output()
        .expect("run tracker");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or("");
    assert!(first.contains("--presence"), "{stderr}");
    assert!(
        stderr.contains("broadcast") && stderr.contains("subscribe"),
        "{stderr}"
    );
}

#[test]
fn unusable_data_dir_is_a_clear_error() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    // A regular file where the data directory should be.
    let out = Command::new(env!("CARGO_BIN_EXE_tracker"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(file.path())
        .output()
        .expect("run tracker");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("data directory"), "{stderr}");
}

#[test]
fn a_port_in_use_is_one_line_giving_the_reason_once() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
    let addr = taken.local_addr().expect("its address").to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_tracker"))
        .args(["--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run tracker");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with(&format!("tracker: cannot listen on {addr}: ")),
        "{stderr}"
    );
    assert_eq!(
        last.matches("(os error").count(),
        1,
        "the reason is given more than once: {stderr}"
    );
}

#[test]
fn a_tracker_whose_stdout_reader_is_gone_runs_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tracker"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tracker");
    // Whoever read the start lines has gone before they were written.
    drop(child.stdout.take());
    // "accepting peers" is logged after the start lines; read stderr on a
    // thread so that the wait below has a deadline.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let accepting = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("accepting peers") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let running = child.try_wait().expect("wait for tracker").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        accepting && running,
        "the tracker stopped (accepting: {accepting}, running: {running}):\n{}",
        seen.join("\n")
    );
}
