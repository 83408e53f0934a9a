//! Shared helpers of the integration tests: start a real node on an
//! ephemeral port, mint tokens, call the HTTP API, and speak socket.io over
//! a real websocket (the protocol is small: engine.io v4 + socket.io v5).
#![allow(dead_code)] // Each test binary uses its own subset of these helpers.

pub mod redis;
pub mod tools;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use channels::{Node, config::Config};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

pub const UPSTREAM_SECRET: &str = "test-upstream-secret-0123456789abcdef";
pub const WS_SECRET: &str = "test-ws-token-secret-0123456789abcdef";
pub const API_KEY: &str = "test-api-key";
pub const OTHER_API_KEY: &str = "test-api-key-2";

/// A node running in this process.
pub struct TestNode {
    pub node: Node,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

/// A heartbeat longer than any test, for tests whose clients go unread for
/// seconds (while Redis is away, or while a thousand more connect):
/// [`SioClient`] answers pings only while it reads, and the fast test
/// heartbeat (2 s + 2 s) closes such a socket after about four seconds. It
/// did, under load: a notification after a Redis outage found no socket,
/// and a thousand sockets opened one by one counted fewer than a thousand.
pub const SLOW_HEARTBEAT: [(&str, &str); 2] = [
    ("CHANNELS_PING_INTERVAL", "60"),
    ("CHANNELS_PING_TIMEOUT", "60"),
];

/// The test configuration: HS256 upstream tokens, two API keys, a fast
/// heartbeat; `overrides` replace or add variables.
pub fn config(overrides: &[(&str, &str)]) -> Config {
    Config::from_vars(&test_vars(overrides), false).expect("valid test config")
}

/// The variables behind [`config`], for a node run as a separate process.
pub fn test_vars(overrides: &[(&str, &str)]) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = [
        ("CHANNELS_AUTH_HS256_SECRET", UPSTREAM_SECRET),
        ("CHANNELS_WS_TOKEN_SECRET", WS_SECRET),
        ("CHANNELS_API_KEYS", "test-api-key,test-api-key-2"),
        ("CHANNELS_LISTEN", "127.0.0.1:0"),
        ("CHANNELS_PING_INTERVAL", "2"),
        ("CHANNELS_PING_TIMEOUT", "2"),
        // Tests call from one address far faster than any client would;
        // tests/limits.rs sets the rates it checks.
        ("CHANNELS_CONNECT_RATE", "off"),
        ("CHANNELS_AUTHORIZE_RATE", "off"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.to_string());
    }
    vars
}

/// Starts the `channels` binary with `args` and only the variables `env`
/// (plus `PATH`), listening on an ephemeral loopback port; returns the
/// child and its address once it serves. Its log is drained in a thread, so
/// the node never writes to a closed pipe.
pub fn spawn_node(args: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String) {
    let (child, addr, _) = spawn_node_with(args, env, None);
    (child, addr)
}

/// [`spawn_node`], with the process's descriptor limit (soft and hard) set
/// to `nofile` when given; also returns the log entries written before the
/// node served.
pub fn spawn_node_with(
    args: &[&str],
    env: &[(&str, &str)],
    nofile: Option<u64>,
) -> (std::process::Child, String, Vec<Value>) {
    use std::io::{BufRead, BufReader};
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_channels"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command.envs(env.iter().copied());
    command
        .env("CHANNELS_LISTEN", "127.0.0.1:0")
        .env("CHANNELS_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped());
    if let Some(nofile) = nofile {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe, and the closure touches
        // nothing else of the parent's.
        unsafe {
            command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, nofile, nofile));
        }
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut before = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let Ok(entry) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if entry["fields"]["message"] == "channels node serving" {
            let addr = entry["fields"]["addr"].as_str().unwrap().to_string();
            std::thread::spawn(move || lines.for_each(drop));
            return (child, addr, before);
        }
        before.push(entry);
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the node did not start: {before:?}");
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

pub async fn start(overrides: &[(&str, &str)]) -> TestNode {
    start_with(config(overrides)).await
}

/// The HTTP client of a [`TestNode`]. It reuses a kept-alive connection
/// only while it has been idle under half a second: the node closes one
/// idle for `CHANNELS_HEADER_TIMEOUT` (1 s in some tests), and a request
/// sent on a connection the node is closing at that moment is reset.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_millis(500))
        .build()
        .expect("an HTTP client")
}

