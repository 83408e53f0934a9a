//! `POST /notify`: the three variants, and every refusal of docs/protocol.md, each of
//! which delivers nothing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const QUIET: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn each_variant_is_answered_with_its_name_and_a_unique_id() {
    let node = start(&[]).await;
    let mut ids = std::collections::HashSet::new();
    for (body, variant) in [
        (
            json!({"API_KEY": API_KEY, "msg": 1, "channel": "admin"}),
            "channel",
        ),
        (
            json!({"API_KEY": API_KEY, "msg": 1, "keycloak": "alice"}),
            "user",
        ),
        (
            json!({"API_KEY": API_KEY, "msg": 1, "keycloak": "alice", "channel": "admin"}),
            "user_channel",
        ),
    ] {
        let (status, answer) = node.notify(body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["variant"], variant);
        assert!(ids.insert(answer["id"].as_str().unwrap().to_string()));
    }
}

#[tokio::test]
async fn the_key_may_come_in_the_x_api_key_header_and_any_listed_key_works() {
    let node = start(&[]).await;
    for key in [API_KEY, OTHER_API_KEY] {
        let r = node
            .http
            .post(node.url("/notify"))
            .header("x-api-key", key)
            .json(&json!({"msg": "hi", "channel": "admin"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = node
        .http
        .post(node.url("/notify"))
        .header("x-api-key", "wrong")
        .json(&json!({"API_KEY": API_KEY, "msg": "hi", "channel": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "a wrong header key is not rescued by the body"
    );
}

/// Sends a raw body and checks status and error code; a socket in channel
/// `admin` of user `alice` must receive nothing.
async fn refused(
    node: &TestNode,
    socket: &mut SioClient,
    content_type: &str,
    body: Vec<u8>,
    status: u16,
    code: &str,
) {
    let r = node
        .http
        .post(node.url("/notify"))
        .header("content-type", content_type)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).to_string();
    assert_eq!(r.status().as_u16(), status, "body {shown}");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["error"], code, "body {shown}: {answer}");
    assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(
        socket.notification(QUIET).await,
        None,
        "refused call delivered: {shown}"
    );
}

#[tokio::test]
async fn every_refusal_has_its_status_and_code_and_delivers_nothing() {
    let node = start(&[("CHANNELS_MAX_BODY_BYTES", "300000")]).await;
    let mut socket = node.socket("alice", "admin").await;
    let json = "application/json";
    let body = |v: Value| v.to_string().into_bytes();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (json, b"{not json".to_vec(), 400, "bad_request"),
        (json, b"".to_vec(), 400, "bad_request"),
        (json, body(json!([1, 2])), 400, "bad_request"),
        (json, body(json!("a string")), 400, "bad_request"),
        (
            json,
            body(json!({"API_KEY": API_KEY, "channel": "admin"})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": null, "channel": "admin"})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1, "channel": ""})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1, "channel": 7})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1, "keycloak": "alice", "channel": null})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1, "keycloak": ["alice"]})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1, "keycloak": ""})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1, "channel": "a".repeat(65)})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1, "channel": "ad min"})),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": 1, "keycloak": "a".repeat(257)})),
            400,
            "bad_request",
        ),
        (
            json,
            br#"{"API_KEY":"test-api-key","msg":1,"channel":"admin","channel":"admin"}"#.to_vec(),
            400,
            "bad_request",
        ),
        (
            json,
            body(json!({"msg": 1, "channel": "admin"})),
            401,
            "unauthorized",
        ),
        (
            json,
            body(json!({"API_KEY": "nope", "msg": 1, "channel": "admin"})),
            401,
            "unauthorized",
        ),
        (
            json,
            body(json!({"API_KEY": 42, "msg": 1, "channel": "admin"})),
            401,
            "unauthorized",
        ),
        (
            "text/plain",
            body(json!({"API_KEY": API_KEY, "msg": 1, "channel": "admin"})),
            415,
            "unsupported_media_type",
        ),
        (
            "application/x-www-form-urlencoded",
            b"API_KEY=x".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            json,
            body(json!({"API_KEY": API_KEY, "msg": "x".repeat(300_001), "channel": "admin"})),
            413,
            "payload_too_large",
        ),
    ];
    for (content_type, body, status, code) in cases {
        refused(&node, &mut socket, content_type, body, status, code).await;
    }
    // No content type at all.
    let r = node
        .http
        .post(node.url("/notify"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // And the socket still works afterwards.
    let (status, _) = node
        .notify(json!({"API_KEY": API_KEY, "msg": "ok", "channel": "admin"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(socket.notification(WAIT).await, Some(json!("ok")));
}

#[tokio::test]
async fn a_body_of_256_kib_is_always_accepted_and_the_default_limit_is_1_mib() {
    let node = start(&[]).await;
    let mut socket = node.socket("alice", "admin").await;
    let big = "é".repeat(128 * 1024); // 256 KiB of UTF-8
    let (status, answer) = node
        .notify(json!({"API_KEY": API_KEY, "msg": big, "channel": "admin"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(socket.notification(WAIT).await, Some(json!(big)));
    let too_big = "x".repeat(1024 * 1024);
    let (status, _) = node
        .notify(json!({"API_KEY": API_KEY, "msg": too_big, "channel": "admin"}))
        .await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_with_413() {
    let node = start(&[("CHANNELS_MAX_BODY_BYTES", "262144")]).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(br#"{"API_KEY":"test-api-key","channel":"admin","msg":""#.to_vec()),
        Ok(vec![b'x'; 300_000]),
        Ok(br#""}"#.to_vec()),
    ];
    let r = node
        .http
        .post(node.url("/notify"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn refusals_and_acceptances_are_counted_by_variant_and_outcome() {
    let node = start(&[]).await;
    node.notify(json!({"API_KEY": API_KEY, "msg": 1, "keycloak": "alice"}))
        .await;
    node.notify(json!({"API_KEY": "bad", "msg": 1, "keycloak": "alice"}))
        .await;
    assert_eq!(
        node.metric(r#"channels_notifications_total{outcome="accepted",variant="user"}"#)
            .await,
        1.0
    );
    assert_eq!(
        node.metric(r#"channels_notifications_total{outcome="rejected",variant="none"}"#)
            .await,
        1.0
    );
}
