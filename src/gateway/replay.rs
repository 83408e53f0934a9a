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
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use socketioxide::{SocketError, extract::SocketRef, socket::EncodedEvent};

use super::SocketTag;
use crate::{bus::history::Missed, recovery::Offset};

/// How long a replay waits before it tries a full send queue again (until
/// `give_up`, when it gives the client up as slow; its session stays
/// recoverable). A replay of 1,000 fills a 256-packet queue about four
/// times: at 5 ms a wait, the waits were most of its 22.7 ms
/// (loadtest/results/BENCHMARKS-history.md, "Connection state recovery"); tokio's timer has 1 ms
/// steps.
const DRAIN_WAIT: Duration = Duration::from_millis(1);

/// Holds a returning socket's live deliveries until its replay is written,
/// and afterwards drops those the client already has.
///
/// That a live delivery can come after the replay with an offset the replay
/// (or the client) already covers is no accident of timing to ignore: this
/// node's bus may run behind the history read (it receives from Redis what
/// the history already holds), and behind the node the client came from.
/// One cluster-wide sequence makes the offset enough to tell.
pub struct Gate<E = EncodedEvent> {
    /// Set once the replay and every held delivery are written; from then
    /// on deliveries above `through` go straight to the socket.
    open: AtomicBool,
    /// The highest offset the client has, or is written or queued for
    /// replay: anything live at or below it is already there. Changed only
    /// under `state`'s lock; read without it once the gate is open.
    through: AtomicU64,
    state: Mutex<Held<E>>,
    /// The most live deliveries held; past it the client is slow.
    max_held: usize,
}

struct Held<E> {
    /// What the history returned, in offset order.
    replay: VecDeque<Missed>,
    /// Live deliveries since registration, in offset order.
    live: VecDeque<(Offset, E)>,
    overflowed: bool,
}

/// What a gate writes next.
enum Next<E> {
    Replay(Missed),
    Live(E),
    /// Everything is written: the gate is open.
    Open,
    /// More was held than the gate holds.
    Overflowed,
}

impl<E: Clone> Gate<E> {
    pub fn new(max_held: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicBool::new(false),
            through: AtomicU64::new(0),
            state: Mutex::new(Held {
                replay: VecDeque::new(),
                live: VecDeque::new(),
                overflowed: false,
            }),
            max_held,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held<E>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The history's answer, what the client missed after `after` (the
    /// offset it returned with): written first, by [`Gate::flush`].
    pub fn set_replay(&self, after: Offset, missed: Vec<Missed>) {
        let mut held = self.lock();
        let through = missed
            .last()
            .map_or(after, |(offset, _)| (*offset).max(after));
        self.through.store(through, Ordering::Relaxed);
        held.replay = missed.into();
    }

    /// Whether a live delivery is to be written now; if not, it is held
    /// (the gate is not open yet) or dropped (the client has it).
    fn admit(&self, offset: Offset, event: &E) -> bool {
        if !self.open.load(Ordering::Acquire) {
            let mut held = self.lock();
            if !self.open.load(Ordering::Acquire) {
                if held.live.len() >= self.max_held {
                    held.overflowed = true;
                } else {
                    held.live.push_back((offset, event.clone()));
                }
                return false;
            }
        }
        offset > self.through.load(Ordering::Relaxed)
    }

    /// Takes what is to be written next, and opens the gate when nothing is.
    fn next(&self) -> Next<E> {
        let mut held = self.lock();
        if held.overflowed {
            return Next::Overflowed;
        }
        if let Some(missed) = held.replay.pop_front() {
            return Next::Replay(missed);
        }
        while let Some((offset, event)) = held.live.pop_front() {
            if offset > self.through.load(Ordering::Relaxed) {
                self.through.store(offset, Ordering::Relaxed);
                return Next::Live(event);
            }
        }
        // Under the lock, so no delivery is held after the last take; the
        // release publishes `through` to deliveries that see it open.
        self.open.store(true, Ordering::Release);
        Next::Open
    }
}

impl Gate {
    /// A live delivery: held until the gate opens, written once it has,
    /// unless the client has it.
    pub fn send(
        &self,
        socket: &SocketRef,
        offset: Offset,
        event: &EncodedEvent,
    ) -> Result<(), SocketError> {
        if self.admit(offset, event) {
            socket.emit_encoded(event)
        } else {
            Ok(())
        }
    }

