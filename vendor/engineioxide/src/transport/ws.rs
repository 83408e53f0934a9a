//! The ws transport module is responsible for handling websocket connections
//! The only public function is [`new_req`] which is used to upgrade a http request to a websocket connection
//!
//! Other functions are used internally to handle the websocket connection through tasks and channels
//! and to handle upgrade from polling to ws

use std::{
    future::{Future, poll_fn},
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, request::Parts};
use smallvec::smallvec;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::{Instant, Sleep},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        handshake::derive_accept_key,
        protocol::{Role, WebSocketConfig},
    },
};
use tokio_util::{future::FutureExt as _, sync::WaitForCancellationFuture};

use engineioxide_core::{Packet, PacketBuf, ProtocolVersion, Sid, Str, TransportType};

use crate::{
    DisconnectReason, Socket, body::ResponseBody, config::EngineIoConfig, engine::EngineIo,
    errors::Error, handler::EngineIoHandler, heartbeat::Heartbeat, queue,
    transport::make_open_packet,
};

/// Create a response for websocket upgrade
fn ws_response<B>(ws_key: &HeaderValue) -> Response<ResponseBody<B>> {
    let derived = derive_accept_key(ws_key.as_bytes());
    let sec = derived.parse::<HeaderValue>().unwrap();
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        )
        .header(http::header::SEC_WEBSOCKET_ACCEPT, sec)
        .body(ResponseBody::empty_response())
        .unwrap() // we are only using constants
}

/// Upgrade a websocket request to create a websocket connection.
///
/// If a sid is provided in the query it means that is is upgraded from an existing HTTP polling request.
/// In this case the http polling request is closed and the SID is kept for the websocket
pub fn new_req<R: Send + 'static, B, H: EngineIoHandler>(
    engine: Arc<EngineIo<H>>,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    mut req: Request<R>,
) -> Result<Response<ResponseBody<B>>, Error> {
    let ws_key = req
        .headers()
        .get("Sec-WebSocket-Key")
        .ok_or(Error::InvalidWebSocketKey)?
        .clone();

    // The task lives as long as the connection, and whatever it captures
    // stays in it: it takes only the upgrade's handle and the request's
    // head, boxed until the session opens.
    let upgrade = hyper::upgrade::on(&mut req);
    let mut parts = req.into_parts().0;
    // The socket keeps the head for its whole life: without the upgrade's
    // handle, an extension map left empty gives its table back, and the
    // key, answered below, is not kept.
    if parts.extensions.is_empty() {
        parts.extensions = http::Extensions::new();
    }
    // With a list of kept headers, the session keeps only those
    // (`EngineIo::create_session`): one copy of the map, not two.
    if engine.config.kept_headers.is_none() {
        parts.headers = without_key(std::mem::take(&mut parts.headers));
    }
    let parts = Box::new(parts);
    tokio::spawn(async move {
        let session = match upgrade.await {
            Ok(conn) => on_init(
                engine.clone(),
                hyper_util::rt::TokioIo::new(conn),
                protocol,
                sid,
                // Moved out of its box in a scope of its own: a box moved
                // out of is freed when its variable goes out of scope, here
                // at once rather than at the end of the session.
                {
                    let parts = parts;
                    *parts
                },
            ),
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("ws upgrade error: {}", _e);
                return;
            }
        };

        match session.await {
            Ok(_) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed")
            }
            Err(Error::MultipleWebsocketRequests) => {}
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed with error: {_e}");
                if let Some(sid) = sid {
                    engine.close_session(sid, DisconnectReason::TransportError);
                }
            }
        }
    });

    Ok(ws_response(&ws_key))
}

