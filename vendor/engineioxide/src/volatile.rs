//! The slot of a socket's volatile packets: only the latest volatile send
//! waits to be written, each one replacing the previous.
//!
//! It replaces a `tokio::sync::watch` channel of `Option<PacketBuf>`, with
//! the same semantics for what the socket uses (the latest value wins; the
//! transport that holds the socket's `internal_rx` lock waits for a new one
//! and takes it), because of what an idle socket costs: a watch channel's
//! shared state (its eight `Notify`s, its lock and the value) is a 520-byte
//! allocation made for every socket, while volatile sends are rare. The slot
//! lives in the socket, boxes its packets only while one waits, and is
//! taken rather than cloned.

use std::{
    sync::Mutex,
    task::{Context, Poll},
};

use engineioxide_core::PacketBuf;
use futures_util::task::AtomicWaker;

#[derive(Debug, Default)]
pub(crate) struct Slot {
    latest: Mutex<Option<Box<PacketBuf>>>,
    /// The one receiver waiting for a put: the transport that holds the
    /// socket's `internal_rx` lock. It registers before it looks again, so
    /// a put between its first look and its wait is not missed.
    receiver: AtomicWaker,
}

impl Slot {
    /// Stores `packets`, replacing what was waiting, if anything.
    pub(crate) fn put(&self, packets: PacketBuf) {
        *self.lock() = Some(Box::new(packets));
        self.receiver.wake();
    }

    /// Takes the waiting packets, if any.
    pub(crate) fn take(&self) -> Option<PacketBuf> {
        self.lock().take().map(|packets| *packets)
    }

    /// Takes the waiting packets, or registers the receiver to be woken by
    /// the next put. Cancel-safe: the packets are taken in the same poll
    /// that sees them, so a receiver that stops polling never loses a put.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<PacketBuf> {
        if let Some(packets) = self.take() {
            return Poll::Ready(packets);
        }
        self.receiver.register(cx.waker());
        match self.take() {
            Some(packets) => Poll::Ready(packets),
            None => Poll::Pending,
        }
    }

    /// The lock is held only to swap the value, never across an `.await`; a
    /// panic elsewhere cannot leave the `Option` half-written.
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<PacketBuf>>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use engineioxide_core::Packet;
    use smallvec::smallvec;

    use super::*;

    async fn recv(slot: &Slot) -> PacketBuf {
        std::future::poll_fn(|cx| slot.poll_take(cx)).await
    }

    fn message(text: &'static str) -> PacketBuf {
        smallvec![Packet::Message(text.into())]
    }

    #[test]
    fn the_latest_put_wins_and_is_taken_once() {
        let slot = Slot::default();
        assert!(slot.take().is_none());
        slot.put(message("a"));
        slot.put(message("b"));
        assert_eq!(slot.take(), Some(message("b")));
        assert!(slot.take().is_none());
    }

    #[tokio::test]
    async fn a_receiver_waits_for_a_put() {
        let slot = std::sync::Arc::new(Slot::default());
        let receiver = tokio::spawn({
            let slot = slot.clone();
            async move { recv(&slot).await }
        });
        tokio::task::yield_now().await;
        assert!(!receiver.is_finished());
        slot.put(message("late"));
        assert_eq!(receiver.await.unwrap(), message("late"));
    }

    #[tokio::test]
    async fn a_put_before_the_receiver_looks_is_taken_at_once() {
        let slot = Slot::default();
        slot.put(message("early"));
        assert_eq!(recv(&slot).await, message("early"));
        // That put is taken: nothing more is received.
        let again = tokio::time::timeout(std::time::Duration::from_millis(20), recv(&slot)).await;
        assert!(again.is_err());
    }
}
