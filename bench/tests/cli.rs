//! The `tincan-bench` command line: a size out of its range gets one clear
//! line naming the flag and a non-zero exit, before anything is started.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Runs `tincan-bench` with `args`; a run that has not ended within 10 s
/// (it took the value and started measuring) is stopped with SIGTERM, so
/// that it stops the servers it started, and the test fails.
fn run_refused(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tincan-bench"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tincan-bench");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait for tincan-bench").is_none() {
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            panic!("tincan-bench {args:?} was still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("tincan-bench output")
}

#[test]
fn sizes_out_of_range_exit_2_naming_the_flag() {
    for args in [
        ["--peers", "1"],
        ["--peers", "100001"],
        ["--concurrency", "0"],
        ["--rtt-messages", "0"],
        ["--tput-messages", "0"],
        ["--presence-sizes", "1000,1"],
        ["--deadline", "0"],
        ["--enroll-rounds", "9"],
    ] {
        let out = run_refused(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: invalid value") && first.contains(args[0]),
            "{args:?}: {stderr}"
        );
    }
}
