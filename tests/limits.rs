//! The limits of a node (docs/protocol.md, "Limits"): each refuses with a clear error,
//! is counted in `channels_limit_refusals_total`, and leaves everyone else
//! served.

mod common;

use std::{net::IpAddr, time::Duration};

use common::*;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SECOND: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A client whose connections come from `from`.
fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .build()
        .unwrap()
}

/// How many refusals `limit` has counted (read in-process, without a call).
fn refusals(node: &TestNode, limit: &str) -> u64 {
    let needle = format!("channels_limit_refusals_total{{limit=\"{limit}\"}} ");
    node.node
        .metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle)?.parse().ok())
        .unwrap_or(u64::MAX)
}

fn auth(user: &str, channel: &str) -> Value {
    json!({"token": ws_token(user), "keycloakID": user, "channel": channel})
}

/// A 429 answer: its JSON error, which limit, and a `Retry-After` of at least 1.
async fn assert_rate_limited(response: reqwest::Response, limit: &str) {
    assert_eq!(response.status(), 429, "{limit}");
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{limit}: Retry-After {retry}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{limit}");
    assert!(
        body["message"].as_str().unwrap().contains(limit),
        "{limit}: {body}"
    );
}

#[tokio::test]
async fn a_user_gets_at_most_max_sockets_per_user_on_a_node() {
    let node = start(&[("CHANNELS_MAX_SOCKETS_PER_USER", "2")]).await;
    let first = node.socket("alice", "admin").await;
    let mut second = node.socket("alice", "b2b").await;
    assert_eq!(
        SioClient::connect(node.addr, auth("alice", "admin"))
            .await
            .err()
            .as_deref(),
        Some("too_many_sockets")
    );
    assert_eq!(refusals(&node, "sockets_per_user"), 1);
    // Other users are not affected, and the refused socket receives nothing.
    let mut bob = node.socket("bob", "admin").await;
    assert_eq!(
        send_to(&node, json!({"keycloak": "alice"}), json!("hi")).await,
        200
    );
    assert_eq!(
        second.notification(Duration::from_secs(2)).await,
        Some(json!("hi"))
    );
    assert_eq!(node.node.registry_stats().sockets, 3);
    // Once a socket leaves, the user may connect again.
    first.drop_connection().await;
    assert!(
        eventually(Duration::from_secs(5), async || {
            node.node.registry_stats().sockets == 2
        })
        .await
    );
    assert!(
        SioClient::connect(node.addr, auth("alice", "admin"))
            .await
            .is_ok()
    );
    assert_eq!(
        send_to(&node, json!({"channel": "admin"}), json!(1)).await,
        200
    );
    assert_eq!(
        bob.notification(Duration::from_secs(2)).await,
        Some(json!(1))
    );
}

