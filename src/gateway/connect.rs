//! Accepting a socket: check its `auth = { token, keycloakID, channel }`,
//! register it, give it a recoverable session (or recover the one it
//! returns with), and make sure it is unregistered on every way out.
//!
//! Registration happens in the middleware, before socketioxide sends the
//! CONNECT acknowledgement: a client that has seen `connect` is therefore
//! already reachable, with no window in which a notification could miss it.

use std::time::Duration;

use serde_json::Value;
use socketioxide::{
    extract::{SocketRef, State, TryData},
    socket::DisconnectReason,
};

use super::{Gateway, Recipient, SocketTag, replay::Gate, take_over};
use crate::{
    auth::WsTokens,
    bus::history::Recovering,
    metrics::{ConnectOutcome, Limit},
    notification::{Channel, KeycloakId},
    recovery::{self, Ended, NotRecoverable, Session},
};

/// Why a connection was refused; its text is the `connect_error` message the
/// client sees (docs/protocol.md: `unauthorized` or `bad_request`).
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
    fn outcome(self) -> ConnectOutcome {
        match self {
            ConnectRefusal::Unauthorized => ConnectOutcome::Unauthorized,
            ConnectRefusal::BadRequest => ConnectOutcome::BadRequest,
            ConnectRefusal::TooManySockets => ConnectOutcome::TooManySockets,
        }
    }
}

/// A validated `auth` payload.
#[derive(Debug)]
pub struct Credentials {
    pub user: KeycloakId,
    pub channel: Channel,
    /// The token is correctly signed but expired: only a recovered session
    /// may use it.
    pub expired: bool,
    /// What a reconnecting client added to its `auth` (socket.io 4.6+).
    pub returning: Option<Returning>,
}

/// The `pid` and `offset` a reconnecting client sends, unchecked.
#[derive(Debug)]
pub struct Returning {
    pub pid: String,
    /// The last offset it received; `None` if it received nothing.
    pub offset: Option<String>,
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
    let returning = string("pid").map(|pid| Returning {
        pid: pid.to_string(),
        offset: string("offset").map(str::to_string),
    });
    let signed = ws_tokens.verify_signed(token).map_err(|e| {
        tracing::debug!(reason = %e, "socket token refused");
        ConnectRefusal::Unauthorized
    })?;
    if signed.subject != user.as_str() {
        tracing::debug!("socket token subject does not match keycloakID");
        return Err(ConnectRefusal::Unauthorized);
    }
    if signed.expired && returning.is_none() {
        tracing::debug!("socket token expired");
        return Err(ConnectRefusal::Unauthorized);
    }
    Ok(Credentials {
        user,
        channel,
        expired: signed.expired,
        returning,
    })
}

