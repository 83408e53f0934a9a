//! Configuration: environment variables → a validated [`Config`].
//!
//! Every setting is an environment variable (`CHANNELS_*`). Validation happens
//! once, at start-up: a missing or malformed value is a [`ConfigError`] that
//! names the variable, so an operator never has to guess. Nothing secret is
//! ever defaulted, except in dev mode ([`Config::dev`]), which uses fixed,
//! publicly known secrets and refuses to listen beyond loopback by default.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use axum::http::HeaderName;

use crate::{
    auth::UpstreamKeySource,
    bus::RedisSettings,
    limits::{Rate, RateLimits},
};

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

/// Minimum length of any shared secret, so a typo like `secret` is caught at start.
const MIN_SECRET_BYTES: usize = 32;
/// docs/protocol.md: at least 256 KiB of body must always be accepted by `/notify`.
const MIN_BODY_BYTES: usize = 256 * 1024;
/// Largest `CHANNELS_LISTEN_BACKLOG`: the largest `net.core.somaxconn` that
/// older kernels accept, which caps the backlog anyway.
const MAX_LISTEN_BACKLOG: u32 = 65_535;

/// A start-up configuration error. The message always names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is required{hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
}

/// Every variable the node reads, in the order of the README's table
/// (a test keeps the two, and the names this module and `cli` read, the
/// same): a `CHANNELS_*` variable not in it is a misspelling.
pub const KNOWN: &[&str] = &[
    "CHANNELS_LISTEN",
    "CHANNELS_LISTEN_BACKLOG",
    "CHANNELS_DEV",
    "CHANNELS_AUTH_JWKS_URL",
    "CHANNELS_AUTH_JWKS_FILE",
    "CHANNELS_AUTH_HS256_SECRET",
    "CHANNELS_AUTH_ISSUER",
    "CHANNELS_AUTH_AUDIENCE",
    "CHANNELS_AUTH_LEEWAY",
    "CHANNELS_WS_TOKEN_SECRET",
    "CHANNELS_WS_TOKEN_TTL",
    "CHANNELS_API_KEYS",
    "CHANNELS_CORS_ORIGINS",
    "CHANNELS_MAX_BODY_BYTES",
    "CHANNELS_SOCKET_QUEUE",
    "CHANNELS_SOCKET_QUEUE_BYTES",
    "CHANNELS_WS_MAX_MESSAGE_BYTES",
    "CHANNELS_HEADER_TIMEOUT",
    "CHANNELS_PING_INTERVAL",
    "CHANNELS_PING_TIMEOUT",
    "CHANNELS_METRICS_MAX_CHANNELS",
    "CHANNELS_SHUTDOWN_TIMEOUT",
    "CHANNELS_WORKER_THREADS",
    "CHANNELS_RECOVERY_WINDOW",
    "CHANNELS_MAX_BATCH",
    "CHANNELS_MAX_BATCH_BYTES",
    "CHANNELS_IDEMPOTENCY_WINDOW",
    "CHANNELS_IDEMPOTENCY_MAX_KEYS",
    "CHANNELS_RECOVERY_MAX_MISSED",
    "CHANNELS_REDIS_URL",
    "CHANNELS_REDIS_CLUSTER",
    "CHANNELS_REDIS_PREFIX",
    "CHANNELS_MAX_CONNECTIONS",
    "CHANNELS_MAX_SOCKETS_PER_USER",
    "CHANNELS_MAX_JSON_DEPTH",
    "CHANNELS_CONNECT_RATE",
    "CHANNELS_AUTHORIZE_RATE",
    "CHANNELS_NOTIFY_RATE_PER_KEY",
    "CHANNELS_NOTIFY_RATE_PER_ADDRESS",
    "CHANNELS_CLIENT_ADDRESS_HEADER",
    "CHANNELS_LOG",
    "CHANNELS_LOG_FORMAT",
];

