//! The bus on a real Redis Cluster (three masters built by the test):
//! sharded pub/sub with the same targeted subscriptions, order per target,
//! spread over the shards with recovery off and in the one slot of the
//! `{prefix}` hash tag with it on, and recovery from the loss of a master.
//! (Sessions recovering over a Redis Cluster: `tests/e2e/recovery.test.mjs`.)

mod common;

use std::time::Duration;

use common::{redis::RedisCluster, *};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

async fn cluster_node(cluster: &RedisCluster) -> TestNode {
    cluster_node_with(cluster, &[]).await
}

async fn cluster_node_with(cluster: &RedisCluster, env: &[(&str, &str)]) -> TestNode {
    let urls = cluster.urls();
    let [interval, timeout] = SLOW_HEARTBEAT;
    let mut all = vec![
        ("CHANNELS_REDIS_URL", urls.as_str()),
        ("CHANNELS_REDIS_CLUSTER", "true"),
        // The sockets outlive the outage these tests make.
        interval,
        timeout,
    ];
    all.extend_from_slice(env);
    let node = start(&all).await;
    assert!(eventually(Duration::from_secs(10), async || node_ready(&node).await).await);
    node
}

/// Recovery off: no history, topics spread over the shards.
#[tokio::test]
async fn sharded_pubsub_delivers_every_variant_across_nodes_in_order() {
    let cluster = RedisCluster::start();
    let off = [("CHANNELS_RECOVERY_WINDOW", "0")];
    let a = cluster_node_with(&cluster, &off).await;
    let b = cluster_node_with(&cluster, &off).await;
    let mut sockets = Sockets::open(&a, &b).await;
    let topics = ["channels:c:admin", "channels:u:alice", "channels:u:bob"];
    assert_eq!(
        topics.map(|t| cluster.shard_numsub(t)),
        [2, 2, 1],
        "targeted sharded subscriptions"
    );
    assert!(
        cluster.masters_holding(&topics).len() > 1,
        "the topics spread over the masters"
    );
    sockets.every_variant_in_order(&a, &b).await;
    // No history: nothing but the nodes' heartbeats (each kept 3 s, so a
    // node starved that long on a loaded machine may have none just now).
    let keys = cluster.keys();
    assert!(
        keys.iter().all(|k| k.starts_with("channels:n:")),
        "no history kept: {keys:?}"
    );
}

/// Recovery on (the default): the sequence, the history and the topics
/// share the `{channels}` slot, so one script numbers, keeps and publishes
/// each notification.
#[tokio::test]
async fn with_recovery_every_key_and_topic_shares_one_slot() {
    let cluster = RedisCluster::start();
    let a = cluster_node(&cluster).await;
    let b = cluster_node(&cluster).await;
    let mut sockets = Sockets::open(&a, &b).await;
    let topics = [
        "{channels}:c:admin",
        "{channels}:u:alice",
        "{channels}:u:bob",
        "{channels}:takeover",
    ];
    assert_eq!(topics.map(|t| cluster.shard_numsub(t)), [2, 2, 1, 2]);
    assert_eq!(cluster.masters_holding(&topics).len(), 1);
    sockets.every_variant_in_order(&a, &b).await;
    let keys = cluster.keys();
    assert!(keys.contains(&"{channels}:seq".to_string()), "{keys:?}");
    assert!(
        keys.contains(&"{channels}:h:u:alice".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.iter().all(|k| k.starts_with("{channels}:")),
        "{keys:?}"
    );
    assert_eq!(cluster.masters_holding(&keys).len(), 1);

    // Bob leaves: his topic is unsubscribed after the delay, and Redis's
    // confirmation is not taken for a subscription it ended on its own
    // (which reconnects the bus).
    let Sockets { bob_admin, .. } = sockets;
    bob_admin.drop_connection().await;
    let gone = eventually(Duration::from_secs(10), async || {
        cluster.shard_numsub("{channels}:u:bob") == 0
    })
    .await;
    assert!(gone, "still subscribed after the last socket left");
    tokio::time::sleep(QUIET).await;
    assert_eq!(b.metric("channels_bus_reconnects_total").await, 0.0);
    assert!(node_ready(&b).await);
}

/// Alice in admin on one node and in b2b on the other, Bob in admin.
struct Sockets {
    alice_admin: SioClient,
    alice_b2b: SioClient,
    bob_admin: SioClient,
}

impl Sockets {
    async fn open(a: &TestNode, b: &TestNode) -> Self {
        Sockets {
            alice_admin: a.socket("alice", "admin").await,
            alice_b2b: b.socket("alice", "b2b").await,
            bob_admin: b.socket("bob", "admin").await,
        }
    }

    async fn every_variant_in_order(&mut self, a: &TestNode, b: &TestNode) {
        let Sockets {
            alice_admin,
            alice_b2b,
            bob_admin,
        } = self;

        assert_eq!(
            send_to(a, json!({"channel": "admin"}), json!("c")).await,
            200
        );
        assert_eq!(alice_admin.notification(WAIT).await, Some(json!("c")));
        assert_eq!(bob_admin.notification(WAIT).await, Some(json!("c")));
        assert_eq!(
            send_to(
                b,
                json!({"keycloak": "alice", "channel": "admin"}),
                json!("uc")
            )
            .await,
            200
        );
        assert_eq!(alice_admin.notification(WAIT).await, Some(json!("uc")));
        assert_eq!(alice_b2b.notification(QUIET).await, None);

        // Order per target, publishes alternating between the nodes.
        for i in 0..200 {
            let node = if i % 2 == 0 { a } else { b };
            assert_eq!(
                send_to(node, json!({"keycloak": "alice"}), json!(i)).await,
                200
            );
        }
        for i in 0..200 {
            assert_eq!(alice_admin.notification(WAIT).await, Some(json!(i)));
            assert_eq!(alice_b2b.notification(WAIT).await, Some(json!(i)));
        }
        assert_eq!(bob_admin.notification(QUIET).await, None);
    }
}

#[tokio::test]
async fn losing_a_master_answers_503_and_the_node_heals_when_it_returns() {
    let mut cluster = RedisCluster::start();
    let node = cluster_node(&cluster).await;
    let mut socket = node.socket("alice", "admin").await;

    cluster.masters[0].kill();
    // Without replicas the cluster stops serving; a publish fails and the
    // node reports not ready until it has reconnected and resubscribed.
    let refused = eventually(Duration::from_secs(15), async || {
        send_to(&node, json!({"keycloak": "alice"}), json!("during")).await == 503
    })
    .await;
    assert!(refused, "publishes kept succeeding with a master down");

    cluster.masters[0].restart();
    cluster.wait_ok();
    let healed = eventually(Duration::from_secs(30), async || {
        node_ready(&node).await
            && send_to(&node, json!({"keycloak": "alice"}), json!("after")).await == 200
    })
    .await;
    assert!(healed, "the node did not come back");
    // Everything accepted after the outage arrives; nothing refused does.
    let mut got = Vec::new();
    while let Some(msg) = socket.notification(QUIET).await {
        got.push(msg);
    }
    assert!(
        !got.is_empty() && got.iter().all(|m| m == "after"),
        "{got:?}"
    );
}
