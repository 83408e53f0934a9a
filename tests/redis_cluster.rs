//! The bus on a real Redis Cluster (three masters built by the test):
//! sharded pub/sub with the same targeted subscriptions, order per target,
//! and recovery from the loss of a master.

mod common;

use std::time::Duration;

use common::{redis::RedisCluster, *};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

async fn cluster_node(cluster: &RedisCluster) -> TestNode {
    let urls = cluster.urls();
    let [interval, timeout] = SLOW_HEARTBEAT;
    let node = start(&[
        ("CHANNELS_REDIS_URL", &urls),
        ("CHANNELS_REDIS_CLUSTER", "true"),
        // The sockets outlive the outage these tests make.
        interval,
        timeout,
    ])
    .await;
    assert!(eventually(Duration::from_secs(10), async || node_ready(&node).await).await);
    node
}

#[tokio::test]
async fn sharded_pubsub_delivers_every_variant_across_nodes_in_order() {
    let cluster = RedisCluster::start();
    let a = cluster_node(&cluster).await;
    let b = cluster_node(&cluster).await;
    let mut alice_admin = a.socket("alice", "admin").await;
    let mut alice_b2b = b.socket("alice", "b2b").await;
    let mut bob_admin = b.socket("bob", "admin").await;
    assert_eq!(cluster.shard_numsub("channels:c:admin"), 2);
    assert_eq!(cluster.shard_numsub("channels:u:alice"), 2);
    assert_eq!(cluster.shard_numsub("channels:u:bob"), 1);

    assert_eq!(
        send_to(&a, json!({"channel": "admin"}), json!("c")).await,
        200
    );
    assert_eq!(alice_admin.notification(WAIT).await, Some(json!("c")));
    assert_eq!(bob_admin.notification(WAIT).await, Some(json!("c")));
    assert_eq!(
        send_to(
            &b,
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
        let node = if i % 2 == 0 { &a } else { &b };
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
