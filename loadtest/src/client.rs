//! A lean socket.io client: one websocket (tokio-tungstenite with small
//! buffers) per connection, or HTTP long-polling on two keep-alive
//! connections as a browser holds them, and no client object beyond that.
//! It speaks just what the benchmarks need of Engine.IO v4 / Socket.IO v5:
//! the CONNECT with an `auth` payload, pongs, and `notification` events.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{
    Request,
    client::conn::http1::SendRequest,
    header::{HOST, HeaderValue},
};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{ClientRequestBuilder, Message, Utf8Bytes, protocol::WebSocketConfig},
};

use crate::poster::keep_alive;

/// The header a balancer names the client in (`CHANNELS_CLIENT_ADDRESS_HEADER`).
const FORWARDED_FOR: &str = "x-forwarded-for";

/// Bytes a websocket reads at once (see [`Client::connect`]).
const READ_BUFFER: usize = 512;

/// Connections per source address: below the ~28k ephemeral ports one
/// (source, destination) pair has, with a margin.
const PER_SOURCE: usize = 20_000;

/// Hands out local source addresses 127.0.0.1, 127.0.0.2, ... so that more
/// connections than one address has ports can reach one server.
pub struct Sources {
    next: AtomicUsize,
    /// Connections per address before the next.
    per_source: usize,
}

impl Sources {
    pub fn new() -> Self {
        Self {
            next: AtomicUsize::new(0),
            per_source: PER_SOURCE,
        }
    }

    /// Always 127.0.0.1, as a balancer's connections come from one address.
    /// Closed connections' ports come back (`tcp_tw_reuse` is on for
    /// loopback by default), so only those open at once must fit.
    pub fn one_address() -> Self {
        Self {
            next: AtomicUsize::new(0),
            per_source: usize::MAX,
        }
    }

    fn next(&self) -> IpAddr {
        let n = self.next.fetch_add(1, Ordering::Relaxed) / self.per_source;
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + n as u8))
    }
}

/// The payload every benchmark notification carries.
#[derive(Deserialize)]
pub struct Stamp {
    /// Wall-clock microseconds at the `/notify` call.
    pub t: u64,
    /// Sequence number, per target.
    pub n: u64,
}

/// The engine.io transport a client holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    #[default]
    Websocket,
    /// HTTP long-polling, never upgraded.
    Polling,
}

/// An open, connected socket.io client.
pub struct Client {
    wire: Wire,
    /// The session's pid from the CONNECT acknowledgement (recovery on).
    pub pid: Option<String>,
    /// Events that came before the CONNECT acknowledgement: Node's socket.io
    /// writes a recovered session's missed packets first. Read before the
    /// websocket.
    early: VecDeque<Utf8Bytes>,
}

/// What a connected client saw.
pub enum Event {
    Notification(Stamp),
    /// The server disconnected the socket or closed the connection (or it
    /// broke).
    Closed,
}

impl Client {
    /// Connects from the next source address and joins with `auth`; with
    /// `forwarded_for`, as a balancer's connection that names the client in
    /// `X-Forwarded-For`.
    pub async fn connect(
        server: SocketAddr,
        sources: &Sources,
        auth: &str,
        transport: Transport,
        forwarded_for: Option<IpAddr>,
    ) -> anyhow::Result<Self> {
        let forwarded_for = forwarded_for
            .map(|ip| HeaderValue::from_str(&ip.to_string()))
            .transpose()?;
        let wire = match transport {
            Transport::Websocket => {
                Wire::Websocket(websocket(server, sources, forwarded_for).await?)
            }
            Transport::Polling => {
                Wire::Polling(Polling::open(server, sources, forwarded_for).await?)
            }
        };
        let mut client = Client {
            wire,
            pid: None,
            early: VecDeque::new(),
        };
        let open = client.read_text().await.ok_or_else(|| anyhow!("no OPEN"))?;
        let Some(handshake) = open.strip_prefix('0') else {
            bail!("expected engine.io OPEN, got {open}");
        };
        if let Wire::Polling(polling) = &mut client.wire {
            polling.joined(handshake)?;
        }
        client.send(format!("40{auth}")).await?;
        loop {
            let packet = tokio::time::timeout(Duration::from_secs(10), client.read_text())
                .await
                .context("CONNECT answer timed out")?
                .ok_or_else(|| anyhow!("closed before CONNECT answer"))?;
            if let Some(ack) = packet.strip_prefix("40") {
                client.pid = serde_json::from_str::<serde_json::Value>(ack)
                    .ok()
                    .and_then(|ack| Some(ack.get("pid")?.as_str()?.to_string()));
                return Ok(client);
            }
            if packet.starts_with("44") {
                bail!("refused: {packet}");
            }
            if packet.starts_with("42") {
                client.early.push_back(packet);
            }
        }
    }

