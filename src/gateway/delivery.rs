//! The receive side of the bus on this node: find the sockets a notification
//! targets and write it to each, without ever waiting on one of them.
//!
//! A socket whose bounded send queue is full is a slow client: it is counted
//! once and its connection closed ([`close_slow`]), with no socket.io
//! DISCONNECT: the official client takes that as a network failure,
//! reconnects and recovers what it missed, where a DISCONNECT would keep it
//! down. The disconnect handler then runs as for any other disconnect.
//!
//! `POST /disconnect` does send a DISCONNECT, which needs a free slot in
//! the queue: for a slow client [`disconnect_slow`] retries until it goes
//! through; if the client never drains its queue, engine.io's heartbeat
//! cannot queue its ping either and closes the connection at the next ping
//! interval.

use std::{sync::Arc, time::Duration};

use dashmap::{DashSet, mapref::entry::Entry};
use futures_util::FutureExt;
use socketioxide::{SocketError, extract::SocketRef, socket::Sid};
use tokio_util::task::TaskTracker;

use super::{Closing, Recipient, SocketRegistry, SocketTag};
use crate::{
    auth::WsTokens,
    bus::Deliver,
    config::Config,
    metrics::Metrics,
    notification::{Channel, KeycloakId, Notification, Target, now_us},
    presence::{Presence, Query},
    recovery::{Ended, Offset},
};

/// How often [`disconnect_slow`] retries the DISCONNECT of a slow client.
const EVICT_RETRY: Duration = Duration::from_millis(100);

/// Writes notifications from the bus to this node's sockets.
pub struct Delivery {
    registry: Arc<SocketRegistry>,
    metrics: Metrics,
    /// After this long engine.io's heartbeat has closed a client that never
    /// drains (ping interval + ping timeout, and a margin), so
    /// [`disconnect_slow`] stops.
    evict_give_up: Duration,
    /// Slow clients being closed or disconnected, so each is counted and
    /// closed once
    /// however many notifications still find it meanwhile.
    evicting: Arc<DashSet<Sid>>,
    /// Whether events carry their offset (recovery on): socket.io's client
    /// takes a trailing string argument as the stream position.
    offsets: bool,
    closing: Closing,
    /// For `POST /disconnect` with `revoke`.
    ws_tokens: WsTokens,
    /// The node's tasks: each eviction runs on one.
    tasks: TaskTracker,
}

impl Delivery {
    pub fn new(
        registry: Arc<SocketRegistry>,
        metrics: Metrics,
        config: &Config,
        offsets: bool,
        closing: Closing,
        ws_tokens: WsTokens,
        tasks: TaskTracker,
    ) -> Self {
        let evict_give_up = config.ping_interval + config.ping_timeout + Duration::from_secs(5);
        Self {
            registry,
            metrics,
            evict_give_up,
            evicting: Arc::default(),
            offsets,
            closing,
            ws_tokens,
            tasks,
        }
    }
}

impl Deliver for Delivery {
    fn take_over(&self, user: &KeycloakId, session: u128) {
        super::take_over(&self.registry, user, session, None);
    }

    fn revoke(&self, user: &KeycloakId, at_ms: u64) {
        self.ws_tokens.revoke(user, at_ms);
    }

    fn disconnect(
        &self,
        user: &KeycloakId,
        channel: Option<&Channel>,
        revoke_at: Option<u64>,
    ) -> usize {
        if let Some(at) = revoke_at {
            self.revoke(user, at);
        }
        let target = match channel {
            Some(channel) => Target::UserChannel {
                keycloak: user.clone(),
                channel: channel.clone(),
            },
            None => Target::User {
                keycloak: user.clone(),
            },
        };
        let mut sockets = Vec::new();
        self.registry.lookup(&target, &mut sockets);
        let mut closed = 0;
        for Recipient { socket, .. } in sockets {
            self.closing.insert(socket.id, Ended::Closed);
            // The client sees "io server disconnect" and does not reconnect.
            match socket.clone().disconnect() {
                Ok(()) => closed += 1,
                Err(SocketError::InternalChannelFull) => {
                    // A slow client: its queue cannot take the DISCONNECT.
                    self.tasks.spawn(disconnect_slow(
                        socket,
                        self.evict_give_up,
                        self.evicting.clone(),
                    ));
                    closed += 1;
                }
                Err(_) => {
                    self.closing.remove(&socket.id);
                }
            }
        }
        closed
    }

