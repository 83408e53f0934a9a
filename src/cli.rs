//! The `channels` command line: run a node, and the operator's tools to mint
//! and debug tokens and to check a configuration before deploying it.
//!
//! Every command reads the same environment as `serve`, so what
//! `check-config` and `check-token` say is what a node with that
//! environment would do.

use std::{
    io::{Read, Write},
    process::ExitCode,
    time::Duration,
};

use base64::Engine;
use clap::{Parser, Subcommand};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    auth::{UpstreamVerifier, WsTokens},
    config::{
        Config, LogFormat, Secret, dev,
        settings::{self, Setting},
    },
    notification::KeycloakId,
};

#[derive(Parser)]
#[command(version, about = "Real-time notification gateway (socket.io + HTTP)")]
struct Cli {
    /// Dev mode: fixed, public secrets and no setup (never in production).
    /// `CHANNELS_DEV=1` (or true, yes, on) does the same.
    #[arg(long, global = true)]
    dev: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (the default).
    Serve,
    /// Print a signed token for a user: an upstream access token, as the
    /// identity provider would issue it (HS256 setups and dev mode), or with
    /// `--ws` a ws token for a socket connection.
    GenToken {
        /// The keycloak id (`sub`) of the token.
        #[arg(long)]
        user: String,
        /// Mint a ws token instead of an upstream access token.
        #[arg(long)]
        ws: bool,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Verify a token against the current configuration and say exactly why
    /// it would be refused. The token is read from the argument or stdin.
    CheckToken {
        /// Check a ws token (socket connection) instead of an access token.
        #[arg(long)]
        ws: bool,
        /// The token; `-` or nothing reads it from stdin.
        token: Option<String>,
    },
    /// Validate the environment and print the effective configuration, with
    /// secrets masked. Exits 2 naming every invalid or missing setting.
    CheckConfig,
    /// Exit 0 if the node at `--url` answers `/healthz` (container health checks).
    Probe {
        /// Base URL of the node.
        #[arg(long, default_value = "http://127.0.0.1:3000")]
        url: String,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Read here rather than by clap, whose error would name `--dev`.
    let dev_mode = match from_env(&settings::DEV, false) {
        _ if cli.dev => true,
        Ok(dev) => dev.unwrap_or(false),
        Err(failure) => return report(Err(failure)),
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(dev_mode),
        Command::GenToken { user, ws, ttl } => report(gen_token(&user, ws, ttl, dev_mode)),
        Command::CheckToken { ws, token } => report(check_token(ws, token, dev_mode)),
        Command::CheckConfig => report(check_config(dev_mode)),
        Command::Probe { url } => report(probe(&url)),
    }
}

/// A command's failure: the message, and the exit code (1: the thing checked
/// is bad; 2: the command could not run, e.g. configuration errors).
struct Failure(String, u8);

fn report(result: Result<String, Failure>) -> ExitCode {
    match result {
        Ok(out) => {
            // Not println!, which panics when the reader has gone (`| head`).
            let _ = writeln!(std::io::stdout(), "{out}");
            ExitCode::SUCCESS
        }
        Err(Failure(message, code)) => {
            eprintln!("channels: {message}");
            ExitCode::from(code)
        }
    }
}

fn config(dev_mode: bool) -> Result<Config, Failure> {
    Config::from_env(dev_mode).map_err(|e| Failure(format!("configuration error: {e}"), 2))
}

/// One setting from the process environment, for the commands that need
/// only it: its value, or the one that applies unset in this mode.
fn from_env<T>(setting: &Setting<T>, dev_mode: bool) -> Result<Option<T>, Failure> {
    let raw = std::env::var(setting.name())
        .ok()
        .filter(|raw| !raw.trim().is_empty());
    let Some(raw) = raw.as_deref().or(setting.about.unset_value(dev_mode)) else {
        return Ok(None);
    };
    (setting.parse)(raw.trim()).map(Some).map_err(|reason| {
        Failure(
            format!(
                "configuration error: {} is invalid: {reason}",
                setting.name()
            ),
            2,
        )
    })
}

/// A runtime with `worker_threads` worker threads, or one per core: a
/// node's comes from `CHANNELS_WORKER_THREADS`, the operator's tools take
/// the default.
fn runtime(worker_threads: Option<usize>) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

fn serve(dev_mode: bool) -> ExitCode {
    let config = match config(dev_mode) {
        Ok(config) => config,
        Err(failure) => return report(Err(failure)),
    };
    init_logging(&config);
    if config.dev_mode {
        tracing::warn!(
            "DEV MODE: fixed public secrets, API key {:?}; never use in production",
            dev::API_KEY
        );
    }
    for unknown in unknown_variables() {
        tracing::warn!("{unknown}; it is ignored");
    }
    runtime(config.worker_threads).block_on(async move {
        // Before the node serves: a SIGTERM that arrives once it answers
        // must shut it down gracefully, not kill it by the default action
        // because no handler was installed yet.
        let mut signals = match ShutdownSignals::install() {
            Ok(signals) => signals,
            Err(e) => return report(Err(Failure(format!("cannot handle signals: {e}"), 2))),
        };
        let listener = match crate::limits::bind(config.listen, config.listen_backlog) {
            Ok(l) => l,
            Err(e) => {
                let message = format!("cannot listen on {} (CHANNELS_LISTEN): {e}", config.listen);
                return report(Err(Failure(message, 2)));
            }
        };
        let node = match crate::start(config, listener).await {
            Ok(node) => node,
            Err(e) => return report(Err(Failure(e.to_string(), 2))),
        };
        signals.recv().await;
        tracing::info!("shutdown signal received");
        if node.shutdown().await {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

/// `CHANNELS_LOG` and `CHANNELS_LOG_FORMAT`. Colours only when stderr is a
/// terminal, so a log file or a log collector gets no escape codes.
fn init_logging(config: &Config) {
    use std::io::IsTerminal;
    use tracing_subscriber::{filter::filter_fn, layer::SubscriberExt, util::SubscriberInitExt};

    let filter = tracing_subscriber::EnvFilter::new(&config.log);
    // tungstenite logs every received websocket message at trace level, and
    // a client's CONNECT message carries its token: its trace events (and
    // tokio-tungstenite's, a line per read and write) are dropped whatever
    // CHANNELS_LOG says. A cap, not a level: a directive
    // (`tungstenite=debug`) would raise it above CHANNELS_LOG's too.
    let no_tungstenite_trace = filter_fn(|metadata| {
        let target = metadata.target();
        !(*metadata.level() == tracing::Level::TRACE
            && (target.starts_with("tungstenite") || target.starts_with("tokio_tungstenite")))
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(no_tungstenite_trace);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if config.log_format == LogFormat::Json {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer).init();
    }
}

/// SIGINT and SIGTERM, the signals that shut a node down gracefully.
struct ShutdownSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignals {
    /// Replaces the signals' default action (end the process) from here on.
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for either signal.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {},
            _ = self.terminate.recv() => {},
        }
    }
}

fn gen_token(user: &str, ws: bool, ttl: u64, dev_mode: bool) -> Result<String, Failure> {
    let user = KeycloakId::parse(user).map_err(|e| Failure(format!("--user {e}"), 2))?;
    if ws {
        let secret = from_env(&settings::WS_TOKEN_SECRET, dev_mode)?
            .ok_or_else(|| Failure("CHANNELS_WS_TOKEN_SECRET is required (or --dev)".into(), 2))?;
        let tokens = WsTokens::new(&secret, Duration::from_secs(ttl));
        return Ok(tokens.mint(&user));
    }
    let secret = from_env(&settings::AUTH_HS256_SECRET, dev_mode)?
        .or_else(|| dev_mode.then(|| Secret::new(dev::UPSTREAM_SECRET)))
        .ok_or_else(|| {
            Failure(
                "CHANNELS_AUTH_HS256_SECRET is required (or --dev); \
                 with a JWKS, tokens come from the identity provider"
                    .into(),
                2,
            )
        })?;
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = serde_json::json!({"sub": user.as_str(), "iat": now, "exp": now + ttl});
    if let Some(iss) = from_env(&settings::AUTH_ISSUER, dev_mode)? {
        claims["iss"] = iss[0].as_str().into();
    }
    if let Some(aud) = from_env(&settings::AUTH_AUDIENCE, dev_mode)? {
        claims["aud"] = aud[0].as_str().into();
    }
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .expect("HS256 encoding cannot fail"))
}

/// Describes the token (header and the claims that matter, never the
/// signature) and gives the verdict of this configuration's verifier.
fn check_token(ws: bool, token: Option<String>, dev_mode: bool) -> Result<String, Failure> {
    let token = match token.filter(|t| t != "-") {
        Some(token) => token,
        None => {
            let mut buf = String::new();
            std::io::stdin()
                .read_to_string(&mut buf)
                .map_err(|e| Failure(format!("cannot read the token from stdin: {e}"), 2))?;
            buf
        }
    };
    let token = token.trim();
    let config = config(dev_mode)?;
    let mut out = describe_token(token);
    let verdict = if ws {
        WsTokens::new(&config.ws_token_secret, config.ws_token_ttl).verify(token)
    } else {
        runtime(None).block_on(async {
            let verifier = UpstreamVerifier::new(&config.upstream)
                .await
                .map_err(|e| Failure(e, 2))?;
            Ok::<_, Failure>(verifier.verify(token).await)
        })?
    };
    let kind = if ws { "ws token" } else { "access token" };
    match verdict {
        Ok(subject) => {
            out.push_str(&format!("verdict: valid {kind} for keycloakID {subject:?}"));
            Ok(out)
        }
        Err(e) => {
            let hint = match (ws, is_ws_token(token)) {
                (false, true) => "\nhint: this is a ws token (aud channels-ws): check it with --ws",
                (true, false) => {
                    "\nhint: this is not a ws token (its aud is not channels-ws): an access \
                     token is checked without --ws"
                }
                _ => "",
            };
            Err(Failure(
                format!("{out}verdict: {kind} refused: {e}{hint}"),
                1,
            ))
        }
    }
}

/// Whether a token says it is a ws token (its audience), unverified: only
/// to point at the right flag when it is refused.
fn is_ws_token(token: &str) -> bool {
    token
        .split('.')
        .nth(1)
        .and_then(|claims| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims.trim_end_matches('='))
                .ok()
        })
        .and_then(|claims| serde_json::from_slice::<Value>(&claims).ok())
        .is_some_and(|claims| {
            claims["aud"] == crate::auth::ws_token::WS_AUDIENCE
                || claims["aud"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v == crate::auth::ws_token::WS_AUDIENCE))
        })
}

/// The header and main claims of a JWT, decoded without verification.
fn describe_token(token: &str) -> String {
    let mut parts = token.split('.');
    let mut decode = || -> Option<Value> {
        let part = parts.next()?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let (Some(header), Some(claims)) = (decode(), decode()) else {
        return "token: not a JWT (three base64url parts, header and claims in JSON)\n".into();
    };
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let field = |v: &Value, k: &str| v.get(k).map_or("-".to_string(), |x| x.to_string());
    let time = |k: &str| match claims.get(k).and_then(Value::as_i64) {
        Some(t) if t >= now => format!("{t} (in {} s)", t - now),
        Some(t) => format!("{t} ({} s ago)", now - t),
        None => "-".into(),
    };
    format!(
        "header: alg={} kid={}\nclaims: sub={} iss={} aud={} exp={} nbf={}\n",
        field(&header, "alg"),
        field(&header, "kid"),
        field(&claims, "sub"),
        field(&claims, "iss"),
        field(&claims, "aud"),
        time("exp"),
        time("nbf"),
    )
}

fn check_config(dev_mode: bool) -> Result<String, Failure> {
    let config = config(dev_mode)?;
    let unknown = unknown_variables();
    if !unknown.is_empty() {
        return Err(Failure(
            format!("configuration error: {}", unknown.join("; ")),
            2,
        ));
    }
    let described = config.describe();
    let width = described.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let lines: Vec<String> = described
        .iter()
        .map(|(var, value)| {
            let value = if *var == settings::MAX_CONNECTIONS.name() {
                max_connections(config.limits.max_connections, value)
            } else {
                value.clone()
            };
            format!("{var:width$}  {value}")
        })
        .collect();
    Ok(format!("configuration is valid\n{}", lines.join("\n")))
}

/// `CHANNELS_MAX_CONNECTIONS` as shown, and the cap a node would apply
/// under this process's descriptor limit, which it raises to the hard one
/// at start.
fn max_connections(configured: usize, shown: &str) -> String {
    use crate::limits::descriptors;
    match descriptors::hard_limit().map(|hard| descriptors::cap(configured, hard)) {
        Ok(Ok(cap)) => match cap.why {
            Some(why) => format!("{shown} (applied: {}; {why})", cap.applied),
            None => shown.to_string(),
        },
        Ok(Err(e)) => format!("{shown} (a node cannot start: {e})"),
        Err(e) => format!("{shown} (descriptor limit unknown: {e})"),
    }
}

/// The misspelled `CHANNELS_*` variables of this process's environment,
/// described ([`settings::unknown_variables`]).
fn unknown_variables() -> Vec<String> {
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .collect();
    settings::describe_unknown(&settings::unknown_variables(
        names.iter().map(String::as_str),
    ))
}

fn probe(url: &str) -> Result<String, Failure> {
    runtime(None).block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| Failure(e.to_string(), 2))?;
        let response = client
            .get(format!("{}/healthz", url.trim_end_matches('/')))
            .send()
            .await
            .map_err(|e| Failure(format!("{url} unreachable: {e}"), 1))?;
        if response.status().is_success() {
            Ok(format!("{url} is alive"))
        } else {
            Err(Failure(
                format!("{url}/healthz answered {}", response.status()),
                1,
            ))
        }
    })
}
