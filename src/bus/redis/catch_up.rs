//! Catch-up after a lost subscription connection.
//!
//! While this node's connection to Redis is down, the other nodes may reach
//! Redis and go on publishing, and pub/sub keeps nothing for a subscriber
//! that is away: this node's sockets, still connected, would miss all of
//! it, each publish answered `200`. With recovery on, all of it is in the
//! history. So when the connection is lost the [`super::subscriber`] notes
//! the last offset it delivered ([`super::Shared::received`]) and when
//! ([`Gap`]); on the new connection it [`Hold`]s what arrives while
//! [`catch_up`] reads, from the streams of every topic it subscribed again,
//! the entries after that offset up to the sequence's value once the
//! subscriptions are confirmed, and delivers them in offset order; then
//! what it held that is newer. Each socket gets what it missed exactly
//! once, in order, before anything newer, as if the connection had never
//! dropped.
//!
//! Never in part: where the history cannot give all of it (a stream
//! trimmed past the offset, at `CHANNELS_RECOVERY_MAX_MISSED` entries;
//! keys evicted by Redis; the node away longer than the retention, so that
//! a stream with nothing newer may have expired), or where the catch-up
//! would hold more than [`MAX_CAUGHT_UP`] notifications (read from the
//! history, or arriving while it reads), the sockets of the
//! targets concerned are closed before anything more is written to them,
//! their sessions ended as of the loss: each client reconnects and
//! recovers from there, or learns it did not (`recovered` false).
//!
//! A socket that connected while the bus was away gets what its topics
//! received since the loss, some of it perhaps from before it connected.
//! Standalone nothing is ever lost this way; with recovery off there is no
//! history to read.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::time::Instant;

use super::{
    Shared,
    connection::Connection,
    history::{CATCH_UP_SCRIPT, Keys, decode_catch_up, topic_target},
};
use crate::{
    bus::history::StreamKey,
    notification::{Notification, Target},
    recovery::Offset,
};

/// Streams read per script call: a stream holds about
/// `CHANNELS_RECOVERY_MAX_MISSED` entries (1,000 by default) at most, so
/// one call's answer stays within some megabytes.
const STREAMS_PER_CALL: usize = 64;
/// The most notifications one catch-up holds; past it, every socket of the
/// node reconnects and recovers on its own instead, each read bounded by
/// `CHANNELS_RECOVERY_MAX_MISSED`.
pub const MAX_CAUGHT_UP: usize = 100_000;

/// A notification from the bus and its offset.
type Message = (Offset, Notification);

/// Where a lost connection left this node: the last offset it delivered,
/// and when the connection was lost, by the clock that times the gap and
/// by the wall clock that sessions' ends are recorded in.
#[derive(Clone, Copy, Debug)]
pub struct Gap {
    pub after: Offset,
    pub since: Instant,
    pub at_ms: u64,
}

/// What a catch-up read.
pub struct CaughtUp {
    /// The sequence's value it read up to: what was held above it is new.
    pub until: Offset,
    /// What the sockets of the complete targets missed, in offset order.
    pub missed: BTreeMap<Offset, Arc<Notification>>,
    /// The targets whose sockets missed what the history cannot give
    /// whole: they must reconnect before anything more is written to them.
    pub incomplete: Vec<Target>,
}

/// The deliveries of a new subscription connection, held while the
/// catch-up runs, then let through. Once let through, a delivery reads one
/// flag and takes no lock. It holds at most [`MAX_CAUGHT_UP`]; past that it
/// drops what arrives, and its release makes every socket reconnect.
#[derive(Clone)]
pub struct Hold(Arc<Holding>);

struct Holding {
    holding: AtomicBool,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    messages: Vec<Message>,
    /// Something arrived past [`MAX_CAUGHT_UP`] and was dropped.
    overflowed: bool,
}

impl Hold {
    pub fn new(holding: bool) -> Self {
        Hold(Arc::new(Holding {
            holding: AtomicBool::new(holding),
            held: Mutex::default(),
        }))
    }

    /// Delivers a notification now, or keeps it for [`Hold::release`].
    pub fn pass(
        &self,
        offset: Offset,
        notification: Notification,
        deliver: impl FnOnce(Offset, Notification),
    ) {
        if self.0.holding.load(Ordering::Acquire) {
            let mut held = self.0.held.lock().unwrap_or_else(|p| p.into_inner());
            // Checked again under the lock: a release may have just ended.
            if self.0.holding.load(Ordering::Acquire) {
                if held.messages.len() < MAX_CAUGHT_UP {
                    held.messages.push((offset, notification));
                } else {
                    held.overflowed = true;
                }
                return;
            }
        }
        deliver(offset, notification);
    }

    /// Delivers what was held after `after` (the rest was in the catch-up),
    /// then lets everything through. Under the lock, so nothing that
    /// arrives meanwhile overtakes it. If it held too much, calls
    /// `overflowed` instead, which must close every socket first: the
    /// dropped deliveries are in the history, and their clients recover them.
    pub fn release(
        &self,
        after: Offset,
        overflowed: impl FnOnce(),
        mut deliver: impl FnMut(Offset, Notification),
    ) {
        let mut held = self.0.held.lock().unwrap_or_else(|p| p.into_inner());
        let Held {
            messages,
            overflowed: dropped,
        } = std::mem::take(&mut *held);
        if dropped {
            overflowed();
        } else {
            for (offset, notification) in messages {
                if offset > after {
                    deliver(offset, notification);
                }
            }
        }
        self.0.holding.store(false, Ordering::Release);
    }
}

