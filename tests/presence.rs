//! Presence (docs/protocol.md): `GET /presence?keycloak=`, `?channel=` and bulk
//! `POST /presence`, counted across every node, fresh within a second of a
//! connect or disconnect, without a SIGKILLed node's sockets, incomplete
//! when a node does not answer, and `503` without Redis.

mod common;

use std::time::Duration;

use common::{redis::RedisServer, *};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);
/// docs/protocol.md: an answer reflects every connect and disconnect older than this.
const FRESH: Duration = Duration::from_secs(1);

async fn of_user(node: &TestNode, user: &str) -> Value {
    let (status, answer) = get_with_key(
        &node.addr.to_string(),
        &format!("/presence?keycloak={user}"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn of_channel(node: &TestNode, channel: &str) -> Value {
    let (status, answer) = get_with_key(
        &node.addr.to_string(),
        &format!("/presence?channel={channel}"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn bulk(node: &TestNode, users: &[&str]) -> (u16, Value) {
    post_with_key(
        &node.addr.to_string(),
        "/presence",
        json!({"keycloaks": users}),
    )
    .await
}

#[tokio::test]
async fn a_user_a_channel_and_a_list_on_one_node() {
    let node = start(&[]).await;
    let admin_1 = node.socket("alice", "admin").await;
    let _admin_2 = node.socket("alice", "admin").await;
    let _msf = node.socket("alice", "msf").await;
    let _bob = node.socket("bob", "admin").await;
    assert_eq!(
        of_user(&node, "alice").await,
        json!({"keycloak": "alice", "online": true, "sockets": 3,
            "channels": {"admin": 2, "msf": 1}, "complete": true})
    );
    assert_eq!(
        of_channel(&node, "admin").await,
        json!({"channel": "admin", "sockets": 3, "users": 2, "complete": true})
    );
    assert_eq!(
        bulk(&node, &["alice", "bob", "carol"]).await,
        (
            200,
            json!({"online": {"alice": true, "bob": true, "carol": false}, "complete": true})
        )
    );
    assert_eq!(
        of_user(&node, "carol").await,
        json!({"keycloak": "carol", "online": false, "sockets": 0, "channels": {}, "complete": true})
    );
    // A socket that leaves is gone from the answers within a second.
    admin_1.drop_connection().await;
    tokio::time::sleep(FRESH).await;
    assert_eq!(
        of_user(&node, "alice").await["channels"],
        json!({"admin": 1, "msf": 1})
    );
    assert_eq!(of_channel(&node, "admin").await["sockets"], 2);
}

#[tokio::test]
async fn bad_input_is_refused() {
    let node = start(&[]).await;
    let addr = node.addr.to_string();
    for path in [
        "/presence",
        "/presence?keycloak=alice&channel=admin",
        "/presence?channel=bad%20channel",
        "/presence?keycloak=",
        "/presence?user=alice",
    ] {
        let (status, answer) = get_with_key(&addr, path).await;
        assert_eq!(
            (status, &answer["error"]),
            (400, &json!("bad_request")),
            "{path}: {answer}"
        );
    }
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    for body in [
        json!({}),
        json!({"keycloaks": []}),
        json!({"keycloaks": "alice"}),
        json!({"keycloaks": ["alice", 7]}),
        json!({"keycloaks": too_many}),
        json!(["alice"]),
    ] {
        let (status, answer) = post_with_key(&addr, "/presence", body.clone()).await;
        assert_eq!(
            (status, &answer["error"]),
            (400, &json!("bad_request")),
            "{body}: {answer}"
        );
    }
    let client = reqwest::Client::new();
    let unkeyed = client
        .get(node.url("/presence?keycloak=alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed.status(), 401);
    let unkeyed = client
        .post(node.url("/presence"))
        .json(&json!({"keycloaks": ["alice"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed.status(), 401);
    // The body's API_KEY is accepted as on /notify.
    let keyed = client
        .post(node.url("/presence"))
        .json(&json!({"keycloaks": ["alice"], "API_KEY": API_KEY}))
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 200);
}

#[tokio::test]
async fn sockets_on_every_node_are_counted_and_users_once() {
    let redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let b = redis_node(&redis).await;
    let _alice_a = a.socket("alice", "admin").await;
    let alice_b = b.socket("alice", "msf").await;
    let _alice_b2 = b.socket("alice", "admin").await;
    let _bob_b = b.socket("bob", "admin").await;
    for asked in [&a, &b] {
        assert_eq!(
            of_user(asked, "alice").await,
            json!({"keycloak": "alice", "online": true, "sockets": 3,
                "channels": {"admin": 2, "msf": 1}, "complete": true})
        );
        assert_eq!(
            of_channel(asked, "admin").await,
            json!({"channel": "admin", "sockets": 3, "users": 2, "complete": true})
        );
        assert_eq!(
            bulk(asked, &["alice", "bob", "carol"]).await,
            (
                200,
                json!({"online": {"alice": true, "bob": true, "carol": false}, "complete": true})
            )
        );
    }
    alice_b.drop_connection().await;
    tokio::time::sleep(FRESH).await;
    assert_eq!(of_channel(&a, "msf").await["sockets"], 0);
    assert_eq!(of_user(&a, "alice").await["channels"], json!({"admin": 2}));
}

#[tokio::test]
async fn a_killed_node_drops_out_and_a_stopped_one_makes_it_incomplete() {
    let mut redis = RedisServer::start();
    let a = redis_node(&redis).await;
    let killed = StoppableNode::start(&redis.url()).await;
    let stopped = StoppableNode::start(&redis.url()).await;
    let auth =
        |user: &str| json!({"token": ws_token(user), "keycloakID": user, "channel": "admin"});
    let _on_killed = SioClient::connect(killed.addr, auth("alice"))
        .await
        .unwrap();
    let _on_stopped = SioClient::connect(stopped.addr, auth("bob")).await.unwrap();
    let _on_a = a.socket("carol", "admin").await;
    assert_eq!(
        bulk(&a, &["alice", "bob", "carol"]).await,
        (
            200,
            json!({"online": {"alice": true, "bob": true, "carol": true}, "complete": true})
        )
    );
    // SIGKILL: the node's sockets drop out (docs/protocol.md: within 30 s; Redis
    // closes the dead node's subscription, so here at once).
    killed.signal("-KILL");
    let gone = eventually(Duration::from_secs(30), async || {
        bulk(&a, &["alice"]).await.1["online"]["alice"] == false
    })
    .await;
    assert!(gone, "a SIGKILLed node's socket still counts");
    // SIGSTOP: the node is asked and cannot answer; what the others have
    // comes within the ask's timeout, marked incomplete.
    assert_eq!(redis.numsub("channels:requests"), 2);
    stopped.signal("-STOP");
    let started = std::time::Instant::now();
    let answer = bulk(&a, &["bob", "carol"]).await;
    let took = started.elapsed();
    stopped.signal("-CONT");
    assert_eq!(
        answer,
        (
            200,
            json!({"online": {"bob": false, "carol": true}, "complete": false})
        )
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    // Redis down: 503.
    drop(stopped);
    redis.kill();
    assert!(eventually(WAIT, async || !node_ready(&a).await).await);
    let (status, answer) = get_with_key(&a.addr.to_string(), "/presence?keycloak=carol").await;
    assert_eq!(
        (status, &answer["error"]),
        (503, &json!("unavailable")),
        "{answer}"
    );
}
