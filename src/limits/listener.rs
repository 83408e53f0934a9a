//! The node's TCP listener, with a cap on open connections
//! (`CHANNELS_MAX_CONNECTIONS`, lowered to what the descriptor limit allows:
//! [`super::descriptors`]).
//!
//! Every accepted connection holds a semaphore permit until its socket is
//! dropped, whatever it carries (an HTTP call, a polling or a websocket
//! transport). Past the cap, up to [`OVER_CAP`] more connections are taken
//! to answer them: `/healthz`, `/readyz` and `/metrics` as usual, so that
//! a node full of connections still tells its load balancer and its
//! monitoring how it is, and anything else a `503` (`crate::server`). Past
//! those too, a connection is closed at once. The node's descriptors and
//! memory stay bounded however many connections are attempted.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::Limiters;
use crate::metrics::{Limit, Metrics};

/// Connections taken past the cap, at most, to answer them.
pub const OVER_CAP: usize = 128;

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

/// A `TcpListener` that holds at most `max` connections open, and
/// [`OVER_CAP`] more to answer.
pub struct ConnectionLimit {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    over_cap: Arc<Semaphore>,
    limiters: Limiters,
    metrics: Metrics,
}

/// Whether an accepted connection is within the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Within,
    /// Past the cap: served `/healthz`, `/readyz` and `/metrics` only.
    OverCap,
}

impl ConnectionLimit {
    pub fn new(listener: TcpListener, max: usize, limiters: Limiters, metrics: Metrics) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            over_cap: Arc::new(Semaphore::new(OVER_CAP)),
            limiters,
            metrics,
        }
    }

    /// The next connection, and whether it is within the cap.
    pub async fn accept(&mut self) -> (Counted, SocketAddr, Place) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            };
            let (permit, place) = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => (permit, Place::Within),
                Err(_) => {
                    self.limiters.refused(Limit::MaxConnections);
                    match self.over_cap.clone().try_acquire_owned() {
                        Ok(permit) => (permit, Place::OverCap),
                        Err(_) => continue, // Dropped: closed now.
                    }
                }
            };
            // Notifications are small writes that must leave at once.
            let _ = stream.set_nodelay(true);
            let gauge = (place == Place::Within).then(|| {
                let gauge = self.metrics.handles().connections.clone();
                gauge.inc();
                gauge
            });
            return (
                Counted {
                    stream,
                    _permit: permit,
                    gauge,
                },
                addr,
                place,
            );
        }
    }
}

/// Errors about one connection are skipped; others
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

/// An accepted connection: releases its place when dropped.
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// `channels_connections`, which counts the connections within the cap.
    gauge: Option<prometheus::IntGauge>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.dec();
        }
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
