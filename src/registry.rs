//! Who is connected to this node: sharded indexes from a channel and from a
//! user to their sockets.
//!
//! Two `DashMap`s (sharded locks) instead of socketioxide's rooms, whose
//! namespace-wide `RwLock`s are held for a whole broadcast and would stall
//! every connect and disconnect meanwhile. A lookup copies the matching
//! socket handles out under one shard's read lock and releases it before any
//! socket is written to, so delivery never holds a registry lock.
//!
//! The third index of docs/protocol.md, (user, channel), is the user's entry filtered
//! by channel: a user has a handful of sockets, so the filter is cheaper than
//! a third map to keep consistent and in memory.
//!
//! The registry knows nothing of socket.io: it stores any cloneable handle
//! `S` (a `SocketRef` in the gateway), so it can be tested on its own.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use dashmap::{DashMap, mapref::entry::Entry};
use socketioxide::socket::Sid;

use crate::{
    metrics::{ChannelGauge, Metrics},
    notification::{Channel, KeycloakId, Target},
    presence::{Presence, Query},
};

/// The sockets of this node, by channel and by user.
pub struct Registry<S> {
    by_channel: DashMap<Channel, ChannelSockets<S>>,
    by_user: DashMap<KeycloakId, Vec<UserSocket<S>>>,
    /// Total sockets, kept beside the maps so reading it takes no lock.
    sockets: AtomicUsize,
    /// `CHANNELS_MAX_SOCKETS_PER_USER`.
    max_per_user: usize,
    metrics: Metrics,
}

/// A user already holds the most sockets a node lets one user hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the user holds too many sockets on this node")]
pub struct TooManySockets;

/// The sockets of one channel, and the metric series they are counted in.
struct ChannelSockets<S> {
    sockets: HashMap<Sid, S>,
    gauge: ChannelGauge,
}

/// One socket of a user: which channel it is in, for the user-channel variant.
struct UserSocket<S> {
    sid: Sid,
    channel: Channel,
    socket: S,
}

/// Sizes of the indexes, for tests and diagnostics.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct RegistryStats {
    pub channels: usize,
    pub users: usize,
    pub sockets: usize,
}

impl<S: Clone> Registry<S> {
    pub fn new(metrics: Metrics, max_per_user: usize) -> Self {
        Self {
            by_channel: DashMap::new(),
            by_user: DashMap::new(),
            sockets: AtomicUsize::new(0),
            max_per_user,
            metrics,
        }
    }

    /// Makes a socket reachable by its channel, its user, and the pair,
    /// unless its user already holds `max_per_user` sockets. The user's entry
    /// is checked and extended under one lock, so concurrent connects of one
    /// user cannot overshoot the cap.
    pub fn insert(
        &self,
        sid: Sid,
        user: &KeycloakId,
        channel: &Channel,
        socket: S,
    ) -> Result<(), TooManySockets> {
        {
            // Most users hold one socket: room for one, not a Vec's first four.
            let mut sockets = self
                .by_user
                .entry(user.clone())
                .or_insert_with(|| Vec::with_capacity(1));
            if sockets.iter().any(|s| s.sid == sid) {
                return Ok(()); // Already registered: keep the counts right.
            }
            if sockets.len() >= self.max_per_user {
                return Err(TooManySockets);
            }
            sockets.push(UserSocket {
                sid,
                channel: channel.clone(),
                socket: socket.clone(),
            });
        }
        let mut entry = self
            .by_channel
            .entry(channel.clone())
            .or_insert_with(|| ChannelSockets {
                sockets: HashMap::new(),
                gauge: self.metrics.channel_gauge(channel),
            });
        entry.sockets.insert(sid, socket);
        entry.gauge.inc();
        drop(entry);
        self.sockets.fetch_add(1, Ordering::Relaxed);
        self.metrics.handles().sockets.inc();
        Ok(())
    }

    /// Removes a socket from every index; empty entries are dropped so
    /// nothing is left behind. Removing an unknown socket does nothing.
    /// Returns whether the socket was registered.
    pub fn remove(&self, sid: Sid, user: &KeycloakId, channel: &Channel) -> bool {
        let removed = match self.by_channel.entry(channel.clone()) {
            Entry::Occupied(mut entry) => {
                let removed = entry.get_mut().sockets.remove(&sid).is_some();
                if removed {
                    entry.get().gauge.dec();
                }
                if entry.get().sockets.is_empty() {
                    let (channel, sockets) = entry.remove_entry();
                    self.metrics.release_channel(&channel, sockets.gauge);
                }
                removed
            }
            Entry::Vacant(_) => false,
        };
        if let Entry::Occupied(mut entry) = self.by_user.entry(user.clone()) {
            entry.get_mut().retain(|s| s.sid != sid);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
        if removed {
            self.sockets.fetch_sub(1, Ordering::Relaxed);
            self.metrics.handles().sockets.dec();
        }
        removed
    }

    /// Appends the sockets a target reaches to `out`.
    pub fn lookup(&self, target: &Target, out: &mut Vec<S>) {
        match target {
            Target::Channel { channel } => {
                if let Some(entry) = self.by_channel.get(channel) {
                    out.extend(entry.sockets.values().cloned());
                }
            }
            Target::User { keycloak } => {
                if let Some(entry) = self.by_user.get(keycloak) {
                    out.extend(entry.iter().map(|s| s.socket.clone()));
                }
            }
            Target::UserChannel { keycloak, channel } => {
                if let Some(entry) = self.by_user.get(keycloak) {
                    out.extend(
                        entry
                            .iter()
                            .filter(|s| &s.channel == channel)
                            .map(|s| s.socket.clone()),
                    );
                }
            }
        }
    }

    /// What this node has of a presence question (`crate::presence`). A
    /// `Channel` question scans every user of the node, one shard's read
    /// lock at a time: the registry keeps no users by channel, which would
    /// cost every idle socket memory for the sake of a rarer question.
    pub fn presence(&self, query: &Query) -> Presence {
        let mut presence = Presence::default();
        match query {
            Query::User(user) => {
                if let Some(sockets) = self.by_user.get(user) {
                    presence.sockets = sockets.len();
                    for socket in sockets.iter() {
                        *presence.channels.entry(socket.channel.clone()).or_default() += 1;
                    }
                }
            }
            Query::Channel(channel) => {
                for entry in self.by_user.iter() {
                    let in_channel = entry
                        .value()
                        .iter()
                        .filter(|s| &s.channel == channel)
                        .count();
                    if in_channel > 0 {
                        presence.sockets += in_channel;
                        presence.users.insert(entry.key().clone());
                    }
                }
            }
            Query::Users(users) => {
                presence.users = users
                    .iter()
                    .filter(|user| self.by_user.contains_key(*user))
                    .cloned()
                    .collect();
            }
        }
        presence
    }

    /// Current sizes of the indexes.
    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            channels: self.by_channel.len(),
            users: self.by_user.len(),
            sockets: self.sockets.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }
    fn user(s: &str) -> KeycloakId {
        KeycloakId::parse(s).unwrap()
    }
    fn found(r: &Registry<u32>, t: Target) -> Vec<u32> {
        let mut out = Vec::new();
        r.lookup(&t, &mut out);
        out.sort();
        out
    }

