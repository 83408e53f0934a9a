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

use channels::notification::now_us;
use common::*;
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

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

    /// The body of `GET url`.
    async fn get_text(&self, url: &str) -> String {
        let response = self.http.get(url).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// A metric's value (the first series named exactly `series`).
    async fn metric(&self, series: &str) -> f64 {
        let text = self.get_text(&self.url("/metrics")).await;
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

/// Connected clients, each held by a task that answers its pings (however
/// long the flood takes to build) until [`vanish`].
struct Held {
    vanish: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Connects and holds `n` socket.io clients (users `u0..`, channels
/// `c0..c9`), at most 100 handshakes at a time; returns once all are in.
async fn connect_many(addr: SocketAddr, n: usize) -> Held {
    let gate = Arc::new(Semaphore::new(100));
    let (vanish, signal) = watch::channel(false);
    let (connected_tx, mut connected) = tokio::sync::mpsc::channel::<()>(n);
    let tasks = (0..n)
        .map(|i| {
            let (gate, connected_tx) = (gate.clone(), connected_tx.clone());
            let mut signal = signal.clone();
            tokio::spawn(async move {
                let permit = gate.acquire().await.unwrap();
                let user = format!("u{i}");
                let auth = json!({"token": ws_token(&user), "keycloakID": user, "channel": format!("c{}", i % 10)});
                let mut client = SioClient::connect(addr, auth).await.expect("accepted");
                drop(permit);
                connected_tx.send(()).await.unwrap();
                tokio::select! {
                    _ = client.closed_within(Duration::from_secs(300)) => {}
                    _ = signal.changed() => {}
                }
                // Gone without a websocket close: a reset, or a plain FIN.
                if i % 2 == 0 {
                    client.reset();
                }
            })
        })
        .collect();
    for _ in 0..n {
        connected.recv().await.unwrap();
    }
    Held { vanish, tasks }
}

/// Drops every held client without a close handshake: half with a TCP
/// reset, half with a plain FIN.
async fn vanish(held: Held) {
    let _ = held.vanish.send(true);
    for task in held.tasks {
        task.await.unwrap();
    }
}

/// One scenario at a time: each reads the node's memory and latency, which
/// the other's load would disturb.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Opens `handshakes` polling sessions that never send CONNECT, and
/// `connects` that send CONNECT over polling and never poll again.
async fn abandon_polling(node: &ChildNode, handshakes: usize, connects: usize) {
    let open = node.url("/socket.io/?EIO=4&transport=polling");
    let open = &open;
    stream::iter(0..handshakes + connects)
        .for_each_concurrent(50, |i| async move {
            let text = node.get_text(open).await;
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
    let _alone = ONE_AT_A_TIME.lock().await;
    // A heartbeat short enough for abandoned polling sessions to expire soon.
    let node = ChildNode::spawn(&[
        ("CHANNELS_PING_INTERVAL", "10"),
        ("CHANNELS_PING_TIMEOUT", "10"),
    ]);
    let settle = Duration::from_secs(40);
    // Warm up: the allocator's pools and the runtime's threads exist from here on.
    vanish(connect_many(node.addr, 1000).await).await;
    abandon_polling(&node, 200, 100).await;
    assert!(node.settles(1.0, settle).await, "warm-up settles");
    let baseline = node.rss_kib();

    let started = Instant::now();
    let clients = connect_many(node.addr, 10_000).await;
    let connect_secs = started.elapsed().as_secs_f64();
    assert_eq!(node.metric("channels_sockets").await, 10_000.0);
    let peak_websocket = node.rss_kib();
    vanish(clients).await;
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

/// The `q` quantile of `values`, which it sorts.
fn quantile(values: &mut [u64], q: f64) -> u64 {
    values.sort_unstable();
    values[((values.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_evicted_without_slowing_the_others() {
    const QUEUE: usize = 64;
    const PAD: usize = 16 * 1024;
    const QUIET: u64 = 300; // notifies with healthy clients only
    const STUCK_PHASE: u64 = 1200; // then with the stuck clients connected
    const HEALTHY: usize = 20;
    const STUCK: usize = 20;
    let _alone = ONE_AT_A_TIME.lock().await;
    // A long heartbeat: a stuck client must be evicted for its queue, not
    // closed for missing pings first.
    let node = ChildNode::spawn(&[
        ("CHANNELS_SOCKET_QUEUE", &QUEUE.to_string()),
        ("CHANNELS_PING_INTERVAL", "60"),
        ("CHANNELS_PING_TIMEOUT", "60"),
    ]);

    // Healthy clients read everything, each recording every notification's
    // latency from the moment its /notify call was made.
    let mut readers = Vec::new();
    for i in 0..HEALTHY {
        let mut client = SioClient::connect(
            node.addr,
            json!({"token": ws_token(&format!("h{i}")), "keycloakID": format!("h{i}"), "channel": "room"}),
        )
        .await
        .unwrap();
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for expected in 0..QUIET + STUCK_PHASE {
                let Some(msg) = client.notification(Duration::from_secs(10)).await else {
                    break;
                };
                assert_eq!(msg["n"], expected, "in order, nothing missing");
                latencies.push(now_us().saturating_sub(msg["t"].as_u64().unwrap()));
            }
            latencies
        }));
    }
    let pad = "x".repeat(PAD);
    let post = async |n: u64| {
        let r = node
            .http
            .post(node.url("/notify"))
            .header("x-api-key", API_KEY)
            .json(&json!({"channel": "room", "msg": {"n": n, "t": now_us(), "pad": pad}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    let mut pace = tokio::time::interval(Duration::from_millis(4));
    for n in 0..QUIET {
        pace.tick().await;
        post(n).await;
    }

    // Clients that connect, then never read again: their TCP receive window
    // fills, then the node's send buffer, then their socket.io queue.
    let mut stuck = Vec::new();
    for i in 0..STUCK {
        let user = format!("s{i}");
        stuck.push(
            SioClient::connect(
                node.addr,
                json!({"token": ws_token(&user), "keycloakID": user, "channel": "room"}),
            )
            .await
            .unwrap(),
        );
    }
    let before = node.rss_kib();
    let mut peak = before;
    for n in QUIET..QUIET + STUCK_PHASE {
        pace.tick().await;
        post(n).await;
        if n % 20 == 0 {
            peak = peak.max(node.rss_kib());
        }
    }

    let mut quiet = Vec::new();
    let mut loaded = Vec::new();
    for reader in readers {
        let latencies = reader.await.unwrap();
        assert_eq!(
            latencies.len() as u64,
            QUIET + STUCK_PHASE,
            "a healthy client missed notifications"
        );
        quiet.extend_from_slice(&latencies[..QUIET as usize]);
        loaded.extend_from_slice(&latencies[QUIET as usize..]);
    }
    let evicted = eventually(Duration::from_secs(20), async || {
        node.metric("channels_slow_client_disconnects_total").await == STUCK as f64
            && node.metric("channels_sockets").await == HEALTHY as f64
    })
    .await;
    let p99_quiet = quantile(&mut quiet, 0.99);
    let p99_loaded = quantile(&mut loaded, 0.99);
    let (p50_quiet, p50_loaded) = (quantile(&mut quiet, 0.5), quantile(&mut loaded, 0.5));
    eprintln!(
        "slow consumers: healthy p50/p99 {p50_quiet}/{p99_quiet} µs alone, \
         {p50_loaded}/{p99_loaded} µs beside {STUCK} stuck clients; \
         RSS {before} KiB before, peak {peak} KiB"
    );
    assert!(
        evicted,
        "every stuck client is disconnected and counted once"
    );
    // Bounded memory: each stuck socket holds at most its queue of packets.
    let bound_kib = (STUCK * QUEUE * PAD / 1024) as u64 * 2;
    assert!(
        peak <= before + bound_kib,
        "memory stays bounded: {before} -> {peak} KiB (bound +{bound_kib})"
    );
    // The healthy clients' tail latency stays within 2x of the run without
    // stuck clients (plus 2 ms, below which a shared machine's jitter rules).
    assert!(
        p99_loaded <= 2 * p99_quiet + 2000,
        "p99 {p99_loaded} µs beside stuck clients vs {p99_quiet} µs alone"
    );
    drop(stuck);
}
