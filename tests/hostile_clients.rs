//! Clients that misbehave at scale, against the real binary so its memory
//! can be read: floods of connections dropped without a close handshake,
//! polling sessions abandoned mid-handshake, and clients that stop reading
//! while notifications flow.

mod common;

use std::{
    net::SocketAddr,
    process::Child,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// A node running as its own process, killed when dropped.
struct ChildNode {
    child: Child,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl ChildNode {
    fn spawn(overrides: &[(&str, &str)]) -> ChildNode {
        let vars = test_vars(overrides);
        let env: Vec<(&str, &str)> = vars
            .iter()
            .filter(|(k, _)| k.as_str() != "CHANNELS_LISTEN")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (child, addr) = spawn_node(&["serve"], &env);
        ChildNode {
            child,
            addr: addr.parse().unwrap(),
            // No idle keep-alive connections: they would count as open.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// A metric's value (the first series named exactly `series`).
    async fn metric(&self, series: &str) -> f64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no series {series}"))
    }

    /// Waits until no socket is registered and only `connections` TCP
    /// connections are open (the metrics call itself is one).
    async fn settles(&self, connections: f64, wait: Duration) -> bool {
        let settled = eventually(wait, async || {
            self.metric("channels_sockets").await == 0.0
                && self.metric("channels_connections").await <= connections
        })
        .await;
        if !settled {
            eprintln!(
                "not settled: {} sockets, {} connections",
                self.metric("channels_sockets").await,
                self.metric("channels_connections").await
            );
        }
        settled
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects `n` socket.io clients (users `u0..`, channels `c0..c9`), at most
/// 100 handshakes at a time.
async fn connect_many(addr: SocketAddr, n: usize) -> Vec<SioClient> {
    let gate = Arc::new(Semaphore::new(100));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await.unwrap();
                let user = format!("u{i}");
                let auth = json!({"token": ws_token(&user), "keycloakID": user, "channel": format!("c{}", i % 10)});
                SioClient::connect(addr, auth).await.expect("accepted")
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(n);
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    clients
}

/// Drops every client without a websocket close: half with a TCP reset,
/// half with a plain FIN.
fn vanish(clients: Vec<SioClient>) {
    for (i, client) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            client.reset();
        } else {
            drop(client);
        }
    }
}

/// Opens `handshakes` polling sessions that never send CONNECT, and
/// `connects` that send CONNECT over polling and never poll again.
async fn abandon_polling(node: &ChildNode, handshakes: usize, connects: usize) {
    let open = node.url("/socket.io/?EIO=4&transport=polling");
    let open = &open;
    stream::iter(0..handshakes + connects)
        .for_each_concurrent(50, |i| async move {
            let text = node
                .http
                .get(open)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let handshake: Value = serde_json::from_str(text.trim_start_matches('0')).unwrap();
            if i < handshakes {
                return;
            }
            let user = format!("p{i}");
            let auth = json!({"token": ws_token(&user), "keycloakID": user, "channel": "polling"});
            let sid = handshake["sid"].as_str().unwrap();
            let r = node
                .http
                .post(format!("{open}&sid={sid}"))
                .body(format!("40{auth}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_dropped_and_abandoned_connections_leave_no_trace() {
    // A heartbeat long enough for 10,000 silent clients to connect (they do
    // not answer pings), short enough for abandoned sessions to expire soon.
    let node = ChildNode::spawn(&[
        ("CHANNELS_PING_INTERVAL", "10"),
        ("CHANNELS_PING_TIMEOUT", "10"),
    ]);
    let settle = Duration::from_secs(40);
    // Warm up: the allocator's pools and the runtime's threads exist from here on.
    vanish(connect_many(node.addr, 1000).await);
    abandon_polling(&node, 200, 100).await;
    assert!(node.settles(1.0, settle).await, "warm-up settles");
    let baseline = node.rss_kib();

    let started = Instant::now();
    let clients = connect_many(node.addr, 10_000).await;
    let connect_secs = started.elapsed().as_secs_f64();
    assert_eq!(node.metric("channels_sockets").await, 10_000.0);
    let peak_websocket = node.rss_kib();
    vanish(clients);
    abandon_polling(&node, 2000, 1000).await;
    let peak_polling = node.rss_kib();
    // Websockets go at once; polling sessions at the CONNECT timeout (10 s)
    // or the heartbeat (10 s + 10 s).
    assert!(
        node.settles(1.0, settle).await,
        "every socket and connection is gone"
    );
    let grown = peak_websocket.max(peak_polling).saturating_sub(baseline);
    assert!(grown > 10_000, "the flood did take memory ({grown} KiB)");
    // The allocator hands freed pages back within seconds.
    let back = eventually(Duration::from_secs(20), async || {
        node.rss_kib() <= baseline + grown / 4
    })
    .await;
    let after = node.rss_kib();
    eprintln!(
        "floods: 10k websocket connects in {connect_secs:.1} s; RSS baseline {baseline} KiB, \
         peak {peak_websocket} KiB (websockets) and {peak_polling} KiB (polling), after {after} KiB"
    );
    assert!(
        back,
        "memory returns near its baseline: baseline {baseline}, after {after} KiB"
    );
    // Every index is empty: a notify to every channel reaches nobody.
    for c in 0..10 {
        let r = node
            .http
            .post(node.url("/notify"))
            .header("x-api-key", API_KEY)
            .json(&json!({"channel": format!("c{c}"), "msg": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(node.metric("channels_deliveries_total").await, 0.0);
}
