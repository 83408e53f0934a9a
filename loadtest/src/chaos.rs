//! `chaos`: the rolling-restart drill of the end-to-end suite
//! (`tests/e2e/drill.test.mjs`: three nodes behind HAProxy, a private Redis,
//! `--connections` official socket.io clients, each node restarted with
//! SIGTERM under a steady stream of notifications, then one SIGKILLed),
//! run against this binary and reported as a RESULT line.
//!
//! The drill is written once, in JavaScript, because it needs the official
//! client's own reconnection and recovery; this runs it and reads the counts
//! it prints.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::{
    report::Report,
    scenarios::Sizes,
    servers::{Kind, Programs},
};

/// The end-to-end suite, with the drill.
const SUITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e");

/// What the drill prints on its `DRILL ` line.
#[derive(Deserialize)]
struct Counts {
    clients: usize,
    notifications: u64,
    expected: u64,
    received: u64,
    lost: u64,
    out_of_order: u64,
    ms: f64,
}

/// Runs the drill with about `sizes.connections` clients (three per user)
/// against channels, with recovery on or (`channels-no-recovery`) off.
pub async fn chaos(kind: Kind, programs: &Programs, sizes: &Sizes) -> anyhow::Result<Report> {
    anyhow::ensure!(
        kind.is_channels(),
        "the chaos drill runs channels only (the Node baseline has no such drill)"
    );
    let suite = Path::new(SUITE);
    if !suite.join("node_modules").exists() {
        let status = tokio::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(suite)
            .status()
            .await
            .context("running npm ci for the end-to-end suite")?;
        anyhow::ensure!(status.success(), "npm ci failed in {}", suite.display());
    }
    // The drill runs in the suite's folder: the binary's path must not be relative.
    let channels = std::fs::canonicalize(&programs.channels)
        .with_context(|| format!("{} not found", programs.channels.display()))?;
    let mut command = tokio::process::Command::new("node");
    command
        .args(["--test", "--test-reporter=spec", "drill.test.mjs"])
        .current_dir(suite)
        .env("CHANNELS_BIN", channels)
        .env(
            "DRILL_USERS",
            sizes.connections.div_ceil(3).max(1).to_string(),
        );
    if kind == Kind::ChannelsNoRecovery {
        command.env("DRILL_ENV", r#"{"CHANNELS_RECOVERY_WINDOW":"0"}"#);
    }
    let output = command
        .output()
        .await
        .context("running the drill with node")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // A drill that lost something fails its test, and still prints its counts.
    let counts: Counts = stdout
        .lines()
        .find_map(|line| line.trim_start().strip_prefix("DRILL "))
        .with_context(|| format!("the drill printed no counts:\n{stdout}"))
        .and_then(|line| serde_json::from_str(line).context("the drill's counts"))?;
    let seconds = counts.ms / 1000.0;
    Ok(Report {
        scenario: "chaos",
        server: Some(kind),
        nodes: 3,
        connections: counts.clients,
        notifies: counts.notifications,
        notifies_per_s: counts.notifications as f64 / seconds.max(1e-9),
        deliveries_per_s: counts.received as f64 / seconds.max(1e-9),
        expected: counts.expected,
        received: counts.received,
        lost: counts.lost,
        out_of_order: counts.out_of_order,
        seconds,
        ..Report::default()
    })
}
