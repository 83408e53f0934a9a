//! Requests from one node to every node, and their answers, over the bus:
//! what `POST /disconnect` needs (a count from every node, and whether every
//! node answered).
//!
//! * Every node subscribes, for its life, to `{prefix}:requests` and to its
//!   own `{prefix}:replies:<node>`.
//! * The asking node publishes `{"id", "from", "disconnect": {...}}` to the
//!   requests topic. Redis answers the publish with how many subscribers
//!   received it: one per live node (the asking node included), so that
//!   is how many answers to wait for, with no registry of nodes.
//! * Each node handles the request on its own sockets and publishes
//!   `"<id> <count>"` to the asker's replies topic.
//! * The asker sums what arrives within [`ASK_TIMEOUT`]; a node that is
//!   stopped or slow makes the answer incomplete, not late.
//! * Delivery receipts ride the notification itself: it names the asker and
//!   a request id, the publish's receiver count says how many nodes got it,
//!   and each of them answers with its socket count once it has written
//!   them. A notification without a receipt costs nothing more.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{RedisBus, Shared};
use crate::{
    bus::{BusError, Deliver, Gathered},
    notification::{Channel, KeycloakId, Notification, Receipt},
};

/// How long a request waits for every node's answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// The ws tokens' expiry leeway (`auth::WsTokens`), which a revocation
/// outlives too.
pub const TOKEN_LEEWAY: Duration = Duration::from_secs(5);

/// The revocations of the last token lifetime, for nodes that start (or
/// reconnect) after them: a sorted set of users scored by when (ms), one
/// key so it lives in one slot on a Redis Cluster too.
pub fn revocations_key(prefix: &str) -> String {
    format!("{prefix}:revoked")
}

/// The topic every node takes requests on.
pub fn requests_topic(prefix: &str) -> String {
    format!("{prefix}:requests")
}

/// The topic a node takes the answers to its requests on.
pub fn replies_topic(prefix: &str, node: u64) -> String {
    format!("{prefix}:replies:{node:016x}")
}

#[derive(Serialize, Deserialize)]
pub struct Request {
    id: u64,
    /// The asking node, whose replies topic gets the answer.
    from: u64,
    disconnect: Disconnect,
}

#[derive(Serialize, Deserialize)]
struct Disconnect {
    keycloak: KeycloakId,
    channel: Option<Channel>,
    /// `revoke`: the call's time, in ms.
    revoke_at: Option<u64>,
}

impl RedisBus {
    /// `POST /disconnect` on every node.
    pub async fn disconnect(
        &self,
        user: &KeycloakId,
        channel: Option<&Channel>,
        revoke_at: Option<u64>,
    ) -> Result<Gathered, BusError> {
        if let Some(at) = revoke_at {
            self.record_revocation(user, at).await?;
        }
        self.ask(Disconnect {
            keycloak: user.clone(),
            channel: channel.cloned(),
            revoke_at,
        })
        .await
    }

