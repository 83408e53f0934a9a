//! The subscription table: which topics this node's sockets need, and
//! which of them Redis has confirmed on the current connection. Pure data,
//! no I/O: the [`super::subscriber::Subscriber`] asks it what to send.
//!
//! A topic is counted by the local sockets that need it. One whose last
//! socket left stays for [`UNSUBSCRIBE_DELAY`] before it is unsubscribed, so
//! a reconnecting client does not cause an unsubscribe/subscribe pair.
//!
//! The table also counts the unsubscribes it asked for and Redis has not
//! confirmed yet, so it can tell a confirmation from an unsubscribe Redis
//! made on its own: a Redis Cluster node that stops serving a slot (its
//! master demoted by a failover, the slot migrated) ends every sharded
//! subscription of that slot with the same push, and the topic would go
//! silent ([`Topics::unsubscribed`]).

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

/// How long a topic stays subscribed after its last local socket left.
pub const UNSUBSCRIBE_DELAY: Duration = Duration::from_secs(2);

/// One topic of the table.
struct Topic {
    /// Local sockets that need it.
    sockets: usize,
    /// Whether Redis confirmed the subscription on the current connection.
    subscribed: bool,
    /// Since when no local socket needs it.
    idle_since: Option<Instant>,
}

/// The topics this node needs. Bounded by its sockets: an idle topic is
/// dropped by [`Topics::sweep`], and on a lost connection by
/// [`Topics::resubscribe_set`].
#[derive(Default)]
pub struct Topics {
    topics: HashMap<String, Topic>,
    /// Unsubscribes sent and not yet confirmed, by topic.
    unsubscribing: HashMap<String, usize>,
}

impl Topics {
    /// A socket needs `names`; returns those not yet subscribed (each once).
    pub fn add(&mut self, names: impl IntoIterator<Item = String>, missing: &mut Vec<String>) {
        for name in names {
            let topic = self.topics.entry(name.clone()).or_insert(Topic {
                sockets: 0,
                subscribed: false,
                idle_since: None,
            });
            topic.sockets += 1;
            topic.idle_since = None;
            if !topic.subscribed && !missing.contains(&name) {
                missing.push(name);
            }
        }
    }

    /// A socket that needed `names` left.
    pub fn remove(&mut self, names: impl IntoIterator<Item = String>, now: Instant) {
        for name in names {
            if let Some(topic) = self.topics.get_mut(&name) {
                topic.sockets = topic.sockets.saturating_sub(1);
                if topic.sockets == 0 {
                    topic.idle_since = Some(now);
                }
            }
        }
    }

    /// Redis confirmed these subscriptions.
    pub fn confirm(&mut self, names: &[String]) {
        for name in names {
            if let Some(topic) = self.topics.get_mut(name) {
                topic.subscribed = true;
            }
        }
    }

