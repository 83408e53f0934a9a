//! Verification of upstream access tokens (Keycloak), for `GET /authorize`.
//!
//! Keys come from a shared HS256 secret, a JWKS file, or a JWKS URL. JWKS keys
//! are cached by `kid`; an unknown `kid` triggers a refetch, at most once per
//! [`REFRESH_MIN_INTERVAL`], so a flood of forged `kid`s cannot turn this node
//! into a load generator against the identity provider. The algorithm is
//! pinned by the key: an RSA key only verifies RS/PS tokens, an EC key only
//! its curve's ES algorithm, and HMAC algorithms are never accepted from a
//! JWKS, which rules out the HS256-with-the-public-key confusion.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
};

use super::{Claims, MAX_TOKEN_BYTES, TokenError, ws_token::WS_AUDIENCE};
use crate::config::{UpstreamConfig, UpstreamKeySource};

/// The shortest time between two JWKS fetches triggered by unknown `kid`s.
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Time limit of one JWKS fetch, connect included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is refused (a realm has a handful of keys).
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest accepted subject: docs/protocol.md caps a keycloakID at 256 characters.
pub const MAX_SUBJECT_CHARS: usize = 256;

/// Verifies upstream access tokens. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct UpstreamVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Keys,
    /// `iss`/`aud`/leeway settings shared by every key.
    base_validation: Validation,
}

enum Keys {
    Hs256(DecodingKey),
    Jwks(JwksCache),
}

/// JWKS keys by `kid`. A std `RwLock` because no `.await` is held across it;
/// the async `refresh` mutex serialises fetches so concurrent misses share one.
struct JwksCache {
    source: JwksSource,
    keys: RwLock<HashMap<String, JwksKey>>,
    refresh: tokio::sync::Mutex<Option<Instant>>,
}

enum JwksSource {
    File(PathBuf),
    Url {
        url: String,
        client: reqwest::Client,
    },
}

struct JwksKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

impl UpstreamVerifier {
    /// Builds the verifier. A JWKS file is read now (a bad file is a start-up
    /// error); a JWKS URL is fetched now too, but an unreachable identity
    /// provider only logs a warning: keys are fetched again on first use.
    pub async fn new(config: &UpstreamConfig) -> Result<Self, String> {
        let mut base = Validation::new(Algorithm::HS256);
        base.leeway = config.leeway.as_secs();
        base.validate_nbf = true;
        // A configured check also makes its claim required: jsonwebtoken
        // only checks `iss`/`aud` when the token carries them.
        let mut required = vec!["exp", "sub"];
        match &config.issuer {
            Some(iss) => {
                base.set_issuer(iss);
                required.push("iss");
            }
            None => base.iss = None,
        }
        match &config.audience {
            Some(aud) => {
                base.set_audience(aud);
                required.push("aud");
            }
            None => base.validate_aud = false,
        }
        base.set_required_spec_claims(&required);
        let keys = match &config.keys {
            UpstreamKeySource::Hs256(secret) => {
                Keys::Hs256(DecodingKey::from_secret(secret.expose().as_bytes()))
            }
            UpstreamKeySource::JwksFile(path) => {
                let cache = JwksCache::new(JwksSource::File(path.clone()));
                cache
                    .load()
                    .await
                    .map_err(|e| format!("CHANNELS_AUTH_JWKS_FILE: {e}"))?;
                Keys::Jwks(cache)
            }
            UpstreamKeySource::JwksUrl(url) => {
                let client = reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .connect_timeout(FETCH_TIMEOUT)
                    .build()
                    .map_err(|e| format!("CHANNELS_AUTH_JWKS_URL: {e}"))?;
                let cache = JwksCache::new(JwksSource::Url {
                    url: url.clone(),
                    client,
                });
                if let Err(e) = cache.load().await {
                    tracing::warn!(error = %e, "JWKS not fetched at start-up; will retry on first token");
                }
                Keys::Jwks(cache)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                keys,
                base_validation: base,
            }),
        })
    }

    /// Verifies an access token and returns its subject (the keycloak id).
    pub async fn verify(&self, token: &str) -> Result<String, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName => {
                TokenError::Algorithm("unsupported".into())
            }
            _ => TokenError::Malformed,
        })?;
        let mut validation = self.inner.base_validation.clone();
        let claims = match &self.inner.keys {
            Keys::Hs256(key) => {
                validation.algorithms = vec![Algorithm::HS256];
                if header.alg != Algorithm::HS256 {
                    return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
                }
                jsonwebtoken::decode::<Claims>(token, key, &validation)?.claims
            }
            Keys::Jwks(cache) => {
                let kid = header.kid.clone().unwrap_or_default();
                let attempt = |validation: &mut Validation| {
                    cache.with_key(&kid, header.alg, |key| {
                        validation.algorithms = key.algorithms.clone();
                        jsonwebtoken::decode::<Claims>(token, &key.key, validation)
                            .map(|d| d.claims)
                            .map_err(TokenError::from)
                    })
                };
                match attempt(&mut validation) {
                    Some(result) => result?,
                    None => {
                        cache.refresh_for_unknown_kid().await;
                        attempt(&mut validation).ok_or(TokenError::UnknownKey(kid.clone()))??
                    }
                }
            }
        };
        if audience_contains(&claims.aud, WS_AUDIENCE) {
            return Err(TokenError::WsTokenAsAccessToken);
        }
        if claims.sub.is_empty() {
            return Err(TokenError::MissingSubject);
        }
        if claims.sub.chars().count() > MAX_SUBJECT_CHARS {
            return Err(TokenError::SubjectTooLong);
        }
        Ok(claims.sub)
    }
}

