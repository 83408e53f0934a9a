//! `POST /notify`: a backend pushes a message to sockets.
//!
//! The call is checked in this order, each failure answered before the next
//! step runs: the caller's address rate (429), media type (415), size (413),
//! JSON (400), API key (401), the key's rate (429), message and target
//! (400), message depth (400), `Idempotency-Key` (400). Only a fully valid
//! call reaches the bus, so a rejected call delivers nothing. A valid call
//! with an `Idempotency-Key` claims it first ([`crate::idempotency`]): a
//! repeat answers the first call's answer (`Idempotent-Replayed: true`),
//! `409` while that call is in progress, `422` with another body.
//!
//! [`parse_body`] and [`NotifyBody::validate`] hold the parsing and
//! validation, free of HTTP, so the fuzz targets run them directly.

use std::{net::IpAddr, sync::Arc};

use axum::{
    Extension, Json,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Uri, header},
    response::{IntoResponse, Response},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};
use serde_json::{Value, value::RawValue};

use super::{AppState, ClientAddr, error::ApiError};
use crate::{
    bus::Gathered,
    idempotency::{self, Answer, Claim, Claimed, IdempotencyKey},
    limits::nested_deeper_than,
    metrics::{Limit, NotifyOutcome},
    notification::{Channel, KeycloakId, Notification, Target},
};

/// The body of a `/notify` call. Targets are read as any JSON value so a
/// wrong type gets a precise message rather than a serde one.
#[derive(Deserialize)]
pub struct NotifyBody {
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

/// Takes the whole request, not its URI and headers as extractors, which
/// would copy them.
pub async fn notify(
    State(state): State<Arc<AppState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    request: Request,
) -> Result<Response, ApiError> {
    let (head, body) = request.into_parts();
    let result = match state.limiters.check_notify_address(client) {
        Ok(()) => accept(&state, &head.uri, &head.headers, body).await,
        Err(refused) => Err(refused.into()),
    };
    let (variant, outcome) = match &result {
        Ok((answer, false)) => (Some(answer.variant), NotifyOutcome::Accepted),
        Ok((answer, true)) => (Some(answer.variant), NotifyOutcome::Replayed),
        Err(ApiError::Unavailable(_)) => (None, NotifyOutcome::Unavailable),
        Err(_) => (None, NotifyOutcome::Rejected),
    };
    state.metrics.notification(variant, outcome);
    if let Err(e) = &result {
        tracing::info!(error = %e, "notify refused");
    }
    let (answer, replayed) = result?;
    Ok(marked_replayed(
        Json(Answered::from(&answer)).into_response(),
        replayed,
    ))
}

/// An accepted notification as the API answers it: its id and variant,
/// and with a receipt, the sockets it reached and whether every node
/// answered. Serialised from the answer as it is, with no JSON tree built
/// for every call.
#[derive(Serialize)]
pub(super) struct Answered<'a> {
    id: &'a str,
    variant: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sockets: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    complete: Option<bool>,
}

impl<'a> From<&'a Answer> for Answered<'a> {
    fn from(answer: &'a Answer) -> Self {
        Answered {
            id: &answer.id,
            variant: answer.variant,
            sockets: answer.receipt.map(|Gathered { count, .. }| count),
            complete: answer.receipt.map(|Gathered { complete, .. }| complete),
        }
    }
}

/// `response`, marked as a repeat's (`Idempotent-Replayed: true`) when
/// `replayed`.
pub(super) fn marked_replayed(mut response: Response, replayed: bool) -> Response {
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Validates the call and publishes it (once per `Idempotency-Key`);
/// returns the notification's id, variant and receipt, and whether they
/// are a first call's, replayed.
async fn accept(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Answer, bool), ApiError> {
    let receipt = wants_receipt(uri)?;
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = read_body(state, headers, body, state.max_body_bytes).await?;

    // A key in the header is checked before the body is even parsed.
    let header_key = header_key(state, headers)?;
    let body = parse_body(&bytes)?;
    let key = api_key(state, header_key, &body.api_key)?;
    state.limiters.check_notify_key(key)?;
    let (target, msg) = body.validate()?;
    check_depth(state, &msg).map_err(ApiError::BadRequest)?;

    let idempotency_key = idempotency_key(headers)?;
    let Some(key) = idempotency_key else {
        let answer = publish(state, Notification::new(target, msg), receipt).await?;
        return Ok((answer, false));
    };
    let fingerprint = idempotency::fingerprint(&target, msg.get());
    let unavailable = |e: crate::bus::BusError| ApiError::Unavailable(e.to_string());
    match state
        .bus
        .claim(&key, &fingerprint)
        .await
        .map_err(unavailable)?
    {
        Claim::First => {
            let notification = Notification {
                claimed: Some(Claimed {
                    key: key.clone(),
                    fingerprint: fingerprint.clone(),
                }),
                ..Notification::new(target, msg)
            };
            match publish(state, notification, receipt).await {
                Ok(answer) => {
                    state.bus.complete(&key, &fingerprint, &answer).await;
                    Ok((answer, false))
                }
                Err(e) => {
                    state.bus.release(&key, &fingerprint).await;
                    Err(e)
                }
            }
        }
        // The first call's answer, its receipt included: nothing is
        // written this time.
        Claim::Replay(answer) => Ok((answer, true)),
        Claim::InProgress => Err(ApiError::Conflict),
        Claim::Reused => Err(ApiError::IdempotencyKeyReused),
    }
}

/// The header a backend's API key may come in: a name made once, where a
/// `&str` would be parsed on every call.
pub(super) const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The header of a call's idempotency key.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The `X-API-Key` header's key number, checked; `None` without one.
pub(super) fn header_key(state: &AppState, headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    headers
        .get(API_KEY)
        .map(|v| check_key(state, v.to_str().unwrap_or_default()))
        .transpose()
}

/// A backend call's JSON-object body of type `T` (`/disconnect`, `POST
/// /presence`), admitted in `/notify`'s order: the caller's address rate,
/// media type, size, header key, JSON, then the call's key (the header's,
/// else the body's `API_KEY`, which `body_key` reads) and its rate.
pub(super) async fn admitted_object<T: serde::de::DeserializeOwned>(
    state: &AppState,
    client: IpAddr,
    headers: &HeaderMap,
    body: Body,
    body_key: fn(&T) -> &Option<Value>,
) -> Result<T, ApiError> {
    state.limiters.check_notify_address(client)?;
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = read_body(state, headers, body, state.max_body_bytes).await?;
    let header_key = header_key(state, headers)?;
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    }
    let body = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid: {e}")))?;
    let key = api_key(state, header_key, body_key(&body))?;
    state.limiters.check_notify_key(key)?;
    Ok(body)
}

