//! The [`Subscriber`] task: it owns the subscription connection and the
//! topic table, serialises every SUBSCRIBE/UNSUBSCRIBE (so they reach Redis
//! in the order they were decided), notices a lost connection (a push of
//! kind `Disconnection`, or a failed write reported by the publisher) or a
//! subscription that Redis ended on its own (see [`Lost`]), reconnects
//! with capped exponential backoff and jitter, resubscribes every topic
//! its sockets need, and only then reports ready again. While
//! Redis is away, sockets stay connected and `/notify` answers 503; the
//! topic table stays bounded by the local sockets.
//!
//! Delivery happens in the subscription connection's push handler, straight
//! into [`Deliver`]: no intermediate queue to grow or to drop from.
//! Delivery never blocks (socket queues are bounded and written with
//! `try_send`), so the handler is quick; if it ever lags, Redis buffers
//! (and applies its `client-output-buffer-limit pubsub`).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use redis::{PushInfo, PushKind, Value};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    Shared,
    catch_up::{Gap, Hold, catch_up, targets},
    connection::{Connection, Connector, PushHandler},
    history::{EPOCH_SCRIPT, Keys, split_message},
    parse_takeover,
    publisher::beat,
    requests::{
        handle_reply, handle_request, load_revocations, replies_topic, reply, requests_topic,
    },
    takeover_topic,
    topics::{Topics, UNSUBSCRIBE_DELAY},
};
use crate::{
    bus::Deliver,
    notification::Notification,
    recovery::{self, Offset},
};

/// First and largest wait between two reconnection attempts (before jitter).
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Topics per SUBSCRIBE command when resubscribing everything.
const SUBSCRIBE_CHUNK: usize = 512;

/// What the connections report to the [`Subscriber`], with the generation
/// of the connection they concern.
pub enum Lost {
    /// The connection is gone: its push `Disconnection`, or a failed write.
    Connection(u64),
    /// Redis reported a topic unsubscribed: the confirmation of one of ours,
    /// or one it made on its own. A Redis Cluster node that stops serving a
    /// slot (its master demoted by a failover, the slot migrated) ends the
    /// sharded subscriptions of that slot, and neither the node nor the
    /// redis crate's cluster client would subscribe again: every socket of
    /// those topics would miss all that follows, and no error would show.
    /// So it counts as a lost connection: the node reconnects, subscribes
    /// on the slot's new master, and checks the history's epoch there.
    Subscription { generation: u64, topic: Vec<u8> },
}

/// What the gateway asks of the [`Subscriber`].
pub enum Request {
    /// A socket arrived: make sure its topics are subscribed, then answer.
    Subscribe {
        topics: [String; 2],
        done: oneshot::Sender<()>,
    },
    /// A socket left: its topics may be unsubscribed after the delay.
    Unsubscribe { topics: [String; 2] },
}

pub struct Subscriber {
    pub connector: Connector,
    pub shared: Arc<Shared>,
    pub sink: Arc<dyn Deliver>,
    pub topics: Topics,
    /// The subscription connection; `None` while Redis is unreachable.
    pub connection: Option<Connection>,
    pub backoff: Duration,
    pub next_attempt: Instant,
    /// Connection attempts so far; numbers the generations.
    pub attempts: u64,
    pub ever_connected: bool,
    /// With recovery on, since the connection was lost: where it left off,
    /// after which the sockets here may have missed what other nodes
    /// published ([`super::catch_up`]).
    pub gap: Option<Gap>,
}

