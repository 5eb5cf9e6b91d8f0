//! The `tincan-bench` command line: a size out of its range gets one clear
//! line naming the flag and a non-zero exit, before anything is started.

use std::process::Command;

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
        let out = Command::new(env!("CARGO_BIN_EXE_tincan-bench"))
            .args(args)
            .output()
            .expect("run tincan-bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: invalid value") && first.contains(args[0]),
            "{args:?}: {stderr}"
        );
    }
}
