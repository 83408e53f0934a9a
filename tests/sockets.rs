//! Socket.IO connections: who is accepted, who is reached, and that nothing
//! is left behind (docs/protocol.md, "Socket.IO" and "Delivery behaviour").

mod common;

use std::time::Duration;

use channels::registry::RegistryStats;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);
const EMPTY: RegistryStats = RegistryStats {
    channels: 0,
    users: 0,
    sockets: 0,
};

async fn send(node: &TestNode, target: Value, msg: Value) {
    let mut body = target;
    body["API_KEY"] = API_KEY.into();
    body["msg"] = msg;
    let (status, answer) = node.notify(body).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn refused_connections_get_unauthorized_or_bad_request_and_leave_nothing() {
    let node = start(&[]).await;
    let now = jsonwebtoken::get_current_timestamp();
    let expired = sign(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(WS_SECRET.as_bytes()),
        None,
        json!({"sub": "alice", "aud": "channels-ws", "iss": "channels", "exp": now - 60}),
    );
    let cases = [
        (
            json!({"token": "garbage", "keycloakID": "alice", "channel": "admin"}),
            "unauthorized",
        ),
        (
            json!({"keycloakID": "alice", "channel": "admin"}),
            "unauthorized",
        ),
        (
            json!({"token": 12, "keycloakID": "alice", "channel": "admin"}),
            "unauthorized",
        ),
        (
            json!({"token": ws_token("bob"), "keycloakID": "alice", "channel": "admin"}),
            "unauthorized",
        ),
        (
            json!({"token": expired, "keycloakID": "alice", "channel": "admin"}),
            "unauthorized",
        ),
        (
            json!({"token": upstream_token(claims("alice")), "keycloakID": "alice", "channel": "admin"}),
            "unauthorized",
        ),
        (
            json!({"token": ws_token("alice"), "channel": "admin"}),
            "bad_request",
        ),
        (
            json!({"token": ws_token("alice"), "keycloakID": "alice"}),
            "bad_request",
        ),
        (
            json!({"token": ws_token("alice"), "keycloakID": "alice", "channel": ""}),
            "bad_request",
        ),
        (
            json!({"token": ws_token("alice"), "keycloakID": "alice", "channel": "a/b"}),
            "bad_request",
        ),
        (
            json!({"token": ws_token("alice"), "keycloakID": "alice", "channel": "a".repeat(65)}),
            "bad_request",
        ),
        (
            json!({"token": ws_token("alice"), "keycloakID": 5, "channel": "admin"}),
            "bad_request",
        ),
        (
            json!({"token": ws_token("alice"), "keycloakID": "a".repeat(257), "channel": "admin"}),
            "bad_request",
        ),
        (json!("just a string"), "bad_request"),
        (json!([1, 2]), "bad_request"),
    ];
    for (auth, expected) in &cases {
        let result = SioClient::connect(node.addr, auth.clone()).await;
        assert_eq!(result.err().as_deref(), Some(*expected), "auth {auth}");
    }
    assert_eq!(node.node.registry_stats(), EMPTY);
    assert_eq!(
        node.metric(r#"channels_connects_total{outcome="unauthorized"}"#)
            .await,
        6.0
    );
    assert_eq!(
        node.metric(r#"channels_connects_total{outcome="bad_request"}"#)
            .await,
        9.0
    );
    assert_eq!(
        node.metric(r#"channels_connects_total{outcome="accepted"}"#)
            .await,
        0.0
    );
    assert_eq!(node.metric("channels_sockets").await, 0.0);
}

#[tokio::test]
async fn each_variant_reaches_exactly_the_sockets_it_targets() {
    let node = start(&[]).await;
    let mut alice_admin = node.socket("alice", "admin").await;
    let mut alice_b2b = node.socket("alice", "b2b").await;
    let mut bob_admin = node.socket("bob", "admin").await;

    send(&node, json!({"channel": "admin"}), json!("to admin")).await;
    assert_eq!(
        alice_admin.notification(WAIT).await,
        Some(json!("to admin"))
    );
    assert_eq!(bob_admin.notification(WAIT).await, Some(json!("to admin")));
    assert_eq!(alice_b2b.notification(QUIET).await, None);

    send(&node, json!({"keycloak": "alice"}), json!("to alice")).await;
    assert_eq!(
        alice_admin.notification(WAIT).await,
        Some(json!("to alice"))
    );
    assert_eq!(alice_b2b.notification(WAIT).await, Some(json!("to alice")));
    assert_eq!(bob_admin.notification(QUIET).await, None);

    send(
        &node,
        json!({"keycloak": "alice", "channel": "b2b"}),
        json!("to alice in b2b"),
    )
    .await;
    assert_eq!(
        alice_b2b.notification(WAIT).await,
        Some(json!("to alice in b2b"))
    );
    assert_eq!(alice_admin.notification(QUIET).await, None);
    assert_eq!(bob_admin.notification(QUIET).await, None);

    assert_eq!(node.metric("channels_deliveries_total").await, 5.0);
}

#[tokio::test]
async fn a_socket_is_reachable_as_soon_as_its_client_sees_connect() {
    let node = start(&[]).await;
    for i in 0..50 {
        let user = format!("user{i}");
        let mut socket = node.socket(&user, "admin").await;
        send(&node, json!({"keycloak": user}), json!(i)).await;
        assert_eq!(
            socket.notification(WAIT).await,
            Some(json!(i)),
            "socket {i}"
        );
    }
}

#[tokio::test]
async fn notifications_to_one_socket_arrive_in_the_order_they_were_answered() {
    let node = start(&[]).await;
    let mut socket = node.socket("alice", "admin").await;
    for i in 0..500 {
        let target = if i % 2 == 0 {
            json!({"keycloak": "alice"})
        } else {
            json!({"channel": "admin"})
        };
        send(&node, target, json!(i)).await;
    }
    for i in 0..500 {
        assert_eq!(socket.notification(WAIT).await, Some(json!(i)));
    }
}

#[tokio::test]
async fn a_thousand_sockets_dropped_leave_every_index_and_gauge_at_zero() {
    // The first sockets go unread while the rest connect.
    let node = start(&SLOW_HEARTBEAT).await;
    let mut sockets = Vec::new();
    for i in 0..1000 {
        sockets.push(
            node.socket(&format!("u{}", i % 250), &format!("c{}", i % 10))
                .await,
        );
    }
    assert_eq!(
        node.node.registry_stats(),
        RegistryStats {
            channels: 10,
            users: 250,
            sockets: 1000
        }
    );
    assert_eq!(node.metric("channels_sockets").await, 1000.0);
    assert_eq!(
        node.metric(r#"channels_sockets_by_channel{channel="c3"}"#)
            .await,
        100.0
    );
    // Half close their websocket properly, half just vanish.
    for (i, socket) in sockets.into_iter().enumerate() {
        if i % 2 == 0 {
            socket.drop_connection().await;
        } else {
            drop(socket);
        }
    }
    let cleared = eventually(Duration::from_secs(10), async || {
        node.node.registry_stats() == EMPTY
    })
    .await;
    assert!(cleared, "left behind: {:?}", node.node.registry_stats());
    assert_eq!(node.metric("channels_sockets").await, 0.0);
    let text = node.metrics_text().await;
    assert!(
        !text.contains("channels_sockets_by_channel{"),
        "channel series left: {text}"
    );
}

#[tokio::test]
async fn a_stuck_client_is_disconnected_and_counted_while_others_get_everything() {
    let node = start(&[
        ("CHANNELS_SOCKET_QUEUE", "8"),
        ("CHANNELS_MAX_BODY_BYTES", "1048576"),
    ])
    .await;
    let stuck = node.socket("stuck", "admin").await; // never read from again
    let mut healthy = node.socket("healthy", "admin").await;
    let payload = "x".repeat(200_000);
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while let Some(msg) = healthy.notification(WAIT).await {
            assert_eq!(msg["n"], got);
            got += 1;
            if got == 100 {
                break;
            }
        }
        got
    });
    for n in 0..100 {
        send(
            &node,
            json!({"channel": "admin"}),
            json!({"n": n, "pad": payload}),
        )
        .await;
    }
    assert_eq!(
        reader.await.unwrap(),
        100,
        "the healthy client got everything, in order"
    );
    assert_eq!(
        node.metric("channels_slow_client_disconnects_total").await,
        1.0
    );
    // The stuck socket leaves the registry (DISCONNECT or heartbeat close).
    let gone = eventually(Duration::from_secs(15), async || {
        node.node.registry_stats().sockets == 1
    })
    .await;
    assert!(gone, "{:?}", node.node.registry_stats());
    drop(stuck);
}

/// A client that stops reading while 100 KB notifications flow is evicted
/// at the byte bound, 1 MiB here, before its queue holds the 256 packets of
/// the packet bound: 200 notifications could not fill that.
#[tokio::test]
async fn a_stuck_client_is_evicted_at_the_byte_bound_before_the_packet_bound() {
    let node = start(&[
        ("CHANNELS_SOCKET_QUEUE", "256"),
        ("CHANNELS_SOCKET_QUEUE_BYTES", "1048576"),
    ])
    .await;
    let stuck = node.socket("stuck", "admin").await; // never read from again
    let payload = "x".repeat(100_000);
    let mut evicted_after = None;
    for n in 0..200 {
        send(
            &node,
            json!({"channel": "admin"}),
            json!({"n": n, "pad": payload}),
        )
        .await;
        if node.metric("channels_slow_client_disconnects_total").await == 1.0 {
            evicted_after = Some(n + 1);
            break;
        }
    }
    // What the kernel's buffers took, then 1 MiB in the queue.
    let evicted_after = evicted_after.expect("evicted at the byte bound");
    eprintln!("evicted after {evicted_after} notifications of 100 KB");
    assert!(evicted_after > 10, "{evicted_after}");
    let gone = eventually(Duration::from_secs(15), async || {
        node.node.registry_stats().sockets == 0
    })
    .await;
    assert!(gone, "{:?}", node.node.registry_stats());
    drop(stuck);
}

#[tokio::test]
async fn shutdown_closes_every_socket_and_finishes_in_time() {
    let node = start(&[("CHANNELS_SHUTDOWN_TIMEOUT", "5")]).await;
    let mut a = node.socket("alice", "admin").await;
    let mut b = node.socket("bob", "admin").await;
    let started = std::time::Instant::now();
    let TestNode { node, .. } = node;
    let finished = tokio::spawn(node.shutdown());
    assert!(a.closed_within(WAIT).await);
    assert!(b.closed_within(WAIT).await);
    assert!(
        finished.await.unwrap(),
        "shutdown finished within its bound"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Shutdown owns every task the node started: once it returns, none is
/// left running, on a cluster node that served sockets, notifications and
/// another node's question. The node runs on a runtime of its own, so that
/// runtime's count of live tasks is the node's alone.
#[tokio::test]
async fn no_task_outlives_a_shutdown() {
    let redis = redis::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let config = config(&[
        ("CHANNELS_REDIS_URL", &redis.url()),
        ("CHANNELS_SHUTDOWN_TIMEOUT", "5"),
    ]);
    let node = runtime
        .spawn(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            channels::start(config, listener)
                .await
                .expect("node starts")
        })
        .await
        .unwrap();
    let other = redis_node(&redis).await;
    let addr = node.local_addr();
    let served = TestNode {
        node,
        addr,
        http: reqwest::Client::new(),
    };
    assert!(eventually(WAIT, async || node_ready(&served).await).await);
    let mut alice = served.socket("alice", "admin").await;
    // A notification, and a presence question that both nodes answer.
    assert_eq!(
        send_to(&other, json!({"keycloak": "alice"}), json!("hi")).await,
        200
    );
    assert!(alice.notification(WAIT).await.is_some());
    let (status, presence) =
        get_with_key(&other.addr.to_string(), "/presence?keycloak=alice").await;
    assert_eq!(
        (status, &presence["complete"]),
        (200, &json!(true)),
        "{presence}"
    );

    let tasks = served.node.tasks().clone();
    assert!(!tasks.is_empty(), "the node's tasks are tracked");
    let metrics = served.node.metrics().clone();
    let finished = runtime.spawn(served.node.shutdown());
    assert!(alice.closed_within(WAIT).await);
    assert!(finished.await.unwrap(), "shutdown finished in time");
    assert!(tasks.is_closed() && tasks.is_empty(), "{tasks:?}");
    // Every socket's disconnect handler ran (it records the session's end,
    // so the client can recover on another node).
    assert!(
        metrics.render().contains("\nchannels_sockets 0\n"),
        "{}",
        metrics.render()
    );
    let runtime_metrics = runtime.metrics();
    let none_left = eventually(WAIT, async || runtime_metrics.num_alive_tasks() == 0).await;
    assert!(
        none_left,
        "{} tasks still alive on the node's runtime",
        runtime_metrics.num_alive_tasks()
    );
    runtime.shutdown_background();
}

/// A client's message is read in chunks of 64 bytes (the gateway keeps
/// its websocket read buffer small); one of many chunks still arrives
/// whole: a CONNECT of about 3 KB, its token and identity at the end.
#[tokio::test]
async fn a_client_message_longer_than_the_read_buffer_arrives_whole() {
    let node = start(&[]).await;
    let auth = json!({
        "padding": "p".repeat(3000),
        "token": ws_token("alice"),
        "keycloakID": "alice",
        "channel": "admin",
    });
    let mut alice = SioClient::connect(node.addr, auth)
        .await
        .expect("socket accepted");
    send(&node, json!({"keycloak": "alice"}), json!("hi")).await;
    assert_eq!(alice.notification(WAIT).await, Some(json!("hi")));
}

#[tokio::test]
async fn a_client_message_over_the_limit_closes_its_connection() {
    use futures_util::SinkExt;
    let node = start(&[("CHANNELS_WS_MAX_MESSAGE_BYTES", "4096")]).await;
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", node.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let huge = format!("42[\"x\",\"{}\"]", "y".repeat(100_000));
    let _ = ws
        .send(tokio_tungstenite::tungstenite::Message::text(huge))
        .await;
    let closed = tokio::time::timeout(WAIT, async {
        use futures_util::StreamExt;
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return true,
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true));
}
