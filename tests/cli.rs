//! The `channels` binary as an operator meets it: start-up errors that name
//! the variable, dev mode with no setup, `gen-token`, SIGTERM, and the
//! node's threads and listen backlog.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::spawn_node;

const BIN: &str = env!("CARGO_BIN_EXE_channels");

fn channels(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn a_missing_secret_is_a_startup_error_naming_the_variable() {
    let out = channels(
        &["serve"],
        &[("CHANNELS_AUTH_HS256_SECRET", "x".repeat(40).as_str())],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CHANNELS_WS_TOKEN_SECRET"), "{stderr}");
    let out = channels(&["serve"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CHANNELS_AUTH_JWKS_URL"));
}

#[tokio::test]
async fn dev_mode_runs_with_no_setup_and_gen_token_feeds_authorize() {
    let (mut child, addr) = spawn_node(&["serve", "--dev"], &[]);
    let out = channels(&["gen-token", "--dev", "--user", "alice"], &[])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{addr}/authorize"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("http://{addr}/notify"))
        .json(&serde_json::json!({"API_KEY": "dev-api-key", "msg": 1, "channel": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn sigterm_exits_cleanly_within_the_bound() {
    let secrets = [
        ("CHANNELS_AUTH_HS256_SECRET", "u".repeat(40)),
        ("CHANNELS_WS_TOKEN_SECRET", "w".repeat(40)),
        ("CHANNELS_API_KEYS", "k".into()),
        ("CHANNELS_SHUTDOWN_TIMEOUT", "5".into()),
    ];
    let env: Vec<(&str, &str)> = secrets.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut child, addr) = spawn_node(&["serve"], &env);
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let started = Instant::now();
    sigterm(&child);
    let status = exit_within(&mut child, started, Duration::from_secs(6));
    assert!(status.success(), "{status}");
}

/// A SIGTERM that arrives while the node is still starting (its port
/// already listens) waits for the start, then shuts the node down
/// gracefully: the handler is installed before the node binds. Installed
/// after the start, as it once was, the signal's default action killed a
/// node that had just begun to answer.
#[test]
fn sigterm_during_start_exits_cleanly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = channels(&["serve", "--dev"], &[("CHANNELS_LISTEN", listen.as_str())])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(started.elapsed() < Duration::from_secs(5), "never listened");
    }
    sigterm(&child);
    let status = exit_within(&mut child, started, Duration::from_secs(10));
    assert!(status.success(), "{status}");
}

/// Sends SIGTERM with kill(2) itself: a `kill` process would start too
/// late for the signal to find the node still starting.
fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) with the pid of our own child, not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
}

/// How `child` exited, within `bound` of `started`.
fn exit_within(
    child: &mut std::process::Child,
    started: Instant,
    bound: Duration,
) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < bound, "no exit within the bound");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The worker threads of the process `pid`, once their count has settled:
/// tokio starts its workers on its blocking pool, so on a busy machine the
/// last may start after the node already answers. Waits up to 5 s for the
/// count to reach `expected`, and returns the count it saw last.
fn worker_threads(pid: u32, expected: usize) -> usize {
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "tokio-rt-worker")
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let seen = count();
        if seen == expected || std::time::Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_node_runs_as_many_worker_threads_as_it_is_told() {
    for (setting, expected) in [("1", 1), ("3", 3)] {
        let (mut child, addr) =
            spawn_node(&["serve", "--dev"], &[("CHANNELS_WORKER_THREADS", setting)]);
        assert_eq!(
            worker_threads(child.id(), expected),
            expected,
            "CHANNELS_WORKER_THREADS={setting}"
        );
        // It serves with them.
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let (code, _, err) = run(&["serve", "--dev"], &[("CHANNELS_WORKER_THREADS", "0")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("CHANNELS_WORKER_THREADS") && err.contains("at least 1"),
        "{err}"
    );
}

/// How many of `attempts` TCP connections to `addr` are established while
/// the node at `pid` is stopped and accepts none: the kernel completes the
/// handshake of those its backlog has room for, and drops the SYN of the
/// rest (their connect would wait for TCP's one-second retry). Counts up to
/// the first that does not connect within half a second.
fn queued_while_stopped(pid: u32, addr: &str, attempts: usize) -> usize {
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name}");
    };
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    signal("-STOP");
    // The signal is delivered as each thread is next scheduled: wait until
    // all have stopped, or a busy machine lets the node accept a few more.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(pid) {
        assert!(Instant::now() < deadline, "the node did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut held = Vec::with_capacity(attempts);
    while held.len() < attempts {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(stream) => held.push(stream),
            Err(_) => break,
        }
    }
    signal("-CONT");
    held.len()
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc`).
fn all_threads_stopped(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("stat")).ok())
        .all(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
}

#[test]
fn a_burst_of_connections_waits_in_the_backlog_while_the_node_is_busy() {
    // The default holds 1,024: a burst of 600 all connect (std's 128, which
    // tokio's `TcpListener::bind` uses, would leave 471 waiting a second).
    let (mut child, addr) = spawn_node(&["serve", "--dev"], &[]);
    let queued = queued_while_stopped(child.id(), &addr, 600);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(queued, 600, "connections established during the burst");

    // CHANNELS_LISTEN_BACKLOG sets it (Linux queues one more than asked).
    let (mut child, addr) = spawn_node(&["serve", "--dev"], &[("CHANNELS_LISTEN_BACKLOG", "200")]);
    let queued = queued_while_stopped(child.id(), &addr, 600);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        (200..=201).contains(&queued),
        "{queued} queued with a backlog of 200"
    );
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = channels(args, env).output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (
        out.status.code().unwrap_or(-1),
        text(out.stdout),
        text(out.stderr),
    )
}

const PROD: [(&str, &str); 3] = [
    (
        "CHANNELS_AUTH_HS256_SECRET",
        "upstream-secret-for-cli-tests-000000",
    ),
    (
        "CHANNELS_WS_TOKEN_SECRET",
        "ws-token-secret-for-cli-tests-0000000",
    ),
    ("CHANNELS_API_KEYS", "cli-key-one,cli-key-two"),
];

#[test]
fn check_config_prints_the_effective_settings_with_secrets_masked() {
    let (code, out, _) = run(&["check-config"], &PROD);
    assert_eq!(code, 0);
    assert!(out.contains("configuration is valid"));
    assert!(out.contains("CHANNELS_WS_TOKEN_TTL") && out.contains("300"));
    assert!(out.contains("2 key(s)"));
    for (_, secret) in PROD {
        for part in secret.split(',') {
            assert!(!out.contains(part), "{part} printed: {out}");
        }
    }
    // Every problem at once, each named, and nothing else.
    let mut bad = PROD.to_vec();
    bad.push(("CHANNELS_SOCKET_QUEUE", "many"));
    bad.push(("CHANNELS_PING_TIMEOUT", "0"));
    bad.push(("CHANNELS_LOG", "channels=loud"));
    let (code, _, err) = run(&["check-config"], &bad);
    assert_eq!(code, 2);
    assert!(err.contains("3 problems"), "{err}");
    for var in [
        "CHANNELS_SOCKET_QUEUE",
        "CHANNELS_PING_TIMEOUT",
        "CHANNELS_LOG",
    ] {
        assert!(err.contains(&format!("{var} is invalid")), "{var}: {err}");
    }
}

#[test]
fn check_token_accepts_a_good_token_and_says_why_a_bad_one_is_refused() {
    let (_, token, _) = run(&["gen-token", "--user", "alice"], &PROD);
    let (code, out, _) = run(&["check-token", token.trim()], &PROD);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("valid access token for keycloakID \"alice\""),
        "{out}"
    );

    let (_, expired, _) = run(&["gen-token", "--user", "alice", "--ttl", "0"], &PROD);
    let mut strict = PROD.to_vec();
    strict.push(("CHANNELS_AUTH_LEEWAY", "0"));
    std::thread::sleep(Duration::from_millis(1100));
    let (code, _, err) = run(&["check-token", expired.trim()], &strict);
    assert_eq!(code, 1);
    assert!(err.contains("refused: token has expired"), "{err}");

    // A ws token is refused as an access token, with a hint to use --ws,
    // and accepted with --ws; an access token with --ws gets the reverse.
    let (_, ws, _) = run(&["gen-token", "--ws", "--user", "alice"], &PROD);
    let (code, _, err) = run(&["check-token", ws.trim()], &PROD);
    assert_eq!(code, 1);
    assert!(
        err.contains("refused") && err.contains("this is a ws token") && err.contains("--ws"),
        "{err}"
    );
    let (code, out, _) = run(&["check-token", "--ws", ws.trim()], &PROD);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = run(&["check-token", "--ws", token.trim()], &PROD);
    assert_eq!(code, 1);
    assert!(
        err.contains("this is not a ws token") && err.contains("without --ws"),
        "{err}"
    );

    let (code, _, err) = run(&["check-token", "not-a-token"], &PROD);
    assert_eq!(code, 1);
    assert!(
        err.contains("not a JWT") && err.contains("malformed"),
        "{err}"
    );
}

#[tokio::test]
async fn probe_tells_whether_a_node_is_alive() {
    let (mut child, addr) = spawn_node(&["serve", "--dev"], &[]);
    let url = format!("http://{addr}");
    let (code, out, _) = run(&["probe", "--url", &url], &[]);
    assert_eq!(code, 0, "{out}");
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, _, _) = run(&["probe", "--url", &url], &[]);
    assert_eq!(code, 1);
}

#[test]
fn boolean_variables_take_the_usual_spellings_and_errors_name_the_variable() {
    for yes in ["1", "true", "TRUE", "yes", "on"] {
        let (code, out, err) = run(&["check-config"], &[("CHANNELS_DEV", yes)]);
        assert_eq!(code, 0, "CHANNELS_DEV={yes}: {err}");
        assert!(out.contains("configuration is valid"), "{out}");
    }
    for no in ["0", "false", "no", "off"] {
        // Dev mode off and nothing else set: the production settings are missing.
        let (code, _, err) = run(&["check-config"], &[("CHANNELS_DEV", no)]);
        assert_eq!(code, 2, "CHANNELS_DEV={no}");
        assert!(err.contains("CHANNELS_AUTH_JWKS_URL"), "{err}");
    }
    let (code, _, err) = run(&["check-config"], &[("CHANNELS_DEV", "maybe")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("CHANNELS_DEV") && !err.contains("--dev"),
        "{err}"
    );
    let mut redis = PROD.to_vec();
    redis.push(("CHANNELS_REDIS_URL", "redis://127.0.0.1:7000"));
    for (value, ok) in [("yes", true), ("Off", true), ("2", false)] {
        let mut vars = redis.clone();
        vars.push(("CHANNELS_REDIS_CLUSTER", value));
        let (code, _, err) = run(&["check-config"], &vars);
        assert_eq!(code == 0, ok, "CHANNELS_REDIS_CLUSTER={value}: {err}");
        if !ok {
            assert!(err.contains("CHANNELS_REDIS_CLUSTER"), "{err}");
        }
    }
}

#[test]
fn a_misspelled_variable_is_named_with_the_one_meant() {
    let mut vars = PROD.to_vec();
    vars.push(("CHANNELS_LISTN", "127.0.0.1:4000"));
    vars.push(("CHANNELS_API_KEY", "k"));
    let (code, _, err) = run(&["check-config"], &vars);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("CHANNELS_LISTN is not a channels setting: did you mean CHANNELS_LISTEN?"),
        "{err}"
    );
    assert!(err.contains("did you mean CHANNELS_API_KEYS?"), "{err}");
    // A node starts anyway, and warns at start.
    let (mut child, _, logged) = common::spawn_node_with(
        &["serve"],
        &[("CHANNELS_DEV", "1"), ("CHANNELS_LISTN", "127.0.0.1:4000")],
        None,
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        logged.iter().any(|entry| entry["level"] == "WARN"
            && entry["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("did you mean CHANNELS_LISTEN?"))),
        "{logged:?}"
    );
}
