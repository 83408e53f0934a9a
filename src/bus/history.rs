//! The recovery history: what was published lately, per target, so a
//! returning session can be replayed what it missed. This file holds what
//! both buses share (the streams a socket reads, how their reads are
//! merged) and the in-process history of a standalone node; the Redis one
//! is `redis/history.rs`.
//!
//! A notification is kept in the stream of its target: a channel's stream
//! for the channel variant, the user's stream for the user and user-channel
//! variants (as on the pub/sub topics). A socket reads its channel's and its
//! user's, keeps the user-channel entries of its own channel, and merges by
//! offset, the cluster-wide order every node delivers in.
//!
//! Each stream keeps at most `CHANNELS_RECOVERY_MAX_MISSED` entries and each
//! entry at most the retention ([`retention`]), so memory is bounded by the
//! publish rate and the number of active targets. A read is refused, never
//! partial, when the stream dropped something after the offset.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    config::{Config, Recovery},
    notification::{Channel, KeycloakId, Notification, Target},
    recovery::{Ended, NotRecoverable, Offset, Session},
};

/// A notification the session missed, with its offset.
pub type Missed = (Offset, Arc<Notification>);

/// Which stream a notification is kept in.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum StreamKey {
    Channel(Channel),
    User(KeycloakId),
}

impl StreamKey {
    pub fn of(target: &Target) -> Self {
        match target {
            Target::Channel { channel } => StreamKey::Channel(channel.clone()),
            Target::User { keycloak } | Target::UserChannel { keycloak, .. } => {
                StreamKey::User(keycloak.clone())
            }
        }
    }
}

/// How long an entry is kept: the window, plus the time a dead connection
/// can go unnoticed (a heartbeat's interval and timeout). A notification
/// written to a connection in that time may never have reached its client,
/// whose session can still be in its window after it.
pub fn retention(config: &Config) -> Duration {
    config.recovery.window + config.ping_interval + config.ping_timeout
}

/// What a returning session asks of the history.
#[derive(Clone, Debug)]
pub struct Recovering {
    pub session: Session,
    pub user: KeycloakId,
    pub channel: Channel,
    /// The last offset the client received, or the session's start.
    pub after: Offset,
    /// This node just closed the session's previous socket: it ended now,
    /// whether or not its record has reached the history yet.
    pub ended_now: bool,
}

impl Recovering {
    /// The streams the session's notifications are kept in.
    pub fn streams(&self) -> [StreamKey; 2] {
        [
            StreamKey::Channel(self.channel.clone()),
            StreamKey::User(self.user.clone()),
        ]
    }

    /// Whether a notification of its streams targeted this session's socket.
    fn wants(&self, target: &Target) -> bool {
        match target {
            Target::Channel { .. } | Target::User { .. } => true,
            Target::UserChannel { channel, .. } => *channel == self.channel,
        }
    }
}

/// One stream's part of a recovery read: its entries after the offset, at
/// most `max_missed + 1`, and whether it dropped one after the offset.
pub struct StreamRead {
    pub entries: Vec<Missed>,
    pub trimmed_after: bool,
}

/// Merges the reads of a session's streams into what it missed, in offset
/// order; refused when a stream lost something after the offset or when
/// more than `max_missed` were read from one (an incomplete read could
/// leave a gap in the merge).
pub fn merge(
    recovering: &Recovering,
    reads: Vec<StreamRead>,
    max_missed: usize,
) -> Result<Vec<Missed>, NotRecoverable> {
    let mut missed = Vec::new();
    for read in reads {
        if read.trimmed_after {
            return Err(NotRecoverable::Trimmed);
        }
        if read.entries.len() > max_missed {
            return Err(NotRecoverable::TooMany);
        }
        missed.extend(
            read.entries
                .into_iter()
                .filter(|(offset, n)| *offset > recovering.after && recovering.wants(&n.target)),
        );
    }
    if missed.len() > max_missed {
        return Err(NotRecoverable::TooMany);
    }
    missed.sort_unstable_by_key(|(offset, _)| *offset);
    Ok(missed)
}

/// The history of a standalone node, in its memory.
pub struct MemoryHistory {
    inner: Mutex<Inner>,
    settings: Recovery,
    retention: Duration,
}

struct Inner {
    streams: HashMap<StreamKey, Stream>,
    /// How sessions ended, until the window has passed.
    ended: HashMap<u128, (Ended, Instant)>,
}

#[derive(Default)]
struct Stream {
    entries: VecDeque<(Offset, Arc<Notification>, Instant)>,
    /// The highest offset dropped from this stream.
    trimmed_through: Offset,
}