/// The `CHANNELS_*` names among `names` that the node does not read, each
/// with the known name nearest to it when one is near (a typo's distance).
pub fn unknown_variables<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, Option<&'static str>)> {
    let mut unknown: Vec<_> = names
        .into_iter()
        .filter(|name| name.starts_with("CHANNELS_") && !KNOWN.contains(name))
        .map(|name| {
            let nearest = KNOWN
                .iter()
                .map(|known| (strsim::damerau_levenshtein(name, known), *known))
                .min()
                .filter(|(distance, _)| *distance <= 3)
                .map(|(_, known)| known);
            (name.to_string(), nearest)
        })
        .collect();
    unknown.sort();
    unknown
}

/// One line per unknown variable, for the start-up warning and
/// `check-config`'s error.
pub fn describe_unknown(unknown: &[(String, Option<&'static str>)]) -> Vec<String> {
    unknown
        .iter()
        .map(|(name, nearest)| match nearest {
            Some(known) => format!("{name} is not a channels setting: did you mean {known}?"),
            None => format!("{name} is not a channels setting"),
        })
        .collect()
}

/// `CHANNELS_LISTEN`: `host:port`, where the host is an IP address (IPv6
/// in brackets), a name resolved once at start (`localhost:3000`), or
/// empty for every interface (`:3000`).
fn listen_address(raw: &str) -> Result<std::net::SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    let invalid = |reason: String| ConfigError::Invalid {
        var: "CHANNELS_LISTEN",
        reason: format!(
            "{raw:?}: {reason}; expected host:port, as 0.0.0.0:3000, [::]:3000, localhost:3000 or :3000"
        ),
    };
    if let Ok(addr) = raw.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = raw.rsplit_once(':') else {
        return Err(invalid("no port".into()));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| invalid(format!("{port:?} is not a port")))?;
    if host.is_empty() {
        return Ok(std::net::SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let mut resolved: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| invalid(format!("{host:?} does not resolve ({e})")))?
        .collect();
    // IPv4 first: `localhost` then binds where most clients look for it.
    resolved.sort_by_key(|addr| addr.is_ipv6());
    resolved
        .into_iter()
        .next()
        .ok_or_else(|| invalid(format!("{host:?} resolves to no address")))
}

/// A boolean variable, in any of the usual spellings of env files (Docker,
/// Kubernetes, systemd): `1/0`, `true/false`, `yes/no`, `on/off`, in any
/// case.
pub fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Invalid {
            var,
            reason: format!("{value:?}: expected 1/0, true/false, yes/no or on/off"),
        }),
    }
}

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
    /// disconnected as a slow client.
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
    pub fn from_env(dev_mode: bool) -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect(), dev_mode)
    }

    /// Dev-mode configuration with no environment at all (tests, the tour).
    pub fn dev() -> Self {
        Self::from_vars(&HashMap::new(), true).expect("dev defaults are valid")
    }

    /// Reads the configuration from a map of variables (the environment, or a
    /// test's own map).
    pub fn from_vars(vars: &HashMap<String, String>, dev_mode: bool) -> Result<Self, ConfigError> {
        let env = Env { vars, dev_mode };
        let listen_default = if dev_mode {
            dev::LISTEN
        } else {
            "0.0.0.0:3000"
        };
        let listen = listen_address(env.get("CHANNELS_LISTEN").unwrap_or(listen_default))?;

        let upstream = UpstreamConfig {
            keys: env.upstream_keys()?,
            issuer: env.list("CHANNELS_AUTH_ISSUER"),
            audience: env.list("CHANNELS_AUTH_AUDIENCE"),
            leeway: Duration::from_secs(env.parse("CHANNELS_AUTH_LEEWAY", "30")?),
        };
        let ws_token_secret = env.secret("CHANNELS_WS_TOKEN_SECRET", dev::WS_TOKEN_SECRET)?;
        if let UpstreamKeySource::Hs256(upstream_secret) = &upstream.keys
            && upstream_secret == &ws_token_secret
        {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_WS_TOKEN_SECRET",
                reason: "must differ from CHANNELS_AUTH_HS256_SECRET, or a ws token would pass as an access token".into(),
            });
        }
        let ws_token_ttl: u64 = env.parse("CHANNELS_WS_TOKEN_TTL", "300")?;
        if ws_token_ttl == 0 || ws_token_ttl > 86_400 {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_WS_TOKEN_TTL",
                reason: "must be between 1 and 86400 seconds".into(),
            });
        }

        let api_keys = match env.list("CHANNELS_API_KEYS") {
            Some(keys) => keys.into_iter().map(Secret).collect(),
            None if dev_mode => vec![Secret::new(dev::API_KEY)],
            None => {
                return Err(ConfigError::Missing {
                    var: "CHANNELS_API_KEYS",
                    hint: " (comma-separated keys accepted by POST /notify)",
                });
            }
        };

        let cors_default = if dev_mode { "*" } else { "" };
        let cors_origins = env
            .list("CHANNELS_CORS_ORIGINS")
            .unwrap_or_else(|| split_list(cors_default));

        let max_body_bytes: usize = env.parse("CHANNELS_MAX_BODY_BYTES", "1048576")?;
        if max_body_bytes < MIN_BODY_BYTES {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_MAX_BODY_BYTES",
                reason: format!("must be at least {MIN_BODY_BYTES} (256 KiB)"),
            });
        }
        let socket_queue: usize = env.parse("CHANNELS_SOCKET_QUEUE", "256")?;
        if socket_queue < 8 {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_SOCKET_QUEUE",
                reason: "must be at least 8".into(),
            });
        }
        let socket_queue_bytes: usize = env.parse("CHANNELS_SOCKET_QUEUE_BYTES", "4194304")?;
        if socket_queue_bytes < 65_536 {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_SOCKET_QUEUE_BYTES",
                reason: "must be at least 65536".into(),
            });
        }
        let ws_max_message_bytes: usize = env.parse("CHANNELS_WS_MAX_MESSAGE_BYTES", "16384")?;
        if ws_max_message_bytes < 1024 {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_WS_MAX_MESSAGE_BYTES",
                reason: "must be at least 1024 (a CONNECT packet carries a token)".into(),
            });
        }

        let listen_backlog = env.positive("CHANNELS_LISTEN_BACKLOG", "1024")?;
        let listen_backlog = u32::try_from(listen_backlog)
            .ok()
            .filter(|&n| n <= MAX_LISTEN_BACKLOG)
            .ok_or_else(|| ConfigError::Invalid {
                var: "CHANNELS_LISTEN_BACKLOG",
                reason: format!("must be at most {MAX_LISTEN_BACKLOG}"),
            })?;

        Ok(Self {
            listen,
            listen_backlog,
            dev_mode,
            upstream,
            ws_token_secret,
            ws_token_ttl: Duration::from_secs(ws_token_ttl),
            api_keys,
            cors_origins,
            max_body_bytes,
            max_batch: env.positive("CHANNELS_MAX_BATCH", "1000")?,
            max_batch_bytes: env.positive("CHANNELS_MAX_BATCH_BYTES", "8388608")?,
            socket_queue,
            socket_queue_bytes,
            ws_max_message_bytes,
            metrics_max_channels: env.parse("CHANNELS_METRICS_MAX_CHANNELS", "200")?,
            shutdown_timeout: Duration::from_secs(env.parse("CHANNELS_SHUTDOWN_TIMEOUT", "10")?),
            header_timeout: env.seconds("CHANNELS_HEADER_TIMEOUT", "10")?,
            ping_interval: env.seconds("CHANNELS_PING_INTERVAL", "25")?,
            ping_timeout: env.seconds("CHANNELS_PING_TIMEOUT", "20")?,
            worker_threads: match env.get("CHANNELS_WORKER_THREADS") {
                None | Some("auto") => None,
                Some(_) => Some(env.positive("CHANNELS_WORKER_THREADS", "auto")?),
            },
            redis: env.redis()?,
            recovery: Recovery {
                window: Duration::from_secs(env.parse("CHANNELS_RECOVERY_WINDOW", "120")?),
                max_missed: env.positive("CHANNELS_RECOVERY_MAX_MISSED", "1000")?,
            },
            idempotency: Idempotency {
                window: env.seconds("CHANNELS_IDEMPOTENCY_WINDOW", "3600")?,
                max_keys: env.positive("CHANNELS_IDEMPOTENCY_MAX_KEYS", "100000")?,
            },
            limits: env.limits()?,
        })
    }
}

