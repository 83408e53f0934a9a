//! The bounded queue of packets waiting to be written to one socket's
//! transport.
//!
//! It replaces a `tokio::sync::mpsc` channel, with the same semantics for
//! what the socket uses (`try_send`, `send`, `try_reserve` and its permits,
//! `recv`/`try_recv`/`poll_recv`, `close`, `is_closed`/`closed`), because of
//! what an idle socket costs: tokio's channel allocates its first block of
//! 32 slots when it is created, whatever its bound, and a slot here is a
//! [`PacketBuf`](engineioxide_core::PacketBuf) of 168 bytes, so every socket
//! held about 5.9 KB (block and channel state) even when nothing was ever
//! queued. This queue is a `VecDeque` behind a mutex: it allocates on the
//! first push and gives its buffer back each time the writer drains it, so
//! an idle socket holds one small allocation.
//!
//! The queue is bounded in items and in bytes (the bytes of the messages
//! waiting, [`Queued`]): a socket that stops reading holds at most
//! `max_buffer_size` packets and about `max_buffer_bytes`, whichever comes
//! first, rather than `max_buffer_size` times the largest message.
//!
//! The mutex is never held across an `.await` and only for a push or a pop,
//! so a std mutex is enough. Senders are many threads (every emit); the
//! receiver is one task at a time (the websocket writer or the polling
//! request), as the socket's `internal_rx` lock guarantees.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use engineioxide_core::{Packet, PacketBuf, Str};
use futures_util::task::AtomicWaker;
#[cfg(test)]
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{
    Notify,
    mpsc::error::{SendError, TrySendError},
};

/// Items the queue's buffer has room for when it is allocated (see
/// [`State::push`]): 16 packets are 640 bytes ([`Waiting`]), held only
/// while packets wait, or while the socket is busy ([`KEEP_WHILE_BUSY_MS`]).
const FIRST_ALLOCATION: usize = 16;

/// A receiver that empties the queue again within this many milliseconds
/// of the last time keeps a buffer of [`FIRST_ALLOCATION`] items (see
/// [`State::drained`]). A socket written to that often would
/// otherwise allocate and free its buffer for every burst: in `loadtest run
/// fanout` that was once per 2–5 deliveries, 8 % of the instructions per
/// delivery (callgrind). An idle socket still holds none: its first
/// drain (after the CONNECT acknowledgement) gives it back, and a socket
/// that falls idle gives it back at its next drain, at the latest the
/// heartbeat's next ping.
const KEEP_WHILE_BUSY_MS: u32 = 1000;

/// What the queue needs of its items: what one weighs against the byte
/// bound, and the form it waits in.
pub(crate) trait Queued: Sized {
    /// The item while it waits in the queue.
    type Waiting;
    fn bytes(&self) -> usize;
    fn pack(self) -> Self::Waiting;
    fn unpack(waiting: Self::Waiting) -> Self;
}

/// A [`PacketBuf`] as it waits: a slow client's queue is full of them, and
/// a `PacketBuf` is 168 bytes inline (two `Packet`s, sized by the `Open`
/// packet), so 256 waiting packets held 43 KB per socket. Nearly every
/// item is one message (an emit), which waits as its `Str` alone in 40
/// bytes; anything else waits boxed.
pub(crate) enum Waiting {
    Message(Str),
    Other(Box<PacketBuf>),
}

impl Queued for PacketBuf {
    type Waiting = Waiting;

    /// The bytes of the messages: what a slow client makes the server hold.
    fn bytes(&self) -> usize {
        self.iter()
            .map(|packet| match packet {
                Packet::Message(text) => text.len(),
                Packet::Binary(data) => data.len(),
                _ => 0,
            })
            .sum()
    }

    fn pack(mut self) -> Waiting {
        if self.len() == 1
            && matches!(self[0], Packet::Message(_))
            && let Some(Packet::Message(text)) = self.pop()
        {
            return Waiting::Message(text);
        }
        Waiting::Other(Box::new(self))
    }

