//! The [`Publisher`] task: every write this node makes to Redis outside
//! subscriptions, in the order they were asked for: the `/notify`
//! handlers' publishes, the session-end records, and the node's heartbeat.
//!
//! Why a task of its own: a handler that called the connection itself
//! would wake the connection's driver task, and tokio runs the task just
//! woken next (its LIFO slot), before the other handlers that are ready. So
//! the driver wrote each publish on its own, and Redis woke for each (2.4
//! publishes per Redis `read` against 4 here). The first job lets the
//! other ready tasks run (`yield_now`), then every job queued meanwhile is
//! sent in one poll, which the driver writes together; with recovery on,
//! their notifications go out as one call of the publish script (up to
//! [`SCRIPT_ITEMS`]), which costs Redis less than a call each.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    Shared,
    connection::Connection,
    history::{Keys, PUBLISH_SCRIPT, heartbeat_value},
    subscriber::Lost,
};
use crate::{bus::BusError, recovery};

/// Calls sent to Redis and not yet answered, at most; past this the
/// [`Publisher`] takes no more from its queue.
const CALLS_IN_FLIGHT: usize = 4096;
/// The most jobs taken from the queue at once.
const JOBS_AT_ONCE: usize = 4096;
/// The most notifications in one call of the publish script: a script
/// holds Redis for its whole run (5–8 µs per notification), so a large
/// batch goes as several calls, one after the other.
const SCRIPT_ITEMS: usize = 100;
/// How often the node's heartbeat is written. With recovery off nobody
/// reads it, but it is still the node's one regular write: a master
/// demoted with its connections kept answers it `READONLY` (and the node
/// reconnects), where it takes a `PUBLISH` and delivers it only to its own
/// subscribers.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a heartbeat is kept with recovery off, when no session is
/// judged by it.
const HEARTBEAT_KEPT: Duration = Duration::from_secs(3);

/// One job for the [`Publisher`].
pub enum Job {
    /// Notifications that must go out in this order (one, or a batch's),
    /// and where their outcomes go: how many nodes received each.
    Publish { items: Vec<Publish>, done: Done },
    /// A write nobody waits for (a session's end).
    Write(redis::Cmd),
}

/// One notification to publish.
pub struct Publish {
    pub topic: String,
    /// Its history stream; `None` when recovery is off.
    pub stream: Option<String>,
    pub payload: Vec<u8>,
    /// With recovery on and an `Idempotency-Key`: the key's record and its
    /// value, written by the publish script.
    pub record: Option<(String, String)>,
}

/// Where a job's outcomes go.
type Done = oneshot::Sender<Vec<Result<usize, BusError>>>;

/// What one call of the [`Publisher`] sends.
enum Call {
    /// The notifications of one or more [`Job::Publish`]es, in queue order.
    Publish(Vec<(Vec<Publish>, Done)>),
    Write(redis::Cmd),
}

pub struct Publisher;