    /// Drops the topics idle for [`UNSUBSCRIBE_DELAY`]; returns those of
    /// them that Redis had confirmed, to unsubscribe.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let mut unsubscribe = Vec::new();
        self.topics.retain(|name, topic| {
            let idle = topic
                .idle_since
                .is_some_and(|since| now - since >= UNSUBSCRIBE_DELAY);
            if idle && topic.subscribed {
                unsubscribe.push(name.clone());
            }
            !idle
        });
        for name in &unsubscribe {
            *self.unsubscribing.entry(name.clone()).or_default() += 1;
        }
        unsubscribe
    }

    /// Redis reported `name` unsubscribed. True when it confirms one of the
    /// table's unsubscribes; false when Redis ended the subscription on its
    /// own, and the connection no longer receives what it needs.
    pub fn unsubscribed(&mut self, name: &[u8]) -> bool {
        let Some(name) = std::str::from_utf8(name).ok() else {
            return false;
        };
        match self.unsubscribing.get_mut(name) {
            Some(count) => {
                *count -= 1;
                if *count == 0 {
                    self.unsubscribing.remove(name);
                }
                true
            }
            None => false,
        }
    }

    /// The connection was lost: nothing is subscribed any more, and no
    /// unsubscribe will be confirmed.
    pub fn forget_subscriptions(&mut self) {
        for topic in self.topics.values_mut() {
            topic.subscribed = false;
        }
        self.unsubscribing.clear();
    }

    /// For a new connection: drops the topics no socket needs, and returns
    /// the rest, all of which must be subscribed before the bus is ready.
    pub fn resubscribe_set(&mut self) -> Vec<String> {
        self.topics.retain(|_, t| t.sockets > 0);
        self.topics.keys().cloned().collect()
    }

    /// Every topic was subscribed on the new connection.
    pub fn confirm_all(&mut self) {
        for topic in self.topics.values_mut() {
            topic.subscribed = true;
        }
    }

    /// Topics Redis confirmed, for the metric.
    pub fn subscribed(&self) -> usize {
        self.topics.values().filter(|t| t.subscribed).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_topic_is_asked_for_once_until_confirmed() {
        let mut t = Topics::default();
        let mut missing = Vec::new();
        t.add(names(&["c:a", "u:x"]), &mut missing);
        t.add(names(&["c:a", "u:y"]), &mut missing);
        assert_eq!(missing, names(&["c:a", "u:x", "u:y"]));
        t.confirm(&missing);
        let mut again = Vec::new();
        t.add(names(&["c:a", "u:x"]), &mut again);
        assert!(again.is_empty());
        assert_eq!(t.subscribed(), 3);
    }

    #[test]
    fn a_topic_is_unsubscribed_only_after_its_last_socket_left_and_the_delay() {
        let mut t = Topics::default();
        let mut missing = Vec::new();
        t.add(names(&["c:a"]), &mut missing);
        t.add(names(&["c:a"]), &mut missing);
        t.confirm(&missing);
        let start = Instant::now();
        t.remove(names(&["c:a"]), start);
        assert!(
            t.sweep(start + UNSUBSCRIBE_DELAY * 2).is_empty(),
            "one socket still needs it"
        );
        t.remove(names(&["c:a"]), start);
        assert!(
            t.sweep(start + UNSUBSCRIBE_DELAY / 2).is_empty(),
            "too early"
        );
        assert_eq!(t.sweep(start + UNSUBSCRIBE_DELAY), names(&["c:a"]));
        assert_eq!(t.subscribed(), 0);
        assert!(t.resubscribe_set().is_empty(), "nothing is left behind");
    }

    #[test]
    fn a_socket_back_within_the_delay_keeps_the_subscription() {
        let mut t = Topics::default();
        let mut missing = Vec::new();
        t.add(names(&["u:x"]), &mut missing);
        t.confirm(&missing);
        let start = Instant::now();
        t.remove(names(&["u:x"]), start);
        let mut again = Vec::new();
        t.add(names(&["u:x"]), &mut again);
        assert!(again.is_empty());
        assert!(t.sweep(start + UNSUBSCRIBE_DELAY * 3).is_empty());
    }

    #[test]
    fn after_a_lost_connection_every_needed_topic_and_only_those_is_resubscribed() {
        let mut t = Topics::default();
        let mut missing = Vec::new();
        t.add(names(&["c:a", "u:x", "u:gone"]), &mut missing);
        t.confirm(&missing);
        t.remove(names(&["u:gone"]), Instant::now());
        t.forget_subscriptions();
        assert_eq!(t.subscribed(), 0);
        let mut set = t.resubscribe_set();
        set.sort();
        assert_eq!(set, names(&["c:a", "u:x"]));
        t.confirm_all();
        assert_eq!(t.subscribed(), 2);
    }

    #[test]
    fn an_unsubscribe_is_told_apart_from_one_redis_made_on_its_own() {
        let mut topics = Topics::default();
        let mut missing = Vec::new();
        topics.add(names(&["a", "b"]), &mut missing);
        topics.confirm(&missing);
        let start = Instant::now();
        topics.remove(names(&["a"]), start);
        assert_eq!(topics.sweep(start + UNSUBSCRIBE_DELAY), names(&["a"]));
        // The confirmation of the table's own unsubscribe, once.
        assert!(topics.unsubscribed(b"a"));
        assert!(!topics.unsubscribed(b"a"));
        // Redis ended a subscription the table still needs.
        assert!(!topics.unsubscribed(b"b"));
        // After a lost connection no confirmation is awaited.
        topics.add(names(&["a"]), &mut Vec::new());
        topics.confirm(&names(&["a"]));
        topics.remove(names(&["a"]), start);
        assert_eq!(topics.sweep(start + UNSUBSCRIBE_DELAY), names(&["a"]));
        topics.forget_subscriptions();
        assert!(!topics.unsubscribed(b"a"));
    }
}
