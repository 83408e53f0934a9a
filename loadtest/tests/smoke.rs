//! A smoke run of every scenario against both servers with small numbers
//! (`loadtest compare --quick`), so the generator, the Node baseline and
//! the comparison cannot rot. It checks what the tool reports (complete,
//! in order, a full table), never how fast anything was.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

/// The channels binary `cargo test --workspace` built beside this test.
fn channels_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("channels");
    assert!(
        bin.exists(),
        "{} not found: run the workspace's tests (`cargo test --workspace`) or `cargo build` first",
        bin.display()
    );
    bin
}

/// Runs `loadtest` with `args` against that binary; its standard output
/// and error, once it has succeeded.
fn loadtest(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--channels-bin")
        .arg(channels_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

/// RESULT lines of `stdout`.
fn results(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A `compare` run's output: `scenarios` against both servers, every run
/// complete and in order, and a table row for each scenario.
fn assert_compared_and_complete(stdout: &str, scenarios: &[&str]) {
    let results = results(stdout);
    assert_eq!(
        results.len(),
        scenarios.len() * 2,
        "{scenarios:?} x 2 servers:\n{stdout}"
    );
    for r in &results {
        let what = format!("{} on {}", r["scenario"], r["server"]);
        assert!(r["notifies"].as_u64().unwrap() > 0, "{what} sent nothing");
        assert_eq!(r["lost"], 0, "{what}: {r}");
        assert_eq!(r["out_of_order"], 0, "{what}: {r}");
        assert_eq!(r["received"], r["expected"], "{what}: {r}");
    }
    for scenario in scenarios {
        assert!(
            stdout.contains(&format!("| {scenario} |")),
            "{scenario} in the table:\n{stdout}"
        );
    }
}

#[test]
fn every_scenario_runs_against_both_servers_and_loses_nothing() {
    let (stdout, _) = loadtest(&["compare", "--quick", "--rounds", "1"]);
    assert_compared_and_complete(&stdout, &["idle", "fanout", "targeted", "cluster"]);
}

#[test]
fn a_paced_fanout_posts_no_faster_than_its_rate() {
    let (notifies, rate) = (20, 20.0);
    let (stdout, _) = loadtest(&[
        "run",
        "fanout",
        "--connections",
        "20",
        "--notifies",
        &notifies.to_string(),
        "--rate",
        &rate.to_string(),
    ]);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("a RESULT line");
    let r: Value = serde_json::from_str(line).unwrap();
    assert_eq!(r["notifies"], notifies, "{r}");
    assert_eq!(r["received"], r["expected"], "{r}");
    // The last of `notifies` posts is due (notifies - 1) / rate seconds in.
    let paced = (notifies - 1) as f64 / rate;
    assert!(r["seconds"].as_f64().unwrap() >= paced, "not paced: {r}");
}

#[test]
fn a_long_run_reports_its_progress_while_posting() {
    // Progress lines come every 5 s: a 6 s run prints one, part way.
    let (stdout, stderr) = loadtest(&[
        "run",
        "targeted",
        "--connections",
        "20",
        "--posters",
        "2",
        "--seconds",
        "6",
    ]);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("a RESULT line");
    let total = serde_json::from_str::<Value>(line).unwrap()["notifies"]
        .as_u64()
        .unwrap();
    let progress: Vec<u64> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("posted "))
        .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(progress.len(), 1, "one progress line:\n{stderr}");
    assert!(
        progress[0] > 0 && progress[0] < total,
        "part way through ({progress:?} of {total}):\n{stderr}"
    );
}

#[test]
fn the_chaos_drill_reports_its_counts_and_loses_nothing() {
    let (stdout, _) = loadtest(&["run", "chaos", "--connections", "30"]);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("a RESULT line");
    let r: Value = serde_json::from_str(line).unwrap();
    assert_eq!(r["scenario"], "chaos", "{r}");
    assert_eq!(r["connections"], 30, "{r}");
    assert!(r["notifies"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["out_of_order"], 0, "{r}");
    assert_eq!(r["received"], r["expected"], "{r}");
}

#[test]
fn batches_against_both_servers_and_presence_lose_nothing() {
    let (stdout, _) = loadtest(&["compare", "--quick", "--rounds", "1", "--only", "batch"]);
    let (presence, _) = loadtest(&[
        "run",
        "presence",
        "--connections",
        "40",
        "--posters",
        "2",
        "--seconds",
        "1",
    ]);
    let results: Vec<Value> = stdout
        .lines()
        .chain(presence.lines())
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        results.len(),
        3,
        "batch x 2 servers, presence:\n{stdout}{presence}"
    );
    for r in &results {
        let what = format!("{} on {}", r["scenario"], r["server"]);
        assert!(r["notifies"].as_u64().unwrap() > 0, "{what} did nothing");
        assert_eq!(r["lost"], 0, "{what}: {r}");
        assert_eq!(r["out_of_order"], 0, "{what}: {r}");
        assert_eq!(r["received"], r["expected"], "{what}: {r}");
    }
    assert!(stdout.contains("| batch |"), "{stdout}");
}

#[test]
fn long_polling_clients_against_both_servers_lose_nothing() {
    let (stdout, _) = loadtest(&[
        "compare",
        "--quick",
        "--rounds",
        "1",
        "--only",
        "idle-polling",
        "--only",
        "fanout-polling",
    ]);
    assert_compared_and_complete(&stdout, &["idle-polling", "fanout-polling"]);
}

#[test]
fn a_flood_reports_the_peak_memory_and_what_reached_the_sockets() {
    let (stdout, _) = loadtest(&["compare", "--quick", "--rounds", "1", "--only", "flood"]);
    let results = results(&stdout);
    assert_eq!(results.len(), 2, "flood x 2 servers:\n{stdout}");
    for r in &results {
        let what = format!("flood on {}", r["server"]);
        assert_eq!(r["scenario"], "flood", "{r}");
        assert!(r["notifies"].as_u64().unwrap() > 0, "{what} sent nothing");
        assert!(
            r["peak_rss_per_connection_kib"].as_f64().unwrap() > 0.0,
            "{what}: {r}"
        );
        // Only a socket the server closed as slow may miss anything.
        if r["closed_by_server"] == 0 {
            assert_eq!(r["received"], r["expected"], "{what}: {r}");
        }
    }
    assert!(
        stdout.contains("| flood | peak RSS per connection, KiB |"),
        "{stdout}"
    );
}

#[test]
fn a_storm_through_one_address_is_throttled_and_through_a_forwarding_balancer_is_not() {
    // 300 clients at once: over the default connect limit's burst of 200
    // for one address.
    let run = |scenario: &str| {
        let (stdout, _) = loadtest(&["run", scenario, "--connections", "300"]);
        results(&stdout).pop().expect("a RESULT line")
    };
    let forwarded = run("storm");
    assert_eq!(forwarded["refused"], 0, "{forwarded}");
    assert_eq!(forwarded["received"], 300, "{forwarded}");
    let one_address = run("storm-one-address");
    assert!(
        one_address["refused"].as_u64().unwrap() > 0,
        "{one_address}"
    );
    // The limit's 50 per second let the rest in, well within the minute.
    assert_eq!(one_address["received"], 300, "{one_address}");
    assert_eq!(one_address["lost"], 0, "{one_address}");
}

#[test]
fn pinned_runs_keep_the_servers_and_the_generator_apart() {
    let (stdout, stderr) = loadtest(&[
        "--pin",
        "run",
        "cluster",
        "--connections",
        "20",
        "--posters",
        "2",
        "--seconds",
        "1",
    ]);
    // Read back from /proc, not merely asked for.
    assert!(stderr.contains("generator on CPUs 1"), "{stderr}");
    assert_eq!(
        stderr.matches("channels server on CPUs 0\n").count(),
        2,
        "both nodes:\n{stderr}"
    );
    assert!(stdout.contains("\"lost\":0"), "{stdout}");
}
