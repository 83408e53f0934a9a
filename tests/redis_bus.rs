//! Nodes that share a Redis behave as one gateway (docs/protocol.md and docs/operations.md, the cluster):
//! delivery across nodes, targeted subscriptions, no subscribe window,
//! order, and Redis outages. Each test runs its own redis-server.

mod common;

use std::time::Duration;

use common::{redis::RedisServer, *};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

async fn cluster_node(redis: &RedisServer) -> TestNode {
    let node = redis_node(redis).await;
    assert!(
        eventually(WAIT, async || node_ready(&node).await).await,
        "node did not become ready"
    );
    node
}

/// A node on `redis`, whose sockets outlive the outages these tests make.
async fn redis_node(redis: &RedisServer) -> TestNode {
    let [interval, timeout] = SLOW_HEARTBEAT;
    start(&[("CHANNELS_REDIS_URL", &redis.url()), interval, timeout]).await
}

#[tokio::test]
async fn each_variant_reaches_its_sockets_on_every_node() {
    let redis = RedisServer::start();
    let a = cluster_node(&redis).await;
    let b = cluster_node(&redis).await;
    let mut alice_admin = a.socket("alice", "admin").await;
    let mut alice_b2b = b.socket("alice", "b2b").await;
    let mut bob_admin = b.socket("bob", "admin").await;

    assert_eq!(
        send_to(&a, json!({"channel": "admin"}), json!(1)).await,
        200
    );
    assert_eq!(alice_admin.notification(WAIT).await, Some(json!(1)));
    assert_eq!(bob_admin.notification(WAIT).await, Some(json!(1)));
    assert_eq!(alice_b2b.notification(QUIET).await, None);

    assert_eq!(
        send_to(&b, json!({"keycloak": "alice"}), json!(2)).await,
        200
    );
    assert_eq!(alice_admin.notification(WAIT).await, Some(json!(2)));
    assert_eq!(alice_b2b.notification(WAIT).await, Some(json!(2)));
    assert_eq!(bob_admin.notification(QUIET).await, None);

    assert_eq!(
        send_to(&a, json!({"keycloak": "alice", "channel": "b2b"}), json!(3)).await,
        200
    );
    assert_eq!(alice_b2b.notification(WAIT).await, Some(json!(3)));
    assert_eq!(alice_admin.notification(QUIET).await, None);
    assert_eq!(bob_admin.notification(QUIET).await, None);
}

#[tokio::test]
async fn a_node_subscribes_only_to_what_its_sockets_need() {
    let redis = RedisServer::start();
    let a = cluster_node(&redis).await;
    let b = cluster_node(&redis).await;
    let mut socket = a.socket("alice", "admin").await;
    assert_eq!(redis.numsub("channels:c:admin"), 1);
    assert_eq!(redis.numsub("channels:u:alice"), 1);
    // Besides the targets, every node holds three topics for its life: the
    // recovery take-over, requests between nodes, and its own replies.
    assert_eq!(redis.numsub("channels:takeover"), 2);
    assert_eq!(redis.numsub("channels:requests"), 2);
    assert_eq!(a.metric("channels_bus_subscriptions").await, 5.0);
    assert_eq!(b.metric("channels_bus_subscriptions").await, 3.0);

    for n in 0..10 {
        assert_eq!(
            send_to(&b, json!({"channel": "admin"}), json!(n)).await,
            200
        );
        assert_eq!(socket.notification(WAIT).await, Some(json!(n)));
    }
    assert_eq!(a.metric("channels_bus_received_total").await, 10.0);
    assert_eq!(
        b.metric("channels_bus_received_total").await,
        0.0,
        "b has no socket there"
    );

    // The last socket leaves: the topics go, after the debounce delay.
    socket.drop_connection().await;
    let gone = eventually(Duration::from_secs(10), async || {
        redis.numsub("channels:c:admin") == 0 && redis.numsub("channels:u:alice") == 0
    })
    .await;
    assert!(gone, "still subscribed after the last socket left");
    assert_eq!(a.metric("channels_bus_subscriptions").await, 3.0);
    // Redis's confirmations of those unsubscribes are not taken for a
    // subscription it ended on its own (which reconnects the bus).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.metric("channels_bus_reconnects_total").await, 0.0);
    assert!(node_ready(&a).await);
}

#[tokio::test]
async fn a_quick_reconnect_keeps_the_subscription() {
    let redis = RedisServer::start();
    let a = cluster_node(&redis).await;
    let first = a.socket("alice", "admin").await;
    first.drop_connection().await;
    let mut second = a.socket("alice", "admin").await;
    // Past the unsubscribe delay (reading meanwhile, to answer pings).
    assert_eq!(
        second
            .notification(channels::bus::UNSUBSCRIBE_DELAY * 2)
            .await,
        None
    );
    assert_eq!(redis.numsub("channels:u:alice"), 1);
    assert_eq!(
        send_to(&a, json!({"keycloak": "alice"}), json!("still here")).await,
        200
    );
    assert_eq!(second.notification(WAIT).await, Some(json!("still here")));
}