    fn unpack(waiting: Waiting) -> Self {
        match waiting {
            Waiting::Message(text) => smallvec::smallvec![Packet::Message(text)],
            Waiting::Other(packets) => *packets,
        }
    }
}

/// Creates a queue that holds at most `capacity` items, queued or reserved,
/// and takes no item once it holds `max_bytes` (see [`State::has_room`]).
pub(crate) fn channel<T: Queued>(capacity: usize, max_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            bytes: 0,
            reserved: 0,
            receiver_closed: false,
            sender_dropped: false,
            drained_at: 0,
            took: false,
        }),
        capacity,
        max_bytes,
        receiver_waker: AtomicWaker::new(),
        closed: Notify::new(),
        room: Notify::new(),
        waiting_senders: AtomicUsize::new(0),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// The sending side, shared by every thread that emits to the socket.
pub(crate) struct Sender<T: Queued> {
    shared: Arc<Shared<T>>,
}

/// The receiving side, held by the transport that writes to the client.
pub(crate) struct Receiver<T: Queued> {
    shared: Arc<Shared<T>>,
}

/// A slot reserved in the queue: [`Permit::send`] fills it without a
/// second capacity check; dropping the permit gives the slot back.
pub(crate) struct Permit<'a, T: Queued> {
    shared: &'a Shared<T>,
}

struct Shared<T: Queued> {
    state: Mutex<State<T>>,
    capacity: usize,
    max_bytes: usize,
    /// The receiver's task, woken by a push or by the sender going away.
    receiver_waker: AtomicWaker,
    /// Wakes [`Sender::closed`] when the receiver closes or is dropped.
    closed: Notify,
    /// Wakes [`Sender::send`] when a slot frees up or the receiver closes.
    room: Notify,
    /// Senders waiting in [`Sender::send`], so the receiver only touches
    /// `room` (which takes a lock) when someone waits: almost never, since
    /// every sender but the transport upgrade uses `try_send`.
    waiting_senders: AtomicUsize,
}

struct State<T: Queued> {
    queue: VecDeque<T::Waiting>,
    /// What the queued items weigh.
    bytes: usize,
    /// Slots held by permits not yet used: they count against the capacity
    /// and keep the receiver waiting after [`Receiver::close`].
    reserved: usize,
    receiver_closed: bool,
    sender_dropped: bool,
    /// When the receiver last emptied the queue ([`clock_ms`]), 0 if never.
    drained_at: u32,
    /// Whether the receiver took an item since then: finding the queue
    /// empty without (a task woken for something else) is not a drain.
    took: bool,
}

/// Milliseconds since the first call, at least 1: a time that fits in a
/// `u32` (and in [`State`]'s padding), compared with `wrapping_sub`, so it
/// wraps every 49 days at the cost of one buffer kept or given back.
fn clock_ms() -> u32 {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    (epoch.elapsed().as_millis() as u32).max(1)
}

impl<T: Queued> Shared<T> {
    /// Locks the state. No code panics while holding the lock, but if some
    /// did, the queue stays usable: its state is consistent after every
    /// single operation.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Queued> Shared<T> {
    /// Tells a sender waiting in [`Sender::send`] to try again.
    fn wake_waiting_senders(&self) {
        if self.waiting_senders.load(Ordering::Acquire) > 0 {
            self.room.notify_waiters();
        }
    }
}

impl<T: Queued> State<T> {
    /// Room for an item of `bytes` (0 for a reservation, whose item is not
    /// known yet): under both bounds. An item larger than the byte bound
    /// still goes into an empty queue, or it could never be sent; so the
    /// queue holds at most `max_bytes` plus one item.
    fn has_room(&self, shared: &Shared<T>, bytes: usize) -> bool {
        self.queue.len() + self.reserved < shared.capacity
            && self.bytes < shared.max_bytes
            && (self.queue.is_empty() || self.bytes + bytes <= shared.max_bytes)
    }

