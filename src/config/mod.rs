//! Configuration: environment variables → a validated [`Config`].
//!
//! Every setting is an environment variable (`CHANNELS_*`), declared once
//! in [`settings`]. Validation happens once, at start-up, and reads every
//! variable before it answers: all the missing and malformed values come
//! back together ([`ConfigErrors`]), each naming its variable, so an
//! operator fixes a configuration in one pass. Nothing secret is ever
//! defaulted, except in dev mode ([`Config::dev`]), which uses fixed,
//! publicly known secrets and refuses to listen beyond loopback by default.
//!
//! The types of the settings live here too, so that the modules they
//! configure depend on this one and never the reverse.

mod redis;
pub mod settings;

use std::{
    collections::HashMap, net::SocketAddr, num::NonZeroU32, path::PathBuf, str::FromStr,
    time::Duration,
};

use axum::http::HeaderName;

pub use redis::{RedisSettings, SENTINEL_SCHEME, SentinelUrl};
use settings::{About, Setting};

/// The fixed secrets of dev mode. They are public (they are in this file and in
/// the README), which is the point: `channels gen-token` and the README's tour
/// work with no setup. Never use dev mode in production.
pub mod dev {
    /// Upstream (identity-provider) HS256 secret in dev mode.
    pub const UPSTREAM_SECRET: &str = "dev-upstream-secret-not-for-production-0123456789";
    /// ws-token secret in dev mode.
    pub const WS_TOKEN_SECRET: &str = "dev-ws-token-secret-not-for-production-0123456789";
    /// The one API key accepted by `POST /notify` in dev mode.
    pub const API_KEY: &str = "dev-api-key";
    /// Dev mode listens on loopback only, unless `CHANNELS_LISTEN` says otherwise.
    pub const LISTEN: &str = "127.0.0.1:3000";
}

/// A configuration error. The message always names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is required: {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
}

