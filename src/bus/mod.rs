//! How a notification reaches every node: `/notify` publishes to the bus,
//! and each node delivers to its own sockets only from what the bus hands
//! back ([`Deliver`]). There is no local shortcut, so every node sees the
//! notifications in the same order, the order in which publishes completed;
//! that is docs/protocol.md's ordering guarantee. The bus numbers them in that order
//! (their offset), and keeps them in a history a returning session can be
//! replayed from ([`history`]).
//!
//! [`Bus::Local`] is the in-process bus of a standalone node, [`Bus::Redis`]
//! the Redis pub/sub of a cluster. The bus never reaches up into HTTP or
//! socket.io: it only calls the [`Deliver`] sink it was built with, and is
//! told which sockets come and go so it can subscribe to what they need.

pub mod history;
mod local;
mod redis;

use std::sync::Arc;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use local::LocalBus;
pub use redis::{ASK_TIMEOUT, RedisBus, UNSUBSCRIBE_DELAY};

use self::history::{Missed, Recovering};
use crate::{
    config::Config,
    idempotency::{Answer, Claim, IdempotencyKey},
    metrics::Metrics,
    notification::{Channel, KeycloakId, Notification, Target},
    presence::{Presence, Query},
    recovery::{Ended, NodeId, NotRecoverable, Offset, Session},
};

/// Where the bus hands every notification it receives, with its offset.
/// Implemented by the gateway, which writes to the matching local sockets.
pub trait Deliver: Send + Sync + 'static {
    /// Returns how many sockets it was written to.
    fn deliver(&self, offset: Offset, notification: &Notification) -> usize;

    /// Another node asks: close this node's sockets of `user` that carry
    /// `session`, whose client has come back there. Their disconnect
    /// records the session's end.
    fn take_over(&self, user: &KeycloakId, session: u128);

    /// Refuses `user`'s ws tokens minted at or before `at_ms` on this node
    /// (a revocation this node learns from Redis when it connects).
    fn revoke(&self, user: &KeycloakId, at_ms: u64);

    /// `POST /disconnect`, on this node: first, with `revoke_at`, refuses
    /// `user`'s ws tokens minted at or before it (ms); then closes the
    /// sockets of `user` (in `channel` only, when given) for good; how many.
    fn disconnect(
        &self,
        user: &KeycloakId,
        channel: Option<&Channel>,
        revoke_at: Option<u64>,
    ) -> usize;

    /// What this node has of a presence question.
    fn presence(&self, query: &Query) -> Presence;

    /// The sockets of `targets` (channels and users) missed what this node
    /// cannot deliver whole and in order: closes their connections before
    /// anything more is written to them, their sessions ended at `at_ms`
    /// (when the node lost its bus), so each client reconnects and
    /// recovers from there, or is told it did not.
    fn reconnect(&self, targets: &[Target], at_ms: u64);
}

