//! Prometheus metrics: one [`Metrics`] handle, cloned into every component
//! that counts something, rendered as text by `GET /metrics`.
//!
//! Label values are bounded: limits and outcomes are enums here
//! ([`Limit`], [`NotifyOutcome`], [`ConnectOutcome`]; recovery's reasons
//! are [`NotRecoverable`], variants [`Target::VARIANTS`]), counted only
//! through this module's methods, so a typo cannot start a new series and
//! every series exists from the start. Channel names (already validated)
//! get their own series only up to
//! `CHANNELS_METRICS_MAX_CHANNELS`; further channels share the series
//! `channel="_other"`. User ids are never labels.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::{
    notification::{Channel, Target},
    recovery::NotRecoverable,
};

/// The `variant` label of a call refused before it had a target.
const NO_VARIANT: &str = "none";
/// The `outcome` label of a recovered session.
const RECOVERED: &str = "recovered";

/// The label shared by channels past the label cap.
pub const OTHER_CHANNEL: &str = "_other";

/// Every metric of a node. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    max_channel_labels: usize,
    /// Channels that currently have a series of their own.
    channel_labels: AtomicUsize,
    sockets_by_channel: IntGaugeVec,
    /// Handles to the metrics the rest of the gateway updates.
    pub handles: Handles,
}

/// The metrics updated outside this module.
pub struct Handles {
    /// Connected sockets on this node.
    pub sockets: IntGauge,
    /// Socket.IO connection attempts by outcome (`accepted`, `unauthorized`,
    /// `bad_request`, `too_many_sockets`).
    connects: IntCounterVec,
    /// `/notify` calls by variant and outcome.
    notifications: IntCounterVec,
    /// Notifications written to a socket's queue.
    pub deliveries: IntCounter,
    /// Seconds from `/notify` acceptance to the socket write, per delivered notification.
    pub notify_latency: Histogram,
    /// Notifications this node received from the bus.
    pub bus_received: IntCounter,
    /// 1 while the cluster bus is usable, 0 while it is not.
    pub bus_up: IntGauge,
    /// Times the bus connection was re-established.
    pub bus_reconnects: IntCounter,
    /// Notifications read from the history after a lost bus connection:
    /// what the other nodes published while this one was away.
    pub bus_caught_up: IntCounter,
    /// Publishes that failed (each answered 503).
    pub bus_publish_errors: IntCounter,
    /// Bus topics this node is subscribed to.
    pub bus_subscriptions: IntGauge,
    /// Sockets whose connection was closed because their send queue
    /// overflowed; their clients reconnect and recover.
    pub slow_client_disconnects: IntCounter,
    /// Sessions that came back with a pid: `recovered`, or why not.
    recoveries: IntCounterVec,
    /// Open TCP connections (HTTP calls, polling and websocket transports).
    pub connections: IntGauge,
    /// Calls and connections refused by a limit, by limit ([`Limit`]).
    limit_refusals: IntCounterVec,
}

/// A limit of [`crate::limits`]: the `limit` label of
/// `channels_limit_refusals_total`, also named to the refused caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    MaxConnections,
    ConnectRate,
    SocketsPerUser,
    AuthorizeRate,
    NotifyRatePerKey,
    NotifyRatePerAddress,
    BodySize,
    JsonDepth,
    HeaderTimeout,
}

impl Limit {
    const ALL: [Limit; 9] = [
        Limit::MaxConnections,
        Limit::ConnectRate,
        Limit::SocketsPerUser,
        Limit::AuthorizeRate,
        Limit::NotifyRatePerKey,
        Limit::NotifyRatePerAddress,
        Limit::BodySize,
        Limit::JsonDepth,
        Limit::HeaderTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::ConnectRate => "connect_rate",
            Limit::SocketsPerUser => "sockets_per_user",
            Limit::AuthorizeRate => "authorize_rate",
            Limit::NotifyRatePerKey => "notify_rate_per_key",
            Limit::NotifyRatePerAddress => "notify_rate_per_address",
            Limit::BodySize => "body_size",
            Limit::JsonDepth => "json_depth",
            Limit::HeaderTimeout => "header_timeout",
        }
    }
}

/// The `outcome` label of `channels_notifications_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyOutcome {
    Accepted,
    /// An `Idempotency-Key`'s repeat, answered from the first call.
    Replayed,
    Rejected,
    Unavailable,
}

