//! `POST /notify/batch`: many notifications in one call (docs/protocol.md).
//!
//! The checks of `/notify` ([`super::notify`]) apply to the call, then to
//! every item, and the batch is validated whole: the first bad item is
//! answered `400` with its `index`, and nothing is delivered. The items are
//! published in array order without waiting for one before the next (over
//! Redis, one job of the publisher), so every socket receives them in that
//! order, and a batch is ordered with other calls as if its items had been
//! posted one by one.
//!
//! With an `Idempotency-Key`, each item claims `<key>#<index>` on its own
//! ([`crate::idempotency`]): a retry after a failure part-way publishes
//! exactly the items whose first publish failed, and answers the others'
//! first answers. Without one, a `503` may come after some items went out.
//! A batch counts once against the key's rate. With `?receipt=true` each
//! item's result adds `sockets` and `complete`, gathered for all items
//! within one second.

use std::sync::Arc;

use axum::{
    Extension, Json,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, Uri},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, value::RawValue};

use super::{
    AppState, ClientAddr,
    error::ApiError,
    notify::{
        Answered, api_key, check_depth, header_key, idempotency_key, is_json, marked_replayed,
        parse_body, read_body, wants_receipt,
    },
};
use crate::{
    idempotency::{self, Answer, Claim, Claimed},
    metrics::NotifyOutcome,
    notification::{Notification, Target},
};

#[derive(Deserialize)]
struct BatchBody {
    #[serde(rename = "API_KEY", default)]
    api_key: Option<Value>,
    /// Kept as text, so every `msg` arrives byte for byte as posted.
    #[serde(default)]
    notifications: Option<Box<RawValue>>,
}

/// A batch's answer: each item's, in item order.
#[derive(Serialize)]
struct Results<'a> {
    results: Vec<Answered<'a>>,
}

pub async fn batch(
    State(state): State<Arc<AppState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    request: Request,
) -> Result<Response, ApiError> {
    let (head, body) = request.into_parts();
    let result = match state.limiters.check_notify_address(client) {
        Ok(()) => accept(&state, &head.uri, &head.headers, body).await,
        Err(refused) => Err(refused.into()),
    };
    match &result {
        Ok(answers) => {
            for (answer, replayed) in answers {
                let outcome = match replayed {
                    true => NotifyOutcome::Replayed,
                    false => NotifyOutcome::Accepted,
                };
                state.metrics.notification(Some(answer.variant), outcome);
            }
        }
        Err(e) => {
            let outcome = match e {
                ApiError::Unavailable(_) => NotifyOutcome::Unavailable,
                _ => NotifyOutcome::Rejected,
            };
            state.metrics.notification(None, outcome);
            tracing::info!(error = %e, "batch refused");
        }
    }
    let answers = result?;
    let all_replayed = answers.iter().all(|(_, replayed)| *replayed);
    let results = answers.iter().map(|(a, _)| a.into()).collect();
    let response = Json(Results { results }).into_response();
    Ok(marked_replayed(response, all_replayed))
}