    #[test]
    fn each_variant_reaches_exactly_its_sockets() {
        let r = Registry::new(Metrics::new(10), 32);
        r.insert(Sid::new(), &user("alice"), &ch("admin"), 1)
            .unwrap();
        r.insert(Sid::new(), &user("alice"), &ch("b2b"), 2).unwrap();
        r.insert(Sid::new(), &user("bob"), &ch("admin"), 3).unwrap();
        assert_eq!(
            found(
                &r,
                Target::Channel {
                    channel: ch("admin")
                }
            ),
            vec![1, 3]
        );
        assert_eq!(
            found(
                &r,
                Target::User {
                    keycloak: user("alice")
                }
            ),
            vec![1, 2]
        );
        assert_eq!(
            found(
                &r,
                Target::UserChannel {
                    keycloak: user("alice"),
                    channel: ch("b2b")
                }
            ),
            vec![2]
        );
        assert_eq!(
            found(&r, Target::Channel { channel: ch("msf") }),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn removing_every_socket_leaves_every_index_empty() {
        let metrics = Metrics::new(10);
        let r = Registry::new(metrics.clone(), 32);
        let sockets: Vec<_> = (0..100u32)
            .map(|i| {
                (
                    Sid::new(),
                    user(&format!("u{}", i % 7)),
                    ch(&format!("c{}", i % 3)),
                    i,
                )
            })
            .collect();
        for (sid, u, c, i) in &sockets {
            r.insert(*sid, u, c, *i).unwrap();
        }
        assert_eq!(
            r.stats(),
            RegistryStats {
                channels: 3,
                users: 7,
                sockets: 100
            }
        );
        for (sid, u, c, _) in &sockets {
            assert!(r.remove(*sid, u, c));
            assert!(!r.remove(*sid, u, c), "a second removal finds nothing");
        }
        assert_eq!(
            r.stats(),
            RegistryStats {
                channels: 0,
                users: 0,
                sockets: 0
            }
        );
        assert_eq!(metrics.handles().sockets.get(), 0);
        assert!(!metrics.render().contains("channel=\"c0\""));
    }

    #[test]
    fn a_user_at_the_cap_gets_no_further_socket_until_one_leaves() {
        let r = Registry::new(Metrics::new(10), 2);
        let (a, b, c) = (Sid::new(), Sid::new(), Sid::new());
        r.insert(a, &user("alice"), &ch("admin"), 1).unwrap();
        r.insert(b, &user("alice"), &ch("b2b"), 2).unwrap();
        assert_eq!(
            r.insert(c, &user("alice"), &ch("admin"), 3),
            Err(TooManySockets)
        );
        assert!(r.insert(Sid::new(), &user("bob"), &ch("admin"), 4).is_ok());
        assert_eq!(r.stats().sockets, 3, "the refused socket is nowhere");
        assert_eq!(
            found(
                &r,
                Target::Channel {
                    channel: ch("admin")
                }
            ),
            vec![1, 4]
        );
        assert!(r.remove(a, &user("alice"), &ch("admin")));
        assert!(r.insert(c, &user("alice"), &ch("admin"), 3).is_ok());
    }

    #[test]
    fn presence_counts_a_user_a_channel_and_a_list() {
        let r = Registry::new(Metrics::new(10), 32);
        r.insert(Sid::new(), &user("alice"), &ch("admin"), 1)
            .unwrap();
        r.insert(Sid::new(), &user("alice"), &ch("admin"), 2)
            .unwrap();
        r.insert(Sid::new(), &user("alice"), &ch("msf"), 3).unwrap();
        r.insert(Sid::new(), &user("bob"), &ch("admin"), 4).unwrap();
        let alice = r.presence(&Query::User(user("alice")));
        assert_eq!(alice.sockets, 3);
        assert_eq!(alice.channels, [(ch("admin"), 2), (ch("msf"), 1)].into());
        let admin = r.presence(&Query::Channel(ch("admin")));
        assert_eq!(admin.sockets, 3);
        assert_eq!(admin.users, [user("alice"), user("bob")].into());
        let listed = r.presence(&Query::Users(vec![user("bob"), user("carol")]));
        assert_eq!(listed.users, [user("bob")].into());
        assert_eq!(r.presence(&Query::User(user("carol"))), Presence::default());
    }
}
