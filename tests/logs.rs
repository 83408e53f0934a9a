//! Logs: every HTTP request and socket connect carries a request id, and no
//! secret, API key, token or session id ever appears, even at trace level.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{SioClient, claims, sign};
use serde_json::json;
use sha2::{Digest, Sha256};

const UPSTREAM: &str = "log-test-upstream-secret-9f8e7d6c5b4a";
const WS: &str = "log-test-ws-token-secret-1a2b3c4d5e6f";
const KEY: &str = "log-test-api-key-7q8w9e";
const OLD_KEY: &str = "log-test-old-key-5r6t7y";

#[tokio::test]
async fn a_full_scenario_at_trace_level_logs_no_secret_nor_session_id_and_ids_every_request() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_channels"))
        .arg("serve")
        .env_clear()
        .envs([
            ("CHANNELS_LISTEN", "127.0.0.1:0"),
            ("CHANNELS_LOG", "trace"),
            ("CHANNELS_LOG_FORMAT", "json"),
            ("CHANNELS_AUTH_HS256_SECRET", UPSTREAM),
            ("CHANNELS_WS_TOKEN_SECRET", WS),
            ("CHANNELS_API_KEYS", &format!("{KEY},{OLD_KEY}")),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line)
                && entry["fields"]["message"] == "channels node serving"
            {
                let _ = addr_tx.send(entry["fields"]["addr"].as_str().unwrap().to_string());
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("node starts");
    let url = |p: &str| format!("http://{addr}{p}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    // Tokens used in the scenario: they must not show up either.
    let access = sign(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(UPSTREAM.as_bytes()),
        None,
        claims("alice"),
    );
    let answer: serde_json::Value = http
        .get(url("/authorize"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ws_token = answer["token"].as_str().unwrap().to_string();
    let forged = format!("{access}x");
    let refused = http
        .get(url("/authorize"))
        .bearer_auth(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let auth = json!({"token": ws_token, "keycloakID": "alice", "channel": "admin"});
    let mut socket = SioClient::connect(addr.parse().unwrap(), auth)
        .await
        .unwrap();
    let bad = json!({"token": forged, "keycloakID": "alice", "channel": "admin"});
    assert!(
        SioClient::connect(addr.parse().unwrap(), bad)
            .await
            .is_err()
    );

    // The same CONNECT over HTTP long-polling (the token travels in a POST body).
    let open = http
        .get(url("/socket.io/?EIO=4&transport=polling"))
        .send()
        .await
        .unwrap();
    let open = open.text().await.unwrap();
    let sid = serde_json::from_str::<serde_json::Value>(&open[1..]).unwrap()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    let polling = url(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}"));
    let connect = format!(
        "40{}",
        json!({"token": ws_token, "keycloakID": "alice", "channel": "poll"})
    );
    let posted = http.post(&polling).body(connect).send().await.unwrap();
    assert_eq!(posted.status(), 200);
    // Poll until the CONNECT acknowledgement (a ping may come first).
    let acknowledged = poll_until(&http, &polling, |p| {
        p.split('\u{1e}').any(|packet| packet.starts_with("40"))
    })
    .await;
    assert!(
        acknowledged.is_some(),
        "no CONNECT acknowledgement over polling"
    );

    let r = http
        .post(url("/notify"))
        .json(&json!({"API_KEY": KEY, "msg": "hello", "keycloak": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().contains_key("x-request-id"),
        "answers carry the request id"
    );
    assert_eq!(
        socket.notification(Duration::from_secs(5)).await,
        Some(json!("hello"))
    );
    let polled = poll_until(&http, &polling, |p| p.contains("hello")).await;
    assert!(
        polled.is_some(),
        "the polling socket did not get the notification"
    );
    let r = http
        .post(url("/notify"))
        .header("x-api-key", OLD_KEY)
        .json(&json!({"msg": 1, "channel": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(url("/notify"))
        .json(&json!({"API_KEY": format!("{KEY}-wrong"), "msg": 1, "channel": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A caller's own request id is kept.
    let r = http
        .get(url("/healthz"))
        .header("x-request-id", "caller-id-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "caller-id-123");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();
    let log = log.lock().unwrap().join("\n");
    assert!(
        log.lines().count() > 20,
        "trace logging produced too little: {log}"
    );
    let secrets = [UPSTREAM, WS, KEY, OLD_KEY, &access, &ws_token, &forged];
    for (i, secret) in secrets.iter().enumerate() {
        if let Some(line) = log.lines().find(|l| l.contains(*secret)) {
            panic!(
                "secret #{i} appears in the log: {}",
                line.replace(*secret, "<SECRET>")
            );
        }
    }
    // Token fragments would be as bad: check the signature parts alone too.
    for token in [&access, &ws_token] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !log.contains(signature),
            "a token signature appears in the log"
        );
    }
    // A polling client's session id is its credential: whoever holds it can
    // read and write the session. Logs name a socket by a digest of it.
    if let Some(line) = log.lines().find(|l| l.contains(&sid)) {
        panic!(
            "a session id appears in the log: {}",
            line.replace(&sid, "<SID>")
        );
    }
    // ...by the first 12 hex digits of its SHA-256, so its lines can still
    // be followed.
    let tag: String = Sha256::digest(sid.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        log.lines()
            .any(|l| l.contains("socket accepted") && l.contains(&format!(r#""socket":"{tag}""#))),
        "no `socket accepted` line names the polling socket by its digest"
    );
    for event in ["socket accepted", "socket refused", "notify refused"] {
        let line = log
            .lines()
            .find(|l| l.contains(event))
            .unwrap_or_else(|| panic!("no {event:?} in the log"));
        assert!(
            line.contains("request_id"),
            "{event} without request id: {line}"
        );
        assert!(
            !line.contains(r#""request_id":"-""#),
            "{event} with an empty request id: {line}"
        );
    }
    assert!(log.contains("caller-id-123"));
}

/// Long-polls `url` (answering pings) until a payload satisfies `wanted`.
async fn poll_until(
    http: &reqwest::Client,
    url: &str,
    wanted: impl Fn(&str) -> bool,
) -> Option<String> {
    for _ in 0..5 {
        let payload = http.get(url).send().await.ok()?.text().await.ok()?;
        if wanted(&payload) {
            return Some(payload);
        }
        http.post(url).body("3").send().await.ok()?;
    }
    None
}

/// Runs the binary with the test variables and `env` over them, stderr
/// piped (not a terminal) and in the default (pretty) format; its address
/// and every log line so far, kept as they come.
fn spawn_pretty(env: &[(&str, &str)]) -> (std::process::Child, String, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_channels"))
        .arg("serve")
        .env_clear()
        .envs(common::test_vars(env))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("channels node serving")
                && let Some(addr) = line.split("addr=").nth(1)
            {
                let _ = addr_tx.send(
                    addr.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            sink.lock().unwrap().push(line);
        }
    });
    let Ok(addr) = addr_rx.recv_timeout(Duration::from_secs(10)) else {
        let _ = child.kill();
        panic!("the node did not start: {:?}", log.lock().unwrap());
    };
    (child, addr, log)
}

#[tokio::test]
async fn tungstenite_is_capped_not_raised_and_a_pipe_gets_no_colours() {
    // `channels=info` at warn: the address comes from the "serving" line.
    for level in [None, Some("warn,channels=info"), Some("trace")] {
        let env: Vec<(&str, &str)> = level.map(|l| ("CHANNELS_LOG", l)).into_iter().collect();
        let (mut child, addr, log) = spawn_pretty(&env);
        let auth =
            json!({"token": common::ws_token("alice"), "keycloakID": "alice", "channel": "admin"});
        let socket = SioClient::connect(addr.parse().unwrap(), auth)
            .await
            .unwrap();
        socket.drop_connection().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = child.kill();
        let _ = child.wait();
        let log = log.lock().unwrap().join("\n");
        assert!(log.contains("channels node serving"), "{log}");
        assert!(!log.contains('\u{1b}'), "colour codes in a pipe: {log}");
        match level {
            // At info and warn, tungstenite's debug lines stay out.
            None | Some("warn,channels=info") => {
                assert!(!log.contains("tungstenite"), "{level:?}: {log}")
            }
            // At trace, everything but tungstenite's trace lines (the
            // only trace events on this path).
            _ => {
                assert!(log.contains("DEBUG"), "{log}");
                assert!(
                    !log.lines()
                        .any(|l| l.contains("TRACE") && l.contains("tungstenite")),
                    "{log}"
                );
            }
        }
    }
}
