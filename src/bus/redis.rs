//! The cluster bus: Redis pub/sub between nodes.
//!
//! * **Publish**: one `PUBLISH` (or `SPUBLISH` on a Redis Cluster) per
//!   notification, on a shared multiplexed connection that pipelines
//!   concurrent calls. `/notify` is answered once Redis has executed it, and
//!   Redis hands messages to each subscriber connection in execution order:
//!   that is the ordering guarantee. The calls go through one task, the
//!   [`Publisher`], which sends the publishes of every handler that is ready
//!   in one write (see there why).
//! * **Targeted subscriptions**: a node subscribes to `{prefix}:c:{channel}`
//!   and `{prefix}:u:{keycloak}` only while it holds a local socket in that
//!   channel or of that user (the user-channel variant rides the user topic;
//!   delivery filters by channel). A topic whose last socket left is
//!   unsubscribed after [`UNSUBSCRIBE_DELAY`], so a reconnecting client does
//!   not cause an unsubscribe/subscribe pair.
//! * **Delivery** happens in the subscription connection's push handler,
//!   straight into [`Deliver`]: no intermediate queue to grow or to drop
//!   from. Delivery never blocks (socket queues are bounded and written with
//!   `try_send`), so the handler is quick; if it ever lags, Redis buffers
//!   (and applies its `client-output-buffer-limit pubsub`).
//! * **Reconnects** are owned by one task, the [`Subscriber`]: it holds the
//!   topic table, serialises every SUBSCRIBE/UNSUBSCRIBE (so they reach Redis
//!   in the order they were decided), notices a lost connection (a push of
//!   kind `Disconnection`, or a failed publish), reconnects with capped
//!   exponential backoff and jitter, resubscribes every topic its sockets
//!   need, and only then reports ready again. While Redis is away, sockets
//!   stay connected and `/notify` answers 503; the topic table stays bounded
//!   by the local sockets.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use redis::{
    AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, PushKind, Value,
    aio::MultiplexedConnection, cluster::ClusterClient, cluster_async::ClusterConnection,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{BusError, Deliver};
use crate::{
    metrics::Metrics,
    notification::{Channel, KeycloakId, Notification, Target},
};

/// How long a topic stays subscribed after its last local socket left.
pub const UNSUBSCRIBE_DELAY: Duration = Duration::from_secs(2);
/// Connect and response timeout of every Redis call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// First and largest wait between two reconnection attempts (before jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Topics per SUBSCRIBE command when resubscribing everything.
const SUBSCRIBE_CHUNK: usize = 512;

/// How to reach Redis. Its `Debug` masks passwords in the URLs.
#[derive(Clone)]
pub struct RedisSettings {
    /// `CHANNELS_REDIS_URL`: one `redis://` / `rediss://` URL, or, for a
    /// cluster, several comma-separated seed nodes.
    pub urls: Vec<String>,
    /// `CHANNELS_REDIS_CLUSTER`: use sharded pub/sub on a Redis Cluster.
    pub cluster: bool,
    /// `CHANNELS_REDIS_PREFIX`: prefix of every topic name.
    pub prefix: String,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|u| crate::config::mask_url(u))
            .collect();
        f.debug_struct("RedisSettings")
            .field("urls", &urls)
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// The publishing half of the Redis bus. Cheap to clone.
#[derive(Clone)]
pub struct RedisBus {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<Request>,
    publishes: mpsc::Sender<Publish>,
}

/// Publishes waiting for the [`Publisher`]; past this, `/notify` handlers wait.
const PUBLISH_QUEUE: usize = 4096;
/// Publishes sent to Redis and not yet answered, at most; past this the
/// [`Publisher`] takes no more from its queue.
const PUBLISHES_IN_FLIGHT: usize = 4096;

/// One notification for the [`Publisher`], and where its outcome goes.
struct Publish {
    topic: String,
    payload: Vec<u8>,
    done: oneshot::Sender<Result<(), BusError>>,
}

