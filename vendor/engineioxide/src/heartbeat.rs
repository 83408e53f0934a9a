//! The heartbeat of a socket, as a state machine that its transport's task
//! polls with a timer of its own.
//!
//! Upstream runs the heartbeat as a task of its own for every socket (an
//! async loop around `tokio::time::interval` and a `Notify`). A websocket
//! session now polls it from the task that serves the websocket
//! (`transport::ws::serve`), which saves that task (about 640 bytes of an
//! idle socket: the task, its future and its interval); a polling session
//! still has a task, that polls the same state machine
//! ([`Socket::spawn_heartbeat`]). The behaviour is upstream's but for the
//! first ping:
//!
//! - v4: the server sends a ping every `interval`, the first one `interval`
//!   after the session opened (upstream sends it at once; engine.io's Node
//!   server, the reference, after the interval), and the client answers
//!   each with a pong within `timeout`. No ping is sent while the socket is
//!   being upgraded.
//! - v3: the client sends the pings, at least every `interval + timeout`,
//!   and the server answers each with a pong.
//!
//! A failed heartbeat is a missing answer, or a ping or pong that cannot be
//! queued because the socket's queue is full.

use std::{
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll, ready},
    time::Duration,
};

use engineioxide_core::Packet;
#[cfg(feature = "v3")]
use engineioxide_core::ProtocolVersion;
use futures_util::task::AtomicWaker;
use smallvec::smallvec;
use tokio::time::{Instant, Sleep};

use crate::socket::Socket;

/// Tells the heartbeat that the client's pong (v4) or ping (v3) came. At
/// most one is kept, as upstream's `Notify` did: a second one before the
/// heartbeat looks is the same news.
#[derive(Debug, Default)]
pub(crate) struct Beat {
    received: AtomicBool,
    heartbeat: AtomicWaker,
}

impl Beat {
    /// Called by the transport that read the client's packet.
    pub(crate) fn received(&self) {
        self.received.store(true, Ordering::Release);
        self.heartbeat.wake();
    }

    fn take(&self) -> bool {
        self.received.swap(false, Ordering::AcqRel)
    }

    /// `Ready` once a beat came, which it takes; the waker is registered
    /// before the second look, so a beat between the two is not missed.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.take() {
            return Poll::Ready(());
        }
        self.heartbeat.register(cx.waker());
        if self.take() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The heartbeat of one socket: where it is in its cycle. The timer is the
/// caller's, so that the websocket's task can also use it once the
/// heartbeat is over (for its closing deadline), and so are the interval
/// and the timeout, given at each poll: the websocket's task holds this
/// for the connection's life, and 32 bytes more took its task's memory to
/// the next 128-byte step (tokio's task cells come in those).
#[derive(Debug)]
pub(crate) struct Heartbeat {
    phase: Phase,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Not polled yet: the timer is set by the first poll.
    Start,
    /// v4: the timer is at the next ping.
    BeforePing,
    /// v4: a ping was sent, the timer is at its deadline.
    AwaitingPong { next_ping: Instant },
    /// v3: the timer is at the deadline of the client's next ping.
    #[cfg(feature = "v3")]
    AwaitingPing,
}

impl Heartbeat {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Start,
        }
    }

    /// Runs the heartbeat; `Ready` once it failed, and the socket should be
    /// closed with [`DisconnectReason::HeartbeatTimeout`](crate::DisconnectReason).
    pub(crate) fn poll<D: Default + Send + Sync + 'static>(
        &mut self,
        mut timer: Pin<&mut Sleep>,
        socket: &Socket<D>,
        (interval, timeout): (Duration, Duration),
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        loop {
            match self.phase {
                Phase::Start => {
                    #[cfg(feature = "v3")]
                    if socket.protocol == ProtocolVersion::V3 {
                        timer.as_mut().reset(Instant::now() + interval + timeout);
                        self.phase = Phase::AwaitingPing;
                        continue;
                    }
                    // The first ping after one interval, as engine.io's
                    // reference server (Node) sends it; upstream's first
                    // ping at once cost every connect a ping and a pong.
                    timer.as_mut().reset(Instant::now() + interval);
                    self.phase = Phase::BeforePing;
                }
                Phase::BeforePing => {
                    ready!(timer.as_mut().poll(cx));
                    let next_ping = timer.deadline() + interval;
                    if socket.is_upgrading() {
                        timer.as_mut().reset(next_ping);
                        continue;
                    }
                    #[cfg(feature = "tracing")]
                    tracing::trace!(sid = ?socket.id, "emitting ping");
                    // A pong answers a ping sent before it: one that came
                    // earlier (some clients send one first) is dropped.
                    socket.heartbeat.take();
                    if socket
                        .internal_tx
                        .try_send(smallvec![Packet::Ping])
                        .is_err()
                    {
                        return Poll::Ready(());
                    }
                    timer.as_mut().reset(Instant::now() + timeout);
                    self.phase = Phase::AwaitingPong { next_ping };
                }
                Phase::AwaitingPong { next_ping } => {
                    if socket.heartbeat.poll_take(cx).is_ready() {
                        #[cfg(feature = "tracing")]
                        tracing::trace!(sid = ?socket.id, "pong received");
                        timer.as_mut().reset(next_ping);
                        self.phase = Phase::BeforePing;
                        continue;
                    }
                    ready!(timer.as_mut().poll(cx));
                    return Poll::Ready(());
                }
                #[cfg(feature = "v3")]
                Phase::AwaitingPing => {
                    if socket.heartbeat.poll_take(cx).is_ready() {
                        #[cfg(feature = "tracing")]
                        tracing::trace!(sid = ?socket.id, "ping received, sending pong");
                        if socket
                            .internal_tx
                            .try_send(smallvec![Packet::Pong])
                            .is_err()
                        {
                            return Poll::Ready(());
                        }
                        timer.as_mut().reset(Instant::now() + interval + timeout);
                        continue;
                    }
                    ready!(timer.as_mut().poll(cx));
                    return Poll::Ready(());
                }
            }
        }
    }
}