#[tokio::test]
async fn a_socket_is_reachable_from_every_node_as_soon_as_it_sees_connect() {
    let redis = RedisServer::start();
    let a = cluster_node(&redis).await;
    let b = cluster_node(&redis).await;
    for i in 0..50 {
        let user = format!("fresh{i}");
        let mut socket = a.socket(&user, &format!("ch{i}")).await;
        assert_eq!(send_to(&b, json!({"keycloak": user}), json!(i)).await, 200);
        assert_eq!(
            socket.notification(WAIT).await,
            Some(json!(i)),
            "socket {i}"
        );
    }
}

#[tokio::test]
async fn notifications_alternating_between_nodes_arrive_in_order() {
    let redis = RedisServer::start();
    let a = cluster_node(&redis).await;
    let b = cluster_node(&redis).await;
    let mut on_a = a.socket("alice", "admin").await;
    let mut on_b = b.socket("alice", "b2b").await;
    for i in 0..500 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            send_to(node, json!({"keycloak": "alice"}), json!(i)).await,
            200
        );
    }
    for i in 0..500 {
        assert_eq!(on_a.notification(WAIT).await, Some(json!(i)));
        assert_eq!(on_b.notification(WAIT).await, Some(json!(i)));
    }
}

/// Many `/notify` calls at once go to Redis together (the bus's
/// `Publisher`): every one is answered, and each user's arrive in the order
/// its poster sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_notifies_are_all_answered_and_each_poster_keeps_its_order() {
    const POSTERS: usize = 20;
    const EACH: usize = 25;
    let redis = RedisServer::start();
    let a = cluster_node(&redis).await;
    let b = cluster_node(&redis).await;
    let mut sockets = Vec::new();
    for p in 0..POSTERS {
        sockets.push(b.socket(&format!("user{p}"), "admin").await);
    }
    let posters = (0..POSTERS).map(|p| {
        let a = &a;
        async move {
            let mut answers = Vec::new();
            for i in 0..EACH {
                let target = json!({"keycloak": format!("user{p}")});
                answers.push(send_to(a, target, json!(i)).await);
            }
            answers
        }
    });
    for answers in futures_util::future::join_all(posters).await {
        assert_eq!(answers, vec![200; EACH]);
    }
    for socket in &mut sockets {
        for i in 0..EACH {
            assert_eq!(socket.notification(WAIT).await, Some(json!(i)));
        }
    }
    tokio::time::sleep(QUIET).await;
    for socket in &mut sockets {
        assert_eq!(socket.notification(Duration::from_millis(10)).await, None);
    }
}

#[tokio::test]
async fn a_redis_outage_answers_503_keeps_sockets_and_heals_by_itself() {
    let mut redis = RedisServer::start();
    let a = cluster_node(&redis).await;
    let b = cluster_node(&redis).await;
    let mut before = a.socket("before", "admin").await;

    redis.kill();
    // Both nodes notice (the subscription connection drops at once).
    let noticed = eventually(WAIT, async || {
        !node_ready(&a).await && !node_ready(&b).await
    })
    .await;
    assert!(noticed, "readyz still 200 with Redis down");
    let status = send_to(&b, json!({"channel": "admin"}), json!("lost?")).await;
    assert_eq!(status, 503);
    let body = a
        .notify(json!({"API_KEY": API_KEY, "msg": 1, "channel": "admin"}))
        .await
        .1;
    assert_eq!(body["error"], "unavailable");
    assert_eq!(a.metric("channels_bus_up").await, 0.0);
    // Sockets stay connected, and new ones are still accepted.
    let mut during = b.socket("during", "admin").await;
    assert_eq!(a.metric("channels_sockets").await, 1.0);

    redis.restart();
    let healed = eventually(Duration::from_secs(15), async || {
        node_ready(&a).await && node_ready(&b).await
    })
    .await;
    assert!(healed, "nodes did not come back on their own");
    let mut after = a.socket("after", "admin").await;
    assert_eq!(
        send_to(&b, json!({"channel": "admin"}), json!("back")).await,
        200
    );
    for (name, socket) in [
        ("before", &mut before),
        ("during", &mut during),
        ("after", &mut after),
    ] {
        assert_eq!(
            socket.notification(WAIT).await,
            Some(json!("back")),
            "{name}"
        );
    }
    // Nothing refused during the outage arrives late.
    assert_eq!(before.notification(QUIET).await, None);
    assert!(a.metric("channels_bus_reconnects_total").await >= 1.0);
    assert_eq!(a.metric("channels_bus_up").await, 1.0);
    assert_eq!(
        redis.numsub("channels:c:admin"),
        2,
        "both nodes resubscribed"
    );
}

#[tokio::test]
async fn a_node_started_while_redis_is_down_becomes_ready_when_it_appears() {
    let mut redis = RedisServer::start();
    redis.kill();
    let node = redis_node(&redis).await;
    assert!(!node_ready(&node).await);
    let mut socket = node.socket("early", "admin").await;
    redis.restart();
    assert!(eventually(Duration::from_secs(15), async || node_ready(&node).await).await);
    assert_eq!(
        send_to(&node, json!({"keycloak": "early"}), json!("hi")).await,
        200
    );
    assert_eq!(socket.notification(WAIT).await, Some(json!("hi")));
}
