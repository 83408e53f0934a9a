//! channels: a real-time notification gateway.
//!
//! Browser frontends hold socket.io connections; backends `POST /notify`; the
//! bus hands every notification to every node, and each node writes it to
//! the sockets it targets. One notification, top to bottom:
//! `http::notify` (parse and validate into a [`notification::Notification`])
//! → [`bus::Bus::publish`] → the bus's receive side on every node →
//! `gateway::Delivery` → [`registry::Registry::lookup`] → socket write.
//!
//! [`start`] assembles and runs a node; `main.rs`, the tests and the load
//! generator all go through it.

pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod http;
pub mod idempotency;
pub mod limits;
pub mod metrics;
pub mod notification;
pub mod presence;
pub mod recovery;
pub mod registry;
pub mod server;

use std::{net::SocketAddr, sync::Arc};

use socketioxide::SocketIo;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{ApiKeys, UpstreamVerifier, WsTokens},
    bus::Bus,
    config::Config,
    gateway::{Delivery, Gateway, RecoveryState, SocketRegistry},
    limits::{ConnectionLimit, Limiters},
    metrics::Metrics,
    recovery::NodeId,
    registry::RegistryStats,
};

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    addr: SocketAddr,
    registry: Arc<SocketRegistry>,
    metrics: Metrics,
    io: SocketIo,
    shutting_down: CancellationToken,
    server: JoinHandle<()>,
    /// Stops the bus's tasks once the sockets are closed, so the records of
    /// their sessions' ends still go out.
    stop_bus: CancellationToken,
    /// Every task the node starts but the server's: the bus's, the
    /// sweeper's, and the short ones of a connect, an eviction or a reply
    /// to another node. Closed and awaited on shutdown.
    tasks: TaskTracker,
    config: Config,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Bus(String),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Limits(String),
}

/// Starts a node on `listener` with `config`, and returns once it serves.
pub async fn start(config: Config, listener: TcpListener) -> Result<Node, StartError> {
    let metrics = Metrics::new(config.metrics_max_channels);
    let registry = Arc::new(SocketRegistry::new(
        metrics.clone(),
        config.limits.max_sockets_per_user,
    ));
    let limiters = Limiters::new(&config.limits.rates, metrics.clone());
    let ws_tokens = WsTokens::new(&config.ws_token_secret, config.ws_token_ttl);
    let upstream = UpstreamVerifier::new(&config.upstream)
        .await
        .map_err(StartError::Auth)?;

    let node = NodeId::random();
    let tasks = TaskTracker::new();
    let closing = gateway::Closing::default();
    let delivery = Arc::new(Delivery::new(
        registry.clone(),
        metrics.clone(),
        &config,
        config.recovery.enabled(),
        closing.clone(),
        ws_tokens.clone(),
        tasks.clone(),
    ));
    let stop_bus = CancellationToken::new();
    let bus = Bus::start(
        &config,
        node,
        delivery,
        metrics.clone(),
        stop_bus.clone(),
        &tasks,
    )
    .map_err(StartError::Bus)?;

    let shutting_down = CancellationToken::new();
    let state = http::AppState {
        upstream,
        ws_tokens: ws_tokens.clone(),
        api_keys: ApiKeys::new(&config.api_keys),
        bus: bus.clone(),
        metrics: metrics.clone(),
        limiters: limiters.clone(),
        max_body_bytes: config.max_body_bytes,
        max_batch: config.max_batch,
        max_batch_bytes: config.max_batch_bytes,
        max_json_depth: config.limits.max_json_depth,
        shutting_down: shutting_down.clone(),
    };
    let gateway = Gateway {
        registry: registry.clone(),
        ws_tokens,
        bus,
        metrics: metrics.clone(),
        recovery: config
            .recovery
            .enabled()
            .then(|| Arc::new(RecoveryState::new(&config, node))),
        closing,
        tasks: tasks.clone(),
    };
    let not_found = axum::handler::HandlerWithoutStateExt::into_service(http::not_found);
    let (socket_io, io) = gateway::service(&config, gateway, not_found);
    let app = http::app(http::router(state), socket_io, &config, limiters.clone());

    let addr = listener.local_addr()?;
    tasks.spawn(forget_idle_clients(limiters.clone(), shutting_down.clone()));
    // The whole process's limit: a node is the process's purpose.
    let descriptors = limits::descriptors::raise()?;
    let cap = limits::descriptors::cap(config.limits.max_connections, descriptors)
        .map_err(StartError::Limits)?;
    match &cap.why {
        Some(why) => tracing::info!(
            cap = cap.applied,
            "connection cap lowered from CHANNELS_MAX_CONNECTIONS={}: {why}",
            config.limits.max_connections
        ),
        None => tracing::info!(cap = cap.applied, "connection cap"),
    }
    let listener = ConnectionLimit::new(listener, cap.applied, limiters, metrics.clone());
    let server = tokio::spawn(server::serve(
        listener,
        app,
        config.header_timeout,
        metrics.clone(),
        shutting_down.clone(),
    ));
    tracing::info!(%addr, dev_mode = config.dev_mode, "channels node serving");
    Ok(Node {
        addr,
        registry,
        metrics,
        io,
        shutting_down,
        server,
        stop_bus,
        tasks,
        config,
    })
}

/// Keeps the rate limiters' tables to recently active clients, until shutdown.
async fn forget_idle_clients(limiters: Limiters, stop: CancellationToken) {
    let mut every = tokio::time::interval(limits::FORGET_INTERVAL);
    loop {
        tokio::select! {
            _ = every.tick() => limiters.forget_idle(),
            _ = stop.cancelled() => return,
        }
    }
}

impl Node {
    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sizes of the socket indexes.
    pub fn registry_stats(&self) -> RegistryStats {
        self.registry.stats()
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Every task the node has running but its server's; empty and closed
    /// once [`Node::shutdown`] has returned `true`.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Graceful shutdown (docs/protocol.md): turn not-ready and stop accepting, close
    /// every socket so its client reconnects elsewhere (and records its
    /// session's end, so it can recover there), let in-flight HTTP calls
    /// finish, then stop the bus and every task, all within
    /// `CHANNELS_SHUTDOWN_TIMEOUT`. Returns whether everything finished in
    /// time.
    pub async fn shutdown(self) -> bool {
        let Node {
            shutting_down,
            io,
            mut server,
            stop_bus,
            tasks,
            config,
            ..
        } = self;
        shutting_down.cancel();
        let graceful = async {
            io.close().await;
            let _ = (&mut server).await;
            stop_bus.cancel();
            tasks.close();
            tasks.wait().await;
        };
        let in_time = tokio::time::timeout(config.shutdown_timeout, graceful)
            .await
            .is_ok();
        if !in_time {
            tracing::warn!(timeout = ?config.shutdown_timeout, "shutdown timed out; dropping connections");
            server.abort();
        }
        in_time
    }
}
