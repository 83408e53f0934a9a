//! The in-process bus of a standalone node.
//!
//! A bounded queue and one dispatcher task: the queue gives the same order to
//! every publish that returned, and its bound turns a flood of `/notify` calls
//! into back-pressure on the HTTP callers instead of unbounded memory.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{BusError, Deliver};
use crate::notification::Notification;

/// Notifications accepted but not yet dispatched. Past this, publishers wait.
const QUEUE_CAPACITY: usize = 4096;

/// Publishing half of the in-process bus. Cheap to clone.
#[derive(Clone)]
pub struct LocalBus {
    tx: mpsc::Sender<Notification>,
}

impl LocalBus {
    /// Starts the dispatcher task, which runs until every `LocalBus` clone is dropped.
    pub fn new(sink: Arc<dyn Deliver>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Notification>(QUEUE_CAPACITY);
        tokio::spawn(async move {
            while let Some(notification) = rx.recv().await {
                sink.deliver(&notification);
            }
        });
        Self { tx }
    }

    pub async fn publish(&self, notification: Notification) -> Result<(), BusError> {
        self.tx
            .send(notification)
            .await
            .map_err(|_| BusError::Unavailable)
    }

    pub fn is_ready(&self) -> bool {
        !self.tx.is_closed()
    }
}
