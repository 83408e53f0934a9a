//! A `/notify` poster: one keep-alive HTTP/1.1 connection, driven by
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
        if self.send.is_closed() {
            match open(self.server).await {
                Ok(send) => self.send = send,
                Err(_) => return false,
            }
        }
        if self.send.ready().await.is_err() {
            return false;
        }
        let request = Request::post("/notify")
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("x-api-key", HeaderValue::from_static(API_KEY))
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        match self.send.send_request(request).await {
            // The body is read to its end, so the connection takes the next call.
            Ok(response) => {
                let accepted = response.status().is_success();
                response.into_body().collect().await.is_ok() && accepted
            }
            Err(_) => false,
        }
    }
}

/// A new connection, its I/O driven by a task that ends with it.
async fn open(server: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    stream.set_nodelay(true)?;
    let (send, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(send)
}
