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
//! sent in one poll, which the driver writes together.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    Shared,
    connection::Connection,
    history::{Keys, PUBLISH_SCRIPT, heartbeat_value},
};
use crate::{bus::BusError, recovery};

/// Jobs sent to Redis and not yet answered, at most; past this the
/// [`Publisher`] takes no more from its queue.
const JOBS_IN_FLIGHT: usize = 4096;
/// How often the node's heartbeat is written.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// One job for the [`Publisher`].
pub enum Job {
    /// A notification, and where its outcome goes: how many nodes
    /// received it.
    Publish {
        item: Publish,
        done: oneshot::Sender<Result<usize, BusError>>,
    },
    /// Notifications that must go out in this order (a batch): one
    /// pipeline, so neither the connection nor this task reorders them.
    /// One outcome per item.
    PublishMany {
        items: Vec<Publish>,
        done: oneshot::Sender<Vec<Result<usize, BusError>>>,
    },
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

impl Publish {
    /// The publish script's call for this item (recovery on).
    fn invocation(
        &self,
        shared: &Shared,
        stream: &str,
        publish_command: &'static str,
    ) -> redis::ScriptInvocation<'static> {
        let retention = shared
            .recovery
            .map_or(0, |r| r.retention.as_millis() as u64);
        let max = shared.recovery.map_or(0, |r| r.max_missed);
        let mut invocation = PUBLISH_SCRIPT.prepare_invoke();
        invocation
            .key(Keys(&shared.prefix).sequence())
            .key(stream)
            .arg(&self.topic)
            .arg(&self.payload)
            .arg(max)
            .arg(retention)
            .arg(publish_command);
        if let Some((key, value)) = &self.record {
            invocation
                .key(key)
                .arg(value)
                .arg(shared.idempotency_window.as_millis() as u64);
        }
        invocation
    }
}

pub struct Publisher;

impl Publisher {
    /// Runs until `stop`; then sends what is queued, writes the node's last
    /// heartbeat ("stopped") and waits for the answers.
    pub async fn run(shared: Arc<Shared>, mut queue: mpsc::Receiver<Job>, stop: CancellationToken) {
        let mut in_flight = FuturesUnordered::new();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let beats = shared.recovery.is_some();
        loop {
            tokio::select! {
                // Sends what was just pushed, and answers what Redis answered.
                biased;
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                first = queue.recv(), if in_flight.len() < JOBS_IN_FLIGHT => {
                    let Some(first) = first else { break };
                    tokio::task::yield_now().await;
                    let (connection, generation) = shared.connection();
                    let mut next = Some(first);
                    while let Some(job) = next {
                        in_flight.push(Self::send(&shared, connection.clone(), generation, job));
                        next = (in_flight.len() < JOBS_IN_FLIGHT)
                            .then(|| queue.try_recv().ok())
                            .flatten();
                    }
                }
                _ = heartbeat.tick(), if beats => {
                    let (connection, generation) = shared.connection();
                    in_flight.push(Self::send(&shared, connection, generation, Job::Write(beat(&shared, false))));
                }
                _ = stop.cancelled() => break,
            }
        }
        let (connection, generation) = shared.connection();
        while let Ok(job) = queue.try_recv() {
            in_flight.push(Self::send(&shared, connection.clone(), generation, job));
        }
        while in_flight.next().await.is_some() {}
        if beats {
            Self::send(
                &shared,
                connection,
                generation,
                Job::Write(beat(&shared, true)),
            )
            .await;
        }
    }

