//! The cluster bus: Redis pub/sub between nodes, and the recovery history
//! beside it.
//!
//! * **Publish** ([`publisher`]): with recovery on, one script call for the
//!   notifications queued together (sequence, history entries and
//!   `PUBLISH`es at once, [`history`]; on a Redis Cluster in the one slot of
//!   the `{prefix}` hash tag, see [`key_prefix`]), plain `PUBLISH`es (or
//!   `SPUBLISH` on a Redis Cluster) otherwise, on a shared multiplexed
//!   connection that pipelines concurrent calls. `/notify` is answered once
//!   Redis has executed it, and Redis hands messages to each subscriber
//!   connection in execution order: that is the ordering guarantee.
//! * **Targeted subscriptions** ([`topics`], [`subscriber`]): a node
//!   subscribes to `{prefix}:c:{channel}` and `{prefix}:u:{keycloak}` only
//!   while it holds a local socket in that channel or of that user (the
//!   user-channel variant rides the user topic; delivery filters by
//!   channel).
//! * **Recovery** ([`history`]): one round trip reads a returning session's
//!   record, its node's heartbeat and its two streams. After a lost
//!   connection the node reads from the same streams what its sockets
//!   missed meanwhile ([`catch_up`]).
//! * [`connection`] is the one place that tells a single Redis from a Redis
//!   Cluster.

mod catch_up;
mod connection;
mod history;
mod idempotency;
mod publisher;
mod requests;
mod subscriber;
mod topics;

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{
    connection::{Connection, Connector},
    history::{Keys, RECOVER_SCRIPT, RecoverReply, decode_recover, ended_value},
    publisher::{Job, Publish, Publisher},
    subscriber::{Request, Subscriber},
    topics::Topics,
};
use super::{
    BusError, Deliver,
    history::{Missed, Recovering, StreamKey, merge, retention},
};
use crate::{
    config::{Config, RedisSettings},
    metrics::Metrics,
    notification::{Channel, KeycloakId, Notification, Target},
    recovery::{self, Ended, NODE_DEAD_AFTER, NodeId, NotRecoverable, Offset, Origin, Session},
};

pub use requests::ASK_TIMEOUT;
pub use topics::UNSUBSCRIBE_DELAY;

/// The publishing half of the Redis bus. Cheap to clone.
#[derive(Clone)]
pub struct RedisBus {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<Request>,
    jobs: mpsc::Sender<Job>,
}

/// Jobs waiting for the [`Publisher`]; past this, `/notify` handlers wait.
const JOB_QUEUE: usize = 4096;

/// Recovery settings, when recovery is on.
#[derive(Clone, Copy)]
struct HistorySettings {
    retention: Duration,
    max_missed: usize,
    window: Duration,
}

/// State shared by the publishers and the [`Subscriber`] task.
struct Shared {
    prefix: String,
    node: NodeId,
    /// `None` when recovery is off.
    recovery: Option<HistorySettings>,
    /// `CHANNELS_IDEMPOTENCY_WINDOW`.
    idempotency_window: Duration,
    /// How long a revocation matters: a ws token's lifetime and leeway.
    revocation_lifetime: Duration,
    /// The publishing connection; `None` while Redis is unreachable. A std
    /// `RwLock`: held only to clone the handle, never across an `.await`.
    publisher: RwLock<Option<Connection>>,
    /// True once connected and every needed topic is subscribed again.
    ready: AtomicBool,
    /// Generation of the current connections, so a loss reported for an
    /// older one is ignored.
    generation: AtomicU64,
    /// The highest offset this node has seen published or received: where
    /// a new session starts.
    position: AtomicU64,
    /// The highest offset delivered from the subscription connection: after
    /// its loss, where the [`catch_up`] starts.
    received: AtomicU64,
    /// Lost connections and subscriptions, for the [`Subscriber`].
    lost: mpsc::UnboundedSender<subscriber::Lost>,
    /// This node's requests waiting for answers, by id ([`requests`]).
    asking: dashmap::DashMap<u64, mpsc::UnboundedSender<bytes::Bytes>>,
    next_request: AtomicU64,
    metrics: Metrics,
    /// The node's tasks: a reply to another node's request is sent on one.
    tasks: TaskTracker,
}