impl NotifyOutcome {
    fn label(self) -> &'static str {
        match self {
            NotifyOutcome::Accepted => "accepted",
            NotifyOutcome::Replayed => "replayed",
            NotifyOutcome::Rejected => "rejected",
            NotifyOutcome::Unavailable => "unavailable",
        }
    }
}

/// The `outcome` label of `channels_connects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    Accepted,
    Unauthorized,
    BadRequest,
    TooManySockets,
}

impl ConnectOutcome {
    const ALL: [ConnectOutcome; 4] = [
        ConnectOutcome::Accepted,
        ConnectOutcome::Unauthorized,
        ConnectOutcome::BadRequest,
        ConnectOutcome::TooManySockets,
    ];

    fn label(self) -> &'static str {
        match self {
            ConnectOutcome::Accepted => "accepted",
            ConnectOutcome::Unauthorized => "unauthorized",
            ConnectOutcome::BadRequest => "bad_request",
            ConnectOutcome::TooManySockets => "too_many_sockets",
        }
    }
}

/// The connected-sockets series of one channel, held by the registry for as
/// long as the channel has sockets on this node.
pub struct ChannelGauge {
    gauge: IntGauge,
    /// Whether the series is the channel's own (to be removed when it empties)
    /// or the shared `_other` series.
    own: bool,
}

impl ChannelGauge {
    pub fn inc(&self) {
        self.gauge.inc();
    }
    pub fn dec(&self) {
        self.gauge.dec();
    }
}