    /// Queues `value`. The first push after the buffer was given back
    /// allocates room for [`FIRST_ALLOCATION`] items at once: `VecDeque`
    /// would start at four and copy its contents at each doubling, and a
    /// busy socket refills its queue with about a write's worth of packets
    /// (8-9 per write in `loadtest run fanout`) every time it is drained.
    /// Never more than the queue's `capacity` (its bound).
    fn push(&mut self, value: T, capacity: usize) {
        if self.queue.capacity() == 0 {
            self.queue.reserve_exact(FIRST_ALLOCATION.min(capacity));
        }
        self.bytes += value.bytes();
        self.queue.push_back(value.pack());
    }

    fn pop(&mut self) -> Option<T> {
        let value = T::unpack(self.queue.pop_front()?);
        self.bytes -= value.bytes();
        self.took = true;
        Some(value)
    }

    /// Called when the receiver found the queue empty: once it has taken
    /// items, gives the buffer back, so a socket holds no queue memory
    /// between bursts, unless the socket is busy (emptied twice within
    /// [`KEEP_WHILE_BUSY_MS`]) and the buffer is the first allocation's
    /// size; one a burst grew is given back.
    fn drained(&mut self) {
        if !std::mem::take(&mut self.took) {
            return;
        }
        let now = clock_ms();
        let busy = self.drained_at != 0 && now.wrapping_sub(self.drained_at) < KEEP_WHILE_BUSY_MS;
        self.drained_at = now;
        let capacity = self.queue.capacity();
        if capacity > 0 && !(busy && capacity <= FIRST_ALLOCATION) {
            self.queue = VecDeque::new();
        }
    }
}

impl<T: Queued> Sender<T> {
    /// Queues `value` now, or gives it back if the queue is full or closed.
    pub(crate) fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        {
            let mut state = self.shared.lock();
            if state.receiver_closed {
                return Err(TrySendError::Closed(value));
            }
            if !state.has_room(&self.shared, value.bytes()) {
                return Err(TrySendError::Full(value));
            }
            state.push(value, self.shared.capacity);
        }
        self.shared.receiver_waker.wake();
        Ok(())
    }

    /// Queues `value`, waiting for a free slot; gives it back if the
    /// receiver is closed.
    pub(crate) async fn send(&self, mut value: T) -> Result<(), SendError<T>> {
        let _waiting = WaitingSender::count(&self.shared.waiting_senders);
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before the attempt, so a slot freed between the
            // attempt and the await still wakes us.
            room.as_mut().enable();
            match self.try_send(value) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(v)) => return Err(SendError(v)),
                Err(TrySendError::Full(v)) => value = v,
            }
            room.await;
        }
    }

    /// Reserves a slot, or says why there is none.
    pub(crate) fn try_reserve(&self) -> Result<Permit<'_, T>, TrySendError<()>> {
        let mut state = self.shared.lock();
        if state.receiver_closed {
            return Err(TrySendError::Closed(()));
        }
        if !state.has_room(&self.shared, 0) {
            return Err(TrySendError::Full(()));
        }
        state.reserved += 1;
        Ok(Permit {
            shared: &self.shared,
        })
    }

    /// Whether the receiver has closed or gone: nothing sent will be read.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.lock().receiver_closed
    }

    /// Waits until the receiver has closed or gone.
    pub(crate) async fn closed(&self) {
        loop {
            let notified = self.shared.closed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the check and
            // the await still wakes us.
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }
}

/// Counts a sender in [`Shared::waiting_senders`] for as long as it lives,
/// however its `send` future ends (sent, refused, or dropped while waiting).
struct WaitingSender<'a>(&'a AtomicUsize);

impl<'a> WaitingSender<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::AcqRel);
        Self(waiting)
    }
}

impl Drop for WaitingSender<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<T: Queued> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.lock().sender_dropped = true;
        self.shared.receiver_waker.wake();
    }
}

impl<T: Queued> Permit<'_, T> {
    /// Fills the reserved slot. As with tokio's permits, this succeeds even
    /// if the receiver closed meanwhile: a closed receiver still drains what
    /// was queued or reserved before it closed.
    pub(crate) fn send(self, value: T) {
        {
            let mut state = self.shared.lock();
            state.reserved -= 1;
            state.push(value, self.shared.capacity);
        }
        self.shared.receiver_waker.wake();
        std::mem::forget(self);
    }
}

