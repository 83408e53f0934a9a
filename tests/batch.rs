//! `POST /notify/batch` (docs/protocol.md): validated whole (the first bad item's
//! `index`, nothing delivered), answered and delivered in item order across
//! variants and nodes, and deduplicated item by item under an
//! `Idempotency-Key`.

mod common;

use std::time::Duration;

use common::{redis::RedisServer, *};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    replayed: bool,
}

async fn batch(node: &TestNode, key: Option<&str>, body: Value) -> Answer {
    let mut request = reqwest::Client::new()
        .post(node.url("/notify/batch"))
        .header("x-api-key", API_KEY)
        .json(&body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.unwrap();
    Answer {
        status: response.status().as_u16(),
        replayed: response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true"),
        body: response.json().await.unwrap_or(Value::Null),
    }
}

async fn all_received(socket: &mut SioClient) -> Vec<Value> {
    let mut got = Vec::new();
    while let Some(msg) = socket.notification(QUIET).await {
        got.push(msg);
    }
    got
}

/// A node on `redis` whose sockets may hold a whole batch in their queue
/// (more than `CHANNELS_SOCKET_QUEUE` at once evicts a slow reader).
async fn redis_node(redis: &RedisServer) -> TestNode {
    let node = start(&[
        ("CHANNELS_REDIS_URL", &redis.url()),
        ("CHANNELS_SOCKET_QUEUE", "1024"),
    ])
    .await;
    assert!(eventually(WAIT, async || node_ready(&node).await).await);
    node
}

fn variants(answer: &Answer) -> Vec<Value> {
    answer.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["variant"].clone())
        .collect()
}

#[tokio::test]
async fn a_batch_is_answered_and_delivered_in_item_order_across_variants() {
    let node = start(&[]).await;
    let mut alice = node.socket("alice", "admin").await;
    let mut bob = node.socket("bob", "admin").await;
    let answer = batch(
        &node,
        None,
        json!({"notifications": [
            {"channel": "admin", "msg": 1},
            {"keycloak": "alice", "msg": 2},
            {"keycloak": "alice", "channel": "admin", "msg": {"n": 3}},
            {"keycloak": "bob", "msg": 4},
            {"channel": "admin", "msg": 5},
        ]}),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        variants(&answer),
        ["channel", "user", "user_channel", "user", "channel"].map(Value::from)
    );
    let ids: std::collections::HashSet<_> = answer.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 5, "one id per item");
    assert_eq!(
        all_received(&mut alice).await,
        [json!(1), json!(2), json!({"n": 3}), json!(5)]
    );
    assert_eq!(all_received(&mut bob).await, [json!(1), json!(4), json!(5)]);
}