impl Config {
    /// The effective settings by variable, secrets masked: what
    /// `channels check-config` prints.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| format!("{}", d.as_secs());
        let list = |l: &[String]| {
            if l.is_empty() {
                "(none)".into()
            } else {
                l.join(",")
            }
        };
        let (source_var, source) = match &self.upstream.keys {
            UpstreamKeySource::JwksUrl(url) => ("CHANNELS_AUTH_JWKS_URL", url.clone()),
            UpstreamKeySource::JwksFile(path) => {
                ("CHANNELS_AUTH_JWKS_FILE", path.display().to_string())
            }
            UpstreamKeySource::Hs256(secret) => ("CHANNELS_AUTH_HS256_SECRET", mask(secret)),
        };
        let mut out = vec![
            ("CHANNELS_DEV", self.dev_mode.to_string()),
            ("CHANNELS_LISTEN", self.listen.to_string()),
            ("CHANNELS_LISTEN_BACKLOG", self.listen_backlog.to_string()),
            (source_var, source),
            (
                "CHANNELS_AUTH_ISSUER",
                self.upstream
                    .issuer
                    .as_deref()
                    .map_or("(not checked)".into(), list),
            ),
            (
                "CHANNELS_AUTH_AUDIENCE",
                self.upstream
                    .audience
                    .as_deref()
                    .map_or("(not checked)".into(), list),
            ),
            ("CHANNELS_AUTH_LEEWAY", secs(self.upstream.leeway)),
            ("CHANNELS_WS_TOKEN_SECRET", mask(&self.ws_token_secret)),
            ("CHANNELS_WS_TOKEN_TTL", secs(self.ws_token_ttl)),
            (
                "CHANNELS_API_KEYS",
                format!(
                    "{} key(s), {}",
                    self.api_keys.len(),
                    self.api_keys.iter().map(mask).collect::<Vec<_>>().join(",")
                ),
            ),
            ("CHANNELS_CORS_ORIGINS", list(&self.cors_origins)),
            ("CHANNELS_MAX_BODY_BYTES", self.max_body_bytes.to_string()),
            ("CHANNELS_MAX_BATCH", self.max_batch.to_string()),
            ("CHANNELS_MAX_BATCH_BYTES", self.max_batch_bytes.to_string()),
            ("CHANNELS_SOCKET_QUEUE", self.socket_queue.to_string()),
            (
                "CHANNELS_SOCKET_QUEUE_BYTES",
                self.socket_queue_bytes.to_string(),
            ),
            (
                "CHANNELS_WS_MAX_MESSAGE_BYTES",
                self.ws_max_message_bytes.to_string(),
            ),
            ("CHANNELS_HEADER_TIMEOUT", secs(self.header_timeout)),
            ("CHANNELS_PING_INTERVAL", secs(self.ping_interval)),
            ("CHANNELS_PING_TIMEOUT", secs(self.ping_timeout)),
            (
                "CHANNELS_METRICS_MAX_CHANNELS",
                self.metrics_max_channels.to_string(),
            ),
            ("CHANNELS_SHUTDOWN_TIMEOUT", secs(self.shutdown_timeout)),
            (
                "CHANNELS_RECOVERY_WINDOW",
                if self.recovery.enabled() {
                    secs(self.recovery.window)
                } else {
                    "0 (recovery off)".into()
                },
            ),
            (
                "CHANNELS_RECOVERY_MAX_MISSED",
                self.recovery.max_missed.to_string(),
            ),
            ("CHANNELS_IDEMPOTENCY_WINDOW", secs(self.idempotency.window)),
            (
                "CHANNELS_IDEMPOTENCY_MAX_KEYS",
                self.idempotency.max_keys.to_string(),
            ),
            (
                "CHANNELS_WORKER_THREADS",
                self.worker_threads
                    .map_or("auto (one per core)".into(), |n| n.to_string()),
            ),
        ];
        let limits = &self.limits;
        let rate = |r: Option<Rate>| r.map_or("off".into(), |r| r.to_string());
        out.extend([
            (
                "CHANNELS_MAX_CONNECTIONS",
                max_connections(limits.max_connections),
            ),
            (
                "CHANNELS_MAX_SOCKETS_PER_USER",
                limits.max_sockets_per_user.to_string(),
            ),
            ("CHANNELS_MAX_JSON_DEPTH", limits.max_json_depth.to_string()),
            ("CHANNELS_CONNECT_RATE", rate(limits.rates.connect)),
            ("CHANNELS_AUTHORIZE_RATE", rate(limits.rates.authorize)),
            (
                "CHANNELS_NOTIFY_RATE_PER_KEY",
                rate(limits.rates.notify_per_key),
            ),
            (
                "CHANNELS_NOTIFY_RATE_PER_ADDRESS",
                rate(limits.rates.notify_per_address),
            ),
            (
                "CHANNELS_CLIENT_ADDRESS_HEADER",
                limits
                    .rates
                    .client_address_header
                    .as_ref()
                    .map_or("(none: the peer address)".into(), |h| h.to_string()),
            ),
        ]);
        match &self.redis {
            None => out.push(("CHANNELS_REDIS_URL", "(none: standalone node)".into())),
            Some(redis) => {
                let urls: Vec<String> = redis.urls.iter().map(|u| mask_url(u)).collect();
                out.push(("CHANNELS_REDIS_URL", urls.join(",")));
                out.push(("CHANNELS_REDIS_CLUSTER", redis.cluster.to_string()));
                out.push(("CHANNELS_REDIS_PREFIX", redis.prefix.clone()));
            }
        }
        out
    }
}

