//! Deep and odd JSON sent to `/notify` and in the socket `auth` payload:
//! each is answered cleanly, none crashes or stalls the node, and what is
//! accepted reaches its socket byte for byte.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

/// Posts raw bytes as `application/json`; returns status and answer.
async fn post_raw(node: &TestNode, body: Vec<u8>) -> (u16, Value) {
    let r = node
        .http
        .post(node.url("/notify"))
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// `{"channel":"admin","msg":<msg>}` with `msg` spliced in as raw text.
fn body_with_msg(msg: &str) -> Vec<u8> {
    format!(r#"{{"channel":"admin","msg":{msg}}}"#).into_bytes()
}

fn assert_bad_request((status, answer): (u16, Value), why: &str, says: &str) {
    assert_eq!(status, 400, "{why}: {answer}");
    assert_eq!(answer["error"], "bad_request", "{why}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains(says), "{why}: {message}");
}

#[tokio::test]
async fn deep_huge_and_malformed_bodies_are_refused_cleanly_and_deliver_nothing() {
    let node = start(&[("CHANNELS_MAX_BODY_BYTES", "4194304")]).await;
    let mut socket = node.socket("alice", "admin").await;
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));

    let started = Instant::now();
    // A msg nested 100,000 levels deep: refused by the depth limit.
    assert_bad_request(
        post_raw(&node, body_with_msg(&deep(100_000))).await,
        "100k-deep msg",
        "nested deeper than 64 levels",
    );
    // The same depth in an object, and just past the limit.
    let objects = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
    assert_bad_request(
        post_raw(&node, body_with_msg(&objects)).await,
        "100k-deep objects",
        "nested deeper",
    );
    assert_bad_request(
        post_raw(&node, body_with_msg(&deep(65))).await,
        "65 levels",
        "nested deeper",
    );
    // Deep nesting elsewhere in the body: the API key field, an unknown field.
    let deep_key = format!(
        r#"{{"API_KEY":{},"channel":"admin","msg":1}}"#,
        deep(100_000)
    );
    let r = node
        .http
        .post(node.url("/notify"))
        .header("content-type", "application/json")
        .body(deep_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a 100k-deep API_KEY is not JSON we read");
    let deep_unknown = format!(r#"{{"x":{},"channel":"admin","msg":"ok"}}"#, deep(100_000));
    let (status, _) = post_raw(&node, deep_unknown.into_bytes()).await;
    assert_eq!(status, 200, "unknown fields are skipped without recursion");
    assert_eq!(socket.notification(WAIT).await, Some(json!("ok")));
    // Truncated deep JSON, invalid UTF-8, duplicate keys, lone surrogates.
    assert_bad_request(
        post_raw(&node, body_with_msg(&"[".repeat(100_000))).await,
        "unterminated",
        "not valid JSON",
    );
    let mut invalid_utf8 = body_with_msg(r#""abc""#);
    invalid_utf8.splice(26..26, [0xff, 0xfe, 0xc3]);
    assert_bad_request(
        post_raw(&node, invalid_utf8).await,
        "invalid UTF-8",
        "not valid JSON",
    );
    assert_bad_request(
        post_raw(&node, br#"{"channel":"admin","msg":1,"msg":2}"#.to_vec()).await,
        "duplicate msg",
        "duplicate field",
    );
    assert_bad_request(
        post_raw(
            &node,
            br#"{"channel":"admin","channel":"b2b","msg":1}"#.to_vec(),
        )
        .await,
        "duplicate channel",
        "duplicate field",
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the node answered every hostile body without stalling"
    );
    // None of the refused calls delivered anything.
    assert_eq!(socket.notification(Duration::from_millis(300)).await, None);
    assert_eq!(
        node.http
            .get(node.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn huge_numbers_odd_strings_and_a_1_mib_key_name_arrive_byte_for_byte() {
    let node = start(&[("CHANNELS_MAX_BODY_BYTES", "4194304")]).await;
    let mut socket = node.socket("alice", "admin").await;
    let big_key = "k".repeat(1024 * 1024);
    for msg in [
        "1e400".to_string(),
        "-123456789012345678901234567890123456789".to_string(),
        "0.000000000000000000000000000000000000001".to_string(),
        format!("{}1", "9".repeat(10_000)),
        r#""\ud800 lone surrogate escape""#.to_string(),
        r#"{"dup":1,"dup":2}"#.to_string(),
        r#""\u0000 nul and \u2028 separator""#.to_string(),
        format!(r#"{{"{big_key}":true}}"#),
    ] {
        let (status, answer) = post_raw(&node, body_with_msg(&msg)).await;
        assert_eq!(status, 200, "{}: {answer}", &msg[..msg.len().min(40)]);
        // The client parses the event; compare what it parsed to the same
        // text parsed here (serde_json reads 1e400 as an error, so those
        // are compared as raw text through the socket's packet).
        let got = socket.raw_notification(WAIT).await.expect("delivered");
        assert_eq!(got, msg, "delivered byte for byte");
    }
    // A 1 MiB key name in the body's own object is skipped like any unknown field.
    let body = format!(r#"{{"{big_key}":1,"channel":"admin","msg":"after"}}"#);
    assert_eq!(post_raw(&node, body.into_bytes()).await.0, 200);
    assert_eq!(
        socket.raw_notification(WAIT).await.as_deref(),
        Some(r#""after""#)
    );
    // With the default limit the same body is simply too large.
    let small = start(&[]).await;
    let body = format!(r#"{{"channel":"admin","msg":{{"{big_key}":1}}}}"#);
    assert_eq!(post_raw(&small, body.into_bytes()).await.0, 413);
}

#[tokio::test]
async fn odd_auth_payloads_are_refused_with_bad_request_or_unauthorized() {
    let node = start(&[]).await;
    let deep = format!("{}{}", "[".repeat(7_000), "]".repeat(7_000));
    for (auth, expected) in [
        (json!([1, 2, 3]), "bad_request"),
        (json!("a string"), "bad_request"),
        (
            json!({"keycloakID": ["alice"], "channel": "admin"}),
            "bad_request",
        ),
        (json!({"keycloakID": "alice", "channel": 12}), "bad_request"),
        (
            json!({"keycloakID": "alice", "channel": "admin", "token": 1e300}),
            "unauthorized",
        ),
        (
            json!({"keycloakID": "alice", "channel": "admin", "token": {"a": 1}}),
            "unauthorized",
        ),
        (
            json!({"keycloakID": "alice", "channel": "admin", "token": "x".repeat(9000)}),
            "unauthorized",
        ),
    ] {
        let got = SioClient::connect(node.addr, auth.clone()).await.err();
        assert_eq!(got.as_deref(), Some(expected), "{auth}");
    }
    // A 7,000-deep auth payload (14 KB, within the 16 KiB message limit) is
    // refused by serde_json's recursion limit, not by a crash.
    let got = SioClient::connect_raw(node.addr, &deep).await;
    assert_eq!(got.err().as_deref(), Some("bad_request"));
    assert_eq!(node.node.registry_stats().sockets, 0);
    assert!(
        node.socket("alice", "admin")
            .await
            .notification(Duration::ZERO)
            .await
            .is_none()
    );
}
