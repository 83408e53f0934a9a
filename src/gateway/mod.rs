//! socket.io wiring: the connect middleware that authenticates a socket and
//! registers it (recovering its session when it returns), and the
//! [`Delivery`] sink that writes notifications from the bus to the
//! registered sockets.

mod connect;
mod delivery;
mod replay;

use std::{fmt, sync::Arc, time::Duration};

use socketioxide::{
    SocketIo, extract::SocketRef, handler::ConnectHandler, service::SocketIoService,
};

use dashmap::DashMap;
use sha2::{Digest, Sha256};
use socketioxide::socket::Sid;
use tokio_util::task::TaskTracker;

use crate::{
    auth::WsTokens,
    bus::Bus,
    config::Config,
    metrics::Metrics,
    notification::{KeycloakId, Target},
    recovery::{Ended, NodeId, Pids},
    registry::Registry,
};

pub use connect::{ConnectRefusal, Credentials, Returning, check_auth};
pub use delivery::Delivery;
use replay::Gate;

/// How a log line names a socket. Its session id is a credential: whoever
/// holds a long-polling client's can read that session and post into it.
/// So the logs carry the first 12 hex digits of its SHA-256 instead, enough
/// to follow one socket from line to line and of no use to a reader of the
/// logs. The digest is computed only when a line is written.
struct SocketTag(Sid);

impl fmt::Display for SocketTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digest = Sha256::digest(self.0.as_str().as_bytes());
        digest[..6].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The sockets of this node, by channel and user.
pub type SocketRegistry = Registry<Recipient>;

/// A registered socket, as delivery finds it.
#[derive(Clone)]
pub struct Recipient {
    pub socket: SocketRef,
    /// Only for a socket that returned with a pid: holds live deliveries
    /// until its replay is written.
    gate: Option<Arc<Gate>>,
    /// The low 64 bits of the id of the session it connected with
    /// (returning or new; 0 with recovery off), so a returning client can
    /// take over a predecessor this node has not yet seen leave (a polling
    /// session outlives its TCP connections until the heartbeat's timeout).
    /// 64 bits tell a user's sessions apart, and keep a registry entry
    /// small: the registry holds two per socket.
    session: u64,
}

/// Closes this node's sockets of `user` that still carry `session` (but
/// `except`): their client has come back (a polling session, for one,
/// lives on until the heartbeat's timeout after its last request). Their
/// disconnect records the session's end. Returns whether there was one.
fn take_over(
    registry: &SocketRegistry,
    user: &KeycloakId,
    session: u128,
    except: Option<Sid>,
) -> bool {
    let mut sockets = Vec::new();
    registry.lookup(
        &Target::User {
            keycloak: user.clone(),
        },
        &mut sockets,
    );
    let mut found = false;
    for old in sockets {
        if old.session == session as u64 && Some(old.socket.id) != except {
            tracing::debug!(socket = %SocketTag(old.socket.id), "a returning session takes over its previous socket");
            let _ = old.socket.disconnect();
            found = true;
        }
    }
    found
}

/// Sockets this node is closing on purpose, and how their sessions end:
/// closed for good (not recoverable) by `POST /disconnect`, or ended when
/// the node lost its bus, by a catch-up that cannot give them all they
/// missed. Their disconnect handler records that, where any other way out
/// records when the socket left. Each sid is in it only between
/// [`Delivery`]'s close and that handler.
pub type Closing = Arc<DashMap<Sid, Ended>>;

/// What the socket.io handlers share, given to socketioxide as its state.
#[derive(Clone)]
pub struct Gateway {
    pub registry: Arc<SocketRegistry>,
    pub ws_tokens: WsTokens,
    /// Told of every socket that comes and goes, to subscribe to what it
    /// needs; numbers and keeps the notifications recovery replays.
    pub bus: Bus,
    pub metrics: Metrics,
    /// `None` when sessions are not recoverable (recovery off, or a bus
    /// that cannot keep the history).
    /// Behind an `Arc`: every socket's disconnect handler holds a clone of
    /// the gateway, and the pid key alone is 192 bytes.
    pub recovery: Option<Arc<RecoveryState>>,
    pub closing: Closing,
    /// The node's tasks: each connect's check that it completed runs on one.
    pub tasks: TaskTracker,
}

