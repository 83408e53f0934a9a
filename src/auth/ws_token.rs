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
    ttl: Duration,
}

/// The claims written into a ws token.
#[derive(Serialize)]
struct WsClaims<'a> {
    sub: &'a str,
    aud: &'static str,
    iss: &'static str,
    iat: u64,
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
        Self {
            inner: Arc::new(Inner {
                encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
                decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
                validation,
                ttl,
            }),
        }
    }

    /// The lifetime of the tokens this node mints.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Mints a ws token for `user`, valid for the configured lifetime.
    pub fn mint(&self, user: &KeycloakId) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = WsClaims {
            sub: user.as_str(),
            aud: WS_AUDIENCE,
            iss: WS_ISSUER,
            iat: now,
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
        Ok(data.claims.sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ttl: u64) -> WsTokens {
        WsTokens::new(&Secret::new("a".repeat(40)), Duration::from_secs(ttl))
    }

    #[test]
    fn a_minted_token_verifies_to_its_user() {
        let t = tokens(300);
        let user = KeycloakId::parse("alice").unwrap();
        assert_eq!(t.verify(&t.mint(&user)).unwrap(), "alice");
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