impl Subscriber {
    pub async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Request>,
        mut lost: mpsc::UnboundedReceiver<Lost>,
        stop: CancellationToken,
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
                Some(lost) = lost.recv() => self.lost(lost),
                _ = tokio::time::sleep_until(self.next_attempt), if self.connection.is_none() => {
                    self.reconnect().await;
                }
                _ = sweep.tick() => self.sweep().await,
                _ = stop.cancelled() => break,
            }
        }
    }

    async fn handle(&mut self, batch: Vec<Request>) {
        let mut missing: Vec<String> = Vec::new();
        let mut waiters = Vec::new();
        let now = Instant::now();
        for request in batch {
            match request {
                Request::Subscribe { topics, done } => {
                    self.topics.add(topics, &mut missing);
                    waiters.push(done);
                }
                Request::Unsubscribe { topics } => self.topics.remove(topics, now),
            }
        }
        if !missing.is_empty()
            && let Some(connection) = self.connection.as_mut()
        {
            match connection.subscribe(&missing).await {
                Ok(()) => self.topics.confirm(&missing),
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
        let unsubscribe = self.topics.sweep(Instant::now());
        if !unsubscribe.is_empty()
            && let Some(connection) = self.connection.as_mut()
            && let Err(e) = connection.unsubscribe(&unsubscribe).await
        {
            self.down(&format!("UNSUBSCRIBE failed: {e}"));
        }
        self.report_subscriptions();
    }

    /// A loss of the current connection takes the bus down; one reported
    /// for an older connection is past.
    fn lost(&mut self, lost: Lost) {
        let current = self.shared.generation.load(Ordering::Acquire);
        match lost {
            Lost::Connection(generation) if generation == current && self.connection.is_some() => {
                self.down("connection to Redis lost");
            }
            Lost::Subscription { generation, topic }
                if generation == current
                    && self.connection.is_some()
                    && !self.topics.unsubscribed(&topic) =>
            {
                self.down("Redis ended a subscription (a failover or a slot migration)");
            }
            _ => {}
        }
    }

    /// Marks the bus down and schedules a reconnection.
    fn down(&mut self, why: &str) {
        tracing::warn!(
            reason = why,
            "Redis bus down; /notify answers 503 until it is back"
        );
        self.shared.ready.store(false, Ordering::Release);
        self.shared.metrics.handles().bus_up.set(0);
        if self.shared.recovery.is_some() && self.gap.is_none() {
            self.gap = Some(Gap {
                after: self.shared.received.load(Ordering::Acquire),
                since: Instant::now(),
                at_ms: recovery::now_ms(),
            });
        }
        self.shared.set_connection(None);
        self.connection = None;
        self.topics.forget_subscriptions();
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
        let needed = self.topics.resubscribe_set();
        let attempt = async {
            let mut publisher = self.connector.connect(None).await?;
            if self.shared.recovery.is_some() {
                check_epoch(&self.shared, &mut publisher).await?;
                // Alive in Redis before ready: a pid this node hands out from
                // now on can be judged by any node (see `recovery::check_window`).
                publisher.query::<()>(&beat(&self.shared, false)).await?;
            }
            // Revocations made while this node was away or not yet started.
            load_revocations(&self.shared, &mut publisher, &*self.sink).await?;
            let hold = Hold::new(self.gap.is_some());
            let mut subscriber = self
                .connector
                .connect(Some(self.push_handler(generation, hold.clone())))
                .await?;
            for chunk in needed.chunks(SUBSCRIBE_CHUNK) {
                subscriber.subscribe(chunk).await?;
            }
            if let Some(gap) = self.gap {
                let (shared, sink) = (&self.shared, &*self.sink);
                let caught = catch_up(shared, &mut publisher, &needed, gap).await?;
                // Closed first, so nothing newer reaches them before.
                sink.reconnect(&caught.incomplete, gap.at_ms);
                for (offset, n) in &caught.missed {
                    deliver(shared, sink, *offset, n, false);
                }
                let everyone = || sink.reconnect(&targets(&shared.prefix, &needed), gap.at_ms);
                hold.release(caught.until, everyone, |offset, n| {
                    deliver(shared, sink, offset, &n, true)
                });
            }
            Ok::<_, redis::RedisError>((publisher, subscriber))
        };
        match attempt.await {
            Ok((publisher, subscriber)) => {
                self.gap = None;
                self.topics.confirm_all();
                self.shared.generation.store(generation, Ordering::Release);
                self.shared.set_connection(Some(publisher));
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
    fn push_handler(&self, generation: u64, hold: Hold) -> PushHandler {
        let sink = self.sink.clone();
        let shared = self.shared.clone();
        let takeover = takeover_topic(&shared.prefix);
        let requests = requests_topic(&shared.prefix);
        let replies = replies_topic(&shared.prefix, shared.node.0);
        Box::new(move |push: PushInfo| {
            match push.kind {
                PushKind::Message | PushKind::SMessage => match push.data.as_slice() {
                    [Value::BulkString(topic), Value::BulkString(payload)]
                        if *topic == takeover.as_bytes() =>
                    {
                        match parse_takeover(payload) {
                            Some((session, asking, user)) if asking != shared.node => {
                                sink.take_over(&user, session)
                            }
                            Some(_) => {}
                            None => tracing::warn!("unreadable take-over dropped"),
                        }
                    }
                    [Value::BulkString(topic), Value::BulkString(payload)]
                        if *topic == requests.as_bytes() =>
                    {
                        handle_request(&shared, &*sink, payload)
                    }
                    [Value::BulkString(topic), Value::BulkString(payload)]
                        if *topic == replies.as_bytes() =>
                    {
                        handle_reply(&shared, payload)
                    }
                    [_, Value::BulkString(payload)] => {
                        let parsed = split_message(payload).and_then(|(offset, json)| {
                            Some((offset, serde_json::from_slice::<Notification>(json).ok()?))
                        });
                        match parsed {
                            Some((offset, notification)) => {
                                hold.pass(offset, notification, |offset, n| {
                                    deliver(&shared, &*sink, offset, &n, true)
                                })
                            }
                            None => tracing::warn!("unreadable bus message dropped"),
                        }
                    }
                    _ => tracing::warn!("bus message of unexpected shape dropped"),
                },
                PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                    if let Some(Value::BulkString(topic)) = push.data.first() {
                        let topic = topic.clone();
                        let _ = shared.lost.send(Lost::Subscription { generation, topic });
                    }
                }
                PushKind::Disconnection => {
                    let _ = shared.lost.send(Lost::Connection(generation));
                }
                _ => {}
            }
            Ok(())
        })
    }

    fn report_subscriptions(&self) {
        self.shared
            .metrics
            .handles()
            .bus_subscriptions
            .set(self.topics.subscribed() as i64);
    }
}

/// Writes a notification from the bus to this node's sockets; with
/// `receipt`, answers its delivery receipt (not for one read in a
/// catch-up: its caller had its answer long ago).
fn deliver(shared: &Shared, sink: &dyn Deliver, offset: Offset, n: &Notification, receipt: bool) {
    shared.position.fetch_max(offset, Ordering::AcqRel);
    shared.received.fetch_max(offset, Ordering::AcqRel);
    let written = sink.deliver(offset, n);
    if receipt && let Some(receipt) = n.receipt {
        reply(
            shared,
            receipt.node,
            receipt.id,
            written.to_string().as_bytes(),
        );
    }
}

/// Begins a new epoch of the recovery history when the Redis connected to
/// is not the one it was written on (`history`, "The history's epoch"),
/// and moves this node's position to the sequence's current value, so a
/// session that begins before the node has seen a notification starts
/// there, not before everything in the history; so does the mark a later
/// catch-up starts from.
async fn check_epoch(shared: &Shared, connection: &mut Connection) -> redis::RedisResult<()> {
    let keys = Keys(&shared.prefix);
    let mut invocation = EPOCH_SCRIPT.prepare_invoke();
    invocation
        .key(keys.master())
        .key(keys.sequence())
        .key(keys.epoch())
        .key(keys.evicted())
        .key(keys.evicted_from());
    let (began, sequence): (i64, String) = connection.invoke(&invocation).await?;
    if began == 1 {
        tracing::info!(
            "the recovery history begins a new epoch on this Redis (new, promoted by a \
             failover, or restarted without its data): sessions from before are not recovered"
        );
    }
    if let Ok(sequence) = sequence.parse() {
        shared.position.fetch_max(sequence, Ordering::AcqRel);
        shared.received.fetch_max(sequence, Ordering::AcqRel);
    }
    Ok(())
}