/// State shared by the publishers and the [`Subscriber`] task.
struct Shared {
    prefix: String,
    /// The publishing connection; `None` while Redis is unreachable. A std
    /// `RwLock`: held only to clone the handle, never across an `.await`.
    publisher: RwLock<Option<Connection>>,
    /// True once connected and every needed topic is subscribed again.
    ready: AtomicBool,
    /// Generation of the current connections, so a loss reported for an
    /// older one is ignored.
    generation: AtomicU64,
    /// Lost connections, by generation, for the [`Subscriber`].
    lost: mpsc::UnboundedSender<u64>,
    metrics: Metrics,
}

/// Sends the `/notify` handlers' publishes to Redis, as many at a time as
/// are ready.
///
/// Why a task of its own: a handler that called the connection itself
/// would wake the connection's driver task, and tokio runs the task just
/// woken next (its LIFO slot), before the other handlers that are ready.
/// So the driver wrote each publish on its own, and Redis woke for each: in
/// a 2-node cluster run, 2.4 publishes per `read` of Redis's against 9.8
/// for Node's adapter, and 7.2 µs of Redis CPU per notification against
/// 3.5 (BENCHMARKS.md, "Publishing to Redis"). Here the first publish lets
/// the other ready tasks run (`yield_now`), then every publish queued
/// meanwhile is sent in one poll, which the driver writes together.
struct Publisher;

impl Publisher {
    async fn run(shared: Arc<Shared>, mut queue: mpsc::Receiver<Publish>) {
        let mut in_flight = FuturesUnordered::new();
        loop {
            tokio::select! {
                // Sends what was just pushed, and answers what Redis answered.
                biased;
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                first = queue.recv(), if in_flight.len() < PUBLISHES_IN_FLIGHT => {
                    let Some(first) = first else { break };
                    tokio::task::yield_now().await;
                    let connection = shared
                        .publisher
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let generation = shared.generation.load(Ordering::Acquire);
                    let mut next = Some(first);
                    while let Some(publish) = next {
                        in_flight.push(Self::send(&shared, connection.clone(), generation, publish));
                        next = (in_flight.len() < PUBLISHES_IN_FLIGHT)
                            .then(|| queue.try_recv().ok())
                            .flatten();
                    }
                }
                else => break,
            }
        }
        while in_flight.next().await.is_some() {}
    }

    /// One publish, answered to its handler. A failure tells the
    /// [`Subscriber`] when the connection itself is gone.
    async fn send(
        shared: &Shared,
        connection: Option<Connection>,
        generation: u64,
        publish: Publish,
    ) {
        let Publish {
            topic,
            payload,
            done,
        } = publish;
        let Some(mut connection) = connection else {
            let _ = done.send(Err(BusError::Unavailable));
            return;
        };
        let mut command = redis::cmd(match connection {
            Connection::Single(_) => "PUBLISH",
            Connection::Cluster(_) => "SPUBLISH",
        });
        command.arg(&topic).arg(payload);
        let result = match &mut connection {
            Connection::Single(c) => command.query_async::<i64>(c).await,
            Connection::Cluster(c) => command.query_async::<i64>(c).await,
        };
        let outcome = result.map(drop).map_err(|e| {
            shared.metrics.handles().bus_publish_errors.inc();
            tracing::warn!(error = %e, "publish to Redis failed");
            if e.is_unrecoverable_error() || e.is_timeout() || e.is_connection_dropped() {
                let _ = shared.lost.send(generation);
            }
            BusError::Unavailable
        });
        let _ = done.send(outcome);
    }
}

/// A single-Redis or a Redis Cluster connection.
#[derive(Clone)]
enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// What the gateway asks of the [`Subscriber`].
enum Request {
    /// A socket arrived: make sure its topics are subscribed, then answer.
    Subscribe {
        topics: [String; 2],
        done: oneshot::Sender<()>,
    },
    /// A socket left: its topics may be unsubscribed after the delay.
    Unsubscribe { topics: [String; 2] },
}