/// `headers` without `Sec-WebSocket-Key`, in a map just big enough for the
/// rest (a removal alone would keep the map's capacity).
fn without_key(headers: http::HeaderMap) -> http::HeaderMap {
    let key = headers
        .get_all(http::header::SEC_WEBSOCKET_KEY)
        .iter()
        .count();
    let kept = headers.len() - key;
    let mut rest = http::HeaderMap::with_capacity(kept);
    let mut name = None;
    for (key, value) in headers {
        // `into_iter` names a header once, before the first of its values.
        if key.is_some() {
            name = key;
        }
        if let Some(name) = &name
            && name != http::header::SEC_WEBSOCKET_KEY
        {
            rest.append(name.clone(), value);
        }
    }
    rest
}

/// Handle a websocket connection upgrade
///
/// Sends an open packet if it is not an upgrade from a polling request
///
/// Read packets from the websocket and handle them; the future resolves once the connection is closed
pub fn on_init<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> impl Future<Output = Result<(), Error>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The setup is boxed and freed once done: its arguments and futures
    // (the request's head, the upgrade's timeout and handshake above all)
    // would otherwise size this future, which lives as long as the
    // connection, at about twice what serving the websocket needs.
    let setup = Box::pin(open(engine.clone(), conn, protocol, sid, req_data));
    async move {
        let (socket, mut ws, mut heartbeat) = setup.await?;
        serve(&engine, &socket, &mut ws, heartbeat.as_mut()).await;
        Ok(())
    }
}

/// The socket and websocket of an open session, and the heartbeat that its
/// task runs: a new session's, not an upgraded one's (whose heartbeat task
/// started with its polling transport and goes on).
type Opened<D, S> = (Arc<Socket<D>>, WebSocketStream<S>, Option<Heartbeat>);

/// Opens the websocket session: a new one with its OPEN packet, or the
/// upgrade of a polling session (`sid`).
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", name = "init_websocket", skip(engine, conn, req_data))
)]
async fn open<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> Result<Opened<H::Data, S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(engine.config.ws_read_buffer_size)
        .write_buffer_size(engine.config.ws_write_buffer_size)
        .max_message_size(Some(engine.config.ws_max_message_size))
        .max_frame_size(Some(engine.config.ws_max_frame_size));

    let ws_init = move || WebSocketStream::from_raw_socket(conn, Role::Server, Some(ws_config));
    if let Some(sid) = sid {
        match engine.get_socket(sid) {
            None => Err(Error::UnknownSessionID(sid)),
            Some(socket) if socket.is_ws() => Err(Error::MultipleWebsocketRequests),
            Some(socket) => {
                let mut ws = ws_init().await;

                let upgrade_fut = upgrade_handshake::<H, S>(&socket, &mut ws);
                match tokio::time::timeout(engine.config.upgrade_timeout, upgrade_fut)
                    .with_cancellation_token(&socket.cancellation_token)
                    .await
                {
                    Some(Ok(res)) => res?,
                    Some(Err(_)) => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "ws upgrade timed out, closing session");
                        engine.close_session(socket.id, DisconnectReason::TransportError);
                        return Err(Error::Upgrade);
                    }
                    None => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "socket is being closed");
                        return Err(Error::Upgrade);
                    }
                }
                Ok((socket, ws, None))
            }
        }
    } else {
        let socket = engine.create_session(protocol, TransportType::Websocket, req_data, false);

        #[cfg(feature = "tracing")]
        tracing::debug!("new websocket connection");

        let mut ws = ws_init().await;
        init_handshake(socket.id, &mut ws, &engine.config).await?;
        let heartbeat = Heartbeat::new();
        Ok((socket, ws, Some(heartbeat)))
    }
}

/// How many messages the connection handles from its client in one poll
/// before it writes and lets other tasks run: a client that floods cannot
/// hold the worker thread or starve its own socket's writes.
const READS_PER_POLL: usize = 32;