    /// Keeps a revocation in Redis for the tokens' lifetime, and drops the
    /// ones older than that, before any node is asked to apply it.
    async fn record_revocation(&self, user: &KeycloakId, at_ms: u64) -> Result<(), BusError> {
        let (Some(mut connection), _) = self.shared.connection() else {
            return Err(BusError::Unavailable);
        };
        let key = revocations_key(&self.shared.prefix);
        let lifetime = self.shared.revocation_lifetime.as_millis() as u64;
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("ZADD")
            .arg(&key)
            .arg("GT")
            .arg(at_ms)
            .arg(user.as_str())
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({}", at_ms.saturating_sub(lifetime)))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(lifetime)
            .ignore();
        connection.pipeline(&pipeline).await.map(drop).map_err(|e| {
            tracing::warn!(error = %e, "revocation not kept in Redis");
            BusError::Unavailable
        })
    }

    async fn ask(&self, disconnect: Disconnect) -> Result<Gathered, BusError> {
        if !self.is_ready() {
            return Err(BusError::Unavailable);
        }
        let (Some(mut connection), _) = self.shared.connection() else {
            return Err(BusError::Unavailable);
        };
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (answers, mut answered) = mpsc::unbounded_channel();
        self.shared.asking.insert(id, answers);
        let request = Request {
            id,
            from: self.shared.node.0,
            disconnect,
        };
        let mut command = redis::cmd(connection.publish_command());
        command
            .arg(requests_topic(&self.shared.prefix))
            .arg(serde_json::to_vec(&request).expect("a Request serialises"));
        let published = connection.query::<i64>(&command).await;
        let outcome = match published {
            Err(e) => {
                tracing::warn!(error = %e, "request to the nodes failed");
                Err(BusError::Unavailable)
            }
            Ok(nodes) => Ok(gather(&mut answered, nodes.max(0) as usize).await),
        };
        self.shared.asking.remove(&id);
        outcome
    }

    /// Publishes with a receipt: every node that received the notification
    /// reports how many sockets it wrote it to, on this node's replies
    /// topic, after it did; the publish says how many nodes received it.
    pub async fn publish_with_receipt(
        &self,
        mut notification: Notification,
    ) -> Result<Gathered, BusError> {
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (answers, mut answered) = mpsc::unbounded_channel();
        self.shared.asking.insert(id, answers);
        notification.receipt = Some(Receipt {
            node: self.shared.node.0,
            id,
        });
        let outcome = match self.publish(notification).await {
            Ok(nodes) => Ok(gather(&mut answered, nodes).await),
            Err(e) => Err(e),
        };
        self.shared.asking.remove(&id);
        outcome
    }
}

/// Sums the answers of `nodes` nodes, for at most [`ASK_TIMEOUT`].
async fn gather(answered: &mut mpsc::UnboundedReceiver<usize>, nodes: usize) -> Gathered {
    let mut gathered = Gathered {
        count: 0,
        complete: false,
    };
    let mut heard = 0;
    let deadline = tokio::time::Instant::now() + ASK_TIMEOUT;
    while heard < nodes {
        match tokio::time::timeout_at(deadline, answered.recv()).await {
            Ok(Some(count)) => {
                gathered.count += count;
                heard += 1;
            }
            _ => break,
        }
    }
    gathered.complete = heard == nodes;
    gathered
}

/// A request from another node (or this one): handled on this node's
/// sockets, answered on the asker's replies topic (without waiting).
pub fn handle_request(shared: &Arc<Shared>, sink: &dyn Deliver, payload: &[u8]) {
    let Ok(request) = serde_json::from_slice::<Request>(payload) else {
        tracing::warn!("unreadable request dropped");
        return;
    };
    let Disconnect {
        keycloak,
        channel,
        revoke_at,
    } = &request.disconnect;
    let count = sink.disconnect(keycloak, channel.as_ref(), *revoke_at);
    reply(shared, request.from, request.id, count);
}

/// Applies the revocations Redis keeps to this node's ws tokens: called
/// once connected, before the node is ready.
pub async fn load_revocations(
    shared: &Shared,
    connection: &mut super::connection::Connection,
    sink: &dyn Deliver,
) -> redis::RedisResult<()> {
    let since =
        crate::recovery::now_ms().saturating_sub(shared.revocation_lifetime.as_millis() as u64);
    let mut command = redis::cmd("ZRANGEBYSCORE");
    command
        .arg(revocations_key(&shared.prefix))
        .arg(since)
        .arg("+inf")
        .arg("WITHSCORES");
    // Scores come as doubles (RESP3); ms since the epoch are exact in one.
    let revoked: Vec<(String, f64)> = connection.query(&command).await?;
    for (user, at) in revoked {
        if let Ok(user) = KeycloakId::parse(&user) {
            sink.revoke(&user, at as u64);
        }
    }
    Ok(())
}

/// Answers request `id` of node `to` with `count`, without waiting.
pub fn reply(shared: &Shared, to: u64, id: u64, count: usize) {
    let Some(mut connection) = shared.connection().0 else {
        return;
    };
    let mut command = redis::cmd(connection.publish_command());
    command
        .arg(replies_topic(&shared.prefix, to))
        .arg(format!("{id} {count}"));
    tokio::spawn(async move {
        if let Err(e) = connection.query::<i64>(&command).await {
            tracing::warn!(error = %e, "answer to a request not sent");
        }
    });
}

/// An answer to one of this node's requests.
pub fn handle_reply(shared: &Shared, payload: &[u8]) {
    let parsed = std::str::from_utf8(payload).ok().and_then(|text| {
        let (id, count) = text.split_once(' ')?;
        Some((id.parse::<u64>().ok()?, count.parse::<usize>().ok()?))
    });
    match parsed {
        Some((id, count)) => {
            if let Some(waiting) = shared.asking.get(&id) {
                let _ = waiting.send(count);
            }
        }
        None => tracing::warn!("unreadable reply dropped"),
    }
}
