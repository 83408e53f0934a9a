//! Replaying what a returning session missed, before anything newer.
//!
//! A returning socket is registered (and its topics subscribed) before its
//! history is read, so nothing published meanwhile can fall between the
//! two: it is either in the history read or delivered live. Until the
//! replay is written, live deliveries to that socket are held by its
//! [`Gate`]; the replay goes first, then the held ones it does not already
//! contain (by offset), and only then does the gate open. A socket that
//! never returned has no gate, and delivery to it costs nothing extra.
//!
//! socketioxide writes only to a connected socket, and a socket is
//! connected once its CONNECT acknowledgement is queued, after the connect
//! middleware: so the middleware prepares the gate, and the connect handler
//! ([`Gate::flush`]) writes.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use socketioxide::{SocketError, extract::SocketRef, socket::EncodedEvent};

use crate::{bus::history::Missed, recovery::Offset};

/// How long a replay waits before it tries a full send queue again (until
/// `give_up`, when it gives the client up as slow; its session stays
/// recoverable). A replay of 1,000 fills a 256-packet queue about four
/// times: at 5 ms a wait, the waits were most of its 22.7 ms
/// (loadtest/results/BENCHMARKS-history.md, "Connection state recovery"); tokio's timer has 1 ms
/// steps.
const DRAIN_WAIT: Duration = Duration::from_millis(1);

/// Holds a returning socket's live deliveries until its replay is written.
pub struct Gate {
    /// Set once the replay and every held delivery are written; from then
    /// on deliveries go straight to the socket.
    open: AtomicBool,
    state: Mutex<Held>,
    /// The most live deliveries held; past it the client is slow.
    max_held: usize,
}

#[derive(Default)]
struct Held {
    /// What the history returned, in offset order.
    replay: VecDeque<Missed>,
    /// Live deliveries since registration, in offset order.
    live: VecDeque<(Offset, EncodedEvent)>,
    /// The highest offset written or queued for replay: anything live at or
    /// below it is already there.
    through: Offset,
    overflowed: bool,
}

impl Gate {
    pub fn new(max_held: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicBool::new(false),
            state: Mutex::new(Held::default()),
            max_held,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The history's answer: written first, by [`Gate::flush`].
    pub fn set_replay(&self, missed: Vec<Missed>) {
        let mut held = self.lock();
        held.through = missed.last().map_or(0, |(offset, _)| *offset);
        held.replay = missed.into();
    }

    /// A live delivery: held until the gate opens, written once it has.
    pub fn send(
        &self,
        socket: &SocketRef,
        offset: Offset,
        event: &EncodedEvent,
    ) -> Result<(), SocketError> {
        if !self.open.load(Ordering::Acquire) {
            let mut held = self.lock();
            if !self.open.load(Ordering::Acquire) {
                if held.live.len() >= self.max_held {
                    held.overflowed = true;
                } else {
                    held.live.push_back((offset, event.clone()));
                }
                return Ok(());
            }
        }
        socket.emit_encoded(event)
    }

    /// Writes the replay, then the held deliveries it does not contain, then
    /// opens. A client whose queue stays full for `give_up` (or that had
    /// more held than the gate holds) is disconnected: it is slow, and its
    /// session can recover again.
    pub async fn flush(&self, socket: &SocketRef, give_up: Duration) {
        let deadline = tokio::time::Instant::now() + give_up;
        loop {
            let next = {
                let mut held = self.lock();
                if held.overflowed {
                    None
                } else if let Some((offset, notification)) = held.replay.pop_front() {
                    match socket
                        .encode_event("notification", &(&*notification.msg, offset.to_string()))
                    {
                        Ok(event) => Some(event),
                        Err(e) => {
                            tracing::error!(error = %e, "replayed notification not encodable");
                            continue;
                        }
                    }
                } else if let Some((offset, event)) = held.live.pop_front() {
                    if offset <= held.through {
                        continue;
                    }
                    held.through = offset;
                    Some(event)
                } else {
                    self.open.store(true, Ordering::Release);
                    return;
                }
            };
            let Some(event) = next else { break };
            loop {
                match socket.emit_encoded(&event) {
                    Ok(()) => break,
                    Err(SocketError::InternalChannelFull)
                        if tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(DRAIN_WAIT).await;
                    }
                    Err(_) => {
                        let _ = socket.clone().disconnect();
                        return;
                    }
                }
            }
        }
        tracing::info!(sid = %socket.id, "slow client: too much held during its replay, disconnecting");
        let _ = socket.clone().disconnect();
    }
}