    fn presence(&self, query: &Query) -> Presence {
        self.registry.presence(query)
    }

    fn reconnect(&self, targets: &[Target], at_ms: u64) {
        let mut sockets = Vec::new();
        for target in targets {
            self.registry.lookup(target, &mut sockets);
        }
        let mut closed = 0;
        for Recipient { socket, .. } in sockets {
            // Once per socket (it may be in a channel and a user closed
            // together), and not one `POST /disconnect` is closing for good.
            let Entry::Vacant(entry) = self.closing.entry(socket.id) else {
                continue;
            };
            entry.insert(Ended::At(at_ms));
            // The first poll queues engine.io's close packet, ahead of
            // whatever is written to the socket later, which its client
            // then never reads; the rest only waits for the transport.
            let _ = socket.close_underlying_transport().now_or_never();
            closed += 1;
        }
        if closed > 0 {
            tracing::info!(sockets = closed, "sockets closed to reconnect and recover");
        }
    }

    fn deliver(&self, offset: Offset, notification: &Notification) -> usize {
        let handles = self.metrics.handles();
        handles.bus_received.inc();
        let mut recipients = Vec::new();
        self.registry.lookup(&notification.target, &mut recipients);
        if recipients.is_empty() {
            return 0;
        }
        // Encoded once for all the sockets (`&RawValue` serialises as the
        // posted JSON text, verbatim): a channel of 2,000 sockets would
        // otherwise serialise the message and its packet 2,000 times. The
        // offset is the same for every socket, so it is encoded once too.
        let first = &recipients[0].socket;
        let encoded = if self.offsets {
            first.encode_event("notification", &(&*notification.msg, offset.to_string()))
        } else {
            first.encode_event("notification", &*notification.msg)
        };
        let event = match encoded {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(id = %notification.id, error = %e, "notification not encodable");
                return 0;
            }
        };
        let mut delivered = 0;
        for Recipient { socket, gate, .. } in recipients {
            let sent = match &gate {
                None => socket.emit_encoded(&event),
                Some(gate) => gate.send(&socket, offset, &event),
            };
            match sent {
                Ok(()) => delivered += 1,
                Err(SocketError::InternalChannelFull) => {
                    if self.evicting.insert(socket.id) {
                        handles.slow_client_disconnects.inc();
                        tracing::info!(socket = %SocketTag(socket.id), "slow client: send queue full, closing its connection");
                        self.tasks.spawn(close_slow(socket, self.evicting.clone()));
                    }
                }
                // Closed: the socket is on its way out and its disconnect
                // handler unregisters it; nothing was promised to it.
                Err(e) => {
                    tracing::debug!(socket = %SocketTag(socket.id), error = %e, "socket skipped")
                }
            }
        }
        handles.deliveries.inc_by(delivered);
        let latency_us = now_us().saturating_sub(notification.accepted_at_us);
        handles.notify_latency.observe(latency_us as f64 / 1e6);
        delivered as usize
    }
}

/// Closes a slow client's connection; it is forgotten as evicting once the
/// connection is closed.
async fn close_slow(socket: SocketRef, evicting: Arc<DashSet<Sid>>) {
    socket.close_underlying_transport().await;
    evicting.remove(&socket.id);
}

/// Disconnects a slow client, retrying while its queue is still full.
async fn disconnect_slow(socket: SocketRef, give_up: Duration, evicting: Arc<DashSet<Sid>>) {
    let deadline = tokio::time::Instant::now() + give_up;
    while socket.connected() && tokio::time::Instant::now() < deadline {
        match socket.clone().disconnect() {
            Err(SocketError::InternalChannelFull) => tokio::time::sleep(EVICT_RETRY).await,
            _ => break,
        }
    }
    evicting.remove(&socket.id);
}