/// Every error of one configuration, in the order of the settings.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems", many.len())?;
                many.iter().try_for_each(|e| write!(f, "\n  {e}"))
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated settings of one node.
#[derive(Clone, Debug)]
pub struct Config {
    /// `CHANNELS_LISTEN`: the address the HTTP and socket.io server binds.
    pub listen: SocketAddr,
    /// `CHANNELS_LISTEN_BACKLOG`: connections the kernel holds for the node
    /// before it accepts them (capped by `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Whether the node runs in dev mode (fixed public secrets, loud warning).
    pub dev_mode: bool,
    /// How upstream access tokens (`GET /authorize`) are verified.
    pub upstream: UpstreamConfig,
    /// `CHANNELS_WS_TOKEN_SECRET`: HMAC secret of the ws tokens, shared by all nodes.
    pub ws_token_secret: Secret,
    /// `CHANNELS_WS_TOKEN_TTL`: lifetime of a ws token.
    pub ws_token_ttl: Duration,
    /// `CHANNELS_API_KEYS`: keys accepted by `POST /notify` (several, for rotation).
    pub api_keys: Vec<Secret>,
    /// `CHANNELS_CORS_ORIGINS`: allowed browser origins; empty means no CORS headers.
    pub cors_origins: Vec<String>,
    /// `CHANNELS_MAX_BODY_BYTES`: largest accepted `/notify` body.
    pub max_body_bytes: usize,
    /// `CHANNELS_MAX_BATCH`: most notifications in one `/notify/batch`.
    pub max_batch: usize,
    /// `CHANNELS_MAX_BATCH_BYTES`: largest accepted `/notify/batch` body.
    pub max_batch_bytes: usize,
    /// `CHANNELS_SOCKET_QUEUE`: packets a socket may have waiting before it is
    /// closed as a slow client.
    pub socket_queue: usize,
    /// `CHANNELS_SOCKET_QUEUE_BYTES`: bytes of messages that may wait in one
    /// socket's send queue; past it too, the socket is a slow client.
    pub socket_queue_bytes: usize,
    /// `CHANNELS_WS_MAX_MESSAGE_BYTES`: largest message a client may send us.
    pub ws_max_message_bytes: usize,
    /// `CHANNELS_METRICS_MAX_CHANNELS`: distinct channel label values in metrics.
    pub metrics_max_channels: usize,
    /// `CHANNELS_SHUTDOWN_TIMEOUT`: upper bound of a graceful shutdown.
    pub shutdown_timeout: Duration,
    /// `CHANNELS_HEADER_TIMEOUT`: how long a connection may take to send a
    /// complete request head, or stay idle between requests; also how long
    /// a socket.io session may take to send its CONNECT.
    pub header_timeout: Duration,
    /// `CHANNELS_PING_INTERVAL`: engine.io heartbeat interval. Load balancer
    /// idle timeouts must be longer.
    pub ping_interval: Duration,
    /// `CHANNELS_PING_TIMEOUT`: how long a client has to answer a ping.
    pub ping_timeout: Duration,
    /// `CHANNELS_WORKER_THREADS`: threads that run the node's tasks; `None`
    /// (unset, or `auto`) is one per core. Fewer leave cores to processes
    /// beside the node: on a machine it shares, each extra thread is
    /// preempted, and takes its sockets' writes with it (BENCHMARKS.md, "One
    /// worker thread").
    pub worker_threads: Option<usize>,
    /// `CHANNELS_REDIS_*`: the cluster bus; `None` runs a standalone node.
    pub redis: Option<RedisSettings>,
    /// `CHANNELS_RECOVERY_*`: connection state recovery.
    pub recovery: Recovery,
    /// `CHANNELS_IDEMPOTENCY_*`: `Idempotency-Key` on `/notify`.
    pub idempotency: Idempotency,
    /// What one client, key or user may ask of the node.
    pub limits: Limits,
    /// `CHANNELS_LOG`: the log filter (`tracing`'s `EnvFilter` syntax).
    pub log: String,
    /// `CHANNELS_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// Every setting as `check-config` shows it, secrets masked.
    described: Vec<(&'static str, String)>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: aligned, coloured on a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Connection state recovery (socket.io's, server side): how long after a
/// disconnect a socket may come back with everything it missed, and how much.
#[derive(Clone, Copy, Debug)]
pub struct Recovery {
    /// `CHANNELS_RECOVERY_WINDOW`: how long after a disconnect a session may
    /// recover; zero turns recovery off (no `pid`, no offsets on the wire).
    pub window: Duration,
    /// `CHANNELS_RECOVERY_MAX_MISSED`: the most notifications one socket can
    /// recover; a socket that missed more gets a fresh session.
    pub max_missed: usize,
}

impl Recovery {
    /// Whether sessions are recoverable at all.
    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }
}

/// How long and how many `Idempotency-Key`s are kept ([`crate::idempotency`]).
#[derive(Clone, Copy, Debug)]
pub struct Idempotency {
    /// `CHANNELS_IDEMPOTENCY_WINDOW`: how long a key answers its first
    /// call's answer.
    pub window: Duration,
    /// `CHANNELS_IDEMPOTENCY_MAX_KEYS`: the most keys a standalone node
    /// keeps (the oldest go first); Redis keeps every key for the window.
    pub max_keys: usize,
}

/// The limits of [`crate::limits`], each refusal counted by name.
#[derive(Clone, Debug)]
pub struct Limits {
    /// `CHANNELS_MAX_CONNECTIONS`: open TCP connections per node.
    pub max_connections: usize,
    /// `CHANNELS_MAX_SOCKETS_PER_USER`: sockets one user may hold on a node.
    pub max_sockets_per_user: usize,
    /// `CHANNELS_MAX_JSON_DEPTH`: deepest nesting of a notification's `msg`.
    pub max_json_depth: usize,
    /// `CHANNELS_CONNECT_RATE`, `CHANNELS_AUTHORIZE_RATE`,
    /// `CHANNELS_NOTIFY_RATE_PER_KEY`, `CHANNELS_NOTIFY_RATE_PER_ADDRESS` and
    /// `CHANNELS_CLIENT_ADDRESS_HEADER`.
    pub rates: RateLimits,
}