/// `CHANNELS_MAX_CONNECTIONS` and the cap a node would apply under this
/// process's descriptor limit, which it raises to the hard one at start.
fn max_connections(configured: usize) -> String {
    let hard = crate::limits::descriptors::hard_limit();
    match hard.map(|hard| crate::limits::descriptors::cap(configured, hard)) {
        Ok(Ok(cap)) => match cap.why {
            Some(why) => format!("{configured} (applied: {}; {why})", cap.applied),
            None => configured.to_string(),
        },
        Ok(Err(e)) => format!("{configured} (a node cannot start: {e})"),
        Err(e) => format!("{configured} (descriptor limit unknown: {e})"),
    }
}

/// A secret shown as its length only.
fn mask(secret: &Secret) -> String {
    format!("*** ({} bytes)", secret.expose().len())
}

/// A URL with its password, if any, replaced by `***`.
pub fn mask_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// The variables being read, and whether dev defaults apply.
struct Env<'a> {
    vars: &'a HashMap<String, String>,
    dev_mode: bool,
}

impl Env<'_> {
    /// A set, non-blank value.
    fn get(&self, var: &str) -> Option<&str> {
        self.vars
            .get(var)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: &str,
    ) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.get(var).unwrap_or(default);
        raw.parse().map_err(|e: T::Err| ConfigError::Invalid {
            var,
            reason: format!("{raw:?}: {e}"),
        })
    }

    /// A whole, positive number of seconds.
    fn seconds(&self, var: &'static str, default: &str) -> Result<Duration, ConfigError> {
        match self.parse::<u64>(var, default)? {
            0 => Err(ConfigError::Invalid {
                var,
                reason: "must be at least 1 second".into(),
            }),
            secs => Ok(Duration::from_secs(secs)),
        }
    }

    /// A whole number of at least 1.
    fn positive(&self, var: &'static str, default: &str) -> Result<usize, ConfigError> {
        match self.parse::<usize>(var, default)? {
            0 => Err(ConfigError::Invalid {
                var,
                reason: "must be at least 1".into(),
            }),
            n => Ok(n),
        }
    }

    /// A [`Rate`], or `off`.
    fn rate(&self, var: &'static str, default: &str) -> Result<Option<Rate>, ConfigError> {
        match self.get(var).unwrap_or(default) {
            "off" => Ok(None),
            _ => self.parse(var, default).map(Some),
        }
    }

    fn limits(&self) -> Result<Limits, ConfigError> {
        let client_address_header = self
            .get("CHANNELS_CLIENT_ADDRESS_HEADER")
            .map(|h| {
                HeaderName::try_from(h).map_err(|_| ConfigError::Invalid {
                    var: "CHANNELS_CLIENT_ADDRESS_HEADER",
                    reason: format!("{h:?} is not a header name"),
                })
            })
            .transpose()?;
        Ok(Limits {
            max_connections: self.positive("CHANNELS_MAX_CONNECTIONS", "200000")?,
            max_sockets_per_user: self.positive("CHANNELS_MAX_SOCKETS_PER_USER", "32")?,
            max_json_depth: self.positive("CHANNELS_MAX_JSON_DEPTH", "64")?,
            rates: RateLimits {
                connect: self.rate("CHANNELS_CONNECT_RATE", "50:200")?,
                authorize: self.rate("CHANNELS_AUTHORIZE_RATE", "20:100")?,
                notify_per_key: self.rate("CHANNELS_NOTIFY_RATE_PER_KEY", "20000:40000")?,
                notify_per_address: self.rate("CHANNELS_NOTIFY_RATE_PER_ADDRESS", "20000:40000")?,
                client_address_header,
            },
        })
    }

    fn list(&self, var: &str) -> Option<Vec<String>> {
        self.get(var).map(split_list).filter(|l| !l.is_empty())
    }

    fn secret(&self, var: &'static str, dev_default: &str) -> Result<Secret, ConfigError> {
        let value = match self.get(var) {
            Some(v) => v,
            None if self.dev_mode => dev_default,
            None => {
                return Err(ConfigError::Missing {
                    var,
                    hint: " (a random string of at least 32 bytes)",
                });
            }
        };
        if value.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::Invalid {
                var,
                reason: format!("must be at least {MIN_SECRET_BYTES} bytes long"),
            });
        }
        Ok(Secret::new(value))
    }

    fn redis(&self) -> Result<Option<RedisSettings>, ConfigError> {
        let sentinel = self
            .get("CHANNELS_REDIS_URL")
            .filter(|url| url.trim().starts_with(crate::bus::SENTINEL_SCHEME));
        let urls = match sentinel {
            // One URL whose host list is comma-separated.
            Some(url) => {
                crate::bus::SentinelUrl::parse(url.trim()).map_err(|reason| {
                    ConfigError::Invalid {
                        var: "CHANNELS_REDIS_URL",
                        reason,
                    }
                })?;
                vec![url.trim().to_string()]
            }
            None => match self.list("CHANNELS_REDIS_URL") {
                Some(urls) => urls,
                None => return Ok(None),
            },
        };
        if let Some(bad) = urls.iter().find(|u| {
            !(u.starts_with("redis://")
                || u.starts_with("rediss://")
                || u.starts_with(crate::bus::SENTINEL_SCHEME))
        }) {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_REDIS_URL",
                reason: format!(
                    "{:?} is not a redis://, rediss:// or redis+sentinel:// URL",
                    bad.split('@').next_back().unwrap_or_default()
                ),
            });
        }
        let cluster = match self.get("CHANNELS_REDIS_CLUSTER") {
            None => false,
            Some(value) => parse_bool("CHANNELS_REDIS_CLUSTER", value)?,
        };
        if cluster && sentinel.is_some() {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_REDIS_CLUSTER",
                reason: "a Redis Cluster is not found through Sentinel".into(),
            });
        }
        if urls.len() > 1 && !cluster {
            return Err(ConfigError::Invalid {
                var: "CHANNELS_REDIS_URL",
                reason: "several URLs are only for a cluster (CHANNELS_REDIS_CLUSTER=true)".into(),
            });
        }
        let prefix = self
            .get("CHANNELS_REDIS_PREFIX")
            .unwrap_or("channels")
            .to_string();
        Ok(Some(RedisSettings {
            urls,
            cluster,
            prefix,
        }))
    }

    /// Exactly one upstream key source must be configured (dev mode: HS256).
    fn upstream_keys(&self) -> Result<UpstreamKeySource, ConfigError> {
        let url = self.get("CHANNELS_AUTH_JWKS_URL");
        let file = self.get("CHANNELS_AUTH_JWKS_FILE");
        let hs = self.get("CHANNELS_AUTH_HS256_SECRET");
        match (url, file, hs) {
            (Some(url), None, None) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(ConfigError::Invalid {
                        var: "CHANNELS_AUTH_JWKS_URL",
                        reason: "must be an http:// or https:// URL".into(),
                    });
                }
                Ok(UpstreamKeySource::JwksUrl(url.to_string()))
            }
            (None, Some(file), None) => Ok(UpstreamKeySource::JwksFile(PathBuf::from(file))),
            (None, None, Some(_)) | (None, None, None) if hs.is_some() || self.dev_mode => Ok(
                UpstreamKeySource::Hs256(self.secret("CHANNELS_AUTH_HS256_SECRET", dev::UPSTREAM_SECRET)?),
            ),
            (None, None, None) => Err(ConfigError::Missing {
                var: "CHANNELS_AUTH_JWKS_URL",
                hint: " (or CHANNELS_AUTH_JWKS_FILE, or CHANNELS_AUTH_HS256_SECRET): how to verify access tokens",
            }),
            _ => Err(ConfigError::Invalid {
                var: "CHANNELS_AUTH_JWKS_URL",
                reason: "set only one of CHANNELS_AUTH_JWKS_URL, CHANNELS_AUTH_JWKS_FILE, CHANNELS_AUTH_HS256_SECRET".into(),
            }),
        }
    }
}