impl Metrics {
    pub fn new(max_channel_labels: usize) -> Self {
        let registry = Registry::new_custom(Some("channels".into()), None)
            .expect("static metric prefix is valid");
        let sockets_by_channel = IntGaugeVec::new(
            Opts::new(
                "sockets_by_channel",
                "Connected sockets by channel (capped label set)",
            ),
            &["channel"],
        )
        .expect("valid metric");
        let handles = Handles {
            sockets: IntGauge::new("sockets", "Connected sockets on this node").expect("valid"),
            connects: IntCounterVec::new(
                Opts::new("connects_total", "Socket.IO connection attempts by outcome"),
                &["outcome"],
            )
            .expect("valid"),
            recoveries: IntCounterVec::new(
                Opts::new(
                    "recoveries_total",
                    "Sockets that reconnected with a recovery pid, by outcome",
                ),
                &["outcome"],
            )
            .expect("valid"),
            notifications: IntCounterVec::new(
                Opts::new(
                    "notifications_total",
                    "POST /notify calls by variant and outcome",
                ),
                &["variant", "outcome"],
            )
            .expect("valid"),
            deliveries: IntCounter::new("deliveries_total", "Notifications written to sockets")
                .expect("valid"),
            notify_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "notify_latency_seconds",
                    "Time from /notify acceptance to the socket write",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )
            .expect("valid"),
            bus_received: IntCounter::new(
                "bus_received_total",
                "Notifications this node received from the bus",
            )
            .expect("valid"),
            bus_up: IntGauge::new("bus_up", "1 while the cluster bus is usable").expect("valid"),
            bus_reconnects: IntCounter::new(
                "bus_reconnects_total",
                "Times the bus connection was re-established",
            )
            .expect("valid"),
            bus_caught_up: IntCounter::new(
                "bus_caught_up_total",
                "Notifications read from the history after a lost bus connection",
            )
            .expect("valid"),
            bus_publish_errors: IntCounter::new(
                "bus_publish_errors_total",
                "Publishes to the bus that failed (answered 503)",
            )
            .expect("valid"),
            bus_subscriptions: IntGauge::new(
                "bus_subscriptions",
                "Bus topics this node is subscribed to",
            )
            .expect("valid"),
            slow_client_disconnects: IntCounter::new(
                "slow_client_disconnects_total",
                "Sockets whose connection was closed for overflowing their send queue (their clients reconnect and recover)",
            )
            .expect("valid"),
            connections: IntGauge::new(
                "connections",
                "Open TCP connections (HTTP calls and socket.io transports)",
            )
            .expect("valid"),
            limit_refusals: IntCounterVec::new(
                Opts::new(
                    "limit_refusals_total",
                    "Calls and connections refused by a limit, by limit",
                ),
                &["limit"],
            )
            .expect("valid"),
        };
        for c in [
            Box::new(sockets_by_channel.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(handles.sockets.clone()),
            Box::new(handles.connects.clone()),
            Box::new(handles.notifications.clone()),
            Box::new(handles.deliveries.clone()),
            Box::new(handles.notify_latency.clone()),
            Box::new(handles.bus_received.clone()),
            Box::new(handles.bus_up.clone()),
            Box::new(handles.bus_reconnects.clone()),
            Box::new(handles.bus_caught_up.clone()),
            Box::new(handles.bus_publish_errors.clone()),
            Box::new(handles.bus_subscriptions.clone()),
            Box::new(handles.slow_client_disconnects.clone()),
            Box::new(handles.recoveries.clone()),
            Box::new(handles.connections.clone()),
            Box::new(handles.limit_refusals.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Pre-create the fixed label sets so every series exists from the start
        // (a dashboard or alert then sees 0, not "no data").
        for outcome in ConnectOutcome::ALL {
            handles.connects.with_label_values(&[outcome.label()]);
        }
        handles.recoveries.with_label_values(&[RECOVERED]);
        for reason in NotRecoverable::ALL {
            handles.recoveries.with_label_values(&[reason.label()]);
        }
        for variant in Target::VARIANTS {
            let accepted = NotifyOutcome::Accepted.label();
            handles
                .notifications
                .with_label_values(&[variant, accepted]);
        }
        for outcome in [NotifyOutcome::Rejected, NotifyOutcome::Unavailable] {
            handles
                .notifications
                .with_label_values(&[NO_VARIANT, outcome.label()]);
        }
        for limit in Limit::ALL {
            handles.limit_refusals.with_label_values(&[limit.label()]);
        }
        Self {
            inner: Arc::new(Inner {
                registry,
                max_channel_labels,
                channel_labels: AtomicUsize::new(0),
                sockets_by_channel,
                handles,
            }),
        }
    }

    /// The metrics updated outside this module.
    pub fn handles(&self) -> &Handles {
        &self.inner.handles
    }

    /// The series a channel's sockets are counted in, from its first socket
    /// on this node until [`Metrics::release_channel`].
    pub fn channel_gauge(&self, channel: &Channel) -> ChannelGauge {
        let inner = &self.inner;
        let own = inner
            .channel_labels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max_channel_labels).then_some(n + 1)
            })
            .is_ok();
        let label = if own { channel.as_str() } else { OTHER_CHANNEL };
        ChannelGauge {
            gauge: inner.sockets_by_channel.with_label_values(&[label]),
            own,
        }
    }

    /// Drops a channel's own series once its last socket has left this node.
    pub fn release_channel(&self, channel: &Channel, gauge: ChannelGauge) {
        if gauge.own {
            let _ = self
                .inner
                .sockets_by_channel
                .remove_label_values(&[channel.as_str()]);
            self.inner.channel_labels.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Counts a call or connection refused by `limit`.
    pub fn limit_refused(&self, limit: Limit) {
        self.inner
            .handles
            .limit_refusals
            .with_label_values(&[limit.label()])
            .inc();
    }

    /// Counts a notification by its target's variant (`None`: a call
    /// refused before it had one).
    pub fn notification(&self, variant: Option<&'static str>, outcome: NotifyOutcome) {
        self.inner
            .handles
            .notifications
            .with_label_values(&[variant.unwrap_or(NO_VARIANT), outcome.label()])
            .inc();
    }

    /// Counts a socket.io connect.
    pub fn connect(&self, outcome: ConnectOutcome) {
        self.inner
            .handles
            .connects
            .with_label_values(&[outcome.label()])
            .inc();
    }

    /// Counts a returning session: recovered, or why not.
    pub fn recovery(&self, outcome: Result<(), NotRecoverable>) {
        let label = match outcome {
            Ok(()) => RECOVERED,
            Err(reason) => reason.label(),
        };
        self.inner
            .handles
            .recoveries
            .with_label_values(&[label])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_past_the_label_cap_share_the_other_series() {
        let metrics = Metrics::new(1);
        let a = Channel::parse("a").unwrap();
        let b = Channel::parse("b").unwrap();
        let ga = metrics.channel_gauge(&a);
        let gb = metrics.channel_gauge(&b);
        ga.inc();
        gb.inc();
        let text = metrics.render();
        assert!(
            text.contains(r#"channels_sockets_by_channel{channel="a"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"channels_sockets_by_channel{channel="_other"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"channel="b""#));
        ga.dec();
        metrics.release_channel(&a, ga);
        assert!(!metrics.render().contains(r#"channel="a""#));
        // The freed slot goes to the next channel that appears.
        let c = Channel::parse("c").unwrap();
        let gc = metrics.channel_gauge(&c);
        gc.inc();
        assert!(metrics.render().contains(r#"channel="c"} 1"#));
    }
}