/// The call's key number: the header's, else the body's `API_KEY`.
pub(super) fn api_key(
    state: &AppState,
    header_key: Option<usize>,
    body_key: &Option<Value>,
) -> Result<usize, ApiError> {
    match (header_key, body_key) {
        (Some(key), _) => Ok(key),
        (None, Some(Value::String(key))) => check_key(state, key),
        _ => Err(unauthorized(
            "missing API key (X-API-Key header or API_KEY field)",
        )),
    }
}

/// Refuses a `msg` nested deeper than `CHANNELS_MAX_JSON_DEPTH`.
pub(super) fn check_depth(state: &AppState, msg: &RawValue) -> Result<(), String> {
    if nested_deeper_than(msg.get(), state.max_json_depth) {
        state.limiters.refused(Limit::JsonDepth);
        return Err(format!(
            "msg is nested deeper than {} levels",
            state.max_json_depth
        ));
    }
    Ok(())
}

/// The `Idempotency-Key` header, checked; `None` without one.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| IdempotencyKey::parse(v.as_bytes()))
        .transpose()
        .map_err(ApiError::BadRequest)
}

/// Publishes a validated call; its answer.
async fn publish(
    state: &AppState,
    notification: Notification,
    receipt: bool,
) -> Result<Answer, ApiError> {
    let mut answer = Answer {
        id: notification.id.clone(),
        variant: notification.target.variant(),
        receipt: None,
    };
    tracing::debug!(id = %answer.id, variant = answer.variant, "notification accepted");
    let unavailable = |e: crate::bus::BusError| ApiError::Unavailable(e.to_string());
    if receipt {
        answer.receipt = Some(
            state
                .bus
                .publish_with_receipt(notification)
                .await
                .map_err(unavailable)?,
        );
        return Ok(answer);
    }
    state.bus.publish(notification).await.map_err(unavailable)?;
    Ok(answer)
}

/// `?receipt=true` (or `false`); anything else for `receipt` is refused.
pub(super) fn wants_receipt(uri: &Uri) -> Result<bool, ApiError> {
    let mut receipt = false;
    for pair in uri.query().unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == "receipt" {
            receipt = match value {
                "true" => true,
                "false" => false,
                _ => return Err(ApiError::BadRequest("receipt must be true or false".into())),
            };
        }
    }
    Ok(receipt)
}

/// The body, up to `CHANNELS_MAX_BODY_BYTES`: refused from its declared
/// length when it has one, and cut off while streaming when it lies.
pub(super) async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        state.limiters.refused(Limit::BodySize);
        ApiError::PayloadTooLarge { limit }
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let collected = Limited::new(body, limit).collect().await.map_err(|e| {
        if e.is::<LengthLimitError>() {
            too_large()
        } else {
            ApiError::BadRequest("the body could not be read".into())
        }
    })?;
    Ok(collected.to_bytes())
}

/// Parses a body: a JSON object whose known fields have the right shape.
pub fn parse_body(bytes: &[u8]) -> Result<NotifyBody, ApiError> {
    // serde also reads a struct from a JSON array; only an object is a body.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::BadRequest(match e.classify() {
            serde_json::error::Category::Data => format!("body must be a JSON object: {e}"),
            _ => format!("body is not valid JSON: {e}"),
        })
    })
}

impl NotifyBody {
    /// The call's target and message, or why they are refused.
    pub fn validate(self) -> Result<(Target, Box<RawValue>), ApiError> {
        let msg = self
            .msg
            .filter(|m| m.get() != "null")
            .ok_or_else(|| ApiError::BadRequest("msg is required and must not be null".into()))?;
        let keycloak = self
            .keycloak
            .map(|v| parse_target_field("keycloak", &v, KeycloakId::parse))
            .transpose()?;
        let channel = self
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
        Ok((target, msg))
    }
}

/// `application/json`, with or without parameters such as `charset`.
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The accepted key's number, for its rate limit.
pub(super) fn check_key(state: &AppState, key: &str) -> Result<usize, ApiError> {
    state
        .api_keys
        .find(key)
        .ok_or_else(|| unauthorized("unknown API key"))
}

pub(super) fn unauthorized(message: &str) -> ApiError {
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