/// The targets whose notifications `topics` carry (not the bus's own).
pub fn targets(prefix: &str, topics: &[String]) -> Vec<Target> {
    topics
        .iter()
        .filter_map(|topic| topic_target(prefix, topic))
        .collect()
}

/// Reads what `topics` received after the gap, up to the sequence's value
/// now. Run once the subscriptions are confirmed, so everything published
/// later reaches the connection.
pub async fn catch_up(
    shared: &Shared,
    connection: &mut Connection,
    topics: &[String],
    gap: Gap,
) -> redis::RedisResult<CaughtUp> {
    let keys = Keys(&shared.prefix);
    let until: Option<String> = connection
        .query(redis::cmd("GET").arg(keys.sequence()))
        .await?;
    let until: Offset = until.and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut caught = CaughtUp {
        until,
        missed: BTreeMap::new(),
        incomplete: Vec::new(),
    };
    shared.received.fetch_max(until, Ordering::AcqRel);
    if until <= gap.after {
        return Ok(caught);
    }
    let settings = shared.recovery.expect("a catch-up needs recovery on");
    let targets = targets(&shared.prefix, topics);
    let mut unread = targets.as_slice();
    // Away longer than the retention, a stream that got nothing newer since
    // may have expired, and one written again since then restarted empty.
    let expired = gap.since.elapsed() > settings.retention;
    let mut evicted = false;
    while !expired && !evicted && !unread.is_empty() {
        let (chunk, rest) = unread.split_at(unread.len().min(STREAMS_PER_CALL));
        let mut invocation = CATCH_UP_SCRIPT.prepare_invoke();
        invocation
            .key(keys.sequence())
            .key(keys.epoch())
            .key(keys.evicted())
            .key(keys.evicted_from());
        for target in chunk {
            invocation.key(keys.stream(&StreamKey::of(target)));
        }
        invocation.arg(gap.after).arg(until).arg(MAX_CAUGHT_UP + 1);
        let reply = connection.invoke::<redis::Value>(&invocation).await?;
        let (evictions, reads) = decode_catch_up(reply, gap.after).ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Parse, "unexpected catch-up reply"))
        })?;
        evicted = evictions;
        for (target, read) in chunk.iter().zip(reads) {
            if read.trimmed_after {
                caught.incomplete.push(target.clone());
            } else {
                caught.missed.extend(read.entries);
            }
        }
        unread = rest;
        if caught.missed.len() > MAX_CAUGHT_UP {
            break;
        }
    }
    if expired || evicted || caught.missed.len() > MAX_CAUGHT_UP {
        // Every stream may lack something, or there is too much to hold:
        // every socket reconnects and recovers on its own.
        caught.missed.clear();
        caught.incomplete = targets;
    }
    if !caught.incomplete.is_empty() {
        tracing::warn!(
            targets = caught.incomplete.len(),
            "this node's sockets missed more while its bus was away than the history can give \
             whole: the sockets of those targets reconnect and recover on their own"
        );
    }
    if !caught.missed.is_empty() {
        tracing::info!(
            notifications = caught.missed.len(),
            "delivering what this node's sockets missed while its bus was away"
        );
        let handles = shared.metrics.handles();
        handles.bus_caught_up.inc_by(caught.missed.len() as u64);
    }
    Ok(caught)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(n: u64) -> Notification {
        serde_json::from_value(serde_json::json!({
            "id": format!("id{n}"),
            "msg": n,
            "target": {"variant": "channel", "channel": "admin"},
            "accepted_at_us": 0,
        }))
        .unwrap()
    }

    #[test]
    fn a_hold_keeps_deliveries_until_released_then_passes_the_newer_in_order() {
        let hold = Hold::new(true);
        let mut delivered = Vec::new();
        for offset in [4, 5, 6] {
            hold.pass(offset, notification(offset), |o, _| delivered.push(o));
        }
        assert!(delivered.is_empty());
        // 4 and 5 came with the catch-up, which read up to 5.
        hold.release(5, || unreachable!(), |o, _| delivered.push(o));
        hold.pass(7, notification(7), |o, _| delivered.push(o));
        assert_eq!(delivered, [6, 7]);
    }

    #[test]
    fn a_hold_that_held_too_much_delivers_none_of_it() {
        let hold = Hold::new(true);
        let mut delivered = Vec::new();
        for offset in 1..=MAX_CAUGHT_UP as u64 + 1 {
            hold.pass(offset, notification(offset), |o, _| delivered.push(o));
        }
        let mut overflowed = false;
        hold.release(0, || overflowed = true, |o, _| delivered.push(o));
        assert!(overflowed);
        assert!(delivered.is_empty());
        // Open afterwards.
        hold.pass(7, notification(7), |o, _| delivered.push(o));
        assert_eq!(delivered, [7]);
    }

    #[test]
    fn a_hold_made_open_lets_everything_through() {
        let hold = Hold::new(false);
        let mut delivered = Vec::new();
        hold.pass(1, notification(1), |o, _| delivered.push(o));
        assert_eq!(delivered, [1]);
    }
}
