//! A `/notify` (or `/presence`) caller: one keep-alive HTTP/1.1 connection, driven by
//! hyper's connection-level client, one call at a time.
//!
//! The generator shares the machine's cores with the server it measures, so
//! every microsecond it spends per call is taken from the server. reqwest,
//! which it used before, parses the URL, checks a connection out of its pool
//! and builds a header map again for every call; here the headers are built
//! once and a call is a write and a read on a connection of its own.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request,
    client::conn::http1::{self, SendRequest},
    header::{CONTENT_TYPE, HOST, HeaderValue},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::servers::API_KEY;

/// One poster's connection to one server.
pub struct Poster {
    server: SocketAddr,
    send: SendRequest<Full<Bytes>>,
    /// `Host`: Node's HTTP server refuses an HTTP/1.1 request without it.
    host: HeaderValue,
}

impl Poster {
    pub async fn connect(server: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            server,
            send: open(server).await?,
            host: HeaderValue::from_str(&server.to_string())?,
        })
    }

    /// Posts one JSON `body` to `/notify`; whether it was accepted (2xx). A
    /// connection the server closed is opened again for the next call.
    pub async fn post(&mut self, body: String) -> bool {
        self.post_to("/notify", body).await
    }

    /// Posts one JSON `body` to `path` (`/notify/batch`); whether it was
    /// accepted (2xx).
    pub async fn post_to(&mut self, path: &str, body: String) -> bool {
        let request = Request::post(path)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body)));
        self.call(request).await.is_some()
    }

    /// `GET path` (`/presence?…`); the answer's body if it was 2xx.
    pub async fn get(&mut self, path: &str) -> Option<Bytes> {
        self.call(Request::get(path).body(Full::new(Bytes::new())))
            .await
    }

    /// Sends one call with the host and the API key; the answer's body if
    /// it was 2xx.
    async fn call(&mut self, request: hyper::http::Result<Request<Full<Bytes>>>) -> Option<Bytes> {
        if self.send.is_closed() {
            self.send = open(self.server).await.ok()?;
        }
        self.send.ready().await.ok()?;
        let mut request = request.expect("a valid request");
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert("x-api-key", HeaderValue::from_static(API_KEY));
        let response = self.send.send_request(request).await.ok()?;
        let accepted = response.status().is_success();
        // The body is read to its end, so the connection takes the next call.
        let body = response.into_body().collect().await.ok()?.to_bytes();
        accepted.then_some(body)
    }
}

/// A new connection, its I/O driven by a task that ends with it.
async fn open(server: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    stream.set_nodelay(true)?;
    keep_alive(stream).await
}

/// An HTTP/1.1 keep-alive client on `stream`, its I/O driven by a task
/// that ends with it (posters, and long-polling clients).
pub async fn keep_alive(stream: TcpStream) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let (send, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(send)
}
