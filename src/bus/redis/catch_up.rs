//! Catch-up after a lost subscription connection.
//!
//! While this node's connection to Redis is down, the other nodes may reach
//! Redis and go on publishing, and pub/sub keeps nothing for a subscriber
//! that is away: this node's sockets, still connected, would miss all of
//! it, each publish answered `200`. With recovery on, all of it is in the
//! history. So when the connection is lost the [`super::subscriber`] notes
//! the last offset it delivered ([`super::Shared::received`]); on the new
//! connection it [`Hold`]s what arrives while [`catch_up`] reads, from the
//! streams of every topic it subscribed again, the entries after that
//! offset up to the sequence's value once the subscriptions are confirmed,
//! and delivers them in offset order; then what it held that is newer.
//! Each socket gets what it missed exactly once, in order, before anything
//! newer, as if the connection had never dropped.
//!
//! Limits: a stream keeps `CHANNELS_RECOVERY_MAX_MISSED` entries, so a
//! target that got more than that while the node was away gets the newest
//! of them. A socket that connected while the bus was away gets what its
//! topics received since the loss, some of it perhaps from before it
//! connected. Standalone nothing is ever lost this way; with recovery off
//! there is no history to read.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use redis::Value;

use super::{
    Shared,
    connection::Connection,
    history::{Keys, decode_entry, topic_stream},
};
use crate::{notification::Notification, recovery::Offset};

/// Streams read per pipelined round trip.
const STREAMS_PER_CALL: usize = 512;

/// A notification from the bus and its offset.
type Message = (Offset, Notification);

/// The deliveries of a new subscription connection, held while the
/// catch-up runs, then let through. Once let through, a delivery reads one
/// flag and takes no lock.
#[derive(Clone)]
pub struct Hold(Arc<Held>);

struct Held {
    holding: AtomicBool,
    messages: Mutex<Vec<Message>>,
}

impl Hold {
    pub fn new(holding: bool) -> Self {
        Hold(Arc::new(Held {
            holding: AtomicBool::new(holding),
            messages: Mutex::new(Vec::new()),
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
            let mut messages = self.0.messages.lock().unwrap_or_else(|p| p.into_inner());
            // Checked again under the lock: a release may have just ended.
            if self.0.holding.load(Ordering::Acquire) {
                messages.push((offset, notification));
                return;
            }
        }
        deliver(offset, notification);
    }

    /// Delivers what was held after `after` (the rest was in the catch-up),
    /// then lets everything through. Under the lock, so nothing that
    /// arrives meanwhile overtakes it.
    pub fn release(&self, after: Offset, mut deliver: impl FnMut(Offset, Notification)) {
        let mut messages = self.0.messages.lock().unwrap_or_else(|p| p.into_inner());
        for (offset, notification) in std::mem::take(&mut *messages) {
            if offset > after {
                deliver(offset, notification);
            }
        }
        self.0.holding.store(false, Ordering::Release);
    }
}

/// Reads what `topics` received after `after` and hands it to `deliver` in
/// offset order; returns the offset it read up to, above which what was
/// held is new. Run once the subscriptions are confirmed, so everything
/// published later reaches the connection.
pub async fn catch_up(
    shared: &Shared,
    connection: &mut Connection,
    topics: &[String],
    after: Offset,
    mut deliver: impl FnMut(Offset, &Notification),
) -> redis::RedisResult<Offset> {
    let keys = Keys(&shared.prefix);
    let until: Option<String> = connection
        .query(redis::cmd("GET").arg(keys.sequence()))
        .await?;
    let until: Offset = until.and_then(|s| s.parse().ok()).unwrap_or(0);
    if until <= after {
        return Ok(until);
    }
    let streams: Vec<String> = topics
        .iter()
        .filter_map(|topic| topic_stream(&shared.prefix, topic))
        .collect();
    let mut missed = BTreeMap::new();
    for chunk in streams.chunks(STREAMS_PER_CALL) {
        let mut pipeline = redis::pipe();
        for stream in chunk {
            pipeline
                .cmd("XRANGE")
                .arg(stream)
                .arg(format!("({after}-0"))
                .arg(format!("{until}-0"));
        }
        for reply in connection.pipeline(&pipeline).await? {
            let Value::Array(entries) = reply else {
                continue;
            };
            missed.extend(entries.iter().filter_map(decode_entry));
        }
    }
    if !missed.is_empty() {
        tracing::info!(
            notifications = missed.len(),
            "delivering what this node's sockets missed while its bus was away"
        );
        let handles = shared.metrics.handles();
        handles.bus_caught_up.inc_by(missed.len() as u64);
    }
    for (offset, notification) in missed {
        deliver(offset, &notification);
    }
    shared.received.fetch_max(until, Ordering::AcqRel);
    Ok(until)
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
        hold.release(5, |o, _| delivered.push(o));
        hold.pass(7, notification(7), |o, _| delivered.push(o));
        assert_eq!(delivered, [6, 7]);
    }

    #[test]
    fn a_hold_made_open_lets_everything_through() {
        let hold = Hold::new(false);
        let mut delivered = Vec::new();
        hold.pass(1, notification(1), |o, _| delivered.push(o));
        assert_eq!(delivered, [1]);
    }
}
