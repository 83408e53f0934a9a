//! `Idempotency-Key` claims in Redis, for every node (see
//! [`crate::idempotency`]): `{prefix}:i:<SHA-256 of the key>`, holding
//! `"p <fingerprint>"` for [`PENDING_TTL`] while the first call is in
//! progress, then `"d <fingerprint> <id> <variant>"` for the window.
//!
//! A claim is one `SET … NX GET`: it sets the key when nobody holds it and
//! returns what was there otherwise, atomically, so of two nodes claiming
//! one key at once exactly one gets `First`.

use std::sync::LazyLock;

use redis::Script;

use super::{RedisBus, history::Keys};
use crate::{
    bus::BusError,
    idempotency::{Answer, Claim, IdempotencyKey, PENDING_TTL, judge},
};

/// Deletes KEYS[1] only while it still holds ARGV[1]: a release never
/// removes a claim that expired and was taken by another call meanwhile.
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

impl RedisBus {
    pub async fn claim(&self, key: &IdempotencyKey, fingerprint: &str) -> Result<Claim, BusError> {
        if !self.is_ready() {
            return Err(BusError::Unavailable);
        }
        let (Some(mut connection), _) = self.shared.connection() else {
            return Err(BusError::Unavailable);
        };
        let mut command = redis::cmd("SET");
        command
            .arg(Keys(&self.shared.prefix).idempotency(key))
            .arg(format!("p {fingerprint}"))
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(PENDING_TTL.as_millis() as u64);
        let previous: Option<String> = connection.query(&command).await.map_err(|e| {
            tracing::warn!(error = %e, "idempotency claim in Redis failed");
            BusError::Unavailable
        })?;
        Ok(match previous {
            None => Claim::First,
            Some(stored) => judge(&stored, fingerprint),
        })
    }

    /// Keeps the answer for the window, unless the publish script already
    /// kept it (recovery on: [`super::history::PUBLISH_SCRIPT`] writes it in
    /// the same step as the publish, so a node that dies between the two
    /// leaves no claim "in progress" to expire and be published again). An
    /// answer with a receipt is written over the script's, which could not
    /// know the counts. A failure is logged: the claim then expires after
    /// [`PENDING_TTL`], and a retry after that delivers again (with the
    /// script's record kept, a repeat answers without the receipt).
    pub async fn complete(&self, key: &IdempotencyKey, fingerprint: &str, answer: &Answer) {
        if self.shared.recovery.is_some() && answer.receipt.is_none() {
            return;
        }
        let Some(mut connection) = self.shared.connection().0 else {
            return;
        };
        let mut command = redis::cmd("SET");
        command
            .arg(Keys(&self.shared.prefix).idempotency(key))
            .arg(done_value(fingerprint, answer))
            .arg("PX")
            .arg(self.shared.idempotency_window.as_millis() as u64);
        if let Err(e) = connection.query::<()>(&command).await {
            tracing::warn!(error = %e, "idempotency answer not kept in Redis");
        }
    }

    /// Gives the claim back after a failed publish. A failure here leaves it
    /// to expire after [`PENDING_TTL`] (a retry meanwhile gets `409`).
    pub async fn release(&self, key: &IdempotencyKey, fingerprint: &str) {
        let Some(mut connection) = self.shared.connection().0 else {
            return;
        };
        let mut invocation = RELEASE_SCRIPT.prepare_invoke();
        invocation
            .key(Keys(&self.shared.prefix).idempotency(key))
            .arg(format!("p {fingerprint}"));
        if let Err(e) = connection.invoke::<i64>(&invocation).await {
            tracing::warn!(error = %e, "idempotency claim not released in Redis");
        }
    }
}

/// The record of a completed call: `"d <fingerprint> <id> <variant>"`.
pub fn done_value(fingerprint: &str, answer: &Answer) -> String {
    format!("d {fingerprint} {}", answer.encode())
}
