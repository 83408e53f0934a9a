//! `POST /disconnect` (docs/protocol.md): closes the matching sockets on every node,
//! counts them across the cluster, says when a node did not answer, and
//! changes nothing on bad input; `revoke` reaches nodes started later. (What the official client sees, and that
//! the session is not recoverable: `tests/e2e/disconnect.test.mjs`.)

mod common;

use std::time::Duration;

use common::{redis::RedisServer, *};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

async fn disconnect(addr: &str, body: Value) -> (u16, Value) {
    post_with_key(addr, "/disconnect", body).await
}

#[tokio::test]
async fn the_matching_sockets_close_and_are_counted() {
    let node = start(&[]).await;
    let addr = node.addr.to_string();
    let mut admin_1 = node.socket("alice", "admin").await;
    let mut admin_2 = node.socket("alice", "admin").await;
    let mut b2b = node.socket("alice", "b2b").await;
    let mut bob = node.socket("bob", "admin").await;
    assert_eq!(
        disconnect(&addr, json!({"keycloak": "alice", "channel": "admin"})).await,
        (200, json!({"disconnected": 2, "complete": true}))
    );
    assert!(admin_1.closed_within(WAIT).await);
    assert!(admin_2.closed_within(WAIT).await);
    assert_eq!(
        send_to(&node, json!({"keycloak": "alice"}), json!("still")).await,
        200
    );
    assert_eq!(b2b.notification(WAIT).await, Some(json!("still")));
    assert_eq!(
        disconnect(&addr, json!({"keycloak": "alice"})).await,
        (200, json!({"disconnected": 1, "complete": true}))
    );
    assert!(b2b.closed_within(WAIT).await);
    assert_eq!(
        disconnect(&addr, json!({"keycloak": "nobody"})).await,
        (200, json!({"disconnected": 0, "complete": true}))
    );
    assert_eq!(
        send_to(&node, json!({"channel": "admin"}), json!("bob")).await,
        200
    );
    assert_eq!(bob.notification(WAIT).await, Some(json!("bob")));
}

#[tokio::test]
async fn bad_input_is_refused_and_closes_nothing() {
    let node = start(&[]).await;
    let addr = node.addr.to_string();
    let mut socket = node.socket("alice", "admin").await;
    for body in [
        json!({}),
        json!({"keycloak": 7}),
        json!({"keycloak": ""}),
        json!({"keycloak": "alice", "channel": "bad channel"}),
        json!({"keycloak": "alice", "channel": 1}),
        json!({"keycloak": "alice", "revoke": "yes"}),
        json!({"keycloak": "alice", "revoke": null}),
        json!({"keycloak": "alice", "channel": null}),
        json!(["alice"]),
    ] {
        let (status, answer) = disconnect(&addr, body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"], "bad_request");
    }
    let unkeyed = reqwest::Client::new()
        .post(node.url("/disconnect"))
        .json(&json!({"keycloak": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed.status(), 401);
    assert!(!socket.closed_within(QUIET).await);
}

#[tokio::test]
async fn sockets_on_every_node_are_counted() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let mut on_a = a.socket("alice", "admin").await;
    let mut on_b = b.socket("alice", "b2b").await;
    let mut other = b.socket("bob", "b2b").await;
    assert_eq!(
        disconnect(&a.addr.to_string(), json!({"keycloak": "alice"})).await,
        (200, json!({"disconnected": 2, "complete": true}))
    );
    assert!(on_a.closed_within(WAIT).await);
    assert!(on_b.closed_within(WAIT).await);
    assert!(!other.closed_within(QUIET).await);
}

#[tokio::test]
async fn revoke_refuses_older_ws_tokens_on_every_node() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let old = ws_token("alice");
    let auth = |token: &str| json!({"token": token, "keycloakID": "alice", "channel": "admin"});
    let mut live = SioClient::connect(a.addr, auth(&old)).await.unwrap();
    let bobs = ws_token("bob");
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        disconnect(
            &b.addr.to_string(),
            json!({"keycloak": "alice", "revoke": true})
        )
        .await,
        (200, json!({"disconnected": 1, "complete": true}))
    );
    assert!(live.closed_within(WAIT).await);
    // A node started after the call learns of it from Redis.
    let c = redis_node(&redis).await;
    for node in [&a, &b, &c] {
        assert!(SioClient::connect(node.addr, auth(&old)).await.is_err());
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let new = ws_token("alice");
    for node in [&a, &b, &c] {
        assert!(SioClient::connect(node.addr, auth(&new)).await.is_ok());
    }
    let bob = json!({"token": bobs, "keycloakID": "bob", "channel": "admin"});
    assert!(
        SioClient::connect(a.addr, bob).await.is_ok(),
        "only alice's tokens"
    );
}

#[tokio::test]
async fn a_node_that_does_not_answer_makes_it_incomplete() {
    let mut redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let stopped = StoppableNode::start(&redis.url()).await;
    let _socket = a.socket("alice", "admin").await;
    // Both nodes take requests: the stopped one is asked and cannot answer.
    assert_eq!(redis.numsub("channels:requests"), 2);
    stopped.signal("-STOP");
    let started = std::time::Instant::now();
    let answer = disconnect(&a.addr.to_string(), json!({"keycloak": "alice"})).await;
    let took = started.elapsed();
    stopped.signal("-CONT");
    assert_eq!(answer, (200, json!({"disconnected": 1, "complete": false})));
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    // Redis down: refused, nothing closed.
    drop(stopped);
    let mut bob = a.socket("bob", "admin").await;
    redis.kill();
    assert!(eventually(WAIT, async || !node_ready(&a).await).await);
    let (status, _) = disconnect(&a.addr.to_string(), json!({"keycloak": "bob"})).await;
    assert_eq!(status, 503);
    assert!(!bob.closed_within(QUIET).await);
}