/// Serves an open websocket session until it is closed: reads the client's
/// packets into the handler and writes the socket's packets to the client.
///
/// One task does both, with one [`Connection`] polled by hand, where
/// upstream spawns a reader and a writer over the two halves of a split
/// stream. A task costs its future's largest state for the whole life of
/// the connection, and the split costs a lock shared by the halves; for an
/// idle socket those were about 2.5 KB of the 8 KB it held.
async fn serve<H: EngineIoHandler, S>(
    engine: &Arc<EngineIo<H>>,
    socket: &Arc<Socket<H::Data>>,
    ws: &mut WebSocketStream<S>,
    heartbeat: Option<&mut Heartbeat>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A polling request that was in progress during the upgrade may still
    // hold the lock. Its wait is boxed: inline, it would size this future,
    // which lives as long as the connection.
    let mut internal_rx = match socket.internal_rx.try_lock() {
        Ok(internal_rx) => internal_rx,
        Err(_) => {
            let lock = socket.internal_rx.lock();
            let lock = lock.with_cancellation_token(&socket.cancellation_token);
            let Some(internal_rx) = Box::pin(lock).await else {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %socket.id, "session closed before the ws transport started");
                return;
            };
            internal_rx
        }
    };
    let cancelled = pin!(socket.cancellation_token.cancelled());
    let timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut connection = Connection {
        engine,
        socket,
        ws,
        buffered_rx: &mut internal_rx.buffered_rx,
        cancelled,
        heartbeat,
        timer,
        rest: None,
        unflushed: false,
        closing: false,
    };
    poll_fn(|cx| connection.poll(cx)).await;
}

/// The state of a websocket session between two polls of [`serve`].
struct Connection<'a, 'c, H: EngineIoHandler, S> {
    engine: &'a Arc<EngineIo<H>>,
    socket: &'a Arc<Socket<H::Data>>,
    ws: &'c mut WebSocketStream<S>,
    buffered_rx: &'a mut queue::Receiver<PacketBuf>,
    cancelled: Pin<&'c mut WaitForCancellationFuture<'a>>,
    /// The heartbeat, if this task runs it.
    heartbeat: Option<&'c mut Heartbeat>,
    /// The heartbeat's timer; once closing, the deadline of the close.
    timer: Pin<&'c mut Sleep>,
    /// The rest of the packets being written, waiting for room in the
    /// websocket.
    rest: Option<Box<<PacketBuf as IntoIterator>::IntoIter>>,
    /// Whether messages were given to the websocket since its last flush.
    unflushed: bool,
    /// The session is over: what is queued is still written, then the
    /// websocket is closed.
    closing: bool,
}

