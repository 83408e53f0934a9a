//! `/openapi.json` is kept true: schemathesis (from PyPI) generates requests
//! from it against a live node, and every answer must match the document
//! (status codes, headers, bodies), with no 5xx.

mod common;

use common::{API_KEY, claims, tools::require_pip, upstream_token};

/// Every check runs (schemathesis 4's default; a `--checks` option would
/// override the per-operation setting below), with two settings:
///
/// - A schema-valid `/notify` may be refused for what came before it: `409`
///   (schemathesis expects it) while a call with the same `Idempotency-Key`
///   is in progress, and `422` when the key was used with another body.
/// - `GET /presence` is not sent schema-violating queries expecting a
///   refusal: a query string has no types, so a `channel` or `keycloak`
///   generated as `false` or `null` arrives as a valid name. The fuzzer's
///   random seed found it once in CI (`?channel=false`, answered 200).
///   Refusals of a malformed presence query are `tests/presence.rs`'s.
const CONFIG: &str = r#"
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]

[[operations]]
include-path = "/presence"
include-method = "GET"
checks.negative_data_rejection.enabled = false
"#;

async fn schemathesis(node: &common::TestNode, headers: &[String]) -> (bool, String) {
    let config =
        std::env::temp_dir().join(format!("channels-schemathesis-{}.toml", node.addr.port()));
    std::fs::write(&config, CONFIG).unwrap();
    let mut command = tokio::process::Command::new("schemathesis");
    command.arg("--config-file").arg(&config).args([
        "run",
        &node.url("/openapi.json"),
        "--max-examples",
        "60",
    ]);
    for header in headers {
        command.args(["-H", header]);
    }
    let out = command.output().await.expect("schemathesis runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

#[tokio::test]
async fn every_answer_matches_the_openapi_document() {
    require_pip("schemathesis", "schemathesis");
    let node = common::start(&[]).await;
    let document: serde_json::Value = node
        .http
        .get(node.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/authorize",
        "/notify",
        "/notify/batch",
        "/disconnect",
        "/presence",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(
            document["paths"][path].is_object(),
            "{path} is not documented"
        );
    }
    // With credentials (the success paths), then without (the refusals).
    let with = [
        format!("X-API-Key: {API_KEY}"),
        format!("Authorization: Bearer {}", upstream_token(claims("alice"))),
    ];
    for headers in [&with[..], &[]] {
        let (ok, report) = schemathesis(&node, headers).await;
        assert!(ok, "schemathesis found problems:\n{report}");
    }
}