/// How `GET /authorize` verifies the upstream access token.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Where the verification keys come from.
    pub keys: UpstreamKeySource,
    /// `CHANNELS_AUTH_ISSUER`: accepted `iss` values, when set.
    pub issuer: Option<Vec<String>>,
    /// `CHANNELS_AUTH_AUDIENCE`: accepted `aud` values, when set.
    pub audience: Option<Vec<String>>,
    /// `CHANNELS_AUTH_LEEWAY`: clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
}

/// A rate: `per_second` calls on average, `burst` at once. Written
/// `RATE[:BURST]` in the environment (`50:200`; the burst defaults to the
/// rate), or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let number = |n: &str| {
            n.trim()
                .parse::<NonZeroU32>()
                .map_err(|_| format!("{n:?} is not a positive whole number"))
        };
        let (rate, burst) = match s.split_once(':') {
            Some((rate, burst)) => (number(rate)?, number(burst)?),
            None => (number(s)?, number(s)?),
        };
        Ok(Rate {
            per_second: rate,
            burst,
        })
    }
}

/// The rate limits of a node ([`crate::limits`]).
#[derive(Clone, Debug, Default)]
pub struct RateLimits {
    /// Engine.io handshakes (new socket.io connections) per client address.
    pub connect: Option<Rate>,
    /// `GET /authorize` calls per client address.
    pub authorize: Option<Rate>,
    /// `POST /notify` calls per API key.
    pub notify_per_key: Option<Rate>,
    /// `POST /notify` calls per client address, checked before the key.
    pub notify_per_address: Option<Rate>,
    /// A header naming the client address, set by a trusted proxy in front
    /// of the node (`X-Forwarded-For`: its last entry is used).
    pub client_address_header: Option<HeaderName>,
}

/// Where the keys that verify upstream access tokens come from.
#[derive(Clone, Debug)]
pub enum UpstreamKeySource {
    /// `CHANNELS_AUTH_JWKS_URL`: the identity provider's JWKS endpoint.
    JwksUrl(String),
    /// `CHANNELS_AUTH_JWKS_FILE`: a JWKS document on disk.
    JwksFile(PathBuf),
    /// `CHANNELS_AUTH_HS256_SECRET`: a shared HMAC secret.
    Hs256(Secret),
}

