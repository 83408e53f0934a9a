//! ws tokens: minted by `GET /authorize`, presented in the socket.io `auth`
//! payload. HS256 with `CHANNELS_WS_TOKEN_SECRET`, shared by every node so a
//! token minted by one node is accepted by all.

use std::{sync::Arc, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;

use super::{Claims, MAX_TOKEN_BYTES, TokenError};
use crate::{config::Secret, notification::KeycloakId};

/// The audience of every ws token. Upstream tokens never carry it, and the
/// upstream verifier refuses tokens that do.
pub const WS_AUDIENCE: &str = "channels-ws";
/// The issuer of every ws token.
pub const WS_ISSUER: &str = "channels";

/// Mints and verifies ws tokens. Cheap to clone (an `Arc` inside): keys and
/// validation settings are built once.
#[derive(Clone)]
pub struct WsTokens {
    inner: Arc<Inner>,
}

struct Inner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// `validation` without the expiry check, for [`WsTokens::verify_signed`].
    signed_only: Validation,
    ttl: Duration,
    /// Users whose tokens minted at or before a time (ms) are refused, until
    /// such tokens have expired (see [`WsTokens::revoke`]).
    revoked: dashmap::DashMap<String, u64>,
}

/// A ws token whose signature, issuer and audience hold, and whether it
/// has expired.
#[derive(Debug, PartialEq, Eq)]
pub struct Signed {
    pub subject: String,
    pub expired: bool,
}

/// The claims written into a ws token.
#[derive(Serialize)]
struct WsClaims<'a> {
    sub: &'a str,
    aud: &'static str,
    iss: &'static str,
    iat: u64,
    iat_ms: u64,
    exp: u64,
}

impl WsTokens {
    pub fn new(secret: &Secret, ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[WS_AUDIENCE]);
        validation.set_issuer(&[WS_ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        // Our own nodes mint these; only their clocks' skew matters.
        validation.leeway = 5;
        let mut signed_only = validation.clone();
        signed_only.validate_exp = false;
        Self {
            inner: Arc::new(Inner {
                encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
                decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
                validation,
                signed_only,
                ttl,
                revoked: dashmap::DashMap::new(),
            }),
        }
    }

    /// The lifetime of the tokens this node mints.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Mints a ws token for `user`, valid for the configured lifetime.
    pub fn mint(&self, user: &KeycloakId) -> String {
        let now_ms = crate::recovery::now_ms();
        let now = now_ms / 1000;
        let claims = WsClaims {
            sub: user.as_str(),
            aud: WS_AUDIENCE,
            iss: WS_ISSUER,
            iat: now,
            iat_ms: now_ms,
            exp: now + self.inner.ttl.as_secs(),
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.inner.encoding,
        )
        .expect("HS256 encoding of plain claims cannot fail")
    }

    /// Verifies a ws token and returns its subject.
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.inner.decoding, &self.inner.validation)?;
        self.check_revoked(&data.claims)?;
        Ok(data.claims.sub)
    }

    /// Refuses, from now on and until they expire, the tokens of `user`
    /// minted at or before `at_ms` (a token without a mint time is older
    /// than any). Forgets the revocations whose tokens have all expired, so
    /// what is kept is bounded by the revocations of one token lifetime.
    pub fn revoke(&self, user: &KeycloakId, at_ms: u64) {
        let lifetime_ms = (self.inner.ttl.as_secs() + self.inner.validation.leeway) * 1000;
        let now = crate::recovery::now_ms();
        self.inner
            .revoked
            .retain(|_, at| at.saturating_add(lifetime_ms) >= now);
        self.inner
            .revoked
            .entry(user.as_str().to_string())
            .and_modify(|at| *at = (*at).max(at_ms))
            .or_insert(at_ms);
    }

    fn check_revoked(&self, claims: &Claims) -> Result<(), TokenError> {
        match self.inner.revoked.get(&claims.sub) {
            Some(at) if claims.iat_ms.unwrap_or(0) <= *at => Err(TokenError::Revoked),
            _ => Ok(()),
        }
    }

    /// Verifies a ws token but its expiry, and says whether it expired:
    /// docs/protocol.md lets an expired token of the same user recover a session
    /// (never open a new one).
    pub fn verify_signed(&self, token: &str) -> Result<Signed, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.inner.decoding, &self.inner.signed_only)?;
        self.check_revoked(&data.claims)?;
        let now = jsonwebtoken::get_current_timestamp();
        let exp = data.claims.exp.ok_or(TokenError::Malformed)?;
        Ok(Signed {
            subject: data.claims.sub,
            expired: exp.saturating_add(self.inner.validation.leeway) < now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ttl: u64) -> WsTokens {
        WsTokens::new(&Secret::new("a".repeat(40)), Duration::from_secs(ttl))
    }

    #[test]
    fn a_revoke_refuses_the_tokens_minted_before_it_only() {
        let t = tokens(300);
        let alice = KeycloakId::parse("alice").unwrap();
        let bob = KeycloakId::parse("bob").unwrap();
        let old = t.mint(&alice);
        let bobs = t.mint(&bob);
        std::thread::sleep(Duration::from_millis(2));
        t.revoke(&alice, crate::recovery::now_ms());
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(t.verify(&old), Err(TokenError::Revoked));
        assert_eq!(t.verify_signed(&old), Err(TokenError::Revoked));
        assert_eq!(t.verify(&t.mint(&alice)).unwrap(), "alice");
        assert_eq!(t.verify(&bobs).unwrap(), "bob");
    }

    #[test]
    fn a_minted_token_verifies_to_its_user() {
        let t = tokens(300);
        let user = KeycloakId::parse("alice").unwrap();
        assert_eq!(t.verify(&t.mint(&user)).unwrap(), "alice");
    }

    #[test]
    fn an_expired_token_is_signed_but_expired_and_a_forged_one_is_neither() {
        let t = tokens(300);
        let secret = "a".repeat(40);
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"sub": "alice", "iss": WS_ISSUER, "aud": WS_AUDIENCE, "iat": now - 4000, "exp": now - 3600});
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert_eq!(t.verify(&expired), Err(TokenError::Expired));
        assert_eq!(
            t.verify_signed(&expired),
            Ok(Signed {
                subject: "alice".into(),
                expired: true
            })
        );
        let fresh = t.mint(&KeycloakId::parse("alice").unwrap());
        assert!(!t.verify_signed(&fresh).unwrap().expired);
        let other = WsTokens::new(&Secret::new("b".repeat(40)), Duration::from_secs(300));
        let forged = other.mint(&KeycloakId::parse("alice").unwrap());
        assert_eq!(t.verify_signed(&forged), Err(TokenError::Signature));
    }

    #[test]
    fn a_token_from_another_secret_is_refused() {
        let other = WsTokens::new(&Secret::new("b".repeat(40)), Duration::from_secs(300));
        let token = other.mint(&KeycloakId::parse("alice").unwrap());
        assert_eq!(tokens(300).verify(&token), Err(TokenError::Signature));
    }

    #[test]
    fn a_token_without_the_ws_audience_is_refused() {
        let secret = "a".repeat(40);
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"sub": "alice", "iss": WS_ISSUER, "exp": now + 60});
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert!(tokens(300).verify(&token).is_err());
    }
}
