//! `POST /disconnect`: closes a user's sockets on every node (docs/protocol.md).
//!
//! Each closed socket gets a server-side disconnect (the client sees `io
//! server disconnect` and does not reconnect on its own), and its session
//! is recorded as closed, so it cannot be recovered. The answer counts the
//! sockets closed across the cluster, gathered over the bus
//! (`bus::redis::requests`); `complete` is false when a node did not answer
//! within a second. With `revoke`, every node first refuses the user's ws
//! tokens minted before the call (to connect and to recover), until they
//! expire (`auth::WsTokens::revoke`).

use std::sync::Arc;

use axum::{Extension, Json, body::Body, extract::State, http::HeaderMap};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, ClientAddr, error::ApiError, notify::admitted_object};
use crate::notification::{Channel, KeycloakId};

#[derive(Deserialize)]
struct DisconnectBody {
    #[serde(rename = "API_KEY", default)]
    api_key: Option<Value>,
    #[serde(default)]
    keycloak: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    channel: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    revoke: Option<Value>,
}

/// A field that is present, even as `null`, which is refused rather than
/// read as absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

pub async fn disconnect(
    State(state): State<Arc<AppState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body: DisconnectBody =
        admitted_object(&state, client, &headers, body, |b: &DisconnectBody| {
            &b.api_key
        })
        .await?;
    let user = match &body.keycloak {
        Some(Value::String(user)) => {
            KeycloakId::parse(user).map_err(|e| ApiError::BadRequest(format!("keycloak: {e}")))?
        }
        _ => return Err(ApiError::BadRequest("keycloak must be a string".into())),
    };
    let channel = match &body.channel {
        None => None,
        Some(Value::String(channel)) => Some(
            Channel::parse(channel).map_err(|e| ApiError::BadRequest(format!("channel: {e}")))?,
        ),
        Some(_) => return Err(ApiError::BadRequest("channel must be a string".into())),
    };
    let revoke_at = match &body.revoke {
        None | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(crate::recovery::now_ms()),
        Some(_) => return Err(ApiError::BadRequest("revoke must be a boolean".into())),
    };
    let gathered = state
        .bus
        .disconnect(&user, channel.as_ref(), revoke_at)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    tracing::info!(
        disconnected = gathered.count,
        complete = gathered.complete,
        "sockets disconnected"
    );
    Ok(Json(
        json!({"disconnected": gathered.count, "complete": gathered.complete}),
    ))
}