/// A secret value whose `Debug` never prints it, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is used as key material.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env(dev_mode: bool) -> Result<Self, ConfigErrors> {
        Self::from_vars(&std::env::vars().collect(), dev_mode)
    }

    /// Dev-mode configuration with no environment at all (tests, the tour).
    pub fn dev() -> Self {
        Self::from_vars(&HashMap::new(), true).expect("dev defaults are valid")
    }

    /// Reads the configuration from a map of variables (the environment, or a
    /// test's own map): every variable, then the rules between them.
    pub fn from_vars(vars: &HashMap<String, String>, dev_mode: bool) -> Result<Self, ConfigErrors> {
        use settings::*;
        let mut env = Env {
            vars,
            dev_mode,
            errors: Vec::new(),
            described: vec![(DEV.name(), dev_mode.to_string())],
        };
        let upstream = UpstreamConfig {
            keys: env.upstream_keys(),
            issuer: env.optional(&AUTH_ISSUER),
            audience: env.optional(&AUTH_AUDIENCE),
            leeway: env.read(&AUTH_LEEWAY),
        };
        let ws_token_secret = env.read(&WS_TOKEN_SECRET);
        if let UpstreamKeySource::Hs256(upstream_secret) = &upstream.keys
            && upstream_secret == &ws_token_secret
        {
            env.invalid(
                &WS_TOKEN_SECRET.about,
                "must differ from CHANNELS_AUTH_HS256_SECRET, or a ws token would pass as an access token".into(),
            );
        }
        let config = Self {
            listen: env.read(&LISTEN),
            listen_backlog: env.read(&LISTEN_BACKLOG),
            dev_mode,
            upstream,
            ws_token_secret,
            ws_token_ttl: env.read(&WS_TOKEN_TTL),
            api_keys: env.read(&API_KEYS),
            cors_origins: env.read(&CORS_ORIGINS),
            max_body_bytes: env.read(&MAX_BODY_BYTES),
            max_batch: env.read(&MAX_BATCH),
            max_batch_bytes: env.read(&MAX_BATCH_BYTES),
            socket_queue: env.read(&SOCKET_QUEUE),
            socket_queue_bytes: env.read(&SOCKET_QUEUE_BYTES),
            ws_max_message_bytes: env.read(&WS_MAX_MESSAGE_BYTES),
            metrics_max_channels: env.read(&METRICS_MAX_CHANNELS),
            shutdown_timeout: env.read(&SHUTDOWN_TIMEOUT),
            header_timeout: env.read(&HEADER_TIMEOUT),
            ping_interval: env.read(&PING_INTERVAL),
            ping_timeout: env.read(&PING_TIMEOUT),
            worker_threads: env.read(&WORKER_THREADS),
            redis: env.redis(),
            recovery: Recovery {
                window: env.read(&RECOVERY_WINDOW),
                max_missed: env.read(&RECOVERY_MAX_MISSED),
            },
            idempotency: Idempotency {
                window: env.read(&IDEMPOTENCY_WINDOW),
                max_keys: env.read(&IDEMPOTENCY_MAX_KEYS),
            },
            limits: Limits {
                max_connections: env.read(&MAX_CONNECTIONS),
                max_sockets_per_user: env.read(&MAX_SOCKETS_PER_USER),
                max_json_depth: env.read(&MAX_JSON_DEPTH),
                rates: RateLimits {
                    connect: env.read(&CONNECT_RATE),
                    authorize: env.read(&AUTHORIZE_RATE),
                    notify_per_key: env.read(&NOTIFY_RATE_PER_KEY),
                    notify_per_address: env.read(&NOTIFY_RATE_PER_ADDRESS),
                    client_address_header: env.optional(&CLIENT_ADDRESS_HEADER),
                },
            },
            log: env.read(&LOG),
            log_format: env.read(&LOG_FORMAT),
            described: Vec::new(),
        };
        env.finish(config)
    }

    /// The effective settings by variable, in the README's order, secrets
    /// masked: what `channels check-config` prints.
    pub fn describe(&self) -> &[(&'static str, String)] {
        &self.described
    }
}

/// The variables being read, whether dev defaults apply, and what reading
/// found: the errors so far, and each setting as `check-config` shows it.
struct Env<'a> {
    vars: &'a HashMap<String, String>,
    dev_mode: bool,
    errors: Vec<ConfigError>,
    described: Vec<(&'static str, String)>,
}