/// The connect middleware: authenticates, registers the socket, and gives
/// it its session.
pub(super) async fn authenticate(
    socket: SocketRef,
    TryData(auth): TryData<Value>,
    State(gateway): State<Gateway>,
) -> Result<(), ConnectRefusal> {
    // The id of the HTTP request that opened this connection (see `http::app`).
    let request_id = socket
        .req_parts()
        .headers
        .get(crate::http::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let refuse = |refusal: ConnectRefusal| {
        gateway.metrics.connect(refusal.outcome());
        tracing::info!(socket = %SocketTag(socket.id), request_id, reason = %refusal, "socket refused");
        refusal
    };
    let credentials = check_auth(&gateway.ws_tokens, auth.ok()).map_err(refuse)?;
    let Credentials {
        user,
        channel,
        expired,
        returning,
    } = credentials;
    let recovery = gateway.recovery.clone();
    // Where a new session starts: read before registering, so nothing
    // delivered live to this socket is at or before it.
    let start = gateway.bus.position();
    // Only a socket that may recover needs its live deliveries held.
    let gate = match (&recovery, &returning) {
        (Some(recovery), Some(_)) => Some(Gate::new(recovery.max_held)),
        _ => None,
    };
    // Verified before registering, so the registry knows which session
    // this socket carries; a new one is ready in case it cannot recover.
    let returning_session = match (&recovery, &returning) {
        (Some(recovery), Some(returning)) => recovery.pids.verify(&returning.pid, &user, &channel),
        _ => None,
    };
    let fresh = recovery
        .as_ref()
        .map(|recovery| recovery.pids.mint(recovery.node, start, &user, &channel));
    let ended_now = returning_session
        .is_some_and(|session| take_over(&gateway.registry, &user, session.id, Some(socket.id)));
    let recipient = Recipient {
        socket: socket.clone(),
        gate: gate.clone(),
        session: returning_session
            .or(fresh.as_ref().map(|(session, _)| *session))
            .map_or(0, |session| session.id as u64),
    };
    // Reachable locally first, then subscribed on the bus, then (for a
    // returning session) its history read; only then does socketioxide
    // send the CONNECT acknowledgement.
    if gateway
        .registry
        .insert(socket.id, &user, &channel, recipient)
        .is_err()
    {
        gateway.metrics.limit_refused(Limit::SocketsPerUser);
        return Err(refuse(ConnectRefusal::TooManySockets));
    }
    let mut member = Member {
        user,
        channel,
        session: None,
    };
    gateway
        .bus
        .subscribe_socket(&member.user, &member.channel)
        .await;
    if let (Some(recovery), Some((fresh, fresh_pid))) = (&recovery, fresh) {
        let recovered = match (&returning, &gate) {
            (Some(returning), Some(gate)) => {
                member
                    .recover(&gateway, returning_session, returning, gate, ended_now)
                    .await
            }
            _ => None,
        };
        let session = match recovered {
            Some(session) => {
                socket.set_pid(returning.as_ref().map_or("", |r| r.pid.as_str()));
                session
            }
            None if expired => {
                member.unregister(&gateway, &socket);
                return Err(refuse(ConnectRefusal::Unauthorized));
            }
            None => {
                socket.set_pid(fresh_pid);
                fresh
            }
        };
        member.session = Some(session);
        if let Some(gate) = gate {
            recovery.pending.insert(socket.id, gate);
        }
    }
    gateway.metrics.connect(ConnectOutcome::Accepted);
    tracing::info!(socket = %SocketTag(socket.id), request_id, channel = %member.channel, transport = ?socket.transport_type(), "socket accepted");
    // The handler keeps only the registration: the gateway comes from the
    // state when it runs, so an open socket does not hold a copy of it.
    let on_leave = member.clone();
    socket.on_disconnect(
        move |s: SocketRef, reason: DisconnectReason, State(gateway): State<Gateway>| async move {
            on_leave.unregister(&gateway, &s);
            // The client left the node's only namespace: its engine.io
            // connection carries nothing more, and its client closes it
            // next. Closed here, a long-poll still pending on it is
            // answered at once. Left open, it held a node's graceful stop
            // for the whole shutdown timeout when the stop came before the
            // client's close: `SocketIo::close` closes the namespaces'
            // sockets, not an engine.io session without one.
            if reason == DisconnectReason::ClientNSDisconnect {
                s.close_underlying_transport().await;
            }
        },
    );
    let tasks = gateway.tasks.clone();
    tasks.spawn(forget_if_never_connected(gateway, member, socket));
    Ok(())
}

/// The connect handler, called once the CONNECT acknowledgement is queued:
/// writes a returning socket's replay, then what was held meanwhile.
pub(super) async fn on_connect(socket: SocketRef, State(gateway): State<Gateway>) {
    let Some(recovery) = &gateway.recovery else {
        return;
    };
    if let Some((_, gate)) = recovery.pending.remove(&socket.id) {
        gate.flush(&socket, recovery.give_up).await;
    }
}

/// An accepted socket's registration, to undo when it leaves.
#[derive(Clone)]
struct Member {
    user: KeycloakId,
    channel: Channel,
    /// Its recoverable session, when recovery is on.
    session: Option<Session>,
}

impl Member {
    /// Reads what the returning session missed into `gate`; `None` (a fresh
    /// session) when it cannot be recovered.
    async fn recover(
        &self,
        gateway: &Gateway,
        session: Option<Session>,
        returning: &Returning,
        gate: &Gate,
        ended_now: bool,
    ) -> Option<Session> {
        let outcome = async {
            let session = session.ok_or(NotRecoverable::BadPid)?;
            // Never before the session began: socket.io's client keeps the
            // last offset it received across sessions, so a session that
            // received nothing yet comes back with its predecessor's.
            let after = match &returning.offset {
                None => session.start,
                Some(raw) => recovery::parse_offset(raw)
                    .ok_or(NotRecoverable::BadPid)?
                    .max(session.start),
            };
            let recovering = Recovering {
                session,
                user: self.user.clone(),
                channel: self.channel.clone(),
                after,
                ended_now,
            };
            let missed = gateway.bus.recover(&recovering).await?;
            Ok::<_, NotRecoverable>((session, after, missed))
        }
        .await;
        match outcome {
            Ok((session, after, missed)) => {
                gateway.metrics.recovery(Ok(()));
                tracing::debug!(missed = missed.len(), "session recovered");
                gate.set_replay(after, missed);
                Some(session)
            }
            Err(reason) => {
                gateway.metrics.recovery(Err(reason));
                tracing::debug!(reason = %reason, "session not recoverable");
                None
            }
        }
    }

    /// Removes the socket from the registry and, the first time only,
    /// releases its bus topics and records its session's end: both ways
    /// out below may run for one socket.
    fn unregister(&self, gateway: &Gateway, socket: &SocketRef) {
        if let Some(recovery) = &gateway.recovery {
            recovery.pending.remove(&socket.id);
        }
        if gateway
            .registry
            .remove(socket.id, &self.user, &self.channel)
        {
            gateway.bus.unsubscribe_socket(&self.user, &self.channel);
            let ended = match gateway.closing.remove(&socket.id) {
                Some((_, ended)) => ended,
                None => Ended::At(recovery::now_ms()),
            };
            if let Some(session) = &self.session {
                gateway.bus.end_session(session, ended);
            }
        }
    }
}

/// socketioxide only calls the disconnect handler of a socket that completed
/// its connection. If the engine.io connection died during our middleware or
/// just after it, the socket never connects and its disconnect handler never
/// runs, so this drops its registration instead.
async fn forget_if_never_connected(gateway: Gateway, member: Member, socket: SocketRef) {
    // The acknowledgement follows the middleware without any await point, so
    // a short grace period is plenty.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if !socket.connected() {
        member.unregister(&gateway, &socket);
    }
}
