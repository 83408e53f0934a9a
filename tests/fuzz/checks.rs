//! What each fuzz target checks, shared by the fuzz targets
//! (`fuzz_targets/*.rs`) and by `tests/fuzz_regressions.rs`, which replays
//! every seed and every input that once failed through the same code in the
//! normal test run.

#![allow(dead_code)] // Each fuzz target uses one of these checks.

use std::{sync::LazyLock, time::Duration};

use channels::{
    auth::{UpstreamVerifier, WsTokens},
    config::{Secret, UpstreamConfig, UpstreamKeySource},
    gateway::check_auth,
    http::notify::parse_body,
    limits::nested_deeper_than,
};
use serde_json::value::RawValue;

/// The `/notify` body, as the handler reads it: parse, validate, depth.
/// Whatever the bytes, the answer is a value or an error, never a panic; an
/// accepted message is one JSON value, forwarded as is; and the depth scan
/// never under-counts (serde_json's own parser stops at 128 levels).
pub fn notify_body(data: &[u8]) {
    let Ok(body) = parse_body(data) else { return };
    let Ok((_target, msg)) = body.validate() else {
        return;
    };
    serde_json::from_str::<&RawValue>(msg.get()).expect("an accepted msg is one JSON value");
    if !nested_deeper_than(msg.get(), 100)
        && let Err(e) = serde_json::from_str::<serde_json::Value>(msg.get())
    {
        // Numbers out of f64's range are fine; running out of depth is not.
        assert!(
            !e.to_string().contains("recursion limit"),
            "the scan found shallow a msg serde_json finds deeper than 128 levels"
        );
    }
}

/// The socket.io `auth` payload, as the connect middleware reads it: JSON
/// text (any bytes), then the field and token checks. Never a panic, and
/// nothing without a ws token minted with the node's secret is accepted.
pub fn socket_auth(data: &[u8]) {
    let auth = serde_json::from_slice(data).ok();
    if let Ok(credentials) = check_auth(&VERIFIERS.ws, auth) {
        panic!("accepted without a token minted by this secret: {credentials:?}");
    }
}

/// Both kinds of token on arbitrary text: the upstream verifier (HS256 and
/// JWKS modes) and the ws verifier. Never a panic, never an acceptance: the
/// fuzzer knows no key.
pub fn tokens(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let v = &*VERIFIERS;
    assert!(v.ws.verify(token).is_err(), "ws token accepted");
    v.runtime.block_on(async {
        assert!(v.hs256.verify(token).await.is_err(), "HS256 token accepted");
        assert!(v.jwks.verify(token).await.is_err(), "JWKS token accepted");
    });
}

struct Verifiers {
    runtime: tokio::runtime::Runtime,
    hs256: UpstreamVerifier,
    jwks: UpstreamVerifier,
    ws: WsTokens,
}

static VERIFIERS: LazyLock<Verifiers> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = |keys| UpstreamConfig {
        keys,
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(30),
    };
    // The test JWKS, embedded so the path works from either crate.
    let jwks_file = std::env::temp_dir().join(format!("channels-fuzz-{}.json", std::process::id()));
    std::fs::write(&jwks_file, include_str!("../common/keys/jwks.json")).unwrap();
    let (hs256, jwks) = runtime.block_on(async {
        let hs256 = UpstreamVerifier::new(&config(UpstreamKeySource::Hs256(Secret::new(
            "fuzz-upstream-secret-0123456789abcdef",
        ))))
        .await
        .unwrap();
        let jwks = UpstreamVerifier::new(&config(UpstreamKeySource::JwksFile(jwks_file)))
            .await
            .unwrap();
        (hs256, jwks)
    });
    Verifiers {
        runtime,
        hs256,
        jwks,
        ws: WsTokens::new(
            &Secret::new("fuzz-ws-token-secret-0123456789abcdef"),
            Duration::from_secs(300),
        ),
    }
});