impl Publisher {
    /// Runs until `stop`; then sends what is queued, writes the node's last
    /// heartbeat ("stopped") and waits for the answers.
    pub async fn run(shared: Arc<Shared>, mut queue: mpsc::Receiver<Job>, stop: CancellationToken) {
        let mut in_flight = FuturesUnordered::new();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                // Sends what was just pushed, and answers what Redis answered.
                biased;
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                first = queue.recv(), if in_flight.len() < CALLS_IN_FLIGHT => {
                    let Some(first) = first else { break };
                    tokio::task::yield_now().await;
                    let mut jobs = vec![first];
                    while jobs.len() < JOBS_AT_ONCE && let Ok(job) = queue.try_recv() {
                        jobs.push(job);
                    }
                    let (connection, generation) = shared.connection();
                    calls(jobs, |call| {
                        in_flight.push(Self::send(&shared, connection.clone(), generation, call));
                    });
                }
                _ = heartbeat.tick() => {
                    let (connection, generation) = shared.connection();
                    in_flight.push(Self::send(&shared, connection, generation, Call::Write(beat(&shared, false))));
                }
                _ = stop.cancelled() => break,
            }
        }
        let (connection, generation) = shared.connection();
        calls(std::iter::from_fn(|| queue.try_recv().ok()), |call| {
            in_flight.push(Self::send(&shared, connection.clone(), generation, call));
        });
        while in_flight.next().await.is_some() {}
        Self::send(
            &shared,
            connection,
            generation,
            Call::Write(beat(&shared, true)),
        )
        .await;
    }

    /// One call, its outcomes handed to whoever waits.
    async fn send(shared: &Shared, connection: Option<Connection>, generation: u64, call: Call) {
        match (call, connection) {
            (Call::Write(command), Some(mut connection)) => {
                if let Err(e) = connection.query::<()>(&command).await {
                    Self::failed(shared, generation, &e);
                }
            }
            (Call::Write(_), None) => {}
            (Call::Publish(jobs), connection) => {
                let items: Vec<&Publish> = jobs.iter().flat_map(|(items, _)| items).collect();
                let mut outcomes = match connection {
                    Some(mut connection) => {
                        Self::publish(shared, &mut connection, generation, &items).await
                    }
                    None => items.iter().map(|_| Err(BusError::Unavailable)).collect(),
                }
                .into_iter();
                for (items, done) in jobs {
                    let _ = done.send(outcomes.by_ref().take(items.len()).collect());
                }
            }
        }
    }

    /// Publishes `items` in order; each one's outcome (how many nodes
    /// received it). Recovery on: calls of the publish script of up to
    /// [`SCRIPT_ITEMS`] each, one after the other, and once one fails the
    /// rest are not sent. Recovery off: one pipeline of plain publishes,
    /// every message at offset 0.
    async fn publish(
        shared: &Shared,
        connection: &mut Connection,
        generation: u64,
        items: &[&Publish],
    ) -> Vec<Result<usize, BusError>> {
        let publish = connection.publish_command();
        let mut outcomes = Vec::with_capacity(items.len());
        if shared.recovery.is_none() {
            let mut pipeline = redis::pipe();
            pipeline.ignore_errors();
            for item in items {
                let mut payload = b"0 ".to_vec();
                payload.extend_from_slice(&item.payload);
                pipeline.cmd(publish).arg(&item.topic).arg(payload);
            }
            match connection.pipeline(&pipeline).await {
                Ok(replies) => outcomes.extend(replies.iter().map(|reply| match reply {
                    redis::Value::ServerError(e) => {
                        Err(Self::item_failed(shared, &format!("{e:?}")))
                    }
                    reply => Ok(redis::from_redis_value_ref::<usize>(reply).unwrap_or(0)),
                })),
                Err(e) => Self::failed(shared, generation, &e),
            }
        } else {
            for chunk in items.chunks(SCRIPT_ITEMS) {
                let invocation = script_call(shared, chunk, publish);
                match connection.invoke::<String>(&invocation).await {
                    Ok(reply) => outcomes.extend(decode_published(&reply).map(|line| {
                        let (offset, received) = line.map_err(|e| Self::item_failed(shared, e))?;
                        shared.position.fetch_max(offset, Ordering::AcqRel);
                        Ok(received)
                    })),
                    Err(e) => {
                        Self::failed(shared, generation, &e);
                        break;
                    }
                }
            }
        }
        outcomes.resize_with(items.len(), || Err(BusError::Unavailable));
        outcomes
    }

    /// A call that failed. Tells the [`super::subscriber::Subscriber`] when
    /// the connection itself is gone, or leads to a Redis that is no longer
    /// a master (`READONLY`: demoted by a failover that kept its
    /// connections, as a managed Redis behind one DNS name may do; a new
    /// connection reaches the master the name or the Sentinels give now).
    fn failed(shared: &Shared, generation: u64, e: &redis::RedisError) {
        shared.metrics.handles().bus_publish_errors.inc();
        tracing::warn!(error = %e, "write to Redis failed");
        let demoted = e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        if e.is_unrecoverable_error() || e.is_timeout() || e.is_connection_dropped() || demoted {
            let _ = shared.lost.send(Lost::Connection(generation));
        }
    }

    /// One notification whose publish Redis refused.
    fn item_failed(shared: &Shared, e: &str) -> BusError {
        shared.metrics.handles().bus_publish_errors.inc();
        tracing::warn!(error = %e, "a notification's publish failed");
        BusError::Unavailable
    }
}

