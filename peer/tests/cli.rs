//! The `peer` binary's command line: bad input gets one clear line and a
//! non-zero exit, before anything touches the network. (Having an
//! integration test here also makes `cargo test --workspace` build the
//! binary the tests/ crate starts.)

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_peer"))
        .args(args)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run peer");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_names_are_refused_with_the_reason() {
    for bad in [
        "bo b",
        "",
        "a-name-that-is-far-too-long-for-tincan",
        "bøb",
        "a/b",
    ] {
        let (code, stderr) = run(&["--name", bad, "--tracker", "127.0.0.1:9"]);
        assert_eq!(code, Some(2), "{bad:?} accepted: {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.contains("--name") && first.contains("name"),
            "{bad:?}: {stderr}"
        );
    }
}

#[test]
fn malformed_tracker_key_is_refused() {
    let (code, stderr) = run(&[
        "--name",
        "x",
        "--tracker",
        "127.0.0.1:9",
        "--tracker-key",
        "zz",
    ]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--tracker-key"), "{stderr}");
}

#[test]
fn missing_tracker_is_refused() {
    let (code, stderr) = run(&["--name", "x"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--tracker"), "{stderr}");
}

#[test]
fn a_tracker_address_that_is_not_host_and_port_is_refused_naming_the_flag() {
    for bad in [
        "127.0.0.1",
        "tracker.example.org:",
        ":7777",
        "host:0",
        "host:99999",
        "::1:7777",
    ] {
        let (code, stderr) = run(&["--name", "bob", "--tracker", bad]);
        assert_eq!(code, Some(2), "{bad:?} accepted: {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(first.contains("--tracker"), "{bad:?}: {stderr}");
    }
}
