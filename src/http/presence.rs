//! `GET /presence` and `POST /presence`: who is online, across the cluster
//! (docs/protocol.md). How it is gathered, and what it costs: [`crate::presence`].
//!
//! Every answer adds `complete`: false when a node did not answer within a
//! second, so a count may be short.

use std::sync::Arc;

use axum::{
    Extension, Json,
    body::Body,
    extract::{Query as QueryString, State, rejection::QueryRejection},
    http::HeaderMap,
};
use serde::Deserialize;
use serde_json::Value;

use super::{
    AppState, ClientAddr,
    error::ApiError,
    notify::{admitted_object, header_key, unauthorized},
};
use crate::{
    notification::{Channel, KeycloakId},
    presence::{MAX_BULK_USERS, Query},
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceParams {
    keycloak: Option<String>,
    channel: Option<String>,
}

/// `GET /presence?keycloak=U` or `GET /presence?channel=C`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    headers: HeaderMap,
    params: Result<QueryString<PresenceParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    state.limiters.check_notify_address(client)?;
    let key = header_key(&state, &headers)?
        .ok_or_else(|| unauthorized("missing API key (X-API-Key header)"))?;
    state.limiters.check_notify_key(key)?;
    let QueryString(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = match (params.keycloak, params.channel) {
        (Some(user), None) => Query::User(
            KeycloakId::parse(&user).map_err(|e| ApiError::BadRequest(format!("keycloak: {e}")))?,
        ),
        (None, Some(channel)) => Query::Channel(
            Channel::parse(&channel).map_err(|e| ApiError::BadRequest(format!("channel: {e}")))?,
        ),
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of keycloak and channel".into(),
            ));
        }
    };
    answer(&state, query).await
}

#[derive(Deserialize)]
struct BulkBody {
    #[serde(rename = "API_KEY", default)]
    api_key: Option<Value>,
    #[serde(default)]
    keycloaks: Option<Value>,
}

/// `POST /presence` `{"keycloaks": [...]}`: which of these users are online.
pub async fn bulk(
    State(state): State<Arc<AppState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body: BulkBody =
        admitted_object(&state, client, &headers, body, |b: &BulkBody| &b.api_key).await?;
    let listed = match &body.keycloaks {
        Some(Value::Array(listed)) if (1..=MAX_BULK_USERS).contains(&listed.len()) => listed,
        _ => {
            return Err(ApiError::BadRequest(format!(
                "keycloaks must be an array of 1 to {MAX_BULK_USERS} ids"
            )));
        }
    };
    let users = listed
        .iter()
        .enumerate()
        .map(|(i, user)| match user {
            Value::String(user) => KeycloakId::parse(user)
                .map_err(|e| ApiError::BadRequest(format!("keycloaks[{i}]: {e}"))),
            _ => Err(ApiError::BadRequest(format!(
                "keycloaks[{i}] must be a string"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    answer(&state, Query::Users(users)).await
}

/// Asks every node, and answers as docs/protocol.md shows.
async fn answer(state: &AppState, query: Query) -> Result<Json<Value>, ApiError> {
    let (presence, complete) = state
        .bus
        .presence(&query)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(presence.answer(&query, complete)))
}
