//! Delivery receipts, `POST /notify?receipt=true` (SPEC.md): the sockets a
//! notification was written to across the cluster, and whether every node
//! that received it reported within a second.

mod common;

use std::time::Duration;

use common::{redis::RedisServer, *};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

async fn notify(addr: &str, query: &str, body: Value) -> (u16, Value) {
    post_with_key(addr, &format!("/notify{query}"), body).await
}

fn receipt(answer: &Value) -> (Value, Value) {
    (answer["sockets"].clone(), answer["complete"].clone())
}

#[tokio::test]
async fn a_receipt_counts_the_sockets_written_on_one_node() {
    let node = start(&[]).await;
    let addr = node.addr.to_string();
    let mut first = node.socket("alice", "admin").await;
    let mut second = node.socket("alice", "b2b").await;
    let (status, answer) = notify(
        &addr,
        "?receipt=true",
        json!({"keycloak": "alice", "msg": 1}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(receipt(&answer), (json!(2), json!(true)));
    assert_eq!(first.notification(WAIT).await, Some(json!(1)));
    assert_eq!(second.notification(WAIT).await, Some(json!(1)));
    let (_, offline) = notify(
        &addr,
        "?receipt=true",
        json!({"keycloak": "nobody", "msg": 1}),
    )
    .await;
    assert_eq!(receipt(&offline), (json!(0), json!(true)));
    let (_, pair) = notify(
        &addr,
        "?receipt=true",
        json!({"keycloak": "alice", "channel": "b2b", "msg": 2}),
    )
    .await;
    assert_eq!(receipt(&pair), (json!(1), json!(true)));
    let (_, plain) = notify(&addr, "", json!({"keycloak": "alice", "msg": 3})).await;
    assert_eq!(plain.get("sockets"), None, "no receipt unless asked");
    let (_, off) = notify(
        &addr,
        "?receipt=false",
        json!({"keycloak": "alice", "msg": 4}),
    )
    .await;
    assert_eq!(off.get("sockets"), None);
    let (status, bad) = notify(
        &addr,
        "?receipt=yes",
        json!({"keycloak": "alice", "msg": 5}),
    )
    .await;
    assert_eq!((status, bad["error"].clone()), (400, json!("bad_request")));
}

#[tokio::test]
async fn a_receipt_counts_across_nodes_and_says_when_one_is_silent() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let _on_a = a.socket("alice", "admin").await;
    let _on_b = b.socket("alice", "admin").await;
    let _other = b.socket("bob", "admin").await;
    let addr = a.addr.to_string();
    let (_, user) = notify(
        &addr,
        "?receipt=true",
        json!({"keycloak": "alice", "msg": 1}),
    )
    .await;
    assert_eq!(receipt(&user), (json!(2), json!(true)));
    let (_, channel) = notify(
        &addr,
        "?receipt=true",
        json!({"channel": "admin", "msg": 1}),
    )
    .await;
    assert_eq!(receipt(&channel), (json!(3), json!(true)));
    let (_, offline) = notify(
        &addr,
        "?receipt=true",
        json!({"keycloak": "nobody", "msg": 1}),
    )
    .await;
    assert_eq!(receipt(&offline), (json!(0), json!(true)));

    // A third node holding one of alice's sockets stops.
    let stopped = StoppableNode::start(&redis.url()).await;
    let auth = json!({"token": ws_token("alice"), "keycloakID": "alice", "channel": "admin"});
    let _on_stopped = SioClient::connect(stopped.addr, auth).await.unwrap();
    stopped.signal("-STOP");
    let started = std::time::Instant::now();
    let (status, partial) = notify(
        &addr,
        "?receipt=true",
        json!({"keycloak": "alice", "msg": 2}),
    )
    .await;
    let took = started.elapsed();
    stopped.signal("-CONT");
    assert_eq!(status, 200);
    assert_eq!(receipt(&partial), (json!(2), json!(false)));
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
}

#[tokio::test]
async fn redis_down_answers_503() {
    let mut redis = RedisServer::start();
    let node = redis_node(&redis).await;
    let _socket = node.socket("alice", "admin").await;
    redis.kill();
    assert!(eventually(WAIT, async || !node_ready(&node).await).await);
    let (status, answer) = notify(
        &node.addr.to_string(),
        "?receipt=true",
        json!({"keycloak": "alice", "msg": 1}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].clone()),
        (503, json!("unavailable"))
    );
}