impl<T: Queued> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        self.shared.lock().reserved -= 1;
        // A closed receiver may be waiting for the last permit to resolve.
        self.shared.receiver_waker.wake();
        self.shared.wake_waiting_senders();
    }
}

impl<T: Queued> Receiver<T> {
    /// The next item, or `None` once the sender is gone, or the receiver is
    /// closed, and everything queued or reserved has been received.
    ///
    /// The transports poll ([`Receiver::poll_recv`]); tests and the test
    /// harness's dummy sockets wait with this.
    #[cfg(any(test, feature = "__test_harness"))]
    pub(crate) async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Receiver::recv`] for a hand-written future or stream: the next
    /// item, or `None` once the sender is gone, or the receiver is closed,
    /// and everything queued or reserved has been received.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.shared.lock();
        if let Some(value) = state.pop() {
            drop(state);
            self.shared.wake_waiting_senders();
            return Poll::Ready(Some(value));
        }
        state.drained();
        if state.sender_dropped || (state.receiver_closed && state.reserved == 0) {
            return Poll::Ready(None);
        }
        // Registered under the lock: a push after it is unlocked wakes us.
        self.shared.receiver_waker.register(cx.waker());
        Poll::Pending
    }

    /// The next item if one is queued now (for tests).
    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut state = self.shared.lock();
        if let Some(value) = state.pop() {
            drop(state);
            self.shared.wake_waiting_senders();
            return Ok(value);
        }
        state.drained();
        if state.sender_dropped || (state.receiver_closed && state.reserved == 0) {
            Err(TryRecvError::Disconnected)
        } else {
            Err(TryRecvError::Empty)
        }
    }

    /// Refuses new items; what is queued or reserved can still be received.
    pub(crate) fn close(&mut self) {
        self.shared.lock().receiver_closed = true;
        self.shared.closed.notify_waiters();
        self.shared.wake_waiting_senders();
    }
}

impl<T: Queued> Drop for Receiver<T> {
    fn drop(&mut self) {
        let queued = {
            let mut state = self.shared.lock();
            state.receiver_closed = true;
            std::mem::take(&mut state.queue)
        };
        // Dropped outside the lock: an item's own drop may be arbitrary code.
        drop(queued);
        self.shared.closed.notify_waiters();
        self.shared.wake_waiting_senders();
    }
}

impl<T: Queued> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl<T: Queued> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A test item weighs its value.
    impl Queued for i32 {
        type Waiting = Self;
        fn pack(self) -> Self {
            self
        }
        fn unpack(waiting: Self) -> Self {
            waiting
        }
        fn bytes(&self) -> usize {
            *self as usize
        }
    }

    impl Queued for u8 {
        type Waiting = Self;
        fn pack(self) -> Self {
            self
        }
        fn unpack(waiting: Self) -> Self {
            waiting
        }
        fn bytes(&self) -> usize {
            0
        }
    }

    impl Queued for u64 {
        type Waiting = Self;
        fn pack(self) -> Self {
            self
        }
        fn unpack(waiting: Self) -> Self {
            waiting
        }
        fn bytes(&self) -> usize {
            0
        }
    }

    impl Queued for usize {
        type Waiting = Self;
        fn pack(self) -> Self {
            self
        }
        fn unpack(waiting: Self) -> Self {
            waiting
        }
        fn bytes(&self) -> usize {
            0
        }
    }

    #[tokio::test]
    async fn a_message_waits_in_its_str_alone_and_every_packet_buffer_comes_back_whole() {
        assert!(std::mem::size_of::<Waiting>() <= 40);
        let message = |text: &str| Packet::Message(Str::from(text.to_string()));
        let one: PacketBuf = smallvec::smallvec![message("42[\"a\"]")];
        let two: PacketBuf =
            smallvec::smallvec![message("451-[\"b\"]"), Packet::Binary(vec![1, 2].into())];
        let ping: PacketBuf = smallvec::smallvec![Packet::Ping];
        assert!(matches!(one.clone().pack(), Waiting::Message(_)));
        assert!(matches!(two.clone().pack(), Waiting::Other(_)));
        let (tx, mut rx) = channel::<PacketBuf>(8, usize::MAX);
        for packets in [&one, &two, &ping] {
            tx.try_send(packets.clone()).unwrap();
        }
        for packets in [one, two, ping] {
            assert_eq!(rx.recv().await, Some(packets));
        }
    }

    #[tokio::test]
    async fn the_byte_bound_refuses_what_would_pass_it_but_not_an_item_alone() {
        let (tx, mut rx) = channel(16, 100);
        tx.try_send(60).unwrap();
        assert!(matches!(tx.try_send(50), Err(TrySendError::Full(50))));
        tx.try_send(40).unwrap();
        // Full in bytes: no item, no reservation, however small.
        assert!(matches!(tx.try_send(0), Err(TrySendError::Full(0))));
        assert!(matches!(tx.try_reserve(), Err(TrySendError::Full(()))));
        assert_eq!(rx.recv().await, Some(60));
        assert_eq!(rx.recv().await, Some(40));
        // An item larger than the bound goes into an empty queue, alone.
        tx.try_send(500).unwrap();
        assert!(matches!(tx.try_send(1), Err(TrySendError::Full(1))));
        assert_eq!(rx.recv().await, Some(500));
        // A reservation made under the bound may take it past.
        tx.try_send(90).unwrap();
        let permit = tx.try_reserve().unwrap();
        permit.send(30);
        assert!(matches!(tx.try_send(1), Err(TrySendError::Full(1))));
        assert_eq!(rx.recv().await, Some(90));
        assert_eq!(rx.recv().await, Some(30));
        tx.try_send(100).unwrap();
    }

    #[tokio::test]
    async fn items_arrive_in_order_and_the_bound_counts_permits() {
        let (tx, mut rx) = channel(3, usize::MAX);
        tx.try_send(1).unwrap();
        let permit = tx.try_reserve().unwrap();
        tx.try_send(3).unwrap();
        assert!(matches!(tx.try_send(4), Err(TrySendError::Full(4))));
        assert!(matches!(tx.try_reserve(), Err(TrySendError::Full(()))));
        permit.send(2);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        tx.try_send(5).unwrap();
        assert_eq!(rx.recv().await, Some(5));
    }

    #[tokio::test]
    async fn send_waits_for_a_free_slot_or_the_close() {
        let (tx, mut rx) = channel(1, usize::MAX);
        let tx = Arc::new(tx);
        tx.try_send(1).unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(2).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the queue is full");
        assert_eq!(rx.recv().await, Some(1));
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(sent.expect("a slot freed").unwrap(), Ok(()));
        assert_eq!(rx.recv().await, Some(2));

        tx.try_send(3).unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(4).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        rx.close();
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(sent.expect("the close").unwrap(), Err(SendError(4)));
    }

    #[tokio::test]
    async fn a_dropped_permit_gives_its_slot_back() {
        let (tx, mut rx) = channel(1, usize::MAX);
        drop(tx.try_reserve().unwrap());
        tx.try_send(1).unwrap();
        assert_eq!(rx.recv().await, Some(1));
    }

    #[tokio::test]
    async fn the_buffer_is_given_back_once_drained() {
        let (tx, mut rx) = channel(256, usize::MAX);
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        assert!(rx.shared.lock().queue.capacity() >= 100);
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn the_first_push_makes_room_for_a_burst_within_the_bound() {
        let (tx, mut rx) = channel(256, usize::MAX);
        tx.try_send(0).unwrap();
        assert_eq!(rx.shared.lock().queue.capacity(), FIRST_ALLOCATION);
        for i in 1..FIRST_ALLOCATION {
            tx.try_send(i).unwrap();
        }
        // A burst of that size fits without the buffer being reallocated.
        assert_eq!(rx.shared.lock().queue.capacity(), FIRST_ALLOCATION);
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.shared.lock().queue.capacity(), 0);

        let (small, _rx) = channel(2, usize::MAX);
        small.try_reserve().unwrap().send(0);
        assert_eq!(small.shared.lock().queue.capacity(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_socket_keeps_its_first_buffer_until_it_falls_idle() {
        let (tx, mut rx) = channel(256, usize::MAX);
        let capacity = |rx: &Receiver<usize>| rx.shared.lock().queue.capacity();
        let half_window = Duration::from_millis(KEEP_WHILE_BUSY_MS as u64 / 2);
        // The first drain (a socket's CONNECT acknowledgement) gives it back.
        tx.try_send(0).unwrap();
        while rx.try_recv().is_ok() {}
        assert_eq!(capacity(&rx), 0);
        // Finding it empty without taking anything is no drain: this one
        // comes a window after the last drain, not after the empty look.
        tokio::time::advance(half_window).await;
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        tokio::time::advance(half_window + Duration::from_millis(1)).await;
        tx.try_send(0).unwrap();
        while rx.try_recv().is_ok() {}
        assert_eq!(capacity(&rx), 0);
        // Drained again within the window: busy, so the buffer stays...
        tokio::time::advance(half_window).await;
        tx.try_send(1).unwrap();
        while rx.try_recv().is_ok() {}
        assert_eq!(capacity(&rx), FIRST_ALLOCATION);
        tx.try_send(2).unwrap();
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(capacity(&rx), FIRST_ALLOCATION);
        // ... but not one a burst grew past the first allocation...
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(capacity(&rx), 0);
        tx.try_send(3).unwrap();
        while rx.try_recv().is_ok() {}
        assert_eq!(capacity(&rx), FIRST_ALLOCATION);
        // ... and once idle for the window, the next drain gives it back.
        tokio::time::advance(Duration::from_millis(KEEP_WHILE_BUSY_MS as u64)).await;
        tx.try_send(4).unwrap();
        while rx.try_recv().is_ok() {}
        assert_eq!(capacity(&rx), 0);
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_an_item_sent_from_another_task() {
        let (tx, mut rx) = channel(4, usize::MAX);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.try_send(7).unwrap();
            tx
        });
        assert_eq!(rx.recv().await, Some(7));
        drop(sender.await.unwrap());
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn close_refuses_new_items_but_drains_queued_and_reserved_ones() {
        let (tx, mut rx) = channel(4, usize::MAX);
        tx.try_send(1).unwrap();
        let permit = tx.try_reserve().unwrap();
        rx.close();
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(9), Err(TrySendError::Closed(9))));
        assert!(matches!(tx.try_reserve(), Err(TrySendError::Closed(()))));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        permit.send(2);
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn closed_resolves_when_the_receiver_closes_or_goes() {
        let (tx, mut rx) = channel::<u8>(4, usize::MAX);
        let waiting = tokio::spawn(async move {
            tx.closed().await;
            tx
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        rx.close();
        let tx = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("closed() resolves")
            .unwrap();
        tx.closed().await;

        let (tx, rx) = channel::<u8>(4, usize::MAX);
        let waiting = tokio::spawn(async move { tx.closed().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("closed() resolves")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_item_is_lost_or_duplicated_under_concurrent_senders() {
        let (tx, mut rx) = channel::<u64>(64, usize::MAX);
        let tx = Arc::new(tx);
        let senders: Vec<_> = (0..4u64)
            .map(|s| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut i = 0;
                    while i < 10_000 {
                        let sent = if i % 2 == 0 {
                            tx.try_send(s * 1_000_000 + i).is_ok()
                        } else {
                            tx.try_reserve().map(|p| p.send(s * 1_000_000 + i)).is_ok()
                        };
                        if sent {
                            i += 1;
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        let mut next = [0u64; 4];
        for _ in 0..40_000 {
            let v = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("no lost wake-up")
                .expect("sender alive");
            let (s, i) = ((v / 1_000_000) as usize, v % 1_000_000);
            assert_eq!(i, next[s], "each sender's items arrive once, in order");
            next[s] += 1;
        }
        for s in senders {
            s.await.unwrap();
        }
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }
}