impl Shared {
    /// The publishing connection and its generation.
    fn connection(&self) -> (Option<Connection>, u64) {
        let connection = self
            .publisher
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (connection, self.generation.load(Ordering::Acquire))
    }

    fn set_connection(&self, connection: Option<Connection>) {
        *self.publisher.write().unwrap_or_else(|p| p.into_inner()) = connection;
    }
}

impl RedisBus {
    /// Starts the [`Subscriber`] and [`Publisher`] tasks, which connect in
    /// the background (the node starts, not ready, even when Redis is
    /// down) and run until `stop`; the caller awaits their handles.
    pub fn start(
        config: &Config,
        settings: &RedisSettings,
        node: NodeId,
        sink: Arc<dyn Deliver>,
        metrics: Metrics,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Self, String> {
        let connector = Connector::new(settings)?;
        let recovery = config.recovery.enabled().then(|| HistorySettings {
            retention: retention(config),
            max_missed: config.recovery.max_missed,
            window: config.recovery.window,
        });
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (jobs, jobs_rx) = mpsc::channel(JOB_QUEUE);
        let shared = Arc::new(Shared {
            prefix: key_prefix(settings, recovery.is_some()),
            node,
            recovery,
            idempotency_window: config.idempotency.window,
            revocation_lifetime: config.ws_token_ttl + requests::TOKEN_LEEWAY,
            publisher: RwLock::new(None),
            ready: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            position: AtomicU64::new(0),
            received: AtomicU64::new(0),
            lost: lost_tx,
            asking: dashmap::DashMap::new(),
            next_request: AtomicU64::new(0),
            metrics,
            tasks: tasks.clone(),
        });
        let mut topics = Topics::default();
        // Held for the node's life: one "socket" that never leaves.
        topics.add(
            [
                requests::requests_topic(&shared.prefix),
                requests::replies_topic(&shared.prefix, node.0),
            ],
            &mut Vec::new(),
        );
        if recovery.is_some() {
            // Held for the node's life: one "socket" that never leaves.
            topics.add([takeover_topic(&shared.prefix)], &mut Vec::new());
        }
        let subscriber = Subscriber {
            connector,
            shared: shared.clone(),
            sink,
            topics,
            connection: None,
            backoff: subscriber::BACKOFF_MIN,
            next_attempt: Instant::now(),
            attempts: 0,
            ever_connected: false,
            gap: None,
        };
        tasks.spawn(subscriber.run(requests_rx, lost_rx, stop.clone()));
        tasks.spawn(Publisher::run(shared.clone(), jobs_rx, stop));
        Ok(Self {
            shared,
            requests,
            jobs,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Publishes to the notification's topic (and history); how many nodes
    /// received it. Fails fast while not ready.
    pub async fn publish(&self, notification: Notification) -> Result<usize, BusError> {
        self.publish_many(vec![notification])
            .await
            .pop()
            .unwrap_or(Err(BusError::Unavailable))
    }

    /// Publishes notifications in order, as one job: the [`Publisher`]
    /// keeps a job's items together and in order, separate jobs not. Each
    /// one's outcome: how many nodes received it.
    pub async fn publish_many(
        &self,
        notifications: Vec<Notification>,
    ) -> Vec<Result<usize, BusError>> {
        let failed = |n: usize| (0..n).map(|_| Err(BusError::Unavailable)).collect();
        if !self.is_ready() {
            return failed(notifications.len());
        }
        let count = notifications.len();
        let items = notifications
            .into_iter()
            .map(|notification| self.item(notification))
            .collect();
        let (done, outcomes) = oneshot::channel();
        if self.jobs.send(Job::Publish { items, done }).await.is_err() {
            return failed(count);
        }
        outcomes.await.unwrap_or_else(|_| failed(count))
    }

    /// What the [`Publisher`] sends for a notification: its topic, its
    /// history stream (recovery on) and its JSON.
    fn item(&self, notification: Notification) -> Publish {
        let prefix = &self.shared.prefix;
        let topic = match &notification.target {
            Target::Channel { channel } => channel_topic(prefix, channel),
            Target::User { keycloak } | Target::UserChannel { keycloak, .. } => {
                user_topic(prefix, keycloak)
            }
        };
        let stream = self
            .shared
            .recovery
            .map(|_| Keys(prefix).stream(&StreamKey::of(&notification.target)));
        let payload = serde_json::to_vec(&notification).expect("a Notification serialises");
        // The call's answer, kept by the publish script (see `complete`).
        let record = match (&stream, &notification.claimed) {
            (Some(_), Some(claimed)) => {
                let answer = crate::idempotency::Answer {
                    id: notification.id.clone(),
                    variant: notification.target.variant(),
                    receipt: None,
                };
                Some((
                    Keys(prefix).idempotency(&claimed.key),
                    idempotency::done_value(&claimed.fingerprint, &answer),
                ))
            }
            _ => None,
        };
        Publish {
            topic,
            stream,
            payload,
            record,
        }
    }

    /// The highest offset this node has seen.
    pub fn position(&self) -> Offset {
        self.shared.position.load(Ordering::Acquire)
    }

    /// Records how a session ended, without waiting (the [`Publisher`]
    /// sends it with the next batch; lost if Redis is away, which only
    /// makes the session unrecoverable).
    pub fn end_session(&self, session: &Session, ended: Ended) {
        let Some(settings) = self.shared.recovery else {
            return;
        };
        let mut command = redis::cmd("SET");
        command
            .arg(Keys(&self.shared.prefix).session(session))
            .arg(ended_value(ended))
            .arg("PX")
            .arg(settings.window.as_millis() as u64);
        if self.jobs.try_send(Job::Write(command)).is_err() {
            tracing::debug!("session end not recorded: the Redis queue is full");
        }
    }

    /// What a returning session missed, or why it cannot have it.
    pub async fn recover(&self, recovering: &Recovering) -> Result<Vec<Missed>, NotRecoverable> {
        let settings = self.shared.recovery.ok_or(NotRecoverable::Unavailable)?;
        let (Some(mut connection), _) = self.shared.connection() else {
            return Err(NotRecoverable::Unavailable);
        };
        let mut reply = self
            .read_history(&mut connection, recovering, settings)
            .await?;
        let now = recovery::now_ms();
        if recovering.ended_now && reply.ended.is_none() {
            reply.ended = Some(Ended::At(now));
        }
        let beat = |origin| match origin {
            Origin::Seen {
                at_ms,
                stopped: false,
            } => Some(at_ms),
            _ => None,
        };
        let first_beat = beat(reply.origin);
        if reply.ended.is_none()
            && first_beat
                .is_some_and(|at| now.saturating_sub(at) <= NODE_DEAD_AFTER.as_millis() as u64)
        {
            // Another node may still hold the session's previous socket (a
            // polling session outlives its connections): ask every node to
            // close it, and read its record once written.
            reply = self
                .ask_take_over(&mut connection, recovering, settings)
                .await?;
        }
        // A node killed a moment ago still looks alive: its heartbeat is
        // fresh and it wrote no record. Read again once its heartbeat is old
        // enough to tell (at most `NODE_DEAD_AFTER`, and only then). A node
        // that beat again meanwhile is alive: its record expired with the
        // window, or it holds the socket still.
        if let (None, Some(at_ms)) = (reply.ended, beat(reply.origin))
            && Some(at_ms) == first_beat
        {
            let decidable_at = at_ms + NODE_DEAD_AFTER.as_millis() as u64 + 100;
            if decidable_at > now {
                tokio::time::sleep(Duration::from_millis(decidable_at - now)).await;
                reply = self
                    .read_history(&mut connection, recovering, settings)
                    .await?;
            }
        }
        recovery::check_window(
            reply.ended,
            reply.origin,
            recovery::now_ms(),
            settings.window,
        )?;
        merge(recovering, reply.reads, settings.max_missed)
    }

    /// Publishes a take-over of the session to every node, then reads its
    /// history again until the session's end is recorded, for at most
    /// [`TAKE_OVER_WAIT`].
    async fn ask_take_over(
        &self,
        connection: &mut Connection,
        recovering: &Recovering,
        settings: HistorySettings,
    ) -> Result<RecoverReply, NotRecoverable> {
        let mut command = redis::cmd(connection.publish_command());
        command
            .arg(takeover_topic(&self.shared.prefix))
            .arg(format!(
                "{:032x} {:016x} {}",
                recovering.session.id, self.shared.node.0, recovering.user
            ));
        connection
            .query::<i64>(&command)
            .await
            .map_err(|_| NotRecoverable::Unavailable)?;
        let deadline = Instant::now() + TAKE_OVER_WAIT;
        loop {
            tokio::time::sleep(TAKE_OVER_WAIT / 10).await;
            let reply = self.read_history(connection, recovering, settings).await?;
            if reply.ended.is_some() || Instant::now() >= deadline {
                return Ok(reply);
            }
        }
    }

    /// One read of [`RECOVER_SCRIPT`].
    async fn read_history(
        &self,
        connection: &mut Connection,
        recovering: &Recovering,
        settings: HistorySettings,
    ) -> Result<RecoverReply, NotRecoverable> {
        let keys = Keys(&self.shared.prefix);
        let [channel_stream, user_stream] = recovering.streams();
        let mut invocation = RECOVER_SCRIPT.prepare_invoke();
        invocation
            .key(keys.session(&recovering.session))
            .key(keys.heartbeat(recovering.session.origin))
            .key(keys.epoch())
            .key(keys.stream(&channel_stream))
            .key(keys.stream(&user_stream))
            .key(keys.sequence())
            .key(keys.evicted())
            .key(keys.evicted_from())
            .arg(recovering.after)
            .arg(settings.max_missed + 1);
        let reply = connection
            .invoke::<redis::Value>(&invocation)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "recovery read from Redis failed");
                NotRecoverable::Unavailable
            })?;
        decode_recover(reply, recovering).ok_or_else(|| {
            tracing::warn!("recovery read from Redis of unexpected shape");
            NotRecoverable::Unavailable
        })
    }

    /// Returns once the topics a socket of `user` in `channel` needs are
    /// subscribed (or at once while Redis is away: they will be subscribed
    /// before the bus is ready again).
    pub async fn subscribe_socket(&self, user: &KeycloakId, channel: &Channel) {
        let (done, confirmed) = oneshot::channel();
        let topics = self.topics(user, channel);
        if self
            .requests
            .send(Request::Subscribe { topics, done })
            .is_ok()
        {
            let _ = confirmed.await;
        }
    }

    /// The socket of `user` in `channel` left.
    pub fn unsubscribe_socket(&self, user: &KeycloakId, channel: &Channel) {
        let topics = self.topics(user, channel);
        let _ = self.requests.send(Request::Unsubscribe { topics });
    }

    fn topics(&self, user: &KeycloakId, channel: &Channel) -> [String; 2] {
        [
            channel_topic(&self.shared.prefix, channel),
            user_topic(&self.shared.prefix, user),
        ]
    }
}

/// The prefix of every key and topic. On a Redis Cluster with recovery on
/// it is a hash tag, `{prefix}`: the one sequence, the streams, the records
/// and the topics then share one slot, so the publish script reaches them
/// all and its `SPUBLISH` goes out in sequence order. Recovery thus puts the
/// bus's whole traffic on the master of that slot; with it off, topics
/// spread over the shards.
fn key_prefix(settings: &RedisSettings, recovery: bool) -> String {
    if settings.cluster && recovery {
        format!("{{{}}}", settings.prefix)
    } else {
        settings.prefix.clone()
    }
}

/// How long a returning session waits for another node to close its
/// previous socket and record the session's end.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(1);

/// The topic every node listens on for take-overs: `"<session> <asking
/// node> <user>"`. The asking node took over locally before it asked, and
/// ignores its own message (its new socket carries the session too).
fn takeover_topic(prefix: &str) -> String {
    format!("{prefix}:takeover")
}

/// Reads a take-over message: the session, the node that asks, the user.
fn parse_takeover(payload: &[u8]) -> Option<(u128, NodeId, KeycloakId)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (session, rest) = text.split_once(' ')?;
    let (node, user) = rest.split_once(' ')?;
    Some((
        u128::from_str_radix(session, 16).ok()?,
        NodeId(u64::from_str_radix(node, 16).ok()?),
        KeycloakId::parse(user).ok()?,
    ))
}

fn channel_topic(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}:c:{channel}")
}

fn user_topic(prefix: &str, user: &KeycloakId) -> String {
    format!("{prefix}:u:{user}")
}