    /// The next notification, answering pings on the way.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let Some(text) = self.next_text().await else {
                return Event::Closed;
            };
            // socket.io's DISCONNECT: the server ended the session (channels
            // closes a slow client's connection instead, the end of
            // `next_text`).
            if text.starts_with("41") {
                return Event::Closed;
            }
            if let Some(stamp) = text
                .as_str()
                .strip_prefix(r#"42["notification","#)
                .and_then(|rest| rest.strip_suffix(']'))
                // The message, then (recovery on) its offset: the first value.
                .and_then(|payload| {
                    serde_json::Deserializer::from_str(payload)
                        .into_iter()
                        .next()?
                        .ok()
                })
            {
                return Event::Notification(stamp);
            }
        }
    }

    /// The next notification with its offset (recovery on), answering pings
    /// on the way; `None` once closed. Parses both values, unlike
    /// [`Client::next_event`], which the fan-out generator keeps lean.
    pub async fn next_with_offset(&mut self) -> Option<(Stamp, Option<String>)> {
        loop {
            let text = self.next_text().await?;
            let Some(args) = text
                .as_str()
                .strip_prefix(r#"42["notification","#)
                .and_then(|rest| rest.strip_suffix(']'))
            else {
                continue;
            };
            let mut values =
                serde_json::Deserializer::from_str(args).into_iter::<serde_json::Value>();
            let stamp = values.next()?.ok()?;
            let stamp: Stamp = serde_json::from_value(stamp).ok()?;
            let offset = serde_json::from_str::<String>(
                args[values.byte_offset()..].trim_start_matches([',', ' ']),
            )
            .ok();
            return Some((stamp, offset));
        }
    }

    /// Closes the connection, as a dropped one.
    pub async fn close(self) {
        match self.wire {
            Wire::Websocket(mut ws) => {
                let _ = ws.close(None).await;
            }
            // engine.io's CLOSE packet.
            Wire::Polling(mut polling) => {
                let _ = polling.post("1").await;
            }
        }
    }

    /// Sends one engine.io packet.
    async fn send(&mut self, packet: String) -> anyhow::Result<()> {
        match &mut self.wire {
            Wire::Websocket(ws) => ws.send(Message::text(packet)).await?,
            Wire::Polling(polling) => polling.post(&packet).await?,
        }
        Ok(())
    }

    /// The next text frame: an early one, or the websocket's.
    async fn next_text(&mut self) -> Option<Utf8Bytes> {
        match self.early.pop_front() {
            Some(early) => Some(early),
            None => self.read_text().await,
        }
    }

    /// The next engine.io packet but pings, which it answers. A websocket
    /// frame's bytes are handed over as tungstenite read them, not copied.
    async fn read_text(&mut self) -> Option<Utf8Bytes> {
        loop {
            let packet = match &mut self.wire {
                Wire::Websocket(ws) => match ws.next().await? {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => continue,
                },
                Wire::Polling(polling) => polling.next().await?,
            };
            if packet.as_str() == "2" {
                self.send("3".into()).await.ok()?;
                continue;
            }
            return Some(packet);
        }
    }
}

/// A client's connection(s) to the server.
enum Wire {
    Websocket(WebSocketStream<TcpStream>),
    Polling(Polling),
}