impl<H: EngineIoHandler, S> Connection<'_, '_, H, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Reads, runs the heartbeat, then writes; `Ready` once the session is
    /// over and the websocket closed, or given up.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.closing {
            let config = &self.engine.config;
            let timing = (config.ping_interval, config.ping_timeout);
            if self.cancelled.as_mut().poll(cx).is_ready() {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %self.socket.id, "socket is closing");
                self.start_closing();
            } else if let Poll::Ready(reason) = self.poll_read(cx) {
                self.engine.close_session(self.socket.id, reason);
                self.start_closing();
            } else if let Some(heartbeat) = self.heartbeat.as_mut()
                && heartbeat
                    .poll(self.timer.as_mut(), self.socket, timing, cx)
                    .is_ready()
            {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %self.socket.id, "heartbeat timeout");
                self.socket.close(DisconnectReason::HeartbeatTimeout);
                self.start_closing();
            }
        }
        if self.closing && self.timer.as_mut().poll(cx).is_ready() {
            // A client that takes nothing more, and leaves its connection
            // open, would otherwise keep this task and its memory for good.
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = %self.socket.id, "ws close timed out");
            return Poll::Ready(());
        }
        self.poll_write(cx)
    }

    /// From here on the task only writes what is queued and closes the
    /// websocket, within the ping timeout; the heartbeat is over, and its
    /// timer is the close's deadline.
    fn start_closing(&mut self) {
        self.closing = true;
        let deadline = Instant::now() + self.engine.config.ping_timeout;
        self.timer.as_mut().reset(deadline);
    }

    /// Hands what the client sent to the handler until nothing more can be
    /// read now (`Pending`) or the client's side is over (`Ready`, with the
    /// reason to close the session).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<DisconnectReason> {
        for _ in 0..READS_PER_POLL {
            let read = match ready!(self.ws.poll_next_unpin(cx)) {
                Some(Ok(msg)) => self.on_message(msg),
                Some(Err(e)) => Err(e.into()),
                None => Ok(false),
            };
            match read {
                Ok(true) => {}
                Ok(false) => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!(sid = %self.socket.id, "ws transport was closed");
                    return Poll::Ready(DisconnectReason::TransportClose);
                }
                Err(e) => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!("error when handling packet: {:?}", e);
                    return Poll::Ready(
                        Option::<DisconnectReason>::from(&e)
                            .unwrap_or(DisconnectReason::TransportError),
                    );
                }
            }
        }
        // More may be buffered: come back after the writes and other tasks.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Handles one message from the client; `false` when it closes the session.
    fn on_message(&self, msg: Message) -> Result<bool, Error> {
        let socket = self.socket;
        match msg {
            Message::Text(msg) => match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
                Packet::Close => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!("[sid={}] closing session", socket.id);
                    return Ok(false);
                }
                Packet::Pong | Packet::Ping => {
                    // A signal already pending means that the client is already known to be alive.
                    socket.heartbeat.received();
                }
                Packet::Message(msg) => self.engine.handler.on_message(msg, socket.clone()),
                p => return Err(Error::BadPacket(p)),
            },
            Message::Binary(mut data) => {
                if socket.protocol == ProtocolVersion::V3 && !data.is_empty() {
                    // The first byte is the message type, which we don't need.
                    data = data.split_off(1);
                }
                self.engine.handler.on_binary(data, socket.clone());
            }
            Message::Close(_) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("websocket closed, closing session");
                return Ok(false);
            }
            _ => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = ?socket.id, "unexpected ws message");
            }
        }
        Ok(true)
    }

    /// Writes the socket's packets in order, and flushes once nothing more
    /// is ready to write, so packets queued together leave in one write.
    /// Once closing, writes what is already queued, then flushes and closes
    /// the websocket (`Ready`).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            // Nothing is taken from the queue while the websocket has no
            // room: packets wait there, where senders see when it is full.
            if self.ws.poll_ready_unpin(cx).is_pending() {
                return Poll::Pending;
            }
            let packets = match self.rest.take() {
                Some(rest) => *rest,
                None => match self.poll_packets(cx) {
                    Poll::Ready(packets) => packets.into_iter(),
                    Poll::Pending if self.unflushed => {
                        #[cfg(feature = "tracing")]
                        tracing::trace!(sid = %self.socket.id, "ws flush");
                        ready!(self.ws.poll_flush_unpin(cx)).ok();
                        self.unflushed = false;
                        continue;
                    }
                    Poll::Pending if self.closing => {
                        #[cfg(feature = "tracing")]
                        tracing::trace!(sid = %self.socket.id, "ws closing");
                        ready!(self.ws.poll_close_unpin(cx)).ok();
                        return Poll::Ready(());
                    }
                    Poll::Pending => return Poll::Pending,
                },
            };
            self.feed(packets, cx);
        }
    }

    /// The next packets to write: the buffered ones before the volatile
    /// ones. Once closing, only buffered ones already queued.
    fn poll_packets(&mut self, cx: &mut Context<'_>) -> Poll<PacketBuf> {
        match self.buffered_rx.poll_recv(cx) {
            Poll::Ready(Some(packets)) => return Poll::Ready(packets),
            Poll::Ready(None) if !self.closing => self.start_closing(),
            Poll::Ready(None) => {}
            Poll::Pending => {}
        }
        if self.closing {
            return Poll::Pending;
        }
        let packets = ready!(self.socket.volatile.poll_take(cx));
        #[cfg(feature = "tracing")]
        tracing::debug!(sid = ?self.socket.id, "ws volatile flush: {} packets", packets.len());
        Poll::Ready(packets)
    }

    /// Gives the websocket the messages of `packets`, the first of which it
    /// has room for. Those it has no room for yet wait in `rest`: boxed,
    /// since the websocket is seldom full, and inline they would size the
    /// connection for its whole life.
    fn feed(&mut self, mut packets: <PacketBuf as IntoIterator>::IntoIter, cx: &mut Context<'_>) {
        while let Some(packet) = packets.next() {
            if let Some(message) = packet_message(self.socket.protocol, packet) {
                // An error here is the transport's: the reader sees it too
                // and closes the session. Until then packets are dropped.
                if let Err(_e) = self.ws.start_send_unpin(message) {
                    #[cfg(feature = "tracing")]
                    tracing::debug!("[sid={}] error sending packet: {_e}", self.socket.id);
                }
                self.unflushed = true;
            }
            if !packets.as_slice().is_empty() && self.ws.poll_ready_unpin(cx).is_pending() {
                self.rest = Some(Box::new(packets));
                return;
            }
        }
    }
}

