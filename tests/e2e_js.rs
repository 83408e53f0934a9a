//! Runs the end-to-end suite in `tests/e2e/` (the official socket.io client
//! from npm against the real `channels` binary) as part of `cargo test`.
//!
//! Installs what the suite needs first: its locked npm dependencies when
//! they are missing or older than `package-lock.json`, and the Debian
//! packages of the cluster tests (redis-server, haproxy) and of the browser
//! test (chromium) when missing.

mod common;

use std::{path::Path, process::Command};

use common::tools::require;

#[test]
fn official_socket_io_client_suite() {
    require("redis-server", "redis-server");
    require("redis-cli", "redis-tools");
    require("haproxy", "haproxy");
    require("ss", "iproute2");
    require("chromium", "chromium");
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let installed = suite.join("node_modules/.package-lock.json");
    let lock = suite.join("package-lock.json");
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    if modified(&installed) < modified(&lock) {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&suite)
            .status()
            .expect("npm is installed (Node 20+)");
        assert!(status.success(), "npm ci failed in tests/e2e");
    }
    let output = Command::new("node")
        // A test that hangs fails after 5 minutes, named, instead of
        // holding the whole suite (node's default is no timeout).
        .args([
            "--test",
            "--test-concurrency=1",
            "--test-timeout=300000",
            "--test-reporter=spec",
        ])
        .current_dir(&suite)
        .env("CHANNELS_BIN", env!("CARGO_BIN_EXE_channels"))
        .output()
        .expect("node is installed (Node 20+)");
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "the end-to-end suite failed (report above)"
    );
    assert!(report.contains("pass"), "the end-to-end suite ran no test");
}
