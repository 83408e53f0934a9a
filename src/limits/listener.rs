//! The node's TCP listener, with a cap on open connections
//! (`CHANNELS_MAX_CONNECTIONS`).
//!
//! Every accepted connection holds a semaphore permit until its socket is
//! dropped, whatever it carries (an HTTP call, a polling or a websocket
//! transport). Past the cap, a connection is accepted, answered a fixed
//! `503` and closed: the client (or the load balancer, which then tries
//! another node) sees a clear answer rather than a hang, and the node's
//! memory stays bounded however many connections are attempted.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{extract::connect_info::Connected, serve::IncomingStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::Limiters;
use crate::metrics::Metrics;

/// The answer to a connection past the cap.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 73\r\n\r\n\
{\"error\":\"unavailable\",\"message\":\"this node is at its connection limit\"}\n";

/// How long a refused connection may take to read [`FULL`].
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Listens on `addr` with room for `backlog` connections not yet accepted.
///
/// `TcpListener::bind` asks for 128, std's value. A busy node (one worker
/// thread handshaking, a burst of reconnects after a deploy) falls behind
/// its accepts for milliseconds at a time; past a full backlog the kernel
/// drops the client's SYN, and the client retries only after TCP's initial
/// timeout, a whole second. Address reuse is on, as `bind` sets it, so a
/// restarted node can bind while its old connections are in `TIME_WAIT`.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A `TcpListener` that holds at most `max` connections open.
pub struct ConnectionLimit {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    limiters: Limiters,
    metrics: Metrics,
}

impl ConnectionLimit {
    pub fn new(listener: TcpListener, max: usize, limiters: Limiters, metrics: Metrics) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            limiters,
            metrics,
        }
    }
}

impl axum::serve::Listener for ConnectionLimit {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Counted, SocketAddr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.limiters.refused("max_connections");
                tokio::spawn(refuse(stream));
                continue;
            };
            // Notifications are small writes that must leave at once.
            let _ = stream.set_nodelay(true);
            self.metrics.handles().connections.inc();
            let gauge = self.metrics.handles().connections.clone();
            return (
                Counted {
                    stream,
                    _permit: permit,
                    gauge,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        stream.write_all(FULL).await?;
        stream.shutdown().await
    })
    .await;
}

/// As `axum::serve` does: errors about one connection are skipped; others
/// (such as running out of file descriptors) are logged, and accepting
/// pauses for a second so the node does not spin.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// An accepted connection: releases its place under the cap when dropped.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The peer address of a connection, as request extension
/// `ConnectInfo<PeerAddr>` (see [`super::Limiters::client_address`]).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, ConnectionLimit>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, ConnectionLimit>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}
