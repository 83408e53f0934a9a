//! `Idempotency-Key` on `/notify` (docs/protocol.md, "`POST /notify`"):
//! a repeat answers the first call's answer and delivers nothing again, on
//! the same node or another, with any API key; another body is refused; a
//! repeat racing the first call never delivers twice; a `503` is not kept.

mod common;

use std::time::Duration;

use common::{redis::RedisServer, *};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

/// What a keyed `/notify` answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    replayed: bool,
}

async fn post_keyed(node: &TestNode, key: &str, api_key: &str, body: Value) -> Answer {
    let response = reqwest::Client::new()
        .post(node.url("/notify"))
        .header("x-api-key", api_key)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    Answer {
        status,
        body: response.json().await.unwrap_or(Value::Null),
        replayed,
    }
}

async fn redis_node(redis: &RedisServer) -> TestNode {
    let [interval, timeout] = SLOW_HEARTBEAT;
    let node = start(&[("CHANNELS_REDIS_URL", &redis.url()), interval, timeout]).await;
    assert!(eventually(WAIT, async || node_ready(&node).await).await);
    node
}

/// Every notification `socket` receives until a quiet moment.
async fn all_received(socket: &mut SioClient) -> Vec<Value> {
    let mut got = Vec::new();
    while let Some(msg) = socket.notification(QUIET).await {
        got.push(msg);
    }
    got
}

#[tokio::test]
async fn a_repeat_answers_the_first_answer_with_any_api_key_and_delivers_once() {
    let node = start(&[]).await;
    let mut socket = node.socket("alice", "admin").await;
    let body = json!({"keycloak": "alice", "msg": "once"});
    let first = post_keyed(&node, "order-1", API_KEY, body.clone()).await;
    assert_eq!((first.status, first.replayed), (200, false), "{first:?}");
    let repeat = post_keyed(&node, "order-1", OTHER_API_KEY, body).await;
    assert_eq!((repeat.status, repeat.replayed), (200, true), "{repeat:?}");
    assert_eq!(repeat.body, first.body, "the same id and variant");
    assert_eq!(all_received(&mut socket).await, vec![json!("once")]);
    // Another key is another call.
    let other = post_keyed(
        &node,
        "order-2",
        API_KEY,
        json!({"keycloak": "alice", "msg": "once"}),
    )
    .await;
    assert_eq!((other.status, other.replayed), (200, false));
    assert_ne!(other.body["id"], first.body["id"]);
    assert_eq!(all_received(&mut socket).await, vec![json!("once")]);
    assert_eq!(
        node.metric(r#"channels_notifications_total{outcome="replayed",variant="user"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn the_key_with_another_body_is_refused_and_delivers_nothing() {
    let node = start(&[]).await;
    let mut socket = node.socket("alice", "admin").await;
    let first = post_keyed(&node, "k", API_KEY, json!({"keycloak": "alice", "msg": 1})).await;
    assert_eq!(first.status, 200);
    assert_eq!(all_received(&mut socket).await, vec![json!(1)]);
    for other in [
        json!({"keycloak": "alice", "msg": 2}),
        json!({"keycloak": "alice", "channel": "admin", "msg": 1}),
        json!({"channel": "admin", "msg": 1}),
    ] {
        let reused = post_keyed(&node, "k", API_KEY, other).await;
        assert_eq!(reused.status, 422, "{reused:?}");
        assert_eq!(reused.body["error"], "idempotency_key_reused");
    }
    assert_eq!(all_received(&mut socket).await, Vec::<Value>::new());
}

#[tokio::test]
async fn a_malformed_key_is_refused_and_delivers_nothing() {
    let node = start(&[]).await;
    let mut socket = node.socket("alice", "admin").await;
    for bad in ["a".repeat(201), "with space".into(), "tab\there".into()] {
        let answer = post_keyed(&node, &bad, API_KEY, json!({"keycloak": "alice", "msg": 1})).await;
        assert_eq!(answer.status, 400, "{bad:?}: {answer:?}");
        assert_eq!(answer.body["error"], "bad_request");
    }
    assert_eq!(all_received(&mut socket).await, Vec::<Value>::new());
}

#[tokio::test]
async fn a_repeat_on_another_node_is_replayed() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let mut socket = b.socket("alice", "admin").await;
    let body = json!({"channel": "admin", "msg": "x"});
    let first = post_keyed(&a, "across", API_KEY, body.clone()).await;
    assert_eq!((first.status, first.replayed), (200, false));
    let repeat = post_keyed(&b, "across", OTHER_API_KEY, body).await;
    assert_eq!((repeat.status, repeat.replayed), (200, true));
    assert_eq!(repeat.body, first.body);
    assert_eq!(all_received(&mut socket).await, vec![json!("x")]);
    let reused = post_keyed(
        &b,
        "across",
        API_KEY,
        json!({"channel": "admin", "msg": "y"}),
    )
    .await;
    assert_eq!(reused.status, 422);
}

#[tokio::test]
async fn concurrent_repeats_on_two_nodes_deliver_once() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let mut socket = a.socket("alice", "admin").await;
    for round in 0..5 {
        let key = format!("race-{round}");
        let body = json!({"keycloak": "alice", "msg": round});
        let calls = (0..10).map(|i| {
            let node = if i % 2 == 0 { &a } else { &b };
            post_keyed(node, &key, API_KEY, body.clone())
        });
        let answers = futures_util::future::join_all(calls).await;
        let firsts: Vec<_> = answers
            .iter()
            .filter(|a| a.status == 200 && !a.replayed)
            .collect();
        assert_eq!(firsts.len(), 1, "{answers:?}");
        for answer in &answers {
            match answer.status {
                200 => assert_eq!(answer.body, firsts[0].body),
                409 => assert_eq!(answer.body["error"], "conflict"),
                _ => panic!("{answer:?}"),
            }
        }
        assert_eq!(all_received(&mut socket).await, vec![json!(round)]);
    }
}

#[tokio::test]
async fn an_unavailable_answer_is_not_kept() {
    let mut redis = RedisServer::start();
    let node = redis_node(&redis).await;
    let mut socket = node.socket("alice", "admin").await;
    redis.kill();
    let body = json!({"keycloak": "alice", "msg": "after the outage"});
    let refused = eventually(Duration::from_secs(10), async || {
        post_keyed(&node, "retry-me", API_KEY, body.clone())
            .await
            .status
            == 503
    })
    .await;
    assert!(refused);
    redis.restart();
    assert!(eventually(Duration::from_secs(15), async || node_ready(&node).await).await);
    let retry = post_keyed(&node, "retry-me", API_KEY, body.clone()).await;
    assert_eq!((retry.status, retry.replayed), (200, false), "{retry:?}");
    let repeat = post_keyed(&node, "retry-me", API_KEY, body).await;
    assert_eq!((repeat.status, repeat.replayed), (200, true));
    assert_eq!(
        all_received(&mut socket).await,
        vec![json!("after the outage")]
    );
}
