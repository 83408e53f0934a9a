//! Delivery receipts, `POST /notify?receipt=true` (docs/protocol.md): the sockets a
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
    let (_, batch) = post_with_key(
        &addr,
        "/notify/batch?receipt=true",
        json!({"notifications": [{"keycloak": "alice", "msg": 6}, {"channel": "msf", "msg": 7}]}),
    )
    .await;
    assert_eq!(receipt(&batch["results"][0]), (json!(2), json!(true)));
    assert_eq!(receipt(&batch["results"][1]), (json!(0), json!(true)));
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

/// A `POST` with the test API key and an `Idempotency-Key`.
async fn post_keyed(addr: &str, path: &str, key: &str, body: Value) -> (u16, Value, bool) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .header("x-api-key", API_KEY)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (status, response.json().await.unwrap(), replayed)
}

#[tokio::test]
async fn a_batch_receipt_counts_each_item_across_nodes() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let mut on_a = a.socket("alice", "admin").await;
    let mut on_b = b.socket("alice", "b2b").await;
    let _bob = b.socket("bob", "admin").await;
    let (status, answer) = post_with_key(
        &a.addr.to_string(),
        "/notify/batch?receipt=true",
        json!({"notifications": [
            {"keycloak": "alice", "msg": 1},
            {"channel": "admin", "msg": 2},
            {"keycloak": "nobody", "msg": 3},
            {"keycloak": "alice", "channel": "b2b", "msg": 4},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let counts: Vec<_> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(receipt)
        .collect();
    assert_eq!(
        counts,
        [(2, true), (2, true), (0, true), (1, true)].map(|(n, c)| (json!(n), json!(c)))
    );
    for expected in [1, 2] {
        assert_eq!(on_a.notification(WAIT).await, Some(json!(expected)));
    }
    for expected in [1, 4] {
        assert_eq!(on_b.notification(WAIT).await, Some(json!(expected)));
    }
    let (_, plain) = post_with_key(
        &a.addr.to_string(),
        "/notify/batch",
        json!({"notifications": [{"keycloak": "alice", "msg": 5}]}),
    )
    .await;
    assert_eq!(
        plain["results"][0].get("sockets"),
        None,
        "no receipt unless asked"
    );
}

#[tokio::test]
async fn a_repeat_of_an_idempotent_call_answers_the_first_receipt() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let mut socket = b.socket("alice", "admin").await;
    let body = json!({"keycloak": "alice", "msg": "once"});
    let (status, first, replayed) = post_keyed(
        &a.addr.to_string(),
        "/notify?receipt=true",
        "order-1",
        body.clone(),
    )
    .await;
    assert_eq!((status, replayed), (200, false));
    assert_eq!(receipt(&first), (json!(1), json!(true)));
    assert_eq!(socket.notification(WAIT).await, Some(json!("once")));
    // On the other node, and after the socket left: the first call's answer.
    socket.drop_connection().await;
    let (status, repeat, replayed) =
        post_keyed(&b.addr.to_string(), "/notify?receipt=true", "order-1", body).await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(repeat, first);
    let batch = json!({"notifications": [{"keycloak": "bob", "msg": 1}]});
    let (_, first, _) = post_keyed(
        &a.addr.to_string(),
        "/notify/batch?receipt=true",
        "batch-1",
        batch.clone(),
    )
    .await;
    let (_, repeat, replayed) = post_keyed(
        &b.addr.to_string(),
        "/notify/batch?receipt=true",
        "batch-1",
        batch,
    )
    .await;
    assert!(replayed);
    assert_eq!(receipt(&first["results"][0]), (json!(0), json!(true)));
    assert_eq!(repeat, first);
}