fn audience_contains(aud: &Option<serde_json::Value>, wanted: &str) -> bool {
    match aud {
        Some(serde_json::Value::String(s)) => s == wanted,
        Some(serde_json::Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(wanted)),
        _ => false,
    }
}

impl JwksCache {
    fn new(source: JwksSource) -> Self {
        Self {
            source,
            keys: RwLock::new(HashMap::new()),
            refresh: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `f` with the key for `kid` if it is cached and accepts `alg`.
    /// `Some(Err(Algorithm))` when the key exists but is of another family:
    /// that is a refusal, not a reason to refetch.
    fn with_key<T>(
        &self,
        kid: &str,
        alg: Algorithm,
        f: impl FnOnce(&JwksKey) -> Result<T, TokenError>,
    ) -> Option<Result<T, TokenError>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = if kid.is_empty() && keys.len() == 1 {
            keys.values().next()
        } else {
            keys.get(kid)
        }?;
        if !key.algorithms.contains(&alg) {
            return Some(Err(TokenError::Algorithm(format!("{alg:?}"))));
        }
        Some(f(key))
    }

    /// Refetches the key set unless that was done less than
    /// [`REFRESH_MIN_INTERVAL`] ago. Concurrent callers wait for one fetch.
    async fn refresh_for_unknown_kid(&self) {
        let mut last = self.refresh.lock().await;
        if last.is_some_and(|at| at.elapsed() < REFRESH_MIN_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = self.load().await {
            tracing::warn!(error = %e, "JWKS refresh failed");
        }
    }

    async fn load(&self) -> Result<(), String> {
        let body = match &self.source {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            JwksSource::Url { url, client } => {
                let response = client
                    .get(url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| format!("fetch failed: {e}"))?;
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| format!("fetch failed: {e}"))?;
                body.to_vec()
            }
        };
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("JWKS larger than {MAX_JWKS_BYTES} bytes"));
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
        let keys: HashMap<String, JwksKey> = set
            .keys
            .iter()
            .filter_map(|jwk| Some((jwk.common.key_id.clone().unwrap_or_default(), to_key(jwk)?)))
            .collect();
        if keys.is_empty() {
            return Err("JWKS holds no usable RSA or EC signing key".into());
        }
        tracing::info!(keys = keys.len(), "JWKS loaded");
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }
}

/// The decoding key of a JWK and the algorithms it may verify. HMAC (`oct`)
/// keys and encryption keys are skipped: a JWKS is public, so an `oct` key
/// there would let anyone sign.
fn to_key(jwk: &Jwk) -> Option<JwksKey> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        _ => return None,
    };
    // A key that names its algorithm is pinned to exactly that one.
    let algorithms = match jwk.common.key_algorithm {
        Some(named) => {
            let named: Algorithm = named.to_string().parse().ok()?;
            family.into_iter().filter(|a| *a == named).collect()
        }
        None => family,
    };
    if algorithms.is_empty() {
        return None;
    }
    Some(JwksKey {
        key: DecodingKey::from_jwk(jwk).ok()?,
        algorithms,
    })
}
