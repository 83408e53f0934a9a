//! `GET /authorize`: upstream access tokens in, ws tokens out (SPEC.md).

mod common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use axum::{Router, routing::get};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

const JWKS: &str = include_str!("common/keys/jwks.json");
const RSA_KEY: &[u8] = include_bytes!("common/keys/rsa.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("common/keys/rsa.pub.pem");
const EC_KEY: &[u8] = include_bytes!("common/keys/ec.pem");

async fn authorize(node: &TestNode, token: Option<&str>) -> (u16, Value, Option<String>) {
    let mut request = node.http.get(node.url("/authorize"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap(), www)
}

fn assert_refused(answer: (u16, Value, Option<String>), why: &str) {
    let (status, body, www) = answer;
    assert_eq!(status, 401, "{why}: {body}");
    assert_eq!(body["error"], "unauthorized", "{why}");
    assert!(body["message"].is_string(), "{why}");
    assert_eq!(www.as_deref(), Some("Bearer"), "{why}");
}

/// Serves the test JWKS over HTTP and counts the fetches.
async fn jwks_server() -> (String, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    let app = Router::new().route(
        "/certs",
        get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { ([("content-type", "application/json")], JWKS) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/certs", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, fetches)
}

fn rsa_token(kid: &str, claims: Value) -> String {
    sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
        Some(kid),
        claims,
    )
}

#[tokio::test]
async fn a_valid_hs256_token_gets_a_ws_token_for_its_subject() {
    let node = start(&[]).await;
    let (status, body, _) = authorize(&node, Some(&upstream_token(claims("alice")))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["keycloakID"], "alice");
    assert_eq!(body["expiresIn"], 300);
    // The ws token opens a socket for that user.
    let auth = json!({"token": body["token"], "keycloakID": "alice", "channel": "admin"});
    assert!(SioClient::connect(node.addr, auth).await.is_ok());
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_against_a_jwks_url() {
    let (url, _) = jwks_server().await;
    let node = start(&[
        ("CHANNELS_AUTH_HS256_SECRET", ""),
        ("CHANNELS_AUTH_JWKS_URL", &url),
    ])
    .await;
    let (status, body, _) = authorize(&node, Some(&rsa_token("rsa-1", claims("rita")))).await;
    assert_eq!(
        (status, body["keycloakID"].as_str()),
        (200, Some("rita")),
        "{body}"
    );
    let es = sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
        Some("ec-1"),
        claims("eve"),
    );
    let (status, body, _) = authorize(&node, Some(&es)).await;
    assert_eq!(
        (status, body["keycloakID"].as_str()),
        (200, Some("eve")),
        "{body}"
    );
}

#[tokio::test]
async fn a_jwks_file_works_like_a_jwks_url() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/keys/jwks.json");
    let node = start(&[
        ("CHANNELS_AUTH_HS256_SECRET", ""),
        ("CHANNELS_AUTH_JWKS_FILE", path),
    ])
    .await;
    let (status, body, _) = authorize(&node, Some(&rsa_token("rsa-1", claims("rita")))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn alg_none_and_hs256_signed_with_the_rsa_public_key_are_refused() {
    let (url, _) = jwks_server().await;
    let node = start(&[
        ("CHANNELS_AUTH_HS256_SECRET", ""),
        ("CHANNELS_AUTH_JWKS_URL", &url),
    ])
    .await;
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    for alg in ["none", "None", "NONE"] {
        let token = format!(
            "{}.{}.",
            b64(json!({"alg": alg, "typ": "JWT", "kid": "rsa-1"})),
            b64(claims("mallory"))
        );
        assert_refused(authorize(&node, Some(&token)).await, alg);
    }
    // Key confusion: HS256 with the RSA public key (PEM bytes) as the HMAC secret.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUBLIC),
        Some("rsa-1"),
        claims("mallory"),
    );
    assert_refused(
        authorize(&node, Some(&confused)).await,
        "HS256 with the RSA public key",
    );
    // And an RS256 token against an HS256 node.
    let hs_node = start(&[]).await;
    assert_refused(
        authorize(&hs_node, Some(&rsa_token("rsa-1", claims("rita")))).await,
        "RS256 on HS256",
    );
}

#[tokio::test]
async fn expired_future_and_subjectless_tokens_are_refused() {
    let node = start(&[("CHANNELS_AUTH_LEEWAY", "5")]).await;
    let now = jsonwebtoken::get_current_timestamp();
    let cases = [
        ("expired", json!({"sub": "a", "exp": now - 60})),
        (
            "nbf in the future",
            json!({"sub": "a", "exp": now + 3600, "nbf": now + 600}),
        ),
        ("no sub", json!({"exp": now + 3600})),
        ("empty sub", json!({"sub": "", "exp": now + 3600})),
        ("no exp", json!({"sub": "a"})),
    ];
    for (why, claims) in cases {
        assert_refused(authorize(&node, Some(&upstream_token(claims))).await, why);
    }
    let wrong_secret = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-another-secret-000"),
        None,
        claims("a"),
    );
    assert_refused(authorize(&node, Some(&wrong_secret)).await, "wrong secret");
    assert_refused(authorize(&node, Some("not.a.jwt")).await, "garbage");
    assert_refused(authorize(&node, None).await, "no header");
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let node = start(&[
        ("CHANNELS_AUTH_ISSUER", "https://idp.example/realms/amper"),
        ("CHANNELS_AUTH_AUDIENCE", "channels"),
    ])
    .await;
    let mut good = claims("alice");
    good["iss"] = "https://idp.example/realms/amper".into();
    good["aud"] = json!(["account", "channels"]);
    assert_eq!(
        authorize(&node, Some(&upstream_token(good.clone())))
            .await
            .0,
        200
    );
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = "https://evil.example".into();
    assert_refused(
        authorize(&node, Some(&upstream_token(wrong_iss))).await,
        "wrong iss",
    );
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = "account".into();
    assert_refused(
        authorize(&node, Some(&upstream_token(wrong_aud))).await,
        "wrong aud",
    );
    let mut no_iss = good.clone();
    no_iss.as_object_mut().unwrap().remove("iss");
    assert_refused(
        authorize(&node, Some(&upstream_token(no_iss))).await,
        "missing iss",
    );
    let mut no_aud = good;
    no_aud.as_object_mut().unwrap().remove("aud");
    assert_refused(
        authorize(&node, Some(&upstream_token(no_aud))).await,
        "missing aud",
    );
}

#[tokio::test]
async fn a_ws_token_is_not_an_access_token_and_vice_versa() {
    // Even when both secrets were the same, the audience tells them apart; here
    // the ws token is signed with the ws secret, as a node mints it.
    let node = start(&[]).await;
    assert_refused(
        authorize(&node, Some(&ws_token("alice"))).await,
        "ws token upstream",
    );
    let access = upstream_token(claims("alice"));
    let auth = json!({"token": access, "keycloakID": "alice", "channel": "admin"});
    assert_eq!(
        SioClient::connect(node.addr, auth).await.err().as_deref(),
        Some("unauthorized")
    );
}

#[tokio::test]
async fn unknown_kids_refetch_the_jwks_at_a_bounded_rate() {
    let (url, fetches) = jwks_server().await;
    let node = start(&[
        ("CHANNELS_AUTH_HS256_SECRET", ""),
        ("CHANNELS_AUTH_JWKS_URL", &url),
    ])
    .await;
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "fetched once at start-up"
    );
    for i in 0..20 {
        let token = rsa_token(&format!("forged-{i}"), claims("mallory"));
        assert_refused(authorize(&node, Some(&token)).await, "unknown kid");
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "20 unknown kids cause one refetch"
    );
    // Known keys still work meanwhile.
    assert_eq!(
        authorize(&node, Some(&rsa_token("rsa-1", claims("rita"))))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn an_unreachable_jwks_url_refuses_tokens_without_failing_the_node() {
    // A port nothing listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/certs");
    let node = start(&[
        ("CHANNELS_AUTH_HS256_SECRET", ""),
        ("CHANNELS_AUTH_JWKS_URL", &url),
    ])
    .await;
    assert_refused(
        authorize(&node, Some(&rsa_token("rsa-1", claims("rita")))).await,
        "no keys",
    );
    let health = node.http.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}
