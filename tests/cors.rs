//! Pages on other origins (`CHANNELS_CORS_ORIGINS`): an allowed origin gets
//! CORS headers on every answer a page reads, preflights and refusals
//! included; any other origin gets none.

mod common;

use common::*;
use reqwest::{Method, Response};

const ORIGIN: &str = "https://app.example";

fn allowed_origin(r: &Response) -> Option<&str> {
    r.headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn an_allowed_origin_gets_cors_headers_on_every_answer() {
    let node = start(&[
        ("CHANNELS_CORS_ORIGINS", ORIGIN),
        ("CHANNELS_CONNECT_RATE", "1:1"),
    ])
    .await;
    let from_page = |method: Method, path: &str| {
        node.http
            .request(method, node.url(path))
            .header("origin", ORIGIN)
    };

    let r = from_page(Method::OPTIONS, "/notify")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-api-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a preflight");
    assert_eq!(allowed_origin(&r), Some(ORIGIN));
    assert!(
        r.headers().contains_key("x-request-id"),
        "a preflight carries its request id too"
    );

    let handshake = "/socket.io/?EIO=4&transport=polling";
    let r = from_page(Method::GET, handshake).send().await.unwrap();
    assert_eq!(r.status(), 200, "a long-polling handshake");
    assert_eq!(allowed_origin(&r), Some(ORIGIN));
    let r = from_page(Method::GET, handshake).send().await.unwrap();
    assert_eq!(r.status(), 429, "the next, past CHANNELS_CONNECT_RATE");
    assert_eq!(
        allowed_origin(&r),
        Some(ORIGIN),
        "the page can read why it was refused"
    );

    let r = from_page(Method::GET, "/authorize").send().await.unwrap();
    assert_eq!(r.status(), 401, "an API error");
    assert_eq!(allowed_origin(&r), Some(ORIGIN));

    let r = node
        .http
        .get(node.url("/healthz"))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the browser, not the node, enforces CORS");
    assert_eq!(allowed_origin(&r), None, "another origin");
}
