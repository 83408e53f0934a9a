//! The in-process bus of a standalone node.
//!
//! A bounded queue and one dispatcher task: the queue gives the same order to
//! every publish that returned, and its bound turns a flood of `/notify` calls
//! into back-pressure on the HTTP callers instead of unbounded memory. The
//! dispatcher numbers each notification (its offset), keeps it in the
//! [`MemoryHistory`] when recovery is on, and only then delivers it, so a
//! recovering socket finds in the history whatever it was not delivered.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    BusError, Deliver, Gathered,
    history::{MemoryHistory, Missed, Recovering, merge},
};
use crate::{
    config::Config,
    idempotency::LocalStore,
    notification::Notification,
    recovery::{self, Ended, NotRecoverable, Offset, Origin, Session},
};

/// Notifications accepted but not yet dispatched. Past this, publishers wait.
const QUEUE_CAPACITY: usize = 4096;
/// How often the history drops what is past its retention.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Publishing half of the in-process bus. Cheap to clone.
#[derive(Clone)]
pub struct LocalBus {
    /// Notifications to dispatch, each with where its socket count goes
    /// when a receipt was asked for.
    tx: mpsc::Sender<(Notification, Option<oneshot::Sender<usize>>)>,
    shared: Arc<Shared>,
    /// The node's `Idempotency-Key` claims.
    idempotency: Arc<LocalStore>,
    /// This node's sockets, for requests (`POST /disconnect`).
    sink: Arc<dyn Deliver>,
}

struct Shared {
    /// The offset of the last notification dispatched.
    position: AtomicU64,
    /// `None` when recovery is off.
    history: Option<MemoryHistory>,
    window: Duration,
    max_missed: usize,
}

impl LocalBus {
    /// Starts the dispatcher task, which runs until every `LocalBus` clone is
    /// dropped or `stop` is cancelled.
    pub fn start(
        config: &Config,
        sink: Arc<dyn Deliver>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let (tx, mut rx) =
            mpsc::channel::<(Notification, Option<oneshot::Sender<usize>>)>(QUEUE_CAPACITY);
        let shared = Arc::new(Shared {
            position: AtomicU64::new(0),
            history: config
                .recovery
                .enabled()
                .then(|| MemoryHistory::new(config)),
            window: config.recovery.window,
            max_missed: config.recovery.max_missed,
        });
        let dispatcher = shared.clone();
        let requests = sink.clone();
        tasks.spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    next = rx.recv() => {
                        let Some((notification, receipt)) = next else { break };
                        let written = dispatcher.dispatch(notification, &*sink);
                        if let Some(receipt) = receipt {
                            let _ = receipt.send(written);
                        }
                    }
                    _ = sweep.tick() => {
                        if let Some(history) = &dispatcher.history {
                            history.sweep();
                        }
                    }
                    _ = stop.cancelled() => break,
                }
            }
        });
        let idempotency = Arc::new(LocalStore::new(
            config.idempotency.window,
            config.idempotency.max_keys,
        ));
        Self {
            tx,
            shared,
            idempotency,
            sink: requests,
        }
    }

    pub fn sink(&self) -> &dyn Deliver {
        &*self.sink
    }

    pub fn idempotency(&self) -> &LocalStore {
        &self.idempotency
    }

    pub async fn publish(&self, notification: Notification) -> Result<(), BusError> {
        self.tx
            .send((notification, None))
            .await
            .map_err(|_| BusError::Unavailable)
    }

    /// Publishes and waits for the dispatcher to have written it: how many
    /// sockets got it (`?receipt=true`).
    pub async fn publish_counted(&self, notification: Notification) -> Result<Gathered, BusError> {
        let deadline = tokio::time::Instant::now() + super::ASK_TIMEOUT;
        let written = self.send_counted(notification).await?;
        Ok(counted(written, deadline).await)
    }

    /// [`Self::publish_counted`] for notifications in order: all are queued
    /// before any count is awaited, and the counts share one deadline.
    pub async fn publish_many_counted(
        &self,
        notifications: Vec<Notification>,
    ) -> Vec<Result<Gathered, BusError>> {
        let deadline = tokio::time::Instant::now() + super::ASK_TIMEOUT;
        let mut queued = Vec::with_capacity(notifications.len());
        for notification in notifications {
            queued.push(self.send_counted(notification).await);
        }
        let mut outcomes = Vec::with_capacity(queued.len());
        for written in queued {
            outcomes.push(match written {
                Ok(written) => Ok(counted(written, deadline).await),
                Err(e) => Err(e),
            });
        }
        outcomes
    }

    /// Queues a notification whose dispatcher reports how many sockets it
    /// was written to.
    async fn send_counted(
        &self,
        notification: Notification,
    ) -> Result<oneshot::Receiver<usize>, BusError> {
        let (done, written) = oneshot::channel();
        self.tx
            .send((notification, Some(done)))
            .await
            .map_err(|_| BusError::Unavailable)?;
        Ok(written)
    }

    pub fn is_ready(&self) -> bool {
        !self.tx.is_closed()
    }

    /// The offset of the last notification dispatched.
    pub fn position(&self) -> Offset {
        self.shared.position.load(Ordering::Acquire)
    }

    /// Records how a session ended.
    pub fn end_session(&self, session: &Session, ended: Ended) {
        if let Some(history) = &self.shared.history {
            history.end(session, ended);
        }
    }

    /// What a returning session missed, or why it cannot have it.
    pub fn recover(&self, recovering: &Recovering) -> Result<Vec<Missed>, NotRecoverable> {
        let history = self
            .shared
            .history
            .as_ref()
            .ok_or(NotRecoverable::Unavailable)?;
        // This process is the only node: it is alive, so only a record counts.
        let origin = Origin::Seen {
            at_ms: recovery::now_ms(),
            stopped: false,
        };
        let ended = history
            .ended(&recovering.session)
            .or(recovering.ended_now.then(|| Ended::At(recovery::now_ms())));
        recovery::check_window(ended, origin, recovery::now_ms(), self.shared.window)?;
        merge(recovering, history.read(recovering), self.shared.max_missed)
    }
}

impl Shared {
    /// Numbers, keeps and delivers a notification; how many sockets got it.
    fn dispatch(&self, notification: Notification, sink: &dyn Deliver) -> usize {
        let offset = self.position.load(Ordering::Relaxed) + 1;
        match &self.history {
            Some(history) => {
                let notification = Arc::new(notification);
                history.record(offset, notification.clone());
                self.position.store(offset, Ordering::Release);
                sink.deliver(offset, &notification)
            }
            None => {
                self.position.store(offset, Ordering::Release);
                sink.deliver(offset, &notification)
            }
        }
    }
}

/// The count a dispatched notification reports, if it comes by `deadline`.
async fn counted(written: oneshot::Receiver<usize>, deadline: tokio::time::Instant) -> Gathered {
    match tokio::time::timeout_at(deadline, written).await {
        Ok(Ok(count)) => Gathered {
            count,
            complete: true,
        },
        _ => Gathered {
            count: 0,
            complete: false,
        },
    }
}