/// What every node answered to a request: the sum of their counts, and
/// whether every node answered in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gathered {
    pub count: usize,
    pub complete: bool,
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
    /// Starts the bus the configuration asks for, delivering to `sink`. Its
    /// tasks, on `tasks`, run until `stop` is cancelled.
    pub fn start(
        config: &Config,
        node: NodeId,
        sink: Arc<dyn Deliver>,
        metrics: Metrics,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Self, String> {
        match &config.redis {
            Some(settings) => {
                let bus = RedisBus::start(config, settings, node, sink, metrics, stop, tasks)?;
                Ok(Bus::Redis(bus))
            }
            None => {
                metrics.handles().bus_up.set(1);
                Ok(Bus::Local(LocalBus::start(config, sink, stop, tasks)))
            }
        }
    }

    /// Publishes a notification to every node. When this returns `Ok`, the
    /// notification is ordered after every publish that returned before it.
    pub async fn publish(&self, notification: Notification) -> Result<(), BusError> {
        match self {
            Bus::Local(bus) => bus.publish(notification).await,
            Bus::Redis(bus) => bus.publish(notification).await.map(drop),
        }
    }

    /// Publishes a notification and counts the sockets every node wrote it
    /// to (`?receipt=true`), waiting at most [`ASK_TIMEOUT`];
    /// `complete` is false when a node did not report in time.
    pub async fn publish_with_receipt(
        &self,
        notification: Notification,
    ) -> Result<Gathered, BusError> {
        match self {
            Bus::Local(bus) => bus.publish_counted(notification).await,
            Bus::Redis(bus) => bus.publish_with_receipt(notification).await,
        }
    }

    /// Publishes notifications in order, as one publish each in a row would,
    /// but without waiting for one before sending the next (over Redis, one
    /// job of the publisher). One outcome per notification, in order.
    pub async fn publish_many(
        &self,
        notifications: Vec<Notification>,
    ) -> Vec<Result<(), BusError>> {
        match self {
            Bus::Local(bus) => {
                let mut outcomes = Vec::with_capacity(notifications.len());
                for notification in notifications {
                    outcomes.push(bus.publish(notification).await);
                }
                outcomes
            }
            Bus::Redis(bus) => bus
                .publish_many(notifications)
                .await
                .into_iter()
                .map(|outcome| outcome.map(drop))
                .collect(),
        }
    }

    /// [`Self::publish_many`] with a receipt for each notification, as
    /// [`Self::publish_with_receipt`] gives one, all within one
    /// [`ASK_TIMEOUT`].
    pub async fn publish_many_with_receipts(
        &self,
        notifications: Vec<Notification>,
    ) -> Vec<Result<Gathered, BusError>> {
        match self {
            Bus::Local(bus) => bus.publish_many_counted(notifications).await,
            Bus::Redis(bus) => bus.publish_many_with_receipts(notifications).await,
        }
    }

    /// `POST /disconnect`: closes the sockets of `user` (in `channel` only,
    /// when given) on every node, and counts them; `complete` is false when
    /// a node did not answer within [`ASK_TIMEOUT`].
    pub async fn disconnect(
        &self,
        user: &KeycloakId,
        channel: Option<&Channel>,
        revoke_at: Option<u64>,
    ) -> Result<Gathered, BusError> {
        match self {
            Bus::Local(bus) => Ok(Gathered {
                count: bus.sink().disconnect(user, channel, revoke_at),
                complete: true,
            }),
            Bus::Redis(bus) => bus.disconnect(user, channel, revoke_at).await,
        }
    }

    /// A presence question, answered by every node and merged; `complete`
    /// is false when a node did not answer within [`ASK_TIMEOUT`].
    pub async fn presence(&self, query: &Query) -> Result<(Presence, bool), BusError> {
        match self {
            Bus::Local(bus) => Ok((bus.sink().presence(query), true)),
            Bus::Redis(bus) => bus.presence(query).await,
        }
    }

    /// Claims an `Idempotency-Key` for a call of this `fingerprint`, for
    /// every node ([`crate::idempotency`]).
    pub async fn claim(&self, key: &IdempotencyKey, fingerprint: &str) -> Result<Claim, BusError> {
        match self {
            Bus::Local(bus) => Ok(bus.idempotency().claim(key, fingerprint)),
            Bus::Redis(bus) => bus.claim(key, fingerprint).await,
        }
    }

    /// Keeps the answer of a claimed key's call for the window.
    pub async fn complete(&self, key: &IdempotencyKey, fingerprint: &str, answer: &Answer) {
        match self {
            Bus::Local(bus) => bus.idempotency().complete(key, fingerprint, answer),
            Bus::Redis(bus) => bus.complete(key, fingerprint, answer).await,
        }
    }

    /// Gives a claimed key back: its call failed, and a retry is a first call.
    pub async fn release(&self, key: &IdempotencyKey, fingerprint: &str) {
        match self {
            Bus::Local(bus) => bus.idempotency().release(key),
            Bus::Redis(bus) => bus.release(key, fingerprint).await,
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

    /// The offset a new session starts after: no notification at or before
    /// it is replayed to it.
    pub fn position(&self) -> Offset {
        match self {
            Bus::Local(bus) => bus.position(),
            Bus::Redis(bus) => bus.position(),
        }
    }

    /// Records how a session ended, without waiting.
    pub fn end_session(&self, session: &Session, ended: Ended) {
        match self {
            Bus::Local(bus) => bus.end_session(session, ended),
            Bus::Redis(bus) => bus.end_session(session, ended),
        }
    }

    /// What a returning session missed, in order, or why it cannot have it.
    pub async fn recover(&self, recovering: &Recovering) -> Result<Vec<Missed>, NotRecoverable> {
        match self {
            Bus::Local(bus) => bus.recover(recovering),
            Bus::Redis(bus) => bus.recover(recovering).await,
        }
    }
}