/// Validates the whole batch, then publishes what it must; each item's
/// answer and whether it was replayed, in item order.
async fn accept(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<(Answer, bool)>, ApiError> {
    let receipt = wants_receipt(uri)?;
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = read_body(state, headers, body, state.max_batch_bytes).await?;
    let header_key = header_key(state, headers)?;
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    }
    let body: BatchBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid: {e}")))?;
    let key = api_key(state, header_key, &body.api_key)?;
    state.limiters.check_notify_key(key)?;
    let items = body
        .notifications
        .and_then(|raw| serde_json::from_str::<Vec<Box<RawValue>>>(raw.get()).ok())
        .ok_or_else(|| {
            ApiError::BadRequest("notifications must be an array of notifications".into())
        })?;
    if items.is_empty() || items.len() > state.max_batch {
        return Err(ApiError::BadRequest(format!(
            "notifications must hold 1 to {} items (CHANNELS_MAX_BATCH)",
            state.max_batch
        )));
    }
    let mut calls = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let bad = |e: ApiError| ApiError::BadItem {
            index,
            message: e.to_string(),
        };
        let (target, msg) = parse_body(item.get().as_bytes())
            .and_then(|item| item.validate())
            .map_err(bad)?;
        check_depth(state, &msg).map_err(|message| ApiError::BadItem { index, message })?;
        calls.push((target, msg));
    }
    match idempotency_key(headers)? {
        None => {
            let answers = publish_all(state, calls, receipt).await?;
            Ok(answers.into_iter().map(|a| (a, false)).collect())
        }
        Some(key) => {
            let keys: Vec<_> = (0..calls.len()).map(|i| key.item(i)).collect();
            let fingerprints: Vec<_> = calls
                .iter()
                .map(|(target, msg)| idempotency::fingerprint(target, msg.get()))
                .collect();
            let claims = futures_util::future::join_all(
                keys.iter()
                    .zip(&fingerprints)
                    .map(|(key, fingerprint)| state.bus.claim(key, fingerprint)),
            )
            .await;
            let firsts: Vec<usize> = (0..claims.len())
                .filter(|&i| matches!(claims[i], Ok(Claim::First)))
                .collect();
            let refusal = claims.iter().find_map(|claim| match claim {
                Err(e) => Some(ApiError::Unavailable(e.to_string())),
                Ok(Claim::Reused) => Some(ApiError::IdempotencyKeyReused),
                Ok(Claim::InProgress) => Some(ApiError::Conflict),
                _ => None,
            });
            if let Some(refusal) = refusal {
                for &i in &firsts {
                    state.bus.release(&keys[i], &fingerprints[i]).await;
                }
                return Err(refusal);
            }
            // Only the items claimed now are published, in item order.
            let mut to_publish = Vec::with_capacity(firsts.len());
            let mut answers: Vec<Option<(Answer, bool)>> = claims
                .into_iter()
                .map(|claim| match claim {
                    Ok(Claim::Replay(answer)) => Some((answer, true)),
                    _ => None,
                })
                .collect();
            for (i, (target, msg)) in calls.into_iter().enumerate() {
                if answers[i].is_none() {
                    let claimed = Claimed {
                        key: keys[i].clone(),
                        fingerprint: fingerprints[i].clone(),
                    };
                    to_publish.push((target, msg, Some(claimed)));
                }
            }
            let published = publish_each(state, to_publish, receipt).await;
            let mut failed = false;
            for (&i, outcome) in firsts.iter().zip(published) {
                match outcome {
                    Ok(answer) => {
                        state
                            .bus
                            .complete(&keys[i], &fingerprints[i], &answer)
                            .await;
                        answers[i] = Some((answer, false));
                    }
                    Err(_) => {
                        state.bus.release(&keys[i], &fingerprints[i]).await;
                        failed = true;
                    }
                }
            }
            if failed {
                return Err(part_way());
            }
            Ok(answers
                .into_iter()
                .map(|a| a.expect("every item answered"))
                .collect())
        }
    }
}

/// Publishes every call, in order; their answers, or `503` if any failed.
async fn publish_all(
    state: &AppState,
    calls: Vec<(Target, Box<RawValue>)>,
    receipt: bool,
) -> Result<Vec<Answer>, ApiError> {
    let calls = calls.into_iter().map(|(target, msg)| (target, msg, None));
    publish_each(state, calls.collect(), receipt)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|_| part_way())
}

/// Publishes every call, in order, each with the key it claimed if any,
/// and with a receipt when asked (`?receipt=true`); each one's outcome.
async fn publish_each(
    state: &AppState,
    calls: Vec<(Target, Box<RawValue>, Option<Claimed>)>,
    receipt: bool,
) -> Vec<Result<Answer, ()>> {
    let notifications: Vec<Notification> = calls
        .into_iter()
        .map(|(target, msg, claimed)| Notification {
            claimed,
            ..Notification::new(target, msg)
        })
        .collect();
    let answers: Vec<Answer> = notifications
        .iter()
        .map(|n| Answer {
            id: n.id.clone(),
            variant: n.target.variant(),
            receipt: None,
        })
        .collect();
    if receipt {
        let outcomes = state.bus.publish_many_with_receipts(notifications).await;
        return answers
            .into_iter()
            .zip(outcomes)
            .map(|(answer, outcome)| {
                outcome
                    .map(|gathered| Answer {
                        receipt: Some(gathered),
                        ..answer
                    })
                    .map_err(drop)
            })
            .collect();
    }
    let outcomes = state.bus.publish_many(notifications).await;
    answers
        .into_iter()
        .zip(outcomes)
        .map(|(answer, outcome)| outcome.map(|()| answer).map_err(drop))
        .collect()
}

fn part_way() -> ApiError {
    ApiError::Unavailable(
        "the cluster bus is unavailable; items before the failure may have been delivered \
         (with an Idempotency-Key, a retry delivers exactly the missing ones)"
            .into(),
    )
}