impl RedisBus {
    /// Starts the [`Subscriber`] task, which connects in the background: the
    /// node starts (not ready) even when Redis is down.
    pub fn start(
        settings: &RedisSettings,
        sink: Arc<dyn Deliver>,
        metrics: Metrics,
    ) -> Result<Self, String> {
        let connector = Connector::new(settings)?;
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (publishes, publishes_rx) = mpsc::channel(PUBLISH_QUEUE);
        let shared = Arc::new(Shared {
            prefix: settings.prefix.clone(),
            publisher: RwLock::new(None),
            ready: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            lost: lost_tx,
            metrics,
        });
        let subscriber = Subscriber {
            connector,
            shared: shared.clone(),
            sink,
            topics: HashMap::new(),
            connection: None,
            backoff: BACKOFF_MIN,
            next_attempt: Instant::now(),
            attempts: 0,
            ever_connected: false,
        };
        tokio::spawn(subscriber.run(requests_rx, lost_rx));
        tokio::spawn(Publisher::run(shared.clone(), publishes_rx));
        Ok(Self {
            shared,
            requests,
            publishes,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Publishes to the notification's topic. Fails fast while not ready.
    pub async fn publish(&self, notification: Notification) -> Result<(), BusError> {
        if !self.is_ready() {
            return Err(BusError::Unavailable);
        }
        let topic = match &notification.target {
            Target::Channel { channel } => channel_topic(&self.shared.prefix, channel),
            Target::User { keycloak } | Target::UserChannel { keycloak, .. } => {
                user_topic(&self.shared.prefix, keycloak)
            }
        };
        let payload = serde_json::to_vec(&notification).expect("a Notification serialises");
        let (done, outcome) = oneshot::channel();
        let publish = Publish {
            topic,
            payload,
            done,
        };
        if self.publishes.send(publish).await.is_err() {
            return Err(BusError::Unavailable);
        }
        outcome.await.unwrap_or(Err(BusError::Unavailable))
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

fn channel_topic(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}:c:{channel}")
}

fn user_topic(prefix: &str, user: &KeycloakId) -> String {
    format!("{prefix}:u:{user}")
}

/// One topic of the subscription table.
struct Topic {
    /// Local sockets that need it.
    sockets: usize,
    /// Whether Redis confirmed the subscription on the current connection.
    subscribed: bool,
    /// Since when no local socket needs it.
    idle_since: Option<Instant>,
}

/// The task that owns the subscription connection and the topic table.
struct Subscriber {
    connector: Connector,
    shared: Arc<Shared>,
    sink: Arc<dyn Deliver>,
    topics: HashMap<String, Topic>,
    /// The subscription connection; `None` while Redis is unreachable.
    connection: Option<Connection>,
    backoff: Duration,
    next_attempt: Instant,
    /// Connection attempts so far; numbers the generations.
    attempts: u64,
    ever_connected: bool,
}

impl Subscriber {
    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Request>,
        mut lost: mpsc::UnboundedReceiver<u64>,
    ) {
        let mut sweep = tokio::time::interval(UNSUBSCRIBE_DELAY / 2);
        loop {
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { break };
                    // Take everything already waiting: one SUBSCRIBE for a burst of connects.
                    let mut batch = vec![request];
                    while batch.len() < SUBSCRIBE_CHUNK {
                        match requests.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                    self.handle(batch).await;
                }
                Some(generation) = lost.recv() => {
                    if generation == self.shared.generation.load(Ordering::Acquire) && self.connection.is_some() {
                        self.down("connection to Redis lost");
                    }
                }
                _ = tokio::time::sleep_until(self.next_attempt), if self.connection.is_none() => {
                    self.reconnect().await;
                }
                _ = sweep.tick() => self.sweep().await,
            }
        }
    }

    async fn handle(&mut self, batch: Vec<Request>) {
        let mut missing: Vec<String> = Vec::new();
        let mut waiters = Vec::new();
        for request in batch {
            match request {
                Request::Subscribe { topics, done } => {
                    for name in topics {
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
                    waiters.push(done);
                }
                Request::Unsubscribe { topics } => {
                    for name in topics {
                        if let Some(topic) = self.topics.get_mut(&name) {
                            topic.sockets = topic.sockets.saturating_sub(1);
                            if topic.sockets == 0 {
                                topic.idle_since = Some(Instant::now());
                            }
                        }
                    }
                }
            }
        }
        if !missing.is_empty()
            && let Some(connection) = self.connection.as_mut()
        {
            match self.connector.subscribe(connection, &missing).await {
                Ok(()) => {
                    for name in &missing {
                        if let Some(topic) = self.topics.get_mut(name) {
                            topic.subscribed = true;
                        }
                    }
                }
                Err(e) => self.down(&format!("SUBSCRIBE failed: {e}")),
            }
        }
        self.report_subscriptions();
        for done in waiters {
            let _ = done.send(());
        }
    }

    /// Unsubscribes the topics idle for longer than [`UNSUBSCRIBE_DELAY`].
    async fn sweep(&mut self) {
        let now = Instant::now();
        let idle: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, t)| {
                t.idle_since
                    .is_some_and(|since| now - since >= UNSUBSCRIBE_DELAY)
            })
            .map(|(name, _)| name.clone())
            .collect();
        if idle.is_empty() {
            return;
        }
        let subscribed: Vec<String> = idle
            .iter()
            .filter(|name| self.topics[*name].subscribed)
            .cloned()
            .collect();
        for name in &idle {
            self.topics.remove(name);
        }
        if !subscribed.is_empty()
            && let Some(connection) = self.connection.as_mut()
            && let Err(e) = self.connector.unsubscribe(connection, &subscribed).await
        {
            self.down(&format!("UNSUBSCRIBE failed: {e}"));
        }
        self.report_subscriptions();
    }

    /// Marks the bus down and schedules a reconnection.
    fn down(&mut self, why: &str) {
        tracing::warn!(
            reason = why,
            "Redis bus down; /notify answers 503 until it is back"
        );
        self.shared.ready.store(false, Ordering::Release);
        self.shared.metrics.handles().bus_up.set(0);
        *self
            .shared
            .publisher
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.connection = None;
        for topic in self.topics.values_mut() {
            topic.subscribed = false;
        }
        self.schedule_retry();
    }

    fn schedule_retry(&mut self) {
        // Full jitter around the current backoff, so nodes do not reconnect in lockstep.
        let jittered = self.backoff.mul_f64(0.5 + fastrand::f64());
        self.next_attempt = Instant::now() + jittered;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Connects both connections and resubscribes every needed topic; only
    /// then is the bus ready.
    async fn reconnect(&mut self) {
        // Every attempt gets its own number, so a late loss report from the
        // connection of a failed attempt cannot pass for the current one.
        self.attempts += 1;
        let generation = self.attempts;
        self.topics.retain(|_, t| t.sockets > 0);
        let needed: Vec<String> = self.topics.keys().cloned().collect();
        let attempt = async {
            let publisher = self.connector.connect(None).await?;
            let mut subscriber = self
                .connector
                .connect(Some(self.push_handler(generation)))
                .await?;
            for chunk in needed.chunks(SUBSCRIBE_CHUNK) {
                self.connector.subscribe(&mut subscriber, chunk).await?;
            }
            Ok::<_, redis::RedisError>((publisher, subscriber))
        };
        match attempt.await {
            Ok((publisher, subscriber)) => {
                for topic in self.topics.values_mut() {
                    topic.subscribed = true;
                }
                self.shared.generation.store(generation, Ordering::Release);
                *self
                    .shared
                    .publisher
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = Some(publisher);
                self.connection = Some(subscriber);
                self.backoff = BACKOFF_MIN;
                let handles = self.shared.metrics.handles();
                if self.ever_connected {
                    handles.bus_reconnects.inc();
                }
                self.ever_connected = true;
                handles.bus_up.set(1);
                self.shared.ready.store(true, Ordering::Release);
                self.report_subscriptions();
                tracing::info!(topics = needed.len(), "Redis bus connected");
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot reach Redis");
                self.schedule_retry();
            }
        }
    }

    /// Delivers messages straight from the connection, and reports its loss.
    fn push_handler(&self, generation: u64) -> PushHandler {
        let sink = self.sink.clone();
        let lost = self.shared.lost.clone();
        Box::new(move |push: PushInfo| {
            match push.kind {
                PushKind::Message | PushKind::SMessage => match push.data.as_slice() {
                    [_, Value::BulkString(payload)] => {
                        match serde_json::from_slice::<Notification>(payload) {
                            Ok(notification) => sink.deliver(&notification),
                            Err(e) => tracing::warn!(error = %e, "unreadable bus message dropped"),
                        }
                    }
                    _ => tracing::warn!("bus message of unexpected shape dropped"),
                },
                PushKind::Disconnection => {
                    let _ = lost.send(generation);
                }
                _ => {}
            }
            Ok(())
        })
    }

    fn report_subscriptions(&self) {
        let active = self.topics.values().filter(|t| t.subscribed).count();
        self.shared
            .metrics
            .handles()
            .bus_subscriptions
            .set(active as i64);
    }
}

/// Handles what Redis pushes on a subscription connection.
type PushHandler = Box<dyn Fn(PushInfo) -> Result<(), Infallible> + Send + Sync>;

/// Opens connections and issues (un)subscribe commands, for a single Redis
/// or a Redis Cluster.
enum Connector {
    Single(Box<Client>),
    Cluster(Vec<String>),
}

impl Connector {
    fn new(settings: &RedisSettings) -> Result<Self, String> {
        if settings.cluster {
            ClusterClient::new(settings.urls.clone())
                .map_err(|e| format!("CHANNELS_REDIS_URL: {e}"))?;
            return Ok(Connector::Cluster(settings.urls.clone()));
        }
        let [url] = settings.urls.as_slice() else {
            return Err("CHANNELS_REDIS_URL: several URLs need CHANNELS_REDIS_CLUSTER=true".into());
        };
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("CHANNELS_REDIS_URL: {e}"))?;
        let redis = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(redis))
            .map_err(|e| format!("CHANNELS_REDIS_URL: {e}"))?;
        Ok(Connector::Single(Box::new(client)))
    }

