//! How a notification reaches every node: `/notify` publishes to the bus,
//! and each node delivers to its own sockets only from what the bus hands
//! back ([`Deliver`]). There is no local shortcut, so every node sees the
//! notifications in the same order, the order in which publishes completed;
//! that is SPEC.md's ordering guarantee.
//!
//! [`Bus::Local`] is the in-process bus of a standalone node, [`Bus::Redis`]
//! the Redis pub/sub of a cluster. The bus never reaches up into HTTP or
//! socket.io: it only calls the [`Deliver`] sink it was built with, and is
//! told which sockets come and go so it can subscribe to what they need.

mod local;
mod redis;

use std::sync::Arc;

pub use local::LocalBus;
pub use redis::{RedisBus, RedisSettings, UNSUBSCRIBE_DELAY};

use crate::notification::{Channel, KeycloakId, Notification};

/// Where the bus hands every notification it receives. Implemented by the
/// gateway, which writes to the matching local sockets.
pub trait Deliver: Send + Sync + 'static {
    fn deliver(&self, notification: &Notification);
}

/// Why a publish failed. Nothing was delivered anywhere, so the caller may
/// retry without causing duplicates.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the cluster bus is unavailable")]
    Unavailable,
}

/// The bus of this node.
#[derive(Clone)]
pub enum Bus {
    /// Standalone node: an in-process queue.
    Local(LocalBus),
    /// Cluster node: Redis pub/sub.
    Redis(RedisBus),
}

impl Bus {
    /// A standalone node's bus, delivering to `sink`.
    pub fn local(sink: Arc<dyn Deliver>) -> Self {
        Bus::Local(LocalBus::new(sink))
    }

    /// Publishes a notification to every node. When this returns `Ok`, the
    /// notification is ordered after every publish that returned before it.
    pub async fn publish(&self, notification: Notification) -> Result<(), BusError> {
        match self {
            Bus::Local(bus) => bus.publish(notification).await,
            Bus::Redis(bus) => bus.publish(notification).await,
        }
    }

    /// Called before a socket of `user` in `channel` is acknowledged:
    /// returns once the bus will hand this node every notification for it.
    pub async fn subscribe_socket(&self, user: &KeycloakId, channel: &Channel) {
        match self {
            Bus::Local(_) => {}
            Bus::Redis(bus) => bus.subscribe_socket(user, channel).await,
        }
    }

    /// Called once a socket of `user` in `channel` has left.
    pub fn unsubscribe_socket(&self, user: &KeycloakId, channel: &Channel) {
        match self {
            Bus::Local(_) => {}
            Bus::Redis(bus) => bus.unsubscribe_socket(user, channel),
        }
    }

    /// Whether publishes can currently succeed (`/readyz`).
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Local(bus) => bus.is_ready(),
            Bus::Redis(bus) => bus.is_ready(),
        }
    }
}
