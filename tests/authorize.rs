//! `GET /authorize`: upstream access tokens in, ws tokens out (docs/protocol.md).

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
const ATTACKER_KEY: &[u8] = include_bytes!("common/keys/attacker-ec.pem");

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

/// A node verifying upstream tokens against the JWKS at `url`.
async fn jwks_url_node(url: &str) -> TestNode {
    start(&[
        ("CHANNELS_AUTH_HS256_SECRET", ""),
        ("CHANNELS_AUTH_JWKS_URL", url),
    ])
    .await
}

/// A node verifying upstream tokens against the test JWKS file.
async fn jwks_file_node() -> TestNode {
    start(&[
        ("CHANNELS_AUTH_HS256_SECRET", ""),
        (
            "CHANNELS_AUTH_JWKS_FILE",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/keys/jwks.json"),
        ),
    ])
    .await
}

/// Whether a valid RS256 token with the known kid is still accepted.
async fn known_key_works(node: &TestNode) -> bool {
    authorize(node, Some(&rsa_token("rsa-1", claims("rita"))))
        .await
        .0
        == 200
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
    let node = jwks_url_node(&url).await;
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
    let node = jwks_file_node().await;
    let (status, body, _) = authorize(&node, Some(&rsa_token("rsa-1", claims("rita")))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn alg_none_and_hs256_signed_with_the_rsa_public_key_are_refused() {
    let (url, _) = jwks_server().await;
    let node = jwks_url_node(&url).await;
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let hs_node = start(&[]).await;
    for alg in every_casing_of_none() {
        for kid in [json!("rsa-1"), Value::Null] {
            let token = format!(
                "{}.{}.",
                b64(json!({"alg": alg, "typ": "JWT", "kid": kid})),
                b64(claims("mallory"))
            );
            assert_refused(authorize(&node, Some(&token)).await, &alg);
            assert_refused(authorize(&hs_node, Some(&token)).await, &alg);
            // The same as a ws token, with and without a signature part.
            for token in [token.clone(), format!("{token}c2ln")] {
                let auth = json!({"token": token, "keycloakID": "mallory", "channel": "admin"});
                assert_eq!(
                    SioClient::connect(hs_node.addr, auth)
                        .await
                        .err()
                        .as_deref(),
                    Some("unauthorized"),
                    "{alg} as a ws token"
                );
            }
        }
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
    assert_refused(
        authorize(&hs_node, Some(&rsa_token("rsa-1", claims("rita")))).await,
        "RS256 on HS256",
    );
}

/// "none" in all 16 casings.
fn every_casing_of_none() -> Vec<String> {
    (0..16u32)
        .map(|mask| {
            "none"
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if mask & (1 << i) != 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn kids_with_path_traversal_or_injection_are_just_unknown_keys() {
    let (url, fetches) = jwks_server().await;
    let node = jwks_url_node(&url).await;
    let file_node = jwks_file_node().await;
    let long = "k".repeat(4000);
    for kid in [
        "../../../../../../etc/passwd",
        "/dev/zero",
        "file:///etc/shadow",
        "rsa-1/../rsa-1",
        "..%2f..%2fetc%2fpasswd",
        "rsa-1' OR '1'='1",
        "rsa-1\u{0}",
        "rsa-1\n",
        "$(touch /tmp/pwned)",
        "{{7*7}}",
        "http://127.0.0.1:1/certs",
        &long,
    ] {
        // Signed with the real key: only the kid is wrong.
        let token = rsa_token(kid, claims("mallory"));
        assert_refused(authorize(&node, Some(&token)).await, kid);
        assert_refused(authorize(&file_node, Some(&token)).await, kid);
    }
    assert!(
        fetches.load(Ordering::SeqCst) <= 2,
        "unknown kids refetch the configured URL at most once per 10 s, never anything else"
    );
    assert!(known_key_works(&node).await);
}

#[tokio::test]
async fn jku_x5u_and_embedded_jwk_headers_are_ignored() {
    let (url, _) = jwks_server().await;
    let (attacker_url, attacker_fetches) = jwks_server().await;
    let node = jwks_url_node(&url).await;
    attacker_fetches.store(0, Ordering::SeqCst);
    let attacker = EncodingKey::from_ec_pem(ATTACKER_KEY).unwrap();
    let attacker_jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&attacker, Algorithm::ES256).unwrap();
    for kid in ["ec-1", "attacker"] {
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        header.jku = Some(attacker_url.clone());
        header.x5u = Some(attacker_url.clone());
        header.jwk = Some(attacker_jwk.clone());
        let token = jsonwebtoken::encode(&header, &claims("mallory"), &attacker).unwrap();
        assert_refused(authorize(&node, Some(&token)).await, kid);
    }
    assert_eq!(
        attacker_fetches.load(Ordering::SeqCst),
        0,
        "jku/x5u are never fetched"
    );
    // The same headers on a token signed with a trusted key change nothing.
    let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
    header.kid = Some("ec-1".into());
    header.jku = Some(attacker_url);
    header.jwk = Some(attacker_jwk);
    let trusted = EncodingKey::from_ec_pem(EC_KEY).unwrap();
    let token = jsonwebtoken::encode(&header, &claims("eve"), &trusted).unwrap();
    assert_eq!(authorize(&node, Some(&token)).await.0, 200);
}

#[tokio::test]
async fn oversized_tokens_and_claims_are_refused_before_decoding() {
    let node = start(&[]).await;
    let mut fat = claims("mallory");
    fat["roles"] = json!(vec!["role".repeat(10); 300]); // ~12 KB of claims
    let (status, body, _) = authorize(&node, Some(&upstream_token(fat))).await;
    assert_eq!(status, 401);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("larger than 8192 bytes"),
        "{body}"
    );
    let long_sub = upstream_token(claims(&"s".repeat(4000)));
    let (status, body, _) = authorize(&node, Some(&long_sub)).await;
    assert_eq!(status, 401);
    assert!(
        body["message"].as_str().unwrap().contains("subject"),
        "{body}"
    );
    // A header far beyond any token: refused by the HTTP layer, node unharmed.
    let huge = format!("Bearer {}", "a".repeat(1024 * 1024));
    let r = node
        .http
        .get(node.url("/authorize"))
        .header("authorization", huge)
        .send()
        .await;
    assert!(r.map(|r| r.status().is_client_error()).unwrap_or(true));
    // An oversized ws token in the auth payload.
    let auth = json!({"token": "a".repeat(12_000), "keycloakID": "mallory", "channel": "admin"});
    assert_eq!(
        SioClient::connect(node.addr, auth).await.err().as_deref(),
        Some("unauthorized")
    );
    assert_eq!(
        authorize(&node, Some(&upstream_token(claims("a")))).await.0,
        200
    );
}

#[tokio::test]
async fn clock_skew_is_tolerated_up_to_the_leeway_and_not_beyond() {
    let node = start(&[("CHANNELS_AUTH_LEEWAY", "30")]).await;
    let strict = start(&[("CHANNELS_AUTH_LEEWAY", "0")]).await;
    let now = jsonwebtoken::get_current_timestamp();
    let expired_10s = json!({"sub": "a", "exp": now - 10});
    let expired_60s = json!({"sub": "a", "exp": now - 60});
    let early_10s = json!({"sub": "a", "exp": now + 3600, "nbf": now + 10});
    let early_60s = json!({"sub": "a", "exp": now + 3600, "nbf": now + 60});
    for (claims, with_leeway, without) in [
        (expired_10s, 200, 401),
        (expired_60s, 401, 401),
        (early_10s, 200, 401),
        (early_60s, 401, 401),
    ] {
        let token = upstream_token(claims.clone());
        assert_eq!(
            authorize(&node, Some(&token)).await.0,
            with_leeway,
            "{claims}"
        );
        assert_eq!(
            authorize(&strict, Some(&token)).await.0,
            without,
            "{claims}"
        );
    }
    // ws tokens are minted by the nodes themselves: 5 s of skew between nodes.
    let ws = |exp: u64| {
        let claims = json!({"sub": "a", "aud": "channels-ws", "iss": "channels", "exp": exp});
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(WS_SECRET.as_bytes()),
            None,
            claims,
        );
        json!({"token": token, "keycloakID": "a", "channel": "admin"})
    };
    assert!(SioClient::connect(node.addr, ws(now - 2)).await.is_ok());
    assert_eq!(
        SioClient::connect(node.addr, ws(now - 30))
            .await
            .err()
            .as_deref(),
        Some("unauthorized")
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
    let node = jwks_url_node(&url).await;
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
    assert!(known_key_works(&node).await);
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
    let node = jwks_url_node(&url).await;
    assert_refused(
        authorize(&node, Some(&rsa_token("rsa-1", claims("rita")))).await,
        "no keys",
    );
    let health = node.http.get(node.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}
