//! Requests from one node to every node, and their answers, over the bus:
//! what `POST /disconnect` needs (a count from every node, and whether every
//! node answered), and presence (each node's [`Presence`], merged).
//!
//! * Every node subscribes, for its life, to `{prefix}:requests` and to its
//!   own `{prefix}:replies:<node>`.
//! * The asking node publishes `{"id", "from", "disconnect": {...}}` (or
//!   `"presence": {...}`) to the requests topic. Redis answers the publish
//!   with how many subscribers received it: one per live node (the asking
//!   node included), so that is how many answers to wait for, with no
//!   registry of nodes.
//! * Each node handles the request on its own sockets and publishes
//!   `"<id> <answer>"` to the asker's replies topic: a count, or a JSON
//!   [`Presence`].
//! * The asker gathers what arrives within [`ASK_TIMEOUT`]; a node that is
//!   stopped or slow makes the answer incomplete, not late.
//! * Delivery receipts ride the notification itself: it names the asker and
//!   a request id, the publish's receiver count says how many nodes got it,
//!   and each of them answers with its socket count once it has written
//!   them. A notification without a receipt costs nothing more.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{RedisBus, Shared};
use crate::{
    bus::{BusError, Deliver, Gathered},
    notification::{Channel, KeycloakId, Notification, Receipt},
    presence::{Presence, Query},
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
    #[serde(flatten)]
    ask: Ask,
}

/// What a request asks of every node.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ask {
    Disconnect(Disconnect),
    Presence(Query),
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
        let (counts, complete) = self
            .ask(Ask::Disconnect(Disconnect {
                keycloak: user.clone(),
                channel: channel.cloned(),
                revoke_at,
            }))
            .await?;
        Ok(Gathered {
            count: counts.iter().filter_map(|answer| count(answer)).sum(),
            complete,
        })
    }

    /// A presence question to every node; their answers merged.
    pub async fn presence(&self, query: &Query) -> Result<(Presence, bool), BusError> {
        let (answers, complete) = self.ask(Ask::Presence(query.clone())).await?;
        let mut merged = Presence::default();
        for answer in answers {
            match serde_json::from_slice::<Presence>(&answer) {
                Ok(presence) => merged.merge(presence),
                Err(_) => tracing::warn!("unreadable presence answer dropped"),
            }
        }
        Ok((merged, complete))
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

    /// Asks every node, and returns their answers and whether every node
    /// answered within [`ASK_TIMEOUT`].
    async fn ask(&self, ask: Ask) -> Result<(Vec<Bytes>, bool), BusError> {
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
            ask,
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
            Ok(nodes) => {
                let (counts, complete) = gather(&mut answered, nodes).await;
                Ok(Gathered {
                    count: counts.iter().filter_map(|answer| count(answer)).sum(),
                    complete,
                })
            }
            Err(e) => Err(e),
        };
        self.shared.asking.remove(&id);
        outcome
    }
}

impl RedisBus {
    /// [`Self::publish_with_receipt`] for notifications published in order
    /// as one job ([`Self::publish_many`]): each one's outcome, its
    /// receipts gathered side by side within one [`ASK_TIMEOUT`].
    pub async fn publish_many_with_receipts(
        &self,
        mut notifications: Vec<Notification>,
    ) -> Vec<Result<Gathered, BusError>> {
        let mut waiting = Vec::with_capacity(notifications.len());
        for notification in &mut notifications {
            let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
            let (answers, answered) = mpsc::unbounded_channel();
            self.shared.asking.insert(id, answers);
            notification.receipt = Some(Receipt {
                node: self.shared.node.0,
                id,
            });
            waiting.push((id, answered));
        }
        let published = self.publish_many(notifications).await;
        let gathered = futures_util::future::join_all(published.into_iter().zip(&mut waiting).map(
            |(outcome, (_, answered))| async move {
                let nodes = outcome?;
                let (counts, complete) = gather(answered, nodes).await;
                Ok(Gathered {
                    count: counts.iter().filter_map(|answer| count(answer)).sum(),
                    complete,
                })
            },
        ))
        .await;
        for (id, _) in waiting {
            self.shared.asking.remove(&id);
        }
        gathered
    }
}

/// Collects the answers of `nodes` nodes, for at most [`ASK_TIMEOUT`], and
/// whether all of them came.
async fn gather(answered: &mut mpsc::UnboundedReceiver<Bytes>, nodes: usize) -> (Vec<Bytes>, bool) {
    let mut answers = Vec::with_capacity(nodes);
    let deadline = tokio::time::Instant::now() + ASK_TIMEOUT;
    while answers.len() < nodes {
        match tokio::time::timeout_at(deadline, answered.recv()).await {
            Ok(Some(answer)) => answers.push(answer),
            _ => break,
        }
    }
    let complete = answers.len() == nodes;
    (answers, complete)
}

/// An answer that is a count (a disconnect, a receipt).
fn count(answer: &[u8]) -> Option<usize> {
    std::str::from_utf8(answer).ok()?.parse().ok()
}

/// A request from another node (or this one): handled on this node's
/// sockets, answered on the asker's replies topic (without waiting).
pub fn handle_request(shared: &Arc<Shared>, sink: &dyn Deliver, payload: &[u8]) {
    let Ok(request) = serde_json::from_slice::<Request>(payload) else {
        tracing::warn!("unreadable request dropped");
        return;
    };
    let answer = match &request.ask {
        Ask::Disconnect(Disconnect {
            keycloak,
            channel,
            revoke_at,
        }) => sink
            .disconnect(keycloak, channel.as_ref(), *revoke_at)
            .to_string()
            .into_bytes(),
        Ask::Presence(query) => {
            serde_json::to_vec(&sink.presence(query)).expect("a Presence serialises")
        }
    };
    reply(shared, request.from, request.id, &answer);
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

/// Answers request `id` of node `to`, without waiting.
pub fn reply(shared: &Shared, to: u64, id: u64, answer: &[u8]) {
    let Some(mut connection) = shared.connection().0 else {
        return;
    };
    let mut command = redis::cmd(connection.publish_command());
    command
        .arg(replies_topic(&shared.prefix, to))
        .arg([format!("{id} ").as_bytes(), answer].concat());
    shared.tasks.spawn(async move {
        if let Err(e) = connection.query::<i64>(&command).await {
            tracing::warn!(error = %e, "answer to a request not sent");
        }
    });
}

/// An answer to one of this node's requests: `"<id> <answer>"`.
pub fn handle_reply(shared: &Shared, payload: &[u8]) {
    let parsed = payload.iter().position(|&b| b == b' ').and_then(|space| {
        let id = std::str::from_utf8(&payload[..space])
            .ok()?
            .parse::<u64>()
            .ok()?;
        Some((id, &payload[space + 1..]))
    });
    match parsed {
        Some((id, answer)) => {
            if let Some(waiting) = shared.asking.get(&id) {
                let _ = waiting.send(Bytes::copy_from_slice(answer));
            }
        }
        None => tracing::warn!("unreadable reply dropped"),
    }
}