#[tokio::test]
async fn a_bad_item_refuses_the_whole_batch_with_its_index() {
    let node = start(&[
        ("CHANNELS_MAX_BATCH", "3"),
        ("CHANNELS_MAX_BATCH_BYTES", "2000"),
    ])
    .await;
    let mut alice = node.socket("alice", "admin").await;
    let good = json!({"keycloak": "alice", "msg": "never"});
    for (bad, index) in [
        (json!({"keycloak": "alice", "msg": null}), 1),
        (json!({"keycloak": "alice"}), 1),
        (json!({"msg": 1}), 1),
        (json!({"keycloak": 7, "msg": 1}), 1),
        (json!("not an object"), 1),
    ] {
        let answer = batch(&node, None, json!({"notifications": [good, bad, good]})).await;
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(answer.body["error"], "bad_request");
        assert_eq!(answer.body["index"], index, "{answer:?}");
    }
    for body in [
        json!({"notifications": []}),
        json!({"notifications": [good, good, good, good]}),
        json!({"notifications": {"msg": 1}}),
        json!({}),
        json!([good]),
    ] {
        let answer = batch(&node, None, body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {answer:?}");
    }
    let huge = json!({"keycloak": "alice", "msg": "x".repeat(3000)});
    assert_eq!(
        batch(&node, None, json!({"notifications": [huge]}))
            .await
            .status,
        413
    );
    let unkeyed = reqwest::Client::new()
        .post(node.url("/notify/batch"))
        .json(&json!({"notifications": [good]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed.status(), 401);
    assert_eq!(all_received(&mut alice).await, Vec::<Value>::new());
}

#[tokio::test]
async fn a_batch_over_redis_arrives_in_order_on_another_node() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let mut socket = b.socket("alice", "admin").await;
    let items: Vec<Value> = (0..300)
        .map(|n| match n % 3 {
            0 => json!({"keycloak": "alice", "msg": n}),
            1 => json!({"channel": "admin", "msg": n}),
            _ => json!({"keycloak": "alice", "channel": "admin", "msg": n}),
        })
        .collect();
    let answer = batch(&a, None, json!({"notifications": items})).await;
    assert_eq!(answer.status, 200);
    let expected: Vec<Value> = (0..300).map(Value::from).collect();
    assert_eq!(all_received(&mut socket).await, expected);
}

#[tokio::test]
async fn under_an_idempotency_key_each_item_is_delivered_once() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let mut socket = b.socket("alice", "admin").await;
    let item = |n: u64| json!({"keycloak": "alice", "msg": n});
    // A first call that got two items out.
    let first = batch(
        &a,
        Some("batch-7"),
        json!({"notifications": [item(0), item(1)]}),
    )
    .await;
    assert_eq!((first.status, first.replayed), (200, false));
    assert_eq!(all_received(&mut socket).await, [json!(0), json!(1)]);
    // Its retry, on another node, with the whole batch: only the missing
    // item goes out; the others answer their first ids.
    let retry = batch(
        &b,
        Some("batch-7"),
        json!({"notifications": [item(0), item(1), item(2)]}),
    )
    .await;
    assert_eq!((retry.status, retry.replayed), (200, false), "{retry:?}");
    assert_eq!(retry.body["results"][0], first.body["results"][0]);
    assert_eq!(retry.body["results"][1], first.body["results"][1]);
    assert_eq!(all_received(&mut socket).await, [json!(2)]);
    // Once more: nothing goes out, every answer is replayed.
    let again = batch(
        &a,
        Some("batch-7"),
        json!({"notifications": [item(0), item(1), item(2)]}),
    )
    .await;
    assert_eq!((again.status, again.replayed), (200, true));
    assert_eq!(again.body, retry.body);
    assert_eq!(all_received(&mut socket).await, Vec::<Value>::new());
    // An item changed under the same key: refused, nothing goes out.
    let changed = batch(
        &b,
        Some("batch-7"),
        json!({"notifications": [item(0), item(9), item(3)]}),
    )
    .await;
    assert_eq!(changed.status, 422);
    assert_eq!(all_received(&mut socket).await, Vec::<Value>::new());
}

#[tokio::test]
async fn redis_down_answers_503_and_delivers_nothing() {
    let mut redis = RedisServer::start();
    let node = redis_node(&redis).await;
    let mut socket = node.socket("alice", "admin").await;
    redis.kill();
    assert!(eventually(WAIT, async || !node_ready(&node).await).await);
    let items =
        json!({"notifications": [{"keycloak": "alice", "msg": 1}, {"channel": "admin", "msg": 2}]});
    for key in [None, Some("down")] {
        let answer = batch(&node, key, items.clone()).await;
        assert_eq!(answer.status, 503, "{answer:?}");
        assert_eq!(answer.body["error"], "unavailable");
    }
    assert_eq!(all_received(&mut socket).await, Vec::<Value>::new());
}

/// The items of a batch go to Redis as one call of the publish script; an
/// item whose write Redis refuses (here its history stream's key holds a
/// string) fails alone: the batch answers `503`, and the items before and
/// after it are delivered, in order.
#[tokio::test]
async fn an_item_redis_refuses_fails_alone_and_the_others_are_delivered() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let mut alice = b.socket("alice", "admin").await;
    let mut bob = b.socket("bob", "admin").await;
    redis
        .cli(&["SET", "channels:h:u:bob", "not a stream"])
        .expect("redis-cli SET");
    let answer = batch(
        &a,
        None,
        json!({"notifications": [
            {"keycloak": "alice", "msg": 1},
            {"keycloak": "bob", "msg": 2},
            {"keycloak": "alice", "msg": 3},
        ]}),
    )
    .await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(all_received(&mut alice).await, [json!(1), json!(3)]);
    assert_eq!(all_received(&mut bob).await, Vec::<Value>::new());
    // Once the key is gone, bob's notifications go out again.
    redis
        .cli(&["DEL", "channels:h:u:bob"])
        .expect("redis-cli DEL");
    let answer = batch(
        &a,
        None,
        json!({"notifications": [{"keycloak": "bob", "msg": 4}]}),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(all_received(&mut bob).await, [json!(4)]);
}
