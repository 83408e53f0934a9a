//! Admission under attack (docs/protocol.md, "Limits"):
//! connections that never finish their request head are closed within
//! `CHANNELS_HEADER_TIMEOUT` while the node goes on serving, and the
//! connection cap stays under the descriptor limit, with room to answer.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

/// Half a request head: the line and a header, never the blank line.
const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";

/// Opens `n` connections to `addr` that each send [`HALF_HEAD`] and then
/// wait; each task returns how long its connection stayed open (until the
/// node closed it) or `None` if it was still open after `wait`.
async fn slow_heads(addr: SocketAddr, n: usize, wait: Duration) -> JoinSet<Option<Duration>> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            continue;
        };
        set.spawn(async move {
            let opened = Instant::now();
            let _ = stream.write_all(HALF_HEAD).await;
            let mut buf = [0u8; 1024];
            tokio::time::timeout(wait, async {
                // Until the node closes: an answer (a 408 or 503) may come first.
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await
            .ok()
            .map(|_| opened.elapsed())
        });
    }
    set
}

/// One raw HTTP/1.1 call on a new connection: the status, or `None` when
/// the connection is closed or times out without one.
async fn status_of(addr: SocketAddr, request: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8_lossy(&answer);
    answer.get(9..12)?.parse().ok()
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

fn notify_request(msg: &str) -> String {
    let body = json!({"API_KEY": API_KEY, "channel": "admin", "msg": msg}).to_string();
    format!(
        "POST /notify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_are_closed_within_the_header_timeout_while_the_node_serves() {
    let mut vars = vec![("CHANNELS_HEADER_TIMEOUT", "2")];
    vars.extend(SLOW_HEARTBEAT);
    let node = start(&vars).await;
    let mut socket = node.socket("alice", "admin").await;

    let timeout = Duration::from_secs(2);
    let slow = 2_000;
    let mut held = slow_heads(node.addr, slow, timeout * 4).await;

    // While they are open: the node answers, a backend's notify goes
    // through, and the socket connected before receives it.
    assert_eq!(status_of(node.addr, HEALTHZ).await, Some(200));
    assert_eq!(
        send_to(&node, json!({"channel": "admin"}), json!("through")).await,
        200
    );
    assert_eq!(
        socket.notification(Duration::from_secs(2)).await,
        Some(json!("through"))
    );

    let mut open_for = Vec::new();
    while let Some(closed) = held.join_next().await {
        open_for.push(closed.unwrap().expect("the node closes a half-sent head"));
    }
    assert_eq!(open_for.len(), slow);
    let (shortest, longest) = (
        open_for.iter().min().unwrap(),
        open_for.iter().max().unwrap(),
    );
    eprintln!("{slow} half-sent heads held open for {shortest:?} to {longest:?}");
    assert!(
        *shortest >= timeout - Duration::from_millis(200),
        "closed before the timeout: {shortest:?}"
    );
    assert!(*longest <= timeout + Duration::from_secs(2), "{longest:?}");
    assert!(
        node.metric("channels_limit_refusals_total{limit=\"header_timeout\"}")
            .await
            >= slow as f64
    );

    // The socket is still served.
    assert_eq!(
        send_to(&node, json!({"channel": "admin"}), json!("after")).await,
        200
    );
    assert_eq!(
        socket.notification(Duration::from_secs(2)).await,
        Some(json!("after"))
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let node = start(&[("CHANNELS_HEADER_TIMEOUT", "1")]).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "the idle connection is closed");
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(800) && after <= Duration::from_secs(3),
        "{after:?}"
    );
}

#[tokio::test]
async fn an_engine_io_session_that_never_sends_connect_is_closed_within_the_header_timeout() {
    let mut vars = vec![("CHANNELS_HEADER_TIMEOUT", "1")];
    vars.extend(SLOW_HEARTBEAT);
    let node = start(&vars).await;
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", node.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let open = ws.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with('0'), "{open:?}");
    let opened = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the session is closed");
    assert!(
        opened.elapsed() <= Duration::from_secs(3),
        "{:?}",
        opened.elapsed()
    );
}

/// The node runs with a descriptor limit of 400 and is sent more
/// half-sent heads than that: it caps its connections below the limit,
/// answers `/healthz` and refuses a notify past the cap, and serves again
/// once the timeout has closed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_descriptor_limit_the_node_keeps_answering_and_recovers() {
    let limit = 400;
    let (mut child, addr, log) = spawn_node_with(
        &["serve"],
        &test_vars(&[("CHANNELS_HEADER_TIMEOUT", "3")])
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        Some(limit),
    );
    let addr: SocketAddr = addr.parse().unwrap();
    let cap = log
        .iter()
        .find(|entry| {
            entry["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connection cap lowered"))
        })
        .and_then(|entry| entry["fields"]["cap"].as_u64())
        .expect("the node logs the cap it applies, and why");
    assert!(cap < limit && cap > 0, "{cap}");

    let held = slow_heads(addr, 600, Duration::from_secs(10)).await;
    // The places past the cap are held by half-sent heads for a second at
    // most; then a probe gets one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status_of(addr, HEALTHZ).await, Some(200));
    assert_eq!(status_of(addr, &notify_request("refused")).await, Some(503));

    let closed = held.join_all().await;
    assert!(
        closed.iter().all(Option::is_some),
        "every connection closed"
    );
    assert_eq!(status_of(addr, &notify_request("served")).await, Some(200));
    let auth = json!({"token": ws_token("alice"), "keycloakID": "alice", "channel": "admin"});
    assert!(SioClient::connect(addr, auth).await.is_ok());
    assert!(child.try_wait().unwrap().is_none(), "the node is running");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn check_config_shows_the_cap_the_descriptor_limit_allows() {
    use std::os::unix::process::CommandExt;
    let check = |nofile: u64, env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_channels"));
        command
            .args(["check-config", "--dev"])
            .envs(env.iter().copied());
        // SAFETY: setrlimit is async-signal-safe, and the closure touches
        // nothing else of the parent's.
        unsafe {
            command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, nofile, nofile));
        }
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let kept = channels::limits::descriptors::KEPT;
    let (code, out, _) = check(1000, &[]);
    assert_eq!(code, Some(0));
    let line = out
        .lines()
        .find(|l| l.starts_with("CHANNELS_MAX_CONNECTIONS"))
        .unwrap();
    assert!(
        line.contains(&format!("applied: {}", 1000 - kept))
            && line.contains("descriptor limit is 1000"),
        "{line}"
    );
    let (_, out, _) = check(1000, &[("CHANNELS_MAX_CONNECTIONS", "500")]);
    assert!(
        out.contains("CHANNELS_MAX_CONNECTIONS") && !out.contains("applied"),
        "{out}"
    );
    let (_, out, _) = check(kept, &[]);
    assert!(
        out.contains("a node cannot start") && out.contains("ulimit -n"),
        "{out}"
    );
    let (code, _, err) = check(1000, &[("CHANNELS_HEADER_TIMEOUT", "0")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("CHANNELS_HEADER_TIMEOUT"), "{err}");
}