impl MemoryHistory {
    pub fn new(config: &Config) -> Self {
        Self {
            inner: Mutex::new(Inner {
                streams: HashMap::new(),
                ended: HashMap::new(),
            }),
            settings: config.recovery,
            retention: retention(config),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a published notification.
    pub fn record(&self, offset: Offset, notification: Arc<Notification>) {
        let mut inner = self.lock();
        let stream = inner
            .streams
            .entry(StreamKey::of(&notification.target))
            .or_default();
        stream
            .entries
            .push_back((offset, notification, Instant::now()));
        if stream.entries.len() > self.settings.max_missed
            && let Some((dropped, _, _)) = stream.entries.pop_front()
        {
            stream.trimmed_through = dropped;
        }
    }

    /// Drops entries past the retention and session records past the window.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.streams.retain(|_, stream| {
            while let Some((offset, _, at)) = stream.entries.front() {
                if now - *at <= self.retention {
                    break;
                }
                stream.trimmed_through = *offset;
                stream.entries.pop_front();
            }
            !stream.entries.is_empty()
        });
        let window = self.settings.window;
        inner.ended.retain(|_, (_, at)| now - *at <= window);
    }

    /// Records how a session ended.
    pub fn end(&self, session: &Session, ended: Ended) {
        self.lock()
            .ended
            .insert(session.id, (ended, Instant::now()));
    }

    /// How a session ended, if recorded and within the window.
    pub fn ended(&self, session: &Session) -> Option<Ended> {
        let window = self.settings.window;
        self.lock()
            .ended
            .get(&session.id)
            .filter(|(_, at)| at.elapsed() <= window)
            .map(|(ended, _)| *ended)
    }

    /// A returning session's reads of its streams.
    pub fn read(&self, recovering: &Recovering) -> Vec<StreamRead> {
        let inner = self.lock();
        recovering
            .streams()
            .iter()
            .map(|key| match inner.streams.get(key) {
                None => StreamRead {
                    entries: Vec::new(),
                    trimmed_after: false,
                },
                Some(stream) => StreamRead {
                    trimmed_after: stream.trimmed_through > recovering.after,
                    entries: stream
                        .entries
                        .iter()
                        .filter(|(offset, _, _)| *offset > recovering.after)
                        .take(self.settings.max_missed + 1)
                        .map(|(offset, n, _)| (*offset, n.clone()))
                        .collect(),
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::recovery::NodeId;

    fn user() -> KeycloakId {
        KeycloakId::parse("alice").unwrap()
    }
    fn channel(name: &str) -> Channel {
        Channel::parse(name).unwrap()
    }
    fn note(target: Target, text: &str) -> Arc<Notification> {
        let msg = RawValue::from_string(format!("{text:?}")).unwrap();
        Arc::new(Notification::new(target, msg))
    }
    fn history(max_missed: usize) -> MemoryHistory {
        let mut config = Config::dev();
        config.recovery.max_missed = max_missed;
        MemoryHistory::new(&config)
    }
    fn recovering(after: Offset) -> Recovering {
        Recovering {
            session: Session {
                id: 1,
                origin: NodeId(1),
                start: 0,
            },
            user: user(),
            channel: channel("admin"),
            after,
            ended_now: false,
        }
    }
    fn texts(missed: &[Missed]) -> Vec<(Offset, String)> {
        missed
            .iter()
            .map(|(o, n)| (*o, n.msg.get().to_string()))
            .collect()
    }

    #[test]
    fn a_session_gets_its_channel_user_and_pair_entries_in_offset_order() {
        let h = history(100);
        let admin = channel("admin");
        let b2b = channel("b2b");
        h.record(
            1,
            note(
                Target::Channel {
                    channel: admin.clone(),
                },
                "c1",
            ),
        );
        h.record(2, note(Target::User { keycloak: user() }, "u2"));
        h.record(
            3,
            note(
                Target::UserChannel {
                    keycloak: user(),
                    channel: b2b.clone(),
                },
                "other",
            ),
        );
        h.record(4, note(Target::Channel { channel: b2b }, "b2b"));
        h.record(
            5,
            note(
                Target::UserChannel {
                    keycloak: user(),
                    channel: admin.clone(),
                },
                "uc5",
            ),
        );
        h.record(6, note(Target::Channel { channel: admin }, "c6"));
        let missed = merge(&recovering(1), h.read(&recovering(1)), 100).unwrap();
        assert_eq!(
            texts(&missed),
            [
                (2, "\"u2\"".into()),
                (5, "\"uc5\"".into()),
                (6, "\"c6\"".into())
            ]
        );
        assert!(
            merge(&recovering(6), h.read(&recovering(6)), 100)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_read_past_a_dropped_entry_is_refused_never_partial() {
        let h = history(3);
        let target = Target::User { keycloak: user() };
        for offset in 1..=5 {
            h.record(offset, note(target.clone(), "x"));
        }
        // 1 and 2 were dropped: from 2 on the stream is whole, from 1 it is not.
        assert_eq!(
            merge(&recovering(2), h.read(&recovering(2)), 3)
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            merge(&recovering(1), h.read(&recovering(1)), 3).err(),
            Some(NotRecoverable::Trimmed)
        );
    }

    #[test]
    fn more_missed_than_the_maximum_is_refused() {
        let h = history(10);
        for offset in 1..=6 {
            h.record(offset, note(Target::User { keycloak: user() }, "u"));
        }
        for offset in 7..=12 {
            h.record(
                offset,
                note(
                    Target::Channel {
                        channel: channel("admin"),
                    },
                    "c",
                ),
            );
        }
        assert_eq!(
            merge(&recovering(0), h.read(&recovering(0)), 12)
                .unwrap()
                .len(),
            12
        );
        assert_eq!(
            merge(&recovering(0), h.read(&recovering(0)), 10).err(),
            Some(NotRecoverable::TooMany)
        );
    }

    #[test]
    fn session_ends_are_kept_for_the_window() {
        let h = history(10);
        let session = recovering(0).session;
        assert_eq!(h.ended(&session), None);
        h.end(&session, Ended::At(5));
        assert_eq!(h.ended(&session), Some(Ended::At(5)));
        h.end(&session, Ended::Closed);
        assert_eq!(h.ended(&session), Some(Ended::Closed));
    }
}