/// Groups jobs taken from the queue together into calls, in queue order:
/// their publishes into calls of about [`SCRIPT_ITEMS`] notifications (a
/// job's items are never split between calls), each write on its own.
fn calls(jobs: impl IntoIterator<Item = Job>, mut send: impl FnMut(Call)) {
    let mut publishes = Vec::new();
    let mut items = 0;
    for job in jobs {
        match job {
            Job::Publish { items: these, done } => {
                items += these.len();
                publishes.push((these, done));
            }
            Job::Write(command) => send(Call::Write(command)),
        }
        if items >= SCRIPT_ITEMS {
            send(Call::Publish(std::mem::take(&mut publishes)));
            items = 0;
        }
    }
    if !publishes.is_empty() {
        send(Call::Publish(publishes));
    }
}

/// Reads [`PUBLISH_SCRIPT`]'s answer: per item, its offset and how many
/// nodes received it, or the error Redis gave it.
pub(super) fn decode_published(reply: &str) -> impl Iterator<Item = Result<(u64, usize), &str>> {
    reply.split('\n').map(|line| {
        let (offset, rest) = line.split_once(' ').unwrap_or((line, ""));
        match (offset.parse::<u64>(), rest.parse::<usize>()) {
            (Ok(offset), Ok(received)) if offset > 0 => Ok((offset, received)),
            (Ok(0), _) => Err(rest),
            _ => Err("unreadable answer of the publish script"),
        }
    })
}

/// The publish script's call for `items` (recovery on): see
/// [`PUBLISH_SCRIPT`] for its keys and arguments.
fn script_call(
    shared: &Shared,
    items: &[&Publish],
    publish_command: &'static str,
) -> redis::ScriptInvocation<'static> {
    let settings = shared.recovery.expect("recovery on");
    let mut invocation = PUBLISH_SCRIPT.prepare_invoke();
    invocation
        .key(Keys(&shared.prefix).sequence())
        .arg(items.len())
        .arg(settings.max_missed)
        .arg(settings.retention.as_millis() as u64)
        .arg(publish_command)
        .arg(shared.idempotency_window.as_millis() as u64);
    let mut records = Vec::new();
    for item in items {
        invocation
            .key(
                item.stream
                    .as_deref()
                    .expect("recovery on: every item has a stream"),
            )
            .arg(&item.topic)
            .arg(&item.payload);
        match &item.record {
            Some((key, value)) => {
                records.push(key);
                // Its index in KEYS: after the sequence and the streams.
                invocation.arg(1 + items.len() + records.len()).arg(value);
            }
            None => {
                invocation.arg(0).arg("");
            }
        }
    }
    for key in records {
        invocation.key(key);
    }
    invocation
}

/// The node's heartbeat, kept for the retention so recovery can judge a
/// session whose node died after that node's last beat.
pub(super) fn beat(shared: &Shared, stopped: bool) -> redis::Cmd {
    let kept = shared.recovery.map_or(HEARTBEAT_KEPT, |r| r.retention);
    let mut command = redis::cmd("SET");
    command
        .arg(Keys(&shared.prefix).heartbeat(shared.node))
        .arg(heartbeat_value(recovery::now_ms(), stopped))
        .arg("PX")
        .arg((kept.as_millis() as u64).max(1));
    command
}

#[cfg(test)]
mod tests {
    use super::decode_published;

    #[test]
    fn each_line_is_an_item_published_or_refused() {
        let reply = "1733000000000001 2\n0 WRONGTYPE Operation against a key\n1733000000000003 0";
        let read: Vec<_> = decode_published(reply).collect();
        assert_eq!(
            read,
            [
                Ok((1_733_000_000_000_001, 2)),
                Err("WRONGTYPE Operation against a key"),
                Ok((1_733_000_000_000_003, 0)),
            ]
        );
    }

    #[test]
    fn an_unreadable_line_is_a_failed_item() {
        for reply in ["", "12", "x 1", "12 x", "0"] {
            let read: Vec<_> = decode_published(reply).collect();
            assert_eq!(read.len(), 1, "{reply:?}");
            assert!(read[0].is_err(), "{reply:?}");
        }
    }
}
