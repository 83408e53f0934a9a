//! `POST /notify`: a backend pushes a message to sockets.
//!
//! The call is checked in this order, each failure answered before the next
//! step runs: media type (415), size (413), JSON (400), API key (401),
//! message and target (400). Only a fully valid call reaches the bus, so a
//! rejected call delivers nothing.

use axum::{
    Json,
    body::Body,
    extract::State,
    http::{HeaderMap, header},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};

use super::{AppState, error::ApiError};
use crate::notification::{Channel, KeycloakId, Notification, Target};

/// The body of a `/notify` call. Targets are read as any JSON value so a
/// wrong type gets a precise message rather than a serde one.
#[derive(Deserialize)]
struct NotifyBody {
    #[serde(rename = "API_KEY", default)]
    api_key: Option<Value>,
    #[serde(default)]
    msg: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    keycloak: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    channel: Option<Box<RawValue>>,
}

/// A field that is present, even as `null` (which `Option` alone would
/// read as absent): a `null` target is refused, not ignored.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

pub async fn notify(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let result = accept(&state, &headers, body).await;
    let (variant, outcome) = match &result {
        Ok((_, variant)) => (*variant, "accepted"),
        Err(ApiError::Unavailable(_)) => ("none", "unavailable"),
        Err(_) => ("none", "rejected"),
    };
    state
        .metrics
        .handles()
        .notifications
        .with_label_values(&[variant, outcome])
        .inc();
    if let Err(e) = &result {
        tracing::info!(error = %e, "notify refused");
    }
    let (id, variant) = result?;
    Ok(Json(json!({"id": id, "variant": variant})))
}

/// Validates the call and publishes it; returns the notification's id and variant.
async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(String, &'static str), ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = state.max_body_bytes;
    let too_large = ApiError::PayloadTooLarge { limit };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large);
    }
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::BadRequest("the body could not be read".into())
            }
        })?
        .to_bytes();

    // A key in the header is checked before the body is even parsed.
    let header_key = headers
        .get("x-api-key")
        .map(|v| v.to_str().unwrap_or_default());
    if let Some(key) = header_key {
        check_key(state, key)?;
    }
    // serde also reads a struct from a JSON array; only an object is a body.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    }
    let body: NotifyBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(match e.classify() {
            serde_json::error::Category::Data => format!("body must be a JSON object: {e}"),
            _ => format!("body is not valid JSON: {e}"),
        })
    })?;
    if header_key.is_none() {
        match &body.api_key {
            Some(Value::String(key)) => check_key(state, key)?,
            _ => {
                return Err(unauthorized(
                    "missing API key (X-API-Key header or API_KEY field)",
                ));
            }
        }
    }

    let msg = body
        .msg
        .filter(|m| m.get() != "null")
        .ok_or_else(|| ApiError::BadRequest("msg is required and must not be null".into()))?;
    let keycloak = body
        .keycloak
        .map(|v| parse_target_field("keycloak", &v, KeycloakId::parse))
        .transpose()?;
    let channel = body
        .channel
        .map(|v| parse_target_field("channel", &v, Channel::parse))
        .transpose()?;
    let target = match (keycloak, channel) {
        (None, Some(channel)) => Target::Channel { channel },
        (Some(keycloak), None) => Target::User { keycloak },
        (Some(keycloak), Some(channel)) => Target::UserChannel { keycloak, channel },
        (None, None) => {
            return Err(ApiError::BadRequest(
                "at least one of keycloak and channel is required".into(),
            ));
        }
    };

    let notification = Notification::new(target, msg);
    let id = notification.id.clone();
    let variant = notification.target.variant();
    tracing::debug!(%id, variant, "notification accepted");
    state
        .bus
        .publish(notification)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok((id, variant))
}

/// `application/json`, with or without parameters such as `charset`.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn check_key(state: &AppState, key: &str) -> Result<(), ApiError> {
    if state.api_keys.accepts(key) {
        Ok(())
    } else {
        Err(unauthorized("unknown API key"))
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::Unauthorized {
        message: message.into(),
        bearer: false,
    }
}

/// A present target field must be a string its type accepts (`null` too is
/// refused: it is not a non-empty string).
fn parse_target_field<T, E: std::fmt::Display>(
    name: &str,
    raw: &RawValue,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<T, ApiError> {
    let value: String = serde_json::from_str(raw.get())
        .map_err(|_| ApiError::BadRequest(format!("{name} must be a non-empty string")))?;
    parse(&value).map_err(|e| ApiError::BadRequest(format!("{name} {e}")))
}