    /// Writes the replay, then the held deliveries it does not contain, then
    /// opens. A client whose queue stays full for `give_up` (or that had
    /// more held than the gate holds) is slow: its connection is closed, as
    /// a slow client's is (`super::delivery`), and it can recover again.
    pub async fn flush(&self, socket: &SocketRef, give_up: Duration) {
        let deadline = tokio::time::Instant::now() + give_up;
        loop {
            let event = match self.next() {
                Next::Replay((offset, notification)) => match socket
                    .encode_event("notification", &(&*notification.msg, offset.to_string()))
                {
                    Ok(event) => event,
                    Err(e) => {
                        tracing::error!(error = %e, "replayed notification not encodable");
                        continue;
                    }
                },
                Next::Live(event) => event,
                Next::Open => return,
                Next::Overflowed => break,
            };
            loop {
                match socket.emit_encoded(&event) {
                    Ok(()) => break,
                    Err(SocketError::InternalChannelFull)
                        if tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(DRAIN_WAIT).await;
                    }
                    Err(_) => {
                        socket.close_underlying_transport().await;
                        return;
                    }
                }
            }
        }
        tracing::info!(socket = %SocketTag(socket.id), "slow client: too much held during its replay, closing its connection");
        socket.close_underlying_transport().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Gate, Next};
    use crate::notification::{Channel, Notification, Target};

    fn missed(offsets: &[u64]) -> Vec<super::Missed> {
        let msg = serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let notification = Arc::new(Notification::new(
            Target::Channel {
                channel: Channel::parse("c").unwrap(),
            },
            msg,
        ));
        offsets
            .iter()
            .map(|&offset| (offset, notification.clone()))
            .collect()
    }

    /// Everything the gate writes, in order: `r<offset>` for a replayed
    /// notification, the event itself for a live one.
    fn drain(gate: &Gate<String>) -> Vec<String> {
        let mut written = Vec::new();
        loop {
            match gate.next() {
                Next::Replay((offset, _)) => written.push(format!("r{offset}")),
                Next::Live(event) => written.push(event),
                Next::Open => return written,
                Next::Overflowed => panic!("overflowed"),
            }
        }
    }

    #[test]
    fn the_replay_goes_first_then_only_the_held_deliveries_above_it() {
        let gate = Gate::new(16);
        for offset in [9, 11, 12, 13] {
            assert!(!gate.admit(offset, &format!("l{offset}")), "held");
        }
        gate.set_replay(10, missed(&[11, 12]));
        assert_eq!(drain(&gate), ["r11", "r12", "l13"]);
    }

    #[test]
    fn with_nothing_missed_the_held_deliveries_the_client_has_are_dropped() {
        let gate = Gate::new(16);
        for offset in [8, 10, 11] {
            assert!(!gate.admit(offset, &format!("l{offset}")));
        }
        gate.set_replay(10, Vec::new());
        assert_eq!(drain(&gate), ["l11"]);
    }

    /// The bus of this node runs behind the history read: what it delivers
    /// after the gate opened may be in the replay already.
    #[test]
    fn once_open_a_late_delivery_the_replay_covered_is_dropped() {
        let gate = Gate::new(16);
        gate.set_replay(10, missed(&[11, 12]));
        assert_eq!(drain(&gate), ["r11", "r12"]);
        assert!(!gate.admit(11, &"l11".to_string()));
        assert!(!gate.admit(12, &"l12".to_string()));
        assert!(gate.admit(13, &"l13".to_string()));
    }

    #[test]
    fn more_held_than_the_gate_holds_overflows() {
        let gate = Gate::new(2);
        for offset in [1, 2, 3] {
            gate.admit(offset, &format!("l{offset}"));
        }
        assert!(matches!(gate.next(), Next::Overflowed));
    }

    /// A session that is not recovered gets everything held.
    #[test]
    fn without_a_replay_every_held_delivery_is_written() {
        let gate = Gate::new(16);
        for offset in [3, 4] {
            gate.admit(offset, &format!("l{offset}"));
        }
        assert_eq!(drain(&gate), ["l3", "l4"]);
        assert!(gate.admit(5, &"l5".to_string()));
    }
}