impl Env<'_> {
    /// A set, non-blank value.
    fn get(&self, var: &str) -> Option<&str> {
        self.vars
            .get(var)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn invalid(&mut self, about: &About, reason: String) {
        self.errors.push(ConfigError::Invalid {
            var: about.name,
            reason,
        });
    }

    /// The setting's value: the one set, else the one that applies unset
    /// in this mode, else `None` (recorded as an error when the setting is
    /// required). An invalid value is recorded, and is `None`.
    fn optional<T>(&mut self, setting: &Setting<T>) -> Option<T> {
        let about = &setting.about;
        let (raw, set) = match self.get(about.name) {
            Some(raw) => (raw.to_string(), true),
            None => match about.unset_value(self.dev_mode) {
                Some(raw) => (raw.to_string(), false),
                None => {
                    if about.required(self.dev_mode) {
                        self.errors.push(ConfigError::Missing {
                            var: about.name,
                            hint: about.doc,
                        });
                    }
                    self.described.push((about.name, "(not set)".into()));
                    return None;
                }
            },
        };
        let shown = about.shown(&raw);
        self.described.push((
            about.name,
            if set {
                shown
            } else {
                format!("{shown} (default)")
            },
        ));
        match (setting.parse)(&raw) {
            Ok(value) => Some(value),
            Err(reason) => {
                self.invalid(about, reason);
                None
            }
        }
    }

    /// [`Self::optional`] for a setting that always has a value: when it is
    /// missing or invalid (recorded), the value that applies unset stands in
    /// so that reading goes on to the other variables.
    fn read<T>(&mut self, setting: &Setting<T>) -> T {
        self.optional(setting).unwrap_or_else(|| {
            let fallback = setting
                .about
                .unset_value(true)
                .expect("read() is for settings that have a value when unset");
            (setting.parse)(fallback).expect("a default passes its parser (settings::tests)")
        })
    }

    /// Exactly one upstream key source must be set; dev mode defaults to
    /// HS256 with its public secret.
    fn upstream_keys(&mut self) -> UpstreamKeySource {
        use settings::{AUTH_HS256_SECRET, AUTH_JWKS_FILE, AUTH_JWKS_URL};
        let set = [
            AUTH_JWKS_URL.name(),
            AUTH_JWKS_FILE.name(),
            AUTH_HS256_SECRET.name(),
        ]
        .iter()
        .filter(|var| self.get(var).is_some())
        .count();
        let url = self.optional(&AUTH_JWKS_URL);
        let file = self.optional(&AUTH_JWKS_FILE);
        let hs256 = self.optional(&AUTH_HS256_SECRET);
        let dev_secret = || UpstreamKeySource::Hs256(Secret::new(dev::UPSTREAM_SECRET));
        match (set, url, file, hs256) {
            (0, ..) if self.dev_mode => dev_secret(),
            (0, ..) => {
                self.errors.push(ConfigError::Missing {
                    var: AUTH_JWKS_URL.name(),
                    hint: "or CHANNELS_AUTH_JWKS_FILE, or CHANNELS_AUTH_HS256_SECRET: how to verify access tokens",
                });
                dev_secret()
            }
            (1, Some(url), ..) => UpstreamKeySource::JwksUrl(url),
            (1, _, Some(file), _) => UpstreamKeySource::JwksFile(file),
            (1, _, _, Some(secret)) => UpstreamKeySource::Hs256(secret),
            // The one set is invalid, and recorded.
            (1, ..) => dev_secret(),
            _ => {
                self.invalid(
                    &AUTH_JWKS_URL.about,
                    "set only one of CHANNELS_AUTH_JWKS_URL, CHANNELS_AUTH_JWKS_FILE, CHANNELS_AUTH_HS256_SECRET".into(),
                );
                dev_secret()
            }
        }
    }

    /// The Redis bus, or `None` for a standalone node.
    fn redis(&mut self) -> Option<RedisSettings> {
        use settings::{REDIS_CLUSTER, REDIS_PREFIX, REDIS_URL};
        let urls = self.optional(&REDIS_URL);
        let cluster = self.read(&REDIS_CLUSTER);
        let prefix = self.read(&REDIS_PREFIX);
        let urls = urls?;
        let sentinel = urls.iter().any(|url| url.starts_with(SENTINEL_SCHEME));
        if cluster && sentinel {
            self.invalid(
                &REDIS_CLUSTER.about,
                "a Redis Cluster is not found through Sentinel".into(),
            );
        }
        if urls.len() > 1 && !cluster {
            self.invalid(
                &REDIS_URL.about,
                "several URLs are only for a cluster (CHANNELS_REDIS_CLUSTER=true)".into(),
            );
        }
        Some(RedisSettings {
            urls,
            cluster,
            prefix,
        })
    }

    /// The configuration read, or every error found on the way.
    fn finish(mut self, mut config: Config) -> Result<Config, ConfigErrors> {
        if !self.errors.is_empty() {
            return Err(ConfigErrors(self.errors));
        }
        let order = |name: &str| settings::ALL.iter().position(|about| about.name == name);
        self.described.sort_by_key(|(name, _)| order(name));
        config.described = self.described;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const WS: &str = "ws-secret-ws-secret-ws-secret-ws-secret";
    const UP: &str = "up-secret-up-secret-up-secret-up-secret";

    #[test]
    fn production_without_secrets_names_every_missing_variable_at_once() {
        let err = Config::from_vars(&vars(&[]), false)
            .unwrap_err()
            .to_string();
        for var in [
            "CHANNELS_AUTH_JWKS_URL",
            "CHANNELS_WS_TOKEN_SECRET",
            "CHANNELS_API_KEYS",
        ] {
            assert!(err.contains(var), "{var}: {err}");
        }
        assert!(err.starts_with("3 problems"), "{err}");
    }

    #[test]
    fn every_invalid_value_is_reported_at_once() {
        let v = vars(&[
            ("CHANNELS_AUTH_HS256_SECRET", UP),
            ("CHANNELS_WS_TOKEN_SECRET", WS),
            ("CHANNELS_API_KEYS", "k1"),
            ("CHANNELS_LISTEN", "nowhere"),
            ("CHANNELS_SOCKET_QUEUE", "lots"),
            ("CHANNELS_CONNECT_RATE", "0"),
            ("CHANNELS_LOG_FORMAT", "xml"),
        ]);
        let ConfigErrors(errors) = Config::from_vars(&v, false).unwrap_err();
        let mut named: Vec<String> = errors
            .iter()
            .map(|e| e.to_string().split(' ').next().unwrap().to_string())
            .collect();
        named.sort();
        assert_eq!(
            named,
            [
                "CHANNELS_CONNECT_RATE",
                "CHANNELS_LISTEN",
                "CHANNELS_LOG_FORMAT",
                "CHANNELS_SOCKET_QUEUE",
            ]
        );
    }

    #[test]
    fn malformed_values_are_refused_with_their_variable() {
        let base = [
            ("CHANNELS_AUTH_HS256_SECRET", UP),
            ("CHANNELS_WS_TOKEN_SECRET", WS),
            ("CHANNELS_API_KEYS", "k1"),
        ];
        for (var, bad) in [
            ("CHANNELS_LISTEN", "nowhere"),
            ("CHANNELS_WS_TOKEN_TTL", "-1"),
            ("CHANNELS_MAX_BODY_BYTES", "1000"),
            ("CHANNELS_SOCKET_QUEUE", "lots"),
            ("CHANNELS_WS_TOKEN_SECRET", "short"),
            ("CHANNELS_AUTH_JWKS_URL", "ftp://x"),
            ("CHANNELS_WORKER_THREADS", "0"),
            ("CHANNELS_WORKER_THREADS", "many"),
            ("CHANNELS_LISTEN_BACKLOG", "0"),
            ("CHANNELS_LISTEN_BACKLOG", "65536"),
            ("CHANNELS_LOG", "channels=loud"),
            ("CHANNELS_REDIS_URL", "http://127.0.0.1:6379"),
            ("CHANNELS_REDIS_CLUSTER", "maybe"),
        ] {
            let mut v = vars(&base);
            v.insert(var.into(), bad.into());
            let err = Config::from_vars(&v, false).unwrap_err().to_string();
            assert!(err.contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn same_secret_for_upstream_and_ws_tokens_is_refused() {
        let v = vars(&[
            ("CHANNELS_AUTH_HS256_SECRET", WS),
            ("CHANNELS_WS_TOKEN_SECRET", WS),
            ("CHANNELS_API_KEYS", "k1"),
        ]);
        let err = Config::from_vars(&v, false).unwrap_err().to_string();
        assert!(err.contains("must differ"), "{err}");
    }

    #[test]
    fn dev_mode_needs_nothing_and_stays_on_loopback() {
        let config = Config::dev();
        assert!(config.listen.ip().is_loopback());
        assert_eq!(config.api_keys, vec![Secret::new(dev::API_KEY)]);
    }

    #[test]
    fn check_config_output_masks_every_secret() {
        let v = vars(&[
            ("CHANNELS_AUTH_HS256_SECRET", UP),
            ("CHANNELS_WS_TOKEN_SECRET", WS),
            ("CHANNELS_API_KEYS", "key-one,key-two"),
            (
                "CHANNELS_REDIS_URL",
                "redis://user:hunter2-password@redis:6379/0",
            ),
        ]);
        let described = format!("{:?}", Config::from_vars(&v, false).unwrap().describe());
        for secret in [UP, WS, "key-one", "key-two", "hunter2-password"] {
            assert!(!described.contains(secret), "{secret} leaked: {described}");
        }
        assert!(
            described.contains("redis://user:***@redis:6379/0"),
            "{described}"
        );
        assert!(described.contains("2 key(s)"));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = Config::dev();
        let debug = format!("{config:?}");
        assert!(!debug.contains(dev::WS_TOKEN_SECRET));
        assert!(!debug.contains(dev::API_KEY));
    }
}
