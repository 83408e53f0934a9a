//! Credentials: the API keys of backends, the upstream access tokens that `GET /authorize` accepts, and the
//! short-lived ws tokens it hands out for socket.io connections.
//!
//! The two kinds never stand in for each other: ws tokens carry the audience
//! [`ws_token::WS_AUDIENCE`], which the upstream verifier refuses, and the
//! ws verifier requires. This module does no HTTP routing and no socket work.

pub mod api_keys;
pub mod upstream;
pub mod ws_token;

pub use api_keys::ApiKeys;
pub use upstream::UpstreamVerifier;
pub use ws_token::WsTokens;

/// The longest token either verifier reads. A Keycloak access token with
/// many roles is a few KiB; anything far larger is refused before it is
/// decoded, so an oversized token costs nothing but its length check.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused. The message is safe to show to the caller and to
/// log: it never contains the token or a key.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("token is malformed")]
    Malformed,
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("token signing key {0:?} is unknown")]
    UnknownKey(String),
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token was revoked")]
    Revoked,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token has no subject")]
    MissingSubject,
    #[error("token subject is too long")]
    SubjectTooLong,
    #[error("a ws token is not an access token")]
    WsTokenAsAccessToken,
    #[error("the signing keys could not be fetched")]
    KeysUnavailable,
}

impl From<jsonwebtoken::errors::Error> for TokenError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => Self::Expired,
            K::ImmatureSignature => Self::NotYetValid,
            K::InvalidIssuer => Self::Issuer,
            K::InvalidAudience => Self::Audience,
            K::InvalidSignature => Self::Signature,
            K::InvalidAlgorithm | K::InvalidAlgorithmName => Self::Algorithm("in header".into()),
            K::MissingRequiredClaim(claim) if claim == "sub" => Self::MissingSubject,
            K::MissingRequiredClaim(claim) if claim == "exp" => Self::Malformed,
            _ => Self::Malformed,
        }
    }
}

/// The claims both verifiers read. Anything else in the token is ignored.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    /// Expiry, seconds since the epoch (checked by the verifiers; read
    /// here only where an expired ws token may still recover a session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// When a ws token was minted, in milliseconds since the epoch (ours
    /// only): `POST /disconnect` with `revoke` refuses those minted before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat_ms: Option<u64>,
}