/// What the connect path needs to give and recover sessions.
#[derive(Clone)]
pub struct RecoveryState {
    pub pids: Pids,
    pub node: NodeId,
    /// Gates of sockets between their middleware and their connect
    /// handler, which flushes them.
    pending: Arc<DashMap<Sid, Arc<Gate>>>,
    /// Live deliveries a gate holds at most.
    max_held: usize,
    /// How long a replay waits on a client that does not read.
    give_up: Duration,
}

impl RecoveryState {
    pub fn new(config: &Config, node: NodeId) -> Self {
        Self {
            pids: Pids::new(&config.ws_token_secret),
            node,
            pending: Arc::default(),
            max_held: config.socket_queue * 4,
            give_up: config.ping_interval + config.ping_timeout,
        }
    }
}

/// See the builder calls in [`service`].
const WS_READ_BUFFER_BYTES: usize = 64;
const WS_WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// Builds the socket.io service for the default namespace `/`. Requests
/// outside `/socket.io/` go to `inner`.
///
/// Limits come from [`Config`]: the send queue of each socket, in packets
/// and in bytes (a slow client past either is disconnected by
/// [`Delivery`]), and what a client may send us,
/// which is only a CONNECT packet with a token, pongs and tiny packets.
pub fn service<S: Clone>(
    config: &Config,
    gateway: Gateway,
    inner: S,
) -> (SocketIoService<S>, SocketIo) {
    let (svc, io) = SocketIo::builder()
        .max_buffer_size(config.socket_queue)
        .max_buffer_bytes(config.socket_queue_bytes)
        .max_payload(config.ws_max_message_bytes as u64)
        .ws_max_message_size(config.ws_max_message_bytes)
        .ws_max_frame_size(config.ws_max_message_bytes)
        // The chunk size of websocket reads, and the capacity of the
        // buffer each connection keeps for its life (4 KiB by default; the
        // carried tungstenite gives back what a larger frame, the CONNECT,
        // grew it to). Clients send pongs (6 bytes) and one CONNECT (a few
        // hundred, with the token), nothing else; a longer message still
        // arrives, in several reads. 1 KiB → 256 → 64 B: 0.45 and 0.25 KiB
        // less per idle socket. The price is CPU for client input, which
        // the contract has none of: 16 MB of client messages cost 3x the
        // server CPU of 256 B reads (BENCHMARKS.md).
        .ws_read_buffer_size(WS_READ_BUFFER_BYTES)
        // Frames gathered before a write. They wait there while a client
        // reads slower than they come, and the buffer keeps its largest
        // size for the connection's life, so tungstenite's 128 KiB let a
        // client that fell behind hold that much. 8 KiB is still about 80
        // notifications per write; the send queue (`CHANNELS_SOCKET_QUEUE`)
        // holds the rest.
        .ws_write_buffer_size(WS_WRITE_BUFFER_BYTES)
        // The connect handler reads the request id, and nothing reads a
        // socket's request headers after it: a browser's (cookies,
        // user agent) would otherwise stay with every idle socket.
        .kept_headers([crate::http::REQUEST_ID])
        // A session that never sends its CONNECT is closed as a connection
        // that never sends its request head is (`crate::server`).
        .connect_timeout(config.header_timeout)
        .ping_interval(config.ping_interval)
        .ping_timeout(config.ping_timeout)
        .with_state(gateway)
        .build_with_inner_svc(inner);
    io.ns("/", connect::on_connect.with(connect::authenticate));
    (svc, io)
}