pub async fn start_with(config: Config) -> TestNode {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = channels::start(config, listener)
        .await
        .expect("node starts");
    let addr = node.local_addr();
    TestNode {
        node,
        addr,
        http: http_client(),
    }
}

impl TestNode {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `POST /notify` with a JSON body; returns status and JSON answer.
    pub async fn notify(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url("/notify"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Connects a socket for `user` in `channel` with a valid ws token.
    pub async fn socket(&self, user: &str, channel: &str) -> SioClient {
        let auth = json!({"token": ws_token(user), "keycloakID": user, "channel": channel});
        SioClient::connect(self.addr, auth)
            .await
            .expect("socket accepted")
    }

    /// The `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// A metric's value from `/metrics` (the first series whose line starts with `series`).
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// `POST {path}` to the node at `addr` with the test key in `X-API-Key`;
/// returns status and JSON answer.
pub async fn post_with_key(addr: &str, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .header("x-api-key", API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `GET http://{addr}{path}` with the test API key: the status and the JSON
/// answer (`null` when it is not JSON).
pub async fn get_with_key(addr: &str, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .header("x-api-key", API_KEY)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A node on `redis`, once it answers ready.
pub async fn redis_node(redis: &redis::RedisServer) -> TestNode {
    let node = start(&[("CHANNELS_REDIS_URL", &redis.url())]).await;
    assert!(eventually(Duration::from_secs(5), async || node_ready(&node).await).await);
    node
}

/// Whether `/readyz` answers 200.
pub async fn node_ready(node: &TestNode) -> bool {
    let r = node.http.get(node.url("/readyz")).send().await.unwrap();
    r.status() == 200
}

/// `POST /notify` of `msg` to `target` (an object with `keycloak` and/or
/// `channel`) with the test key; returns the status.
pub async fn send_to(node: &TestNode, target: Value, msg: Value) -> u16 {
    let mut body = target;
    body["API_KEY"] = API_KEY.into();
    body["msg"] = msg;
    node.notify(body).await.0
}

/// An HS256 upstream token with `claims` (signed with the test secret).
pub fn upstream_token(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(UPSTREAM_SECRET.as_bytes()),
        None,
        claims,
    )
}

/// Standard claims for `user`, valid for an hour.
pub fn claims(user: &str) -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    json!({"sub": user, "iat": now, "exp": now + 3600})
}

pub fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// A ws token for `user`, as `/authorize` would mint it.
pub fn ws_token(user: &str) -> String {
    let tokens = channels::auth::WsTokens::new(
        &channels::config::Secret::new(WS_SECRET),
        Duration::from_secs(300),
    );
    tokens.mint(&channels::notification::KeycloakId::parse(user).unwrap())
}

/// A minimal socket.io client over websocket: enough to connect with an
/// `auth` payload, answer pings, and read `notification` events.
pub struct SioClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl SioClient {
    /// Connects to the default namespace. `Err` carries the `connect_error` message.
    pub async fn connect(addr: SocketAddr, auth: Value) -> Result<SioClient, String> {
        Self::connect_raw(addr, &auth.to_string()).await
    }

    /// Connects with `auth` sent as is, valid JSON or not.
    pub async fn connect_raw(addr: SocketAddr, auth: &str) -> Result<SioClient, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        Self::connect_on(stream, auth).await
    }

    /// Connects from the local address `from` (any of 127.0.0.0/8).
    pub async fn connect_from(
        addr: SocketAddr,
        from: std::net::IpAddr,
        auth: Value,
    ) -> Result<SioClient, String> {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(from, 0))
            .map_err(|e| e.to_string())?;
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        Self::connect_on(stream, &auth.to_string()).await
    }

    /// Speaks socket.io over an open TCP connection to the node.
    async fn connect_on(stream: TcpStream, auth: &str) -> Result<SioClient, String> {
        let addr = stream.peer_addr().map_err(|e| e.to_string())?;
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let (mut ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .map_err(|e| e.to_string())?;
        let open = next_text(&mut ws).await.ok_or("no engine.io OPEN")?;
        assert!(open.starts_with('0'), "engine.io OPEN expected, got {open}");
        ws.send(Message::text(format!("40{auth}")))
            .await
            .map_err(|e| e.to_string())?;
        let mut client = SioClient { ws };
        loop {
            let packet = client
                .next_packet(Duration::from_secs(5))
                .await
                .ok_or("no CONNECT answer")?;
            if packet.starts_with("40") {
                return Ok(client);
            }
            if let Some(error) = packet.strip_prefix("44") {
                let error: Value = serde_json::from_str(error).map_err(|e| e.to_string())?;
                return Err(error["message"].as_str().unwrap_or_default().to_string());
            }
        }
    }

    /// The next `notification` event's payload, or `None` after `wait`.
    pub async fn notification(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let packet = self.next_packet(left).await?;
            if let Some(event) = packet.strip_prefix("42") {
                let mut event: Vec<Value> = serde_json::from_str(event).unwrap();
                assert_eq!(event[0], "notification", "unexpected event {event:?}");
                return Some(event.remove(1));
            }
        }
    }

    /// The next `notification` event's payload as the raw JSON text the
    /// server wrote, or `None` after `wait`.
    pub async fn raw_notification(&mut self, wait: Duration) -> Option<String> {
        let packet = self.next_packet(wait).await?;
        let raw = packet
            .strip_prefix(r#"42["notification","#)
            .and_then(|p| p.strip_suffix(']'))
            .unwrap_or_else(|| panic!("unexpected packet {packet}"));
        // The recovery offset, a trailing decimal string, is not the message.
        let raw = match raw.rsplit_once(",\"") {
            Some((msg, offset))
                if offset
                    .strip_suffix('"')
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) =>
            {
                msg
            }
            _ => raw,
        };
        Some(raw.to_string())
    }

    /// Whether the server closed this socket (DISCONNECT packet or closed
    /// connection) within `wait`, skipping any notifications meanwhile.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "41" => return true,
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => {
                    let _ = self.ws.send(Message::text("3")).await;
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Closes the websocket without a socket.io DISCONNECT.
    pub async fn drop_connection(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// Drops the TCP connection with a reset: no websocket close, no FIN.
    pub fn reset(self) {
        if let MaybeTlsStream::Plain(tcp) = self.ws.get_ref() {
            // Deprecated because a non-zero linger blocks the dropping
            // thread; a zero linger resets at once and never blocks.
            #[allow(deprecated)]
            let _ = tcp.set_linger(Some(Duration::ZERO));
        }
    }

    /// The next engine.io MESSAGE (`4` + a socket.io packet), answering
    /// engine.io pings on the way.
    async fn next_packet(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let text = tokio::time::timeout(left, next_text(&mut self.ws))
                .await
                .ok()??;
            match text.as_str() {
                "2" => self.ws.send(Message::text("3")).await.ok()?,
                t if t.starts_with('4') => return Some(t.to_string()),
                _ => {}
            }
        }
    }
}

async fn next_text(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Option<String> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Polls `check` until it holds, for at most `wait`.
pub async fn eventually(wait: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node run as its own process on `redis_url`, ready, that a test can
/// SIGSTOP and SIGCONT (a node that stops answering); killed when dropped.
pub struct StoppableNode {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl StoppableNode {
    pub async fn start(redis_url: &str) -> Self {
        let vars = test_vars(&[("CHANNELS_REDIS_URL", redis_url)]);
        let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (child, addr) = spawn_node(&["serve"], &env);
        let node = StoppableNode {
            child,
            addr: addr.parse().unwrap(),
        };
        let ready = eventually(Duration::from_secs(5), async || {
            reqwest::get(format!("http://{}/readyz", node.addr))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(ready, "the node did not become ready");
        node
    }

    /// Sends `signal` (`"-STOP"`, `"-CONT"`) to the node.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for StoppableNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