#[tokio::test]
async fn connections_past_max_connections_get_a_503_and_close() {
    let node = start(&[("CHANNELS_MAX_CONNECTIONS", "3")]).await;
    let socket = node.socket("alice", "admin").await; // one connection
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(node.addr).await.unwrap());
    }
    // On a connection of its own, a GET whose connection the node closes
    // after its answer.
    let get_past_the_cap = async |path: &str| {
        let mut stream = TcpStream::connect(node.addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .expect("the connection is closed after the answer")
            .unwrap();
        answer
    };
    let answer = get_past_the_cap("/openapi.json").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"], "unavailable");
    assert_eq!(refusals(&node, "max_connections"), 1);
    assert_eq!(node.node.metrics().handles().connections.get(), 3);

    // Past the cap, the node still says how it is.
    let answer = get_past_the_cap("/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(refusals(&node, "max_connections"), 2);

    // The socket that got in is served; a freed place is taken again.
    drop(held.pop());
    let mut socket = socket;
    assert!(
        eventually(Duration::from_secs(5), async || {
            node.node.metrics().handles().connections.get() == 2
        })
        .await
    );
    assert_eq!(
        send_to(&node, json!({"channel": "admin"}), json!("still here")).await,
        200
    );
    assert_eq!(
        socket.notification(Duration::from_secs(2)).await,
        Some(json!("still here"))
    );
}

#[tokio::test]
async fn new_connections_are_rate_limited_per_client_address() {
    let node = start(&[("CHANNELS_CONNECT_RATE", "1:3")]).await;
    let mut sockets = Vec::new();
    for i in 0..3 {
        sockets.push(node.socket(&format!("u{i}"), "admin").await);
    }
    // The fourth handshake from 127.0.0.1 is refused at the HTTP level.
    let handshake = node.url("/socket.io/?EIO=4&transport=polling");
    assert_rate_limited(
        node.http.get(&handshake).send().await.unwrap(),
        "connect_rate",
    )
    .await;
    assert_eq!(
        SioClient::connect(node.addr, auth("late", "admin"))
            .await
            .err()
            .map(|e| e.contains("429")),
        Some(true),
        "a websocket handshake is refused too"
    );
    assert_eq!(refusals(&node, "connect_rate"), 2);
    // Another address still connects, and open sockets keep receiving.
    assert!(
        SioClient::connect_from(node.addr, SECOND, auth("other", "admin"))
            .await
            .is_ok()
    );
    assert_eq!(
        send_to(&node, json!({"channel": "admin"}), json!(7)).await,
        200
    );
    for socket in &mut sockets {
        assert_eq!(
            socket.notification(Duration::from_secs(2)).await,
            Some(json!(7))
        );
    }
    // The bucket refills: one handshake per second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        node.http.get(&handshake).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn authorize_is_rate_limited_per_client_address() {
    let node = start(&[("CHANNELS_AUTHORIZE_RATE", "1:2")]).await;
    let token = upstream_token(claims("alice"));
    let call = |client: &reqwest::Client| {
        client
            .get(node.url("/authorize"))
            .bearer_auth(&token)
            .send()
    };
    for _ in 0..2 {
        assert_eq!(call(&node.http).await.unwrap().status(), 200);
    }
    assert_rate_limited(call(&node.http).await.unwrap(), "authorize_rate").await;
    assert_eq!(call(&client_from(SECOND)).await.unwrap().status(), 200);
    assert_eq!(refusals(&node, "authorize_rate"), 1);
}

#[tokio::test]
async fn behind_a_proxy_the_client_address_comes_from_the_configured_header() {
    let node = start(&[
        ("CHANNELS_AUTHORIZE_RATE", "1:1"),
        ("CHANNELS_CLIENT_ADDRESS_HEADER", "x-forwarded-for"),
    ])
    .await;
    let token = upstream_token(claims("alice"));
    let call = |forwarded: &str| {
        node.http
            .get(node.url("/authorize"))
            .bearer_auth(&token)
            .header("x-forwarded-for", forwarded)
            .send()
    };
    assert_eq!(call("198.51.100.1").await.unwrap().status(), 200);
    // The proxy appends the real address last; what the client wrote before it is ignored.
    assert_eq!(
        call("198.51.100.1, 198.51.100.2").await.unwrap().status(),
        200
    );
    assert_rate_limited(call("198.51.100.1").await.unwrap(), "authorize_rate").await;
}

#[tokio::test]
async fn notify_is_rate_limited_per_api_key_and_refused_calls_deliver_nothing() {
    let node = start(&[("CHANNELS_NOTIFY_RATE_PER_KEY", "1:2")]).await;
    let mut socket = node.socket("alice", "admin").await;
    let post = |key: &str, n: u32| {
        node.http
            .post(node.url("/notify"))
            .header("x-api-key", key)
            .json(&json!({"channel": "admin", "msg": n}))
            .send()
    };
    for n in 0..2 {
        assert_eq!(post(API_KEY, n).await.unwrap().status(), 200);
    }
    assert_rate_limited(post(API_KEY, 99).await.unwrap(), "notify_rate_per_key").await;
    // The key in the body counts against the same bucket.
    let in_body = json!({"API_KEY": API_KEY, "channel": "admin", "msg": 98});
    assert_eq!(node.notify(in_body).await.0, 429);
    // Another key has its own budget.
    assert_eq!(post(OTHER_API_KEY, 2).await.unwrap().status(), 200);
    for n in 0..3 {
        assert_eq!(
            socket.notification(Duration::from_secs(2)).await,
            Some(json!(n))
        );
    }
    assert_eq!(socket.notification(Duration::from_millis(300)).await, None);
    assert_eq!(refusals(&node, "notify_rate_per_key"), 2);
}

#[tokio::test]
async fn notify_is_rate_limited_per_client_address_before_the_key_is_checked() {
    let node = start(&[("CHANNELS_NOTIFY_RATE_PER_ADDRESS", "1:3")]).await;
    let bad_key = json!({"API_KEY": "guess", "channel": "admin", "msg": 1});
    for _ in 0..3 {
        assert_eq!(node.notify(bad_key.clone()).await.0, 401);
    }
    let answer = node
        .http
        .post(node.url("/notify"))
        .json(&bad_key)
        .send()
        .await
        .unwrap();
    assert_rate_limited(answer, "notify_rate_per_address").await;
    let good = json!({"API_KEY": API_KEY, "channel": "admin", "msg": 1});
    let from_second = client_from(SECOND)
        .post(node.url("/notify"))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(from_second.status(), 200);
}

#[tokio::test]
async fn limits_are_validated_at_start_up_and_shown_by_check_config() {
    let vars = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for (var, value) in [
        ("CHANNELS_CONNECT_RATE", "0"),
        ("CHANNELS_AUTHORIZE_RATE", "ten"),
        ("CHANNELS_NOTIFY_RATE_PER_KEY", "5:"),
        ("CHANNELS_MAX_SOCKETS_PER_USER", "0"),
        ("CHANNELS_MAX_JSON_DEPTH", "-1"),
        ("CHANNELS_CLIENT_ADDRESS_HEADER", "bad header"),
    ] {
        let error = channels::config::Config::from_vars(&vars(&[(var, value)]), true)
            .expect_err(var)
            .to_string();
        assert!(error.contains(var), "{error}");
    }
    let config = channels::config::Config::from_vars(
        &vars(&[("CHANNELS_NOTIFY_RATE_PER_ADDRESS", "off")]),
        true,
    )
    .unwrap();
    let described: std::collections::HashMap<_, _> = config.describe().iter().cloned().collect();
    assert_eq!(described["CHANNELS_NOTIFY_RATE_PER_ADDRESS"], "off");
    assert_eq!(described["CHANNELS_CONNECT_RATE"], "50:200 (default)");
    assert_eq!(described["CHANNELS_MAX_SOCKETS_PER_USER"], "32 (default)");
}