/// The websocket message of a packet, if it has one.
fn packet_message(protocol: ProtocolVersion, packet: Packet) -> Option<Message> {
    match packet {
        Packet::Binary(bin) | Packet::BinaryV3(bin) => {
            if protocol == ProtocolVersion::V3 {
                // v3 protocol requires packet type as the first byte.
                // This requires a new buffer. This is OK as it is only for the V3 protocol.
                let mut buff = Vec::with_capacity(bin.len() + 1);
                buff.push(0x04);
                buff.extend(bin);
                Some(Message::Binary(buff.into()))
            } else {
                Some(Message::Binary(bin))
            }
        }
        // A Noop Packet maybe sent by the server to upgrade from a polling connection
        // In the case that the packet was not poll in time it will remain in the buffer and therefore
        // it should be discarded here
        Packet::Noop => None,
        packet => Some(Message::Text(String::from(packet).into())),
    }
}

/// Send a Engine.IO [`OpenPacket`] to initiate a websocket connection
async fn init_handshake<S>(
    sid: Sid,
    ws: &mut WebSocketStream<S>,
    config: &EngineIoConfig,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let packet = Packet::Open(make_open_packet(TransportType::Websocket, sid, config));
    let packet: String = packet.into();
    ws.send(Message::Text(packet.into())).await?;
    Ok(())
}

/// Upgrade a session from a polling request to a websocket request.
///
/// Before upgrading the session the server should send a NOOP packet to any pending polling request.
///
/// ## Handshake :
/// ```text
/// CLIENT                                                 SERVER
///│                                                      │
///│   GET /engine.io/?EIO=4&transport=websocket&sid=...  │
///│ ───────────────────────────────────────────────────► │
///│  ◄─────────────────────────────────────────────────┘ │
///│            HTTP 101 (WebSocket handshake)            │
///│                                                      │
///│            -----  WebSocket frames -----             │
///│  ─────────────────────────────────────────────────►  │
///│                         2probe                       │ (ping packet)
///│  ◄─────────────────────────────────────────────────  │
///│                         3probe                       │ (pong packet)
///│  ─────────────────────────────────────────────────►  │
///│                         5                            │ (upgrade packet)
///│                                                      │
///│            -----  WebSocket frames -----             │
/// ```
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", skip(socket, ws))
)]
async fn upgrade_handshake<H: EngineIoHandler, S>(
    socket: &Arc<Socket<H::Data>>,
    ws: &mut WebSocketStream<S>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[cfg(feature = "tracing")]
    tracing::debug!("starting websocket connection upgrade");

    // The socket is upgrading, from now on all polling
    // request will return a `Packet::Noop`
    socket.start_upgrade();

    // We send a last Noop request to close a potential waiting polling request.
    socket
        .internal_tx
        .send(smallvec![Packet::Noop])
        .await
        .map_err(|_| Error::Upgrade)?;

    // wait for any current polling connection to finish by waiting for the socket to be unlocked
    // All other polling connection will be immediately closed with a NOOP packet.
    let _lock = socket.internal_rx.lock().await;

    // Fetch the next packet from the ws stream, it should be a PingUpgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        _ => Err(Error::Upgrade)?,
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::PingUpgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("received first ping upgrade");
            // Respond with a PongUpgrade packet
            ws.send(Message::Text(String::from(Packet::PongUpgrade).into()))
                .await?;
        }
        p => Err(Error::BadPacket(p))?,
    };

    // Fetch the next packet from the ws stream, it should be an Upgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        Some(Ok(Message::Close(_))) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws stream closed before upgrade");
            Err(Error::Upgrade)?
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!("unexpected ws message before upgrade");
            Err(Error::Upgrade)?
        }
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::Upgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws upgraded successfully")
        }
        p => Err(Error::BadPacket(p))?,
    };

    socket.upgrade_to_websocket();
    Ok(())
}

