//! Presence (docs/protocol.md "Presence"): who is online, asked when a backend asks.
//!
//! Nothing is written anywhere when a socket connects or leaves: each
//! node's registry already knows its own sockets. A [`Query`] goes to every
//! node (standalone, to this one; in a cluster, over the bus's requests,
//! `bus::redis::requests`), each answers from its registry with a
//! [`Presence`], and the asker [merges](Presence::merge) the answers. So:
//! - a connect or disconnect costs nothing more, and a reconnect storm
//!   makes no Redis round trip for presence;
//! - an answer is as fresh as the registries: a socket counts from its
//!   CONNECT acknowledgement until its disconnect;
//! - a node killed without warning drops out at once: Redis closes its
//!   subscription, and the publish that asks counts only the nodes still
//!   subscribed. A node that is stopped but subscribed makes the answer
//!   incomplete after the ask's timeout.
//!
//! The price is paid by the question, not by every connect: a request and
//! one answer per node, and a `channel` question scans the users of each
//! node (`Registry::presence`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::notification::{Channel, KeycloakId};

/// The most users one bulk question may name.
pub const MAX_BULK_USERS: usize = 1000;

/// What a backend asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    /// `GET /presence?keycloak=`: a user's sockets, by channel.
    User(KeycloakId),
    /// `GET /presence?channel=`: a channel's sockets and distinct users.
    Channel(Channel),
    /// `POST /presence`: which of these users have a socket.
    Users(Vec<KeycloakId>),
}

/// What one node (or, merged, the cluster) has of what a [`Query`] asks.
/// Every query fills only the fields its answer needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The matching sockets (`User`, `Channel`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sockets: usize,
    /// A user's sockets by channel (`User`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub channels: BTreeMap<Channel, usize>,
    /// The users with a matching socket (`Channel`, `Users`): a set, since a
    /// user may have sockets on several nodes.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub users: BTreeSet<KeycloakId>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Presence {
    /// Adds another node's answer to this one.
    pub fn merge(&mut self, other: Presence) {
        self.sockets += other.sockets;
        for (channel, sockets) in other.channels {
            *self.channels.entry(channel).or_default() += sockets;
        }
        self.users.extend(other.users);
    }

    /// The JSON answer docs/protocol.md gives for `query`, with `complete`: whether
    /// every node answered in time.
    pub fn answer(&self, query: &Query, complete: bool) -> serde_json::Value {
        match query {
            Query::User(user) => serde_json::json!({
                "keycloak": user,
                "online": self.sockets > 0,
                "sockets": self.sockets,
                "channels": self.channels,
                "complete": complete,
            }),
            Query::Channel(channel) => serde_json::json!({
                "channel": channel,
                "sockets": self.sockets,
                "users": self.users.len(),
                "complete": complete,
            }),
            Query::Users(users) => {
                let online: serde_json::Map<String, serde_json::Value> = users
                    .iter()
                    .map(|user| (user.as_str().to_owned(), self.users.contains(user).into()))
                    .collect();
                serde_json::json!({"online": online, "complete": complete})
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> KeycloakId {
        KeycloakId::parse(s).unwrap()
    }
    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }

    #[test]
    fn merging_adds_counts_and_unites_users() {
        let mut a = Presence {
            sockets: 2,
            channels: [(ch("admin"), 2)].into(),
            users: [user("alice"), user("bob")].into(),
        };
        a.merge(Presence {
            sockets: 3,
            channels: [(ch("admin"), 1), (ch("msf"), 2)].into(),
            users: [user("bob"), user("carol")].into(),
        });
        assert_eq!(a.sockets, 5);
        assert_eq!(a.channels, [(ch("admin"), 3), (ch("msf"), 2)].into());
        assert_eq!(a.users, [user("alice"), user("bob"), user("carol")].into());
    }

    #[test]
    fn a_node_answer_survives_the_wire() {
        let answer = Presence {
            sockets: 1,
            channels: [(ch("admin"), 1)].into(),
            users: BTreeSet::new(),
        };
        let wire = serde_json::to_vec(&answer).unwrap();
        assert_eq!(wire, br#"{"sockets":1,"channels":{"admin":1}}"#);
        assert_eq!(serde_json::from_slice::<Presence>(&wire).unwrap(), answer);
        assert_eq!(
            serde_json::from_slice::<Presence>(b"{}").unwrap(),
            Presence::default()
        );
    }

    #[test]
    fn answers_have_the_shapes_of_the_contract() {
        let seen = Presence {
            sockets: 3,
            channels: [(ch("admin"), 2), (ch("msf"), 1)].into(),
            users: [user("alice")].into(),
        };
        assert_eq!(
            seen.answer(&Query::User(user("alice")), true),
            serde_json::json!({"keycloak": "alice", "online": true, "sockets": 3,
                "channels": {"admin": 2, "msf": 1}, "complete": true})
        );
        assert_eq!(
            seen.answer(&Query::Channel(ch("admin")), false),
            serde_json::json!({"channel": "admin", "sockets": 3, "users": 1, "complete": false})
        );
        assert_eq!(
            seen.answer(&Query::Users(vec![user("alice"), user("bob")]), true),
            serde_json::json!({"online": {"alice": true, "bob": false}, "complete": true})
        );
        assert_eq!(
            Presence::default().answer(&Query::User(user("bob")), true)["online"],
            false
        );
    }
}