fn split_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
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
    fn production_without_secrets_names_the_missing_variable() {
        let err = Config::from_vars(&vars(&[]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("CHANNELS_AUTH_JWKS_URL"), "{err}");
        let err = Config::from_vars(&vars(&[("CHANNELS_AUTH_HS256_SECRET", UP)]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("CHANNELS_WS_TOKEN_SECRET"), "{err}");
        let err = Config::from_vars(
            &vars(&[
                ("CHANNELS_AUTH_HS256_SECRET", UP),
                ("CHANNELS_WS_TOKEN_SECRET", WS),
            ]),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("CHANNELS_API_KEYS"), "{err}");
    }

    #[test]
    fn unknown_variables_are_named_with_the_nearest_known_one() {
        let unknown = unknown_variables([
            "CHANNELS_LISTN",
            "CHANNELS_API_KEY",
            "CHANNELS_LISTEN",
            "CHANNELS_SOMETHING_ELSE_ENTIRELY",
            "PATH",
        ]);
        assert_eq!(
            unknown,
            vec![
                ("CHANNELS_API_KEY".to_string(), Some("CHANNELS_API_KEYS")),
                ("CHANNELS_LISTN".to_string(), Some("CHANNELS_LISTEN")),
                ("CHANNELS_SOMETHING_ELSE_ENTIRELY".to_string(), None),
            ]
        );
    }

    /// The names in backticks that start the rows of `text`'s table.
    fn table_names(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|line| line.strip_prefix("| `CHANNELS_"))
            .filter_map(|rest| rest.split('`').next())
            .map(|rest| format!("CHANNELS_{rest}"))
            .collect()
    }

    #[test]
    fn the_readme_table_and_the_code_name_the_same_variables() {
        let readme = include_str!("../README.md");
        assert_eq!(table_names(readme), KNOWN, "README's configuration table");
        for source in [include_str!("config.rs"), include_str!("cli.rs")] {
            // The code, not these tests' misspellings.
            let code = source.split("#[cfg(test)]").next().unwrap_or_default();
            for read in code.split('"').filter(|s| {
                s.len() > "CHANNELS_".len()
                    && s.starts_with("CHANNELS_")
                    && s.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            }) {
                assert!(KNOWN.contains(&read), "{read} is read but not in KNOWN");
            }
        }
    }

    #[test]
    fn the_listen_address_takes_a_name_or_an_empty_host() {
        assert_eq!(
            listen_address("127.0.0.1:3000").unwrap().to_string(),
            "127.0.0.1:3000"
        );
        assert_eq!(
            listen_address("[::1]:3000").unwrap().to_string(),
            "[::1]:3000"
        );
        assert_eq!(listen_address(":3000").unwrap().to_string(), "0.0.0.0:3000");
        assert_eq!(listen_address("localhost:3000").unwrap().port(), 3000);
        assert!(listen_address("localhost:3000").unwrap().ip().is_loopback());
        for bad in [
            "nowhere",
            "localhost",
            "localhost:http",
            ":99999",
            "no-such-host.invalid:3000",
        ] {
            let e = listen_address(bad).unwrap_err().to_string();
            assert!(
                e.contains("CHANNELS_LISTEN") && e.contains("expected host:port"),
                "{bad}: {e}"
            );
        }
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
