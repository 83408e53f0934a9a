//! `GET /authorize`: trade an upstream access token for a ws token.

use std::sync::Arc;

use axum::{
    Extension, Json,
    extract::State,
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{AppState, ClientAddr, error::ApiError};
use crate::{auth::TokenError, notification::KeycloakId};

pub async fn authorize(
    State(state): State<Arc<AppState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.limiters.check_authorize(client)?;
    let refuse = |e: TokenError| {
        tracing::debug!(reason = %e, "access token refused");
        ApiError::Unauthorized {
            message: e.to_string(),
            bearer: true,
        }
    };
    let token = bearer_token(&headers).ok_or_else(|| refuse(TokenError::Missing))?;
    let subject = state.upstream.verify(token).await.map_err(refuse)?;
    let user = KeycloakId::parse(&subject).map_err(|_| refuse(TokenError::MissingSubject))?;
    let ws_token = state.ws_tokens.mint(&user);
    let mut response = Json(json!({
        "token": ws_token,
        "keycloakID": user.as_str(),
        "expiresIn": state.ws_tokens.ttl().as_secs(),
    }))
    .into_response();
    // A token must never be cached by a browser or a proxy.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
