//! Accepting a socket: check its `auth = { token, keycloakID, channel }`,
//! register it, and make sure it is unregistered on every way out.
//!
//! Registration happens in the middleware, before socketioxide sends the
//! CONNECT acknowledgement: a client that has seen `connect` is therefore
//! already reachable, with no window in which a notification could miss it.

use std::time::Duration;

use serde_json::Value;
use socketioxide::extract::{SocketRef, State, TryData};

use super::{CONNECT_TIMEOUT, Gateway};
use crate::{
    auth::WsTokens,
    notification::{Channel, KeycloakId},
};

/// Why a connection was refused; its text is the `connect_error` message the
/// client sees (SPEC.md: `unauthorized` or `bad_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    /// Missing, malformed, expired or foreign token, or `sub` ≠ `keycloakID`.
    #[error("unauthorized")]
    Unauthorized,
    /// Missing or malformed `keycloakID` or `channel`.
    #[error("bad_request")]
    BadRequest,
    /// The user already holds `CHANNELS_MAX_SOCKETS_PER_USER` sockets here.
    #[error("too_many_sockets")]
    TooManySockets,
}

impl ConnectRefusal {
    fn label(self) -> &'static str {
        match self {
            ConnectRefusal::Unauthorized => "unauthorized",
            ConnectRefusal::BadRequest => "bad_request",
            ConnectRefusal::TooManySockets => "too_many_sockets",
        }
    }
}

/// A validated `auth` payload.
#[derive(Debug)]
pub struct Credentials {
    pub user: KeycloakId,
    pub channel: Channel,
}

/// Checks an `auth` payload (`None` when it is not valid JSON).
/// `keycloakID` and `channel` are checked first (a `bad_request` tells the
/// developer what to fix), then the token. Free of socket.io, so the fuzz
/// targets run it directly.
pub fn check_auth(
    ws_tokens: &WsTokens,
    auth: Option<Value>,
) -> Result<Credentials, ConnectRefusal> {
    let auth = auth.ok_or(ConnectRefusal::BadRequest)?;
    let Value::Object(auth) = auth else {
        return Err(ConnectRefusal::BadRequest);
    };
    let string = |key: &str| auth.get(key).and_then(Value::as_str);
    let user = string("keycloakID")
        .and_then(|raw| KeycloakId::parse(raw).ok())
        .ok_or(ConnectRefusal::BadRequest)?;
    let channel = string("channel")
        .and_then(|raw| Channel::parse(raw).ok())
        .ok_or(ConnectRefusal::BadRequest)?;
    let token = string("token").ok_or(ConnectRefusal::Unauthorized)?;
    let subject = ws_tokens.verify(token).map_err(|e| {
        tracing::debug!(reason = %e, "socket token refused");
        ConnectRefusal::Unauthorized
    })?;
    if subject != user.as_str() {
        tracing::debug!("socket token subject does not match keycloakID");
        return Err(ConnectRefusal::Unauthorized);
    }
    Ok(Credentials { user, channel })
}

/// The connect middleware: authenticates, then registers the socket.
pub(super) async fn authenticate(
    socket: SocketRef,
    TryData(auth): TryData<Value>,
    State(gateway): State<Gateway>,
) -> Result<(), ConnectRefusal> {
    let connects = &gateway.metrics.handles().connects;
    // The id of the HTTP request that opened this connection (see `http::app`).
    let request_id = socket
        .req_parts()
        .headers
        .get(crate::http::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let Credentials { user, channel } = match check_auth(&gateway.ws_tokens, auth.ok()) {
        Ok(credentials) => credentials,
        Err(refusal) => {
            connects.with_label_values(&[refusal.label()]).inc();
            tracing::info!(sid = %socket.id, request_id, reason = refusal.label(), "socket refused");
            return Err(refusal);
        }
    };
    // Reachable locally first, then subscribed on the bus; only then does
    // socketioxide send the CONNECT acknowledgement.
    if gateway
        .registry
        .insert(socket.id, &user, &channel, socket.clone())
        .is_err()
    {
        let refusal = ConnectRefusal::TooManySockets;
        connects.with_label_values(&[refusal.label()]).inc();
        gateway.metrics.limit_refused("sockets_per_user");
        tracing::info!(sid = %socket.id, request_id, reason = refusal.label(), "socket refused");
        return Err(refusal);
    }
    connects.with_label_values(&["accepted"]).inc();
    tracing::info!(sid = %socket.id, request_id, %channel, transport = ?socket.transport_type(), "socket accepted");
    let member = Member {
        gateway,
        user,
        channel,
    };
    let on_leave = member.clone();
    socket.on_disconnect(move |s: SocketRef| async move { on_leave.unregister(&s) });
    member
        .gateway
        .bus
        .subscribe_socket(&member.user, &member.channel)
        .await;
    tokio::spawn(forget_if_never_connected(member, socket));
    Ok(())
}

/// The connect handler, called once the CONNECT acknowledgement is queued.
/// Everything was done by the middleware.
pub(super) async fn on_connect(_socket: SocketRef) {}

/// An accepted socket's registration, to undo when it leaves.
#[derive(Clone)]
struct Member {
    gateway: Gateway,
    user: KeycloakId,
    channel: Channel,
}

impl Member {
    /// Removes the socket from the registry and, the first time only,
    /// releases its bus topics: both ways out below may run for one socket.
    fn unregister(&self, socket: &SocketRef) {
        if self
            .gateway
            .registry
            .remove(socket.id, &self.user, &self.channel)
        {
            self.gateway
                .bus
                .unsubscribe_socket(&self.user, &self.channel);
        }
    }
}

/// socketioxide only calls the disconnect handler of a socket that completed
/// its connection. If the engine.io connection died during our middleware or
/// just after it, the socket never connects and its disconnect handler never
/// runs, so this drops its registration instead.
async fn forget_if_never_connected(member: Member, socket: SocketRef) {
    // The acknowledgement follows the middleware without any await point, so
    // a short grace period is plenty; CONNECT_TIMEOUT bounds it generously.
    tokio::time::sleep(Duration::from_millis(500).min(CONNECT_TIMEOUT)).await;
    if !socket.connected() {
        member.unregister(&socket);
    }
}
