//! A lean socket.io client: one websocket (tokio-tungstenite with small
//! buffers) per connection, no client object beyond it. It speaks just what
//! the benchmarks need of Engine.IO v4 / Socket.IO v5: the CONNECT with an
//! `auth` payload, pongs, and `notification` events.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, Utf8Bytes, protocol::WebSocketConfig},
};

/// Bytes a websocket reads at once (see [`Client::connect`]).
const READ_BUFFER: usize = 512;

/// Connections per source address: below the ~28k ephemeral ports one
/// (source, destination) pair has, with a margin.
const PER_SOURCE: usize = 20_000;

/// Hands out local source addresses 127.0.0.1, 127.0.0.2, ... so that more
/// connections than one address has ports can reach one server.
pub struct Sources {
    next: AtomicUsize,
}

impl Sources {
    pub fn new() -> Self {
        Self {
            next: AtomicUsize::new(0),
        }
    }

    fn next(&self) -> IpAddr {
        let n = self.next.fetch_add(1, Ordering::Relaxed) / PER_SOURCE;
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

/// An open, connected socket.io client.
pub struct Client {
    ws: WebSocketStream<TcpStream>,
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
    /// The server closed the connection (or it broke).
    Closed,
}

impl Client {
    /// Connects from the next source address and joins with `auth`.
    pub async fn connect(
        server: SocketAddr,
        sources: &Sources,
        auth: &str,
    ) -> anyhow::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        bind_address_no_port(&socket)?;
        socket.bind(SocketAddr::new(sources.next(), 0))?;
        let stream = socket.connect(server).await.context("tcp connect")?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{server}/socket.io/?EIO=4&transport=websocket");
        // tungstenite zeroes the whole read buffer before every read: a
        // notification frame is under 100 bytes, so 4 KiB would be mostly
        // memset (seen in perf). 512 bytes still take a few frames at once.
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .context("websocket handshake")?;
        let mut client = Client {
            ws,
            pid: None,
            early: VecDeque::new(),
        };
        let open = client.read_text().await.ok_or_else(|| anyhow!("no OPEN"))?;
        if !open.starts_with('0') {
            bail!("expected engine.io OPEN, got {open}");
        }
        client.ws.send(Message::text(format!("40{auth}"))).await?;
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

    /// Closes the websocket, as a dropped connection.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// The next text frame: an early one, or the websocket's.
    async fn next_text(&mut self) -> Option<Utf8Bytes> {
        match self.early.pop_front() {
            Some(early) => Some(early),
            None => self.read_text().await,
        }
    }

    /// The next text frame from the websocket but pings, which it answers.
    /// The frame's bytes are handed over as tungstenite read them, not
    /// copied.
    async fn read_text(&mut self) -> Option<Utf8Bytes> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) if t.as_str() == "2" => {
                    self.ws.send(Message::text("3")).await.ok()?;
                }
                Ok(Message::Text(t)) => return Some(t),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
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