    /// A new connection; with `push`, a subscription connection whose pushes
    /// go to that handler.
    async fn connect(&self, push: Option<PushHandler>) -> redis::RedisResult<Connection> {
        match self {
            Connector::Single(client) => {
                let mut config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT));
                if let Some(push) = push {
                    config = config.set_push_sender(push);
                }
                Ok(Connection::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Connector::Cluster(urls) => {
                let mut builder = ClusterClient::builder(urls.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(REDIS_TIMEOUT)
                    .response_timeout(REDIS_TIMEOUT);
                if let Some(push) = push {
                    builder = builder.push_sender(push);
                }
                Ok(Connection::Cluster(
                    builder.build()?.get_async_connection().await?,
                ))
            }
        }
    }

    async fn subscribe(
        &self,
        connection: &mut Connection,
        topics: &[String],
    ) -> redis::RedisResult<()> {
        match connection {
            Connection::Single(c) => c.subscribe(topics).await,
            // Sharded channels of one SSUBSCRIBE must share a slot: one each.
            Connection::Cluster(c) => {
                for topic in topics {
                    c.ssubscribe(topic).await?;
                }
                Ok(())
            }
        }
    }

    async fn unsubscribe(
        &self,
        connection: &mut Connection,
        topics: &[String],
    ) -> redis::RedisResult<()> {
        match connection {
            Connection::Single(c) => c.unsubscribe(topics).await,
            Connection::Cluster(c) => {
                for topic in topics {
                    c.sunsubscribe(topic).await?;
                }
                Ok(())
            }
        }
    }
}