fn ws_bytes_to_str(bytes: tungstenite::Utf8Bytes) -> Str {
    // SAFETY: the bytes are guaranteed to be valid UTF-8 by the tungstenite parser
    unsafe { Str::from_bytes_unchecked(bytes.into()) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http::Request;
    use tokio::io::DuplexStream;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(1);

    #[test]
    fn the_kept_head_has_no_websocket_key_and_every_other_header() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        headers.insert("x-request-id", "req-1".parse().unwrap());
        headers.append("x-twice", "1".parse().unwrap());
        headers.append("x-twice", "2".parse().unwrap());
        let rest = without_key(headers);
        assert!(!rest.contains_key(http::header::SEC_WEBSOCKET_KEY));
        assert_eq!(rest["x-request-id"], "req-1");
        let twice: Vec<_> = rest.get_all("x-twice").iter().collect();
        assert_eq!(twice, ["1", "2"]);
        assert_eq!(rest.len(), 3);
        assert!(without_key(http::HeaderMap::new()).is_empty());
    }

    /// Echoes every message back to its socket.
    #[derive(Debug)]
    struct EchoHandler;
    impl EngineIoHandler for EchoHandler {
        type Data = ();
        fn on_connect(self: Arc<Self>, _: Arc<Socket<()>>) {}
        fn on_disconnect(&self, _: Arc<Socket<()>>, _: DisconnectReason) {}
        fn on_message(self: &Arc<Self>, msg: Str, socket: Arc<Socket<()>>) {
            socket.emit(msg).unwrap();
        }
        fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
    }

    fn session() -> (Arc<EngineIo<EchoHandler>>, Arc<Socket<()>>) {
        session_with(EngineIoConfig::default())
    }

    fn session_with(config: EngineIoConfig) -> (Arc<EngineIo<EchoHandler>>, Arc<Socket<()>>) {
        let engine = Arc::new(EngineIo::new(Arc::new(EchoHandler), config));
        let socket = engine.create_session(
            ProtocolVersion::V4,
            TransportType::Websocket,
            Request::<()>::default().into_parts().0,
            false,
        );
        (engine, socket)
    }

    async fn ws_pair() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(1024);
        (
            WebSocketStream::from_raw_socket(server, Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    /// Serves `server` in a task of its own, as `on_init` does for an
    /// upgraded session (the heartbeat is not this task's).
    fn spawn_serve(
        engine: &Arc<EngineIo<EchoHandler>>,
        socket: &Arc<Socket<()>>,
        server: WebSocketStream<DuplexStream>,
    ) -> tokio::task::JoinHandle<()> {
        spawn_serve_with(engine, socket, server, None)
    }

    fn spawn_serve_with(
        engine: &Arc<EngineIo<EchoHandler>>,
        socket: &Arc<Socket<()>>,
        mut server: WebSocketStream<DuplexStream>,
        mut heartbeat: Option<Heartbeat>,
    ) -> tokio::task::JoinHandle<()> {
        let (engine, socket) = (engine.clone(), socket.clone());
        tokio::spawn(async move { serve(&engine, &socket, &mut server, heartbeat.as_mut()).await })
    }

    fn heartbeat_config(interval_ms: u64, timeout_ms: u64) -> EngineIoConfig {
        EngineIoConfig::builder()
            .ping_interval(Duration::from_millis(interval_ms))
            .ping_timeout(Duration::from_millis(timeout_ms))
            .build()
    }

    async fn next(client: &mut WebSocketStream<DuplexStream>) -> Message {
        tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("the server should send a message")
            .expect("the websocket should be open")
            .unwrap()
    }

    /// A polling request can still hold the lock at the end of an upgrade.
    #[tokio::test]
    async fn the_connection_waits_for_the_lock_of_a_polling_request() {
        let (engine, socket) = session();
        let (server, mut client) = ws_pair().await;

        let polling = socket.internal_rx.lock().await;
        let connection = spawn_serve(&engine, &socket, server);
        socket.emit(Str::from("hello")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!connection.is_finished(), "it should wait for the lock");
        let early = tokio::time::timeout(Duration::from_millis(20), client.next()).await;
        assert!(early.is_err(), "nothing is written without the lock");

        drop(polling);
        assert_eq!(next(&mut client).await, Message::text("4hello"));
    }

    #[tokio::test]
    async fn waiting_for_the_lock_stops_with_the_session() {
        let (engine, socket) = session();
        let (server, _client) = ws_pair().await;

        let _polling = socket.internal_rx.lock().await;
        let connection = spawn_serve(&engine, &socket, server);
        tokio::time::sleep(Duration::from_millis(20)).await;

        socket.cancellation_token.cancel();
        tokio::time::timeout(TIMEOUT, connection)
            .await
            .expect("the connection should stop")
            .unwrap();
    }

    /// One task reads the client's messages and writes the replies they
    /// cause, in order, more of them than one poll reads.
    #[tokio::test]
    async fn messages_are_read_and_their_replies_written_in_order() {
        let (engine, socket) = session();
        let (server, mut client) = ws_pair().await;
        let _connection = spawn_serve(&engine, &socket, server);

        let count = READS_PER_POLL * 3;
        for i in 0..count {
            client.feed(Message::text(format!("4m{i}"))).await.unwrap();
        }
        client.flush().await.unwrap();
        for i in 0..count {
            assert_eq!(next(&mut client).await, Message::text(format!("4m{i}")));
        }
    }

    /// A client that does not read fills the websocket: packets wait, and
    /// once it reads it gets every one, in order. (About 1.5 MB, far more
    /// than the websocket's 128 KiB write buffer and the pipe.)
    #[tokio::test]
    async fn a_slow_client_gets_every_packet_in_order() {
        let (engine, socket) = session();
        let (server, mut client) = ws_pair().await;
        let _connection = spawn_serve(&engine, &socket, server);

        let attachment = |i: usize, j: u8| Bytes::from(vec![j; 8 * 1024 + i]);
        for i in 0..64 {
            let data = (0..3).map(|j| attachment(i, j)).collect();
            socket
                .reserve()
                .unwrap()
                .emit_many(Str::from(format!("m{i}")), data);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..64 {
            assert_eq!(next(&mut client).await, Message::text(format!("4m{i}")));
            for j in 0..3 {
                assert_eq!(next(&mut client).await, Message::binary(attachment(i, j)));
            }
        }
    }

    /// Packets queued before the session is closed are still written,
    /// then the websocket is closed.
    #[tokio::test]
    async fn a_closed_session_writes_what_is_queued_then_closes() {
        let (engine, socket) = session();
        let (server, mut client) = ws_pair().await;
        let connection = spawn_serve(&engine, &socket, server);
        // Once an echo comes back, the connection holds the socket's queue.
        client.send(Message::text("4hi")).await.unwrap();
        assert_eq!(next(&mut client).await, Message::text("4hi"));

        socket.emit(Str::from("bye")).unwrap();
        socket.close(DisconnectReason::ClosingServer);
        assert_eq!(next(&mut client).await, Message::text("4bye"));
        assert_eq!(next(&mut client).await, Message::text("1"));
        assert!(matches!(next(&mut client).await, Message::Close(_)));
        tokio::time::timeout(TIMEOUT, connection)
            .await
            .expect("the connection should stop")
            .unwrap();
    }

    /// A client that closes its websocket closes the session.
    #[tokio::test]
    async fn the_client_closing_its_websocket_closes_the_session() {
        let (engine, socket) = session();
        let (server, mut client) = ws_pair().await;
        let connection = spawn_serve(&engine, &socket, server);

        client.close(None).await.unwrap();
        tokio::time::timeout(TIMEOUT, connection)
            .await
            .expect("the connection should stop")
            .unwrap();
        assert!(engine.get_socket(socket.id).is_none());
        assert!(socket.cancellation_token.is_cancelled());
    }

    /// The task that serves a new session runs its heartbeat: a ping at
    /// once and every interval while the client answers; when it stops,
    /// the session is closed for a heartbeat timeout.
    #[tokio::test]
    async fn the_heartbeat_pings_and_closes_a_silent_client() {
        let config = heartbeat_config(30, 30);
        let heartbeat = Heartbeat::new();
        let (engine, socket) = session_with(config);
        let (server, mut client) = ws_pair().await;
        let connection = spawn_serve_with(&engine, &socket, server, Some(heartbeat));

        for _ in 0..3 {
            assert_eq!(next(&mut client).await, Message::text("2"));
            client.send(Message::text("3")).await.unwrap();
        }
        assert_eq!(next(&mut client).await, Message::text("2"));
        // No answer: after 30 ms the session is closed.
        assert_eq!(next(&mut client).await, Message::text("1"));
        assert!(matches!(next(&mut client).await, Message::Close(_)));
        tokio::time::timeout(TIMEOUT, connection)
            .await
            .expect("the connection should stop")
            .unwrap();
        assert!(engine.get_socket(socket.id).is_none());
    }

    /// A client that takes nothing more and leaves its connection open
    /// cannot hold a closed session's task: it is given up after the ping
    /// timeout.
    #[tokio::test]
    async fn a_close_the_client_does_not_take_is_given_up() {
        let (engine, socket) = session_with(heartbeat_config(10_000, 50));
        let (server, client) = ws_pair().await;
        let connection = spawn_serve(&engine, &socket, server);

        // Far more than the pipe holds, never read.
        for i in 0..64 {
            socket.emit(format!("{i}{}", "x".repeat(1024))).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        socket.close(DisconnectReason::ClosingServer);
        tokio::time::timeout(TIMEOUT, connection)
            .await
            .expect("the connection should be given up")
            .unwrap();
        drop(client);
    }

    /// What one websocket session's task holds for its whole life is this
    /// future (plus the task's header and `new_req`'s few bytes). With
    /// rustc 1.95 it was 1,664 bytes for the reader alone, when the writer
    /// and the heartbeat were tasks of their own; it is 688 bytes for all
    /// three (720 over hyper's upgraded connection). tokio allocates task
    /// cells in 128-byte steps: up to 712 here the session's cell is 896
    /// bytes, above it 1,024. If this fails, see which await point holds
    /// what (`RUSTC_BOOTSTRAP=1 cargo rustc -p engineioxide --lib --profile
    /// test -- -Zprint-type-sizes`) before raising the bound.
    #[tokio::test]
    async fn a_session_future_stays_small() {
        let (engine, _) = session();
        let (server, _client) = tokio::io::duplex(64);
        let parts = Request::<()>::default().into_parts().0;
        let session = on_init(engine, server, ProtocolVersion::V4, None, parts);
        let size = std::mem::size_of_val(&session);
        assert!(size <= 712, "a session's future is {size} bytes");
    }
}