/// Opens a websocket from the next source address.
async fn websocket(
    server: SocketAddr,
    sources: &Sources,
    forwarded_for: Option<HeaderValue>,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let stream = tcp(server, sources).await?;
    let mut url = ClientRequestBuilder::new(
        format!("ws://{server}/socket.io/?EIO=4&transport=websocket").parse()?,
    );
    if let Some(client) = forwarded_for {
        url = url.with_header(FORWARDED_FOR, client.to_str()?);
    }
    // tungstenite zeroes the whole read buffer before every read: a
    // notification frame is under 100 bytes, so 4 KiB would be mostly
    // memset (seen in perf). 512 bytes still take a few frames at once.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .context("websocket handshake")?;
    Ok(ws)
}

/// A TCP connection from the next source address, without Nagle's delay.
async fn tcp(server: SocketAddr, sources: &Sources) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    bind_address_no_port(&socket)?;
    socket.bind(SocketAddr::new(sources.next(), 0))?;
    let stream = socket.connect(server).await.context("tcp connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An engine.io long-polling session: the long-poll GETs on one keep-alive
/// connection and the POSTs (the CONNECT, pongs) on another, as a browser
/// holds them, so a pong never waits for a pending poll.
struct Polling {
    gets: SendRequest<Full<Bytes>>,
    posts: SendRequest<Full<Bytes>>,
    /// `Host`: Node's HTTP server refuses an HTTP/1.1 request without it.
    host: HeaderValue,
    forwarded_for: Option<HeaderValue>,
    /// The session's path, with its sid once the OPEN packet gave it.
    path: String,
    /// Packets of the last poll not yet read: a poll's answer holds every
    /// packet that waited, separated by U+001E.
    pending: VecDeque<Utf8Bytes>,
}

impl Polling {
    /// Opens both connections from the next source addresses.
    async fn open(
        server: SocketAddr,
        sources: &Sources,
        forwarded_for: Option<HeaderValue>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            gets: keep_alive(tcp(server, sources).await?).await?,
            posts: keep_alive(tcp(server, sources).await?).await?,
            host: HeaderValue::from_str(&server.to_string())?,
            forwarded_for,
            path: "/socket.io/?EIO=4&transport=polling".into(),
            pending: VecDeque::new(),
        })
    }

    /// Takes the session id from the OPEN packet's `handshake`.
    fn joined(&mut self, handshake: &str) -> anyhow::Result<()> {
        #[derive(Deserialize)]
        struct Handshake {
            sid: String,
        }
        let Handshake { sid } = serde_json::from_str(handshake).context("OPEN packet")?;
        self.path.push_str("&sid=");
        self.path.push_str(&sid);
        Ok(())
    }

    /// The next packet: a pending one, or the next poll's first.
    async fn next(&mut self) -> Option<Utf8Bytes> {
        while self.pending.is_empty() {
            let request = self.request(Request::get(&self.path), Bytes::new()).ok()?;
            self.gets.ready().await.ok()?;
            let response = self.gets.send_request(request).await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let body = response.into_body().collect().await.ok()?.to_bytes();
            for packet in body.split(|b| *b == 0x1e) {
                self.pending
                    .push_back(Utf8Bytes::try_from(body.slice_ref(packet)).ok()?);
            }
        }
        self.pending.pop_front()
    }

    /// A request of this session, with its headers.
    fn request(
        &self,
        builder: hyper::http::request::Builder,
        body: Bytes,
    ) -> hyper::http::Result<Request<Full<Bytes>>> {
        let mut builder = builder.header(HOST, self.host.clone());
        if let Some(client) = &self.forwarded_for {
            builder = builder.header(FORWARDED_FOR, client.clone());
        }
        builder.body(Full::new(body))
    }

    /// POSTs one packet.
    async fn post(&mut self, packet: &str) -> anyhow::Result<()> {
        let request = self.request(
            Request::post(&self.path),
            Bytes::copy_from_slice(packet.as_bytes()),
        )?;
        self.posts.ready().await?;
        let response = self.posts.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        anyhow::ensure!(status.is_success(), "polling POST answered {status}");
        Ok(())
    }
}

/// Binding a source address with port 0 makes the kernel pick a port unique
/// across every destination at `bind` time, a search that slows down as
/// thousands of sockets are bound. `IP_BIND_ADDRESS_NO_PORT` defers the pick
/// to `connect`, where only (source, destination) pairs must be unique.
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