    /// One job, answered to whoever waits. A failure tells the
    /// [`super::subscriber::Subscriber`] when the connection itself is gone.
    async fn send(shared: &Shared, connection: Option<Connection>, generation: u64, job: Job) {
        let Some(mut connection) = connection else {
            match job {
                Job::Publish { done, .. } => {
                    let _ = done.send(Err(BusError::Unavailable));
                }
                Job::PublishMany { items, done } => {
                    let _ = done.send(items.iter().map(|_| Err(BusError::Unavailable)).collect());
                }
                Job::Write(_) => {}
            }
            return;
        };
        if let Job::PublishMany { items, done } = job {
            let outcomes = Self::publish_many(shared, &mut connection, generation, &items).await;
            let _ = done.send(outcomes);
            return;
        }
        let (result, done) = match job {
            Job::Publish { item, done } if item.stream.is_some() => {
                let stream = item.stream.as_deref().expect("checked above");
                let invocation = item.invocation(shared, stream, connection.publish_command());
                let result = connection.invoke::<(u64, i64)>(&invocation).await.map(
                    |(offset, receivers)| {
                        shared.position.fetch_max(offset, Ordering::AcqRel);
                        receivers.max(0) as usize
                    },
                );
                (result, Some(done))
            }
            Job::Publish {
                item: Publish {
                    topic, mut payload, ..
                },
                done,
            } => {
                // Recovery off: no sequence, every message at offset 0.
                payload.splice(0..0, *b"0 ");
                let mut command = redis::cmd(connection.publish_command());
                command.arg(&topic).arg(payload);
                (
                    connection
                        .query::<i64>(&command)
                        .await
                        .map(|receivers| receivers.max(0) as usize),
                    Some(done),
                )
            }
            Job::Write(command) => (connection.query::<()>(&command).await.map(|()| 0), None),
            Job::PublishMany { .. } => unreachable!("sent above"),
        };
        let outcome = result.map_err(|e| {
            shared.metrics.handles().bus_publish_errors.inc();
            tracing::warn!(error = %e, "write to Redis failed");
            if e.is_unrecoverable_error() || e.is_timeout() || e.is_connection_dropped() {
                let _ = shared.lost.send(generation);
            }
            BusError::Unavailable
        });
        if let Some(done) = done {
            let _ = done.send(outcome);
        }
    }
}

impl Publisher {
    /// One pipeline for the items, in order: the publish script loaded
    /// first (a pipeline does not load it on `NOSCRIPT`), then one call per
    /// item. Each item's outcome (how many nodes received it); all fail
    /// when the connection does.
    async fn publish_many(
        shared: &Shared,
        connection: &mut Connection,
        generation: u64,
        items: &[Publish],
    ) -> Vec<Result<usize, BusError>> {
        let publish = connection.publish_command();
        let mut pipeline = redis::pipe();
        pipeline.ignore_errors();
        let scripted = items.iter().any(|item| item.stream.is_some());
        if scripted {
            pipeline.load_script(&PUBLISH_SCRIPT);
        }
        let mut invocations = Vec::new();
        for item in items {
            if let Some(stream) = &item.stream {
                invocations.push(item.invocation(shared, stream, publish));
            }
        }
        let mut scripts = invocations.iter();
        for item in items {
            match &item.stream {
                Some(_) => {
                    pipeline.invoke_script(scripts.next().expect("one per scripted item"));
                }
                None => {
                    let mut payload = b"0 ".to_vec();
                    payload.extend_from_slice(&item.payload);
                    pipeline.cmd(publish).arg(&item.topic).arg(payload);
                }
            }
        }
        match connection.pipeline(&pipeline).await {
            Ok(replies) => replies
                .into_iter()
                .skip(usize::from(scripted))
                .map(|reply| match reply {
                    redis::Value::ServerError(e) => {
                        shared.metrics.handles().bus_publish_errors.inc();
                        tracing::warn!(error = ?e, "a batch item's publish failed");
                        Err(BusError::Unavailable)
                    }
                    // The script's offset and receivers.
                    redis::Value::Array(parts) => {
                        if let Some(offset) = parts
                            .first()
                            .and_then(|p| redis::from_redis_value_ref::<u64>(p).ok())
                        {
                            shared.position.fetch_max(offset, Ordering::AcqRel);
                        }
                        Ok(parts
                            .get(1)
                            .and_then(|p| redis::from_redis_value_ref::<usize>(p).ok())
                            .unwrap_or(0))
                    }
                    // A plain publish's receivers.
                    other => Ok(redis::from_redis_value_ref::<usize>(&other).unwrap_or(0)),
                })
                .collect(),
            Err(e) => {
                shared.metrics.handles().bus_publish_errors.inc();
                tracing::warn!(error = %e, "batch write to Redis failed");
                if e.is_unrecoverable_error() || e.is_timeout() || e.is_connection_dropped() {
                    let _ = shared.lost.send(generation);
                }
                items.iter().map(|_| Err(BusError::Unavailable)).collect()
            }
        }
    }
}

/// The node's heartbeat, kept for the retention so recovery can judge a
/// session whose node died after that node's last beat.
pub(super) fn beat(shared: &Shared, stopped: bool) -> redis::Cmd {
    let retention = shared
        .recovery
        .map_or(0, |r| r.retention.as_millis() as u64);
    let mut command = redis::cmd("SET");
    command
        .arg(Keys(&shared.prefix).heartbeat(shared.node))
        .arg(heartbeat_value(recovery::now_ms(), stopped))
        .arg("PX")
        .arg(retention.max(1));
    command
}
